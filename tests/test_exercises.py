"""The exercise checker: the library passes every check, the untouched stubs and a deliberately
broken variant of each exercise fail, with the message a student would see."""
import argparse
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from scratchproto import exercises as ex


def failures(name, module):
    return {title: problem for title, problem in ex.grade(name, module) if problem is not None}


@pytest.mark.parametrize("name", list(ex.EXERCISES))
def test_the_library_passes_and_the_stubs_say_not_written(name):
    assert failures(name, ex.library_module()) == {}
    stub = failures(name, ex.load(name))
    assert stub and all("not written yet" in problem for problem in stub.values())


def broken(**replace):
    return argparse.Namespace(**{**vars(ex.library_module()), **replace})


def _im2col_channel_first(x, k, stride=1, padding=0):
    """The classic mistake: patch entries in (channel, row, column) order."""
    cols = ex.library_module().im2col(x, k, stride, padding)
    c = x.shape[3]
    return cols.reshape(-1, k, k, c).transpose(0, 3, 1, 2).reshape(cols.shape)


def _conv_weights_channel_first(x, w, b, stride=1, padding=0):
    """The classic mistake: weights flattened (in, row, column), patches (row, column, in)."""
    lib = ex.library_module()
    cols = lib.im2col(x, w.shape[2], stride, padding)
    y = cols @ w.reshape(w.shape[0], -1).T + b
    return y.reshape(lib.conv_forward(x, w, b, stride, padding).shape)


def _bn_without_the_statistics(x, gamma, dout, eps=1e-5):
    """Differentiates as if mean and variance were constants (right only in evaluation mode)."""
    dx, dgamma, dbeta = ex.library_module().batchnorm_backward(x, gamma, dout, eps)
    return gamma / np.sqrt(x.var(axis=(0, 1, 2)) + eps) * dout, dgamma, dbeta


def _pool_to_every_tie(x, dout):
    n, h, w, c = x.shape
    windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
    mask = windows == windows.max(axis=(2, 4), keepdims=True)
    return (mask * dout[:, :, None, :, None, :]).reshape(x.shape)


def _adam_without_bias_correction(p, g, m, v, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    return p - lr * m / (np.sqrt(v) + eps), m, v


@pytest.mark.parametrize("name,variant,check,message", [
    ("relu_maxpool", broken(relu_backward=lambda x, dout: dout), "relu_backward: known answer",
     "dx is wrong at 2 of 4 entries; the worst is at index (3,): 40, expected 0"),
    ("relu_maxpool", broken(maxpool_backward=_pool_to_every_tie), "maxpool_backward: known answer (a tie)",
     "dx is wrong at 1 of 4 entries; the worst is at index (0, 1, 0, 0): 5, expected 0"),
    ("conv", broken(im2col=_im2col_channel_first), "im2col: agrees with the library (stride 1, padding 1)",
     "cols is wrong at"),
    ("conv", broken(conv_backward=lambda x, w, dout, stride=1, padding=0: (
        np.zeros(x.shape), *ex.library_module().conv_backward(x, w, dout, stride, padding)[1:])),
     "conv_backward dx: finite differences (stride 1, padding 1)",
     "dx disagrees with finite differences: relative error 1.00e+00 (must be below 1e-06)"),
    ("conv", broken(conv_forward=_conv_weights_channel_first), "conv_forward: known answer, two input channels",
     "y is wrong at 1 of 1 entries; the worst is at index (0, 0, 0, 0): 14.5, expected 32.5"),
    ("relu_maxpool", broken(relu_backward=lambda x, dout: dout * (x >= 0)), "relu_backward: known answer at x = 0 (no gradient there)",
     "dx is wrong at 2 of 3 entries"),
    ("protonet_loss", broken(protonet_loss=lambda z, w, s, q: (lambda l, dz: (l, dz * np.r_[np.ones(w * s), -np.ones(w * q)][:, None]))(
        *ex.library_module().protonet_loss(z, w, s, q))),
     "protonet_loss: dz row by row, support and query", "dz is wrong in 0 of the 6 support rows"),
    ("batchnorm", broken(batchnorm_backward=_bn_without_the_statistics), "batchnorm_backward dx: finite differences",
     "dx disagrees with finite differences"),
    ("protonet_loss", broken(protonet_loss=lambda z, w, s, q: (lambda l, dz: (l, dz / 2))(
        *ex.library_module().protonet_loss(z, w, s, q))),
     "protonet_loss: agrees with the library, and dz with finite differences",
     "dz disagrees with finite differences: relative error 5.00e-01"),
    ("protonet_loss", broken(protonet_loss=lambda z, w, s, q: (lambda l, dz: (l, dz / 2))(
        *ex.library_module().protonet_loss(z, w, s, q))),
     "protonet_loss: agrees with the library, and dz with finite differences", "a ratio of 0.5 (a ratio of 2 or"),
    ("protonet_loss", broken(protonet_loss=lambda z, w, s, q: (lambda l, dz: (l, -dz))(
        *ex.library_module().protonet_loss(z, w, s, q))),
     "protonet_loss: agrees with the library, and dz with finite differences", "a ratio of -1 (a ratio of 2 or"),
    ("collapse", broken(nc1=lambda h: ex.library_module().nc1(h) * h.shape[0]),
     "nc1, nc2: agree with the library (N=5, K=4, d=8)", "nc1 is wrong at 1 of 1 entries"),
    ("adam", broken(adam_step=_adam_without_bias_correction), "adam_step: known answer (step 1 moves by lr * sign(g))",
     "p is wrong at 3 of 3 entries"),
])
def test_a_broken_variant_fails_with_a_message_that_says_what_is_wrong(name, variant, check, message):
    found = failures(name, variant)
    assert check in found, found
    assert found[check].startswith(message) or message in found[check], found[check]


def test_the_command_grades_and_sets_the_exit_status():
    cmd = [sys.executable, "-m", "scratchproto.exercises", "check"]
    p = subprocess.run(cmd + ["all", "--library"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and p.stdout.strip().endswith("all checks passed"), p.stdout + p.stderr
    p = subprocess.run(cmd + ["adam"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1 and "FAIL  adam: adam_step: known answer" in p.stdout
    assert "not written yet (the function still raises NotImplementedError)" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr


def test_a_missing_or_broken_file_is_one_fail_and_the_others_are_graded(tmp_path):
    """`check all` over a folder where one exercise is not Python yet and the rest are missing:
    one FAIL line each, no traceback, every exercise reported."""
    (tmp_path / "adam.py").write_text("def adam_step(p, g, m, v, t\n")       # a syntax error
    p = subprocess.run([sys.executable, "-m", "scratchproto.exercises", "check", "all", "--folder", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "FAIL  adam: exercises/adam.py could not be loaded: SyntaxError (line 1): " in p.stdout
    for name in ex.EXERCISES:
        assert f"FAIL  {name}: " in p.stdout


def test_a_wrong_dx_does_not_hide_dw_and_db():
    """A wrong dx (here a third of the right one: terms lost, as a col2im that assigns instead of
    adding loses them) does not hide dw and db: each is graded on its own, and they pass."""
    lib = ex.library_module()

    def col2im_assigning(x, w, dout, stride=1, padding=0):
        dx, dw, db = lib.conv_backward(x, w, dout, stride, padding)
        return dx / 3, dw, db          # what overwriting instead of adding does: too little in dx
    found = failures("conv", broken(conv_backward=col2im_assigning))
    assert "conv_backward dx: finite differences (stride 1, padding 1)" in found
    assert "a ratio of 0.333" in found["conv_backward dx: finite differences (stride 1, padding 1)"]
    for check in ("conv_backward dw: finite differences (stride 1, padding 1)",
                  "conv_backward db: finite differences (stride 2, padding 1)"):
        assert check not in found, found[check]
