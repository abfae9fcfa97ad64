"""The workflow JSON schema (`dask-sparseconv schema`): a valid draft 2020-12
schema that accepts every shipped example workflow and refuses what the
loader refuses, checked with the real jsonschema validator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from dask_sparseconv.workflow import WorkflowError, json_schema, load_workflow, parse_workflow

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.yaml"))
MINIMAL = {"input": {"path": "in.zarr"}, "kernel": {"gaussian": {"sigma": 1.5}}, "output": {"path": "out.zarr"}}


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_workflow_is_valid(validator, path):
    data = yaml.safe_load(path.read_text())
    assert not list(validator.iter_errors(data))
    wf = load_workflow(path)  # and the loader takes it too
    assert wf.output.path.endswith(data["output"]["path"].lstrip("./"))


@pytest.mark.parametrize("change", [
    {"mode": "fastest"},
    {"outptu": {"path": "o.zarr"}},
    {"kernel": {"gaussian": {"sigma": 1}, "box": {"size": 3}}},
    {"kernel": {"box": {"size": 0}}},
    {"input": {"path": "in.zarr", "storage_optons": {}}},
    {"cluster": {"n_wokers": 2}},
    {"cluster": {"threads_per_worker": 0}},
    {"output": {"path": "o.zarr", "format": "coo"}},
    {"output": {"format": "csr"}},
])
def test_schema_and_loader_refuse_the_same_documents(validator, change):
    data = {**MINIMAL, **change}
    assert list(validator.iter_errors(data)), change
    with pytest.raises(WorkflowError):
        parse_workflow(data)


def test_defaults_in_the_schema_are_the_loader_defaults(validator):
    schema = json_schema()
    wf = parse_workflow(MINIMAL)
    block = schema["$defs"]["BlockSpec"]["properties"]["memory"]["default"]
    assert block == wf.block.memory == 64 * 2**20
    assert schema["properties"]["mode"]["default"] == wf.mode == "same"
    assert schema["$defs"]["ClusterSpec"]["properties"]["threads_per_worker"]["default"] == wf.cluster.threads_per_worker
    assert set(schema["required"]) == {"input", "output"}
    assert schema["oneOf"] == [{"required": ["kernel"]}, {"required": ["kernels"]}]  # one kernel, or a bank
    assert "source" not in schema["properties"]  # set by the loader, not a key of the file


def test_schema_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "schema"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json_schema()
    target = tmp_path / "wf.schema.json"
    res = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "schema", "-o", str(target)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and json.loads(target.read_text()) == json_schema()
    bad = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "schema", "-o", str(tmp_path / "no" / "x.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: cannot write") and "Traceback" not in bad.stderr
