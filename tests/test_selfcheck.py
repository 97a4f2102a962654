"""The GPU self-check (selfcheck.py), run on the CPU against stand-ins for CuPy: a module that
forwards to NumPy (so that the code takes its non-NumPy paths, kernels included, through
kernels.NumpyStandIn), made to disagree or to raise where a broken GPU would."""
import types

import numpy as np
import pytest

from scratchproto import kernels, selfcheck
from scratchproto.errors import UserError


def stand_in(**overrides):
    """A module that is not numpy but computes as numpy does, except for ``overrides``."""
    mod = types.ModuleType("gpu_stand_in")
    mod.__getattr__ = lambda name: getattr(np, name)
    for name, f in overrides.items():
        setattr(mod, name, f)
    return mod


class OffByOne(kernels.NumpyStandIn):
    """The kernels' stand-ins, with the per-channel sums' totals off by one part in a million."""
    def __call__(self, *args, axis=None):
        out = super().__call__(*args, axis=axis)
        return out * (1 + 1e-6) if self.name.startswith("channel_total_") else out


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "1")       # monkeypatch restores what the check sets
    monkeypatch.setattr(kernels, "_kernel", kernels.NumpyStandIn)


def test_a_faithful_stand_in_passes_once(kernels_on):
    xp = stand_in()
    assert selfcheck.first_difference(xp) is None
    selfcheck.check(xp)
    assert xp in selfcheck._passed
    selfcheck.check(xp)                                   # the second call does nothing
    selfcheck.check(np)                                   # NumPy is the reference: nothing to check


def test_wrong_kernels_fall_back_to_their_twins(kernels_on, monkeypatch):
    monkeypatch.setattr(kernels, "_kernel", OffByOne)
    lines = []
    xp = stand_in()
    selfcheck.check(xp, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(
        "warning: GPU self-check: with the CUDA kernels, the ConvNet's training episode: the ")
    assert "differs from NumPy's by " in lines[0] and "(at most 1e-08 expected in float64)" in lines[0]
    assert lines[0].endswith(f"so this process runs without them ({kernels.ENV}=0)")
    assert not kernels.enabled(xp)


def test_wrong_arithmetic_stops_the_run_naming_the_part(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    xp = stand_in(sqrt=lambda x, *a, **k: np.sqrt(x, *a, **k) * (1 + 1e-6))
    with pytest.raises(UserError) as e:
        selfcheck.check(xp)
    msg = str(e.value)
    assert msg.startswith("GPU self-check failed: the ConvNet's training episode: the ")
    assert "Nothing was trained; run on the CPU with --device cpu" in msg
    assert xp not in selfcheck._passed
    monkeypatch.setenv(selfcheck.ENV, "0")              # skipped when asked
    selfcheck.check(xp)


def test_a_part_that_raises_is_named(kernels_on, monkeypatch):
    """Raising with and without the kernels: the run stops, and the kernel setting is restored."""
    def broken(*a, **k):
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access\nmore detail")
    monkeypatch.setenv(kernels.ENV, "1")
    with pytest.raises(UserError, match=r"^GPU self-check failed: ResNet-18's blocks raised on the GPU: "
                                        r"RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access\. "):
        selfcheck.check(stand_in(), parts=(("ResNet-18's blocks", lambda xp: selfcheck.resnet_blocks(
            np) if xp is np else broken()),))
    assert __import__("os").environ[kernels.ENV] == "1"


def test_differences_of_float64_rounding_pass(monkeypatch):
    """Arithmetic off by 1e-12 (float64 rounding in another order is ~1e-16 per operation, a
    few orders more after a network's sums) passes; the 1e-6 of the test above does not."""
    monkeypatch.setenv(kernels.ENV, "0")
    xp = stand_in(sqrt=lambda x, *a, **k: np.sqrt(x, *a, **k) * (1 + 1e-12))
    assert selfcheck.first_difference(xp) is None
