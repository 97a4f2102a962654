"""Run run.py with one file-system fault injected, as a user's machine might produce it.

    python tests/faults.py FAULT ERRNO PATTERN -- RUN.PY ARGUMENTS...

FAULT is where the fault strikes, on paths whose text contains PATTERN:
  open-write   opening the file for writing fails
  open-read    opening the file for reading fails
  mkdir        creating the folder fails
  write-half   the first write writes half of its bytes, then fails (a disk that fills up
               in the middle of a write)
ERRNO is a name from the errno module: ENOSPC, EACCES, EROFS, ...

The tests need it because they run as root on CI, where permission bits do not stop a write,
and because a full disk or a read-only file system cannot be made without privileges. Python's
open and os.mkdir are wrapped; everything else is the real program.
"""
import builtins
import errno
import io
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    fault, name, pattern = sys.argv[1:4]
    assert sys.argv[4] == "--", "usage: faults.py FAULT ERRNO PATTERN -- ARGS..."
    code = getattr(errno, name)

    def fail(path):
        raise OSError(code, os.strerror(code), str(path))

    real_open, real_mkdir = builtins.open, os.mkdir

    class HalfWrite:
        """A file whose first write stops half-way with the error."""

        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[:len(data) // 2])
            self._f.flush()
            fail(self._f.name)

        def __getattr__(self, attr):
            return getattr(self._f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def opener(file, mode="r", *args, **kwargs):
        hit = isinstance(file, (str, bytes, os.PathLike)) and pattern in os.fsdecode(file)
        writing = any(c in mode for c in "wax+")
        if hit and writing and fault == "open-write" or hit and not writing and fault == "open-read":
            fail(file)
        f = real_open(file, mode, *args, **kwargs)
        return HalfWrite(f) if hit and writing and fault == "write-half" else f

    def mkdir(path, *args, **kwargs):
        if fault == "mkdir" and pattern in os.fsdecode(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = opener
    os.mkdir = mkdir
    sys.argv = [os.path.join(REPO, "run.py")] + sys.argv[5:]
    sys.path.insert(0, REPO)
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
