"""A real S3-compatible server on this machine for the tests and benches of stores by URL:
moto's server (what s3fs's own tests use), in a process of its own on a free localhost
port, started, waited for until it answers, and stopped.

    with s3_server() as server:
        server.upload(Path("demos.zarr"), "bucket/demos.zarr")
        server.require_credentials()  # from now on only server.key/secret may read
        env = server.environment()  # FSSPEC_S3_* for a process that reads the bucket
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The server's process: moto's threaded server bound to port 0 (the system picks a free
# one), which it prints, then runs until its standard input closes.
_SERVE = (
    "import sys; from moto.server import ThreadedMotoServer; "
    "server = ThreadedMotoServer('127.0.0.1', 0, verbose=False); server.start(); "
    "print(server.get_host_and_port()[1], flush=True); sys.stdin.read(); server.stop()"
)
READ_ALL = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}


@dataclass
class S3Server:
    """The running server at ``endpoint`` and the credentials that may read from it."""

    endpoint: str
    key: str = "testing"
    secret: str = "testing"

    def storage_options(self) -> dict[str, Any]:
        """s3fs's options for this server: fsspec's config entry for ``s3``."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def environment(self) -> dict[str, str]:
        """The same options as fsspec reads them from a process's environment."""
        return {f"FSSPEC_S3_{name.upper()}": v for name, v in self.storage_options().items()}

    def upload(self, folder: Path, target: str) -> str:
        """Copy the local ``folder`` to ``bucket/key`` (the bucket made if missing); its URL."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True)
        bucket = target.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        fs.put(str(folder), target, recursive=True)
        return f"s3://{target}"

    def _client(self, service: str) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def require_credentials(self) -> None:
        """Make a user who may read every bucket, take its keys, and turn authentication
        on: from now on a request with other keys is refused (moto lets any in until then)."""
        iam = self._client("iam")
        iam.create_user(UserName="reader")
        iam.put_user_policy(
            UserName="reader",
            PolicyName="read",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [READ_ALL]}),
        )
        keys = iam.create_access_key(UserName="reader")["AccessKey"]
        self.key, self.secret = keys["AccessKeyId"], keys["SecretAccessKey"]
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",  # authenticate every request from the next one on
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).close()


def _wait_until_it_answers(endpoint: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the S3 server at {endpoint} did not answer: {exc}") from None
            time.sleep(0.05)


@contextmanager
def s3_server(timeout_s: float = 30.0) -> Iterator[S3Server]:
    """A moto S3 server on a free localhost port, stopped on leaving."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(
                f"the S3 server did not start (exit status {process.poll()}); it needs "
                "moto's server: pip install 'moto[server]'"
            )
        endpoint = f"http://127.0.0.1:{port}"
        _wait_until_it_answers(endpoint, timeout_s)
        yield S3Server(endpoint)
    finally:
        process.stdin.close()  # the server's cue to stop
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
