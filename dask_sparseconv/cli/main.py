"""Argument parsing and :func:`main`, which turns every failure into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from .errors import (
    EXIT_RUNTIME,
    EXIT_USAGE,
    PROG,
    RUNNING,
    CLIError,
    Terminated,
    failure_line,
    interrupted_before_output,
    is_numba_error,
    quiet,
    sigterm_unwinds,
)
from .report import say_err


def _version() -> str:
    from .. import __version__

    return __version__


class _VersionAction(argparse.Action):
    """``--version``, with the version looked up only when it is asked for:
    the lookup (importlib.metadata) costs ~15 ms, and every ``run`` builds
    this parser before it can launch its local workers' server."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"{parser.prog} {_version()}\n")  # stdout, as argparse's own action
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Out-of-core sparse 2D convolution of zarr image stacks on dask "
        "(scipy.signal.convolve2d semantics).",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or validation error. "
        "See docs/cli.md and docs/workflow_reference.md.",
    )
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def verbose(sp):
        sp.add_argument("-v", "--verbose", action="store_true", help="log progress details and show full tracebacks on errors")

    r = sub.add_parser("run", help="run a workflow", description="Run the convolution a workflow file describes.")
    r.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan (input, density, row blocks, memory, output, cluster) without computing or writing")
    r.add_argument("--restart", action="store_true",
                   help="start over: replace an existing (complete or partial) output, as output.overwrite: true does. "
                        "Without it an interrupted run's partial output is resumed (written blocks are verified and kept) "
                        "and a complete output is refused")
    verbose(r)

    v = sub.add_parser("validate", help="check a workflow and the data it names",
                       description="Check a workflow file and its input and output: every problem is reported at once.")
    v.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file")
    verbose(v)

    i = sub.add_parser("info", help="describe a zarr stack", description="Describe a dense or CSR zarr stack.")
    i.add_argument("store", metavar="STORE", help="path or URL of the zarr store")
    i.add_argument("--array", default=None, help="array or group inside the store")
    i.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for URLs (repeatable); the value is read as YAML (true, 3, text)")
    verbose(i)

    sc = sub.add_parser("schema", help="print the JSON schema of a workflow file",
                        description="Print the JSON schema (draft 2020-12) of a workflow file, for editors and validators.")
    sc.add_argument("-o", "--output", default=None, help="write it to this file instead of standard output")

    pv = sub.add_parser("preview", help="render input frames beside their convolution into a PNG",
                        description="Convolve a few images in this process and save them side by side as a PNG.")
    pv.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file")
    pv.add_argument("--images", default="0", help="comma-separated image indices (default: 0); negative counts from the end")
    pv.add_argument("-o", "--output", default="preview.png", help="PNG file to write (default: preview.png)")
    pv.add_argument("--scale", type=int, default=1, choices=range(1, 9), metavar="N", help="enlarge each pixel N times (1-8)")
    pv.add_argument("--no-labels", action="store_true", help="leave out the text labels")
    verbose(pv)

    co = sub.add_parser("compile", help="compile the engines into numba's cache, once after installing",
                        description="Compile the numba functions jobs use and write them to numba's on-disk cache, "
                        "in parallel processes, so that no job (and no cluster worker) compiles them on its first block. "
                        "Each group is checked against scipy.signal.")
    co.add_argument("-j", "--jobs", type=_positive_int, default=None, metavar="N",
                    help="processes to compile in (default: one per group, at most the CPUs available)")
    co.add_argument("--only", action="append", metavar="GROUP",
                    help="compile only this group (repeatable); the groups are listed by the command's output")
    verbose(co)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    verbose = getattr(args, "verbose", False)
    RUNNING.clear()
    try:
        with sigterm_unwinds(), quiet(verbose):
            if args.command == "run" and not args.dry_run:
                from .cluster import launch_local_workers

                launch_local_workers(args.workflow, verbose)  # first: see its docs
            from .commands import COMMANDS  # here, not at the top: a Ctrl-C while it loads is handled below

            return int(COMMANDS[args.command](args) or 0)
    except CLIError as exc:
        if verbose and exc.__cause__ is not None and not is_numba_error(exc.__cause__):
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        say_err(f"error: {exc.message}")
        return exc.code
    except BrokenPipeError:  # e.g. `dask-sparseconv info X | head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RUNTIME
    except KeyboardInterrupt as exc:
        try:
            if RUNNING.get("output") is None:
                # nothing written yet; and the interrupt may have cut numpy's
                # import short, which a second import then refuses
                say_err(f"error: {interrupted_before_output(exc)}")
            else:
                from .inspect import interrupted_message

                say_err(f"error: {interrupted_message(exc)}")
        except KeyboardInterrupt:  # a second Ctrl-C while describing the output
            say_err("error: interrupted; the output is incomplete: run the same workflow again to resume")
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a runtime failure: one message, traceback only when asked
        if is_numba_error(exc):
            say_err(
                "error: the numba engine failed on this input "
                f"({type(exc).__name__}); this is a bug in dask-sparseconv - please report it. "
                "As a workaround set backend: numpy (and method: gather_scatter or precomputed) in the workflow."
            )
            return EXIT_RUNTIME
        if verbose:
            traceback.print_exc(file=sys.stderr)
        say_err(failure_line(exc, verbose))  # the cause, always the last line
        return EXIT_RUNTIME


def console_main() -> int:
    """The ``dask-sparseconv`` command: :func:`main`, then a quick exit
    (:mod:`dask_sparseconv.runtime.process_exit`). Only the command's own
    process freezes its objects; code that calls :func:`main` keeps its own.
    The collector is paused for the command's start-up
    (:mod:`dask_sparseconv.runtime.collector`)."""
    from ..runtime import collector

    collector.pause()
    try:
        code = main()
    except KeyboardInterrupt as exc:  # before main's own handling: parsing the arguments
        say_err(f"error: {interrupted_before_output(exc)}")
        return 130
    from ..runtime.process_exit import freeze_for_exit

    freeze_for_exit()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
