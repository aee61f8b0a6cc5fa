"""Broken worker: treats EOF inside a frame as a clean close (exit status 0)."""

import os

from _rawframe import Conforming


class TruncatedExits0(Conforming):
    def truncated(self):
        os._exit(0)


TruncatedExits0().serve()
