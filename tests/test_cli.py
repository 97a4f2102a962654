"""run.py as a user meets it: help, one-line errors with a non-zero exit, the three modes."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO

pytestmark = pytest.mark.usefixtures("omniglot")


def run(*args, data=None):
    cmd = [sys.executable, str(REPO / "run.py"), *args, "--no-progress"]
    if data is not None:
        cmd += ["--data", str(data), "--mirror", "http://127.0.0.1:9/offline"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def test_help_lists_the_protocol_and_its_defaults():
    p = run("--help")
    assert p.returncode == 0
    for text in ("--train-way", "(default: 60)", "--patience", "(default: 200)", "--lr-step", "--trainval",
                 "--resume", "--eval", "--plot", "--plot-sweep", "--standard", "--mirror", "SCRATCHPROTO_MIRROR",
                 "--train-split", "--no-rotations", "--within-alphabet", "--lake", "--plot-lake", "--strip"):
        assert text in p.stdout, text


@pytest.mark.parametrize("args,message", [
    (["--train-way", "5000"], "error: --train-way = 5000 exceeds the 4112 classes of split 'train'"),
    (["--eval", "missing.npz"], "error: no checkpoint at missing.npz"),
    (["--plot", "nowhere"], "error: no trace at nowhere/trace.jsonl"),
    (["--resume", "nowhere"], "error: nowhere is not a run folder to resume (it does not exist)"),
    (["--eval", "x.npz", "--plot", "y"], "error: choose one of --resume, --eval, --plot, --plot-sweep, --plot-lake, --plot-seeds and --strip"),
    (["--strip", "a.npz", "./a.npz"], "error: --strip CKPT DEST: DEST must be another file than CKPT"),
    (["--strip", "missing.npz", "b.npz"], "error: no checkpoint at missing.npz"),
    (["--plot-sweep", "nowhere"], "error: no trace at nowhere/trace.jsonl"),
    (["--plot", "y", "--at-epoch", "3"], "error: --at-epoch N goes with --plot-sweep"),
])
def test_bad_requests_give_one_line_and_exit_2(omniglot, args, message):
    p = run(*args, data=omniglot.root)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [message] or (
        len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith(message)), p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_backbone_is_refused_by_the_parser():
    p = run("--backbone", "vgg")
    assert p.returncode == 2 and "invalid choice: 'vgg'" in p.stderr and "Traceback" not in p.stderr


def test_foreign_checkpoint(omniglot, tmp_path):
    np.savez(tmp_path / "other.npz", w=np.zeros(2))
    p = run("--eval", str(tmp_path / "other.npz"), data=omniglot.root)
    assert p.returncode == 2 and "is not a scratchproto checkpoint" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_train_then_eval_then_plot(omniglot, tmp_path):
    out = tmp_path / "run"
    tiny = ["--width", "8", "--device", "cpu", "--epochs", "1", "--train-way", "5", "--train-shot", "2",
            "--train-query", "2", "--train-episodes", "2", "--val-way", "3", "--val-episodes", "2"]
    p = run(*tiny, "--out", str(out), data=omniglot.root)
    assert p.returncode == 0, p.stderr
    assert "epoch    1" in p.stdout and "val loss" in p.stdout and "done after epoch 1" in p.stdout
    # the first line and config.json say where it ran, and on how many threads
    from scratchproto import fast
    threads = fast.cpu_threads()            # this environment's budget, as the run's process sees it
    assert p.stdout.splitlines()[0].startswith(
        f"convnet (1,896 parameters) on cpu, {threads} thread{'s' if threads > 1 else ''}; run folder ")
    saved = json.loads((out / "config.json").read_text())
    assert (saved["device"], saved["ran_on"], saved["gpu"], saved["threads"]) == ("cpu", "cpu", None, threads)
    again = run(*tiny, "--out", str(out), data=omniglot.root)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    p = run("--eval", str(out / "best.npz"), "--way", "5", "--shot", "1", "--query", "3", "--episodes", "3",
            "--device", "cpu", data=omniglot.root)
    assert p.returncode == 0, p.stderr
    assert "test 5-way 1-shot 3-query, 3 episodes: acc" in p.stdout and "95% CI" in p.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["results"][0]["way"] == 5 and result["split"] == "test"
    assert "image_size" not in result              # the paper's 28: the file as it always was
    # the weights alone: smaller, evaluates to the same numbers, cannot be resumed
    p = run("--strip", str(out / "best.npz"), str(tmp_path / "model.npz"))
    assert p.returncode == 0 and "without the optimiser's state" in p.stdout, p.stderr
    assert (tmp_path / "model.npz").stat().st_size < 0.5 * (out / "best.npz").stat().st_size
    p = run("--eval", str(tmp_path / "model.npz"), "--way", "5", "--shot", "1", "--query", "3", "--episodes", "3",
            "--device", "cpu", "--eval-out", str(tmp_path / "stripped.json"), data=omniglot.root)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "stripped.json").read_text())["results"] == result["results"]
    (tmp_path / "model.npz").replace(out / "last.npz")
    p = run("--resume", str(out), data=omniglot.root)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: {out / 'last.npz'} holds no optimiser state (a copy written by --strip): it can be "
        f"evaluated, not resumed"), p.stderr
    (out / "curves.png").unlink()
    p = run("--plot", str(out))
    assert p.returncode == 0 and (out / "curves.png").exists()
    assert f"wrote {out / 'episode_geometry.png'}" in p.stdout and (out / "episode_geometry.png").stat().st_size > 10_000
    p = run("--plot-sweep", str(out))
    assert p.returncode == 0 and (tmp_path / "nc_vs_parameters.png").exists()
    assert "| convnet width 8 |" in p.stdout


def test_gpu_request_without_gpu_warns_once_and_falls_back(capsys):
    from scratchproto import backend
    if backend._cupy_or_reason()[0] is not None:
        pytest.skip("a GPU is present here")
    assert backend.get_xp("gpu") is np
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --device gpu asked for, but ")
    assert err[0].endswith("falling back to NumPy on the CPU")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.get_xp("tpu")


def test_resume_refuses_a_changed_setting_naming_it(tmp_path):
    """--resume keeps the run's settings: a flag that would change one is an error, not ignored
    (before any run folder is even looked at); --epochs, --patience, --device and where the data
    are may change."""
    p = run("--resume", str(tmp_path / "nowhere"), "--lr", "0.01", "--train-way", "20", "--no-rotations")
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: a resumed run keeps its settings (its config.json): --lr, --no-rotations, --train-way "
        "cannot change on --resume; only --epochs, --patience, --device, --data, --mirror can"), p.stderr
    p = run("--resume", str(tmp_path / "nowhere"), "--epochs", "9", "--patience", "3", "--device", "cpu")
    assert p.returncode == 2 and "is not a run folder to resume" in p.stderr, p.stderr


def test_a_missing_gpu_is_named_and_can_be_made_an_error(monkeypatch, tmp_path):
    from scratchproto import backend
    if backend._cupy_or_reason()[0] is not None:
        pytest.skip("a GPU is present here")
    why = backend._cupy_or_reason()[1]
    assert backend.describe(np, "cpu") == "cpu" and backend.describe(np, "auto") == "cpu"
    assert backend.describe(np, "gpu") == f"cpu (--device gpu asked for, but {why})"
    monkeypatch.setenv(backend.REQUIRE_GPU_ENV, "1")
    with pytest.raises(backend.UserError, match=r"^--require-gpu: "):
        backend.get_xp("gpu")
    assert backend.get_xp("cpu") is np          # the requirement is about --device gpu only
    # on the command line: one line, before any data are touched (no --data folder is made)
    p = run("--require-gpu", "--epochs", "1", "--out", str(tmp_path / "run"), data=tmp_path / "data")
    assert p.returncode == 2 and p.stderr.strip() == f"error: --require-gpu: {why}", p.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
    p = run("--require-gpu", "--device", "cpu")
    assert p.returncode == 2 and p.stderr.strip() == "error: --require-gpu goes with --device gpu, not --device cpu"


def test_a_gpu_is_named_by_its_model():
    """describe() and gpu_model() on a stand-in for CuPy (the real one needs a GPU)."""
    import types
    from scratchproto import backend
    runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceProperties=lambda i: {"name": b"NVIDIA H200"})
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    assert backend.gpu_model(fake) == "NVIDIA H200" and backend.gpu_model(np) is None
    assert backend.describe(fake, "gpu") == "gpu (NVIDIA H200)" == backend.describe(fake, "auto")


def test_sigterm_interrupts_once_and_later_ones_are_ignored():
    spec = importlib.util.spec_from_file_location("run_script", REPO / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    previous = signal.signal(signal.SIGTERM, script._interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)    # the handler runs between bytecodes; it must not get past this
        try:
            os.kill(os.getpid(), signal.SIGTERM)    # the second signal, during the shutdown
            time.sleep(0.1)
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM interrupted the shutdown of the first")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_tf32_is_off_unless_asked_for_and_warns_on_the_cpu(monkeypatch, capsys):
    from scratchproto import backend

    class FakeCupy:        # stands in for CuPy: get_xp's choice of the math mode is what is tested
        __name__ = "cupy"
    monkeypatch.setattr(backend, "_cupy_or_reason", lambda: (FakeCupy, None))
    monkeypatch.setenv("CUPY_TF32", "1")                  # left over in a user's environment
    monkeypatch.delenv(backend.TF32_ENV, raising=False)
    assert backend.get_xp("gpu") is FakeCupy and os.environ["CUPY_TF32"] == "0"
    assert backend.get_xp("gpu", tf32=True) is FakeCupy and os.environ["CUPY_TF32"] == "1"
    monkeypatch.setenv(backend.TF32_ENV, "1")
    backend.get_xp("auto")
    assert os.environ["CUPY_TF32"] == "1"
    capsys.readouterr()
    assert backend.get_xp("cpu") is np
    assert capsys.readouterr().err.strip() == "warning: --tf32 has no effect on the CPU: NumPy computes in plain float32"


def test_compare_without_pytorch_says_how_to_make_it(tmp_path):
    for python, says in ((str(tmp_path / "no-python"), "is not there"), (sys.executable, "cannot import torch")):
        p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), "--torch-python", python],
                           capture_output=True, text=True, cwd=REPO)
        if says == "cannot import torch" and importlib.util.find_spec("torch") is not None:
            continue                        # this Python has torch: nothing to refuse
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.startswith(f"error: --torch-python {python} {says}" if says == "is not there"
                                   else f"error: {python} {says}"), p.stderr
        assert p.stderr.strip().endswith("../torchref/bin/pip install torch==2.13.0 numpy")


def test_ab_refuses_a_folder_without_scratchproto_and_times_two_checkouts(tmp_path):
    ab = [sys.executable, str(REPO / "benchmarks" / "ab.py")]
    p = subprocess.run(ab + [str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {tmp_path} holds no scratchproto/ (give a checkout's root, e.g. a git worktree)"
    p = subprocess.run(ab + [str(REPO), "--way", "2", "--rounds", "2", "--episodes", "1"],   # this checkout twice
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    old, new, ratio = p.stdout.strip().splitlines()
    assert old.startswith(f"old ({REPO}): median ") and new.startswith("new (") and len(old.split("rounds ")[1].split()) == 2
    assert ratio.startswith("new/old: median of the per-round ratios ") and len(ratio.split("(rounds ")[1].split()) == 2


def test_plot_seeds_draws_bands_and_tabulates_mean_and_sd(tmp_path):
    """Two synthetic runs of one model: the table's mean and standard deviation over seeds are
    the plain ones of the two accuracies, and the band figure is written where it says."""
    keys = ["nc1_support", "nc1_query", "nc2_support", "nc2_query"]
    for seed, (acc, shift) in enumerate(((0.9, 0.0), (0.8, 1.0))):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        lines = [json.dumps({"epoch": e, "train": {"loss": 1.0 / e, **{k: shift + 1.0 / e for k in keys}}})
                 for e in (1, 2, 3)]
        (folder / "trace.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "eval.json").write_text(json.dumps({"results": [
            {"way": 5, "shot": 1, "acc": acc, "acc_ci95": 0.01}, {"way": 20, "shot": 5, "acc": acc - 0.1, "acc_ci95": 0.02}]}))
    p = run("--plot-seeds", str(tmp_path / "seed0"), str(tmp_path / "seed1"))
    assert p.returncode == 0, p.stderr
    assert "| 20-way 5-shot | 80.00% ± 2.00 | 70.00% ± 2.00 | 75.00% ± 7.07 |" in p.stdout
    assert "| 5-way 1-shot | 90.00% ± 1.00 | 80.00% ± 1.00 | 85.00% ± 7.07 |" in p.stdout
    figure = tmp_path / "nc_seeds_seed0.png"
    assert figure.stat().st_size > 10_000 and f"wrote {figure}" in p.stdout
