"""Exercise: ReLU and max-pooling, backward (lesson 1).

Images are channels-last: x has shape (N, H, W, C). Write the two backward passes; the forward
passes are given below so that you can see exactly what they differentiate.
"""
import numpy as np


def relu_forward(x):
    return np.maximum(x, 0)


def relu_backward(x, dout):
    """dL/dx of y = max(x, 0), given x and dL/dy (both of x's shape)."""
    raise NotImplementedError


def maxpool_forward(x):
    """2x2 max-pooling, stride 2, floor mode: (N, H, W, C) -> (N, H//2, W//2, C)."""
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def maxpool_backward(x, dout):
    """dL/dx of maxpool_forward(x), given x (N, H, W, C) and dL/dy (N, H//2, W//2, C).

    Each output took one input of its window: its gradient goes there and nowhere else. When
    several inputs of a window equal the maximum (common after a ReLU), the gradient goes to the
    first of them in row-major order (top-left, top-right, bottom-left, bottom-right), as in
    PyTorch. Rows and columns that the floor mode drops get zero gradient.
    """
    raise NotImplementedError
