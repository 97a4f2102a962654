"""The documentation's Python examples (README.md and docs/*.md) run as written, in a folder whose
data/omniglot is the test copy."""
import os
import re

from helpers import REPO


def test_documentation_python_blocks_run(omniglot, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    os.symlink(omniglot.root, tmp_path / "data" / "omniglot")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        namespace = {}
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, m.start(1)) + 1
            exec(compile("\n" * (line - 1) + m.group(1), str(page), "exec"), namespace)
            ran += 1
    assert ran >= 2
