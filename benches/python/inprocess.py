"""The Python code of wharf-bench's `inprocess` scenario, run two ways from the same file.

In process: the bench binary embeds Python (pyo3), imports this module and calls its functions.
As a wharf worker: `python3 benches/python/inprocess.py` serves the same functions over the
packet protocol (needs `wharf_worker` on the path).
"""

import os


def echo(body):
    return body


def spin(n):
    """A pure-Python CPU loop of n iterations (it holds the GIL throughout)."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1000003
    return acc


def exit_now(code):
    """Ends the process at once, as a crashing extension or a stray os._exit would."""
    os._exit(int(code))


def segfault(_body=None):
    """Dereferences a null pointer: SIGSEGV, as a bug in native code would."""
    import ctypes

    ctypes.string_at(0)


if __name__ == "__main__":
    from wharf_worker import Worker

    worker = Worker()
    for fn in (echo, spin, exit_now, segfault):
        worker.method()(fn)
    worker.run()
