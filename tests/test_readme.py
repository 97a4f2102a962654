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


def test_the_tracked_tree_leaves_room_to_carry_omniglot_to_a_gpu():
    """A call to a lent GPU machine carries the working tree and what it names, 64 MiB in all;
    Omniglot's two archives and split lists take 14.7 MiB, the PyTorch reference and the run
    folder to resume a few more. So the tracked files stay under 44 MiB: a finished run's
    last.npz with Adam's state (1.4 MB a ConvNet, 134 MB a ResNet-18) is no file to commit
    lightly (benchmarks/gpu_check.sh keeps ResNet-18's on the machine)."""
    import subprocess
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        import pytest
        pytest.skip("not a git checkout")
    sizes = {name: (REPO / name).stat().st_size for name in listed.decode().split("\0")
             if name and (REPO / name).is_file()}
    total = sum(sizes.values()) / 2 ** 20
    largest = sorted(sizes, key=sizes.get)[-3:]
    assert total < 44, f"tracked files take {total:.1f} MiB; the largest: {largest}"


def test_the_repository_speaks_of_the_project_alone():
    """No text names a numbered stretch of the project's development or a tracker item, which a
    reader cannot open: dates, commits, commands and run names instead. (Raw logs are outputs
    and are left as they were printed.)"""
    import subprocess
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        import pytest
        pytest.skip("not a git checkout")
    ordinal = r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\d+(?:st|nd|rd|th))"
    pattern = re.compile(r"\b(?:sessions?|sprints?|issues?|tickets?)\s+#?\d+|\b" + ordinal + r"\s+session\b"
                         r"|\b(?:the|this|that)\s+[\w-]+\s+issue\b|\bissue's\b", re.IGNORECASE)
    found = []
    for name in listed.decode().split("\0"):
        if not name.endswith((".md", ".py", ".sh", ".cfg", ".toml", ".txt")) or name == "tests/test_readme.py":
            continue
        path = REPO / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
