"""Runs every lesson as a test: the ```python blocks of lessons/NN-*.md, top to bottom, in one
namespace, from the lessons/ folder (so that figures land in lessons/figures/), with matplotlib's
Agg backend. A failing block is reported with its line number in the Markdown file."""
import os
import re

import pytest

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
        os.chdir(self.path.parent)
        try:
            for line, code in blocks(self.path.read_text()):
                # padded with newlines so that a traceback's line numbers are the Markdown file's
                exec(compile("\n" * (line - 1) + code, str(self.path), "exec"), namespace)
        finally:
            os.chdir(here)
            plt.close("all")

    def reportinfo(self):
        return self.path, 0, f"lesson {self.name}"
