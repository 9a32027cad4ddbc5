"""The one base class of nbgpt's expected failures, and how any other exception is said in one line.

An expected failure is the user's to fix (a missing file, a bad setting, a locked run directory, a diverged
run): its message is one line naming the cause and the fix, and `python -m nbgpt` prints that line instead of a
traceback. Anything else is a bug and keeps its traceback.
"""


class NbgptError(Exception):
    """A failure whose message tells the user what to change."""


def one_line(exc: BaseException) -> str:
    """An exception as one line of a message of ours: its type, and the first line of what it says."""
    said = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {' '.join(said.split())[:300]}".rstrip(": ")
