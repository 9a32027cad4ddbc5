"""File plumbing shared by every module: atomic writes, hashes, JSON, and the run lock.

Everything a user makes (shards, checkpoints, manifests, metrics) goes through `atomic_write_*`, so a kill
or a full disk at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from .errors import NbgptError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteError(NbgptError, OSError):
    """A file could not be written (disk full, read-only or missing folder, file size limit)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message is for users: no "[Errno 28]" before it


def _read_umask() -> int:
    """The process's umask. os.umask can only set it (set it, then put it back), and it is process-wide, so
    this runs once, at import, not beside threads that may be creating files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file


def make_dirs(path: str | os.PathLike, fix: str = "choose another folder") -> Path:
    """`mkdir -p path`, or a WriteError naming why the folder cannot be made (a file in the way, a folder that
    takes no new entries) and `fix`, what the user can do about it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot create the folder {path}: {_why_no_folder(path, exc)}; {fix}") from None
    return path


def _why_no_folder(path: Path, exc: OSError) -> str:
    """The nearest existing ancestor decides: a file cannot hold folders; a folder refused one (read-only,
    permissions, or a virtual file system such as /proc)."""
    existing = next(p for p in (path, *path.parents) if p.exists())  # "/" and "." always exist
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    return f"{existing} does not accept new folders ({exc.strerror or exc})"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write through a temp file in the same folder, fsync it, then rename over `path`.

    `write` receives a binary file object. On any error the temp file is removed, `path` is untouched, and
    an OSError becomes a WriteError that says what failed and what to do.
    """
    path = Path(path)
    tmp_name = None
    try:
        make_dirs(path.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes the file private (0600); the result should have the permissions any new file gets
        # (0666 less the umask: usually readable by others), as shards and exports are meant to be shared.
        os.fchmod(fd, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"could not write {path}: {exc.strerror or exc}. Free disk space or make "
                             f"{path.parent} writable (or choose another directory); "
                             f"{'the previous ' + path.name + ' is intact' if path.exists() else 'nothing was written'}"
                             ) from exc
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files of atomic writes that a killed process left behind in `directory`.

    Call only while owning the directory (the run lock, or a rerun of prepare): a live writer's temp file
    would be removed too.
    """
    removed = []
    for leftover in Path(directory).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


