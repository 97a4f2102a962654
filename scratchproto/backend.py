"""The one place that decides the array module: NumPy on the CPU, CuPy on the GPU.

Every layer does its math through ``xp``, the module returned here, so the same code runs on
both (Chainer's habit). Nothing else in the package imports cupy.
"""
import ctypes
import os
import sys

import numpy as np

from .errors import UserError

DEVICES = ("cpu", "gpu", "auto")
REQUIRE_GPU_ENV = "SCRATCHPROTO_REQUIRE_GPU"   # '1': a missing GPU is an error, not a fallback


def _cupy_or_reason():
    """Return (cupy module, None) when CuPy imports and sees a GPU, else (None, why not)."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return None, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy sees no GPU"
    except Exception as e:
        return None, f"CuPy sees no GPU ({type(e).__name__}: {e})"
    return cupy, None


def keep_freed_memory():
    """Ask glibc to keep freed blocks for reuse instead of returning them to the OS.

    By default glibc serves every allocation above a few MB with a fresh mmap and unmaps it on
    free, so each of a training step's large temporaries (tens of MB, the same sizes every step)
    is page-faulted in anew, which costs about as much as a pass over it. Raising the mmap and
    trim thresholds lets those blocks be recycled. It also keeps every thread on the one main
    heap (arena): a second thread otherwise gets a heap of its own, which glibc shrinks whenever
    its top is freed: in a pass timed alone (2026-11-27), fast.py's worker thread page-faulted its
    1 MB temporaries in anew on every call and two threads were slower than one. Linux/glibc
    only; a no-op elsewhere, or when SCRATCHPROTO_NO_MALLOPT is set. Returns whether it took effect.
    """
    if os.environ.get("SCRATCHPROTO_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 32)
                    and libc.mallopt(m_arena_max, 1))
    except (OSError, AttributeError):
        return False


TF32_ENV = "SCRATCHPROTO_TF32"


def tf32_requested(tf32=None):
    """Whether float32 matrix products may use TF32 tensor cores: ``tf32``, else $SCRATCHPROTO_TF32."""
    return bool(tf32) if tf32 is not None else os.environ.get(TF32_ENV) == "1"


def get_xp(device="cpu", tf32=None):
    """The array module for ``device``: 'cpu' -> numpy, 'gpu' -> cupy, 'auto' -> cupy if usable.

    Asking for 'gpu' where CuPy or a GPU is missing warns on one line and falls back to NumPy, or,
    with $SCRATCHPROTO_REQUIRE_GPU=1 (run.py --require-gpu), raises UserError: a batch job that
    must not quietly take a hundred times longer. On NumPy it also calls keep_freed_memory().

    ``tf32`` (default: $SCRATCHPROTO_TF32 == '1'): on CuPy, let cuBLAS compute float32 matrix
    products on TF32 tensor cores (10-bit mantissas in the products, float32 sums), as PyTorch
    does by default for convolutions; off by default, so that FP32 means FP32. CuPy reads its
    setting at a process's first float32 product, so choose before computing anything. No effect
    on NumPy (a warning says so).
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    cupy, why = (None, None) if device == "cpu" else _cupy_or_reason()
    if cupy is not None:
        # explicit either way: a CUPY_TF32 left in the environment must not change the precision
        os.environ["CUPY_TF32"] = "1" if tf32_requested(tf32) else "0"
        return cupy
    if device == "gpu" and os.environ.get(REQUIRE_GPU_ENV) == "1":
        raise UserError(f"--require-gpu: {why}")
    if device == "gpu":
        print(f"warning: --device gpu asked for, but {why}; falling back to NumPy on the CPU",
              file=sys.stderr)
    if tf32_requested(tf32):
        print("warning: --tf32 has no effect on the CPU: NumPy computes in plain float32",
              file=sys.stderr)
    keep_freed_memory()
    return np


def device_name(xp):
    """'gpu' for CuPy, 'cpu' for NumPy."""
    return "cpu" if xp is np else "gpu"


def gpu_model(xp):
    """The GPU's name as its driver reports it (e.g. 'NVIDIA H200'), None on NumPy."""
    if xp is np:
        return None
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.runtime.getDevice())
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def describe(xp, asked):
    """Where the work runs, in words, for a run's first line and its config.json: 'gpu (NVIDIA
    H200)', 'cpu', or, when ``asked`` was 'gpu' and none was usable, 'cpu (--device gpu asked for,
    but CuPy sees no GPU)'."""
    if xp is not np:
        return f"gpu ({gpu_model(xp)})"
    if asked == "gpu":
        return f"cpu (--device gpu asked for, but {_cupy_or_reason()[1]})"
    return "cpu"


def xp_of(a):
    """The array module that owns array ``a``."""
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"].get_array_module(a)


def to_host(a):
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.asarray(a)
    return a.get()


def to_host_later(a):
    """Start copying a small array to the host; returns read(), which waits for the copy to end and
    returns it as a NumPy array.

    On a GPU the copy is queued behind the work already given to it (into page-locked host memory,
    which lets it run without the host), and Python goes on giving the GPU more work until read()
    is called. On NumPy it copies at once, so a later write to ``a`` does not change what read()
    returns on either.
    """
    if isinstance(a, np.ndarray) or np.isscalar(a):
        copy = np.array(a)
        return lambda: copy
    cupy = sys.modules["cupy"]
    import cupyx
    host = cupyx.empty_pinned(a.shape, a.dtype)
    a.get(out=host, blocking=False)
    copied = cupy.cuda.Event()
    copied.record()

    def read():
        copied.synchronize()
        return host
    return read


def synchronize(xp):
    """Wait for the GPU to finish (timing needs it); a no-op on NumPy."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
