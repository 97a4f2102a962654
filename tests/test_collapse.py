"""Neural-collapse metrics: known cases, invariances, and a plain dense float64 reference."""
import numpy as np
import pytest

from scratchproto import collapse_metrics
from scratchproto.collapse import METRICS, PINV_RTOL, WITHIN_CLASS


def dense_reference(h):
    """The paper's formulas with explicit d x d matrices and a pseudo-inverse."""
    n, k, d = h.shape
    mu = h.mean(axis=1)
    mu_g = mu.mean(axis=0)
    sw = sum(np.outer(h[c, i] - mu[c], h[c, i] - mu[c]) for c in range(n) for i in range(k)) / (n * k)
    sb = sum(np.outer(mu[c] - mu_g, mu[c] - mu_g) for c in range(n)) / n
    nc1 = np.trace(sw @ np.linalg.pinv(sb, rcond=max(d, n) * PINV_RTOL)) / n
    H = mu - mu_g
    etf = (np.eye(n) - np.ones((n, n)) / n) / np.sqrt(n - 1)

    def nc2_of(M):
        G = M @ M.T
        return np.linalg.norm(G / np.linalg.norm(G, "fro") - etf, "fro")
    norms = np.array([np.linalg.norm(r) for r in H])
    angles = [abs(H[i] @ H[j] / (norms[i] * norms[j]) + 1 / (n - 1)) for i in range(n) for j in range(i + 1, n)]
    var = [np.mean([np.sum((h[c, i] - mu[c]) ** 2) for i in range(k)]) for c in range(n)]
    cdnv = [(var[i] + var[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2)) for i in range(n) for j in range(i + 1, n)]
    return {"nc1": nc1, "nc2": nc2_of(H), "nc2_unit": nc2_of(H / norms[:, None]),
            "equinorm": norms.std() / norms.mean(), "equiangle": np.mean(angles), "cdnv": np.mean(cdnv)}


def simplex_etf(n, d, rng, scale=3.0):
    """n vectors of norm `scale` in R^d, pairwise cosine -1/(n-1), centred, randomly rotated."""
    e = np.eye(n) - 1.0 / n
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return scale * np.sqrt(n / (n - 1)) * e @ q[:n]


@pytest.mark.parametrize("n,k,d", [(5, 4, 16), (10, 5, 3), (20, 5, 64), (4, 1, 8)])
def test_agrees_with_dense_reference(n, k, d):
    """Random features, with d > N and d < N (then Sigma_B has full rank d)."""
    h = np.random.default_rng(n * d).standard_normal((n, k, d))
    got, ref = collapse_metrics(h), dense_reference(h)
    for m in METRICS:
        if k == 1 and m in WITHIN_CLASS:
            continue      # undefined with one sample per class (test below)
        assert got[m] == pytest.approx(ref[m], rel=1e-9, abs=1e-12), m


def test_one_sample_per_class_leaves_the_within_class_metrics_undefined():
    """With K = 1 the dense formulas give nc1 = cdnv = 0 whatever the features: no finding, so None."""
    h = np.random.default_rng(3).standard_normal((5, 1, 8))
    assert dense_reference(h)["nc1"] == 0 and dense_reference(h)["cdnv"] == 0
    got = collapse_metrics(h)
    assert {m for m in METRICS if got[m] is None} == set(WITHIN_CLASS) == {"nc1", "cdnv"}
    assert collapse_metrics(np.repeat(h, 2, axis=1))["nc1"] == 0.0    # K = 2, all at the mean: defined, 0


def test_features_at_their_means_give_zero_nc1_and_cdnv():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((6, 10))
    got = collapse_metrics(np.repeat(mu[:, None, :], 5, axis=1))
    assert got["nc1"] < 1e-25 and got["cdnv"] < 1e-25   # 0 up to the rounding of the means
    assert got["nc2"] > 0.1     # random means are far from an ETF


def test_simplex_etf_gives_zero_nc2_family():
    rng = np.random.default_rng(1)
    mu = simplex_etf(5, 12, rng) + rng.standard_normal(12)       # shifted ETF
    h = mu[:, None, :] + 0.01 * rng.standard_normal((5, 8, 12))
    h -= h.mean(axis=1, keepdims=True) - mu[:, None, :]          # class means exactly mu
    got = collapse_metrics(h)
    for m in ("nc2", "nc2_unit", "equiangle", "equinorm"):
        assert abs(got[m]) < 1e-12, m
    assert 0 < got["nc1"] < 1e-3


def test_nc2_differs_from_nc2_unit_when_norms_differ():
    """Unequal norms at ETF angles: nc2 sees them, nc2_unit and equiangle do not."""
    rng = np.random.default_rng(2)
    mu = simplex_etf(4, 6, rng)
    mu[0] *= 3
    got = collapse_metrics(np.repeat(mu[:, None, :], 2, axis=1))
    assert got["nc2"] > 0.1 and got["equinorm"] > 0.1


def test_invariant_to_shift_rotation_and_scale():
    rng = np.random.default_rng(3)
    h = rng.standard_normal((8, 5, 12))
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    moved = 7.5 * (h @ q) + rng.standard_normal(12) * 10
    a, b = collapse_metrics(h), collapse_metrics(moved)
    for m in METRICS:
        assert b[m] == pytest.approx(a[m], rel=1e-9), m


def test_null_directions_do_not_explode_nc1():
    """Means spanning only 2 of 3 directions: the third is dropped, not divided by ~0."""
    rng = np.random.default_rng(4)
    mu = np.zeros((3, 3)); mu[:, :2] = rng.standard_normal((3, 2))
    mu[:, 2] = 1e-9 * rng.standard_normal(3)                    # rounding-level third direction
    h = mu[:, None, :] + 0.1 * rng.standard_normal((3, 4, 3))
    h -= h.mean(axis=1, keepdims=True) - mu[:, None, :]
    got = collapse_metrics(h)
    assert got["nc1"] == pytest.approx(dense_reference(h)["nc1"], rel=1e-9)
    assert got["nc1"] < 10


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="features must be"):
        collapse_metrics(np.zeros((1, 5, 3)))
    with pytest.raises(ValueError, match="features must be"):
        collapse_metrics(np.zeros((5, 3)))


def test_a_stack_of_sets_gives_each_set_its_metrics():
    """(B, N, K, d) -> one dict per set, equal to the metrics of that set alone."""
    h = np.random.default_rng(5).standard_normal((2, 6, 3, 10))
    got = collapse_metrics(h)
    assert isinstance(got, list) and len(got) == 2
    for one, alone in zip(got, (collapse_metrics(h[0]), collapse_metrics(h[1]))):
        assert one == alone


def test_nc1_with_repeated_singular_values_agrees_with_dense_reference():
    """Class means on a simplex ETF: all N-1 singular values of H are equal, so the eigenvectors
    of G are any basis of one eigenspace; nc1 sums over it and must not depend on the choice."""
    rng = np.random.default_rng(6)
    mu = simplex_etf(7, 20, rng)
    h = mu[:, None, :] + 0.3 * rng.standard_normal((7, 5, 20))
    h -= h.mean(axis=1, keepdims=True) - mu[:, None, :]
    assert collapse_metrics(h)["nc1"] == pytest.approx(dense_reference(h)["nc1"], rel=1e-9)


def test_the_class_mean_plane_keeps_the_means_geometry():
    """Class means that lie in a plane keep their distances on it (the projection is an isometry
    there), whatever the plane and the dimension; points off the plane lose only their distance
    to it."""
    from scratchproto.plots import class_mean_plane
    rng = np.random.default_rng(3)
    way, shot, d = 4, 3, 9
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0]          # an orthonormal plane in R^9
    offset = rng.standard_normal(d)
    means2 = rng.standard_normal((way, 2)) * 5
    support = (means2[:, None, :] + 0.1 * rng.standard_normal((way, shot, 2))) @ basis.T + offset
    support -= support.mean(axis=1, keepdims=True) - (means2 @ basis.T + offset)[:, None, :]   # exact means
    query = rng.standard_normal((way * 2, d))
    z = np.concatenate([support.reshape(-1, d), query])
    xy = class_mean_plane(z, way, shot)
    got = xy[:way * shot].reshape(way, shot, 2).mean(axis=1)
    dist = lambda m: np.linalg.norm(m[:, None] - m[None], axis=-1)      # noqa: E731
    np.testing.assert_allclose(dist(got), dist(means2), rtol=1e-10)
    assert xy.shape == (way * shot + way * 2, 2)
