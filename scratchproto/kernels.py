"""CUDA kernels for the fused BatchNorm of fast.py, each beside its NumPy twin.

On a GPU every array operation is a kernel launch (10-13 us of host time each), and BatchNorm
written with array operations is a dozen of them per layer and direction, plus einsum's
transposing copies. Each entry here does one such group in one kernel:

* ``channel_sum(x)`` / ``channel_dot(x, w)`` / ``channel_sq_dev(x, mu)``: per-channel sums over
  (N, H, W) of x, of x*w and of (x - mu)^2, accumulated in float64;
* ``bn_relu(y, mean, inv_std, gamma, beta, res)``: xhat = (y - mean) * inv_std (written over y)
  and out = relu(gamma * xhat + beta [+ res]);
* ``bn_backward(d, xhat, a, cb, cg)``: dx = a * (d - cb - xhat * cg), BatchNorm's input gradient
  (lesson 3) with the per-channel constants a = gamma / sigma, cb = sum(d) / m, cg = sum(d xhat) / m;
* ``pool_bn_relu(y, scale, shift)``: the ConvNet block's forward after its convolution (fast.py's
  ConvBlock): 2x2 max-pooling with the index of the first maximum, then relu(scale * max + shift);
* ``relu_sums(dout, out, pooled, mean, s)``: its BatchNorm gradients through the ReLU, per channel
  sum(dz) and sum(dz * (pooled - mean) * s) with dz = dout where out > 0 (two reductions);
* ``conv_block_dy(y, dy_per_y, dy_const, a, dout, out, winner)``: its backward to the
  convolution's output, dy = dy_per_y * y + dy_const everywhere, plus a * dout at each window's
  winner where the ReLU let it through;
* ``running_stats(bn, mean, var, m)``: BatchNorm's running statistics moved towards a batch's;
* ``block_constants(...)`` / ``block_backward_constants(...)``: the block's per-channel constants,
  forward (1/sigma, scale, shift) and backward (the coefficients of dy), a dozen tiny operations
  each, which on a GPU are as many launches;
* ``adam(p, g, m, v, ...)``: Adam's step over the flat parameter arrays (optim.py), in place.

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
    # over the pooled output (N, Ho, Wo, C); y (N, H, W, C) is read raw, 4 values per window
    "pool_bn_relu": (
        "raw T y, T scale, T shift, int32 H, int32 W, int32 Ho, int32 Wo, int32 C",
        "T pooled, T out, uint8 winner",
        """
        int c = i % C;
        int wo = (i / C) % Wo;
        int ho = (i / (C * Wo)) % Ho;
        int n = i / (C * Wo * Ho);
        long long base = (((long long)n * H + 2 * ho) * W + 2 * wo) * C + c;
        long long offsets[4] = {0, C, (long long)W * C, (long long)W * C + C};
        T best = y[base];
        unsigned char arg = 0;
        for (int q = 1; q < 4; ++q) {
            T v = y[base + offsets[q]];
            if (v > best) { best = v; arg = q; }   /* strictly greater: ties go to the first */
        }
        pooled = best;
        winner = arg;
        T o = scale * best + shift;
        out = o > (T)0 ? o : (T)0;
        """),
    # over the convolution's output (N, H, W, C); the pooled arrays are read raw
    "conv_block_dy": (
        "T y, T dy_per_y, T dy_const, raw T a, raw T dout, raw T out, raw uint8 winner, int32 H, int32 W, int32 Ho, int32 Wo, int32 C",
        "T dy",
        """
        int c = i % C;
        int w = (i / C) % W;
        int h = (i / (C * W)) % H;
        int n = i / (C * W * H);
        T g = dy_per_y * y + dy_const;
        if (h < 2 * Ho && w < 2 * Wo) {
            long long j = (((long long)n * Ho + h / 2) * Wo + w / 2) * C + c;
            if (winner[j] == (h % 2) * 2 + (w % 2) && out[j] > (T)0) g += a[c] * dout[j];
        }
        dy = g;
        """),
    # per channel: the running statistics updated in place (read and written)
    "running_stats": (
        "T mean, T var, T mom, T unbias", "T running_mean, T running_var",
        """
        running_mean = running_mean * ((T)1 - mom) + mom * mean;
        running_var = running_var * ((T)1 - mom) + mom * var * unbias;
        """),
    "block_constants": (
        "T gamma, T beta, T sign, T mean, T var, T eps", "T inv_std, T scale, T shift",
        """
        T s = (T)1 / sqrt(var + eps);
        inv_std = s;
        scale = gamma * sign * s;
        shift = beta - mean * scale;
        """),
    "block_backward_constants": (
        "T gamma, T inv_std, T sign, T mean, T dgamma, T dbeta, T m, int32 train",
        "T a, T dy_per_y, T dy_const, T bias_grad",
        """
        T g = gamma * inv_std;
        T coef_xhat = train ? -g * dgamma / m : (T)0;
        T coef_one = train ? -g * dbeta / m : (T)0;
        a = g;
        dy_per_y = coef_xhat * sign * inv_std;
        dy_const = coef_one - dy_per_y * mean;
        bias_grad = g * dbeta + m * coef_one;
        """),
    # Adam (optim.py) on the flat arrays: p, m and v read and written
    "adam": (
        "T g, T b1, T one_minus_b1, T b2, T one_minus_b2, T step_size, T sqrt_bc2, T eps, T weight_decay",
        "T p, T m, T v",
        """
        T grad = g + weight_decay * p;
        m = b1 * m + one_minus_b1 * grad;
        v = b2 * v + one_minus_b2 * grad * grad;
        p = p - step_size * m / (sqrt(v) / sqrt_bc2 + eps);
        """),
}

# name: (inputs, output, map expression, reduce expression, post-map, identity); the sums are
# accumulated in double precision (REDUCE_TYPE) and written in the inputs' type, in the one launch
REDUCE_TYPE = "double"   # a C type: CuPy writes it into the kernel's source
REDUCTIONS = {
    "channel_sum": ("T x", "T s", "(double)x", "a + b", "s = (T)a", "0"),
    "channel_dot": ("T x, T w", "T s", "(double)x * (double)w", "a + b", "s = (T)a", "0"),
    "channel_sq_dev": ("T x, T mu", "T s", "((double)x - (double)mu) * ((double)x - (double)mu)",
                       "a + b", "s = (T)a", "0"),
    "relu_sum": ("T d, T out", "T s", "out > (T)0 ? (double)d : 0.0", "a + b", "s = (T)a", "0"),
    "relu_dot_centered": ("T d, T out, T x, T mu, T scale", "T s",
                          "out > (T)0 ? (double)d * (((double)x - (double)mu) * (double)scale) : 0.0",
                          "a + b", "s = (T)a", "0"),
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
                                                   f"scratchproto_{name}", reduce_type=REDUCE_TYPE)
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


def _window_positions(y):
    """The four 2x2-window positions of y (N, H, W, C), row-major, as views (N, H//2, W//2, C)."""
    ho, wo = y.shape[1] // 2, y.shape[2] // 2
    return [y[:, i:2 * ho:2, j:2 * wo:2] for i in range(2) for j in range(2)]


def pool_bn_relu_twin(xp, y, scale, shift):
    """pooled = max over each 2x2 window of y (N, H, W, C), floor mode; winner = the window
    position (0..3, row-major) of its first maximum; out = max(scale * pooled + shift, 0).
    Returns (pooled, out, winner uint8)."""
    views = _window_positions(y)
    pooled = views[0].copy()
    winner = xp.zeros(pooled.shape, dtype=np.uint8)
    for q in range(1, 4):
        better = views[q] > pooled             # strictly: ties stay with the first
        winner[better] = q
        xp.maximum(pooled, views[q], out=pooled)
    out = xp.maximum(pooled * scale + shift, 0)
    return pooled, out, winner


def relu_sums_twin(xp, dout, out, pooled, mean, s):
    """With dz = dout where out > 0 (the ReLU's gradient; all (N, H, W, C)): per channel
    (sum of dz, sum of dz * (pooled - mean) * s), in float64. Returns (dbeta, dgamma)."""
    dz = dout * (out > 0)
    return channel_sum_twin(xp, dz), channel_dot_twin(xp, dz, (pooled - mean) * s)


def conv_block_dy_twin(xp, y, dy_per_y, dy_const, a, dout, out, winner):
    """dy = dy_per_y * y + dy_const over y (N, H, W, C), plus a * dout (dout, out: N, H//2, W//2, C)
    at each window's winner where out > 0 (rows and columns that floor mode drops get only the
    first two terms)."""
    a_dz = a * dout * (out > 0)
    dy = y * dy_per_y + dy_const
    for q, view in enumerate(_window_positions(dy)):
        view += xp.where(winner == q, a_dz, 0)
    return dy


def running_stats_twin(xp, bn, mean, var, m):
    """BatchNorm2d.update_running: running = (1 - momentum) * running + momentum * batch, the
    variance unbiased by m / (m - 1), and num_batches_tracked + 1."""
    bn.update_running(mean, var, m)


def block_constants_twin(xp, gamma, beta, sign, mean, var, eps):
    """The ConvBlock's forward constants per channel (C,): inv_std = 1 / sqrt(var + eps),
    scale = gamma * sign * inv_std (= |gamma| / sigma) and shift = beta - mean * scale.
    Returns (inv_std, scale, shift)."""
    inv_std = 1.0 / xp.sqrt(var + eps)
    scale = gamma * sign * inv_std
    return inv_std, scale, beta - mean * scale


def block_backward_constants_twin(xp, gamma, inv_std, sign, mean, dgamma, dbeta, m, train):
    """The ConvBlock's backward constants per channel (C,): a = gamma * inv_std; in training
    coef_xhat = -a dgamma / m and coef_one = -a dbeta / m (0 in evaluation, where the statistics
    are constants); dy_per_y = coef_xhat * sign * inv_std, dy_const = coef_one - dy_per_y * mean,
    and the gradient of a bias before BatchNorm, a dbeta + m coef_one.
    Returns (a, dy_per_y, dy_const, bias_grad)."""
    a = gamma * inv_std
    coef_xhat = -a * dgamma / m if train else xp.zeros_like(a)
    coef_one = -a * dbeta / m if train else xp.zeros_like(a)
    dy_per_y = coef_xhat * sign * inv_std
    dy_const = coef_one - dy_per_y * mean
    return a, dy_per_y, dy_const, a * dbeta + m * coef_one


def adam_twin(xp, opt, p, g, m, v, step_size, sqrt_bc2):
    """Adam's step in place on p, m, v: optim.Adam._update (its docstring has the formula)."""
    opt._update(p, g, m, v, step_size, sqrt_bc2)


def channel_sum(xp, x):
    if not enabled(xp):
        return channel_sum_twin(xp, x)
    return _kernel("channel_sum")(_channels_last_2d(x), axis=0)


def channel_dot(xp, x, w):
    if not enabled(xp):
        return channel_dot_twin(xp, x, w)
    return _kernel("channel_dot")(_channels_last_2d(x), _channels_last_2d(w), axis=0)


def channel_sq_dev(xp, x, mu):
    if not enabled(xp):
        return channel_sq_dev_twin(xp, x, mu)
    return _kernel("channel_sq_dev")(_channels_last_2d(x), mu, axis=0)


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


def pool_bn_relu(xp, y, scale, shift):
    if not enabled(xp):
        return pool_bn_relu_twin(xp, y, scale, shift)
    n, h, w, c = y.shape
    shape = (n, h // 2, w // 2, c)
    pooled, out, winner = xp.empty(shape, y.dtype), xp.empty(shape, y.dtype), xp.empty(shape, np.uint8)
    _kernel("pool_bn_relu")(xp.ascontiguousarray(y), scale, shift, h, w, h // 2, w // 2, c, pooled, out, winner)
    return pooled, out, winner


def relu_sums(xp, dout, out, pooled, mean, s):
    if not enabled(xp):
        return relu_sums_twin(xp, dout, out, pooled, mean, s)
    d2, o2 = _channels_last_2d(dout), _channels_last_2d(out)
    return (_kernel("relu_sum")(d2, o2, axis=0),
            _kernel("relu_dot_centered")(d2, o2, _channels_last_2d(pooled), mean, s, axis=0))


def conv_block_dy(xp, y, dy_per_y, dy_const, a, dout, out, winner):
    if not enabled(xp):
        return conv_block_dy_twin(xp, y, dy_per_y, dy_const, a, dout, out, winner)
    n, h, w, c = y.shape
    return _kernel("conv_block_dy")(y, dy_per_y, dy_const, a, xp.ascontiguousarray(dout),
                                    xp.ascontiguousarray(out), winner, h, w, h // 2, w // 2, c)


def running_stats(xp, bn, mean, var, m):
    if not enabled(xp):
        return running_stats_twin(xp, bn, mean, var, m)
    b, mom = bn.buffers, bn.momentum
    _kernel("running_stats")(mean, var, mom, m / max(m - 1, 1), b["running_mean"], b["running_var"])
    b["num_batches_tracked"] += 1


def block_constants(xp, gamma, beta, sign, mean, var, eps):
    if not enabled(xp):
        return block_constants_twin(xp, gamma, beta, sign, mean, var, eps)
    return _kernel("block_constants")(gamma, beta, sign, mean, var, eps)


def block_backward_constants(xp, gamma, inv_std, sign, mean, dgamma, dbeta, m, train):
    if not enabled(xp):
        return block_backward_constants_twin(xp, gamma, inv_std, sign, mean, dgamma, dbeta, m, train)
    return _kernel("block_backward_constants")(gamma, inv_std, sign, mean, dgamma, dbeta, m, int(train))


def adam(xp, opt, p, g, m, v, step_size, sqrt_bc2):
    if not enabled(xp):
        return adam_twin(xp, opt, p, g, m, v, step_size, sqrt_bc2)
    b1, b2 = opt.betas
    _kernel("adam")(g, b1, 1 - b1, b2, 1 - b2, step_size, sqrt_bc2, opt.eps, opt.weight_decay, p, m, v)


class NumpyStandIn:
    """Stands in for the compiled kernel ``name`` on NumPy, with its calling convention (an
    elementwise kernel takes its outputs as trailing arguments or returns new ones; a reduction
    takes axis=), by running its twin: so that the kernel path's plumbing runs on any machine
    (tests/test_kernels.py; benchmarks/launches.py counts each call as one launch)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, axis=None):
        name, xp = self.name, np
        if name == "bn_relu":
            y, mean, inv_std, gamma, beta, res, xhat_out, out = args
            h = (y - mean) * inv_std
            xhat_out[...] = h
            out[...] = np.maximum(gamma * h + beta + res, 0)
            return xhat_out, out
        if name == "bn_backward":
            return bn_backward_twin(xp, *args)
        if name == "pool_bn_relu":
            y, scale, shift, h, w, ho, wo, c, *outs = args
            assert y.shape == (y.shape[0], h, w, c) and outs[0].shape == (y.shape[0], ho, wo, c)
            for dest, value in zip(outs, pool_bn_relu_twin(xp, y, scale, shift)):
                dest[...] = value
            return outs
        if name == "conv_block_dy":
            y, dy_per_y, dy_const, a, dout, out, winner, h, w, ho, wo, c = args
            assert winner.dtype == np.uint8 and dout.shape == out.shape == (y.shape[0], ho, wo, c)
            return conv_block_dy_twin(xp, y, dy_per_y, dy_const, a, dout, out, winner)
        if name == "running_stats":
            mean, var, mom, unbias, running_mean, running_var = args
            running_mean *= 1 - mom
            running_mean += mom * mean
            running_var *= 1 - mom
            running_var += mom * var * unbias
            return running_mean, running_var
        if name == "block_constants":
            return block_constants_twin(xp, *args)
        if name == "adam":
            from .optim import adam_update       # (optim imports this module)
            g, b1, _, b2, _, step_size, sqrt_bc2, eps, weight_decay, p, m, v = args
            adam_update(xp, p, g, m, v, (b1, b2), eps, weight_decay, step_size, sqrt_bc2)
            return p, m, v
        if name == "block_backward_constants":
            *rest, train = args
            return block_backward_constants_twin(xp, *rest, bool(train))
        assert axis == 0
        x = args[0].astype(np.float64)
        if name == "channel_sum":
            s = x.sum(axis=0)
        elif name == "channel_dot":
            s = (x * args[1]).sum(axis=0)
        elif name == "relu_sum":
            s = (x * (args[1] > 0)).sum(axis=0)
        elif name == "relu_dot_centered":
            d, out, pooled, mu, scale = args
            s = (x * (out > 0) * ((pooled.astype(np.float64) - mu) * scale)).sum(axis=0)
        else:
            s = ((x - args[1]) ** 2).sum(axis=0)
        return s.astype(args[0].dtype)
