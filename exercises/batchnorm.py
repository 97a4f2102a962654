"""Exercise: BatchNorm backward in training mode (lesson 3).

x: (N, H, W, C). Per channel, over the N * H * W values m of the batch:
    mean = x.mean(), var = x.var() (biased), xhat = (x - mean) / sqrt(var + eps),
    y = gamma * xhat + beta.
In training mode mean and var depend on x too: the gradient must go through them.
"""
import numpy as np


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def batchnorm_backward(x, gamma, dout, eps=1e-5):
    """(dx, dgamma, dbeta) for dout = dL/dy (N, H, W, C); gamma (C,).

    Derive it on paper first (lesson 3 walks through the computation graph); the compact result
    fits in one line per output.
    """
    raise NotImplementedError
