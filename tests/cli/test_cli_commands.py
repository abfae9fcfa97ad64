"""The command line as a user runs it (a subprocess), for everything that
needs no dask cluster: --help/--version, validate, info, preview, --dry-run,
and the error paths (clear one-line messages, exit codes, no tracebacks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from dask_sparseconv import kernels
from dask_sparseconv.sample_data import sample_rois, write_sample_stack

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None, timeout=120):
    """Run ``python -m dask_sparseconv.cli ARGS``; return the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dask_sparseconv.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def assert_clean_failure(res, code, *fragments):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    for frag in fragments:
        assert frag in res.stderr, (frag, res.stderr)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def dense_store(tmp_path):
    p = tmp_path / "dense.zarr"
    write_sample_stack(p, 12, (32, 40), max_rois=2, radius=4, seed=1)
    return p


@pytest.fixture
def csr_store(tmp_path):
    p = tmp_path / "csr.zarr"
    write_sample_stack(p, 10, (24, 20), max_rois=2, radius=3, seed=2, format="csr")
    return p


# -- help and version ---------------------------------------------------------
def test_version():
    from importlib.metadata import version

    res = cli("--version")
    assert res.returncode == 0
    # looked up only when asked for (not on every parse), and the installed one
    assert res.stdout == f"dask-sparseconv {version('dask-sparseconv')}\n"


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), ["run", "validate", "info", "preview", "Exit codes"]),
        (("run",), ["--dry-run", "--restart", "--verbose", "WORKFLOW.yaml"]),
        (("validate",), ["WORKFLOW.yaml"]),
        (("info",), ["STORE", "--array", "--storage-option"]),
        (("preview",), ["--images", "--output", "--scale", "--no-labels"]),
    ],
)
def test_help(args, expected):
    res = cli(*args, "--help")
    assert res.returncode == 0, res.stderr
    for word in expected:
        assert word in res.stdout


def test_usage_errors_exit_2():
    assert_clean_failure(cli(), 2)
    assert_clean_failure(cli("frobnicate"), 2, "invalid choice")
    assert_clean_failure(cli("run"), 2, "WORKFLOW.yaml")
    assert_clean_failure(cli("run", "x.yaml", "--fast"), 2, "unrecognized arguments")


# -- validate -----------------------------------------------------------------
def test_validate_ok(tmp_path, dense_store):
    wf = write(
        tmp_path / "wf.yaml",
        """
        input: {path: dense.zarr}
        kernel: {box: {size: 3}}
        mode: valid
        output: {path: out.zarr, format: csr}
        cluster: {n_workers: 1}
        """,
    )
    res = cli("validate", wf)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"OK: {wf}")
    assert "dense, 12 images of 32 x 40, float32" in res.stdout
    assert "csr, 30 x 38" in res.stdout
    assert "1 worker process" in res.stdout


def test_validate_sample_is_not_generated(tmp_path):
    wf = write(
        tmp_path / "wf.yaml",
        """
        input: {path: data/s.zarr, sample: {n_images: 5, frame_shape: [16, 16]}}
        kernel: {gaussian: {sigma: 1}}
        output: {path: out/o.zarr}
        """,
    )
    res = cli("validate", wf)
    assert res.returncode == 0, res.stderr
    assert "will be generated" in res.stdout
    assert not (tmp_path / "data").exists()


def test_validate_reports_every_data_problem(tmp_path, dense_store):
    (tmp_path / "exists.zarr").mkdir()
    wf = write(
        tmp_path / "wf.yaml",
        """
        input: {path: dense.zarr}
        kernel: {box: {size: [40, 3]}}
        mode: valid
        output: {path: exists.zarr}
        """,
    )
    res = cli("validate", wf)
    assert_clean_failure(res, 2, f"{wf}: 2 problems:", "kernel: kernel of shape 40 x 3 is larger than the 32 x 40 frames",
                         "output.path:", "already exists")


def test_validate_block_memory_too_small(tmp_path, dense_store):
    wf = write(
        tmp_path / "wf.yaml",
        "input: {path: dense.zarr}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\nblock: {memory: 100}\n",
    )
    assert_clean_failure(cli("validate", wf), 2, "block.memory:", "too small even for the smallest tile")


def test_validate_missing_and_unopenable_input(tmp_path):
    (tmp_path / "not_zarr").mkdir()
    wf = write(tmp_path / "a.yaml", "input: {path: nope.zarr}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n")
    assert_clean_failure(cli("validate", wf), 2, f"input.path: {tmp_path / 'nope.zarr'} does not exist")
    wf = write(tmp_path / "b.yaml", "input: {path: not_zarr}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n")
    assert_clean_failure(cli("validate", wf), 2, "input.path: cannot open", "not a zarr store")


def test_validate_csr_input_and_wrong_array(tmp_path, csr_store):
    wf = write(tmp_path / "wf.yaml", "input: {path: csr.zarr}\nkernel: {disk: {radius: 1}}\noutput: {path: o.zarr}\n")
    res = cli("validate", wf)
    assert res.returncode == 0, res.stderr
    assert "csr, 10 images of 24 x 20" in res.stdout
    wf = write(
        tmp_path / "wf2.yaml", "input: {path: csr.zarr, array: nothere}\nkernel: {disk: {radius: 1}}\noutput: {path: o.zarr}\n"
    )
    assert_clean_failure(cli("validate", wf), 2, "input.array:", "nothere")


BAD_WORKFLOWS = {
    "unknown key with suggestion": ("kernel: {box: {size: 3}}\nouput: {path: o.zarr}\n", ["ouput: unknown key; did you mean 'output'?"]),
    "wrong kernel spec": ("kernel: {gaussian: {size: 3}}\noutput: {path: o.zarr}\n", ["kernel.gaussian.sigma: required key is missing"]),
    "two kernels": ("kernel: {box: {size: 3}, disk: {radius: 2}}\noutput: {path: o.zarr}\n", ["kernel: expected exactly one of"]),
    "bad mode": ("kernel: {box: {size: 3}}\nmode: 3\noutput: {path: o.zarr}\n", ["mode: expected one of full, same, valid; got 3"]),
    "bad yaml": ("kernel: {box: {size: 3}\noutput: [\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(BAD_WORKFLOWS))
def test_bad_workflows(tmp_path, dense_store, command, case):
    body, fragments = BAD_WORKFLOWS[case]
    wf = write(tmp_path / "bad.yaml", "input: {path: dense.zarr}\n" + body)
    assert_clean_failure(cli(command, wf), 2, str(wf), *fragments)
    assert not (tmp_path / "o.zarr").exists()


def test_missing_workflow_file(tmp_path):
    assert_clean_failure(cli("run", tmp_path / "none.yaml"), 2, "does not exist")
    assert_clean_failure(cli("preview", tmp_path / "none.yaml"), 2, "does not exist")


def test_run_missing_input_fails_before_any_cluster(tmp_path):
    wf = write(tmp_path / "wf.yaml", "input: {path: gone.zarr}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n")
    res = cli("run", wf)
    assert_clean_failure(res, 2, "input.path:", "does not exist")
    assert "dashboard" not in res.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_fails_fast(tmp_path, dense_store):
    port = _closed_port()
    wf = write(
        tmp_path / "wf.yaml",
        f"""
        input: {{path: dense.zarr}}
        kernel: {{box: {{size: 3}}}}
        output: {{path: o.zarr}}
        cluster: {{address: "tcp://127.0.0.1:{port}", timeout: 2s}}
        """,
    )
    res = cli("run", wf, timeout=60)
    assert_clean_failure(res, 1, f"cannot reach the dask scheduler at tcp://127.0.0.1:{port} within 2 s", "dask scheduler")
    assert not (tmp_path / "o.zarr").exists()


# -- dry run ------------------------------------------------------------------
def test_dry_run_computes_nothing(tmp_path, dense_store):
    wf = write(
        tmp_path / "wf.yaml",
        """
        input: {path: dense.zarr}
        kernel: {gaussian: {sigma: 1}}
        mode: full
        output: {path: out/o.zarr, format: csr}
        cluster: {n_workers: 2, threads_per_worker: 1}
        block: {memory: 256KiB}
        """,
    )
    res = cli("run", wf, "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "nothing is computed or written" in out
    assert "dense, 12 images of 32 x 40, float32" in out  # input shape, format, dtype
    assert "density:" in out and "nonzeros" in out
    assert "row blocks:" in out and "memory/block:" in out
    assert "csr, 12 images of 38 x 46, float32" in out  # expected output
    assert "local cluster: 2 worker processes x 1 thread" in out
    assert not (tmp_path / "out").exists()


def test_dry_run_with_sample_and_scheduler_address(tmp_path):
    wf = write(
        tmp_path / "wf.yaml",
        """
        input: {path: data/s.zarr, sample: {n_images: 8, frame_shape: [16, 16], format: csr}}
        kernel: {box: {size: 3}}
        output: {path: out/o.zarr}
        cluster: {address: "tcp://10.0.0.1:8786"}
        """,
    )
    res = cli("run", wf, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "to be generated from input.sample" in res.stdout
    assert "existing scheduler at tcp://10.0.0.1:8786" in res.stdout
    assert "csr, 8 images of 16 x 16" in res.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


# -- info ---------------------------------------------------------------------
def test_info_dense(dense_store):
    res = cli("info", dense_store)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    csr = sample_rois(12, (32, 40), max_rois=2, radius=4, seed=1)
    assert "format:     dense" in out
    assert "shape:      (12, 32, 40)" in out
    assert "dtype:      float32" in out
    assert "chunks:     (16, 32, 40)" in out  # the sample writer's 16-image chunks
    assert "codec:" in out
    assert f"nnz:        {csr.nnz:,} (exact)" in out  # few chunks: all were read
    assert f"density:    {csr.nnz / (12 * 32 * 40) * 100:.4g}%" in out
    assert "provenance: none" in out


def test_info_csr(csr_store):
    res = cli("info", csr_store)
    assert res.returncode == 0, res.stderr
    csr = sample_rois(10, (24, 20), max_rois=2, radius=3, seed=2)
    assert "format:     csr" in res.stdout
    assert "shape:      (10, 480)" in res.stdout
    assert "images:     10 of 24 x 20" in res.stdout
    assert f"nnz:        {csr.nnz:,} (exact)" in res.stdout
    assert "indices:" in res.stdout


def test_info_incomplete_output_of_this_package(tmp_path):
    from dask_sparseconv.storage import create_output

    out = create_output(tmp_path / "part.zarr", "dense", 6, (8, 8), "float32", [(0, 2), (2, 4), (4, 6)],
                        attrs={"mode": "same", "source": "somewhere"})
    out.write_block(1, 2, 4, np.ones((2, 8, 8), np.float32))
    res = cli("info", tmp_path / "part.zarr")
    assert res.returncode == 0, res.stderr
    assert "provenance: written by dask-sparseconv" in res.stdout
    assert "mode:" in res.stdout and "somewhere" in res.stdout
    assert "INCOMPLETE" in res.stdout
    assert "1 of 3 blocks written" in res.stdout


def test_info_errors(tmp_path, dense_store):
    assert_clean_failure(cli("info", tmp_path / "missing.zarr"), 2, "does not exist")
    assert_clean_failure(cli("info", dense_store, "--array", "inner"), 2, "cannot open", "inner")
    assert_clean_failure(cli("info", dense_store, "--storage-option", "novalue"), 2, "key=value")


# -- preview ------------------------------------------------------------------
def test_preview_png(tmp_path, dense_store):
    from PIL import Image

    from dask_sparseconv.preview import preview_size

    wf = write(tmp_path / "wf.yaml", "input: {path: dense.zarr}\nkernel: {gaussian: {sigma: 1}}\nmode: full\noutput: "
        "{path: o.zarr}\n")
    png = tmp_path / "p.png"
    res = cli("preview", wf, "--images", "0,2,-1", "-o", png, "--scale", "2")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.size == preview_size(3, (32, 40), (38, 46), scale=2, labels=True)
        arr = np.asarray(img)
    assert arr.max() == 255  # frames normalised to full grey range
    assert not (tmp_path / "o.zarr").exists()


def test_preview_values_and_no_labels(tmp_path, dense_store):
    from PIL import Image

    from dask_sparseconv.preview import PAD, to_grey
    from dask_sparseconv.storage import open_input

    wf = write(tmp_path / "wf.yaml", "input: {path: dense.zarr}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n")
    png = tmp_path / "p.png"
    res = cli("preview", wf, "--images", "4", "-o", png, "--no-labels")
    assert res.returncode == 0, res.stderr
    frame = open_input(dense_store).read_dense_block(4, 5)[0]
    expected_out = scipy.signal.convolve2d(frame.astype(np.float64), kernels.box(3), mode="same")
    with Image.open(png) as img:
        arr = np.asarray(img)
    assert arr.shape == (PAD + 32 + PAD, 3 * PAD + 2 * 40)
    np.testing.assert_array_equal(arr[PAD : PAD + 32, PAD : PAD + 40], to_grey(frame))
    got = arr[PAD : PAD + 32, 2 * PAD + 40 : 2 * PAD + 80].astype(int)
    assert np.abs(got - to_grey(expected_out).astype(int)).max() <= 1


def test_preview_generates_sample_input(tmp_path):
    wf = write(
        tmp_path / "wf.yaml",
        """
        input: {path: data/s.zarr, sample: {n_images: 4, frame_shape: [20, 20], radius: 3}}
        kernel: {disk: {radius: 1}}
        output: {path: out/o.zarr}
        """,
    )
    res = cli("preview", wf, "-o", tmp_path / "p.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "data" / "s.zarr").exists()
    assert not (tmp_path / "out").exists()


def test_preview_bad_images(tmp_path, dense_store):
    wf = write(tmp_path / "wf.yaml", "input: {path: dense.zarr}\nkernel: {box: {size: 3}}\noutput: {path: o.zarr}\n")
    assert_clean_failure(cli("preview", wf, "--images", "0,12"), 2, "--images: 12 out of range", "12 images")
    assert_clean_failure(cli("preview", wf, "--images", "a,b"), 2, "comma-separated")
    assert_clean_failure(cli("preview", wf, "--scale", "0"), 2, "--scale")


# -- error hygiene inside main() ------------------------------------------------
def test_numba_errors_never_reach_the_user(monkeypatch, capsys):
    from numba.core.errors import TypingError

    from dask_sparseconv import cli as cli_mod

    def boom(args):
        raise TypingError("Failed in nopython mode pipeline (step: nopython frontend)")

    monkeypatch.setitem(cli_mod.COMMANDS, "validate", boom)
    for extra in ([], ["--verbose"]):
        rc = cli_mod.main(["validate", "x.yaml", *extra])
        err = capsys.readouterr().err
        assert rc == 1
        assert "numba engine failed" in err and "backend: numpy" in err
        assert "Traceback" not in err and "nopython" not in err


def test_unexpected_errors_one_line_unless_verbose(monkeypatch, capsys):
    from dask_sparseconv import cli as cli_mod

    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setitem(cli_mod.COMMANDS, "validate", boom)
    assert cli_mod.main(["validate", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: disk on fire" in err and "Traceback" not in err and "--verbose" in err
    assert cli_mod.main(["validate", "x.yaml", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_tls_with_unusable_certificates(tmp_path, dense_store):
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("not a certificate\n")
    wf = write(
        tmp_path / "wf.yaml",
        f"""
        input: {{path: dense.zarr}}
        kernel: {{box: {{size: 3}}}}
        output: {{path: o.zarr}}
        cluster:
          address: "tls://127.0.0.1:{_closed_port()}"
          timeout: 2s
          security: {{ca_file: ca.pem, cert_file: cert.pem, key_file: key.pem}}
        """,
    )
    assert_clean_failure(cli("run", wf, timeout=60), 1, "TLS setup for tls://127.0.0.1:", "cluster.security")
    wf2 = write(tmp_path / "wf2.yaml", wf.read_text().replace("ca_file: ca.pem", "ca_file: missing.pem"))
    assert_clean_failure(cli("validate", wf2), 2, "cluster.security.ca_file:", "missing.pem", "does not exist")


@pytest.mark.parametrize(
    "text, local",
    [
        ("input: {path: a.zarr}\n", True),
        ("cluster: {n_workers: 2}\n", True),
        ("cluster: {address: 'tcp://127.0.0.1:8786'}\n", False),
        ("cluster: [1, 2]\n", False),  # odd: the full check reports it
        ("input: [unclosed\n", False),  # not YAML
        ("", False),
    ],
)
def test_run_peeks_at_the_cluster_before_the_full_check(tmp_path, text, local):
    """`run` starts the local workers' fork server before the workflow's full
    check only when the file names no scheduler address."""
    from dask_sparseconv.cli.cluster import local_cluster_section as _local_cluster

    wf = tmp_path / "wf.yaml"
    wf.write_text(text)
    assert (_local_cluster(str(wf)) is not None) is local
    assert _local_cluster(str(tmp_path / "missing.yaml")) is None


def test_the_command_starts_before_the_heavy_imports():
    """`run` starts its local workers' fork server before it imports the
    engine, dask or zarr (they load there and in this process at once): the
    package and the command's entry module must import with none of them,
    nor numpy (what is imported before the command's own Ctrl-C handling
    runs prints Python's traceback when interrupted)."""
    code = ("import sys, dask_sparseconv, dask_sparseconv.cli.main\n"
            "print(sorted(m for m in ('numpy', 'numba', 'scipy', 'zarr', 'dask', 'distributed', 'pydantic', 'yaml')"
            " if m in sys.modules))")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    # and the lazy names still resolve
    import dask_sparseconv

    assert dask_sparseconv.Convolver.__name__ == "Convolver"
    assert "Convolver" in dir(dask_sparseconv)


@pytest.mark.parametrize("module", ["dask_sparseconv.cli.commands", "numpy.linalg"])
def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path, module):
    """A Ctrl-C while the command's modules load (numpy, zarr, the engine:
    ~0.15 s) ends with the command's one line and exit 130, not a traceback.
    The interrupt is raised by an import hook when ``module`` is imported, so
    it lands there every time. Inside numpy's import it leaves numpy's
    compiled core loaded and numpy not, which a second import refuses
    ("cannot load module more than once per process"): the line must not
    need numpy."""
    code = textwrap.dedent(f"""
        import sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["dask-sparseconv", "run", "wf.yaml"]
        from dask_sparseconv.cli.main import console_main
        sys.exit(console_main())
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=60)
    assert_clean_failure(res, 130)
    assert res.stderr.strip().splitlines()[-1] == "error: interrupted; nothing was left half-done"
    assert not list(tmp_path.iterdir())
