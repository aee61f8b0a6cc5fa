"""What Python users expect of the SDK: a handler gets the Context only if it asks, the
application's ``finally`` and ``atexit`` code runs when the worker stops, and the package says
it is typed."""

import os
import shutil
import signal
import sys
import tempfile
import time
import unittest
from typing import Optional, Union  # noqa: F401  (Optional is named in a text annotation)

from . import support
from .support import Peer, write_script
from wharf_worker import Context, Worker

SHUTDOWN_WORKER = """
import atexit
import os
import sys
import time

from wharf_worker import Worker

MARK = os.environ["MARK"]
w = Worker()


@w.method()
def slow(ms):
    time.sleep(ms / 1000)
    return ms


@w.method()
def linger(_body):
    # A thread that is not a daemon and never ends would hold the interpreter's exit forever.
    import threading
    threading.Thread(target=time.sleep, args=(3600,)).start()
    return "lingering"


def mark(what):
    with open(MARK, "a") as f:
        f.write(what + "\\n")


atexit.register(mark, "atexit")

if __name__ == "__main__":
    try:
        w.run()
    finally:
        mark("finally")
"""


class ContextOptInTests(unittest.TestCase):
    def handlers(self, w):
        return {name: wants for name, (_fn, wants) in w._handlers.items()}

    def test_a_second_parameter_with_a_default_never_receives_the_context(self):
        w = Worker()

        @w.method()
        def f(body, verbose=False):
            return verbose

        self.assertEqual(self.handlers(w), {"f": False})

    def test_the_context_is_passed_when_annotated_or_asked_for(self):
        w = Worker()

        @w.method()
        def annotated(body, ctx: Context):
            return ctx

        @w.method()
        def as_text(body, ctx: "Context"):
            return ctx

        @w.method(context=True)
        def asked(body, c):
            return c

        @w.method(context=True)
        def variadic(*args):
            return args

        @w.method(context=False)
        def declined(body, extra=None):
            return extra

        @w.method()
        def optional(body, ctx: "Optional[Context]" = None):
            return ctx

        @w.method()
        def union(body, ctx: Union[Context, None] = None):
            return ctx

        self.assertEqual(
            self.handlers(w),
            {"annotated": True, "as_text": True, "asked": True, "variadic": True,
             "declined": False, "optional": True, "union": True},
        )

    def test_an_unmarked_required_second_parameter_is_refused_at_registration(self):
        w = Worker()
        with self.assertRaises(TypeError) as caught:

            @w.method()
            def f(body, ctx):
                return ctx

        self.assertIn("context=True", str(caught.exception))
        self.assertIn("'ctx'", str(caught.exception))
        with self.assertRaises(TypeError):
            w.add_method("g", lambda body: body, context=True)
        self.assertEqual(w.methods, [])

    def test_bare_decorator_and_add_method_take_the_same_option(self):
        w = Worker()

        @w.method
        def bare(body):
            return body

        w.add_method("explicit", lambda body, c: c, context=True)
        self.assertEqual(self.handlers(w), {"bare": False, "explicit": True})

    def test_handlers_receive_exactly_what_they_asked_for(self):
        w = Worker()

        @w.method()
        def plain(body, verbose="default"):
            return verbose

        @w.method()
        def typed(body, ctx: Context):
            return ctx.method

        msgs = [
            {"t": "init", "id": 0, "version": 1},
            {"t": "call", "id": 1, "method": "plain", "body": None},
            {"t": "call", "id": 2, "method": "typed", "body": None},
        ]
        replies = serve(w, msgs)
        self.assertEqual([r.get("body") for r in replies[1:]], ["default", "typed"])


def serve(w, msgs):
    """Serves ``msgs`` on a pipe pair and returns every reply."""
    import msgpack

    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    os.write(to_w, b"".join(support.frame(m) for m in msgs))
    os.close(to_w)
    status = w.serve(to_r, from_w)
    os.close(from_w)
    data = b""
    while True:
        chunk = os.read(from_r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(from_r)
    os.close(to_r)
    replies = []
    while data:
        n = int.from_bytes(data[:4], "big")
        replies.append(msgpack.unpackb(data[4:4 + n], raw=False))
        data = data[4 + n:]
    assert status == 0, status
    return replies


class ShutdownTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="wharf-worker-exit-")
        cls.script = write_script(cls.dir, "exit_worker.py", SHUTDOWN_WORKER)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def start(self):
        mark = os.path.join(self.dir, "mark-%d" % len(os.listdir(self.dir)))
        peer = Peer([sys.executable, self.script], "fds", MARK=mark)
        self.addCleanup(peer.close)
        self.assertEqual(peer.init()["status"], "ok", peer.stderr_text())
        return peer, mark

    def marks(self, mark):
        with open(mark) as f:
            return f.read().split()

    def test_finally_and_atexit_run_on_the_shutdown_message(self):
        peer, mark = self.start()
        peer.send({"t": "shutdown"})
        self.assertEqual(peer.wait(), 0)
        self.assertEqual(self.marks(mark), ["finally", "atexit"])

    def test_finally_and_atexit_run_on_eof(self):
        peer, mark = self.start()
        peer.close_input()
        self.assertEqual(peer.wait(), 0)
        self.assertEqual(self.marks(mark), ["finally", "atexit"])

    def test_a_thread_left_running_does_not_keep_a_stopped_worker_alive(self):
        for stop in ("shutdown", "eof"):
            with self.subTest(stop=stop):
                peer, mark = self.start()
                self.assertEqual(peer.call("linger")["body"], "lingering")
                if stop == "shutdown":
                    peer.send({"t": "shutdown"})
                else:
                    peer.close_input()
                self.assertEqual(peer.wait(timeout=10), 0, peer.stderr_text())
                self.assertEqual(self.marks(mark), ["finally"])
                self.assertIn("non-daemon threads still running", peer.stderr_text())

    def test_a_thread_pool_shut_down_at_exit_is_not_taken_for_a_stray_thread(self):
        peer = Peer(support.DEMO + ["--max-concurrency", "2", "--threads", "2"], "fds")
        self.addCleanup(peer.close)
        self.assertEqual(peer.init()["status"], "ok", peer.stderr_text())
        self.assertEqual(peer.call("sleep", 10)["t"], "ok")
        peer.send({"t": "shutdown"})
        self.assertEqual(peer.wait(), 0)
        self.assertNotIn("non-daemon threads", peer.stderr_text())

    def test_finally_and_atexit_run_on_sigterm_even_mid_call(self):
        peer, mark = self.start()
        peer.request("call", method="slow", body=5000)
        # The call is under way when the runtime's stop sequence reaches SIGTERM.
        time.sleep(0.3)
        peer.proc.send_signal(signal.SIGTERM)
        self.assertEqual(peer.wait(), 128 + signal.SIGTERM)
        self.assertEqual(self.marks(mark), ["finally", "atexit"])


class PackagingTests(unittest.TestCase):
    def test_the_package_is_marked_typed(self):
        import wharf_worker

        marker = os.path.join(os.path.dirname(wharf_worker.__file__), "py.typed")
        self.assertTrue(os.path.exists(marker), marker)


if __name__ == "__main__":
    unittest.main()
