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

from .commands import COMMANDS
from .errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, CLIError, failure_line
from .inspect import Plan, inspect_workflow
from .main import build_parser, main
from .progress import ProgressReporter

__all__ = ["COMMANDS", "CLIError", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "Plan", "ProgressReporter", "build_parser",
           "failure_line", "inspect_workflow", "main"]
