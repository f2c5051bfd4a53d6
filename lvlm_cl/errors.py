"""What every entry point (train, evaluate, chat, data_tools) says when the user's input, not the code, is at
fault: one line, ``lvlm_cl: error: <message>``, naming the file, record or key, and exit code 2. Anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import sys


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that carry a message for the user (the recipe, the data, the model folder, the
    run folder, a loss gone NaN, the file system)."""
    from lvlm_cl.checkpoint import CheckpointError
    from lvlm_cl.config import ConfigError
    from lvlm_cl.data.records import RecordError
    from lvlm_cl.io import PathEscapeError
    from lvlm_cl.models import ModelError
    from lvlm_cl.state_io import StateFormatError

    return (ConfigError, RecordError, ModelError, CheckpointError, StateFormatError, PathEscapeError,
            FloatingPointError, OSError)


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


__all__ = ["EXIT_CODE", "PROG", "describe", "report", "user_errors"]
