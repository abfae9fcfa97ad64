"""Which engine a block runs with in *this* process: ``backend='auto'`` per worker.

One job mixes CPU and GPU workers with one graph: the graph carries
``backend='auto'`` unchanged and every process resolves it when it builds
its convolver (:func:`resolve_auto`, called by
:func:`~dask_sparseconv.runtime.cache.get_convolver`):

* **an accelerator is visible** (a CUDA device, see :func:`accelerator`):
  the torch ``precomputed`` engine on that device, when its Toeplitz matrix
  (:func:`~dask_sparseconv.engine.torch_engines.estimate_toeplitz_bytes`)
  plus the per-block working memory fit the device budget; otherwise torch
  ``gather_scatter`` when the working memory alone fits; otherwise the CPU
  engine. A fallback is logged once per process (logger
  ``dask_sparseconv``, level WARNING) and reported in the pipeline's summary
  (``summary.extra['fallbacks']``), never discovered by running out of memory;
* **no accelerator**: the CPU default, ``direct`` on numba (as
  :func:`~dask_sparseconv.validation.resolve_method_backend`).

The device budget is ``share x free device memory``
(``torch.cuda.mem_get_info``), ``share`` defaulting to 0.8, unless an
absolute budget is given. Settings (argument, else environment variable —
environment variables reach ``dask worker`` processes started with them):

========================  ===================================  =========================================
argument                  environment variable                 meaning
========================  ===================================  =========================================
``gpu_device``            ``DASK_SPARSECONV_GPU_DEVICE``       ``auto`` (default): a CUDA device if torch
                                                               sees one; ``none``: never an accelerator;
                                                               ``cuda``/``cuda:N``: that device;
                                                               ``cpu``: **simulation aid** — treat torch's
                                                               CPU device as the accelerator (tests, CI,
                                                               rehearsing a GPU job on a laptop)
``device_budget``         ``DASK_SPARSECONV_DEVICE_BUDGET``    absolute budget in bytes (``'2GiB'``);
                                                               replaces share x free memory (simulate a
                                                               small device)
``device_memory_share``   ``DASK_SPARSECONV_DEVICE_SHARE``     share of the free memory, in (0, 1]
``working_bytes``         —                                    per-block working memory reserved besides
                                                               the Toeplitz matrix (default 1 GiB)
========================  ===================================  =========================================

torch is imported only when an accelerator may exist: torch installed, a
CUDA/ROCm build (read from ``torch/version.py`` without importing it), and
``CUDA_VISIBLE_DEVICES`` not empty — or ``gpu_device`` names one. On a
machine with the CPU build of torch, resolution never imports torch.

Resolutions are memoised per process (key: frame shape, kernel, dtype,
mode, method and the settings above), so a worker decides once per job and
does not change its mind when its own Toeplitz matrix has taken device
memory. :func:`clear_resolutions` forgets them (tests, or after changing the
environment of a running worker).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..kernels import kernel_digest
from ..validation import METHODS, check_choice, check_dtype, check_mode, module_available, resolve_method_backend

logger = logging.getLogger("dask_sparseconv")

ENV_GPU_DEVICE = "DASK_SPARSECONV_GPU_DEVICE"
ENV_BUDGET = "DASK_SPARSECONV_DEVICE_BUDGET"
ENV_SHARE = "DASK_SPARSECONV_DEVICE_SHARE"

#: Share of the free device memory the resolver lets one process use.
DEFAULT_SHARE = 0.8
#: Device memory reserved per block besides the Toeplitz matrix: the block's
#: input on the device, the product or accumulator (bounded by the engines'
#: ``max_buffer_bytes``, 256 MiB) and the result before it is copied back.
DEFAULT_WORKING_BYTES = 1024**3

#: Marks the reason of a resolution that did not get what was asked for.
FALLBACK = "fallback: "

ROUTES = ("any", "gpu", "cpu")


class Resolution(NamedTuple):
    """What a block runs with in this process, and why."""

    method: str
    backend: str
    device: str | None
    reason: str

    @property
    def fallback(self) -> bool:
        """True when an accelerator was there but the engine asked for did not fit."""
        return self.reason.startswith(FALLBACK)

    @property
    def label(self) -> str:
        """``'precomputed/torch/cuda:0'``, ``'direct/numba'``."""
        return "/".join(p for p in (self.method, self.backend, self.device) if p)


# -- settings --------------------------------------------------------------------
def _parse_bytes(value: Any, name: str) -> int:
    from ..validation import check_bytes

    return check_bytes(value, name, minimum=0, example="2GiB")


def _setting(value: Any, env: str) -> Any:
    if value is not None:
        return value
    raw = os.environ.get(env)
    return raw.strip() if raw is not None and raw.strip() else None


def budget_override(device_budget: Any = None) -> int | None:
    """The absolute device budget (argument, else ``DASK_SPARSECONV_DEVICE_BUDGET``), or None."""
    value = _setting(device_budget, ENV_BUDGET)
    name = "device_budget" if device_budget is not None else ENV_BUDGET
    return None if value is None else _parse_bytes(value, name)


def memory_share(device_memory_share: Any = None) -> float:
    """The share of free device memory to use (argument, else ``DASK_SPARSECONV_DEVICE_SHARE``, else 0.8)."""
    value = _setting(device_memory_share, ENV_SHARE)
    if value is None:
        return DEFAULT_SHARE
    name = "device_memory_share" if device_memory_share is not None else ENV_SHARE
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}") from None
    if isinstance(value, bool) or not 0 < share <= 1:
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    return share


_DEVICE_RE = re.compile(r"^(auto|none|cpu|cuda(:\d+)?)$")


def gpu_setting(gpu_device: Any = None) -> str:
    """The accelerator setting: ``'auto'``, ``'none'``, ``'cpu'`` (simulation) or ``'cuda[:N]'``."""
    value = _setting(gpu_device, ENV_GPU_DEVICE)
    if value is None:
        return "auto"
    name = "gpu_device" if gpu_device is not None else ENV_GPU_DEVICE
    if not isinstance(value, str) or not _DEVICE_RE.match(value.lower()):
        raise ValueError(
            f"{name} must be 'auto', 'none', 'cuda', 'cuda:N' or 'cpu' (simulate an accelerator with torch's CPU "
            f"device); got {value!r}"
        )
    return value.lower()


# -- detection -------------------------------------------------------------------
def _torch_may_see_cuda() -> bool:
    """Whether importing torch could reveal a CUDA device (cheap: torch is not imported)."""
    if "torch" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for location in spec.submodule_search_locations or ():
        try:
            text = (Path(location) / "version.py").read_text()
        except OSError:
            continue
        gpu_build = re.search(r"^(cuda|hip)\s*(:[^=]*)?=\s*(?!None\b)\S", text, re.M)
        return gpu_build is not None
    return True  # cannot tell without importing


def accelerator(gpu_device: Any = None) -> str | None:
    """The torch device that counts as this process's accelerator, or None.

    ``'auto'``: ``'cuda:N'`` (torch's current CUDA device) when a CUDA (or
    ROCm) build of torch sees a device, else None. ``'none'``: None.
    ``'cuda'``/``'cuda:N'``: that device (ValueError when CUDA is not
    available). ``'cpu'``: ``'cpu'`` — torch's CPU device stands in for a GPU
    (simulation aid; never chosen automatically).
    """
    setting = gpu_setting(gpu_device)
    if setting == "none":
        return None
    if setting == "auto":
        if not _torch_may_see_cuda():
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        return f"cuda:{torch.cuda.current_device()}"
    if not module_available("torch"):
        raise ValueError(f"gpu_device={setting!r} needs torch, which is not installed")
    if setting == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"gpu_device={setting!r} was asked for but CUDA is not available in this process")
    dev = torch.device(setting)
    return f"cuda:{torch.cuda.current_device() if dev.index is None else dev.index}"


def free_device_memory(device: str) -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info``; for the simulated
    ``'cpu'`` accelerator, the host's available memory."""
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def device_budget(device: str, *, device_budget: Any = None, device_memory_share: Any = None) -> tuple[int, str]:
    """Bytes the engines may take on ``device``, and how that was decided."""
    override = budget_override(device_budget)
    if override is not None:
        return override, f"budget {_fmt(override)} (set)"
    share = memory_share(device_memory_share)
    free = free_device_memory(device)
    return int(free * share), f"budget {_fmt(free * share)} ({share:g} x {_fmt(free)} free)"


def _fmt(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# -- resolution ------------------------------------------------------------------
_memo: dict[tuple, Resolution] = {}
_memo_lock = threading.Lock()
_logged: set[str] = set()


def clear_resolutions() -> None:
    """Forget this process's memoised resolutions and which fallbacks were logged."""
    with _memo_lock:
        _memo.clear()
        _logged.clear()


def _log_once(res: Resolution, context: str) -> None:
    message = f"{context}: {res.reason}"
    with _memo_lock:
        if message in _logged:
            return
        _logged.add(message)
    if res.fallback:
        logger.warning("dask_sparseconv [pid %d]: %s", os.getpid(), message)
    else:
        logger.info("dask_sparseconv [pid %d]: %s", os.getpid(), message)


def resolve_auto(
    frame_shape: tuple[int, int],
    kernel: Any,
    dtype: Any,
    mode: str,
    *,
    method: str = "auto",
    gpu_device: Any = None,
    device_budget: Any = None,
    device_memory_share: Any = None,
    working_bytes: int = DEFAULT_WORKING_BYTES,
) -> Resolution:
    """Resolve ``backend='auto'`` for one frame shape and kernel in this process.

    Parameters
    ----------
    frame_shape, kernel, mode
        As for :class:`~dask_sparseconv.Convolver`.
    dtype : float32 or float64 (None: float64, the larger estimate)
        The compute dtype; it sets the Toeplitz matrix's size.
    method : {'auto', 'direct', 'precomputed', 'lazy', 'gather_scatter'}
        ``'auto'`` on an accelerator means ``precomputed``, falling back to
        ``gather_scatter`` and then to the CPU default (``direct``/numba).
        An explicit method runs on the accelerator when it has a torch engine
        and fits, else on the CPU with the same method.
    gpu_device, device_budget, device_memory_share
        See the module docstring (each defaults to its environment variable).
    working_bytes : int
        Device memory reserved for one block's transfers and scratch.

    Returns
    -------
    Resolution
        ``(method, backend, device, reason)``; ``device`` is None for CPU
        engines. ``reason.startswith(FALLBACK)`` (``.fallback``) when an
        accelerator was there but what was asked for did not fit.
    """
    from ..validation import check_frame_shape, check_kernel

    frame_shape = check_frame_shape(frame_shape)
    kernel = np.asarray(kernel)
    if kernel.dtype == object or kernel.ndim not in (2, 3) or not np.issubdtype(kernel.dtype, np.number):
        kernel = check_kernel(kernel)
    mode = check_mode(mode)
    dt = check_dtype(dtype) or np.dtype(np.float64)
    if method is None:
        method = "auto"
    check_choice("method", method, ("auto",) + METHODS)
    setting = gpu_setting(gpu_device)
    budget_set = budget_override(device_budget)
    share = memory_share(device_memory_share)
    working = _parse_bytes(working_bytes, "working_bytes")
    key = (frame_shape, kernel_digest(kernel), dt.str, mode, method, setting, budget_set, share, working)
    with _memo_lock:
        res = _memo.get(key)
    if res is not None:
        return res
    res = _resolve(frame_shape, kernel, dt, mode, method, setting, device_budget, device_memory_share, working)
    with _memo_lock:
        res = _memo.setdefault(key, res)
    _log_once(res, f"frame {frame_shape[0]}x{frame_shape[1]}, kernel {kernel.shape[0]}x{kernel.shape[1]}, "
                   f"mode {mode!r}, {dt.name}")
    return res


def _cpu(method: str, why: str) -> Resolution:
    m, b = resolve_method_backend("auto" if method == "auto" else method, "auto")
    return Resolution(m, b, None, why)


def _resolve(frame_shape, kernel, dt, mode, method, setting, budget_arg, share_arg, working) -> Resolution:
    if method in ("direct", "separable"):
        return _cpu(method, f"method {method!r} has no torch engine: CPU")
    dev = accelerator(setting)
    if dev is None:
        why = "no accelerator (gpu_device='none')" if setting == "none" else "no CUDA device visible"
        return _cpu(method, f"{why}: CPU")
    budget, how = device_budget(dev, device_budget=budget_arg, device_memory_share=share_arg)
    want = "precomputed" if method == "auto" else method
    if want == "precomputed":
        from ..engine.torch_engines import PrecomputedTorch, estimate_toeplitz_bytes

        # a kernel bank (K, kH, kW) holds one Toeplitz matrix per kernel
        toeplitz = sum(estimate_toeplitz_bytes(frame_shape, k, dt, mode) for k in (kernel if kernel.ndim == 3 else [kernel]))
        need = toeplitz + working
        if need <= budget and toeplitz <= PrecomputedTorch.max_toeplitz_bytes:
            return Resolution("precomputed", "torch", dev, f"precomputed on {dev}: Toeplitz {_fmt(toeplitz)} + "
                                                           f"working {_fmt(working)} fit the {how}")
        short = (f"a {_fmt(toeplitz)} Toeplitz matrix + {_fmt(working)} working memory do not fit the {how}"
                 if toeplitz <= PrecomputedTorch.max_toeplitz_bytes
                 else f"a {_fmt(toeplitz)} Toeplitz matrix exceeds the {_fmt(PrecomputedTorch.max_toeplitz_bytes)} limit")
        if method == "precomputed":
            res = _cpu("precomputed", "")
            return res._replace(reason=f"{FALLBACK}precomputed on {dev}: {short}; using {res.label} on the CPU")
        if working <= budget:
            return Resolution("gather_scatter", "torch", dev,
                              f"{FALLBACK}precomputed on {dev}: {short}; using gather_scatter/torch/{dev} "
                              f"(needs {_fmt(working)} working memory)")
        res = _cpu("auto", "")
        return res._replace(reason=f"{FALLBACK}precomputed on {dev}: {short}, and gather_scatter's "
                                   f"{_fmt(working)} working memory does not fit either; using {res.label} on the CPU")
    # lazy / gather_scatter: bounded scratch only
    if working <= budget:
        return Resolution(want, "torch", dev, f"{want} on {dev}: {_fmt(working)} working memory fits the {how}")
    res = _cpu(want, "")
    return res._replace(reason=f"{FALLBACK}{want} on {dev}: {_fmt(working)} working memory does not fit the {how}; "
                               f"using {res.label} on the CPU")


__all__ = [
    "DEFAULT_SHARE",
    "DEFAULT_WORKING_BYTES",
    "ENV_BUDGET",
    "ENV_GPU_DEVICE",
    "ENV_SHARE",
    "FALLBACK",
    "ROUTES",
    "Resolution",
    "accelerator",
    "budget_override",
    "clear_resolutions",
    "device_budget",
    "free_device_memory",
    "gpu_setting",
    "memory_share",
    "resolve_auto",
]
