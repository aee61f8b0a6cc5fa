"""Broken worker: does not read its input while `wait` runs, so a cancel comes too late (it
still honours deadline_ms, which needs no reading)."""

from _rawframe import Conforming


class IgnoresCancel(Conforming):
    def reads_while_calls_run(self):
        return False


IgnoresCancel().serve()
