"""Checkpoints: written atomically, found again by a rerun of the same command."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file-size limit, I/O error); earlier checkpoints are intact."""


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `ckpt_<step>.pt` through a temporary file and rename (a crash never leaves half a file); a failed
    write removes its temporary file and raises CheckpointWriteError (the run resumes from its latest checkpoint)."""
    d = checkpoint_dir(out_dir)
    path = d / f"ckpt_{step:08d}.pt"
    tmp = d / f".{path.name}.tmp{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # our own handle: closed on a failed write (torch's writer would keep it open)
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            raise _write_error(path, e) from e
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _write_error(path: Path, cause: BaseException) -> CheckpointWriteError:
    """A one-line error: which checkpoint, why, the free space, and what the run resumes from."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    err = CheckpointWriteError(f"cannot write checkpoint {path} ({_reason(cause, free)}; "
                               f"{'free space unknown' if free is None else f'{free / 2**20:.1f} MiB free there'}); "
                               f"no partial file is left and the run resumes {_resume_point(path)}: free space (or "
                               "raise the file-size limit) and run it again")
    err.errno = getattr(cause, "errno", None)
    return err


def _reason(cause: BaseException, free: int | None) -> str:
    """Why a write failed: the OS error, else (torch.save's RuntimeError names none) a full disk or a file-size limit."""
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    said = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free is not None and free < 2**20:
        return f"{os.strerror(errno.ENOSPC)}; torch.save: {said}"
    if limit != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)}: the file-size limit (ulimit -f) is {limit} bytes; torch.save: {said}"
    return said


def _resume_point(path: Path) -> str:
    found = list_checkpoints(path.parent.parent)
    return f"from {found[-1].name}" if found else "from its start"
