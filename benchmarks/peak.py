#!/usr/bin/env python
"""The machine's practical float32 peak: OpenBLAS's sgemm on large square matrices, on one thread
and on every usable core, and on the shapes of the ConvNet's busiest products.

  python benchmarks/peak.py

A 4096 x 4096 x 4096 product is as close to the arithmetic peak as NumPy gets (OpenBLAS's
kernels for the CPU it finds: SkylakeX on an AVX-512 Xeon, Zen on an EPYC). The episode's
products are thinner: (rows, 576) x (576, 64) is the second ConvNet block's im2col product,
(64, rows) x (rows, 576) its weight gradient; their rate against the square one says how much a
better arrangement could still gain. Best and median of 7 runs each.
"""
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from scratchproto import fast


def rate(flops, f, runs=7):
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return flops / min(times) / 1e9, flops / statistics.median(times) / 1e9


def main():
    cores = fast.usable_cores()
    blas = [f"{lib['internal_api']} {lib['version']} ({lib.get('architecture', '?')})"
            for lib in threadpool_info() if lib["user_api"] == "blas"]
    print(f"NumPy {np.__version__}, BLAS: {', '.join(blas)}; {cores} usable cores")
    rng = np.random.default_rng(0)
    n = 4096
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    for threads in sorted({1, cores}):
        with threadpool_limits(threads, user_api="blas"):
            best, med = rate(2 * n ** 3, lambda: a @ b)
        print(f"sgemm {n}^3 on {threads} thread(s): best {best:.0f} GFLOP/s, median {med:.0f}")
    rows = 1764        # one im2col chunk of the second ConvNet block: 9 images of 14 x 14
    cols, w = rng.random((rows, 576), dtype=np.float32), rng.random((576, 64), dtype=np.float32)
    x = rng.random((rows, 64), dtype=np.float32)
    with threadpool_limits(1, user_api="blas"):
        for name, f in ((f"({rows}, 576) x (576, 64), im2col product", lambda: cols @ w),
                        (f"(64, {rows}) x ({rows}, 576), weight gradient", lambda: x.T @ cols)):
            best, med = rate(2 * rows * 576 * 64, f, runs=51)
            print(f"{name} on 1 thread: best {best:.0f} GFLOP/s, median {med:.0f}")


if __name__ == "__main__":
    main()
