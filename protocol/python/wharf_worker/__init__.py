"""Python worker SDK for wharf.

Register methods on a :class:`Worker` and call :meth:`Worker.run`; the process then serves the
wharf packet protocol (docs/protocol.md) on the channel the runtime set up::

    from wharf_worker import Worker

    worker = Worker()

    @worker.method("echo")
    def echo(body):
        return body

    if __name__ == "__main__":
        worker.run()
"""

from .framing import DEFAULT_MAX_FRAME, MAX_DEPTH, FrameError
from .worker import PROTOCOL_VERSION, Cancelled, Context, DeadlineExceeded, Worker

__all__ = [
    "Cancelled",
    "Context",
    "DEFAULT_MAX_FRAME",
    "DeadlineExceeded",
    "FrameError",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Worker",
]
__version__ = "0.1.0"
