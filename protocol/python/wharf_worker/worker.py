"""The worker: handlers, hooks and the serving loop of wharf's packet protocol."""

import asyncio
import inspect
import logging
import os
import sys
import traceback

from .framing import DEFAULT_MAX_FRAME, FrameError, FrameReader, encode, write_all

PROTOCOL_VERSION = 1

log = logging.getLogger("wharf_worker")


class Context:
    """What a handler may know about its call (pass a second parameter to receive it)."""

    __slots__ = ("request_id", "method", "session", "deadline_ms")

    def __init__(self, request_id, method, session, deadline_ms):
        self.request_id = request_id
        self.method = method
        self.session = session
        self.deadline_ms = deadline_ms


class _Handler:
    __slots__ = ("fn", "wants_ctx", "is_async", "is_gen", "is_async_gen")

    def __init__(self, fn):
        self.fn = fn
        try:
            params = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self.wants_ctx = len(params) >= 2
        except (TypeError, ValueError):
            self.wants_ctx = False
        self.is_async_gen = inspect.isasyncgenfunction(fn)
        self.is_gen = inspect.isgeneratorfunction(fn)
        self.is_async = inspect.iscoroutinefunction(fn)


class _Exit(Exception):
    def __init__(self, code):
        self.code = code


class Worker:
    """A set of handlers served over the wharf protocol.

    Handlers are ``def f(body)`` or ``def f(body, ctx)``; ``async def`` handlers run on one
    event loop owned by the worker; generator handlers (sync or async) stream: each yielded
    value is a chunk, and a sync generator's ``return`` value is the final result.
    An exception in a handler becomes an error reply (kind = its type name); the worker keeps
    serving.
    """

    def __init__(self):
        self._handlers = {}
        self._init_hooks = []
        self._reset_hooks = []
        self._loop = None

    # -- registration -----------------------------------------------------------------------

    def method(self, name=None):
        """Decorator registering a handler under ``name`` (default: the function's name)."""

        def register(fn):
            self._handlers[name or fn.__name__] = _Handler(fn)
            return fn

        if callable(name):  # used bare: @worker.method
            fn, name = name, None
            return register(fn)
        return register

    def on_init(self, fn):
        """Decorator: runs before the init pong is sent (heavy imports and loading go here)."""
        self._init_hooks.append(fn)
        return fn

    def on_reset(self, fn):
        """Decorator: runs on ``reset``; must drop all per-session state."""
        self._reset_hooks.append(fn)
        return fn

    @property
    def methods(self):
        """The registered method names, sorted."""
        return sorted(self._handlers)

    # -- serving ----------------------------------------------------------------------------

    def run(self):
        """Serves on the channel named by the environment until EOF or ``shutdown``; exits."""
        if not logging.getLogger().handlers:
            logging.basicConfig(
                stream=sys.stderr,
                level=os.environ.get("WHARF_LOG", "INFO").upper(),
                format="%(levelname)s %(name)s: %(message)s",
            )
        code = self.serve_env()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def serve_env(self):
        """Serves on the channel named by the environment; returns the exit status."""
        env = os.environ
        try:
            max_frame = int(env.get("WHARF_MAX_FRAME", DEFAULT_MAX_FRAME))
        except ValueError:
            log.error("WHARF_MAX_FRAME=%r is not a number", env.get("WHARF_MAX_FRAME"))
            return 2
        channel = env.get("WHARF_CHANNEL", "fds")
        if channel == "stdio":
            fd_in = os.dup(0)
            fd_out = os.dup(1)
            # Frames own the real stdout now; print() and friends go to the log (stderr).
            os.dup2(2, 1)
            sys.stdout = sys.stderr
        elif channel == "fds":
            fd_in = int(env.get("WHARF_FD_IN", "3"))
            fd_out = int(env.get("WHARF_FD_OUT", "4"))
        else:
            log.error("WHARF_CHANNEL=%r: expected fds or stdio", channel)
            return 2
        return self.serve(fd_in, fd_out, max_frame)

    def serve(self, fd_in, fd_out, max_frame=DEFAULT_MAX_FRAME):
        """Serves frames read from ``fd_in``, writing replies to ``fd_out``; returns the exit
        status: 0 on EOF or shutdown, 1 if init failed, 2 on a protocol violation."""
        reader = FrameReader(fd_in, max_frame)
        self._out = fd_out
        self._max_frame = max_frame
        try:
            while True:
                try:
                    msg = reader.read()
                except FrameError as e:
                    log.error("protocol violation from the runtime: %s", e)
                    return 2
                except OSError as e:
                    log.error("cannot read the channel: %s", e)
                    return 2
                if msg is None:
                    return 0
                self._dispatch(msg)
        except _Exit as e:
            return e.code
        except BrokenPipeError:
            return 0

    def _send(self, msg):
        frame = encode(msg)
        if len(frame) - 4 > self._max_frame:
            raise _TooLarge(len(frame) - 4)
        write_all(self._out, frame)

    def _dispatch(self, msg):
        t = msg.get("t")
        rid = msg.get("id")
        if t == "call":
            self._call(rid, msg)
        elif t == "ping":
            self._send({"t": "pong", "id": rid})
        elif t == "init":
            self._init(rid)
        elif t == "reset":
            try:
                for hook in self._reset_hooks:
                    self._run_sync_or_async(hook)
            except Exception as e:
                log.exception("reset hook failed")
                self._send({"t": "error", "id": rid, "kind": type(e).__name__, "message": str(e)})
            else:
                self._send({"t": "ok", "id": rid, "body": None})
        elif t == "shutdown":
            raise _Exit(0)
        elif t == "cancel":
            pass  # calls run one at a time: the call it names has already finished
        else:
            log.error("protocol violation from the runtime: unknown message type %r", t)
            raise _Exit(2)

    def _init(self, rid):
        pong = {
            "t": "init_pong",
            "id": rid,
            "status": "ok",
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "methods": self.methods,
        }
        try:
            for hook in self._init_hooks:
                self._run_sync_or_async(hook)
        except Exception as e:
            log.error("init failed: %s", traceback.format_exc())
            pong["status"] = "error"
            pong["message"] = "%s: %s" % (type(e).__name__, e)
            self._send(pong)
            raise _Exit(1)
        self._send(pong)

    def _run_sync_or_async(self, fn, *args):
        result = fn(*args)
        if inspect.isawaitable(result):
            result = self._event_loop().run_until_complete(result)
        return result

    def _event_loop(self):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def _call(self, rid, msg):
        name = msg.get("method")
        handler = self._handlers.get(name)
        if handler is None:
            self._reply_error(rid, "unknown_method", "no method named %r" % (name,))
            return
        body = msg.get("body")
        args = (body,)
        if handler.wants_ctx:
            args = (body, Context(rid, name, msg.get("session"), msg.get("deadline_ms")))
        try:
            if handler.is_gen:
                result = self._stream_sync(rid, handler.fn(*args))
            elif handler.is_async_gen:
                result = self._event_loop().run_until_complete(self._stream_async(rid, handler.fn(*args)))
            elif handler.is_async:
                result = self._event_loop().run_until_complete(handler.fn(*args))
            else:
                result = handler.fn(*args)
        except (_Exit, BrokenPipeError):
            raise
        except Exception as e:
            log.warning("handler %s raised %s", name, traceback.format_exc().rstrip())
            self._reply_error(rid, type(e).__name__, str(e))
            return
        try:
            self._send({"t": "ok", "id": rid, "body": result})
        except _TooLarge as e:
            self._reply_error(rid, "frame_too_large", "reply of %d bytes exceeds max_frame of %d" % (e.size, self._max_frame))
        except (TypeError, ValueError) as e:
            self._reply_error(rid, "bad_result", "result cannot be encoded as MessagePack: %s" % e)

    def _stream_sync(self, rid, gen):
        seq = 0
        while True:
            try:
                chunk = next(gen)
            except StopIteration as stop:
                return stop.value
            self._send({"t": "chunk", "id": rid, "seq": seq, "body": chunk})
            seq += 1

    async def _stream_async(self, rid, agen):
        seq = 0
        async for chunk in agen:
            self._send({"t": "chunk", "id": rid, "seq": seq, "body": chunk})
            seq += 1
        return None

    def _reply_error(self, rid, kind, message):
        self._send({"t": "error", "id": rid, "kind": kind, "message": message})


class _TooLarge(Exception):
    def __init__(self, size):
        self.size = size
