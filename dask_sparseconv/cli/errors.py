"""How the command line fails: exit codes, :class:`CLIError`, the one-line failure message, interrupts and SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator

PROG = "dask-sparseconv"


EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """An error to report as one message and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.message = message
        self.code = code


#: what ``run`` is writing, for the message after an interruption
RUNNING: dict[str, Any] = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same orderly unwinding as Ctrl-C."""


def interrupted_what(exc: KeyboardInterrupt) -> str:
    """How a run was stopped, for its last line."""
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def interrupted_before_output(exc: KeyboardInterrupt) -> str:
    """The last line of a run stopped before it wrote anything."""
    return f"{interrupted_what(exc)}; nothing was left half-done"


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM unwinds it like Ctrl-C (clients and local
    clusters are closed by their ``with`` blocks) instead of killing it mid-write."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_numba_error(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        if (cls.__module__ or "").startswith("numba"):
            return True
    return False


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Hide library warnings and dask/distributed log chatter unless --verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield
        return
    loggers = [logging.getLogger(n) for n in ("distributed", "dask", "tornado", "asyncio", "numba")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def failure_line(exc: BaseException, verbose: bool = False) -> str:
    """One line naming a runtime failure's cause: its type, its message (or,
    for an exception without one, where it was raised), and how to see more."""
    text = " ".join(str(exc).split())
    if not text:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" raised in {tb.tb_frame.f_code.co_name} ({os.path.basename(tb.tb_frame.f_code.co_filename)}:" \
                f"{tb.tb_lineno})" if tb is not None else ""
        text = f"{exc!r}{where}"
    hint = "" if verbose else " (--verbose shows the traceback)"
    return f"error: {type(exc).__name__}: {text}{hint}"
