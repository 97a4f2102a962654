"""The fast layers (fast.py) against the plain ones (layers.py): same outputs, same gradients."""
import os
import numpy as np
import pytest

from scratchproto import backend, fast, gradcheck
from scratchproto import layers as L

F64 = np.float64


@pytest.fixture(autouse=True, params=["1 thread", "3 threads, 1-image blocks"])
def threads(request, monkeypatch):
    """Every test twice: as on a one-core machine, and with the passes outside the GEMMs split
    among three threads in blocks of one image (the test arrays are far below a real block)."""
    if request.param != "1 thread":
        monkeypatch.setattr(fast, "THREADS", 3)
        monkeypatch.setattr(fast, "BLOCK_FLOATS", 1)
    else:
        monkeypatch.setattr(fast, "THREADS", 1)
    return request.param


def _copy_params(src, dst):
    for (_, a), (_, b) in zip(src.named_modules(), dst.named_modules()):
        for k in a.params:
            b.params[k][...] = a.params[k]
        for k in a.buffers:
            b.buffers[k][...] = a.buffers[k]


def _grads(module):
    return {f"{n}.{k}": backend.to_host(g).copy() for n, m in module.named_modules() for k, g in m.grads.items()}


def _compare(plain, quick, x, train, tol=1e-10):
    plain.zero_grad(); quick.zero_grad()
    host = backend.to_host     # compared on the host: NumPy's asserts refuse CuPy arrays
    y1, y2 = host(plain.forward(x, train)), host(quick.forward(x, train))
    r = plain.xp.asarray(np.random.default_rng(9).standard_normal(y1.shape))
    np.testing.assert_allclose(y2, y1, rtol=0, atol=tol * np.abs(y1).max())
    d1, d2 = host(plain.backward(r)), host(quick.backward(r))
    np.testing.assert_allclose(d2, d1, rtol=0, atol=tol * np.abs(d1).max())
    _assert_same_grads(plain, quick, tol)


def _assert_same_grads(plain, quick, tol=1e-10):
    """Every parameter gradient of quick equals plain's, up to tol times the largest of them."""
    g1, g2 = _grads(plain), _grads(quick)
    assert g1.keys() == g2.keys()
    scale = max(np.abs(g).max() for g in g1.values())
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=0, atol=tol * scale, err_msg=k)


def _compare_with_running_stats(plain, quick, x, train):
    """_compare, and the BatchNorm running statistics after it (in evaluation, after one
    training step has given them something to hold)."""
    if not train:
        for blk in (plain, quick):
            blk.forward(x, True)
    _compare(plain, quick, x, train)
    for (_, a), (_, b) in zip(plain.named_modules(), quick.named_modules()):
        for k in a.buffers:
            np.testing.assert_allclose(backend.to_host(b.buffers[k]), backend.to_host(a.buffers[k]),
                                       rtol=1e-12)


def _check_input_gradient(block, x, train, seed):
    """block's dx against finite differences of sum(block(x) * r), r random (float64)."""
    r = np.random.default_rng(seed).standard_normal(block.forward(x, train).shape)
    block.zero_grad()
    block.forward(x, train)
    dx = block.backward(r)
    num = gradcheck.numerical_gradient(lambda: (block.forward(x, train) * r).sum(), x)
    assert gradcheck.relative_error(dx, num) < 1e-6


@pytest.mark.parametrize("k,stride,padding,h,w", [(3, 1, 1, 8, 8), (3, 2, 1, 7, 9), (5, 1, 2, 8, 8),
                                                  (1, 2, 0, 6, 6), (3, 1, 0, 6, 7), (3, 2, 1, 8, 8),
                                                  (5, 2, 2, 9, 8), (3, 3, 1, 8, 7), (2, 2, 0, 7, 6)])
def test_fast_conv_matches_plain(xp, k, stride, padding, h, w):
    """Outputs and gradients to rounding, in several chunks; strided ones on a CPU take dx
    residue class by residue class (a stride of 3 with a 3x3 kernel: one tap per class and
    axis; a 1x1 kernel: classes no tap reaches)."""
    rng = np.random.default_rng(0)
    plain = L.Conv2d(40, 3, k, stride, padding, rng=rng, xp=xp, dtype=F64)
    quick = fast.FastConv2d(40, 3, k, stride, padding, rng=rng, xp=xp, dtype=F64)
    quick.CHUNK_FLOATS = quick.GPU_CHUNK_FLOATS = 500     # several chunks even for this tiny batch
    quick.CHUNK_MIN_ROWS = 1
    _copy_params(plain, quick)
    x = xp.asarray(rng.standard_normal((5, h, w, 40)))
    _compare(plain, quick, x, True)
    assert isinstance(quick.cache, fast.ChunkedConvCache) and len(quick._chunks(5, *quick.forward(x).shape[1:3], 40)) > 1
    # without dx (a first layer), dW takes the other road: im2col chunks of x times dy
    r = xp.asarray(np.random.default_rng(9).standard_normal(plain.forward(x).shape))
    quick.zero_grad()
    quick.forward(x)
    assert quick.backward(r, need_dx=False) is None
    _assert_same_grads(plain, quick)


def test_fast_conv_gradients_and_narrow_fallback():
    rng = np.random.default_rng(1)
    conv = fast.FastConv2d(4, 2, 3, 2, 1, rng=rng, dtype=F64)
    conv.CHUNK_FLOATS = conv.GPU_CHUNK_FLOATS = 500
    conv.CHUNK_MIN_ROWS = 1
    errors = gradcheck.check_layer(conv, rng.standard_normal((3, 5, 6, 4)))
    assert max(errors.values()) < 1e-6, errors
    assert isinstance(conv.cache, fast.ChunkedConvCache)
    narrow = fast.FastConv2d(1, 8, 3, 1, 1, rng=rng, dtype=F64)
    narrow.forward(rng.standard_normal((2, 28, 28, 1)))  # one input channel: whole im2col, kept
    assert isinstance(narrow.cache, fast.NarrowConvCache)


@pytest.mark.parametrize("h,w", [(8, 8), (4, 12), (7, 7), (5, 3), (1, 1), (14, 10)])
def test_winograd_conv_matches_plain(h, w):
    """Winograd F(4x4, 3x3) against im2col's Conv2d in float64: output, dx and dW to rounding,
    over several chunks, and without dx (dW alone); sizes that are not multiples of 4 compute
    spare outputs and drop them."""
    rng = np.random.default_rng(20)
    plain = L.Conv2d(6, 5, 3, 1, 1, bias=False, rng=rng, dtype=F64)
    quick = fast.FastConv2d(6, 5, 3, 1, 1, bias=False, rng=rng, dtype=F64, winograd=True)
    quick.CHUNK_FLOATS, quick.WINOGRAD_MIN_ROWS = 1, 1        # a chunk per image
    quick.WINOGRAD_MIN_CHANNELS = 1
    _copy_params(plain, quick)
    x = rng.standard_normal((3, h, w, 6))
    _compare(plain, quick, x, True, tol=1e-13)
    assert isinstance(quick.cache, fast.WinogradConvCache)
    assert len(quick._winograd_chunks(3, 1, 1, 6)) == 3
    r = np.random.default_rng(21).standard_normal((3, h, w, 5))
    plain.zero_grad(); quick.zero_grad()
    plain.forward(x); quick.forward(x)
    plain.backward(r)
    assert quick.backward(r, need_dx=False) is None
    _assert_same_grads(plain, quick, tol=1e-13)


def test_winograd_conv_gradients():
    rng = np.random.default_rng(22)
    conv = fast.FastConv2d(4, 3, 3, 1, 1, rng=rng, dtype=F64, winograd=True)    # with a bias
    conv.CHUNK_FLOATS, conv.WINOGRAD_MIN_ROWS, conv.WINOGRAD_MIN_CHANNELS = 1, 1, 1
    errors = gradcheck.check_layer(conv, rng.standard_normal((2, 4, 6, 4)))
    assert max(errors.values()) < 1e-6, errors
    assert isinstance(conv.cache, fast.WinogradConvCache)


@pytest.mark.parametrize("n,size,c", [(8, 28, 64), (4, 7, 256)])
def test_winograd_in_float32_stays_within_its_bound(n, size, c):
    """F(4x4, 3x3)'s transforms scale values up and back down (winograd.py), so in float32 its
    output and gradients are further from the float64 convolution than im2col's: measured at
    ResNet-18's sizes, up to 1.3e-5 of the largest entry against im2col's 5e-7 to 8e-7. The
    bound, 3e-5 (250 times float32's epsilon), fails on a transform off by one part in 1e4."""
    rng = np.random.default_rng(24)
    x, dy = rng.standard_normal((n, size, size, c)), rng.standard_normal((n, size, size, c))
    ref = L.Conv2d(c, c, 3, 1, 1, bias=False, rng=np.random.default_rng(25), dtype=F64)
    want = [ref.forward(x), ref.backward(dy), ref.grads["weight"]]
    errors = {}
    for winograd in (True, False):
        conv = fast.FastConv2d(c, c, 3, 1, 1, bias=False, rng=np.random.default_rng(25), winograd=winograd)
        got = [conv.forward(x.astype(np.float32)), conv.backward(dy.astype(np.float32)), conv.grads["weight"]]
        assert isinstance(conv.cache, fast.WinogradConvCache) == winograd
        errors[winograd] = [np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want)]
    assert max(errors[True]) < 3e-5 and max(errors[False]) < 2e-6, errors


def test_winograd_only_where_asked_and_where_it_applies():
    """Stride 2, 1x1, fewer channels than WINOGRAD_MIN_CHANNELS, a narrow input and the ConvNet
    keep im2col; so does a layer that did not ask. Any size takes it (5: spare outputs)."""
    from scratchproto import build_backbone
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 6, 6, 128))
    for args, kw, size, want in [((128, 4, 3, 1, 1), dict(winograd=True), 6, fast.WinogradConvCache),
                                 ((128, 4, 3, 1, 1), {}, 6, fast.ChunkedConvCache),
                                 ((128, 4, 3, 1, 1), dict(winograd=True), 5, fast.WinogradConvCache),
                                 ((64, 4, 3, 1, 1), dict(winograd=True), 6, fast.WinogradConvCache),
                                 ((32, 4, 3, 1, 1), dict(winograd=True), 6, fast.ChunkedConvCache),
                                 ((128, 4, 3, 2, 1), dict(winograd=True), 6, fast.ChunkedConvCache),
                                 ((128, 4, 1, 1, 0), dict(winograd=True), 6, fast.ChunkedConvCache),
                                 ((3, 4, 3, 1, 1), dict(winograd=True), 6, fast.NarrowConvCache)]:
        conv = fast.FastConv2d(*args, rng=rng, dtype=F64, **kw)
        conv.forward(x[:, :size, :size, :args[0]])
        assert type(conv.cache) is want, (args, kw, size)
    resnet, convnet = build_backbone("resnet18", dtype=F64), build_backbone("convnet", dtype=F64)
    winograd = lambda net: [n for n, m in net.encoder.named_modules() if getattr(m, "winograd", False)]
    assert "layer1.0.conv1" in winograd(resnet) and not winograd(convnet)


def _blocks(xp, c_in, seed, conv_cls=fast.FastConv2d, c_out=5):
    rng = np.random.default_rng(seed)
    kw = dict(xp=xp, dtype=F64)
    plain = L.Sequential(L.Conv2d(c_in, c_out, 3, 1, 1, rng=rng, **kw), L.BatchNorm2d(c_out, **kw),
                         L.ReLU(**kw), L.MaxPool2d(2, **kw), **kw)
    quick = fast.ConvBlock(conv_cls(c_in, c_out, 3, 1, 1, rng=rng, **kw), L.BatchNorm2d(c_out, **kw), **kw)
    # negative and positive gammas (the min- and the max-pooled channels), non-trivial stats
    gamma = xp.asarray([1.5, -0.7, 0.3, -2.0, 1.0])
    for blk in (plain, quick):
        blk.children[1][1].params["weight"][...] = gamma
        blk.children[1][1].params["bias"][...] = xp.asarray([0.1, -0.2, 0.3, 0.0, -0.5])
    _copy_params(plain, quick)
    return plain, quick


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("c_in,h", [(1, 8), (3, 7)])      # 7: floor mode drops a row and column
def test_conv_block_matches_plain_sequence(xp, train, c_in, h):
    plain, quick = _blocks(xp, c_in, 2)
    x = xp.asarray(np.random.default_rng(3).standard_normal((3, h, h, c_in)))
    _compare_with_running_stats(plain, quick, x, train)
    assert [n for n, _ in quick.named_modules("e")] == ["e", "e.0", "e.1", "e.2", "e.3"]


def test_conv_block_with_fast_conv_and_ties():
    """Binary images give exactly equal conv outputs over flat regions: first-winner ties."""
    plain, quick = _blocks(np, 8, 4, conv_cls=fast.FastConv2d)
    quick.conv.CHUNK_FLOATS = quick.conv.GPU_CHUNK_FLOATS = 3000
    quick.conv.CHUNK_MIN_ROWS = 1
    x = (np.random.default_rng(5).random((4, 12, 12, 8)) > 0.8).astype(F64)
    _compare(plain, quick, x, True)
    assert isinstance(quick.conv.cache, fast.ChunkedConvCache)


def test_conv_block_gradients():
    _, quick = _blocks(np, 2, 6)
    x = np.random.default_rng(7).standard_normal((2, 6, 6, 2))
    for train in (True, False):
        errors = gradcheck.check_layer(quick.conv, x)  # (the conv alone, for completeness)
        assert max(errors.values()) < 1e-6
        _check_input_gradient(quick, x, train, seed=8)


@pytest.mark.parametrize("chunk_floats", [1 << 21, 300])   # one chunk of images; one per image
@pytest.mark.parametrize("h", [10, 9])    # window-major rows, made and pooled in chunks; rows gathered
def test_narrow_block_weight_gradient_without_dy(monkeypatch, chunk_floats, h):
    """The first block (1 input channel) in training, as the trainer runs it (need_dx=False):
    its weight gradient comes from the Gram matrix and the winners, without the full-size dy."""
    monkeypatch.setattr(fast.FastConv2d, "CHUNK_FLOATS", chunk_floats)
    plain, quick = _blocks(np, 1, 10)
    x = (np.random.default_rng(11).random((3, h, h, 1)) > 0.7).astype(F64)   # binary: ties
    plain.zero_grad(); quick.zero_grad()
    y1 = plain.forward(x, True)
    quick.forward(x, True)
    assert quick.cache.gram is not None                   # the Gram path was taken
    assert (quick.cache.window_cols is not None) == (h % 2 == 0)
    r = np.random.default_rng(12).standard_normal(y1.shape)
    plain.backward(r)
    assert quick.backward(r, need_dx=False) is None
    _assert_same_grads(plain, quick)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("c_in,c_out,stride", [(4, 4, 1), (4, 6, 2)])   # identity, projection
def test_fast_basic_block_matches_plain(xp, train, c_in, c_out, stride):
    """Same operations in the same order: equal to the plain block up to float64 rounding,
    with the gradient into the input, every parameter's gradient and the running statistics."""
    rng = np.random.default_rng(13)
    kw = dict(xp=xp, dtype=F64)
    plain = L.BasicBlock(c_in, c_out, stride, rng, **kw)
    quick = fast.FastBasicBlock(c_in, c_out, stride, rng, **kw)
    for blk in (plain, quick):     # gammas of both signs and non-zero betas: a non-trivial ReLU mask
        for _, m in blk.named_modules():
            if isinstance(m, L.BatchNorm2d):
                m.params["weight"][...] = xp.asarray(np.linspace(-1.5, 2.0, m.c))
                m.params["bias"][...] = xp.asarray(np.linspace(0.3, -0.4, m.c))
    _copy_params(plain, quick)
    x = xp.asarray(np.random.default_rng(14).standard_normal((3, 6, 6, c_in)))
    _compare_with_running_stats(plain, quick, x, train)
    assert [n for n, _ in quick.named_modules()] == [n for n, _ in plain.named_modules()]


def test_fast_basic_block_gradients():
    rng = np.random.default_rng(15)
    blk = fast.FastBasicBlock(3, 4, 2, rng, dtype=F64)
    x = rng.standard_normal((2, 5, 5, 3))
    for train in (True, False):
        _check_input_gradient(blk, x, train, seed=16)


def test_cpu_chunks_hold_about_chunk_floats_but_not_fewer_rows_than_the_minimum():
    conv = fast.FastConv2d(64, 64, 3, 1, 1, rng=np.random.default_rng(0))
    per_image = 14 * 14 * 9 * 64                                         # the ConvNet's second block
    (n0, n1), *_ = conv._chunks(600, 14, 14, 64)
    assert (n1 - n0) * per_image <= conv.CHUNK_FLOATS < (n1 - n0 + 2) * per_image
    # ResNet-18's 512-channel layers: at least 512 rows (32 images) would make seven chunks, an
    # odd number, and eight would hold fewer rows than that, so six of 34 images
    chunks = conv._chunks(200, 4, 4, 512)
    assert [n1 - n0 for n0, n1 in chunks] == [34] * 5 + [30] and 34 * 16 >= conv.CHUNK_MIN_ROWS


def test_even_spans_are_equal_and_even_when_few():
    assert fast.even_spans(600, 202) == [(0, 150), (150, 300), (300, 450), (450, 600)]      # 3 -> 4
    assert fast.even_spans(200, 128) == [(0, 100), (100, 200)]                             # 128 + 72 -> equal
    assert fast.even_spans(200, 32, min_step=32) == fast.spans(200, 34)                     # 7 -> 6, not 8
    assert fast.even_spans(600, 9) == fast.spans(600, 9)                                   # many: as they are
    assert fast.even_spans(5, 1) == fast.spans(5, 1) and fast.even_spans(3, 5) == [(0, 3)]


def test_one_im2col_scratch_buffer_for_all_layers():
    """The im2col chunks of every FastConv2d come from one shared buffer, not one per layer."""
    rng = np.random.default_rng(2)
    a = fast.FastConv2d(8, 4, 3, 1, 1, rng=rng, dtype=F64)
    b = fast.FastConv2d(8, 6, 3, 2, 1, rng=rng, dtype=F64)
    for conv in (a, b):
        conv.CHUNK_FLOATS = 2000
        conv.forward(rng.standard_normal((4, 6, 6, 8)))
    chunk_a = a.shared_workspace((10, 3), F64)
    chunk_b = b.shared_workspace((5, 2), F64)
    assert np.shares_memory(chunk_a, chunk_b)
    assert "cols_chunk" not in a.__dict__.get("_workspace", {})


@pytest.mark.parametrize("backbone,d", [("convnet", 64), ("resnet18", 512)])
def test_threads_give_the_same_bits(monkeypatch, backbone, d):
    """The float32 backbones, forward and backward, with blocks of a few images: one thread and
    three agree to the last bit (a block's numbers do not depend on who computes them, and the
    weight gradients' partial sums are added in the same order, in slabs or not)."""
    from scratchproto.backbones import build_backbone
    x = (np.random.default_rng(21).random((12, 1, 28, 28)) > 0.85).astype(np.float32)
    r = np.random.default_rng(22).standard_normal((12, d)).astype(np.float32)
    results = []
    for threads, block in ((1, 30000), (3, 30000)):
        monkeypatch.setattr(fast, "THREADS", threads)
        monkeypatch.setattr(fast, "BLOCK_FLOATS", block)
        net = build_backbone(backbone, seed=3)
        net.zero_grad()
        out = net.forward(x, True)
        net.backward(r, need_dx=False)
        results.append((out.copy(), backend.to_host(net.flat_grads).copy()))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


def test_over_images_covers_every_image_once_in_order(monkeypatch):
    monkeypatch.setattr(fast, "THREADS", 3)
    monkeypatch.setattr(fast, "BLOCK_FLOATS", 10)
    seen = fast.over_images(np, 23, 4, lambda n0, n1: list(range(n0, n1)))   # blocks of 2 images
    assert [i for block in seen for i in block] == list(range(23))
    assert max(len(b) for b in seen) == 2


def test_deal_shares_tasks_among_threads_keeps_their_order_and_raises_a_workers_error(monkeypatch):
    import threading
    monkeypatch.setattr(fast, "THREADS", 3)
    other_started = threading.Event()

    def task(i):
        if i == 0:          # with threads, another task starts while this one waits
            return other_started.wait(timeout=10)
        other_started.set()
        # a nested deal runs in this thread alone (its slot, no deadlock on the pool)
        assert fast.deal(np, [(1,), (2,)], lambda j: fast.thread_slot()) == [fast.thread_slot()] * 2
        return i * i
    assert fast.deal(np, [(i,) for i in range(40)], task) == [True] + [i * i for i in range(1, 40)]

    def bad(i):
        if i == 7:
            raise ValueError("task 7")
        return i
    with pytest.raises(ValueError, match="task 7"):
        fast.deal(np, [(i,) for i in range(20)], bad)
    assert fast.thread_slot() == 0
    assert fast.deal(np, [(i,) for i in range(5)], lambda i: -i) == [0, -1, -2, -3, -4]   # still usable


def test_thread_count_is_the_budget_the_environment_sets(monkeypatch):
    """SCRATCHPROTO_THREADS decides; else the smallest count a job script set for OpenMP or a BLAS
    is the whole budget (not multiplied by BLAS threads); else every core; never above the cores."""
    for name in ("SCRATCHPROTO_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fast, "usable_cores", lambda: 4)
    assert fast.cpu_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert fast.cpu_threads() == 3
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    assert fast.cpu_threads() == 2
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # a run pinned to one thread
    assert fast.cpu_threads() == 1
    monkeypatch.setenv("SCRATCHPROTO_THREADS", "2")
    assert fast.cpu_threads() == 2
    monkeypatch.setenv("SCRATCHPROTO_THREADS", "zero")   # not a count: the others decide
    assert fast.cpu_threads() == 1
    monkeypatch.setenv("SCRATCHPROTO_THREADS", "16")     # more than the cores: the cores
    assert fast.cpu_threads() == 4
    for name in ("SCRATCHPROTO_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert fast.cpu_threads() == 4


def blas_threads():
    from threadpoolctl import threadpool_info
    return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})


def test_blas_runs_on_one_thread_inside_our_work_whoever_loaded_it():
    """In a fresh process that imports NumPy first, with OpenBLAS told to run 2 threads by the
    environment (OpenBLAS runs no more than the cores): inside blas_one_thread every BLAS library runs one, nested uses keep the limit
    until the outermost leaves, and leaving restores the user's setting."""
    import subprocess
    import sys
    if fast.usable_cores() < 2:
        pytest.skip("one core: OpenBLAS runs one thread whatever it is told")
    code = ("import numpy, json; from scratchproto import fast; from tests.test_fast import blas_threads\n"
            "seen = [blas_threads()]\n"
            "with fast.blas_one_thread(numpy):\n"
            "    with fast.blas_one_thread(numpy):\n"
            "        seen.append(blas_threads())\n"
            "    seen.append(blas_threads())\n"
            "seen.append(blas_threads())\n"
            "print(json.dumps(seen))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "SCRATCHPROTO_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    import json
    assert json.loads(out.stdout) == [[2], [1], [1], [2]]


def test_an_episode_runs_blas_on_one_thread():
    """ProtoNet.start_episode holds the limit while the backbone runs, and lets it go after."""
    from threadpoolctl import threadpool_limits
    from scratchproto import ProtoNet, build_backbone
    net = build_backbone("convnet", seed=0, width=4)
    seen, forward = [], net.forward

    def watched(x, train=True):
        seen.append(blas_threads())
        return forward(x, train=train)
    net.forward = watched
    rng = np.random.default_rng(0)
    xs, xq = rng.random((3, 2, 1, 28, 28), dtype=np.float32), rng.random((3, 2, 1, 28, 28), dtype=np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        ProtoNet(net).episode(xs, xq, train=True)
        after = blas_threads()
    assert seen == [[1]] and after == before


@pytest.mark.parametrize("shape", [(5, 7, 7, 64), (3, 3, 3, 64), (1, 1, 1, 64), (2, 5, 5, 3), (4, 2, 2, 600)])
def test_channelwise_gives_the_plain_ufuncs_bits(shape):
    """Rows regrouped against a repeated vector: every element the same operation on the same
    operands, so the very same bits, whatever the row count left over (7*7*5 rows: not a
    multiple of 16), in place or not, with NumPy's type promotion, and the plain ufunc where
    the rows cannot be regrouped (not contiguous; over CHANNEL_ROW / 2 channels)."""
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape[-1]).astype(np.float32)
    for ufunc in (np.multiply, np.add, np.subtract):
        want = ufunc(a, v)
        got = fast.channelwise(ufunc, a, v)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        b = a.copy()
        assert fast.channelwise(ufunc, b, v, b) is b and np.array_equal(b, want)
        wide = fast.channelwise(ufunc, a, v.astype(np.float64))            # promoted as NumPy does
        assert wide.dtype == np.float64 and np.array_equal(wide, ufunc(a, v.astype(np.float64)))
        strided = a[:, ::-1]
        assert np.array_equal(fast.channelwise(ufunc, strided, v), ufunc(strided, v))


@pytest.mark.parametrize("backbone,batch", [("convnet", 3), ("resnet18", 2)])
def test_whole_fast_backbones_on_numpy_match_the_plain_layers(backbone, batch):
    """Every fast piece on NumPy at once, ResNet-18's stem and shortcut BatchNorms and stem ReLU
    included: outputs, input gradient, parameter gradients, BatchNorm buffers, in float64."""
    from scratchproto import build_backbone
    from tests.test_kernels import _assert_backbones_agree
    plain, quick = build_backbone(backbone, seed=0, dtype=F64, fast=False), build_backbone(backbone, seed=0, dtype=F64)
    shift = 0.1 * np.random.default_rng(11).standard_normal(plain.flat_params.shape)   # BatchNorm's beta not 0
    plain.flat_params += shift
    quick.flat_params += shift
    _assert_backbones_agree(plain, quick, batch, seed=10)


def test_a_missing_threadpoolctl_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)      # import fails as if not installed
    with pytest.raises(ImportError, match=r"scratchproto needs threadpoolctl .* pip install -e \."):
        with fast._OneBlasThread():
            pass
