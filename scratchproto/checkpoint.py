"""Checkpoints: one .npz with the weights in PyTorch's names, the optimiser, and where the run was.

Keys: ``state.<name>`` (weights and BatchNorm buffers, exactly the reference PyTorch model's
state_dict names, conv weights (out, in, kh, kw)), ``adam.<key>`` (step, lr, moments) and ``meta``
(JSON: backbone, width, epoch, the early-stopping counters, the episode RNG seeds). Written to a
temporary file and renamed, so a crash mid-write never leaves a half checkpoint.
"""
import json
import os
import pathlib
import zipfile

import numpy as np

from .errors import UserError

FORMAT = "scratchproto-checkpoint-1"


def save(path, net, opt=None, **meta):
    """Write ``net`` (and ``opt``) with ``meta`` (JSON-able) to ``path`` atomically."""
    path = pathlib.Path(path)
    arrays = {f"state.{k}": v for k, v in net.state_dict().items()}
    if opt is not None:
        arrays.update({f"adam.{k}": v for k, v in opt.state_dict().items()})
    meta = {"format": FORMAT, "backbone": net.name, "width": net.width, **meta}
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, meta=json.dumps(meta), **arrays)
    os.replace(tmp, path)


def load(path):
    """Read a checkpoint: returns (meta dict, state dict, optimiser state dict or None)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            state = {k[6:]: z[k] for k in z.files if k.startswith("state.")}
            adam = {k[5:]: z[k] for k in z.files if k.startswith("adam.")} or None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        raise UserError(f"{path} is not a scratchproto checkpoint (expected an .npz written by "
                        f"run.py)") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise UserError(f"{path} is not a scratchproto checkpoint (format {found!r}, "
                        f"expected {FORMAT!r})")
    return meta, state, adam
