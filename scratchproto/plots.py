"""The paper's figures from a run's trace.jsonl (matplotlib, PNG).

* curves.png   Figures 1/3: training and validation error (1 - acc) and loss against epoch
* nc_train.png Figures 2/4: nc1 and nc2 on training episodes, support and query
* nc_val.png   Figures 5/6: the same on validation episodes
nc2 panels also show nc2_unit (dashed), the variant the authors' released code computed.

and, across runs (a model-size sweep):

* nc_vs_parameters.png  final nc1, nc2 and cdnv (support and query, training and validation)
  against the number of parameters, on a log axis: the paper's conclusion asks whether collapse
  follows model size
"""
import os
import pathlib
import sys

import numpy as np

from . import files
from .errors import UserError


def _save(fig, path):
    """Write a figure as PNG atomically (a failed write keeps the old figure), then close it."""
    import matplotlib.pyplot as plt
    try:
        files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def is_epoch_record(r):
    """Whether ``r`` (a parsed line of trace.jsonl) is an epoch's record: a positive whole epoch
    and the training episodes' numbers."""
    return (isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] >= 1
            and isinstance(r.get("train"), dict) and "loss" in r["train"])


def read_trace(run_dir):
    """The records of RUN_DIR/trace.jsonl; a last line cut by a crash is left out, with a warning."""
    path = pathlib.Path(run_dir) / "trace.jsonl"
    if not path.exists():
        raise UserError(f"no trace at {path}: is {run_dir} a run folder?")
    records, dropped = files.read_jsonl(path, "trace", is_epoch_record)
    if dropped:
        print(f"warning: the last line of {path} was cut short (a crash while writing it); "
              f"left out", file=sys.stderr)
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return records


def shown(name):
    """A file or folder name as text a figure can draw: a name that is not valid UTF-8 (which
    Linux allows; Python holds its bytes as surrogates) gets a replacement character."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def fmt(value, spec=".3g"):
    """A metric for a line of text: 'n/a' where it is undefined (None: nc1 of a 1-shot support set)."""
    return "n/a" if value is None else format(value, spec)


def _parts(record):
    """The episode kinds a trace record holds: train, and val unless the run had none."""
    return [p for p in ("train", "val") if p in record]


def _log_if_wide(ax, values):
    pos = [v for v in values if v is not None and v > 0]
    if pos and max(pos) / min(pos) > 30:
        ax.set_yscale("log")


def _whole_epochs(ax):
    """Epoch ticks at whole numbers (a short run would otherwise get 1.0, 1.5, 2.0, ...)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(run_dir, title=None, paper=None):
    """Write curves.png, nc_train.png and (with validation) nc_val.png into ``run_dir``.
    ``paper``: {"curves": label, "nc_train": ..., "nc_val": ...}, the paper's figure each one
    corresponds to, added to its title (trainer.paper_figures)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = pathlib.Path(run_dir)
    records = read_trace(run_dir)
    epochs = [r["epoch"] for r in records]
    parts = _parts(records[0])
    title = shown(title or run_dir.name)
    paper = paper or {}
    written = []

    def suptitle(fig, text, name):
        fig.suptitle(text + (f" ({paper[name]})" if name in paper else ""))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for part in parts:
        err = [1 - r[part]["acc"] for r in records]
        loss = [r[part]["loss"] for r in records]
        axes[0].plot(epochs, err, label=part)
        axes[1].plot(epochs, loss, label=part)
    for ax, name in zip(axes, ("error (1 - accuracy)", "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        _whole_epochs(ax)
    axes[0].set_title("error")
    axes[1].set_title("loss")
    suptitle(fig, f"{title}: error and loss", "curves")
    fig.tight_layout()
    _save(fig, run_dir / "curves.png")
    written.append(run_dir / "curves.png")

    for part in parts:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        nc1_title = "NC1: within-class variability"
        for side, color in (("support", "tab:blue"), ("query", "tab:orange")):
            nc1 = [r[part][f"nc1_{side}"] for r in records]
            if all(v is None for v in nc1):      # one sample per class: nothing to measure
                axes[0].plot([], [], color=color, label=f"{side}: undefined at 1 shot")
                nc1_title = (f"NC1: within-class variability\n({side}: one image per class, so "
                             f"none to measure; 0 by construction, not shown)")
            else:
                axes[0].plot(epochs, nc1, color=color, label=side)
            axes[1].plot(epochs, [r[part][f"nc2_{side}"] for r in records], color=color,
                         label=f"NC2, {side}")
            axes[1].plot(epochs, [r[part][f"nc2_unit_{side}"] for r in records], color=color,
                         linestyle="--", label=f"NC2 of features scaled to unit norm, {side}")
        _log_if_wide(axes[0], [r[part][f"nc1_{s}"] for r in records for s in ("support", "query")])
        size = 10 if "\n" in nc1_title else None         # the two panels' titles alike
        axes[0].set_title(nc1_title, fontsize=size)
        axes[1].set_title("NC2: distance of class means from a simplex ETF", fontsize=size)
        for ax, name in zip(axes, ("NC1", "NC2")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            _whole_epochs(ax)
        word = "training" if part == "train" else "validation"
        suptitle(fig, f"{title}: neural collapse on {word} episodes", f"nc_{part}")
        fig.tight_layout()
        out = run_dir / f"nc_{part}.png"
        _save(fig, out)
        written.append(out)
    return written


# nc1 and nc2 as the paper asks; cdnv beside them because it needs no pseudo-inverse of the
# between-class covariance, whose conditioning changes with the width (d against N - 1)
SWEEP_METRICS = ("nc1", "nc2", "cdnv")


def class_mean_plane(z, way, shot):
    """Coordinates (B, 2) of features z (B, d), support rows first (class-major), on the plane
    through the support's class means that spreads them most: the top two principal directions of
    the means (way, d), about their centre."""
    means = z[:way * shot].reshape(way, shot, -1).mean(axis=1)
    centre = means.mean(axis=0)
    _, _, vt = np.linalg.svd(means - centre, full_matrices=False)
    return (z - centre) @ vt[:2].T


def plot_geometry(run_dir, features, way, shot, query, episode):
    """episode_geometry.png: one panel per (name, features (way*(shot+query), d)) of the same
    episode, each on the plane of its own class means (class_mean_plane): support images as
    circles, query images as crosses, class means as stars, one colour per class. Neural collapse
    shows as tight, equally spaced clusters. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(features), figsize=(4.2 * len(features), 4.2), squeeze=False)
    for ax, (name, z) in zip(axes[0], features):
        xy = class_mean_plane(np.asarray(z, dtype=np.float64), way, shot)
        support, queries = xy[:way * shot].reshape(way, shot, 2), xy[way * shot:].reshape(way, query, 2)
        for k in range(way):
            color = f"C{k}"
            ax.scatter(*queries[k].T, marker="x", s=14, color=color, alpha=0.6)
            ax.scatter(*support[k].T, marker="o", s=22, color=color, edgecolors="none")
            ax.scatter(*support[k].mean(axis=0), marker="*", s=220, color=color, edgecolors="black", linewidths=0.8)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{shown(pathlib.Path(run_dir).name)}: {episode}, on the plane of its class means "
                 f"(o support, x query, * class mean)")
    fig.tight_layout()
    out = pathlib.Path(run_dir) / "episode_geometry.png"
    _save(fig, out)
    return out


def _sweep_row(run_dir, epoch=None):
    run_dir = pathlib.Path(run_dir)
    records = read_trace(run_dir)
    if epoch is not None:
        if records[-1]["epoch"] < epoch:
            raise UserError(f"{run_dir} has trained {records[-1]['epoch']} epochs, fewer than {epoch}")
        records = [r for r in records if r["epoch"] <= epoch]
    last = records[-1]
    path = run_dir / "config.json"
    if not path.exists():
        raise UserError(f"no config.json in {run_dir}: is it a run folder?")
    info = files.read_json(path, "run settings")
    cfg = info["config"]
    name = cfg["backbone"] + (f" width {cfg['width']}" if cfg["backbone"] == "convnet" else "")
    row = {"run": str(run_dir), "name": name, "parameters": info["parameters"],
           "epoch": last["epoch"], "last": last, "test": {},
           "minutes": sum(r.get("seconds", 0) for r in records) / 60}
    ev = run_dir / "eval.json"
    if ev.exists():
        evaluation = files.read_json(ev, "evaluation")
        for r in evaluation["results"]:
            row["test"][f"{r['way']}w{r['shot']}s"] = r["acc"]
        row["test_epoch"] = evaluation["epoch"]
    return row


def sweep_table(run_dirs, epoch=None):
    """One row per run, sorted by parameter count: its metrics at the end of its trace, or at
    ``epoch`` where given (runs that trained longer are cut there), and its test accuracies
    (from eval.json, where there is one; the row says of which epoch). All runs must be compared
    after the same number of epochs, or the comparison would measure training time, not size."""
    rows = sorted((_sweep_row(d, epoch) for d in run_dirs), key=lambda r: r["parameters"])
    if len({r["epoch"] for r in rows}) > 1:
        raise UserError("the runs end at different epochs (" + ", ".join(
            f"{r['run']}: {r['epoch']}" for r in rows) + "): a sweep compares equal training; "
            "compare them at the shortest one's last epoch with --at-epoch")
    return rows


def format_sweep(rows):
    """A Markdown table of sweep_table's rows."""
    parts = _parts(rows[0]["last"])
    settings = sorted({k for r in rows for k in r["test"]}, key=lambda k: (int(k.split("w")[0]), k))
    head = ["model", "parameters", "epochs", "minutes"] + [f"{p} loss" for p in parts] + [
        f"{m} {p} s/q" for p in parts for m in SWEEP_METRICS]
    if settings:   # eval.json is of best.npz, the epoch of the lowest validation loss
        head += ["tested epoch"] + [f"test {k}" for k in settings]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        last = r["last"]
        cells = [r["name"], f"{r['parameters']:,}", str(r["epoch"]), f"{r['minutes']:.0f}"]
        cells += [f"{last[p]['loss']:.4f}" for p in parts]
        cells += [f"{fmt(last[p][m + '_support'])} / {fmt(last[p][m + '_query'])}"
                  for p in parts for m in SWEEP_METRICS]
        if settings:
            cells += [str(r.get("test_epoch", ""))]
            cells += [f"{100 * r['test'][k]:.2f}%" if k in r["test"] else "" for k in settings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(run_dirs, out_dir=None, epoch=None):
    """Write nc_vs_parameters.png (into out_dir, by default the runs' common parent folder):
    final nc1 and nc2 against parameter count; with ``epoch``, their values at that epoch, into
    nc_vs_parameters_epochN.png. Returns (its path, the rows of sweep_table)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep_table(run_dirs, epoch)
    parts = _parts(rows[0]["last"])
    x = [r["parameters"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes, SWEEP_METRICS):
        for part, color in zip(parts, ("tab:blue", "tab:orange")):
            for side, style, marker in (("support", "-", "o"), ("query", "--", "s")):
                y = [r["last"][part][f"{metric}_{side}"] for r in rows]
                if None in y:     # undefined at 1 shot
                    continue
                ax.plot(x, y, style, color=color, marker=marker, label=f"{part} {side}")
        ax.set_xscale("log")
        if metric != "nc2":
            ax.set_yscale("log")
        for r in rows:
            ax.annotate(r["name"].replace("convnet width ", "w"), (r["parameters"], 0),
                        xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8, color="0.4")
        ax.set_xlabel("parameters")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_title("NC1 after training")
    axes[1].set_title("NC2 after training")
    axes[2].set_title("CDNV after training (no pseudo-inverse)")
    fig.suptitle(f"Neural collapse against model size, after {rows[0]['epoch']} epochs")
    fig.tight_layout()
    if out_dir is None:   # the folder that holds them all
        out_dir = os.path.commonpath([str(pathlib.Path(d).parent) for d in run_dirs])
    out_dir = pathlib.Path(out_dir)
    out = out_dir / ("nc_vs_parameters.png" if epoch is None else f"nc_vs_parameters_epoch{epoch}.png")
    _save(fig, out)
    return out, rows


SEED_SETTINGS = ((5, 5), (20, 5), (5, 1), (20, 1))     # the README table's order


def seed_table(run_dirs):
    """A Markdown table of the same model trained with several seeds: each run's test accuracy
    (its eval.json, ± its 95% interval over test episodes) per standard setting, then the mean
    and the standard deviation over the runs (over seeds: what decides whether a gap is real)."""
    evals = []
    for d in run_dirs:
        ev = files.read_json(pathlib.Path(d) / "eval.json", "evaluation")
        evals.append({(r["way"], r["shot"]): r for r in ev["results"]})
    settings = [k for k in SEED_SETTINGS if all(k in e for e in evals)]
    if not settings:
        raise UserError("the runs' eval.json files share none of the standard settings (run --eval --standard)")
    head = ["test episodes"] + [shown(pathlib.Path(d).name) for d in run_dirs] + [f"mean ± sd over {len(evals)} seeds"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for way, shot in settings:
        accs = [100 * e[(way, shot)]["acc"] for e in evals]
        cells = [f"{way}-way {shot}-shot"]
        cells += [f"{a:.2f}% ± {100 * e[(way, shot)]['acc_ci95']:.2f}" for a, e in zip(accs, evals)]
        sd = np.std(accs, ddof=1) if len(accs) > 1 else float("nan")
        cells.append(f"{np.mean(accs):.2f}% ± {sd:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_seeds(run_dirs, out=None):
    """nc_seeds_<first run>.png (in the runs' common parent folder, or ``out``): for runs of one model with
    different seeds, each NC metric's band over the seeds per epoch (the mean, and the range from
    the lowest to the highest seed), on training and (where there are some) validation episodes:
    which features of the curves hold across seeds. Epochs up to the shortest run. Returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [read_trace(d) for d in run_dirs]
    n = min(len(t) for t in traces)
    epochs = [r["epoch"] for r in traces[0][:n]]
    parts = _parts(traces[0][0])
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 3.6 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        for ax, metric in zip(row, ("nc1", "nc2")):
            for side, color in (("support", "tab:blue"), ("query", "tab:orange")):
                values = np.array([[r[part][f"{metric}_{side}"] for r in t[:n]] for t in traces], dtype=float)
                if np.isnan(values).all():          # NC1 of one image per class: undefined
                    continue
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=color, alpha=0.25, lw=0)
                ax.plot(epochs, values.mean(axis=0), color=color, label=f"{side}: mean, and range over {len(traces)} seeds")
            ax.set_title(f"{metric.upper()} on {'training' if part == 'train' else 'validation'} episodes", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric.upper())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            _whole_epochs(ax)
    fig.suptitle(f"{', '.join(shown(pathlib.Path(d).name) for d in run_dirs)}: neural collapse over seeds")
    fig.tight_layout()
    if out is None:
        out = (pathlib.Path(os.path.commonpath([str(pathlib.Path(d).parent) for d in run_dirs]))
               / f"nc_seeds_{pathlib.Path(run_dirs[0]).name}.png")      # named by the first run: one per model
    _save(fig, out)
    return out


def lake_label(path):
    """A --lake evaluation's name in tables and legends: its file name, or for a run folder's own
    eval_lake.json, the folder's (results/lake/bg-mixed/eval_lake.json -> bg-mixed)."""
    path = pathlib.Path(path)
    return shown(path.parent.name if path.stem == "eval_lake" else path.stem)


def lake_table(paths):
    """A Markdown table of --lake evaluations (eval_lake.json files), the errors published by Lake
    et al. 2015 below."""
    from .lake import PUBLISHED, error_interval
    lines = ["| model | epoch | error, 20 runs (95% interval) | error, runs of unseen characters |",
             "| --- | --- | --- | --- |"]
    for path in paths:
        r = files.read_json(path, "--lake evaluation")
        unseen = r["mean_error_unseen"]
        n = sum(not x["seen_in_training"] for x in r["runs"])
        low, high = error_interval(r["mean_error"], len(r["runs"]))
        lines.append(f"| {lake_label(path)} | {r['epoch']} | {100 * r['mean_error']:.2f}% "
                     f"({100 * low:.1f} to {100 * high:.1f}) | "
                     + (f"{100 * unseen:.2f}% ({n} runs) |" if unseen is not None else "(none) |"))
    lines += [f"| published: {name} | | {err:.1f}% | |" for name, err in PUBLISHED.items()]
    return "\n".join(lines)


def plot_lake(paths, out=None):
    """lake_errors.png (in the evaluations' common folder, or ``out``): each model's error per run
    of Lake's benchmark, runs of characters the model trained on shaded, people's and the other
    published errors as lines. Returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .lake import PUBLISHED

    results = [files.read_json(p, "--lake evaluation") for p in paths]
    runs = [r["run"] for r in results[0]["runs"]]
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / len(results)
    for i, (path, r) in enumerate(zip(paths, results)):
        x = [j + (i - (len(results) - 1) / 2) * width for j in range(len(runs))]
        errors = [100 * row["error"] for row in r["runs"]]
        bars = ax.bar(x, errors, width, label=f"{lake_label(path)}: mean {100 * r['mean_error']:.2f}%")
        # a run without a single error would be a bar of no height, which reads as a missing one
        zero = [xj for xj, e in zip(x, errors) if e == 0]
        ax.scatter(zero, [0] * len(zero), marker="_", s=120, linewidths=2.5,
                   color=bars.patches[0].get_facecolor(), zorder=3, clip_on=False)
    seen = [j for j, row in enumerate(results[0]["runs"]) if any(r["runs"][j]["seen_in_training"] for r in results)]
    for j in seen:
        ax.axvspan(j - 0.45, j + 0.45, color="0.9", zorder=0)
    styles = iter(["-", "--", ":", "-.", (0, (5, 1))])
    for name, err in PUBLISHED.items():
        if err < 20:
            ax.axhline(err, color="0.3", linestyle=next(styles), linewidth=1, label=f"{name}: {err}%")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([r[3:] for r in runs])
    ax.set_xlabel("run (shaded: characters some of the models trained on; a dash on the axis: no error)")
    ax.set_ylabel("error (%)")
    ax.set_title("Lake et al.'s one-shot benchmark: 20-way within-alphabet one-shot classification")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    if out is None:
        out = pathlib.Path(os.path.commonpath([str(pathlib.Path(p).parent) for p in paths])) / "lake_errors.png"
    _save(fig, out)
    return out
