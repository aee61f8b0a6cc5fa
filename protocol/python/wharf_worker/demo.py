"""The demo worker that wharf's tests, examples and benchmarks drive.

    python3 -m wharf_worker.demo [--init-delay-ms N] [--init-fail MESSAGE] [--exit-after-ready]
                                 [--max-concurrency N] [--threads N]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

from . import Context, Worker

worker = Worker()
options = argparse.Namespace(
    init_delay_ms=0, init_fail=None, exit_after_ready=False, max_concurrency=1, threads=None
)
state: "dict[str, object]" = {}  # per-session state, dropped by reset
held: "list[bytearray]" = []  # memory kept by alloc


@worker.on_init
def init():
    if options.init_delay_ms:
        time.sleep(options.init_delay_ms / 1000)
    if options.init_fail is not None:
        raise RuntimeError(options.init_fail)


@worker.on_ready
def ready():
    if options.exit_after_ready:
        sys.exit(0)


@worker.on_reset
def reset():
    state.clear()


@worker.method()
def echo(body):
    return body


@worker.method()
def sleep(ms):
    time.sleep(ms / 1000)
    return ms


@worker.method()
def wait(body, ctx: Context):
    """The conformance method for cancel and deadline_ms (docs/protocol.md, section 6): runs up
    to body["ms"] ms, ending early with error kind cancelled or deadline_exceeded."""
    ms = body["ms"]
    ctx.sleep(ms / 1000)
    return ms


@worker.method()
async def io_wait(ms):
    """An I/O-bound call: awaits ``ms`` ms of asyncio.sleep (served concurrently with
    --max-concurrency N), then returns ``ms``."""
    await asyncio.sleep(ms / 1000)
    return ms


@worker.method()
def fail(body):
    raise RuntimeError("requested failure" if body is None else str(body))


@worker.method()
def crash(code):
    sys.stderr.flush()
    os._exit(3 if code is None else int(code))


@worker.method()
def state_set(body):
    state[body["key"]] = body.get("value")


@worker.method()
def state_get(body):
    return state.get(body["key"])


@worker.method()
def pid(_body):
    return os.getpid()


@worker.method()
def stream(body):
    n = int(body["n"])
    for i in range(n):
        yield i
    return n


@worker.method()
def alloc(mib):
    block = bytearray(int(mib) * 1024 * 1024)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # touch every page
    held.append(block)
    return sum(len(b) for b in held) // (1024 * 1024)


@worker.method()
def spawn_grandchild(_body):
    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return child.pid


@worker.method("print")
def print_(body):
    print(body, flush=True)
    print(body, file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m wharf_worker.demo", description=__doc__)
    parser.add_argument("--init-delay-ms", type=int, default=0, metavar="N",
                        help="sleep N ms in the init hook")
    parser.add_argument("--init-fail", metavar="MESSAGE", help="make the init hook raise")
    parser.add_argument("--exit-after-ready", action="store_true",
                        help="exit 0 right after sending init_pong")
    parser.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                        help="serve up to N calls at once (async handlers, e.g. io_wait)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="with --max-concurrency: run sync handlers in N threads "
                             "(default: as many as --max-concurrency)")
    parser.parse_args(argv, namespace=options)
    if options.threads is None:
        options.threads = options.max_concurrency if options.max_concurrency > 1 else 0
    if options.max_concurrency < 1 or options.threads < 0:
        parser.error("--max-concurrency must be >= 1 and --threads >= 0")
    worker.max_concurrency = options.max_concurrency
    worker.threads = options.threads
    worker.run()


if __name__ == "__main__":
    main()
