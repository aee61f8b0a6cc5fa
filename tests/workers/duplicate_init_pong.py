"""Broken worker: answers the init ping twice."""

from _rawframe import Conforming


class DuplicateInitPong(Conforming):
    def handle(self, msg):
        Conforming.handle(self, msg)
        if msg.get("t") == "init":
            Conforming.handle(self, msg)


DuplicateInitPong().serve()
