"""The query service under hostile input and scale-out: real Ray Serve on 127.0.0.1.

One application for the module (split layout: a QueryEncoder, one shard searcher deployment
with two replicas, the ingress behind Serve's proxy), with an API and an admin token and an
archive whose item ids use characters that paths treat specially. It is fuzzed with
schemathesis against its own OpenAPI document, sent hand-made hostile requests, a 40 MP
16-bit query image while its replica's memory is watched, read through Ray's Prometheus
endpoint, and has a searcher replica killed while a new index version is swapped in under load.
Two small extra applications show that auth fails closed and that a 503 says when to retry.
Tests that change the served index version run last.
"""

import io
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import requests
from test_serve_app import Reference, encode_index, free_port, hits_of, make_bundle

pytestmark = pytest.mark.timeout(600)

API_ENV, API_TOKEN = "DUCH_HARD_API_TOKEN", "hard-api-7f31"
ADMIN_ENV, ADMIN_TOKEN = "DUCH_HARD_ADMIN_TOKEN", "hard-admin-0c52"
API = {"Authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BITS = 32
K_CAP = 20
#: ids a path can get wrong: slashes, one ending in the former thumbnail suffix, URL syntax.
ODD_IDS = ["tiles/0001", "tiles/0001/thumbnail", "scene 7?#%&+=", "ünï/çödé", "x//y"]
#: Bound on the ingress replica's peak RSS growth while it decodes a 40 MP 16-bit PNG.
MEMORY_BOUND = 1 << 30


@dataclass
class Hard:
    url: str
    index_root: str
    archive: str
    bundle: str
    manifest: Any
    ref: Reference
    metrics_port: int
    app: str = "hard"


def odd_archive(base: Path) -> str:
    """The demo archive (4 scenes per class) with some item ids replaced by :data:`ODD_IDS`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from duch_core.archive import read_archive
    from duch_core.synthetic_archive import make_demo_archive

    demo = make_demo_archive(str(base / "demo"), n_per_class=4, image_size=64, seed=11)
    t = read_archive(demo)
    ids = t.column("item_id").to_pylist()
    ids[: len(ODD_IDS)] = ODD_IDS
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(ids))
    out = base / "odd" / "manifest.parquet"
    out.parent.mkdir(parents=True)
    pq.write_table(t, out)
    return str(out)


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the service never became healthy"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def hard(ray_session, tmp_path_factory) -> Any:
    from ray import serve

    from deploy.app import CONTROLLER_OPTIONS, AppArgs, compose

    work = tmp_path_factory.mktemp("hard")
    archive = odd_archive(work)
    bundle = make_bundle(str(work / "bundle"), BITS, seed=4)
    root = str(work / "index")
    manifest = encode_index(archive, bundle, root, n_shards=2)
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, controller_options=CONTROLLER_OPTIONS
    )
    args = AppArgs(
        index_root=root,
        bundle_uri=bundle,
        n_searchers=1,
        k_cap=K_CAP,
        max_text_chars=200,
        max_image_bytes=4 * 1024 * 1024,
        max_image_pixels=50_000_000,  # a 40 MP query is decoded (reduced), not refused
        max_buffered_bytes=64 * 1024 * 1024,
        poll_interval_s=0.5,
        auth_token_env=API_ENV,
        admin_token_env=ADMIN_ENV,
        thumbnail_size=48,
    )
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    try:
        serve.run(
            compose(
                args,
                ingress_options=small,
                encoder_options=small,
                searcher_options={**small, "num_replicas": 2},
                ingress_env={API_ENV: API_TOKEN, ADMIN_ENV: ADMIN_TOKEN},
            ),
            name="hard",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        metrics_port = ray_session._private.worker.global_worker.node.metrics_export_port
        yield Hard(url, root, archive, bundle, manifest, Reference(bundle), metrics_port)
    finally:
        serve.shutdown()


# ---- fail closed --------------------------------------------------------------------------------


def test_without_a_token_the_app_is_not_built_and_a_replica_refuses_to_start(hard: Hard) -> None:
    """The builder refuses; an ingress replica that finds no token in its environment raises in
    its constructor, so the deployment fails instead of serving open."""
    from ray import serve

    from deploy.app import AppArgs, build_app, compose
    from deploy.auth import AuthConfigError

    args = AppArgs(
        index_root=hard.index_root,
        bundle_uri=hard.bundle,
        n_searchers=0,
        encode_in_ingress=True,
        auth_token_env="DUCH_HARD_UNSET_TOKEN",
        poll_interval_s=0,
    )
    assert "DUCH_HARD_UNSET_TOKEN" not in os.environ
    with pytest.raises(AuthConfigError, match="allow_anonymous"):
        build_app(args)
    app = compose(args, ingress_options={"max_constructor_retry_count": 1})
    with pytest.raises(RuntimeError):
        serve.run(app, name="open", route_prefix="/open")
    r = requests.post(f"{hard.url}/open/v1/search", json={"text": "river"}, timeout=30)
    assert r.status_code != 200
    serve.delete("open")


def test_a_503_carries_retry_after_and_health_tells_no_internals(hard: Hard, tmp_path) -> None:
    """An anonymous service with nothing published yet: 503 + Retry-After on search and on
    /healthz, whose body names no storage location."""
    from ray import serve

    from deploy.app import AppArgs, compose

    args = AppArgs(
        index_root=str(tmp_path / "secret-bucket-name" / "index"),
        bundle_uri=hard.bundle,
        n_searchers=0,
        encode_in_ingress=True,
        auth_token_env=None,
        allow_anonymous=True,
        poll_interval_s=0,
    )
    serve.run(
        compose(args, ingress_options={"ray_actor_options": {"num_cpus": 0.25}}),
        name="empty",
        route_prefix="/empty",
    )
    try:
        health = requests.get(f"{hard.url}/empty/healthz", timeout=30)
        assert health.status_code == 503 and health.headers["Retry-After"] == "1"
        assert health.json() == {"status": "unavailable", "index_version": None}
        r = requests.post(f"{hard.url}/empty/v1/search", json={"text": "river"}, timeout=60)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "secret-bucket-name" not in r.text
        status = requests.get(f"{hard.url}/empty/v1/status", timeout=30).json()
        assert status["auth"] == "anonymous" and "secret-bucket-name" in status["last_error"]
    finally:
        serve.delete("empty")


# ---- hostile input ------------------------------------------------------------------------------


def _search(hard: Hard, data: bytes, ctype: str = "application/json") -> requests.Response:
    return requests.post(
        f"{hard.url}/v1/search", data=data, headers={**API, "Content-Type": ctype}, timeout=60
    )


def test_hand_made_hostile_requests_get_4xx(hard: Hard) -> None:
    cases = [
        (b"[" * 100_000 + b"]" * 100_000, 400),
        (b'{"text": "river", "k": ' + b"7" * 5000 + b"}", 400),
        (b'{"text": "river", "k": NaN}', 400),
        (b'{"text": "\xc3\x28 river"}', 400),  # invalid UTF-8
        (b'{"text": "\\udc80 river"}', 400),  # lone surrogate
        (b'{"text": 5}', 422),
        (b'{"text": "river", "k": "3"}', 422),
        (b'{"text": "..."}', 422),
        (b'{"text": "river", "image_base64": null}', 422),
    ]
    for body, status in cases:
        r = _search(hard, body)
        assert r.status_code == status, (body[:40], r.status_code, r.text)
        assert r.json()["detail"]
    for digits, status in ((1500, 422), (5000, 400)):  # 5000 digits: over a field's size cap
        form = requests.post(
            f"{hard.url}/v1/search",
            files={"text": (None, "river"), "k": (None, "9" * digits)},
            headers=API,
            timeout=60,
        )
        assert form.status_code == status, form.text
    # an image upload with an empty text field: the image is the query
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 40), (90, 140, 60)).save(png, format="PNG")
    r = requests.post(
        f"{hard.url}/v1/search",
        files={"image": ("q.png", png.getvalue(), "image/png"), "text": (None, "")},
        headers=API,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["query_modality"] == "image", r.text
    assert _search(hard, b'{"text": "a river", "k": 3}').status_code == 200

    def chunks():  # a body without Content-Length, past the cap: refused while it streams in
        for _ in range(80):
            yield b" " * (128 * 1024)

    r = requests.post(
        f"{hard.url}/v1/search",
        data=chunks(),
        headers={**API, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and "larger than" in r.json()["detail"], r.text


def test_item_ids_with_any_characters_round_trip(hard: Hard) -> None:
    from PIL import Image

    for item_id in ODD_IDS:
        r = requests.get(f"{hard.url}/v1/items/{quote(item_id, safe='')}", headers=API, timeout=30)
        assert r.status_code == 200, (item_id, r.text)
        body = r.json()
        assert body["item_id"] == item_id  # "tiles/0001/thumbnail" is an item, not a thumbnail
        thumb = requests.get(f"{hard.url}{body['thumbnail_url']}", headers=API, timeout=30)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 48
    hit_ids = {
        h["item_id"]
        for t in ("images", "captions")
        for h in requests.post(
            f"{hard.url}/v1/search",
            json={"text": "a river", "k": K_CAP, "target": t},
            headers=API,
            timeout=60,
        ).json()["hits"]
    }
    assert hit_ids  # hits carry ids as stored, whatever their characters


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    hard: Hard, tmp_path: Path
) -> None:
    """Every check schemathesis has, against the running app's /openapi.json, fixed seed,
    bounded examples. Two allowances for what a schema cannot say: an image's decodability (a
    schema-valid base64 string or upload of random bytes may be refused with 415), and a
    search filter's semantics (a box whose south edge is above its north edge, a date that is
    not on the calendar: 422 naming the field). The parser's agreement with the body schemas
    on everything else is checked without Ray in ``test_serve_parts``."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", "401", "403", "404", "409", "415", "422"]\n'
    )
    st = str(Path(sys.executable).parent / "st")
    cmd = [
        st,
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{hard.url}/openapi.json",
        "--checks",
        "all",
        "--seed",
        "20260513",
        "--max-examples",
        "60",
        "--workers",
        "2",
        "--phases",
        "examples,coverage,fuzzing",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
    ]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=480, cwd=tmp_path)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert "No issues found" in out.stdout or "passed" in out.stdout, report
    print(f"schemathesis: {time.monotonic() - t0:.0f} s\n{out.stdout[-1500:]}")


# ---- bounded memory -----------------------------------------------------------------------------


def _status(hard: Hard) -> dict[str, Any]:
    r = requests.get(f"{hard.url}/v1/status", headers=API, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_40_megapixel_16_bit_query_stays_within_the_memory_bound(hard: Hard) -> None:
    """A 7300 x 5480 16-bit RGB PNG (240 MB of samples, about 250 KB of file): the ingress
    replica decodes it reduced toward the model's input, and its peak RSS grows by less than
    :data:`MEMORY_BOUND` (the float64 path it replaced held more than 3 GB)."""
    import imagecodecs

    img = np.full((5480, 7300, 3), 2100, np.uint16)
    img[:, 3650:, 0] = 3900
    img[2000:2100] = 800
    data = imagecodecs.png_encode(img)
    del img
    assert len(data) < 2_000_000
    status = _status(hard)
    pid = status["pid"]
    try:  # restart the replica's high-water mark, so start-up peaks do not hide this one
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass
    before = _status(hard)["memory"]
    baseline = max(before["rss_bytes"], before["peak_rss_bytes"])
    r = requests.post(
        f"{hard.url}/v1/search",
        files={"image": ("big.png", data, "image/png")},
        data={"k": "3"},
        headers=API,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["timings_ms"]["decode"] > 0
    peak = _status(hard)["memory"]["peak_rss_bytes"]
    grew = peak - baseline
    print(f"ingress replica peak RSS grew by {grew / 2**20:.0f} MiB decoding 40 MP 16-bit")
    assert grew < MEMORY_BOUND, grew


# ---- what operators see -------------------------------------------------------------------------


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as f:
        return f.read().decode()


def test_stage_latencies_refusals_reload_failures_and_age_reach_prometheus(hard: Hard) -> None:
    from duch_core import index_store, pointers

    bad = encode_index(hard.archive, hard.bundle, hard.index_root, bundle_id="other-bundle")
    try:
        r = requests.post(f"{hard.url}/v1/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 409, r.text
    finally:
        pointers.publish_pointer(
            index_store.latest_uri(hard.index_root), str(hard.manifest.version)
        )
    assert str(bad.version) in _status(hard)["refused_versions"]
    want = [
        *(f'stage="{s}"' for s in ("decode", "encode", "search", "catalog")),
        'reason="auth"',
        'reason="bad_request"',
        'reason="invalid"',
    ]
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    requests.post(f"{hard.url}/v1/search", json={"text": "river"}, timeout=30)  # a 401
    while True:
        text = _metrics(hard.metrics_port)
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_duch_")]
        have = {
            "latency": [ln for ln in lines if ln.startswith("ray_duch_stage_latency_ms_bucket")],
            "refused": [ln for ln in lines if ln.startswith("ray_duch_refused_requests_total")],
            "reload": [ln for ln in lines if ln.startswith("ray_duch_reload_failures_total")],
            "age": [ln for ln in lines if ln.startswith("ray_duch_index_version_age_s")],
        }
        joined = "\n".join(lines)
        if all(have.values()) and all(w in joined for w in want):
            break
        assert time.monotonic() < deadline, (have, want)
        time.sleep(2)
    assert float(have["reload"][0].rsplit(" ", 1)[1]) >= 1
    assert 0 <= float(have["age"][0].rsplit(" ", 1)[1]) < 3600


# ---- a replica killed during an index swap under load (changes the served version: last) --------


def test_a_searcher_replica_killed_during_a_swap_under_load_fails_no_request(hard: Hard) -> None:
    """200 searches from four clients while a new index version is published and one of the two
    searcher replicas is killed: every answer is a 200 equal to the reference search of the
    version it names, both versions answer, and the replica is replaced."""
    import ray
    from ray import serve

    from duch_core import storage
    from duch_core.synthetic_archive import make_demo_archive

    archive2 = make_demo_archive(
        storage.join(str(Path(hard.index_root).parent), "archive2"),
        n_per_class=5,
        image_size=64,
        seed=12,
    )
    queries = [("a river crossing farmland", "images"), ("cars in a parking lot", "captions")]
    answers: list[tuple[str, int, dict[str, Any]]] = []
    failures: list[str] = []
    sent = 0
    lock = threading.Lock()
    swap = threading.Event()

    def client(n: int) -> None:
        nonlocal sent
        s = requests.Session()
        s.headers.update(API)
        for i in range(50):  # 4 x 50 = 200 requests
            qi = (n + i) % len(queries)
            text, target = queries[qi]
            try:
                r = s.post(
                    f"{hard.url}/v1/search",
                    json={"text": text, "target": target, "k": 5},
                    timeout=60,
                )
            except requests.RequestException as e:
                failures.append(repr(e))
                continue
            with lock:
                sent += 1
                if sent == 40:
                    swap.set()
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text[:300]}")
            else:
                answers.append((r.json()["index_version"], qi, r.json()))
            if i % 5 == 0:
                time.sleep(0.05)  # keep the load up for the whole swap

    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and "ShardSearcher0" in a["name"] and "hard" in a["name"]
    ]
    assert len(replicas) == 2, replicas
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, n) for n in range(4)]
        assert swap.wait(120)
        v2 = encode_index(archive2, hard.bundle, hard.index_root, n_shards=2)
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        for f in futures:
            f.result(timeout=300)
    assert not failures, failures[:5]
    assert len(answers) == 200
    manifests = {str(hard.manifest.version): hard.manifest, str(v2.version): v2}
    versions = {v for v, _, _ in answers}
    assert versions == set(manifests), versions
    for v, qi, body in answers:
        assert hits_of(body) == hard.ref.text(manifests[v], *queries[qi], 5), v
    deadline = time.monotonic() + 180  # the controller replaces the killed replica
    while True:
        dep = serve.status().applications["hard"].deployments["ShardSearcher0"]
        if dep.replica_states.get("RUNNING", 0) == 2:
            break
        assert time.monotonic() < deadline, dep
        time.sleep(1)
    wait_healthy(hard.url)
    r = requests.post(
        f"{hard.url}/v1/search", json={"text": "river", "k": 3}, headers=API, timeout=60
    )
    assert r.status_code == 200
