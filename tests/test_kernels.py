"""kernels.py: the twins against the library's BatchNorm, the fused block's kernel path on stand-in
kernels (so its plumbing is tested on any machine), the CUDA bodies through a C++ compiler, and,
on a GPU, every kernel against its twin."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from scratchproto import backend, fast, kernels
from scratchproto import layers as L

_cupy, _why = backend._cupy_or_reason()

F64 = np.float64


def _bn_forward_relu(x, gamma, beta, res=None):
    bn = L.BatchNorm2d(x.shape[-1], dtype=F64)
    bn.params["weight"][...], bn.params["bias"][...] = gamma, beta
    y = bn.forward(x, train=True)
    return bn, np.maximum(y + (res if res is not None else 0), 0)


def test_twins_agree_with_the_library_batchnorm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7, 6)) * 2 + 1          # odd sizes, 6 channels
    gamma, beta, res = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(x.shape)
    bn, want = _bn_forward_relu(x, gamma, beta, res)
    m = x.size // 6
    mean = kernels.channel_sum_twin(np, x) / m
    var = kernels.channel_sq_dev_twin(np, x, mean) / m
    inv_std = 1 / np.sqrt(var + 1e-5)
    xhat, out = kernels.bn_relu_twin(np, x.copy(), mean, inv_std, gamma, beta, res)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xhat, bn.cache.xhat, rtol=1e-12, atol=1e-12)
    d = rng.standard_normal(x.shape)
    want_dx = bn.backward(d)
    grads = np.zeros(6), np.zeros(6)
    dbeta, dgamma = kernels.channel_sum_twin(np, d), kernels.channel_dot_twin(np, d, xhat)
    consts = kernels.bn_backward_constants_twin(np, gamma, inv_std, dgamma, dbeta, m, True, grads)
    dx = kernels.bn_backward_twin(np, d, None, xhat, *consts)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[0], bn.grads["weight"], rtol=1e-12)
    np.testing.assert_allclose(grads[1], bn.grads["bias"], rtol=1e-12)
    # a ReLU before it (its output r), fused: the same as masking d first
    r = np.maximum(rng.standard_normal(x.shape), 0)
    d_through = kernels.relu_backward_twin(np, d, r)
    np.testing.assert_array_equal(d_through, d * (r > 0))
    sums = kernels.relu_sums_twin(np, d, r, xhat, 0.0, 1.0, 1.0)
    np.testing.assert_allclose(sums, (kernels.channel_sum_twin(np, d_through), kernels.channel_dot_twin(np, d_through, xhat)),
                               rtol=1e-12)
    consts = kernels.bn_backward_constants_twin(np, gamma, inv_std, sums[1], sums[0], m, True, grads)
    np.testing.assert_allclose(kernels.bn_backward_twin(np, d, r, xhat, *consts), bn.backward(d_through),
                               rtol=1e-10, atol=1e-12)
    assert not kernels.enabled(np)


StandIn = kernels.NumpyStandIn


def _assert_same(plain, quick, x, train, rng):
    """Forward, backward (input and every parameter gradient) and buffers agree to rounding."""
    plain.zero_grad()
    quick.zero_grad()
    y1, y2 = plain.forward(x, train), quick.forward(x, train)
    np.testing.assert_allclose(y2, y1, rtol=1e-10, atol=1e-12)
    r = rng.standard_normal(y1.shape)
    np.testing.assert_allclose(quick.backward(r), plain.backward(r), rtol=1e-9, atol=1e-11)
    for (name, a), (_, b) in zip(plain.named_modules(), quick.named_modules()):
        for k in a.grads:
            np.testing.assert_allclose(b.grads[k], a.grads[k], rtol=1e-9, atol=1e-10, err_msg=f"{name}.{k}")
        for k in a.buffers:
            np.testing.assert_allclose(b.buffers[k], a.buffers[k], rtol=1e-12, err_msg=f"{name}.{k}")


@pytest.mark.parametrize("c_in,c_out,stride", [(4, 4, 1), (3, 5, 2)])
def test_the_fused_block_on_its_kernel_path_matches_the_plain_block(monkeypatch, c_in, c_out, stride):
    monkeypatch.setattr(kernels, "enabled", lambda xp: True)
    monkeypatch.setattr(kernels, "_kernel", StandIn)
    rng = np.random.default_rng(5)
    plain = L.BasicBlock(c_in, c_out, stride, np.random.default_rng(1), dtype=F64)
    quick = fast.FastBasicBlock(c_in, c_out, stride, np.random.default_rng(1), dtype=F64)
    for (_, a), (_, b) in zip(plain.named_modules(), quick.named_modules()):
        for k in a.params:
            b.params[k][...] = a.params[k] = rng.standard_normal(a.params[k].shape)
    for train in (True, False):
        _assert_same(plain, quick, rng.standard_normal((3, 6, 6, c_in)), train, rng)


TYPES = {"float64": "double", "float32": "float", "int32": "int", "int64": "long long", "uint8": "unsigned char"}


def _cpp(name, ins, outs, body):
    """A C++ function with the kernel's parameters around its body: outputs by reference, raw
    arrays as pointers, and CuPy's element index i."""
    def params(spec, ref):
        out = []
        for p in spec.split(","):
            words = p.split()
            raw = words[0] == "raw"
            typ, var = words[-2:]
            typ = TYPES.get(typ, typ)
            out.append(f"{typ}{'*' if raw else '&' if ref else ''} {var}")
        return out
    signature = ", ".join(params(ins, False) + params(outs, True) + ["long long i"])
    as_float = re.sub(r"\bT\b", "float", signature)
    return (f"template <typename T> __device__ void {name}({signature}) {{\n{body}\n}}\n"
            f"template void {name}<float>({as_float});\n")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to check the CUDA bodies")
def test_every_cuda_body_compiles(tmp_path):
    """The fallback where NVRTC is missing (the NVRTC check below is the real one: g++ lets some
    CUDA mistakes through and refuses some correct CUDA): each body, in a function with the
    kernel's parameters, through g++ -fsyntax-only (the CUDA qualifier defined away)."""
    if _kernel_check_problem() is None:
        pytest.skip("NVRTC is here: test_every_kernel_compiles_as_cupy_would_for_hopper_and_ampere checks the kernels")
    src = ["#define __device__\n#include <cmath>\nusing std::sqrt;   // CUDA's device math, for the syntax\n"]
    for name, (ins, outs, body) in kernels.ELEMENTWISE.items():
        src.append(_cpp(name, ins, outs, body))
    reductions = [(name, (ins, kernels.PARTIAL[0], mapped, *kernels.PARTIAL[1:]))
                  for name, (ins, mapped) in kernels.REDUCTIONS.items()]
    reductions += [(f"channel_total_{dtype}", spec) for dtype, spec in kernels.TOTAL.items()]
    for name, (ins, out, mapped, reduce, post, identity) in reductions:
        body = (f"double a = ({mapped}); double b = ({identity}); a = ({reduce}); {post};")
        src.append(_cpp(name, ins, out, body))
    path = tmp_path / "kernels.cpp"
    path.write_text("".join(src))
    p = subprocess.run(["g++", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unused-variable", str(path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr + "".join(src)


@pytest.mark.skipif(_cupy is None, reason=f"no GPU path here: {_why}")
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_cupy_kernels_match_their_twins(monkeypatch, dtype, rtol):
    cp = _cupy
    monkeypatch.setenv(kernels.ENV, "1")
    assert kernels.enabled(cp)
    rng = np.random.default_rng(7)
    for shape in ((3, 5, 7, 6), (2, 9, 9, 13), (61, 1, 1, 3)):
        x = cp.asarray(rng.standard_normal(shape) * 3 + 1, dtype=dtype)
        w = cp.asarray(rng.standard_normal(shape), dtype=dtype)
        c = shape[-1]
        vec = [cp.asarray(rng.standard_normal(c), dtype=dtype) for _ in range(4)]
        vec[1] = cp.abs(vec[1]) + 0.5                           # inv_std > 0
        x[0, 0, 0] = x[0, 0, 1] if shape[2] > 1 else x[0, 0, 0]  # a tie, for good measure
        pairs = [
            (kernels.channel_sum(cp, x), kernels.channel_sum_twin(cp, x)),
            (kernels.channel_sum(cp, x, 1 / 7), kernels.channel_sum_twin(cp, x, 1 / 7)),
            (kernels.channel_dot(cp, x, w), kernels.channel_dot_twin(cp, x, w)),
            (kernels.channel_sq_dev(cp, x, vec[0]), kernels.channel_sq_dev_twin(cp, x, vec[0])),
            (kernels.channel_sq_dev(cp, x, vec[0], 1 / 7), kernels.channel_sq_dev_twin(cp, x, vec[0], 1 / 7)),
            (kernels.bn_backward(cp, x, None, w, *vec[:3]), kernels.bn_backward_twin(cp, x, None, w, *vec[:3])),
            (kernels.bn_backward(cp, x, w, x, *vec[:3]), kernels.bn_backward_twin(cp, x, w, x, *vec[:3])),
            (kernels.relu_backward(cp, x, w), kernels.relu_backward_twin(cp, x, w)),
        ]
        for k, stride, pad in ((3, 2, 1), (1, 2, 0), (3, 1, 1), (2, 2, 0)):     # col2im, odd sizes too
            n, h, w, c = shape
            ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
            dcols = cp.asarray(rng.standard_normal((n * ho * wo, k * k * c)), dtype=dtype)
            pairs.append((kernels.col2im(cp, dcols, shape, k, stride, pad),
                          kernels.col2im_twin(cp, dcols, shape, k, stride, pad)))
        for relu in (True, False):
            pairs += list(zip(kernels.bn_relu(cp, x.copy(), *vec, w, relu), kernels.bn_relu_twin(cp, x.copy(), *vec, w, relu)))
        got = kernels.bn_relu(cp, x.copy(), *vec, w)
        want = kernels.bn_relu_twin(cp, x.copy(), *vec, w)
        pairs += list(zip(got, want))
        sign = cp.where(vec[0] >= 0, 1, -1).astype(dtype)
        per_channel = (vec[2], vec[3], sign, vec[0], vec[1])        # gamma, beta, sign, mean, var (> 0)
        pairs += list(zip(kernels.block_constants(cp, *per_channel, 1e-5),
                          kernels.block_constants_twin(cp, *per_channel, 1e-5)))
        for train in (True, False):
            back = (vec[2], vec[1], sign, vec[0], vec[3], vec[2], 37)  # gamma, inv_std, sign, mean, dgamma, dbeta, m
            grads = [[v.copy() for v in vec[1:4]] for _ in range(2)]     # accumulated into
            pairs += list(zip(kernels.block_backward_constants(cp, *back, train, grads[0]),
                              kernels.block_backward_constants_twin(cp, *back, train, grads[1])))
            pairs += list(zip(*grads))
            bn_back = (vec[2], vec[1], vec[3], vec[2], 37)        # gamma, inv_std, dgamma, dbeta, m
            grads = [[v.copy() for v in vec[1:3]] for _ in range(2)]
            pairs += list(zip(kernels.bn_backward_constants(cp, *bn_back, train, grads[0]),
                              kernels.bn_backward_constants_twin(cp, *bn_back, train, grads[1])))
            pairs += list(zip(*grads))
        bns = [L.BatchNorm2d(c, xp=cp, dtype=dtype) for _ in range(2)]
        for bn in bns:
            bn.buffers["running_mean"][...], bn.buffers["running_var"][...] = vec[3], vec[1]
        pairs.append((kernels.running_stats(cp, bns[0], vec[0], vec[1], 37, sign, vec[2]),
                      kernels.running_stats_twin(cp, bns[1], vec[0], vec[1], 37, sign, vec[2])))
        pairs += [(bns[0].buffers[k], bns[1].buffers[k]) for k in bns[0].buffers]
        from scratchproto import Adam, build_backbone
        net = build_backbone("convnet", seed=0, width=8, xp=cp, dtype=dtype)
        opt = Adam(net, weight_decay=1e-3)
        flat = [cp.asarray(rng.standard_normal(net.flat_params.size), dtype=dtype) for _ in range(4)]
        flat[3] = cp.abs(flat[3])                                              # v >= 0
        copies = [[a.copy() for a in flat] for _ in range(2)]
        hyper = (opt.betas, opt.eps, opt.weight_decay, 0.01, 0.3)
        kernels.adam(cp, *copies[0], *hyper)
        kernels.adam_twin(cp, *copies[1], *hyper)
        pairs += [(copies[0][k], copies[1][k]) for k in (0, 2, 3)]             # p, m, v
        if shape[1] > 1:
            xr = cp.round(x)                                     # ties in the windows
            pairs += list(zip(kernels.pool_bn_relu(cp, xr, vec[1], vec[0]), kernels.pool_bn_relu_twin(cp, xr, vec[1], vec[0])))
            pooled, out, winner = kernels.pool_bn_relu_twin(cp, xr, vec[1], vec[0])
            dout = cp.asarray(rng.standard_normal(winner.shape), dtype=dtype)
            pairs.append((kernels.conv_block_dy(cp, xr, vec[2], vec[3], vec[0], dout, out, winner),
                          kernels.conv_block_dy_twin(cp, xr, vec[2], vec[3], vec[0], dout, out, winner)))
            pairs += list(zip(kernels.relu_sums(cp, dout, out, pooled, vec[3], sign, vec[1]),
                              kernels.relu_sums_twin(cp, dout, out, pooled, vec[3], sign, vec[1])))
        for a, b in pairs:
            np.testing.assert_allclose(cp.asnumpy(a), cp.asnumpy(b), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("c_in,size", [(1, 8), (3, 7)])      # the narrow first block; an odd map
def test_the_conv_block_on_its_kernel_path_matches_the_plain_sequence(monkeypatch, c_in, size):
    monkeypatch.setattr(kernels, "enabled", lambda xp: True)
    monkeypatch.setattr(kernels, "_kernel", StandIn)
    rng = np.random.default_rng(3)
    kw = dict(dtype=F64)
    plain = L.Sequential(L.Conv2d(c_in, 5, 3, 1, 1, rng=np.random.default_rng(2), **kw), L.BatchNorm2d(5, **kw),
                         L.ReLU(**kw), L.MaxPool2d(2, **kw), **kw)
    quick = fast.ConvBlock(fast.FastConv2d(c_in, 5, 3, 1, 1, rng=np.random.default_rng(2), **kw),
                           L.BatchNorm2d(5, **kw), **kw)
    gamma = np.array([1.5, -0.7, 0.3, -2.0, 1.0])     # negative gammas: the sign trick
    for blk in (plain, quick):
        blk.children[1][1].params["weight"][...] = gamma
    for train in (True, False, True):
        x = np.round(rng.standard_normal((4, size, size, c_in)), 1)   # rounded: ties in the windows
        _assert_same(plain, quick, x, train, rng)
        assert quick.cache.winner is not None                       # the kernel path ran


def test_adam_on_its_kernel_path_matches_the_flat_step(monkeypatch):
    """optim.Adam's step through kernels.adam (here the stand-in) gives the flat step's numbers."""
    from scratchproto import Adam, build_backbone
    nets = [build_backbone("convnet", seed=0, width=8, dtype=F64) for _ in range(2)]
    opts = [Adam(net, lr=1e-2, weight_decay=1e-3) for net in nets]
    rng = np.random.default_rng(4)
    for step in range(3):
        g = rng.standard_normal(nets[0].flat_grads.shape)
        for i, (net, opt) in enumerate(zip(nets, opts)):
            net.flat_grads[...] = g
            with monkeypatch.context() as patch:
                if i == 1:
                    patch.setattr(kernels, "enabled", lambda xp: True)
                    patch.setattr(kernels, "_kernel", StandIn)
                opt.step()
    np.testing.assert_allclose(nets[1].flat_params, nets[0].flat_params, rtol=1e-14, atol=0)
    np.testing.assert_allclose(opts[1].v_flat, opts[0].v_flat, rtol=1e-14, atol=0)
    assert not np.array_equal(nets[0].flat_params, build_backbone("convnet", seed=0, width=8, dtype=F64).flat_params)


def _assert_backbones_agree(plain, quick, batch, seed, dev=lambda a: a, host=lambda a: a):
    """plain (NumPy) and quick (its arrays through dev/host) over train, eval, train: outputs, input
    gradient, every parameter gradient and the BatchNorm buffers, in float64."""
    rng = np.random.default_rng(seed)
    for train in (True, False, True):
        x = rng.random((batch, 1, 28, 28))
        z1, z2 = plain.forward(x, train), quick.forward(dev(x), train)
        np.testing.assert_allclose(host(z2), z1, rtol=1e-9, atol=1e-11)
        r = rng.standard_normal(z1.shape)
        plain.zero_grad()
        quick.zero_grad()
        np.testing.assert_allclose(host(quick.backward(dev(r))), plain.backward(r), rtol=1e-8, atol=1e-11)
        g1, g2 = plain.grads(), quick.grads()
        scale = max(np.abs(g).max() for g in g1.values())   # (a conv bias before BatchNorm: 0 + rounding)
        for k in g1:
            np.testing.assert_allclose(g2[k], g1[k], rtol=1e-8, atol=1e-12 * scale, err_msg=k)
        s1, s2 = plain.state_dict(), quick.state_dict()
        # (the batch statistics are sums in another order: float64 rounding, ~1e-12 of the largest
        # entry; a mean that cancels to ~1e-6 keeps that absolute error, not the relative one)
        for k in s1:
            np.testing.assert_allclose(s2[k], s1[k], rtol=1e-10, atol=1e-12 * np.abs(s1[k]).max(), err_msg=k)


@pytest.mark.parametrize("backbone,batch", [("convnet", 3), ("resnet18", 2)])
def test_whole_backbones_on_the_kernel_path_match_the_plain_layers(monkeypatch, backbone, batch):
    """Every fused piece at once (stand-in kernels), ResNet-18's stem and shortcut BatchNorms
    included: outputs, input gradient, every parameter gradient and the BatchNorm buffers."""
    from scratchproto import build_backbone
    monkeypatch.setattr(kernels, "enabled", lambda xp: True)
    monkeypatch.setattr(kernels, "_kernel", StandIn)
    _assert_backbones_agree(build_backbone(backbone, seed=0, dtype=F64, fast=False),
                            build_backbone(backbone, seed=0, dtype=F64), batch, seed=8)


@pytest.mark.skipif(_cupy is None, reason=f"no GPU path here: {_why}")
@pytest.mark.parametrize("backbone,batch", [("convnet", 3), ("resnet18", 2)])
def test_cupy_backbones_on_the_kernels_match_the_plain_layers(monkeypatch, backbone, batch):
    """The compiled kernels end to end, in float64: the fast backbone on CuPy with the kernels
    against the plain one on NumPy (outputs, input gradient, parameter gradients, buffers)."""
    from scratchproto import build_backbone
    cp = _cupy
    monkeypatch.setenv(kernels.ENV, "1")
    _assert_backbones_agree(build_backbone(backbone, seed=0, dtype=F64, fast=False),
                            build_backbone(backbone, seed=0, dtype=F64, xp=cp), batch, seed=9,
                            dev=cp.asarray, host=cp.asnumpy)


def _package_imports():
    """{module: the package modules it imports, at the top or inside a function} for scratchproto/."""
    import ast
    import pathlib
    root = pathlib.Path(kernels.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = names
    return graph


def test_the_package_imports_no_circle():
    """The engine's layers import downwards only (kernels.py knows no optimiser, fast.py no
    trainer): a circle among them would make the import order matter."""
    graph = _package_imports()
    assert "optim" not in graph["kernels"] and "kernels" in graph["optim"]     # the case once found

    def visit(name, path):
        assert name not in path, "import circle: " + " -> ".join(path + [name])
        for other in graph.get(name, ()):
            visit(other, path + [name])
    for name in graph:
        visit(name, [])


KERNEL_CHECK_ENV = "SCRATCHPROTO_KERNEL_CHECK"   # '1' (CI): the checks below must run, not skip


def _kernel_check_problem(nvrtc=True):
    """None where CuPy imports (and, with ``nvrtc``, NVRTC compiles with CUDA's headers), else why
    not. All of it installs from pip and runs without a GPU."""
    try:
        import cupy  # noqa: F401
        if nvrtc:
            _nvrtc("extern \"C\" __global__ void probe(float* x) { x[0] = sqrt(x[0]); }", "sm_90")
    except Exception as e:     # ImportError, or NVRTC or the headers missing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _cupy_module(nvrtc=False):
    """CuPy, when the check can run (_kernel_check_problem); else skip, or fail where
    $SCRATCHPROTO_KERNEL_CHECK=1 (CI)."""
    how = "pip install cupy-cuda13x nvidia-cuda-nvrtc nvidia-cuda-runtime"
    why = _kernel_check_problem(nvrtc)
    if why is not None:
        if os.environ.get(KERNEL_CHECK_ENV) == "1":
            pytest.fail(f"{KERNEL_CHECK_ENV}=1 but the kernel check cannot run ({why}): {how}")
        pytest.skip(f"the kernel check needs CuPy and NVRTC ({why}): {how}, no GPU needed")
    import cupy
    return cupy


def _recorded_kernel_calls():
    """{(kernel name, (dtype or None for a scalar, ...), (ndim or None, ...))} of every kernel call that training and
    evaluation episodes of both backbones make on the kernel path, in float32 and float64 (the
    kernels' stand-ins run them on NumPy and note each call's argument types)."""
    import os
    from scratchproto import Adam, ProtoNet, build_backbone
    calls = set()

    class Recorder(kernels.NumpyStandIn):
        def __call__(self, *args, axis=None):
            calls.add((self.name, tuple(a.dtype.type if isinstance(a, np.ndarray) else None for a in args),
                       tuple(a.ndim if isinstance(a, np.ndarray) else None for a in args)))
            return super().__call__(*args, axis=axis)
    saved = kernels.enabled, kernels._kernel, os.environ.get(kernels.ENV)
    kernels.enabled, kernels._kernel = (lambda xp: True), Recorder
    try:
        rng = np.random.default_rng(0)
        for backbone in ("convnet", "resnet18"):
            for dtype in (np.float32, np.float64):
                net = build_backbone(backbone, seed=0, width=8, dtype=dtype)
                opt, model = Adam(net), ProtoNet(net)
                xs, xq = rng.random((2, 1, 1, 28, 28)), rng.random((2, 2, 1, 28, 28))
                for train in (True, False):
                    model.episode(xs, xq, train=train)
                opt.step()
    finally:
        kernels.enabled, kernels._kernel = saved[:2]
    return calls


def test_every_kernel_builds_in_cupy_and_types_its_calls():
    """CuPy builds each kernel object and decides its argument types on any machine, without a
    GPU: the two steps before NVRTC compiles. Each kernel is built from its specification, and
    every call the engine makes (recorded on the stand-ins) is typed as CuPy types it at launch.
    Both mistakes found on an H200 on 2026-12-04 fail here: a specification read in the wrong order
    (CuPy: 'Syntax error: (double)x') and an output type that no input names (KeyError: 'T')."""
    cupy = _cupy_module()
    from cupy._core import _kernel as cupy_kernel
    calls = _recorded_kernel_calls()
    names = {name for name, _, _ in calls}
    every = set(kernels.ELEMENTWISE) | set(kernels.REDUCTIONS) | {f"channel_total_{t}" for t in kernels.TOTAL}
    assert names == every        # the episodes call every kernel there is, and no other
    saved = dict(kernels._compiled)
    try:
        kernels._compiled.clear()
        for name in sorted(every):
            kernels._kernel(name)          # CuPy parses the parameters here
        for name, types, _ in sorted(calls, key=str):
            k = kernels._kernel(name)
            if isinstance(k, cupy.ElementwiseKernel):
                ins, outs = types[:k.nin], types[k.nin:]
                k._decide_params_type(ins, outs)
            else:
                cupy_kernel._decide_params_type(k.in_params, k.out_params, types, ())
    finally:
        kernels._compiled.clear()
        kernels._compiled.update(saved)


def _cupy_source(kernel, types, ndims):
    """The CUDA source CuPy generates for a launch of ``kernel`` (a cupy ElementwiseKernel or
    ReductionKernel) with arguments of ``types`` (None: a scalar) and ranks ``ndims``, made by
    CuPy's own code generators, which need no GPU. The ranks of the launch's arrays after CuPy
    merges their axes are approximated (1 for an elementwise loop over arrays of one shape, 2
    else; a reduction's as given): they change only the template arguments of CArray, not the
    kernel's body, which is what this checks."""
    import cupy
    from cupy._core import _carray, _reduction, _scalar
    from cupy._core import _kernel as ck
    ndarray, scalar, indexer = 1, 3, 2            # CuPy's _ArgKind

    def array(t, nd, contiguous):
        return ck._ArgInfo(ndarray, cupy.ndarray, t, nd, contiguous, True)
    if isinstance(kernel, cupy.ElementwiseKernel):
        ins, outs = types[:kernel.nin], types[kernel.nin:]
        in_t, out_t, type_map = kernel._decide_params_type(ins, outs)
        shapes = {nd for p, nd in zip(kernel.params, ndims) if nd is not None and not p.raw}
        loop = 1 if len(shapes) <= 1 else 2
        infos = []
        for p, t, given, nd in zip(kernel.params, in_t + out_t, types + (0,) * len(out_t),
                                   ndims + (loop,) * len(out_t)):
            if given is None:
                infos.append(ck._ArgInfo(scalar, _scalar.CScalar, t, 0, True, True))
            else:
                infos.append(array(t, nd if p.raw else loop, p.raw or loop == 1))
        infos.append(ck._ArgInfo(indexer, _carray.Indexer, None, loop, True, True))
        return ck._get_elementwise_kernel_code(tuple(infos), type_map, kernel.params, kernel.operation,
                                               kernel.name, kernel.preamble)
    in_t, out_t, type_map = ck._decide_params_type(kernel.in_params, kernel.out_params, types, ())
    # the reduction's index type, which CuPy adds to the type map at launch (32-bit: sizes < 2^31)
    type_map = ck._TypeMap(type_map._pairs + (("IndexT", np.int32),))
    nd_in = max(nd for nd in ndims if nd is not None)
    infos = [ck._ArgInfo(scalar, _scalar.CScalar, t, 0, True, True) if given is None else array(t, nd_in, False)
             for t, given in zip(in_t, types)]
    infos += [array(t, nd_in - 1, True) for t in out_t]
    infos += [ck._ArgInfo(indexer, _carray.Indexer, None, nd_in, True, True),
              ck._ArgInfo(indexer, _carray.Indexer, None, nd_in - 1, True, True),
              ck._ArgInfo(scalar, _scalar.CScalar, np.int32, 0, True, True)]
    return _reduction._ReductionKernel_get_cached_function_code(
        kernel.nin, kernel.nout, kernel._params, tuple(infos), type_map, kernel.name, 512,
        kernel.reduce_type, kernel.identity, kernel.map_expr, kernel.reduce_expr, kernel.post_map_expr,
        kernel.preamble, ())


def _nvrtc(source, arch):
    """Compile ``source`` as CuPy does (its headers prepended, its compiler options) with NVRTC for
    ``arch`` ('sm_90': H100/H200); raises cupy's CompileException with NVRTC's log."""
    from cupy._core import core
    from cupy.cuda import compiler
    head = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    options = core.assemble_cupy_compiler_options(()) + (f"-arch={arch}",)
    compiler._NVRTCProgram(head + source, "kern.cu").compile(options)


def test_every_kernel_compiles_as_cupy_would_for_hopper_and_ampere():
    """NVRTC compiles the source CuPy generates for every kernel call the engine makes (both
    dtypes; scalars and arrays as called), with CuPy's headers and options, for sm_90 (H100,
    H200) and sm_80 (A100), on a machine without a GPU: a mistake in a kernel costs no GPU time."""
    _cupy_module(nvrtc=True)
    from concurrent.futures import ThreadPoolExecutor
    sources = sorted({(name, _cupy_source(kernels._kernel(name), types, ndims))
                      for name, types, ndims in _recorded_kernel_calls()})
    jobs = [(name, src, arch) for name, src in sources for arch in ("sm_90", "sm_80")]

    def compile_one(job):
        name, src, arch = job
        try:
            _nvrtc(src, arch)
        except Exception as e:
            return f"{name} for {arch}: {e}"
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(compile_one, jobs) if f]
    assert not failures, "\n\n".join(failures)


# Mistakes that a reviewer would plant, each of which a syntax check with g++ let through (or, the
# last, refused although it is correct CUDA): (specification, argument types, compiles?)
PLANTED = {
    "writes to an input": (("T y, T mean", "T out", "y = y - mean; out = y;"), (np.float32,) * 2, False),
    "a raw array used as a plain pointer": (("raw T dcols, int32 K", "T dx", "const T* row = dcols + i * K; dx = row[0];"),
                                            (np.float32, None), False),
    "std::sqrt in device code": (("T x", "T y", "y = std::sqrt(x);"), (np.float32,), False),
    "a reduction's post-map reads an input": (("T x, T w", "T s", "(double)x", "a + b", "s = (T)(a * w)", "0"),
                                              (np.float32, np.float32), False),
    "a correct atomicAdd on an int64 counter": (("T v", "raw int64 counter, T y",
                                                 "if (i == 0) atomicAdd(&counter[0], 1LL); y = v;"), (np.float32,), True),
}


@pytest.mark.parametrize("mistake", sorted(PLANTED))
def test_the_compile_check_catches_planted_mistakes(mistake):
    cupy = _cupy_module(nvrtc=True)
    spec, types, compiles = PLANTED[mistake]
    if len(spec) == 3:
        kernel = cupy.ElementwiseKernel(*spec, "planted")
        ndims = tuple(None if t is None else 1 for t in types)
        if "counter" in spec[1]:                      # a raw output: the outputs are passed in
            types, ndims = types + (np.int64, np.float32), ndims + (1, 1)
    else:
        kernel = cupy.ReductionKernel(*spec, "planted", reduce_type="double")
        ndims = (2,) * len(types)
    source = _cupy_source(kernel, types, ndims)
    if compiles:
        _nvrtc(source, "sm_90")
    else:
        with pytest.raises(cupy.cuda.compiler.CompileException):
            _nvrtc(source, "sm_90")
