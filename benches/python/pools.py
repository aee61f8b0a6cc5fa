"""Python's own process pools, measured on the same echo as wharf (run by wharf-bench).

    python3 pools.py roundtrip ppe|mppool CALLS SIZE   -> {"p50_us", "p99_us", "mean_us"}
    python3 pools.py throughput ppe WORKERS CALLS SIZE -> {"calls_per_s"}

Pool start-up is outside the timed part: only the calls are timed.
"""

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def echo(body):
    return body


def percentile(sorted_values, q):
    return sorted_values[round((len(sorted_values) - 1) * q)]


def roundtrip(kind, calls, size):
    body = "x" * size
    latencies = []
    if kind == "ppe":
        with ProcessPoolExecutor(max_workers=1) as pool:
            pool.submit(echo, body).result()  # warm: the worker process is up
            for _ in range(calls):
                t = time.perf_counter_ns()
                pool.submit(echo, body).result()
                latencies.append(time.perf_counter_ns() - t)
    else:
        with multiprocessing.Pool(processes=1) as pool:
            pool.apply(echo, (body,))
            for _ in range(calls):
                t = time.perf_counter_ns()
                pool.apply(echo, (body,))
                latencies.append(time.perf_counter_ns() - t)
    latencies.sort()
    return {
        "p50_us": percentile(latencies, 0.5) / 1000,
        "p99_us": percentile(latencies, 0.99) / 1000,
        "mean_us": sum(latencies) / len(latencies) / 1000,
    }


def throughput(workers, calls, size):
    body = "x" * size
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(echo, [body] * (workers * 4)))  # warm every worker
        t = time.perf_counter()
        for _ in pool.map(echo, [body] * calls, chunksize=1):
            pass
        elapsed = time.perf_counter() - t
    return {"calls_per_s": calls / elapsed}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "roundtrip":
        out = roundtrip(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        out = throughput(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    print(json.dumps(out))
