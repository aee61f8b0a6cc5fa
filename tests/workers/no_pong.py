"""A worker that serves `echo` but never answers `ping`: slow to answer control messages, yet
its calls are fine. Uses msgpack (installed with the SDK); framing in _rawframe.py.
"""

import msgpack

from _rawframe import answer_init, read_frame, send

answer_init()
while True:
    msg = msgpack.unpackb(read_frame(), raw=False)
    if msg.get("t") == "call":
        send(msgpack.packb({"t": "ok", "id": msg.get("id"), "body": msg.get("body")}))
    elif msg.get("t") == "shutdown":
        raise SystemExit(0)
