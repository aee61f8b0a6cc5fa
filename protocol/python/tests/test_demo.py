"""The demo worker as a real subprocess, on fds 3/4, on stdin/stdout and on a FIFO pair."""

import math
import os
import signal
import struct
import time
import unittest

import msgpack

from .support import DEMO, TIMEOUT, Peer, frame

DEMO_METHODS = [
    "alloc", "crash", "echo", "fail", "io_wait", "pid", "print", "sleep", "spawn_grandchild",
    "state_get", "state_set", "stream", "wait",
]

INT_EDGES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
]
FLOATS = [0.0, -0.0, 1.5, -0.25, 1e300, -1e-300, 5e-324, math.inf, -math.inf]
STRINGS = ["", "hi", "héllo wörld ✓ 日本語 🚢", "x" * 31, "y" * 32, "z" * 300, "w" * 70000]
BINS = [b"", b"\x00", bytes(range(256)), b"\xff" * 70000]
NESTED = [
    [], {}, [1, [2, [3, []]]], {"a": {"b": [1, 2, {"c": None}]}}, [{"k": [True, None]}] * 20,
    {1: "int key", "s": [1.5, b"b"]}, list(range(100)), {str(i): i for i in range(100)},
]


def nested(depth):
    value = None
    for _ in range(depth):
        value = [value]
    return value


class DemoTests(unittest.TestCase):
    channel = "fds"

    def spawn(self, *args, **env):
        peer = Peer(DEMO + list(args), self.channel, **env)
        self.addCleanup(peer.close)
        return peer

    def setUp(self):
        self.peer = self.spawn()

    def ready(self):
        pong = self.peer.init()
        self.assertEqual(pong["status"], "ok", self.peer.stderr_text())
        return self.peer

    def test_a_watchdog_ends_a_worker_the_runtime_stopped_speaking_to(self):
        peer = self.spawn(WHARF_WATCHDOG_MS=1000)
        self.assertEqual(peer.init()["status"], "ok", peer.stderr_text())
        # Spoken to every 0.1 s, it outlives its watchdog ...
        for i in range(12):
            time.sleep(0.1)
            self.assertEqual(peer.call("echo", i)["body"], i)
        # ... and silence ends it, by itself (its input is still open), with status 0.
        self.assertEqual(peer.wait(), 0, peer.stderr_text())
        self.assertIn("WHARF_WATCHDOG_MS", peer.stderr_text())

    def test_a_watchdog_that_is_not_a_duration_is_refused(self):
        peer = self.spawn(WHARF_WATCHDOG_MS="soon")
        self.assertEqual(peer.wait(), 2)
        self.assertIn("WHARF_WATCHDOG_MS", peer.stderr_text())

    def assert_echoes(self, values):
        for v in values:
            with self.subTest(value=repr(v)[:60]):
                reply = self.peer.call("echo", v)
                self.assertEqual(reply["t"], "ok", reply)
                self.assertEqual(reply["body"], v)
                self.assertEqual(type(reply["body"]), type(v))

    def assert_exits(self, status):
        self.assertEqual(self.peer.wait(), status, self.peer.stderr_text())

    # -- handshake and calls ----------------------------------------------------------------

    def test_handshake(self):
        self.peer.send({"t": "init", "id": 0, "version": 1})
        pong = self.peer.recv()
        self.assertEqual(pong["t"], "init_pong")
        self.assertEqual(pong["id"], 0)
        self.assertEqual(pong["status"], "ok")
        self.assertEqual(pong["version"], 1)
        self.assertEqual(pong["pid"], self.peer.proc.pid)
        self.assertEqual(pong["methods"], DEMO_METHODS)
        self.assertNotIn("message", pong)  # optional fields that are None are omitted

    def test_a_stream_is_stopped_by_a_cancel_at_its_next_chunk(self):
        # The demo's stream handler is a plain generator that never asks for its Context.
        self.ready()
        rid = self.peer.request("call", method="stream", body={"n": 10_000_000})
        first = self.peer.recv()
        self.assertEqual((first["t"], first["id"]), ("chunk", rid))
        self.peer.send({"t": "cancel", "id": rid})
        while True:
            msg = self.peer.recv(timeout=5)
            self.assertIsNotNone(msg, "the worker ended instead of answering")
            if msg["t"] != "chunk":
                break
        self.assertEqual((msg["t"], msg["id"], msg["kind"]), ("error", rid, "cancelled"))
        self.assertEqual(self.peer.call("echo", "after")["body"], "after")

    def test_echo_nil_and_bool(self):
        self.ready()
        self.assert_echoes([None, True, False])

    def test_echo_integers_at_every_width_edge(self):
        self.ready()
        self.assert_echoes(INT_EDGES)

    def test_echo_floats(self):
        self.ready()
        self.assert_echoes(FLOATS)
        body = self.peer.call("echo", math.nan)["body"]
        self.assertTrue(math.isnan(body))
        # A float32 comes back with the same value.
        payload = msgpack.packb({"t": "call", "id": 99, "method": "echo", "body": 1.5},
                                use_single_float=True)
        self.assertIn(b"\xca", payload)
        self.peer.send_raw(struct.pack(">I", len(payload)) + payload)
        self.assertEqual(self.peer.recv(), {"t": "ok", "id": 99, "body": 1.5})

    def test_echo_strings_and_bins(self):
        self.ready()
        self.assert_echoes(STRINGS + BINS)

    def test_echo_nested_maps_and_arrays(self):
        self.ready()
        self.assert_echoes(NESTED + [nested(127)])  # 127 levels + the message map = 128

    def test_echo_1mib_bin(self):
        self.ready()
        body = os.urandom(1024 * 1024)
        self.assertEqual(self.peer.call("echo", body)["body"], body)

    def test_the_worked_example_bytes(self):
        self.ready()
        self.peer.send_raw(frame({"t": "call", "id": 1, "method": "echo", "body": "hi"}))
        self.assertEqual(
            self.peer.recv_raw(),
            bytes.fromhex("83" "a174" "a26f6b" "a26964" "01" "a4626f6479" "a26869"),
        )

    def test_unknown_method_is_a_typed_error_and_the_worker_keeps_serving(self):
        self.ready()
        reply = self.peer.call("no_such_method", 1)
        self.assertEqual((reply["t"], reply["kind"]), ("error", "unknown_method"))
        self.assertIn("no_such_method", reply["message"])
        self.assertEqual(self.peer.call("echo", 2)["body"], 2)

    def test_handler_exception_becomes_an_error_reply(self):
        self.ready()
        reply = self.peer.call("fail", "bad thing")
        self.assertEqual(reply, {"t": "error", "id": reply["id"], "kind": "RuntimeError",
                                 "message": "bad thing"})
        self.assertEqual(self.peer.call("fail")["message"], "requested failure")
        self.assertEqual(self.peer.call("state_get", "not a map")["kind"], "TypeError")
        self.assertEqual(self.peer.call("echo", 3)["body"], 3)
        self.peer.close_input()
        self.assert_exits(0)
        log = self.peer.stderr_text()
        self.assertIn("Traceback", log)
        self.assertIn("RuntimeError: bad thing", log)

    def test_state_survives_calls_until_reset(self):
        self.ready()
        self.assertIsNone(self.peer.call("state_set", {"key": "k", "value": [1, "v"]})["body"])
        self.assertEqual(self.peer.call("state_get", {"key": "k"})["body"], [1, "v"])
        rid = self.peer.request("reset", session="s-1")
        self.assertEqual(self.peer.recv(), {"t": "ok", "id": rid, "body": None})
        self.assertIsNone(self.peer.call("state_get", {"key": "k"})["body"])

    def test_ping_pong(self):
        self.ready()
        self.peer.send({"t": "ping", "id": 7})
        self.assertEqual(self.peer.recv(), {"t": "pong", "id": 7})

    def test_cancel_of_a_finished_call_is_ignored(self):
        self.ready()
        self.peer.call("sleep", 1)
        self.peer.send({"t": "cancel", "id": 1})
        self.peer.send({"t": "ping", "id": 8})
        self.assertEqual(self.peer.recv(), {"t": "pong", "id": 8})

    def test_ping_while_a_call_runs_is_answered_after_it(self):
        self.ready()
        rid = self.peer.request("call", method="sleep", body=200, deadline_ms=5000)
        self.peer.send({"t": "ping", "id": 50})
        self.assertEqual(self.peer.recv(), {"t": "ok", "id": rid, "body": 200})
        self.assertEqual(self.peer.recv(), {"t": "pong", "id": 50})

    # -- wait: cancel and deadline_ms are honoured while a call runs ------------------------

    def start_wait(self, ms=60000, **fields):
        return self.peer.request("call", method="wait", body={"ms": ms}, **fields)

    def test_wait_runs_its_time_and_returns_it(self):
        self.ready()
        t = time.monotonic()
        self.assertEqual(self.peer.call("wait", {"ms": 50})["body"], 50)
        self.assertGreaterEqual(time.monotonic() - t, 0.05)

    def test_cancel_stops_a_running_wait(self):
        self.ready()
        rid = self.start_wait()
        time.sleep(0.1)
        t = time.monotonic()
        self.peer.send({"t": "cancel", "id": rid})
        reply = self.peer.recv(timeout=2)
        self.assertEqual((reply["t"], reply["id"], reply["kind"]), ("error", rid, "cancelled"))
        self.assertLess(time.monotonic() - t, 2)
        self.assertEqual(self.peer.call("echo", 1)["body"], 1)

    def test_a_cancel_naming_another_call_does_not_stop_the_running_one(self):
        self.ready()
        rid = self.start_wait(ms=300)
        self.peer.send({"t": "cancel", "id": rid + 100})
        self.assertEqual(self.peer.recv(), {"t": "ok", "id": rid, "body": 300})

    def test_deadline_ms_ends_a_wait_with_deadline_exceeded_not_before(self):
        self.ready()
        t = time.monotonic()
        rid = self.start_wait(deadline_ms=200)
        reply = self.peer.recv(timeout=3)
        self.assertEqual((reply["id"], reply["kind"]), (rid, "deadline_exceeded"))
        self.assertGreaterEqual(time.monotonic() - t, 0.2)

    def test_ping_while_a_wait_runs_is_answered_at_once(self):
        self.ready()
        rid = self.start_wait()
        self.peer.send({"t": "ping", "id": 77})
        self.assertEqual(self.peer.recv(timeout=2), {"t": "pong", "id": 77})
        self.peer.send({"t": "cancel", "id": rid})
        self.assertEqual(self.peer.recv(timeout=2)["kind"], "cancelled")

    def test_calls_sent_while_a_wait_runs_are_served_after_it_in_order(self):
        self.ready()
        rid = self.start_wait()
        echo = self.peer.request("call", method="echo", body="next")
        self.peer.send({"t": "cancel", "id": rid})
        self.assertEqual(self.peer.recv(timeout=2)["kind"], "cancelled")
        self.assertEqual(self.peer.recv(), {"t": "ok", "id": echo, "body": "next"})

    def test_eof_while_a_wait_runs_exits_0_at_once(self):
        self.ready()
        self.start_wait()
        time.sleep(0.1)
        self.peer.close_input()
        self.assertEqual(self.peer.wait(timeout=2), 0, self.peer.stderr_text())

    def test_shutdown_while_a_wait_runs_exits_0_at_once(self):
        self.ready()
        self.start_wait()
        self.peer.send({"t": "shutdown"})
        self.assertEqual(self.peer.wait(timeout=2), 0, self.peer.stderr_text())

    def test_a_violation_while_a_wait_runs_exits_2_at_once_without_a_reply(self):
        for data, close in ((b"\x00\x00\x00\x02\x81\xc1", False), (b"\x00\x00\x00\x10\x81", True),
                            (frame({"t": "teleport", "id": 9}), False), (b"\xff\xff\xff\xff", False)):
            with self.subTest(data=data):
                self.peer = self.spawn()
                self.ready()
                self.start_wait()
                self.peer.send_raw(data)
                if close:
                    self.peer.close_input()
                self.assertEqual(self.peer.wait(timeout=2), 2, self.peer.stderr_text())
                self.assertIn("protocol violation", self.peer.stderr_text())
                self.assertIsNone(self.peer.recv())

    def test_stream_sends_chunks_then_ok(self):
        self.ready()
        chunks, final = self.peer.call_stream("stream", {"n": 3})
        self.assertEqual([c["t"] for c in chunks], ["chunk"] * 3)
        self.assertEqual([c["seq"] for c in chunks], [0, 1, 2])
        self.assertEqual([c["body"] for c in chunks], [0, 1, 2])
        self.assertEqual((final["t"], final["body"]), ("ok", 3))
        chunks, final = self.peer.call_stream("stream", {"n": 0})
        self.assertEqual((chunks, final["body"]), ([], 0))

    def test_print_does_not_corrupt_the_channel(self):
        self.ready()
        self.assertEqual(self.peer.call("print", "stray output ✓")["t"], "ok")
        self.assertEqual(self.peer.call("echo", "after")["body"], "after")
        self.peer.close_input()
        self.assert_exits(0)
        stray = self.peer.stdout_text() if self.channel == "fds" else self.peer.stderr_text()
        self.assertIn("stray output ✓\n", stray)

    def test_pid_sleep_alloc(self):
        self.ready()
        self.assertEqual(self.peer.call("pid")["body"], self.peer.proc.pid)
        t = time.monotonic()
        self.assertEqual(self.peer.call("sleep", 100)["body"], 100)
        self.assertGreaterEqual(time.monotonic() - t, 0.1)
        self.assertEqual(self.peer.call("alloc", 4)["body"], 4)
        self.assertEqual(self.peer.call("alloc", 2)["body"], 6)

    def test_spawn_grandchild(self):
        self.ready()
        pid = self.peer.call("spawn_grandchild")["body"]
        self.assertIsInstance(pid, int)
        try:
            os.kill(pid, 0)  # alive
        finally:
            os.kill(pid, signal.SIGKILL)

    def test_crash_exits_hard_without_a_reply(self):
        self.ready()
        self.peer.request("call", method="crash", body=7)
        self.assertIsNone(self.peer.recv())
        self.assert_exits(7)

    def test_crash_default_status(self):
        self.ready()
        self.peer.request("call", method="crash")
        self.assert_exits(3)

    # -- lifecycle ---------------------------------------------------------------------------

    def test_shutdown_exits_0_without_a_reply(self):
        self.ready()
        self.peer.send({"t": "shutdown", "id": 5})
        self.assertIsNone(self.peer.recv())  # EOF, no frame
        self.assert_exits(0)

    def test_shutdown_without_id(self):
        self.ready()
        self.peer.send({"t": "shutdown"})
        self.assert_exits(0)

    def test_eof_exits_0(self):
        self.ready()
        self.peer.close_input()
        self.assert_exits(0)

    def test_eof_exits_0_within_the_exit_bound(self):
        self.ready()
        self.peer.close_input()
        self.assertEqual(self.peer.wait(timeout=2), 0)

    def test_init_with_a_version_it_does_not_speak_is_answered_with_its_own(self):
        self.peer.send({"t": "init", "id": 0, "version": 2})
        pong = self.peer.recv()
        self.assertEqual((pong["t"], pong["status"], pong["version"]), ("init_pong", "ok", 1))
        self.assertEqual(self.peer.call("echo", "still here")["body"], "still here")

    def test_eof_before_init_exits_0(self):
        self.peer.close_input()
        self.assert_exits(0)

    def test_init_delay_holds_the_pong(self):
        peer = self.spawn("--init-delay-ms", "300")
        t = time.monotonic()
        self.assertEqual(peer.init()["status"], "ok")
        self.assertGreaterEqual(time.monotonic() - t, 0.3)

    def test_init_failure_is_reported_in_the_pong(self):
        peer = self.spawn("--init-fail", "no model")
        pong = peer.init()
        self.assertEqual(pong["t"], "init_pong")
        self.assertEqual(pong["status"], "error")
        self.assertEqual(pong["message"], "RuntimeError: no model")
        self.assertEqual(pong["version"], 1)
        self.assertEqual(peer.wait(), 1)

    def test_exit_after_ready(self):
        peer = self.spawn("--exit-after-ready")
        self.assertEqual(peer.init()["status"], "ok")
        self.assertEqual(peer.wait(), 0)

    # -- violations: exit 2, no resync, no hang ----------------------------------------------

    def assert_violation(self, data, close=False, why=None):
        self.ready()
        self.peer.send_raw(data)
        if close:
            self.peer.close_input()
        self.assert_exits(2)
        self.assertIn("protocol violation", self.peer.stderr_text())
        if why:
            self.assertIn(why, self.peer.stderr_text())

    def test_oversized_length_header_exits_2_without_waiting_for_the_payload(self):
        self.assert_violation(b"\xff\xff\xff\xff", why="max_frame")

    def test_frame_over_a_small_max_frame(self):
        self.peer = self.spawn(WHARF_MAX_FRAME=1000)
        self.assert_violation(frame({"t": "call", "id": 1, "method": "echo", "body": "x" * 1000}))

    def test_zero_length_frame_exits_2(self):
        self.assert_violation(b"\x00\x00\x00\x00", why="zero-length")

    def test_garbage_msgpack_exits_2(self):
        self.assert_violation(b"\x00\x00\x00\x02\x81\xc1")

    def test_trailing_bytes_exit_2(self):
        payload = msgpack.packb({"t": "ping", "id": 1}) + b"\xc0"
        self.assert_violation(struct.pack(">I", len(payload)) + payload)

    def test_non_map_message_exits_2(self):
        self.assert_violation(frame([1, 2]))

    def test_message_without_t_exits_2(self):
        self.assert_violation(frame({"id": 1, "method": "echo"}))

    def test_unknown_message_type_exits_2(self):
        self.assert_violation(frame({"t": "teleport", "id": 1}), why="teleport")

    def test_too_deep_message_exits_2(self):
        self.assert_violation(frame({"t": "call", "id": 1, "method": "echo", "body": nested(128)}))

    def test_truncated_payload_then_eof_exits_2(self):
        self.assert_violation(b"\x00\x00\x00\x10\x81", close=True, why="truncated")

    def test_truncated_header_then_eof_exits_2(self):
        self.assert_violation(b"\x00\x00", close=True, why="truncated")


class DemoStdioTests(DemoTests):
    channel = "stdio"


class DemoFifoTests(DemoTests):
    channel = "fifo"


class ChannelConfigTests(unittest.TestCase):
    def test_fds_mode_without_the_fds_exits_2(self):
        import subprocess

        from .support import child_env

        proc = subprocess.run(
            DEMO, env=child_env("fds", WHARF_FD_IN=97, WHARF_FD_OUT=98),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stdout, b"")
        self.assertIn(b"WHARF_CHANNEL=stdio", proc.stderr)

    def run_fifo_mode(self, **env):
        import subprocess

        from .support import child_env

        return subprocess.run(
            DEMO, env=child_env("fifo", **env),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
        )

    def test_fifo_mode_without_its_paths_exits_2(self):
        proc = self.run_fifo_mode(WHARF_FIFO_IN="/nonexistent/in")
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"WHARF_FIFO_OUT", proc.stderr)

    def test_fifo_mode_with_nobody_reading_the_reply_fifo_exits_2_at_once(self):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path_in, path_out = os.path.join(d, "in"), os.path.join(d, "out")
            os.mkfifo(path_in)
            os.mkfifo(path_out)
            started = time.monotonic()
            proc = self.run_fifo_mode(WHARF_FIFO_IN=path_in, WHARF_FIFO_OUT=path_out)
            self.assertLess(time.monotonic() - started, TIMEOUT / 2, "an open blocked")
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"nobody reads it", proc.stderr)

    def test_fifo_mode_on_files_that_are_not_fifos_exits_2(self):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "plain")
            open(path, "w").close()
            proc = self.run_fifo_mode(WHARF_FIFO_IN=path, WHARF_FIFO_OUT=path)
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"not a FIFO", proc.stderr)


if __name__ == "__main__":
    unittest.main()
