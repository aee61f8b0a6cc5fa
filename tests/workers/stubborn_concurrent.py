"""Serves two calls at once; `stubborn` ignores the protocol's cancel (it finishes its sleep
and replies ok anyway), so an abandoned call keeps its slot until that late reply."""

import asyncio

from wharf_worker import Worker

worker = Worker(max_concurrency=2)


@worker.method()
async def stubborn(ms):
    try:
        await asyncio.sleep(ms / 1000)
    except asyncio.CancelledError:
        await asyncio.sleep(ms / 1000)
    return ms


@worker.method()
async def io_wait(ms):
    await asyncio.sleep(ms / 1000)
    return ms


@worker.method()
def echo(body):
    return body


if __name__ == "__main__":
    worker.run()
