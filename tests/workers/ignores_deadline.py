"""Broken worker: `wait` ignores deadline_ms and runs its full time (it honours cancel)."""

from _rawframe import Conforming


class IgnoresDeadline(Conforming):
    def honours_deadline(self):
        return False


IgnoresDeadline().serve()
