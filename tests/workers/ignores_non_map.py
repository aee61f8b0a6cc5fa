"""Broken worker: skips a payload that is not a map and keeps serving."""

from _rawframe import Conforming


class IgnoresNonMap(Conforming):
    def not_a_map(self, msg):
        return None  # no message: read on


IgnoresNonMap().serve()
