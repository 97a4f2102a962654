"""Lake et al.'s one-shot benchmark: the background-only split, within-alphabet episodes, the
reading and scoring of the 20 runs (known answers on synthetic run files), and the CLI."""
import dataclasses
import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import scratchproto as sp
from scratchproto import lake, trainer
from scratchproto import omniglot as og
from helpers import MIRROR, REPO, http_mirror

ONESHOT = MIRROR.parent / "omniglot-oneshot"
needs_oneshot = pytest.mark.skipif(not (ONESHOT / lake.FILE).exists(), reason=f"no {lake.FILE} in {ONESHOT}")


# -- synthetic run files in all_runs.zip's layout ---------------------------------------------

def glyph(rng):
    """A random 105x105 1-bit drawing: white background, a few black strokes (blocks)."""
    px = np.ones((105, 105), dtype=bool)
    for _ in range(6):
        r, c = rng.integers(0, 90, 2)
        px[r:r + 12, c:c + 4] = False
    return Image.fromarray(px)


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_runs(path, plans, drop=None):
    """A zip of runs; plans[i] = (shown, labelled): test item k is a copy of training class
    shown[k] and class_labels.txt pairs it with class labelled[k] (0-based). ``drop``: a member
    left out."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for i, (shown, labelled) in enumerate(plans, start=1):
            name = f"run{i:02d}"
            train = [glyph(rng) for _ in range(20)]
            members = {f"{name}/training/class{m + 1:02d}.png": png(train[m]) for m in range(20)}
            members.update({f"{name}/test/item{k + 1:02d}.png": png(train[shown[k]]) for k in range(20)})
            members[f"{name}/class_labels.txt"] = "".join(
                f"{name}/test/item{k + 1:02d}.png {name}/training/class{labelled[k] + 1:02d}.png\n"
                for k in range(20)).encode()
            for member, data in members.items():
                if member != drop:
                    zf.writestr(member, data)
    return path


def test_scoring_of_synthetic_runs_with_known_answers(tmp_path):
    ident = list(range(20))
    shifted = [(k + 1) % 20 for k in range(20)]
    half = [k if k < 10 else (k + 1) % 20 for k in range(20)]
    path = write_runs(tmp_path / "runs.zip", [(ident, ident), (ident, shifted), (ident, half),
                                              (shifted[::-1], shifted[::-1])])
    runs = lake.read_runs(path)
    assert [r.name for r in runs] == ["run01", "run02", "run03", "run04"]
    assert runs[0].train.shape == (20, 1, 28, 28) and runs[0].test.dtype == np.float32
    assert list(runs[1].answer) == shifted
    # a test image that is a copy of its training image is nearest to it whatever the network
    net = sp.build_backbone("convnet", seed=3, width=8, device="cpu")
    assert lake.run_errors(net, runs) == [0.0, 1.0, 0.5, 0.0]


def test_incomplete_or_damaged_run_files_are_named(tmp_path):
    ident = list(range(20))
    path = write_runs(tmp_path / "a.zip", [(ident, ident)], drop="run01/test/item05.png")
    with pytest.raises(og.DataError, match="a.zip has no run01/test/item05.png: the run is incomplete"):
        lake.read_runs(path)
    path = write_runs(tmp_path / "b.zip", [(ident, ident)], drop="run01/class_labels.txt")
    with pytest.raises(og.DataError, match="has no run01/class_labels.txt"):
        lake.read_runs(path)
    good = write_runs(tmp_path / "c.zip", [(ident, ident)]).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[:len(good) // 2])
    with pytest.raises(og.DataError, match="cut.zip is damaged .*delete it and re-run"):
        lake.read_runs(tmp_path / "cut.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(og.DataError, match="holds no runNN/ folders"):
        lake.read_runs(tmp_path / "other.zip")


@needs_oneshot
def test_fetch_downloads_verifies_and_refuses_a_wrong_file(tmp_path):
    root = tmp_path / "data"
    with http_mirror(ONESHOT) as url:
        path = lake.fetch(root, url, progress=False)
    assert path.read_bytes() == (ONESHOT / lake.FILE).read_bytes() and not list(root.glob("*.part*"))
    runs = lake.read_runs(path)
    assert len(runs) == 20 and all(sorted(r.answer) == list(range(20)) for r in runs)
    # a damaged copy in place: refused, with what to do
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(og.DataError, match="is not the benchmark's all_runs.zip .*delete it and re-run"):
        lake.fetch(root, "http://127.0.0.1:9/offline", progress=False)
    # a mirror that serves something else: not kept
    fake = tmp_path / "fake"
    fake.mkdir()
    write_runs(fake / lake.FILE, [(list(range(20)), list(range(20)))])
    with pytest.raises(og.DataError, match="it was not kept"):
        lake.fetch(tmp_path / "data2", str(fake), progress=False)
    assert not (tmp_path / "data2" / lake.FILE).exists()
    with pytest.raises(og.DataError, match="could not download"):
        lake.fetch(tmp_path / "data3", "http://127.0.0.1:9/offline", progress=False)


@needs_oneshot
def test_runs_seen_by_the_vinyals_training_split(omniglot, tmp_path):
    """SEEN_BY_VINYALS_TRAIN, checked against the archives: each run image is one of
    images_evaluation.zip's drawings, found by its 28x28 pixels."""
    first_eval = og.ARCHIVE_COUNTS["images_background"][0]
    where = {}
    for row in range(first_eval, len(omniglot.characters)):
        for drawer in range(20):
            where[omniglot.bits[row, 0, drawer].tobytes()] = omniglot.characters[row]
    train_chars = {c.rsplit("/", 1)[0] for c in omniglot.classes("train") if c.endswith("rot000")}
    runs = lake.read_runs(ONESHOT / lake.FILE)
    seen = []
    for i, run in enumerate(runs, start=1):
        chars = [where[np.packbits(img.astype(bool).ravel()).tobytes()] for img in run.train]
        assert len({c.split("/")[0] for c in chars}) == 1           # one alphabet per run
        seen.append(sum(c in train_chars for c in chars))
    assert seen == [20] * 6 + [18] * 2 + [0] * 12
    assert lake.SEEN_BY_VINYALS_TRAIN == tuple(i for i, s in enumerate(seen, start=1) if s)


# -- training for the benchmark: background split, within-alphabet episodes --------------------

def test_background_split_holds_back_whole_alphabets(omniglot):
    train = omniglot.classes("background-train")
    val = omniglot.classes("background-val")
    assert len(train) + len(val) == 964 * 4 and not set(train) & set(val)
    assert {c.split("/")[0] for c in val} == set(og.BACKGROUND_VAL)
    assert len(val) == 105 * 4                                   # 10.9% of the characters
    evaluation = set(omniglot.characters[og.ARCHIVE_COUNTS["images_background"][0]:])
    assert not {c.rsplit("/", 1)[0] for c in train + val} & evaluation
    unrotated = omniglot.classes("background-train", rotations=False)
    assert len(unrotated) == (964 - 105) and all(c.endswith("/rot000") for c in unrotated)


def test_within_alphabet_episodes(omniglot):
    from scratchproto.episodes import alphabet_groups
    names = omniglot.classes("background-val")
    groups = alphabet_groups(names)
    where = {}     # each image's character, by its 28x28 pixels
    for name in names:
        row, _ = omniglot.class_index(name)
        for drawer in range(20):
            where[omniglot.bits[row, 0, drawer].tobytes()] = omniglot.characters[row]
    alphabets = set()
    for xs, xq in sp.episodes(omniglot, "background-val", way=20, shot=1, query=2, n=30, seed=1,
                              rotations=False, within_alphabet=True):
        chars = {where[np.packbits(img.astype(bool).ravel()).tobytes()] for img in xs[:, 0]}
        assert len({c.split("/")[0] for c in chars}) == 1 and len(chars) == 20
        alphabets |= {c.split("/")[0] for c in chars}
    assert alphabets == set(og.BACKGROUND_VAL) and set(groups) == set(og.BACKGROUND_VAL)
    with pytest.raises(sp.UserError, match="way = 49 exceeds the 48 classes of the largest alphabet of "
                                           "split 'background-val' \\(within-alphabet episodes\\)"):
        next(sp.episodes(omniglot, "background-val", way=49, shot=1, query=1, rotations=False,
                         within_alphabet=True))


def test_training_on_the_background_split(omniglot, tmp_path):
    cfg = trainer.Config(backbone="convnet", width=8, device="cpu", epochs=1, train_way=5, train_shot=1,
                         train_query=2, train_episodes=2, val_way=5, val_shot=1, val_query=2, val_episodes=2,
                         train_split="background", within_alphabet=True, rotations=False,
                         data=str(omniglot.root), mirror="http://127.0.0.1:9/offline")
    run = trainer.train(cfg, out=tmp_path / "bg", progress=False, log=lambda *a: None)
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["train_split"] == "background" and saved["within_alphabet"] and not saved["rotations"]
    assert sp.checkpoint.load(run / "best.npz")[0]["train_split"] == "background"
    assert "val" in json.loads((run / "trace.jsonl").read_text().splitlines()[0])
    # validation on the background split is within one alphabet even when training is not
    mixed = trainer.Config(**{**dataclasses.asdict(cfg), "within_alphabet": False})
    calls = []
    real = trainer.episodes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "episodes", lambda *a, **k: calls.append((a[1], k["within_alphabet"], k["rotations"]))
                   or real(*a, **k))
        trainer._episodes(omniglot, mixed, "train", 1)
        trainer._episodes(omniglot, mixed, "val", 1)
        trainer._episodes(omniglot, trainer.Config(), "val", 1)
    # validation as the benchmark is (one alphabet, unrotated); Vinyals validation unchanged
    assert calls == [("background-train", False, False), ("background-val", True, False), ("val", False, True)]
    # --augment distorts the training images only
    augmenting = trainer.Config(**{**dataclasses.asdict(mixed), "augment": True})
    flags = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "episodes", lambda *a, **k: flags.append(k["augment"]) or real(*a, **k))
        trainer._episodes(omniglot, augmenting, "train", 1)
        trainer._episodes(omniglot, augmenting, "val", 1)
    assert flags == [True, False]
    with pytest.raises(sp.UserError, match="--no-rotations goes with --train-split background"):
        trainer.train(trainer.Config(rotations=False), out=tmp_path / "x", progress=False)
    # runs written before train_split existed still resume
    assert trainer.Config.from_saved({"trainval": True}).splits == ("trainval", None)
    assert trainer.Config.from_saved({"trainval": False}).train_split == "train"


# -- the CLI ------------------------------------------------------------------------------------

def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)


@needs_oneshot
def test_cli_lake_evaluation(omniglot, tmp_path):
    run = tmp_path / "run"
    p = cli("--width", "8", "--device", "cpu", "--epochs", "1", "--train-way", "5", "--train-shot", "1",
            "--train-query", "1", "--train-episodes", "1", "--val-way", "3", "--val-episodes", "1",
            "--out", str(run), "--data", str(omniglot.root), "--mirror", "http://127.0.0.1:9/offline")
    assert p.returncode == 0, p.stderr
    data = tmp_path / "data"
    p = cli("--eval", str(run / "best.npz"), "--lake", "--device", "cpu", "--data", str(data),
            "--mirror", str(ONESHOT))
    assert p.returncode == 0, p.stderr
    out = json.loads((run / "eval_lake.json").read_text())
    assert [r["run"] for r in out["runs"]] == [f"run{i:02d}" for i in range(1, 21)]
    assert [r["seen_in_training"] for r in out["runs"]] == [True] * 8 + [False] * 12
    assert out["mean_error"] == pytest.approx(np.mean([r["error"] for r in out["runs"]]))
    assert f"mean over the 20 runs: error {100 * out['mean_error']:.2f}%" in p.stdout
    assert "people 4.5%" in p.stdout and out["published"]["people"] == 0.045
    assert not (run / "eval.json").exists()           # the episode evaluation's file is not touched
    p = cli("--plot-lake", str(run / "eval_lake.json"))
    assert p.returncode == 0, p.stderr
    # a run folder's own eval_lake.json is named by the folder
    low, high = sp.lake.error_interval(out["mean_error"])
    assert (f"| run | 1 | {100 * out['mean_error']:.2f}% ({100 * low:.1f} to {100 * high:.1f}) |" in p.stdout
            and "| published: people | | 4.5% | |" in p.stdout)
    assert (run / "lake_errors.png").read_bytes()[:4] == b"\x89PNG"
    for args, message in ((["--lake"], "--lake goes with --eval CKPT"),
                          (["--eval", str(run / "best.npz"), "--lake", "--standard"], "in place of --standard"),
                          (["--train-split", "background", "--trainval"], "contradict each other"),
                          (["--no-rotations", "--data", str(data)], "--no-rotations goes with --train-split background")):
        p = cli(*args)
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_error_interval_is_wilsons():
    """Known cases, and a dense reference: the interval is the set of true error rates p0 that a
    normal test would not reject at 5%, (p - p0)^2 <= z^2 p0 (1 - p0) / n, found on a fine grid."""
    from scratchproto.lake import error_interval
    low, high = error_interval(0.0)
    assert low == 0.0 and abs(high - 1.96 ** 2 / (400 + 1.96 ** 2)) < 1e-12      # no error in 400 trials
    assert error_interval(0.5)[0] == pytest.approx(1 - error_interval(0.5)[1])    # symmetric at 1/2
    grid = np.linspace(0, 1, 2_000_001)
    for p, runs in ((0.1, 20), (0.0325, 20), (0.15, 5)):
        n = runs * 20
        inside = grid[(p - grid) ** 2 <= 1.96 ** 2 * grid * (1 - grid) / n]
        low, high = error_interval(p, runs)
        assert abs(low - inside.min()) < 1e-6 and abs(high - inside.max()) < 1e-6
