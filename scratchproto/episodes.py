"""Episodic sampling (Vinyals et al. 2016; Snell et al. 2017): the few-shot tasks of training.

An episode draws ``way`` distinct classes of a split, and for each class ``shot + query``
distinct drawers (of the 20): the first ``shot`` are the support set, the rest the query set.
Labels are implied by class order. The paper's settings: training 60-way 5-shot 5-query,
100 episodes per epoch; validation and test 5-way 5-shot 15-query.

Within-alphabet episodes (``within_alphabet=True``; Lake et al. 2015's benchmark tests this way)
first draw an alphabet, uniformly among those with at least ``way`` classes in the split, then
the ``way`` classes from it: telling apart characters of one script is harder than of many.
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


def alphabet_groups(names):
    """Class indices grouped by alphabet: {alphabet: array of indices into ``names``}."""
    groups = {}
    for i, name in enumerate(names):
        groups.setdefault(name.split("/")[0], []).append(i)
    return {a: np.array(idx) for a, idx in groups.items()}


def episodes(ds, split, way=60, shot=5, query=5, n=100, seed=0, device="cpu", rotations=True,
             within_alphabet=False, flags=""):
    """Yield ``n`` episodes (xs, xq) of split ``split`` of Omniglot ``ds``.

    xs: (way, shot, 1, 28, 28), xq: (way, query, 1, 28, 28), float32, on ``device`` ('cpu',
    'gpu', 'auto', or an array module). ``seed`` (an int or a sequence of ints) fixes the
    episodes: the same seed gives the same episodes. ``rotations=False``: unrotated characters
    only; ``within_alphabet``: every episode's classes from one alphabet (module docstring).
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
    for _ in range(n):
        if within_alphabet:
            group = groups[rng.integers(len(groups))]
            cls, drawers = draw(rng, len(group), way, shot + query)
            cls = group[cls]
        else:
            cls, drawers = draw(rng, len(names), way, shot + query)
        bits = ds.bits[rows[cls][:, None], rots[cls][:, None], drawers]          # (way, s+q, 98)
        x = xp.asarray(unpack(bits))
        yield x[:, :shot], x[:, shot:]
