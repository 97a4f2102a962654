"""Finite-difference gradient checking: the way to trust a hand-written backward pass.

For a scalar loss L(x) the central difference (L(x + h e_i) - L(x - h e_i)) / 2h approximates
dL/dx_i with an error of order h^2; in float64 with h = 1e-6 that leaves about 1e-10 relative
error for smooth functions, so an analytic gradient that disagrees by more than 1e-6 is wrong.
"""
import numpy as np

from . import backend


def numerical_gradient(loss, x, h=1e-6, indices=None):
    """dL/dx by central differences, perturbing ``x`` in place (and restoring it).

    loss: a function of no arguments that reads ``x``; x: a float64 array (NumPy or CuPy);
    indices: flat indices to probe (default: all). Returns a host array of x's shape, or of
    len(indices) when given.
    """
    flat = x.reshape(-1)   # a view: x must be contiguous
    idx = range(x.size) if indices is None else indices
    grads = []
    for i in idx:
        old = flat[i].item()
        flat[i] = old + h
        up = float(loss())
        flat[i] = old - h
        down = float(loss())
        flat[i] = old
        grads.append((up - down) / (2 * h))
    g = np.array(grads)
    return g.reshape(x.shape) if indices is None else g


def relative_error(analytic, numeric):
    """max |a - n| / max(max|a|, max|n|): the worst error relative to the gradient's scale.

    Scaling by the largest entry (not entry by entry) keeps entries that are nearly zero from
    turning rounding noise into a large "relative" error.
    """
    a, n = np.asarray(backend.to_host(analytic), dtype=np.float64), np.asarray(numeric, np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), 1e-30)
    return float(np.abs(a - n).max(initial=0.0) / scale)


def check_layer(layer, x, train=True, seed=0):
    """Check a layer's input and parameter gradients; returns {'x': err, 'weight': err, ...}.

    The loss is sum(forward(x) * R) for a fixed random R, so dL/dout = R. Every entry is probed:
    meant for small layers (numerical_gradient takes ``indices`` for sampling larger ones).
    """
    xp = layer.xp
    # a stream of its own, so that R never equals an x drawn from the same seed (with R = x a
    # BatchNorm's gradient is ~0 and the check measures only rounding noise)
    rng = np.random.default_rng([seed, 7919])
    out = layer.forward(x, train)
    r = xp.asarray(rng.standard_normal(out.shape))

    def loss():
        return (layer.forward(x, train) * r).sum()

    layer.forward(x, train)
    layer.zero_grad()
    dx = layer.backward(r)
    analytic = {"x": dx, **{k: g.copy() for k, g in layer.grads.items()}}
    arrays = {"x": x, **layer.params}
    errors = {}
    for name, arr in arrays.items():
        errors[name] = relative_error(analytic[name], numerical_gradient(loss, arr))
    return errors
