"""Files on disk: one-line answers for file-system faults, and writes that never lose what was saved.

Every file the program writes (checkpoints, trace.jsonl, config.json, eval.json, figures, the
Omniglot cache) goes through ``atomic_write``: the bytes go to ``<name>.part-<pid>-<random>`` beside the target,
are flushed to the disk, and only then renamed over it. A full disk, a signal or a power cut
therefore leaves either the old file or the new one, never a mixture; trace.jsonl is extended
the same way (``append_line``), so it never ends in half a line.

A file-system error (``OSError``) met on a path the user chose becomes a ``FileError``: one
line naming the path, what is wrong and what to do, which run.py prints before exiting with
status 2.
"""
import errno
import json
import os
import pathlib
import secrets
import sys

from .errors import UserError


class FileError(UserError):
    """A path cannot be read or written; the message names it and says what to do."""


# errno -> (what is wrong, what to do); the rest fall back to the system's own words
_ADVICE = {
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "name a file"),
    errno.EEXIST: ("a file of that name is in the way", "choose another path"),
    errno.EACCES: ("permission denied", "choose a path you may use, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may use, or change its permissions"),
    errno.EROFS: ("the file system is read-only", "choose a path on a writable disk"),
    errno.ENOSPC: ("no space left on the disk", "free some space and run again"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space and run again"),
}


def fs_error(e, path, doing, hint=None):
    """The FileError for OSError ``e`` met while ``doing`` ('read', 'write', 'create') ``path``.

    ``hint``, where given, replaces the generic advice (e.g. how to resume a run).
    """
    what, todo = _ADVICE.get(e.errno, (e.strerror or str(e), "check the path"))
    return FileError(f"cannot {doing} {path}: {what}; {hint or todo}")


def ensure_folder(path, what="folder"):
    """Create folder ``path`` (and its parents) unless it exists; FileError when it cannot be."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileError(f"{what} {path} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:   # a parent is a file
        raise FileError(f"cannot create {what} {path}: a part of the path is a file, not a "
                        f"folder; check the path") from None
    except OSError as e:
        raise fs_error(e, path, f"create {what}") from None
    return path


def read_text(path, what="file"):
    """The text of ``path``; FileError when it is missing or cannot be read."""
    try:
        return pathlib.Path(path).read_text()
    except UnicodeDecodeError:
        raise FileError(f"{what} {path} is not a text file; it may be damaged") from None
    except OSError as e:
        raise fs_error(e, path, f"read {what}") from None


def read_json(path, what="file"):
    """The JSON object in ``path``; FileError when it is missing, unreadable or damaged."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(f"{what} {path} is damaged (not JSON: {e})") from None


def read_jsonl(path, what="trace", is_record=None):
    """The records of a JSON-lines file, one per line, and whether a cut last line was dropped.

    A last line that does not parse is what a crash in the middle of a (non-atomic) write leaves,
    so it is dropped and reported; a bad line before the last is damage, a FileError. So is a
    line that parses but fails ``is_record`` (e.g. ``{}`` or a list in a trace): valid JSON, but
    not a record. Returns (records, dropped: bool).
    """
    lines = read_text(path, what).splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                return records, True
            raise FileError(f"line {i} of {what} {path} is damaged (not JSON); it cannot be "
                            f"read past it") from None
        if is_record is not None and not is_record(record):
            raise FileError(f"line {i} of {what} {path} is damaged (JSON, but not one of its "
                            f"records); it cannot be read past it")
        records.append(record)
    return records, False


def temp_path(path):
    """A temporary name beside ``path`` that no other process uses: ``<name>.part-<pid>-<random>``,
    so that two processes writing the same target never write into, truncate or delete each
    other's half-written file; the last complete write wins whole. Its suffix is the temporary
    part: ``temp_path(p).with_suffix("") == p``."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.name}.part-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path, content, hint=None):
    """Replace ``path`` with ``content`` (str, bytes, or a function that writes to a binary file
    object) all at once: written to a temporary file of this process's own (temp_path), flushed to
    the disk, then renamed.

    On any failure the temporary file is removed and ``path`` is left exactly as it was; an
    OSError becomes a FileError naming ``path`` (``hint``: what to do instead of the generic
    advice).
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_file():      # a device or a pipe (/dev/stdout): write through it
        return _write_through(path, content, hint)
    if path.is_symlink():            # the link stays a link: its target is what is replaced
        path = path.resolve()
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            _put(f, content)
            f.flush()
            os.fsync(f.fileno())     # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise fs_error(e, path, "write", hint) from None
        if not isinstance(e, KeyboardInterrupt) and _interrupted(e):
            # Ctrl-C or SIGTERM arrived inside the writer, whose cleanup then failed on the
            # half-written file (np.savez's zip: "Can't close the ZIP file ..."): an interruption
            raise KeyboardInterrupt from e
        raise
    _sync_folder(path.parent)
    remove_stale_temps(path)


def _write_through(path, content, hint):
    """Write ``content`` into an existing non-regular file (a terminal, a pipe, /dev/stdout): no
    temporary file and no rename, which would replace the device itself with a file."""
    try:
        with open(path, "wb") as f:
            _put(f, content)
    except OSError as e:
        raise fs_error(e, path, "write", hint) from None


def _put(f, content):
    """Write ``content`` (str, bytes, or a function that writes to a binary file) into ``f``."""
    if callable(content):
        content(f)
    else:
        f.write(content.encode() if isinstance(content, str) else content)


def remove_stale_temps(path):
    """Delete the temporary files beside ``path`` that processes which no longer exist left behind
    (killed while writing it: SIGKILL, a power cut); a living process's are left alone."""
    path = pathlib.Path(path)
    for tmp in path.parent.glob(f"{glob_escape(path.name)}.part-*-*"):
        try:
            pid = int(tmp.name[len(path.name) + len(".part-"):].split("-")[0])
            os.kill(pid, 0)
        except ValueError:
            continue                      # not one of ours
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            continue                      # alive, or not ours to ask about


def glob_escape(name):
    """``name`` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _interrupted(e):
    """Whether a KeyboardInterrupt is among the exceptions that ``e`` was raised while handling."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__context__
    return False


def append_line(path, line, hint=None):
    """Add ``line`` (no newline) to the text file ``path`` as its last line, atomically: the file
    is rewritten whole, so a failure leaves it as it was, never with half a line at its end."""
    path = pathlib.Path(path)
    try:
        old = path.read_bytes() if path.exists() else b""
    except OSError as e:
        raise fs_error(e, path, "read") from None
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write(path, old + line.encode() + b"\n", hint)


def _sync_folder(folder):
    """Flush a folder's entries (the rename) to the disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path, what="file", hint=None):
    """Fail now, before long work, if ``path`` could not be written later (``hint``: what to do)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise FileError(f"cannot write {what} {path}: it is a folder, not a file; name a file")
    if path.exists() and not path.is_file():      # a device or pipe: written through, if allowed
        if not os.access(path, os.W_OK):
            raise FileError(f"cannot write {what} {path}: permission denied")
        return
    if path.is_symlink():
        path = path.resolve()
    if not path.parent.is_dir():
        why = "does not exist" if not path.parent.exists() else "is a file, not a folder"
        raise FileError(f"cannot write {what} {path}: its folder {path.parent} {why}; create it "
                        f"or choose another path")
    probe = temp_path(path)        # its own: never another process's half-written file
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise fs_error(e, path, f"write {what}", hint) from None


class FolderLock:
    """Held while a run trains in a folder, so that a second run.py pointed at it refuses at once.

    An advisory lock (flock) on the folder itself: the system releases it when the process ends
    in any way, SIGKILL included, so it is never left behind. Where flock does not exist (Windows)
    the lock is a no-op, and where the file system refuses it (ENOSYS, EOPNOTSUPP, ENOLCK on some
    network file systems) it warns and does without: only "would block" means busy.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as run_dir, FolderLock(run_dir):
    ...     pass                                   # train here; another FolderLock(run_dir) fails
    """

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        try:
            self.fd = os.open(self.folder, os.O_RDONLY)
        except OSError as e:
            raise fs_error(e, self.folder, "open run folder") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:          # "would block": another process holds it
            os.close(self.fd)
            self.fd = None
            raise FileError(f"{self.folder} is in use by another run.py that is training there; "
                            f"wait for it to end, or choose another --out") from None
        except OSError as e:             # no flock here (some network file systems): not "busy"
            print(f"warning: {self.folder} cannot be locked on this file system ({e.strerror}): "
                  f"a second run.py pointed at it would not be stopped", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)    # closing the descriptor releases the lock
            self.fd = None
