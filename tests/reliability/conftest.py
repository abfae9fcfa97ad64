"""Fixtures of the reliability tests (faults, resume, bad input, security).

Everything here runs real processes on 127.0.0.1 and real zarr stores on
disk; helpers are in reliability_support.py."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    # registered by pytest-xdist when installed; registered here too so a
    # plain `pytest` run does not warn about an unknown mark
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one xdist worker")


@pytest.fixture
def dask_processes(tmp_path):
    """Start `dask scheduler` / `dask worker` processes; all are stopped afterwards."""
    from dask_processes import DaskProcesses

    procs = DaskProcesses(tmp_path / "dask")
    try:
        yield procs
    finally:
        procs.stop()
