"""Broken worker: ignores a message of an unknown type and keeps serving."""

from _rawframe import Conforming


class IgnoresUnknownType(Conforming):
    def unknown_type(self, msg):
        pass


IgnoresUnknownType().serve()
