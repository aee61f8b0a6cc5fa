"""Broken worker: answers reset with an ok whose body is not nil."""

from _rawframe import Conforming


class ResetBody(Conforming):
    def handle(self, msg):
        if msg.get("t") == "reset":
            self.reset()
            return self.ok(msg["id"], "reset done")
        Conforming.handle(self, msg)


ResetBody().serve()
