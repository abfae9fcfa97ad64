"""Engines: one module per method, one class per backend.

| method          | numpy | numba | torch |
|-----------------|-------|-------|-------|
| direct          |   -   |  yes  |   -   |
| precomputed     |  yes  |  yes  |  yes  |
| lazy            |  yes  |   -   |  yes  |
| gather_scatter  |  yes  |  yes  |  yes  |
| separable       |   -   |  yes  |   -   |

``method='auto'`` on numba is ``direct``, or, for a low-rank kernel, an
engine that picks ``direct`` or ``separable`` per call
(:class:`~dask_sparseconv.engine.separable.AutoSeparable`).

Implementations are imported only when asked for, so torch is never imported
unless a torch engine is built.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Engine

#: (method, backend) -> "module:Class" inside this package.
REGISTRY: dict[tuple[str, str], str] = {
    ("direct", "numba"): "direct:DirectNumba",
    ("precomputed", "numpy"): "precomputed:PrecomputedNumpy",
    ("precomputed", "numba"): "precomputed:PrecomputedNumba",
    ("precomputed", "torch"): "torch_engines:PrecomputedTorch",
    ("lazy", "numpy"): "lazy:LazyNumpy",
    ("lazy", "torch"): "torch_engines:LazyTorch",
    ("gather_scatter", "numpy"): "gather_scatter:GatherScatterNumpy",
    ("gather_scatter", "numba"): "gather_scatter:GatherScatterNumba",
    ("gather_scatter", "torch"): "torch_engines:GatherScatterTorch",
    ("separable", "numba"): "separable:SeparableNumba",
}


@functools.cache
def engine_class(method: str, backend: str) -> type[Engine]:
    """Import and return the engine class for ``(method, backend)`` (looked up
    once per process: every new convolver asks)."""
    try:
        target = REGISTRY[(method, backend)]
    except KeyError:
        raise ValueError(f"no engine for method={method!r} with backend={backend!r}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def __getattr__(name: str) -> Any:
    # The base class imports scipy.sparse; the registry above is read by
    # argument checks (a workflow's schema) that must not pay for it.
    if name == "Engine":
        from .base import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "REGISTRY", "engine_class"]
