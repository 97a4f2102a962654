"""Fast versions of layers in layers.py: the same math, arranged to touch memory less.

On a CPU a training episode is bound less by arithmetic than by passes over big arrays (the first
ConvNet block's activations are 600 x 28 x 28 x 64 floats, 120 MB). Two rearrangements:

* ShiftConv2d: a stride-1 "same" convolution without an im2col matrix. In the zero-padded image
  flattened to rows of pixels, the pixel under kernel tap (i, j) is always i*Wp + j rows further
  on, so y = sum_ij X[rows + i*Wp + j] @ W_ij: k*k GEMMs on contiguous slices, no k*k-fold copy.
  The output is computed on the padded grid too (Hp*Wp instead of H*W rows) and cropped, so it
  pays off only where the border is thin; it falls back to im2col elsewhere.

* ConvBlock: a ConvNet block, conv -> BatchNorm -> ReLU -> 2x2 max-pool, fused. Max-pooling
  commutes with the ReLU and with BatchNorm's per-channel affine map y -> s*y + t (with the
  minimum instead of the maximum where s < 0), so the block pools the raw convolution output and
  normalises and rectifies only the pooled quarter. In the backward pass the gradient of the
  normalised output is non-zero only at the pooled winners, which turns BatchNorm's backward
  into a few per-channel sums over the quarter plus dy = B*y + C everywhere and a*dz at the
  winners. It picks the same winner as PyTorch's relu-then-pool (the first maximum in window
  order), except where float32 rounding ties s*y1 + t == s*y2 + t for y1 != y2, and for a channel
  with gamma exactly 0.

tests/test_fast.py checks both against the plain layers, in float64, to rounding.
"""
import numpy as np

from .layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU, Sequential


class ShiftConv2d(Conv2d):
    """Conv2d (stride 1, padding (k-1)/2) as k*k shifted GEMMs on the flat padded image."""

    # use the shifted GEMMs when the padded grid adds at most this fraction of rows
    MAX_BORDER_OVERHEAD = 0.35

    def __init__(self, c_in, c_out, k, stride=1, padding=None, **kw):
        padding = (k - 1) // 2 if padding is None else padding
        if stride != 1 or 2 * padding != k - 1:
            raise ValueError("ShiftConv2d needs stride 1 and 'same' padding (k - 1) / 2")
        super().__init__(c_in, c_out, k, stride, padding, **kw)

    def _shifted(self, shape):
        """Shifted GEMMs, or im2col? The shifted GEMMs make k*k passes over the output, im2col
        one pass over a k*k*C_in-wide matrix: with few input channels (the 1-channel first layer)
        im2col moves less memory; with a wide border the padded grid wastes too many rows."""
        n, h, w, _ = shape
        hp, wp = h + 2 * self.padding, w + 2 * self.padding
        return (self.c_in * self.k * self.k >= 4 * self.c_out
                and hp * wp / (h * w) - 1 <= self.MAX_BORDER_OVERHEAD)

    def _taps(self, wp):
        for i in range(self.k):
            for j in range(self.k):
                yield i, j, i * wp + j

    def conv(self, x):
        if not self._shifted(x.shape):
            return super().conv(x)
        xp, k, p = self.xp, self.k, self.padding
        n, h, w, c = x.shape
        hp, wp = h + 2 * p, w + 2 * p
        rows = n * hp * wp
        tail = (k - 1) * wp + (k - 1)      # zero rows so that every shifted slice stays in bounds
        xf = self.workspace("xflat", (rows + tail, c), x.dtype, zero_border=1)
        xf[:rows].reshape(n, hp, wp, c)[:, p:p + h, p:p + w] = x
        wt = self.params["weight"].transpose(2, 3, 1, 0)          # (kh, kw, in, out)
        yf = self.workspace("yflat", (rows, self.c_out), x.dtype)
        tmp = self.workspace("tmp", (rows, self.c_out), x.dtype)
        for i, j, off in self._taps(wp):
            if off == 0:
                xp.matmul(xf[0:rows], wt[i, j], out=yf)
            else:
                xp.matmul(xf[off:off + rows], wt[i, j], out=tmp)
                yf += tmp
        self.cache = ("shift", x.shape)
        # output pixel (r, c) sits at padded-grid row r, column c (its window's top-left corner)
        return xp.ascontiguousarray(yf.reshape(n, hp, wp, self.c_out)[:, :h, :w])

    def conv_backward(self, dout, need_dx=True):
        if not isinstance(self.cache[0], str):   # im2col was used (see conv)
            return super().conv_backward(dout, need_dx)
        xp, k, p = self.xp, self.k, self.padding
        n, h, w, c = self.cache[1]
        hp, wp = h + 2 * p, w + 2 * p
        rows = n * hp * wp
        xf = self.workspace("xflat", (rows + (k - 1) * wp + (k - 1), c), dout.dtype, zero_border=1)
        # the gradient on the padded grid: zero at the rows that are not real outputs
        dyf = self.workspace("dyflat", (n, hp, wp, self.c_out), dout.dtype, zero_border=1)
        dyf[:, :h, :w] = dout
        dyf = dyf.reshape(rows, self.c_out)
        wt = self.params["weight"].transpose(2, 3, 1, 0)
        dw = self.workspace("dw", (k, k, c, self.c_out), dout.dtype)
        for i, j, off in self._taps(wp):
            xp.matmul(xf[off:off + rows].T, dyf, out=dw[i, j])
        self.grads["weight"] += dw.transpose(3, 2, 0, 1)
        if not need_dx:
            return None
        dxf = xp.zeros((rows + (k - 1) * wp + (k - 1), c), dtype=dout.dtype)
        tmp = self.workspace("dtmp", (rows, c), dout.dtype)
        for i, j, off in self._taps(wp):
            xp.matmul(dyf, wt[i, j].T, out=tmp)
            dxf[off:off + rows] += tmp
        return xp.ascontiguousarray(dxf[:rows].reshape(n, hp, wp, c)[:, p:p + h, p:p + w])


class ConvBlock(Sequential):
    """conv3x3 -> BatchNorm -> ReLU -> MaxPool2x2, fused (see the module docstring).

    Children keep the plain block's names (0 conv, 1 bn, 2 relu, 3 pool) and hold the
    parameters, so state_dict, gradients and the optimiser see no difference.
    x: (N, H, W, C_in) -> (N, H//2, W//2, C_out).
    """

    def __init__(self, conv, bn, xp=np, dtype=np.float32):
        super().__init__(conv, bn, ReLU(xp=xp, dtype=dtype), MaxPool2d(2, xp=xp, dtype=dtype),
                         xp=xp, dtype=dtype)
        self.conv, self.bn = conv, bn

    def _windows(self, y):
        n, h, w, c = y.shape
        ho, wo = h // 2, w // 2
        return [y[:, i:2 * ho:2, j:2 * wo:2] for i in range(2) for j in range(2)]

    # im2col rows at most this wide take the Gram-matrix path (the 1-channel first block: 9)
    GRAM_MAX_K = 32

    def forward(self, x, train=True):
        xp, bn = self.xp, self.bn
        y = self.conv.conv(x)                       # no bias: BatchNorm's mean absorbs it
        m = y.size // bn.c
        b = self.conv.params.get("bias")
        cols = self.conv.cache[0]
        gram = None
        if train and not isinstance(cols, str) and cols.shape[1] <= self.GRAM_MAX_K:
            # Direct path for a narrow input (the 1-channel first block): y = cols @ W, so the
            # batch statistics follow from the K x K Gram matrix of cols without a pass over y
            # (mean = colsum @ W / m, E[y^2] = diag(W^T G W) / m), in float64 to keep them exact
            c64 = cols.astype(np.float64)
            colsum, g = c64.sum(axis=0), c64.T @ c64
            w64 = self.conv._wmat().astype(np.float64)
            mean64 = colsum @ w64 / m
            var64 = xp.einsum("ko,kl,lo->o", w64, g, w64) / m - mean64 ** 2
            mean, var = mean64.astype(y.dtype), var64.astype(y.dtype)
            gram = (colsum, g @ w64)
        elif train:
            mean = bn._channel_sum(y) / m
            yc = y - mean
            var = bn._channel_sum(yc, yc) / m
            del yc
        if train:
            rb = bn.buffers
            rb["running_mean"] *= 1 - bn.momentum
            rb["running_mean"] += bn.momentum * (mean + b if b is not None else mean)
            rb["running_var"] *= 1 - bn.momentum
            rb["running_var"] += bn.momentum * var * (m / max(m - 1, 1))
            rb["num_batches_tracked"] += 1
        else:
            mean = bn.buffers["running_mean"] - (b if b is not None else 0)
            var = bn.buffers["running_var"]
        inv_std = 1.0 / xp.sqrt(var + bn.eps)
        scale = bn.params["weight"] * inv_std
        shift = bn.params["bias"] - mean * scale
        views = self._windows(y)
        # pool the raw output: the maximum where the scale is >= 0, the minimum where it is < 0
        pmax, pmin = views[0].copy(), views[0].copy()
        for v in views[1:]:
            xp.maximum(pmax, v, out=pmax)
            xp.minimum(pmin, v, out=pmin)
        sel = xp.where(scale >= 0, pmax, pmin)
        z = sel * scale
        z += shift
        out = xp.maximum(z, 0)
        self.cache = (y, sel, out, mean, inv_std, scale, m, train, gram)
        return out

    def backward(self, dout, need_dx=True):
        xp, bn = self.xp, self.bn
        y, sel, out, mean, inv_std, scale, m, train, gram = self.cache
        dz = dout * (out > 0)                               # through the ReLU, on the quarter
        xhat_sel = (sel - mean) * inv_std
        dbeta = bn._channel_sum(dz)
        dgamma = bn._channel_sum(dz, xhat_sel)
        bn.grads["weight"] += dgamma
        bn.grads["bias"] += dbeta
        # BatchNorm's backward, dy = a*dz_full + k1*xhat + k0 with dz_full zero off the winners,
        # written in y: dy = B*y + C everywhere, plus a*dz at the winners
        a = scale
        k1 = -a * dgamma / m if train else xp.zeros_like(a)
        k0 = -a * dbeta / m if train else xp.zeros_like(a)
        big_b = k1 * inv_std
        big_c = k0 - big_b * mean
        adz = a * dz
        if "bias" in self.conv.params:
            # sum of dy over the batch: a*dbeta + B*sum(y) + C*m, which is a*dbeta + m*k0
            self.conv.grads["bias"] += a * dbeta + m * k0
        if gram is not None and not need_dx:
            return self._narrow_weight_grad(adz, big_b, big_c, gram)
        dy = y * big_b
        dy += big_c
        for hit, dv in zip(self._first_winners(y, sel), self._windows(dy)):
            dv += xp.where(hit, adz, 0)
        return self.conv.conv_backward(dy, need_dx)

    def _first_winners(self, y, sel):
        """For each window position in order, where it holds the first element equal to sel."""
        taken = None
        for v in self._windows(y):
            hit = v == sel
            if taken is None:
                taken = hit.copy()
            else:
                hit &= ~taken
                taken |= hit
            yield hit

    def _narrow_weight_grad(self, adz, big_b, big_c, gram):
        """dL/dW without the full-size dy = B*y + C + (a*dz at the winners):
        cols^T dy = B * (G W) + C * colsum + sum over window positions q of cols_q^T (a*dz)_q."""
        xp, conv = self.xp, self.conv
        cols, (n, h, w, c) = conv.cache
        colsum, gw = gram
        kk = cols.shape[1]
        ho, wo = h // 2, w // 2
        cols4 = cols.reshape(n, h, w, kk)
        y_shape_views = [cols4[:, i:2 * ho:2, j:2 * wo:2] for i in range(2) for j in range(2)]
        y, sel = self.cache[0], self.cache[1]
        dw = (gw * big_b + colsum[:, None] * big_c).astype(cols.dtype)     # (K, C_out)
        for hit, cq in zip(self._first_winners(y, sel), y_shape_views):
            dzq = xp.where(hit, adz, 0).reshape(-1, adz.shape[-1])
            dw += xp.ascontiguousarray(cq).reshape(-1, kk).T @ dzq
        conv.grads["weight"] += dw.reshape(conv.k, conv.k, c, conv.c_out).transpose(3, 2, 0, 1)
        return None
