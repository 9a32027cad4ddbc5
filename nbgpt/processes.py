"""The process tree: who started whom. The run lock admits the owner's descendants; signals go to children.

Linux answers from /proc; other systems from `ps`/`pgrep`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
