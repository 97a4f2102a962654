"""scratchproto: Prototypical Networks and neural collapse, from scratch in NumPy / CuPy."""
import os
import sys

# OpenBLAS's worker threads keep spinning for about 0.1 s after each matrix product, on the cores
# that fast.py's threads (and NumPy's single-threaded loops) need next; 4 makes them sleep at once.
# OpenBLAS reads this only when NumPy loads it, so it works when scratchproto is imported first
# (run.py, the benchmarks); otherwise set it in the shell (docs/engine.md).
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from . import backend, checkpoint, plots, trainer
from .backbones import build_backbone
from .collapse import collapse_metrics
from .episodes import episodes
from .errors import UserError
from .omniglot import DataError, Omniglot
from .optim import Adam, step_lr
from .protonet import ProtoNet

__all__ = ["Adam", "DataError", "Omniglot", "ProtoNet", "UserError", "backend", "build_backbone",
           "checkpoint", "collapse_metrics", "episodes", "plots", "step_lr", "trainer"]
