"""The two embedding networks of the paper (Section 3.1.1), and the wrapper that trains them.

* ``convnet``: four blocks of Conv3x3(width, padding 1, bias) -> BatchNorm -> ReLU -> MaxPool 2x2,
  then Flatten: (B, 1, 28, 28) -> (B, width). 111,936 parameters at width 64.
* ``resnet18``: the CIFAR-style ResNet-18: 3x3 stem (64, no bias) + BN + ReLU, four stages of two
  BasicBlocks at widths 64/128/256/512 and strides 1/2/2/2, 4x4 average pool -> (B, 512);
  the grey image is repeated to 3 channels. 11,168,832 parameters.

Parameter and buffer names are those of the reference PyTorch ProtoNet (``encoder.0.0.weight``,
``encoder.layer2.0.shortcut.0.weight``, ...), so checkpoints move between the two.
"""
import numpy as np

from . import backend
from .fast import ConvBlock, FastBasicBlock, FastBatchNorm2d, FastConv2d, FastReLU
from .layers import (AvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, MaxPool2d, Module,
                     ReLU, RepeatChannels, Sequential)

BACKBONES = ("convnet", "resnet18")


def conv_block(c_in, c_out, rng, xp, dtype, fast=True):
    """Conv3x3 -> BatchNorm -> ReLU -> MaxPool2x2; ``fast``: the fused equivalent (fast.py)."""
    kw = dict(xp=xp, dtype=dtype)
    if fast:
        return ConvBlock(FastConv2d(c_in, c_out, 3, 1, 1, rng=rng, **kw), BatchNorm2d(c_out, **kw), **kw)
    return Sequential(Conv2d(c_in, c_out, 3, 1, 1, bias=True, rng=rng, **kw), BatchNorm2d(c_out, **kw),
                      ReLU(**kw), MaxPool2d(2, **kw), **kw)


def convnet(width, rng, xp, dtype, fast=True):
    blocks = [conv_block(c_in, width, rng, xp, dtype, fast) for c_in in (1, width, width, width)]
    return Sequential(*blocks, Flatten(xp=xp, dtype=dtype), xp=xp, dtype=dtype)


class ResNet18(Module):
    """CIFAR-style ResNet-18 (He et al. 2016, as in the paper's reference code). x: (N, 28, 28, 1)."""

    def __init__(self, rng, xp, dtype, fast=True):
        super().__init__(xp, dtype)
        kw = dict(xp=xp, dtype=dtype)
        self.repeat = RepeatChannels(3, **kw)
        self.conv1 = (FastConv2d if fast else Conv2d)(3, 64, 3, 1, 1, bias=False, rng=rng, **kw)
        self.bn1 = (FastBatchNorm2d if fast else BatchNorm2d)(64, **kw)
        self.relu = (FastReLU if fast else ReLU)(**kw)
        self.children = [("conv1", self.conv1), ("bn1", self.bn1)]
        c_in, self.stages = 64, []
        for i, (c_out, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            block = FastBasicBlock if fast else BasicBlock
            stage = Sequential(block(c_in, c_out, stride, rng, **kw),
                               block(c_out, c_out, 1, rng, **kw), **kw)
            self.children.append((f"layer{i + 1}", stage))
            self.stages.append(stage)
            c_in = c_out
        self.pool = AvgPool2d(4, **kw)
        self.flatten = Flatten(**kw)
        self.sequence = ([self.repeat, self.conv1, self.bn1, self.relu] + self.stages
                         + [self.pool, self.flatten])

    def forward(self, x, train=True):
        for layer in self.sequence:
            x = layer.forward(x, train)
        return x

    def backward(self, dout, need_dx=True):
        for layer in reversed(self.sequence[2:]):
            dout = layer.backward(dout)
        return self.repeat.backward(self.conv1.backward(dout, need_dx), need_dx)


class Backbone:
    """An embedding network with PyTorch-named weights.

    >>> import numpy as np
    >>> net = build_backbone("convnet", seed=0)
    >>> x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    >>> z = net.forward(x, train=True)      # x: (B, 1, 28, 28) -> z: (B, d) on the device
    >>> z.shape
    (2, 64)
    >>> net.zero_grad(); dx = net.backward(np.ones_like(z))
    >>> dx.shape
    (2, 1, 28, 28)

    Images enter NCHW as PyTorch has them and are turned channels-last once here.
    """

    def __init__(self, name, encoder, xp, dtype, width=None):
        self.name, self.encoder, self.xp, self.dtype, self.width = name, encoder, xp, dtype, width
        self._flatten()

    def _flatten(self):
        """Move every parameter into one flat array, and every gradient into another, leaving
        each layer's params and grads as views into them. The layers see no difference; an
        optimiser step and zero_grad become a few operations on two whole arrays instead of a few
        per parameter (on a GPU each operation is a kernel launch: 62 parameters in ResNet-18)."""
        xp = self.xp
        owners = [(f"{mname}.{k}", m, k) for mname, m in self.encoder.named_modules("encoder") for k in m.params]
        total = sum(m.params[k].size for _, m, k in owners)
        self.flat_params = xp.empty(total, dtype=self.dtype)
        self.flat_grads = xp.zeros(total, dtype=self.dtype)
        self.flat_slices = []           # [(name, slice of the flat arrays, shape)], in named_parameters order
        offset = 0
        for name, m, k in owners:
            p = m.params[k]
            part = slice(offset, offset + p.size)
            self.flat_params[part] = p.reshape(-1)
            m.params[k] = self.flat_params[part].reshape(p.shape)
            m.grads[k] = self.flat_grads[part].reshape(p.shape)
            self.flat_slices.append((name, part, p.shape))
            offset += p.size

    # -- computation -----------------------------------------------------------------------
    def forward(self, x, train=True):
        """x: (B, 1, 28, 28) NumPy or device array -> embeddings (B, d) on the device."""
        x = self.xp.asarray(x, dtype=self.dtype)
        return self.encoder.forward(self.xp.ascontiguousarray(x.transpose(0, 2, 3, 1)), train)

    def backward(self, dz, need_dx=True):
        """dL/dz (B, d) -> dL/dx (B, 1, 28, 28); parameter gradients accumulate in the layers."""
        dx = self.encoder.backward(dz, need_dx=need_dx)
        return None if dx is None else dx.transpose(0, 3, 1, 2)

    def zero_grad(self):
        self.flat_grads[...] = 0         # every layer's grads are views of it

    # -- parameters by name ----------------------------------------------------------------
    def named_parameters(self):
        """[(name, param array, grad array)] in PyTorch's order and names."""
        return [(f"{mname}.{k}", m.params[k], m.grads[k])
                for mname, m in self.encoder.named_modules("encoder") for k in m.params]

    def _named_state(self):
        for mname, m in self.encoder.named_modules("encoder"):
            for k, v in list(m.params.items()) + list(m.buffers.items()):
                yield f"{mname}.{k}", v

    def num_parameters(self):
        return int(sum(p.size for _, p, _ in self.named_parameters()))

    def grads(self):
        """{name: host array} of the accumulated parameter gradients."""
        return {name: backend.to_host(g).copy() for name, _, g in self.named_parameters()}

    def state_dict(self):
        """{name: host NumPy array}: weights and BatchNorm buffers, keyed as the PyTorch model's."""
        return {name: backend.to_host(v).copy() for name, v in self._named_state()}

    def load_state_dict(self, sd):
        """Copy weights in, strictly: a missing, extra or mis-shaped key raises ValueError."""
        own = dict(self._named_state())
        missing = sorted(set(own) - set(sd))
        extra = sorted(set(sd) - set(own))
        if missing or extra:
            raise ValueError(f"state_dict does not fit this {self.name}: missing keys {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}"
                             f"{'...' if len(extra) > 5 else ''}")
        for name, v in own.items():
            new = np.asarray(backend.to_host(sd[name]))
            if new.shape != v.shape:
                raise ValueError(f"state_dict key {name} has shape {new.shape}, "
                                 f"expected {tuple(v.shape)}")
        for name, v in own.items():
            v[...] = self.xp.asarray(backend.to_host(sd[name]), dtype=v.dtype)


def build_backbone(name, seed=0, device="cpu", width=64, dtype=np.float32, xp=None, fast=True):
    """A freshly initialised backbone ('convnet' or 'resnet18') on ``device``.

    Weights are drawn from PyTorch's default distributions with a NumPy generator seeded by
    ``seed``. ``width`` sets the ConvNet's channels (model-size studies); ResNet-18 is fixed.
    ``fast=False`` builds it from the plain layers of layers.py only (same math, slower).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    xp = xp if xp is not None else backend.get_xp(device)
    rng = np.random.default_rng(seed)
    if name == "convnet":
        return Backbone(name, convnet(width, rng, xp, dtype, fast), xp, dtype, width)
    return Backbone(name, ResNet18(rng, xp, dtype, fast), xp, dtype)
