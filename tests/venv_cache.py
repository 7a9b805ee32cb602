"""Virtual environments some tests need beside the main one (the lean runtime without torch, the real TensorRT
bindings): built once per content key under ``~/.cache/dynaip-trt/venvs`` (``DYNAIP_VENV_CACHE`` overrides), so
``.ci/run`` stays the README's one test command and reruns reuse them.

A venv is built in a temporary folder and renamed into place when complete, so an interrupted build is never
reused. A build that cannot reach PyPI fails the test with pip's last lines.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    return Path(os.environ.get("DYNAIP_VENV_CACHE", Path.home() / ".cache" / "dynaip-trt" / "venvs"))


def venv_python(name: str, key_parts: list[str], install: Callable[[Path], None],
                system_site_packages: bool = False) -> Path:
    """The python of venv ``name`` for ``key_parts`` (what is installed: requirement lines, file contents),
    building it with ``install(python)`` when no complete one is cached."""
    key = hashlib.sha256("\n".join([sys.version, *key_parts]).encode()).hexdigest()[:16]
    final = cache_root() / f"{name}-{key}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        args = [sys.executable, "-m", "venv", str(tmp)] + (["--system-site-packages"] if system_site_packages else [])
        subprocess.run(args, check=True, capture_output=True)
        install(tmp / "bin" / "python")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def pip(python: Path, *args: str) -> None:
    """``python -m pip install ...``; on failure the error carries pip's last lines."""
    run = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
