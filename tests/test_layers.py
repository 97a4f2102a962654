"""Finite-difference checks of every layer, in float64, and hand-computed BatchNorm statistics."""
import numpy as np
import pytest

from scratchproto import gradcheck
from scratchproto import layers as L

F64 = np.float64
TOL = 1e-6   # float64 central differences are good to ~1e-9 here; see gradcheck.py


def _x(xp, shape, seed=0):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _assert_ok(errors):
    assert errors and max(errors.values()) < TOL, errors


@pytest.mark.parametrize("k,stride,padding,bias", [(3, 1, 1, True), (3, 2, 1, False), (1, 2, 0, False),
                                                   (3, 1, 0, True), (5, 2, 2, True)])
def test_conv2d_gradients(xp, k, stride, padding, bias):
    conv = L.Conv2d(3, 4, k, stride, padding, bias=bias, rng=np.random.default_rng(1), xp=xp, dtype=F64)
    errors = gradcheck.check_layer(conv, _x(xp, (2, 7, 6, 3)))
    assert set(errors) == {"x", "weight"} | ({"bias"} if bias else set())
    _assert_ok(errors)


def test_conv2d_matches_direct_sum():
    """im2col + GEMM against the definition y[n,i,j,o] = sum w[o,c,a,b] x[n,s*i+a-p,s*j+b-p,c]."""
    rng = np.random.default_rng(2)
    conv = L.Conv2d(2, 3, 3, 2, 1, bias=True, rng=rng, dtype=F64)
    x = rng.standard_normal((2, 5, 5, 2))
    y = conv.forward(x)
    w, b = conv.params["weight"], conv.params["bias"]
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((2, 3, 3, 3))
    for n in range(2):
        for i in range(3):
            for j in range(3):
                patch = xpad[n, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]   # (a, b, c)
                ref[n, i, j] = np.einsum("abc,ocab->o", patch, w) + b
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gradients(xp, train):
    bn = L.BatchNorm2d(3, xp=xp, dtype=F64)
    bn.params["weight"][...] = xp.asarray([0.5, -1.5, 2.0])
    bn.params["bias"][...] = xp.asarray([0.1, 0.2, -0.3])
    bn.buffers["running_mean"][...] = xp.asarray([0.3, -0.2, 0.1])
    bn.buffers["running_var"][...] = xp.asarray([0.5, 2.0, 1.5])
    _assert_ok(gradcheck.check_layer(bn, _x(xp, (2, 4, 3, 3)), train=train))


def test_batchnorm_statistics_by_hand():
    """Two batches of one channel; running stats follow PyTorch's rule, computed here by hand."""
    bn = L.BatchNorm2d(1, dtype=F64)
    b1 = np.array([1.0, 2.0, 3.0, 6.0]).reshape(1, 2, 2, 1)   # mean 3, biased var 3.5, unbiased 14/3
    y = bn.forward(b1, train=True)
    np.testing.assert_allclose(y.ravel(), (np.array([1, 2, 3, 6]) - 3) / np.sqrt(3.5 + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], [0.9 * 0 + 0.1 * 3], rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], [0.9 * 1 + 0.1 * 14 / 3], rtol=1e-12)
    b2 = np.array([0.0, 0.0, 2.0, 2.0]).reshape(1, 2, 2, 1)   # mean 1, unbiased var 4/3
    bn.forward(b2, train=True)
    np.testing.assert_allclose(bn.buffers["running_mean"], [0.9 * 0.3 + 0.1 * 1], rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], [0.9 * (0.9 + 1.4 / 3) + 0.1 * 4 / 3], rtol=1e-12)
    assert int(bn.buffers["num_batches_tracked"]) == 2
    # evaluation uses the running statistics and leaves them alone
    y = bn.forward(np.array([1.0]).reshape(1, 1, 1, 1), train=False)
    rm, rv = 0.37, 0.9 * (0.9 + 1.4 / 3) + 0.4 / 3
    np.testing.assert_allclose(y.ravel(), [(1 - rm) / np.sqrt(rv + 1e-5)], rtol=1e-12)
    assert int(bn.buffers["num_batches_tracked"]) == 2


def test_relu_and_pooling_gradients(xp):
    x = _x(xp, (2, 7, 6, 3))
    for layer in [L.ReLU(xp=xp, dtype=F64), L.MaxPool2d(2, xp=xp, dtype=F64), L.MaxPool2d(3, xp=xp, dtype=F64),
                  L.AvgPool2d(2, xp=xp, dtype=F64), L.AvgPool2d(3, xp=xp, dtype=F64), L.Flatten(xp=xp, dtype=F64)]:
        _assert_ok(gradcheck.check_layer(layer, x.copy()))


def test_maxpool_floor_mode_and_ties():
    """7x7 pools to 3x3 (floor); among equal maxima the gradient goes to the first one only."""
    pool = L.MaxPool2d(2, dtype=F64)
    x = np.zeros((1, 7, 7, 1))
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = 5.0       # tie inside the first window: (0,1) comes first
    y = pool.forward(x)
    assert y.shape == (1, 3, 3, 1) and y[0, 0, 0, 0] == 5.0
    dx = pool.backward(np.ones_like(y))
    assert dx.shape == x.shape
    assert dx[0, 0, 1, 0] == 1 and dx[0, 1, 0, 0] == 0
    assert dx[0, 6].sum() == 0 and dx[0, :, 6].sum() == 0     # the dropped row/column
    assert dx.sum() == 9                                        # one winner per window, all-zero windows too
    assert dx[0, 2, 2, 0] == 1                                  # all-zero window: its first element


@pytest.mark.parametrize("c_in,c_out,stride", [(3, 3, 1), (3, 4, 1), (3, 4, 2)])
def test_basic_block_gradients(xp, c_in, c_out, stride):
    """Identity shortcut, and the projection shortcut for a width change and for a stride."""
    block = L.BasicBlock(c_in, c_out, stride, np.random.default_rng(3), xp=xp, dtype=F64)
    assert len(block.shortcut) == (0 if (stride, c_in) == (1, c_out) else 2)
    x = _x(xp, (2, 6, 6, c_in))
    _assert_ok(gradcheck.check_layer(block, x))
    # parameters of every sub-layer, through the block's own backward
    for name, sub in block.named_modules():
        if not sub.params:
            continue
        for key, p in sub.params.items():
            rng = np.random.default_rng(4)
            r = xp.asarray(rng.standard_normal(block.forward(x).shape))
            for _, m in block.named_modules():
                for g in m.grads.values():
                    g[...] = 0
            block.forward(x)
            block.backward(r)
            num = gradcheck.numerical_gradient(lambda: (block.forward(x) * r).sum(), p)
            assert gradcheck.relative_error(sub.grads[key], num) < TOL, (name, key)


def test_sequential_and_repeat(xp):
    seq = L.Sequential(L.RepeatChannels(3, xp=xp, dtype=F64),
                       L.Conv2d(3, 2, 3, 1, 1, rng=np.random.default_rng(5), xp=xp, dtype=F64),
                       L.ReLU(xp=xp, dtype=F64), xp=xp, dtype=F64)
    _assert_ok(gradcheck.check_layer(seq, _x(xp, (2, 5, 5, 1))))
    assert [n for n, _ in seq.named_modules("enc")] == ["enc", "enc.0", "enc.1", "enc.2"]


def test_gradcheck_catches_a_wrong_gradient():
    """The checker itself must fail a broken backward, or the tests above prove nothing."""
    class Broken(L.ReLU):
        def backward(self, dout, need_dx=True):
            return dout * (self.cache > 0) * 1.001   # 0.1% off
    errors = gradcheck.check_layer(Broken(dtype=F64), _x(np, (2, 3, 3, 2)))
    assert errors["x"] > 1e-4
