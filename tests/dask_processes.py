"""`dask scheduler` and `dask worker` processes on 127.0.0.1 for the tests.

One implementation for every test that needs a cluster started the way a
user starts one (pipeline, CLI, GPU routing, reliability). Every wait is
bounded and ``stop()`` always terminates what was started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90  # seconds: scheduler file, workers registering


def base_env(**extra: str) -> dict:
    """This environment, with the checkout importable and worker logging at its default."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DASK_LOGGING__DISTRIBUTED", None)
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a process we started (SIGTERM, then SIGKILL); never waits unbounded."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class DaskProcesses:
    """A scheduler and workers as separate processes, logging to ``root/<name>.log``.

    ``env`` is the environment of every process unless a worker gets its own.
    """

    def __init__(self, root: Path, env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = env if env is not None else base_env()
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.address: str | None = None

    def _start(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        self.logs.append(log)
        p = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                             cwd=self.root, env=self.env if env is None else env)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        try:
            return (self.root / f"{name}.log").read_bytes()[-3000:].decode(errors="replace")
        except OSError:
            return ""

    def scheduler(self, extra: list[str] = ()) -> str:
        """Start the scheduler on a free port; returns its address once its file is written."""
        sched_file = self.root / "scheduler.json"
        p = self._start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                         "--scheduler-file", str(sched_file), *extra], "scheduler")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise AssertionError(f"dask scheduler exited with {p.returncode}:\n{self.log('scheduler')}")
            if sched_file.exists():
                try:
                    self.address = json.loads(sched_file.read_text())["address"]
                    return self.address
                except (ValueError, KeyError):
                    pass  # being written
            time.sleep(0.1)
        raise AssertionError(f"no scheduler file after {START_TIMEOUT} s:\n{self.log('scheduler')}")

    def worker(self, name: str, extra: list[str] = (), env: dict | None = None,
               memory_limit: str = "1GB") -> subprocess.Popen:
        """Start one single-threaded worker called ``name`` (its log is ``name.log``)."""
        return self._start(["worker", self.address, "--nthreads", "1", "--nworkers", "1",
                            "--memory-limit", memory_limit, "--no-dashboard", "--host", "127.0.0.1",
                            "--local-directory", str(self.root / name), "--name", name, *extra], name, env)

    def workers(self, n: int, extra: list[str] = ()) -> None:
        for i in range(n):
            self.worker(f"worker{i}", extra)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
        for log in self.logs:
            log.close()
