"""Hand-written layers with manual backprop.

Every layer follows the classic teaching layout:

* ``forward(x, train)`` computes the output and keeps in ``self.cache`` exactly what the backward
  pass needs (nothing more);
* ``backward(dout)`` returns dL/dx and *adds* the parameter gradients into ``self.grads``
  (``zero_grad`` clears them, as in PyTorch);
* parameters live in ``self.params`` and non-learned state (BatchNorm's running statistics) in
  ``self.buffers``, both keyed by PyTorch's attribute names so a backbone can spell its
  ``state_dict`` in PyTorch's names.

Images travel between layers channels-last, ``(N, H, W, C)``: then an image patch is a contiguous
run of memory and a convolution is one well-shaped GEMM. Weights keep PyTorch's layout
``(out, in, kh, kw)``; the convolution rearranges them (they are small) on each call.

All math goes through ``self.xp`` (NumPy or CuPy, see backend.py); dtype is float32 for training
and float64 for the gradient checks, the same code either way.

This file is the readable reference, with no performance hooks; the lessons teach from it.
fast.py holds faster arrangements of the same math (chunked im2col, fused blocks, reused
buffers), and tests/test_fast.py holds each of them against these layers in float64.
"""
from collections import namedtuple

import numpy as np


# What a layer's forward pass keeps for its backward pass, by name.
ConvCache = namedtuple("ConvCache", "cols x_shape")               # cols: (N*Ho*Wo, k*k*C_in)
BatchNormCache = namedtuple("BatchNormCache", "xhat inv_std train")
PoolCache = namedtuple("PoolCache", "winner x_shape")             # winner: window index, uint8


class Module:
    """Base class: parameters, their gradients, buffers and named children.

    ``children`` is an ordered list of (name, module); the names are PyTorch's, so that
    ``named_modules`` walks out names such as ``encoder.layer2.0.shortcut.0``.
    """

    def __init__(self, xp=np, dtype=np.float32):
        self.xp, self.dtype = xp, dtype
        self.params, self.grads, self.buffers = {}, {}, {}
        self.children = []
        self.cache = None

    def add_param(self, name, value):
        self.params[name] = self.xp.asarray(value, dtype=self.dtype)
        self.grads[name] = self.xp.zeros_like(self.params[name])

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.children:
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def zero_grad(self):
        """Clear the gradients of this module and of every module inside it."""
        for _, module in self.named_modules():
            for g in module.grads.values():
                g[...] = 0

    def forward(self, x, train=True):
        raise NotImplementedError

    def backward(self, dout, need_dx=True):
        """dL/dx from dL/dout; ``need_dx=False`` lets the first layer of a network skip it."""
        raise NotImplementedError


def _uniform(rng, bound, shape):
    return rng.uniform(-bound, bound, size=shape)


def output_size(size, k, stride, padding):
    """The output height (or width) of a k x k window sliding over ``size`` pixels."""
    return (size + 2 * padding - k) // stride + 1


def windows(k, stride, ho, wo):
    """Yield (i, j, index): for kernel offset (i, j), the slice of the padded input
    (N, H + 2p, W + 2p, C) that holds that offset's entry of every patch, (N, Ho, Wo, C)."""
    for i in range(k):
        for j in range(k):
            yield i, j, (slice(None), slice(i, i + stride * ho, stride), slice(j, j + stride * wo, stride))


def im2col(x, k, stride, padding, xp=np):
    """Every k x k patch of x (N, H, W, C), zero-padded, as a row: (N*Ho*Wo, k*k*C), each row in
    (kernel row, kernel column, channel) order. One strided copy per kernel offset."""
    n, h, w, c = x.shape
    ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    p = padding
    xpad = xp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
    cols = xp.empty((n, ho, wo, k, k, c), dtype=x.dtype)
    for i, j, win in windows(k, stride, ho, wo):
        cols[:, :, :, i, j] = xpad[win]
    return cols.reshape(n * ho * wo, k * k * c)


def col2im(dcols, x_shape, k, stride, padding, xp=np):
    """The adjoint of im2col: each row of dcols (N*Ho*Wo, k*k*C) added back into the patch it
    came from (overlapping patches add up); returns (N, H, W, C), the padding cut off."""
    n, h, w, c = x_shape
    ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    p = padding
    dxpad = xp.zeros((n, h + 2 * p, w + 2 * p, c), dtype=dcols.dtype)
    d6 = dcols.reshape(n, ho, wo, k, k, c)
    for i, j, win in windows(k, stride, ho, wo):
        dxpad[win] += d6[:, :, :, i, j]
    return xp.ascontiguousarray(dxpad[:, p:p + h, p:p + w]) if p else dxpad


class Conv2d(Module):
    """2-D convolution, k x k kernel, stride, zero padding, optional bias, as im2col + one GEMM.

    x: (N, H, W, C_in) -> y: (N, Ho, Wo, C_out), Ho = (H + 2p - k) // s + 1.

    im2col gathers every k x k x C_in patch into a row of ``cols`` (N*Ho*Wo, k*k*C_in) with one
    strided copy per kernel offset (k*k copies, never a loop over images or pixels), so that
    ``y = cols @ W`` and, in the backward pass, ``dW = cols.T @ dy`` and ``dcols = dy @ W.T``,
    whose rows col2im adds back into their patches. Initialisation is PyTorch's default: weight
    and bias uniform in +-1/sqrt(fan_in).
    """

    def __init__(self, c_in, c_out, k, stride=1, padding=0, bias=True, rng=None, xp=np,
                 dtype=np.float32):
        super().__init__(xp, dtype)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.c_in, self.c_out, self.k, self.stride, self.padding = c_in, c_out, k, stride, padding
        bound = 1.0 / np.sqrt(c_in * k * k)
        self.add_param("weight", _uniform(rng, bound, (c_out, c_in, k, k)))
        if bias:
            self.add_param("bias", _uniform(rng, bound, (c_out,)))

    def _wmat(self):
        # (out, in, kh, kw) -> (kh*kw*in, out): the row order of an im2col patch
        return self.params["weight"].transpose(2, 3, 1, 0).reshape(-1, self.c_out)

    def forward(self, x, train=True):
        n, h, w, _ = x.shape
        ho, wo = output_size(h, self.k, self.stride, self.padding), output_size(w, self.k, self.stride, self.padding)
        cols = im2col(x, self.k, self.stride, self.padding, self.xp)
        self.cache = ConvCache(cols, x.shape)
        y = cols @ self._wmat()
        if "bias" in self.params:
            y += self.params["bias"]
        return y.reshape(n, ho, wo, self.c_out)

    def backward(self, dout, need_dx=True):
        cols, x_shape = self.cache
        dy = dout.reshape(-1, self.c_out)
        if "bias" in self.params:
            self.grads["bias"] += dy.sum(axis=0)
        k, c = self.k, x_shape[3]
        self.grads["weight"] += (cols.T @ dy).reshape(k, k, c, self.c_out).transpose(3, 2, 0, 1)
        if not need_dx:
            return None
        return col2im(dy @ self._wmat().T, x_shape, k, self.stride, self.padding, self.xp)


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel, with PyTorch's semantics.

    Training: normalise with the batch mean and *biased* variance; update the running statistics
    with momentum 0.1 using the *unbiased* variance; count ``num_batches_tracked``.
    Evaluation: normalise with the running statistics. eps = 1e-5; learnable weight (gamma) and
    bias (beta). x, y: (N, H, W, C), or (N, C).
    """

    def __init__(self, c, eps=1e-5, momentum=0.1, xp=np, dtype=np.float32):
        super().__init__(xp, dtype)
        self.c, self.eps, self.momentum = c, eps, momentum
        self.add_param("weight", np.ones(c))
        self.add_param("bias", np.zeros(c))
        self.buffers["running_mean"] = xp.zeros(c, dtype=dtype)
        self.buffers["running_var"] = xp.ones(c, dtype=dtype)
        self.buffers["num_batches_tracked"] = xp.zeros((), dtype=np.int64)

    def channel_sum(self, a, b=None):
        """Sum over (N, H, W) per channel of a, or of a * b. a, b: (N, H, W, C) or (N, C).

        Summed image by image in a's dtype, then across images in float64: a plain float32
        running sum over the ~470k rows of the first ConvNet layer drifts by ~1e-4 relative, and
        the mean's error, seen against a small standard deviation, spoils the normalisation.
        """
        a3 = a.reshape(a.shape[0], -1, self.c)
        part = (self.xp.einsum("nij->nj", a3) if b is None
                else self.xp.einsum("nij,nij->nj", a3, b.reshape(a3.shape)))
        return part.sum(axis=0, dtype=np.float64).astype(a.dtype)

    def update_running(self, mean, var, m):
        """Move the running statistics towards a batch's mean and biased variance (over m values),
        keeping the unbiased variance, as PyTorch does."""
        b, mom = self.buffers, self.momentum
        b["running_mean"] *= 1 - mom
        b["running_mean"] += mom * mean
        b["running_var"] *= 1 - mom
        b["running_var"] += mom * var * (m / max(m - 1, 1))
        b["num_batches_tracked"] += 1

    def forward(self, x, train=True):
        m = x.size // self.c
        if train:
            mean = self.channel_sum(x) / m
            xc = x - mean
            var = self.channel_sum(xc, xc) / m      # biased: it normalises the batch
            self.update_running(mean, var, m)
        else:
            var = self.buffers["running_var"]
            xc = x - self.buffers["running_mean"]
        inv_std = 1.0 / self.xp.sqrt(var + self.eps)
        xhat = xc * inv_std
        self.cache = BatchNormCache(xhat, inv_std, train)
        return xhat * self.params["weight"] + self.params["bias"]

    def backward(self, dout, need_dx=True):
        xhat, inv_std, train = self.cache
        dbeta = self.channel_sum(dout)
        dgamma = self.channel_sum(dout, xhat)
        self.grads["weight"] += dgamma
        self.grads["bias"] += dbeta
        a = self.params["weight"] * inv_std
        if not train:  # the statistics are constants
            return dout * a
        # The batch statistics depend on x too; differentiating through them gives
        # dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)), a = gamma / sigma (lesson 3).
        m = dout.size // self.c
        return a * (dout - dbeta / m - xhat * (dgamma / m))


class ReLU(Module):
    """max(x, 0), elementwise; backward passes the gradient where the output is positive."""

    def forward(self, x, train=True):
        y = self.xp.maximum(x, 0)
        self.cache = y
        return y

    def backward(self, dout, need_dx=True):
        return dout * (self.cache > 0)


class MaxPool2d(Module):
    """k x k max pooling, stride k, floor mode (a 7x7 map pools to 3x3). x: (N, H, W, C).

    Ties go to the first maximum in row-major window order, as PyTorch does: after a ReLU, and
    over the flat background of an Omniglot image, equal values are common, and the gradient must
    go to one element, not to all of them.
    """

    def __init__(self, k=2, xp=np, dtype=np.float32):
        super().__init__(xp, dtype)
        self.k = k

    def _offsets(self, ho, wo):
        k = self.k
        for i in range(k):
            for j in range(k):
                yield (slice(None), slice(i, k * ho, k), slice(j, k * wo, k))

    def forward(self, x, train=True):
        xp, k = self.xp, self.k
        n, h, w, c = x.shape
        ho, wo = h // k, w // k
        views = [x[win] for win in self._offsets(ho, wo)]
        out = views[0].copy()
        for v in views[1:]:
            xp.maximum(out, v, out=out)
        # index of the first window element that equals the maximum; scan backwards so the
        # earliest match is written last
        arg = xp.zeros(out.shape, dtype=np.uint8)
        for idx in range(len(views) - 1, -1, -1):
            arg[views[idx] == out] = idx
        self.cache = PoolCache(arg, x.shape)
        return out

    def backward(self, dout, need_dx=True):
        xp = self.xp
        arg, shape = self.cache
        ho, wo = dout.shape[1:3]
        dx = xp.zeros(shape, dtype=dout.dtype)
        for idx, win in enumerate(self._offsets(ho, wo)):
            dx[win] = xp.where(arg == idx, dout, 0)
        return dx


class AvgPool2d(Module):
    """k x k average pooling, stride k, floor mode (the ResNet's final 4x4 pool). x: (N, H, W, C)."""

    def __init__(self, k, xp=np, dtype=np.float32):
        super().__init__(xp, dtype)
        self.k = k

    def forward(self, x, train=True):
        k = self.k
        n, h, w, c = x.shape
        ho, wo = h // k, w // k
        self.cache = x.shape
        return x[:, :k * ho, :k * wo].reshape(n, ho, k, wo, k, c).mean(axis=(2, 4))

    def backward(self, dout, need_dx=True):
        k = self.k
        n, h, w, c = self.cache
        ho, wo = dout.shape[1:3]
        dx = self.xp.zeros(self.cache, dtype=dout.dtype)
        share = (dout / (k * k))[:, :, None, :, None, :]
        dx[:, :k * ho, :k * wo] = self.xp.broadcast_to(share, (n, ho, k, wo, k, c)).reshape(
            n, k * ho, k * wo, c)
        return dx


class Flatten(Module):
    """(N, H, W, C) -> (N, C*H*W) in PyTorch's (C, H, W) order, so features match the reference."""

    def forward(self, x, train=True):
        self.cache = x.shape
        return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)

    def backward(self, dout, need_dx=True):
        n, h, w, c = self.cache
        return self.xp.ascontiguousarray(dout.reshape(n, c, h, w).transpose(0, 2, 3, 1))


class Sequential(Module):
    """Layers applied in order; children named '0', '1', ... as in torch.nn.Sequential."""

    def __init__(self, *layers, xp=np, dtype=np.float32):
        super().__init__(xp, dtype)
        self.children = [(str(i), layer) for i, layer in enumerate(layers)]

    def __len__(self):
        return len(self.children)

    def forward(self, x, train=True):
        for _, layer in self.children:
            x = layer.forward(x, train)
        return x

    def backward(self, dout, need_dx=True):
        for i in range(len(self.children) - 1, -1, -1):
            dout = self.children[i][1].backward(dout, need_dx=need_dx or i > 0)
        return dout


class BasicBlock(Module):
    """Residual block of ResNet-18: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity, or a 1x1 convolution + BatchNorm (a projection) when the stride
    or the width changes. Convolutions have no bias (BatchNorm follows each). x: (N, H, W, C_in).
    """

    def __init__(self, c_in, c_out, stride, rng, xp=np, dtype=np.float32, conv=Conv2d, norm=BatchNorm2d):
        """``conv``, ``norm``: the convolution and BatchNorm classes (fast.FastBasicBlock passes its own)."""
        super().__init__(xp, dtype)
        kw = dict(xp=xp, dtype=dtype)
        Conv = conv
        self.conv1 = Conv(c_in, c_out, 3, stride, 1, bias=False, rng=rng, **kw)
        self.bn1 = norm(c_out, **kw)
        self.relu1 = ReLU(**kw)
        self.conv2 = Conv(c_out, c_out, 3, 1, 1, bias=False, rng=rng, **kw)
        self.bn2 = norm(c_out, **kw)
        if stride != 1 or c_in != c_out:
            self.shortcut = Sequential(Conv(c_in, c_out, 1, stride, 0, bias=False, rng=rng, **kw),
                                       norm(c_out, **kw), **kw)
        else:
            self.shortcut = Sequential(**kw)   # empty: the identity
        self.relu2 = ReLU(**kw)
        self.children = [("conv1", self.conv1), ("bn1", self.bn1), ("conv2", self.conv2),
                         ("bn2", self.bn2), ("shortcut", self.shortcut)]

    def forward(self, x, train=True):
        out = self.relu1.forward(self.bn1.forward(self.conv1.forward(x, train), train))
        out = self.bn2.forward(self.conv2.forward(out, train), train)
        return self.relu2.forward(out + self.shortcut.forward(x, train))

    def backward(self, dout, need_dx=True):
        d = self.relu2.backward(dout)
        # the sum splits the gradient into both branches unchanged
        d_main = self.conv2.backward(self.bn2.backward(d))
        d_main = self.conv1.backward(self.bn1.backward(self.relu1.backward(d_main)), need_dx)
        d_short = self.shortcut.backward(d, need_dx)
        return d_main + d_short if need_dx else None


class RepeatChannels(Module):
    """(N, H, W, 1) -> (N, H, W, r): the grey Omniglot image fed to a 3-channel stem."""

    def __init__(self, r, xp=np, dtype=np.float32):
        super().__init__(xp, dtype)
        self.r = r

    def forward(self, x, train=True):
        return self.xp.repeat(x, self.r, axis=3)

    def backward(self, dout, need_dx=True):
        return dout.sum(axis=3, keepdims=True) if need_dx else None
