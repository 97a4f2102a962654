#!/usr/bin/env python
"""Count the array operations of one training episode: on a GPU, each is a kernel launch.

  python benchmarks/launches.py --backbone convnet --way 60
  python benchmarks/launches.py --backbone resnet18 --way 20 --kernels     # with the CUDA kernels' stand-ins

Runs one training episode (forward, ProtoNet loss, NC metrics, backward, Adam step) on NumPy
arrays that count what is done to them: every ufunc call (arithmetic, comparisons, reductions,
matmul), every NumPy function (einsum, concatenate, ...), every write through an index
(``a[...] = b``: a copy kernel) and every array made by the array module (but not an asarray or
ascontiguousarray that returns its device input unchanged, as CuPy does without a kernel). ``--kernels`` runs
kernels.py's path, each kernel replaced by its NumPy twin counted as one operation, which is what
the GPU launches by default (without ``--kernels``: what it launches with SCRATCHPROTO_KERNELS=0).
Views (reshape, slicing, transpose) are free and not counted (a reshape that has to copy is).
The budget (tests/test_launches.py): at most 150 operations for the ConvNet, 530 for ResNet-18.
"""
import argparse
import collections
import pathlib
import sys
import types

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import scratchproto as sp  # noqa: E402
from scratchproto import kernels  # noqa: E402

COUNTS = collections.Counter()
_active = [True]


class Counted(np.ndarray):
    """An ndarray that counts the operations done to it."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if _active[0]:
            COUNTS[f"ufunc {ufunc.__name__}{'' if method == '__call__' else '.' + method}"] += 1
        inputs = [i.view(np.ndarray) if isinstance(i, Counted) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Counted) else o for o in kwargs["out"])
        _active[0] = False
        try:
            result = getattr(ufunc, method)(*inputs, **kwargs)
        finally:
            _active[0] = True
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        counted = _active[0] and func.__name__ not in FREE
        if counted:
            COUNTS[f"function {func.__name__}"] += 1
        _active[0] = False
        try:
            result = func(*_unwrap(args), **_unwrap(kwargs))
        finally:
            _active[0] = True
        return _wrap(result)

    def __setitem__(self, index, value):
        if _active[0]:
            COUNTS["copy (a[...] = b)"] += 1
        np.ndarray.__setitem__(self.view(np.ndarray), index, value.view(np.ndarray) if isinstance(value, Counted) else value)

    def astype(self, dtype, *a, **k):
        if _active[0] and np.dtype(dtype) != self.dtype:
            COUNTS["astype"] += 1
        return _wrap(np.ndarray.astype(self.view(np.ndarray), dtype, *a, **k))

    def copy(self, *a, **k):
        if _active[0]:
            COUNTS["copy()"] += 1
        return _wrap(np.ndarray.copy(self.view(np.ndarray), *a, **k))

    def reshape(self, *a, **k):      # free when it makes a view, a copy kernel when it cannot
        plain = self.view(np.ndarray)
        result = np.ndarray.reshape(plain, *a, **k)
        if _active[0] and result.size and not np.shares_memory(result, plain):
            COUNTS["copy (reshape)"] += 1
        return _wrap(result)

    def argmax(self, *a, **k):       # (a reduction that is not a ufunc's)
        if _active[0]:
            COUNTS["argmax"] += 1
        return _wrap(np.ndarray.argmax(self.view(np.ndarray), *a, **k))


# functions that only make views or read shapes: free on a GPU too
FREE = {"reshape", "transpose", "shape", "ndim", "broadcast_to", "as_strided", "ravel", "squeeze",
        "expand_dims", "result_type", "can_cast", "iterable", "size", "diagonal"}


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, Counted):
        return x.view(Counted)
    if isinstance(x, tuple):
        return tuple(_wrap(i) for i in x)
    return x


def _unwrap(x):
    if isinstance(x, Counted):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(i) for i in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _unchanged(name, source, result):
    """Whether asarray / ascontiguousarray handed back a device array as it was (CuPy returns
    the array itself then: no kernel). An asarray of a host array is a transfer, and counts."""
    return (name in ("asarray", "ascontiguousarray") and isinstance(source, Counted)
            and np.shares_memory(source.view(np.ndarray), result))


def counting_module():
    """NumPy, with every array it makes a Counted (creating one counts, as a GPU allocation plus a
    fill would, except np.empty)."""
    mod = types.ModuleType("numpy_counting")
    mod.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    mod.__name__ = "numpy_counting"

    def make(name, counted):
        real = getattr(np, name)

        def f(*a, **k):
            result = real(*_unwrap(a), **_unwrap(k))
            if counted and _active[0] and not _unchanged(name, a[0] if a else None, result):
                COUNTS[f"make {name}"] += 1
            return _wrap(result)
        return f
    for name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "asarray", "array",
                 "ascontiguousarray", "arange", "eye"):
        setattr(mod, name, make(name, True))
    for name in ("empty", "empty_like"):
        setattr(mod, name, make(name, False))
    lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
        as_strided=lambda x, **k: _wrap(np.lib.stride_tricks.as_strided(x.view(np.ndarray), **k))))
    mod.lib = lib
    mod.linalg = np.linalg
    return mod


class StandInKernels(kernels.NumpyStandIn):
    """kernels.NumpyStandIn (the twin, with the kernel's calling convention), counted as one launch."""

    def __call__(self, *args, axis=None):
        COUNTS[f"kernel {self.name}"] += 1
        _active[0] = False
        try:
            return _wrap(super().__call__(*_unwrap(args), axis=axis))
        finally:
            _active[0] = True


def count_episode(backbone, way, shot, query, use_kernels, warm_up=True):
    """The Counter of one training episode's operations, after a warm-up episode (``warm_up``;
    without it, the first episode's, which also makes the workspaces and Adam's state: an upper
    bound, at half the time). The library's hooks it patches (backend.xp_of, to_host and
    to_host_later, kernels.enabled and _kernel) are restored after."""
    xp = counting_module()
    saved = (sp.backend.xp_of, sp.backend.to_host, sp.backend.to_host_later, kernels.enabled, kernels._kernel)
    real_xp_of, real_to_host, real_to_host_later = saved[:3]

    def copy(real):                # a copy from the GPU: one operation
        def counted(a):
            if isinstance(a, Counted) and _active[0]:
                COUNTS["copy to host"] += 1
            return real(_unwrap(a))
        return counted
    # the code that finds its array module from an array (the loss, the NC metrics) finds this one
    sp.backend.xp_of = lambda a: xp if isinstance(a, Counted) else real_xp_of(a)
    sp.backend.to_host, sp.backend.to_host_later = copy(real_to_host), copy(real_to_host_later)
    # the kernel path or the twins, whatever SCRATCHPROTO_KERNELS says
    kernels.enabled = (lambda x: x is xp) if use_kernels else (lambda x: False)
    if use_kernels:
        kernels._kernel = StandInKernels
    try:
        net = sp.build_backbone(backbone, seed=0, xp=xp)
        model, opt = sp.ProtoNet(net), sp.Adam(net)
        rng = np.random.default_rng(0)
        xs = (rng.random((way, shot, 1, 28, 28)) > 0.85).astype(np.float32)
        xq = (rng.random((way, query, 1, 28, 28)) > 0.85).astype(np.float32)
        for _ in range(2 if warm_up else 1):
            COUNTS.clear()
            model.episode(xs, xq, train=True)
            opt.step()
    finally:
        (sp.backend.xp_of, sp.backend.to_host, sp.backend.to_host_later, kernels.enabled,
         kernels._kernel) = saved
    return collections.Counter(COUNTS)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet", choices=("convnet", "resnet18"))
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--kernels", action="store_true", help="kernels.py's path, each kernel counted once")
    p.add_argument("--top", type=int, default=15, help="how many kinds of operation to list")
    a = p.parse_args()
    counts = count_episode(a.backbone, a.way, a.shot, a.query, a.kernels)
    print(f"{a.backbone} {a.way}-way {a.shot}-shot {a.query}-query training episode, "
          f"{'kernels (stand-ins)' if a.kernels else 'no kernels'}: {sum(counts.values())} array operations")
    for kind, n in counts.most_common(a.top):
        print(f"  {n:6d}  {kind}")


if __name__ == "__main__":
    main()
