"""A real S3-compatible server for tests: moto's standalone server (``moto[server]`` from PyPI) started as a
subprocess on 127.0.0.1. Tests skip with a clear reason when it is not installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``moto_server -p PORT``; ``stop()`` / ``start()`` simulate an outage (state is lost on restart, so
    tests that restart it re-create the bucket and only check behaviour, not old objects)."""

    def __init__(self, log_dir: Path) -> None:
        exe = shutil.which("moto_server")
        if exe is None:
            pytest.skip("moto_server is not installed (pip install 'moto[server]'): no S3-compatible server to test on")
        self.exe = exe
        self.port = free_port()
        self.log = log_dir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, limit: float = 30.0) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [self.exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, **CREDS},
            )
        deadline = time.monotonic() + limit
        while True:
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {self.log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def make_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[MotoServer]:
    server = MotoServer(log_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def store_section(server: MotoServer, bucket: str = "turbobot-test", prefix: str = "t/") -> dict[str, object]:
    return {"backend": "s3", "endpoint_url": server.url, "bucket": bucket, "prefix": prefix,
            "region": "us-east-1", "timeout_seconds": 2.0}


def set_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)


__all__ = ["CREDS", "MotoServer", "free_port", "moto_server", "set_creds", "store_section", "sys"]
