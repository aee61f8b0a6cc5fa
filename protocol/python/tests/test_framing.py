"""Framing and the serving loop, in process: no worker subprocess."""

import os
import struct
import threading
import unittest

import msgpack

from . import support  # noqa: F401  (puts the source tree on sys.path)
from wharf_worker import MAX_DEPTH, Context, FrameError, Worker
from wharf_worker.framing import FrameReader, decode, encode, nests_deeper_than

# docs/protocol.md, section 7.
CALL_BYTES = bytes.fromhex(
    "00000020" "84" "a174" "a463616c6c" "a26964" "01" "a66d6574686f64" "a46563686f" "a4626f6479"
    "a26869"
)
OK_BYTES = bytes.fromhex("00000012" "83" "a174" "a26f6b" "a26964" "01" "a4626f6479" "a26869")


def nested(depth):
    """A value of ``depth`` levels of arrays (depth 0: nil)."""
    value = None
    for _ in range(depth):
        value = [value]
    return value


class Pipe:
    """A pipe fed from a thread, so the writer cannot block the test."""

    def __init__(self, data, close=True):
        self.r, self.w = os.pipe()
        self.thread = threading.Thread(target=self._feed, args=(data, close), daemon=True)
        self.thread.start()

    def _feed(self, data, close):
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view):]
        if close:
            os.close(self.w)
            self.w = None

    def close(self):
        self.thread.join(5)
        for fd in (self.r, self.w):
            if fd is not None:
                os.close(fd)


class FramingTests(unittest.TestCase):
    def reader(self, data, max_frame=1 << 23, close=True):
        pipe = Pipe(data, close)
        self.addCleanup(pipe.close)
        return FrameReader(pipe.r, max_frame)

    def test_worked_example_of_the_spec(self):
        self.assertEqual(encode({"t": "ok", "id": 1, "body": "hi"}), OK_BYTES)
        msg = self.reader(CALL_BYTES).read()
        self.assertEqual(msg, {"t": "call", "id": 1, "method": "echo", "body": "hi"})

    def test_reads_consecutive_frames_then_clean_eof(self):
        msgs = [{"t": "ping", "id": i, "pad": b"x" * (i * 7000)} for i in range(40)]
        reader = self.reader(b"".join(encode(m) for m in msgs))
        for m in msgs:
            self.assertEqual(reader.read(), m)
        self.assertIsNone(reader.read())
        self.assertIsNone(reader.read())

    def test_frame_of_exactly_max_frame_is_accepted(self):
        data = encode({"t": "ping", "id": 1, "pad": "x" * 100})
        n = len(data) - 4
        self.assertEqual(self.reader(data, max_frame=n).read()["id"], 1)
        with self.assertRaisesRegex(FrameError, "max_frame"):
            self.reader(data, max_frame=n - 1).read()

    def test_huge_header_fails_before_reading_a_payload(self):
        # The writer stays open: a reader that waited for the payload would block forever.
        reader = self.reader(b"\xff\xff\xff\xff", close=False)
        with self.assertRaisesRegex(FrameError, "4294967295"):
            reader.read()

    def test_zero_length_frame(self):
        with self.assertRaisesRegex(FrameError, "zero-length"):
            self.reader(b"\x00\x00\x00\x00").read()

    def test_truncated_header_and_payload(self):
        with self.assertRaisesRegex(FrameError, "truncated"):
            self.reader(b"\x00\x00").read()
        with self.assertRaisesRegex(FrameError, "truncated"):
            self.reader(b"\x00\x00\x00\x10\x81\xa1t").read()

    def test_payloads_that_are_not_one_map(self):
        bad = {
            "garbage": b"\xc1",
            "truncated value": b"\x82\xa1t",
            "not a map": msgpack.packb([1, 2]),
            "trailing bytes": msgpack.packb({"t": "ping", "id": 1}) + b"\x00",
            "bad utf-8": b"\x81\xa1t\xa2\xff\xfe",
            "non-str key": msgpack.packb({"t": "ping", "id": 1, 7: "x"}),
        }
        for name, payload in bad.items():
            with self.subTest(name), self.assertRaises(FrameError):
                decode(payload)

    def test_nesting_limit(self):
        ok = {"t": "call", "id": 1, "body": nested(MAX_DEPTH - 1)}  # the map is level 1
        self.assertEqual(decode(msgpack.packb(ok)), ok)
        too_deep = {"t": "call", "id": 1, "body": nested(MAX_DEPTH)}
        with self.assertRaisesRegex(FrameError, "deeper"):
            decode(msgpack.packb(too_deep))
        self.assertFalse(nests_deeper_than({"k": [{"a": 1}]}, 3))
        self.assertTrue(nests_deeper_than({"k": [{"a": []}]}, 3))
        self.assertTrue(nests_deeper_than({(1, (2, ())): 1}, 3))  # keys count too


class RegistrationTests(unittest.TestCase):
    def test_decorator_forms_and_sorted_methods(self):
        w = Worker()

        @w.method("zeta")
        def z(body):
            return body

        @w.method(context=True)
        def alpha(body, ctx):
            return ctx

        @w.method
        def Mid(body):
            return body

        self.assertEqual(w.methods, ["Mid", "alpha", "zeta"])
        self.assertIs(z(1), 1)  # the decorator returns the function itself
        self.assertFalse(w._handlers["zeta"][1])
        self.assertTrue(w._handlers["alpha"][1])


class ServeInProcessTests(unittest.TestCase):
    """Worker.serve on a pipe pair in this process."""

    def serve(self, worker, data, max_frame=1 << 23):
        inp = Pipe(data)
        out_r, out_w = os.pipe()
        self.addCleanup(inp.close)
        replies = bytearray()

        def drain():
            while True:
                chunk = os.read(out_r, 65536)
                if not chunk:
                    break
                replies.extend(chunk)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        status = worker.serve(inp.r, out_w, max_frame)
        os.close(out_w)
        drainer.join(10)
        os.close(out_r)
        msgs, view = [], memoryview(bytes(replies))
        while view:
            (n,) = struct.unpack(">I", view[:4])
            msgs.append(msgpack.unpackb(view[4 : 4 + n], raw=False, strict_map_key=False))
            view = view[4 + n :]
        return status, msgs

    def test_worked_example_reply_bytes(self):
        w = Worker()
        w.method("echo")(lambda body: body)
        inp = Pipe(CALL_BYTES)
        self.addCleanup(inp.close)
        out_r, out_w = os.pipe()
        self.assertEqual(w.serve(inp.r, out_w), 0)
        os.close(out_w)
        self.assertEqual(os.read(out_r, 100), OK_BYTES)
        os.close(out_r)

    def test_a_session_of_messages(self):
        w = Worker()
        resets = []
        w.on_reset(lambda: resets.append(1))

        @w.method()
        def echo(body, ctx: Context):
            return [body, ctx.request_id, ctx.method, ctx.session, ctx.deadline_ms]

        msgs = [
            {"t": "init", "id": 0, "version": 1},
            {"t": "call", "id": 1, "method": "echo", "body": "a", "session": "s1",
             "deadline_ms": 250},
            {"t": "call", "id": 2, "method": "echo", "body": None, "extra_field": [1]},
            {"t": "cancel", "id": 2},
            {"t": "reset", "id": 3, "session": "s1"},
            {"t": "ping", "id": 4},
            {"t": "shutdown"},
            {"t": "ping", "id": 5},
        ]
        status, replies = self.serve(w, b"".join(encode(m) for m in msgs))
        self.assertEqual(status, 0)
        self.assertEqual(replies[0]["t"], "init_pong")
        self.assertEqual(replies[0]["methods"], ["echo"])
        self.assertNotIn("message", replies[0])
        self.assertEqual(replies[1], {"t": "ok", "id": 1, "body": ["a", 1, "echo", "s1", 250]})
        self.assertEqual(replies[2], {"t": "ok", "id": 2, "body": [None, 2, "echo", None, None]})
        self.assertEqual(replies[3], {"t": "ok", "id": 3, "body": None})
        self.assertEqual(replies[4], {"t": "pong", "id": 4})
        self.assertEqual(len(replies), 5)
        self.assertEqual(resets, [1])

    def test_violations_end_serving_with_status_2(self):
        cases = {
            "no t": {"id": 1},
            "unknown t": {"t": "frobnicate", "id": 1},
            "t not a str": {"t": 7, "id": 1},
            "call without id": {"t": "call", "method": "echo"},
            "negative id": {"t": "ping", "id": -1},
            "method not a str": {"t": "call", "id": 1, "method": 5},
        }
        for name, msg in cases.items():
            with self.subTest(name), self.assertLogs("wharf_worker", "ERROR") as logs:
                status, replies = self.serve(Worker(), encode(msg) + encode({"t": "ping", "id": 9}))
                self.assertEqual(status, 2)
                self.assertIn("protocol violation", logs.output[0])
                self.assertEqual(replies, [])


if __name__ == "__main__":
    unittest.main()
