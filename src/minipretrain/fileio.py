"""Small file helpers shared by checkpoints and token shards: checksums and durable writes."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minipretrain.errors import UserError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def require_new_directory(path: str | Path, flag: str = "--out") -> Path:
    """A directory a command will create: refused (before any work) when it is a file or a non-empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        kind = "a file" if not path.is_dir() else "a directory that is not empty"
        raise UserError(f"{flag} {path} is {kind}: choose a new directory")
    return path


@contextmanager
def new_directory(path: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Write a whole directory atomically: yields a temporary sibling to fill, renamed to `path` when the block
    ends; on an error the sibling is removed, so `path` is either complete or absent."""
    target = require_new_directory(path, flag)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()
    os.replace(tmp, target)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, flush to disk, rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
