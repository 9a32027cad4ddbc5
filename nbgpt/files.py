"""File plumbing shared by every module: atomic writes, hashes, JSON, and the lock that gives a run directory one owner.

Everything a user makes (shards, checkpoints, manifests, metrics) goes through `atomic_write_*`, so a kill
or a full disk at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
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


# The run lock. One owner per run directory: `<dir>/.lock` names the process that owns it.
#
# The owner is whoever took the lock first: `nbgpt run`, a notebook kernel's Trainer, or the kernel's launcher
# of torchrun workers. Processes the owner started, directly or through others (papermill's kernel, torchrun,
# its workers), are admitted: they work on the owner's behalf, and the owner outlives them. Admission follows
# the process tree, so no path has to remember to hand anything on. Anybody else is refused while the owner
# lives; a lock left by a dead process (kill -9, a preempted VM) is taken over.
#
# The process tree (who started whom) is read here too, and `nbgpt run` signals its kernels through it. Linux
# answers from /proc; other systems from `ps`/`pgrep`.


class RunLockError(NbgptError):
    """Another live process is using the run directory."""


class RunLock:
    """An exclusive claim on a run directory. `held` is True only for the process that created the lock file
    (it alone removes it); an admitted descendant of the owner uses the directory and leaves the lock alone."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self.held = False

    def owner(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def acquire(self) -> "RunLock":
        make_dirs(self.path.parent, "choose another run directory (--runs-dir, --out-dir)")
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner and owner in ancestors(os.getpid()):
                    return self  # our own lock, or one held for us by a process that started us
                if owner and alive(owner):
                    raise RunLockError(f"{self.path.parent} is in use by process {owner} (lock file {self.path}); "
                                       f"wait for it to finish, stop it, or choose another run directory (a lock "
                                       f"copied from another machine, with the run folder, holds no process here: "
                                       f"delete it)")
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise RunLockError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def parent_pid(pid: int) -> int:
    """The parent of `pid` (0 when unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may contain spaces
    except (OSError, ValueError, IndexError):
        pass
    try:
        out = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True)
        return int(out.stdout.strip() or 0)
    except (OSError, ValueError):
        return 0


def ancestors(pid: int) -> set[int]:
    """`pid` and every process above it up to init."""
    found: set[int] = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        pid = parent_pid(pid)
    return found


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    proc = Path("/proc")
    if (proc / "self" / "stat").is_file():
        found = []
        for entry in proc.iterdir():
            if entry.name.isdigit() and parent_pid(int(entry.name)) == pid:
                found.append(int(entry.name))
        return found
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to `pid`, or to its whole process group when it leads one (a Jupyter kernel started in
    its own session, with a torchrun launched from a notebook cell inside)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
