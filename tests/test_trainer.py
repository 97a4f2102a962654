"""Training, resuming, divergence, evaluation and figures, on a tiny configuration."""
import json
import pathlib
import shutil

import numpy as np
import pytest

import scratchproto as sp
from scratchproto import checkpoint, trainer
from scratchproto.protonet import ProtoNet

from helpers import trace_without_seconds


def tiny(omniglot, **kw):
    cfg = dict(backbone="convnet", width=8, device="cpu", epochs=2, train_way=5, train_shot=2,
               train_query=2, train_episodes=3, val_way=3, val_shot=2, val_query=3, val_episodes=2,
               seed=7, data=str(omniglot.root), mirror="http://127.0.0.1:9/offline")
    cfg.update(kw)
    return trainer.Config(**cfg)


def test_short_run_produces_every_file(omniglot, tmp_path):
    run = trainer.train(tiny(omniglot), out=tmp_path / "run", progress=False, log=lambda *a: None)
    names = {p.name for p in run.iterdir()}
    assert names == {"config.json", "trace.jsonl", "best.npz", "last.npz", "curves.png", "nc_train.png",
                     "nc_val.png"}
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["train_way"] == 5 and config["device"] == "cpu"
    assert config["versions"]["numpy"] == np.__version__ and config["parameters"] > 0
    records = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]) == {"epoch", "lr", "train", "val", "progress", "seconds"}
    # where the run stands: tiny() trains 2 epochs with the default patience of 200
    best = min(records, key=lambda r: r["val"]["loss"])
    assert records[-1]["progress"] == {"of_epochs": 2, "best_loss": best["val"]["loss"],
                                       "best_epoch": best["epoch"], "patience_left": 200 - (2 - best["epoch"]),
                                       "epochs_left_at_most": 0, "seconds_left_at_most": 0}
    assert records[0]["progress"]["epochs_left_at_most"] == 1
    for part in ("train", "val"):
        assert set(records[0][part]) == set(trainer.metric_keys())
        assert all(np.isfinite(v) for v in records[0][part].values())
    meta, state, adam = checkpoint.load(run / "last.npz")
    assert meta["epoch"] == 2 and meta["backbone"] == "convnet" and meta["width"] == 8
    assert "encoder.0.0.weight" in state and state["encoder.0.0.weight"].shape == (8, 1, 3, 3)
    assert int(adam["t"]) == 6                       # 2 epochs x 3 episodes
    # the PNGs are real images
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_and_resumed_run_gives_the_same_trace(omniglot, tmp_path, monkeypatch):
    straight = trainer.train(tiny(omniglot, epochs=3), out=tmp_path / "a", progress=False, log=lambda *a: None)

    calls = {"n": 0}
    real = ProtoNet.start_episode

    def interrupt_in_epoch_3(self, xs, xq, train=True):
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 2:     # epochs have 3 + 2 episodes: this is epoch 3's second
            raise KeyboardInterrupt
        return real(self, xs, xq, train)
    monkeypatch.setattr(ProtoNet, "start_episode", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny(omniglot, epochs=3), out=tmp_path / "b", progress=False, log=lambda *a: None)
    monkeypatch.setattr(ProtoNet, "start_episode", real)
    assert checkpoint.load(tmp_path / "b" / "last.npz")[0]["epoch"] == 2
    first = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "resumed" not in first
    trainer.train(resume=tmp_path / "b", progress=False, log=lambda *a: None)
    # config.json keeps the first start and records the resume
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["started"] == first["started"] and config["config"] == first["config"]
    [resumed] = config["resumed"]
    assert resumed["after_epoch"] == 2 and resumed["device"] == "cpu" and resumed["at"] >= first["started"]
    assert resumed["versions"] == first["versions"]
    assert trace_without_seconds(tmp_path / "b") == trace_without_seconds(straight)
    # and continuing a finished run further, with a larger epoch limit
    trainer.train(resume=tmp_path / "b", overrides={"epochs": 4}, progress=False, log=lambda *a: None)
    assert [r["epoch"] for r in trace_without_seconds(tmp_path / "b")] == [1, 2, 3, 4]


def test_resume_refuses_other_settings(omniglot, tmp_path):
    trainer.train(tiny(omniglot, epochs=1), out=tmp_path / "r", progress=False, log=lambda *a: None)
    with pytest.raises(sp.UserError, match="only epochs, patience, device, data, mirror may change"):
        trainer.train(resume=tmp_path / "r", overrides={"lr": 0.5}, progress=False)
    with pytest.raises(sp.UserError, match="is not a run folder to resume"):
        trainer.train(resume=tmp_path / "nothing", progress=False)


def test_a_run_folder_is_never_overwritten(omniglot, tmp_path):
    trainer.train(tiny(omniglot, epochs=1), out=tmp_path / "r", progress=False, log=lambda *a: None)
    with pytest.raises(sp.UserError, match="already holds a run: continue it with --resume"):
        trainer.train(tiny(omniglot, epochs=1), out=tmp_path / "r", progress=False)


def test_divergence_stops_with_a_clear_message(omniglot, tmp_path, monkeypatch):
    real = ProtoNet.start_episode
    calls = {"n": 0}

    def nan_in_epoch_2(self, xs, xq, train=True):
        calls["n"] += 1
        finish = real(self, xs, xq, train)
        if calls["n"] == 5 + 2:         # epoch 2, training episode 2 (found while episode 3 runs)
            return lambda: {**finish(), "loss": float("nan")}
        return finish
    monkeypatch.setattr(ProtoNet, "start_episode", nan_in_epoch_2)
    with pytest.raises(trainer.Diverged, match=r"the loss became nan in epoch 2 \(training\), episode 2; "
                                               r"stopped. The last good checkpoint is .*last.npz \(epoch 1\)"):
        trainer.train(tiny(omniglot, epochs=3), out=tmp_path / "d", progress=False, log=lambda *a: None)
    assert checkpoint.load(tmp_path / "d" / "last.npz")[0]["epoch"] == 1


def test_episodes_are_read_one_late():
    """finished_episodes gives episode i+1 to the device (and steps Adam) before it reads episode
    i, so that a GPU always has work while Python reads numbers."""
    events = []

    class Spy:          # a model and its optimiser, logging what they are asked to do
        def start_episode(self, xs, xq, train):
            events.append(f"start {xs}")
            return lambda: events.append(f"read {xs}") or {"loss": xs / 2}

        def step(self):
            events.append("step")
    spy = Spy()
    got = list(trainer.finished_episodes(spy, [(1, None), (2, None), (3, None)], True, spy))
    assert events == ["start 1", "step", "start 2", "step", "read 1", "start 3", "step", "read 2",
                      "read 3"]
    assert got == [(1, {"loss": 0.5}), (2, {"loss": 1.0}), (3, {"loss": 1.5})]
    assert list(trainer.finished_episodes(spy, [], True, spy)) == []


def test_reading_late_changes_no_result():
    """Training with the lag gives bit for bit the results and weights of reading each episode
    before starting the next."""
    rng = np.random.default_rng(3)
    eps = [((rng.random((4, 2, 1, 28, 28)) < 0.2).astype(np.float32),
            (rng.random((4, 3, 1, 28, 28)) < 0.2).astype(np.float32)) for _ in range(3)]
    runs = []
    for late in (False, True):
        net = sp.build_backbone("convnet", seed=0, width=8)
        model, opt = ProtoNet(net), sp.Adam(net, lr=1e-2)
        if late:
            results = [res for _, res in trainer.finished_episodes(model, eps, True, opt)]
        else:
            results = []
            for xs, xq in eps:
                results.append(model.episode(xs, xq, train=True))
                opt.step()
        runs.append(([{k: r[k] for k in trainer.metric_keys()} for r in results], net.state_dict()))
    (plain, plain_weights), (late, late_weights) = runs
    assert plain == late and plain[0]["loss"] != plain[2]["loss"]
    for name in plain_weights:
        np.testing.assert_array_equal(plain_weights[name], late_weights[name])


def test_early_stopping_and_trainval(omniglot, tmp_path):
    run = trainer.train(tiny(omniglot, epochs=6, patience=1, lr=1e-9), out=tmp_path / "p", progress=False,
                        log=lambda *a: None)
    n = len(trace_without_seconds(run))
    assert n < 6                      # with a frozen model the val loss stops improving at once
    run = trainer.train(tiny(omniglot, epochs=1, train_split="trainval"), out=tmp_path / "tv", progress=False,
                        log=lambda *a: None)
    assert "val" not in trace_without_seconds(run)[0] and (run / "best.npz").exists() and not (run / "nc_val.png").exists()


def test_evaluate_standard_settings(omniglot, tmp_path):
    run = trainer.train(tiny(omniglot, epochs=1), out=tmp_path / "e", progress=False, log=lambda *a: None)
    out = trainer.evaluate(run / "best.npz", trainer.STANDARD, split="test", query=3, n=4, device="cpu",
                           data=str(omniglot.root), progress=False)
    assert [(r["way"], r["shot"]) for r in out["results"]] == [(5, 1), (5, 5), (20, 1), (20, 5)]
    for r in out["results"]:
        assert 0 <= r["acc"] <= 1 and r["acc_ci95"] >= 0 and r["episodes"] == 4
        assert r["nc1_query"] > 0
        # one support image per class: no within-class spread to measure, so no number
        assert (r["nc1_support"] is None and r["cdnv_support"] is None) == (r["shot"] == 1)
    with pytest.raises(sp.UserError, match="the number of episodes must be a positive integer, got 0"):
        trainer.evaluate(run / "best.npz", [(5, 5)], n=0, data=str(omniglot.root), progress=False)


def test_evaluate_errors(omniglot, tmp_path):
    with pytest.raises(sp.UserError, match="no checkpoint at"):
        trainer.evaluate(tmp_path / "none.npz", [(5, 5)], data=str(omniglot.root), progress=False)
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(sp.UserError, match="is not a scratchproto checkpoint"):
        trainer.evaluate(tmp_path / "foreign.npz", [(5, 5)], data=str(omniglot.root), progress=False)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(sp.UserError, match="is damaged or not a scratchproto checkpoint"):
        trainer.evaluate(tmp_path / "text.npz", [(5, 5)], data=str(omniglot.root), progress=False)


def test_evaluate_stops_at_a_non_finite_loss(omniglot, tmp_path):
    run = trainer.train(tiny(omniglot, epochs=1), out=tmp_path / "n", progress=False, log=lambda *a: None)
    meta, state, _ = checkpoint.load(run / "best.npz")
    net = sp.build_backbone("convnet", width=8)
    net.load_state_dict({**state, "encoder.0.0.weight": np.full_like(state["encoder.0.0.weight"], np.nan)})
    checkpoint.save(tmp_path / "nan.npz", net, epoch=meta["epoch"])
    with pytest.raises(trainer.Diverged, match=r"the loss became nan in the evaluation \(5-way 5-shot\), "
                                               r"episode 1$"):
        trainer.evaluate(tmp_path / "nan.npz", [(5, 5)], query=3, n=2, device="cpu",
                         data=str(omniglot.root), progress=False)


def test_plot_needs_a_trace(tmp_path):
    with pytest.raises(sp.UserError, match="no trace at"):
        sp.plots.plot_run(tmp_path)
    (tmp_path / "trace.jsonl").write_text("")
    with pytest.raises(sp.UserError, match="is empty: the run has not finished an epoch yet"):
        sp.plots.plot_run(tmp_path)


def _fake_run(folder, width, params, epochs, nc1_last):
    """A run folder as the trainer writes it (config.json, trace.jsonl), with chosen values."""
    folder.mkdir(parents=True)
    cfg = dict(vars(trainer.Config()), width=width)
    (folder / "config.json").write_text(json.dumps({"config": cfg, "parameters": params}))
    metrics = {f"{m}_{s}": 1.0 for m in sp.collapse.METRICS for s in ("support", "query")}
    lines = []
    for epoch in range(1, epochs + 1):
        part = dict(metrics, loss=1.0 / epoch, acc=0.9)
        if epoch == epochs:
            part = dict(part, nc1_support=nc1_last, nc1_query=2 * nc1_last)
        lines.append(json.dumps({"epoch": epoch, "train": part, "val": part, "seconds": 60.0}))
    (folder / "trace.jsonl").write_text("\n".join(lines) + "\n")


def test_sweep_table_and_figure(tmp_path):
    _fake_run(tmp_path / "w32", 32, 28320, 3, 0.5)
    _fake_run(tmp_path / "w16", 16, 7248, 3, 0.25)
    (tmp_path / "w16" / "eval.json").write_text(json.dumps(
        {"epoch": 2, "results": [{"way": 5, "shot": 5, "acc": 0.987}, {"way": 20, "shot": 1, "acc": 0.8}]}))
    path, rows = sp.plots.plot_sweep([tmp_path / "w32", tmp_path / "w16"])
    assert path == tmp_path / "nc_vs_parameters.png" and path.stat().st_size > 10_000
    assert [r["parameters"] for r in rows] == [7248, 28320]           # sorted by size
    assert [r["last"]["train"]["nc1_query"] for r in rows] == [0.5, 1.0]  # the last epoch's values
    table = sp.plots.format_sweep(rows).splitlines()
    assert table[0].startswith("| model | parameters | epochs | minutes | train loss | val loss | nc1 train s/q")
    assert table[0].endswith("| tested epoch | test 5w5s | test 20w1s |")
    assert table[2] == ("| convnet width 16 | 7,248 | 3 | 3 | 0.3333 | 0.3333 | 0.25 / 0.5 | 1 / 1 | 1 / 1 "
                        "| 0.25 / 0.5 | 1 / 1 | 1 / 1 | 2 | 98.70% | 80.00% |")
    assert table[3].endswith("| 1 / 1 |  |  |  |")                    # w32 has no eval.json


def test_sweep_at_an_epoch_cuts_the_longer_runs(tmp_path):
    _fake_run(tmp_path / "short", 16, 7248, 3, 0.25)
    _fake_run(tmp_path / "long", 32, 28320, 5, 0.5)
    path, rows = sp.plots.plot_sweep([tmp_path / "long", tmp_path / "short"], epoch=3)
    assert path == tmp_path / "nc_vs_parameters_epoch3.png" and path.exists()
    assert [r["epoch"] for r in rows] == [3, 3]
    # the long run's epoch-3 values (1.0, as _fake_run writes before its last epoch), not its last
    assert [r["last"]["train"]["nc1_query"] for r in rows] == [0.5, 1.0]
    assert [r["last"]["val"]["loss"] for r in rows] == [1 / 3, 1 / 3]
    assert [r["minutes"] for r in rows] == [3.0, 3.0]                 # 60 s per epoch, 3 epochs


def test_sweep_refuses_unequal_training_and_non_runs(tmp_path):
    _fake_run(tmp_path / "a", 16, 7248, 3, 0.25)
    _fake_run(tmp_path / "b", 32, 28320, 4, 0.25)
    with pytest.raises(sp.UserError, match=r"the runs end at different epochs \(.*a: 3, .*b: 4\)"):
        sp.plots.sweep_table([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(sp.UserError, match=r"a has trained 3 epochs, fewer than 5"):
        sp.plots.sweep_table([tmp_path / "a", tmp_path / "b"], epoch=5)
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(sp.UserError, match="no config.json in"):
        sp.plots.sweep_table([tmp_path / "a"])


def test_one_shot_run_records_the_within_class_support_metrics_as_undefined(omniglot, tmp_path):
    lines = []
    run = trainer.train(tiny(omniglot, epochs=2, train_shot=1, val_shot=1), out=tmp_path / "one", progress=False,
                        log=lines.append)
    raw = (run / "trace.jsonl").read_text()
    assert '"nc1_support": null' in raw and '"cdnv_support": null' in raw
    for record in trace_without_seconds(run):
        for part in ("train", "val"):
            assert record[part]["nc1_support"] is None and record[part]["cdnv_support"] is None
            assert record[part]["nc1_query"] > 0 and record[part]["nc2_support"] > 0
    assert any("nc1 n/a/" in line for line in lines)
    assert (run / "nc_train.png").exists() and (run / "nc_val.png").exists()


def test_an_evaluation_file_is_the_same_wherever_and_whenever_it_is_written(tmp_path):
    """evaluation_json names the checkpoint relative to the file's folder and rounds floats to
    10 significant digits, so a re-run of a committed evaluation writes the same bytes;
    save_evaluation says whether it replaced other numbers."""
    out = {"checkpoint": str(tmp_path / "run" / "best.npz"), "epoch": 3, "results": [
        {"acc": 0.97870666666667231, "nc1_support": None, "loss": 0.0993620164372444}]}
    dest = tmp_path / "run" / "eval.json"
    dest.parent.mkdir()
    text = trainer.evaluation_json(out, dest)
    saved = json.loads(text)
    assert saved["checkpoint"] == "best.npz" and saved["epoch"] == 3
    assert saved["results"][0] == {"acc": 0.9787066667, "nc1_support": None, "loss": 0.09936201644}
    # the last bits of a float, which another order of the same sums changes, do not show
    nudged = {**out, "results": [{**out["results"][0], "loss": 0.0993620164372444 * (1 + 4e-16)}]}
    assert trainer.evaluation_json(nudged, dest) == text
    assert json.loads(trainer.evaluation_json(out, tmp_path / "elsewhere.json"))["checkpoint"] == "run/best.npz"
    lines = []
    trainer.save_evaluation(out, dest, log=lines.append)
    trainer.save_evaluation(nudged, dest, log=lines.append)
    trainer.save_evaluation({**out, "epoch": 4}, dest, log=lines.append)
    assert lines == [f"wrote {dest}", f"wrote {dest} (unchanged: the same numbers as the file it replaced)",
                     f"wrote {dest}, replacing a file that held other numbers (git diff shows them, if it is tracked)"]
    assert json.loads(dest.read_text())["epoch"] == 4


def test_the_committed_evaluations_are_in_the_written_form():
    """Every committed eval*.json is what evaluation_json writes for its own numbers: a re-run of
    its command (results/README.md) that computes the same numbers leaves it byte for byte."""
    from helpers import REPO
    paths = [p for p in sorted((REPO / "results").rglob("*.json")) if p.name != "config.json"]
    assert len(paths) >= 21
    for path in paths:
        out = json.loads(path.read_text())
        assert not pathlib.Path(out["checkpoint"]).is_absolute()
        out["checkpoint"] = str(path.parent / out["checkpoint"])
        assert trainer.evaluation_json(out, path) == path.read_text(), path


def test_figures_are_redrawn_during_training_at_a_bounded_cost():
    """After the first epoch, then once the epochs since took 20 times as long as drawing; a
    drawing that fails warns once and training goes on."""
    now = [0.0]
    drawn = []

    def draw(run_dir):            # drawing takes 2 s of the fake clock
        drawn.append(epoch)
        now[0] += 2.0
    figures = trainer.FiguresDuringTraining("run", log=None, draw=draw, clock=lambda: now[0])
    for epoch in range(1, 12):
        figures.after_epoch(epoch, 10.0)        # 10 s epochs: a drawing every 4 epochs (40 s >= 20 x 2 s)
    assert drawn == [1, 5, 9]

    lines = []

    def broken(run_dir):
        raise OSError("disk full")
    figures = trainer.FiguresDuringTraining("run", log=lines.append, draw=broken, clock=lambda: 0.0)
    for epoch in range(1, 4):
        figures.after_epoch(epoch, 10.0)
    assert lines == ["warning: the figures could not be redrawn during training (OSError: disk full); "
                     "they are drawn at the end, or with --plot"]


def test_a_run_at_another_image_size_trains_and_evaluates_at_it(omniglot, tmp_path):
    data = tmp_path / "omniglot"                 # a copy: the 32x32 cache stays out of the shared folder
    shutil.copytree(omniglot.root, data)
    run = trainer.train(tiny(omniglot, image_size=32, epochs=1, data=str(data)), out=tmp_path / "run",
                        progress=False, log=lambda *a: None)
    assert json.loads((run / "config.json").read_text())["config"]["image_size"] == 32
    meta = checkpoint.load(run / "best.npz")[0]
    assert meta["image_size"] == 32 and checkpoint.image_size(meta) == 32
    out = trainer.evaluate(run / "best.npz", [(3, 1)], query=2, n=2, device="cpu", data=str(data),
                           mirror="http://127.0.0.1:9/offline", progress=False)
    assert out["image_size"] == 32 and out["results"][0]["episodes"] == 2
    with pytest.raises(sp.UserError, match="--image-size 32 goes with the ConvNet"):
        trainer.train(tiny(omniglot, backbone="resnet18", image_size=32), out=tmp_path / "r18", progress=False)
    with pytest.raises(sp.UserError, match="--image-size must be a multiple of 4"):
        trainer.train(tiny(omniglot, image_size=30), out=tmp_path / "odd", progress=False)


@pytest.mark.filterwarnings("ignore:Attempting to set identical")     # the fake run's flat error curve
def test_each_run_figure_names_its_figure_in_the_paper(tmp_path, monkeypatch):
    """The paper's protocol (whatever its length, seed or machine) gets the paper's figure numbers,
    the ConvNet's 1, 2, 5 and ResNet-18's 3, 4, 6; another protocol is told to compare with them;
    and the titles drawn carry the label (none without a config.json)."""
    C = trainer.Config
    assert trainer.paper_figures(C(epochs=150, seed=2, device="gpu")) == {
        "curves": "the paper's Figure 1", "nc_train": "the paper's Figure 2", "nc_val": "the paper's Figure 5"}
    assert trainer.paper_figures(C(backbone="resnet18"))["nc_val"] == "the paper's Figure 6"
    assert trainer.paper_figures(C(train_shot=1))["curves"] == "compare the paper's Figure 1"
    assert trainer.paper_figures(C(backbone="resnet18", train_way=20))["nc_train"] == "compare the paper's Figure 4"
    assert trainer.paper_figures(C(width=32))["curves"] == "compare the paper's Figure 1"
    assert trainer.paper_figures(C(backbone="elsewhere")) == {}

    import matplotlib.figure
    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, text, **kw: titles.append(text) or real(self, text, **kw))
    _fake_run(tmp_path / "run", 64, 111936, 2, 0.5)
    trainer.draw_figures(tmp_path / "run")
    assert titles == ["run: error and loss (the paper's Figure 1)",
                      "run: neural collapse on training episodes (the paper's Figure 2)",
                      "run: neural collapse on validation episodes (the paper's Figure 5)"]
    titles.clear()
    (tmp_path / "run" / "config.json").unlink()
    trainer.draw_figures(tmp_path / "run")
    assert titles == ["run: error and loss", "run: neural collapse on training episodes",
                      "run: neural collapse on validation episodes"]
