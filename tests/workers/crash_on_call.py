"""Broken worker: answers init, then dies (exit status 5, one stderr line) on any request.

Standard library only; the framing is in _rawframe.py.
"""

import os
import sys

from _rawframe import answer_init, read_frame

answer_init()
read_frame()
sys.stderr.write("crash_on_call: dying on purpose\n")
sys.stderr.flush()
os._exit(5)
