"""Broken worker: exits with status 0 on invalid MessagePack, as if the runtime had closed the
channel."""

import os

from _rawframe import Conforming


class Exits0(Conforming):
    def malformed(self, e):
        os._exit(0)


Exits0().serve()
