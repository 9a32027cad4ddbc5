"""Follow a growing text file from a background thread, passing each new complete line on (`tail -f`)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable


class LogTail:
    """`with LogTail(path, echo):` echoes the lines appended to `path` while the block runs, and the rest
    when it ends. Lines already in the file (an earlier attempt of the run) are not repeated."""

    def __init__(self, path: str | os.PathLike, echo: Callable[[str], None], interval: float = 0.5):
        self.path, self.echo, self.interval = Path(path), echo, interval
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.pending = b""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            self.echo(line.decode("utf-8", errors="replace"))

    def _follow(self) -> None:
        while not self.done.wait(self.interval):
            self._read()

    def __enter__(self) -> "LogTail":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self._read()
