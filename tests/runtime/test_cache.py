"""The per-process convolver cache: keys, LRU bound, stats, one build per key
under concurrency, and the engine thread policy."""

import threading
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pytest
import scipy.signal
import scipy.sparse

import dask_sparseconv
from dask_sparseconv.engine.threads import default_threads
from dask_sparseconv.runtime import cache as cc


@pytest.fixture(autouse=True)
def fresh_cache():
    previous = cc.set_cache_size(8)
    cc.clear_cache()
    yield
    cc.clear_cache()
    cc.set_cache_size(previous)


K = np.arange(9, dtype=np.float64).reshape(3, 3) / 36.0


def test_hit_miss_build_counts():
    a = cc.get_convolver((16, 16), K, "same", n_threads=1)
    b = cc.get_convolver((16, 16), K.copy(), "same", n_threads=1)  # equal content, other object
    assert a is b
    s = cc.cache_stats()
    assert (s["hits"], s["misses"], s["builds"], s["size"]) == (1, 1, 1, 1)
    assert dask_sparseconv.cache_stats()["builds"] == 1  # the package-level export


def test_stats_report_the_threads_frame_scratch():
    """Convolvers share their thread's frame scratch: it is reported once,
    beside the convolvers' own memory, and a call's result is still right."""
    from dask_sparseconv.engine import direct

    conv = cc.get_convolver((40, 50), K, "same", n_threads=1)
    x = scipy.sparse.random(3, 2000, density=0.2, format="csr", random_state=3)
    y = conv(x).toarray().reshape(3, 40, 50)
    for i in range(3):
        np.testing.assert_allclose(y[i], scipy.signal.convolve2d(x[i].toarray().reshape(40, 50), K, mode="same"),
                                   atol=1e-12)
    s = cc.cache_stats()
    assert s["scratch_nbytes"] == direct.scratch_nbytes() >= 40 * 50 * 8
    assert any(buf.size == 40 * 50 for buf, _ in direct.scratch_buffers())


@pytest.mark.parametrize(
    "change",
    [
        dict(frame_shape=(16, 17)),
        dict(kernel=K * 2),
        dict(kernel=K.astype(np.float32)),
        dict(mode="full"),
        dict(dtype="float32"),
        dict(n_threads=2),
    ],
)
def test_every_key_part_matters(change):
    base = dict(frame_shape=(16, 16), kernel=K, mode="same", dtype=None, n_threads=1)
    a = cc.get_convolver(**base)
    b = cc.get_convolver(**{**base, **change})
    assert a is not b
    assert cc.cache_stats()["builds"] == 2


def test_method_and_backend_are_part_of_the_key():
    a = cc.get_convolver((16, 16), K, method="auto", n_threads=1)
    b = cc.get_convolver((16, 16), K, method="lazy", backend="numpy", n_threads=1)
    assert a is not b and b.method == "lazy"
    # the backend resolves before keying: an explicit equal backend is a hit
    c = cc.get_convolver((16, 16), K, method="auto", backend=a.backend, n_threads=1)
    assert c is a
    # method 'auto' keeps its own key (it may take the separable path per call), apart from 'direct'
    d = cc.get_convolver((16, 16), K, method="direct", backend=a.backend, n_threads=1)
    assert d is not a and a.method == d.method == "direct"


def test_cached_convolver_is_correct():
    conv = cc.get_convolver((20, 15), K, "full", n_threads=1)
    rng = np.random.default_rng(0)
    x = scipy.sparse.random(4, 300, density=0.05, format="csr", random_state=rng)
    y = conv(x, out="dense", batched=True).reshape(4, 22, 17)
    for i in range(4):
        ref = scipy.signal.convolve2d(x[i].toarray().reshape(20, 15), K, "full")
        np.testing.assert_allclose(y[i], ref, atol=1e-12)


def test_lru_bound_and_eviction_order():
    cc.set_cache_size(2)
    a = cc.get_convolver((8, 8), K, n_threads=1)
    cc.get_convolver((9, 9), K, n_threads=1)
    cc.get_convolver((8, 8), K, n_threads=1)  # a is now most recent
    cc.get_convolver((10, 10), K, n_threads=1)  # evicts (9, 9)
    s = cc.cache_stats()
    assert s["size"] == 2 and s["evictions"] == 1 and s["maxsize"] == 2
    assert cc.get_convolver((8, 8), K, n_threads=1) is a
    before = cc.cache_stats()["builds"]
    cc.get_convolver((9, 9), K, n_threads=1)
    assert cc.cache_stats()["builds"] == before + 1


def test_shrinking_evicts_immediately():
    for n in range(4):
        cc.get_convolver((8 + n, 8), K, n_threads=1)
    cc.set_cache_size(1)
    assert cc.cache_stats()["size"] == 1
    with pytest.raises(ValueError, match="maxsize"):
        cc.set_cache_size(0)


def test_reset_stats_keeps_entries():
    a = cc.get_convolver((8, 8), K, n_threads=1)
    before = cc.cache_stats(reset=True)
    assert before["builds"] == 1
    after = cc.cache_stats()
    assert (after["hits"], after["misses"], after["builds"], after["size"]) == (0, 0, 0, 1)
    assert cc.get_convolver((8, 8), K, n_threads=1) is a
    cc.reset_cache_stats()
    assert cc.cache_stats()["hits"] == 0
    cc.clear_cache()
    assert cc.cache_stats()["size"] == 0


def test_concurrent_misses_build_once():
    n = 8
    barrier = threading.Barrier(n)

    def get(_):
        barrier.wait()
        return cc.get_convolver((64, 64), K, "same", n_threads=1)

    with ThreadPoolExecutor(n) as pool:
        convs = list(pool.map(get, range(n)))
    assert all(c is convs[0] for c in convs)
    s = cc.cache_stats()
    assert s["builds"] == 1
    assert s["hits"] + s["misses"] == n


def test_concurrent_distinct_keys_build_each_once():
    shapes = [(8 + i % 3, 8) for i in range(12)]

    def get(shape):
        return cc.get_convolver(shape, K, n_threads=1)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(get, shapes))
    assert cc.cache_stats()["builds"] == 3


def test_failed_build_is_not_cached():
    with pytest.raises(ValueError, match="valid"):
        cc.get_convolver((2, 2), K, "valid", n_threads=1)
    s = cc.cache_stats()
    assert s["builds"] == 0 and s["size"] == 0


def test_thread_policy_main_thread_uses_all_cores():
    assert cc.concurrent_tasks() == 1
    assert cc.engine_threads() == default_threads()
    conv = cc.get_convolver((8, 8), K)
    assert conv.n_threads == default_threads()


def test_thread_policy_in_threaded_scheduler_divides_cores():
    @dask.delayed
    def policy():
        return cc.concurrent_tasks(), cc.engine_threads(cores=8)

    with dask.config.set(scheduler="threads", num_workers=4):
        tasks, threads = dask.compute(policy())[0]
    assert tasks == 4 and threads == 2
    with dask.config.set(scheduler="threads", num_workers=16):
        assert dask.compute(policy())[0] == (16, 1)  # never below one thread


def test_explicit_n_threads_wins():
    assert cc.get_convolver((8, 8), K, n_threads=3).n_threads == 3
    with pytest.raises(ValueError, match="n_threads"):
        cc.get_convolver((8, 8), K, n_threads=0)


def test_torch_cpu_convolver_caps_torch_threads_to_the_engine_share():
    """A torch-on-CPU convolver built by the cache lowers torch's intra-op
    threads to its engine-thread count (never raises them), and still
    computes scipy's result."""
    import subprocess
    import sys

    code = (
        "import numpy as np, scipy.signal, scipy.sparse, torch\n"
        "from dask_sparseconv.runtime.cache import get_convolver\n"
        "torch.set_num_threads(2)\n"
        "k = np.arange(9.0).reshape(3, 3)\n"
        "conv = get_convolver((8, 8), k, 'same', 'precomputed', 'torch', None, 'cpu', 1)\n"
        "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
        "x = scipy.sparse.random(3, 64, density=0.2, format='csr', random_state=0)\n"
        "ref = scipy.signal.convolve2d(x[1].toarray().reshape(8, 8), k, mode='same')\n"
        "assert np.allclose(conv(x)[1].toarray().reshape(8, 8), ref)\n"
        "get_convolver((8, 8), k, 'full', 'precomputed', 'torch', None, 'cpu', 2)\n"
        "assert torch.get_num_threads() == 1\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
