"""Every ```python block in the README and docs/ runs, in order, per file.

Blocks of one file share a namespace (they read as one session), run in a
fresh interpreter whose working directory is a temporary folder, so relative
paths such as ``"in.zarr"`` land there. Docs whose examples start a cluster
are not in the ``cluster`` xdist group: nothing in them depends on timing,
and that group, which runs one test at a time, is the suite's longest path.
A doc whose examples use ``s3://dsc-docs/...`` gets moto's S3 server
(tests/s3_server.py) with that bucket, named to them the way users name
theirs: boto's environment variables.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return [textwrap.dedent(m.group(1)) for m in FENCE.finditer(path.read_text())]


DOCS_WITH_CODE = [p for p in DOCS if python_blocks(p)]


def test_docs_have_examples():
    names = {p.name for p in DOCS_WITH_CODE}
    assert {"user_guide.md", "compat.md", "api.md"} <= names, names


@pytest.mark.parametrize("path", DOCS_WITH_CODE, ids=lambda p: p.name)
def test_doc_examples_run(path: Path, tmp_path: Path):
    blocks = python_blocks(path)
    script = "\n\n".join(f"# --- block {i} of {path.name}\n{b}" for i, b in enumerate(blocks))
    # `-c`, as in a notebook: worker processes spawned by a LocalCluster do
    # not re-run a __main__ file (which a script without a main guard would).
    with contextlib.ExitStack() as stack:
        env = None
        if "s3://dsc-docs/" in script:
            from s3_server import MotoServer

            server = MotoServer(tmp_path)
            stack.callback(server.stop)
            server.bucket("dsc-docs")
            env = {**os.environ, **server.env()}
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=400, env=env)
    assert proc.returncode == 0, f"{path.name} examples failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
