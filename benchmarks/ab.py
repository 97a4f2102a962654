#!/usr/bin/env python
"""This checkout's training episode against another checkout's, in one process, alternating.

  git worktree add ../before HEAD~1
  python benchmarks/ab.py ../before --backbone convnet --way 60 --rounds 8 --episodes 5

Both versions of scratchproto are loaded side by side (the other one under another module
name) and build the same backbone from the same seed; each round times --episodes training
episodes (forward, loss, backward, Adam) of each version in turn, the order swapped every
round, so that both see the same machine. Prints each version's per-round medians and the
median of the per-round ratios, new / old: a change of a few percent shows through a machine
whose speed drifts by more than that from one minute to the next. Not one of 2% or less: this
checkout against itself (ResNet-18, 10 rounds of 2 episodes, 2026-12-05) gave 0.977, so two
copies of the package in one process do not run alike; there benchmarks/compare.py's fresh
processes are the judge. The episode is benchmarks/episode.py's (sparse random images).
"""
import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from episode import fake_episode  # noqa: E402


def load(checkout, name):
    """The scratchproto package of ``checkout``, imported as module ``name``."""
    root = pathlib.Path(checkout).resolve() / "scratchproto"
    if not (root / "__init__.py").exists():
        raise SystemExit(f"error: {checkout} holds no scratchproto/ (give a checkout's root, e.g. a git worktree)")
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", help="the root of the other checkout (the 'old' side)")
    p.add_argument("--backbone", choices=("convnet", "resnet18"), default="convnet")
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--episodes", type=int, default=5, help="timed episodes per version and round")
    a = p.parse_args()
    versions = {"old": load(a.other, "scratchproto_old"), "new": load(HERE.parent, "scratchproto_new")}
    xs, xq = fake_episode(np, a.way, 5, 5)
    runs = {}
    for tag, sp in versions.items():
        net = sp.build_backbone(a.backbone, seed=0, xp=np)
        runs[tag] = (sp.ProtoNet(net), sp.Adam(net, lr=1e-3))
    times = {tag: [] for tag in runs}
    with versions["old"].fast.blas_one_thread(np), versions["new"].fast.blas_one_thread(np):
        for model, opt in runs.values():            # warm-up: workspaces made, pages touched
            for _ in range(2):
                model.episode(xs, xq, train=True)
                opt.step()
        for r in range(a.rounds):
            for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
                model, opt = runs[tag]
                each = []
                for _ in range(a.episodes):
                    t = time.perf_counter()
                    model.episode(xs, xq, train=True)
                    opt.step()
                    each.append(time.perf_counter() - t)
                times[tag].append(statistics.median(each))
    for tag, ts in times.items():
        print(f"{tag} ({a.other if tag == 'old' else HERE.parent}): median {statistics.median(ts):.4f} s, "
              f"rounds " + " ".join(f"{t:.4f}" for t in ts))
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    print(f"new/old: median of the per-round ratios {statistics.median(ratios):.3f} "
          f"(rounds " + " ".join(f"{r:.3f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
