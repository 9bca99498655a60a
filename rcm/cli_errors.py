"""Command-line failures as one sentence: every entry point ends a known failure with a single line naming the
file or key and a non-zero exit status, not a traceback. ``RCM_DEBUG=1`` (or ``--debug`` where a CLI offers
it) shows the traceback as well.

The lowest layer of the package (standard library only), so every CLI can share it.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "RCM_DEBUG"
# Exit status of a run that failed on its input or configuration (argparse uses 2 for bad arguments).
EXIT_FAILURE = 1


class UserError(Exception):
    """A failure the user can act on; its message is the whole explanation (shown without a traceback)."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Whether tracebacks should be shown: ``RCM_DEBUG`` set to a true value or ``--debug`` in ``argv``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def one_line(error: BaseException) -> str:
    """The error as one sentence: its message (or its type's name when empty), flattened to one line."""
    message = " ".join(str(error).split())
    if isinstance(error, UserError):
        return message or type(error).__name__
    if isinstance(error, KeyError) and error.args:  # str(KeyError) quotes its key: say what it is
        message = f"missing key {error.args[0]!r}"
    name = type(error).__name__
    return f"{name}: {message}" if message else name


def run_cli(main: Callable[..., Any], program: str, *args: Any, **kwargs: Any) -> int:
    """Call ``main`` and return its exit status; an exception becomes ``<program>: error: <one line>`` on
    stderr and status 1 (the traceback too when debugging is on). ``SystemExit`` and Ctrl-C pass through."""
    try:
        status = main(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - the point is to turn any failure into one line
        if debug_enabled():
            traceback.print_exc()
        hint = "" if debug_enabled() else f" (set {DEBUG_ENV}=1 for the traceback)"
        print(f"{program}: error: {one_line(error)}{hint}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return 0 if status is None else int(status)
