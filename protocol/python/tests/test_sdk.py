"""SDK features through small custom workers written by the tests."""

import shutil
import sys
import tempfile
import unittest

from .support import Peer, write_script

CUSTOM = """
import asyncio
import sys

from wharf_worker import Worker

w = Worker()
loops = []


@w.on_init
async def load():
    await asyncio.sleep(0.01)
    loops.append(asyncio.get_running_loop())


@w.method("double")
async def double(x):
    await asyncio.sleep(0.01)
    loops.append(asyncio.get_running_loop())
    return x * 2


@w.method()
def same_loop(_body):
    return len(loops) >= 3 and all(loop is loops[0] for loop in loops) and not loops[0].is_closed()


@w.method(context=True)
async def count(n, ctx):
    for i in range(n):
        await asyncio.sleep(0)
        yield [i, ctx.request_id]


@w.method()
async def count_then_fail(n):
    for i in range(n):
        yield i
    raise KeyError("gone")


@w.method(context=True)
def context(body, ctx):
    return {"id": ctx.request_id, "method": ctx.method, "session": ctx.session,
            "deadline_ms": ctx.deadline_ms}


@w.method
def bare(body):
    return "bare"


@w.method(context=True)
def spin(_body, ctx):
    while not ctx.cancelled():  # polls the channel: a cancel is seen while the call runs
        pass
    return "stopped"


@w.method(context=True)
def ticks(_body, ctx):
    i = 0
    while True:
        ctx.sleep(0.01)  # raises DeadlineExceeded once deadline_ms has run out
        yield i
        i += 1


@w.method()
def big(n):
    return b"x" * n


@w.method()
def big_error(n):
    raise ValueError("e" * n)


@w.method()
def big_chunks(n):
    yield "small"
    yield b"x" * n
    yield "never sent"


@w.method()
def unencodable(_body):
    return {1, 2}


@w.method()
def deep(depth):
    value = None
    for _ in range(depth):
        value = [value]
    return value


@w.method()
def noisy(body):
    print("handler print", body)
    sys.stdout.write("raw stdout write\\n")
    return "quiet channel"


@w.on_reset
def reset():
    raise OSError("cannot drop state")


if __name__ == "__main__":
    w.run()
"""


class CustomWorkerTests(unittest.TestCase):
    channel = "fds"

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="wharf-worker-test-")
        cls.script = write_script(cls.dir, "custom_worker.py", CUSTOM)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def spawn(self, **env):
        peer = Peer([sys.executable, self.script], self.channel, **env)
        self.addCleanup(peer.close)
        pong = peer.init()
        self.assertEqual(pong["status"], "ok", peer.stderr_text())
        return peer

    def test_methods_from_every_decorator_form(self):
        peer = Peer([sys.executable, self.script], self.channel)
        self.addCleanup(peer.close)
        self.assertEqual(
            peer.init()["methods"],
            ["bare", "big", "big_chunks", "big_error", "context", "count", "count_then_fail",
             "deep", "double", "noisy", "same_loop", "spin", "ticks", "unencodable"],
        )
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_async_handler_on_one_persistent_loop(self):
        peer = self.spawn()
        self.assertEqual(peer.call("double", 21)["body"], 42)
        self.assertEqual(peer.call("double", "ab")["body"], "abab")
        self.assertIs(peer.call("same_loop")["body"], True)

    def test_async_generator_streams(self):
        peer = self.spawn()
        chunks, final = peer.call_stream("count", 3)
        rid = final["id"]
        self.assertEqual([(c["seq"], c["body"]) for c in chunks], [(0, [0, rid]), (1, [1, rid]),
                                                                   (2, [2, rid])])
        self.assertEqual((final["t"], final["body"]), ("ok", None))

    def test_stream_that_raises_ends_with_an_error(self):
        peer = self.spawn()
        chunks, final = peer.call_stream("count_then_fail", 2)
        self.assertEqual([c["body"] for c in chunks], [0, 1])
        self.assertEqual((final["t"], final["kind"], final["message"]),
                         ("error", "KeyError", "'gone'"))
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_context(self):
        peer = self.spawn()
        reply = peer.call("context", None, session="sess-1", deadline_ms=1500)
        self.assertEqual(reply["body"], {"id": reply["id"], "method": "context",
                                         "session": "sess-1", "deadline_ms": 1500})
        reply = peer.call("context")
        self.assertEqual(reply["body"], {"id": reply["id"], "method": "context", "session": None,
                                         "deadline_ms": None})

    def test_a_handler_polling_cancelled_sees_a_cancel_and_may_still_reply_ok(self):
        peer = self.spawn()
        rid = peer.request("call", method="spin", body=None)
        peer.send({"t": "ping", "id": 500})
        self.assertEqual(peer.recv(timeout=2), {"t": "pong", "id": 500})
        peer.send({"t": "cancel", "id": rid})
        self.assertEqual(peer.recv(timeout=2), {"t": "ok", "id": rid, "body": "stopped"})

    def test_a_stream_ends_with_deadline_exceeded_after_its_chunks(self):
        peer = self.spawn()
        rid = peer.request("call", method="ticks", body=None, deadline_ms=150)
        seqs = []
        while True:
            msg = peer.recv(timeout=3)
            self.assertEqual(msg["id"], rid)
            if msg["t"] != "chunk":
                break
            seqs.append(msg["seq"])
        self.assertEqual((msg["t"], msg["kind"]), ("error", "deadline_exceeded"))
        self.assertTrue(seqs and seqs == list(range(len(seqs))), seqs)

    def test_reply_over_max_frame_becomes_frame_too_large(self):
        peer = self.spawn(WHARF_MAX_FRAME=4096)
        self.assertEqual(len(peer.call("big", 4000)["body"]), 4000)
        reply = peer.call("big", 5000)
        self.assertEqual((reply["t"], reply["kind"]), ("error", "frame_too_large"))
        self.assertIn("4096", reply["message"])
        reply = peer.call("big_error", 5000)  # an error reply too large for the frame
        self.assertEqual((reply["t"], reply["kind"]), ("error", "frame_too_large"))
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_chunk_over_max_frame_ends_the_stream_with_frame_too_large(self):
        peer = self.spawn(WHARF_MAX_FRAME=4096)
        chunks, final = peer.call_stream("big_chunks", 5000)
        self.assertEqual([c["body"] for c in chunks], ["small"])
        self.assertEqual((final["t"], final["kind"]), ("error", "frame_too_large"))
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_unencodable_result_is_an_error_reply(self):
        peer = self.spawn()
        reply = peer.call("unencodable")
        self.assertEqual((reply["t"], reply["kind"]), ("error", "TypeError"))
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_result_nested_too_deep_is_an_error_reply(self):
        peer = self.spawn()
        self.assertEqual(peer.call("deep", 127)["t"], "ok")  # + the reply map: 128 levels
        reply = peer.call("deep", 128)
        self.assertEqual((reply["t"], reply["kind"]), ("error", "ValueError"))
        self.assertIn("128", reply["message"])
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_failing_reset_hook_is_an_error_reply(self):
        peer = self.spawn()
        rid = peer.request("reset")
        reply = peer.recv()
        self.assertEqual((reply["t"], reply["id"], reply["kind"], reply["message"]),
                         ("error", rid, "OSError", "cannot drop state"))
        self.assertEqual(peer.call("bare")["body"], "bare")

    def test_logs_and_prints_stay_off_the_channel(self):
        peer = self.spawn()
        self.assertEqual(peer.call("noisy", 1)["body"], "quiet channel")
        self.assertEqual(peer.call("unencodable")["kind"], "TypeError")
        peer.close_input()
        self.assertEqual(peer.wait(), 0)
        log = peer.stderr_text()
        self.assertIn("cannot be encoded", log)
        if self.channel == "fds":
            self.assertEqual(peer.stdout_text(), "handler print 1\nraw stdout write\n")
        else:
            self.assertIn("handler print 1\nraw stdout write\n", log)


class CustomWorkerStdioTests(CustomWorkerTests):
    channel = "stdio"


if __name__ == "__main__":
    unittest.main()
