"""The demo worker: the methods wharf's tests and examples use.

    python3 -m wharf_worker.demo [--init-delay-ms N] [--init-fail MESSAGE] [--exit-after-ready]
"""

import argparse
import os
import subprocess
import sys
import time

from .worker import Worker

worker = Worker()
state = {}
held = []
options = argparse.Namespace(init_delay_ms=0, init_fail=None, exit_after_ready=False)


@worker.on_init
def init():
    if options.init_delay_ms:
        time.sleep(options.init_delay_ms / 1000)
    if options.init_fail:
        raise RuntimeError(options.init_fail)


@worker.on_reset
def reset():
    state.clear()


@worker.method("echo")
def echo(body):
    return body


@worker.method("sleep")
def sleep(ms):
    time.sleep(ms / 1000)
    return ms


@worker.method("fail")
def fail(body):
    raise RuntimeError(str(body) if body is not None else "requested failure")


@worker.method("crash")
def crash(code):
    sys.stderr.flush()
    os._exit(3 if code is None else int(code))


@worker.method("state_set")
def state_set(body):
    state[body["key"]] = body.get("value")


@worker.method("state_get")
def state_get(body):
    return state.get(body["key"])


@worker.method("pid")
def pid(_body):
    return os.getpid()


@worker.method("stream")
def stream(body):
    n = int(body["n"])
    for i in range(n):
        yield i
    return n


@worker.method("alloc")
def alloc(mib):
    block = bytearray(int(mib) * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page so it is resident
        block[i] = 1
    held.append(block)
    return sum(len(b) for b in held) // (1024 * 1024)


@worker.method("spawn_grandchild")
def spawn_grandchild(_body):
    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return child.pid


@worker.method("print")
def print_(body):
    print(body, flush=True)
    sys.stderr.write("%s\n" % (body,))
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m wharf_worker.demo", description=__doc__)
    parser.add_argument("--init-delay-ms", type=int, default=0, help="sleep this long in the init hook")
    parser.add_argument("--init-fail", metavar="MESSAGE", help="make the init hook raise")
    parser.add_argument("--exit-after-ready", action="store_true", help="exit 0 right after the init pong")
    parser.parse_args(argv, namespace=options)
    if options.exit_after_ready:
        # Serve only the init ping, then leave: simulates a worker that quits once ready.
        original = worker._init

        def init_then_exit(rid):
            original(rid)
            os._exit(0)

        worker._init = init_then_exit
    worker.run()


if __name__ == "__main__":
    main()
