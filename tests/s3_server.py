"""moto's standalone S3 server on 127.0.0.1, started as a process, for the object-store tests.

``python -m moto.server`` answers the S3 API over HTTP, so s3fs, zarr and
the cluster's worker processes talk to it exactly as they would to a cloud
bucket (signed requests, real HTTP status codes). Nothing in the package is
mocked or patched.

Two modes:

* open (the default): any access key is accepted, as on a bucket whose
  policy allows everyone; the tests still pass credentials the way users do;
* ``auth=True``: moto checks request signatures against IAM users it knows
  (``INITIAL_NO_AUTH_ACTION_COUNT``: the first requests, which create the
  user, its key and its policy, are let through). Used only for the
  wrong-credentials test: moto's signature check rejects some valid
  listing requests (getmoto/moto issue 5948, ``ListObjectsV2`` with a
  delimiter), so jobs themselves run against an open server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from dask_processes import base_env, stop_process

START_TIMEOUT = 60  # seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """One ``moto.server`` process; ``stop()`` always ends it."""

    REGION = "us-east-1"

    def __init__(self, log_dir: Path, auth: bool = False):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key, self.secret = "dsc-test-key", "dsc-test-secret"
        # the IAM calls in _make_user: create user, create key, attach policy
        env = base_env(INITIAL_NO_AUTH_ACTION_COUNT="3" if auth else "1000000000")
        self._log = open(Path(log_dir) / f"moto-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            self._wait_up()
            if auth:
                self._make_user()
        except BaseException:
            self.stop()
            raise

    def _wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto.server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto.server did not answer on {self.endpoint} within {START_TIMEOUT} s") from None
                time.sleep(0.1)

    def _client(self, service: str, key: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.REGION,
                            aws_access_key_id=key or self.key, aws_secret_access_key=secret or self.secret)

    def _make_user(self) -> None:
        iam = self._client("iam")
        iam.create_user(UserName="dsc")
        made = iam.create_access_key(UserName="dsc")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="dsc", PolicyName="all", PolicyDocument=json.dumps(policy))
        self.key, self.secret = made["AccessKeyId"], made["SecretAccessKey"]

    def bucket(self, name: str | None = None) -> str:
        """Create a new, empty bucket (``name``, or a unique one) and return its name."""
        name = name or f"dsc-{uuid.uuid4().hex[:12]}"
        self._client("s3").create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every key in ``bucket`` (listed with boto3, not with the package's code)."""
        out: list[str] = []
        for page in self._client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def storage_options(self, **extra) -> dict:
        """fsspec/s3fs options naming this server and its credentials, as a workflow would."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.REGION}, **extra}

    def env(self) -> dict:
        """Environment variables that point boto3/s3fs at this server with these credentials."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": self.REGION}

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
