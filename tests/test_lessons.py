"""The lesson collector: every lesson is a test, and a failing block is reported at its line in
the Markdown file."""
import os
import shutil
import subprocess
import sys

from helpers import REPO


def test_a_failing_lesson_block_is_reported_at_its_markdown_line(tmp_path):
    shutil.copy(REPO / "lessons" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "figures").mkdir()
    (tmp_path / "00-demo.md").write_text(
        "# Demo\n\nText.\n\n```python\nvalue = 41\n```\n\nMore text.\n\n```python\n"
        "value += 1\nassert value == 43, 'the lesson is wrong'\n```\n")
    (tmp_path / "01-fine.md").write_text("```python\nimport numpy as np\nassert np.pi > 3\n```\n")
    (tmp_path / "notes.md").write_text("```python\nraise SystemExit('not a lesson: not run')\n```\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert "1 failed, 1 passed" in p.stdout, p.stdout
    assert "00-demo.md:13: AssertionError" in p.stdout and "the lesson is wrong" in p.stdout, p.stdout


def test_running_the_lessons_changes_no_file_of_theirs(tmp_path):
    """Lessons run from a scratch layout: the figures they save go there, not into lessons/figures,
    while their paths to the rest of the repository (../results, ../benchmarks) still work."""
    lessons = tmp_path / "repo" / "lessons"
    (lessons / "figures").mkdir(parents=True)
    shutil.copy(REPO / "lessons" / "conftest.py", lessons / "conftest.py")
    (tmp_path / "repo" / "marker.txt").write_text("here")
    (lessons / "00-figure.md").write_text(
        "```python\nimport matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
        "fig.savefig('figures/demo.png')\nassert open('../marker.txt').read() == 'here'\n```\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(lessons)],
                       capture_output=True, text=True, cwd=lessons)
    assert "1 passed" in p.stdout, p.stdout
    assert not (lessons / "figures" / "demo.png").exists()
    env = {**os.environ, "SCRATCHPROTO_LESSON_FIGURES": "1"}      # the command that redraws them
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(lessons)],
                       capture_output=True, text=True, cwd=lessons, env=env)
    assert "1 passed" in p.stdout and (lessons / "figures" / "demo.png").exists(), p.stdout


def test_no_lesson_holds_control_characters():
    """A LaTeX command written through a non-raw string (\\times, \\frac, \\rVert) becomes a tab, a
    form feed or a carriage return: broken formulas, and line numbers off by the stray breaks."""
    for path in sorted((REPO / "lessons").glob("*.md")) + sorted((REPO / "exercises").glob("*.md")):
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
            bad = sorted({c for c in line if c < 32})
            assert not bad, f"{path.name}:{number}: control characters {bad}"
