"""Broken worker: answers init, then reads every request and never answers; exits 0 on EOF.

Standard library only; the framing is in _rawframe.py.
"""

from _rawframe import answer_init, read_frame

answer_init()
while True:
    read_frame()
