"""Self-grading exercises: the core pieces of the project, written by the student, checked here.

    python -m scratchproto.exercises list                  the exercises and their files
    python -m scratchproto.exercises check relu_maxpool    grade exercises/relu_maxpool.py
    python -m scratchproto.exercises check all             grade every exercise

Each exercise is a file in ``exercises/`` whose functions raise NotImplementedError until the
student writes them. A check runs three kinds of test on every function and says, for each
failure, which output or gradient is wrong, where and by how much:

* a known answer, small enough to work out by hand;
* a float64 finite-difference check of every gradient (gradcheck.py), relative error < 1e-6;
* agreement with the library's own implementation on random inputs (the library is the
  solution: there are no solution files to leak).

All arrays are NumPy, images channels-last (N, H, W, C), conv weights (out, in, kh, kw), as in
the library.
"""
import argparse
import importlib.util
import pathlib
import sys

import numpy as np

from .gradcheck import numerical_gradient, relative_error

EXERCISES = {
    "relu_maxpool": "ReLU and 2x2 max-pooling, backward (lesson 1)",
    "conv": "convolution by im2col, forward and backward (lesson 2)",
    "batchnorm": "BatchNorm backward in training mode (lesson 3)",
    "protonet_loss": "the ProtoNet loss and its backward (lesson 5)",
    "collapse": "NC1 and NC2 from features (lesson 7)",
    "adam": "one Adam step (lesson 6)",
}
FOLDER = pathlib.Path(__file__).resolve().parents[1] / "exercises"
TOL = 1e-6   # float64 central differences with h = 1e-6 agree to ~1e-9 on these functions


class Failed(Exception):
    """One check did not pass; the message says what is wrong."""


def compare(name, got, want, atol=1e-9, rtol=1e-7):
    """Raise Failed, saying where and by how much, unless ``got`` matches ``want``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise Failed(f"{name} has shape {got.shape}, expected {want.shape}")
    bad = ~np.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, np.abs(got - want), -1)), got.shape)
        raise Failed(f"{name} is wrong at {bad.sum()} of {bad.size} entries; the worst is at index "
                     f"{tuple(int(i) for i in worst)}: {got[worst]:.6g}, expected {want[worst]:.6g}")


def gradient(name, analytic, loss, x):
    """Raise Failed unless ``analytic`` is dloss/dx by central differences (float64)."""
    numeric = numerical_gradient(loss, x)
    if np.shape(analytic) != x.shape:
        raise Failed(f"{name} has shape {np.shape(analytic)}, expected {x.shape}")
    err = relative_error(analytic, numeric)
    if not err < TOL:
        a, n = np.asarray(analytic, dtype=np.float64), np.asarray(numeric, dtype=np.float64)
        worst = np.unravel_index(np.argmax(np.abs(a - n)), a.shape)
        ratio = f"{a[worst] / n[worst]:.3g}" if n[worst] != 0 else "undefined (the true value is 0)"
        raise Failed(f"{name} disagrees with finite differences: relative error {err:.2e} (must be "
                     f"below {TOL:.0e}); the worst entry is at index {tuple(int(i) for i in worst)}: "
                     f"{a[worst]:.6g} against {n[worst]:.6g}, a ratio of {ratio} (a ratio of 2 or "
                     f"0.5 points at a term counted twice or missing, -1 at a flipped sign)")


# -- the library's answers, in the exercises' signatures --------------------------------------

def _library():
    from . import layers, optim, protonet
    from .collapse import collapse_metrics

    def with_layer(layer, x, dout):
        layer.forward(x, train=True)
        return layer.backward(dout)

    def conv_layer(w, b, stride, padding):
        layer = layers.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride, padding, bias=True, dtype=np.float64)
        layer.params["weight"][...] = w
        layer.params["bias"][...] = b
        return layer

    def conv_backward(x, w, dout, stride=1, padding=0):
        layer = conv_layer(w, np.zeros(w.shape[0]), stride, padding)
        layer.forward(x)
        dx = layer.backward(dout)
        return dx, layer.grads["weight"], layer.grads["bias"]

    def im2col(x, k, stride=1, padding=0):
        layer = conv_layer(np.zeros((1, x.shape[3], k, k)), np.zeros(1), stride, padding)
        layer.forward(x)
        return layer.cache.cols.copy()

    def batchnorm_backward(x, gamma, dout, eps=1e-5):
        bn = layers.BatchNorm2d(x.shape[-1], eps=eps, dtype=np.float64)
        bn.params["weight"][...] = gamma
        bn.forward(x, train=True)
        dx = bn.backward(dout)
        return dx, bn.grads["weight"], bn.grads["bias"]

    def protonet_loss(z, way, shot, query):
        loss, _, dz = protonet.protonet_loss(z, way, shot, query)
        return loss, dz

    class _Net:      # the least Adam needs: named parameters and their gradients
        xp = np

        def __init__(self, p, g):
            self.p, self.g = p, g

        def named_parameters(self):
            yield "p", self.p, self.g

    def adam_step(p, g, m, v, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        p = p.copy()
        net = _Net(p, g)
        opt = optim.Adam(net, lr=lr, betas=betas, eps=eps)
        opt.m["p"][...], opt.v["p"][...], opt.t = m, v, t - 1
        opt.step()
        return p, opt.m["p"], opt.v["p"]

    return {
        "relu_backward": lambda x, dout: with_layer(layers.ReLU(dtype=np.float64), x, dout),
        "maxpool_backward": lambda x, dout: with_layer(layers.MaxPool2d(2, dtype=np.float64), x, dout),
        "im2col": im2col,
        "conv_forward": lambda x, w, b, stride=1, padding=0: conv_layer(w, b, stride, padding).forward(x),
        "conv_backward": conv_backward,
        "batchnorm_backward": batchnorm_backward,
        "protonet_loss": protonet_loss,
        "nc1": lambda h: collapse_metrics(h)["nc1"],
        "nc2": lambda h: collapse_metrics(h)["nc2"],
        "adam_step": adam_step,
    }


# -- the checks, one function per exercise: f is the student's module (or the library) ----------

def check_relu_maxpool(f, lib):
    rng = np.random.default_rng(0)
    yield "relu_backward: known answer", lambda: compare(
        "dx", f.relu_backward(np.array([-1.0, 0.5, 2.0, -3.0]), np.array([10.0, 20.0, 30.0, 40.0])),
        [0.0, 20.0, 30.0, 0.0])

    # lesson 1's convention at the kink: x = 0 passes no gradient (x >= 0 would pass every other check)
    yield "relu_backward: known answer at x = 0 (no gradient there)", lambda: compare(
        "dx", f.relu_backward(np.array([0.0, -0.0, 1e-300]), np.array([5.0, 6.0, 7.0])), [0.0, 0.0, 7.0])

    def relu_fd():
        x = rng.standard_normal((2, 3, 3, 2))
        r = rng.standard_normal(x.shape)
        gradient("relu_backward's dx", f.relu_backward(x, r), lambda: (np.maximum(x, 0) * r).sum(), x)
    yield "relu_backward: finite differences", relu_fd
    # a 2x2 window with a tie: the gradient goes to the first maximum (row-major), as in PyTorch
    tie = np.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)
    yield "maxpool_backward: known answer (a tie)", lambda: compare(
        "dx", f.maxpool_backward(tie, np.full((1, 1, 1, 1), 5.0)), np.array([[0, 5.0], [0, 0]]).reshape(1, 2, 2, 1))

    def pool(x):
        n, h, w, c = x.shape
        return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    def maxpool_fd():
        x = rng.standard_normal((2, 5, 4, 3))     # odd height: the last row is dropped (floor)
        r = rng.standard_normal((2, 2, 2, 3))
        gradient("maxpool_backward's dx", f.maxpool_backward(x, r), lambda: (pool(x) * r).sum(), x)
    yield "maxpool_backward: finite differences", maxpool_fd

    def maxpool_lib():
        x = np.round(rng.standard_normal((3, 6, 6, 2)))      # rounded: many ties
        r = rng.standard_normal((3, 3, 3, 2))
        compare("dx", f.maxpool_backward(x, r), lib["maxpool_backward"](x, r))
    yield "maxpool_backward: agrees with the library (many ties)", maxpool_lib


def check_conv(f, lib):
    rng = np.random.default_rng(1)
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    yield "im2col: known answer", lambda: compare(
        "cols", f.im2col(x, 2), [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    for stride, padding in ((1, 1), (2, 1), (2, 0)):
        def cols_lib(stride=stride, padding=padding):
            x = rng.standard_normal((2, 5, 6, 3))
            compare("cols", f.im2col(x, 3, stride, padding), lib["im2col"](x, 3, stride, padding))
        yield f"im2col: agrees with the library (stride {stride}, padding {padding})", cols_lib
    w_edge = np.array([[[[1.0, -1.0], [1.0, -1.0]]]])            # a vertical-edge filter
    yield "conv_forward: known answer", lambda: compare(
        "y", f.conv_forward(x, w_edge, np.array([0.5])), np.full((1, 2, 2, 1), -1.5))

    # two input channels, so that the weights' flattening order shows: channel 0's top-right tap
    # picks 2 and channel 1's bottom-left tap 30; weights flattened channel-first, or with rows and
    # columns swapped, pick other pixels
    x2 = np.stack([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]], axis=-1)[None]   # (1, 2, 2, 2)
    w2 = np.zeros((1, 2, 2, 2))
    w2[0, 0, 0, 1], w2[0, 1, 1, 0] = 1.0, 1.0
    yield "conv_forward: known answer, two input channels", lambda: compare(
        "y", f.conv_forward(x2, w2, np.array([0.5])), np.full((1, 1, 1, 1), 32.5))

    def conv_lib():
        x, w, b = rng.standard_normal((2, 6, 5, 3)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
        for s, p in ((1, 1), (2, 1)):
            compare(f"y (stride {s}, padding {p})", f.conv_forward(x, w, b, s, p), lib["conv_forward"](x, w, b, s, p))
    yield "conv_forward: agrees with the library", conv_lib
    # dx, dw and db each a check of its own: a wrong dx must not hide a wrong dw
    for stride, padding in ((1, 1), (2, 1)):
        x, w, b = rng.standard_normal((2, 5, 5, 2)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
        r = rng.standard_normal(lib["conv_forward"](x, w, b, stride, padding).shape)
        for i, (name, wrt) in enumerate((("dx", x), ("dw", w), ("db", b))):
            def conv_fd(i=i, name=name, wrt=wrt, x=x, w=w, b=b, r=r, stride=stride, padding=padding):
                grads = f.conv_backward(x, w, r, stride, padding)
                gradient(name, grads[i], lambda: (lib["conv_forward"](x, w, b, stride, padding) * r).sum(), wrt)
            yield f"conv_backward {name}: finite differences (stride {stride}, padding {padding})", conv_fd


def check_batchnorm(f, lib):
    rng = np.random.default_rng(2)
    # a known answer: a constant upstream gradient changes nothing after normalisation, so dx = 0
    x = rng.standard_normal((4, 2, 2, 3))
    yield "batchnorm_backward: known answer (dout constant -> dx = 0, dbeta = count)", lambda: (
        compare("dx", f.batchnorm_backward(x, np.ones(3), np.ones(x.shape))[0], np.zeros(x.shape)),
        compare("dbeta", f.batchnorm_backward(x, np.ones(3), np.ones(x.shape))[2], np.full(3, 16.0)))

    def bn(x, gamma, beta, eps=1e-5):
        mean = x.mean(axis=(0, 1, 2))
        var = x.var(axis=(0, 1, 2))
        return gamma * (x - mean) / np.sqrt(var + eps) + beta

    xb, gamma, beta = rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4), rng.standard_normal(4)
    rb = rng.standard_normal(xb.shape)
    for i, (name, wrt) in enumerate((("dx", xb), ("dgamma", gamma), ("dbeta", beta))):
        def bn_fd(i=i, name=name, wrt=wrt):
            grads = f.batchnorm_backward(xb, gamma, rb)
            gradient(name, grads[i], lambda: (bn(xb, gamma, beta) * rb).sum(), wrt)
        yield f"batchnorm_backward {name}: finite differences", bn_fd

    def bn_lib():
        x, gamma, r = rng.standard_normal((5, 2, 3, 3)), rng.standard_normal(3), rng.standard_normal((5, 2, 3, 3))
        for name, got, want in zip(("dx", "dgamma", "dbeta"), f.batchnorm_backward(x, gamma, r),
                                   lib["batchnorm_backward"](x, gamma, r)):
            compare(name, got, want)
    yield "batchnorm_backward: agrees with the library", bn_lib


def check_protonet_loss(f, lib):
    rng = np.random.default_rng(3)
    # 2-way 1-shot 1-query in 1-D: prototypes 0 and 3, queries at 0 and 3: p(right) = 1/(1+e^-9)
    z = np.array([[0.0], [3.0], [0.0], [3.0]])
    yield "protonet_loss: known answer", lambda: compare(
        "loss", f.protonet_loss(z, 2, 1, 1)[0], np.log1p(np.exp(-9.0)))

    def fd():
        way, shot, query = 3, 2, 2
        z = rng.standard_normal((way * (shot + query), 4))
        loss, dz = f.protonet_loss(z, way, shot, query)
        compare("loss", loss, lib["protonet_loss"](z, way, shot, query)[0])
        gradient("dz", dz, lambda: lib["protonet_loss"](z, way, shot, query)[0], z)
    yield "protonet_loss: agrees with the library, and dz with finite differences", fd

    def dz_rows():
        way, shot, query = 3, 2, 2
        z = rng.standard_normal((way * (shot + query), 4))
        got, want = f.protonet_loss(z, way, shot, query)[1], lib["protonet_loss"](z, way, shot, query)[1]
        compare("dz's shape", np.shape(got), np.shape(want))
        wrong = ~np.isclose(got, want, atol=1e-9, rtol=1e-7).all(axis=1)
        if wrong.any():
            n_s = way * shot
            raise Failed(f"dz is wrong in {wrong[:n_s].sum()} of the {n_s} support rows (rows 0 to {n_s - 1}: "
                         f"their gradient comes through the prototypes) and {wrong[n_s:].sum()} of the "
                         f"{len(z) - n_s} query rows (rows {n_s} to {len(z) - 1}: through their distances)")
    yield "protonet_loss: dz row by row, support and query", dz_rows


def check_collapse(f, lib):
    rng = np.random.default_rng(4)
    # a simplex ETF in the plane (3 classes at 120 degrees), samples at the means: nc1 = nc2 = 0
    angles = np.deg2rad([90, 210, 330])
    etf = np.stack([np.cos(angles), np.sin(angles)], axis=1)[:, None, :].repeat(2, axis=1)
    yield "nc1, nc2: known answer (a collapsed simplex)", lambda: (
        compare("nc1", f.nc1(etf), 0.0), compare("nc2", f.nc2(etf), 0.0))
    for n, k, d in ((5, 4, 8), (6, 3, 3)):
        def agree(n=n, k=k, d=d):
            h = rng.standard_normal((n, k, d))
            compare("nc1", f.nc1(h), lib["nc1"](h))
            compare("nc2", f.nc2(h), lib["nc2"](h))
        yield f"nc1, nc2: agree with the library (N={n}, K={k}, d={d})", agree


def check_adam(f, lib):
    rng = np.random.default_rng(5)
    # the first step moves every parameter by lr against the sign of its gradient
    p, g = np.array([1.0, -2.0, 0.5]), np.array([0.3, -4.0, 1e-3])
    yield "adam_step: known answer (step 1 moves by lr * sign(g))", lambda: compare(
        "p", f.adam_step(p, g, np.zeros(3), np.zeros(3), 1, lr=0.1)[0], p - 0.1 * np.sign(g), rtol=1e-5)

    def agree():
        p, g, m, v = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5), rng.random(5)
        before = [a.copy() for a in (p, g, m, v)]
        got = f.adam_step(p, g, m, v, 7)
        for name, a, b in zip(("p", "g", "m", "v"), (p, g, m, v), before):
            if not np.array_equal(a, b):
                raise Failed(f"adam_step changed its input {name}: return new arrays instead")
        for name, got, want in zip(("p", "m", "v"), got, lib["adam_step"](*before, 7)):
            compare(name, got, want)
    yield "adam_step: agrees with the library at step 7", agree


CHECKS = {name: globals()[f"check_{name}"] for name in EXERCISES}


# -- running them --------------------------------------------------------------------------

def load(name, folder=FOLDER):
    """The student's module exercises/<name>.py."""
    path = pathlib.Path(folder) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"exercise_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def library_module():
    """The library's implementations as a module-like object: what the exercises must match."""
    return argparse.Namespace(**_library())


def grade(name, module):
    """Run every check of exercise ``name`` on ``module``; returns [(check, None or message)]."""
    lib = _library()
    results = []
    for title, run in CHECKS[name](module, lib):
        try:
            run()
            results.append((title, None))
        except NotImplementedError:
            results.append((title, "not written yet (the function still raises NotImplementedError)"))
        except Failed as e:
            results.append((title, str(e)))
        except Exception as e:          # the student's code crashed: say how, not a traceback
            results.append((title, f"raised {type(e).__name__}: {e}"))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m scratchproto.exercises", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises")
    c = sub.add_parser("check", help="grade an exercise")
    c.add_argument("name", choices=[*EXERCISES, "all"])
    c.add_argument("--folder", default=str(FOLDER), help="where the exercise files are (default: %(default)s)")
    c.add_argument("--library", action="store_true", help="grade the library's own implementations")
    args = p.parse_args(argv)
    if args.command == "list":
        for name, what in EXERCISES.items():
            print(f"{name:14} exercises/{name}.py  {what}")
        return 0
    failed = 0
    for name in EXERCISES if args.name == "all" else [args.name]:
        try:
            module = library_module() if args.library else load(name, args.folder)
        except Exception as e:        # missing, or not Python yet: a FAIL, and the others are graded
            where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
            print(f"FAIL  {name}: exercises/{name}.py could not be loaded: {type(e).__name__}{where}: "
                  f"{e.msg if isinstance(e, SyntaxError) else e}")
            failed += 1
            continue
        for title, problem in grade(name, module):
            print(f"{'PASS' if problem is None else 'FAIL'}  {name}: {title}" + (f"\n      {problem}" if problem else ""))
            failed += problem is not None
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
