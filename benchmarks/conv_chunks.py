"""Time FastConv2d, forward and backward, at ResNet-18's and the ConvNet's sizes, for several
im2col chunk sizes (FastConv2d.CHUNK_FLOATS): the choice of the chunk in fast.py.

  python benchmarks/conv_chunks.py --repeat 2
  python benchmarks/conv_chunks.py --device gpu --log2-chunks 21 24 27     (on a GPU machine)

Prints one line per chunk size: milliseconds forward/backward (median of 5) per layer shape.
"""
import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # run from a checkout
from scratchproto import backend, fast  # noqa: E402
from scratchproto.fast import FastConv2d  # noqa: E402
import numpy as np  # noqa: E402  (after scratchproto, which sets OpenBLAS's thread timeout first)

# (images, height = width, channels in = out): ResNet-18's four stages at 20-way 5+5, and the
# ConvNet's second block at 60-way 5+5
SHAPES = [(200, 28, 64), (200, 14, 128), (200, 7, 256), (600, 14, 64)]


def median_ms(f, xp, runs=5):
    f()                                  # warm-up (and, on CuPy, the kernels' compilation)
    times = []
    for _ in range(runs):
        backend.synchronize(xp)
        t = time.perf_counter()
        f()
        backend.synchronize(xp)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log2-chunks", type=int, nargs="+", default=[23, 22, 21, 20],
                   help="chunk sizes to try, as log2 of the number of floats")
    p.add_argument("--repeat", type=int, default=1, help="go through the chunk sizes this many times")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    a = p.parse_args()
    xp = backend.get_xp(a.device)
    rng = np.random.default_rng(0)
    print("log2(floats)  " + "  ".join(f"n{n} {h}x{h}x{c}: fwd/bwd ms" for n, h, c in SHAPES))
    with fast.blas_one_thread(xp):      # as in training: BLAS on one thread inside our chunks
        for _ in range(a.repeat):
            for lg in a.log2_chunks:
                cells = []
                for n, h, c in SHAPES:
                    conv = FastConv2d(c, c, 3, 1, 1, bias=False, rng=rng, xp=xp)
                    conv.CHUNK_FLOATS = conv.GPU_CHUNK_FLOATS = 1 << lg
                    x = xp.asarray(rng.standard_normal((n, h, h, c)).astype(np.float32))
                    dy = xp.ones_like(conv.conv(x))
                    fwd = median_ms(lambda: conv.conv(x), xp)
                    bwd = median_ms(lambda: conv.conv_backward(dy), xp)
                    cells.append(f"{fwd:.1f}/{bwd:.1f}")
                print(f"{lg:12d}  " + "  ".join(f"{cell:>26s}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
