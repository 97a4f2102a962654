"""Prototypical Networks (Snell et al. 2017; the paper's Section 3.1, Eq. 1-2), forward and backward.

One episode: N classes (way), Ks support and Kq query images per class.

    c_n      = (1/Ks) sum_k f(x^s_nk)                          prototypes, Eq. 1
    d_in     = || f(x^q_i) - c_n ||^2                          squared Euclidean distance
    p(n | i) = softmax_n(-d_in)                                Eq. 2
    loss     = -(1/(N Kq)) sum_i log p(y_i | i)

Eq. 2 of the paper writes the plain norm ||.||; the reference code (and Snell et al.) squares it.
We follow the code.

The backward pass, by hand. With P the softmax and Y the one-hot labels, dloss/dlogits =
(P - Y)/Q for Q = N Kq queries, and logits = -d, so G = dloss/dd = (Y - P)/Q (Q, N). Then
    dloss/dz^q_i = 2 sum_n G_in (z^q_i - c_n)
    dloss/dc_n   = -2 sum_i G_in (z^q_i - c_n)
    dloss/dz^s_nk = dloss/dc_n / Ks          (each support embedding enters its prototype's mean)
"""
import numpy as np

from . import backend
from .collapse import METRICS, collapse_metrics


def protonet_loss(z, way, shot, query, need_grad=True):
    """Loss, accuracy and dloss/dz of one episode from its embeddings.

    z: (N*Ks + N*Kq, d), support rows first then query, class-major (the order the backbone saw).
    Returns (loss: float, acc: float, dz: same shape as z or None).
    """
    xp = backend.xp_of(z)
    n_s = way * shot
    zs, zq = z[:n_s].reshape(way, shot, -1), z[n_s:]
    protos = zs.mean(axis=1)                                  # (N, d)
    diff = zq[:, None, :] - protos[None, :, :]                # (Q, N, d)
    dist = (diff * diff).sum(axis=2)                          # (Q, N)
    logits = -dist
    logits = logits - logits.max(axis=1, keepdims=True)      # stable log-softmax
    logp = logits - xp.log(xp.exp(logits).sum(axis=1, keepdims=True))
    target = xp.repeat(xp.arange(way), query)                 # query rows are class-major
    rows = xp.arange(way * query)
    loss = -logp[rows, target].mean()
    acc = (logp.argmax(axis=1) == target).mean()
    if not need_grad:
        return float(loss), float(acc), None
    g = -xp.exp(logp)                                         # G = (Y - P) / Q
    g[rows, target] += 1
    g /= way * query
    dzq = 2 * (g[:, :, None] * diff).sum(axis=1)              # (Q, d)
    dprotos = -2 * (g[:, :, None] * diff).sum(axis=0)         # (N, d)
    dzs = xp.broadcast_to((dprotos / shot)[:, None, :], zs.shape).reshape(n_s, -1)
    return float(loss), float(acc), xp.concatenate([dzs, dzq]).astype(z.dtype, copy=False)


class ProtoNet:
    """A backbone used as a Prototypical Network.

    >>> import numpy as np
    >>> from scratchproto import build_backbone
    >>> model = ProtoNet(build_backbone("convnet", seed=0, width=8))
    >>> rng = np.random.default_rng(0)
    >>> xs = (rng.random((5, 2, 1, 28, 28)) < 0.1).astype(np.float32)    # (N, Ks, 1, 28, 28)
    >>> xq = (rng.random((5, 3, 1, 28, 28)) < 0.1).astype(np.float32)    # (N, Kq, 1, 28, 28)
    >>> res = model.episode(xs, xq, train=True)
    >>> res["embeddings"].shape, 0 <= res["acc"] <= 1, res["loss"] > 0, res["nc1_support"] > 0
    ((25, 8), True, True, True)

    Support and query go through the backbone as one batch, as in the reference, so BatchNorm
    normalises them together in training mode.
    """

    def __init__(self, net):
        self.net = net

    def episode(self, xs, xq, train=True):
        """Forward one episode, and when ``train`` also backward (gradients land in the backbone).

        BatchNorm runs in training mode when ``train`` and in evaluation mode otherwise. Returns
        loss, acc, embeddings (on the device; support rows first, class-major, then query) and every
        collapse metric for the support and the query features ('nc1_support', 'nc1_query', ...),
        computed on the device too.
        """
        xp = self.net.xp
        way, shot, query = xs.shape[0], xs.shape[1], xq.shape[1]
        if xq.shape[0] != way:
            raise ValueError(f"support has {way} classes but query has {xq.shape[0]}")
        x = xp.concatenate([xp.asarray(xs).reshape(way * shot, *xs.shape[2:]),
                            xp.asarray(xq).reshape(way * query, *xq.shape[2:])])
        z = self.net.forward(x, train=train)
        loss, acc, dz = protonet_loss(z, way, shot, query, need_grad=train)
        if train and np.isfinite(loss):
            self.net.zero_grad()
            self.net.backward(dz, need_dx=False)
        res = {"loss": loss, "acc": acc, "embeddings": z}
        # a finite loss means finite embeddings (an inf or nan one would reach some query's loss)
        if np.isfinite(loss):
            for part, h in (("support", z[:way * shot].reshape(way, shot, -1)),
                            ("query", z[way * shot:].reshape(way, query, -1))):
                for name, value in collapse_metrics(h).items():   # on the device
                    res[f"{name}_{part}"] = value
        else:
            res.update({f"{m}_{part}": float("nan") for m in METRICS for part in ("support", "query")})
        return res
