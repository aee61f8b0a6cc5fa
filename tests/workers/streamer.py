"""A worker on the SDK whose streams are long, big or slow to end: for the stream tests.

Methods: ``echo``; ``stream`` with body ``{"n": chunks, "size": bytes per chunk (0: the chunk is
its seq), "chunk_ms": pause before each chunk, "end_ms": pause after the last chunk}``.
"""

import time

from wharf_worker import Worker

worker = Worker()


@worker.method()
def echo(body):
    return body


@worker.method()
def stream(body):
    n = int(body["n"])
    size = int(body.get("size", 0))
    chunk_ms = body.get("chunk_ms", 0)
    blob = b"x" * size
    for i in range(n):
        if chunk_ms:
            time.sleep(chunk_ms / 1000)
        yield blob if size else i
    if body.get("end_ms"):
        time.sleep(body["end_ms"] / 1000)
    return n


worker.run()
