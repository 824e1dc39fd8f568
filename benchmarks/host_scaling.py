"""The host's own 1 -> 2 process scaling, without Ray: a baseline for the benches' 1 vs 2 worker figures.

Runs the same single-threaded sparse-times-dense-block work (scipy CSR, float32, 16 columns, a matrix of
the real KG's size) in one process, then in two at once, released together by a barrier; the work doubles,
so the speedup is 2 * t(one) / t(two, slower of them). Near 2 means the cores do not slow each other; what a
bench's 1 -> 2 figure loses below this is the pipeline's own (Ray's start-up, its driver and daemons).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time


def _work(barrier, out, n: int, nnz: int, reps: int) -> None:
    import numpy as np   # scipy's CSR product runs on one thread; no BLAS thread pool is involved
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    m = sp.csr_matrix((rng.random(nnz, np.float32), (rng.integers(0, n, nnz), rng.integers(0, n, nnz))), shape=(n, n))
    x = rng.random((n, 16), np.float32)
    barrier.wait()
    t = time.perf_counter()
    for _ in range(reps):
        x = m @ x
        x /= x.max()
    out.put(time.perf_counter() - t)


def two_process_speedup(n: int = 25_000, nnz: int = 550_000, reps: int = 400, rounds: int = 3) -> float:
    """Median over ``rounds`` (one and two processes interleaved) of 2 * t(one) / t(two)."""
    ctx = mp.get_context("spawn")   # no fork of a process that may hold Ray's or torch's threads
    ratios = []
    for _ in range(rounds):
        times = {}
        for procs in (1, 2):
            barrier, out = ctx.Barrier(procs), ctx.Queue()
            ps = [ctx.Process(target=_work, args=(barrier, out, n, nnz, reps)) for _ in range(procs)]
            for p in ps:
                p.start()
            times[procs] = max(out.get() for _ in ps)
            for p in ps:
                p.join()
        ratios.append(2 * times[1] / times[2])
    return round(statistics.median(ratios), 2)


if __name__ == "__main__":
    print(two_process_speedup())
