"""Small file helpers shared by checkpoints and token shards: checksums, durable writes, weights-only loading."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minipretrain.errors import CheckpointError, UserError


def load_weights_only(path: Path):
    """torch.load with weights_only=True: tensors, numbers, strings and containers of them, never code. A file that
    holds anything else (a pickle that calls os.system, say) is refused in one line naming the object, instead of
    torch's message, which suggests loading it with weights_only=False."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = refused.group(1) if refused else (str(e).strip().splitlines() or ["an object"])[0]
        raise CheckpointError(f"refusing to load {path}: it holds non-tensor objects ({what}); the file may be "
                              "tampered with") from None
    except Exception as e:  # a truncated or foreign file: zip, EOF and runtime errors have no common base class
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {first})") from None


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


class DirectoryLock:
    """An exclusive OS lock (flock) on DIR/.lock while a run uses DIR: a second run there is refused, naming the
    holder. The OS drops the lock when the process dies, so a killed run never leaves a stale lock behind."""

    FILE = ".lock"

    def __init__(self, directory: Path, what: str = "run"):
        import fcntl  # POSIX; the trainer targets Linux and macOS

        directory.mkdir(parents=True, exist_ok=True)
        self.file = open(directory / self.FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{directory} is in use by another {what} ({holder}): wait for it to end, or choose "
                            "another --run-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the descriptor releases the flock

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, flush to disk, rename: readers see the old file or the new one, never half."""
    replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_atomic(path: Path, write) -> None:
    """write_atomic for any writer: `write(tmp)` fills a temporary file, which is flushed and renamed to `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
