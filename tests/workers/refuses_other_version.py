"""Broken worker: treats an init with a version it does not speak as a violation and exits 2,
instead of answering with its own version and letting the runtime decide."""

from _rawframe import Conforming


class RefusesOtherVersion(Conforming):
    def handle(self, msg):
        if msg.get("t") == "init" and msg.get("version") != 1:
            self.violation("init with version %r" % (msg.get("version"),))
        Conforming.handle(self, msg)


RefusesOtherVersion().serve()
