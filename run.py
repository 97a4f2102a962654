#!/usr/bin/env python
"""Train, evaluate and plot Prototypical Networks on Omniglot, measuring neural collapse.

  python run.py --backbone convnet --device cpu          train with the paper's protocol
  python run.py --resume runs/convnet-20261126-130000    continue an interrupted run
  python run.py --eval RUN/best.npz --standard           test: 5/20-way x 1/5-shot, 1000 episodes
  python run.py --eval RUN/best.npz --lake               Lake et al.'s one-shot benchmark, 20 runs
  python run.py --train-split background --within-alphabet    train for that benchmark
  python run.py --plot RUN                               redraw the figures of a run
  python run.py --plot-sweep RUN_W16 RUN_W32 ...         nc1, nc2 against model size
  python run.py --strip RUN/best.npz model.npz           the weights alone, to share a model
"""
import argparse
import dataclasses
import os
import pathlib
import signal
import sys

import scratchproto as sp
from scratchproto import files, lake, trainer
from scratchproto.backbones import BACKBONES
from scratchproto.omniglot import MIRROR_ENV

D = trainer.Config()


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("what to do (default: train a new run)")
    mode.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.npz")
    mode.add_argument("--eval", metavar="CKPT", help="evaluate a checkpoint (e.g. RUN_DIR/best.npz) on test episodes")
    mode.add_argument("--plot", metavar="RUN_DIR", help="redraw the figures of RUN_DIR from its trace.jsonl")
    mode.add_argument("--plot-sweep", metavar="RUN_DIR", nargs="+",
                      help="model-size sweep: final nc1 and nc2 of the runs against their parameter "
                           "count (nc_vs_parameters.png in their common folder) and a table of them")
    mode.add_argument("--plot-lake", metavar="JSON", nargs="+",
                      help="Lake's benchmark: the error per run of --lake evaluations (lake_errors.png in "
                           "their common folder) and a table of them beside the published errors")
    mode.add_argument("--plot-seeds", metavar="RUN_DIR", nargs="+",
                      help="one model trained with several seeds: nc_seeds_<first run>.png (each NC metric's "
                           "mean and range over the seeds, per epoch) in their common folder, and "
                           "a table of their test accuracies (eval.json) with mean ± sd over seeds")
    mode.add_argument("--strip", nargs=2, metavar=("CKPT", "DEST"),
                      help="write DEST, a copy of checkpoint CKPT without the optimiser's state (the "
                           "weights and BatchNorm buffers: a third of the size), to share or commit a "
                           "model; it evaluates like CKPT but cannot be resumed")
    mode.add_argument("--at-epoch", type=int, metavar="N",
                      help="with --plot-sweep: compare the runs at epoch N (for runs of unequal length)")

    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=BACKBONES, default=D.backbone, help="embedding network (default: %(default)s)")
    m.add_argument("--width", type=int, default=D.width, help="ConvNet channels per block (default: %(default)s)")
    m.add_argument("--image-size", type=int, default=D.image_size, metavar="PIXELS",
                   help="the side Omniglot's 105x105 drawings are resized to, a multiple of 4 from 16 "
                        "to 104 (default: %(default)s, the paper's; ConvNet only). Recorded in the "
                        "checkpoints, whose evaluations draw their images at the same size")
    m.add_argument("--device", choices=sp.backend.DEVICES, default=None,
                   help="cpu (NumPy), gpu (CuPy; falls back to the CPU with a warning) or auto (default: auto)")
    m.add_argument("--require-gpu", action="store_true",
                   help="with --device gpu: stop with an error where no GPU is usable, instead of "
                        f"falling back to the CPU (for batch jobs). Also ${sp.backend.REQUIRE_GPU_ENV}=1")
    m.add_argument("--tf32", action="store_true",
                   help=f"on a GPU, compute float32 matrix products on TF32 tensor cores (faster, 10-bit "
                        f"mantissas in the products; PyTorch's default for convolutions); off: plain FP32. "
                        f"Also ${sp.backend.TF32_ENV}=1"),

    t = p.add_argument_group("training protocol (defaults: the paper's, Section 4)")
    t.add_argument("--epochs", type=int, default=None, help=f"maximum number of epochs (default: {D.epochs})")
    t.add_argument("--patience", type=int, default=None,
                   help=f"stop after this many epochs without a better validation loss (default: {D.patience})")
    t.add_argument("--lr", type=float, default=D.lr, help="Adam learning rate (default: %(default)s)")
    t.add_argument("--lr-step", type=int, default=D.lr_step, help="halve the learning rate every this many epochs (default: %(default)s)")
    t.add_argument("--lr-gamma", type=float, default=D.lr_gamma, help="factor applied every lr-step epochs (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=D.weight_decay, help="L2 weight decay (default: %(default)s)")
    for part, what in (("train", "training"), ("val", "validation")):
        t.add_argument(f"--{part}-way", type=int, default=getattr(D, f"{part}_way"), help=f"classes per {what} episode (default: %(default)s)")
        t.add_argument(f"--{part}-shot", type=int, default=getattr(D, f"{part}_shot"), help=f"support images per class, {what} (default: %(default)s)")
        t.add_argument(f"--{part}-query", type=int, default=getattr(D, f"{part}_query"), help=f"query images per class, {what} (default: %(default)s)")
        t.add_argument(f"--{part}-episodes", type=int, default=getattr(D, f"{part}_episodes"), help=f"{what} episodes per epoch (default: %(default)s)")
    t.add_argument("--train-split", choices=trainer.TRAIN_SPLITS, default=D.train_split,
                   help="train: the Vinyals training classes, validation on its val classes; trainval: "
                        "train+val with no validation (see --trainval); background: the 964 characters "
                        "of images_background.zip only, as Lake et al.'s one-shot benchmark asks, with "
                        "three of its alphabets held back for validation (default: %(default)s)")
    t.add_argument("--trainval", action="store_true", help="the same as --train-split trainval: train on train+val "
                   "with no validation, as Snell et al. did for their reported numbers: take --epochs "
                   "from a run on train and evaluate last.npz (best.npz then follows the training loss)")
    t.add_argument("--no-rotations", dest="rotations", action="store_false",
                   help="with --train-split background: characters only at rot000, not the four "
                        "rotations as classes of the Vinyals protocol")
    t.add_argument("--within-alphabet", action="store_true",
                   help="draw every training episode's classes from one alphabet, as Lake et al.'s "
                        "benchmark tests (default: classes from any alphabet); with --train-split "
                        "background the validation episodes always are, and unrotated, as the benchmark")
    t.add_argument("--augment", action="store_true",
                   help="distort every training image by a random affine map (rotation up to 10 "
                        "degrees, shear up to 0.3, scale 0.8-1.2, shift up to half a pixel, each with "
                        "probability 1/2), as Koch et al. did on Lake's benchmark; validation and "
                        "test images are left as they are")
    t.add_argument("--seed", type=int, default=D.seed, help="seeds the weights and every episode (default: %(default)s)")
    t.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<backbone>-<timestamp>)")

    e = p.add_argument_group("evaluation (with --eval)")
    e.add_argument("--split", default="test", help="split to draw episodes from (default: %(default)s)")
    e.add_argument("--way", type=int, default=5, help="classes per episode (default: %(default)s)")
    e.add_argument("--shot", type=int, default=5, help="support images per class (default: %(default)s)")
    e.add_argument("--query", type=int, default=15, help="query images per class (default: %(default)s)")
    e.add_argument("--episodes", type=int, default=1000, help="episodes per setting (default: %(default)s)")
    e.add_argument("--standard", action="store_true", help="the four standard settings: 5/20-way x 1/5-shot")
    e.add_argument("--lake", action="store_true",
                   help="Lake et al.'s one-shot benchmark instead of episodes: the 20 runs of 20-way "
                        "within-alphabet one-shot classification, against people's 4.5%% error "
                        "(all_runs.zip, downloaded into --data like the Omniglot files, or from "
                        "--mirror: a folder or URL holding all_runs.zip, not the Omniglot mirror; "
                        "default output eval_lake.json)")
    e.add_argument("--eval-out", metavar="JSON", help="where to write the results (default: eval.json beside the "
                                                     "checkpoint, eval_lake.json with --lake)")

    d = p.add_argument_group("data")
    d.add_argument("--data", default=D.data, help="Omniglot folder; files missing there are downloaded (default: %(default)s)")
    d.add_argument("--mirror", default=None,
                   help=f"download from here instead of the canonical URLs: http(s)://, file:// or a folder "
                        f"(default: ${MIRROR_ENV}, else the canonical URLs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    return p


def given_flags(argv=None):
    """{dest: flag} of the flags that ``argv`` (default: sys.argv) sets, whatever their values."""
    p = parser()
    flags = {}
    for action in p._actions:
        action.default = argparse.SUPPRESS
        flags[action.dest] = max(action.option_strings, key=len, default=action.dest)
    return {dest: flags[dest] for dest in vars(p.parse_args(argv))}


# what --resume lets change: the trainer's RESUME_OVERRIDES (how long, on what, where the data
# are), and how the run is shown
RESUME_FLAGS = {"resume", *trainer.RESUME_OVERRIDES, "no_progress", "require_gpu"}


def main(argv=None):
    args = parser().parse_args(argv)
    progress = not args.no_progress
    if sum(x is not None for x in (args.resume, args.eval, args.plot, args.plot_sweep, args.plot_lake,
                                   args.plot_seeds, args.strip)) > 1:
        raise sp.UserError("choose one of --resume, --eval, --plot, --plot-sweep, --plot-lake, --plot-seeds and --strip")
    if args.at_epoch is not None and not args.plot_sweep:
        raise sp.UserError("--at-epoch N goes with --plot-sweep")
    # every number, before any work (a mistyped flag costs no download and no epoch)
    trainer.check_numbers(vars(args))
    if args.tf32:
        os.environ[sp.backend.TF32_ENV] = "1"     # every mode below picks its device through get_xp
    if args.require_gpu:
        if args.device not in (None, "gpu"):
            raise sp.UserError(f"--require-gpu goes with --device gpu, not --device {args.device}")
        args.device = "gpu"
        os.environ[sp.backend.REQUIRE_GPU_ENV] = "1"
        sp.backend.get_xp("gpu")                  # now, before any download or data loading
    if args.plot_sweep:
        path, rows = sp.plots.plot_sweep(args.plot_sweep, epoch=args.at_epoch)
        print(sp.plots.format_sweep(rows))
        print(f"wrote {path}")
        return 0
    if args.plot_seeds:
        print(sp.plots.seed_table(args.plot_seeds))
        print(f"wrote {sp.plots.plot_seeds(args.plot_seeds)}")
        return 0
    if args.plot_lake:
        print(sp.plots.lake_table(args.plot_lake))
        print(f"wrote {sp.plots.plot_lake(args.plot_lake)}")
        return 0
    if args.strip:
        src, dst = map(pathlib.Path, args.strip)
        if dst.resolve() == src.resolve():
            raise sp.UserError("--strip CKPT DEST: DEST must be another file than CKPT")
        size = sp.checkpoint.strip(src, dst)
        print(f"wrote {dst} ({size / 2 ** 20:.1f} MiB, without the optimiser's state: evaluate it with --eval)")
        return 0
    if args.plot:
        for path in trainer.draw_figures(args.plot):
            print(f"wrote {path}")
        try:
            path = trainer.episode_geometry(args.plot, progress=progress)
        except (sp.DataError, files.FileError) as e:    # the other figures stand without it
            print(f"episode_geometry.png not drawn: {e}")
        else:
            if path is not None:
                print(f"wrote {path}")
        return 0
    if args.lake and (not args.eval or args.standard):
        raise sp.UserError("--lake goes with --eval CKPT, and in place of --standard")
    if args.eval:
        settings = trainer.STANDARD if args.standard else [(args.way, args.shot)]
        default = "eval_lake.json" if args.lake else "eval.json"
        dest = pathlib.Path(args.eval_out or pathlib.Path(args.eval).with_name(default))
        files.check_writable(dest, "evaluation", "choose where to write it with --eval-out")  # now, not after it
        if args.lake:
            out = lake.evaluate(args.eval, device=args.device or D.device, data=args.data,
                                mirror=args.mirror, progress=progress)
            print("\n".join(lake.format_result(out)))
            trainer.save_evaluation(out, dest)
            return 0
        out = trainer.evaluate(args.eval, settings, split=args.split, query=args.query, n=args.episodes,
                               device=args.device or D.device, data=args.data, mirror=args.mirror,
                               progress=progress)
        for r in out["results"]:
            print(f"{out['split']} {r['way']}-way {r['shot']}-shot {r['query']}-query, {r['episodes']} episodes: "
                  f"acc {100 * r['acc']:.2f}% +- {100 * r['acc_ci95']:.2f}% (95% CI)  loss {r['loss']:.4f}  "
                  f"nc1 {sp.plots.fmt(r['nc1_support'])}/{sp.plots.fmt(r['nc1_query'])}  "
                  f"nc2 {r['nc2_support']:.3f}/{r['nc2_query']:.3f}"
                  f"  (support/query)")
        trainer.save_evaluation(out, dest)
        return 0
    if args.resume:
        given = given_flags(argv)
        changed = sorted(flag for dest, flag in given.items() if dest not in RESUME_FLAGS)
        if changed:
            names = ", ".join(changed)
            allowed = ", ".join("--" + name for name in trainer.RESUME_OVERRIDES)
            raise sp.UserError(f"a resumed run keeps its settings (its config.json): {names} cannot "
                               f"change on --resume; only {allowed} can")
        given |= {"device": "--device"} if args.require_gpu else {}
        overrides = {k: getattr(args, k) for k in trainer.RESUME_OVERRIDES if k in given}
        trainer.train(resume=args.resume, overrides=overrides, progress=progress)
        return 0
    if args.trainval:
        if args.train_split not in ("train", "trainval"):
            raise sp.UserError(f"--trainval and --train-split {args.train_split} contradict each other")
        args.train_split = "trainval"
    fields = {f.name for f in dataclasses.fields(trainer.Config)}
    cfg = trainer.Config(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    trainer.train(cfg, out=args.out, progress=progress)
    return 0


def _interrupt(signum, frame):
    # SIGTERM (kill, a batch scheduler) ends a run as Ctrl-C does. Only the first: `timeout` and `pkill -f`
    # often deliver two, and a second KeyboardInterrupt during the shutdown prints a traceback at exit.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def cli(argv=None):
    """main() as a command: a user's error is one line on stderr and exit status 2."""
    for stream in (sys.stdout, sys.stderr):     # a path that is not UTF-8 prints escaped, never crashes
        stream.reconfigure(errors="backslashreplace")
    try:
        return main(argv)
    except sp.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # a file-system fault on a path the code does not word itself: still one line, naming it
        print(f"error: {files.fs_error(e, e.filename or 'a file', 'use')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(cli())
