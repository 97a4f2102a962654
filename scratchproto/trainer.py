"""Episodic training and evaluation with the paper's protocol (Section 4), and the run folder.

An epoch is ``train_episodes`` training episodes (BatchNorm in training mode, one Adam step
each) then ``val_episodes`` validation episodes (BatchNorm in evaluation mode, no gradient).
The learning rate is halved every ``lr_step`` epochs; the best model by validation loss is kept;
training stops after ``patience`` epochs without improvement or at ``epochs``.

Episodes are seeded by (seed, epoch, 0 for train / 1 for val), so a resumed run sees exactly the
episodes an uninterrupted one would, and (on the CPU) writes the same trace.

RUN_DIR holds config.json, trace.jsonl (one JSON line per epoch), best.npz, last.npz and the
figures.
"""
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import time

import numpy as np

from . import backend, checkpoint, fast, files, plots, selfcheck
from .backbones import build_backbone
from .collapse import METRICS
from .episodes import check_episode, episodes
from .errors import UserError
from .omniglot import Omniglot, check_size as check_image_size
from .optim import Adam, step_lr
from .protonet import ProtoNet


@dataclasses.dataclass
class Config:
    """Every setting of a training run; the defaults are the paper's protocol."""
    backbone: str = "convnet"
    width: int = 64
    device: str = "auto"
    epochs: int = 10000
    patience: int = 200
    lr: float = 1e-3
    lr_step: int = 20
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    train_way: int = 60
    train_shot: int = 5
    train_query: int = 5
    train_episodes: int = 100
    val_way: int = 5
    val_shot: int = 5
    val_query: int = 15
    val_episodes: int = 100
    seed: int = 1234
    tf32: bool = False                  # on a GPU: TF32 tensor cores for float32 products
    train_split: str = "train"          # 'train', 'trainval' (no validation) or 'background'
    rotations: bool = True              # rotated characters as classes (background only)
    within_alphabet: bool = False       # every training episode's classes from one alphabet
    augment: bool = False               # training images distorted by random affine maps
    image_size: int = 28                # the side the 105x105 drawings are resized to (the paper's: 28)
    data: str = "data/omniglot"
    mirror: str = None

    @classmethod
    def from_saved(cls, saved):
        """The Config of a run's config.json, also of runs written before train_split existed."""
        saved = dict(saved)
        if "trainval" in saved:
            saved["train_split"] = "trainval" if saved.pop("trainval") else "train"
        return cls(**saved)

    @property
    def splits(self):
        """(split of the training episodes, split of the validation episodes or None)."""
        return {"train": ("train", "val"), "trainval": ("trainval", None),
                "background": ("background-train", "background-val")}[self.train_split]


TRAIN_SPLITS = ("train", "trainval", "background")


class Diverged(UserError):
    """The loss stopped being a finite number."""


def metric_keys():
    return ["loss", "acc"] + [f"{m}_{p}" for m in METRICS for p in ("support", "query")]


def mean_or_none(values):
    """The mean of ``values``; None where a metric is undefined (None) for the episodes, as nc1
    of a 1-shot support set."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def finished_episodes(model, eps, train, opt=None, where=""):
    """Run the episodes ``eps`` (pairs xs, xq), each followed by ``opt.step()`` when ``train``;
    yields (i, result of episode i) for i = 1, 2, ...

    Each is yielded one episode late: episode i's numbers are read after episode i+1 has been
    given to the device (ProtoNet.start_episode), so a GPU always has work queued while Python
    reads them, samples the next images and copies them over. The results are the same as without
    the lag; a non-finite loss raises Diverged naming its episode, one episode's work later.
    """
    late = None
    for i, (xs, xq) in enumerate(eps, start=1):
        finish = model.start_episode(xs, xq, train=train)
        if train:
            opt.step()
        if late is not None:
            yield _checked(*late, where)
        late = i, finish
    if late is not None:
        yield _checked(*late, where)


def _checked(i, finish, where):
    res = finish()
    if not math.isfinite(res["loss"]):
        raise Diverged(f"the loss became {res['loss']} in {where}, episode {i}")
    return i, res


def run_episodes(model, eps, n, train, opt=None, desc="", progress=True, where=""):
    """Run ``n`` episodes; returns the mean of loss, acc and every metric over them."""
    from tqdm import tqdm
    values = {k: [] for k in metric_keys()}
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    with bar, fast.blas_one_thread(model.net.xp):
        for i, res in finished_episodes(model, eps, train, opt, where):
            for k in values:
                values[k].append(res[k])
            bar.set_postfix(loss=f"{sum(values['loss']) / i:.3f}", acc=f"{sum(values['acc']) / i:.3f}",
                            refresh=False)
            bar.update()
    return {k: mean_or_none(v) for k, v in values.items()}


def _versions(xp):
    out = {"python": platform.python_version(), "numpy": np.__version__}
    if xp is not np:
        out["cupy"] = xp.__version__
    return out


# The numeric settings and what each must be; checked before any work starts (check_numbers),
# so a mistyped flag costs no download and no epoch. Named as run.py's flags name them.
POSITIVE_INTS = ("width", "epochs", "patience", "lr_step", "train_way", "train_shot", "train_query",
                 "train_episodes", "val_way", "val_shot", "val_query", "val_episodes",
                 "way", "shot", "query", "episodes", "at_epoch")


def check_numbers(values):
    """Raise UserError, naming the flag, for the first impossible number in ``values`` (a dict of
    Config fields and run.py's evaluation flags; absent or None entries are skipped)."""
    def flag(name):
        return "--" + name.replace("_", "-")
    for name in POSITIVE_INTS:
        v = values.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1):
            raise UserError(f"{flag(name)} must be a positive integer, got {v}")
    seed = values.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    for name, low, high, rule in (("lr", 0, math.inf, "a finite number > 0"),
                                  ("lr_gamma", 0, 1, "a factor with 0 < lr-gamma <= 1"),
                                  ("weight_decay", None, math.inf, "a finite number >= 0")):
        v = values.get(name)
        if v is None:
            continue
        ok = isinstance(v, (int, float)) and math.isfinite(v) and v <= high and (v > low if low is not None else v >= 0)
        if not ok:
            raise UserError(f"{flag(name)} must be {rule}, got {v}")
    for part in ("train_", "val_", ""):
        shape = [values.get(part + k) for k in ("way", "shot", "query")]
        if None not in shape:
            check_episode(*shape, flags=flag(part))


def check_choices(cfg):
    """The settings that are not numbers: a training split that exists, rotations only where the
    classes are generated (the Vinyals split files fix theirs)."""
    if cfg.train_split not in TRAIN_SPLITS:
        raise UserError(f"--train-split must be one of {', '.join(TRAIN_SPLITS)}, got {cfg.train_split!r}")
    if not cfg.rotations and cfg.train_split != "background":
        raise UserError("--no-rotations goes with --train-split background (the Vinyals split "
                        "files list their rotated classes)")
    check_image_size(cfg.image_size)
    if cfg.image_size != 28 and cfg.backbone != "convnet":
        raise UserError(f"--image-size {cfg.image_size} goes with the ConvNet: ResNet-18's final "
                        f"4x4 pooling is laid out for 28x28 images")


def _episodes(ds, cfg, part, epoch, xp=np):
    """The training (part 'train') or validation ('val') episodes of an epoch, on ``xp``.

    Training episodes are within one alphabet with ``within_alphabet``, and use the rotated
    classes unless ``rotations`` is off. Validation episodes on the background split stand in for
    Lake's benchmark, so they are as it is: within one alphabet, characters unrotated (and runs
    trained either way are compared on the same validation)."""
    split = cfg.splits[0 if part == "train" else 1]
    way, shot, query, n = (getattr(cfg, f"{part}_{k}") for k in ("way", "shot", "query", "episodes"))
    lake_like = part == "val" and cfg.train_split == "background"
    within = cfg.within_alphabet if part == "train" else lake_like
    rotations = cfg.rotations and not lake_like
    return episodes(ds, split, way, shot, query, n, seed=[cfg.seed, epoch, 0 if part == "train" else 1],
                    device=xp, rotations=rotations, within_alphabet=within,
                    augment=cfg.augment and part == "train", flags=f"--{part}-")


def memory_estimate(cfg):
    """Bytes a training run needs at least, counted from its settings: the float32 parameters
    with their gradient and Adam's two moments, and the largest episode's first-layer activations
    (its images times the first block's channels at the image size, kept for the backward pass, twice).
    An underestimate: it stops only runs that cannot fit anywhere near."""
    w = cfg.width if cfg.backbone == "convnet" else 512
    params = 9 * w + 3 * 9 * w * w if cfg.backbone == "convnet" else 11_168_832
    images = max(cfg.train_way * (cfg.train_shot + cfg.train_query), cfg.val_way * (cfg.val_shot + cfg.val_query))
    first = w if cfg.backbone == "convnet" else 64
    return 4 * (4 * params + 2 * images * cfg.image_size ** 2 * first)


def check_size(cfg):
    """UserError, naming the flags, for a run whose memory_estimate exceeds this machine's memory."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = memory_estimate(cfg)
    if need > have:
        raise UserError(f"this run needs at least {need / 2 ** 30:.0f} GiB of memory (--width "
                        f"{cfg.width}, --train-way {cfg.train_way} x (--train-shot {cfg.train_shot} + "
                        f"--train-query {cfg.train_query}) images), more than this machine's "
                        f"{have / 2 ** 30:.0f} GiB; choose smaller values")


def _check_config(cfg, ds):
    check_numbers(dataclasses.asdict(cfg))
    check_choices(cfg)
    check_size(cfg)
    for part in ("train", "val") if cfg.splits[1] else ("train",):
        next(_episodes(ds, cfg, part, 0))      # the sampler checks the episode against the split


def _read_trace(path, upto, log):
    """The trace's records for epochs <= upto (later ones were written after the checkpoint)."""
    if not path.exists():
        return []
    records, dropped = files.read_jsonl(path, "trace", plots.is_epoch_record)
    if dropped:
        log(f"{path}: its last line was cut short (a crash while writing it); dropped for good "
            f"(last.npz holds the model; that epoch's numbers are lost)")
    return [r for r in records if r["epoch"] <= upto]


RESUME_OVERRIDES = ("epochs", "patience", "device", "data", "mirror")   # how long, and where: not what


def train(cfg=None, out=None, resume=None, overrides=None, progress=True, log=print):
    """Train a ProtoNet; returns the run folder.

    ``resume``: a run folder to continue from its last.npz, with its own config.json; of the
    settings only those in RESUME_OVERRIDES may be changed then, through ``overrides``.
    While it trains, the run folder is locked (files.FolderLock): a second run pointed at it
    refuses at once.
    """
    if resume is not None:
        run_dir = pathlib.Path(resume)
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a run folder to resume ("
                            f"{'it is a file' if run_dir.exists() else 'it does not exist'})")
        bad_keys = set(overrides or {}) - set(RESUME_OVERRIDES)
        if bad_keys:
            raise UserError(f"a resumed run keeps its settings; only {', '.join(RESUME_OVERRIDES)} "
                            f"may change (got {', '.join(sorted(bad_keys))})")
        check_numbers(overrides or {})
        with files.FolderLock(run_dir):      # first: a run still training there is the likelier story
            if not (run_dir / "config.json").exists() or not (run_dir / "last.npz").exists():
                raise UserError(f"{run_dir} is not a run folder to resume (no config.json and last.npz)")
            saved = files.read_json(run_dir / "config.json", "run settings")
            try:
                cfg = Config.from_saved({**saved["config"], **(overrides or {})})
            except (KeyError, TypeError):
                raise UserError(f"{run_dir / 'config.json'} does not hold the settings of a run "
                                f"written by this version of run.py") from None
            return _train(cfg, run_dir, saved, progress, log)
    cfg = cfg or Config()
    check_numbers(dataclasses.asdict(cfg))
    check_choices(cfg)
    check_size(cfg)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = pathlib.Path(out or f"runs/{cfg.backbone}-{stamp}")
    created = not run_dir.exists()
    files.ensure_folder(run_dir, "run folder")
    try:
        with files.FolderLock(run_dir):
            if (run_dir / "config.json").exists() or (run_dir / "trace.jsonl").exists():
                raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                                f"or choose another --out")
            return _train(cfg, run_dir, None, progress, log)
    except BaseException:
        if created and not any(run_dir.iterdir()):   # a start that failed leaves no empty folder
            run_dir.rmdir()
        raise


def _train(cfg, run_dir, saved, progress, log):
    """The training loop of ``train``, in a locked run folder; ``saved``: the config.json of the
    run it resumes, None for a new run."""
    ds = Omniglot(cfg.data, cfg.mirror, progress=progress, size=cfg.image_size)
    _check_config(cfg, ds)
    xp = selfcheck.get_xp(cfg.device, cfg.tf32 or None)
    net = build_backbone(cfg.backbone, seed=cfg.seed, width=cfg.width, xp=xp)
    opt = Adam(net, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model = ProtoNet(net)
    epoch, best, bad = 0, math.inf, 0
    trace_path = run_dir / "trace.jsonl"
    if saved is not None:
        try:
            meta, state, adam = checkpoint.load(run_dir / "last.npz")
        except files.FileError:
            raise
        except UserError as e:
            raise UserError(f"{e}. To continue from the best epoch instead, copy best.npz over "
                            f"last.npz and resume again") from None
        if adam is None:
            raise UserError(f"{run_dir / 'last.npz'} holds no optimiser state (a copy written by "
                            f"--strip): it can be evaluated, not resumed")
        ours = {"backbone": cfg.backbone, "width": cfg.width}
        if checkpoint.describe(meta) != checkpoint.describe(ours):
            raise UserError(f"{run_dir / 'last.npz'} holds a {checkpoint.describe(meta)}, but the run's "
                            f"config.json trains a {checkpoint.describe(ours)}: it is not this run's checkpoint")
        if not all(isinstance(meta.get(k), (int, float)) for k in ("best_loss", "bad_epochs")):
            raise UserError(f"{run_dir / 'last.npz'} is damaged: its metadata lacks where the run stood "
                            f"(best_loss, bad_epochs); it cannot be resumed")
        try:
            net.load_state_dict(state)
            opt.load_state_dict(adam)
        except ValueError as e:
            raise UserError(f"{run_dir / 'last.npz'} is damaged: its arrays do not fit the run's "
                            f"{checkpoint.describe(ours)} ({e})") from None
        epoch, best, bad = meta["epoch"], meta["best_loss"], meta["bad_epochs"]
        # the trace may run ahead of last.npz (a crash between the two writes): cut it back
        kept = "".join(json.dumps(r) + "\n" for r in _read_trace(trace_path, epoch, log))
        if not trace_path.exists() or kept != files.read_text(trace_path, "trace"):
            files.atomic_write(trace_path, kept, "fix that, then resume again")
        log(f"resuming {run_dir} after epoch {epoch}")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    where = backend.describe(xp, cfg.device)
    run = {"config": dataclasses.asdict(cfg), "device": backend.device_name(xp), "ran_on": where,
           "gpu": backend.gpu_model(xp), "threads": fast.THREADS if xp is np else None,
           "versions": _versions(xp), "parameters": net.num_parameters(),
           "started": now}
    if saved is not None:       # the first start stays; each resume adds when, where and after which epoch
        run["started"] = saved.get("started", now)
        run["resumed"] = saved.get("resumed", []) + [
            {"at": now, "after_epoch": epoch, "device": run["device"], "ran_on": where,
             "versions": run["versions"]}]
    files.atomic_write(run_dir / "config.json", json.dumps(run, indent=2) + "\n")

    validate = cfg.splits[1] is not None
    threads = f", {fast.THREADS} thread{'s' if fast.THREADS > 1 else ''}" if xp is np else ""
    log(f"{cfg.backbone} ({net.num_parameters():,} parameters) on {where}{threads}; run folder {run_dir}")
    seconds = []                         # this process's epochs, for the time left
    figures = FiguresDuringTraining(run_dir, log)
    try:
        while epoch < cfg.epochs and bad < cfg.patience:
            e = epoch + 1
            opt.lr = step_lr(cfg.lr, e, cfg.lr_step, cfg.lr_gamma)
            t0 = time.perf_counter()
            record = {"epoch": e, "lr": opt.lr}
            record["train"] = run_episodes(
                model, _episodes(ds, cfg, "train", e, xp), cfg.train_episodes, True, opt,
                desc=f"epoch {e} train", progress=progress, where=f"epoch {e} (training)")
            if validate:
                record["val"] = run_episodes(
                    model, _episodes(ds, cfg, "val", e, xp), cfg.val_episodes, False,
                    desc=f"epoch {e} val", progress=progress, where=f"epoch {e} (validation)")
            record["seconds"] = time.perf_counter() - t0
            # if a write fails, what was saved before stays intact and the run continues from it
            hint = (f"fix that, then continue with: python run.py --resume {run_dir} (last.npz "
                    f"holds epoch {epoch})" if epoch else "fix that and start the run again")
            watched = record["val" if validate else "train"]["loss"]
            improved = watched < best
            best, bad = (watched, 0) if improved else (best, bad + 1)
            seconds.append(record["seconds"])
            record["progress"] = run_progress(cfg, e, best, bad, seconds)
            files.append_line(trace_path, json.dumps(record), hint)
            if improved:
                checkpoint.save(run_dir / "best.npz", net, opt, hint, epoch=e, best_loss=best,
                                bad_epochs=0, seed=cfg.seed, train_split=cfg.train_split,
                                image_size=cfg.image_size)
            checkpoint.save(run_dir / "last.npz", net, opt, hint, epoch=e, best_loss=best,
                            bad_epochs=bad, seed=cfg.seed, train_split=cfg.train_split,
                            image_size=cfg.image_size)
            epoch = e
            log(summary(record, validate) + (" *" if improved else ""))
            figures.after_epoch(e, record["seconds"])
    except KeyboardInterrupt:
        log(f"\ninterrupted in epoch {epoch + 1}; {run_dir / 'last.npz'} holds epoch {epoch}. "
            f"Continue with: python run.py --resume {run_dir}")
        raise
    except Diverged as e:
        raise Diverged(f"{e}; stopped. The last good checkpoint is {run_dir / 'last.npz'} "
                       f"(epoch {epoch})") from None
    reason = "patience exhausted" if bad >= cfg.patience else "epoch limit reached"
    log(f"done after epoch {epoch} ({reason}); best {'val' if validate else 'train'} "
        f"loss {best:.4f}")
    draw_figures(run_dir)
    return run_dir


def episode_geometry(run_dir, way=5, shot=5, query=15, seed=0, progress=False):
    """episode_geometry.png in ``run_dir``: the features of one fixed episode (of the run's
    validation split, else test) under the untrained model (the run's seed), its best.npz and its
    last.npz, each projected on the plane of its class means (plots.plot_geometry). Returns its
    path, or None where the run folder holds neither checkpoint."""
    run_dir = pathlib.Path(run_dir)
    ckpts = [run_dir / name for name in ("best.npz", "last.npz") if (run_dir / name).exists()]
    if not ckpts:
        return None
    cfg = Config.from_saved(files.read_json(run_dir / "config.json", "run settings")["config"])
    panels = [("untrained", build_backbone(cfg.backbone, seed=cfg.seed, width=cfg.width, xp=np))]
    for path in ckpts:
        meta, net = checkpoint.load_backbone(path, np)
        panels.append((f"{path.name} (epoch {meta['epoch']})", net))
    ds = Omniglot(cfg.data, cfg.mirror, progress=progress, size=cfg.image_size)
    split = cfg.splits[1] or "test"
    rotations = cfg.rotations if split.startswith("background") else True
    xs, xq = next(episodes(ds, split, way, shot, query, 1, seed=[seed, 1], device=np, rotations=rotations))
    x = np.concatenate([xs.reshape(way * shot, *xs.shape[2:]), xq.reshape(way * query, *xq.shape[2:])])
    features = [(name, net.forward(x, train=False)) for name, net in panels]
    return plots.plot_geometry(run_dir, features, way, shot, query, f"one {way}-way {shot}-shot {split} episode")


SIGNIFICANT = 10   # digits of a float in an evaluation's JSON (below: why not all 17)


def evaluation_json(out, dest):
    """The text of evaluation ``out`` (evaluate's or lake.evaluate's) to be written at ``dest``.

    So that re-running an evaluation writes the same bytes, wherever it is run from and on any
    machine: the checkpoint is named relative to the file's folder (beside it: just its name),
    and every float is rounded to 10 significant digits. Accuracies and losses come out the same
    to the last bit on every re-run; the NC metrics' last one or two bits depend on how their
    sums are ordered, which changes with the code, not with the model."""
    def rounded(x):
        if isinstance(x, float):
            return float(f"{x:.{SIGNIFICANT}g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rounded(v) for v in x]
        return x
    ckpt = pathlib.Path(out["checkpoint"]).resolve()
    where = pathlib.Path(os.path.relpath(ckpt, pathlib.Path(dest).resolve().parent)).as_posix()
    return json.dumps(rounded({**out, "checkpoint": where}), indent=2) + "\n"


def save_evaluation(out, dest, log=print):
    """Write evaluation ``out`` to ``dest`` (evaluation_json); say so, and say when it replaced a
    file that held other numbers (re-running a committed evaluation is a check: 'unchanged')."""
    dest = pathlib.Path(dest)
    text = evaluation_json(out, dest)
    before = dest.read_text() if dest.is_file() else None
    files.atomic_write(dest, text)
    if before is None:
        log(f"wrote {dest}")
    elif before == text:
        log(f"wrote {dest} (unchanged: the same numbers as the file it replaced)")
    else:
        log(f"wrote {dest}, replacing a file that held other numbers (git diff shows them, if it is tracked)")


def run_progress(cfg, epoch, best, bad, seconds):
    """Where a run stands after ``epoch``: the best watched loss and its epoch, the patience left,
    and the most epochs (and seconds, at this process's median epoch) before the run must end,
    by the epoch limit or the patience rule, whichever comes first."""
    left = min(cfg.epochs - epoch, cfg.patience - bad)
    return {"of_epochs": cfg.epochs, "best_loss": best, "best_epoch": epoch - bad,
            "patience_left": cfg.patience - bad, "epochs_left_at_most": left,
            "seconds_left_at_most": left * statistics.median(seconds)}


def _duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def summary(record, validate=True):
    """One line per epoch, e.g. 'epoch 3/150 lr 1e-03 | train loss 0.512 acc 0.861 nc1 ... |
    best val 0.0968 (epoch 3), patience 200 left, at most 147 epochs (2.1 h) to go'."""
    progress = record.get("progress")
    of = f"/{progress['of_epochs']}" if progress else ""
    parts = [f"epoch {record['epoch']:>4}{of} lr {record['lr']:.0e} {record['seconds']:5.1f}s"]
    for part in ("train", "val"):
        if part in record:
            r = record[part]
            parts.append(f"{part} loss {r['loss']:.4f} acc {r['acc']:.4f} "
                         f"nc1 {plots.fmt(r['nc1_support'])}/{plots.fmt(r['nc1_query'])} "
                         f"nc2 {r['nc2_support']:.3f}/{r['nc2_query']:.3f}")
    if progress:
        parts.append(f"best {'val' if validate else 'train'} {progress['best_loss']:.4f} (epoch "
                     f"{progress['best_epoch']}), patience {progress['patience_left']} left, at most "
                     f"{progress['epochs_left_at_most']} epochs ({_duration(progress['seconds_left_at_most'])}) to go")
    return " | ".join(parts)


# The paper's figures that a run's figures correspond to, by backbone: (curves.png, nc_train.png,
# nc_val.png) are the ConvNet's Figures 1, 2 and 5 and ResNet-18's Figures 3, 4 and 6.
PAPER_FIGURES = {"convnet": (1, 2, 5), "resnet18": (3, 4, 6)}
# settings that a run may change and still follow the paper's protocol: its length and its machine
LENGTH_AND_MACHINE = {"backbone", "epochs", "patience", "device", "seed", "tf32", "data", "mirror"}


def paper_figures(cfg):
    """{figure name: the paper's figure it corresponds to, as a label} for a run's Config: "the
    paper's Figure 1" where every setting but the length and the machine is the paper's
    protocol, "compare the paper's Figure 1" otherwise (another split, shot, width, ...)."""
    numbers = PAPER_FIGURES.get(cfg.backbone)
    if numbers is None:
        return {}
    protocol = all(getattr(cfg, f.name) == f.default for f in dataclasses.fields(Config)
                   if f.name not in LENGTH_AND_MACHINE)
    word = "the paper's" if protocol else "compare the paper's"
    return {name: f"{word} Figure {n}" for name, n in zip(("curves", "nc_train", "nc_val"), numbers)}


def draw_figures(run_dir):
    """plots.plot_run with each figure's counterpart in the paper, from the run's config.json
    (none where it is missing or unreadable: the figures stand without)."""
    try:
        cfg = Config.from_saved(files.read_json(pathlib.Path(run_dir) / "config.json", "run config")["config"])
    except (files.FileError, UserError, KeyError, TypeError):
        cfg = None
    return plots.plot_run(run_dir, paper=paper_figures(cfg) if cfg is not None else None)


class FiguresDuringTraining:
    """Redraws a run's figures while it trains, so that its folder always shows where it stands:
    after the first epoch, then whenever the epochs since the last drawing took at least 20 times
    as long as drawing did (so drawing costs at most 5% of the training time). A drawing that
    fails warns once and training goes on: the figures are redrawn at the end, or with --plot."""

    def __init__(self, run_dir, log, draw=None, clock=time.perf_counter):
        self.run_dir, self.log, self.clock = run_dir, log, clock
        self.draw = draw or draw_figures
        self.cost, self.since, self.warned = 0.0, 0.0, False

    def after_epoch(self, epoch, seconds):
        self.since += seconds
        if epoch > 1 and self.since < 20 * self.cost:
            return
        t = self.clock()
        try:
            self.draw(self.run_dir)
        except Exception as e:       # a figure is never worth a training run
            if not self.warned:
                self.log(f"warning: the figures could not be redrawn during training ({type(e).__name__}: {e}); "
                         f"they are drawn at the end, or with --plot")
                self.warned = True
        self.cost, self.since = self.clock() - t, 0.0


STANDARD = [(5, 1), (5, 5), (20, 1), (20, 5)]


def evaluate(ckpt, settings, split="test", query=15, n=1000, seed=0, device="auto", data="data/omniglot",
             mirror=None, progress=True):
    """Test a checkpoint on ``n`` episodes per (way, shot) in ``settings``, BatchNorm in eval mode.

    Returns {"checkpoint", "split", "results": [{way, shot, query, episodes, acc, acc_ci95, loss,
    <metric>_support, <metric>_query ...}]}; acc_ci95 is 1.96 * std / sqrt(n) over episodes.
    """
    meta, state, _ = checkpoint.load(ckpt)     # a bad checkpoint is refused before the data are loaded
    size = checkpoint.image_size(meta)
    ds = Omniglot(data, mirror, progress=progress, size=size)     # the images at the size it trained on
    for way, shot in settings:
        check_episode(way, shot, query, len(ds.classes(split)), split)
    if int(n) != n or n < 1:
        raise UserError(f"the number of episodes must be a positive integer, got {n}")
    xp = selfcheck.get_xp(device)
    net = checkpoint.backbone(ckpt, meta, state, xp)
    model = ProtoNet(net)
    from tqdm import tqdm
    results = []
    with fast.blas_one_thread(xp):
        for way, shot in settings:
            values = {k: [] for k in metric_keys()}
            name = f"{way}-way {shot}-shot"
            eps = episodes(ds, split, way, shot, query, n, seed=[seed, way, shot], device=xp)
            for _, res in tqdm(finished_episodes(model, eps, train=False, where=f"the evaluation ({name})"),
                               total=n, desc=name, disable=not progress, leave=False):
                for k in values:
                    values[k].append(res[k])
            mean = {k: mean_or_none(v) for k, v in values.items()}
            acc_sd = np.std(values["acc"], ddof=1) if n > 1 else 0.0
            results.append({"way": way, "shot": shot, "query": query, "episodes": n,
                            "acc": mean.pop("acc"), "acc_ci95": 1.96 * acc_sd / math.sqrt(n), **mean})
    out = {"checkpoint": str(ckpt), "epoch": meta.get("epoch"), "backbone": meta["backbone"],
           "split": split, "results": results}
    return {**out, "image_size": size} if size != 28 else out       # (the paper's size: as before)
