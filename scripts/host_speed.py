"""One line: how fast this host is today, so that test-suite and benchmark times can be compared across days.

The workload is fixed and single-threaded: PageRank by power iteration on a seeded random sparse graph (scipy,
the kind of work keplm's PEPR stage does) plus a pure-Python loop (the kind of work its tokenizers and collators
do). It prints the median of 3 runs in seconds; lower is faster. This machine's speed varies up to 2x between
days: scale a suite's time by today's figure over the reference day's before comparing.

    python scripts/host_speed.py
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")   # one core, whatever the host has

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402


def workload() -> float:
    rng = np.random.default_rng(0)
    n, m = 50_000, 400_000
    a = sp.csr_matrix((np.ones(m), (rng.integers(0, n, m), rng.integers(0, n, m))), shape=(n, n))
    deg = np.asarray(a.sum(1)).ravel()
    deg[deg == 0] = 1
    p = sp.diags(1 / deg) @ a
    t = time.perf_counter()
    r = np.full(n, 1 / n)
    for _ in range(200):
        r = 0.15 / n + 0.85 * (p.T @ r)
    total = 0
    for i in range(6_000_000):
        total += i % 7
    return time.perf_counter() - t


def main() -> None:
    runs = [workload() for _ in range(3)]
    print(json.dumps({"host_speed_s": round(statistics.median(runs), 3), "runs_s": [round(x, 3) for x in runs]}))


if __name__ == "__main__":
    main()
