"""Before a GPU trains: the same small work on the GPU and on NumPy, in float64, compared.

The GPU path is CuPy running the code the CPU runs, plus the CUDA kernels of kernels.py. Both are
tested on a GPU (tests/, benchmarks/gpu_check.sh), but a user's GPU, driver or CuPy may be one
nobody tested. Training on wrong numbers would cost hours and show only as a strange curve, so
the first time a process is given CuPy, ``check(xp)`` runs

* a ProtoNet training episode of a narrow ConvNet (its fused ConvBlocks, the loss, the NC
  metrics' summaries), and
* ResNet-18's layer kinds (stem, basic blocks, a projection shortcut, pooling), narrow, forward
  and backward over four small images,

once on ``xp`` and once on NumPy, in float64, and compares every loss, output and gradient. It
takes about a second. When the two disagree, or the GPU side raises, and the kernels were on, it
tries again on their twins (``SCRATCHPROTO_KERNELS=0``) and, if that agrees, says so on one line
and goes on without the kernels; otherwise the run stops with one line naming the part that
failed. ``SCRATCHPROTO_SELFCHECK=0`` skips it.
"""
import os
import sys
import weakref

import numpy as np

from . import backend, kernels
from .backbones import build_backbone
from .errors import UserError
from .protonet import ProtoNet

# float64 on both sides: sums in another order agree to about 1e-12 of the largest term; a wrong
# kernel or a wrong library call is off by far more (the test's planted error, 1e-6, is caught)
RTOL = 1e-8

_passed = weakref.WeakSet()        # the array modules checked in this process
ENV = "SCRATCHPROTO_SELFCHECK"     # '0' skips the check (a second's saving; not advised)


def convnet_episode(xp):
    """{quantity: host array} of one 3-way 2-shot 2-query training episode of a width-8 ConvNet."""
    net = build_backbone("convnet", seed=0, width=8, xp=xp, dtype=np.float64)
    rng = np.random.default_rng(0)
    xs = (rng.random((3, 2, 1, 28, 28)) > 0.8).astype(np.float64)
    xq = (rng.random((3, 2, 1, 28, 28)) > 0.8).astype(np.float64)
    res = ProtoNet(net).episode(xp.asarray(xs), xp.asarray(xq), train=True)
    out = {"loss": np.asarray(res["loss"]), "embeddings": backend.to_host(res["embeddings"]).copy(),
           "nc1 (support)": np.asarray(res["nc1_support"]), "nc2 (query)": np.asarray(res["nc2_query"])}
    out.update({f"gradient of {name}": g for name, g in net.grads().items()})
    return out


def resnet_blocks(xp):
    """{quantity: host array}: output, input gradient and parameter gradients, in training mode, of
    ResNet-18's layer kinds at a small size (stem, a basic block, a stride-2 block with its
    projection shortcut, average pooling) over four 8x8 images: the full network in float64 would
    take seconds on the NumPy side."""
    from .fast import FastBasicBlock, FastBatchNorm2d, FastConv2d
    from .layers import AvgPool2d, Flatten, ReLU, RepeatChannels, Sequential
    rng = np.random.default_rng(1)
    kw = dict(xp=xp, dtype=np.float64)
    net = Sequential(RepeatChannels(3, **kw), FastConv2d(3, 8, 3, 1, 1, bias=False, rng=rng, **kw),
                     FastBatchNorm2d(8, **kw), ReLU(**kw), FastBasicBlock(8, 8, 1, rng, **kw),
                     FastBasicBlock(8, 16, 2, rng, **kw), AvgPool2d(4, **kw), Flatten(**kw), **kw)
    x = rng.random((4, 8, 8, 1))                 # channels-last, as the encoder sees images
    z = net.forward(xp.asarray(x), True)
    dx = net.backward(xp.asarray(rng.standard_normal(z.shape)))
    out = {"output": backend.to_host(z).copy(), "input gradient": backend.to_host(dx).copy()}
    for name, module in net.named_modules():
        out.update({f"gradient of {name}.{k}": backend.to_host(g).copy() for k, g in module.grads.items()})
    return out


PARTS = (("the ConvNet's training episode", convnet_episode), ("ResNet-18's blocks", resnet_blocks))


def first_difference(xp, parts=PARTS, references=None):
    """None when every part agrees on ``xp`` and on NumPy, else one line naming the first part and
    quantity that differ, or what the ``xp`` side raised. ``references``: a dict that keeps the
    NumPy side of each part computed, for a second call (the retry without the kernels)."""
    references = {} if references is None else references
    for part, run in parts:
        if part not in references:
            references[part] = run(np)
        want = references[part]
        try:
            got = run(xp)
        except Exception as e:       # whatever the GPU side raises is the finding
            return f"{part} raised on the GPU: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # a quantity that is zero in exact arithmetic (a convolution's bias before BatchNorm has no
        # gradient) is rounding noise on both sides: it is held to a ten-thousandth of the part's
        # largest value rather than to its own
        floor = 1e-4 * max(float(np.abs(w).max()) for w in want.values())
        for name, w in want.items():
            g = got[name]
            scale = max(float(np.abs(w).max()), floor, np.finfo(np.float64).tiny)
            err = float(np.abs(g - w).max()) / scale if g.shape == w.shape else np.inf
            if not err <= RTOL:       # (NaN fails too)
                return (f"{part}: the {name} differs from NumPy's by {err:.1e} of its largest "
                        f"value (at most {RTOL:.0e} expected in float64)")
    return None


def check(xp, parts=PARTS, log=lambda line: print(line, file=sys.stderr)):
    """Once per process and array module: raise UserError if ``xp`` computes other numbers than
    NumPy (module docstring); with the kernels on, fall back to their twins where those agree.
    A no-op on NumPy."""
    if xp is np or xp in _passed or os.environ.get(ENV) == "0":
        return
    references = {}
    problem = first_difference(xp, parts, references)
    if problem is not None and kernels.enabled(xp):
        before = os.environ.get(kernels.ENV)
        os.environ[kernels.ENV] = "0"
        if first_difference(xp, parts, references) is None:
            log(f"warning: GPU self-check: with the CUDA kernels, {problem}; without them it agrees, "
                f"so this process runs without them ({kernels.ENV}=0)")
            problem = None
        elif before is None:
            del os.environ[kernels.ENV]
        else:
            os.environ[kernels.ENV] = before
    if problem is not None:
        raise UserError(f"GPU self-check failed: {problem}. Nothing was trained; run on the CPU with "
                        f"--device cpu, and please report the GPU, driver and CuPy version")
    _passed.add(xp)


def get_xp(device, tf32=None):
    """backend.get_xp, with the array module checked (check) before it is handed out: what the
    trainer and the evaluations use."""
    xp = backend.get_xp(device, tf32)
    check(xp)
    return xp
