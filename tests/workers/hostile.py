"""A worker that misbehaves on request, for wharf's hostile-input and checker tests.

It speaks the protocol correctly (fds 3/4) until a call asks it to break a rule: the call's
method names the misbehaviour (see `misbehave`). Arguments: --silent-init (never answers the
init ping), --crash-at-start (exits 3 at once), --on-call MODE (treats every call as MODE).
"""

import os
import struct
import sys
import time

import msgpack

IN, OUT = 3, 4
ON_CALL = sys.argv[sys.argv.index("--on-call") + 1] if "--on-call" in sys.argv else None


def frame(obj):
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(OUT, view):]


def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(IN, n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf


def read():
    (n,) = struct.unpack(">I", read_exact(4))
    return msgpack.unpackb(read_exact(n), raw=False)


def raw(payload):
    write(struct.pack(">I", len(payload)) + payload)


def main():
    if "--crash-at-start" in sys.argv:
        sys.stderr.write("hostile: crashing at start\n")
        sys.exit(3)
    while True:
        msg = read()
        t, rid = msg["t"], msg.get("id")
        if t == "init":
            if "--silent-init" in sys.argv:
                time.sleep(3600)
            write(frame({"t": "init_pong", "id": rid, "status": "ok", "version": 1, "pid": os.getpid(), "methods": ["echo", "fail"]}))
        elif t == "ping":
            write(frame({"t": "pong", "id": rid}))
        elif t == "reset":
            write(frame({"t": "ok", "id": rid, "body": None}))
        elif t == "shutdown":
            sys.exit(0)
        elif t == "call":
            misbehave(ON_CALL or msg["method"], rid, msg.get("body"))


def misbehave(method, rid, body):
    ok = frame({"t": "ok", "id": rid, "body": body})
    if method == "echo":
        write(ok)
    elif method == "fail":
        write(frame({"t": "error", "id": rid, "kind": "RuntimeError", "message": "requested failure"}))
    elif method == "oversized":
        write(b"\xff\xff\xff\xff")
        time.sleep(3600)
    elif method == "too_large":
        write(struct.pack(">I", 64 * 1024 * 1024))
        time.sleep(3600)
    elif method == "zero_frame":
        write(b"\x00\x00\x00\x00")
        time.sleep(3600)
    elif method == "truncated_eof":
        write(struct.pack(">I", 100) + b"\x85" + b"x" * 9)
        os._exit(0)
    elif method == "garbage":
        raw(b"\x82\xa1t\xc1\xc1")  # a map header, then bytes MessagePack never uses
        time.sleep(3600)
    elif method == "deep_nesting":
        # {"t": "ok", "id": rid, "body": [[[[...]]]]} nested 5000 deep: a few KiB on the wire.
        head = frame({"t": "ok", "id": rid, "body": None})[4:-1]  # the map without its nil body
        raw(head + b"\x91" * 5000 + b"\xc0")
        time.sleep(3600)
    elif method == "not_a_map":
        raw(msgpack.packb([1, 2, 3]))
        time.sleep(3600)
    elif method == "unknown_type":
        write(frame({"t": "bogus", "id": rid}))
        time.sleep(3600)
    elif method == "unknown_id":
        write(frame({"t": "ok", "id": rid + 1000, "body": body}))
        time.sleep(3600)
    elif method == "duplicate":
        write(ok + ok)
    elif method == "junk_stdout":
        sys.stdout.buffer.write(b"\x00\xff junk \x81\xc1 not a frame\n" * 1000)
        sys.stdout.flush()
        write(ok)
    elif method == "flood_stderr":
        line = b"E" * (1024 * 1024)  # 1 MiB without a newline, 20 times
        for _ in range(20):
            sys.stderr.buffer.write(line)
        sys.stderr.buffer.write(b"\n" + b"short line\n" * 10000)
        sys.stderr.flush()
        write(ok)
    elif method == "close_fd":
        os.close(OUT)
        time.sleep(3600)
    else:
        write(frame({"t": "error", "id": rid, "kind": "unknown_method", "message": method}))


if __name__ == "__main__":
    main()
