"""The command's local workers forked from a warm fork server
(:mod:`dask_sparseconv.runtime.forkserver`): the workers start with the
package and its compiled engine loaded, compute right, and a killed server
is replaced. Each case runs in a fresh interpreter, so that this process
keeps its own multiprocessing set-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy_oracle import convolve_stack

pytestmark = pytest.mark.xdist_group("cluster")

REPO = Path(__file__).resolve().parents[2]

# a job on a local cluster started by start_cluster; prints what the workers
# held before their first task, the server's pid, and where the output went
SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from distributed import Client

    from dask_sparseconv.runtime import forkserver

    def kill_server(reap):
        # SIGKILL; without reap, wait until it is dead but leave it to
        # multiprocessing to reap (it does when it next needs a server); reaped
        # here, multiprocessing's own check of it fails, and so does a fork
        # (found by its pid: it is launched without waiting for its exec, so
        # its command line may not say "forkserver" yet)
        import time, psutil
        from multiprocessing import forkserver as mp_forkserver
        pid = mp_forkserver._forkserver._forkserver_pid
        if pid is None:
            raise SystemExit("no fork server running")
        p = psutil.Process(pid)
        p.kill()
        if reap:
            p.wait(10)
        while not reap and p.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        return p.pid

    def state():
        from dask_sparseconv.engine import direct
        return {"ppid": os.getppid(), "preloaded": "dask_sparseconv.runtime.worker_preload" in sys.modules,
                "compiled": len(direct._csr_batch.overloads)}

    if __name__ == "__main__":
        src, dst, kill = sys.argv[1], sys.argv[2], sys.argv[3]
        started = forkserver.start(env={"DASK_SPARSECONV_TEST_MARK": "server"})
        killed = kill_server(kill == "reap") if kill != "-" else None
        lc = forkserver.start_cluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None, memory_limit=0)
        with Client(lc) as client:
            workers = client.run(state)
            marks = client.run(lambda: os.environ.get("DASK_SPARSECONV_TEST_MARK"))
            # the environment the worker's process started with: its server's
            spawned_env = client.run(lambda: {k: __import__("psutil").Process(os.getppid()).environ().get(k) for k in
                                              ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PYTHONHASHSEED")})
            import dask_sparseconv as dsc
            dsc.convolve_zarr(src, np.load(sys.argv[4]), dst, "same")
        lc.close()
        print(json.dumps({"started": started, "killed": killed, "client": os.getpid(),
                          "client_mark": os.environ.get("DASK_SPARSECONV_TEST_MARK"),
                          "workers": list(workers.values()), "marks": list(marks.values()),
                          "env": list(spawned_env.values())}))
""")


def _python(*args: str, timeout: float = 120, drop: tuple[str, ...] = (),
            extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh interpreter that imports this checkout,
    without the environment variables in ``drop``, with those in ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in drop:
        env.pop(key, None)
    env.update(extra or {})
    # a test run from a shell's background inherits an ignored SIGINT, and
    # so would the server these scripts start: give them Ctrl-C back
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _run(tmp_path: Path, kill: str = "-"):
    from dask_sparseconv.sample_data import sample_stack
    from dask_sparseconv.storage import write_dense_stack

    frames = sample_stack("rois", 24, (40, 48), radius=5.0, seed=3).toarray().reshape(24, 40, 48).astype(np.float32)
    src = str(tmp_path / "in.zarr")
    write_dense_stack(src, frames, chunks=6)
    kernel = np.random.default_rng(0).uniform(-1, 1, (5, 5)).astype(np.float32)
    np.save(tmp_path / "k.npy", kernel)
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    res = _python(str(script), src, str(tmp_path / "out.zarr"), kill, str(tmp_path / "k.npy"), timeout=240,
                  drop=("DASK_SPARSECONV_TEST_MARK", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PYTHONHASHSEED"))
    assert res.returncode == 0, res.stderr[-3000:]
    # a failed fork is handled, not reported: no nanny tracebacks on stderr
    assert "Traceback" not in res.stderr and "Nanny failed" not in res.stderr, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])

    got = np.asarray(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:])
    np.testing.assert_allclose(got, convolve_stack(frames, kernel, "same"), rtol=1e-5, atol=1e-5)
    return out


def test_workers_start_warm_from_the_server(tmp_path):
    out = _run(tmp_path)
    assert out["started"] is True
    assert len(out["workers"]) == 2
    for w in out["workers"]:
        assert w["ppid"] != out["client"]  # forked by the server, not spawned by the client
        assert w["preloaded"] is True
        assert w["compiled"] >= 1  # the engine's compiled call was loaded before any task
    # the workers got the environment given to start(); the client did not keep it
    assert out["marks"] == ["server", "server"]
    assert out["client_mark"] is None
    # what distributed sets before it spawns a worker, the server started
    # with (glibc and numpy read them only when a process starts)
    for env in out["env"]:
        assert env == {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "6640"}


def test_a_killed_server_is_replaced(tmp_path):
    out = _run(tmp_path, kill="kill")
    assert out["killed"]
    for w in out["workers"]:
        assert w["ppid"] not in (out["client"], out["killed"])
        assert w["preloaded"] is True


def test_workers_are_spawned_when_forking_fails(tmp_path):
    out = _run(tmp_path, kill="reap")
    assert out["killed"]
    for w in out["workers"]:
        assert w["ppid"] == out["client"]  # spawned, as without the server


@pytest.mark.parametrize("setting", ["env", "config"])
def test_workers_are_spawned_when_the_user_says_so(tmp_path, setting):
    """DASK_SPARSECONV_FORK_WORKERS=0, or a start method the user chose in
    dask's config, keeps the workers spawned (and the server unstarted)."""
    code = textwrap.dedent(f"""
        import json, os
        import dask
        from dask_sparseconv.runtime import forkserver
        if {setting!r} == "env":
            os.environ[forkserver.OPT_OUT] = "0"
            started = forkserver.start()
        else:
            with dask.config.set({{"distributed.worker.multiprocessing-method": "fork"}}):
                started = forkserver.start()
        from multiprocessing import forkserver as mp_forkserver
        print(json.dumps({{"started": started, "server": mp_forkserver._forkserver._forkserver_pid}}))
    """)
    res = _python("-c", code, timeout=60, drop=("DASK_SPARSECONV_FORK_WORKERS",))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"started": False, "server": None}


def test_the_preload_leaves_a_process_safe_to_fork():
    """What the server loads starts no thread (a forked child would inherit
    locks that no thread of its own releases) and no GPU library (CUDA
    cannot be used in a child forked after it initialised), and it loads the
    compiled engine (what makes a forked worker warm); it leaves the collector
on, and what it loaded frozen."""
    code = ("import gc, sys, threading, dask_sparseconv.runtime.worker_preload\n"
            "from dask_sparseconv.engine import direct\n"
            "print(threading.active_count(), 'torch' in sys.modules, 'cupy' in sys.modules, "
            "len(direct._csr_batch.overloads) > 0, gc.isenabled(), gc.get_freeze_count() > 0)")
    res = _python("-c", code)
    assert res.returncode == 0, res.stderr
    # the collector, off while it loads, is on for the workers forked from it
    assert res.stdout.split() == ["1", "False", "False", "True", "True", "True"]


#: A script that starts the server, runs ``interrupt(server_pid)`` on it,
#: then a cluster of one forked worker; prints what the tests check.
_CTRL_C_SCRIPT = """
import json, os, signal, time
from multiprocessing import forkserver as mp_forkserver

from distributed import Client

from dask_sparseconv.runtime import forkserver


def handler():
    # Ctrl-C is the command's: a forked worker ignores it from birth (and
    # asyncio's runner then puts no handler of its own in place); nor is it
    # left blocked
    import signal
    return [signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())]


def interrupt(server):
{interrupt}


if __name__ == "__main__":
    forkserver.start()
    server = mp_forkserver._forkserver._forkserver_pid
    sent = interrupt(server)
    mask = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    lc = forkserver.start_cluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit=0)
    with Client(lc) as client:
        ppids = list(client.run(os.getppid).values())
        handlers = list(client.run(handler).values())
        total = client.submit(sum, [1, 2, 3]).result()
    lc.close()
    print(json.dumps({{"server": server, "sent": sent, "mask": mask, "ppids": ppids,
                      "handlers": handlers, "total": total}}))
"""


def _ctrl_c(tmp_path: Path, interrupt: str) -> dict:
    """Run :data:`_CTRL_C_SCRIPT` with ``interrupt``'s body; check that
    nothing printed a traceback, that the server that got the signals forked
    the worker, and that the worker ignores Ctrl-C (the command handles it)."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT.format(interrupt=textwrap.indent(textwrap.dedent(interrupt), "    ")))
    res = _python(str(script))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ppids"] == [out["server"]]  # forked by the server that got the signals
    assert out["handlers"] == [[True, False]] and out["total"] == 6
    assert out["mask"] is False  # the caller's signal mask is as it was
    return out


def test_ctrl_c_while_the_server_loads_is_ignored(tmp_path):
    """Ctrl-C reaches the whole process group: the server, loading, neither
    dies nor prints a traceback, and forks warm workers afterwards."""
    _ctrl_c(tmp_path, """
        # once its loading has begun (a fixed sleep raced the server's start
        # on a loaded machine): the preload ignores SIGINT first
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(f"/proc/{server}/status") as f:
                ignored = int(next(l for l in f if l.startswith("SigIgn:")).split()[1], 16)
            if ignored & (1 << (signal.SIGINT - 1)):
                break
            time.sleep(0.002)
        os.kill(server, signal.SIGINT)
        return 1
    """)


def test_ctrl_c_from_the_server_launch_on_is_ignored(tmp_path):
    """Ctrl-C sent to the server from the moment it is launched, through
    Python's own start-up, before the preload can ignore it (a traceback of
    the server's once appeared beside the command's one line there)."""
    out = _ctrl_c(tmp_path, """
        sent = 0
        end = time.monotonic() + 1.5  # through the server's start-up and loading
        while time.monotonic() < end:
            os.kill(server, signal.SIGINT)
            sent += 1
            time.sleep(0.003)
        return sent
    """)
    assert out["sent"] > 50


def test_a_refused_run_leaves_no_server_behind(tmp_path):
    """`run` launches the server before it checks the workflow; refused, it
    stops the server as it exits. Left loading, the server held the
    command's stdout and stderr open for ~1.5 s more, so a pipe reading them
    (``| tee``, ``capture_output``) waited for it."""
    import psutil

    from dask_sparseconv.storage import write_dense_stack

    write_dense_stack(str(tmp_path / "in.zarr"), np.ones((2, 6, 6), dtype=np.float32), chunks=1)
    (tmp_path / "wf.yaml").write_text("input: {path: in.zarr}\nkernel: {box: {size: 3}}\nmode: circular\n"
                                      "output: {path: out.zarr}\ncluster: {n_workers: 1, dashboard_address: null}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DASK_SPARSECONV_FORK_WORKERS", None)
    with open(tmp_path / "err", "wb") as err:  # a file, not a pipe: the command's own exit is what is awaited
        proc = subprocess.Popen([sys.executable, "-m", "dask_sparseconv.cli", "run", "wf.yaml"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        rc = proc.wait(120)
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) == proc.pid and "forkserver" in " ".join(p.info["cmdline"] or []):
                left.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    for p in left:  # not to leave them to the next test either
        p.kill()
    stderr = (tmp_path / "err").read_text()
    assert rc == 2 and "mode" in stderr and "circular" in stderr, stderr
    assert not (tmp_path / "out.zarr").exists()
    assert left == [], [p.info["cmdline"] for p in left]


#: start(guess=True), then confirm(...) with the same or another environment,
#: or under a start method the user chose; then a job on a cluster forked
#: (or spawned) after it. Prints the servers' pids and what the workers saw.
_GUESS_SCRIPT = """
import json, os, sys
import numpy as np
from multiprocessing import forkserver as mp_forkserver
from distributed import Client

from dask_sparseconv.runtime import forkserver


def server_pid():
    return mp_forkserver._forkserver._forkserver_pid


if __name__ == "__main__":
    guess, exact, src, dst, kernel = sys.argv[1:6]
    forkserver.start(env={"DASK_SPARSECONV_TEST_MARK": guess}, guess=True)
    first = server_pid()
    kept = forkserver.confirm(env={"DASK_SPARSECONV_TEST_MARK": exact})
    second = server_pid()
    first_alive = os.path.exists(f"/proc/{first}") and open(f"/proc/{first}/stat").read().split()[2] != "Z"
    lc = forkserver.start_cluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit=0)
    with Client(lc) as client:
        ppids = list(client.run(os.getppid).values())
        marks = list(client.run(lambda: os.environ.get("DASK_SPARSECONV_TEST_MARK")).values())
        import dask_sparseconv as dsc
        dsc.convolve_zarr(src, np.load(kernel), dst, "same")
    lc.close()
    print(json.dumps({"first": first, "kept": kept, "second": second, "first_alive": first_alive,
                      "client": os.getpid(), "ppids": ppids, "marks": marks}))
"""


@pytest.mark.parametrize("case", ["right guess", "wrong guess", "user's start method"])
def test_a_server_launched_on_a_guess_is_kept_only_when_right(tmp_path, case):
    """``run`` launches the server before dask is imported, guessing its
    environment (no allocator settings or start method of the user's in
    dask's config); once the config is read, a right guess keeps that
    server, a wrong one starts another with the right environment, and a
    start method of the user's stops it (the workers are spawned)."""
    from dask_sparseconv.storage import write_dense_stack

    rng = np.random.default_rng(9)
    frames = np.where(rng.random((8, 16, 18)) < 0.2, rng.random((8, 16, 18)), 0).astype(np.float32)
    write_dense_stack(str(tmp_path / "in.zarr"), frames, chunks=4)
    kernel = rng.uniform(-1, 1, (3, 4)).astype(np.float32)
    np.save(tmp_path / "k.npy", kernel)
    script = tmp_path / "guess.py"
    script.write_text(_GUESS_SCRIPT)
    exact = "b" if case == "wrong guess" else "a"
    method = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"
    res = _python(str(script), "a", exact, str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"),
                  str(tmp_path / "k.npy"), timeout=240,
                  drop=("DASK_SPARSECONV_TEST_MARK", "DASK_SPARSECONV_FORK_WORKERS", method),
                  extra={method: "fork"} if case == "user's start method" else None)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    got = np.asarray(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:])
    np.testing.assert_allclose(got, convolve_stack(frames, kernel, "same"), rtol=1e-5, atol=1e-6)
    if case == "right guess":
        assert out["kept"] is True and out["second"] == out["first"] and out["ppids"] == [out["first"]]
        assert out["marks"] == ["a"]
    elif case == "wrong guess":
        assert out["kept"] is True and out["second"] not in (None, out["first"]) and not out["first_alive"]
        assert out["ppids"] == [out["second"]] and out["marks"] == ["b"]  # forked from the new server
    else:
        assert out["kept"] is False and out["second"] is None and not out["first_alive"]
        assert out["ppids"] != [out["first"]]  # not from the stopped server


def test_distributed_defaults_read_without_importing_it_match_distributed(tmp_path):
    """The server's environment is computed from distributed's own
    ``distributed.yaml``, read (with libyaml's parser where PyYAML has it)
    before distributed is imported: the values must be the ones distributed
    itself reports once imported, with no user config in the way."""
    code = textwrap.dedent("""
        import json, sys
        from dask_sparseconv.runtime import forkserver
        read = forkserver.distributed_defaults()
        assert "distributed" not in sys.modules
        import dask.config, distributed  # noqa: F401
        print(json.dumps([read, dask.config.get("distributed.nanny.pre-spawn-environ")]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    # empty config folders (dask also reads ~/.config/dask): distributed's defaults only
    env.update(DASK_CONFIG=str(tmp_path), HOME=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    read, reported = json.loads(p.stdout.strip().splitlines()[-1])
    assert read == reported
    assert "MALLOC_TRIM_THRESHOLD_" in read
