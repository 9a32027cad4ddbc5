"""One owner per run directory: `<dir>/.lock` names the process that owns it.

The owner is whoever took the lock first: `nbgpt run`, a notebook kernel's Trainer, or the kernel's launcher
of torchrun workers. Processes the owner started, directly or through others (papermill's kernel, torchrun,
its workers), are admitted: they work on the owner's behalf, and the owner outlives them. Admission follows
the process tree, so no path has to remember to hand anything on. Anybody else is refused while the owner
lives; a lock left by a dead process (kill -9, a preempted VM) is taken over.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NbgptError
from .files import make_dirs
from .processes import alive, ancestors


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
