"""Python worker SDK for wharf.

Register handlers on a :class:`Worker` and call :meth:`Worker.run`; the worker then serves the
wharf packet protocol (docs/protocol.md) on the channel the runtime set up.

    from wharf_worker import Worker

    worker = Worker()

    @worker.method("echo")
    def echo(body):
        return body

    if __name__ == "__main__":
        worker.run()
"""

from .framing import FrameError
from .worker import Context, Worker, PROTOCOL_VERSION

__all__ = ["Context", "FrameError", "Worker", "PROTOCOL_VERSION"]
