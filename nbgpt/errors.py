"""The one base class of nbgpt's expected failures.

An expected failure is the user's to fix (a missing file, a bad setting, a locked run directory, a diverged
run): its message is one line naming the cause and the fix, and `python -m nbgpt` prints that line instead of a
traceback. Anything else is a bug and keeps its traceback.
"""


class NbgptError(Exception):
    """A failure whose message tells the user what to change."""
