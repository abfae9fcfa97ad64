"""Workflow YAML loading: schema, defaults, path resolution, error collection."""

import os
import textwrap

import numpy as np
import pytest

from dask_sparseconv import kernels
from dask_sparseconv.workflow import (
    WorkflowError,
    load_workflow,
    parse_bytes,
    parse_seconds,
    parse_workflow,
)


def write(tmp_path, text, name="wf.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


MINIMAL = """
input: {path: data/in.zarr}
kernel: {gaussian: {sigma: 1.5}}
output: {path: out/res.zarr}
"""


def test_minimal_defaults_and_relative_paths(tmp_path):
    sub = tmp_path / "jobs"
    sub.mkdir()
    wf = load_workflow(write(sub, MINIMAL))
    assert wf.input.path == str(sub / "data" / "in.zarr")
    assert wf.output.path == str(sub / "out" / "res.zarr")
    assert wf.mode == "same" and wf.method == "auto" and wf.backend == "auto" and wf.dtype is None
    assert wf.output.format is None and wf.output.overwrite is False
    assert wf.cluster.address is None and wf.cluster.n_workers is None and wf.cluster.threads_per_worker == 1
    assert wf.block.memory == 64 * 2**20
    np.testing.assert_allclose(wf.kernel.array, kernels.gaussian(1.5))
    assert wf.kernel.description == "gaussian(sigma=1.5)"


def test_paths_resolve_against_workflow_folder_not_cwd(tmp_path, monkeypatch):
    p = write(tmp_path, MINIMAL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    wf = load_workflow(os.path.relpath(p, elsewhere))
    assert wf.input.path == str(tmp_path / "data" / "in.zarr")


def test_urls_and_absolute_paths_untouched(tmp_path):
    wf = load_workflow(
        write(
            tmp_path,
            """
            input: {path: "s3://bucket/in.zarr", storage_options: {anon: true}}
            kernel: {box: {size: 3}}
            output: {path: /abs/out.zarr, storage_options: {}}
            """,
        )
    )
    assert wf.input.path == "s3://bucket/in.zarr"
    assert wf.input.storage_options == {"anon": True}
    assert wf.output.path == "/abs/out.zarr"


def test_full_schema(tmp_path):
    np.save(tmp_path / "k.npy", np.ones((3, 3)))
    wf = load_workflow(
        write(
            tmp_path,
            """
            description: everything set
            input: {path: in.zarr, array: stack, sample: {n_images: 5, frame_shape: [32, 48], max_rois: 2, radius: 4, format: csr, seed: 3}}
            kernel: {file: k.npy}
            mode: valid
            method: precomputed
            backend: numpy
            dtype: float64
            output: {path: out.zarr, format: dense, overwrite: true, compressor: none}
            cluster: {n_workers: 2, threads_per_worker: 2, memory_limit: 2GiB, dashboard_address: ":0", timeout: 500ms}
            block: {memory: 8MiB}
            """,
        )
    )
    assert wf.description == "everything set"
    assert wf.input.array == "stack"
    s = wf.input.sample
    assert (s.n_images, s.frame_shape, s.max_rois, s.radius, s.format, s.seed) == (5, (32, 48), 2, 4.0, "csr", 3)
    assert wf.kernel.kind == "file" and wf.kernel.params["file"] == str(tmp_path / "k.npy")
    assert (wf.mode, wf.method, wf.backend, wf.dtype) == ("valid", "precomputed", "numpy", "float64")
    assert wf.output.format == "dense" and wf.output.overwrite and wf.output.compressor == "none"
    assert wf.cluster.n_workers == 2 and wf.cluster.threads_per_worker == 2
    assert wf.cluster.memory_limit == 2 * 2**30 and wf.cluster.dashboard_address == ":0"
    assert wf.cluster.timeout == pytest.approx(0.5)
    assert wf.block.memory == 8 * 2**20
    assert wf.to_dict()["kernel"]["shape"] == [3, 3]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("{box: {size: [3, 5]}}", kernels.box((3, 5))),
        ("{disk: {radius: 2}}", kernels.disk(2)),
        ("{gaussian: {sigma: 1, size: 3}}", kernels.gaussian(1, size=3)),
        ("{values: [[0, 1, 0], [1, 2, 1]]}", np.array([[0, 1, 0], [1, 2, 1]], float)),
    ],
)
def test_kernel_kinds(tmp_path, spec, expected):
    wf = load_workflow(write(tmp_path, MINIMAL.replace("{gaussian: {sigma: 1.5}}", spec)))
    np.testing.assert_allclose(wf.kernel.array, expected)


def test_kernel_file_shorthand_and_text(tmp_path):
    (tmp_path / "k.csv").write_text("1,2\n3,4\n")
    wf = load_workflow(write(tmp_path, MINIMAL.replace("{gaussian: {sigma: 1.5}}", "k.csv")))
    np.testing.assert_array_equal(wf.kernel.array, [[1, 2], [3, 4]])


def problems_of(tmp_path, text):
    with pytest.raises(WorkflowError) as info:
        load_workflow(write(tmp_path, text))
    return dict(info.value.problems), str(info.value)


def test_every_problem_reported_at_once(tmp_path):
    problems, text = problems_of(
        tmp_path,
        """
        input: {path: in.zarr, storage_optons: {}}
        kernel: {gaussian: {sigma: -1}}
        mode: 3
        method: fastest
        dtype: int8
        output: {path: out.zarr, format: coo, overwrite: "yes"}
        cluster: {n_wokers: 2, threads_per_worker: 0}
        block: {memory: lots}
        outptu: 1
        """,
    )
    assert problems["mode"] == "expected one of full, same, valid; got 3"
    assert "did you mean 'storage_options'" in problems["input.storage_optons"]
    assert "sigma" not in problems.get("kernel.gaussian", "")
    assert "positive" in problems["kernel.gaussian.sigma"]
    assert "fastest" in problems["method"]
    assert "int8" in problems["dtype"]
    assert "coo" in problems["output.format"]
    assert "true or false" in problems["output.overwrite"]
    assert "did you mean 'n_workers'" in problems["cluster.n_wokers"]
    assert "positive integer" in problems["cluster.threads_per_worker"]
    assert "64MiB" in problems["block.memory"]
    assert "did you mean 'output'" in problems["outptu"]
    assert text.startswith(f"{tmp_path / 'wf.yaml'}: 11 problems:")
    assert text.count("\n") == 11


def test_required_keys(tmp_path):
    problems, _ = problems_of(tmp_path, "mode: same\n")
    assert set(problems) == {"input", "kernel", "output"}
    problems, _ = problems_of(tmp_path, "input: {}\nkernel: {box: {}}\noutput: {format: csr}\n")
    assert problems["input.path"] == "required key is missing"
    assert problems["output.path"] == "required key is missing"
    assert problems["kernel.box.size"] == "required key is missing"


@pytest.mark.parametrize(
    "kernel, key, fragment",
    [
        ("{gaussian: {sigma: 1}, box: {size: 3}}", "kernel", "exactly one of"),
        ("{}", "kernel", "exactly one of"),
        ("{gausian: {sigma: 1}}", "kernel.gausian", "did you mean 'gaussian'"),
        ("{box: {size: 0}}", "kernel.box.size", "positive integer"),
        ("{box: 3}", "kernel.box", "expected a mapping"),
        ("{disk: {radius: big}}", "kernel.disk.radius", "positive number"),
        ("{values: [[1, 2], [3]]}", "kernel.values", "2-D array"),
        ("{values: 3}", "kernel.values", "list of rows"),
        ("{file: missing.npy}", "kernel.file", "does not exist"),
        ("{file: k.bin}", "kernel.file", "unknown suffix"),
        ("[1, 2]", "kernel", "exactly one of"),
    ],
)
def test_bad_kernels(tmp_path, kernel, key, fragment):
    problems, _ = problems_of(tmp_path, MINIMAL.replace("{gaussian: {sigma: 1.5}}", kernel))
    assert fragment in problems[key], problems


def test_pickled_kernel_file_refused(tmp_path):
    obj = np.empty(1, dtype=object)
    obj[0] = {"x": 1}
    np.save(tmp_path / "evil.npy", obj, allow_pickle=True)
    problems, _ = problems_of(tmp_path, MINIMAL.replace("{gaussian: {sigma: 1.5}}", "{file: evil.npy}"))
    assert "pickled object array" in problems["kernel.file"]


def test_method_backend_combination(tmp_path):
    problems, _ = problems_of(tmp_path, MINIMAL + "method: direct\nbackend: numpy\n")
    assert "not valid for method='direct'" in problems["backend"]


def test_cluster_address_rules(tmp_path):
    problems, _ = problems_of(tmp_path, MINIMAL + "cluster: {address: 'localhost:8786', n_workers: 2}\n")
    assert "tcp://127.0.0.1:8786" in problems["cluster.address"]
    assert "only used for a local cluster" in problems["cluster.n_workers"]
    problems, _ = problems_of(tmp_path, MINIMAL + "cluster: {address: 'tls://h:8786'}\n")
    assert "required for a tls://" in problems["cluster.security"]
    problems, _ = problems_of(
        tmp_path, MINIMAL + "cluster: {address: 'tcp://h:8786', security: {ca_file: a, cert_file: b, key_file: c}}\n"
    )
    assert "only used with a tls://" in problems["cluster.security"]
    assert "does not exist" in problems["cluster.security.ca_file"]


def test_tls_security_files_resolve(tmp_path):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    wf = load_workflow(
        write(
            tmp_path,
            MINIMAL
            + "cluster: {address: 'tls://10.0.0.1:8786', timeout: 3, "
            + "security: {ca_file: ca.pem, cert_file: cert.pem, key_file: key.pem}}\n",
        )
    )
    assert wf.cluster.address == "tls://10.0.0.1:8786"
    assert wf.cluster.security.ca_file == str(tmp_path / "ca.pem")
    assert wf.cluster.timeout == 3.0


def test_same_input_and_output(tmp_path):
    problems, _ = problems_of(tmp_path, "input: {path: a.zarr}\nkernel: {box: {size: 3}}\noutput: {path: ./a.zarr/}\n")
    assert "must differ from input.path" in problems["output.path"]


def test_sample_rules(tmp_path):
    problems, _ = problems_of(
        tmp_path,
        "input: {path: 's3://b/x.zarr', sample: {n_images: 0, frame_shape: [8], format: coo, colour: red}}\n"
        "kernel: {box: {size: 3}}\noutput: {path: o.zarr}\n",
    )
    assert "local path" in problems["input.sample"]
    assert "positive integer" in problems["input.sample.n_images"]
    assert "[height, width]" in problems["input.sample.frame_shape"]
    assert "coo" in problems["input.sample.format"]
    assert "unknown key" in problems["input.sample.colour"]
    wf = load_workflow(write(tmp_path, "input: {path: x.zarr, sample: true}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n"))
    assert wf.input.sample.n_images == 200 and wf.input.sample.frame_shape == (512, 512)


def test_file_level_errors(tmp_path):
    with pytest.raises(WorkflowError, match="does not exist"):
        load_workflow(tmp_path / "missing.yaml")
    with pytest.raises(WorkflowError, match="is empty"):
        load_workflow(write(tmp_path, ""))
    with pytest.raises(WorkflowError, match=r"not valid YAML: line 2"):
        load_workflow(write(tmp_path, "input: {path: x\nkernel: [\n"))
    with pytest.raises(WorkflowError, match="expected a mapping"):
        load_workflow(write(tmp_path, "- just\n- a list\n"))


def test_safe_load_only(tmp_path):
    text = "input: !!python/object/apply:os.system ['echo hacked']\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n"
    with pytest.raises(WorkflowError, match="not valid YAML"):
        load_workflow(write(tmp_path, text))


def test_parse_workflow_from_data_uses_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = parse_workflow({"input": {"path": "i.zarr"}, "kernel": {"box": {"size": 2}}, "output": {"path": "o.zarr"}})
    assert wf.input.path == str(tmp_path.resolve() / "i.zarr")


def test_size_and_duration_parsers():
    assert parse_bytes("64MiB") == 64 * 2**20
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096
    for bad in ("lots", -1, 0, True, "1 parsec"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert parse_seconds("10s") == 10
    assert parse_seconds("250ms") == pytest.approx(0.25)
    assert parse_seconds("1min") == 60
    assert parse_seconds(2) == 2
    for bad in ("soon", 0, -3, False):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_operation_keys(tmp_path):
    wf = load_workflow(write(tmp_path, MINIMAL + "boundary: reflect\ncorrelate: true\n"))
    assert (wf.boundary, wf.fillvalue, wf.correlate) == ("reflect", 0.0, True)
    assert wf.operation.boundary == "symm" and wf.operation.correlate
    wf = load_workflow(write(tmp_path, MINIMAL + "fillvalue: 2\n"))
    assert wf.operation.fillvalue == 2.0 and wf.operation.boundary == "fill"
    default = load_workflow(write(tmp_path, MINIMAL))
    assert default.operation.is_default and default.to_dict()["boundary"] == "fill"


def test_bad_operation_keys(tmp_path):
    problems, _ = problems_of(tmp_path, MINIMAL + "boundary: periodic\nfillvalue: .nan\ncorrelate: yes please\n")
    assert "periodic" in problems["boundary"] and "wrap" in problems["boundary"]
    assert "finite number" in problems["fillvalue"]
    assert "true or false" in problems["correlate"]
    problems, _ = problems_of(tmp_path, MINIMAL + "boundary: wrap\nfillvalue: 1.5\n")
    assert problems == {"fillvalue": "only used with boundary: fill; got boundary: wrap (remove fillvalue)"}


def test_checking_a_workflow_imports_no_store_or_engine_code(tmp_path):
    """A workflow is checked with pydantic, yaml and numpy alone: its
    mistakes reach the user before zarr, numba, scipy or dask load (~1 s a
    command paid for a misspelt mode). The registries read on demand: an
    output format loads the storage code, a boundary the boundaries'."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    good = write(tmp_path, MINIMAL, "good.yaml")
    bad = write(tmp_path, MINIMAL + "mode: sideways\nmethod: diagonal\n", "bad.yaml")
    code = textwrap.dedent(f"""
        import sys
        from dask_sparseconv.workflow import WorkflowError, load_workflow
        wf = load_workflow({str(good)!r})
        try:
            load_workflow({str(bad)!r})
        except WorkflowError as exc:
            print(exc)
        heavy = ('zarr', 'numba', 'scipy', 'dask', 'distributed', 'torch')
        print(sorted(m for m in heavy if m in sys.modules), wf.mode, wf.kernel.array.shape)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert "mode: expected one of full, same, valid; got 'sideways'" in res.stdout, res.stdout
    assert "method: expected one of auto, direct" in res.stdout, res.stdout
    # the same kernel as a load in this process, where everything is imported
    assert lines[-1] == f"[] same {load_workflow(good).kernel.array.shape}", res.stdout


def test_registry_choices_are_checked_when_given(tmp_path):
    """The choices read from registries on demand still refuse what is not registered."""
    text = MINIMAL.replace("output: {path: out/res.zarr}", "output: {path: out/res.zarr, format: parquet}")
    with pytest.raises(WorkflowError) as info:
        load_workflow(write(tmp_path, text + "boundary: reflect-101\n"))
    msg = str(info.value)
    assert "output.format: expected one of dense, csr, ome-zarr" in msg, msg
    assert "boundary: expected one of fill, wrap, symm, mirror, nearest, constant, reflect, grid-wrap" in msg, msg
    wf = load_workflow(write(tmp_path, MINIMAL + "boundary: reflect\n", "ok.yaml"))
    assert wf.boundary == "reflect" and wf.operation.boundary == "symm"
