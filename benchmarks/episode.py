#!/usr/bin/env python
"""Time one training episode exactly as the trainer runs it.

forward of support + query, ProtoNet loss, NC metrics, backward, Adam step; after warm-up, the
median over --episodes runs, images per second, peak memory (host RSS; device memory on a GPU),
then the time per layer type, forward and backward, from one extra instrumented episode.

  python benchmarks/episode.py --backbone convnet --device cpu --way 60 --shot 5 --query 5 --episodes 10

--in-a-row adds the trainer's loop: episodes back to back, each episode's numbers read as soon as
it is queued against read one episode late (trainer.finished_episodes).

Compare with the PyTorch reference in the same sitting (see benchmarks/README.md).
"""
import argparse
import collections
import contextlib
import pathlib
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import scratchproto as sp  # noqa: E402
from scratchproto import backend  # noqa: E402
from scratchproto.protonet import protonet_loss  # noqa: E402
import numpy as np  # noqa: E402


def fake_episode(xp, way, shot, query, seed=0):
    """Random sparse binary images shaped like Omniglot's (the reference's `time` does the same)."""
    rng = np.random.default_rng(seed)
    xs = (rng.random((way, shot, 1, 28, 28)) > 0.85).astype(np.float32)
    xq = (rng.random((way, query, 1, 28, 28)) > 0.85).astype(np.float32)
    return xp.asarray(xs), xp.asarray(xq)


def in_a_row(model, opt, xs, xq, n, xp, repeats=3):
    """The trainer's loop timed: ``n`` training episodes back to back with one wait at the end,
    each episode's numbers read at once, and read one episode late (trainer.finished_episodes),
    alternating; returns [(how, median seconds per episode)] for the two."""
    def at_once():
        for _ in range(n):
            model.episode(xs, xq, train=True)
            opt.step()

    def one_late():
        for _ in sp.trainer.finished_episodes(model, [(xs, xq)] * n, True, opt):
            pass
    times = {"read at once": [], "read one late (the trainer's way)": []}
    for _ in range(repeats):
        for (how, seconds), loop in zip(times.items(), (at_once, one_late)):
            backend.synchronize(xp)
            t = time.perf_counter()
            loop()
            backend.synchronize(xp)
            seconds.append((time.perf_counter() - t) / n)
    return [(how, statistics.median(v)) for how, v in times.items()]


def instrument(net, xp, totals, by_layer=False):
    """Wrap each layer's forward/backward to add its wall time into totals[(kind, direction)]
    (``by_layer``: one entry per layer, its kind followed by its name, e.g. 'ConvBlock encoder.0').

    A fused ConvBlock counts as one layer; its convolution's GEMM part is shown on its own too
    ('conv core'), as are the convolutions of the plain layers.
    """
    from scratchproto import fast, layers
    leaf_kinds = (layers.Conv2d, layers.BatchNorm2d, layers.ReLU, layers.MaxPool2d, layers.AvgPool2d,
                  layers.Flatten, layers.RepeatChannels, fast.ConvBlock)
    seen = set()
    for name, m in net.encoder.named_modules("encoder"):
        found = [m] + [v for v in vars(m).values() if isinstance(v, layers.Module)]
        for layer in found:
            if id(layer) in seen or not isinstance(layer, leaf_kinds):
                continue
            seen.add(id(layer))
            methods = ["forward", "backward"] + (["conv", "conv_backward"] if isinstance(layer, fast.FastConv2d) else [])
            for method in methods:
                orig = getattr(layer, method)
                kind = type(layer).__name__ + (" core" if method.startswith("conv") else "")
                kind += f" {name}" if by_layer else ""
                direction = "backward" if "backward" in method else "forward"

                def timed(*a, _orig=orig, _key=(kind, direction), **k):
                    backend.synchronize(xp)
                    t = time.perf_counter()
                    out = _orig(*a, **k)
                    backend.synchronize(xp)
                    totals[_key] += time.perf_counter() - t
                    return out
                setattr(layer, method, timed)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=sp.backbones.BACKBONES, default="convnet")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--width", type=int, default=64, help="ConvNet channels (the paper's is 64)")
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--episodes", type=int, default=10, help="timed episodes after 2 warm-up ones")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    p.add_argument("--in-a-row", action="store_true",
                   help="also time --episodes episodes back to back, with one wait at the end, read "
                        "at once against read one episode late as the trainer does (on a GPU, the "
                        "saving of not waiting for each loss; on a CPU the two are the same work)")
    p.add_argument("--by-layer", action="store_true", help="the breakdown per layer, not per kind of layer")
    p.add_argument("--tf32", action="store_true", help="on a GPU, TF32 tensor cores for float32 products")
    p.add_argument("--log2-chunk", type=int, metavar="N",
                   help="im2col chunks of 2**N floats (FastConv2d.CHUNK_FLOATS and GPU_CHUNK_FLOATS; "
                        "default: fast.py's, 2**20 on a CPU, 2**27 on a GPU)")
    p.add_argument("--limit-per-episode", action="store_true",
                   help="on a CPU, let each episode put BLAS on one thread and lift the limit after "
                        "it (what a loop of model.episode calls does by itself) instead of holding "
                        "the limit over the whole run as the trainer does over an epoch")
    p.add_argument("--no-winograd", action="store_true",
                   help="ResNet-18's convolutions all as im2col, none as Winograd's F(4x4, 3x3) (fast.py): "
                        "what Winograd saves, measured")
    p.add_argument("--data", help="an Omniglot folder (see run.py --data): also time drawing real "
                                  "episodes (the sampler and the copy to the device)")
    a = p.parse_args()

    xp = backend.get_xp(a.device, a.tf32 or None)
    # BLAS on one thread throughout, as the trainer holds it over an epoch (entering and leaving
    # it around each episode cost a ConvNet episode 10% with OpenBLAS's default thread timeout)
    with contextlib.nullcontext() if a.limit_per_episode else sp.fast.blas_one_thread(xp):
        measure(a, xp)


def measure(a, xp):
    """The timings and the breakdown that main() prints."""
    if a.log2_chunk is not None:
        sp.fast.FastConv2d.CHUNK_FLOATS = sp.fast.FastConv2d.GPU_CHUNK_FLOATS = 1 << a.log2_chunk
    if a.no_winograd:
        sp.fast.FastConv2d.WINOGRAD_MIN_CHANNELS = float("inf")
    net = sp.build_backbone(a.backbone, seed=0, xp=xp, width=a.width)
    model, opt = sp.ProtoNet(net), sp.Adam(net, lr=1e-3)
    xs, xq = fake_episode(xp, a.way, a.shot, a.query)
    times = []
    for i in range(a.episodes + 2):
        backend.synchronize(xp)
        t = time.perf_counter()
        model.episode(xs, xq, train=True)
        opt.step()
        backend.synchronize(xp)
        if i >= 2:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    n_img = a.way * (a.shot + a.query)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    mem = f"peak RSS {rss:.0f} MiB"
    if xp is not np:
        mem += f", device pool {xp.get_default_memory_pool().total_bytes() / 2**20:.0f} MiB"
    label = f" width {a.width}" if a.backbone == "convnet" and a.width != 64 else ""
    if a.log2_chunk is not None:
        label += f" chunk 2**{a.log2_chunk}"
    if a.tf32:
        label += " tf32"
    if a.no_winograd:
        label += " no-winograd"
    if xp is np:
        from scratchproto import fast
        label += f" threads {fast.THREADS} (BLAS on one thread{' per episode' if a.limit_per_episode else ''})"
    print(f"scratchproto {a.backbone}{label} {backend.device_name(xp)} {a.way}w{a.shot}s{a.query}q "
          f"numpy {np.__version__} python {platform.python_version()}: "
          f"sec/episode={med:.4f} (min {min(times):.4f}, {len(times)} runs) images/s={n_img / med:.0f} {mem}")
    if a.in_a_row:
        timed = in_a_row(model, opt, xs, xq, a.episodes, xp)
        print(f"{a.episodes} episodes in a row, median of 3: "
              + ", ".join(f"{how} {seconds:.4f} s/episode" for how, seconds in timed))
    if a.no_layers:
        return

    # one instrumented episode: per layer type, and the parts outside the backbone
    totals = collections.defaultdict(float)
    instrument(net, xp, totals, a.by_layer)
    t = time.perf_counter()
    z = net.forward(xp.concatenate([xs.reshape(-1, 1, 28, 28), xq.reshape(-1, 1, 28, 28)]))
    backend.synchronize(xp)
    totals[("(whole backbone)", "forward")] = time.perf_counter() - t
    t = time.perf_counter()
    _, _, dz = protonet_loss(z, a.way, a.shot, a.query)
    backend.synchronize(xp)
    totals[("ProtoNet loss", "forward+backward")] = time.perf_counter() - t
    t = time.perf_counter()
    emb = backend.to_host(z)
    for h in (emb[:a.way * a.shot], emb[a.way * a.shot:]):
        sp.collapse_metrics(h.reshape(a.way, -1, emb.shape[1]))
    totals[("NC metrics (support+query)", "")] = time.perf_counter() - t
    t = time.perf_counter()
    net.zero_grad()
    net.backward(dz, need_dx=False)
    backend.synchronize(xp)
    totals[("(whole backbone)", "backward")] = time.perf_counter() - t
    t = time.perf_counter()
    opt.step()
    backend.synchronize(xp)
    totals[("Adam step", "")] = time.perf_counter() - t
    if a.data:
        ds = sp.Omniglot(a.data, progress=False)
        gen = sp.episodes(ds, "train", a.way, a.shot, a.query, n=11, seed=0, device=xp)
        next(gen)
        t = time.perf_counter()
        for _ in range(10):
            next(gen)
        backend.synchronize(xp)
        totals[("episode sampling + copy", "")] = (time.perf_counter() - t) / 10
    print(f"{'part':<28}{'direction':<18}{'seconds':>9}{'share':>8}")
    total = sum(v for (k, d), v in totals.items() if k == "(whole backbone)") + sum(
        v for (k, d), v in totals.items()
        if k in ("ProtoNet loss", "NC metrics (support+query)", "Adam step", "episode sampling + copy"))
    for (kind, direction), v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<28}{direction:<18}{v:9.4f}{100 * v / total:7.1f}%")


if __name__ == "__main__":
    main()
