"""A worker that ends a call only when the runtime cancels it: it never answers `sleep` by
itself (and `stream` sends one chunk, then nothing), and answers either with error kind
`cancelled` as soon as a `cancel` for its id arrives.
Answers `ping`; exits 0 on EOF. Uses msgpack (installed with the SDK); framing in _rawframe.py.
"""

import msgpack

from _rawframe import answer_init, read_frame, send

answer_init()
running = set()
while True:
    msg = msgpack.unpackb(read_frame(), raw=False)
    t, rid = msg.get("t"), msg.get("id")
    if t == "call" and msg.get("method") == "echo":
        send(msgpack.packb({"t": "ok", "id": rid, "body": msg.get("body")}))
    elif t == "call" and msg.get("method") == "stream":
        running.add(rid)
        send(msgpack.packb({"t": "chunk", "id": rid, "seq": 0, "body": 0}))
    elif t == "call":
        running.add(rid)
    elif t == "cancel" and rid in running:
        running.discard(rid)
        send(msgpack.packb({"t": "error", "id": rid, "kind": "cancelled", "message": "cancelled"}))
    elif t == "ping":
        send(msgpack.packb({"t": "pong", "id": rid}))
    elif t == "shutdown":
        raise SystemExit(0)
