#!/usr/bin/env python
"""Every convolution shape of ResNet-18 at a 20-way 5-shot 5-query training episode (200 images),
forward and backward, ours against PyTorch's, one layer at a time on the CPU.

  python benchmarks/conv_shapes.py --torch-python ../torchref/bin/python

Ours is FastConv2d as ResNet-18's blocks build it (Winograd where it applies, fast.py), on the
thread budget with BLAS on one thread, as in training; PyTorch's is torch.nn.Conv2d (oneDNN) on
as many threads, timed by the other Python (--torch-python) in a process of its own. Each side
prints the median of --repeats for each shape, forward and backward (dx and dW). Where the
episode's time goes by layer kind is `benchmarks/episode.py --by-layer`; this says, shape by
shape, where PyTorch's convolutions are faster than ours and where slower.
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

# (images, size, C_in, C_out, kernel, stride, how many in ResNet-18): the stem is left out (its
# 3 input channels make a small im2col, kept whole)
SHAPES = [(200, 28, 64, 64, 3, 1, 4), (200, 28, 64, 128, 3, 2, 1), (200, 28, 64, 128, 1, 2, 1),
          (200, 14, 128, 128, 3, 1, 3), (200, 14, 128, 256, 3, 2, 1), (200, 14, 128, 256, 1, 2, 1),
          (200, 7, 256, 256, 3, 1, 3), (200, 7, 256, 512, 3, 2, 1), (200, 7, 256, 512, 1, 2, 1),
          (200, 4, 512, 512, 3, 1, 3)]


def median_ms(fn, repeats):
    fn()                                        # warm-up: workspaces made, pages touched
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ours(repeats):
    """{shape index: (forward ms, backward ms)} for FastConv2d."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import numpy as np
    from scratchproto import fast
    rng = np.random.default_rng(0)
    out = {}
    with fast.blas_one_thread(np):
        for i, (n, size, c_in, c_out, k, stride, _) in enumerate(SHAPES):
            conv = fast.FastConv2d(c_in, c_out, k, stride, k // 2, bias=False, rng=rng, winograd=True)
            x = rng.standard_normal((n, size, size, c_in)).astype(np.float32)
            dy = rng.standard_normal(conv.forward(x).shape).astype(np.float32)
            out[i] = (median_ms(lambda: conv.forward(x), repeats), median_ms(lambda: conv.backward(dy), repeats))
    return out


def theirs(repeats):
    """The same for torch.nn.Conv2d (run in the Python that has torch)."""
    import torch
    out = {}
    for i, (n, size, c_in, c_out, k, stride, _) in enumerate(SHAPES):
        conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        x = torch.randn(n, c_in, size, size, requires_grad=True)
        dy = torch.randn_like(conv(x))
        fwd = median_ms(lambda: conv(x), repeats)
        out[i] = (fwd, median_ms(lambda: conv(x).backward(dy), repeats) - fwd)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-python", help="a Python that has torch (without it: ours alone)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--theirs", action="store_true", help=argparse.SUPPRESS)   # the torch side's process
    a = p.parse_args()
    if a.theirs:
        print(json.dumps(theirs(a.repeats)))
        return
    mine = ours(a.repeats)
    other = None
    if a.torch_python:
        run = subprocess.run([a.torch_python, __file__, "--theirs", "--repeats", str(a.repeats)],
                             capture_output=True, text=True, check=True)
        other = {int(k): v for k, v in json.loads(run.stdout.splitlines()[-1]).items()}
    print("shape (images, size, in -> out, kernel/stride) x count   ours fwd/bwd ms"
          + ("   PyTorch fwd/bwd ms   ours/PyTorch fwd, bwd" if other else ""))
    total = [0.0, 0.0]
    for i, (n, size, c_in, c_out, k, stride, count) in enumerate(SHAPES):
        f, b = mine[i]
        line = f"{n} x {size:>2}x{size:<2} {c_in:>3} -> {c_out:<3} {k}x{k}/{stride} x {count}   {f:7.1f} / {b:6.1f}"
        if other:
            tf, tb = other[i]
            line += f"   {tf:7.1f} / {tb:6.1f}   {f / tf:5.2f}, {b / tb:5.2f}"
            total[1] += count * (tf + tb)
        total[0] += count * (f + b)
        print(line)
    print(f"sum over ResNet-18's convolutions (each shape times its count): ours {total[0]:.0f} ms"
          + (f", PyTorch {total[1]:.0f} ms, ratio {total[0] / total[1]:.2f}" if other else ""))


if __name__ == "__main__":
    main()
