"""Workflow files: one YAML document describing one convolution job.

The file is read with ``yaml.safe_load`` only (plain mappings, lists,
strings and numbers; no Python objects are ever constructed) and checked
against the schema below. Checking never stops at the first problem: every
problem is collected with its key path (``kernel.gaussian.sigma``) and all of
them are raised together as one :class:`WorkflowError`.

Schema (see ``docs/workflow_reference.md`` for every key)::

    description: free text                # optional
    input:
      path: data/rois.zarr                # relative paths: against the workflow's folder
      array: null                         # array/group inside the store
      storage_options: {}                 # fsspec options for URLs
      sample: null                        # or {n_images: 200, ...}: generate a sample stack when path is missing
    kernel: {gaussian: {sigma: 1.5}}      # exactly one of gaussian / box / disk / file / values
    mode: same                            # full | same | valid
    method: auto                          # auto | direct | precomputed | lazy | gather_scatter
    backend: auto                         # auto | numba | numpy | torch
    dtype: null                           # null | float32 | float64
    output:
      path: out/blurred.zarr
      format: null                        # dense | csr; null: the input's
      overwrite: false
      storage_options: {}
      compressor: default                 # default | none
    cluster:
      address: null                       # tcp://host:8786 or tls://host:8786 for a running scheduler
      n_workers: null                     # local cluster only; null: sized to this machine
      threads_per_worker: 1
      memory_limit: auto
      dashboard_address: ":8787"
      timeout: 10s                        # connecting to a scheduler
      security: null                      # {ca_file, cert_file, key_file} for tls://
      route: any                          # any | gpu | cpu: which workers run the blocks (docs/gpu.md)
    block:
      memory: 64MiB                       # input+output bytes one row block may hold
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels as _kernels
from .geometry import MODES
from .runtime.devices import ROUTES
from .validation import BACKENDS, METHODS, check_bytes, check_kernel, resolve_method_backend

__all__ = [
    "WorkflowError",
    "Workflow",
    "InputSpec",
    "SampleSpec",
    "KernelSpec",
    "OutputSpec",
    "ClusterSpec",
    "SecuritySpec",
    "BlockSpec",
    "load_workflow",
    "parse_workflow",
    "parse_bytes",
    "parse_seconds",
    "format_bytes",
    "is_url",
]

DTYPES = ("float32", "float64")
COMPRESSORS = ("default", "none")
DEFAULT_BLOCK_MEMORY = 64 * 2**20
DEFAULT_TIMEOUT = 10.0


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


# ---------------------------------------------------------------------------
# Typed result
# ---------------------------------------------------------------------------
@dataclass
class SampleSpec:
    """Sample stack to generate at ``input.path`` when it does not exist."""

    n_images: int = 200
    frame_shape: tuple[int, int] = (512, 512)
    max_rois: int = 3
    radius: float = 8.0
    format: str = "dense"
    seed: int = 0


@dataclass
class InputSpec:
    path: str
    array: str | None = None
    storage_options: dict = field(default_factory=dict)
    sample: SampleSpec | None = None


@dataclass
class KernelSpec:
    kind: str  # gaussian | box | disk | file | values
    params: dict
    array: np.ndarray = field(repr=False)

    @property
    def description(self) -> str:
        if self.kind in ("gaussian", "box", "disk"):
            args = ", ".join(f"{k}={v}" for k, v in self.params.items())
            return f"{self.kind}({args})"
        if self.kind == "file":
            return f"file {self.params['file']}"
        return "values"


@dataclass
class OutputSpec:
    path: str
    format: str | None = None
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict)
    compressor: str = "default"


@dataclass
class SecuritySpec:
    ca_file: str
    cert_file: str
    key_file: str


@dataclass
class ClusterSpec:
    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | int | None = "auto"
    dashboard_address: str | None = ":8787"
    timeout: float = DEFAULT_TIMEOUT
    security: SecuritySpec | None = None
    route: str = "any"


@dataclass
class BlockSpec:
    memory: int = DEFAULT_BLOCK_MEMORY


@dataclass
class Workflow:
    """A checked workflow. Paths are absolute (or URLs)."""

    input: InputSpec
    kernel: KernelSpec
    output: OutputSpec
    mode: str = "same"
    method: str = "auto"
    backend: str = "auto"
    dtype: str | None = None
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    block: BlockSpec = field(default_factory=BlockSpec)
    description: str | None = None
    source: str | None = None  # the file it was read from

    def to_dict(self) -> dict:
        """Plain-data view (kernel as its spec, not the array)."""
        d = asdict(self)
        d["kernel"] = {"kind": self.kernel.kind, **self.kernel.params, "shape": list(self.kernel.array.shape)}
        return d


# ---------------------------------------------------------------------------
# Small parsers shared with the CLI
# ---------------------------------------------------------------------------
def parse_bytes(value: Any) -> int:
    """``64MiB``, ``1.5 GB``, ``4096`` -> bytes (:func:`dask.utils.parse_bytes`). Raises ValueError."""
    try:
        return check_bytes(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def format_bytes(n: int | float) -> str:
    """Bytes -> ``'64.00 MiB'`` (:func:`dask.utils.format_bytes`)."""
    from dask.utils import format_bytes as _format_bytes

    return _format_bytes(int(n))


def parse_seconds(value: Any) -> float:
    """``10``, ``2.5``, ``'10s'``, ``'500ms'``, ``'1min'`` -> seconds
    (:func:`dask.utils.parse_timedelta`, which also takes ``'1m'``). Raises ValueError."""
    from dask.utils import parse_timedelta

    bad = f"expected a duration such as 10s, 500ms or a number of seconds; got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ValueError(bad)
    text = re.sub(r"(?i)min$", "m", value.strip()) if isinstance(value, str) else value
    try:
        seconds = float(parse_timedelta(text, default="seconds"))
    except (ValueError, TypeError, KeyError):
        raise ValueError(bad) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration; got {value!r}")
    return seconds


_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


def _formats() -> tuple[str, ...]:
    from .storage import FORMATS

    return tuple(FORMATS)


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``...)."""
    return bool(_URL_RE.match(path))


def _resolve_path(path: str, base_dir: Path) -> str:
    if is_url(path):
        return path
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = base_dir / p
    return os.path.normpath(str(p))


# ---------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list" if len(str(value)) > 60 else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()


class _Checker:
    """Collects problems while reading a nested mapping."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, key: str, msg: str) -> None:
        self.problems.append((key, msg))

    @staticmethod
    def join(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def mapping(self, value: Any, path: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> dict | None:
        """Check that ``value`` is a mapping with string keys among ``known``."""
        if not isinstance(value, dict):
            self.add(path or "(top level)", f"expected a mapping with keys {', '.join(known)}; got {_fmt(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.add(path or "(top level)", f"keys must be strings; got {key!r}")
                continue
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
                self.add(self.join(path, key), f"unknown key; {hint}")
        for key in required:
            if key not in value:
                self.add(self.join(path, key), "required key is missing")
        return value

    def choice(self, value: Any, path: str, allowed: tuple[str, ...], allow_none: bool = False) -> Any:
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or value not in allowed:
            opts = ", ".join(allowed) + (", null" if allow_none else "")
            self.add(path, f"expected one of {opts}; got {_fmt(value)}")
            return _MISSING
        return value

    def string(self, value: Any, path: str, allow_none: bool = False) -> Any:
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(path, f"expected a non-empty string{' or null' if allow_none else ''}; got {_fmt(value)}")
            return _MISSING
        return value

    def boolean(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            self.add(path, f"expected true or false; got {_fmt(value)}")
            return _MISSING
        return value

    def integer(self, value: Any, path: str, minimum: int = 1, allow_none: bool = False) -> Any:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.add(path, f"expected {what}{' or null' if allow_none else ''}; got {_fmt(value)}")
            return _MISSING
        return int(value)

    def number(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            self.add(path, f"expected a positive number; got {_fmt(value)}")
            return _MISSING
        return float(value)

    def options(self, value: Any, path: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            self.add(path, f"expected a mapping of option names to values; got {_fmt(value)}")
            return {}
        return dict(value)

    def call(self, path: str, fn, *args, **kwargs) -> Any:
        """Run a checking function; its ValueError/TypeError becomes a problem at ``path``."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            self.add(path, str(exc))
            return _MISSING


TOP_KEYS = ("description", "input", "kernel", "mode", "method", "backend", "dtype", "output", "cluster", "block")
INPUT_KEYS = ("path", "array", "storage_options", "sample")
SAMPLE_KEYS = ("n_images", "frame_shape", "max_rois", "radius", "format", "seed")
KERNEL_KINDS = ("gaussian", "box", "disk", "file", "values")
KERNEL_PARAMS = {"gaussian": ("sigma", "size"), "box": ("size",), "disk": ("radius",)}
KERNEL_REQUIRED = {"gaussian": ("sigma",), "box": ("size",), "disk": ("radius",)}
OUTPUT_KEYS = ("path", "format", "overwrite", "storage_options", "compressor")
CLUSTER_KEYS = ("address", "n_workers", "threads_per_worker", "memory_limit", "dashboard_address", "timeout", "security",
                "route")
LOCAL_ONLY_KEYS = ("n_workers", "threads_per_worker", "memory_limit", "dashboard_address")
SECURITY_KEYS = ("ca_file", "cert_file", "key_file")
BLOCK_KEYS = ("memory",)


def _parse_sample(c: _Checker, raw: Any, path: str) -> SampleSpec | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        return SampleSpec()
    d = c.mapping(raw, path, SAMPLE_KEYS)
    if d is None:
        return None
    spec = SampleSpec()
    if "n_images" in d:
        spec.n_images = c.integer(d["n_images"], f"{path}.n_images")
    if "frame_shape" in d:
        fs = d["frame_shape"]
        if (
            isinstance(fs, list)
            and len(fs) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in fs)
        ):
            spec.frame_shape = (fs[0], fs[1])
        else:
            c.add(f"{path}.frame_shape", f"expected [height, width], two positive integers; got {_fmt(fs)}")
    if "max_rois" in d:
        spec.max_rois = c.integer(d["max_rois"], f"{path}.max_rois", minimum=0)
    if "radius" in d:
        spec.radius = c.number(d["radius"], f"{path}.radius")
    if "format" in d:
        spec.format = c.choice(d["format"], f"{path}.format", _formats())
    if "seed" in d:
        spec.seed = c.integer(d["seed"], f"{path}.seed", minimum=0)
    return spec


def _parse_input(c: _Checker, raw: Any, base_dir: Path) -> InputSpec | None:
    d = c.mapping(raw, "input", INPUT_KEYS, required=("path",))
    if d is None:
        return None
    path = c.string(d.get("path"), "input.path") if "path" in d else _MISSING
    array = c.string(d.get("array"), "input.array", allow_none=True)
    so = c.options(d.get("storage_options"), "input.storage_options")
    sample = _parse_sample(c, d.get("sample"), "input.sample")
    if path is _MISSING:
        return None
    if sample is not None and is_url(path):
        c.add("input.sample", "a sample stack can only be generated at a local path, not a URL")
    return InputSpec(path=_resolve_path(path, base_dir), array=array if array is not _MISSING else None,
                     storage_options=so, sample=sample)  # fmt: skip


def _parse_kernel(c: _Checker, raw: Any, base_dir: Path) -> KernelSpec | None:
    if isinstance(raw, str):  # shorthand: `kernel: k.npy`
        raw = {"file": raw}
    if not isinstance(raw, dict) or len(raw) != 1:
        given = f"keys {', '.join(map(str, raw))}" if isinstance(raw, dict) and raw else _fmt(raw)
        c.add("kernel", f"expected exactly one of {', '.join(KERNEL_KINDS)} (e.g. {{gaussian: {{sigma: 1.5}}}}); got {given}")
        if isinstance(raw, dict):  # still point out unknown kinds
            c.mapping(raw, "kernel", KERNEL_KINDS)
        return None
    (kind, params), = raw.items()
    if kind not in KERNEL_KINDS:
        c.mapping(raw, "kernel", KERNEL_KINDS)
        return None
    path = f"kernel.{kind}"
    if kind == "file":
        fpath = c.string(params, path)
        if fpath is _MISSING:
            return None
        if is_url(fpath):
            c.add(path, f"kernel files must be local paths; got {fpath!r}")
            return None
        resolved = _resolve_path(fpath, base_dir)
        arr = c.call(path, _kernels.load_kernel_file, resolved)
        return None if arr is _MISSING else KernelSpec("file", {"file": resolved}, arr)
    if kind == "values":
        if not isinstance(params, list):
            c.add(path, f"expected a list of rows of numbers, e.g. [[0, 1, 0], [1, 1, 1], [0, 1, 0]]; got {_fmt(params)}")
            return None
        arr = c.call(path, check_kernel, params, name="values")
        if arr is _MISSING:
            return None
        return KernelSpec("values", {}, arr.astype(np.float64) if arr.dtype == np.bool_ else arr)
    d = c.mapping(params, path, KERNEL_PARAMS[kind], required=KERNEL_REQUIRED[kind])
    if d is None or any(k not in d for k in KERNEL_REQUIRED[kind]):
        return None
    known = {k: v for k, v in d.items() if k in KERNEL_PARAMS[kind]}
    fn = getattr(_kernels, kind)
    try:
        arr = fn(**known)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        # the kernels module names its parameter first: "sigma must be ..."
        name = msg.split(" ", 1)[0].split("[", 1)[0]
        if name in d:
            c.add(f"{path}.{name}", msg.split(" ", 1)[1] if " " in msg else msg)
        else:
            c.add(path, msg)
        return None
    if len(known) != len(d):  # unknown keys were reported above
        return None
    return KernelSpec(kind, known, arr)


def _parse_output(c: _Checker, raw: Any, base_dir: Path) -> OutputSpec | None:
    d = c.mapping(raw, "output", OUTPUT_KEYS, required=("path",))
    if d is None:
        return None
    path = c.string(d.get("path"), "output.path") if "path" in d else _MISSING
    fmt = c.choice(d.get("format"), "output.format", _formats(), allow_none=True)
    overwrite = c.boolean(d.get("overwrite", False), "output.overwrite")
    so = c.options(d.get("storage_options"), "output.storage_options")
    comp = d.get("compressor", "default")
    comp = "none" if comp is None else comp
    comp = c.choice(comp, "output.compressor", COMPRESSORS)
    if path is _MISSING:
        return None
    return OutputSpec(
        path=_resolve_path(path, base_dir),
        format=None if fmt is _MISSING else fmt,
        overwrite=bool(overwrite) if overwrite is not _MISSING else False,
        storage_options=so,
        compressor="default" if comp is _MISSING else comp,
    )


def _parse_cluster(c: _Checker, raw: Any, base_dir: Path) -> ClusterSpec:
    spec = ClusterSpec()
    if raw is None:
        return spec
    d = c.mapping(raw, "cluster", CLUSTER_KEYS)
    if d is None:
        return spec
    address = c.string(d.get("address"), "cluster.address", allow_none=True)
    if address not in (None, _MISSING):
        m = re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://[^:/\s]+(:\d+)?$", address)
        if m is None:
            c.add("cluster.address", f"expected a scheduler address such as tcp://127.0.0.1:8786; got {address!r}")
        else:
            spec.address = address
        for key in LOCAL_ONLY_KEYS:
            if key in d:
                c.add(f"cluster.{key}", "only used for a local cluster; remove it or remove cluster.address")
    if "n_workers" in d:
        v = c.integer(d["n_workers"], "cluster.n_workers", allow_none=True)
        spec.n_workers = None if v is _MISSING else v
    if "threads_per_worker" in d:
        v = c.integer(d["threads_per_worker"], "cluster.threads_per_worker")
        spec.threads_per_worker = 1 if v is _MISSING else v
    if "memory_limit" in d:
        v = d["memory_limit"]
        if v is None or v == "auto":
            spec.memory_limit = v
        else:
            n = c.call("cluster.memory_limit", parse_bytes, v)
            if n is not _MISSING:
                spec.memory_limit = n
            else:  # restate what is allowed
                c.problems[-1] = ("cluster.memory_limit", c.problems[-1][1] + ", 'auto' or null (no limit)")
    if "dashboard_address" in d:
        v = d["dashboard_address"]
        if v is None or v is False:
            spec.dashboard_address = None
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 65536:
            spec.dashboard_address = f":{v}"
        elif isinstance(v, str) and re.match(r"^[\w.\-]*:\d{1,5}$", v):
            spec.dashboard_address = v
        else:
            c.add("cluster.dashboard_address", f"expected an address such as ':8787', a port number or null; got {_fmt(v)}")
    if "timeout" in d:
        v = c.call("cluster.timeout", parse_seconds, d["timeout"])
        spec.timeout = DEFAULT_TIMEOUT if v is _MISSING else v
    sec = d.get("security")
    if sec is not None:
        sd = c.mapping(sec, "cluster.security", SECURITY_KEYS, required=SECURITY_KEYS)
        if sd is not None:
            files = {}
            for key in SECURITY_KEYS:
                if key not in sd:
                    continue
                v = c.string(sd[key], f"cluster.security.{key}")
                if v is _MISSING:
                    continue
                p = _resolve_path(v, base_dir)
                if not os.path.isfile(p):
                    c.add(f"cluster.security.{key}", f"file {p!r} does not exist")
                files[key] = p
            if len(files) == 3:
                spec.security = SecuritySpec(**files)
        if isinstance(address, str) and not address.startswith("tls://"):
            c.add("cluster.security", "only used with a tls:// scheduler address")
        elif address is None:
            c.add("cluster.security", "only used with cluster.address (a tls:// scheduler)")
    elif isinstance(address, str) and address.startswith("tls://"):
        c.add("cluster.security", "required for a tls:// address: give ca_file, cert_file and key_file")
    if "route" in d:
        v = c.choice(d["route"], "cluster.route", ROUTES)
        if v is not _MISSING:
            spec.route = v
            if v == "gpu" and address is None:
                c.add("cluster.route", "'gpu' needs cluster.address: a scheduler with GPU workers started with "
                                       "`dask worker <address> --resources GPU=1` (a local cluster has none)")
    return spec


def _parse_block(c: _Checker, raw: Any) -> BlockSpec:
    spec = BlockSpec()
    if raw is None:
        return spec
    d = c.mapping(raw, "block", BLOCK_KEYS)
    if d is None:
        return spec
    if "memory" in d:
        v = c.call("block.memory", parse_bytes, d["memory"])
        if v is not _MISSING:
            spec.memory = v
    return spec


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
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    base = base.resolve()
    c = _Checker()
    d = c.mapping(data, "", TOP_KEYS, required=("input", "kernel", "output"))
    if d is None:
        raise WorkflowError(c.problems, source)
    description = c.string(d.get("description"), "description", allow_none=True)
    inp = _parse_input(c, d["input"], base) if "input" in d else None
    kern = _parse_kernel(c, d["kernel"], base) if "kernel" in d else None
    mode = c.choice(d.get("mode", "same"), "mode", MODES)
    method = c.choice(d.get("method", "auto"), "method", ("auto",) + METHODS)
    backend = c.choice(d.get("backend", "auto"), "backend", ("auto",) + BACKENDS)
    dtype = c.choice(d.get("dtype"), "dtype", DTYPES, allow_none=True)
    if method is not _MISSING and backend is not _MISSING:
        try:
            resolve_method_backend(method, backend)
        except (ValueError, TypeError) as exc:
            c.add("backend", str(exc))
    out = _parse_output(c, d["output"], base) if "output" in d else None
    cluster = _parse_cluster(c, d.get("cluster"), base)
    block = _parse_block(c, d.get("block"))
    if inp is not None and out is not None and inp.path.rstrip("/") == out.path.rstrip("/"):
        c.add("output.path", f"must differ from input.path (both are {out.path!r})")
    if c.problems:
        raise WorkflowError(c.problems, source)
    assert inp is not None and kern is not None and out is not None
    return Workflow(
        input=inp,
        kernel=kern,
        output=out,
        mode=mode,
        method=method,
        backend=backend,
        dtype=dtype,
        cluster=cluster,
        block=block,
        description=description,
        source=source,
    )


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
