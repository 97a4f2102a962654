"""The ProtoNet episode: loss and accuracy by definition, and its hand-written backward pass."""
import numpy as np
import pytest

import scratchproto as sp
from scratchproto import gradcheck
from scratchproto.protonet import protonet_loss


def _naive(z, way, shot, query):
    """Loss and accuracy written out query by query, class by class."""
    zs, zq = z[:way * shot].reshape(way, shot, -1), z[way * shot:]
    protos = [zs[n].mean(axis=0) for n in range(way)]
    loss, correct = 0.0, 0
    for i, q in enumerate(zq):
        logits = np.array([-np.sum((q - c) ** 2) for c in protos])
        y = i // query
        loss -= logits[y] - np.log(np.sum(np.exp(logits)))
        correct += int(np.argmax(logits) == y)
    return loss / len(zq), correct / len(zq)


def test_loss_and_accuracy_by_definition():
    rng = np.random.default_rng(0)
    way, shot, query = 4, 3, 2
    z = rng.standard_normal((way * (shot + query), 5))
    loss, acc, _ = protonet_loss(z, way, shot, query)
    ref_loss, ref_acc = _naive(z, way, shot, query)
    assert loss == pytest.approx(ref_loss, rel=1e-12) and acc == ref_acc


def test_loss_gradient(xp):
    rng = np.random.default_rng(1)
    way, shot, query = 3, 2, 3
    z = xp.asarray(rng.standard_normal((way * (shot + query), 4)))
    _, _, dz = protonet_loss(z, way, shot, query)
    num = gradcheck.numerical_gradient(lambda: protonet_loss(z, way, shot, query, need_grad=False)[0], z)
    assert gradcheck.relative_error(dz, num) < 1e-6


def test_episode_gradient_through_the_backbone():
    """model.episode(train=True) leaves in the backbone the gradient of the episode's loss."""
    net = sp.build_backbone("convnet", width=4, seed=0, dtype=np.float64)
    model = sp.ProtoNet(net)
    rng = np.random.default_rng(2)
    xs, xq = rng.random((3, 2, 1, 28, 28)), rng.random((3, 2, 1, 28, 28))
    res = model.episode(xs, xq, train=True)
    grads = net.grads()
    for name, p, _ in net.named_parameters():
        if name.endswith(".0.bias"):
            continue     # feeds a BatchNorm: gradient exactly 0, checked in test_backbones.py
        idx = rng.choice(p.size, min(p.size, 5), replace=False)
        num = gradcheck.numerical_gradient(lambda: model.episode(xs, xq, train=True)["loss"], p, indices=idx)
        assert gradcheck.relative_error(grads[name].reshape(-1)[idx], num) < 1e-6, name
    assert res["embeddings"].shape == (12, 4)
    assert set(res) >= {f"{m}_{p}" for m in sp.collapse.METRICS for p in ("support", "query")}


def test_episode_in_eval_mode_leaves_gradients_and_statistics_alone():
    net = sp.build_backbone("convnet", width=4, seed=0)
    model = sp.ProtoNet(net)
    rng = np.random.default_rng(3)
    xs, xq = rng.random((3, 2, 1, 28, 28)), rng.random((3, 4, 1, 28, 28))
    before = net.state_dict()
    res = model.episode(xs, xq, train=False)
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(not g.any() for g in net.grads().values())
    assert 0 <= res["acc"] <= 1 and res["loss"] > 0
    # the embeddings are the backbone's: support rows first, class-major, then query
    z = net.forward(np.concatenate([xs.reshape(6, 1, 28, 28), xq.reshape(12, 1, 28, 28)]), train=False)
    np.testing.assert_array_equal(res["embeddings"], z)
    np.testing.assert_allclose(res["nc1_query"], sp.collapse_metrics(z[6:].reshape(3, 4, 4))["nc1"])


def test_episode_rejects_mismatched_classes():
    model = sp.ProtoNet(sp.build_backbone("convnet", width=2))
    with pytest.raises(ValueError, match="support has 3 classes but query has 2"):
        model.episode(np.zeros((3, 1, 1, 28, 28)), np.zeros((2, 1, 1, 28, 28)))


def test_to_host_later_reads_the_array_as_it_was(xp):
    """The copy behind ProtoNet.start_episode's one read per episode: what read() returns is the
    array when the copy started, whatever is written to it afterwards (on a GPU the copy is queued
    before the writes; on NumPy it is made at once)."""
    a = xp.arange(7, dtype=np.float64) / 3
    read = sp.backend.to_host_later(a)
    a[:] = -1
    got = read()
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, np.arange(7) / 3)


@pytest.mark.parametrize("shot,query", [(2, 2), (2, 3)])
def test_episode_on_the_device_gives_the_host_numbers(xp, shot, query):
    """An episode's loss, accuracy and NC metrics come back from the device in one copy, started
    before the backward pass (ProtoNet.start_episode): on CuPy they and the gradients must be
    NumPy's, for support and query stacked (shot = query) or not. float64, so to rounding."""
    if xp is np:
        pytest.skip("NumPy against itself: this test is for the GPU path")
    rng = np.random.default_rng(4)
    xs, xq = rng.random((3, shot, 1, 28, 28)), rng.random((3, query, 1, 28, 28))
    got = []
    for m in (np, xp):
        net = sp.build_backbone("convnet", width=4, seed=0, dtype=np.float64, xp=m)
        res = sp.ProtoNet(net).episode(m.asarray(xs), m.asarray(xq), train=True)
        got.append(({k: v for k, v in res.items() if k != "embeddings"},
                    {k: sp.backend.to_host(g) for k, g in net.grads().items()}))
    (host, host_grads), (device, device_grads) = got
    assert host.keys() == device.keys() and all(isinstance(v, float) for v in device.values())
    for k in host:
        assert device[k] == pytest.approx(host[k], rel=1e-10, abs=1e-12), k
    for k in host_grads:
        np.testing.assert_allclose(device_grads[k], host_grads[k], rtol=1e-9, atol=1e-12, err_msg=k)
