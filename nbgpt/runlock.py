"""One owner per run directory: `<dir>/.lock` names the process that owns it.

The owner is whoever took the lock first: `nbgpt run`, a notebook kernel's Trainer, or the kernel's launcher
of torchrun workers. Processes the owner started, directly or through others (papermill's kernel, torchrun,
its workers), are admitted: they work on the owner's behalf, and the owner outlives them. Admission follows
the process tree, so no path has to remember to hand anything on. Anybody else is refused while the owner
lives; a lock left by a dead process (kill -9, a preempted VM) is taken over.

The process tree (who started whom) is read here too, and `nbgpt run` signals its kernels through it. Linux
answers from /proc; other systems from `ps`/`pgrep`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import NbgptError
from .files import make_dirs


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
