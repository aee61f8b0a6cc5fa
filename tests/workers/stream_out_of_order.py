"""Broken worker: sends the chunks of a stream in reverse order."""

from _rawframe import Conforming


class Reversed(Conforming):
    def m_stream(self, rid, body, msg):
        n = body["n"]
        for i, seq in enumerate(reversed(range(n))):
            self.reply({"t": "chunk", "id": rid, "seq": seq, "body": seq})
        self.ok(rid, n)


Reversed().serve()
