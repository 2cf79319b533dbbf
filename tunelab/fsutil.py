"""Temp files and folders beside an output, created with the modes a plain open()/mkdir() would give
(0666/0777 less the umask) rather than tempfile's private 0600/0700, so the renamed result is shared as usual."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tunelab.errors import UserError


def umask_mode(base: int) -> int:
    """`base` less the process umask (os.umask can only be read by setting it)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def temp_file_beside(target: Path) -> tuple[int, str]:
    """(fd, path) of a new hidden temp file in target's folder, same filesystem, so os.replace is atomic."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, umask_mode(0o666))
    return fd, tmp


def temp_dir_beside(target: Path) -> Path:
    """A new hidden temp folder in target's folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder that becomes `target` only if the block finishes: no half-written outputs."""
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{target}: the output folder exists and is not empty; choose another or delete it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
