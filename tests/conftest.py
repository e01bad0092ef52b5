"""Shared test infrastructure: environment, a real S3 server and one local Ray runtime.

The environment is fixed here, before anything imports Ray, boto3 or pyarrow, so every process
started by the tests (Ray workers included) inherits it.
"""

from __future__ import annotations

import os


def _isolate_xdist_worker() -> None:
    """Give a pytest-xdist worker a network namespace of its own (loopback only).

    Ray and Serve use fixed ports and bind every interface; two workers sharing one namespace
    would collide. Each worker also draws its ephemeral ports from a range of its own, because
    SeaweedFS names its socket files in ``/tmp`` after its ports, and ``/tmp`` is shared. Runs in
    the worker's main thread before anything starts a thread or a server, so every later thread
    and child process lives in the new namespace. The controller talks to its workers over pipes.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or os.environ.get("DUCH_NO_NETNS") == "1":
        return
    import ctypes
    import subprocess

    clone_newnet = 0x40000000
    if ctypes.CDLL(None, use_errno=True).unshare(clone_newnet) != 0:
        raise RuntimeError(
            f"xdist worker {worker}: cannot create a network namespace "
            f"({os.strerror(ctypes.get_errno())}); run the tests through scripts/isolated, "
            "or without -n"
        )
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    lo = 30000 + 5000 * (int(worker[2:]) % 6)
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write(f"{lo} {lo + 4999}")


_isolate_xdist_worker()

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
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from duch_core.local_s3 import S3Server, free_ports, local_s3  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server: SeaweedFS `weed mini` on 127.0.0.1 (:func:`duch_core.local_s3.local_s3`).

    Exports AWS_ENDPOINT_URL, the keys and the region into ``os.environ`` (Ray workers started
    afterwards inherit them). Yields an :class:`S3Server` (``.endpoint``, ``.bucket``).
    """
    with local_s3() as server:
        yield server


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh, unique prefix in the test bucket: ``s3://test/<uuid>/``."""
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/"


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny search blocks, pieces, chunks and query batches on three threads, so a few
    thousand rows cross every boundary of the search kernels."""
    from duch_core import hamming_topk

    for name, value in [
        ("_BLOCK_BYTES", 256),
        ("_SUB_BYTES", 64),
        ("_MIN_CHUNK", 100),
        ("_MIN_SCAN_WORK", 100),
        ("_MIN_GATHER_CHUNK", 40),
        ("_MIN_RUN_CHUNK", 60),
        ("_STATE_BYTES", 20_000),
    ]:
        monkeypatch.setattr(hamming_topk, name, value)
    hamming_topk.set_num_threads(3)
    yield
    hamming_topk.set_num_threads(None)


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


def _cluster_pids(temp: Path) -> set[int]:
    """The processes of the cluster whose temp dir is ``temp``: those whose command line names
    it, and all their descendants (the dashboard and runtime-env agents rename themselves, so
    only their parentage tells whose they are; once their raylet is gone they would live on)."""
    parent: dict[int, int] = {}
    found: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if str(temp).encode() in (d / "cmdline").read_bytes():
                found.add(int(d.name))
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in found and p not in found}
        found |= more
        grew = bool(more)
    return found


def _stop_cluster(temp: Path) -> None:
    """Stop the processes of the cluster whose temp dir is ``temp``, and only those (`ray stop`
    would stop every Ray process on the machine)."""
    import signal

    pids = _cluster_pids(temp)

    def alive() -> list[int]:
        return [p for p in pids if Path(f"/proc/{p}").exists()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)


_RUNNING_HEADS: list[Path] = []  # temp dirs of the running session head cluster
_RUNNING_TWO_NODE: list[TwoNodeCluster] = []  # the running session 2-node cluster


@pytest.fixture(scope="session")
def head_cluster(s3_server):  # noqa: ARG001 - the cluster inherits the S3 environment
    """A separate cluster from ``ray start --head`` on 127.0.0.1 for the tests that need a
    cluster of their own (``ray job submit``, ``serve deploy``); they run together near the end
    of the session (``pytest_collection_modifyitems``) and leave nothing running on it. Stopped
    when the 2-node cluster starts, or at the end.

    Every port is explicit: the defaults are fixed, and the session's in-process Ray may already
    hold them.
    """
    gcs, dash, m1, m2, client, agent, agent_grpc, metrics, rt_agent = free_ports(9)
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
        _RUNNING_HEADS.append(temp)
        yield HeadCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, temp)
    finally:
        _stop_heads()
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_heads() -> None:
    """Stop the session head cluster, if running (no later test uses it once the 2-node tests
    start: those run last)."""
    while _RUNNING_HEADS:
        _stop_cluster(_RUNNING_HEADS.pop())


@dataclass
class TwoNodeCluster(HeadCluster):
    """A head plus a second node (``ray start --address``), both on this machine.

    The second node carries the custom resource ``node2`` so tests can pin work to it or check
    where work ran; :meth:`kill_node2` takes it away as a node loss would, and
    :meth:`ensure_node2` brings a fresh one back (a new node id) for the next test.
    """

    node2_temp: Path | None = None

    def kill_node2(self) -> None:
        assert self.node2_temp is not None
        _stop_cluster(self.node2_temp)

    def node2_alive(self) -> bool:
        return self.node2_temp is not None and bool(_cluster_pids(self.node2_temp))

    def start_node2(self) -> None:
        """Join a new second node (fresh ports and temp dir) and wait until the head sees it."""
        from ray.util.state import list_nodes

        if self.node2_temp is not None:
            shutil.rmtree(self.node2_temp, ignore_errors=True)
        self.node2_temp = Path(tempfile.mkdtemp(prefix="duchr2-", dir="/tmp"))
        p = free_ports(6)
        _ray_start(
            [
                f"--address={self.gcs_address}",
                "--node-ip-address=127.0.0.1",
                f"--dashboard-agent-listen-port={p[0]}",
                f"--dashboard-agent-grpc-port={p[1]}",
                f"--metrics-export-port={p[2]}",
                f"--runtime-env-agent-port={p[3]}",
                f"--node-manager-port={p[4]}",
                f"--object-manager-port={p[5]}",
                f"--temp-dir={self.node2_temp}",
                "--num-cpus=2",
                '--resources={"node2": 1}',
                "--object-store-memory=200000000",
                "--disable-usage-stats",
            ],
            self.env,
        )
        deadline = time.monotonic() + 60
        while True:
            # filtering on the server fails once a dead node is listed: filter here
            nodes = list_nodes(
                address=self.dashboard_url, limit=1000, raise_on_missing_output=False
            )
            alive = [n for n in nodes if n.state == "ALIVE"]
            if len(alive) == 2:
                return
            assert time.monotonic() < deadline, f"{len(alive)} node(s) alive 60 s after the join"
            time.sleep(0.5)

    def ensure_node2(self) -> None:
        """A live second node: the one there, or a new one if a test removed it."""
        if not self.node2_alive():
            self.start_node2()


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="session")
def two_node_session(s3_server) -> Iterator[TwoNodeCluster]:  # noqa: ARG001 - S3 env first
    """One real 2-node Ray cluster for every multi-node test of the session (a start costs
    20-60 s on 2 cores). The tests that use it run last (``pytest_collection_modifyitems``),
    so it is idle for no other test. Use ``two_node_cluster``, which also restores node2."""
    _stop_heads()
    with running_two_node_cluster() as cluster:
        _RUNNING_TWO_NODE.append(cluster)
        yield cluster
        _RUNNING_TWO_NODE.clear()


@pytest.fixture
def two_node_cluster(two_node_session: TwoNodeCluster) -> TwoNodeCluster:
    """The session's 2-node cluster with both nodes alive (node2 restarted if a test took it
    away)."""
    two_node_session.ensure_node2()
    return two_node_session


def _uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests on separately started clusters run last, those on the head cluster before the
    2-node ones, each group in collection order: each shared cluster then lives only while
    its tests run (an idle Ray cluster still takes CPU time from the tests beside it).

    Under pytest-xdist the units of work come instead in :data:`_UNITS_FIRST` order (see
    :func:`pytest_xdist_make_scheduler`), and each worker records the cluster groups for the
    scheduler."""
    del config
    rank = {
        id(it): 2 if _uses(it, "two_node_session") else 1 if _uses(it, "head_cluster") else 0
        for it in items
    }
    names = {0: "", 1: "ray_head", 2: "ray_two_node"}
    groups_dir = os.environ.get(_GROUPS_ENV)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not (groups_dir and worker):
        items.sort(key=lambda it: rank[id(it)])  # stable: collection order within a group
        return

    def unit(it: pytest.Item) -> str:
        return names[rank[id(it)]] or it.nodeid.split("::")[0]

    first = {u: i for i, u in enumerate(_UNITS_FIRST)}
    items.sort(key=lambda it: first.get(unit(it), len(first)))  # stable
    groups = {it.nodeid: names[rank[id(it)]] for it in items if rank[id(it)]}
    tmp = Path(groups_dir) / f"{worker}.tmp"
    tmp.write_text(json.dumps(groups))
    tmp.rename(Path(groups_dir) / f"{worker}.json")


_GROUPS_ENV = "DUCH_TEST_GROUPS_DIR"
# the longest units of work (about 150-550 s each on 2 cores), handed out first so that no long
# one starts last; the rest follow in collection order. Only the run time depends on this list.
_UNITS_FIRST = (
    "ray_two_node",
    "tests/test_encode_faults.py",
    "tests/test_encode_job.py",
    "ray_head",
    "tests/test_train_job.py",
    "tests/test_demo_job.py",
    "tests/test_serve_app.py",
    "tests/test_serve_hardening.py",
    "tests/test_learning.py",
    "tests/test_encode_tiles.py",
    "tests/test_serve_map.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """On the pytest-xdist controller: a directory where the workers record which tests share
    a cluster (their environment is copied from this process when they start)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and config.getoption("numprocesses", None):
        os.environ[_GROUPS_ENV] = tempfile.mkdtemp(prefix="duch-test-groups-")
        config.option.loadscopereorder = False  # units in the order the workers sorted them


def pytest_unconfigure(config: pytest.Config) -> None:
    del config
    if os.environ.get("PYTEST_XDIST_WORKER") is None and _GROUPS_ENV in os.environ:
        shutil.rmtree(os.environ.pop(_GROUPS_ENV), ignore_errors=True)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: the tests on each shared cluster are one unit of work, run by one
    worker in order, so each cluster starts once; every other test module is one unit (its
    module fixtures are set up once, and its tests may build on each other, as in a serial
    run). Units are handed out in the order of :data:`_UNITS_FIRST`, the longest first.
    (pytest-xdist's own groups do not take under pytest 9: it renames the items through a
    field pytest no longer reads.)"""
    if config.getoption("dist", None) != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterGroups(LoadScopeScheduling):  # type: ignore[misc]
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # the workers wrote them before reporting their collection
                self.groups = {}
                for f in sorted(Path(os.environ[_GROUPS_ENV]).glob("*.json")):
                    self.groups.update(json.loads(f.read_text()))
            return self.groups.get(nodeid) or nodeid.split("::")[0]

    return ClusterGroups(config, log)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a shared cluster after its last test, rather than at the end of the session: under
    pytest-xdist the worker goes on with other tests, which an idle cluster would slow."""
    if _RUNNING_TWO_NODE and _uses(item, "two_node_session"):
        if nextitem is None or not _uses(nextitem, "two_node_session"):
            _stop_two_node(_RUNNING_TWO_NODE.pop())
    if _RUNNING_HEADS and _uses(item, "head_cluster"):
        if nextitem is None or not _uses(nextitem, "head_cluster"):
            _stop_heads()


@contextlib.contextmanager
def running_two_node_cluster() -> Iterator[TwoNodeCluster]:
    """A real 2-node Ray cluster on one machine: a head (2 CPUs) and a worker node (2 CPUs).

    Start the S3 server first (the cluster inherits its environment).

    Runs only inside the tests' private network namespace, where "every interface" is loopback:
    a second node cannot join while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the single-node
    loopback setting), so both nodes start without it. Jobs reach it through ``RAY_ADDRESS``.
    """
    ports = free_ports(11)
    temp = Path(tempfile.mkdtemp(prefix="duchr1-", dir="/tmp"))
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
    cluster = TwoNodeCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, temp)
    try:
        _ray_start(head, env)
        cluster.start_node2()
        yield cluster
    finally:
        _stop_two_node(cluster)


def _stop_two_node(cluster: TwoNodeCluster) -> None:
    """Stop both nodes and remove their temp dirs (again harmless)."""
    if cluster.node2_temp is not None:
        _stop_cluster(cluster.node2_temp)
        shutil.rmtree(cluster.node2_temp, ignore_errors=True)
    _stop_cluster(cluster.temp)
    shutil.rmtree(cluster.temp, ignore_errors=True)
