"""Framing: a 4-byte big-endian length, then that many bytes of one MessagePack map."""

import os
import struct

import msgpack

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 8 * 1024 * 1024


class FrameError(Exception):
    """The peer broke the framing or sent something that is not a message."""


class FrameReader:
    """Reads frames from a raw file descriptor with its own buffer."""

    def __init__(self, fd, max_frame=DEFAULT_MAX_FRAME):
        self.fd = fd
        self.max_frame = max_frame
        self.buf = bytearray()

    def _fill(self, need):
        """Reads until the buffer holds `need` bytes; False on EOF before that."""
        while len(self.buf) < need:
            chunk = os.read(self.fd, max(65536, need - len(self.buf)))
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read(self):
        """Returns the next message (a dict), or None on a clean EOF."""
        if not self._fill(4):
            if self.buf:
                raise FrameError("truncated frame: EOF inside a header (%d of 4 bytes)" % len(self.buf))
            return None
        (n,) = HEADER.unpack_from(self.buf)
        if n == 0:
            raise FrameError("zero-length frame")
        if n > self.max_frame:
            raise FrameError("frame of %d bytes exceeds max_frame of %d" % (n, self.max_frame))
        if not self._fill(4 + n):
            raise FrameError("truncated frame: EOF after %d of %d bytes" % (len(self.buf), 4 + n))
        payload = bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several types for bad input
            raise FrameError("malformed MessagePack: %s" % e) from None
        if not isinstance(msg, dict):
            raise FrameError("payload is not a map but %s" % type(msg).__name__)
        return msg


def encode(msg):
    """One whole frame (header and payload) for a message."""
    payload = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def write_all(fd, data):
    """Writes every byte, looping on partial writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
