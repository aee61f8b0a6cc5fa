"""A worker serving several calls at once (Worker(max_concurrency=N)), as a real subprocess."""

import os
import sys
import tempfile
import time
import unittest

from .support import DEMO, Peer, write_script

CONCURRENT = DEMO + ["--max-concurrency", "32"]


def replies(peer, n):
    """The next ``n`` final replies (ok or error), by request id; chunks are kept in order."""
    got = {}
    chunks = {}
    while len(got) < n:
        msg = peer.recv()
        assert msg is not None, "the worker closed its channel: %s" % peer.stderr_text()
        if msg["t"] == "chunk":
            chunks.setdefault(msg["id"], []).append(msg["seq"])
            continue
        assert msg["id"] not in got, "a second reply to %d: %r" % (msg["id"], msg)
        got[msg["id"]] = msg
    return got, chunks


class ConcurrentTests(unittest.TestCase):
    def start(self, argv=CONCURRENT, **env):
        peer = Peer(argv, **env)
        self.addCleanup(peer.close)
        pong = peer.init()
        return peer, pong

    def test_init_pong_declares_max_concurrency(self):
        _, pong = self.start()
        self.assertEqual(pong["status"], "ok")
        self.assertEqual(pong["max_concurrency"], 32)

    def test_one_call_at_a_time_declares_nothing(self):
        _, pong = self.start(DEMO)
        self.assertNotIn("max_concurrency", pong)

    def test_async_calls_overlap_and_each_reply_carries_its_id(self):
        peer, _ = self.start()
        began = time.monotonic()
        ids = {peer.request("call", method="io_wait", body=300 + i): 300 + i for i in range(32)}
        got, _ = replies(peer, 32)
        took = time.monotonic() - began
        self.assertEqual({rid: m["body"] for rid, m in got.items()}, ids)
        self.assertTrue(all(m["t"] == "ok" for m in got.values()), got)
        # 32 calls of ~0.3 s one after the other would take ~10 s.
        self.assertLess(took, 5.0)

    def test_cancel_stops_one_call_and_leaves_the_others(self):
        peer, _ = self.start()
        long_ids = [peer.request("call", method="io_wait", body=600) for _ in range(3)]
        victim = peer.request("call", method="io_wait", body=60_000)
        time.sleep(0.1)
        peer.send({"t": "cancel", "id": victim})
        got, _ = replies(peer, 4)
        self.assertEqual(got[victim]["t"], "error")
        self.assertEqual(got[victim]["kind"], "cancelled")
        for rid in long_ids:
            self.assertEqual((got[rid]["t"], got[rid]["body"]), ("ok", 600))
        # A second cancel of the ended call is ignored; the worker still serves.
        peer.send({"t": "cancel", "id": victim})
        self.assertEqual(peer.call("echo", "after")["body"], "after")

    def test_deadline_ms_ends_the_call_with_deadline_exceeded(self):
        peer, _ = self.start()
        began = time.monotonic()
        rid = peer.request("call", method="io_wait", body=60_000, deadline_ms=300)
        ok = peer.request("call", method="io_wait", body=100)
        got, _ = replies(peer, 2)
        took = time.monotonic() - began
        self.assertEqual(got[rid]["kind"], "deadline_exceeded")
        self.assertGreaterEqual(took, 0.3)
        self.assertEqual(got[ok]["body"], 100)

    def test_ping_is_answered_while_calls_run(self):
        peer, _ = self.start()
        call = peer.request("call", method="io_wait", body=1000)
        ping = peer.request("ping")
        first = peer.recv()
        self.assertEqual((first["t"], first["id"]), ("pong", ping))
        self.assertEqual(peer.recv()["id"], call)

    def test_sync_handlers_errors_streams_and_reset_still_work(self):
        # The demo runs sync handlers in threads by default; --threads 0 runs them on the loop.
        for argv in (CONCURRENT, CONCURRENT + ["--threads", "0"]):
            with self.subTest(argv=argv):
                self.sync_handlers_work(argv)

    def sync_handlers_work(self, argv):
        peer, _ = self.start(argv)
        self.assertEqual(peer.call("echo", {"a": [1, 2.5]})["body"], {"a": [1, 2.5]})
        self.assertEqual(peer.call("fail", "boom")["kind"], "RuntimeError")
        self.assertEqual(peer.call("nope")["kind"], "unknown_method")
        chunks, end = peer.call_stream("stream", {"n": 3})
        self.assertEqual([c["seq"] for c in chunks], [0, 1, 2])
        self.assertEqual(end["body"], 3)
        peer.call("state_set", {"key": "k", "value": 1})
        rid = peer.request("reset")
        self.assertEqual(peer.recv(), {"t": "ok", "id": rid, "body": None})
        self.assertIsNone(peer.call("state_get", {"key": "k"})["body"])

    def test_sync_handlers_run_in_threads_on_request(self):
        peer, _ = self.start(DEMO + ["--max-concurrency", "8", "--threads", "8"])
        began = time.monotonic()
        ids = [peer.request("call", method="sleep", body=400) for _ in range(8)]
        got, _ = replies(peer, 8)
        self.assertEqual(sorted(got), sorted(ids))
        self.assertLess(time.monotonic() - began, 2.5)  # one after the other: 3.2 s
        # A thread's cooperative wait sees cancel through its Context.
        rid = peer.request("call", method="wait", body={"ms": 60_000})
        time.sleep(0.1)
        peer.send({"t": "cancel", "id": rid})
        self.assertEqual(peer.recv()["kind"], "cancelled")

    def test_eof_cancels_running_calls_and_exits_0(self):
        peer, _ = self.start()
        peer.request("call", method="io_wait", body=60_000)
        time.sleep(0.1)
        began = time.monotonic()
        peer.close_input()
        self.assertEqual(peer.wait(), 0)
        self.assertLess(time.monotonic() - began, 2.0)

    def test_shutdown_exits_0_while_calls_run(self):
        peer, _ = self.start()
        peer.request("call", method="io_wait", body=60_000)
        peer.send({"t": "shutdown"})
        self.assertEqual(peer.wait(), 0)

    def test_a_violation_exits_2(self):
        peer, _ = self.start()
        peer.request("call", method="io_wait", body=60_000)
        peer.send({"t": "bogus", "id": 9})
        self.assertEqual(peer.wait(), 2)

    def test_frames_are_never_interleaved_under_many_concurrent_large_replies(self):
        code = """
            import asyncio
            from wharf_worker import Worker

            w = Worker(max_concurrency=16)

            @w.method()
            async def big(n):
                await asyncio.sleep(0.01)
                return bytes([n % 256]) * 200_000

            w.run()
        """
        with tempfile.TemporaryDirectory() as d:
            script = write_script(d, "big.py", code)
            peer, pong = self.start([sys.executable, script])
            self.assertEqual(pong["max_concurrency"], 16)
            ids = {peer.request("call", method="big", body=i): i for i in range(16)}
            got, _ = replies(peer, 16)
            for rid, n in ids.items():
                self.assertEqual(got[rid]["body"], bytes([n % 256]) * 200_000)

    def test_max_concurrency_must_be_positive(self):
        from wharf_worker import Worker

        with self.assertRaises(ValueError):
            Worker(max_concurrency=0)
        with self.assertRaises(ValueError):
            Worker(threads=-1)


if __name__ == "__main__":
    unittest.main()
