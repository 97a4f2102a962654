"""CUDA kernels for the fused BatchNorm of fast.py, each beside its NumPy twin.

On a GPU every array operation is a kernel launch (10-13 us of host time each), and BatchNorm
written with array operations is a dozen of them per layer and direction, plus einsum's
transposing copies. Each entry here does one such group in one kernel:

* ``channel_sum(x, scale)`` / ``channel_dot(x, w)`` / ``channel_sq_dev(x, mu, scale)``: per-channel
  sums over (N, H, W) of x, of x*w and of (x - mu)^2, accumulated in float64 (times ``scale``:
  1/m makes them BatchNorm's mean and variance), each in two launches: per image, then the total;
* ``bn_relu(y, mean, inv_std, gamma, beta, res, relu)``: xhat = (y - mean) * inv_std (written
  over y) and out = relu(gamma * xhat + beta [+ res]) (without the ReLU when relu is False);
* ``bn_backward_constants(gamma, inv_std, dgamma, dbeta, m, train)``: BatchNorm's per-channel
  backward constants a = gamma / sigma, cx = -a dgamma / m, c1 = -a dbeta / m (0 in evaluation),
  and dgamma, dbeta added to the parameter gradients;
* ``bn_backward(d, mask, xhat, a, cx, c1)``: dx = a * dz + cx * xhat + c1, BatchNorm's input
  gradient (lesson 3), with dz = d, or d where mask > 0 (the ReLU before it, fused);
* ``relu_backward(d, out)``: d where out > 0, else 0;
* ``col2im(dcols, x_shape, k, stride, padding)``: a convolution's input gradient from the
  gradient of its im2col matrix, each input element gathering its taps (layers.col2im's scatter,
  one kernel instead of two per tap);
* ``pool_bn_relu(y, scale, shift)``: the ConvNet block's forward after its convolution (fast.py's
  ConvBlock): 2x2 max-pooling with the index of the first maximum, then relu(scale * max + shift);
* ``relu_sums(dout, out, pooled, mean, sign, inv_std)``: its BatchNorm gradients through the ReLU,
  per channel sum(dz) and sum(dz * (pooled - mean) * sign * inv_std) with dz = dout where out > 0
  (two reductions);
* ``conv_block_dy(y, dy_per_y, dy_const, a, dout, out, winner)``: its backward to the
  convolution's output, dy = dy_per_y * y + dy_const everywhere, plus a * dout at each window's
  winner where the ReLU let it through;
* ``running_stats(bn, mean, var, m, sign, bias)``: BatchNorm's running statistics moved towards a
  batch's (whose mean is sign * mean + bias: the ConvNet block works with sign * conv(x), no bias),
  and the batch's 1 / sqrt(var + eps), which normalises it, returned;
* ``block_constants(...)`` / ``block_backward_constants(...)``: the block's per-channel constants,
  forward (1/sigma, scale, shift) and backward (the coefficients of dy, and the parameter
  gradients added where they accumulate), a dozen tiny operations each, which on a GPU are as
  many launches;
* ``adam(p, g, m, v, ...)``: Adam's step over the flat parameter arrays (optim.py), in place (its
  formula in ``adam_twin``, which optim.Adam also runs: the kernels know no optimiser).

Every function takes the array module first. Its twin (``*_twin``) is the reference: plain array
operations, written once against ``xp``, the formula in its docstring; tests hold the kernels
against the twins on a GPU, and the twins against the library's BatchNorm everywhere. The CUDA is
compiled on first use through CuPy, so the CPU path never imports cupy.

On CuPy the kernels run by default: their tests passed on an NVIDIA H200 (CuPy 14.2, CUDA 13.0;
2026-12-04, benchmarks/gpu_recheck_h200.log), where they made a 60-way training episode 1.4
(ConvNet) to 1.8 (ResNet-18, TF32) times faster than the twins. ``SCRATCHPROTO_KERNELS=0`` runs
the twins instead (always on NumPy).
"""
import os

import numpy as np

from .layers import col2im as plain_col2im, output_size

ENV = "SCRATCHPROTO_KERNELS"


def enabled(xp):
    """Whether the CUDA kernels run: on CuPy, unless SCRATCHPROTO_KERNELS=0."""
    return xp is not np and os.environ.get(ENV, "1") != "0"


# -- the CUDA, as CuPy's kernel specifications (also syntax-checked on the CPU: tests) -----------

ELEMENTWISE = {
    "bn_relu": (
        "T y, T mean, T inv_std, T gamma, T beta, T res, int32 relu", "T xhat, T out",
        """
        T h = (y - mean) * inv_std;
        xhat = h;
        T o = gamma * h + beta + res;
        out = relu ? (o > (T)0 ? o : (T)0) : o;
        """),
    # per channel; the last two outputs are read and written: the gradients accumulate there
    "bn_backward_constants": (
        "T gamma, T inv_std, T dgamma, T dbeta, T m, int32 train", "T a, T cx, T c1, T gamma_grad, T beta_grad",
        """
        T g = gamma * inv_std;
        a = g;
        cx = train ? -g * dgamma / m : (T)0;
        c1 = train ? -g * dbeta / m : (T)0;
        gamma_grad += dgamma;
        beta_grad += dbeta;
        """),
    "bn_backward": (
        "T d, T mask, T xhat, T a, T cx, T c1", "T dx",
        """
        dx = (mask > (T)0 ? a * d : (T)0) + cx * xhat + c1;
        """),
    # over dx (N, H, W, C); dcols (N*Ho*Wo, K*K*C) read raw: each element sums the taps that saw it
    "col2im": (
        "raw T dcols, int32 H, int32 W, int32 Ho, int32 Wo, int32 C, int32 K, int32 S, int32 P", "T dx",
        """
        int c = i % C;
        int w = (i / C) % W;
        int h = (i / (C * W)) % H;
        long long n = i / ((long long)C * W * H);
        T acc = (T)0;
        for (int kh = 0; kh < K; ++kh) {
            int oh = h + P - kh;                 /* the output row whose tap kh sat on row h */
            if (oh < 0 || oh % S != 0 || oh / S >= Ho) continue;
            for (int kw = 0; kw < K; ++kw) {
                int ow = w + P - kw;
                if (ow < 0 || ow % S != 0 || ow / S >= Wo) continue;
                acc += dcols[((n * Ho + oh / S) * Wo + ow / S) * K * K * C + (kh * K + kw) * C + c];
            }
        }
        dx = acc;
        """),
    "relu_backward": (
        "T d, T out", "T dx",
        """
        dx = out > (T)0 ? d : (T)0;
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
    # per channel: the running statistics updated in place (read and written), and the one
    # counter of batches (a raw array of one element) by the first thread
    "running_stats": (
        "T mean, T var, T sign, T bias, T mom, T unbias, T eps", "T running_mean, T running_var, raw int64 tracked, T inv_std",
        """
        if (i == 0) tracked[0] += 1;
        inv_std = (T)1 / sqrt(var + eps);
        running_mean = running_mean * ((T)1 - mom) + mom * (sign * mean + bias);
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
    # the last three outputs are read and written: the gradients accumulate there
    "block_backward_constants": (
        "T gamma, T inv_std, T sign, T mean, T dgamma, T dbeta, T m, int32 train",
        "T a, T dy_per_y, T dy_const, T gamma_grad, T beta_grad, T bias_grad",
        """
        T g = gamma * inv_std;
        T coef_xhat = train ? -g * dgamma / m : (T)0;
        T coef_one = train ? -g * dbeta / m : (T)0;
        a = g;
        dy_per_y = coef_xhat * sign * inv_std;
        dy_const = coef_one - dy_per_y * mean;
        gamma_grad += dgamma;
        beta_grad += dbeta;
        bias_grad += g * dbeta + m * coef_one;
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

# Per-channel sums over all but the last axis, each in two launches. One launch over all N*H*W
# rows of (N*H*W, C) starves the GPU: CuPy's reduction gives a block of 512 threads to 32
# channels, so 64 channels keep two blocks busy, each thread walking some 30,000 rows in turn (a
# 60-way episode's first layer: 10 ms a sum on an H200, 2026-12-04, where the twins' per-image
# einsum took 1). So the first launch sums each image's rows, an (N, C) float64 array of partial
# sums with thousands of blocks at work, and the second adds those over the images, scales and
# casts back. name: (inputs, map expression); both launches accumulate in double precision.
REDUCE_TYPE = "double"   # a C type: CuPy writes it into the kernel's source
REDUCTIONS = {
    "channel_sum": ("T x", "(double)x"),
    "channel_dot": ("T x, T w", "(double)x * (double)w"),
    "channel_sq_dev": ("T x, T mu", "((double)x - (double)mu) * ((double)x - (double)mu)"),
    "relu_sum": ("T d, T out", "out > (T)0 ? (double)d : 0.0"),
    "relu_dot_centered": ("T d, T out, T x, T mu, T sign, T inv_std",
                          "out > (T)0 ? (double)d * (((double)x - (double)mu) * (double)(sign * inv_std)) : 0.0"),
}
PARTIAL = ("float64 s", "a + b", "s = a", "0")          # the first launch's output, reduce, post-map, identity
# the second launch: partial sums (N, C) added over the images, times scale, cast to the inputs dtype
# (one kernel per dtype: a reduction's output type can only be named, not taken from an output)
TOTAL = {dtype: ("float64 p, float64 scale", f"{dtype} s", "p", "a + b", f"s = ({ctype})(a * scale)", "0")
         for dtype, ctype in (("float32", "float"), ("float64", "double"))}

_compiled = {}


def _kernel(name):
    """The CuPy kernel ``name``, compiled on first use."""
    if name not in _compiled:
        import cupy
        if name in ELEMENTWISE:
            ins, outs, body = ELEMENTWISE[name]
            _compiled[name] = cupy.ElementwiseKernel(ins, outs, body, f"scratchproto_{name}")
        else:
            if name.startswith("channel_total_"):
                ins, out, mapped, reduce, post, identity = TOTAL[name[len("channel_total_"):]]
            else:
                (ins, mapped), (out, reduce, post, identity) = REDUCTIONS[name], PARTIAL
            _compiled[name] = cupy.ReductionKernel(ins, out, mapped, reduce, post, identity,
                                                   f"scratchproto_{name}", reduce_type=REDUCE_TYPE)
    return _compiled[name]


def _per_channel(name, arrays, params=(), scale=1.0):
    """scale * the sum over all but the last axis of reduction ``name``'s map over arrays
    (N, ..., C) and params (per-channel vectors (C,) or scalars): (C,), in the arrays' dtype.
    Two launches: per-image partial sums (N, C) in float64, then their total (see REDUCTIONS)."""
    x = arrays[0]
    rows = [a.reshape(x.shape[0], -1, x.shape[-1]) for a in arrays]
    partial = _kernel(name)(*rows, *params, axis=1)
    return _kernel(f"channel_total_{x.dtype.name}")(partial, float(scale), axis=0)


def _channels_last_2d(x):
    """(..., C) -> (M, C): the reductions run over the rows."""
    return x.reshape(-1, x.shape[-1])


# -- the twins (references) and the dispatchers ---------------------------------------------------

def channel_sum_twin(xp, x, scale=1.0):
    """scale * the sum over all but the last axis of x, in float64, cast back to x's dtype: (C,)."""
    return (_channels_last_2d(x).sum(axis=0, dtype=np.float64) * scale).astype(x.dtype)


def channel_dot_twin(xp, x, w):
    """sum over all but the last axis of x * w, in float64: (C,)."""
    x2, w2 = _channels_last_2d(x), _channels_last_2d(w)
    return xp.einsum("mc,mc->c", x2.astype(np.float64), w2.astype(np.float64)).astype(x.dtype)


def channel_sq_dev_twin(xp, x, mu, scale=1.0):
    """scale * the sum over all but the last axis of (x - mu)^2, mu (C,), in float64: (C,)."""
    dev = _channels_last_2d(x).astype(np.float64) - mu.astype(np.float64)
    return ((dev * dev).sum(axis=0) * scale).astype(x.dtype)


def bn_relu_twin(xp, y, mean, inv_std, gamma, beta, res=None, relu=True):
    """xhat = (y - mean) * inv_std, written over y; out = max(gamma * xhat + beta [+ res], 0)
    (no max when relu is False). Per-channel vectors (C,) broadcast over y (..., C).
    Returns (xhat, out)."""
    xp.subtract(y, mean, out=y)
    y *= inv_std
    out = y * gamma
    out += beta
    if res is not None:
        out += res
    if relu:
        xp.maximum(out, 0, out=out)
    return y, out


def bn_backward_constants_twin(xp, gamma, inv_std, dgamma, dbeta, m, train, grads):
    """BatchNorm's backward constants per channel (C,): a = gamma * inv_std, and in training
    cx = -a dgamma / m, c1 = -a dbeta / m (0 in evaluation: the statistics are constants then).
    Adds dgamma and dbeta to grads = (gamma's, beta's). Returns (a, cx, c1)."""
    a = gamma * inv_std
    cx = -a * dgamma / m if train else xp.zeros_like(a)
    c1 = -a * dbeta / m if train else xp.zeros_like(a)
    gamma_grad, beta_grad = grads
    gamma_grad += dgamma
    beta_grad += dbeta
    return a, cx, c1


def bn_backward_twin(xp, d, mask, xhat, a, cx, c1):
    """dx = a * dz + cx * xhat + c1, dz = d, or d where mask > 0 when a mask is given;
    per-channel a, cx, c1 (C,)."""
    dz = d if mask is None else d * (mask > 0)
    return a * dz + cx * xhat + c1


def relu_backward_twin(xp, d, out):
    """d where out > 0, else 0 (ReLU's backward from its output)."""
    return d * (out > 0)


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


def relu_sums_twin(xp, dout, out, pooled, mean, sign, inv_std):
    """With dz = dout where out > 0 (the ReLU's gradient; all (N, H, W, C)): per channel
    (sum of dz, sum of dz * (pooled - mean) * sign * inv_std), in float64. Returns (dbeta, dgamma)."""
    dz = dout * (out > 0)
    return channel_sum_twin(xp, dz), channel_dot_twin(xp, dz, (pooled - mean) * (sign * inv_std))


def conv_block_dy_twin(xp, y, dy_per_y, dy_const, a, dout, out, winner):
    """dy = dy_per_y * y + dy_const over y (N, H, W, C), plus a * dout (dout, out: N, H//2, W//2, C)
    at each window's winner where out > 0 (rows and columns that floor mode drops get only the
    first two terms)."""
    a_dz = a * dout * (out > 0)
    dy = y * dy_per_y + dy_const
    for q, view in enumerate(_window_positions(dy)):
        view += xp.where(winner == q, a_dz, 0)
    return dy


def running_stats_twin(xp, bn, mean, var, m, sign=1, bias=0):
    """BatchNorm2d.update_running with the batch mean sign * mean + bias: running = (1 - momentum)
    * running + momentum * batch, the variance unbiased by m / (m - 1), and num_batches_tracked + 1.
    Returns the batch's inv_std = 1 / sqrt(var + eps) (C,)."""
    bn.update_running(sign * mean + bias, var, m)
    return 1.0 / xp.sqrt(var + bn.eps)


def block_constants_twin(xp, gamma, beta, sign, mean, var, eps):
    """The ConvBlock's forward constants per channel (C,): inv_std = 1 / sqrt(var + eps),
    scale = gamma * sign * inv_std (= |gamma| / sigma) and shift = beta - mean * scale.
    Returns (inv_std, scale, shift)."""
    inv_std = 1.0 / xp.sqrt(var + eps)
    scale = gamma * sign * inv_std
    return inv_std, scale, beta - mean * scale


def block_backward_constants_twin(xp, gamma, inv_std, sign, mean, dgamma, dbeta, m, train, grads):
    """The ConvBlock's backward constants per channel (C,): a = gamma * inv_std; in training
    coef_xhat = -a dgamma / m and coef_one = -a dbeta / m (0 in evaluation, where the statistics
    are constants); dy_per_y = coef_xhat * sign * inv_std, dy_const = coef_one - dy_per_y * mean.
    Adds the parameter gradients to grads = (gamma's, beta's, the conv bias's or None): dgamma,
    dbeta, and a dbeta + m coef_one for a bias before BatchNorm. Returns (a, dy_per_y, dy_const)."""
    a, coef_xhat, coef_one = bn_backward_constants_twin(xp, gamma, inv_std, dgamma, dbeta, m, train, grads[:2])
    dy_per_y = coef_xhat * sign * inv_std
    dy_const = coef_one - dy_per_y * mean
    bias_grad = grads[2]
    if bias_grad is not None:
        bias_grad += a * dbeta + m * coef_one
    return a, dy_per_y, dy_const


def adam_twin(xp, p, g, m, v, betas, eps, weight_decay, step_size, sqrt_bc2):
    """Adam's step (optim.Adam) in place on p, m and v, with step_size = lr / (1 - b1^t) and
    sqrt_bc2 = sqrt(1 - b2^t):

        g <- g + weight_decay * p ;  m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - step_size * m / (sqrt(v) / sqrt_bc2 + eps)
    """
    b1, b2 = betas
    if weight_decay:
        g = g + weight_decay * p
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    p -= step_size * m / (xp.sqrt(v) / sqrt_bc2 + eps)


def channel_sum(xp, x, scale=1.0):
    if not enabled(xp):
        return channel_sum_twin(xp, x, scale)
    return _per_channel("channel_sum", [x], scale=scale)


def channel_dot(xp, x, w):
    if not enabled(xp):
        return channel_dot_twin(xp, x, w)
    return _per_channel("channel_dot", [x, w])


def channel_sq_dev(xp, x, mu, scale=1.0):
    if not enabled(xp):
        return channel_sq_dev_twin(xp, x, mu, scale)
    return _per_channel("channel_sq_dev", [x], [mu], scale)


def bn_relu(xp, y, mean, inv_std, gamma, beta, res=None, relu=True):
    if not enabled(xp):
        return bn_relu_twin(xp, y, mean, inv_std, gamma, beta, res, relu)
    out = xp.empty_like(y)
    _kernel("bn_relu")(y, mean, inv_std, gamma, beta, res if res is not None else y.dtype.type(0), int(relu), y, out)
    return y, out


def bn_backward_constants(xp, gamma, inv_std, dgamma, dbeta, m, train, grads):
    if not enabled(xp):
        return bn_backward_constants_twin(xp, gamma, inv_std, dgamma, dbeta, m, train, grads)
    a, cx, c1 = xp.empty_like(gamma), xp.empty_like(gamma), xp.empty_like(gamma)
    _kernel("bn_backward_constants")(gamma, inv_std, dgamma, dbeta, m, int(train), a, cx, c1, *grads)
    return a, cx, c1


def bn_backward(xp, d, mask, xhat, a, cx, c1):
    if not enabled(xp):
        return bn_backward_twin(xp, d, mask, xhat, a, cx, c1)
    return _kernel("bn_backward")(d, d.dtype.type(1) if mask is None else mask, xhat, a, cx, c1)


def col2im_twin(xp, dcols, x_shape, k, stride, padding):
    """layers.col2im: dx (x_shape: N, H, W, C) from dcols (N*Ho*Wo, k*k*C), scattering each tap."""
    return plain_col2im(dcols, x_shape, k, stride, padding, xp)


def col2im(xp, dcols, x_shape, k, stride, padding, out=None):
    """col2im into out (an array of x_shape, written whole) or a new array."""
    if not enabled(xp):
        dx = col2im_twin(xp, dcols, x_shape, k, stride, padding)
        if out is None:
            return dx
        out[...] = dx
        return out
    n, h, w, c = x_shape
    ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    out = xp.empty(x_shape, dtype=dcols.dtype) if out is None else out
    _kernel("col2im")(dcols, h, w, ho, wo, c, k, stride, padding, out)
    return out


def relu_backward(xp, d, out):
    if not enabled(xp):
        return relu_backward_twin(xp, d, out)
    return _kernel("relu_backward")(d, out)


def pool_bn_relu(xp, y, scale, shift):
    if not enabled(xp):
        return pool_bn_relu_twin(xp, y, scale, shift)
    n, h, w, c = y.shape
    shape = (n, h // 2, w // 2, c)
    pooled, out, winner = xp.empty(shape, y.dtype), xp.empty(shape, y.dtype), xp.empty(shape, np.uint8)
    _kernel("pool_bn_relu")(xp.ascontiguousarray(y), scale, shift, h, w, h // 2, w // 2, c, pooled, out, winner)
    return pooled, out, winner


def relu_sums(xp, dout, out, pooled, mean, sign, inv_std):
    if not enabled(xp):
        return relu_sums_twin(xp, dout, out, pooled, mean, sign, inv_std)
    return (_per_channel("relu_sum", [dout, out]),
            _per_channel("relu_dot_centered", [dout, out, pooled], [mean, sign, inv_std]))


def conv_block_dy(xp, y, dy_per_y, dy_const, a, dout, out, winner):
    if not enabled(xp):
        return conv_block_dy_twin(xp, y, dy_per_y, dy_const, a, dout, out, winner)
    n, h, w, c = y.shape
    return _kernel("conv_block_dy")(y, dy_per_y, dy_const, a, xp.ascontiguousarray(dout),
                                    xp.ascontiguousarray(out), winner, h, w, h // 2, w // 2, c)


def running_stats(xp, bn, mean, var, m, sign=1, bias=0):
    if not enabled(xp):
        return running_stats_twin(xp, bn, mean, var, m, sign, bias)
    b, mom = bn.buffers, bn.momentum
    inv_std = xp.empty_like(var)
    _kernel("running_stats")(mean, var, sign, bias, mom, m / max(m - 1, 1), bn.eps, b["running_mean"],
                             b["running_var"], b["num_batches_tracked"].reshape(1), inv_std)
    return inv_std


def block_constants(xp, gamma, beta, sign, mean, var, eps):
    if not enabled(xp):
        return block_constants_twin(xp, gamma, beta, sign, mean, var, eps)
    return _kernel("block_constants")(gamma, beta, sign, mean, var, eps)


def block_backward_constants(xp, gamma, inv_std, sign, mean, dgamma, dbeta, m, train, grads):
    if not enabled(xp):
        return block_backward_constants_twin(xp, gamma, inv_std, sign, mean, dgamma, dbeta, m, train, grads)
    gamma_grad, beta_grad, bias_grad = grads
    a, dy_per_y, dy_const = xp.empty_like(gamma), xp.empty_like(gamma), xp.empty_like(gamma)
    _kernel("block_backward_constants")(gamma, inv_std, sign, mean, dgamma, dbeta, m, int(train), a, dy_per_y,
                                        dy_const, gamma_grad, beta_grad,
                                        xp.empty_like(gamma) if bias_grad is None else bias_grad)
    return a, dy_per_y, dy_const


def adam(xp, p, g, m, v, betas, eps, weight_decay, step_size, sqrt_bc2):
    if not enabled(xp):
        return adam_twin(xp, p, g, m, v, betas, eps, weight_decay, step_size, sqrt_bc2)
    b1, b2 = betas
    _kernel("adam")(g, b1, 1 - b1, b2, 1 - b2, step_size, sqrt_bc2, eps, weight_decay, p, m, v)


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
            y, mean, inv_std, gamma, beta, res, relu, xhat_out, out = args
            h = (y - mean) * inv_std
            xhat_out[...] = h
            out[...] = np.maximum(gamma * h + beta + res, 0) if relu else gamma * h + beta + res
            return xhat_out, out
        if name == "bn_backward":
            return bn_backward_twin(xp, *args)
        if name == "relu_backward":
            return relu_backward_twin(xp, *args)
        if name == "col2im":
            dcols, h, w, ho, wo, c, k, s, p, out = args
            assert dcols.shape == (out.shape[0] * ho * wo, k * k * c) and out.shape[1:] == (h, w, c)
            out[...] = col2im_twin(xp, dcols, out.shape, k, s, p)
            return out
        if name == "bn_backward_constants":
            *rest, train, a, cx, c1, gamma_grad, beta_grad = args
            for dest, value in zip((a, cx, c1), bn_backward_constants_twin(
                    xp, *rest, bool(train), (gamma_grad, beta_grad))):
                dest[...] = value
            return a, cx, c1, gamma_grad, beta_grad
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
            mean, var, sign, bias, mom, unbias, eps, running_mean, running_var, tracked, inv_std = args
            tracked[0] += 1
            inv_std[...] = 1.0 / np.sqrt(var + eps)
            running_mean *= 1 - mom
            running_mean += mom * (sign * mean + bias)
            running_var *= 1 - mom
            running_var += mom * var * unbias
            return running_mean, running_var, tracked, inv_std
        if name == "block_constants":
            return block_constants_twin(xp, *args)
        if name == "adam":
            g, b1, _, b2, _, step_size, sqrt_bc2, eps, weight_decay, p, m, v = args
            adam_twin(xp, p, g, m, v, (b1, b2), eps, weight_decay, step_size, sqrt_bc2)
            return p, m, v
        if name == "block_backward_constants":
            *rest, train, a, dy_per_y, dy_const, gamma_grad, beta_grad, bias_grad = args
            for dest, value in zip((a, dy_per_y, dy_const), block_backward_constants_twin(
                    xp, *rest, bool(train), (gamma_grad, beta_grad, bias_grad))):
                dest[...] = value
            return a, dy_per_y, dy_const, gamma_grad, beta_grad, bias_grad
        if name.startswith("channel_total_"):
            assert axis == 0 and args[0].dtype == np.float64
            p, scale = args
            return (p.sum(axis=0) * scale).astype(name[len("channel_total_"):])
        assert axis == 1 and args[0].ndim == 3          # (N, rows of an image, C): partial sums
        x = args[0].astype(np.float64)
        if name == "channel_sum":
            s = x
        elif name == "channel_dot":
            s = x * args[1]
        elif name == "relu_sum":
            s = x * (args[1] > 0)
        elif name == "relu_dot_centered":
            d, out, pooled, mu, sign, inv_std = args
            s = x * (out > 0) * ((pooled.astype(np.float64) - mu) * (sign * inv_std))
        else:
            s = (x - args[1]) ** 2
        return s.sum(axis=1)
