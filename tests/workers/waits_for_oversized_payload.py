"""Broken worker: does not check a header against WHARF_MAX_FRAME and waits for the payload it
announced, forever."""

from _rawframe import Conforming


class WaitsForPayload(Conforming):
    def oversized(self, n):
        pass  # read on: the payload never comes


WaitsForPayload().serve()
