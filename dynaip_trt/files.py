"""Atomic writes: readers never see a partial file, and a failed write leaves the previous files in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds (readers never see
    a partial file; a failed block leaves the previous file in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the result gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_files(directory: str | Path, prefix: str = ".staging-") -> Iterator[Path]:
    """Yield a temporary folder inside ``directory``; if the block succeeds, move every file written there into
    ``directory`` (each an atomic rename, replacing same-named files). The folder is always removed, so a failed
    block leaves ``directory`` as it was."""
    directory = Path(directory)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    try:
        yield staging
        for f in sorted(staging.iterdir()):
            if f.is_file():
                os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
