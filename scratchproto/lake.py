"""Lake, Salakhutdinov & Tenenbaum's one-shot classification benchmark (Science 2015).

Omniglot was made for this challenge. Twenty fixed runs; each holds 20 characters of one alphabet
of the evaluation set, one drawing of each (``training/classMM.png``) and a drawing of each by
another person (``test/itemKK.png``); ``class_labels.txt`` pairs them. For each test drawing, pick
its character among the 20 training drawings, from that single example: 20-way 1-shot, within
one alphabet. A run's score is its error over its 20 test drawings; the benchmark's figure is the
mean over the 20 runs. The published errors (Lake et al. 2015) are in PUBLISHED.

A ProtoNet answers as in a 1-shot episode (Snell et al. 2017): each training drawing is the
prototype of its character, and a test drawing goes to the nearest prototype in squared
Euclidean distance. BatchNorm runs in evaluation mode, so an embedding depends on its own image
only. Images are preprocessed exactly as Omniglot's (omniglot.preprocess), without rotation.

The file is all_runs.zip from Lake's repository (MIT licence), downloaded into the data folder
like the Omniglot archives (the same --mirror mechanism) and verified by its sha256.
"""
import hashlib
import io
import os
import json
import pathlib
import re
import zipfile
import zlib

import numpy as np

from . import backend, checkpoint, fast, files, selfcheck
from .omniglot import DataError, download, preprocess, source_url

FILE = "all_runs.zip"
URL = ("https://raw.githubusercontent.com/brendenlake/omniglot/master/python/one-shot-classification/"
       "all_runs.zip")
SHA256 = "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"
RUNS, WAY = 20, 20

# Error rates of Lake et al. 2015 (Fig. 3 and text), background-set training; percent.
PUBLISHED = {"people": 4.5, "Bayesian Program Learning": 3.3,
             "deep Siamese convnet (Koch et al. 2015)": 8.0, "deep convnet": 13.5,
             "Hierarchical Deep": 34.8}

# Runs whose characters the Vinyals training split holds (all 20 in runs 1-6, 18 of 20 in runs 7-8,
# at rot000 among its classes), so a model trained on that split has seen them: its error on these
# runs is not one-shot (tests/test_lake.py checks this list against the archives).
SEEN_BY_VINYALS_TRAIN = tuple(range(1, 9))


class Run:
    """One run: ``train`` (20, 1, 28, 28) and ``test`` (20, 1, 28, 28) float32 images, and
    ``answer`` (20,): for each test image, the index of the training image of its character."""

    def __init__(self, name, train, test, answer):
        self.name, self.train, self.test, self.answer = name, train, test, answer


def fetch(root="data/omniglot", mirror=None, progress=True):
    """The path of all_runs.zip in ``root``, downloaded and verified first if it is missing."""
    path = files.ensure_folder(root, "Omniglot folder (--data)") / FILE
    if path.exists():
        _verify(path, f"{path} is not the benchmark's {FILE}", "delete it and re-run to download it again")
        return path
    url = source_url(FILE, mirror, URL)
    tmp = files.temp_path(path)
    download(url, tmp, progress)
    try:
        _verify(tmp, f"the file downloaded from {url} is not the benchmark's {FILE}", "it was not "
                "kept: check the mirror, or re-run to try again")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def _verify(path, what, todo):
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise files.fs_error(e, path, "read") from None
    if digest != SHA256:
        raise DataError(f"{what} (sha256 {digest[:16]}..., expected {SHA256[:16]}...); {todo}")


def _image(zf, name, path, size):
    from PIL import Image
    try:
        data = zf.read(name)
    except KeyError:
        raise DataError(f"{path} has no {name}: the run is incomplete") from None
    with Image.open(io.BytesIO(data)) as img:
        if img.size != (105, 105):
            raise DataError(f"{name} in {path} is {img.size[0]}x{img.size[1]}, expected 105x105")
        return preprocess(img, rotations=(0,), size=size).astype(np.float32)     # (1, size, size)


def read_runs(path, size=28):
    """The runs of a zip in all_runs.zip's layout (runNN/{training,test}/..., class_labels.txt).

    Any such zip is read (the tests use small synthetic ones); fetch() is what verifies the real
    one. Raises DataError, naming the file, for a damaged zip or an incomplete run.
    """
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            names = sorted({n.split("/")[0] for n in zf.namelist() if re.match(r"run\d+/", n)})
            if not names:
                raise DataError(f"{path} holds no runNN/ folders: it is not a one-shot benchmark file")
            runs = []
            for name in names:
                try:
                    pairs = zf.read(f"{name}/class_labels.txt").decode().split()
                except KeyError:
                    raise DataError(f"{path} has no {name}/class_labels.txt: the run is incomplete") from None
                if len(pairs) != 2 * WAY:
                    raise DataError(f"{name}/class_labels.txt in {path} pairs {len(pairs) // 2} "
                                    f"images, expected {WAY}")
                train = np.stack([_image(zf, f"{name}/training/class{m:02d}.png", path, size) for m in range(1, WAY + 1)])
                test = np.stack([_image(zf, f"{name}/test/item{k:02d}.png", path, size) for k in range(1, WAY + 1)])
                answer = np.empty(WAY, dtype=int)
                for item, cls in zip(pairs[::2], pairs[1::2]):
                    k, m = int(re.search(r"item(\d+)", item)[1]), int(re.search(r"class(\d+)", cls)[1])
                    answer[k - 1] = m - 1
                runs.append(Run(name, train, test, answer))
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}); delete it and re-run") from None
    except OSError as e:
        raise files.fs_error(e, path, "read") from None
    return runs


def run_errors(net, runs):
    """Each run's error (fraction of its test images given the wrong character) under ``net``."""
    xp = net.xp
    errors = []
    with fast.blas_one_thread(xp):
        for run in runs:
            z = backend.to_host(net.forward(xp.asarray(np.concatenate([run.train, run.test])), train=False))
            z = z.astype(np.float64)
            prototypes, queries = z[:len(run.train)], z[len(run.train):]
            d2 = ((queries[:, None, :] - prototypes[None, :, :]) ** 2).sum(axis=2)
            errors.append(float((d2.argmin(axis=1) != run.answer).mean()))
    return errors


def evaluate(ckpt, device="auto", data="data/omniglot", mirror=None, progress=True):
    """The benchmark for a checkpoint: {"checkpoint", "epoch", "backbone", "benchmark", "runs":
    [{"run", "error", "seen_in_training"}], "mean_error", "mean_error_unseen", "published"}.
    ``seen_in_training`` marks the runs whose characters the checkpoint trained on (the Vinyals
    split's training classes; never for --train-split background)."""
    meta, state, _ = checkpoint.load(ckpt)     # refused before any download if it is not a checkpoint
    size = checkpoint.image_size(meta)
    runs = read_runs(fetch(data, mirror, progress), size)
    if len(runs) != RUNS:
        raise DataError(f"{FILE} holds {len(runs)} runs, expected {RUNS}")
    net = checkpoint.backbone(ckpt, meta, state, selfcheck.get_xp(device))
    errors = run_errors(net, runs)
    seen = training_split(ckpt, meta) != "background"
    rows = [{"run": r.name, "error": e, "seen_in_training": seen and int(r.name[3:]) in SEEN_BY_VINYALS_TRAIN}
            for r, e in zip(runs, errors)]
    unseen = [r["error"] for r in rows if not r["seen_in_training"]]
    out = {"checkpoint": str(ckpt), "epoch": meta.get("epoch"), "backbone": meta["backbone"],
           "benchmark": "Lake et al. 2015, 20 runs of 20-way within-alphabet one-shot classification",
           "runs": rows, "mean_error": float(np.mean(errors)),
           "mean_error_unseen": float(np.mean(unseen)) if unseen else None,
           "published": {k: v / 100 for k, v in PUBLISHED.items()}}
    return {**out, "image_size": size} if size != 28 else out       # (the paper's size: as before)


def training_split(ckpt, meta):
    """The --train-split a checkpoint was trained with: from its meta, else from the config.json
    beside it (checkpoints written before the meta held it), else the default, 'train'."""
    if "train_split" in meta:
        return meta["train_split"]
    try:
        saved = json.loads(pathlib.Path(ckpt).with_name("config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return "train"
    return saved.get("train_split") or ("trainval" if saved.get("trainval") else "train")


def error_interval(mean_error, runs=RUNS, z=1.96):
    """The 95% interval (Wilson's score interval) of a mean error over ``runs`` runs of WAY test
    drawings each (400 trials for the benchmark's 20 runs): what the 20 runs can and cannot
    separate. Returns (low, high) as fractions."""
    n = runs * WAY
    p = mean_error
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_result(result):
    """The per-run errors and the mean, with the published figures beside them, as text lines."""
    lines = [f"{r['run']}: error {100 * r['error']:5.1f}%" + ("  (characters seen in training)"
                                                              if r["seen_in_training"] else "")
             for r in result["runs"]]
    low, high = error_interval(result["mean_error"], len(result["runs"]))
    lines.append(f"mean over the {len(result['runs'])} runs: error {100 * result['mean_error']:.2f}% "
                 f"(95% interval {100 * low:.1f}% to {100 * high:.1f}%, {len(result['runs']) * WAY} trials)")
    if result["mean_error_unseen"] is not None and len(result["runs"]) != sum(
            not r["seen_in_training"] for r in result["runs"]):
        n = sum(not r["seen_in_training"] for r in result["runs"])
        lines.append(f"mean over the {n} runs of unseen characters: error "
                     f"{100 * result['mean_error_unseen']:.2f}%")
    lines.append("published (Lake et al. 2015): " + ", ".join(f"{k} {v:.1f}%" for k, v in PUBLISHED.items()))
    return lines
