"""scratchproto: Prototypical Networks and neural collapse, from scratch in NumPy / CuPy."""
from .backbones import build_backbone
from .optim import Adam, step_lr
from .collapse import collapse_metrics
from .protonet import ProtoNet
from .episodes import episodes
from .errors import UserError
from .omniglot import DataError, Omniglot
from . import backend, checkpoint, plots, trainer
