"""The workflow file's schema, as pydantic v2 models.

Structure (which keys exist, which are required, their defaults, unknown keys
refused) is declared by the models; each value is checked by a validator
that words its error the way every entry point of the package does ("expected
one of full, same, valid; got 3"). :mod:`.load` turns pydantic's errors into
``(key path, message)`` problems and adds the few checks that relate two keys.
``dask-sparseconv schema`` prints :func:`json_schema`.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from .. import kernels as _kernels
from ..geometry import MODES
from ..row_blocks import DEFAULT_BLOCK_MEMORY
from ..runtime.devices import ROUTES
from ..validation import BACKENDS, METHODS, check_bytes, check_kernel

DTYPES = ("float32", "float64")
COMPRESSORS = ("default", "none")
DEFAULT_TIMEOUT = 10.0
KERNEL_KINDS = ("gaussian", "box", "disk", "file", "values")
KERNEL_PARAMS = {"gaussian": ("sigma", "size"), "box": ("size",), "disk": ("radius",)}
KERNEL_REQUIRED = {"gaussian": ("sigma",), "box": ("size",), "disk": ("radius",)}
LOCAL_ONLY_KEYS = ("n_workers", "threads_per_worker", "memory_limit", "dashboard_address")
SECURITY_KEYS = ("ca_file", "cert_file", "key_file")


def formats() -> tuple[str, ...]:
    """Output formats: every registered on-disk format."""
    from ..storage import FORMATS

    return tuple(FORMATS)


def boundaries() -> tuple[str, ...]:
    """Boundary names: the registered ones and their ``scipy.ndimage`` aliases."""
    from ..boundaries import BOUNDARIES

    return BOUNDARIES


def sample_formats() -> tuple[str, ...]:
    """What input.sample can generate: the stack formats (an OME-Zarr image is only an output here)."""
    return tuple(f for f in formats() if f != "ome-zarr")


# -- values -----------------------------------------------------------------------
def show(value: Any) -> str:
    """A value as an error message quotes it."""
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list" if len(str(value)) > 60 else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def problem(message: str, *sub: tuple[str, str]) -> PydanticCustomError:
    """An error at the value's key (``message``) and/or at keys below it (``sub``)."""
    return PydanticCustomError("dsc", "{text}", {"text": message, "sub": list(sub)})


def parse_bytes(value: Any) -> int:
    """``64MiB``, ``1.5 GB``, ``4096`` -> bytes (:func:`dask.utils.parse_bytes`). Raises ValueError."""
    try:
        return check_bytes(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


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


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ``memory://``, ``file://``...)."""
    return bool(_URL_RE.match(path))


def resolve_path(path: str, info: ValidationInfo) -> str:
    """A path from the file, made absolute against the workflow's folder (URLs as they are)."""
    if is_url(path):
        return path
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(str(p))


# -- reusable checked types ----------------------------------------------------------
def _choice(allowed_fn, allow_none: bool = False):
    def check(value: Any) -> Any:
        allowed = allowed_fn() if callable(allowed_fn) else allowed_fn
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or value not in allowed:
            raise problem(f"expected one of {', '.join(allowed) + (', null' if allow_none else '')}; got {show(value)}")
        return value
    return check


class _Enum:
    """The JSON schema of a choice, read from ``allowed`` (a tuple, or a
    function returning one) when a schema is asked for. Not at import: the
    format and boundary registries import zarr and numba, ~1 s that a
    command would pay before it could report a workflow's first mistake."""

    __slots__ = ("allowed", "allow_none")

    def __init__(self, allowed, allow_none: bool):
        self.allowed, self.allow_none = allowed, allow_none

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict:
        names = self.allowed() if callable(self.allowed) else self.allowed
        return {"enum": [*names, *([None] if self.allow_none else [])]}


def Choice(allowed, allow_none: bool = False, schema: dict | None = None):
    return Annotated[Any, BeforeValidator(_choice(allowed, allow_none)),
                     WithJsonSchema(schema) if schema else _Enum(allowed, allow_none)]


def _string(allow_none: bool):
    def check(value: Any) -> Any:
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or not value.strip():
            raise problem(f"expected a non-empty string{' or null' if allow_none else ''}; got {show(value)}")
        return value
    return check


def _path(value: Any, info: ValidationInfo) -> str:
    return resolve_path(_string(False)(value), info)


Text = Annotated[Any, BeforeValidator(_string(False)), WithJsonSchema({"type": "string", "minLength": 1})]
OptionalText = Annotated[Any, BeforeValidator(_string(True)), WithJsonSchema({"type": ["string", "null"]})]
PathText = Annotated[Any, BeforeValidator(_path), WithJsonSchema({"type": "string", "minLength": 1,
                     "description": "local path (relative to the workflow file's folder) or fsspec URL"})]


def _integer(minimum: int, allow_none: bool = False):
    def check(value: Any) -> Any:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise problem(f"expected {what}{' or null' if allow_none else ''}; got {show(value)}")
        return int(value)
    return check


def Integer(minimum: int = 1, allow_none: bool = False):
    schema: dict = {"type": ["integer", "null"] if allow_none else "integer", "minimum": minimum}
    return Annotated[Any, BeforeValidator(_integer(minimum, allow_none)), WithJsonSchema(schema)]


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise problem(f"expected a positive number; got {show(value)}")
    return float(value)


def _real(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise problem(f"expected a finite number; got {show(value)}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise problem(f"expected true or false; got {show(value)}")
    return value


def _options(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise problem(f"expected a mapping of option names to values; got {show(value)}")
    return dict(value)


def _size(value: Any) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise problem(str(exc)) from None


PositiveNumber = Annotated[Any, BeforeValidator(_positive_number), WithJsonSchema({"type": "number", "exclusiveMinimum": 0})]
Real = Annotated[Any, BeforeValidator(_real), WithJsonSchema({"type": "number"})]
Boolean = Annotated[Any, BeforeValidator(_boolean), WithJsonSchema({"type": "boolean"})]
Options = Annotated[Any, BeforeValidator(_options), WithJsonSchema({"type": ["object", "null"],
                    "description": "fsspec options (URLs only)"})]
SIZE_SCHEMA = {"type": ["integer", "string"], "description": "bytes, or a size such as 64MiB, 512MB, 4GiB"}
Size = Annotated[Any, BeforeValidator(_size), WithJsonSchema(SIZE_SCHEMA)]


class Section(BaseModel):
    """A mapping of the file: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_default=False)


# -- input --------------------------------------------------------------------------
def _frame_shape(value: Any) -> tuple[int, int]:
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        return (value[0], value[1])
    raise problem(f"expected [height, width], two positive integers; got {show(value)}")


class SampleSpec(Section):
    """A sample stack to generate at ``input.path`` when it does not exist:
    ROI footprints (``kind: rois``), or huge population-raster-like frames
    (``kind: raster``, :func:`dask_sparseconv.sample_data.sample_raster`)."""

    kind: Choice(("rois", "raster")) = "rois"
    n_images: Integer() = 200
    frame_shape: Annotated[Any, BeforeValidator(_frame_shape),
                           WithJsonSchema({"type": "array", "items": {"type": "integer", "minimum": 1},
                                           "minItems": 2, "maxItems": 2})] = (512, 512)
    max_rois: Integer(0) = 3
    radius: PositiveNumber = 8.0
    nnz: Annotated[Integer(0), Field(description="kind raster: nonzeros per frame")] = 1_000_000
    mean_cluster: Annotated[Integer(1), Field(description="kind raster: mean pixels per cluster")] = 400
    format: Choice(sample_formats) = "dense"
    seed: Integer(0) = 0

    @model_validator(mode="after")
    def _raster_is_sparse(self) -> "SampleSpec":
        if self.kind == "raster":
            if self.format != "csr":
                raise problem(f"format: a raster sample is written as csr (its frames are far larger than a "
                              f"block); got format: {self.format}")
            H, W = self.frame_shape
            if self.nnz > H * W // 4:
                raise problem(f"nnz: {self.nnz} is more than a quarter of the {H} x {W} pixels; a raster sample "
                              "is mostly zero")
        return self


def _sample(value: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    return value


def _axis_pair(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, str) and v for v in value) \
            or value[0] == value[1]:
        raise problem(f"expected two different axis names such as [z, x]; got {show(value)}")
    return list(value)


class InputSpec(Section):
    path: PathText
    array: OptionalText = None
    level: Annotated[Integer(0, allow_none=True),
                     Field(description="an OME-Zarr image's pyramid level to read (default 0)")] = None
    spatial_axes: Annotated[Any, BeforeValidator(_axis_pair),
                            WithJsonSchema({"type": ["array", "null"], "items": {"type": "string"}, "minItems": 2,
                                            "maxItems": 2}),
                            Field(description="an OME-Zarr image's two frame axes, rows first (default: its last two)")] = None
    storage_options: Options = Field(default_factory=dict)
    sample: Annotated[SampleSpec | None, BeforeValidator(_sample),
                      Field(description="true, or a mapping: generate a sample stack when path is missing")] = None


# -- kernel -------------------------------------------------------------------------
class KernelSpec:
    """A checked kernel: its kind, its parameters and the array built from them."""

    def __init__(self, kind: str, params: dict, array: np.ndarray, names: list[str] | None = None):
        self.kind, self.params, self.array = kind, params, array
        #: a kernel bank's kernel names (``kernels:``); None for one kernel
        self.names = names

    @property
    def description(self) -> str:
        if self.kind == "bank":
            parts = ", ".join(f"{n}: {d}" for n, d in zip(self.names or [], self.params["kernels"]))
            return f"a bank of {len(self.params['kernels'])} kernels ({parts})"
        if self.kind in ("gaussian", "box", "disk"):
            args = ", ".join(f"{k}={v}" for k, v in self.params.items())
            return f"{self.kind}({args})"
        if self.kind == "file":
            return f"file {self.params['file']}"
        return "values"

    def __repr__(self) -> str:
        return f"KernelSpec({self.description}, shape={self.array.shape})"


def _kernel(raw: Any, info: ValidationInfo) -> KernelSpec:
    import difflib

    if isinstance(raw, KernelSpec):
        return raw
    if isinstance(raw, str):  # shorthand: `kernel: k.npy`
        raw = {"file": raw}
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in KERNEL_KINDS:
        sub = []
        if isinstance(raw, dict):
            for key in raw:
                if key not in KERNEL_KINDS:
                    close = difflib.get_close_matches(str(key), KERNEL_KINDS, n=1, cutoff=0.6)
                    sub.append((str(key), f"unknown key; did you mean '{close[0]}'?" if close
                                else f"unknown key; known keys: {', '.join(KERNEL_KINDS)}"))
        if isinstance(raw, dict) and len(raw) == 1:
            raise problem("", *sub)
        given = f"keys {', '.join(map(str, raw))}" if isinstance(raw, dict) and raw else show(raw)
        raise problem(f"expected exactly one of {', '.join(KERNEL_KINDS)} (e.g. {{gaussian: {{sigma: 1.5}}}}); got {given}",
                      *sub)
    ((kind, params),) = raw.items()
    if kind == "file":
        fpath = _string(False)(params) if isinstance(params, str) and params.strip() else None
        if fpath is None:
            raise problem("", ("file", f"expected a non-empty string; got {show(params)}"))
        if is_url(fpath):
            raise problem("", ("file", f"kernel files must be local paths; got {fpath!r}"))
        resolved = resolve_path(fpath, info)
        try:
            arr = _kernels.load_kernel_file(resolved)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise problem("", ("file", str(exc))) from None
        return KernelSpec("file", {"file": resolved}, arr)
    if kind == "values":
        if not isinstance(params, list):
            raise problem("", ("values", "expected a list of rows of numbers, e.g. [[0, 1, 0], [1, 1, 1], [0, 1, 0]]; "
                                         f"got {show(params)}"))
        try:
            arr = check_kernel(params, name="values")
        except (ValueError, TypeError) as exc:
            raise problem("", ("values", str(exc))) from None
        return KernelSpec("values", {}, arr.astype(np.float64) if arr.dtype == np.bool_ else arr)
    if not isinstance(params, dict):
        raise problem("", (kind, f"expected a mapping with keys {', '.join(KERNEL_PARAMS[kind])}; got {show(params)}"))
    sub = []
    for key in params:
        if key not in KERNEL_PARAMS[kind]:
            close = difflib.get_close_matches(str(key), KERNEL_PARAMS[kind], n=1, cutoff=0.6)
            sub.append((f"{kind}.{key}", f"unknown key; did you mean '{close[0]}'?" if close
                        else f"unknown key; known keys: {', '.join(KERNEL_PARAMS[kind])}"))
    sub += [(f"{kind}.{k}", "required key is missing") for k in KERNEL_REQUIRED[kind] if k not in params]
    if sub:
        raise problem("", *sub)
    try:
        arr = getattr(_kernels, kind)(**params)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        # the kernels module names its parameter first: "sigma must be ..."
        name = msg.split(" ", 1)[0].split("[", 1)[0]
        if name in params:
            raise problem("", (f"{kind}.{name}", msg.split(" ", 1)[1] if " " in msg else msg)) from None
        raise problem("", (kind, msg)) from None
    return KernelSpec(kind, dict(params), arr)


def _kernel_bank(raw: Any, info: ValidationInfo) -> KernelSpec:
    """``kernels:``, a list of kernels (each as under ``kernel:``, with an
    optional ``name``) applied in one pass. Kernels of different sizes are
    zero-padded, centred, to the largest: in mode 'same' that leaves each
    result as it is alone (an odd side grows by an even number of pixels)."""
    from ..pipeline.bank import check_kernel_names

    if isinstance(raw, KernelSpec):
        return raw
    if not isinstance(raw, list) or not raw:
        raise problem("expected a list of kernels, each one of gaussian, box, disk, file, values with an optional "
                      f"name (e.g. [{{gaussian: {{sigma: 1}}, name: fine}}, {{gaussian: {{sigma: 3}}}}]); got {show(raw)}")
    specs: list[KernelSpec] = []
    names: list[str] = []
    sub: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        name: Any = str(i)
        if isinstance(item, dict) and "name" in item:
            item = dict(item)
            name = item.pop("name")
            try:
                check_kernel_names([name], np.zeros((1, 1, 1)))
            except (ValueError, TypeError) as exc:
                sub.append((f"{i}.name", str(exc).split(": ", 1)[-1]))
        try:
            specs.append(_kernel(item, info))
            names.append(str(name))
        except PydanticCustomError as exc:
            ctx = exc.context or {}
            if ctx.get("text"):
                sub.append((str(i), ctx["text"]))
            sub += [(f"{i}.{k}", m) for k, m in ctx.get("sub", ())]
    if sub:
        raise problem("", *sub)
    if len(set(names)) != len(names):
        raise problem(f"kernel names must be distinct; got {names}")
    kh = max(sp.array.shape[0] for sp in specs)
    kw = max(sp.array.shape[1] for sp in specs)
    odd = [(i, sp.array.shape) for i, sp in enumerate(specs)
           if (kh - sp.array.shape[0]) % 2 or (kw - sp.array.shape[1]) % 2]
    if odd:
        raise problem(f"kernels of shapes {[list(sp.array.shape) for sp in specs]} cannot be centred in one "
                      f"{kh} x {kw} shape (kernel {odd[0][0]} differs from it by an odd number of rows or columns); "
                      "give sizes of one parity (e.g. gaussian size:)")
    arrays = []
    for sp in specs:
        h, w = sp.array.shape
        dh, dw = (kh - h) // 2, (kw - w) // 2
        arrays.append(np.pad(sp.array.astype(np.float64), ((dh, kh - h - dh), (dw, kw - w - dw))))
    return KernelSpec("bank", {"kernels": [sp.description for sp in specs]}, np.stack(arrays), names)


KERNEL_SCHEMA = {
    "description": "exactly one of gaussian, box, disk, file, values (a string is shorthand for file)",
    "oneOf": [
        {"type": "string", "description": "a kernel file (.npy, .txt, .csv, .tsv)"},
        {"type": "object", "additionalProperties": False, "required": ["gaussian"], "properties": {"gaussian": {
            "type": "object", "additionalProperties": False, "required": ["sigma"],
            "properties": {"sigma": {"type": "number", "exclusiveMinimum": 0}, "size": {"type": "integer", "minimum": 1}}}}},
        {"type": "object", "additionalProperties": False, "required": ["box"], "properties": {"box": {
            "type": "object", "additionalProperties": False, "required": ["size"],
            "properties": {"size": {"oneOf": [{"type": "integer", "minimum": 1},
                                              {"type": "array", "items": {"type": "integer", "minimum": 1}}]}}}}},
        {"type": "object", "additionalProperties": False, "required": ["disk"], "properties": {"disk": {
            "type": "object", "additionalProperties": False, "required": ["radius"],
            "properties": {"radius": {"type": "number", "exclusiveMinimum": 0}}}}},
        {"type": "object", "additionalProperties": False, "required": ["file"], "properties": {"file": {"type": "string"}}},
        {"type": "object", "additionalProperties": False, "required": ["values"],
         "properties": {"values": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}},
    ],
}


KERNELS_SCHEMA = {
    "description": "a kernel bank: a list of kernels (each as under kernel, with an optional name) applied in one "
                   "pass; smaller kernels are zero-padded, centred, to the largest",
    "type": "array", "minItems": 1,
    "items": {"anyOf": [{"type": "string"}, {"type": "object", "minProperties": 1, "maxProperties": 2,
                                              "properties": {"name": {"type": "string"}}}]},
}


# -- output ---------------------------------------------------------------------------
def _compressor(value: Any) -> str:
    return _choice(COMPRESSORS)("none" if value is None else value)


class OutputSpec(Section):
    path: PathText
    format: Choice(formats, allow_none=True) = None
    pyramid: Annotated[Integer(0), Field(description="format ome-zarr: downsampled levels to write (2x2 means)")] = 0
    overwrite: Boolean = False
    storage_options: Options = Field(default_factory=dict)
    compressor: Annotated[Any, BeforeValidator(_compressor), WithJsonSchema({"enum": ["default", "none", None]})] = "default"

    @model_validator(mode="after")
    def _pyramid_needs_ome_zarr(self) -> "OutputSpec":
        if self.pyramid and self.format != "ome-zarr":
            raise problem(f"pyramid: {self.pyramid} needs format: ome-zarr (got format: {self.format}); "
                          "downsampled levels are an OME-Zarr image's")
        return self


# -- cluster ----------------------------------------------------------------------------
def _address(value: Any) -> Any:
    value = _string(True)(value)
    if value is not None and re.match(r"^(tcp|tls|inproc|ucx|ws|wss)://[^:/\s]+(:\d+)?$", value) is None:
        raise problem(f"expected a scheduler address such as tcp://127.0.0.1:8786; got {value!r}")
    return value


def _memory_limit(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise problem(f"{exc}, 'auto' or null (no limit)") from None


def _dashboard(value: Any) -> Any:
    if value is None or value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 65536:
        return f":{value}"
    if isinstance(value, str) and re.match(r"^[\w.\-]*:\d{1,5}$", value):
        return value
    raise problem(f"expected an address such as ':8787', a port number or null; got {show(value)}")


def _timeout(value: Any) -> float:
    try:
        return parse_seconds(value)
    except ValueError as exc:
        raise problem(str(exc)) from None


def _security_file(value: Any, info: ValidationInfo) -> str:
    p = _path(value, info)
    if not os.path.isfile(p):
        raise problem(f"file {p!r} does not exist")
    return p


SecurityFile = Annotated[Any, BeforeValidator(_security_file), WithJsonSchema({"type": "string"})]


class SecuritySpec(Section):
    ca_file: SecurityFile
    cert_file: SecurityFile
    key_file: SecurityFile


class ClusterSpec(Section):
    address: Annotated[Any, BeforeValidator(_address),
                       WithJsonSchema({"type": ["string", "null"], "description": "tcp:// or tls:// scheduler address"})] = None
    n_workers: Integer(1, allow_none=True) = None
    threads_per_worker: Integer() = 1
    memory_limit: Annotated[Any, BeforeValidator(_memory_limit),
                            WithJsonSchema({"type": ["integer", "string", "null"],
                                            "description": "per worker: a size, 'auto' or null (no limit)"})] = "auto"
    dashboard_address: Annotated[Any, BeforeValidator(_dashboard),
                                 WithJsonSchema({"type": ["string", "integer", "null", "boolean"]})] = ":8787"
    timeout: Annotated[Any, BeforeValidator(_timeout),
                       WithJsonSchema({"type": ["number", "string"], "description": "seconds, or 10s, 500ms, 1min"})] \
        = DEFAULT_TIMEOUT
    security: SecuritySpec | None = None
    route: Choice(ROUTES) = "any"


class BlockSpec(Section):
    memory: Size = DEFAULT_BLOCK_MEMORY


# -- the file ------------------------------------------------------------------------------
class Workflow(Section):
    """A checked workflow. Paths are absolute (or URLs)."""

    description: OptionalText = None
    input: InputSpec
    kernel: Annotated[Any, BeforeValidator(_kernel), WithJsonSchema(KERNEL_SCHEMA)] = None
    #: a kernel bank: kernels applied in one pass (instead of ``kernel``)
    kernels: Annotated[Any, BeforeValidator(_kernel_bank), WithJsonSchema(KERNELS_SCHEMA)] = None
    mode: Choice(MODES) = "same"
    boundary: Choice(boundaries) = "fill"
    fillvalue: Real = 0.0
    correlate: Boolean = False
    method: Choice(("auto",) + METHODS) = "auto"
    backend: Choice(("auto",) + BACKENDS) = "auto"
    dtype: Choice(DTYPES, allow_none=True) = None
    output: OutputSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    block: BlockSpec = Field(default_factory=BlockSpec)
    #: the file it was read from (set by the loader; not a key of the file)
    source: Annotated[str | None, Field(exclude=True)] = None

    @model_validator(mode="after")
    def _bank_is_the_kernel(self) -> "Workflow":
        # one place for the rest of the package to look: wf.kernel (a bank: kind 'bank', a 3-D array)
        if self.kernel is None and self.kernels is not None:
            self.kernel = self.kernels
        return self

    @property
    def operation(self):
        """The :class:`~dask_sparseconv.operation.Operation` of ``boundary``,
        ``fillvalue`` and ``correlate`` (checked together by the loader)."""
        from ..operation import check_operation

        return check_operation(self.boundary, self.fillvalue, self.correlate)

    def to_dict(self) -> dict:
        """Plain-data view (kernel as its spec, not the array)."""
        d = self.model_dump(exclude={"kernel", "kernels", "source"})
        d["kernel"] = {"kind": self.kernel.kind, **self.kernel.params, "shape": list(self.kernel.array.shape)}
        if self.kernel.names:
            d["kernel"]["names"] = list(self.kernel.names)
        d["source"] = self.source
        return d


def json_schema() -> dict:
    """The JSON schema of a workflow file (what ``dask-sparseconv schema`` prints)."""
    schema = Workflow.model_json_schema()
    schema["properties"].pop("source", None)
    schema["oneOf"] = [{"required": ["kernel"]}, {"required": ["kernels"]}]  # one kernel, or a bank
    schema["title"] = "dask-sparseconv workflow"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
