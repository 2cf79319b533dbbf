"""Training checkpoints (`epoch_N.pth` / `iter_N.pth`) and Hugging Face exports, written atomically:
a crash at any moment leaves the previous checkpoint intact, and `last_checkpoint` is updated last."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TrainingStopped, UserError
from tunelab.fsutil import temp_file_beside


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteErrors:
    """A file wrapper that keeps the OSError (e.g. ENOSPC, a full disk) a write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write_bytes(path: Path, write) -> None:
    """Write via `write(file)` to a temp file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteErrors(f)
            try:
                write(recorder)
            except Exception:
                if recorder.error is not None:  # torch.save reports a failed write as a bare RuntimeError
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(work_dir: Path, name: str, state: dict[str, Any], keep: int = -1) -> Path:
    """Save a checkpoint, point last_checkpoint at it, and prune old ones beyond `keep`."""
    path = work_dir / name
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
        atomic_write_bytes(work_dir / "last_checkpoint", lambda f: f.write(str(path.resolve()).encode()))
    except OSError as exc:  # e.g. a full disk: the temp file is gone, the previous checkpoint untouched
        pointer = work_dir / "last_checkpoint"
        last = pointer.read_text().strip() if pointer.is_file() else "none"
        raise TrainingStopped(f"could not write checkpoint {path} ({exc.strerror or exc}); the last good "
                              f"checkpoint is {last}; free space, then continue with `tunelab train ... "
                              f"--resume`") from None
    if keep > 0:
        for old in list_checkpoints(work_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Checkpoints in a work dir, oldest first (by the step they were saved at)."""
    return sorted((p for p in work_dir.glob("*.pth") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)


_WRITTEN_BY = "checkpoints are the epoch_N.pth/iter_N.pth files that `tunelab train` writes into its work dir"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `tunelab train`; UserError when it is missing or not one."""
    path = Path(path)
    if path.is_dir():
        inside = list_checkpoints(path)
        example = f" such as {inside[-1]}" if inside else " from work_dirs/<config>/"
        raise UserError(f"{path}: is a folder, not a checkpoint file; give a .pth file{example}")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; give a .pth file from work_dirs/<config>/")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise UserError(f"{path}: not a readable tunelab checkpoint ({type(exc).__name__}: {reason}); "
                        f"{_WRITTEN_BY}") from None
    if not isinstance(state, dict) or "meta" not in state or "model" not in state:
        raise UserError(f"{path}: not a tunelab checkpoint (no 'meta'/'model' entries); {_WRITTEN_BY}")
    return state


def find_resume_checkpoint(work_dir: Path, explicit: str | None, log) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its contents: an explicit path, else the one last_checkpoint names,
    else the newest loadable *.pth (a torn or truncated newest file is skipped with a warning)."""
    if explicit:
        return Path(explicit), load_checkpoint(explicit)
    candidates: list[Path] = []
    pointer = work_dir / "last_checkpoint"
    if pointer.is_file():
        candidates.append(Path(pointer.read_text().strip()))
    candidates += [p for p in reversed(list_checkpoints(work_dir)) if p not in candidates]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except UserError as exc:
            log.warning("warning: skipping unusable checkpoint: %s", exc)
    return None


def refuse_existing_run(work_dir: Path) -> None:
    """One work dir holds one run: a fresh start there would overwrite hf/ and leave the old checkpoints
    beside the new ones, where a later --resume could pick either. UserError when it holds a run."""
    found = sorted(p.name for p in work_dir.glob("*.pth")) + [
        name for name in ("last_checkpoint", "hf") if (work_dir / name).exists()]
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"{work_dir} already holds a run ({shown}); continue it with --resume, or start a new "
                        f"run in another folder with --work-dir DIR (or delete {work_dir})")


def remove_stale_temp_files(work_dir: Path) -> None:
    """Temp files left by a write that was interrupted (never a complete checkpoint)."""
    for tmp in work_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")
