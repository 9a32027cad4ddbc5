"""The library's own source, shown in a notebook: the notebooks teach the code that runs, read from it at run
time, so what they show can never drift from what trains."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


class Source:
    """The source of a class, function or method as it is in the installed nbgpt, and where it starts.

    JupyterLab (and GitHub) render the Markdown form, a highlighted Python block; papermill's saved copy and a
    terminal read the plain-text form, the same code under a comment naming its file and line."""

    def __init__(self, obj):
        obj = inspect.unwrap(obj)
        try:
            lines, start = inspect.getsourcelines(obj)
        except TypeError:  # builtins and C functions: no Python source to show
            raise TypeError(f"show() takes a class, function or method written in Python; {obj!r} has no "
                            f"Python source") from None
        path = Path(inspect.getsourcefile(obj)).resolve()
        where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
        self.title = f"{obj.__module__}.{obj.__qualname__}  ({where}, line {start})"
        self.code = textwrap.dedent("".join(lines)).rstrip("\n")  # a method loses its class's indentation

    def __repr__(self) -> str:
        return f"# {self.title}\n{self.code}"

    def _repr_markdown_(self) -> str:
        return f"`{self.title}`\n\n```python\n{self.code}\n```"


def show(obj) -> Source:
    """`show(CausalSelfAttention)` as a cell's last line displays that class's real source."""
    return Source(obj)
