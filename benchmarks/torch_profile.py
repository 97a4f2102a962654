#!/usr/bin/env python
"""PyTorch's side of a per-operation profile: one training episode of the reference
(../shared/reference/torch_protonet.py) under torch.profiler, time per operator kind.

  ../torchref/bin/python benchmarks/torch_profile.py --backbone convnet --way 60 --episodes 5

Run it with the Python that has torch; set the same thread count on both sides (OMP_NUM_THREADS
for PyTorch, the default or SCRATCHPROTO_THREADS for benchmarks/episode.py --by-layer, our side
of the comparison). Prints the median episode time without the profiler, then the profiled
episodes' operators by self CPU time, divided by the episode count.
"""
import argparse
import importlib.util
import pathlib
import statistics
import time

import torch

REF = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "torch_protonet.py"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=str(REF), help="path of torch_protonet.py")
    p.add_argument("--backbone", default="convnet", choices=("convnet", "resnet18"))
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("torch_protonet", a.reference)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(0)
    model = ref.ProtoNet(a.backbone).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs = (torch.rand(a.way, a.shot, 1, 28, 28) > 0.85).float()
    xq = (torch.rand(a.way, a.query, 1, 28, 28) > 0.85).float()

    def episode():
        opt.zero_grad()
        loss, _, _ = model.episode(xs, xq)
        loss.backward()
        opt.step()
        loss.item()
    times = []
    for i in range(a.episodes + 2):
        t = time.perf_counter()
        episode()
        if i >= 2:
            times.append(time.perf_counter() - t)
    print(f"torch {torch.__version__} {a.backbone} {a.way}w{a.shot}s{a.query}q threads={torch.get_num_threads()} "
          f"sec/episode={statistics.median(times):.4f} (without the profiler)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(a.episodes):
            episode()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / a.episodes / 1e6
    print(f"profiled: {total:.4f} s of operators' self time per episode")
    print(f"{'operator':44s} {'ms/episode':>10s} {'share':>6s} {'calls':>6s}")
    for e in rows[:a.rows]:
        ms = e.self_cpu_time_total / a.episodes / 1e3
        print(f"{e.key[:44]:44s} {ms:10.1f} {100 * ms / 1e3 / total:5.1f}% {e.count // a.episodes:6d}")


if __name__ == "__main__":
    main()
