#!/usr/bin/env python
"""Time Omniglot's cold start (verify + decode + preprocess + write the cache) and warm start.

  python benchmarks/data_cache.py --mirror ../shared/data/omniglot

The archives and split files are first copied from the mirror into a fresh temporary folder
(not timed), so that the cold start measures the loader's own work, not a download.
"""
import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import scratchproto as sp  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", required=True, help="a folder laid out like the canonical files")
    p.add_argument("--warm", type=int, default=5, help="warm starts to time (median)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "omniglot"
        shutil.copytree(a.mirror, root, ignore=shutil.ignore_patterns("README*", "LICENSE*"))
        for f in root.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        t = time.perf_counter()
        sp.Omniglot(root, progress=False)
        cold = time.perf_counter() - t
        warm = []
        for _ in range(a.warm):
            t = time.perf_counter()
            sp.Omniglot(root, progress=False)
            warm.append(time.perf_counter() - t)
        size = (root / "cache28.npz").stat().st_size / 2**20
    print(f"cold start {cold:.1f} s, warm start {statistics.median(warm):.2f} s (median of {a.warm}), "
          f"cache {size:.1f} MB")


if __name__ == "__main__":
    main()
