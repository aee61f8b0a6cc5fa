"""Broken worker: encodes a float as float32 whenever float32 holds it exactly, as some
MessagePack encoders do to save bytes: the width of an echoed float64 changes."""

import struct

from _rawframe import Conforming, pack


def shrink(x):
    narrow = struct.pack(">f", x) if abs(x) < 3.4e38 else None
    if narrow is not None and struct.unpack(">f", narrow)[0] == x:
        return b"\xca" + narrow
    return None


class Float32(Conforming):
    def pack(self, msg):
        return pack(msg, float_bytes=shrink)


Float32().serve()
