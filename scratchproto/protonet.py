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

from . import backend, fast
from .collapse import METRICS, collapse_summaries, metrics_from_summaries


def protonet_loss(z, way, shot, query, need_grad=True):
    """Loss, accuracy and dloss/dz of one episode from its embeddings.

    z: (N*Ks + N*Kq, d), support rows first then query, class-major (the order the backbone saw).
    Returns (loss, acc, dz): loss and acc are scalars on z's device (float(loss) reads one, and
    on a GPU waits for it), dz has z's shape, or is None without ``need_grad``.
    """
    xp = backend.xp_of(z)
    n_s, q = way * shot, way * query
    zs, zq = z[:n_s].reshape(way, shot, -1), z[n_s:]
    protos = zs.mean(axis=1)                                  # (N, d)
    diff = zq[:, None, :] - protos[None, :, :]                # (Q, N, d)
    dist = (diff * diff).sum(axis=2)                          # (Q, N)
    logits = dist.min(axis=1, keepdims=True) - dist           # -dist shifted: each row's max is 0
    e = xp.exp(logits)                                        # (a stable log-softmax: no overflow)
    total = e.sum(axis=1, keepdims=True)
    logp = logits - xp.log(total)
    # query rows are class-major, so query j of class n is row n*Kq + j and its own class is n:
    # the (N, Kq, N) view's diagonal over its first and last axes holds log p(y_i | i)
    loss = -xp.diagonal(logp.reshape(way, query, way), axis1=0, axis2=2).sum() / q
    acc = (logp.argmax(axis=1).reshape(way, query) == xp.arange(way)[:, None]).mean()
    if not need_grad:
        return loss, acc, None
    # 2G = 2(Y - P)/Q, P = e / total, Y one-hot: identity rows broadcast over the Kq queries
    g2 = (xp.eye(way, dtype=z.dtype)[:, None, :] - (e / total).reshape(way, query, way)) * (2.0 / q)
    t = g2.reshape(q, way)[:, :, None] * diff                 # 2 G_in (z_i - c_n), (Q, N, d)
    dzq = t.sum(axis=1)                                       # (Q, d)
    dzs = t.sum(axis=0) * (-1.0 / shot)                       # dloss/dc_n / Ks, (N, d)
    dzs = xp.broadcast_to(dzs[:, None, :], zs.shape).reshape(n_s, -1)    # each support row of its class
    return loss, acc, xp.concatenate([dzs, dzq]).astype(z.dtype, copy=False)


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
        collapse metric for the support and the query features ('nc1_support', 'nc1_query', ...).
        """
        return self.start_episode(xs, xq, train)()

    def start_episode(self, xs, xq, train=True):
        """Give one episode's work to the device; returns finish(), which returns what episode()
        returns.

        A GPU runs what it is given while Python goes on, and waits only when Python reads a
        number. So the numbers the host needs, loss, accuracy and the NC metrics' summaries, are
        packed into one small array right after the forward pass and their copy to the host is
        started; the backward pass is queued behind it without waiting; finish() waits for the
        copy (long done, if other work was queued meanwhile) and finishes the metrics on the host.
        The trainer starts episode i+1 before it finishes episode i, so the GPU never idles while
        Python reads a loss. The price: the backward pass no longer waits to see the loss, so a
        non-finite loss is found by finish(), after its gradients were made (the trainer then
        stops and saves nothing of them). The embeddings in finish()'s result are the backbone's
        output buffer, which a later episode may overwrite: read them before starting another.
        """
        # BLAS on one thread while our threads deal out the work. A loop of episodes is faster
        # inside one `with fast.blas_one_thread(np):`, as the trainer runs an epoch: lifting the
        # limit after each episode wakes OpenBLAS's threads, which then spin on our cores
        # (about 10% of a ConvNet episode, benchmarks/README.md).
        with fast.blas_one_thread(backend.xp_of(xs)):
            return self._start_episode(xs, xq, train)

    def _start_episode(self, xs, xq, train):
        way, shot, query = xs.shape[0], xs.shape[1], xq.shape[1]
        if xq.shape[0] != way:
            raise ValueError(f"support has {way} classes but query has {xq.shape[0]}")
        # one batch, made where the images are (a sampler's are on the host: one copy to the device)
        x = backend.xp_of(xs).concatenate([xs.reshape(way * shot, *xs.shape[2:]),
                                           xq.reshape(way * query, *xq.shape[2:])])
        z = self.net.forward(x, train=train)
        xp = backend.xp_of(z)
        n_s = way * shot
        if shot == query:       # support and query as one stack (2, N, K, d): a view of z
            stacks = [z.reshape(2, way, shot, -1)]
        else:
            stacks = [z[:n_s].reshape(1, way, shot, -1), z[n_s:].reshape(1, way, query, -1)]
        loss, acc, dz = protonet_loss(z, way, shot, query, need_grad=train)
        # [support's summary row, query's, loss, acc] in float64: the episode's one copy to the host
        numbers = xp.concatenate(
            [collapse_summaries(h).reshape(-1) for h in stacks] + [loss.reshape(1), acc.reshape(1)])
        read = backend.to_host_later(numbers)
        if train:
            self.net.zero_grad()
            self.net.backward(dz, need_dx=False)

        def finish():
            host = read()
            res = {"loss": float(host[-2]), "acc": float(host[-1]), "embeddings": z}
            # a finite loss means finite embeddings (an inf or nan one would reach some query's loss)
            if not np.isfinite(res["loss"]):
                res.update({f"{m}_{part}": float("nan") for m in METRICS for part in ("support", "query")})
                return res
            for part, row, k in zip(("support", "query"), host[:-2].reshape(2, -1), (shot, query)):
                metrics = metrics_from_summaries(row, way, k, z.shape[1])
                res.update({f"{name}_{part}": value for name, value in metrics.items()})
            return res
        return finish
