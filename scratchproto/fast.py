"""Fast versions of layers in layers.py: the same math, arranged to touch memory less.

On a CPU a training episode is bound less by arithmetic than by passes over big arrays (the first
ConvNet block's activations are 600 x 28 x 28 x 64 floats, 120 MB). Two rearrangements:

* FastConv2d: im2col in chunks of images, each built by one copy from a strided window view, so
  the k*k-times-larger im2col matrix (271 MB for the second ConvNet block) is never stored whole,
  and its buffer (about 4 MB) is reused rather than allocated (and page-faulted) on every call.
  The input gradient of a stride-1 convolution is the correlation of dy with the flipped kernel,
  computed by the same machinery instead of scattering dcols back (col2im), and the weight
  gradient is read off the same im2col chunks (of the padded dy) times x, so the backward pass
  builds one im2col matrix, not two. A strided convolution's input gradient is one GEMM per
  residue class of input positions modulo the stride, each reached by its own taps alone
  ("sub-pixel"), rather than col2im's scatter.

* ConvBlock: a ConvNet block, conv -> BatchNorm -> ReLU -> 2x2 max-pool, fused. Max-pooling
  commutes with the ReLU and with BatchNorm's per-channel affine map y -> s*y + t where s >= 0;
  the sign of s is gamma's, so the block multiplies the convolution's output channels by
  sign(gamma) (through the weights, for free), pools that raw output, and normalises and
  rectifies only the pooled quarter. In the backward pass the gradient of the
  normalised output is non-zero only at the pooled winners, which turns BatchNorm's backward
  into a few per-channel sums over the quarter plus dy = B*y + C everywhere and a*dz at the
  winners. It picks the same winner as PyTorch's relu-then-pool (the first maximum in window
  order), except where float32 rounding ties s*y1 + t == s*y2 + t for y1 != y2, and for a channel
  with gamma exactly 0. BatchNorm's dgamma = sum dz*xhat is taken as s*(sum dz*pooled - mean*sum
  dz), so that no pass makes xhat: training rounds differently from the plain block, in the last
  bits. Each chunk of the convolution's output is pooled, keeping each window's winning position
  (one byte) for the backward pass, by the thread that made it. For the 1-channel first block
  (im2col rows 9 wide) the batch statistics and dW follow from the 9 x 9 Gram matrix of the im2col
  rows, and on the CPU its 120 MB output is never stored: it is made a few images at a time and
  pooled at once, and its backward pass is one pass of chunks.

* FastBasicBlock: ResNet-18's residual block with each BatchNorm fused with the ReLU after it
  (and the residual sum before it): the normalisation overwrites the convolution's output instead
  of copying it, the ReLU and the sum work in place, and the backward pass overwrites the
  gradients it owns. Same operations in the same order as the plain layers, so the same numbers,
  with four fewer full-size arrays allocated per block and direction. But its 3x3 stride-1
  convolutions run as Winograd's F(4x4, 3x3) (winograd.py; FastConv2d(winograd=True)): 36
  multiplications per 4x4 outputs where im2col makes 144, its transforms GEMMs too, for 0.63
  to 0.79 of im2col's time forward and 0.65 to 0.73 backward (benchmarks/README.md). It rounds
  worse, some 20 times im2col's error in float32 (1e-5 of the largest output), which the tests
  bound.

On a CPU everything uses the threads of the budget (``THREADS``: every core the process may use,
or fewer where the environment says so; ``cpu_threads``): the passes outside the
GEMMs (BatchNorm statistics, pooling, scale/shift/ReLU, dy and the pooling winners, the im2col
copies) in blocks of images of about 2 MB (``over_images``; a block's temporaries in per-thread
buffers still in the cache from the last block, ``scratch``), and the convolutions in chunks of
images, a chunk's padding and im2col copy, its GEMMs (BLAS on one thread, ``blas_one_thread``)
and its part of the weight gradient being one task; blocks and chunks as equal as they can be,
and an even number where they are few (``even_spans``). A few reused threads take the blocks or
chunks one at a time from a shared queue (``deal``; NumPy lets go of the GIL in its loops and
BLAS calls, but not around a product with fewer than about 500 outputs:
``column_sums_and_gram``), so a core that runs slower takes fewer. A block's result does not
depend on who computes it and partial sums are added in chunk order, so the numbers are the same
with any number of threads.

tests/test_fast.py checks them against the plain layers, in float64, to rounding.
"""
import contextlib
import os
import threading
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial

import numpy as np

from . import backend, kernels, winograd
from .layers import (BasicBlock, BatchNorm2d, BatchNormCache, Conv2d, MaxPool2d, ReLU, Sequential, col2im,
                     output_size, windows)

# What the fast layers keep for their backward passes, by name.
NarrowConvCache = namedtuple("NarrowConvCache", "cols x_shape")      # the whole (small) im2col matrix
ChunkedConvCache = namedtuple("ChunkedConvCache", "x xpad")     # input (padded on a GPU): im2col chunks made anew
WinogradConvCache = namedtuple("WinogradConvCache", "x U")    # the input (its tiles made anew), filters transformed
ConvBlockCache = namedtuple("ConvBlockCache", "y pooled out sign mean inv_std m train gram winner x window_cols")
FastBasicBlockCache = namedtuple("FastBasicBlockCache", "h xhat1 inv_std1 out xhat2 inv_std2 train")


class Workspace:
    """A mixin: scratch arrays kept between calls, so that big temporaries (im2col matrices,
    padded images) are not allocated, page-faulted and freed again on every episode."""

    def workspace(self, name, shape, dtype, zero_border=0):
        """The scratch array ``name`` of this shape and dtype, made on first use. Only for arrays
        that do not outlive the layer's next call. ``zero_border``: the array is a padded image
        whose border of that width must be zero (it is zeroed once, when made)."""
        ws = self.__dict__.setdefault("_workspace", {})
        a = ws.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            a = ws[name] = (self.xp.zeros if zero_border else self.xp.empty)(shape, dtype=dtype)
        return a

    def shared_workspace(self, shape, dtype):
        """A scratch array of this shape, carved from one buffer shared by all layers (grown when
        too small): for temporaries used and dropped within one task, like an im2col chunk. One
        buffer for the network instead of one per layer matters on a GPU, where a chunk is up to
        512 MB; on a CPU each of our threads has its own (``deal``)."""
        return scratch(self.xp, shape, dtype)


_scratch = {}   # (array module, dtype, thread, use) -> one flat scratch array


def scratch(xp, shape, dtype, use=""):
    """A scratch array of this shape for a temporary used and dropped within one task, carved
    from one buffer per thread (and ``use``: temporaries alive at the same time need different
    ones), grown when too small: not allocated anew for every block, and still in the cache
    from the last one."""
    size = 1
    for d in shape:
        size *= d
    key = (xp.__name__, np.dtype(dtype).str, thread_slot(), use)
    buf = _scratch.get(key)
    if buf is None or buf.size < size:
        buf = _scratch[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def usable_cores():
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads():
    """How many threads scratchproto runs on a CPU, the whole budget: $SCRATCHPROTO_THREADS, else
    the smallest of $OMP_NUM_THREADS, $OPENBLAS_NUM_THREADS and $MKL_NUM_THREADS (the counts that
    job scripts set, so that a job keeps to the cores it was given), else every usable core; never
    more than the usable cores. BLAS runs on one thread inside our work (``blas_one_thread``), so
    this count is also the number of threads computing: it is not multiplied by BLAS's."""
    def count(name):
        value = os.environ.get(name, "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None
    ours = count("SCRATCHPROTO_THREADS")
    if ours is None:
        chosen = [n for n in map(count, ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")) if n]
        ours = min(chosen, default=usable_cores())
    return min(ours, usable_cores())


class _OneBlasThread:
    """The context of ``blas_one_thread``: nested and concurrent uses hold one limit, set by the
    first to enter and lifted by the last to leave."""

    def __init__(self):
        self.lock, self.depth, self.limiter, self.controller = threading.Lock(), 0, None, None

    def __enter__(self):
        with self.lock:
            if self.depth == 0:
                if self.controller is None:
                    try:
                        from threadpoolctl import ThreadpoolController
                    except ImportError:
                        raise ImportError("scratchproto needs threadpoolctl to keep BLAS to one thread "
                                          "on a CPU: install it with pip install -e . (or pip install "
                                          "threadpoolctl)") from None
                    self.controller = ThreadpoolController()    # finds the BLAS libraries loaded (~1 ms)
                self.limiter = self.controller.limit(limits=1, user_api="blas")
            self.depth += 1

    def __exit__(self, *exc):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self.limiter.restore_original_limits()
                self.limiter = None


_ONE_BLAS_THREAD = _OneBlasThread()


def blas_one_thread(xp):
    """A context in which every BLAS library NumPy has loaded runs on one thread (OpenBLAS, MKL,
    BLIS, FlexiBLAS: those threadpoolctl can set; Apple's Accelerate has no such call, and its
    threads follow $VECLIB_MAXIMUM_THREADS); around our work on NumPy (ProtoNet.start_episode, the trainer's epochs, the
    evaluations). Our THREADS threads deal out the products (``deal``), each calling BLAS on its
    own thread, so BLAS threads of its own would only multiply the count: two of ours over two of
    OpenBLAS's ran a ConvNet episode 3 to 7 times slower (benchmarks/README.md). threadpoolctl
    sets the limit through each library's own call, at run time, so neither the environment nor
    who imported NumPy first can undo it, and it is lifted on leaving (~20 us for both). Nested
    uses cost a lock. Hold it over a loop of episodes, as the trainer does over an epoch: lifted,
    OpenBLAS's threads spin on our cores for a while (6 to 17% of a ConvNet episode when lifted
    after each). On CuPy it does nothing."""
    return _ONE_BLAS_THREAD if xp is np else contextlib.nullcontext()


THREADS = cpu_threads()
BLOCK_FLOATS = 1 << 19      # about 2 MB of float32 per block (benchmarks/README.md)
_pool = None                # (workers, executor): THREADS - 1 threads, made on first use; the caller is the last
_local = threading.local()  # .slot: which of our threads this is (0: the caller), while it takes tasks


def thread_slot():
    """0 in the calling thread, 1 .. THREADS - 1 in the workers while they take tasks: for
    per-thread scratch buffers (an im2col chunk each)."""
    return getattr(_local, "slot", 0)


def deal(xp, tasks, fn):
    """[fn(*task) for task in tasks], in order.

    On NumPy with THREADS > 1 our threads take the tasks one at a time from a shared queue
    (the caller is one of them): a core that runs slower, because the host gives it less, takes
    fewer tasks instead of holding the others up at a fixed half. fn must write only to the
    part of its outputs that its task names; results that must be combined (partial sums) are
    returned, and the caller combines them in task order, so the numbers do not depend on who
    computed what. Inside a task, a nested deal or over_images runs in that thread alone.
    On CuPy (and with one thread) the tasks run one after another."""
    global _pool
    if xp is not np or THREADS <= 1 or len(tasks) <= 1 or getattr(_local, "busy", False):
        return [fn(*task) for task in tasks]
    parts = min(THREADS, len(tasks))
    if _pool is None or _pool[0] < parts - 1:
        backend.keep_freed_memory()     # else each worker's temporaries are page-faulted in anew
        _pool = (THREADS - 1, ThreadPoolExecutor(THREADS - 1, thread_name_prefix="scratchproto"))
    results, queue, lock, failed = [None] * len(tasks), iter(range(len(tasks))), threading.Lock(), []

    def take(slot):
        _local.slot, _local.busy = slot, True
        try:
            while not failed:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                results[i] = fn(*tasks[i])
        except BaseException:
            failed.append(True)         # the others stop after their current task
            raise
        finally:
            _local.slot, _local.busy = 0, False
    futures = [_pool[1].submit(take, slot) for slot in range(1, parts)]
    try:
        take(0)
    finally:
        wait(futures)                   # no worker may still write when the caller moves on
    for f in futures:
        f.result()                      # a worker's exception, raised here
    return results


def spans(n, step):
    """Consecutive (start, stop) spans of at most ``step`` covering 0..n: blocks and chunks of images."""
    return [(n0, min(n, n0 + step)) for n0 in range(0, n, step)]


EVEN_BELOW = 16     # fewer tasks than this: an even number of them (even_spans)


def even_spans(n, step, min_step=1):
    """About n / step spans covering 0..n, as equal as they can be, and an even number where
    they are few and long enough (one more, or one fewer where one more would make them shorter
    than min_step), so that two threads finish together: ResNet-18's last layer had two chunks
    of 128 and 72 images (one thread idle for 44% of it), the ConvNet's last block three chunks
    (on two threads as long as four). They depend on n and step alone, never on the threads, so
    neither do the numbers."""
    count = -(-n // step)
    if 1 < count < EVEN_BELOW and count % 2 and n >= 2 * (count + 1):
        count += 1 if n // (count + 1) >= min_step else -1
    return spans(n, -(-n // count))


def over_images(xp, n, per_image, fn):
    """[fn(n0, n1) for consecutive blocks of images n0..n1 covering 0..n], in order (images, or
    any first axis: Adam steps the flat parameter arrays with per_image = 1).

    A block holds about BLOCK_FLOATS / per_image images (per_image: floats per image of the
    largest array fn touches); on NumPy the blocks are dealt out to the threads (``deal``); on
    CuPy (one launch per call is what counts there) fn(0, n) is the only call.
    fn must write only to images n0..n1 of its outputs and may return a value (e.g. per-image
    partial sums) to be combined by the caller.
    """
    if xp is not np:
        return [fn(0, n)]
    step = max(1, BLOCK_FLOATS // max(1, per_image))
    return deal(xp, even_spans(n, step), fn)


CHANNEL_ROW = 1024          # floats per row for channelwise arithmetic (below)


def channelwise(ufunc, a, v, out=None):
    """ufunc(a, v, out=out) for a (..., C) and a per-channel vector v (C,): the same numbers,
    about twice as fast for 64 channels. NumPy runs a broadcast along the last axis in inner
    loops C elements long, too short for its vector code (a 64-channel multiply ran at half the
    speed of one with rows 1024 long, benchmarks/README.md), so the rows are taken
    CHANNEL_ROW // C at a time against v repeated as often, the rows left over as they are.
    For C-contiguous a and out on NumPy; anything else is the plain ufunc."""
    if out is None and type(a) is np.ndarray:
        out = np.empty(a.shape, dtype=np.result_type(a, v))
    c = a.shape[-1] if a.ndim else 0
    r = CHANNEL_ROW // c if c else 0
    if (r < 2 or out is None or type(out) is not np.ndarray or v.shape != (c,)
            or not (a.flags.c_contiguous and out.flags.c_contiguous) or out.shape != a.shape):
        return ufunc(a, v, out=out)
    flat, flat_out = a.reshape(-1, c), out.reshape(-1, c)
    whole = len(flat) - len(flat) % r
    if whole:
        ufunc(flat[:whole].reshape(-1, r * c), np.tile(v, r), out=flat_out[:whole].reshape(-1, r * c))
    if whole < len(flat):
        ufunc(flat[whole:], v, out=flat_out[whole:])
    return out


def sum_in_order(xp, parts):
    """parts[0] + parts[1] + ..., added left to right into parts[0] (fresh partial products):
    the order a single thread would add them in, whoever computed them. On NumPy a big sum
    (ResNet-18's weight gradients: dozens of 512 x 4608 partial products) is cut into slabs
    that the threads share; each element is still added in the same order."""
    total = parts[0]
    if (xp is np and THREADS > 1 and total.size * (len(parts) - 1) > BLOCK_FLOATS
            and all(p.flags.c_contiguous and p.shape == total.shape for p in parts)):
        flat = [p.reshape(-1) for p in parts]

        def slab(i0, i1):
            for part in flat[1:]:
                np.add(flat[0][i0:i1], part[i0:i1], out=flat[0][i0:i1])
        deal(xp, spans(total.size, max(1024, BLOCK_FLOATS // len(parts))), slab)
        return total
    for part in parts[1:]:
        xp.add(total, part, out=total)
    return total


def copy_by_blocks(xp, dst, src, axis):
    """dst[...] = src (a transposing view), 16 indices of ``axis`` at a time on every thread: a
    convolution's weights rearranged for its GEMMs, where axis is the output channels', so that
    each task reads 16 whole filters and writes 16 floats (a cache line) wherever it writes."""
    if xp is not np or THREADS <= 1 or dst.size < BLOCK_FLOATS:
        dst[...] = src
        return dst

    def part(i0, i1):
        at = (slice(None),) * axis + (slice(i0, i1),)
        dst[at] = src[at]
    deal(xp, spans(dst.shape[axis], 16), part)
    return dst


def add_by_channel_blocks(xp, dst, src):
    """dst += src for a C-contiguous dst (C_out, ...) and any view src of its shape (a weight
    gradient computed as (..., C_out) and transposed): 16 output channels at a time on every
    thread, so that each read of src's rows uses a whole cache line (16 floats) rather than one
    float of it. The same additions, so the same bits."""
    if xp is not np or THREADS <= 1:
        dst += src
        return

    def part(o0, o1):
        dst[o0:o1] += src[o0:o1]
    deal(xp, spans(len(dst), 16), part)


def per_image_sums(xp, parts):
    """Channel sums over all images from the per-image sums (n_i, C) of consecutive blocks:
    across images in float64, as BatchNorm2d.channel_sum does."""
    return xp.concatenate(parts).sum(axis=0, dtype=np.float64).astype(parts[0].dtype)


def copy_images(xp, dst, src):
    """dst[...] = src for arrays (N, ...), image blocks shared among the threads."""
    def part(n0, n1):
        dst[n0:n1] = src[n0:n1]
    over_images(xp, dst.shape[0], dst[:1].size, part)


class FastConv2d(Workspace, Conv2d):
    """Conv2d whose im2col matrix never exists whole: it is built chunk by chunk of images, each
    chunk with one copy from a strided window view of the padded input, used for its GEMM and
    dropped. The backward pass of a stride-1 convolution gets dx as a correlation of dy with the
    flipped kernel, and dW from the same im2col chunks (of the padded dy) times x; otherwise it
    rebuilds each chunk of x for dW and scatters dcols chunk by chunk for dx (col2im).

    Same math as Conv2d (any k, stride, padding). Where k*k*C_in is small (the 1-channel first
    layer: 9) the whole matrix is small too, and it is kept for the backward pass as Conv2d does.

    ``winograd=True``: a 3x3, stride-1, padding-1 convolution on NumPy with at least
    WINOGRAD_MIN_CHANNELS input channels runs as Winograd's F(4x4, 3x3) instead (winograd.py),
    chunk by chunk of images as im2col does: 36/144 of the GEMMs' multiplications where the
    size is a multiple of 4. Its numbers differ from im2col's by more than rounding's last bit
    (winograd.py), so it is asked for (ResNet-18's blocks), never implied; the ConvNet keeps
    im2col. On CuPy it is not used: it has not run on a GPU.
    """

    # On a CPU, about 4 MB of im2col rows per chunk, so that a chunk is still in the cache for
    # the backward pass's second GEMM, but at least CHUNK_MIN_ROWS rows: a GEMM with fewer rows
    # than that runs slower (ResNet-18's 512-channel layers, whose rows are 4608 floats wide;
    # benchmarks/README.md). The buffers stay small (ResNet-18's 20-way episode peaks ~200 MB
    # lower than with 32 MB chunks). On a GPU every chunk costs kernel launches and small GEMMs
    # leave most of the chip idle, so chunks are 128 times larger, 512 MB: every layer of a
    # 60-way ConvNet episode in one, ResNet-18's in one to three (its training episode is then
    # about 500 launches at 60-way, 595 with 256 MB chunks; benchmarks/README.md).
    CHUNK_FLOATS = 1 << 20
    CHUNK_MIN_ROWS = 512
    GPU_CHUNK_FLOATS = 1 << 27
    NARROW_K = 32                 # k*k*C_in up to this: plain im2col

    def __init__(self, *args, winograd=False, **kw):
        super().__init__(*args, **kw)
        self.winograd = winograd

    def _wmat(self):
        """Conv2d._wmat, (k*k*C_in, C_out), copied by blocks of output channels on every thread
        (ResNet-18's 512 x 512 x 3 x 3 transposes were a serial pass per convolution)."""
        w = self.params["weight"]
        if self.xp is not np:           # one copy (one launch), as Conv2d makes it
            return super()._wmat()
        out = np.empty((self.k, self.k, self.c_in, self.c_out), dtype=w.dtype)
        return copy_by_blocks(np, out, w.transpose(2, 3, 1, 0), 3).reshape(-1, self.c_out)

    def _window_view(self, xpad, n0, n1, ho, wo, st):
        """(n1 - n0, Ho, Wo, k, k, C) view of the padded images n0..n1 at stride st: no copy."""
        s0, s1, s2, s3 = xpad.strides
        return self.xp.lib.stride_tricks.as_strided(
            xpad[n0:n1], shape=(n1 - n0, ho, wo, self.k, self.k, xpad.shape[3]),
            strides=(s0, st * s1, st * s2, s1, s2, s3))

    def padded(self, x, pad, name="xpad"):
        """x (N, H, W, C) copied into the workspace ``name`` inside a zero border of width pad."""
        n, h, w, c = x.shape
        xpad = self.workspace(name, (n, h + 2 * pad, w + 2 * pad, c), x.dtype, zero_border=pad)
        copy_images(self.xp, xpad[:, pad:pad + h, pad:pad + w], x)
        return xpad

    def _chunks(self, n, ho, wo, c, per_image=None):
        """Chunks of images whose scratch rows (per_image floats an image: im2col's by default)
        take about CHUNK_FLOATS on a CPU, sized for GEMMs of at least CHUNK_MIN_ROWS rows (Ho*Wo
        an image), then made equal (even_spans: two chunks may hold fewer rows). Two at least
        where both hold that many rows: ResNet-18's last shortcut (1x1, 4x4 outputs) fitted its
        200 images in one chunk, on one core."""
        per_image = per_image or ho * wo * self.k * self.k * c
        if self.xp is not np:
            return spans(n, max(1, self.GPU_CHUNK_FLOATS // per_image))
        min_images = -(-self.CHUNK_MIN_ROWS // (ho * wo))
        step = max(1, self.CHUNK_FLOATS // per_image, min_images)
        if step >= n >= 2 * min_images:
            step = -(-n // 2)
        return even_spans(n, step, min_images)

    def _cols(self, xpad, ho, wo, stride, step):
        """im2col rows of the padded images xpad (a chunk of them), in a buffer reused by every
        chunk of up to ``step`` images."""
        m, kkc = len(xpad), self.k * self.k * xpad.shape[3]
        cols = self.shared_workspace((step * ho * wo, kkc), xpad.dtype)[:m * ho * wo]
        # one copy (a chunk is one thread's task already)
        cols.reshape(m, ho, wo, self.k, self.k, -1)[...] = self._window_view(xpad, 0, m, ho, wo, stride)
        return cols

    def _padded_chunk(self, x, xpad, n0, n1, pad, step, extra=(0, 0)):
        """Images n0..n1 of x (N, H, W, C) inside a zero border of width pad (and extra = (rows,
        columns) more at the bottom and on the right): xpad's, where the whole x was padded (on a
        GPU), else made now in this thread's scratch (on a CPU, a chunk at a time while it is in
        the cache, rather than a padded copy of x written out whole and read back)."""
        if xpad is not None:
            return xpad[n0:n1]
        n, h, w, c = x.shape
        shape = (step, h + 2 * pad + extra[0], w + 2 * pad + extra[1], c)
        chunk = scratch(self.xp, shape, x.dtype, "padded")[:n1 - n0]
        if pad or any(extra):           # (the buffer is shared by layers of other shapes)
            chunk[:, :pad] = chunk[:, h + pad:] = chunk[:, :, :pad] = chunk[:, :, w + pad:] = 0
        chunk[:, pad:pad + h, pad:pad + w] = x[n0:n1]
        return chunk

    def _correlate(self, x, wmat, pad, stride, name, reuse=False, each_chunk=None):
        """sum over taps of the padded x (N, H, W, C) times wmat (k*k*C, C_out), chunk by chunk.
        Returns (y (N, Ho, Wo, C_out), the padded x (a workspace named name) on a GPU or None,
        [each_chunk's values]).

        ``each_chunk(n0, n1, y_chunk, cols)``: called in a chunk's task, right after its product,
        while y's images n0..n1 (n1 - n0, Ho, Wo, C_out) and the chunk's im2col rows cols are
        still in the cache; its values come back in chunk order."""
        xp, k = self.xp, self.k
        n, h, w, c = x.shape
        ho, wo = output_size(h, k, stride, pad), output_size(w, k, stride, pad)
        xpad = self.padded(x, pad, name) if xp is not np else None     # on a CPU each chunk pads its images
        shape = (n * ho * wo, wmat.shape[1])
        y = self.workspace(name + "_out", shape, x.dtype) if reuse else xp.empty(shape, dtype=x.dtype)
        chunks = self._chunks(n, ho, wo, c)

        def chunk(n0, n1):              # one thread's task: an im2col chunk and its products
            step = chunks[0][1]
            cols = self._cols(self._padded_chunk(x, xpad, n0, n1, pad, step), ho, wo, stride, step)
            y_chunk = xp.matmul(cols, wmat, out=y[n0 * ho * wo:n1 * ho * wo])
            if each_chunk is not None:
                return each_chunk(n0, n1, y_chunk.reshape(n1 - n0, ho, wo, -1), cols)
        parts = deal(xp, chunks, chunk)
        return y.reshape(n, ho, wo, -1), xpad, parts

    def forward(self, x, train=True):
        y = self.conv(x)
        if "bias" in self.params:
            y += self.params["bias"]
        return y

    def backward(self, dout, need_dx=True):
        if "bias" in self.params:
            self.grads["bias"] += dout.reshape(-1, self.c_out).sum(axis=0)
        return self.conv_backward(dout, need_dx)

    # The bias-free core, also used by the fused ConvNet block.
    def conv(self, x, out_scale=None, reuse=False, each_chunk=None):
        """x (N, H, W, C_in) -> x * W (N, Ho, Wo, C_out), no bias. ``out_scale`` (C_out,)
        multiplies the output channels (through the weights, for free); ``reuse``: the output may
        live in a buffer this layer's next call overwrites (for a caller that is done with it by
        then, like ConvBlock). ``each_chunk(n0, n1, y_chunk)``: called on consecutive ranges of
        images covering 0..N, y's images n0..n1 as soon as they are made (on a CPU by the thread
        that made them, while they are in its cache); conv then returns (y, [its values in order])."""
        if out_scale is None and self._winograd_applies(x.shape):
            y, parts = self._winograd_forward(x, each_chunk)
            return y if each_chunk is None else (y, parts)
        wmat = self._wmat() if out_scale is None else self._wmat() * out_scale
        if self.k * self.k * x.shape[3] <= self.NARROW_K:
            cols, (n, ho, wo) = self.narrow_cols(x)
            shape = (n * ho * wo, self.c_out)
            y = self.workspace("y", shape, x.dtype) if reuse else self.xp.empty(shape, dtype=x.dtype)
            per = ho * wo               # rows per image; blocks of images shared among the threads

            def block(n0, n1):
                y_block = self.xp.matmul(cols[n0 * per:n1 * per], wmat, out=y[n0 * per:n1 * per])
                if each_chunk is not None:
                    return each_chunk(n0, n1, y_block.reshape(n1 - n0, ho, wo, self.c_out))
            parts = over_images(self.xp, n, per * self.c_out, block)
            y = y.reshape(n, ho, wo, self.c_out)
            return y if each_chunk is None else (y, parts)
        y, xpad, parts = self._correlate(x, wmat, self.padding, self.stride, "xpad", reuse,
                                         None if each_chunk is None else lambda n0, n1, y_chunk, cols:
                                         each_chunk(n0, n1, y_chunk))
        self.cache = ChunkedConvCache(x, xpad)
        return y if each_chunk is None else (y, parts)

    def narrow_cols(self, x):
        """The whole im2col matrix (N*Ho*Wo, k*k*C_in) of a narrow input x (N, H, W, C_in), kept
        for the backward pass as Conv2d keeps it. Returns (cols, (N, Ho, Wo))."""
        xp, k, s, p = self.xp, self.k, self.stride, self.padding
        n, h, w, c = x.shape
        ho, wo = output_size(h, k, s, p), output_size(w, k, s, p)
        xpad = self.padded(x, p)
        cols = self.workspace("cols", (n * ho * wo, k * k * c), x.dtype)
        copy_images(xp, cols.reshape(n, ho, wo, k, k, c), self._window_view(xpad, 0, n, ho, wo, s))
        self.cache = NarrowConvCache(cols, x.shape)
        return cols, (n, ho, wo)

    # Winograd's F(4x4, 3x3) (winograd.py), chunk by chunk of images on every thread: 36 GEMM
    # multiplications per 4x4 outputs where im2col makes 144, each 2-D transform of a chunk's
    # tiles one GEMM with a Kronecker product. On the Xeon (python benchmarks/winograd.py;
    # benchmarks/README.md) it took 0.63 to 0.79 of im2col's time forward and 0.65 to 0.73
    # backward at every ResNet-18 size, 64 channels included. Sizes that are not multiples of 4
    # compute spare outputs from zeros beyond the padding, and drop them. It rounds worse than
    # im2col (winograd.py), so it is asked for (ResNet-18's blocks), never implied: the ConvNet
    # keeps im2col. On CuPy it is not used: it has not run on a GPU.
    WINOGRAD_MIN_CHANNELS = 64
    WINOGRAD_MIN_ROWS = 64      # GEMM rows (tiles) per chunk at least: ResNet-18's 4x4 layer has one an image

    def _winograd_applies(self, x_shape):
        return (self.winograd and self.xp is np and (self.k, self.stride, self.padding) == (3, 1, 1)
                and x_shape[3] >= self.WINOGRAD_MIN_CHANNELS)

    def _scratch(self, shapes, dtype):
        """Arrays of these shapes carved one after another from this thread's shared workspace."""
        sizes = [int(np.prod(s)) for s in shapes]
        buf, out, at = self.shared_workspace((sum(sizes),), dtype), [], 0
        for shape, size in zip(shapes, sizes):
            out.append(buf[at:at + size].reshape(shape))
            at += size
        return out

    def _winograd_chunks(self, n, ty, tx, c):
        """Chunks of images for the transformed tiles: 36 values per tile and channel, about
        CHUNK_FLOATS of them, Ty*Tx GEMM rows an image, at least WINOGRAD_MIN_ROWS."""
        per_image = 36 * ty * tx * max(c, self.c_out)
        min_images = -(-self.WINOGRAD_MIN_ROWS // (ty * tx))
        return even_spans(n, max(1, self.CHUNK_FLOATS // per_image, min_images), min_images)

    def _winograd_forward(self, x, each_chunk=None):
        """y = conv(x) by Winograd's F(4x4, 3x3), chunk by chunk; returns (y, [each_chunk's values])."""
        xp, k = self.xp, self.c_out
        n, h, w, c = x.shape
        ty, tx = -(-h // 4), -(-w // 4)
        kb, ka = xp.asarray(winograd.KB, dtype=x.dtype), xp.asarray(winograd.KA, dtype=x.dtype)
        U = winograd.filter_transform(xp, self._wmat())
        y = xp.empty((n, h, w, k), dtype=x.dtype)
        chunks = self._winograd_chunks(n, ty, tx, c)
        exact = h == 4 * ty and w == 4 * tx

        def chunk(n0, n1):              # one thread's task: the chunk's tiles, GEMMs and outputs
            m = n1 - n0
            D, V, M, Y = self._scratch([(36, m, ty, tx, c), (36, m * ty * tx, c), (36, m * ty * tx, k),
                                        (4, 4, m, ty, tx, k)], x.dtype)
            xpad = self._padded_chunk(x, None, n0, n1, 1, chunks[0][1], extra=(4 * ty - h, 4 * tx - w))
            winograd.tiles(xp, xpad, ty, tx, D)
            xp.matmul(kb, D.reshape(36, -1), out=V.reshape(36, -1))
            xp.matmul(V, U, out=M)
            xp.matmul(ka, M.reshape(36, -1), out=Y.reshape(16, -1))
            tiled = Y.transpose(2, 3, 0, 4, 1, 5)           # (m, Ty, 4, Tx, 4, k)
            if exact:
                y[n0:n1].reshape(m, ty, 4, tx, 4, k)[...] = tiled
            else:
                y[n0:n1] = tiled.reshape(m, 4 * ty, 4 * tx, k)[:, :h, :w]
            if each_chunk is not None:
                return each_chunk(n0, n1, y[n0:n1])
        parts = deal(xp, chunks, chunk)
        self.cache = WinogradConvCache(x, U)
        return y, parts

    def _winograd_backward(self, dout, need_dx):
        xp, (x, U) = self.xp, self.cache
        n, h, w, k = dout.shape
        c = x.shape[3]
        ty, tx = -(-h // 4), -(-w // 4)
        kb, ka = xp.asarray(winograd.KB, dtype=x.dtype), xp.asarray(winograd.KA, dtype=x.dtype)
        dx = xp.empty((n, h, w, c), dtype=dout.dtype) if need_dx else None
        chunks = self._winograd_chunks(n, ty, tx, c)
        exact = h == 4 * ty and w == 4 * tx

        def chunk(n0, n1):              # one thread's task: the chunk's part of dU, and its dx
            m = n1 - n0
            D, V, dM, dY, dxpad = self._scratch(
                [(36, m, ty, tx, c), (36, m * ty * tx, c), (36, m * ty * tx, k), (4, 4, m, ty, tx, k),
                 (m, 4 * ty + 2, 4 * tx + 2, c) if need_dx else (0,)], dout.dtype)
            xpad = self._padded_chunk(x, None, n0, n1, 1, chunks[0][1], extra=(4 * ty - h, 4 * tx - w))
            xp.matmul(kb, winograd.tiles(xp, xpad, ty, tx, D).reshape(36, -1), out=V.reshape(36, -1))
            # the spare outputs' gradient is 0 (the padded dy takes xpad's scratch, done with by now)
            dy = dout[n0:n1] if exact else self._padded_chunk(dout, None, n0, n1, 0, chunks[0][1],
                                                               extra=(4 * ty - h, 4 * tx - w))
            dY.transpose(2, 3, 0, 4, 1, 5)[...] = dy.reshape(m, ty, 4, tx, 4, k)
            xp.matmul(ka.T, dY.reshape(16, -1), out=dM.reshape(36, -1))
            dU_part = xp.matmul(dM.transpose(0, 2, 1), V)          # dU transposed: (36, k, c)
            if need_dx:                 # dV = dM U^T overwrites V, dD = B dV B^T overwrites D
                xp.matmul(dM, U.transpose(0, 2, 1), out=V)
                xp.matmul(kb.T, V.reshape(36, -1), out=D.reshape(36, -1))
                winograd.untiles(xp, D, ty, tx, dxpad)
                dx[n0:n1] = dxpad[:, 1:1 + h, 1:1 + w]
            return dU_part
        dU = sum_in_order(xp, deal(xp, chunks, chunk))
        add_by_channel_blocks(xp, self.grads["weight"], winograd.filter_grad(xp, dU))
        return dx

    def conv_backward(self, dout, need_dx=True):
        """dL/dy (N, Ho, Wo, C_out) -> dL/dx; adds dL/dW into grads['weight']."""
        if isinstance(self.cache, WinogradConvCache):
            return self._winograd_backward(dout, need_dx)
        if isinstance(self.cache, ChunkedConvCache) and need_dx and self.stride == 1 and self.padding <= self.k - 1:
            return self._correlated_backward(dout)
        if (isinstance(self.cache, ChunkedConvCache) and need_dx and self.k >= self.stride and self.xp is np
                and not kernels.enabled(self.xp)):
            return self._residue_backward(dout)
        return self._scattered_backward(dout, need_dx)

    def _correlated_backward(self, dout):
        """conv_backward of a stride-1 convolution, dx included.

        dx is the correlation of dy, padded by k-1-p, with the kernel flipped and its in/out
        swapped: the forward machinery again, instead of scattering dcols (col2im). dW comes
        from the same im2col chunks of the padded dy, whose tap (i, j) at input position q is
        dy at q - (k-1-i, k-1-j) + p: dW[kh, kw] = sum over q of x[q] dy[q - (kh, kw) + p], so
        dW is x^T cols at tap (k-1-kh, k-1-kw). One im2col per chunk serves both products."""
        xp, k, p = self.xp, self.k, self.padding
        n, h, w, c = self.cache.x.shape
        w_flip = self.params["weight"][:, :, ::-1, ::-1].transpose(2, 3, 0, 1)     # (kh, kw, out, in)
        w_flip = copy_by_blocks(xp, xp.empty(w_flip.shape, dtype=w_flip.dtype), w_flip, 2)   # by output channels
        x_rows = xp.ascontiguousarray(self.cache.x).reshape(-1, c)
        dx, _, parts = self._correlate(dout, w_flip.reshape(-1, c), k - 1 - p, 1, "dypad",
                                       each_chunk=lambda n0, n1, dx_chunk, cols: x_rows[n0 * h * w:n1 * h * w].T @ cols)
        dw = sum_in_order(xp, parts).reshape(c, k, k, self.c_out)[:, ::-1, ::-1]     # (in, kh, kw, out)
        add_by_channel_blocks(xp, self.grads["weight"], dw.transpose(3, 0, 1, 2))
        return dx

    def _residue_backward(self, dout):
        """conv_backward of a strided convolution on a CPU, dx included: dW from the chunk's
        im2col of x, dx residue by residue (below)."""
        xp, k, s, p = self.xp, self.k, self.stride, self.padding
        x, xpad = self.cache
        (n, h, w, c), (ho, wo) = x.shape, dout.shape[1:3]
        plan = self._residue_plan(h, w, ho, wo)
        chunks = self._chunks(n, ho, wo, c)
        dx = np.empty((n, h, w, c), dtype=dout.dtype)

        def chunk(n0, n1):              # one thread's task: dW's part from the chunk's im2col, and its dx
            step = chunks[0][1]
            dy = dout[n0:n1]
            cols = self._cols(self._padded_chunk(x, xpad, n0, n1, p, step), ho, wo, s, step)
            self._residue_input_grad(dy, plan, dx[n0:n1])
            return cols.T @ dy.reshape(-1, self.c_out)
        dw = sum_in_order(xp, deal(xp, chunks, chunk))
        add_by_channel_blocks(xp, self.grads["weight"], dw.reshape(k, k, c, self.c_out).transpose(3, 2, 0, 1))
        return dx

    def _scattered_backward(self, dout, need_dx):
        """conv_backward by col2im, dx scattered from dcols = dy W^T: the narrow first layer, a
        strided convolution on a GPU or with a kernel smaller than its stride (a 1x1 shortcut),
        or no dx wanted."""
        xp, k, s, p = self.xp, self.k, self.stride, self.padding
        if isinstance(self.cache, NarrowConvCache):      # the whole im2col matrix was kept
            cols, x_shape = self.cache
            dy = dout.reshape(-1, self.c_out)
            per = len(dy) // len(dout)          # rows per image
            # in blocks of images (OpenBLAS runs on one thread; ours share the blocks)
            dw = sum_in_order(xp, over_images(xp, len(dout), dout[0].size, lambda n0, n1: (
                cols[n0 * per:n1 * per].T @ dy[n0 * per:n1 * per])))
            self.grads["weight"] += dw.reshape(k, k, x_shape[3], self.c_out).transpose(3, 2, 0, 1)
            if not need_dx:
                return None
            dcols, wmat_t = self.workspace("dcols", cols.shape, dout.dtype), self._wmat().T
            over_images(xp, len(dout), dout[0].size, lambda n0, n1: xp.matmul(
                dy[n0 * per:n1 * per], wmat_t, out=dcols[n0 * per:n1 * per]))
            return col2im(dcols, x_shape, k, s, p, xp)
        x, xpad = self.cache
        (n, h, w, c), (ho, wo) = x.shape, dout.shape[1:3]
        dy = dout.reshape(-1, self.c_out)
        chunks = self._chunks(n, ho, wo, c)
        wmat = self._wmat() if need_dx else None
        # dx of the chunk's images: gathered from its dcols in one kernel on the kernel path,
        # else scattered into the padded images (col2im)
        gather = need_dx and kernels.enabled(xp)
        padded_shape = (n, h + 2 * p, w + 2 * p, c)
        dx = (None if not need_dx else xp.empty((n, h, w, c), dtype=dout.dtype) if gather
              else xp.zeros(padded_shape, dtype=dout.dtype) if xp is not np
              else xp.empty(padded_shape, dtype=dout.dtype))
        if need_dx and not gather and xp is np:   # zeroed by blocks of images on every thread
            over_images(xp, n, dx[0].size, lambda n0, n1: dx[n0:n1].fill(0))

        def chunk(n0, n1):              # one thread's task: dW's part from the chunk's im2col, and its dx
            dy_c = dy[n0 * ho * wo:n1 * ho * wo]
            step = chunks[0][1]
            dw_part = self._cols(self._padded_chunk(x, xpad, n0, n1, p, step), ho, wo, s, step).T @ dy_c
            if gather:
                kernels.col2im(xp, dy_c @ wmat.T, (n1 - n0, h, w, c), k, s, p, out=dx[n0:n1])
            elif need_dx:
                dc = (dy_c @ wmat.T).reshape(n1 - n0, ho, wo, k, k, c)
                for i, j, win in windows(k, s, ho, wo):
                    dx[(slice(n0, n1),) + win[1:]] += dc[:, :, :, i, j]
            return dw_part
        dw = sum_in_order(xp, deal(xp, chunks, chunk))
        add_by_channel_blocks(xp, self.grads["weight"], dw.reshape(k, k, c, self.c_out).transpose(3, 2, 0, 1))
        if not need_dx or gather or not p:
            return dx
        if xp is not np:
            return xp.ascontiguousarray(dx[:, p:p + h, p:p + w])
        cropped = np.empty((n, h, w, c), dtype=dx.dtype)
        copy_images(np, cropped, dx[:, p:p + h, p:p + w])
        return cropped

    # A strided convolution's input gradient on a CPU, by residues ("sub-pixel"). Along one axis,
    # y[o] = sum_i x[s*o + i - p] w[i], so the input position q = s*a + r (residue r = q mod s)
    # receives dy[o] w[i] exactly from the taps i with r + p - i divisible by s, at
    # o = a + (r + p - i) / s. Each residue class of input positions (ry, rx) is then one GEMM,
    # its rows the dy values of its taps side by side (an im2col of dy with those taps only)
    # times those taps' weights: 9 taps in all over the four classes of a 3x3 stride-2
    # convolution, the same multiplications as col2im's dy W^T, but the GEMMs write dx itself
    # instead of a 9-times-wider dcols (which OpenBLAS zeroes first, as it zeroes every product's
    # output) that is then added up window by window into a zeroed, padded dx and cropped:
    # 74 -> 64 ms for ResNet-18's first strided convolution's backward pass (benchmarks/README.md).
    def _residue_plan(self, h, w, ho, wo):
        """How dx (H, W) of a convolution with stride 1 < s <= k splits into residue classes
        (each reached by at least one tap): returns (the zero rows and columns dy needs before
        and after it, (lo_y, hi_y, lo_x, hi_x), and per class (ry, rx, its rows and columns
        (ny, nx), [(row offset, column offset) of dy per tap], the weights (T*C_out, C_in) of
        those taps stacked in the same order))."""
        k, s, p = self.k, self.stride, self.padding

        def axis(size, out_size):       # per residue: its taps (i, offset), and the padding dy needs
            taps = [[(i, (r + p - i) // s) for i in range(k) if (r + p - i) % s == 0] for r in range(s)]
            reach = [(d, len(range(r, size, s)) - 1 + d) for r in range(s) for _, d in taps[r]]
            lo = max([0] + [-first for first, _ in reach])
            hi = max([0] + [last - (out_size - 1) for _, last in reach])
            return taps, lo, hi
        (taps_y, lo_y, hi_y), (taps_x, lo_x, hi_x) = axis(h, ho), axis(w, wo)
        weight, classes = self.params["weight"], []
        for ry in range(s):
            for rx in range(s):
                taps = [(iy, ix, oy, ox) for iy, oy in taps_y[ry] for ix, ox in taps_x[rx]]
                wsub = np.concatenate([weight[:, :, iy, ix] for iy, ix, _, _ in taps])      # (T*C_out, C_in)
                classes.append((ry, rx, len(range(ry, h, s)), len(range(rx, w, s)),
                                [(oy, ox) for _, _, oy, ox in taps], wsub))
        return (lo_y, hi_y, lo_x, hi_x), classes

    def _residue_input_grad(self, dy, plan, dx):
        """dx (m, H, W, C_in) of a chunk of images from their dy (m, Ho, Wo, C_out), class by
        class of _residue_plan, in this thread's scratch."""
        xp, s = self.xp, self.stride
        (lo_y, hi_y, lo_x, hi_x), classes = plan
        m, ho, wo, k = dy.shape
        dyp = scratch(xp, (m, lo_y + ho + hi_y, lo_x + wo + hi_x, k), dy.dtype, "dy_padded")
        dyp[:, :lo_y] = dyp[:, lo_y + ho:] = dyp[:, :, :lo_x] = dyp[:, :, lo_x + wo:] = 0
        dyp[:, lo_y:lo_y + ho, lo_x:lo_x + wo] = dy
        for ry, rx, ny, nx, offsets, wsub in classes:
            if offsets == [(0, 0)] and (ny, nx) == (ho, wo):
                cols = dy               # one tap, dy itself
            else:
                cols = scratch(xp, (m, ny, nx, len(offsets), k), dy.dtype, "residue_cols")
                for t, (oy, ox) in enumerate(offsets):
                    cols[:, :, :, t] = dyp[:, lo_y + oy:lo_y + oy + ny, lo_x + ox:lo_x + ox + nx]
            grad = scratch(xp, (m * ny * nx, wsub.shape[1]), dy.dtype, "residue_out")
            xp.matmul(cols.reshape(-1, wsub.shape[0]), wsub, out=grad)
            dx[:, ry::s, rx::s] = grad.reshape(m, ny, nx, -1)


class ConvBlock(Workspace, Sequential):
    """conv3x3 -> BatchNorm -> ReLU -> MaxPool2x2, fused (see the module docstring).

    Children keep the plain block's names (0 conv, 1 bn, 2 relu, 3 pool) and hold the
    parameters, so state_dict, gradients and the optimiser see no difference.
    x: (N, H, W, C_in) -> (N, H//2, W//2, C_out).
    """

    def __init__(self, conv, bn, xp=np, dtype=np.float32):
        super().__init__(conv, bn, ReLU(xp=xp, dtype=dtype), MaxPool2d(2, xp=xp, dtype=dtype),
                         xp=xp, dtype=dtype)
        self.conv, self.bn = conv, bn

    def _windows(self, y):
        """The four 2x2-window positions of y (N, H, W, C) as strided views (N, H//2, W//2, C)."""
        n, h, w, c = y.shape
        ho, wo = h // 2, w // 2
        return [y[:, i:2 * ho:2, j:2 * wo:2] for i in range(2) for j in range(2)]

    # im2col rows at most this wide take the Gram-matrix path (the 1-channel first block: 9)
    GRAM_MAX_K = 32

    def forward(self, x, train=True):
        xp, bn = self.xp, self.bn
        gamma = bn.params["weight"]
        # Work with y' = sign(gamma) * conv(x), folded into the weights: BatchNorm's scale on y'
        # is then >= 0 everywhere and max-pooling y' is pooling the normalised output.
        sign = xp.copysign(gamma.dtype.type(1), gamma)     # (for gamma = -0 either sign is right)
        window_cols = cols = sums = winner = None
        if self._conv_in_chunks(x):
            # the narrow first block on the CPU: y' is made and pooled a chunk at a time below
            window_cols = self._window_cols(x)
            cols = window_cols.reshape(-1, window_cols.shape[-1])
            self.conv.cache = None                     # (conv.narrow_cols was not used)
            y, m = None, cols.shape[0]
        elif kernels.enabled(xp):
            y = self.conv.conv(x, out_scale=sign, reuse=True)   # no bias: BatchNorm's mean absorbs it
            m = y.size // bn.c
        else:
            # Each chunk of y' is pooled (in training with its winners' positions, for the
            # backward pass) and its per-image channel sums taken by the thread that made it,
            # while it is in the cache, instead of in more passes over y'.
            n, h, w, _ = x.shape
            conv = self.conv
            ho, wo = (output_size(size, conv.k, conv.stride, conv.padding) for size in (h, w))
            pooled = xp.empty((n, ho // 2, wo // 2, bn.c), dtype=x.dtype)
            winner = xp.empty(pooled.shape, dtype=np.uint8) if train else None

            def pool_and_sum(n0, n1, y_chunk):
                if not train:
                    self._pool(y_chunk, pooled[n0:n1])
                    return None
                self._pool(y_chunk, pooled[n0:n1], winner[n0:n1])
                return image_sums(xp, y_chunk)
            y, sums = conv.conv(x, out_scale=sign, reuse=True, each_chunk=pool_and_sum)
            m = y.size // bn.c
            if isinstance(self.conv.cache, NarrowConvCache):
                cols = self.conv.cache.cols
        b = self.conv.params.get("bias")
        gram = None
        if train and cols is not None and cols.shape[1] <= self.GRAM_MAX_K and not kernels.enabled(xp):
            # Direct path for a narrow input (the 1-channel first block): y' = cols @ W', so the
            # batch statistics follow from the K x K Gram matrix of cols without a pass over y'
            # (mean = colsum @ W' / m, E[y'^2] = diag(W'^T G W') / m), in float64 to keep them exact.
            # (Not on the kernel path: there y' exists anyway, two reductions read it, and these
            # dozen small operations, with the weight gradient's below, would be as many launches.)
            colsum, g = column_sums_and_gram(xp, cols)
            w64 = (self.conv._wmat() * sign).astype(np.float64)
            mean64 = colsum @ w64 / m
            var64 = xp.einsum("ko,kl,lo->o", w64, g, w64) / m - mean64 ** 2
            mean, var = mean64.astype(cols.dtype), var64.astype(cols.dtype)
            gram = (colsum, g @ w64)
        elif train and kernels.enabled(xp):
            mean = kernels.channel_sum(xp, y, 1.0 / m)
            var = kernels.channel_sq_dev(xp, y, mean, 1.0 / m)
        elif train:
            mean, var = batch_stats(xp, y, sums)
        if train:   # the running statistics are kept for conv(x) + bias, as in PyTorch
            kernels.running_stats(xp, bn, mean, var, m, sign, b if b is not None else 0)
        else:
            mean = sign * (bn.buffers["running_mean"] - (b if b is not None else 0))
            var = bn.buffers["running_var"]
        # inv_std = 1/sigma, scale = gamma*sign*inv_std = |gamma|/sigma >= 0, shift = beta - mean*scale
        inv_std, scale, shift = kernels.block_constants(xp, gamma, bn.params["bias"], sign, mean, var, bn.eps)
        if kernels.enabled(xp):                     # pool, first-max index, scale, shift, ReLU: one kernel
            pooled, out, winner = kernels.pool_bn_relu(xp, y, scale, shift)
        elif y is None:
            pooled, out, winner = self._conv_and_pool_in_chunks(window_cols, self.conv._wmat() * sign, scale, shift)
        else:                                       # pooled above, with the product
            out = xp.empty_like(pooled)
            over_images(xp, len(out), out[0].size, lambda n0, n1: self._scale_shift_relu(
                pooled[n0:n1], scale, shift, out[n0:n1]))
        self.cache = ConvBlockCache(y, pooled, out, sign, mean, inv_std, m, train, gram, winner,
                                    x if y is None else None, window_cols)
        return out

    def _conv_in_chunks(self, x):
        """Whether the convolution is made a chunk at a time with the pooling: for a narrow input
        (the 1-channel first block, whose 120 MB output is mere memory traffic: its GEMM has
        K = 9) on the CPU, when every output position lies in a pooling window (a 'same'
        convolution of even-sized maps). On a GPU a chunk would cost launches, so the whole y' is made."""
        conv, (h, w) = self.conv, x.shape[1:3]
        return (self.xp is np and not kernels.enabled(self.xp)
                and conv.k ** 2 * x.shape[3] <= min(self.GRAM_MAX_K, conv.NARROW_K)
                and conv.stride == 1 and 2 * conv.padding == conv.k - 1 and h % 2 == 0 and w % 2 == 0)

    def _window_cols(self, x):
        """The im2col rows of x (N, H, W, C_in) in window-major order, (4, N, H/2, W/2, k*k*C_in):
        [q, n, i, j] is the row of output position (2i + q // 2, 2j + q % 2), so that the rows of
        each 2x2-window position are contiguous. The pooling then compares contiguous arrays, and
        the weight gradient takes each position's rows without gathering them. (Same 'same'
        convolution as conv.narrow_cols, whose rows are in (N, H, W) order.)"""
        conv, (n, h, w, c) = self.conv, x.shape
        xpad = conv.padded(x, conv.padding)
        cols = self.workspace("window_cols", (4, n, h // 2, w // 2, conv.k, conv.k, c), x.dtype)
        for q in range(4):       # windows at stride 2 from (i, j): positions (2i' + i + kh, 2j' + j + kw)
            i, j = divmod(q, 2)
            copy_images(self.xp, cols[q], conv._window_view(xpad[:, i:, j:], 0, n, h // 2, w // 2, 2))
        return cols.reshape(4, n, h // 2, w // 2, -1)

    def _pool(self, y, pooled, winner=None):
        """For a block of images: pooled = the max of each 2x2 window of y (N, H, W, C) and, where
        winner is given, the window position (0..3, row major) of the first maximum, as uint8
        (ties go to the first, as in MaxPool2d). y may also be given as its four window
        positions' values, [(N, H/2, W/2, C)] * 4."""
        xp, views = self.xp, (y if isinstance(y, list) else self._windows(y))
        xp.maximum(views[0], views[1], out=pooled)
        xp.maximum(pooled, views[2], out=pooled)
        xp.maximum(pooled, views[3], out=pooled)
        if winner is not None:       # the number of leading positions that do not hold the max
            later = views[0] != pooled
            winner[...] = later
            for v in views[1:3]:
                later &= v != pooled
                winner += later

    def _scale_shift_relu(self, pooled, scale, shift, out):
        """out = max(scale*pooled + shift, 0): BatchNorm's affine map and the ReLU, on the pooled quarter."""
        xp = self.xp
        channelwise(xp.multiply, pooled, scale, out)
        channelwise(xp.add, out, shift, out)
        xp.maximum(out, 0, out=out)

    def _conv_and_pool_in_chunks(self, window_cols, wmat, scale, shift):
        """y' = cols @ wmat for the window-major rows (4, N, Ho, Wo, K) of _window_cols, a chunk
        of images at a time (about 8 MB of y', pooled by the thread that made it while it is still
        in the cache) so that y' never exists whole; each chunk is pooled as _pool does, on the four
        window positions' contiguous outputs. Returns (pooled, out, winner), (N, Ho, Wo, C)."""
        xp, (_, n, ho, wo, k), c = self.xp, window_cols.shape, wmat.shape[1]
        shape = (n, ho, wo, c)
        pooled, out, winner = xp.empty(shape, wmat.dtype), xp.empty(shape, wmat.dtype), xp.empty(shape, np.uint8)
        step = max(1, BLOCK_FLOATS // (ho * wo * c))

        def chunk(c0, c1):              # one thread's task: y' of a few images, pooled at once
            buf = self.workspace(f"y_chunk{thread_slot()}", (4, min(n, step) * ho * wo, c), wmat.dtype)
            y = buf[:, :(c1 - c0) * ho * wo]
            for q in range(4):
                xp.matmul(window_cols[q, c0:c1].reshape(-1, k), wmat, out=y[q])
            self._pool(list(y.reshape(4, c1 - c0, ho, wo, c)), pooled[c0:c1], winner[c0:c1])
            self._scale_shift_relu(pooled[c0:c1], scale, shift, out[c0:c1])
        deal(xp, even_spans(n, step), chunk)
        return pooled, out, winner

    def backward(self, dout, need_dx=True):
        xp, bn = self.xp, self.bn
        y, pooled, out, sign, mean, inv_std, m, train, gram, winner, _, _ = self.cache
        if gram is not None and not need_dx:        # the narrow first block, as the trainer runs it
            return self._narrow_backward(dout)
        if y is None:
            # the chunked first block asked for more than the trainer asks (dx, or an evaluation-
            # mode backward: gradient checks): make the whole y' after all, in (N, H, W) order
            cols, (n, h, w) = self.conv.narrow_cols(self.cache.x)
            y = (cols @ (self.conv._wmat() * sign)).reshape(n, h, w, -1)
        if kernels.enabled(xp):     # through the ReLU, against the normalised winners, in two reductions
            dz, (dbeta, dgamma) = None, kernels.relu_sums(xp, dout, out, pooled, mean, sign, inv_std)
        else:
            dz, dbeta, dgamma = self._relu_and_bn_grads(dout, out, pooled, mean, sign * inv_std)
        # BatchNorm's backward is dy = a*dz_full + coef_xhat*xhat + coef_one (a = gamma*inv_std,
        # coef_xhat = -a*dgamma/m, coef_one = -a*dbeta/m), with dz_full zero off the winners and
        # xhat = sign*(y' - mean)*inv_std. So dy = dy_per_y*y' + dy_const everywhere, plus a*dz at
        # the winners; and a conv bias gets the sum of dy over the batch: a*dbeta + dy_per_y*sum(y')
        # + dy_const*m = a*dbeta + m*coef_one. (The gradients of gamma, beta and the bias are added
        # to their grads there.)
        a, dy_per_y, dy_const = kernels.block_backward_constants(
            xp, bn.params["weight"], inv_std, sign, mean, dgamma, dbeta, m, train,
            (bn.grads["weight"], bn.grads["bias"], self.conv.grads.get("bias")))
        if kernels.enabled(xp):                     # the kernel path: dy in one kernel
            return self.conv.conv_backward(kernels.conv_block_dy(xp, y, dy_per_y, dy_const, a, dout, out, winner), need_dx)
        return self.conv.conv_backward(self._dy_in_place(y, pooled, winner, dz, a, dy_per_y, dy_const), need_dx)

    def _relu_and_bn_grads(self, dout, out, pooled, mean, s):
        """dz = dout through the ReLU (N, H/2, W/2, C), and BatchNorm's dbeta and dgamma
        (``_bn_grads``), in one pass of blocks."""
        dz = self.xp.empty_like(dout)
        parts = over_images(self.xp, len(dout), dout[0].size, lambda n0, n1: self._relu_sums(
            dout[n0:n1], out[n0:n1], pooled[n0:n1], dz[n0:n1]))
        return (dz,) + self._bn_grads(parts, mean, s)

    def _relu_sums(self, dout, out, pooled, dz):
        """For a block of images (N, H, W, C): dz = dout where out > 0 (the ReLU's backward), and
        per image and channel the sums that BatchNorm's backward needs, sum dz and sum dz * pooled,
        (N, C) each."""
        xp = self.xp
        xp.multiply(dout, out > 0, out=dz)
        d3 = dz.reshape(len(dz), -1, dz.shape[-1])
        return image_sums(xp, dz), xp.einsum("nij,nij->nj", d3, pooled.reshape(d3.shape))

    def _bn_grads(self, parts, mean, s):
        """BatchNorm's dbeta = sum dz and dgamma = sum dz * xhat, xhat = (pooled - mean) * s, from
        the per-image sums of _relu_sums on consecutive blocks of images, across images in
        float64: sum dz * xhat = s * (sum dz * pooled - mean * sum dz), so that no pass makes xhat."""
        xp = self.xp
        dbeta = xp.concatenate([p[0] for p in parts]).sum(axis=0, dtype=np.float64)
        dz_pooled = xp.concatenate([p[1] for p in parts]).sum(axis=0, dtype=np.float64)
        dgamma = s * (dz_pooled - mean * dbeta)
        return dbeta.astype(mean.dtype), dgamma.astype(mean.dtype)

    def _dy_in_place(self, y, pooled, winner, dz, a, dy_per_y, dy_const):
        """dL/dy' = dy_per_y*y' + dy_const everywhere, plus a*dz at each window's first winner,
        written over y' (the convolution's output, in this layer's scratch: the next forward
        overwrites it anyway), block by block: each block's winners are found before its y'
        is overwritten. ``winner``: the winners' window positions if the forward pass kept them
        (it does in training; for the chunked first block they are needed, since its y' made
        again here may differ from the pooled values in the last bit: a GEMM's rounding depends
        on its shape)."""
        xp = self.xp

        def part(n0, n1):
            yb = y[n0:n1]
            hits = (list(self._first_winners(yb, pooled[n0:n1])) if winner is None else
                    [winner[n0:n1] == q for q in range(4)])
            channelwise(xp.multiply, yb, dy_per_y, yb)
            channelwise(xp.add, yb, dy_const, yb)
            a_dz = channelwise(xp.multiply, dz[n0:n1], a, scratch(xp, dz[n0:n1].shape, dz.dtype, "a_dz"))
            term = scratch(xp, a_dz.shape, a_dz.dtype, "a_dz_hit")
            for hit, dv in zip(hits, self._windows(yb)):
                dv += xp.multiply(a_dz, hit, out=term)
        over_images(xp, len(y), y[0].size, part)
        return y

    def _first_winners(self, y, pooled):
        """For each window position in order, where it holds the first element equal to pooled."""
        taken = None
        for v in self._windows(y):
            hit = v == pooled
            if taken is None:
                taken = hit.copy()
            else:
                hit &= ~taken
                taken |= hit
            yield hit

    def _narrow_backward(self, dout):
        """The narrow first block's backward pass in training when only dW is wanted (the
        trainer's case: the images need no gradient), without the full-size dy = dy_per_y*y' +
        dy_const + (a*dz at the winners): cols^T dy = dy_per_y * (G W') + dy_const * colsum +
        a * sum over window positions q of cols_q^T dz_q, a per output channel. One pass of
        chunks of images, each one thread's task while the chunk is in the cache: its dz (dout
        through the ReLU) and the per-image sums for BatchNorm (_relu_sums), dz where each window
        position wins, and that position's rows of cols (gathered unless they are window-major)
        times it; the chunks' sums are added in order."""
        xp, conv, bn = self.xp, self.conv, self.bn
        y, pooled, out, sign, mean, inv_std, m, train, gram, winner, x, window_cols = self.cache
        if window_cols is None:                   # rows in (N, H, W) order: gathered per window position
            cols, (n, h, w, c) = conv.cache
            cols4 = cols.reshape(n, h, w, -1)
        else:
            (n, h, w, c), cols = x.shape, window_cols
        kk, c_out = cols.shape[-1], conv.c_out
        ho, wo = h // 2, w // 2
        limit = FastConv2d.CHUNK_FLOATS if xp is np else FastConv2d.GPU_CHUNK_FLOATS   # (a chunk is launches)
        step = max(1, limit // (4 * ho * wo * c_out))

        def chunk(s0, s1):
            slot, b = thread_slot(), slice(s0, s1)
            dz = self.workspace(f"dz{slot}", (min(n, step),) + dout.shape[1:], dout.dtype)[:s1 - s0]
            sums = self._relu_sums(dout[b], out[b], pooled[b], dz)
            dz_q = self.workspace(f"dz_q{slot}", (4,) + dz.shape, dz.dtype)[:, :s1 - s0]
            hits = (self._first_winners(y[b], pooled[b]) if winner is None else
                    (winner[b] == q for q in range(4)))
            for q, hit in enumerate(hits):
                xp.multiply(dz, hit, out=dz_q[q])
            if window_cols is not None:
                return sums, sum_in_order(xp, [window_cols[q, b].reshape(-1, kk).T @ dz_q[q].reshape(-1, c_out)
                                               for q in range(4)])
            cols_q = self.workspace(f"cols_q{slot}", (4, min(n, step), ho, wo, kk), cols.dtype)[:, :s1 - s0]
            for q in range(4):
                i, j = divmod(q, 2)
                cols_q[q] = cols4[b, i:2 * ho:2, j:2 * wo:2]
            return sums, cols_q.reshape(-1, kk).T @ dz_q.reshape(-1, c_out)
        results = deal(xp, even_spans(n, step), chunk)
        dbeta, dgamma = self._bn_grads([r[0] for r in results], mean, sign * inv_std)
        a, dy_per_y, dy_const = kernels.block_backward_constants(
            xp, bn.params["weight"], inv_std, sign, mean, dgamma, dbeta, m, train,
            (bn.grads["weight"], bn.grads["bias"], conv.grads.get("bias")))
        colsum, gw = gram
        dw = (gw * dy_per_y + colsum[:, None] * dy_const).astype(cols.dtype)     # (K, C_out)
        dw += sum_in_order(xp, [r[1] for r in results]) * a
        conv.grads["weight"] += dw.reshape(conv.k, conv.k, c, c_out).transpose(3, 2, 0, 1)
        return None


GRAM_STACK = 16     # column_sums_and_gram's products per matmul call


def column_sums_and_gram(xp, cols):
    """The column sums (K,) and the Gram matrix cols^T cols (K, K) of cols (R, K), in float64,
    over blocks of rows on every thread, summed in block order.

    Each block's sums are one product, [1 | cols]^T cols, stacked GRAM_STACK times over slices
    of its rows: NumPy keeps the GIL through a product with fewer than about 500 outputs (a
    9 x 9 Gram matrix, or a vector times a matrix), so that unstacked the threads would take
    turns; stacked (16 x 10 x 9 outputs) they share the work, and each product is faster too."""
    k = cols.shape[1]

    def part(r0, r1):
        rows = r1 - r0
        ones_cols = xp.empty((rows, k + 1), dtype=np.float64)
        ones_cols[:, 0] = 1
        ones_cols[:, 1:] = cols[r0:r1]
        whole = rows - rows % GRAM_STACK
        stacked = ones_cols[:whole].reshape(GRAM_STACK, -1, k + 1)
        total = xp.matmul(stacked.transpose(0, 2, 1), stacked[:, :, 1:]).sum(axis=0)     # (K + 1, K)
        if whole < rows:
            total += ones_cols[whole:].T @ ones_cols[whole:, 1:]
        return total
    total = sum_in_order(xp, over_images(xp, len(cols), 2 * (k + 1), part))
    return total[0], total[1:]


def batch_stats(xp, y, sums=None, in_place=False):
    """Mean and biased variance per channel of y (N, H, W, C): BatchNorm's batch statistics,
    summed image by image like BatchNorm2d.channel_sum, with y - mean made a block at a time
    rather than as a full-size temporary (or over y, ``in_place``, for a caller that wants it
    centred). ``sums``: y's per-image channel sums (n_i, C) of consecutive blocks of images,
    where they were taken already."""
    y3 = y.reshape(y.shape[0], -1, y.shape[-1])
    m = y3.shape[0] * y3.shape[1]
    mean = (channel_sums(xp, y3) if sums is None else per_image_sums(xp, sums)) / m

    def squares(n0, n1):
        yc = channelwise(xp.subtract, y3[n0:n1], mean,
                         y3[n0:n1] if in_place else scratch(xp, y3[n0:n1].shape, y.dtype, "squares"))
        return xp.einsum("nij,nij->nj", yc, yc)
    return mean, per_image_sums(xp, over_images(xp, len(y3), y3[0].size, squares)) / m


def image_sums(xp, a):
    """The sums per image and channel of a block of images a (n, ..., C): (n, C), the parts that
    per_image_sums adds up. (One function, so that every path sums an image in the same order.)"""
    return xp.einsum("nij->nj", a.reshape(len(a), -1, a.shape[-1]))


def channel_sums(xp, a):
    """BatchNorm2d.channel_sum (sum over N, H, W per channel of a (N, ..., C)), block by block
    on all threads."""
    return per_image_sums(xp, over_images(xp, len(a), a[0].size, lambda n0, n1: image_sums(xp, a[n0:n1])))


def batchnorm_forward(bn, y, train, residual=None, relu=True, sums=None):
    """BatchNorm2d's forward [+ residual] [+ ReLU] on NumPy for y (N, H, W, C), the convolution's
    fresh output, which is overwritten with xhat, in blocks of images on every thread: in
    training a pass for the channel sums and one that centres y in place and sums its squares
    (batch_stats); then one that makes xhat = (y - mean) * inv_std and, while the block's xhat is
    in the cache, out = gamma * xhat + beta [+ residual] [then ReLU]. The same operations in the same order as
    BatchNorm2d (then the sum, then the ReLU), so the same numbers. ``sums``: y's per-image
    channel sums (n_i, C) of consecutive blocks of images, where they were taken already (in the
    convolution's chunks). Returns (out, xhat, inv_std)."""
    xp = bn.xp
    if train:
        mean, var = batch_stats(xp, y, sums, in_place=True)
        bn.update_running(mean, var, y.size // bn.c)
    else:
        mean, var = bn.buffers["running_mean"], bn.buffers["running_var"]
    inv_std = 1.0 / xp.sqrt(var + bn.eps)
    out = xp.empty_like(y)

    def part(n0, n1):
        xhat = y[n0:n1] if train else channelwise(xp.subtract, y[n0:n1], mean, y[n0:n1])
        channelwise(xp.multiply, xhat, inv_std, xhat)
        o = channelwise(xp.multiply, xhat, bn.params["weight"], out[n0:n1])
        channelwise(xp.add, o, bn.params["bias"], o)
        if residual is not None:
            o += residual[n0:n1]
        if relu:
            xp.maximum(o, 0, out=o)
    over_images(xp, len(y), y[0].size, part)
    return out, y, inv_std


def batchnorm_forward_kernels(bn, y, train, residual=None, relu=True):
    """BatchNorm2d's forward [+ residual] [+ ReLU] in four CUDA kernels (kernels.py) in training:
    two channel reductions, the running statistics with 1/sigma, one elementwise pass (two in
    evaluation). y (the convolution's fresh output) is overwritten with xhat.
    Returns (out, xhat, inv_std)."""
    xp = bn.xp
    m = y.size // bn.c
    gamma, beta = bn.params["weight"], bn.params["bias"]
    if train:
        mean = kernels.channel_sum(xp, y, 1.0 / m)
        var = kernels.channel_sq_dev(xp, y, mean, 1.0 / m)
        inv_std = kernels.running_stats(xp, bn, mean, var, m)         # and 1/sqrt(var + eps)
    else:
        mean, var = bn.buffers["running_mean"], bn.buffers["running_var"]
        inv_std = kernels.block_constants(xp, gamma, beta, 1.0, mean, var, bn.eps)[0]
    xhat, out = kernels.bn_relu(xp, y, mean, inv_std, gamma, beta, residual, relu)
    return out, xhat, inv_std


def batchnorm_input_grad(bn, dout, xhat, inv_std, train, in_place=False, mask=None, dz=None):
    """BatchNorm2d.backward for the given cache values; accumulates dgamma, dbeta. ``in_place``:
    dout becomes dx (for a caller that owns dout). ``mask``: the output of a ReLU between, whose
    backward (dz = dout where mask > 0) is fused in; on NumPy ``dz``, where given, receives
    that dz (for a caller that needs it too). On NumPy, two passes of blocks: dz with the sums
    for dbeta and dgamma, then dx."""
    xp = bn.xp
    if kernels.enabled(xp):          # four CUDA kernels (kernels.py); dout is left alone
        assert dz is None, "on the kernel path dz is not made"
        m = dout.size // bn.c
        if mask is None:
            dbeta, dgamma = kernels.channel_sum(xp, dout), kernels.channel_dot(xp, dout, xhat)
        else:                        # the sums of dz = dout where mask > 0, and of dz * xhat
            dbeta, dgamma = kernels.relu_sums(xp, dout, mask, xhat, 0.0, 1.0, 1.0)
        a, cx, c1 = kernels.bn_backward_constants(xp, bn.params["weight"], inv_std, dgamma, dbeta, m, train,
                                                  (bn.grads["weight"], bn.grads["bias"]))
        return kernels.bn_backward(xp, dout, mask, xhat, a, cx, c1)
    dx = dout if in_place else xp.empty_like(dout)
    dz = dout if mask is None else dx if dz is None else dz

    def sums(n0, n1):               # [dz = dout where mask > 0], and the per-image sums of dz and dz * xhat
        d = dout[n0:n1] if mask is None else xp.multiply(dout[n0:n1], mask[n0:n1] > 0, out=dz[n0:n1])
        d3, xhat3 = d.reshape(n1 - n0, -1, bn.c), xhat[n0:n1].reshape(n1 - n0, -1, bn.c)
        return image_sums(xp, d), xp.einsum("nij,nij->nj", d3, xhat3)
    parts = over_images(xp, len(dout), dout[0].size, sums)
    dbeta, dgamma = per_image_sums(xp, [p[0] for p in parts]), per_image_sums(xp, [p[1] for p in parts])
    bn.grads["weight"] += dgamma
    bn.grads["bias"] += dbeta
    a = bn.params["weight"] * inv_std
    m = dout.size // bn.c
    coef_xhat, coef_one = (-a * dgamma / m, -a * dbeta / m) if train else (None, None)

    def part(n0, n1):               # dx = a*dz + coef_xhat*xhat + coef_one (training)
        d = channelwise(xp.multiply, dz[n0:n1], a, dx[n0:n1])
        if train:
            d += channelwise(xp.multiply, xhat[n0:n1], coef_xhat, scratch(xp, d.shape, d.dtype, "bn_term"))
            channelwise(xp.add, d, coef_one, d)
    over_images(xp, len(dout), dout[0].size, part)
    return dx


class FastBatchNorm2d(BatchNorm2d):
    """BatchNorm2d for ResNet-18's stem and projection shortcuts, where it follows a convolution
    and normalises that convolution's fresh output in place: as CUDA kernels on the kernel path
    (kernels.py), in blocks of images on every thread on NumPy (the same functions as
    FastBasicBlock's); on CuPy without the kernels it is BatchNorm2d itself."""

    def forward(self, x, train=True):
        xp = self.xp
        if kernels.enabled(xp):
            out, xhat, inv_std = batchnorm_forward_kernels(self, x, train, relu=False)
        elif xp is np:
            out, xhat, inv_std = batchnorm_forward(self, x, train, relu=False)
        else:
            return super().forward(x, train)
        self.cache = BatchNormCache(xhat, inv_std, train)
        return out

    def backward(self, dout, need_dx=True):
        if not kernels.enabled(self.xp) and self.xp is not np:
            return super().backward(dout, need_dx)
        return batchnorm_input_grad(self, dout, *self.cache)


class FastReLU(ReLU):
    """ReLU in blocks of images on every thread on NumPy (ResNet-18's stem); on CuPy, ReLU."""

    def forward(self, x, train=True):
        xp = self.xp
        if xp is not np:
            return super().forward(x, train)
        y = xp.empty_like(x)
        over_images(xp, len(x), x[0].size, lambda n0, n1: xp.maximum(x[n0:n1], 0, out=y[n0:n1]))
        self.cache = y
        return y

    def backward(self, dout, need_dx=True):
        xp, y = self.xp, self.cache
        if xp is not np:
            return super().backward(dout, need_dx)
        dx = xp.empty_like(dout)
        over_images(xp, len(dx), dx[0].size, lambda n0, n1: xp.multiply(dout[n0:n1], y[n0:n1] > 0, out=dx[n0:n1]))
        return dx


class FastBasicBlock(BasicBlock):
    """BasicBlock (layers.py) with BatchNorm + (residual sum) + ReLU fused; see the module
    docstring. Same children, names and parameters. x: (N, H, W, C_in) -> (N, H', W', C_out)."""

    def __init__(self, c_in, c_out, stride, rng, xp=np, dtype=np.float32):
        super().__init__(c_in, c_out, stride, rng, xp=xp, dtype=dtype, conv=partial(FastConv2d, winograd=True),
                         norm=FastBatchNorm2d)

    def _conv_bn_relu(self, conv, bn, x, train, residual=None):
        """relu(bn(conv(x)) [+ residual]), normalising the convolution's fresh output in place; on
        NumPy with BatchNorm's per-image channel sums taken in the convolution's chunks."""
        if kernels.enabled(self.xp):
            return batchnorm_forward_kernels(bn, conv.forward(x, train), train, residual)
        if not train:
            return batchnorm_forward(bn, conv.forward(x, train), train, residual)
        y, sums = conv.conv(x, each_chunk=lambda n0, n1, y_chunk: image_sums(self.xp, y_chunk))   # (no bias)
        return batchnorm_forward(bn, y, train, residual, sums=sums)

    def forward(self, x, train=True):
        h, xhat1, inv1 = self._conv_bn_relu(self.conv1, self.bn1, x, train)
        out, xhat2, inv2 = self._conv_bn_relu(self.conv2, self.bn2, h, train, residual=self.shortcut.forward(x, train))
        self.cache = FastBasicBlockCache(h, xhat1, inv1, out, xhat2, inv2, train)
        return out

    def backward(self, dout, need_dx=True):
        xp = self.xp
        h, xhat1, inv1, out, xhat2, inv2, train = self.cache
        if kernels.enabled(xp):           # the ReLUs' backward in one kernel, and fused into bn1's
            d = kernels.relu_backward(xp, dout, out)
            dh = self.conv2.backward(batchnorm_input_grad(self.bn2, d, xhat2, inv2, train))
            dx = self.conv1.backward(batchnorm_input_grad(self.bn1, dh, xhat1, inv1, train, mask=h), need_dx)
            d_short = self.shortcut.backward(d, need_dx)
            return xp.add(dx, d_short, out=dx) if need_dx else None
        d = xp.empty_like(dout)           # through the last ReLU; the sum sends d to both branches
        dh = self.conv2.backward(batchnorm_input_grad(self.bn2, dout, xhat2, inv2, train, mask=out, dz=d))
        # dh is the convolution's fresh output: ours to overwrite
        dx = self.conv1.backward(batchnorm_input_grad(self.bn1, dh, xhat1, inv1, train, in_place=True, mask=h),
                                 need_dx)
        d_short = self.shortcut.backward(d, need_dx)
        if not need_dx:
            return None
        over_images(xp, len(dx), dx[0].size, lambda n0, n1: xp.add(dx[n0:n1], d_short[n0:n1], out=dx[n0:n1]))
        return dx
