"""Fixtures shared by the test packages: one 2-process LocalCluster per
module (the pipeline tests of the "cluster" xdist group) and moto's S3
server (the object-store tests and the docs' S3 example). Helpers: each
package's *_support.py, tests/scipy_oracle.py, tests/s3_server.py."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    # registered by pytest-xdist when it is installed; registered here too so
    # a plain `pytest` run does not warn about an unknown mark
    config.addinivalue_line("markers", "xdist_group(name): run these tests in one xdist worker")


@pytest.fixture(scope="module")
def local_cluster():
    """A real LocalCluster: 2 worker processes x 1 thread (module-scoped).

    memory_limit is set so the out-of-core test can measure against it; a
    worker holding numba, zarr and a compiled engine sits at about 200 MB.
    """
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        memory_limit="400MB",
        dashboard_address=":0",
        host="127.0.0.1",
    )
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server as a process on 127.0.0.1 (module-scoped); each test makes its own bucket."""
    from s3_server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()
