"""Cross-check against the PyTorch reference (../shared/reference/torch_protonet.py).

torch is not a dependency: this test runs only when SCRATCHPROTO_TORCH_PYTHON names a Python
that has torch (e.g. ../torchref/bin/python, see the README), and is skipped otherwise.
Same weights, same episode: embeddings, loss, parameter gradients, and the weights and BatchNorm
buffers after one Adam step must agree to float32 precision.
"""
import os
import pathlib
import subprocess

import numpy as np
import pytest

import scratchproto as sp

TORCH_PY = os.environ.get("SCRATCHPROTO_TORCH_PYTHON")
REF = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "torch_protonet.py"

pytestmark = pytest.mark.skipif(not TORCH_PY or not REF.exists(),
                                reason="set SCRATCHPROTO_TORCH_PYTHON to a Python with torch "
                                       "(and keep ../shared/reference) to run the parity check")


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("backbone,way", [("convnet", 10), ("resnet18", 4)])
def test_matches_pytorch(tmp_path, backbone, way):
    rng = np.random.default_rng(0)
    xs = (rng.random((way, 3, 1, 28, 28)) > 0.85).astype(np.float32)
    xq = (rng.random((way, 2, 1, 28, 28)) > 0.85).astype(np.float32)
    net = sp.build_backbone(backbone, seed=3)
    state = net.state_dict()
    np.savez(tmp_path / "in.npz", xs=xs, xq=xq, lr=np.float32(1e-3),
             **{f"state.{k}": v for k, v in state.items()})
    subprocess.run([TORCH_PY, str(REF), "parity", str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                    "--backbone", backbone], check=True)
    ref = np.load(tmp_path / "out.npz")

    model = sp.ProtoNet(net)
    res = model.episode(xs, xq, train=True)
    # ResNet-18's 3x3 convolutions run as Winograd's F(4x4, 3x3), which rounds some 20 times
    # worse than im2col in float32 (winograd.py): over 5 seeds (2026-12-05) its embeddings agreed
    # with PyTorch's to at most 1.3e-5 and its loss to 1.5e-5 (3.9e-6 and 8.3e-6 with im2col).
    close = 1e-5 if backbone == "convnet" else 3e-5
    assert _rel(res["embeddings"], ref["z"]) < close
    assert abs(res["loss"] - float(ref["loss"])) < close * max(1.0, abs(float(ref["loss"])))
    assert res["acc"] == pytest.approx(float(ref["acc"]))
    grads = net.grads()
    # A conv bias that feeds a BatchNorm has a true gradient of 0 (BN subtracts the mean): in
    # float32 both implementations give rounding noise there, so it is only checked to be small.
    scale = max(np.abs(ref[f"grad.{k}"]).max() for k in grads)
    noise = [k for k in grads if backbone == "convnet" and k.endswith(".0.bias")]
    for name in noise:
        assert np.abs(grads[name]).max() < 1e-3 * scale and np.abs(ref[f"grad.{name}"]).max() < 1e-3 * scale
    for name, g in grads.items():
        r = ref[f"grad.{name}"]
        if name in noise:
            continue
        if backbone == "convnet":
            assert np.abs(g - r).max() / np.abs(r).max() < 1e-4, name
        else:
            # ResNet-18 is 17 ReLU layers deep: float32 rounding (~1e-5 relative by layer4, in
            # either implementation) moves a few pre-activations across 0, which switches their
            # gradient on or off and shifts a layer's gradient by ~0.1-2% (measured over 5 seeds,
            # 2026-12-05: at most 1.7% relative Frobenius norm with Winograd, 1.3% with im2col;
            # the float64 gradient checks in test_backbones.py verify the math exactly). 3%
            # leaves headroom for other BLAS builds.
            assert np.linalg.norm(g - r) / np.linalg.norm(r) < 3e-2, name
    opt = sp.Adam(net, lr=1e-3)
    opt.step()
    checked = np.zeros(2)
    for name, v in net.state_dict().items():
        r = ref[f"after.{name}"]
        if name.endswith("num_batches_tracked"):
            assert int(v) == int(r)
        elif name.endswith(("running_mean", "running_var")):
            assert _rel(v, r) < 1e-5, name
        elif name not in noise:
            # Adam's first step moves a weight by lr * g / (|g| + eps), about +-lr: the two must
            # take the same steps wherever the gradient is clearly non-zero. (Where it is ~0, e.g.
            # the last BN bias of channels that are active on every image, whose gradient is the
            # sum of dz over the batch and vanishes because the loss ignores a common shift, its
            # sign is float32 noise in both.)
            # (In ResNet-18 the kink flips above can also turn the sign of a small entry.) So the
            # steps must agree wherever the gradient is clearly non-zero and both agree on it.
            gr, gd = np.abs(ref[f"grad.{name}"]), np.abs(grads[name] - ref[f"grad.{name}"])
            clear = (gr > 1e-4 * gr.max()) & (gr > 10 * gd)
            assert np.abs(v - r)[clear].max() < 1e-6, name
            checked += [clear.sum(), clear.size]
    assert checked[0] > 0.95 * checked[1]    # the exclusions above are rare
