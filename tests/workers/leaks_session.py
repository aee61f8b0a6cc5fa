"""Broken worker: answers reset with ok but keeps the state: it leaks into the next session."""

from _rawframe import Conforming


class LeaksSession(Conforming):
    def reset(self):
        pass


LeaksSession().serve()
