"""run.py against an unlucky user: impossible numbers, wrong paths, unreadable and unwritable files, a
full disk part-way through a write, damaged files, a crash, two runs in one folder.

Each class of fault is one test that runs the CLI as a subprocess, as a user would, and asserts:
exit status 2, one line on stderr naming the path or flag, no traceback, and where it applies that
what was saved before is unchanged byte for byte. Faults that root (CI) cannot make with
permission bits, and that need privileges to make for real (a read-only or full file system),
are injected by tests/faults.py.
"""
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import scratchproto as sp
from helpers import REPO, http_mirror, trace_without_seconds
from scratchproto import files

pytestmark = pytest.mark.usefixtures("omniglot")

TINY = ["--width", "8", "--device", "cpu", "--train-way", "5", "--train-shot", "2", "--train-query", "2",
        "--train-episodes", "3", "--val-way", "3", "--val-episodes", "2", "--seed", "7"]
OFFLINE = "http://127.0.0.1:9/offline"


def cli(*args, data=None, fault=None, timeout=120):
    """run.py ARGS (with fault = (FAULT, ERRNO, PATTERN): through tests/faults.py)."""
    prefix = [str(REPO / "tests" / "faults.py"), *fault, "--"] if fault else [str(REPO / "run.py")]
    cmd = [sys.executable, *prefix, *args, "--no-progress"]
    if data is not None:
        cmd += ["--data", str(data), "--mirror", OFFLINE]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def one_line_error(p, *needles):
    """Exit 2, a single 'error: ...' line on stderr containing every needle, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished(omniglot, tmp_path_factory):
    """A finished 2-epoch tiny run with an evaluation, copied fresh by each test that alters it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    p = cli(*TINY, "--epochs", "2", "--out", str(run), data=omniglot.root)
    assert p.returncode == 0, p.stderr
    p = cli("--eval", str(run / "best.npz"), "--way", "3", "--shot", "1", "--query", "2", "--episodes", "2",
            "--device", "cpu", data=omniglot.root)
    assert p.returncode == 0, p.stderr
    return run


def fresh(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# -- numbers ------------------------------------------------------------------------------------

def test_every_numeric_flag_is_checked_before_any_work(tmp_path):
    data = tmp_path / "never-created"     # any work (the data first) would create it
    cases = [(flag, value, "must be a positive integer") for flag in (
        "--width", "--epochs", "--patience", "--lr-step", "--train-way", "--train-shot", "--train-query",
        "--train-episodes", "--val-way", "--val-shot", "--val-query", "--val-episodes", "--way", "--shot",
        "--query", "--episodes") for value in ("0",)]
    cases += [("--train-episodes", "-3", "must be a positive integer, got -3"),
              ("--at-epoch", "0", "must be a positive integer"),
              ("--seed", "-1", "must be a non-negative integer, got -1"),
              ("--lr", "nan", "must be a finite number > 0, got nan"),
              ("--lr", "inf", "must be a finite number > 0, got inf"),
              ("--lr", "-0.1", "must be a finite number > 0"),
              ("--lr-gamma", "0", "must be a factor with 0 < lr-gamma <= 1"),
              ("--lr-gamma", "nan", "must be a factor with 0 < lr-gamma <= 1"),
              ("--weight-decay", "-1e-4", "must be a finite number >= 0"),
              ("--weight-decay", "inf", "must be a finite number >= 0"),
              ("--train-way", "1", "must be at least 2"),
              ("--val-query", "20", "--val-shot + --val-query = 25 exceeds the 20 drawers")]
    for flag, value, message in cases:
        extra = ["--plot-sweep", "x"] if flag == "--at-epoch" else []
        p = cli(*extra, f"{flag}={value}", "--data", str(data))
        one_line_error(p, flag, message)
    for mode in (["--resume", str(tmp_path)], ["--eval", str(tmp_path / "x.npz")]):
        p = cli(*mode, "--epochs" if mode[0] == "--resume" else "--episodes", "0", "--data", str(data))
        one_line_error(p, "must be a positive integer, got 0")
    p = cli("--lr", "fast")           # not a number at all: argparse's own two lines, exit 2
    assert p.returncode == 2 and "argument --lr: invalid float value: 'fast'" in p.stderr
    assert not data.exists()


# -- paths: missing, or the wrong kind --------------------------------------------------------

def test_missing_paths_and_paths_of_the_wrong_kind(omniglot, finished, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    one_line_error(cli(*TINY, "--out", str(a_file), data=omniglot.root), a_file, "is a file, not a folder")
    one_line_error(cli(*TINY, "--out", str(a_file / "run"), data=omniglot.root), a_file / "run",
                   "a part of the path is a file")
    one_line_error(cli(*TINY, "--out", str(tmp_path / "r"), "--data", str(a_file)), a_file,
                   "is a file, not a folder")
    assert not (tmp_path / "r").exists()        # a start that failed leaves no empty run folder
    one_line_error(cli("--resume", str(a_file), data=omniglot.root), a_file, "it is a file")
    one_line_error(cli("--resume", str(tmp_path / "gone"), data=omniglot.root), tmp_path / "gone",
                   "it does not exist")
    one_line_error(cli("--eval", str(finished), data=omniglot.root), finished, "is a folder, not a checkpoint",
                   finished / "best.npz")
    one_line_error(cli("--eval", str(tmp_path / "gone.npz"), data=omniglot.root), "no checkpoint at")
    one_line_error(cli("--eval", str(finished / "best.npz"), "--eval-out", str(tmp_path), data=omniglot.root),
                   tmp_path, "it is a folder, not a file")
    one_line_error(cli("--eval", str(finished / "best.npz"), "--eval-out", str(tmp_path / "no" / "e.json"),
                       data=omniglot.root), tmp_path / "no", "does not exist")
    one_line_error(cli("--plot", str(a_file)), a_file, "no trace at")
    one_line_error(cli("--plot-sweep", str(finished), str(tmp_path / "gone")), "no trace at")


# -- paths: not readable, not writable, read-only -----------------------------------------------

def test_unreadable_and_unwritable_paths(omniglot, finished, tmp_path):
    run = fresh(finished, tmp_path)
    # a run folder whose parent may not be written to
    p = cli(*TINY, "--out", str(tmp_path / "locked" / "run"), data=omniglot.root,
            fault=("mkdir", "EACCES", "locked"))
    one_line_error(p, "cannot create run folder", tmp_path / "locked", "permission denied")
    # a run folder on a read-only file system (it exists, nothing can be written into it)
    ro = tmp_path / "ro"
    ro.mkdir()
    p = cli(*TINY, "--out", str(ro), data=omniglot.root, fault=("open-write", "EROFS", str(ro)))
    one_line_error(p, "cannot write", ro / "config.json", "read-only")
    # an Omniglot archive that may not be read (the cache is gone, so it must be)
    data = tmp_path / "data"
    shutil.copytree(omniglot.root, data)
    (data / "cache28.npz").unlink()
    p = cli("--eval", str(run / "best.npz"), "--episodes", "1", "--eval-out", str(tmp_path / "e.json"),
            data=data, fault=("open-read", "EACCES", "images_background.zip"))
    one_line_error(p, "cannot read", data / "images_background.zip", "permission denied")
    # a checkpoint that may not be read
    p = cli("--eval", str(run / "best.npz"), data=omniglot.root, fault=("open-read", "EACCES", "best.npz"))
    one_line_error(p, "cannot read checkpoint", run / "best.npz", "permission denied")
    # a trace that may not be read
    p = cli("--plot", str(run), fault=("open-read", "EACCES", "trace.jsonl"))
    one_line_error(p, run / "trace.jsonl", "permission denied")
    # an evaluation that could not be written is refused before it runs, not after
    before = (run / "eval.json").read_bytes()
    p = cli("--eval", str(run / "best.npz"), data=omniglot.root, fault=("open-write", "EROFS", "eval.json"))
    one_line_error(p, run / "eval.json", "read-only")
    assert "acc" not in p.stdout and (run / "eval.json").read_bytes() == before
    # figures into a read-only folder; the old ones are kept
    before = (run / "curves.png").read_bytes()
    p = cli("--plot", str(run), fault=("open-write", "EROFS", "curves.png"))
    one_line_error(p, run / "curves.png", "read-only")
    assert (run / "curves.png").read_bytes() == before
    # a download into a data folder that may not be written: named, and nothing half-written kept
    empty = tmp_path / "empty-data"
    empty.mkdir()
    p = cli(*TINY, "--out", str(tmp_path / "r2"), "--data", str(empty), "--mirror", str(omniglot.root),
            fault=("open-write", "EACCES", "splits"))
    one_line_error(p, "cannot write", empty / "splits" / "vinyals" / "train.txt", "--data")
    assert not list((empty / "splits" / "vinyals").iterdir())


# -- a full disk part-way through a write: nothing saved is lost --------------------------------

def test_disk_full_in_the_middle_of_a_write_keeps_the_old_file(omniglot, finished, tmp_path):
    straight = tmp_path / "straight"
    assert cli(*TINY, "--epochs", "3", "--out", str(straight), data=omniglot.root).returncode == 0
    val = [r["val"]["loss"] for r in trace_without_seconds(straight)]
    epoch3_is_best = val[2] < min(val[:2])
    # an epoch writes trace.jsonl, then best.npz (if it is the best so far), then last.npz: each
    # fails in turn, in a copy of a finished 2-epoch run continued for a third epoch
    for name in ("trace.jsonl", "best.npz", "last.npz"):
        run = fresh(finished, tmp_path / name.split(".")[0])    # (the fault matches file names)
        before = (run / name).read_bytes()
        p = cli("--resume", str(run), "--epochs", "3", fault=("write-half", "ENOSPC", name))
        if name == "best.npz" and not epoch3_is_best:
            assert p.returncode == 0, p.stderr       # best.npz was not written, so nothing failed
        else:
            one_line_error(p, "cannot write", run / name, "no space left", "--resume", "last.npz holds epoch 2")
            assert (run / name).read_bytes() == before
            assert sp.checkpoint.load(run / "last.npz")[0]["epoch"] == 2
            assert not list(run.glob("*.part*"))
        # once there is space again, the run continues as if nothing had happened
        assert cli("--resume", str(run), "--epochs", "3").returncode == 0
        assert trace_without_seconds(run) == trace_without_seconds(straight)
    run = fresh(finished, tmp_path / "other")
    saved = {name: (run / name).read_bytes() for name in ("eval.json", "curves.png")}
    # the evaluation and the figures
    p = cli("--eval", str(run / "best.npz"), "--way", "3", "--shot", "1", "--query", "2", "--episodes", "2",
            "--device", "cpu", data=omniglot.root, fault=("write-half", "ENOSPC", "eval.json"))
    one_line_error(p, run / "eval.json", "no space left")
    assert (run / "eval.json").read_bytes() == saved["eval.json"]
    one_line_error(cli("--plot", str(run), fault=("write-half", "ENOSPC", "curves.png")), run / "curves.png")
    assert (run / "curves.png").read_bytes() == saved["curves.png"]
    # the cache only saves time: a failed cache write warns, and the run goes on without it
    data = tmp_path / "data"
    shutil.copytree(omniglot.root, data)
    (data / "cache28.npz").unlink()
    p = cli(*TINY, "--epochs", "1", "--out", str(tmp_path / "r3"), data=data,
            fault=("write-half", "ENOSPC", "cache28"))
    assert p.returncode == 0, p.stderr
    assert "warning: cannot write" in p.stderr and "cache28.npz" in p.stderr and "Traceback" not in p.stderr
    assert not (data / "cache28.npz").exists() and not list(data.glob("*.part*"))


# -- damaged derived files ----------------------------------------------------------------------

def test_damaged_files_are_rebuilt_or_refused(omniglot, finished, tmp_path):
    # the cache, cut short or from another version: rebuilt, same images
    data = tmp_path / "data"
    shutil.copytree(omniglot.root, data)
    cache = data / "cache28.npz"
    cache.write_bytes(cache.read_bytes()[:100_000])
    np.testing.assert_array_equal(sp.Omniglot(data, OFFLINE, progress=False).bits, omniglot.bits)
    with np.load(cache) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    np.savez(cache, meta=json.dumps({**meta, "format": -1}), **arrays)
    np.testing.assert_array_equal(sp.Omniglot(data, OFFLINE, progress=False).bits, omniglot.bits)
    with np.load(cache) as z:
        assert json.loads(str(z["meta"]))["format"] == meta["format"]
    # a checkpoint cut short: refused, with what to do
    run = fresh(finished, tmp_path)
    for name in ("best.npz", "last.npz"):
        (run / name).write_bytes((run / name).read_bytes()[:5000])
    one_line_error(cli("--eval", str(run / "best.npz"), data=omniglot.root), run / "best.npz", "is damaged",
                   "use another checkpoint")
    one_line_error(cli("--resume", str(run)), run / "last.npz", "is damaged", "copy best.npz over last.npz")
    # a config.json that is not JSON
    run = fresh(finished, tmp_path / "b")
    (run / "config.json").write_text('{"config": {"backbone": "conv')
    one_line_error(cli("--resume", str(run)), run / "config.json", "is damaged")
    # a trace whose last line was cut by a crash: plotted without it, and cut back on --resume
    run = fresh(finished, tmp_path / "c")
    good = (run / "trace.jsonl").read_text()
    (run / "trace.jsonl").write_text(good + good.splitlines()[0][:50])
    p = cli("--plot", str(run))
    assert p.returncode == 0 and "warning: the last line of" in p.stderr and "cut short" in p.stderr
    p = cli("--resume", str(run), "--epochs", "2")
    assert p.returncode == 0, p.stderr
    assert (run / "trace.jsonl").read_text() == good
    # damage before the last line is not guessed around
    lines = good.splitlines()
    (run / "trace.jsonl").write_text(lines[0][:50] + "\n" + lines[1] + "\n")
    one_line_error(cli("--plot", str(run)), "line 1 of trace", run / "trace.jsonl", "is damaged")


def test_resume_after_sigkill_continues_with_a_continuous_trace(omniglot, tmp_path):
    straight = tmp_path / "straight"
    assert cli(*TINY, "--epochs", "8", "--out", str(straight), data=omniglot.root).returncode == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "run.py"), *TINY, "--epochs", "1000", "--out", str(run),
           "--data", str(omniglot.root), "--mirror", OFFLINE, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ((run / "trace.jsonl").exists() and (run / "trace.jsonl").read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)      # no handler runs: as a power cut, mid-epoch or mid-write
        proc.wait()
    # the trace may hold an epoch that last.npz does not (killed between the two writes)
    p = cli("--resume", str(run), "--epochs", "8")
    assert p.returncode == 0, p.stderr
    assert trace_without_seconds(run) == trace_without_seconds(straight)


def test_a_second_run_in_the_same_folder_refuses_and_leaves_the_first_alone(omniglot, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "run.py"), *TINY, "--epochs", "1000", "--out", str(run),
           "--data", str(omniglot.root), "--mirror", OFFLINE, "--no-progress"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def epochs_done():
        path = run / "trace.jsonl"
        return path.read_text().count("\n") if path.exists() else 0
    try:
        deadline = time.monotonic() + 60
        while not (run / "config.json").exists():    # written once the folder is locked and data loaded
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.01)
        second = cli(*TINY, "--epochs", "6", "--out", str(run), data=omniglot.root)
        resumed = cli("--resume", str(run))
        done = epochs_done()
        while epochs_done() < done + 2:               # and the first run goes on, undisturbed
            assert time.monotonic() < deadline + 60 and first.poll() is None
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGTERM)             # 1000 epochs: it is stopped, as a user would
        out, err = first.communicate(timeout=120)
    one_line_error(second, run, "is in use by another run.py")
    assert "already holds" not in second.stderr
    one_line_error(resumed, run, "is in use by another run.py")
    assert first.returncode == 130 and "Traceback" not in err, err
    epochs = [r["epoch"] for r in trace_without_seconds(run)]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    # (stopped between its trace line and its checkpoint, the trace is one epoch ahead: resume cuts it)
    saved = sp.checkpoint.load(run / "last.npz")[0]["epoch"]
    assert saved in (epochs[-1], epochs[-1] - 1)
    # the lock goes with the process: once the first has ended, the folder can be resumed
    assert cli("--resume", str(run), "--epochs", str(saved + 1)).returncode == 0
    assert [r["epoch"] for r in trace_without_seconds(run)] == list(range(1, saved + 2))


def test_an_unforeseen_file_system_fault_is_still_one_line(monkeypatch, capsys):
    """The safety net in run.py: an OSError that no code worded still names its path, exit 2."""
    spec = importlib.util.spec_from_file_location("run_script", REPO / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def fails(run_dir, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/curves.png")
    monkeypatch.setattr(sp.plots, "plot_run", fails)
    assert script.cli(["--plot", "x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot use /somewhere/curves.png: permission denied; choose a path you may use, or change "
        "its permissions"]


def test_atomic_write_keeps_the_old_file_whatever_stops_it(tmp_path):
    path = tmp_path / "last.npz"
    path.write_bytes(b"old checkpoint")

    def interrupted(f):
        f.write(b"half of a new")
        raise KeyboardInterrupt          # Ctrl-C in the middle of a checkpoint
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, interrupted)
    assert path.read_bytes() == b"old checkpoint" and not list(tmp_path.glob("*.part*"))
    # a trace whose last line lost its newline (written by hand, or by an older version) is mended
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"epoch": 1}')
    files.append_line(trace, '{"epoch": 2}')
    assert trace.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_an_interruption_inside_a_writer_whose_cleanup_fails_is_still_an_interruption(tmp_path):
    """SIGTERM inside np.savez: its zip's cleanup then raises ValueError over the KeyboardInterrupt;
    atomic_write still reports the interruption (run.py exits 130) and keeps the old file."""
    path = tmp_path / "last.npz"
    path.write_bytes(b"old checkpoint")

    def interrupted_savez(f):
        try:
            f.write(b"half of a zip")
            raise KeyboardInterrupt
        finally:
            raise ValueError("Can't close the ZIP file while there is an open writing handle on it.")
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, interrupted_savez)
    assert path.read_bytes() == b"old checkpoint" and not list(tmp_path.glob("*.part*"))
    with pytest.raises(ValueError):      # a writer's own error, without an interruption, stays itself
        files.atomic_write(path, lambda f: int("x"))


# -- two processes, one file: each process's temporary files are its own -------------------------

def test_two_processes_writing_one_file_never_mix_or_lose_it(tmp_path):
    """Real processes, each rewriting the same target many times with its own content: every
    read sees one process's content whole, and no temporary file is left."""
    target = tmp_path / "eval.json"
    code = ("import sys; from scratchproto import files\n"
            "for i in range(200): files.atomic_write(sys.argv[1], sys.argv[2] * 5000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), mark], cwd=REPO) for mark in "AB"]
    seen = set()
    while any(p.poll() is None for p in procs):
        if target.exists():
            text = target.read_text()
            seen.add(text[0])
            assert text in ("A" * 5000, "B" * 5000)
    assert [p.returncode for p in procs] == [0, 0]
    assert target.read_text() in ("A" * 5000, "B" * 5000) and not list(tmp_path.glob("*.part*"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "last.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"last.npz.part-{int(dead.stdout)}-0badf00d"      # a process that is gone
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f"last.npz.part-{os.getpid()}-1234abcd"           # this one is writing still
    alive.write_bytes(b"being written")
    other = tmp_path / "last.npz.part-notapid-x"
    other.write_bytes(b"not ours")
    sp.files.atomic_write(target, b"the checkpoint")
    assert target.read_bytes() == b"the checkpoint"
    assert not stale.exists() and alive.exists() and other.exists()


def test_several_runs_on_one_empty_data_folder_download_it_once_each_intact(omniglot, tmp_path):
    """Three processes load Omniglot at once into the same empty folder, from the mirror: all of
    them succeed, and the folder holds the verified files and nothing half-written."""
    data = tmp_path / "data"
    code = ("import sys; from scratchproto.omniglot import Omniglot\n"
            "ds = Omniglot(sys.argv[1], sys.argv[2], progress=False); print(len(ds.classes('train')))\n")
    with http_mirror(omniglot.root) as url:
        procs = [subprocess.Popen([sys.executable, "-c", code, str(data), url], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["4112"] * 3
    assert not list(data.rglob("*.part*"))
    assert sp.omniglot.Omniglot(data, "http://127.0.0.1:9/offline", progress=False).classes("test")


# -- traces that are JSON but not traces ----------------------------------------------------------

@pytest.mark.parametrize("line", ["{}", "[1, 2]", '{"epoch": 2}', '{"epoch": "two", "train": {"loss": 1}}', "3"])
def test_a_trace_line_that_is_json_but_no_epoch_record_is_named(finished, tmp_path, line):
    run = fresh(finished, tmp_path)
    lines = (run / "trace.jsonl").read_text().splitlines()
    (run / "trace.jsonl").write_text("\n".join([lines[0], line, lines[1]]) + "\n")
    for args in (["--plot", str(run)], ["--resume", str(run), "--epochs", "3"]):
        one_line_error(cli(*args), f"line 2 of trace {run / 'trace.jsonl'} is damaged (JSON, but not one of its records)")


# -- file systems without flock ---------------------------------------------------------------------

@pytest.mark.parametrize("code", ["ENOSYS", "EOPNOTSUPP", "ENOLCK"])
def test_a_file_system_without_locks_warns_and_does_not_call_the_folder_busy(tmp_path, monkeypatch, capsys, code):
    import fcntl

    def refuse(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    monkeypatch.setattr(fcntl, "flock", refuse)
    with files.FolderLock(tmp_path):
        pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {tmp_path} cannot be locked on this file system")

    def busy(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(files.FileError, match="is in use by another run.py"):
        with files.FolderLock(tmp_path):
            pass


# -- targets that are not plain files ---------------------------------------------------------------

def test_an_evaluation_to_standard_output_or_through_a_link(finished, tmp_path):
    run = fresh(finished, tmp_path)
    args = ["--eval", str(run / "best.npz"), "--way", "3", "--shot", "1", "--query", "2", "--episodes", "2",
            "--device", "cpu"]
    p = subprocess.run([sys.executable, str(REPO / "run.py"), *args, "--eval-out", "/dev/stdout", "--no-progress",
                        "--data", str(sp_data(finished)), "--mirror", OFFLINE], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    start = p.stdout.index("{")
    assert json.loads(p.stdout[start:p.stdout.rindex("}") + 1])["results"][0]["way"] == 3
    assert os.path.islink("/dev/stdout")        # still the system's link, not a file put in its place
    # a link stays a link, and the file it points at gets the evaluation
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    p = cli(*args, "--eval-out", str(link), data=sp_data(finished))
    assert p.returncode == 0, p.stderr
    assert link.is_symlink() and json.loads(real.read_text())["results"][0]["way"] == 3


def sp_data(finished):
    """The Omniglot folder the finished run was trained from."""
    return json.loads((finished / "config.json").read_text())["config"]["data"]


# -- names that are not UTF-8 -----------------------------------------------------------------------

def test_a_run_folder_whose_name_is_not_utf8_trains_and_draws(omniglot, tmp_path):
    if sys.platform != "linux":
        pytest.skip("a file name that is not UTF-8 needs Linux")
    run = tmp_path / os.fsdecode(b"run-\xff\xfe")
    p = cli(*TINY, "--epochs", "1", "--out", str(run), data=omniglot.root)
    assert p.returncode == 0, p.stderr
    assert (run / "curves.png").stat().st_size > 10_000 and "run-\\udcff\\udcfe" in p.stdout
    p = cli("--plot", str(run), data=omniglot.root)
    assert p.returncode == 0, p.stderr


# -- sizes that cannot fit -----------------------------------------------------------------------------

def test_a_run_too_large_for_the_machine_stops_before_allocating(tmp_path):
    p = cli("--width", "100000", "--device", "cpu", "--out", str(tmp_path / "run"), data=tmp_path / "nodata")
    one_line_error(p, "this run needs at least", "GiB of memory (--width 100000", "choose smaller values")
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "run").exists()


# -- checkpoints that lie ------------------------------------------------------------------------------

def _rewrite_checkpoint(src, dst, meta_edit=None, arrays_edit=None):
    with np.load(src) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    if meta_edit:
        meta_edit(meta)
    if arrays_edit:
        arrays_edit(arrays)
    np.savez(dst, meta=json.dumps(meta), **arrays)


@pytest.mark.parametrize("case,edit,needle", [
    ("no backbone", dict(meta_edit=lambda m: m.pop("backbone")), "its metadata lacks 'backbone'"),
    ("no epoch", dict(meta_edit=lambda m: m.pop("epoch")), "its metadata lacks 'epoch'"),
    ("odd backbone", dict(meta_edit=lambda m: m.update(backbone="vgg")), "names backbone 'vgg'"),
    ("width disagrees", dict(meta_edit=lambda m: m.update(width=100000)), "has width 100000"),
    ("width disagrees, plausibly", dict(meta_edit=lambda m: m.update(width=16)),
     "names a convnet of width 16, but its first convolution's weights are (8, 1, 3, 3)"),
    ("backbone disagrees", dict(meta_edit=lambda m: m.update(backbone="resnet18")), "its weights do not fit the resnet18"),
])
def test_a_checkpoint_whose_metadata_lies_is_refused_in_one_line(finished, tmp_path, case, edit, needle):
    bad = tmp_path / "bad.npz"
    _rewrite_checkpoint(finished / "best.npz", bad, **edit)
    p = cli("--eval", str(bad), "--device", "cpu", "--episodes", "2", data=sp_data(finished))
    one_line_error(p, str(bad), "is damaged", needle)


def test_an_array_header_claiming_absurd_size_is_refused_before_reading(finished, tmp_path):
    """An .npy header inside the .npz claims 10^12 floats; the file holds a few bytes: refused
    from the header alone, without allocating."""
    import io
    import zipfile
    bad = tmp_path / "forged.npz"
    shutil.copy(finished / "best.npz", bad)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10 ** 12,)})
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("state.encoder.9.weight.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 16)
    p = cli("--eval", str(bad), "--device", "cpu", data=sp_data(finished))
    one_line_error(p, str(bad), "is damaged or not a scratchproto checkpoint", "claims 4,000,000,000,000 bytes")


def test_a_run_folder_with_another_runs_checkpoint_is_not_resumed(finished, omniglot, tmp_path):
    run = fresh(finished, tmp_path)
    other = tmp_path / "other"
    assert cli(*TINY, "--width", "4", "--epochs", "1", "--out", str(other), data=omniglot.root).returncode == 0
    shutil.copy(other / "last.npz", run / "last.npz")
    p = cli("--resume", str(run), "--epochs", "3")
    one_line_error(p, "holds a convnet of width 4, but the run's config.json trains a convnet of width 8")


def test_two_evaluations_writing_one_file_both_succeed_and_leave_it_whole(finished, tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(REPO / "run.py"), "--eval", str(finished / "best.npz"), "--way", "3", "--shot", "1",
           "--query", "2", "--episodes", "3", "--device", "cpu", "--eval-out", str(out), "--no-progress",
           "--data", str(sp_data(finished)), "--mirror", OFFLINE]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert json.loads(out.read_text())["results"][0]["episodes"] == 3
    assert not list(tmp_path.glob("*.part*"))
