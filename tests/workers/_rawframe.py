"""Hand-rolled framing shared by the broken test workers: standard library only, so they test
the runtime against raw bytes rather than against the SDK. Channel on fds 3 in, 4 out.
"""

import os
import struct
import sys

IN = int(os.environ.get("WHARF_FD_IN", "3"))
OUT = int(os.environ.get("WHARF_FD_OUT", "4"))


def read_frame():
    """Reads one frame's payload; exits 0 on EOF (the runtime closed the channel)."""
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(IN, n - len(buf))
            if not chunk:
                sys.exit(0)
            buf += chunk
        return buf
    return exact(struct.unpack(">I", exact(4))[0])


def send(payload):
    os.write(OUT, struct.pack(">I", len(payload)) + payload)


def s(text):
    """A MessagePack fixstr (under 32 bytes)."""
    return bytes([0xA0 | len(text)]) + text.encode()


def answer_init():
    """Reads the init ping (id 0 by convention, docs/protocol.md section 4) and answers it."""
    read_frame()
    # {"t": "init_pong", "id": 0, "status": "ok", "version": 1, "pid": <pid>, "methods": ["echo", "fail"]}
    send(b"\x86" + s("t") + s("init_pong") + s("id") + b"\x00" + s("status") + s("ok") + s("version") + b"\x01"
         + s("pid") + b"\xce" + struct.pack(">I", os.getpid()) + s("methods") + b"\x92" + s("echo") + s("fail"))
