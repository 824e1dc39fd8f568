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


def _work(rank: int, world: int, port: int, barrier, out, n: int, nnz: int, reps: int) -> None:
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


def one_vs_two_processes(worker, args: tuple, rounds: int = 3) -> float:
    """Median over ``rounds`` (one and two processes interleaved) of 2 * t(one) / t(two, the slower of them).
    ``worker(rank, world, port, barrier, out, *args)`` runs in a spawned process and puts its seconds on ``out``;
    ``port`` is a free local TCP port (for a process group), ``barrier`` releases the processes together."""
    import socket

    ctx = mp.get_context("spawn")   # no fork of a process that may hold Ray's or torch's threads
    ratios = []
    for _ in range(rounds):
        times = {}
        for world in (1, 2):
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                port = free.getsockname()[1]
            barrier, out = ctx.Barrier(world), ctx.Queue()
            ps = [ctx.Process(target=worker, args=(rank, world, port, barrier, out, *args)) for rank in range(world)]
            for p in ps:
                p.start()
            times[world] = max(out.get() for _ in ps)
            for p in ps:
                p.join()
        ratios.append(2 * times[1] / times[2])
    return statistics.median(ratios)


def two_process_speedup(n: int = 25_000, nnz: int = 550_000, reps: int = 400, rounds: int = 3) -> float:
    """The sparse products' 1 -> 2 process speedup (``one_vs_two_processes``)."""
    return round(one_vs_two_processes(_work, (n, nnz, reps), rounds), 2)


if __name__ == "__main__":
    print(two_process_speedup())
