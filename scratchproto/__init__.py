"""scratchproto: Prototypical Networks and neural collapse, from scratch in NumPy / CuPy."""
import os
import sys

# On a CPU, scratchproto's own threads (fast.THREADS, one per core) share out the chunks of each
# big matrix product and call OpenBLAS on one thread each: a core that the host slows down then
# takes fewer chunks, where OpenBLAS's fixed split would wait for it (docs/engine.md). A thread
# count already chosen in the environment is left alone; so is a run pinned to one core with
# OPENBLAS_NUM_THREADS=1. If OpenBLAS does run several threads, its workers keep spinning for
# about 0.1 s after each product, on the cores that our threads need next; a timeout of 4 makes
# them sleep at once. OpenBLAS reads these only when NumPy loads it, so they work when
# scratchproto is imported first (run.py, the benchmarks); otherwise set them in the shell.
if "numpy" not in sys.modules:
    if "OPENBLAS_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ.setdefault("SCRATCHPROTO_THREADS", str(cores))
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
