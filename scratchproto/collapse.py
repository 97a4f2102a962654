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

All are computed in float64, on the device that holds the features (NumPy or CuPy: no copy of
the embeddings to the host, and one small copy of the results), with no data-dependent branch
or shape, so that a GPU never waits for the host in the middle. A simplex ETF of class means makes nc2, nc2_unit,
equinorm and equiangle zero; features sitting on their class means make nc1 and cdnv zero; all
are unchanged by a global shift, rotation or scaling of the features.

The pseudo-inverse cut-off. Sigma_B has rank at most N-1, so Sigma_B^+ inverts only its non-null
directions. Singular values below max(d, N) * eps(float32) times the largest are treated as zero,
the default of torch.linalg.pinv for float32 inputs: the features are float32, so smaller
directions are rounding noise, and inverting them would explode nc1.

No d x d matrix is formed (d = 512 for ResNet-18): with the thin SVD H = U S V^T,
Sigma_B^+ = N V S^-2 V^T on the kept directions, so
    nc1 = (1/N) tr(Sigma_W N V S^-2 V^T) = sum_i ||E v_i||^2 / (N K s_i^2),
E (NK, d) being the features minus their class means; only N x d and NK x N products remain
(the dropped directions get weight 0 rather than being cut out, which keeps every shape fixed).
"""
import numpy as np

from . import backend

METRICS = ("nc1", "nc2", "nc2_unit", "equinorm", "equiangle", "cdnv")
WITHIN_CLASS = ("nc1", "cdnv")      # undefined (None) with one sample per class
PINV_RTOL = np.finfo(np.float32).eps


def _etf_distance(h_c, xp):
    """|| G/||G||_F - (I - 11^T/N)/sqrt(N-1) ||_F for the Gram matrix G of the rows of h_c."""
    n = h_c.shape[0]
    gram = h_c @ h_c.T
    target = (xp.eye(n) - 1.0 / n) / np.sqrt(n - 1)
    return xp.linalg.norm(gram / xp.linalg.norm(gram) - target)


def collapse_metrics(h):
    """Every metric above for features h: (N, K, d) array (NumPy or CuPy; N >= 2). Returns
    {name: float}, with None for the WITHIN_CLASS metrics when K = 1."""
    xp = backend.xp_of(h) if not isinstance(h, (list, tuple)) else np
    h = xp.asarray(h, dtype=np.float64)
    if h.ndim != 3 or h.shape[0] < 2 or h.shape[1] < 1:
        raise ValueError(f"features must be (N >= 2 classes, K >= 1 samples, d), got {h.shape}")
    n, k, d = h.shape
    means = h.mean(axis=1)                          # (N, d)
    centred = means - means.mean(axis=0)            # H: (N, d)
    within = (h - means[:, None, :]).reshape(n * k, d)   # E: (NK, d)

    # nc1 through the thin SVD of H (see the module docstring)
    _, s, vt = xp.linalg.svd(centred, full_matrices=False)
    eig = s ** 2                                    # N * eigenvalues of Sigma_B
    keep = eig > max(d, n) * PINV_RTOL * eig.max()  # all False when H = 0: then nc1 = 0
    inv_eig = xp.where(keep, 1.0 / xp.where(keep, eig, 1.0), 0.0)
    proj = within @ vt.T                            # (NK, N)
    nc1 = ((proj ** 2).sum(axis=0) * inv_eig).sum() / (n * k)

    norms = xp.linalg.norm(centred, axis=1)
    unit = centred / xp.maximum(norms, 1e-300)[:, None]
    cos = unit @ unit.T
    pairs = xp.triu_indices(n, 1)
    var = (within ** 2).sum(axis=1).reshape(n, k).mean(axis=1)    # V_n
    dist2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        cdnv = (var[:, None] + var[None, :]) / (2 * dist2)
    values = xp.stack([nc1, _etf_distance(centred, xp), _etf_distance(unit, xp), norms.std() / norms.mean(),
                       xp.abs(cos[pairs] + 1.0 / (n - 1)).mean(), cdnv[pairs].mean()])
    out = dict(zip(METRICS, (float(v) for v in backend.to_host(values))))   # the one copy to the host
    if k == 1:
        out.update(dict.fromkeys(WITHIN_CLASS))
    return out
