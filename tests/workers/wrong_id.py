"""Broken worker: answers init correctly, then answers every request with a wrong request id.

Standard library only; the framing is in _rawframe.py.
"""

import struct

from _rawframe import answer_init, read_frame, send, s

answer_init()
while True:
    read_frame()
    # {"t": "ok", "id": 4000000000, "body": nil}: no request in flight has that id.
    send(b"\x83" + s("t") + s("ok") + s("id") + b"\xce" + struct.pack(">I", 4_000_000_000) + s("body") + b"\xc0")
