"""Broken worker: answers init, then on the first request writes a header announcing 100 bytes,
writes 10 of them and exits.

Standard library only; the framing is in _rawframe.py.
"""

import os
import struct

from _rawframe import answer_init, OUT, read_frame

answer_init()
read_frame()
os.write(OUT, struct.pack(">I", 100) + b"\x83" + b"x" * 9)
os._exit(0)
