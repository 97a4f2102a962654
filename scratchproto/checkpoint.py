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
from .omniglot import SIZE, check_size

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
        _check_sizes(path)
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
    _check_meta(path, meta)
    return meta, state, adam


# what every checkpoint's meta holds, and what each must be (run.py writes all of them)
META_FIELDS = {"backbone": str, "epoch": int}


def _check_meta(path, meta):
    """UserError for meta that lacks a field or holds one of the wrong kind: a checkpoint is a file
    anyone may have edited, and a KeyError deep in the trainer would not say which."""
    from .backbones import BACKBONES
    for name, kind in META_FIELDS.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise UserError(f"{path} is damaged: its metadata {'lacks' if name not in meta else 'has a bad'} "
                            f"{name!r}; use another checkpoint")
    if meta["backbone"] not in BACKBONES or meta["epoch"] < 0:
        raise UserError(f"{path} is damaged: its metadata names backbone {meta['backbone']!r}, epoch "
                        f"{meta['epoch']}; use another checkpoint")
    width = meta.get("width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 1 << 16):
        raise UserError(f"{path} is damaged: its metadata has width {width!r}; use another checkpoint")
    try:                                  # the rule --image-size follows (omniglot.check_size)
        check_size(image_size(meta))
    except UserError:
        raise UserError(f"{path} is damaged: its metadata has image_size {meta['image_size']!r}; use "
                        f"another checkpoint") from None


def _check_sizes(path):
    """Before any array is read: every array's header must claim no more bytes than its member of
    the .npz holds, so a damaged or forged header never makes us allocate what it claims."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"member {info.filename} has .npy version {version}")
                shape, _, dtype = read(member)
                claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if claimed > info.file_size:
                    raise ValueError(f"member {info.filename} claims {claimed:,} bytes of {dtype} "
                                     f"{shape} but holds {info.file_size:,}")


def load_backbone(path, xp):
    """The backbone a checkpoint holds, on array module ``xp``: returns (meta, net)."""
    meta, state, _ = load(path)
    return meta, backbone(path, meta, state, xp)


def backbone(path, meta, state, xp):
    """The backbone of a checkpoint already read (load: its meta and state), on ``xp``; ``path``
    names it in errors."""
    from .backbones import build_backbone
    if meta["backbone"] == "convnet":     # the width the metadata claims is built: check it first
        first = state.get("encoder.0.0.weight")
        if first is None or first.ndim != 4 or first.shape[0] != (meta.get("width") or 64):
            raise UserError(f"{path} is damaged: its metadata names a {describe(meta)}, but its first "
                            f"convolution's weights are {'missing' if first is None else first.shape}; "
                            f"use another checkpoint")
    net = build_backbone(meta["backbone"], width=meta.get("width") or 64, xp=xp)
    try:
        net.load_state_dict(state)
    except ValueError as e:
        raise UserError(f"{path} is damaged: its weights do not fit the {describe(meta)} its "
                        f"metadata names ({e}); use another checkpoint") from None
    return net


def image_size(meta):
    """The side of the images a checkpoint's model was trained on (28, the paper's, for
    checkpoints written before the setting existed; load has checked it); evaluations draw theirs
    at that size."""
    return meta.get("image_size", SIZE)


def describe(meta):
    """'convnet of width 64' or 'resnet18', from a checkpoint's meta."""
    return f"{meta['backbone']} of width {meta.get('width') or 64}" if meta["backbone"] == "convnet" else meta["backbone"]
