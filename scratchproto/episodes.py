"""Episodic sampling (Vinyals et al. 2016; Snell et al. 2017): the few-shot tasks of training.

An episode draws ``way`` distinct classes of a split, and for each class ``shot + query``
distinct drawers (of the 20): the first ``shot`` are the support set, the rest the query set.
Labels are implied by class order. The paper's settings: training 60-way 5-shot 5-query,
100 episodes per epoch; validation and test 5-way 5-shot 15-query.

Within-alphabet episodes (``within_alphabet=True``; Lake et al. 2015's benchmark tests this way)
first draw an alphabet, uniformly among those with at least ``way`` classes in the split, then
the ``way`` classes from it: telling apart characters of one script is harder than of many.

Augmented episodes (``augment=True``, for training) distort every image by its own random
affine map, as Koch et al. (2015) did for their Siamese network on Lake's benchmark (``distort``).
"""
import numpy as np

from . import backend
from .errors import UserError
from .omniglot import DRAWERS, unpack


def check_episode(way, shot, query, n_classes=None, split=None, flags=""):
    """Raise UserError for an episode shape that cannot be sampled. ``flags``: the prefix of the
    names in the message, e.g. '--train-' for run.py's --train-way, --train-shot, --train-query."""
    for name, v in (("way", way), ("shot", shot), ("query", query)):
        if int(v) != v or v < 1:
            raise UserError(f"{flags}{name} must be a positive integer, got {v}")
    if way < 2:
        raise UserError(f"{flags}way must be at least 2 (a prototype needs a rival), got {way}")
    if shot + query > DRAWERS:
        raise UserError(f"{flags}shot + {flags}query = {shot + query} exceeds the {DRAWERS} drawers "
                        f"of an Omniglot class")
    if n_classes is not None and way > n_classes:
        raise UserError(f"{flags}way = {way} exceeds the {n_classes} classes of split {split!r}")


def draw(rng, n_classes, way, per_class):
    """Indices of one episode: ``way`` distinct classes (way,) and, for each, ``per_class``
    distinct drawers (way, per_class), all uniformly at random without replacement."""
    cls = rng.choice(n_classes, way, replace=False)
    drawers = rng.random((way, DRAWERS)).argsort(axis=1)[:, :per_class]   # a random permutation each
    return cls, drawers


# Koch et al.'s distortions: each of these applied with probability 1/2, uniformly within its range.
# Their translation, +-2 pixels of a 105-pixel image, is +-0.53 of a 28-pixel one (a fraction of
# the image's side, so that it scales with --image-size).
ROTATE_DEG, SHEAR, SCALE, SHIFT = 10.0, 0.3, (0.8, 1.2), 2 / 105


def distort(images, rng):
    """Each image (..., 1, size, size) moved by a random affine map: rotation, shear, scale (rows and
    columns apart) and shift, each part applied with probability 1/2 (ranges above), about the
    image's centre.
    Nearest-neighbour sampling keeps the binary images binary; pixels from outside are 0."""
    shape = images.shape
    flat = images.reshape(-1, shape[-2] * shape[-1])
    n, size = len(flat), shape[-1]
    on = rng.random((n, 4)) < 0.5                       # which of the four parts each map has
    theta = np.deg2rad(rng.uniform(-ROTATE_DEG, ROTATE_DEG, n)) * on[:, 0]
    shear = rng.uniform(-SHEAR, SHEAR, (n, 2)) * on[:, 1:2]
    scale = np.where(on[:, 2:3], rng.uniform(*SCALE, (n, 2)), 1.0)
    shift = rng.uniform(-SHIFT * size, SHIFT * size, (n, 2)) * on[:, 3:4]
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)        # (n, 2, 2)
    shr = np.stack([np.stack([np.ones(n), shear[:, 0]], -1), np.stack([shear[:, 1], np.ones(n)], -1)], -2)
    a = rot @ shr * scale[:, :, None]                   # (n, 2, 2): output offset -> input offset
    centre = (size - 1) / 2
    rows, cols = np.mgrid[:size, :size].reshape(2, -1) - centre                      # (2, P)
    src = np.einsum("nij,jp->nip", a, np.stack([rows, cols])) + centre + shift[:, :, None]
    r, c = np.rint(src).astype(np.int64).transpose(1, 0, 2)                          # (n, P) each
    inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
    index = np.clip(r, 0, size - 1) * size + np.clip(c, 0, size - 1)
    out = np.take_along_axis(flat, index, axis=1) * inside
    return out.astype(images.dtype).reshape(shape)


def alphabet_groups(names):
    """Class indices grouped by alphabet: {alphabet: array of indices into ``names``}."""
    groups = {}
    for i, name in enumerate(names):
        groups.setdefault(name.split("/")[0], []).append(i)
    return {a: np.array(idx) for a, idx in groups.items()}


def episodes(ds, split, way=60, shot=5, query=5, n=100, seed=0, device="cpu", rotations=True,
             within_alphabet=False, augment=False, flags=""):
    """Yield ``n`` episodes (xs, xq) of split ``split`` of Omniglot ``ds``.

    xs: (way, shot, 1, S, S), xq: (way, query, 1, S, S) (S: the data set's image size, 28 the
    paper's), float32, on ``device`` ('cpu',
    'gpu', 'auto', or an array module). ``seed`` (an int or a sequence of ints) fixes the
    episodes: the same seed gives the same episodes. ``rotations=False``: unrotated characters
    only; ``within_alphabet``: every episode's classes from one alphabet; ``augment``: every image
    distorted (module docstring), by a generator of its own, so that the classes and drawers drawn
    are those of the same seed without it.
    """
    names = ds.classes(split, rotations)
    if within_alphabet:
        check_episode(way, shot, query, None, split, flags)
        groups = [g for g in alphabet_groups(names).values() if len(g) >= way]
        if not groups:
            largest = max(len(g) for g in alphabet_groups(names).values())
            raise UserError(f"{flags}way = {way} exceeds the {largest} classes of the largest "
                            f"alphabet of split {split!r} (within-alphabet episodes)")
    else:
        check_episode(way, shot, query, len(names), split, flags)
    if int(n) != n or n < 1:
        raise UserError(f"the number of episodes must be a positive integer, got {n}")
    xp = device if hasattr(device, "asarray") else backend.get_xp(device)
    rows, rots = np.array([ds.class_index(c) for c in names]).T
    rng = np.random.default_rng(seed)
    distortions = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]) if augment else None
    for _ in range(n):
        if within_alphabet:
            group = groups[rng.integers(len(groups))]
            cls, drawers = draw(rng, len(group), way, shot + query)
            cls = group[cls]
        else:
            cls, drawers = draw(rng, len(names), way, shot + query)
        bits = ds.bits[rows[cls][:, None], rots[cls][:, None], drawers]          # (way, s+q, S*S/8)
        x = unpack(bits)
        x = xp.asarray(distort(x, distortions) if augment else x)
        yield x[:, :shot], x[:, shot:]
