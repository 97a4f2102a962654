#!/usr/bin/env python
"""Alternate scratchproto's and PyTorch's episode timings in one sitting and print the ratio.

  python benchmarks/compare.py --torch-python ../torchref/bin/python --backbone convnet --way 60 --rounds 5

Each round runs benchmarks/episode.py and then the reference's `time` command
(../shared/reference/torch_protonet.py), each as a fresh process timing --episodes episodes after
warm-up; the figures are the medians over rounds of those per-process medians, and the median of
the per-round ratios (each round's two runs saw the same machine load; the machines are shared).
"""
import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REF = HERE.parents[1] / "shared" / "reference" / "torch_protonet.py"


def run(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(re.search(r"sec/episode=([0-9.]+)", out).group(1)), out.strip().splitlines()[0]


MAKE_TORCH = "python -m venv ../torchref && ../torchref/bin/pip install torch==2.13.0 numpy"


def need_torch(python, reference):
    """Stop with one line, saying how to make it, where the PyTorch side cannot run."""
    if shutil.which(python) is None:
        sys.exit(f"error: --torch-python {python} is not there; make a PyTorch environment with: {MAKE_TORCH}")
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0:
        sys.exit(f"error: {python} cannot import torch; make a PyTorch environment with: {MAKE_TORCH}")
    if not pathlib.Path(reference).is_file():
        sys.exit(f"error: no PyTorch reference at {reference} (--reference: the path of torch_protonet.py)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-python", required=True, help="a Python that has torch")
    p.add_argument("--reference", default=str(REF), help="path of torch_protonet.py")
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tf32", action="store_true", help="scratchproto with TF32 tensor cores (episode.py --tf32)")
    p.add_argument("--torch-fp32", action="store_true",
                   help="PyTorch without TF32 (NVIDIA_TF32_OVERRIDE=0); its default uses TF32 in cuDNN")
    a = p.parse_args()
    need_torch(a.torch_python, a.reference)
    shape = ["--backbone", a.backbone, "--way", str(a.way), "--shot", str(a.shot), "--query", str(a.query),
             "--episodes", str(a.episodes)]
    ours_cmd = [sys.executable, str(HERE / "episode.py"), *shape, "--device", a.device, "--no-layers"]
    ours_cmd += ["--tf32"] if a.tf32 else []
    ref_env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"} if a.torch_fp32 else None
    ref_cmd = [a.torch_python, a.reference, "time", *shape, "--device", "cuda" if a.device == "gpu" else "cpu"]
    ours, ref = [], []
    for r in range(a.rounds):
        t, line = run(ours_cmd)
        ours.append(t)
        print(f"round {r + 1} {line}", flush=True)
        t, line = run(ref_cmd, ref_env)
        ref.append(t)
        print(f"round {r + 1} {line}", flush=True)
    mo, mr = statistics.median(ours), statistics.median(ref)
    paired = statistics.median(o / r for o, r in zip(ours, ref))
    print(f"median sec/episode: scratchproto {mo:.4f}  pytorch {mr:.4f}  ratio {mo / mr:.2f}  "
          f"(median of the {a.rounds} per-round ratios: {paired:.2f})")
    # how far the rounds stray from their median (the CPU target asks for every round within 15%)
    spread = lambda xs, m: max(abs(x - m) for x in xs) / m      # noqa: E731
    print(f"largest deviation of a round from the median: scratchproto {100 * spread(ours, mo):.0f}%  "
          f"pytorch {100 * spread(ref, mr):.0f}%")


if __name__ == "__main__":
    main()
