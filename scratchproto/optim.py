"""Adam with PyTorch's update rule, and the paper's step schedule for the learning rate."""
import numpy as np

from . import backend, kernels
from .fast import over_images


class Adam:
    """Adam (Kingma & Ba 2015) exactly as torch.optim.Adam computes it.

        g <- g + weight_decay * p                  (L2, added to the gradient)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Works on a backbone's parameters in place; ``lr`` may be changed between steps. A backbone
    whose parameters live in one flat array (``flat_params``, ``flat_grads``: backbones.py) gets
    its step as one update of whole arrays, the moments flat too; anything else that has
    ``named_parameters`` is stepped parameter by parameter. The arithmetic is the same, element
    by element, so the two give the same numbers to the last bit (tests/test_backbones.py).
    """

    def __init__(self, net, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.net, self.lr, self.betas, self.eps, self.weight_decay = net, lr, betas, eps, weight_decay
        xp = net.xp
        self.t = 0
        self.flat = getattr(net, "flat_params", None) is not None
        if self.flat:
            self.m_flat, self.v_flat = xp.zeros_like(net.flat_params), xp.zeros_like(net.flat_params)
            # per-parameter views, for the checkpoint's names
            self.m = {name: self.m_flat[part].reshape(shape) for name, part, shape in net.flat_slices}
            self.v = {name: self.v_flat[part].reshape(shape) for name, part, shape in net.flat_slices}
        else:
            self.m = {name: xp.zeros_like(p) for name, p, _ in net.named_parameters()}
            self.v = {name: xp.zeros_like(p) for name, p, _ in net.named_parameters()}

    def step(self):
        b1, b2 = self.betas
        self.t += 1
        step_size = self.lr / (1 - b1 ** self.t)
        sqrt_bc2 = np.sqrt(1 - b2 ** self.t)
        if self.flat:
            # a block of each flat array at a time, on every thread: the update's temporaries
            # stay in the cache (ResNet-18's 11 M parameters: 45 MB per array)
            p, g, m, v = self.net.flat_params, self.net.flat_grads, self.m_flat, self.v_flat
            xp = self.net.xp
            if kernels.enabled(xp):        # on a GPU: the whole step in one kernel
                kernels.adam(xp, p, g, m, v, self.betas, self.eps, self.weight_decay, step_size, sqrt_bc2)
            else:
                over_images(xp, p.size, 1, lambda i0, i1: self._update(
                    p[i0:i1], g[i0:i1], m[i0:i1], v[i0:i1], step_size, sqrt_bc2))
        else:
            for name, p, g in self.net.named_parameters():
                self._update(p, g, self.m[name], self.v[name], step_size, sqrt_bc2)

    def _update(self, p, g, m, v, step_size, sqrt_bc2):
        """The update of the class docstring, in place on p, m and v (kernels.adam_twin: the
        formula once, for this loop and for the GPU kernel's tests)."""
        kernels.adam_twin(self.net.xp, p, g, m, v, self.betas, self.eps, self.weight_decay, step_size, sqrt_bc2)

    def state_dict(self):
        """Host arrays and numbers: enough to continue exactly where it stopped."""
        out = {"t": np.asarray(self.t), "lr": np.asarray(self.lr)}
        out.update({f"m.{k}": backend.to_host(a).copy() for k, a in self.m.items()})
        out.update({f"v.{k}": backend.to_host(a).copy() for k, a in self.v.items()})
        return out

    def load_state_dict(self, sd):
        for key in [f"{kind}.{name}" for kind in "mv" for name in self.m]:
            if key not in sd:
                raise ValueError(f"optimiser state lacks {key}")
        self.t, self.lr = int(sd["t"]), float(sd["lr"])
        for name in self.m:
            self.m[name][...] = self.net.xp.asarray(sd[f"m.{name}"])
            self.v[name][...] = self.net.xp.asarray(sd[f"v.{name}"])


def step_lr(lr0, epoch, step=20, gamma=0.5):
    """Learning rate of 1-based ``epoch``: lr0 halved every ``step`` epochs (paper, Section 4)."""
    return lr0 * gamma ** ((epoch - 1) // step)
