"""Exercise: convolution as im2col, forward and backward (lesson 2).

x: (N, H, W, C_in) channels-last; w: (C_out, C_in, k, k), PyTorch's layout; b: (C_out,).
Output size: Ho = (H + 2 * padding - k) // stride + 1, the same for Wo. The padding is zeros.
"""
import numpy as np


def im2col(x, k, stride=1, padding=0):
    """Every k x k patch of the (zero-padded) input as one row: (N * Ho * Wo, k * k * C_in).

    Rows in (n, output row, output column) order; within a row the patch's entries in
    (kernel row, kernel column, channel) order, channel fastest. Hint: one strided slice of the
    padded input per kernel offset (i, j) gives that offset's entry of every patch at once.
    """
    raise NotImplementedError


def conv_forward(x, w, b, stride=1, padding=0):
    """y = x * w + b: (N, Ho, Wo, C_out). Hint: im2col(x) @ W, with w rearranged to match the
    rows of im2col: (k, k, C_in, C_out) flattened to (k * k * C_in, C_out)."""
    raise NotImplementedError


def conv_backward(x, w, dout, stride=1, padding=0):
    """(dx, dw, db) for dout = dL/dy of shape (N, Ho, Wo, C_out).

    With cols = im2col(x) and y = cols @ W: dW = cols.T @ dy, dcols = dy @ W.T; then every row
    of dcols is added back into the patch it came from (col2im), and the padding is cut off.
    """
    raise NotImplementedError
