"""Broken worker: answers init, then on the first request sends a header announcing 4 GiB
(FF FF FF FF) and waits.

Standard library only; the framing is in _rawframe.py.
"""

import os
import time

from _rawframe import answer_init, OUT, read_frame

answer_init()
read_frame()
os.write(OUT, b"\xff\xff\xff\xff")
time.sleep(3600)
