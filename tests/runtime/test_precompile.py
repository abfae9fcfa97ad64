"""``dask-sparseconv compile``: numba's cache filled ahead of the first job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dask_sparseconv.cli.main import main
from dask_sparseconv.runtime import precompile as pc

REPO = Path(__file__).resolve().parents[2]
STORAGE = "storage readers and digests"


def cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_compile_writes_the_cache_a_later_process_loads(tmp_path):
    """A group compiled into an empty NUMBA_CACHE_DIR leaves index files for
    its functions there; the group's own check against scipy passed (exit 0)."""
    cache = tmp_path / "numba-cache"
    res = cli("compile", "--only", STORAGE, "-j", "1", env_extra={"NUMBA_CACHE_DIR": str(cache)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"into {cache}" in res.stdout and f"  {STORAGE}: " in res.stdout and "done in" in res.stdout
    indexes = {p.name.split("-")[0] for p in cache.rglob("*.nbi")}
    assert {"dense_store._gather_nonzeros", "progress._fletcher_nnz", "progress._fletcher_pairs"} <= indexes, indexes
    compiled = sorted(p.name for p in cache.rglob("*.nbc"))
    again = cli("compile", "--only", STORAGE, "-j", "1", env_extra={"NUMBA_CACHE_DIR": str(cache)})
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(p.name for p in cache.rglob("*.nbc")) == compiled  # loaded, nothing new compiled


def test_groups_run_in_separate_processes():
    names = [STORAGE, "boundaries, separable, gather_scatter"]
    seen = []
    results = pc.precompile(names, jobs=2, on_result=seen.append)
    assert sorted(r.name for r in results) == sorted(names)
    assert [r.error for r in results] == [None, None]
    assert seen == results and all(r.seconds > 0 for r in results)


def test_a_failing_group_is_reported_by_name(monkeypatch, capsys):
    def broken() -> None:
        raise RuntimeError("the compiled result differs from scipy.signal")

    monkeypatch.setitem(pc.TASKS, "broken group", broken)
    results = pc.precompile(["broken group", STORAGE], jobs=1)
    assert [(r.name, r.error) for r in results] == [
        ("broken group", "RuntimeError: the compiled result differs from scipy.signal"), (STORAGE, None)]
    assert main(["compile", "--only", "broken group", "--only", STORAGE, "-j", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: compile: 1 of 2 group(s) failed, first 'broken group': "
                       "RuntimeError: the compiled result differs from scipy.signal")


@pytest.mark.parametrize("args, fragment", [
    (["-j", "0"], "argument -j/--jobs: must be a positive integer; got '0'"),
    (["--jobs", "two"], "argument -j/--jobs: must be a positive integer; got 'two'"),
    (["--only", "direct float16"], "error: --only: unknown group 'direct float16'; choose from 'direct float64'"),
])
def test_bad_arguments_are_one_line(args, fragment, capsys):
    with pytest.raises(SystemExit) as exc_info:
        code = main(["compile", *args])
        raise SystemExit(code)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(names=["nope"]), "unknown compile task(s) ['nope']; choose from ['direct float64'"),
    (dict(jobs=0), "jobs must be a positive integer or None; got 0"),
    (dict(jobs=True), "jobs must be a positive integer or None; got True"),
])
def test_precompile_checks_its_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as exc_info:
        pc.precompile(**kwargs)
    assert fragment in str(exc_info.value)


def test_compile_writes_the_package_bytecode_once(tmp_path):
    """A copy of the package without bytecode, under PYTHONDONTWRITEBYTECODE
    (imports then never write it): compile writes a .pyc for every module,
    a second run finds nothing to write, and an edited module is written again."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(REPO / "dask_sparseconv", copy / "dask_sparseconv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from dask_sparseconv.runtime.precompile import write_bytecode, __file__ as f\n"
            "print(write_bytecode(), f)")
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")

    def run() -> str:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout

    sources = sorted((copy / "dask_sparseconv").rglob("*.py"))
    first = run()
    assert first.startswith(f"({len(sources)}, None) {copy}"), first  # the copy, not the installed package
    import importlib.util

    missing = [s for s in sources if not os.path.exists(importlib.util.cache_from_source(str(s)))]
    assert not missing, missing
    assert run().startswith("(0, None)")
    edited = copy / "dask_sparseconv" / "kernels.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    os.utime(edited, (edited.stat().st_mtime + 5, edited.stat().st_mtime + 5))
    assert run().startswith("(1, None)")
