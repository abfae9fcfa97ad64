"""The ``dask-sparseconv`` command line.

Commands::

    dask-sparseconv run WORKFLOW.yaml [--dry-run] [--verbose] [--restart]
    dask-sparseconv validate WORKFLOW.yaml
    dask-sparseconv info STORE [--array A] [--storage-option k=v ...]
    dask-sparseconv preview WORKFLOW.yaml --images 0,1,2 -o preview.png
    dask-sparseconv schema [-o workflow.schema.json]

Exit codes: 0 success, 1 runtime failure (a task failed, the scheduler could
not be reached, ...), 2 usage or validation error (bad arguments, a workflow
with problems, a missing input, an existing output). Errors are one clear
message on stderr; a Python traceback is printed only with ``--verbose``.
See ``docs/cli.md``.

Modules: :mod:`.main` (parsing, failures -> one line), :mod:`.commands`
(one function per command, in ``COMMANDS``), :mod:`.inspect` (checking a
workflow against its data: the plan), :mod:`.cluster`, :mod:`.progress`,
:mod:`.report` (what is printed), :mod:`.errors`.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .commands import COMMANDS
    from .errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, CLIError, failure_line
    from .inspect import Plan, inspect_workflow
    from .progress import ProgressReporter

# `main` here is the function (imported now: a lazy one would lose to the
# submodule of the same name); the rest loads on first use, since the
# console script imports this package before :func:`.main.console_main` can
# turn a Ctrl-C into the command's one line, and the commands bring numpy,
# zarr and the engine (~0.15 s).
from .main import build_parser, main  # noqa: E402

_FROM = {
    "COMMANDS": "commands", "CLIError": "errors", "EXIT_OK": "errors", "EXIT_RUNTIME": "errors",
    "EXIT_USAGE": "errors", "failure_line": "errors", "Plan": "inspect", "inspect_workflow": "inspect",
    "ProgressReporter": "progress",
}


def __getattr__(name: str):
    if name in _FROM:
        value = getattr(import_module(f".{_FROM[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["COMMANDS", "CLIError", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "Plan", "ProgressReporter", "build_parser",
           "failure_line", "inspect_workflow", "main"]
