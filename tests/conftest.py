import sys, pathlib
sys.path.insert(0, str(pathlib.Path(__file__).parent))
# scratchproto before NumPy, as run.py and the benchmarks do: OpenBLAS on one thread and our
# threads dealing out the work. Besides testing the default arrangement, it keeps the suite's
# speed when another process holds a core: two-thread OpenBLAS then waits for its descheduled
# half, up to 50 times slower on small products (benchmarks/README.md, measured on 2026-11-28).
import scratchproto  # noqa: E402,F401
import numpy as np
import pytest

from scratchproto import backend

_cupy, _why = backend._cupy_or_reason()

# Every layer test runs on NumPy, and on CuPy when a GPU is present.
XPS = [pytest.param(np, id="numpy"),
       pytest.param(_cupy, id="cupy",
                    marks=pytest.mark.skipif(_cupy is None, reason=f"no GPU path here: {_why}"))]


@pytest.fixture(params=XPS)
def xp(request):
    return request.param


@pytest.fixture(scope="session")
def omniglot(tmp_path_factory):
    """Omniglot downloaded for real, over HTTP from a loopback server that serves the offline
    mirror, into a fresh folder; built once and shared by the tests that need data."""
    from helpers import MIRROR, http_mirror
    import scratchproto as sp
    if not (MIRROR / "images_background.zip").exists():
        pytest.skip(f"no Omniglot mirror at {MIRROR}")
    root = tmp_path_factory.mktemp("omniglot")
    with http_mirror(MIRROR) as url:
        return sp.Omniglot(root=root, mirror=url, progress=False)
