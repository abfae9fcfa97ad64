"""Per-process resolution of backend='auto' (dask_sparseconv.runtime.devices), in one process.

There is no GPU here: the accelerator is simulated with torch's CPU device
(gpu_device='cpu' / DASK_SPARSECONV_GPU_DEVICE=cpu) and the device budget is
set explicitly, so every branch — precomputed on the device, the fallback to
torch gather_scatter, the fallback to the CPU — runs the real torch engines.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal
import scipy.sparse

from dask_sparseconv.engine.torch_engines import estimate_toeplitz_bytes
from dask_sparseconv.runtime import devices
from dask_sparseconv.runtime.cache import clear_cache, get_convolver
from dask_sparseconv.runtime.devices import DEFAULT_WORKING_BYTES, Resolution, resolve_auto

ENV_KEYS = (devices.ENV_GPU_DEVICE, devices.ENV_BUDGET, devices.ENV_SHARE)
K5 = np.arange(25, dtype=np.float64).reshape(5, 5) / 25.0 - 0.3
BIG = 64 * 1024**3  # a budget every small case fits


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    devices.clear_resolutions()
    clear_cache()
    yield
    devices.clear_resolutions()
    clear_cache()


def _stack(n, H, W, density, seed):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, H, W)) < density, rng.standard_normal((n, H, W)), 0.0).astype(np.float32)
    return x


def _float32_close(result, ref, x, kernel):
    """The documented float32 tolerance (docs/gpu.md): rtol 1e-5 and an
    absolute term of 1e-6 x max|x| x sum|kernel| (summation order differs
    between engines)."""
    atol = 1e-6 * float(np.abs(x).max() or 1.0) * float(np.abs(kernel).sum())
    np.testing.assert_allclose(result, ref, rtol=1e-5, atol=atol)


# -- resolution -------------------------------------------------------------------
def test_no_accelerator_is_the_cpu_default():
    res = resolve_auto((32, 32), K5, "float32", "same")
    assert isinstance(res, Resolution)
    method, backend, device, reason = res
    assert (method, backend, device) == ("direct", "numba", None)
    assert not res.fallback and "no CUDA device" in reason
    off = resolve_auto((32, 32), K5, "float32", "same", gpu_device="none")
    assert off[:3] == ("direct", "numba", None) and "gpu_device='none'" in off.reason


def test_resolution_does_not_import_torch_on_a_cpu_build():
    code = (
        "import sys, numpy as np\n"
        "from dask_sparseconv.runtime.devices import resolve_auto\n"
        "from dask_sparseconv.runtime.cache import get_convolver\n"
        "r = resolve_auto((16, 16), np.ones((3, 3)), 'float32', 'same')\n"
        "assert r[:3] == ('direct', 'numba', None), r\n"
        "get_convolver((16, 16), np.ones((3, 3)), 'same', 'auto', 'auto', 'float32')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr


def test_simulated_accelerator_with_room_gets_torch_precomputed():
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu", device_budget=BIG)
    assert res[:3] == ("precomputed", "torch", "cpu") and not res.fallback
    assert res.label == "precomputed/torch/cpu"
    # without a set budget: share x free (host) memory, which fits here too
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu", device_memory_share=0.5)
    assert res[:3] == ("precomputed", "torch", "cpu") and "0.5 x" in res.reason


def test_small_budget_falls_back_to_gather_scatter_then_to_the_cpu():
    toeplitz = estimate_toeplitz_bytes((32, 32), K5, np.float32, "same")
    assert 0 < toeplitz < 200_000
    # the Toeplitz matrix + working memory do not fit, working memory alone does
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu",
                       device_budget=DEFAULT_WORKING_BYTES + toeplitz - 1)
    assert res[:3] == ("gather_scatter", "torch", "cpu") and res.fallback
    assert "Toeplitz" in res.reason and "gather_scatter/torch/cpu" in res.reason
    # exactly enough: precomputed
    devices.clear_resolutions()
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu", device_budget=DEFAULT_WORKING_BYTES + toeplitz)
    assert res[:3] == ("precomputed", "torch", "cpu")
    # not even the working memory: the CPU default
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu", device_budget="100MiB")
    assert res[:3] == ("direct", "numba", None) and res.fallback and "on the CPU" in res.reason
    # the working reserve is a parameter: a smaller one fits a small device
    small = 64 * 1024**2
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu", device_budget="100MiB", working_bytes=small)
    assert res[:2] == ("precomputed", "torch")
    res = resolve_auto((32, 32), K5, "float32", "same", gpu_device="cpu", device_budget=small + toeplitz // 2,
                       working_bytes=small)
    assert res[:2] == ("gather_scatter", "torch")


def test_toeplitz_above_the_engine_limit_is_never_built():
    # 4096 x 4096 frame, 15 x 15 kernel: ~28 GiB of Toeplitz matrix; only estimated, never allocated
    res = resolve_auto((4096, 4096), np.ones((15, 15)), "float32", "same", gpu_device="cpu", device_budget=2**50)
    assert res[:3] == ("gather_scatter", "torch", "cpu") and "limit" in res.reason


def test_mode_and_dtype_enter_the_estimate():
    H = W = 64
    k = np.ones((9, 9))
    full = estimate_toeplitz_bytes((H, W), k, np.float64, "full")
    valid = estimate_toeplitz_bytes((H, W), k, np.float64, "valid")
    assert valid < full
    budget = DEFAULT_WORKING_BYTES + (full + valid) // 2
    assert resolve_auto((H, W), k, "float64", "valid", gpu_device="cpu", device_budget=budget).method == "precomputed"
    assert resolve_auto((H, W), k, "float64", "full", gpu_device="cpu", device_budget=budget).method == "gather_scatter"


@pytest.mark.parametrize("method, fits, expected", [
    ("precomputed", True, ("precomputed", "torch", "cpu")),
    ("precomputed", False, ("precomputed", "numpy", None)),
    ("gather_scatter", True, ("gather_scatter", "torch", "cpu")),
    ("gather_scatter", False, ("gather_scatter", "numba", None)),
    ("lazy", True, ("lazy", "torch", "cpu")),
    ("lazy", False, ("lazy", "numpy", None)),
    ("direct", True, ("direct", "numba", None)),
])
def test_explicit_method_keeps_the_method(method, fits, expected):
    res = resolve_auto((16, 16), K5, "float32", "same", method=method, gpu_device="cpu",
                       device_budget=BIG if fits else 1024)
    assert tuple(res[:3]) == expected
    assert res.fallback == (not fits and method != "direct")


def test_fallback_is_logged_once_per_process(caplog):
    caplog.set_level(logging.INFO, logger="dask_sparseconv")
    for _ in range(3):
        res = resolve_auto((24, 24), K5, "float32", "same", gpu_device="cpu", device_budget="100MiB")
        get_convolver((24, 24), K5, "same", "auto", "auto", "float32", gpu_device="cpu")  # env-free: no budget here
    warnings = [r for r in caplog.records if r.name == "dask_sparseconv" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert res.reason in warnings[0].getMessage()


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv(devices.ENV_GPU_DEVICE, "cpu")
    monkeypatch.setenv(devices.ENV_BUDGET, "2GiB")
    res = resolve_auto((16, 16), K5, "float32", "same")
    assert res[:3] == ("precomputed", "torch", "cpu") and "(set)" in res.reason
    monkeypatch.setenv(devices.ENV_BUDGET, "100MiB")
    devices.clear_resolutions()
    assert resolve_auto((16, 16), K5, "float32", "same")[:2] == ("direct", "numba")
    # an argument beats the environment
    assert resolve_auto((16, 16), K5, "float32", "same", gpu_device="none").reason.startswith("no accelerator")


@pytest.mark.parametrize("env, value, match", [
    (devices.ENV_GPU_DEVICE, "tpu", "DASK_SPARSECONV_GPU_DEVICE must be"),
    (devices.ENV_BUDGET, "lots", "DASK_SPARSECONV_DEVICE_BUDGET must be"),
    (devices.ENV_SHARE, "1.5", r"DASK_SPARSECONV_DEVICE_SHARE must be a number in \(0, 1\]"),
    (devices.ENV_SHARE, "0", r"in \(0, 1\]"),
])
def test_bad_settings_are_refused_with_their_name(monkeypatch, env, value, match):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        resolve_auto((16, 16), K5, "float32", "same")


def test_cuda_asked_for_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_auto((16, 16), K5, "float32", "same", gpu_device="cuda:0")


# -- the convolver cache resolves where it builds ---------------------------------
def test_cache_key_holds_the_resolved_engine(monkeypatch):
    cpu = get_convolver((32, 32), K5, "same", "auto", "auto", "float32")
    monkeypatch.setenv(devices.ENV_GPU_DEVICE, "cpu")
    monkeypatch.setenv(devices.ENV_BUDGET, "4GiB")
    gpu = get_convolver((32, 32), K5, "same", "auto", "auto", "float32")
    assert (cpu.method, cpu.backend, cpu.device) == ("direct", "numba", None)
    assert (gpu.method, gpu.backend, gpu.device) == ("precomputed", "torch", "cpu")
    assert gpu is get_convolver((32, 32), K5, "same", "auto", None, "float32")
    # gpu_device='none' keeps a GPU-capable process on the CPU engine
    assert get_convolver((32, 32), K5, "same", "auto", "auto", "float32", gpu_device="none") is cpu
    # an explicit backend is never resolved
    assert get_convolver((32, 32), K5, "same", "gather_scatter", "numpy", "float32").backend == "numpy"


@pytest.mark.parametrize("mode", ["same", "full", "valid"])
@pytest.mark.parametrize("out", ["csr", "dense"])
def test_device_engines_match_the_cpu_path_within_float32_tolerance(mode, out):
    x = _stack(12, 40, 36, 0.05, seed=3)
    x[4] = 0  # an empty frame
    csr = scipy.sparse.csr_matrix(x.reshape(12, -1))
    kernel = np.random.default_rng(7).standard_normal((5, 5))
    cpu = get_convolver((40, 36), kernel, mode, "auto", "auto", "float32")
    toeplitz = estimate_toeplitz_bytes((40, 36), kernel, np.float32, mode)
    pre = get_convolver((40, 36), kernel, mode, "auto", "auto", "float32", gpu_device="cpu")
    assert (pre.method, pre.backend) == ("precomputed", "torch")
    os.environ[devices.ENV_BUDGET] = str(DEFAULT_WORKING_BYTES + toeplitz - 1)  # removed by the fixture
    try:
        devices.clear_resolutions()
        gs = get_convolver((40, 36), kernel, mode, "auto", "auto", "float32", gpu_device="cpu")
    finally:
        del os.environ[devices.ENV_BUDGET]
    assert (gs.method, gs.backend) == ("gather_scatter", "torch")
    ref = np.stack([scipy.signal.convolve2d(f.astype(np.float64), kernel.astype(np.float32), mode) for f in x])
    base = cpu(csr, out=out, batched=True)
    for conv in (pre, gs):
        res = conv(csr, out=out, batched=True)
        if out == "csr":
            assert scipy.sparse.issparse(res) and res.has_canonical_format and res.dtype == np.float32
            res, b = res.toarray(), base.toarray()
        else:
            assert isinstance(res, np.ndarray) and res.dtype == np.float32
            b = base
        _float32_close(res.reshape(ref.shape), b.reshape(ref.shape), x, kernel)
        _float32_close(res.reshape(ref.shape), ref, x, kernel)
