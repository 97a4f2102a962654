#!/usr/bin/env python
"""The fast layers' threads on and off, alternating in one process: forward and backward of a
backbone on one batch, fast.THREADS = 1 against the default, median seconds and the page faults
(minor faults per step: a worker thread that page-faults its temporaries shows here).

  python benchmarks/threads.py --backbone convnet --images 600 --steps 5

Run it as is: BLAS runs on one thread inside the timed steps (fast.blas_one_thread) and our
threads deal out the work (see docs/engine.md); `--spinning` leaves OpenBLAS on every core with its
default thread timeout instead (its idle threads spin: the arrangement before 2026-11-27).
"""
import argparse
import contextlib
import os
import pathlib
import resource
import statistics
import sys
import time

if "--spinning" in sys.argv:
    os.environ.pop("OPENBLAS_NUM_THREADS", None)
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "28"       # OpenBLAS's default (before NumPy loads it)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from scratchproto import backend, fast  # noqa: E402
from scratchproto.backbones import build_backbone  # noqa: E402
import numpy as np  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--images", type=int, default=600, help="batch size (600: a 60-way 5-shot 5-query episode)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up)")
    p.add_argument("--spinning", action="store_true",
                   help="OpenBLAS on every core with its default thread timeout (spinning)")
    a = p.parse_args()
    backend.keep_freed_memory()
    net = build_backbone(a.backbone, seed=3)
    x = (np.random.default_rng(21).random((a.images, 1, 28, 28)) > 0.85).astype(np.float32)
    r = np.random.default_rng(22).standard_normal((a.images, net.forward(x[:2], False).shape[1])).astype(np.float32)
    settings = sorted({1, fast.THREADS})
    times = {t: [] for t in settings}
    faults = {t: [] for t in settings}
    with contextlib.nullcontext() if a.spinning else fast.blas_one_thread(np):
        for step in range(a.steps + 1):
            for t in settings:
                fast.THREADS = t
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                net.zero_grad()
                net.forward(x, True)
                net.backward(r, need_dx=False)
                if step:                        # the first is a warm-up
                    times[t].append(time.perf_counter() - t0)
                    faults[t].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    blas = "every core, OPENBLAS_THREAD_TIMEOUT=28" if a.spinning else "one thread"
    print(f"{a.backbone} {a.images} images, forward + backward, BLAS on {blas}:")
    for t in settings:
        print(f"  threads {t}: median {statistics.median(times[t]):.3f} s "
              f"({', '.join(f'{v:.3f}' for v in times[t])}), minor page faults per step "
              f"{statistics.median(faults[t]):.0f}")


if __name__ == "__main__":
    main()
