"""Security: workflow files are parsed safely (no Python objects from YAML),
.npy kernels load with pickles refused, no path is evaluated as code, and
a TLS-only cluster (real `dask scheduler`/`dask worker` with certificates,
tls://127.0.0.1) is reachable from a workflow's cluster.security keys."""

from __future__ import annotations

import datetime
import ipaddress
import os
import textwrap

import numpy as np
import pytest
from reliability_support import assert_identical, cli, stack, tree_digest, write_inputs

from dask_sparseconv import convolve_zarr
from dask_sparseconv.kernels import load_kernel_file
from dask_sparseconv.workflow import WorkflowError, load_workflow


class _Payload:
    """Pickles to a call that would create ``marker`` if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def src(tmp_path):
    return write_inputs(tmp_path, stack(12, 16, 16, seed=2), dense_chunks=4)["dense"]


def test_yaml_tags_construct_nothing(tmp_path, src):
    marker = tmp_path / "pwned"
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']",
                f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
                "!!python/name:os.system"):
        wf = tmp_path / "wf.yaml"
        wf.write_text(f"input: {{path: {src}}}\nkernel: {{box: {{size: 3}}}}\noutput: {{path: out.zarr}}\n"
                      f"description: {tag}\n")
        with pytest.raises(WorkflowError, match="not valid YAML"):
            load_workflow(wf)
        for cmd in ("validate", "run"):
            res = cli(cmd, wf, cwd=tmp_path)
            assert res.returncode == 2 and "not valid YAML" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "out.zarr").exists()


def test_npy_kernel_with_pickle_is_refused(tmp_path, src):
    marker = tmp_path / "pwned"
    evil = tmp_path / "k.npy"
    np.save(evil, np.array([[_Payload(marker), 1.0]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_kernel_file(str(evil))
    wf = tmp_path / "wf.yaml"
    wf.write_text(f"input: {{path: {src}}}\nkernel: {{file: k.npy}}\noutput: {{path: out.zarr}}\n")
    res = cli("run", wf, cwd=tmp_path)
    assert res.returncode == 2 and "kernel.file" in res.stderr and "pickle" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "out.zarr").exists()
    # an ordinary .npy kernel loads
    np.save(tmp_path / "ok.npy", np.ones((3, 3)))
    assert load_kernel_file(str(tmp_path / "ok.npy")).shape == (3, 3)


ODD_PATHS = ["$(touch {m})", "`touch {m}`", "{{__import__('os').system('touch {m}')}}", "x; touch {m}", "~nobody{m}"]


def test_paths_are_never_evaluated(tmp_path, src):
    """Shell syntax, Python expressions and f-string-like text in a path are
    just characters of a file name (only a leading ~ is expanded)."""
    marker = tmp_path / "pwned"

    def workflow(**over):
        doc = {"input": f"{{path: {src}}}", "kernel": "{box: {size: 3}}", "output": "{path: out.zarr}", **over}
        wf = tmp_path / "wf.yaml"
        wf.write_text("".join(f"{k}: {v}\n" for k, v in doc.items()))
        return wf

    for raw in ODD_PATHS:
        text = raw.format(m=marker)
        quoted = "'" + text.replace("'", "''") + "'"  # a YAML single-quoted scalar
        res = cli("validate", workflow(kernel=f"{{file: {quoted[:-1]}.npy'}}"), cwd=tmp_path)
        assert res.returncode == 2 and "kernel.file" in res.stderr and "does not exist" in res.stderr, res.stderr
        res = cli("validate", workflow(input=f"{{path: {quoted}}}", output=f"{{path: {quoted[:-1]}-out'}}"),
                  cwd=tmp_path)
        assert res.returncode == 2 and "input.path" in res.stderr and "does not exist" in res.stderr, res.stderr
        assert "output.path" not in res.stderr  # a legal (odd) directory name
    # one real run with such an output name writes exactly there
    text = ODD_PATHS[0].format(m=marker)
    res = cli("run", workflow(output="{path: '" + text + "'}"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / text / "zarr.json").is_file()
    assert not marker.exists()


# -- TLS -------------------------------------------------------------------------------
def _self_signed(tmp_path):
    """A CA-capable self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-sparseconv test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.xdist_group("cluster")
def test_workflow_runs_on_a_tls_only_cluster(tmp_path, src, dask_processes):
    cert, key = _self_signed(tmp_path)
    tls = ["--tls-ca-file", cert, "--tls-cert", cert, "--tls-key", key]
    address = dask_processes.scheduler(["--protocol", "tls", *tls])
    assert address.startswith("tls://127.0.0.1:")
    dask_processes.workers(1, tls)
    before = tree_digest(src)
    base = textwrap.dedent(f"""
        input: {{path: {src}}}
        kernel: {{values: [[0, 1, 0], [1, -4, 1], [0, 1, 0]]}}
        mode: full
        output: {{path: out.zarr, format: csr}}
    """)
    wf = tmp_path / "wf.yaml"
    # without certificates the workflow is refused before connecting
    wf.write_text(base + f"cluster: {{address: '{address}', timeout: 5s}}\n")
    res = cli("validate", wf, cwd=tmp_path)
    assert res.returncode == 2 and "cluster.security" in res.stderr
    wf.write_text(base + textwrap.dedent(f"""
        cluster:
          address: '{address}'
          timeout: 60s
          security: {{ca_file: {cert}, cert_file: {cert}, key_file: {key}}}
    """))
    res = cli("run", wf, cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(TLS)" in res.stdout and "cluster: 1 worker" in res.stdout
    clean = str(tmp_path / "clean.zarr")
    convolve_zarr(src, load_workflow(wf).kernel.array, clean, "full", output_format="csr")
    assert_identical(tmp_path / "out.zarr", clean)
    assert tree_digest(src) == before
