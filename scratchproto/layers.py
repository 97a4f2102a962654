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
"""
import numpy as np


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

    def workspace(self, name, shape, dtype, zero_border=0):
        """A scratch array kept between calls, so that big temporaries (im2col matrices, padded
        images) are not allocated, page-faulted and freed again on every episode. Only for
        arrays that do not outlive the layer's next call. ``zero_border``: the array is a padded
        image whose border of that width must be zero (it is zeroed once, when made)."""
        ws = self.__dict__.setdefault("_workspace", {})
        a = ws.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            a = ws[name] = (self.xp.zeros if zero_border else self.xp.empty)(shape, dtype=dtype)
        return a

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.children:
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def forward(self, x, train=True):
        raise NotImplementedError

    def backward(self, dout, need_dx=True):
        """dL/dx from dL/dout; ``need_dx=False`` lets the first layer of a network skip it."""
        raise NotImplementedError


def _uniform(rng, bound, shape):
    return rng.uniform(-bound, bound, size=shape)


class Conv2d(Module):
    """2-D convolution, k x k kernel, stride, zero padding, optional bias, as im2col + one GEMM.

    x: (N, H, W, C_in) -> y: (N, Ho, Wo, C_out), Ho = (H + 2p - k) // s + 1.

    im2col gathers every k x k x C_in patch into a row of ``cols`` (N*Ho*Wo, k*k*C_in) with one
    strided copy per kernel offset (k*k copies, never a loop over images or pixels), so that
    ``y = cols @ W`` and, in the backward pass, ``dW = cols.T @ dy`` and ``dcols = dy @ W.T``.
    Initialisation is PyTorch's default: weight and bias uniform in +-1/sqrt(fan_in).
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

    def _windows(self, ho, wo):
        """Yield (i, j, slice of the padded input that kernel offset (i, j) sees)."""
        s = self.stride
        for i in range(self.k):
            for j in range(self.k):
                yield i, j, (slice(None), slice(i, i + s * ho, s), slice(j, j + s * wo, s))

    def forward(self, x, train=True):
        y = self.conv(x)
        if "bias" in self.params:
            y += self.params["bias"]
        return y

    def backward(self, dout, need_dx=True):
        if "bias" in self.params:
            self.grads["bias"] += dout.reshape(-1, self.c_out).sum(axis=0)
        return self.conv_backward(dout, need_dx)

    # The bias-free core, also used by the fused ConvNet block (fast.py).
    def conv(self, x, out_scale=None, reuse=False):
        """x (N, H, W, C_in) -> x * W (N, Ho, Wo, C_out), no bias; caches the im2col matrix.
        ``out_scale`` (C_out,) multiplies the output channels (through the weights, for free);
        ``reuse``: the output may live in a buffer that this layer's next call overwrites."""
        xp, k, s, p = self.xp, self.k, self.stride, self.padding
        n, h, w, c = x.shape
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if p:
            xpad = self.workspace("xpad", (n, h + 2 * p, w + 2 * p, c), x.dtype, zero_border=p)
            xpad[:, p:p + h, p:p + w] = x
        else:
            xpad = x
        cols = self.workspace("cols", (n, ho, wo, k, k, c), x.dtype)
        for i, j, win in self._windows(ho, wo):
            cols[:, :, :, i, j] = xpad[win]
        cols = cols.reshape(n * ho * wo, k * k * c)
        self.cache = (cols, x.shape)
        wmat = self._wmat() if out_scale is None else self._wmat() * out_scale
        shape = (n * ho * wo, self.c_out)
        y = self.workspace("y", shape, x.dtype) if reuse else xp.empty(shape, dtype=x.dtype)
        xp.matmul(cols, wmat, out=y)
        return y.reshape(n, ho, wo, self.c_out)

    def conv_backward(self, dout, need_dx=True):
        """dL/dy (N, Ho, Wo, C_out) -> dL/dx; adds dL/dW into grads['weight']."""
        xp, k, p = self.xp, self.k, self.padding
        cols, (n, h, w, c) = self.cache
        ho, wo = dout.shape[1:3]
        dy = dout.reshape(-1, self.c_out)
        dw = (cols.T @ dy).reshape(k, k, c, self.c_out).transpose(3, 2, 0, 1)
        self.grads["weight"] += dw
        if not need_dx:
            return None
        dcols = self.workspace("dcols", (n * ho * wo, k * k * c), dout.dtype)
        xp.matmul(dy, self._wmat().T, out=dcols)
        dcols = dcols.reshape(n, ho, wo, k, k, c)
        dxpad = xp.zeros((n, h + 2 * p, w + 2 * p, c), dtype=dout.dtype)
        for i, j, win in self._windows(ho, wo):
            dxpad[win] += dcols[:, :, :, i, j]   # col2im: overlapping patches add up
        return xp.ascontiguousarray(dxpad[:, p:p + h, p:p + w]) if p else dxpad


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

    def _channel_sum(self, a, b=None):
        """Sum over (N, H, W) per channel of a, or of a * b. a, b: (N, H, W, C) or (N, C).

        Summed image by image in a's dtype, then across images in float64: a plain float32
        running sum over the ~470k rows of the first ConvNet layer drifts by ~1e-4 relative, and
        the mean's error, seen against a small standard deviation, spoils the normalisation.
        """
        a3 = a.reshape(a.shape[0], -1, self.c)
        part = (self.xp.einsum("nij->nj", a3) if b is None
                else self.xp.einsum("nij,nij->nj", a3, b.reshape(a3.shape)))
        return part.sum(axis=0, dtype=np.float64).astype(a.dtype)

    def normalise(self, x, train=True, out=None):
        """xhat = (x - mean) / sqrt(var + eps), with the batch statistics when training (which
        also updates the running ones) or the running statistics. Returns (xhat, inv_std (C,)).
        ``out=x`` overwrites x, for a fused caller that owns it (fast.FastBasicBlock)."""
        xp = self.xp
        m = x.size // self.c
        if train:
            mean = self._channel_sum(x) / m
            xhat = xp.subtract(x, mean, out=out)
            var = self._channel_sum(xhat, xhat) / m      # biased: it normalises the batch
            inv_std = 1.0 / xp.sqrt(var + self.eps)
            b = self.buffers
            mom = self.momentum
            b["running_mean"] *= 1 - mom
            b["running_mean"] += mom * mean
            b["running_var"] *= 1 - mom
            b["running_var"] += mom * var * (m / max(m - 1, 1))   # unbiased, as PyTorch keeps it
            b["num_batches_tracked"] += 1
        else:
            inv_std = 1.0 / xp.sqrt(self.buffers["running_var"] + self.eps)
            xhat = xp.subtract(x, self.buffers["running_mean"], out=out)
        xhat *= inv_std
        return xhat, inv_std

    def forward(self, x, train=True):
        xhat, inv_std = self.normalise(x, train)
        y = xhat * self.params["weight"]
        y += self.params["bias"]
        self.cache = (xhat, inv_std, train)
        return y

    def backward(self, dout, need_dx=True):
        return self.input_grad(dout, *self.cache)

    def input_grad(self, dout, xhat, inv_std, train, inplace=False):
        """Accumulate dgamma, dbeta; return dL/dx for dout = dL/dy. ``inplace``: dout becomes
        dx (for a fused caller that owns dout)."""
        dbeta = self._channel_sum(dout)
        dgamma = self._channel_sum(dout, xhat)
        self.grads["weight"] += dgamma
        self.grads["bias"] += dbeta
        a = self.params["weight"] * inv_std
        if not train:  # the statistics are constants
            return self.xp.multiply(dout, a, out=dout if inplace else None)
        # The batch statistics depend on x too; differentiating through them gives
        # dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)), a = gamma / sigma.
        m = dout.size // self.c
        if inplace:
            dx = dout
            dx *= a
            dx += xhat * (-a * dgamma / m)
        else:
            dx = xhat * (-a * dgamma / m)
            dx += dout * a
        dx -= a * dbeta / m
        return dx


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
        self.cache = (arg, x.shape)
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

    def __init__(self, c_in, c_out, stride, rng, xp=np, dtype=np.float32, fast=False):
        super().__init__(xp, dtype)
        kw = dict(xp=xp, dtype=dtype)
        if fast:   # the chunked im2col of fast.py: same math, less memory traffic
            from .fast import FastConv2d as Conv
        else:
            Conv = Conv2d
        self.conv1 = Conv(c_in, c_out, 3, stride, 1, bias=False, rng=rng, **kw)
        self.bn1 = BatchNorm2d(c_out, **kw)
        self.relu1 = ReLU(**kw)
        self.conv2 = Conv(c_out, c_out, 3, 1, 1, bias=False, rng=rng, **kw)
        self.bn2 = BatchNorm2d(c_out, **kw)
        if stride != 1 or c_in != c_out:
            self.shortcut = Sequential(Conv(c_in, c_out, 1, stride, 0, bias=False, rng=rng, **kw),
                                       BatchNorm2d(c_out, **kw), **kw)
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
