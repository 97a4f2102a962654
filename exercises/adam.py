"""Exercise: one Adam step, as PyTorch computes it (lesson 6).

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""
import numpy as np


def adam_step(p, g, m, v, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Step number t (1 for the first). Returns the new (p, m, v); leave the inputs unchanged."""
    raise NotImplementedError
