"""The README's Python examples run as written (in a folder whose data/omniglot is the test copy)."""
import os
import re

from helpers import REPO


def test_readme_python_blocks_run(omniglot, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    os.symlink(omniglot.root, tmp_path / "data" / "omniglot")
    monkeypatch.chdir(tmp_path)
    text = (REPO / "README.md").read_text()
    blocks = [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
              for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]
    assert len(blocks) >= 2
    namespace = {}
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, str(REPO / "README.md"), "exec"), namespace)
