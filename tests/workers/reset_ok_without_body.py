"""Broken worker: answers reset with an ok that has no body (a required field)."""

from _rawframe import Conforming


class NoBody(Conforming):
    def handle(self, msg):
        if msg.get("t") == "reset":
            self.reset()
            return self.reply({"t": "ok", "id": msg["id"]})
        Conforming.handle(self, msg)


NoBody().serve()
