"""The one place that decides the array module: NumPy on the CPU, CuPy on the GPU.

Every layer does its math through ``xp``, the module returned here, so the same code runs on
both (Chainer's habit). Nothing else in the package imports cupy.
"""
import sys

import numpy as np

DEVICES = ("cpu", "gpu", "auto")


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


def get_xp(device="cpu"):
    """The array module for ``device``: 'cpu' -> numpy, 'gpu' -> cupy, 'auto' -> cupy if usable.

    Asking for 'gpu' where CuPy or a GPU is missing warns on one line and falls back to NumPy.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return np
    cupy, why = _cupy_or_reason()
    if cupy is not None:
        return cupy
    if device == "gpu":
        print(f"warning: --device gpu asked for, but {why}; falling back to NumPy on the CPU",
              file=sys.stderr)
    return np


def device_name(xp):
    """'gpu' for CuPy, 'cpu' for NumPy."""
    return "cpu" if xp is np else "gpu"


def xp_of(a):
    """The array module that owns array ``a``."""
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"].get_array_module(a)


def to_host(a):
    """A NumPy copy (or view) of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.asarray(a)
    return a.get()


def synchronize(xp):
    """Wait for the GPU to finish (timing needs it); a no-op on NumPy."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
