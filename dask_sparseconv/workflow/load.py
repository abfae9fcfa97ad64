"""Reading a workflow file: YAML (``yaml.safe_load`` only) -> the models of
:mod:`.schema` -> a :class:`~.schema.Workflow`, or one :class:`WorkflowError`
listing every problem with its key path (``kernel.gaussian.sigma``)."""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..validation import resolve_method_backend
from .schema import (
    LOCAL_ONLY_KEYS,
    Workflow,
    is_url,
    show,
)


class WorkflowError(ValueError):
    """A workflow file with one or more problems.

    ``problems`` holds ``(key_path, message)`` pairs; ``str(err)`` lists them
    all, one per line, after a header naming the file.
    """

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = source or "workflow"
        n = len(self.problems)
        head = f"{where}: {n} problem{'s' if n != 1 else ''}:"
        lines = [f"  {key}: {msg}" if key else f"  {msg}" for key, msg in self.problems]
        super().__init__("\n".join([head] + lines))


def _join(*parts: Any) -> str:
    return ".".join(str(p) for p in parts if p != "")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` (a key path)."""
    model: Any = Workflow
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def _keys(model: type[BaseModel] | None) -> tuple[str, ...]:
    if model is None:
        return ()
    return tuple(k for k, f in model.model_fields.items() if not f.exclude)


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as ``(key path, message)``, worded as the package words them."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
        if kind == "dsc":
            if ctx.get("text"):
                out.append((_join(*loc), ctx["text"]))
            out += [(_join(*loc, sub), msg) for sub, msg in ctx.get("sub", ())]
        elif kind == "missing":
            out.append((_join(*loc), "required key is missing"))
        elif kind == "extra_forbidden":
            known = _keys(_model_at(loc[:-1]))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            out.append((_join(*loc), f"unknown key; {hint}"))
        elif kind == "invalid_key":
            out.append((_join(*loc[:-1]) or "(top level)", f"keys must be strings; got {loc[-1]!r}"))
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            keys = _keys(_model_at(loc))
            out.append((_join(*loc) or "(top level)",
                        f"expected a mapping with keys {', '.join(keys)}; got {show(err.get('input'))}"))
        else:  # not expected with the validators of .schema; still one clear line
            out.append((_join(*loc) or "(top level)", f"{err['msg']}; got {show(err.get('input'))}"))
    return out


def _resolve(path: Any, base: Path) -> str | None:
    if not isinstance(path, str) or not path.strip():
        return None
    if is_url(path):
        return path
    p = Path(os.path.expanduser(path))
    return os.path.normpath(str(p if p.is_absolute() else base / p))


def _relations(d: dict, base: Path) -> list[tuple[str, str]]:
    """Checks between keys (read from the document as written, so they are
    reported together with every other problem)."""
    out: list[tuple[str, str]] = []
    cluster: dict = d["cluster"] if isinstance(d.get("cluster"), dict) else {}
    address = cluster.get("address")
    if isinstance(address, str) and address.strip():
        out += [(f"cluster.{k}", "only used for a local cluster; remove it or remove cluster.address")
                for k in LOCAL_ONLY_KEYS if k in cluster]
    if cluster.get("security") is not None:
        if isinstance(address, str) and not address.startswith("tls://"):
            out.append(("cluster.security", "only used with a tls:// scheduler address"))
        elif address is None:
            out.append(("cluster.security", "only used with cluster.address (a tls:// scheduler)"))
    elif isinstance(address, str) and address.startswith("tls://"):
        out.append(("cluster.security", "required for a tls:// address: give ca_file, cert_file and key_file"))
    if cluster.get("route") == "gpu" and address is None:
        out.append(("cluster.route", "'gpu' needs cluster.address: a scheduler with GPU workers started with "
                                     "`dask worker <address> --resources GPU=1` (a local cluster has none)"))
    if "kernel" in d and "kernels" in d:
        out.append(("kernels", "give kernel (one kernel) or kernels (a bank), not both"))
    elif "kernel" not in d and "kernels" not in d:
        out.append(("kernel", "required key is missing (or give kernels: a list of kernels, applied in one pass)"))
    fill, boundary = d.get("fillvalue", 0), d.get("boundary", "fill")
    if isinstance(fill, (int, float)) and not isinstance(fill, bool) and math.isfinite(fill) and fill != 0 \
            and boundary != "fill":
        from ..boundaries import BOUNDARIES, canonical_boundary  # numba: only where a boundary is given

        if boundary in BOUNDARIES and canonical_boundary(boundary) != "fill":
            out.append(("fillvalue", f"only used with boundary: fill; got boundary: {boundary} (remove fillvalue)"))
    method, backend = d.get("method", "auto"), d.get("backend", "auto")
    from .schema import BACKENDS, METHODS

    if method in ("auto",) + METHODS and backend in ("auto",) + BACKENDS:
        try:
            resolve_method_backend(method, backend)
        except (ValueError, TypeError) as exc:
            out.append(("backend", str(exc)))
    inp: dict = d["input"] if isinstance(d.get("input"), dict) else {}
    outp: dict = d["output"] if isinstance(d.get("output"), dict) else {}
    a, b = _resolve(inp.get("path"), base), _resolve(outp.get("path"), base)
    if a is not None and b is not None and a.rstrip("/") == b.rstrip("/"):
        out.append(("output.path", f"must differ from input.path (both are {b!r})"))
    if inp.get("sample") not in (None, False) and a is not None and is_url(a):
        out.append(("input.sample", "a sample stack can only be generated at a local path, not a URL"))
    return out


def parse_workflow(data: Any, base_dir: str | os.PathLike | None = None, source: str | None = None) -> Workflow:
    """Check a workflow given as plain data (what ``yaml.safe_load`` returns).

    Parameters
    ----------
    data : dict
        The document.
    base_dir : path, optional
        Folder relative paths resolve against; default the current folder.
    source : str, optional
        Name used in error messages (the file).

    Raises
    ------
    WorkflowError
        Listing every problem found.
    """
    base = (Path(base_dir) if base_dir is not None else Path.cwd()).resolve()
    problems: list[tuple[str, str]] = []
    if isinstance(data, dict) and "source" in data:  # a field of the result, not a key of the file
        data = {k: v for k, v in data.items() if k != "source"}
        problems.append(("source", f"unknown key; known keys: {', '.join(k for k in Workflow.model_fields if k != 'source')}"))
    wf = None
    try:
        wf = Workflow.model_validate(data, context={"base_dir": base})
    except ValidationError as exc:
        problems += _problems(exc)
    if isinstance(data, dict):
        problems += _relations(data, base)
    if problems:
        raise WorkflowError(problems, source)
    assert wf is not None  # no problems means validation succeeded
    wf.source = source
    return wf


def load_workflow(path: str | os.PathLike) -> Workflow:
    """Read and check a workflow file (``yaml.safe_load`` only).

    Relative paths in the file resolve against the file's folder.

    Raises
    ------
    WorkflowError
        When the file is missing, is not YAML, or breaks the schema (all
        problems at once).
    """
    import yaml

    p = Path(path)
    source = str(path)
    if not p.exists():
        raise WorkflowError([("", f"workflow file {source!r} does not exist")], source)
    if p.is_dir():
        raise WorkflowError([("", f"{source!r} is a directory, not a workflow file")], source)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError([("", f"cannot read the file: {exc}")], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise WorkflowError([("", f"not valid YAML: {where}{problem}")], source) from None
    if data is None:
        raise WorkflowError([("", "the file is empty; it needs at least input, kernel and output")], source)
    return parse_workflow(data, base_dir=p.resolve().parent, source=source)
