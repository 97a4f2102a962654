"""Exercise: NC1 and NC2 from features (lesson 7; the paper's Section 3.1.2, Eq. 3-4).

h: (N, K, d): K feature vectors of each of N classes. mu_n the class means, mu_G their mean.
    Sigma_W = 1/(NK) sum_n sum_k (h_nk - mu_n)(h_nk - mu_n)^T
    Sigma_B = 1/N    sum_n (mu_n - mu_G)(mu_n - mu_G)^T
    nc1 = (1/N) trace(Sigma_W Sigma_B^+)
    nc2 = || M M^T / ||M M^T||_F - (I - 11^T / N) / sqrt(N - 1) ||_F,  M the rows mu_n - mu_G
"""
import numpy as np

PINV_RCOND = None   # hint: Sigma_B has rank N - 1 at most; see the library's PINV_RTOL


def nc1(h):
    raise NotImplementedError


def nc2(h):
    raise NotImplementedError
