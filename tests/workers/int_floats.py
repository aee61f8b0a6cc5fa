"""Broken worker: encodes an integral float as an int, as a JavaScript worker does (its numbers
do not know 1.0 from 1)."""

import math

from _rawframe import Conforming, pack


def as_int(x):
    if math.isfinite(x) and x == int(x) and abs(x) < 2**63:
        return pack(int(x))
    return None


class IntFloats(Conforming):
    def pack(self, msg):
        return pack(msg, float_bytes=as_int)


IntFloats().serve()
