"""The paper's figures from a run's trace.jsonl (matplotlib, PNG).

* curves.png   Figures 1/3: training and validation error (1 - acc) and loss against epoch
* nc_train.png Figures 2/4: nc1 and nc2 on training episodes, support and query
* nc_val.png   Figures 5/6: the same on validation episodes
nc2 panels also show nc2_unit (dashed), the variant the authors' released code computed.
"""
import json
import pathlib

from .errors import UserError


def read_trace(run_dir):
    path = pathlib.Path(run_dir) / "trace.jsonl"
    if not path.exists():
        raise UserError(f"no trace at {path}: is {run_dir} a run folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return records


def _log_if_wide(ax, values):
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 30:
        ax.set_yscale("log")


def plot_run(run_dir, title=None):
    """Write curves.png, nc_train.png and (with validation) nc_val.png into ``run_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = pathlib.Path(run_dir)
    records = read_trace(run_dir)
    epochs = [r["epoch"] for r in records]
    parts = [p for p in ("train", "val") if p in records[0]]
    title = title or run_dir.name
    written = []

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
    axes[0].set_title("error")
    axes[1].set_title("loss")
    fig.suptitle(f"{title}: error and loss")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "curves.png")

    for part in parts:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for side, color in (("support", "tab:blue"), ("query", "tab:orange")):
            nc1 = [r[part][f"nc1_{side}"] for r in records]
            axes[0].plot(epochs, nc1, color=color, label=side)
            axes[1].plot(epochs, [r[part][f"nc2_{side}"] for r in records], color=color,
                         label=f"nc2 {side}")
            axes[1].plot(epochs, [r[part][f"nc2_unit_{side}"] for r in records], color=color,
                         linestyle="--", label=f"nc2_unit {side}")
        _log_if_wide(axes[0], [r[part][f"nc1_{s}"] for r in records for s in ("support", "query")])
        axes[0].set_title("NC1: within-class variability")
        axes[1].set_title("NC2: distance of class means from a simplex ETF")
        for ax, name in zip(axes, ("nc1", "nc2")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
        word = "training" if part == "train" else "validation"
        fig.suptitle(f"{title}: neural collapse on {word} episodes")
        fig.tight_layout()
        out = run_dir / f"nc_{part}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written
