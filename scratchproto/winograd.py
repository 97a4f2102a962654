"""Winograd's minimal filtering F(2x2, 3x3): a 3x3 stride-1 convolution with 16 multiplications
per 2x2 block of outputs, input channel and output channel, where im2col's GEMM makes 36
(Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").

For one channel, a 4x4 tile d of the padded input (tiles start every 2 pixels, so neighbours
overlap by 2) and a 3x3 filter g, the tile's 2x2 outputs are

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, 4x4)

with the constant matrices B^T, G, A^T below. The sum over input channels moves inside the
bracket, so for each of the 16 entries xi of the 4x4 transformed tile it is one GEMM:
M[xi] = V[xi] @ U[xi], with V[xi] (tiles, C_in) the transformed input and U[xi] (C_in, C_out)
the transformed filters. Outputs of neighbouring tiles do not overlap.

The backward pass is the exact gradient of that arithmetic: dM = A dY A^T per tile,
dV[xi] = dM[xi] U[xi]^T, dU[xi] = V[xi]^T dM[xi], dd = B dV B^T added back where the tiles
overlap, dg = G^T dU G. In exact arithmetic all of it equals the convolution and its gradients;
in floating point the transforms round differently from im2col's sums.

B^T and A^T hold only 0 and +-1, so every transform of a tile is a few additions, made here on
whole arrays: along one image axis and then the other (each transform is a product of a
matrix on the rows and one on the columns), one ufunc per term (``signed_sum``). The arrays
are (N, H, W, C) as everywhere in scratchproto; transformed arrays are (16, N, Ty, Tx, C),
entry xi = 4 i + j for row i and column j of the transformed tile. Sizes are even: Ty = H / 2
tiles of outputs down, Tx = W / 2 across, on an input padded by one pixel.
"""
import numpy as np

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])    # V = B^T d B
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])       # U = G g G^T
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])                                 # Y = A^T M A
GG = np.kron(G, G)      # (16, 9): G g G^T of a filter g flattened, as one matrix product


def signed_sum(xp, coefs, parts, out, accumulate=False):
    """out = sum_j coefs[j] * parts[j] (out += ... with ``accumulate``), for coefficients in
    {-1, 0, 1}: one ufunc per term, no temporaries."""
    terms = sorted([(c, p) for c, p in zip(coefs, parts) if c], key=lambda t: -t[0])   # a +1 first
    if not accumulate:
        (c0, p0), terms = terms[0], terms[1:]
        if not terms:
            if c0 > 0:
                xp.copyto(out, p0)
            else:
                xp.negative(p0, out=out)
            return out
        c1, p1 = terms.pop(0)
        if c0 > 0:
            (xp.add if c1 > 0 else xp.subtract)(p0, p1, out=out)
        else:                           # both negative (terms are sorted): -(p0 + p1)
            xp.negative(xp.add(p0, p1, out=out), out=out)
    for c, p in terms:
        (xp.add if c > 0 else xp.subtract)(out, p, out=out)
    return out


def _taps(a, axis, s, n):
    """The view of a at positions 2t + s, t = 0..n-1, along ``axis``: tap s of n tiles."""
    at = [slice(None)] * a.ndim
    at[axis] = slice(s, s + 2 * n - 1, 2)
    return a[tuple(at)]


def gather(xp, T, a, axis, n, outs):
    """outs[j] = sum_s T[j, s] a[2t + s] along ``axis`` for n tiles t: a transform of tiles that
    start every 2 positions (T: (4, 4) for input tiles, which overlap; (4, 2) for output tiles)."""
    for j, row in enumerate(T):
        signed_sum(xp, row, [_taps(a, axis, s, n) for s in range(T.shape[1])], outs[j])


def scatter(xp, T, parts, a, axis, n):
    """a[2t + s] = sum_j T[j, s] parts[j][t] along ``axis``, the adjoint of ``gather``: where
    tiles overlap (T with 4 columns) the overlapping contributions are added."""
    taps = T.shape[1]
    for s in range(min(taps, 2)):       # positions 0 .. 2n-1, each written once
        signed_sum(xp, T[:, s], parts, _taps(a, axis, s, n))
    if taps > 2:                        # the overlap: positions 2 .. 2n+1, added
        edge = [slice(None)] * a.ndim
        edge[axis] = slice(2 * n, 2 * n + 2)
        a[tuple(edge)] = 0
        for s in range(2, taps):
            signed_sum(xp, T[:, s], parts, _taps(a, axis, s, n), accumulate=True)


def input_transform(xp, xpad, ty, tx, V, tmp):
    """V = B^T d B for every 4x4 tile d of xpad (N, 2Ty+2, 2Tx+2, C), into V (16, N, Ty, Tx, C);
    tmp: scratch (4, N, 2Ty+2, Tx, C)."""
    gather(xp, BT, xpad, 2, tx, tmp)
    for j in range(4):
        gather(xp, BT, tmp[j], 1, ty, V[j::4])


def output_transform(xp, M, ty, tx, y, tmp):
    """y = A^T M A for every tile, M (16, N, Ty, Tx, K) -> y (N, 2Ty, 2Tx, K); tmp: scratch
    (4, N, 2Ty, Tx, K)."""
    for j in range(4):
        scatter(xp, AT.T, M[j::4], tmp[j], 1, ty)
    scatter(xp, AT.T, tmp, y, 2, tx)


def output_grad(xp, dy, ty, tx, dM, tmp):
    """dM = A dY A^T for every 2x2 tile dY of dy (N, 2Ty, 2Tx, K), into dM (16, N, Ty, Tx, K):
    the adjoint of output_transform; tmp: scratch (4, N, 2Ty, Tx, K)."""
    gather(xp, AT.T, dy, 2, tx, tmp)
    for j in range(4):
        gather(xp, AT.T, tmp[j], 1, ty, dM[j::4])


def input_grad(xp, dV, ty, tx, dxpad, tmp):
    """dd = B dV B^T for every tile, added where tiles overlap, into dxpad (N, 2Ty+2, 2Tx+2, C):
    the adjoint of input_transform; tmp: scratch (4, N, 2Ty+2, Tx, C)."""
    for j in range(4):
        scatter(xp, BT, dV[j::4], tmp[j], 1, ty)
    scatter(xp, BT, tmp, dxpad, 2, tx)


def filter_transform(xp, w):
    """U = G g G^T for every filter of w (3, 3, C_in, C_out) (the taps first, as im2col's weight
    matrix has them) -> (16, C_in, C_out): one product with the 16 x 9 matrix kron(G, G), whose
    row 4i + j holds G[i, a] G[j, b] at column 3a + b."""
    c, k = w.shape[2:]
    return (xp.asarray(GG, dtype=w.dtype) @ w.reshape(9, c * k)).reshape(16, c, k)


def filter_grad(xp, dU_t):
    """dg = G^T dU G for dU given transposed, dU_t (16, C_out, C_in), the adjoint of
    filter_transform, straight into the weights' layout (C_out, C_in, 3, 3): (C_out*C_in, 16)
    times kron(G, G), whose column 3a + b holds G[i, a] G[j, b] at row 4i + j."""
    _, k, c = dU_t.shape
    return (dU_t.reshape(16, k * c).T @ xp.asarray(GG, dtype=dU_t.dtype)).reshape(k, c, 3, 3)
