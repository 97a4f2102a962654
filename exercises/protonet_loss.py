"""Exercise: the ProtoNet loss and its backward (lesson 5; the paper's Eq. 1-2).

z: (way * shot + way * query, d) embeddings, the support rows first, then the query rows, both
class-major (the first `shot` support rows are class 0, ...; likewise the queries).
    prototypes c_n = mean of class n's support embeddings                          (Eq. 1)
    d_in = ||z_i - c_n||^2 for each query i;  p(n | i) = softmax_n(-d_in)          (Eq. 2)
    loss = mean over the queries of -log p(y_i | i)
"""
import numpy as np


def protonet_loss(z, way, shot, query):
    """Returns (loss: float, dz: array of z's shape)."""
    raise NotImplementedError
