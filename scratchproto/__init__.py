"""scratchproto: Prototypical Networks and neural collapse, from scratch in NumPy / CuPy."""
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
