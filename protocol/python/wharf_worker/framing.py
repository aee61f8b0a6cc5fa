"""Framing of the wharf packet protocol: a 4-byte big-endian length N, then N bytes holding one
MessagePack map (docs/protocol.md, section 1)."""

import os
import select
import struct
from typing import Any, Mapping, Optional, Union

import msgpack

HEADER = struct.Struct(">I")
HEADER_LEN = 4
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
# Deepest nesting of arrays and maps in a payload, the message map counting as one level.
MAX_DEPTH = 128
READ_SIZE = 64 * 1024

_CONTAINERS = (dict, list, tuple)
# Types whose values never nest (what MessagePack decodes scalars to).
SCALAR_TYPES = frozenset((type(None), bool, int, float, str, bytes))
_STR = frozenset((str,))
_packb = msgpack.packb
_unpackb = msgpack.unpackb


class FrameError(Exception):
    """The peer broke the protocol: bad framing, or a payload that is not a message."""


def nests_deeper_than(value: Any, limit: int) -> bool:
    """True if arrays and maps in ``value`` nest more than ``limit`` levels (``value`` itself
    being level 1). Walks one level at a time, so it needs no recursion."""
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: "list[Any]" = []
        push = below.append
        for container in level:
            if isinstance(container, dict):
                for k, v in container.items():
                    if isinstance(k, _CONTAINERS):
                        push(k)
                    if isinstance(v, _CONTAINERS):
                        push(v)
            else:
                for v in container:
                    if isinstance(v, _CONTAINERS):
                        push(v)
        level = below
    return False


def decode(payload: "Union[bytes, bytearray, memoryview]") -> "dict[str, Any]":
    """The message (a dict) in one frame's payload; FrameError if it is anything else."""
    try:
        msg = _unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types (FormatError, ExtraData, ...)
        raise FrameError("malformed MessagePack payload: %s: %s" % (type(e).__name__, e)) from None
    if type(msg) is not dict:
        raise FrameError("payload is a %s, not a map" % type(msg).__name__)
    if not _STR.issuperset(map(type, msg)):
        raise FrameError("message map has a key that is not a str: %r" % (list(msg)[:10],))
    # A payload of N bytes nests at most N levels, and a message of scalars nests one: most
    # messages need no walk.
    if (
        len(payload) > MAX_DEPTH
        and not SCALAR_TYPES.issuperset(map(type, msg.values()))
        and nests_deeper_than(msg, MAX_DEPTH)
    ):
        raise FrameError("payload nests arrays/maps deeper than %d levels" % MAX_DEPTH)
    return msg


def encode(msg: "Mapping[str, Any]") -> bytes:
    """One whole frame, header and payload, as one bytes object."""
    payload = _packb(msg, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Reads frames from a raw file descriptor through a small buffer of its own.

    ``read()`` returns the next message, ``None`` on a clean EOF (on a frame boundary), and
    raises :class:`FrameError` on any violation. A header is checked against ``max_frame``
    before anything is allocated for its payload.
    """

    __slots__ = ("fd", "max_frame", "_buf", "_pos", "_spare")

    def __init__(self, fd: int, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.fd = fd
        self.max_frame = max_frame
        self._buf = b""
        self._pos = 0
        self._spare = bytearray(READ_SIZE)

    def read(self) -> "Optional[dict[str, Any]]":
        """The next message (a dict), or None on a clean EOF."""
        payload = self.read_payload()
        if payload is None:
            return None
        return decode(payload)

    def buffered(self) -> "Optional[dict[str, Any]]":
        """The next message if a whole frame of it is already buffered, else None. Never
        reads; a header is still checked as soon as its 4 bytes are here."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_LEN:
            return None
        n = HEADER.unpack_from(buf, pos)[0]
        _check_header(n, self.max_frame)
        stop = pos + HEADER_LEN + n
        if stop > len(buf):
            return None
        self._pos = stop
        return decode(memoryview(buf)[pos + HEADER_LEN : stop])

    def pending_bytes(self) -> int:
        """How many bytes are buffered and not yet read as messages."""
        return len(self._buf) - self._pos

    def fill(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for input and buffers what has arrived, without
        blocking longer (for reading while a call runs; see :meth:`buffered`). Returns False
        at a clean EOF; raises FrameError at an EOF inside a frame."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return True
        chunk = os.read(self.fd, READ_SIZE)
        rest = self._buf[self._pos :]
        if not chunk:
            if rest:
                raise FrameError("truncated frame: EOF after %d bytes of a frame" % len(rest))
            return False
        self._buf = bytes(rest) + chunk if rest else chunk
        self._pos = 0
        return True

    def read_payload(self) -> "Optional[Union[bytes, bytearray, memoryview]]":
        """The next frame's payload (bytes-like), or None on a clean EOF."""
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if end - pos < HEADER_LEN:
            buf = buf[pos:]
            while len(buf) < HEADER_LEN:
                chunk = os.read(self.fd, READ_SIZE)
                if not chunk:
                    self._buf = b""
                    self._pos = 0
                    if buf:
                        raise FrameError(
                            "truncated frame: EOF after %d of the 4 header bytes" % len(buf)
                        )
                    return None
                buf = buf + chunk if buf else chunk
            pos = 0
            end = len(buf)
        n = HEADER.unpack_from(buf, pos)[0]
        _check_header(n, self.max_frame)
        start = pos + HEADER_LEN
        stop = start + n
        if stop <= end:
            self._buf = buf
            self._pos = stop
            return memoryview(buf)[start:stop]
        # The rest of the payload is not here yet: read it straight into a buffer of its size,
        # and whatever follows it (the next frames, if any) into the spare buffer.
        payload = bytearray(n)
        have = end - start
        payload[:have] = memoryview(buf)[start:end]
        self._buf = b""
        self._pos = 0
        view = memoryview(payload)
        spare = self._spare
        readv = os.readv
        fd = self.fd
        while have < n:
            got = readv(fd, [view[have:], spare])
            if not got:
                raise FrameError(
                    "truncated frame: EOF after %d of %d payload bytes" % (have, n)
                )
            have += got
        if have > n:
            self._buf = bytes(spare[: have - n])
        return payload


def _check_header(n, max_frame):
    if n == 0:
        raise FrameError("zero-length frame (N = 0)")
    if n > max_frame:
        raise FrameError(
            "frame header announces %d bytes, more than max_frame (%d)" % (n, max_frame)
        )


def write_all(fd: int, data: bytes) -> None:
    """Writes all of ``data`` to ``fd``, looping on partial writes."""
    n = os.write(fd, data)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        n = os.write(fd, view)
        view = view[n:]
