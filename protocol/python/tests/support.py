"""The runtime's side of a worker, for the tests: spawn a worker process on a channel (fds 3/4,
stdin/stdout or a FIFO pair) and speak frames to it. Every wait has a deadline, and a watchdog kills a worker
that outlives its test, so no test can hang."""

import fcntl
import os
import select
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)
if PKG_ROOT not in sys.path:
    sys.path.insert(0, PKG_ROOT)  # the source tree, whether or not the package is installed

TIMEOUT = 15  # seconds any single wait may take
WATCHDOG = 60  # seconds after which a worker still alive is killed
DEMO = [sys.executable, "-m", "wharf_worker.demo"]


def child_env(channel, **extra):
    """The environment a worker gets: this one minus WHARF_*, the source tree first on
    PYTHONPATH (so the code under test runs, not an installed copy), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHARF_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["WHARF_CHANNEL"] = channel
    env["WHARF_WORKER_ID"] = "test"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def frame(msg):
    payload = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def high_pipe():
    """A close-on-exec pipe whose ends are numbered 10 or above, so placing them on fds 3 and 4
    in the child can never clobber one with the other."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends


class Fifos:
    """A FIFO pair in a fresh directory with the runtime's ends open, as the runtime makes it:
    the request FIFO ``in`` opened for writing and the reply FIFO ``out`` for reading, plus the
    far end of each (the keepers), so that the worker's opens never block and a worker that
    has not opened its end yet is not seen as EOF. ``release()`` closes the keepers."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="wharf-fifo-")
        self.path_in = os.path.join(self.dir, "in")
        self.path_out = os.path.join(self.dir, "out")
        os.mkfifo(self.path_in, 0o600)
        os.mkfifo(self.path_out, 0o600)
        nb = os.O_NONBLOCK
        self.keepers = [os.open(self.path_in, os.O_RDONLY | nb)]
        self.to_w = os.open(self.path_in, os.O_WRONLY | nb)
        self.from_r = os.open(self.path_out, os.O_RDONLY | nb)
        self.keepers.append(os.open(self.path_out, os.O_WRONLY | nb))
        os.set_blocking(self.to_w, True)

    def env(self):
        return {"WHARF_FIFO_IN": self.path_in, "WHARF_FIFO_OUT": self.path_out}

    def release(self):
        for fd in self.keepers:
            os.close(fd)
        self.keepers = []

    def remove(self):
        self.release()
        for path in (self.path_in, self.path_out):
            os.unlink(path)
        os.rmdir(self.dir)


def write_script(directory, name, code):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(code))
    return path


class Peer:
    """One worker process and the runtime's ends of its channel."""

    def __init__(self, argv, channel="fds", **env):
        self.channel = channel
        self.stdout_file = tempfile.TemporaryFile()
        self.stderr_file = tempfile.TemporaryFile()
        self.fifos = Fifos() if channel == "fifo" else None
        if self.fifos is not None:
            env = dict(self.fifos.env(), **env)
        environ = child_env(channel, **env)
        if channel in ("fds", "fifo"):
            to_r, self.to_w = high_pipe()
            self.from_r, from_w = high_pipe()

            def place_channel():  # runs in the child between fork and exec
                os.dup2(to_r, 3)
                os.dup2(from_w, 4)

            if self.fifos is not None:
                # The FIFOs are the channel: nothing on fds 3/4.
                os.close(self.to_w)
                os.close(self.from_r)
                self.to_w, self.from_r = self.fifos.to_w, self.fifos.from_r
                place_channel = None
            self.proc = subprocess.Popen(
                argv,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=self.stdout_file,
                stderr=self.stderr_file,
                pass_fds=(3, 4),
                preexec_fn=place_channel,
            )
            os.close(to_r)
            os.close(from_w)
        else:
            self.proc = subprocess.Popen(
                argv,
                env=environ,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr_file,
            )
            self.to_w = self.proc.stdin.fileno()
            self.from_r = self.proc.stdout.fileno()
        self._buf = b""
        self.next_id = 1
        self._watchdog = threading.Timer(WATCHDOG, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    # -- sending ----------------------------------------------------------------------------

    def send_raw(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.to_w, view):]

    def send(self, msg):
        self.send_raw(frame(msg))

    def close_input(self):
        if self.channel in ("fds", "fifo"):
            if self.to_w is not None:
                os.close(self.to_w)
                self.to_w = None
        else:
            self.proc.stdin.close()

    # -- receiving --------------------------------------------------------------------------

    def _read_exact(self, n, deadline):
        """n bytes, or fewer if the worker closed its output first."""
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            held = self.fifos is not None and self.fifos.keepers
            if held and self.proc.poll() is not None:
                # The worker ended before its first byte: its end is EOF, as for the runtime.
                self.fifos.release()
                held = False
            ready, _, _ = select.select([self.from_r], [], [], min(max(left, 0), 0.05 if held else left))
            if not ready:
                if time.monotonic() < deadline:
                    continue
                raise AssertionError("no reply from the worker within %s s" % TIMEOUT)
            chunk = os.read(self.from_r, 1 << 20)
            if chunk and held:
                self.fifos.release()  # the worker has opened both ends
            if not chunk:
                break
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def recv_raw(self, timeout=TIMEOUT):
        """The next frame's payload, or None on EOF (the worker closed its output)."""
        deadline = time.monotonic() + timeout
        header = self._read_exact(4, deadline)
        if not header:
            return None
        assert len(header) == 4, "truncated header from the worker: %r" % header
        (n,) = struct.unpack(">I", header)
        payload = self._read_exact(n, deadline)
        assert len(payload) == n, "truncated frame from the worker"
        return payload

    def recv(self, timeout=TIMEOUT):
        payload = self.recv_raw(timeout)
        if payload is None:
            return None
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)

    # -- conversations ----------------------------------------------------------------------

    def init(self):
        self.send({"t": "init", "id": 0, "version": 1})
        return self.recv()

    def request(self, t, **fields):
        rid = self.next_id
        self.next_id += 1
        self.send(dict(t=t, id=rid, **fields))
        return rid

    def call(self, method, body=None, **fields):
        """Calls a (non-streaming) method; returns its one reply."""
        rid = self.request("call", method=method, body=body, **fields)
        reply = self.recv()
        assert reply is not None, "the worker closed its channel: %s" % self.stderr_text()
        assert reply.get("id") == rid, reply
        return reply

    def call_stream(self, method, body=None):
        """Calls a method; returns (chunks, final reply)."""
        rid = self.request("call", method=method, body=body)
        chunks = []
        while True:
            msg = self.recv()
            assert msg is not None and msg.get("id") == rid, msg
            if msg["t"] != "chunk":
                return chunks, msg
            chunks.append(msg)

    # -- ending -----------------------------------------------------------------------------

    def wait(self, timeout=TIMEOUT):
        """The worker's exit status; fails the test if it does not exit within ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not exit within %s s" % timeout) from None

    def stderr_text(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def stdout_text(self):
        self.stdout_file.seek(0)
        return self.stdout_file.read().decode("utf-8", "replace")

    def _kill(self):
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self):
        self._watchdog.cancel()
        self._kill()
        self.proc.wait(timeout=TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout, self.stdout_file, self.stderr_file):
            if f is not None:
                f.close()
        if self.channel in ("fds", "fifo"):
            for fd in (self.to_w, self.from_r):
                if fd is not None:
                    os.close(fd)
        if self.fifos is not None:
            self.fifos.remove()
