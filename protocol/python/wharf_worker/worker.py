"""The worker: handlers, hooks and the serving loop of the wharf packet protocol."""

import asyncio
import collections
import errno
import functools
import inspect
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
import types
import typing
from typing import Any, Callable, Mapping, NoReturn, Optional, TypeVar, Union

import msgpack

from .framing import (
    SCALAR_TYPES,
    DEFAULT_MAX_FRAME,
    HEADER,
    MAX_DEPTH,
    FrameError,
    FrameReader,
    nests_deeper_than,
    write_all,
)

PROTOCOL_VERSION = 1

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("wharf_worker")

# Results of these types are sent as they are; anything else is checked for being a generator,
# coroutine or async generator first.
_PLAIN = frozenset((type(None), bool, int, float, str, bytes, bytearray, list, dict, tuple))
_GENERATOR = types.GeneratorType
_ASYNC_GENERATOR = types.AsyncGeneratorType


class Cancelled(Exception):
    """Raised by :meth:`Context.check` (and :meth:`Context.sleep`) once the runtime has
    cancelled the call; a handler that lets it propagate ends the call with error kind
    ``cancelled``."""

    wharf_kind = "cancelled"


class DeadlineExceeded(Exception):
    """Raised by :meth:`Context.check` (and :meth:`Context.sleep`) once the call's
    ``deadline_ms`` has run out; ends the call with error kind ``deadline_exceeded``."""

    wharf_kind = "deadline_exceeded"


class Context:
    """What a handler knows about its call. A handler receives it if it asks: its second
    parameter annotated ``ctx: Context``, or registered with ``context=True``.

    Cancellation is cooperative: the worker serves one call at a time on one thread, and reads
    what the runtime sends meanwhile (``cancel``, ``ping``, ...) only when the handler asks:
    :meth:`cancelled`, :meth:`check` and :meth:`sleep` do. A handler that wants to honour
    ``cancel`` and ``deadline_ms`` calls one of them between steps of its work, from the
    handler's own thread (they read the channel).
    """

    __slots__ = (
        "request_id", "method", "session", "deadline_ms", "_worker", "_start", "_cancelled", "_wake",
    )

    def __init__(
        self,
        request_id: int,
        method: str,
        session: Optional[str] = None,
        deadline_ms: Optional[int] = None,
        _worker: "Optional[Worker]" = None,
    ) -> None:
        self.request_id = request_id  #: the call's id
        self.method = method  #: the method name called
        self.session = session  #: the session the call belongs to (str), or None
        self.deadline_ms = deadline_ms  #: the caller's remaining budget in ms, or None
        self._worker = _worker
        self._start = time.monotonic()  # when the call was read: deadline_ms counts from here
        self._cancelled = False
        # Set when the call is cancelled, for a worker serving several calls at once (whose
        # reader runs on its event loop): wakes a handler thread in sleep().
        self._wake: Optional[threading.Event] = None

    def __repr__(self):
        return "Context(request_id=%r, method=%r, session=%r, deadline_ms=%r)" % (
            self.request_id, self.method, self.session, self.deadline_ms,
        )

    def cancelled(self) -> bool:
        """True once the runtime has cancelled this call (or closed the channel, or asked the
        worker to shut down). Reads what the runtime has sent so far, without waiting."""
        if not self._cancelled and self._worker is not None:
            self._worker._pump(0)
        return self._cancelled

    def remaining(self) -> Optional[float]:
        """Seconds left before ``deadline_ms`` runs out (0 once it has), or None without one."""
        if self.deadline_ms is None:
            return None
        return max(0.0, self.deadline_ms / 1000 - (time.monotonic() - self._start))

    def check(self) -> None:
        """Raises :class:`Cancelled` if the call was cancelled, :class:`DeadlineExceeded` if
        its deadline has run out; else returns None."""
        if self.cancelled():
            raise Cancelled("call %d was cancelled" % self.request_id)
        if self.remaining() == 0:
            raise DeadlineExceeded(
                "call %d ran out of its deadline_ms (%s)" % (self.request_id, self.deadline_ms)
            )

    def sleep(self, seconds: float) -> None:
        """Sleeps up to ``seconds`` while watching the channel: raises :class:`Cancelled` or
        :class:`DeadlineExceeded` as soon as the call is cancelled or out of time."""
        end = time.monotonic() + max(seconds, 0)
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            remaining = self.remaining()
            if remaining is not None:
                left = min(left, remaining)
            if self._worker is not None:
                self._worker._pump(left)
            elif self._wake is not None:
                self._wake.wait(left)
            else:
                time.sleep(left)


class _Exit(Exception):
    """Stops serving with an exit status."""

    def __init__(self, status):
        Exception.__init__(self, status)
        self.status = status


class _Violation(BaseException):
    """The runtime broke the protocol while a call ran. A BaseException, so that it passes
    through the handler's own ``except Exception``; serving ends with status 2."""


class _Refused(Exception):
    """A reply that cannot be sent as it is: becomes an error reply of ``kind``."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


def _is_context_annotation(annotation: Any) -> bool:
    if annotation is Context:
        return True
    # ``Optional[Context]`` and other unions that hold it.
    if typing.get_origin(annotation) is Union:
        return any(_is_context_annotation(a) for a in typing.get_args(annotation))
    # ``from __future__ import annotations`` leaves the annotation as text.
    return isinstance(annotation, str) and re.search(r"(^|[\[.,\s|])Context\b", annotation) is not None


def _wants_ctx(name: str, fn: Callable[..., Any], context: Optional[bool]) -> bool:
    """Whether ``fn`` receives the call's :class:`Context` as its second argument: if
    ``context`` says so, or (``context`` left out) if that parameter is annotated ``Context``.
    A second parameter that is required but not marked either way is a mistake caught now,
    not a ``Context`` passed silently where the handler expects something else."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return bool(context)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
    if context is True:
        if len(positional) < 2 and not var_positional:
            raise TypeError(
                "method %r: context=True, but %s takes no second positional parameter to "
                "receive the Context" % (name, getattr(fn, "__qualname__", fn))
            )
        return True
    if context is False or len(positional) < 2:
        return False
    second = positional[1]
    if _is_context_annotation(second.annotation):
        return True
    if second.default is inspect.Parameter.empty:
        raise TypeError(
            "method %r: %s takes a second required parameter %r; a handler receives the "
            "call's Context only if it asks: annotate it (%s: Context) or register with "
            "context=True" % (name, getattr(fn, "__qualname__", fn), second.name, second.name)
        )
    return False


def _text(e):
    try:
        return str(e)
    except Exception:
        return "<unprintable %s>" % type(e).__name__


class Worker:
    """A set of methods served over the wharf packet protocol.

    Handlers are ``def f(body)``, or ``def f(body, ctx: Context)`` to receive the call's
    :class:`Context` (or register with ``context=True``). ``async def``
    handlers run on one event loop owned by the worker. Generator handlers (sync or async)
    stream: each yielded value is sent as a chunk; a sync generator's ``return`` value is the
    final result (an async generator's is None). A handler that raises produces an error reply
    whose kind is the exception's type name; the worker keeps serving.
    """

    def __init__(self, max_concurrency: int = 1, threads: int = 0) -> None:
        """``max_concurrency``: how many calls the worker serves at once, declared to the
        runtime in its ``init_pong`` (1, the default: one call at a time, cooperative
        cancellation through the :class:`Context`). Above 1, the worker reads the channel on an
        event loop while calls run: ``async def`` handlers run concurrently as tasks on it, the
        protocol's ``cancel`` cancels the handler's task (error kind ``cancelled``) and its
        ``deadline_ms`` does too (``deadline_exceeded``). Sync handlers run on the loop, one at
        a time, unless ``threads`` > 0: then in a pool of that many threads (they see
        cancellation through the Context: :meth:`Context.check`, :meth:`Context.sleep`)."""
        if type(max_concurrency) is not int or max_concurrency < 1:
            raise ValueError("max_concurrency must be an int >= 1, not %r" % (max_concurrency,))
        if type(threads) is not int or threads < 0:
            raise ValueError("threads must be an int >= 0, not %r" % (threads,))
        self.max_concurrency = max_concurrency
        self.threads = threads
        self._handlers: "dict[str, tuple[Callable[..., Any], bool]]" = {}  # name -> (fn, ctx?)
        self._init_hooks: "list[Callable[[], Any]]" = []
        self._ready_hooks: "list[Callable[[], Any]]" = []
        self._reset_hooks: "list[Callable[[], Any]]" = []
        self._initialised = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._fd_out: Optional[int] = None
        self._reader: Optional[FrameReader] = None
        self._current: Optional[Context] = None  # the Context of the call running, if any
        # Messages read while a call ran, in order.
        self._pending: "collections.deque[dict[str, Any]]" = collections.deque()
        self._input_closed = False
        self._max_frame = DEFAULT_MAX_FRAME
        # End by itself after this many seconds without a byte from the runtime while waiting
        # for a message (WHARF_WATCHDOG_MS; None: never).
        self._watchdog: Optional[float] = None
        # One packer for every reply (packb would build a new one per call); it resets itself
        # when packing fails.
        self._pack = msgpack.Packer(use_bin_type=True).pack

    # -- registration ------------------------------------------------------------------------

    def method(
        self, name: Union[str, Callable[..., Any], None] = None, *, context: Optional[bool] = None
    ) -> Any:
        """Decorator registering a handler as method ``name`` (default: the function's name).

        ``@w.method("echo")``, ``@w.method()`` and ``@w.method`` all work. The handler gets the
        call's :class:`Context` as its second argument only if it asks: ``context=True``, or
        the parameter annotated ``ctx: Context``.
        """
        if callable(name):  # bare @w.method
            return self.method(context=context)(name)

        def register(fn: F) -> F:
            self.add_method(name or fn.__name__, fn, context=context)
            return fn

        return register

    def add_method(
        self, name: str, fn: Callable[..., Any], *, context: Optional[bool] = None
    ) -> None:
        """Registers ``fn`` as method ``name`` (the non-decorator form); ``context`` as for
        :meth:`method`."""
        if not isinstance(name, str) or not name:
            raise ValueError("a method name must be a non-empty str, not %r" % (name,))
        self._handlers[name] = (fn, _wants_ctx(name, fn, context))

    def on_init(self, fn: F) -> F:
        """Decorator: ``fn()`` runs when ``init`` arrives, before ``init_pong`` is sent; heavy
        imports and loading go here. If it raises, the pong says ``status: "error"`` and the
        worker exits with status 1."""
        self._init_hooks.append(fn)
        return fn

    def on_ready(self, fn: F) -> F:
        """Decorator: ``fn()`` runs right after a good ``init_pong`` has been sent."""
        self._ready_hooks.append(fn)
        return fn

    def on_reset(self, fn: F) -> F:
        """Decorator: ``fn()`` runs on ``reset`` and must drop all per-session state."""
        self._reset_hooks.append(fn)
        return fn

    @property
    def methods(self) -> "list[str]":
        """The registered method names, sorted."""
        return sorted(self._handlers)

    # -- running -----------------------------------------------------------------------------

    def run(self) -> NoReturn:
        """Serves on the channel the environment names until EOF or ``shutdown``, then exits
        the process: status 0 on EOF or shutdown, 1 if initialisation failed, 2 on a protocol
        violation or a bad channel configuration. Never returns.

        It exits as a Python program ends (``SystemExit``), so the application's ``finally``
        blocks and ``atexit`` handlers run — also when the runtime stops the worker with
        SIGTERM (unless the application installed its own SIGTERM handler). Threads that are
        not daemons and still run then get :data:`EXIT_GRACE` seconds before the process
        exits regardless (the interpreter would otherwise wait for them forever)."""
        _configure_logging()
        _exit_on_sigterm()
        try:
            status = self.serve_env()
        except SystemExit as e:  # SIGTERM while serving
            status = e.code if isinstance(e.code, int) else 1
        _bound_exit(status)
        sys.exit(status)

    def serve_env(self, environ: "Optional[Mapping[str, str]]" = None) -> int:
        """Serves on the channel named by ``environ`` (default ``os.environ``): ``WHARF_CHANNEL``
        (``fds``, the default, ``stdio``, ``socket`` or ``fifo``), ``WHARF_FD_IN``/``WHARF_FD_OUT``
        (3 and 4), ``WHARF_SOCKET`` (the unix socket to connect to), ``WHARF_FIFO_IN``/
        ``WHARF_FIFO_OUT`` (the FIFOs to read requests from and write replies to) and
        ``WHARF_MAX_FRAME``. Returns the exit status instead of exiting."""
        env = os.environ if environ is None else environ
        try:
            max_frame = int(env.get("WHARF_MAX_FRAME") or DEFAULT_MAX_FRAME)
            if not 0 < max_frame <= 0xFFFFFFFF:
                raise ValueError
        except ValueError:
            log.error("WHARF_MAX_FRAME=%r is not a frame size in bytes", env.get("WHARF_MAX_FRAME"))
            return 2
        watchdog = env.get("WHARF_WATCHDOG_MS")
        if watchdog:
            try:
                self._watchdog = int(watchdog) / 1000.0
                if self._watchdog <= 0:
                    raise ValueError
            except ValueError:
                log.error("WHARF_WATCHDOG_MS=%r is not a positive number of milliseconds", watchdog)
                return 2
        channel = env.get("WHARF_CHANNEL") or "fds"
        if channel == "fds":
            try:
                fd_in = int(env.get("WHARF_FD_IN") or 3)
                fd_out = int(env.get("WHARF_FD_OUT") or 4)
                for fd in (fd_in, fd_out):
                    os.fstat(fd)
            except (ValueError, OSError) as e:
                log.error(
                    "no channel on WHARF_FD_IN/WHARF_FD_OUT (%s): start this worker under the "
                    "wharf runtime, or set WHARF_CHANNEL=stdio",
                    e,
                )
                return 2
            # Processes this worker starts must not hold the channel open.
            for fd in (fd_in, fd_out):
                os.set_inheritable(fd, False)
        elif channel == "stdio":
            fd_in, fd_out = _take_stdio()
        elif channel == "socket":
            path = env.get("WHARF_SOCKET")
            if not path:
                log.error("WHARF_CHANNEL=socket needs WHARF_SOCKET, the socket's path")
                return 2
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
            except OSError as e:
                log.error("cannot connect to WHARF_SOCKET=%r: %s", path, e)
                return 2
            # One fd both ways; processes this worker starts must not hold it open.
            fd_in = fd_out = sock.detach()
            os.set_inheritable(fd_in, False)
        elif channel == "fifo":
            fds = _open_fifos(env.get("WHARF_FIFO_IN"), env.get("WHARF_FIFO_OUT"))
            if fds is None:
                return 2
            fd_in, fd_out = fds
        else:
            log.error("WHARF_CHANNEL=%r: expected fds, stdio, socket or fifo", channel)
            return 2
        return self.serve(fd_in, fd_out, max_frame)

    def serve(self, fd_in: int, fd_out: int, max_frame: int = DEFAULT_MAX_FRAME) -> int:
        """Serves frames read from ``fd_in``, replying on ``fd_out``. Returns the exit status:
        0 on EOF or ``shutdown``, 1 if initialisation failed, 2 on a protocol violation."""
        for fd in (fd_in, fd_out):
            try:
                os.set_blocking(fd, True)
            except OSError:
                pass
        self._fd_out = fd_out
        self._max_frame = max_frame
        self._reader = FrameReader(fd_in, max_frame)
        self._pending.clear()
        self._input_closed = False
        read = self._reader.read if self._watchdog is None else self._read_watched
        pending = self._pending
        call = self._call
        try:
            while True:
                msg = pending.popleft() if pending else read()
                if msg is None:
                    return 0  # EOF on a frame boundary: the runtime is gone or done with us
                t = msg.get("t")
                if t == "call":
                    call(msg)
                elif t == "ping":
                    self._send({"t": "pong", "id": _id(msg)})
                elif t == "init":
                    self._init(_id(msg))
                    if self.max_concurrency > 1:
                        return self._event_loop().run_until_complete(_Concurrent(self).serve())
                elif t == "reset":
                    self._reset(_id(msg))
                elif t == "shutdown":
                    return 0
                elif t == "cancel":
                    _id(msg)  # calls run one at a time: the call it names has already ended
                elif t is None:
                    raise FrameError("message without a type (no 't' key): %r" % (_short(msg),))
                else:
                    raise FrameError("unknown message type %r" % (t,))
        except (FrameError, _Violation) as e:
            log.error("protocol violation by the runtime: %s; exiting", e)
            return 2
        except _Exit as e:
            return e.status
        except _Refused as e:  # a message of the SDK's own that cannot be sent
            log.error("cannot send a message: %s; exiting", e.message)
            return 2
        except _ChannelError as e:
            if isinstance(e.__cause__, BrokenPipeError):
                log.warning("the runtime closed this worker's output channel; exiting")
                return 0
            log.error("cannot write to the channel: %s; exiting", e.__cause__)
            return 2
        except OSError as e:
            log.error("cannot read from the channel: %s; exiting", e)
            return 2

    def _read_watched(self) -> "Optional[dict[str, Any]]":
        """The next message, as ``FrameReader.read``, but ending the worker (status 0) when no
        byte has come for ``self._watchdog`` seconds: the runtime, which pings at least that
        often, is gone or cut off (a worker on a remote engine would otherwise wait until the
        engine notices the dead connection)."""
        reader = self._reader
        watchdog = self._watchdog
        heard = time.monotonic()
        while True:
            msg = reader.buffered()
            if msg is not None:
                return msg
            before = reader.pending_bytes()
            if not reader.fill(max(heard + watchdog - time.monotonic(), 0)):
                return None
            if reader.pending_bytes() != before:
                heard = time.monotonic()
            elif time.monotonic() - heard >= watchdog:
                log.warning(
                    "nothing from the runtime for %.1f s (WHARF_WATCHDOG_MS): it is gone or cut "
                    "off; exiting", watchdog
                )
                raise _Exit(0)

    # -- messages ----------------------------------------------------------------------------

    def _init(self, rid):
        pong = {
            "t": "init_pong",
            "id": rid,
            "status": "ok",
            "version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "methods": self.methods,
        }
        if self.max_concurrency > 1:
            pong["max_concurrency"] = self.max_concurrency
        if not self._initialised:
            try:
                for hook in self._init_hooks:
                    self._run(hook)
            except Exception as e:
                log.error("initialisation failed", exc_info=True)
                pong["status"] = "error"
                pong["message"] = "%s: %s" % (type(e).__name__, _text(e))
                self._send(pong)
                raise _Exit(1)
            self._initialised = True
        self._send(pong)
        for hook in self._ready_hooks:
            try:
                self._run(hook)
            except Exception:
                log.error("ready hook failed", exc_info=True)

    def _reset(self, rid):
        try:
            for hook in self._reset_hooks:
                self._run(hook)
        except Exception as e:
            log.error("reset hook failed", exc_info=True)
            self._reply_error(rid, type(e).__name__, _text(e))
        else:
            self._send({"t": "ok", "id": rid, "body": None})

    def _call(self, msg):
        rid = _id(msg)
        name = msg.get("method")
        entry = self._handlers.get(name) if type(name) is str else None
        if entry is None:
            if type(name) is not str:
                raise FrameError("call %d: 'method' is %r, not a str" % (rid, name))
            self._reply_error(rid, "unknown_method", "no method named %r" % (name,))
            return
        fn, wants_ctx = entry
        body = msg.get("body")
        try:
            if wants_ctx:
                ctx = Context(rid, name, msg.get("session"), msg.get("deadline_ms"), self)
                self._current = ctx
                result = fn(body, ctx)
            else:
                result = fn(body)
            if type(result) not in _PLAIN:
                result = self._finish(rid, result)
        except (_Exit, _ChannelError):
            raise
        except _ChunkRefused as e:
            log.error("method %r (call %d): %s", name, rid, e.message)
            self._reply_error(rid, e.kind, e.message)
            return
        except (Cancelled, DeadlineExceeded) as e:
            log.info("method %r (call %d): %s", name, rid, _text(e))
            self._reply_error(rid, e.wharf_kind, _text(e))
            return
        except Exception as e:
            log.error("method %r (call %d) raised", name, rid, exc_info=True)
            self._reply_error(rid, type(e).__name__, _text(e))
            return
        finally:
            self._current = None
        self._reply(rid, {"t": "ok", "id": rid, "body": result})

    def _finish(self, rid, result):
        """Runs what a handler returned to its end: streams generators, awaits awaitables."""
        if type(result) is _GENERATOR:
            return self._stream(rid, result)
        if type(result) is _ASYNC_GENERATOR:
            return self._event_loop().run_until_complete(self._stream_async(rid, result))
        if inspect.isawaitable(result):
            return self._event_loop().run_until_complete(_awaited(result))
        return result

    def _stream_context(self, rid):
        """The Context a stream watches between chunks: the handler's, or one of its own for a
        handler that takes none. The runtime cancels a stream whose consumer went away; a
        generator is stopped at its next chunk, even one that never asks its Context. (Serving
        several calls at once, the event loop reads the channel and cancels the call's task: the
        stream must not read it too.)"""
        if self.max_concurrency > 1:
            return Context(rid, "")
        if self._current is None:
            self._current = Context(rid, "", _worker=self)
        return self._current

    def _stream(self, rid, gen):
        seq = 0
        send_chunk = self._send_chunk
        ctx = self._stream_context(rid)
        try:
            while True:
                try:
                    body = next(gen)
                except StopIteration as stop:
                    return stop.value
                send_chunk(rid, seq, body)
                seq += 1
                if ctx.cancelled():
                    raise Cancelled("call %d was cancelled" % rid)
        finally:
            gen.close()

    async def _stream_async(self, rid, agen):
        seq = 0
        ctx = self._stream_context(rid)
        try:
            async for body in agen:
                self._send_chunk(rid, seq, body)
                seq += 1
                if ctx.cancelled():
                    raise Cancelled("call %d was cancelled" % rid)
        finally:
            await agen.aclose()
        return None

    def _send_chunk(self, rid, seq, body):
        try:
            self._send({"t": "chunk", "id": rid, "seq": seq, "body": body})
        except _Refused as e:
            raise _ChunkRefused(e.kind, e.message) from None

    # -- reading while a call runs ----------------------------------------------------------

    def _pump(self, timeout):
        """Reads what the runtime has sent while a call runs, waiting up to ``timeout``
        seconds for something to arrive: a ``cancel`` of the running call marks it cancelled, a
        ``ping`` is answered at once, EOF and ``shutdown`` cancel the running call, and every
        other message waits in order until the call has ended."""
        reader = self._reader
        if reader is None:
            return
        try:
            waited = False
            while True:
                msg = reader.buffered()
                if msg is not None:
                    self._during_call(msg)
                    continue
                if self._input_closed or waited:
                    return
                waited = True
                if not reader.fill(timeout):
                    self._input_closed = True
                    self._pending.append(None)  # EOF: ends serving once the call is done
                    self._cancel_current()
                    return
        except FrameError as e:
            raise _Violation(str(e)) from None

    def _during_call(self, msg):
        t = msg.get("t")
        if t == "cancel":
            current = self._current
            if current is not None and current.request_id == _id(msg):
                current._cancelled = True
        elif t == "ping":
            self._send({"t": "pong", "id": _id(msg)})
        elif t in ("call", "init", "reset", "shutdown"):
            if t == "shutdown":
                self._cancel_current()
            self._pending.append(msg)
        elif t is None:
            raise _Violation("message without a type (no 't' key): %r" % (_short(msg),))
        else:
            raise _Violation("unknown message type %r" % (t,))

    def _cancel_current(self):
        if self._current is not None:
            self._current._cancelled = True

    # -- sending -----------------------------------------------------------------------------

    def _reply(self, rid, msg):
        """Sends a final reply; one that cannot be sent becomes an error reply instead."""
        try:
            self._send(msg)
        except _Refused as e:
            log.error("call %d: %s; replying with an error", rid, e.message)
            self._reply_error(rid, e.kind, e.message)

    def _reply_error(self, rid, kind, message):
        try:
            self._send({"t": "error", "id": rid, "kind": kind, "message": message})
        except _Refused as e:  # e.g. an exception whose text exceeds max_frame
            self._send({"t": "error", "id": rid, "kind": e.kind, "message": e.message})

    def _send(self, msg):
        """Encodes ``msg`` and writes it as one frame. Raises _Refused if it cannot be encoded,
        exceeds max_frame or nests too deep; nothing is written then."""
        try:
            payload = self._pack(msg)
        except Exception as e:
            why = "cannot be encoded as MessagePack: %s" % _text(e)
            raise _Refused(type(e).__name__, _about(msg, why)) from None
        n = len(payload)
        if n > self._max_frame:
            why = "of %d bytes exceeds max_frame (%d bytes)" % (n, self._max_frame)
            raise _Refused("frame_too_large", _about(msg, why))
        # A payload of n bytes nests at most n levels; a message of scalars nests one.
        if (
            n > MAX_DEPTH
            and not SCALAR_TYPES.issuperset(map(type, msg.values()))
            and nests_deeper_than(msg, MAX_DEPTH)
        ):
            why = "nests arrays/maps deeper than %d levels" % MAX_DEPTH
            raise _Refused("ValueError", _about(msg, why))
        try:
            write_all(self._fd_out, HEADER.pack(n) + payload)
        except OSError as e:
            raise _ChannelError(e) from e

    # -- helpers -----------------------------------------------------------------------------

    def _run(self, fn):
        """Calls a hook; awaits its result if it is awaitable."""
        result = fn()
        if inspect.isawaitable(result):
            result = self._event_loop().run_until_complete(_awaited(result))
        return result

    def _event_loop(self):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        return self._loop


class _Concurrent:
    """Serving several calls at once, once ``init`` is answered: the channel is read on the
    worker's event loop whenever input arrives, each call runs as a task, and every frame is
    written whole from the loop's thread (so frames never interleave)."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        self.tasks: "dict[int, tuple[asyncio.Task[Any], Context, bool]]" = {}
        self.done: "Optional[asyncio.Future[int]]" = None
        self.executor: Any = None
        self.expired: "set[int]" = set()  # calls whose deadline_ms ran out

    async def serve(self) -> int:
        w = self.w
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        if w.threads > 0:
            import concurrent.futures

            self.executor = concurrent.futures.ThreadPoolExecutor(
                w.threads, thread_name_prefix="wharf-handler"
            )
        reader = w._reader
        assert reader is not None
        fd = reader.fd
        loop.add_reader(fd, self._readable)
        try:
            self._drain()  # frames read before the switch
            status = await self.done
        finally:
            loop.remove_reader(fd)
            await self._stop_all()
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
        return status

    def _finish(self, status: int) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(status)

    def _readable(self) -> None:
        reader = self.w._reader
        assert reader is not None
        try:
            if not reader.fill(0):
                self._finish(0)  # EOF on a frame boundary
                return
        except FrameError as e:
            log.error("protocol violation by the runtime: %s; exiting", e)
            self._finish(2)
            return
        except OSError as e:
            log.error("cannot read from the channel: %s; exiting", e)
            self._finish(2)
            return
        self._drain()

    def _drain(self) -> None:
        reader = self.w._reader
        assert reader is not None
        try:
            while self.done is not None and not self.done.done():
                msg = reader.buffered()
                if msg is None:
                    return
                self._dispatch(msg)
        except FrameError as e:
            log.error("protocol violation by the runtime: %s; exiting", e)
            self._finish(2)
        except _ChannelError as e:
            self._channel_failed(e)

    def _channel_failed(self, e: "_ChannelError") -> None:
        if isinstance(e.__cause__, BrokenPipeError):
            log.warning("the runtime closed this worker's output channel; exiting")
            self._finish(0)
        else:
            log.error("cannot write to the channel: %s; exiting", e.__cause__)
            self._finish(2)

    def _dispatch(self, msg: "dict[str, Any]") -> None:
        w = self.w
        t = msg.get("t")
        if t == "call":
            rid = _id(msg)
            name = msg.get("method")
            if type(name) is not str:
                raise FrameError("call %d: 'method' is %r, not a str" % (rid, name))
            ctx = Context(rid, name, msg.get("session"), msg.get("deadline_ms"))
            ctx._wake = threading.Event()
            entry = w._handlers.get(name)
            is_async = entry is not None and (
                inspect.iscoroutinefunction(entry[0]) or inspect.isasyncgenfunction(entry[0])
            )
            task = asyncio.get_running_loop().create_task(self._call(msg, ctx, entry))
            self.tasks[rid] = (task, ctx, is_async)
            task.add_done_callback(functools.partial(self._ended, rid))
        elif t == "cancel":
            self._cancel(_id(msg), deadline=False)
        elif t == "ping":
            w._send({"t": "pong", "id": _id(msg)})
        elif t == "reset":
            asyncio.get_running_loop().create_task(self._reset(_id(msg)))
        elif t == "init":
            w._send(
                {
                    "t": "init_pong",
                    "id": _id(msg),
                    "status": "ok",
                    "version": PROTOCOL_VERSION,
                    "pid": os.getpid(),
                    "methods": w.methods,
                    "max_concurrency": w.max_concurrency,
                }
            )
        elif t == "shutdown":
            self._finish(0)
        elif t is None:
            raise FrameError("message without a type (no 't' key): %r" % (_short(msg),))
        else:
            raise FrameError("unknown message type %r" % (t,))

    def _ended(self, rid: int, _task: Any = None) -> None:
        self.tasks.pop(rid, None)
        self.expired.discard(rid)

    def _cancel(self, rid: int, deadline: bool) -> None:
        entry = self.tasks.get(rid)
        if entry is None:
            return  # it has ended
        task, ctx, is_async = entry
        if deadline:
            # A handler thread sees it through Context.remaining()/check() once woken.
            self.expired.add(rid)
        else:
            ctx._cancelled = True
        if ctx._wake is not None:
            ctx._wake.set()
        if is_async:
            task.cancel()

    async def _stop_all(self) -> None:
        """Serving ends: calls still running are cancelled (their replies are not wanted)."""
        for rid in list(self.tasks):
            self._cancel(rid, deadline=False)
        pending = [task for task, _, _ in self.tasks.values()]
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    async def _reset(self, rid: int) -> None:
        w = self.w
        try:
            for hook in w._reset_hooks:
                result = hook()
                if inspect.isawaitable(result):
                    await result
        except Exception as e:
            log.error("reset hook failed", exc_info=True)
            self._send_safely(w._reply_error, rid, type(e).__name__, _text(e))
        else:
            self._send_safely(w._send, {"t": "ok", "id": rid, "body": None})

    def _send_safely(self, send: Callable[..., Any], *args: Any) -> None:
        try:
            send(*args)
        except _ChannelError as e:
            self._channel_failed(e)
        except _Refused as e:
            log.error("cannot send a message: %s; exiting", e.message)
            self._finish(2)

    async def _call(self, msg: "dict[str, Any]", ctx: Context, entry: Any) -> None:
        w = self.w
        rid = ctx.request_id
        name = ctx.method
        if entry is None:
            self._send_safely(w._reply_error, rid, "unknown_method", "no method named %r" % (name,))
            return
        fn, wants_ctx = entry
        body = msg.get("body")
        loop = asyncio.get_running_loop()
        timer = None
        if ctx.deadline_ms is not None:
            # A hair after the budget: the loop may run a timer up to its clock's resolution early.
            delay = ctx.deadline_ms / 1000 + 0.002
            timer = loop.call_later(delay, self._cancel, rid, True)
        try:
            args = (body, ctx) if wants_ctx else (body,)
            if self.executor is not None and not (
                inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
            ):
                result = await loop.run_in_executor(self.executor, lambda: fn(*args))
            else:
                result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            if type(result) is _GENERATOR:
                result = w._stream(rid, result)
            elif type(result) is _ASYNC_GENERATOR:
                result = await w._stream_async(rid, result)
        except asyncio.CancelledError:
            if rid in self.expired:
                kind, text = "deadline_exceeded", "call %d ran out of its deadline_ms (%s)" % (
                    rid, ctx.deadline_ms,
                )
            else:
                kind, text = "cancelled", "call %d was cancelled" % rid
            log.info("method %r (call %d): %s", name, rid, text)
            self._send_safely(w._reply_error, rid, kind, text)
            return
        except _ChannelError as e:
            self._channel_failed(e)
            return
        except _ChunkRefused as e:
            log.error("method %r (call %d): %s", name, rid, e.message)
            self._send_safely(w._reply_error, rid, e.kind, e.message)
            return
        except (Cancelled, DeadlineExceeded) as e:
            log.info("method %r (call %d): %s", name, rid, _text(e))
            self._send_safely(w._reply_error, rid, e.wharf_kind, _text(e))
            return
        except Exception as e:
            log.error("method %r (call %d) raised", name, rid, exc_info=True)
            self._send_safely(w._reply_error, rid, type(e).__name__, _text(e))
            return
        finally:
            if timer is not None:
                timer.cancel()
        self._send_safely(w._reply, rid, {"t": "ok", "id": rid, "body": result})


class _ChunkRefused(_Refused):
    """A chunk could not be sent: ends its call with an error reply of ``kind``."""


class _ChannelError(Exception):
    """Writing to the channel failed."""


async def _awaited(awaitable):
    return await awaitable


def _id(msg):
    rid = msg.get("id")
    if type(rid) is not int or rid < 0:
        raise FrameError("%s message with id %r (expected a uint)" % (msg.get("t"), rid))
    return rid


def _about(msg, why):
    return "the %r message %s" % (msg["t"], why)


def _short(value, limit=200):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _open_fifos(path_in, path_out):
    """Opens the FIFO channel: ``path_in`` to read requests from, ``path_out`` to write replies
    to. Both opens are non-blocking, so neither waits for the runtime: the runtime holds its
    ends open before the worker starts, and a reply FIFO that nobody reads (ENXIO) means the
    runtime is gone. The fds are then made blocking (``serve`` does) and are not inherited.
    Returns ``(fd_in, fd_out)``, or None after logging why not."""
    if not path_in or not path_out:
        log.error("WHARF_CHANNEL=fifo needs WHARF_FIFO_IN and WHARF_FIFO_OUT, the FIFOs' paths")
        return None
    opened = []
    try:
        for path, flags in ((path_in, os.O_RDONLY), (path_out, os.O_WRONLY)):
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
            opened.append(fd)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a FIFO", path)
    except OSError as e:
        for fd in opened:
            os.close(fd)
        why = "nobody reads it (is the runtime gone?)" if e.errno == errno.ENXIO else e
        log.error("cannot open the FIFO %r: %s", e.filename or path_out, why)
        return None
    return opened[0], opened[1]


def _take_stdio():
    """Takes stdin/stdout for frames. Afterwards fd 0 reads /dev/null and fd 1 (and with it
    sys.stdout, print() and any C-level writes) goes to stderr, so nothing else can touch the
    channel. Returns the (input, output) fds of the channel."""
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except Exception:
            pass
    fd_in = os.dup(0)
    fd_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return fd_in, fd_out


#: Seconds a stopping worker waits for non-daemon threads still running before it exits anyway.
EXIT_GRACE = 1.0


def _bound_exit(status: int) -> None:
    """Interpreter shutdown joins non-daemon threads (before ``atexit`` handlers run): one that a
    handler left running would keep a stopped worker alive until the runtime kills it. If any
    runs, a daemon thread ends the process after :data:`EXIT_GRACE` seconds."""
    main = threading.main_thread()
    stray = [t for t in threading.enumerate() if t is not main and not t.daemon]
    # Threads already on their way out (a thread pool just shut down) get a moment first.
    settle = time.monotonic() + 0.1
    for t in stray:
        t.join(max(0.0, settle - time.monotonic()))
    stray = [t for t in stray if t.is_alive()]
    if not stray:
        return
    log.warning(
        "non-daemon threads still running (%s); exiting in %.1f s regardless",
        ", ".join(t.name for t in stray), EXIT_GRACE,
    )

    def guard() -> None:
        time.sleep(EXIT_GRACE)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    threading.Thread(target=guard, name="wharf-exit-guard", daemon=True).start()


def _exit_on_sigterm() -> None:
    """SIGTERM ends the worker with ``SystemExit`` (status 143) instead of the default abrupt
    death, so ``finally`` blocks and ``atexit`` handlers run."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the application's own

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def _configure_logging():
    """Sends this SDK's log to stderr unless the program configured logging itself."""
    if logging.getLogger().handlers or log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    worker_id = os.environ.get("WHARF_WORKER_ID")
    prefix = "wharf_worker[%s]" % worker_id if worker_id else "wharf_worker"
    handler.setFormatter(logging.Formatter(prefix + " %(levelname)s: %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
