"""Both backbones: parameter counts, PyTorch names, initialisation, end-to-end gradients, Adam."""
import numpy as np
import pytest

import scratchproto as sp
from scratchproto import gradcheck

F64 = np.float64


def expected_shapes(backbone):
    """The reference model's state_dict, written out from its definition (torch_protonet.py)."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}
    out = {}
    if backbone == "convnet":
        for i, c_in in enumerate([1, 64, 64, 64]):
            out[f"encoder.{i}.0.weight"] = (64, c_in, 3, 3)
            out[f"encoder.{i}.0.bias"] = (64,)
            out.update(bn(f"encoder.{i}.1", 64))
        return out
    out["encoder.conv1.weight"] = (64, 3, 3, 3)
    out.update(bn("encoder.bn1", 64))
    c_in = 64
    for stage, c in enumerate([64, 128, 256, 512], start=1):
        for b in range(2):
            p = f"encoder.layer{stage}.{b}"
            cin_b = c_in if b == 0 else c
            out[f"{p}.conv1.weight"] = (c, cin_b, 3, 3)
            out.update(bn(f"{p}.bn1", c))
            out[f"{p}.conv2.weight"] = (c, c, 3, 3)
            out.update(bn(f"{p}.bn2", c))
            if b == 0 and stage > 1:
                out[f"{p}.shortcut.0.weight"] = (c, cin_b, 1, 1)
                out.update(bn(f"{p}.shortcut.1", c))
        c_in = c
    return out


@pytest.mark.parametrize("backbone,count", [("convnet", 111_936), ("resnet18", 11_168_832)])
def test_parameter_counts_and_names(backbone, count):
    net = sp.build_backbone(backbone, seed=0)
    assert net.num_parameters() == count
    sd = net.state_dict()
    assert {k: v.shape for k, v in sd.items()} == expected_shapes(backbone)
    assert all(isinstance(v, np.ndarray) for v in sd.values())


def test_convnet_width():
    # per block: 9*c_in*w + w (conv) + 2w (BN)
    w = 16
    assert sp.build_backbone("convnet", width=w).num_parameters() == (9 * w + 3 * w) + 3 * (9 * w * w + 3 * w)
    z = sp.build_backbone("convnet", width=w).forward(np.zeros((2, 1, 28, 28), np.float32))
    assert z.shape == (2, w)


def test_initialisation_follows_pytorch_defaults():
    net = sp.build_backbone("convnet", seed=7)
    sd = net.state_dict()
    for i, fan_in in enumerate([9, 576, 576, 576]):
        w, b = sd[f"encoder.{i}.0.weight"], sd[f"encoder.{i}.0.bias"]
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound   # fills the range
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound                 # uniform's std
        assert np.abs(b).max() <= bound
        assert np.all(sd[f"encoder.{i}.1.weight"] == 1) and np.all(sd[f"encoder.{i}.1.bias"] == 0)
    again = sp.build_backbone("convnet", seed=7).state_dict()
    other = sp.build_backbone("convnet", seed=8).state_dict()
    assert all(np.array_equal(sd[k], again[k]) for k in sd)
    assert not np.array_equal(sd["encoder.0.0.weight"], other["encoder.0.0.weight"])


def test_state_dict_round_trip_and_strictness():
    a, b = sp.build_backbone("convnet", seed=1), sp.build_backbone("convnet", seed=2)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(a.forward(x, train=False), b.forward(x, train=False))
    sd = a.state_dict()
    missing = {k: v for k, v in sd.items() if k != "encoder.2.1.running_var"}
    with pytest.raises(ValueError, match=r"missing keys \['encoder.2.1.running_var'\]"):
        b.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.9.weight'\]"):
        b.load_state_dict({**sd, "encoder.9.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"encoder.1.0.weight has shape \(64, 64, 3, 1\)"):
        b.load_state_dict({**sd, "encoder.1.0.weight": np.zeros((64, 64, 3, 1))})
    with pytest.raises(ValueError, match="missing keys"):
        sp.build_backbone("resnet18").load_state_dict(sd)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; choose one of convnet, resnet18"):
        sp.build_backbone("vgg")


@pytest.mark.parametrize("backbone,batch", [("convnet", 3), ("resnet18", 2)])
def test_end_to_end_gradients(xp, backbone, batch):
    """The whole network in float64: the input gradient and a sample of parameter gradients."""
    net = sp.build_backbone(backbone, seed=0, dtype=F64, xp=xp)
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.random((batch, 1, 28, 28)))
    r = xp.asarray(rng.standard_normal(net.forward(x).shape))

    def loss():
        return (net.forward(x, train=True) * r).sum()

    net.forward(x)
    net.zero_grad()
    dx = net.backward(r)
    idx = rng.choice(x.size, 30, replace=False)
    num = gradcheck.numerical_gradient(loss, x, indices=idx)
    assert gradcheck.relative_error(dx.reshape(-1)[idx], num) < 1e-6
    grads = net.grads()
    # A conv bias feeding a BatchNorm has gradient exactly 0 (BN subtracts the mean), so a
    # relative error means nothing there: the analytic one must be 0 to rounding instead.
    scale = max(np.abs(g).max() for g in grads.values())
    pre_bn = [k for k in grads if backbone == "convnet" and k.endswith(".0.bias")]
    assert all(np.abs(grads[k]).max() < 1e-12 * scale for k in pre_bn)
    params = [p for p in net.named_parameters() if p[0] not in pre_bn]
    for k in rng.choice(len(params), 6, replace=False):
        name, p, _ = params[k]
        idx = rng.choice(p.size, 4, replace=False)
        num = gradcheck.numerical_gradient(loss, p, indices=idx)
        assert gradcheck.relative_error(grads[name].reshape(-1)[idx], num) < 1e-6, name


def test_backward_without_input_gradient_gives_same_parameter_gradients():
    net = sp.build_backbone("convnet", seed=0, dtype=F64)
    x = np.random.default_rng(0).random((3, 1, 28, 28))
    r = np.random.default_rng(1).standard_normal((3, 64))
    net.forward(x); net.zero_grad(); net.backward(r)
    full = net.grads()
    net.forward(x); net.zero_grad()
    assert net.backward(r, need_dx=False) is None
    # the first block then takes its Gram-matrix path (fast.py): equal up to summation order
    for k, g in net.grads().items():
        np.testing.assert_allclose(g, full[k], rtol=0, atol=1e-12 * np.abs(full[k]).max(), err_msg=k)


def test_adam_steps_by_hand():
    """Two Adam steps with weight decay on a tiny net, against the update rule written out."""
    net = sp.build_backbone("convnet", width=2, seed=0, dtype=F64)
    name, p, g = net.named_parameters()[0]
    p0 = p.copy()
    opt = sp.Adam(net, lr=0.1, weight_decay=0.01)
    g1 = np.full_like(p, 0.5); g1.flat[0] = -2.0
    g[...] = g1
    opt.step()
    gg = g1 + 0.01 * p0                     # L2 decay joins the gradient
    m, v = 0.1 * gg, 0.001 * gg ** 2
    p1 = p0 - 0.1 / (1 - 0.9) * m / (np.sqrt(v) / np.sqrt(1 - 0.999) + 1e-8)
    np.testing.assert_allclose(p, p1, rtol=1e-12)
    g2 = np.full_like(p, -1.0)
    g[...] = g2
    opt.step()
    gg = g2 + 0.01 * p1
    m, v = 0.9 * m + 0.1 * gg, 0.999 * v + 0.001 * gg ** 2
    p2 = p1 - 0.1 / (1 - 0.9 ** 2) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** 2) + 1e-8)
    np.testing.assert_allclose(p, p2, rtol=1e-12)
    # a parameter with zero gradient and no decay stays put
    assert opt.t == 2


def test_adam_rejects_bad_lr_and_step_schedule():
    with pytest.raises(ValueError, match="learning rate must be positive"):
        sp.Adam(sp.build_backbone("convnet", width=2), lr=0)
    assert [sp.step_lr(1e-3, e) for e in (1, 20, 21, 40, 41)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


def test_adam_state_round_trip():
    net = sp.build_backbone("convnet", width=2, seed=0)
    opt = sp.Adam(net, lr=0.01)
    for _, _, g in net.named_parameters():
        g[...] = 1.0
    opt.step()
    sd = opt.state_dict()
    opt2 = sp.Adam(net, lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.t == 1 and opt2.lr == 0.01
    assert all(np.array_equal(opt.m[k], opt2.m[k]) for k in opt.m)
    with pytest.raises(ValueError, match="optimiser state lacks"):
        opt2.load_state_dict({"t": 1, "lr": 0.1})


@pytest.mark.parametrize("threads", [1, 3])
def test_flat_parameters_are_the_layers_own_and_adam_is_the_same_either_way(monkeypatch, threads):
    """Parameters and gradients live in two flat arrays whose views the layers hold; Adam's
    whole-array step (in blocks, on one thread or three) gives the per-parameter step's numbers
    to the last bit."""
    from scratchproto import fast
    monkeypatch.setattr(fast, "THREADS", threads)
    monkeypatch.setattr(fast, "BLOCK_FLOATS", 100)        # the small net's 516 parameters: 6 blocks
    net = sp.build_backbone("resnet18", seed=3)
    for _, m in net.encoder.named_modules():
        for k in m.params:
            assert np.shares_memory(m.params[k], net.flat_params) and np.shares_memory(m.grads[k], net.flat_grads)
    assert net.flat_params.size == net.num_parameters() == 11168832

    class PerParameter:          # the same parameters, seen one by one: Adam's other path
        xp = np

        def __init__(self, named):
            self.named = named

        def named_parameters(self):
            return self.named

    small = sp.build_backbone("convnet", width=4, seed=1)
    twin = [(n, p.copy(), g) for n, p, g in small.named_parameters()]
    flat_opt, loop_opt = sp.Adam(small, lr=0.01, weight_decay=1e-3), sp.Adam(PerParameter(twin), lr=0.01, weight_decay=1e-3)
    assert flat_opt.flat and not loop_opt.flat
    rng = np.random.default_rng(0)
    for _ in range(3):
        small.flat_grads[...] = rng.standard_normal(small.flat_grads.shape).astype(np.float32)
        flat_opt.step()
        loop_opt.step()
    for (name, p, _), (_, q, _) in zip(small.named_parameters(), twin):
        assert np.array_equal(p, q), name
        assert np.array_equal(flat_opt.m[name], loop_opt.m[name]) and np.array_equal(flat_opt.v[name], loop_opt.v[name])
    small.zero_grad()
    assert not small.flat_grads.any() and not any(g.any() for _, _, g in small.named_parameters())
