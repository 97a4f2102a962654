"""Checkpoints: one .npz with the weights in PyTorch's names, the optimiser, and where the run was.

Keys: ``state.<name>`` (weights and BatchNorm buffers, exactly the reference PyTorch model's
state_dict names, conv weights (out, in, kh, kw)), ``adam.<key>`` (step, lr, moments) and ``meta``
(JSON: backbone, width, epoch, the early-stopping counters, the episode RNG seeds). Written to a
temporary file and renamed (files.atomic_write), so a crash mid-write never leaves a half
checkpoint and a failed write leaves the previous one intact.
"""
import json
import pathlib
import zipfile
import zlib

import numpy as np

from . import files
from .errors import UserError

FORMAT = "scratchproto-checkpoint-1"


def save(path, net, opt=None, hint=None, **meta):
    """Write ``net`` (and ``opt``) with ``meta`` (JSON-able) to ``path`` atomically.

    ``hint``: what the user should do if the write fails (the FileError's advice)."""
    arrays = {f"state.{k}": v for k, v in net.state_dict().items()}
    if opt is not None:
        arrays.update({f"adam.{k}": v for k, v in opt.state_dict().items()})
    meta = {"format": FORMAT, "backbone": net.name, "width": net.width, **meta}
    files.atomic_write(path, lambda f: np.savez(f, meta=json.dumps(meta), **arrays), hint)


def strip(src, dst):
    """Write ``dst``: checkpoint ``src`` without the optimiser's state (weights, BatchNorm buffers
    and meta only; a third of the size with Adam's two moments), to share or commit a model. It
    evaluates like ``src`` but cannot be resumed. Returns the number of bytes written."""
    meta, state, _ = load(src)
    meta = {**meta, "stripped_from": pathlib.Path(src).name}
    arrays = {f"state.{k}": v for k, v in state.items()}
    files.atomic_write(dst, lambda f: np.savez(f, meta=json.dumps(meta), **arrays))
    return pathlib.Path(dst).stat().st_size


def load(path):
    """Read a checkpoint: returns (meta dict, state dict, optimiser state dict or None)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint: name the file, e.g. {path / 'best.npz'}")
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            state = {k[6:]: z[k] for k in z.files if k.startswith("state.")}
            adam = {k[5:]: z[k] for k in z.files if k.startswith("adam.")} or None
    except KeyError:
        raise UserError(f"{path} is not a scratchproto checkpoint (expected an .npz written by "
                        f"run.py)") from None
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, json.JSONDecodeError) as e:
        # a .npz cut short (a copy that did not finish, a full disk outside run.py) or not one at all
        raise UserError(f"{path} is damaged or not a scratchproto checkpoint ({type(e).__name__}: "
                        f"{e}); use another checkpoint") from None
    except OSError as e:
        raise files.fs_error(e, path, "read checkpoint") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise UserError(f"{path} is not a scratchproto checkpoint (format {found!r}, "
                        f"expected {FORMAT!r})")
    return meta, state, adam


def load_backbone(path, xp):
    """The backbone a checkpoint holds, on array module ``xp``: returns (meta, net)."""
    from .backbones import build_backbone
    meta, state, _ = load(path)
    net = build_backbone(meta["backbone"], width=meta.get("width") or 64, xp=xp)
    net.load_state_dict(state)
    return meta, net
