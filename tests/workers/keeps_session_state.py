"""Broken worker: keeps state apart per session, but never drops it: after reset, the next
session does not see it, yet the reset session's name still does."""

from _rawframe import Conforming


class KeepsSessionState(Conforming):
    def reset(self):
        pass

    def m_state_set(self, rid, body, msg):
        self.state[(msg.get("session"), body["key"])] = body.get("value")
        self.ok(rid, None)

    def m_state_get(self, rid, body, msg):
        self.ok(rid, self.state.get((msg.get("session"), body["key"])))


KeepsSessionState().serve()
