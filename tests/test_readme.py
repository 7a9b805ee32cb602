"""The README tells the truth: its parity table is what ``export.parity --format markdown`` prints for the build its
command makes, its Python snippet runs as written, ``.ci/run`` runs its test command, and neither it nor the docs
point outside the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from export.parity import format_markdown, run_parity

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0].strip()


def rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_parity_table_is_the_commands_output(trained_build):
    """Same rows, results and tolerances; the measured errors within 20% (another CPU may round differently)."""
    fresh = rows(format_markdown(run_parity(trained_build, progress=False)))
    shown = rows(block("<!-- parity-table:start -->", "<!-- parity-table:end -->"))
    assert [r[:4] + r[7:] for r in shown] == [r[:4] + r[7:] for r in fresh]
    for a, b in zip(shown, fresh):
        for x, y in zip(a[4:6], b[4:6]):
            assert abs(float(x) - float(y)) <= 0.2 * max(float(y), 1e-7), (a, b)


def test_python_snippet_runs_as_written(trained_build, tmp_path):
    code = README.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    build = re.search(r'from_dir\("([^"]+)"', code).group(1)
    (tmp_path / build).parent.mkdir(parents=True)
    (tmp_path / build).symlink_to(trained_build)  # what set-up command 1 makes
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.glob("out_api_*.png")) == ["out_api_0.png", "out_api_1.png"]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^pip install .*$", block("## Set-up: two commands", "```\n\n"), re.M)
    assert len(commands) == 2, commands
    assert f"python -m {commands[1]}" in (ROOT / ".ci" / "run").read_text()


def test_docs_stand_alone():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, path
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if not link.startswith("http"):
                assert (path.parent / link).exists(), f"{path.name} links to missing {link}"
