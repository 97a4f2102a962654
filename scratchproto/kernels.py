"""CUDA kernels for the fused BatchNorm of fast.py, each beside its NumPy twin.

On a GPU every array operation is a kernel launch (10-13 us of host time each), and BatchNorm
written with array operations is a dozen of them per layer and direction, plus einsum's
transposing copies. Each entry here does one such group in one kernel:

* ``channel_sum(x)`` / ``channel_dot(x, w)`` / ``channel_sq_dev(x, mu)``: per-channel sums over
  (N, H, W) of x, of x*w and of (x - mu)^2, accumulated in float64;
* ``bn_relu(y, mean, inv_std, gamma, beta, res)``: xhat = (y - mean) * inv_std (written over y)
  and out = relu(gamma * xhat + beta [+ res]);
* ``bn_backward(d, xhat, a, cb, cg)``: dx = a * (d - cb - xhat * cg), BatchNorm's input gradient
  (lesson 3) with the per-channel constants a = gamma / sigma, cb = sum(d) / m, cg = sum(d xhat) / m.

Every function takes the array module first. Its twin (``*_twin``) is the reference: plain array
operations, written once against ``xp``, the formula in its docstring; tests hold the kernels
against the twins on a GPU, and the twins against the library's BatchNorm everywhere. The CUDA is
compiled on first use through CuPy, so the CPU path never imports cupy.

The kernels are an opt-in, ``SCRATCHPROTO_KERNELS=1``, until their tests have passed on a GPU;
without it (and always on NumPy) the twins run.
"""
import os

import numpy as np

ENV = "SCRATCHPROTO_KERNELS"


def enabled(xp):
    """Whether the CUDA kernels run: on CuPy, with SCRATCHPROTO_KERNELS=1."""
    return xp is not np and os.environ.get(ENV) == "1"


# -- the CUDA, as CuPy's kernel specifications (also syntax-checked on the CPU: tests) -----------

ELEMENTWISE = {
    "bn_relu": (
        "T y, T mean, T inv_std, T gamma, T beta, T res", "T xhat, T out",
        """
        T h = (y - mean) * inv_std;
        xhat = h;
        T o = gamma * h + beta + res;
        out = o > (T)0 ? o : (T)0;
        """),
    "bn_backward": (
        "T d, T xhat, T a, T cb, T cg", "T dx",
        """
        dx = a * (d - cb - xhat * cg);
        """),
}

# name: (inputs, output, map expression, reduce expression, post-map, identity)
REDUCTIONS = {
    "channel_sum": ("T x", "float64 s", "(double)x", "a + b", "s = a", "0"),
    "channel_dot": ("T x, T w", "float64 s", "(double)x * (double)w", "a + b", "s = a", "0"),
    "channel_sq_dev": ("T x, T mu", "float64 s", "((double)x - (double)mu) * ((double)x - (double)mu)",
                       "a + b", "s = a", "0"),
}

_compiled = {}


def _kernel(name):
    """The CuPy kernel ``name``, compiled on first use."""
    if name not in _compiled:
        import cupy
        if name in ELEMENTWISE:
            ins, outs, body = ELEMENTWISE[name]
            _compiled[name] = cupy.ElementwiseKernel(ins, outs, body, f"scratchproto_{name}")
        else:
            ins, out, mapped, reduce, post, identity = REDUCTIONS[name]
            _compiled[name] = cupy.ReductionKernel(ins, out, mapped, reduce, post, identity,
                                                   f"scratchproto_{name}")
    return _compiled[name]


def _channels_last_2d(x):
    """(..., C) -> (M, C): the reductions run over the rows."""
    return x.reshape(-1, x.shape[-1])


# -- the twins (references) and the dispatchers ---------------------------------------------------

def channel_sum_twin(xp, x):
    """sum over all but the last axis of x, in float64, cast back to x's dtype: (C,)."""
    return _channels_last_2d(x).sum(axis=0, dtype=np.float64).astype(x.dtype)


def channel_dot_twin(xp, x, w):
    """sum over all but the last axis of x * w, in float64: (C,)."""
    x2, w2 = _channels_last_2d(x), _channels_last_2d(w)
    return xp.einsum("mc,mc->c", x2.astype(np.float64), w2.astype(np.float64)).astype(x.dtype)


def channel_sq_dev_twin(xp, x, mu):
    """sum over all but the last axis of (x - mu)^2, mu (C,), in float64: (C,)."""
    dev = _channels_last_2d(x).astype(np.float64) - mu.astype(np.float64)
    return (dev * dev).sum(axis=0).astype(x.dtype)


def bn_relu_twin(xp, y, mean, inv_std, gamma, beta, res=None):
    """xhat = (y - mean) * inv_std, written over y; out = max(gamma * xhat + beta [+ res], 0).
    Per-channel vectors (C,) broadcast over y (..., C). Returns (xhat, out)."""
    xp.subtract(y, mean, out=y)
    y *= inv_std
    out = y * gamma
    out += beta
    if res is not None:
        out += res
    xp.maximum(out, 0, out=out)
    return y, out


def bn_backward_twin(xp, d, xhat, a, cb, cg):
    """dx = a * (d - cb - xhat * cg), per-channel a, cb, cg (C,)."""
    return a * (d - cb - xhat * cg)


def channel_sum(xp, x):
    if not enabled(xp):
        return channel_sum_twin(xp, x)
    return _kernel("channel_sum")(_channels_last_2d(x), axis=0).astype(x.dtype)


def channel_dot(xp, x, w):
    if not enabled(xp):
        return channel_dot_twin(xp, x, w)
    return _kernel("channel_dot")(_channels_last_2d(x), _channels_last_2d(w), axis=0).astype(x.dtype)


def channel_sq_dev(xp, x, mu):
    if not enabled(xp):
        return channel_sq_dev_twin(xp, x, mu)
    return _kernel("channel_sq_dev")(_channels_last_2d(x), mu, axis=0).astype(x.dtype)


def bn_relu(xp, y, mean, inv_std, gamma, beta, res=None):
    if not enabled(xp):
        return bn_relu_twin(xp, y, mean, inv_std, gamma, beta, res)
    out = xp.empty_like(y)
    _kernel("bn_relu")(y, mean, inv_std, gamma, beta, res if res is not None else y.dtype.type(0), y, out)
    return y, out


def bn_backward(xp, d, xhat, a, cb, cg):
    if not enabled(xp):
        return bn_backward_twin(xp, d, xhat, a, cb, cg)
    return _kernel("bn_backward")(d, xhat, a, cb, cg)
