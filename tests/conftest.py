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
