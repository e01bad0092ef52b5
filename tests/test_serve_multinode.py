"""The split layout of the query service on a real 2-node Ray cluster, and the loss of a node.

The searchers are placed on the second node and the encoder and ingress on the head with
Serve's own per-deployment ``ray_actor_options`` (what a serve config's ``deployments:`` entries
set): the searchers by a node label (``label_selector`` on Ray's built-in ``ray.io/node-id``,
as the fixture's nodes carry no labels of their own) with a fallback to any node
(``fallback_strategy``), so a replica lost with its node is started again elsewhere. The answers
must equal the in-process reference exactly, before and after the node dies; while it is gone
every answer is that same answer or a 503 with ``Retry-After``.

One cluster and one application serve the module (a cluster start costs 30-60 s on 2 cores);
the driver is this process, attached with ``ray.init(address=...)``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import conftest
import pytest
import requests
from test_serve_app import (
    Reference,
    encode_index,
    free_port,
    hits_of,
    make_bundle,
    png_bytes,
)

pytestmark = pytest.mark.timeout(600)

TOKEN = "multinode-test-token-4c1e"
TOKEN_ENV = "DUCH_TEST_API_TOKEN"
BITS = 32
K = 10
#: the ingress's deadline for a shard search, retries included (then 503)
SEARCH_TIMEOUT_S = 2.0
#: the bounded client loop around the node loss
LOOP_MAX_REQUESTS = 300
LOOP_MAX_S = 90.0
#: consecutive exact answers after the node loss that end the loop
RECOVERED_AFTER = 10
TEXTS = ("a river crossing farmland", "many cars parked in rows", "dense forest", "an airport")
IMAGE_ITEMS = ("river_0001", "forest_0002")


# ---- unit: the ingress's call retries answer 503, never 500 (no Ray needed) -------------------


def test_a_replica_still_gone_after_every_retry_is_a_503_with_retry_after() -> None:
    from ray.exceptions import ActorDiedError

    from deploy import retry
    from deploy.queries import RequestError

    calls: list[int] = []

    async def gone() -> None:
        calls.append(1)
        raise ActorDiedError()

    async def scenario() -> RequestError:
        retry.BACKOFF_S, saved = (0.0, 0.0), retry.BACKOFF_S
        try:
            with pytest.raises(RequestError) as e:
                await retry.retry_unavailable(gone)
        finally:
            retry.BACKOFF_S = saved
        return e.value

    err = asyncio.run(scenario())
    assert len(calls) == 3
    assert err.status == 503 and err.headers["Retry-After"]


def test_a_call_no_replica_answers_in_time_is_a_503() -> None:
    from deploy import retry
    from deploy.queries import RequestError

    async def queued() -> None:  # Serve holds a call while a deployment has no replica
        await asyncio.sleep(30)

    async def scenario() -> float:
        t0 = time.monotonic()
        with pytest.raises(RequestError) as e:
            await retry.retry_unavailable(queued, timeout_s=0.2)
        assert e.value.status == 503 and e.value.headers["Retry-After"]
        return time.monotonic() - t0

    assert asyncio.run(scenario()) < 5


def test_search_timeout_is_validated_and_reaches_the_ingress() -> None:
    from pydantic import ValidationError

    from deploy.app import AppArgs

    assert AppArgs(index_root="s3://b/i").ingress_settings().search_timeout_s == 10.0
    assert AppArgs(index_root="s3://b/i", search_timeout_s=2).ingress_settings().search_timeout_s
    for bad in (0, -1, "soon"):
        with pytest.raises(ValidationError):
            AppArgs(index_root="s3://b/i", search_timeout_s=bad)


# ---- the cluster, the artifacts and the service -----------------------------------------------


@pytest.fixture(scope="module")
def cluster(two_node_session) -> Any:
    """conftest's session-wide 2-node cluster, both nodes alive."""
    two_node_session.ensure_node2()
    return two_node_session


@pytest.fixture(scope="module")
def driver(cluster) -> Iterator[dict[str, str]]:
    """This process as a driver of ``cluster``; yields the node ids (``head``, ``node2``).

    The session's local runtime (``ray_session``), if another module started it, is left and
    started again afterwards with conftest's settings, so later modules find it.
    """
    import ray

    was_local = ray.is_initialized()
    if was_local:
        ray.shutdown()
    # the single-node loopback setting would refuse a cluster with a second node
    single = os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    try:
        ray.init(
            address=cluster.gcs_address,
            log_to_driver=False,
            configure_logging=False,
            namespace="serve-multinode",
        )
        nodes = {}
        for n in ray.nodes():
            if n["Alive"]:
                for name in ("head", "node2"):
                    if name in n["Resources"]:
                        nodes[name] = n["NodeID"]
        assert set(nodes) == {"head", "node2"}, ray.nodes()
        yield nodes
    finally:
        ray.shutdown()
        if single is not None:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = single
        if was_local:  # as conftest's ray_session
            conftest.init_local_ray()


@dataclass
class Service:
    url: str
    session: requests.Session
    ref: Reference
    manifest: Any
    dashboard: str
    nodes: dict[str, str]
    expected: list[tuple[dict[str, Any], list[tuple]]] = field(default_factory=list)

    def search(self, body: dict[str, Any], timeout: float = 60) -> requests.Response:
        return self.session.post(f"{self.url}/v1/search", json=body, timeout=timeout)

    def placement(self) -> dict[str, list[str]]:
        """Node ids of the alive replicas by deployment name."""
        from ray.util.state import list_actors

        where: dict[str, list[str]] = {}
        for a in list_actors(
            address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000, detail=True
        ):
            if a.class_name.startswith("ServeReplica:duch:"):
                where.setdefault(a.class_name.rsplit(":", 1)[1], []).append(a.node_id)
        return where


@pytest.fixture(scope="module")
def service(cluster, driver, s3_server) -> Iterator[Service]:
    import base64

    from ray import serve

    from deploy.app import CONTROLLER_OPTIONS, AppArgs, compose
    from duch_core import storage
    from duch_core.synthetic_archive import make_demo_archive

    base = f"s3://{s3_server.bucket}/serve-multinode-{uuid.uuid4().hex}"
    archive = make_demo_archive(storage.join(base, "archive"), n_per_class=4, image_size=64, seed=5)
    bundle = make_bundle(storage.join(base, "bundle"), BITS, seed=1)
    root = storage.join(base, "index")
    manifest = encode_index(archive, bundle, root, n_shards=4)

    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        proxy_location="HeadOnly",
        controller_options=CONTROLLER_OPTIONS,
    )
    args = AppArgs(
        index_root=root,
        bundle_uri=bundle,
        n_searchers=2,
        poll_interval_s=1.0,
        auth_token_env=TOKEN_ENV,
        admin_token_env=None,
        handle_transport="grpc",  # as the serve configs deploy it
        search_timeout_s=SEARCH_TIMEOUT_S,
    )
    # what an operator writes in the serve config's deployments: entries
    on_head = {"ray_actor_options": {"num_cpus": 0.25, "resources": {"head": 0.01}}}
    searchers = {
        # Serve notices a replica lost with its node at its next health check (default 10 s)
        "health_check_period_s": 2.0,
        "ray_actor_options": {
            "num_cpus": 0.25,
            "label_selector": {"ray.io/node-id": driver["node2"]},
            "fallback_strategy": [{"label_selector": {}}],  # any node when that one is gone
        },
    }
    try:
        serve.run(
            compose(
                args,
                ingress_options=on_head,
                encoder_options=on_head,
                searcher_options=searchers,
                ingress_env={TOKEN_ENV: TOKEN},
            ),
            name="duch",
            route_prefix="/",
        )
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        svc = Service(
            f"http://127.0.0.1:{port}",
            session,
            Reference(bundle),
            manifest,
            cluster.dashboard_url,
            driver,
        )
        for text in TEXTS:
            for target in ("images", "captions"):
                body = {"text": text, "k": K, "target": target}
                svc.expected.append((body, svc.ref.text(manifest, text, target, K)))
        for i, item in enumerate(IMAGE_ITEMS):
            data = archive_image_bytes(archive, item)
            body = {"image_base64": base64.b64encode(data).decode(), "k": K, "target": "captions"}
            svc.expected.append((body, svc.ref.image(manifest, data, "captions", K)))
            noise = png_bytes(48, 40, seed=i)
            body = {"image_base64": base64.b64encode(noise).decode(), "k": K, "target": "images"}
            svc.expected.append((body, svc.ref.image(manifest, noise, "images", K)))
        yield svc
    finally:
        serve.shutdown()


def archive_image_bytes(archive_uri: str, item_id: str) -> bytes:
    from duch_core import storage
    from duch_core.archive import read_archive

    t = read_archive(archive_uri)
    row = t.column("item_id").to_pylist().index(item_id)
    return storage.read_bytes(t.column("image_uri")[row].as_py())


# ---- on two nodes -----------------------------------------------------------------------------


def test_searchers_on_node2_and_encoder_on_head_answer_exactly(service: Service) -> None:
    where = service.placement()
    head, node2 = service.nodes["head"], service.nodes["node2"]
    print(f"\nplacement (head={head[:8]}, node2={node2[:8]}):", _short(where))
    assert where["ShardSearcher0"] == [node2] and where["ShardSearcher1"] == [node2]
    assert where["QueryEncoder"] == [head] and where["Ingress"] == [head]
    for body, expected in service.expected:
        r = service.search(body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["index_version"] == str(service.manifest.version)
        assert hits_of(got) == expected, body.get("text", "image")
        assert len(expected) == K and len({h[0] for h in expected}) > 1


@dataclass
class Outcome:
    t: float  # seconds since the loop started, when the answer came
    status: int
    retry_after: str | None
    exact: bool


def test_losing_the_searchers_node_answers_503_or_exact_then_exact_again(
    service: Service, cluster: Any
) -> None:
    outcomes: list[Outcome] = []
    killed_at: list[float] = []
    stop = threading.Event()

    def client() -> None:
        t0 = time.monotonic()
        i = 0
        while not stop.is_set() and i < LOOP_MAX_REQUESTS and time.monotonic() - t0 < LOOP_MAX_S:
            body, expected = service.expected[i % len(service.expected)]
            i += 1
            try:
                r = service.search(body, timeout=30)
            except requests.RequestException as e:  # recorded as status 0: a failure
                outcomes.append(Outcome(time.monotonic() - t0, 0, repr(e), False))
                continue
            exact = r.status_code == 200 and hits_of(r.json()) == expected
            outcomes.append(
                Outcome(time.monotonic() - t0, r.status_code, r.headers.get("Retry-After"), exact)
            )
            if r.status_code != 200:
                time.sleep(0.1)  # a client honouring Retry-After would wait longer

    thread = threading.Thread(target=client, daemon=True)
    start = time.monotonic()
    thread.start()
    while len(outcomes) < 5 and thread.is_alive():
        time.sleep(0.05)
    killed_at.append(time.monotonic() - start)
    cluster.kill_node2()
    killed_done = time.monotonic() - start
    while thread.is_alive():  # ends at the loop's bounds, or once answers are exact again
        after = [o for o in outcomes if o.t > killed_done]
        tail = after[-RECOVERED_AFTER:]
        if (
            len(tail) == RECOVERED_AFTER
            and any(o.status != 200 for o in after)
            and all(o.exact for o in tail)
        ):
            break
        time.sleep(0.1)
    stop.set()
    thread.join(timeout=60)

    counts: dict[int, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    bad = [o for o in outcomes if o.status not in (200, 503)]
    wrong = [o for o in outcomes if o.status == 200 and not o.exact]
    no_retry_after = [o for o in outcomes if o.status == 503 and not o.retry_after]
    refused = [o.t for o in outcomes if o.status == 503]
    gap = (refused[-1] - refused[0]) if refused else 0.0
    back = next((o.t for o in outcomes if o.t > (refused[-1] if refused else 0) and o.exact), None)
    print(
        f"\nnode loss: {len(outcomes)} requests, by status {dict(sorted(counts.items()))}; "
        f"node2 killed at {killed_at[0]:.1f} s (gone at {killed_done:.1f} s); "
        f"503s from {refused[0] if refused else 0:.1f} s to {refused[-1] if refused else 0:.1f} s "
        f"(gap {gap:.1f} s); exact again at {back} s; wrong answers {len(wrong)}, "
        f"other statuses {len(bad)}"
    )
    assert not bad, bad[:5]
    assert not wrong, wrong[:5]
    assert not no_retry_after, no_retry_after[:5]
    assert refused, "the loss of both searchers' node was never seen by a request"
    assert back is not None, "answers never came back after the node loss"

    # the searchers run on the head now, and every query is answered exactly again
    where = service.placement()
    print("placement after the loss:", _short(where))
    head = service.nodes["head"]
    assert where["ShardSearcher0"] == [head] and where["ShardSearcher1"] == [head]
    for body, expected in service.expected:
        r = service.search(body)
        assert r.status_code == 200, r.text
        assert hits_of(r.json()) == expected


def _short(where: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: [n[:8] for n in v] for k, v in sorted(where.items())}
