"""Writing outputs without losing anything: atomic writes, and build folders that only ever replace our own files.

- :func:`atomic_path` / :func:`staged_files`: readers never see a partial file; a failed write leaves the previous
  files in place.
- :func:`claim_dir`: a folder a command writes (a build, a calibration folder) may be new, empty, or hold only files
  this package wrote there before (the caller says which: a manifest lists them). Anything else is refused with
  :class:`~dynaip_trt.errors.OutputError` before any work starts, so ``--engine-dir ~/models`` or ``--engine-dir .``
  can never delete a user's files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import OutputError

# Names our own writers use for temporaries (atomic_path's ".<name>.<random>.tmp", staged_files' prefixes): left
# behind only by a killed process, and ours to replace.
TEMP_NAME = re.compile(r"^\.(.+\.[A-Za-z0-9_]{6,}\.tmp|(staging|engines|fp8)-[A-Za-z0-9_]+)$")


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


def foreign_entries(directory: Path, ours: Iterable[str]) -> list[str]:
    """Paths under ``directory`` (relative, ``/``-separated) that are not ``ours`` nor temporaries of ours: files,
    symlinks, and folders holding nothing of ours. Sorted; symlinks are never followed."""
    ours = set(ours)
    foreign = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        for name in sorted(dirs):
            full = Path(root) / name
            rel = (rel_root / name).as_posix()
            if full.is_symlink():
                dirs.remove(name)
                foreign.append(rel)
            elif TEMP_NAME.match(name):
                dirs.remove(name)  # a staging folder of ours: replaced wholesale
            elif not any(o.startswith(rel + "/") for o in ours):
                dirs.remove(name)
                foreign.append(rel + "/")
        foreign += [r for r in ((rel_root / f).as_posix() for f in sorted(files))
                    if r not in ours and not TEMP_NAME.match(Path(r).name)]
    return sorted(foreign)


def claim_dir(path: str | Path, owned: Callable[[Path], set[str]], what: str) -> Path:
    """The folder to write for ``path`` (symlinks resolved, so a link to a folder keeps pointing at the result),
    after checking that writing there replaces only files of ours.

    Args:
        owned: the files (relative paths) this package wrote in a folder, e.g. those its manifest lists; an empty
            set when the folder is not ours.
        what: how the caller names the path in messages (``"--engine-dir build/tiny"`` for a CLI user,
            ``"out_dir='build/tiny'"`` for a Python caller).

    Raises :class:`OutputError` naming ``what`` and the first foreign entries when the folder exists and holds
    anything else (nothing is changed), or when ``path`` is not a folder.
    """
    real = Path(path).expanduser().resolve()
    if not real.exists():
        return real
    if not real.is_dir():
        raise OutputError(f"{what} is not a folder")
    foreign = foreign_entries(real, owned(real))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{what} already holds files dynaip-trt did not write ({shown}); nothing was changed: "
                          f"choose a new or empty folder")
    return real
