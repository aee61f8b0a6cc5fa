"""Broken worker: answers every ping with two pongs."""

from _rawframe import Conforming


class DuplicatePong(Conforming):
    def pong(self, rid):
        Conforming.pong(self, rid)
        Conforming.pong(self, rid)


DuplicatePong().serve()
