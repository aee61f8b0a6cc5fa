"""Broken worker: answers init, then on the first request sends a frame whose payload is not
valid MessagePack (a map header, then 0xC1, a byte MessagePack never uses) and waits.

Standard library only; the framing is in _rawframe.py.
"""

import time

from _rawframe import answer_init, read_frame, send, s

answer_init()
read_frame()
send(b"\x82" + s("t") + b"\xc1\xc1")
time.sleep(3600)
