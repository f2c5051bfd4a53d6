"""What every entry point (train, evaluate, chat, data_tools) says when the user's input, not the code, is at
fault: one line, ``lvlm_cl: error: <message>``, naming the file, record or key, and exit code 2. Anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import sys


class UserError(Exception):
    """What the user can fix (the recipe, the data, the model folder, the run folder): every such error class
    of lvlm-cl derives from it (besides ValueError or RuntimeError), so the entry points know it from a bug."""


class ConfigError(ValueError, UserError):
    """A recipe problem; the message names the file and the key."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that carry a message for the user: lvlm-cl's own (``UserError``), a loss gone NaN,
    the file system."""
    return (UserError, FloatingPointError, OSError)


def describe(e: BaseException) -> str:
    """The one line for ``e``: an OS error (a full disk, a read-only folder, a missing file) as its file and
    the system's reason, the others as their own message."""
    if isinstance(e, OSError) and e.strerror:
        # os.replace(temporary file, output) names the output second: the name the user gave
        where = e.filename2 if e.filename2 is not None else e.filename if e.filename is not None else ""
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e)


PROG = "lvlm_cl"
EXIT_CODE = 2


def report(e: BaseException, prog: str = PROG) -> int:
    """Print ``lvlm_cl: error: <message>`` to stderr; the exit code (2)."""
    print(f"{prog}: error: {describe(e)}", file=sys.stderr, flush=True)
    return EXIT_CODE


__all__ = ["EXIT_CODE", "PROG", "ConfigError", "UserError", "describe", "report", "user_errors"]
