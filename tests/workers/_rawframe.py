"""Hand-rolled framing shared by the broken test workers: standard library only, so they test
the runtime against raw bytes rather than against the SDK. Channel on fds 3 in, 4 out (stdin and
stdout with WHARF_CHANNEL=stdio).

`Conforming` (below) is a whole conforming worker on the same footing, for the fixtures that
break exactly one rule.
"""

import os
import select
import struct
import sys
import time

if os.environ.get("WHARF_CHANNEL") == "stdio":
    IN, OUT = 0, 1
else:
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


# -- A conforming worker in the standard library, for fixtures that break one rule -----------
#
# `Conforming` serves the whole protocol (docs/protocol.md) and offers every conformance method
# of section 6; a fixture subclasses it and overrides the one behaviour it gets wrong, so that
# it fails exactly one check.

MAX_FRAME = int(os.environ.get("WHARF_MAX_FRAME", str(8 * 1024 * 1024)))


class Malformed(Exception):
    """The bytes are not one valid MessagePack value."""


def pack(obj, float_bytes=None):
    """MessagePack encoding of ``obj``; ``float_bytes(x)``, if given, may encode a float its
    own way (return None to keep the float64 encoding)."""
    out = bytearray()

    def put(v):
        if v is None:
            out.append(0xC0)
        elif v is True or v is False:
            out.append(0xC3 if v else 0xC2)
        elif isinstance(v, int):
            if 0 <= v < 128 or -32 <= v < 0:
                out.extend(struct.pack(">b" if v < 0 else ">B", v))
            elif v >= 0:
                for tag, fmt, top in ((0xCC, ">B", 8), (0xCD, ">H", 16), (0xCE, ">I", 32), (0xCF, ">Q", 64)):
                    if v < 1 << top:
                        out.append(tag)
                        out.extend(struct.pack(fmt, v))
                        break
            else:
                for tag, fmt, top in ((0xD0, ">b", 7), (0xD1, ">h", 15), (0xD2, ">i", 31), (0xD3, ">q", 63)):
                    if v >= -(1 << top):
                        out.append(tag)
                        out.extend(struct.pack(fmt, v))
                        break
        elif isinstance(v, float):
            own = float_bytes(v) if float_bytes else None
            out.extend(own if own is not None else b"\xcb" + struct.pack(">d", v))
        elif isinstance(v, str):
            data = v.encode()
            n = len(data)
            if n < 32:
                out.append(0xA0 | n)
            elif n < 1 << 8:
                out.extend(b"\xd9" + struct.pack(">B", n))
            elif n < 1 << 16:
                out.extend(b"\xda" + struct.pack(">H", n))
            else:
                out.extend(b"\xdb" + struct.pack(">I", n))
            out.extend(data)
        elif isinstance(v, (bytes, bytearray)):
            n = len(v)
            if n < 1 << 8:
                out.extend(b"\xc4" + struct.pack(">B", n))
            elif n < 1 << 16:
                out.extend(b"\xc5" + struct.pack(">H", n))
            else:
                out.extend(b"\xc6" + struct.pack(">I", n))
            out.extend(v)
        elif isinstance(v, (list, tuple)):
            n = len(v)
            out.extend(bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n))
            for x in v:
                put(x)
        elif isinstance(v, dict):
            n = len(v)
            out.extend(bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n) if n < 1 << 16 else b"\xdf" + struct.pack(">I", n))
            for k, x in v.items():
                put(k)
                put(x)
        else:
            raise TypeError("cannot encode %r" % (v,))

    put(obj)
    return bytes(out)


def unpack(data):
    """The one MessagePack value in ``data``; Malformed if it is not exactly one value."""
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise Malformed("truncated value")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    def num(fmt):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def get(depth):
        if depth > 128:
            raise Malformed("nested too deep")
        b = take(1)[0]
        if b < 0x80:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return getmap(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return [get(depth + 1) for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return take(b & 0x1F).decode()
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        ints = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
                0xCA: ">f", 0xCB: ">d"}
        if b in ints:
            return num(ints[b])
        lens = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
        if b in lens:
            raw = take(num(lens[b]))
            return bytes(raw) if b <= 0xC6 else raw.decode()
        if b in (0xDC, 0xDD):
            return [get(depth + 1) for _ in range(num(">H" if b == 0xDC else ">I"))]
        if b in (0xDE, 0xDF):
            return getmap(num(">H" if b == 0xDE else ">I"), depth)
        raise Malformed("byte 0x%02x" % b)

    def getmap(n, depth):
        out = {}
        for _ in range(n):
            k = get(depth + 1)
            if isinstance(k, (list, dict)):
                raise Malformed("container map key")
            out[k] = get(depth + 1)
        return out

    try:
        value = get(1)
    except UnicodeDecodeError:
        raise Malformed("invalid UTF-8") from None
    if pos != len(data):
        raise Malformed("%d trailing bytes" % (len(data) - pos))
    return value


class Conforming:
    """A worker that follows the protocol; fixtures override one method to break one rule."""

    methods = ["echo", "fail", "wait", "state_get", "state_set", "stream"]

    def __init__(self):
        self.buf = b""
        self.queued = []  # messages read while a call ran, handled after it
        self.state = {}
        self.running = None  # the id of the call running, if any

    # -- reading ---------------------------------------------------------------------------

    def violation(self, why):
        sys.stderr.write("%s: protocol violation by the runtime: %s\n" % (type(self).__name__, why))
        sys.stderr.flush()
        os._exit(2)

    def on_eof(self):
        """EOF on the input: a clean close on a frame boundary, a violation inside a frame."""
        if self.buf:
            self.truncated()
        os._exit(0)

    def truncated(self):
        self.violation("truncated frame: EOF after %d bytes" % len(self.buf))

    def oversized(self, n):
        self.violation("frame of %d bytes over WHARF_MAX_FRAME (%d)" % (n, MAX_FRAME))

    def fill(self, timeout=None):
        """Reads what arrives within ``timeout`` (None: wait) into the buffer."""
        ready, _, _ = select.select([IN], [], [], timeout)
        if ready:
            chunk = os.read(IN, 1 << 16)
            if not chunk:
                self.on_eof()
            self.buf += chunk

    def buffered(self):
        """The next message if a whole frame is buffered, else None."""
        if len(self.buf) < 4:
            return None
        n = struct.unpack(">I", self.buf[:4])[0]
        if n == 0 or n > MAX_FRAME:
            self.oversized(n)
        if len(self.buf) < 4 + n:
            return None
        payload, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return self.decode(payload)

    def decode(self, payload):
        try:
            msg = unpack(payload)
        except Malformed as e:
            return self.malformed(e)
        if not isinstance(msg, dict):
            return self.not_a_map(msg)
        return msg

    def malformed(self, e):
        self.violation("malformed MessagePack: %s" % e)

    def not_a_map(self, msg):
        self.violation("payload is not a map: %r" % (msg,))

    def next(self, timeout=None):
        """The next message, or None if none arrived within ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self.buffered()
            if msg is not None:
                return msg
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return None
            self.fill(left)

    # -- writing ---------------------------------------------------------------------------

    def pack(self, msg):
        return pack(msg)

    def reply(self, msg):
        payload = self.pack(msg)
        data = struct.pack(">I", len(payload)) + payload
        while data:
            data = data[os.write(OUT, data):]

    def ok(self, rid, body):
        self.reply({"t": "ok", "id": rid, "body": body})

    def error(self, rid, kind, message):
        self.reply({"t": "error", "id": rid, "kind": kind, "message": message})

    # -- serving ---------------------------------------------------------------------------

    def serve(self):
        while True:
            msg = self.queued.pop(0) if self.queued else self.next()
            self.handle(msg)

    def handle(self, msg):
        t, rid = msg.get("t"), msg.get("id")
        if t == "init":
            self.reply({"t": "init_pong", "id": rid, "status": "ok", "version": 1, "pid": os.getpid(),
                        "methods": self.methods})
        elif t == "ping":
            self.pong(rid)
        elif t == "reset":
            self.reset()
            self.ok(rid, None)
        elif t == "shutdown":
            os._exit(0)
        elif t == "cancel":
            pass  # the call it names has ended
        elif t == "call":
            self.call(rid, msg.get("method"), msg.get("body"), msg)
        else:
            self.unknown_type(msg)

    def unknown_type(self, msg):
        self.violation("unknown message type %r" % (msg.get("t"),))

    def pong(self, rid):
        self.reply({"t": "pong", "id": rid})

    def reset(self):
        self.state.clear()

    def call(self, rid, method, body, msg):
        if method not in self.methods:
            return self.error(rid, "unknown_method", "no method %r" % (method,))
        getattr(self, "m_" + method)(rid, body, msg)

    def m_echo(self, rid, body, msg):
        self.ok(rid, body)

    def m_fail(self, rid, body, msg):
        self.error(rid, "RuntimeError", "requested failure")

    def m_state_set(self, rid, body, msg):
        self.state[body["key"]] = body.get("value")
        self.ok(rid, None)

    def m_state_get(self, rid, body, msg):
        self.ok(rid, self.state.get(body["key"]))

    def m_stream(self, rid, body, msg):
        for seq in range(body["n"]):
            self.reply({"t": "chunk", "id": rid, "seq": seq, "body": seq})
        self.ok(rid, body["n"])

    def m_wait(self, rid, body, msg):
        """Runs up to body["ms"] ms, reading the channel meanwhile: ends early with error kind
        cancelled on a cancel naming it, deadline_exceeded when deadline_ms runs out."""
        start = time.monotonic()
        end = start + body["ms"] / 1000
        deadline = msg.get("deadline_ms")
        if deadline is not None and self.honours_deadline():
            end = min(end, start + deadline / 1000)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                if deadline is not None and self.honours_deadline() and end < start + body["ms"] / 1000:
                    return self.error(rid, "deadline_exceeded", "deadline_ms %d ran out" % deadline)
                return self.ok(rid, body["ms"])
            if not self.reads_while_calls_run():
                time.sleep(left)
                continue
            got = self.next(left)
            if got is None:
                continue
            if got.get("t") == "cancel" and got.get("id") == rid:
                return self.error(rid, "cancelled", "call %d was cancelled" % rid)
            if got.get("t") == "ping":
                self.pong(got.get("id"))
            else:
                self.queued.append(got)

    def honours_deadline(self):
        return True

    def reads_while_calls_run(self):
        return True
