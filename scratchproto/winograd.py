"""Winograd's minimal filtering F(4x4, 3x3): a 3x3 stride-1 convolution with 36 multiplications
per 4x4 block of outputs, input channel and output channel, where im2col's GEMM makes 144
(Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").

For one channel, a 6x6 tile d of the padded input (tiles start every 4 pixels, so neighbours
overlap by 2) and a 3x3 filter g, the tile's 4x4 outputs are

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* elementwise, 6x6)

with the constant matrices B^T, G, A^T below (interpolation points 0, 1, -1, 2, -2 and
infinity). The sum over input channels moves inside the bracket, so for each of the 36 entries
xi of the transformed tile it is one GEMM: M[xi] = V[xi] @ U[xi], with V[xi] (tiles, C_in) the
transformed input and U[xi] (C_in, C_out) the transformed filters. Outputs of neighbouring
tiles do not overlap.

Each 2-D transform X -> P X Q^T of a tile is one matrix-vector product with the Kronecker
product kron(P, Q) on the tile flattened (row a, column b at 6a + b). Laid out tap-first, the
tiles of a whole chunk of images, D (36, tiles * C), take one GEMM per transform:
V = kron(B^T, B^T) D, Y = kron(A^T, A^T) M, U = kron(G, G) g. The coefficients are not all
+-1 (B^T holds 4 and -5, A^T 8), so a transform done as NumPy passes, one per term over
strided views, would cost several times the GEMM that does it here.

The backward pass is the exact gradient of that arithmetic: dM = kron(A^T, A^T)^T dY,
dV[xi] = dM[xi] U[xi]^T, dU[xi] = V[xi]^T dM[xi], dD = kron(B^T, B^T)^T dV added back where
the tiles overlap (``untiles``), dg = kron(G, G)^T dU. In exact arithmetic all of it equals the
convolution and its gradients. In float32 it rounds worse than im2col's sums: a row of
kron(B^T, B^T) adds up to 100 times an input's size, one of kron(A^T, A^T) 361 times, and G's
sixths are not exact in binary, so the outputs carry some 20 times im2col's relative error
(1.4e-5 against 5e-7 of the largest output at ResNet-18's layer sizes, benchmarks/README.md;
tests/test_fast.py holds the bound).

The arrays are (N, H, W, C) as everywhere in scratchproto. Ty = ceil(H / 4) tiles of outputs
down, Tx = ceil(W / 4) across, on an input padded by one pixel at the top and left and by
4 Ty - H + 1 (4 Tx - W + 1) at the bottom (right): a size that is not a multiple of 4 computes
spare outputs, which are dropped.
"""
import numpy as np

BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])    # V = B^T d B
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])           # U = G g G^T
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])   # Y = A^T M A
KB, KG, KA = np.kron(BT, BT), np.kron(G, G), np.kron(AT, AT)     # (36, 36), (36, 9), (16, 36)


def tiles(xp, xpad, ty, tx, out):
    """The 6x6 tiles of xpad (N, 4Ty+2, 4Tx+2, C), one every 4 pixels, tap-first into out
    (36, N, Ty, Tx, C): one copy from a strided view. Returns out."""
    n, c = len(xpad), xpad.shape[3]
    s0, s1, s2, s3 = xpad.strides
    view = xp.lib.stride_tricks.as_strided(xpad, (6, 6, n, ty, tx, c), (s1, s2, s0, 4 * s1, 4 * s2, s3))
    out.reshape(6, 6, n, ty, tx, c)[...] = view
    return out


def untiles(xp, dD, ty, tx, dxpad):
    """The adjoint of ``tiles``: dxpad (N, 4Ty+2, 4Tx+2, C) = the sum of the tiles dD (36, N, Ty,
    Tx, C) put back where they were taken (neighbours overlap by 2 rows or columns). Returns dxpad."""
    d = dD.reshape(6, 6, *dD.shape[1:])
    dxpad[:, 4 * ty:] = dxpad[:, :, 4 * tx:] = 0     # the last two rows and columns: only added to
    for a in range(6):                  # taps a, b < 4 cover rows and columns 0 .. 4T-1 once, and come first
        for b in range(6):
            at = (slice(None), slice(a, a + 4 * ty - 3, 4), slice(b, b + 4 * tx - 3, 4))
            if a < 4 and b < 4:
                dxpad[at] = d[a, b]
            else:
                dxpad[at] += d[a, b]
    return dxpad


def filter_transform(xp, wmat):
    """U = G g G^T for every filter of im2col's weight matrix wmat (9*C_in, C_out) (rows in
    (kernel row, kernel column, channel) order) -> (36, C_in, C_out): one product with kron(G, G)."""
    c, k = wmat.shape[0] // 9, wmat.shape[1]
    return (xp.asarray(KG, dtype=wmat.dtype) @ wmat.reshape(9, c * k)).reshape(36, c, k)


def filter_grad(xp, dU_t):
    """dg = G^T dU G for dU given transposed, dU_t (36, C_out, C_in), the adjoint of
    filter_transform, straight into the weights' layout (C_out, C_in, 3, 3)."""
    _, k, c = dU_t.shape
    return (dU_t.reshape(36, k * c).T @ xp.asarray(KG, dtype=dU_t.dtype)).reshape(k, c, 3, 3)
