"""Bad input, through the API and the command line: each case gives a clear
message naming what is wrong (ValueError/TypeError, or the matching OSError
subclass for paths: FileNotFoundError, FileExistsError, NotADirectoryError),
a non-zero exit without a traceback from the CLI, and nothing written at the
target. A problem that only shows while reading (a corrupt chunk, a CSR
index out of range in a lazy read) stops the run naming the chunk/row, and
an output is left marked incomplete: nothing is marked complete. CSR indices
are scanned before convolve_zarr creates its target."""

from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np
import pytest
import scipy.sparse
import yaml
import zarr
from reliability_support import cli, env, one_line_error, provenance, tree_digest

from dask_sparseconv import convolve, convolve_zarr, open_stack
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

N, H, W = 8, 10, 12
K = np.ones((3, 3), dtype=np.float32)


def _x():
    rng = np.random.default_rng(0)
    return ((rng.random((N, H, W)) < 0.2) * rng.random((N, H, W))).astype(np.float32)


def _csr(tmp, name, damage):
    write_csr_stack(str(tmp / name), scipy.sparse.csr_matrix(_x().reshape(N, -1)), (H, W), chunk_size=16)
    damage(zarr.open_group(str(tmp / name), mode="r+"))
    return name


def _short_indices(g):
    d = g["indices"][:]
    del g["indices"]
    g.create_array("indices", shape=(len(d) - 1,), dtype=d.dtype, chunks=(16,))[:] = d[:-1]


def _set(arr, i, v):
    arr[i] = v


def _out_of_range(g):
    idx = g["indices"][:]
    idx[5] = H * W + 7
    g["indices"][:] = idx


@pytest.fixture
def data(tmp_path):
    write_dense_stack(str(tmp_path / "d.zarr"), _x(), chunks=2)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not zarr")
    (tmp_path / "file.txt").write_text("a regular file")
    zarr.create_array(str(tmp_path / "two.zarr"), shape=(4, 5), dtype="f4")
    _csr(tmp_path, "c_indptr.zarr", lambda g: _set(g["indptr"], 3, 10**6))
    _csr(tmp_path, "c_shape.zarr", lambda g: g.attrs.__setitem__("shape", [N + 1, H * W]))
    _csr(tmp_path, "c_noframe.zarr", lambda g: g.attrs.__delitem__("frame_shape"))
    _csr(tmp_path, "c_short.zarr", _short_indices)
    _csr(tmp_path, "c_range.zarr", _out_of_range)
    return tmp_path


# name: (API keyword changes, workflow changes, exception type, words the message must hold)
CASES = {
    "missing input": ({"source": "nope.zarr"}, {"input": {"path": "nope.zarr"}}, FileNotFoundError, ["nope.zarr", "does not exist"]),
    "not a zarr store": ({"source": "plain"}, {"input": {"path": "plain"}}, ValueError, ["plain", "not a zarr store"]),
    "2-D array": ({"source": "two.zarr"}, {"input": {"path": "two.zarr"}}, ValueError, ["2-D", "3-D"]),
    "CSR indptr": ({"source": "c_indptr.zarr"}, {"input": {"path": "c_indptr.zarr"}}, ValueError, ["indptr", "monotonic"]),
    "CSR shape": ({"source": "c_shape.zarr"}, {"input": {"path": "c_shape.zarr"}}, ValueError, ["shape[0]", "indptr"]),
    "CSR indices length": ({"source": "c_short.zarr"}, {"input": {"path": "c_short.zarr"}}, ValueError, ["indices has length", "data"]),
    "CSR no frame_shape": ({"source": "c_noframe.zarr"}, {"input": {"path": "c_noframe.zarr"}}, ValueError, ["frame_shape"]),
    "kernel 1-D": ({"kernel": np.ones(3)}, {"kernel": {"values": [1, 2, 3]}}, ValueError, ["2-D"]),
    "kernel empty": ({"kernel": np.ones((0, 3))}, {"kernel": {"values": []}}, ValueError, ["empty"]),
    "kernel NaN": ({"kernel": np.array([[1.0, np.nan]])}, {"kernel": {"values": [[1.0, float("nan")]]}}, ValueError, ["finite"]),
    "kernel inf": ({"kernel": np.array([[1.0, np.inf]])}, {"kernel": {"values": [[1.0, float("inf")]]}}, ValueError, ["finite"]),
    "kernel larger than frame (valid)": ({"kernel": np.ones((H + 1, 3)), "mode": "valid"},
                                         {"kernel": {"box": {"size": [H + 1, 3]}}, "mode": "valid"}, ValueError, ["valid"]),
    "unknown mode": ({"mode": "circular"}, {"mode": "circular"}, ValueError, ["mode", "circular"]),
    "unknown method": ({"method": "fft"}, {"method": "fft"}, ValueError, ["method", "fft"]),
    "unknown backend": ({"backend": "cuda"}, {"backend": "cuda"}, ValueError, ["backend", "cuda"]),
    "target inside the input": ({"target": "d.zarr/sub"}, {"output": {"path": "d.zarr/sub"}}, ValueError, ["overlaps", "input"]),
    "target exists": ({"target": "plain"}, {"output": {"path": "plain"}}, FileExistsError, ["already exists", "overwrite"]),
    "unwritable target": ({"target": "file.txt/out.zarr"}, {"output": {"path": "file.txt/out.zarr"}}, NotADirectoryError,
                          ["file.txt", "not a directory"]),
    "block budget too small": ({"block_memory": 100}, {"block": {"memory": 100}}, ValueError, ["too small even for the smallest tile"]),
}
CLI_WORDS = {  # where the workflow layer words it its own way
    "kernel larger than frame (valid)": ["larger than", "valid"],
    "target inside the input": ["overlaps"],
    "kernel 1-D": ["kernel.values"], "kernel empty": ["kernel.values"],
    "target exists": ["already exists", "--restart"],
    "unwritable target": ["file.txt"],
}


def _api_args(data, kw):
    args = {"source": "d.zarr", "kernel": K, "target": "out.zarr", "mode": "same", **kw}
    for key in ("source", "target"):
        args[key] = str(data / args[key])
    return args


def _target_of(data, changes) -> str:
    return str(data / ((changes.get("output") or {}).get("path") or changes.get("target") or "out.zarr"))


@pytest.mark.parametrize("case", list(CASES))
def test_api_refuses_and_writes_nothing(data, case):
    kw, _, exc, words = CASES[case]
    args = _api_args(data, kw)
    target = args["target"]
    existed = os.path.exists(target)
    before = tree_digest(target) if existed else None
    with pytest.raises(exc) as info:
        convolve_zarr(args.pop("source"), args.pop("kernel"), args.pop("target"), args.pop("mode"), **args)
    assert isinstance(info.value, (ValueError, TypeError, OSError))
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert (tree_digest(target) == before) if existed else not os.path.exists(target)


def _workflow(data, changes) -> str:
    doc = {"input": {"path": "d.zarr"}, "kernel": {"box": {"size": 3}}, "output": {"path": "out.zarr"},
           "cluster": {"n_workers": 1, "dashboard_address": None}}
    for key, value in changes.items():
        doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) and "path" in value else value
    wf = data / "wf.yaml"
    wf.write_text(yaml.safe_dump(doc))
    return str(wf)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses_and_writes_nothing(data, case):
    _, changes, _, words = CASES[case]
    target = _target_of(data, changes)
    existed = os.path.exists(target)
    before = tree_digest(target) if existed else None
    res = cli("run", _workflow(data, changes), cwd=data, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: ")
    for w in CLI_WORDS.get(case, words):
        assert w in res.stderr, (w, res.stderr)
    assert (tree_digest(target) == before) if existed else not os.path.exists(target)


def test_backend_not_installed(data):
    """torch hidden from a real interpreter (sys.modules['torch'] = None)."""
    hide = "import sys; sys.modules['torch'] = None"
    code = (f"{hide}\nimport numpy as np\nfrom dask_sparseconv import convolve_zarr\n"
            f"try:\n    convolve_zarr({str(data / 'd.zarr')!r}, np.ones((3, 3)), {str(data / 'o.zarr')!r}, method='precomputed', backend='torch')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert "ValueError: backend='torch' was asked for but torch is not installed" in res.stdout, res.stdout + res.stderr
    res = cli("run", _workflow(data, {"method": "precomputed", "backend": "torch"}), cwd=data, pre=hide)
    assert res.returncode == 2 and "torch is not installed" in res.stderr and "Traceback" not in res.stderr
    assert not (data / "o.zarr").exists() and not (data / "out.zarr").exists()


def test_scheduler_that_does_not_answer_fails_fast(data):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wf = data / "wf.yaml"
    wf.write_text(yaml.safe_dump({"input": {"path": "d.zarr"}, "kernel": {"box": {"size": 3}},
                                  "output": {"path": "out.zarr"},
                                  "cluster": {"address": f"tcp://127.0.0.1:{port}", "timeout": "2s"}}))
    t0 = time.monotonic()
    res = cli("run", wf, cwd=data, timeout=90)  # bounded: a hang fails here
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stderr
    line = one_line_error(res.stderr)
    assert f"127.0.0.1:{port}" in line and "within 2 s" in line
    assert not (data / "out.zarr").exists()
    print(f"closed port refused after {took:.1f} s")


def test_corrupt_input_chunk_stops_the_run_nothing_marked_complete(data):
    # 20 chunks of 2 images; chunk 3 is not among those read up front (block
    # sizing samples chunks 0 and 10, `validate` chunks 0, 6, 13, 19), so the
    # damage shows only when a worker reads it, mid-run
    write_dense_stack(str(data / "big.zarr"), np.concatenate([_x()] * 5), chunks=2)
    chunk = data / "big.zarr" / "c" / "3" / "0" / "0"
    chunk.write_bytes(b"\x00\x01 not zstd")
    before = tree_digest(data / "big.zarr")
    target = data / "out.zarr"
    with pytest.raises(ValueError) as info:
        convolve_zarr(str(data / "big.zarr"), K, str(target), block_memory=4000)
    msg = str(info.value)
    assert "big.zarr" in msg and "chunk 3 along axis 0 (elements 6-7) failed to decode" in msg, msg
    assert provenance(target)["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(str(target))
    # the CLI: exit 1, one line naming the chunk, the output reported incomplete
    res = cli("run", _workflow(data, {"input": {"path": "big.zarr"}, "output": {"path": "cli.zarr"},
                                      "block": {"memory": 4000}}), cwd=data)
    assert res.returncode == 1, res.stderr
    line = one_line_error(res.stderr)
    assert "big.zarr" in line and "chunk 3" in line, line
    assert "INCOMPLETE" in cli("info", data / "cli.zarr").stdout
    assert tree_digest(data / "big.zarr") == before and chunk.read_bytes() == b"\x00\x01 not zstd"


@pytest.mark.parametrize("scan", ["in-process", "dask"])
def test_csr_index_out_of_range_refused_before_anything_is_written(data, scan, monkeypatch):
    """convolve_zarr scans a CSR source's indices before creating the target
    (in this process for a store on local disk or up to 64 MiB of indices,
    else as a dask min/max reduction), so the run refuses with nothing
    written."""
    from dask_sparseconv.storage.csr_store import CSRInput

    if scan == "dask":  # a small store takes the large remote store's path
        monkeypatch.setattr(CSRInput, "_LOCAL_CHECK_BYTES", 0)
        monkeypatch.setattr(CSRInput, "_LOCAL_DISK_CHECK_BYTES", 0)
    target = data / "out.zarr"
    before = tree_digest(data / "c_range.zarr")
    with pytest.raises(ValueError, match=r"column index 127 is out of range; indices must lie in \[0, 120\)"):
        convolve_zarr(str(data / "c_range.zarr"), K, str(target))
    assert not target.exists()
    assert tree_digest(data / "c_range.zarr") == before


def test_csr_index_out_of_range_in_a_lazy_read_names_the_rows(data):
    """The lazy convolve() reads blocks only when computed: the block that
    holds the bad index stops the computation, naming its rows."""
    lazy = convolve(str(data / "c_range.zarr"), K)
    with pytest.raises(ValueError, match=r"column index 127 out of range \[0, 120\).*row"):
        lazy.compute()
