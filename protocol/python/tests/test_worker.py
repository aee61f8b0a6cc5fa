"""Tests of the Python worker SDK against real worker processes, in both channel modes."""

import fcntl
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import unittest

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)
TIMEOUT = 20


def env_for(channel):
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["WHARF_CHANNEL"] = channel
    env["WHARF_MAX_FRAME"] = str(8 * 1024 * 1024)
    return env


def high_pipe():
    """A pipe whose ends are numbered 10 or above, so placing them on fds 3 and 4 in the child
    can never clobber one with the other."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends


class Peer:
    """The runtime's side of one worker: spawns it and speaks frames to it."""

    def __init__(self, argv, channel="fds"):
        self.channel = channel
        if channel == "fds":
            to_r, self.to_w = high_pipe()
            self.from_r, from_w = high_pipe()

            def place_fds():
                os.dup2(to_r, 3)
                os.dup2(from_w, 4)

            self.proc = subprocess.Popen(
                argv,
                env=env_for("fds"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Python's pipes are not inheritable; only the dup2'd fds 3 and 4 reach the child.
                close_fds=False,
                preexec_fn=place_fds,
            )
            os.close(to_r)
            os.close(from_w)
        else:
            self.proc = subprocess.Popen(
                argv, env=env_for("stdio"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self.to_w = self.proc.stdin.fileno()
            self.from_r = self.proc.stdout.fileno()
        self.next_id = 1

    def send_raw(self, data):
        os.write(self.to_w, data)

    def send(self, msg):
        payload = msgpack.packb(msg, use_bin_type=True)
        self.send_raw(struct.pack(">I", len(payload)) + payload)

    def _read_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(self.from_r, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def recv(self):
        header = self._read_exact(4)
        if header is None:
            return None
        (n,) = struct.unpack(">I", header)
        return msgpack.unpackb(self._read_exact(n), raw=False, strict_map_key=False)

    def init(self):
        self.send({"t": "init", "id": 0, "version": 1})
        return self.recv()

    def call(self, method, body=None):
        rid = self.next_id
        self.next_id += 1
        self.send({"t": "call", "id": rid, "method": method, "body": body})
        reply = self.recv()
        assert reply["id"] == rid, reply
        return reply

    def close_input(self):
        if self.channel == "fds":
            os.close(self.to_w)
        else:
            self.proc.stdin.close()

    def wait(self):
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        for f in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if f:
                f.close()
        if self.channel == "fds":
            for fd in (self.to_w, self.from_r):
                try:
                    os.close(fd)
                except OSError:
                    pass


DEMO = [sys.executable, "-m", "wharf_worker.demo"]


class DemoWorkerTests(unittest.TestCase):
    channel = "fds"

    def setUp(self):
        self.peer = Peer(DEMO, self.channel)
        self.addCleanup(self.peer.close)

    def test_handshake(self):
        pong = self.peer.init()
        self.assertEqual(pong["t"], "init_pong")
        self.assertEqual(pong["status"], "ok")
        self.assertEqual(pong["version"], 1)
        self.assertEqual(pong["pid"], self.peer.proc.pid)
        self.assertIn("echo", pong["methods"])
        self.assertEqual(pong["methods"], sorted(pong["methods"]))

    def test_echo_of_assorted_values(self):
        self.peer.init()
        values = [
            None, True, False, 0, -1, -(2**63), 2**64 - 1, 1.5, -0.25, "", "héllo ✓", b"", b"\x00\xff" * 100,
            [1, [2, [3]]], {"a": {"b": [1, 2, {"c": None}]}}, b"x" * (1024 * 1024),
        ]
        for v in values:
            reply = self.peer.call("echo", v)
            self.assertEqual(reply["t"], "ok")
            self.assertEqual(reply["body"], v)

    def test_unknown_method_is_a_typed_error_and_the_worker_keeps_serving(self):
        self.peer.init()
        reply = self.peer.call("nope", 1)
        self.assertEqual((reply["t"], reply["kind"]), ("error", "unknown_method"))
        self.assertEqual(self.peer.call("echo", 2)["body"], 2)

    def test_handler_exception_becomes_error_reply(self):
        self.peer.init()
        reply = self.peer.call("fail", "bad thing")
        self.assertEqual(reply["t"], "error")
        self.assertEqual(reply["kind"], "RuntimeError")
        self.assertEqual(reply["message"], "bad thing")
        self.assertEqual(self.peer.call("echo", 3)["body"], 3)

    def test_state_and_reset(self):
        self.peer.init()
        self.peer.call("state_set", {"key": "k", "value": 42})
        self.assertEqual(self.peer.call("state_get", {"key": "k"})["body"], 42)
        self.peer.send({"t": "reset", "id": 99})
        self.assertEqual(self.peer.recv(), {"t": "ok", "id": 99, "body": None})
        self.assertIsNone(self.peer.call("state_get", {"key": "k"})["body"])

    def test_ping_pong(self):
        self.peer.init()
        self.peer.send({"t": "ping", "id": 7})
        self.assertEqual(self.peer.recv(), {"t": "pong", "id": 7})

    def test_stream_sends_chunks_then_ok(self):
        self.peer.init()
        self.peer.send({"t": "call", "id": 5, "method": "stream", "body": {"n": 3}})
        got = [self.peer.recv() for _ in range(4)]
        self.assertEqual([m["t"] for m in got], ["chunk", "chunk", "chunk", "ok"])
        self.assertEqual([m["seq"] for m in got[:3]], [0, 1, 2])
        self.assertEqual([m["body"] for m in got], [0, 1, 2, 3])

    def test_print_does_not_corrupt_the_channel(self):
        self.peer.init()
        self.assertEqual(self.peer.call("print", "stray output")["t"], "ok")
        self.assertEqual(self.peer.call("echo", "after")["body"], "after")

    def test_shutdown_exits_zero(self):
        self.peer.init()
        self.peer.send({"t": "shutdown"})
        self.assertEqual(self.peer.wait(), 0)

    def test_eof_exits_zero(self):
        self.peer.init()
        self.peer.close_input()
        self.assertEqual(self.peer.wait(), 0)

    def test_oversized_header_exits_2_without_reading_it(self):
        self.peer.init()
        self.peer.send_raw(b"\xff\xff\xff\xff")
        self.assertEqual(self.peer.wait(), 2)

    def test_zero_length_frame_exits_2(self):
        self.peer.init()
        self.peer.send_raw(b"\x00\x00\x00\x00")
        self.assertEqual(self.peer.wait(), 2)

    def test_garbage_msgpack_exits_2(self):
        self.peer.init()
        self.peer.send_raw(b"\x00\x00\x00\x02\x81\xc1")
        self.assertEqual(self.peer.wait(), 2)

    def test_non_map_message_exits_2(self):
        self.peer.init()
        payload = msgpack.packb([1, 2])
        self.peer.send_raw(struct.pack(">I", len(payload)) + payload)
        self.assertEqual(self.peer.wait(), 2)

    def test_truncated_frame_then_eof_exits_2(self):
        self.peer.init()
        self.peer.send_raw(b"\x00\x00\x00\x10\x81")
        self.peer.close_input()
        self.assertEqual(self.peer.wait(), 2)


class DemoWorkerStdioTests(DemoWorkerTests):
    channel = "stdio"


class InitHookTests(unittest.TestCase):
    def test_init_failure_is_reported_in_the_pong(self):
        peer = Peer(DEMO + ["--init-fail", "no model"])
        self.addCleanup(peer.close)
        pong = peer.init()
        self.assertEqual(pong["status"], "error")
        self.assertIn("no model", pong["message"])
        self.assertEqual(peer.wait(), 1)

    def test_init_delay_holds_the_pong(self):
        import time

        peer = Peer(DEMO + ["--init-delay-ms", "300"])
        self.addCleanup(peer.close)
        t = time.monotonic()
        self.assertEqual(peer.init()["status"], "ok")
        self.assertGreaterEqual(time.monotonic() - t, 0.3)


class AsyncHandlerTests(unittest.TestCase):
    def test_async_handlers_and_async_generators(self):
        code = textwrap.dedent(
            """
            import asyncio
            from wharf_worker import Worker
            w = Worker()

            @w.method("double")
            async def double(x):
                await asyncio.sleep(0.01)
                return x * 2

            @w.method("count")
            async def count(body, ctx):
                for i in range(body):
                    yield [i, ctx.request_id]

            w.run()
            """
        )
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(code)
        self.addCleanup(os.unlink, f.name)
        peer = Peer([sys.executable, f.name])
        self.addCleanup(peer.close)
        self.assertEqual(peer.init()["methods"], ["count", "double"])
        self.assertEqual(peer.call("double", 21)["body"], 42)
        peer.send({"t": "call", "id": 9, "method": "count", "body": 2})
        msgs = [peer.recv() for _ in range(3)]
        self.assertEqual([m["t"] for m in msgs], ["chunk", "chunk", "ok"])
        self.assertEqual(msgs[1]["body"], [1, 9])


if __name__ == "__main__":
    unittest.main()
