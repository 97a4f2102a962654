#!/usr/bin/env python
"""One training episode's time under the thread settings that users have: the thread matrix.

  python benchmarks/thread_matrix.py --backbone convnet --way 60 --rounds 5

Each case runs benchmarks/episode.py (--no-layers) as a fresh process with its own environment;
the cases take turns, round after round, so that each round sees the same machine load. Cases:

  default            no thread variable set
  OMP=cores          OMP_NUM_THREADS set to the usable cores, as many job scripts do
  OPENBLAS=cores     OPENBLAS_NUM_THREADS set to the cores
  numpy first        NumPy imported (and OpenBLAS started) before scratchproto
  numpy first, t4    the same with OPENBLAS_THREAD_TIMEOUT=4
  one thread         OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and SCRATCHPROTO_THREADS all 1
  OMP=1              OMP_NUM_THREADS=1 alone

Every multi-core case is judged against the default, OMP=1 against the one-thread case: within
15% of it (the median over rounds of the per-round ratio) passes.
"""
import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys

from scratchproto import fast

HERE = pathlib.Path(__file__).resolve().parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "SCRATCHPROTO_THREADS",
                    "OPENBLAS_THREAD_TIMEOUT")


def cases(cores):
    """(name, extra environment, NumPy imported first, the case it is judged against)."""
    one = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "SCRATCHPROTO_THREADS": "1"}
    return [("default", {}, False, None),
            ("OMP=cores", {"OMP_NUM_THREADS": str(cores)}, False, "default"),
            ("OPENBLAS=cores", {"OPENBLAS_NUM_THREADS": str(cores)}, False, "default"),
            ("numpy first", {}, True, "default"),
            ("numpy first, t4", {"OPENBLAS_THREAD_TIMEOUT": "4"}, True, "default"),
            ("one thread", one, False, None),
            ("OMP=1", {"OMP_NUM_THREADS": "1"}, False, "one thread")]


def timed(args, extra, numpy_first):
    """sec/episode of one fresh episode.py process."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(extra)
    script = str(HERE / "episode.py")
    if numpy_first:
        cmd = [sys.executable, "-c", "import numpy, runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr}")
    return float(re.search(r"sec/episode=([0-9.]+)", out.stdout).group(1)), out.stdout.splitlines()[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--episodes", type=int, default=5, help="timed episodes per process, after warm-up")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    cores = fast.usable_cores()
    args = ["--backbone", a.backbone, "--device", "cpu", "--way", str(a.way), "--shot", str(a.shot),
            "--query", str(a.query), "--episodes", str(a.episodes), "--no-layers"]
    table = cases(cores)
    times = {name: [] for name, *_ in table}
    for r in range(a.rounds):
        for name, extra, numpy_first, _ in table:
            t, line = timed(args, extra, numpy_first)
            times[name].append(t)
            print(f"round {r + 1} {name:16s} {t:.4f} s   {line}", flush=True)
    print(f"\n{a.backbone} {a.way}-way {a.shot}-shot {a.query}-query training episode, {cores} usable cores, "
          f"median of {a.rounds} rounds:")
    print(f"{'case':16s} {'sec/episode':>11s}  {'against':16s} {'ratio':>5s}")
    failed = []
    for name, _, _, judge in table:
        med = statistics.median(times[name])
        if judge is None:
            print(f"{name:16s} {med:11.4f}")
            continue
        ratio = statistics.median(t / u for t, u in zip(times[name], times[judge]))
        ok = ratio <= 1.15
        failed += [] if ok else [name]
        print(f"{name:16s} {med:11.4f}  {judge:16s} {ratio:5.2f}{'' if ok else '  over 15%'}")
    print("all within 15%" if not failed else f"over 15%: {', '.join(failed)}")


if __name__ == "__main__":
    main()
