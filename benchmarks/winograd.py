"""Winograd's F(4x4, 3x3) against im2col, one convolution at a time, on the CPU.

ResNet-18's 3x3 stride-1 convolutions at a 20-way 5-shot 5-query training episode (200 images):
the forward pass and the backward pass (dx and dW) of FastConv2d with winograd=True (every
channel count allowed) and with im2col, median of --repeats, on the thread budget (fast.THREADS)
with BLAS on one thread, as in training. This is what FastConv2d.WINOGRAD_MIN_CHANNELS and the
choice of Winograd for ResNet-18's blocks rest on.

  python benchmarks/winograd.py
"""
import argparse

import numpy as np

from conv_shapes import median_ms     # (benchmarks/, the script's folder, is on the path)
from scratchproto import fast

SHAPES = [(28, 64), (14, 128), (7, 256), (4, 512)]       # (size, channels): layer1 to layer4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{a.images} images, threads {fast.THREADS} (BLAS on one thread), float32, median of {a.repeats}")
    print("size x size x channels    forward: winograd  im2col  ratio    backward: winograd  im2col  ratio")
    with fast.blas_one_thread(np):
        for size, c in SHAPES:
            x = rng.standard_normal((a.images, size, size, c)).astype(np.float32)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            times = []
            for winograd in (True, False):
                conv = fast.FastConv2d(c, c, 3, 1, 1, bias=False, rng=rng, winograd=winograd)
                conv.WINOGRAD_MIN_CHANNELS = 1
                times.append(median_ms(lambda: conv.forward(x), a.repeats))
                assert isinstance(conv.cache, fast.WinogradConvCache) == winograd
                times.append(median_ms(lambda: conv.backward(dy), a.repeats))
            wf, wb, f, b = times
            print(f"{size:>4} x {size:>2} x {c:<3}             {wf:8.1f} {f:7.1f}  {wf / f:5.2f}"
                  f"              {wb:8.1f} {b:7.1f}  {wb / b:5.2f}")


if __name__ == "__main__":
    main()
