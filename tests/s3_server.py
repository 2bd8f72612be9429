"""A real S3 HTTP endpoint for the tests: moto's server mode in a subprocess on 127.0.0.1.

The ``s3_endpoint`` fixture (tests/conftest.py, one server per test session) yields an
:class:`S3Endpoint`.  While it lives, ``os.environ`` holds ``AWS_ENDPOINT_URL`` and dummy credentials,
so ``s3://<bucket>/...`` URIs reach the server from this process and from any subprocess it starts
(CLI runs, Ray workers started by ``ray.init`` here); ``env`` is the same for an explicit ``env=``.
The endpoint is a tests/s3_fault_proxy.py proxy in front of moto (``proxy``): it forwards everything
unless a test configures faults, within ``with endpoint.faults() as proxy:``.
:meth:`S3Endpoint.uri` makes such a URI; :meth:`S3Endpoint.query_uri` names the endpoint in the URI
itself instead (pyarrow's ``endpoint_override``/``scheme`` options).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from s3_fault_proxy import S3FaultProxy

BUCKET = "fastfeat-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Endpoint:
    host: str
    port: int
    bucket: str
    env: dict[str, str] = field(default_factory=dict)  # AWS_* variables that point a client here
    proxy: S3FaultProxy | None = None  # what host:port is: the fault proxy in front of moto

    @contextmanager
    def faults(self):
        """The proxy, to configure faults on; they are all cleared on exit, whatever happened."""
        try:
            yield self.proxy
        finally:
            self.proxy.reset()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def uri(self, *parts: str) -> str:
        """``s3://bucket/part/...``: reaches this server through the environment."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def query_uri(self, *parts: str) -> str:
        """The same location with the endpoint written in the URI's query (no environment needed)."""
        return f"{self.uri(*parts)}?endpoint_override={self.host}:{self.port}&scheme=http"

    def prefix(self) -> str:
        """A fresh key prefix: tests share the bucket, never a prefix."""
        return uuid.uuid4().hex[:12]

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix/``, relative to it, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", []))

    def upload_tree(self, local: str, prefix: str) -> None:
        """Copy a local folder to ``prefix/`` (same relative paths)."""
        client = self.client()
        for folder, _, files in os.walk(local):
            for name in files:
                path = os.path.join(folder, name)
                key = prefix + "/" + os.path.relpath(path, local).replace(os.sep, "/")
                client.upload_file(path, self.bucket, key)


def start(bucket: str = BUCKET, timeout_s: float = 30.0):
    """(process, S3Endpoint) of a new moto server with ``bucket`` created; raises if it does not answer."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proxy = S3FaultProxy("127.0.0.1", port).start()
    endpoint = S3Endpoint("127.0.0.1", proxy.port, bucket, proxy=proxy)
    endpoint.env = {
        "AWS_ENDPOINT_URL": endpoint.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups against 169.254.169.254
    }
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint.endpoint_url, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # an HTTP answer, whatever its status: the server is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proxy.stop()
                raise RuntimeError(f"moto_server did not answer on {endpoint.endpoint_url}") from None
            time.sleep(0.1)
    endpoint.client().create_bucket(Bucket=bucket)
    return proc, endpoint


def stop(proc: subprocess.Popen, endpoint: S3Endpoint | None = None) -> None:
    if endpoint is not None and endpoint.proxy is not None:
        endpoint.proxy.stop()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
