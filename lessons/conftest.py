"""Runs every lesson as a test: the ```python blocks of lessons/NN-*.md, top to bottom, in one
namespace, with matplotlib's Agg backend. A failing block is reported with its line number in the
Markdown file.

The blocks run from a scratch copy of the repository's layout (links to its folders, a fresh
figures/ folder), so that running the tests changes no tracked file; the lessons' own paths
(``figures/...``, ``../results/...``) work as from lessons/. To redraw the committed figures:
``SCRATCHPROTO_LESSON_FIGURES=1 pytest lessons`` runs them in lessons/ itself."""
import os
import re
import tempfile
from pathlib import Path

import pytest

WRITE_FIGURES = "SCRATCHPROTO_LESSON_FIGURES"


def scratch_lessons(lessons):
    """A temporary folder whose lessons/ holds the lessons and an empty figures/, beside links to
    every other top-level entry of the repository; returns (its lessons/ path, the TemporaryDirectory)."""
    tmp = tempfile.TemporaryDirectory(prefix="lessons-")
    root = Path(tmp.name)
    for entry in lessons.parent.iterdir():
        if entry.name != lessons.name:
            (root / entry.name).symlink_to(entry)
    (root / lessons.name).mkdir()
    for entry in lessons.iterdir():
        if entry.name != "figures":
            (root / lessons.name / entry.name).symlink_to(entry)
    (root / lessons.name / "figures").mkdir()
    return root / lessons.name, tmp

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".md" and re.match(r"\d\d-", file_path.name):
        return Lesson.from_parent(parent, path=file_path)


def blocks(text):
    """[(first line number, code)] of the python blocks of a Markdown text."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


class Lesson(pytest.File):
    def collect(self):
        yield LessonRun.from_parent(self, name=self.path.stem)


class LessonRun(pytest.Item):
    def runtest(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        namespace = {"__name__": "__lesson__"}
        here = os.getcwd()
        scratch = None
        if os.environ.get(WRITE_FIGURES) == "1":
            os.chdir(self.path.parent)
        else:
            where, scratch = scratch_lessons(self.path.parent)
            os.chdir(where)
        try:
            for line, code in blocks(self.path.read_text()):
                # padded with newlines so that a traceback's line numbers are the Markdown file's
                exec(compile("\n" * (line - 1) + code, str(self.path), "exec"), namespace)
        finally:
            os.chdir(here)
            plt.close("all")
            if scratch is not None:
                scratch.cleanup()

    def reportinfo(self):
        return self.path, 0, f"lesson {self.name}"
