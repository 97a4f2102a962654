"""Neural-collapse metrics of one episode's features (paper, Section 3.1.2).

With N classes, K samples per class and features h (N, K, d): class means mu_n, global mean mu_G,
centred means H = [mu_n - mu_G] (N, d),

    Sigma_W = 1/(NK) sum_n sum_k (h_nk - mu_n)(h_nk - mu_n)^T        within-class covariance
    Sigma_B = 1/N    sum_n (mu_n - mu_G)(mu_n - mu_G)^T = H^T H / N    between-class covariance

* nc1       = (1/N) trace(Sigma_W Sigma_B^+)         variability collapse (Eq. 3)
* nc2       = || H H^T / ||H H^T||_F - (I - 11^T/N) / sqrt(N-1) ||_F   (Eq. 4, as the paper writes)
* nc2_unit  = the same after scaling each centred mean to unit length (the authors' released
              code computed this one, so the paper's figures show it)
* equinorm  = std / mean of the norms ||mu_n - mu_G||                 (Papyan, Han & Donoho 2020)
* equiangle = mean over pairs n<m of |cos(mu_n - mu_G, mu_m - mu_G) + 1/(N-1)|       (ibid.)
* cdnv      = mean over pairs n<m of (V_n + V_m) / (2 ||mu_n - mu_m||^2), V_n the mean squared
              distance of class n's features to mu_n   (Galanti, Gyorgy & Hutter 2021)

With one sample per class (K = 1, a 1-shot support set) there is no within-class variability to
measure: nc1 and cdnv would be 0 by construction, not by collapse, so they are None (null in
trace.jsonl and eval.json; the figures leave them out and say why).

All are computed in float64 and in two halves. On the device that holds the features (NumPy or
CuPy) go the parts that touch all N*K*d numbers, as a dozen array operations: the class means,
the Gram matrix of the centred means G = H H^T (N, N), the within-class projections onto them,
P = (E H^T)^T (E H^T) (N, N), E (NK, d) being the features minus their class means, and the
within-class variances V_n. One small array of these (2 N^2 + N numbers) is copied to the host,
which finishes the metrics from it in NumPy: on a GPU each array operation is a kernel launch,
and the N x N finish would be some fifty of them. A simplex ETF of class means makes nc2,
nc2_unit, equinorm and equiangle zero; features sitting on their class means make nc1 and cdnv
zero; all are unchanged by a global shift, rotation or scaling of the features.

The pseudo-inverse cut-off. Sigma_B has rank at most N-1, so Sigma_B^+ inverts only its non-null
directions. Singular values below max(d, N) * eps(float32) times the largest are treated as zero,
the default of torch.linalg.pinv for float32 inputs: the features are float32, so smaller
directions are rounding noise, and inverting them would explode nc1.

No d x d matrix is formed (d = 512 for ResNet-18). With the thin SVD H = U S V^T,
Sigma_B^+ = N V S^-2 V^T on the kept directions, so
    nc1 = (1/N) tr(Sigma_W N V S^-2 V^T) = sum_i ||E v_i||^2 / (N K s_i^2),
and since v_i = H^T u_i / s_i, ||E v_i||^2 = u_i^T P u_i / s_i^2, where u_i and s_i^2 are the
eigenvectors and eigenvalues of G: nc1 = sum_i u_i^T P u_i / (N K s_i^4), from G and P alone
(lesson 7 derives it). The distances between class means come from G too:
||mu_n - mu_m||^2 = G_nn + G_mm - 2 G_nm, and the cosines, G_nm / sqrt(G_nn G_mm).
"""
import numpy as np

from . import backend

METRICS = ("nc1", "nc2", "nc2_unit", "equinorm", "equiangle", "cdnv")
WITHIN_CLASS = ("nc1", "cdnv")      # undefined (None) with one sample per class
PINV_RTOL = np.finfo(np.float32).eps


def _etf_distance(gram):
    """|| G/||G||_F - (I - 11^T/N)/sqrt(N-1) ||_F for a Gram matrix G (N, N) (NumPy)."""
    n = gram.shape[0]
    target = (np.eye(n) - 1.0 / n) / np.sqrt(n - 1)
    return float(np.linalg.norm(gram / np.linalg.norm(gram) - target))


def collapse_summaries(h):
    """The device half: for features h (N, K, d), or a stack of B such sets (B, N, K, d), the
    float64 array (B, 2 N^2 + N) of [G, P, K V] (see the module docstring), on h's device."""
    xp = backend.xp_of(h)
    h = xp.asarray(h, dtype=np.float64)
    h = h.reshape((-1,) + h.shape[-3:])             # (B, N, K, d)
    b, n, k, d = h.shape
    means = h.mean(axis=2)                          # (B, N, d)
    centred = means - means.mean(axis=1, keepdims=True)      # H
    within = h - means[:, :, None, :]               # E, (B, N, K, d)
    centred_t = centred.transpose(0, 2, 1)          # (B, d, N)
    gram = centred @ centred_t                      # G = H H^T
    proj = within.reshape(b, n * k, d) @ centred_t  # E H^T (B, NK, N)
    p = proj.transpose(0, 2, 1) @ proj              # P
    var = (within * within).sum(axis=(2, 3))        # K V_n: the host divides by K
    return xp.concatenate([gram.reshape(b, -1), p.reshape(b, -1), var], axis=1)


def metrics_from_summaries(summary, n, k, d):
    """The host half: every metric from one row [G, P, K V] of collapse_summaries (NumPy)."""
    gram = summary[:n * n].reshape(n, n)
    p = summary[n * n:2 * n * n].reshape(n, n)
    var = summary[2 * n * n:] / k                   # V_n
    eig, u = np.linalg.eigh(gram)                   # eig = s_i^2
    keep = eig > max(d, n) * PINV_RTOL * eig.max()  # all False when H = 0: then nc1 = 0
    spread = np.einsum("ji,jl,li->i", u, p, u)      # u_i^T P u_i = s_i^2 ||E v_i||^2
    nc1 = (spread[keep] / eig[keep] ** 2).sum() / (n * k)
    sq_norms = np.maximum(np.diag(gram), 0.0)
    norms = np.sqrt(sq_norms)
    safe = np.maximum(norms, 1e-300)
    cos = gram / safe[:, None] / safe[None, :]      # Gram matrix of the unit-length rows of H
    pairs = np.triu_indices(n, 1)
    dist2 = sq_norms[:, None] + sq_norms[None, :] - 2 * gram
    with np.errstate(divide="ignore", invalid="ignore"):
        cdnv = (var[:, None] + var[None, :]) / (2 * dist2)
    out = {"nc1": float(nc1), "nc2": _etf_distance(gram), "nc2_unit": _etf_distance(cos),
           "equinorm": float(norms.std() / norms.mean()),
           "equiangle": float(np.abs(cos[pairs] + 1.0 / (n - 1)).mean()), "cdnv": float(cdnv[pairs].mean())}
    if k == 1:
        out.update(dict.fromkeys(WITHIN_CLASS))
    return out


def collapse_metrics(h):
    """Every metric above for features h: (N, K, d) array (NumPy or CuPy; N >= 2). Returns
    {name: float}, with None for the WITHIN_CLASS metrics when K = 1. A stack (B, N, K, d) of
    same-shaped sets (an episode's support and query, when shot = query) gives a list of B such
    dicts, for the one copy to the host."""
    if isinstance(h, (list, tuple)):
        h = np.asarray(h)
    if h.ndim not in (3, 4) or h.shape[-3] < 2 or h.shape[-2] < 1:
        raise ValueError(f"features must be (N >= 2 classes, K >= 1 samples, d), got {h.shape}")
    n, k, d = h.shape[-3:]
    rows = backend.to_host(collapse_summaries(h))   # the one copy to the host
    found = [metrics_from_summaries(row, n, k, d) for row in rows]
    return found if h.ndim == 4 else found[0]
