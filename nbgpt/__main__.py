"""Command line: `python -m nbgpt {prepare,train,eval,sample,run} ...` (see --help of each).

An expected failure (a missing file, a locked run directory, a diverged run, a bad setting...) is one line
naming the cause and the fix, exit code 2; a run stopped by a signal says how to resume, exit 128 + signal.
Tracebacks are for bugs, or for `nbgpt --debug ...`.
"""

from __future__ import annotations

import sys
import warnings

from .cli import build_parser
from .errors import NbgptError
from .knobs import ConfigWarning
from .stop import TrainingStopped


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Settings that contradict each other are a line for the user, not a pointer into nbgpt's source."""
    if issubclass(category, ConfigWarning):
        print(f"nbgpt: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (NbgptError, FileNotFoundError) as exc:
        if args.debug:
            raise
        return report(exc)


def report(exc: Exception) -> int:
    """Print an expected failure as its one line and return its exit code: a run a signal stopped says so and
    how to go on (exit 128 + the signal, TrainingStopped.exit_status); anything else is 2."""
    if isinstance(exc, TrainingStopped) and exc.signum is not None:
        print(exc, file=sys.stderr)
        return exc.exit_status
    print(f"nbgpt: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
