"""Files and folders that appear complete or not at all: written under a hidden name beside the target,
then renamed into place, so a reader (or an interrupted run) never sees half of one."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import EngineError


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically: a hidden temp file in the same folder,
    fsync, then os.replace. On any failure or interrupt the old file (if any) stays and the temp file
    is removed. The new file gets the usual umask-filtered permissions (0o666 & ~umask)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder unless overwriting."""
    if target.exists() and not target.is_dir():
        raise EngineError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise EngineError(f"{target} exists and is not empty (use --overwrite to replace it)")


@contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target``; on success it replaces ``target``.

    On any failure or interrupt the hidden folder is removed and ``target`` is left as it was.
    """
    target = target.absolute()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        install_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_folder(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an old one is moved aside first and removed after."""
    if target.is_dir() and any(target.iterdir()):
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)  # an empty folder is replaced atomically
