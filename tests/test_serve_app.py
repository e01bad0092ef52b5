"""The query service end to end: real Ray Serve, real HTTP on 127.0.0.1, real artifacts.

Every test runs against both layouts of the application, each started once (``serve.run`` plus
the encoder's torch import cost several seconds) over its own generated demo archive, bundle with
tiny backbones and index:

* ``split``: a QueryEncoder deployment and two shard searcher deployments, queried through
  Serve's proxy;
* ``colocated``: the ingress encodes and searches the whole index itself, queried on the
  ingress replica's own port (Serve's direct ingress, switched on for the test session in
  ``conftest.py``).

Both have bearer-token auth (an API token, and an admin token for reloads). Tests that change
the served index version run last.
"""

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.timeout(420)

TOKEN = "serve-test-token-1b7d"
TOKEN_ENV = "DUCH_TEST_API_TOKEN"
ADMIN_TOKEN = "serve-test-admin-93ce"
ADMIN_ENV = "DUCH_TEST_ADMIN_TOKEN"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BITS = 32
K_CAP = 50
MAX_TEXT = 200
MAX_PIXELS = 1_000_000
MAX_IMAGE_BYTES = 2 * 1024 * 1024
THUMB = 96
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- artifacts --------------------------------------------------------------------------------


def make_bundle(out_uri: str, bits: int, seed: int) -> str:
    """A bundle with tiny backbones and seeded, untrained hashing heads; returns its URI."""
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=bits, hidden_dim=64),
        image_backbone=ImageBackboneConfig(
            source="tiny:resnet", image_size=32, center_crop=0, seed=seed
        ),
        text_backbone=TextBackboneConfig(source="tiny:bert", max_length=16, seed=seed),
    )
    save_untrained_bundle(out_uri, cfg, seed)
    return out_uri


def encode_index(
    archive_uri: str,
    bundle_uri: str,
    root: str,
    n_shards: int = 3,
    bundle_id: str | None = None,
    publish: bool = True,
) -> Any:
    """Encode every image and caption of an archive with the bundle's encoder and publish the
    codes as a new index version under ``root`` (``n_shards`` shards); returns its manifest.

    ``bundle_id`` overrides the id written to the manifest (to make an index the service must
    refuse); ``publish=False`` writes the version without pointing ``LATEST`` at it.
    """
    from duch_core import index_store, storage
    from duch_core.archive import read_archive
    from duch_core.bundle import Bundle
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import decode_image

    bundle = Bundle.load(bundle_uri)
    enc = HashEncoder(bundle)
    bits, bid = int(bundle.bits), bundle_id or str(bundle.bundle_id)
    t = read_archive(archive_uri)
    items = t.column("item_id").to_pylist()
    uris = t.column("image_uri").to_pylist()
    captions = t.column("captions").to_pylist()
    img_codes = enc.encode_images([decode_image(storage.read_bytes(u)) for u in uris])
    version = index_store.new_version_id()
    vdir = index_store.version_uri(root, version)
    shards = []
    for part in np.array_split(np.arange(len(items)), n_shards):
        ids, mods, caps, codes = [], [], [], []
        for i in part.tolist():
            ids.append(items[i]), mods.append("image"), caps.append(-1), codes.append(img_codes[i])
            txt = enc.encode_texts(captions[i])
            for j in range(len(captions[i])):
                ids.append(items[i]), mods.append("text"), caps.append(j), codes.append(txt[j])
        table = index_store.shard_table(
            ids,
            mods,
            caps,
            np.stack(codes),
            [f"{x}:{c}" for x, c in zip(ids, caps, strict=True)],
            bid,
            bits,
        )
        shards.append(index_store.write_shard(vdir, table))
    return index_store.finish_version(
        root,
        version,
        shards,
        bid,
        bits,
        publish_latest=publish,
        archive=archive_uri,
        bundle_uri=bundle_uri,
    )


@dataclass
class Artifacts:
    archive_uri: str
    bundle_uri: str
    index_root: str
    manifest: Any
    base: str  # where the artifacts live: an s3:// prefix, or a local directory
    layout: str  # "split" or "colocated": how the service under test is deployed


@pytest.fixture(scope="module", params=["split", "colocated"])
def artifacts(request, ray_session, s3_server, tmp_path_factory) -> Artifacts:  # noqa: ARG001
    """Archive, bundle and index on the test S3 server (the service reads them from there); one
    set per layout, because the tests publish new index versions."""
    from duch_core import storage
    from duch_core.synthetic_archive import make_demo_archive

    work = tmp_path_factory.mktemp("serve")
    base = f"s3://{s3_server.bucket}/serve-{uuid.uuid4().hex}" if s3_server else str(work)
    archive = make_demo_archive(storage.join(base, "archive"), n_per_class=4, image_size=64, seed=3)
    bundle = make_bundle(storage.join(base, "bundle"), BITS, seed=0)
    root = storage.join(base, "index")
    manifest = encode_index(archive, bundle, root)
    return Artifacts(archive, bundle, root, manifest, base, request.param)


# ---- the in-process reference -----------------------------------------------------------------


class Reference:
    """The same queries answered in this process with duch_core only (no Ray, no HTTP)."""

    def __init__(self, bundle_uri: str) -> None:
        from duch_core.bundle import Bundle
        from duch_core.hash_encoder import HashEncoder

        self.encoder = HashEncoder(Bundle.load(bundle_uri))
        self._indexes: dict[tuple[str, str], Any] = {}

    def index(self, manifest: Any, modality: str) -> tuple[Any, list[str], np.ndarray]:
        from duch_core import index_store
        from duch_core.search import HammingIndex

        key = (str(manifest.version), modality)
        if key not in self._indexes:
            codes, item_ids, cap, rows = index_store.load_codes(manifest, modality)
            idx = HammingIndex.from_arrays(codes, np.asarray(rows, np.int64), manifest.bits)
            by_row = dict(zip(np.asarray(rows).tolist(), item_ids.to_pylist(), strict=True))
            cap_by_row = dict(zip(np.asarray(rows).tolist(), np.asarray(cap).tolist(), strict=True))
            self._indexes[key] = (idx, by_row, cap_by_row)
        return self._indexes[key]

    def search(self, manifest: Any, code: np.ndarray, target: str, k: int) -> list[tuple]:
        """``[(item_id, distance, caption_index | None), ...]`` in rank order."""
        modality = "image" if target == "images" else "text"
        idx, by_row, cap_by_row = self.index(manifest, modality)
        dist, ids = idx.search(code.reshape(1, -1), k)
        out = []
        for d, r in zip(dist[0].tolist(), ids[0].tolist(), strict=True):
            out.append((by_row[r], int(d), cap_by_row[r] if modality == "text" else None))
        return out

    def text(self, manifest: Any, text: str, target: str, k: int) -> list[tuple]:
        return self.search(manifest, self.encoder.encode_texts([text]), target, k)

    def image(self, manifest: Any, data: bytes, target: str, k: int) -> list[tuple]:
        from duch_core.imageio import decode_image

        code = self.encoder.encode_images([decode_image(data)])
        return self.search(manifest, code, target, k)


def hits_of(body: dict[str, Any]) -> list[tuple]:
    return [(h["item_id"], h["distance"], h["caption_index"]) for h in body["hits"]]


# ---- the service ------------------------------------------------------------------------------


@dataclass
class Service:
    url: str  # where the tests send requests
    session: requests.Session
    art: Artifacts
    ref: Reference
    proxy_url: str  # Serve's proxy (the same as url for the split layout)

    def search(self, timeout: float = 60, **body: Any) -> requests.Response:
        return self.session.post(f"{self.url}/v1/search", json=body, timeout=timeout)

    def manifests(self) -> dict[str, Any]:
        from duch_core import index_store

        m = index_store.read_latest(self.art.index_root)
        return {str(m.version): m}


@pytest.fixture(scope="module")
def service(artifacts: Artifacts) -> Any:
    from ray import serve

    from deploy.app import CONTROLLER_OPTIONS, AppArgs, compose
    from deploy.endpoints import ingress_urls

    colocated = artifacts.layout == "colocated"
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, controller_options=CONTROLLER_OPTIONS
    )
    args = AppArgs(
        index_root=artifacts.index_root,
        bundle_uri=artifacts.bundle_uri,
        n_searchers=0 if colocated else 2,
        encode_in_ingress=colocated,
        mih=colocated,  # the colocated service searches with multi-index hashing on
        k_cap=K_CAP,
        max_text_chars=MAX_TEXT,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_PIXELS,
        poll_interval_s=1.0,
        # a searcher's answer is waited for up to 45 s (10 s in the shipped configs, to detect a
        # lost node quickly): on a 2-core machine running another test worker beside this one,
        # a searcher replica has been starved past 10 s; node loss has its own test
        search_timeout_s=45,
        auth_token_env=TOKEN_ENV,
        admin_token_env=ADMIN_ENV,
        thumbnail_size=THUMB,
        handle_transport="grpc",  # as the serve configs deploy it
    )
    ingress = {"ray_actor_options": {"num_cpus": 0.25}}
    tokens = {TOKEN_ENV: TOKEN, ADMIN_ENV: ADMIN_TOKEN}
    try:
        serve.run(
            compose(args, ingress_options=ingress, ingress_env=tokens),
            name="duch",
            route_prefix="/",
        )
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        proxy_url = f"http://127.0.0.1:{port}"
        url = ingress_urls("duch")[0] if colocated else proxy_url
        assert url.startswith("http://127.0.0.1:")
        yield Service(url, session, artifacts, Reference(artifacts.bundle_uri), proxy_url)
    finally:
        serve.shutdown()


def archive_image(art: Artifacts, item_id: str) -> bytes:
    from duch_core import storage
    from duch_core.archive import read_archive

    t = read_archive(art.archive_uri)
    row = t.column("item_id").to_pylist().index(item_id)
    return storage.read_bytes(t.column("image_uri")[row].as_py())


def png_bytes(w: int, h: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


# ---- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["images", "captions"])
def test_text_query_equals_in_process_search(service: Service, target: str) -> None:
    m = service.art.manifest
    for text in ("a river crossing farmland", "many cars parked in rows"):
        r = service.search(text=text, k=10, target=target)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index_version"] == str(m.version)
        assert body["bits"] == BITS and body["query_modality"] == "text"
        assert hits_of(body) == service.ref.text(m, text, target, 10)
        assert len(body["hits"]) == 10
        if service.proxy_url != service.url:  # the proxy reaches the same replica
            via_proxy = service.session.post(
                f"{service.proxy_url}/v1/search",
                json={"text": text, "k": 10, "target": target},
                timeout=60,
            )
            assert via_proxy.status_code == 200, via_proxy.text
            assert hits_of(via_proxy.json()) == hits_of(body)
        for h in body["hits"]:
            assert h["image_uri"] and h["captions"]
            if target == "captions":
                assert h["caption"] == h["captions"][h["caption_index"]]


def test_image_query_json_and_upload_equal_in_process_search(service: Service) -> None:
    m = service.art.manifest
    item = "river_0001"
    data = archive_image(service.art, item)
    expected = service.ref.image(m, data, "images", 8)
    r1 = service.search(image_base64=base64.b64encode(data).decode(), k=8)
    r2 = service.session.post(
        f"{service.url}/v1/search",
        files={"image": ("q.png", data, "image/png")},
        data={"k": "8"},
        timeout=60,
    )
    for r in (r1, r2):
        assert r.status_code == 200, r.text
        assert r.json()["query_modality"] == "image"
        assert hits_of(r.json()) == expected
    # the query image itself is in the index: distance 0 at rank 1
    assert expected[0][1] == 0 and item in [h[0] for h in expected if h[1] == 0]
    r3 = service.search(image_base64=base64.b64encode(data).decode(), k=5, target="captions")
    assert r3.status_code == 200
    assert hits_of(r3.json()) == service.ref.image(m, data, "captions", 5)


def test_filtered_item_and_geojson_queries_over_http(service: Service) -> None:
    """A filter gives the exact top-k among the items that pass (never fewer when more pass),
    an item query searches with the item's stored code, GeoJSON answers carry every hit."""
    from duch_core.archive import read_archive

    m = service.art.manifest
    table = read_archive(service.art.archive_uri)
    ids = table.column("item_id").to_pylist()
    label = dict(zip(ids, table.column("label").to_pylist(), strict=True))
    split = dict(zip(ids, table.column("split").to_pylist(), strict=True))
    text = "a river crossing farmland"
    code = service.ref.encoder.encode_texts([text])
    ranked = service.ref.search(m, code, "images", 100_000)
    for spec in ({"label": "forest"}, {"label": ["river", "beach"], "split": "database"}):
        r = service.search(text=text, k=3, filter=spec)
        assert r.status_code == 200, r.text

        def passes(item: str, spec: dict = spec) -> bool:
            labels = [spec["label"]] if isinstance(spec["label"], str) else spec["label"]
            return label[item] in labels and split[item] == spec.get("split", split[item])

        assert hits_of(r.json()) == [h for h in ranked if passes(h[0])][:3]
    # the same filter in a multipart form (as the page sends an image with a drawn box)
    form = service.session.post(
        f"{service.url}/v1/search",
        files={"text": (None, text), "k": (None, "3"), "filter": (None, '{"label": "forest"}')},
        timeout=60,
    )
    assert form.status_code == 200, form.text
    assert [h[0] for h in hits_of(form.json())] == [
        h[0] for h in ranked if label[h[0]] == "forest"
    ][:3]
    # more like this: the stored image code of an item is the query
    r = service.search(item_id="river_0001", k=5)
    assert r.status_code == 200, r.text
    assert r.json()["query_modality"] == "item"
    assert hits_of(r.json())[0][:2] == ("river_0001", 0)
    assert service.search(item_id="no/such/item", k=5).status_code == 404
    # GeoJSON: a Feature per hit (these chips have no footprint: geometry null)
    g = service.session.post(
        f"{service.url}/v1/search",
        json={"text": text, "k": 4},
        headers={"Accept": "application/geo+json"},
        timeout=60,
    )
    assert g.status_code == 200 and g.headers["content-type"].startswith("application/geo+json")
    fc = g.json()
    assert fc["type"] == "FeatureCollection"
    assert [f["id"] for f in fc["features"]] == [h[0] for h in ranked[:4]]
    assert all(f["geometry"] is None for f in fc["features"])
    # a bad filter is a 422 naming the field
    bad = service.search(text=text, filter={"bbox": [0, 50, 1, 10]})
    assert bad.status_code == 422 and "bbox" in bad.json()["detail"]


def test_asymmetric_ranking_over_http_equals_the_full_asymmetric_scan(service: Service) -> None:
    """rank=asymmetric with a shortlist covering the index is the exact asymmetric top-k (one
    searcher or two merged by score), with a filter among the passing items; an item query has
    no continuous code (422)."""
    from duch_core import asymmetric, index_store
    from duch_core.archive import read_archive

    m = service.art.manifest
    text = "a river crossing farmland"
    u = service.ref.encoder.embed_texts([text])
    codes, item_ids, _, rows = index_store.load_codes(m, "image")
    rows = np.asarray(rows, np.int64)
    names = item_ids.to_pylist()
    by_row = dict(zip(rows.tolist(), names, strict=True))
    table = read_archive(service.art.archive_uri)
    label = dict(
        zip(table.column("item_id").to_pylist(), table.column("label").to_pylist(), strict=True)
    )
    forest = np.array([label[i] == "forest" for i in names])
    for spec, keep in ((None, np.ones(len(names), bool)), ({"label": "forest"}, forest)):
        ref_s, ref_i = asymmetric.asymmetric_scan(u, codes[keep], m.bits, 5, ids=rows[keep])
        body: dict[str, Any] = {"text": text, "k": 5, "rank": "asymmetric", "shortlist": 1000}
        if spec:
            body["filter"] = spec
        r = service.search(**body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["rank"] == "asymmetric"
        assert [h["item_id"] for h in got["hits"]] == [by_row[int(i)] for i in ref_i[0]]
        assert [h["score"] for h in got["hits"]] == pytest.approx(ref_s[0].tolist(), abs=1e-5)
    plain = service.search(text=text, k=5).json()
    assert plain["rank"] == "hamming" and all(h["score"] is None for h in plain["hits"])
    refused = service.search(item_id=names[0], rank="asymmetric")
    assert refused.status_code == 422 and "continuous" in refused.json()["detail"]


def test_sharded_search_equals_single(service: Service) -> None:
    import asyncio

    from deploy.artifacts import Loaders
    from deploy.searcher import ShardStore, merge_results

    m = service.art.manifest
    searcher_cls = ShardStore
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, (6, BITS // 8), dtype=np.uint8)
    loaders = Loaders()

    async def run(n: int, modality: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for g in range(n):
            s = searcher_cls(g, n)
            await s.prepare(m)
            parts.append(await s.search(str(m.version), modality, queries, k))
        res = merge_results(parts, k, loaders.merge_topk)
        return res.dist, res.ids

    async def fresh_replica() -> tuple[Any, Any, Any]:
        s = searcher_cls(0, 1)
        unknown = await s.search(str(m.version), "image", queries, 5)
        sent = await s.search(str(m.version), "image", queries, 5, m)
        for _ in range(600):  # the load runs in the background, off the request path
            if str(m.version) in s.versions():
                break
            await asyncio.sleep(0.05)
        return unknown, sent, await s.search(str(m.version), "image", queries, 5)

    unknown, sent, loaded = asyncio.run(fresh_replica())
    # a replica that does not hold the version says so at once, also when sent the manifest ...
    assert unknown is None and sent is None
    ref = asyncio.run(run(1, "image", 5))
    np.testing.assert_array_equal(loaded.ids, ref[1])  # ... which it then loads

    for modality in ("image", "text"):
        for k in (1, 7, 40):
            single = asyncio.run(run(1, modality, k))
            for n in (2, 3):
                d, i = asyncio.run(run(n, modality, k))
                np.testing.assert_array_equal(d, single[0])
                np.testing.assert_array_equal(i, single[1])


def test_index_items_and_thumbnail(service: Service) -> None:
    from PIL import Image

    m = service.art.manifest
    info = service.session.get(f"{service.url}/v1/index", timeout=30).json()
    assert info["version"] == str(m.version) and info["bits"] == BITS
    assert info["k_cap"] == K_CAP
    assert info["n_searchers"] == (0 if service.art.layout == "colocated" else 2)
    assert info["counts"]["image"] == 32 and info["counts"]["text"] == 32 * 5
    item = service.session.get(f"{service.url}/v1/items/forest_0002", timeout=30).json()
    assert item["item_id"] == "forest_0002" and len(item["captions"]) == 5
    assert item["thumbnail_url"] == "/v1/thumbnails/forest_0002"
    r = service.session.get(f"{service.url}{item['thumbnail_url']}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= THUMB
    old_url = service.session.get(f"{service.url}/v1/items/forest_0002/thumbnail", timeout=30)
    assert old_url.status_code == 200 and old_url.content == r.content  # the former URL
    r = service.session.get(f"{service.url}/v1/items/no_such_item", timeout=30)
    assert r.status_code == 404 and "no_such_item" in r.json()["detail"]
    for path in ("/v1/thumbnails/no_such_item", "/v1/items/no_such_item/thumbnail"):
        assert service.session.get(f"{service.url}{path}", timeout=30).status_code == 404


def test_openapi_and_docs_are_published(service: Service) -> None:
    spec = requests.get(f"{service.url}/openapi.json", timeout=30).json()
    content = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "/v1/thumbnails/{item_id}" in spec["paths"]
    assert "/v1/items/{item_id}/thumbnail" not in spec["paths"]  # no route shadows an item id
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "SearchResponse" in spec["components"]["schemas"]
    assert requests.get(f"{service.url}/docs", timeout=30).status_code == 200


# ---- bad input --------------------------------------------------------------------------------


def _bomb_png() -> bytes:
    """A tiny PNG file that decodes to 4000 x 4000 pixels (16 M > the cap)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (4000, 4000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


BAD_JSON_CASES = {
    "empty text": ({"text": "   "}, 422, "empty"),
    "long text": ({"text": "x" * (MAX_TEXT + 1)}, 422, f"at most {MAX_TEXT}"),
    "k zero": ({"text": "river", "k": 0}, 422, "k"),
    "k negative": ({"text": "river", "k": -3}, 422, "k"),
    "k over cap": ({"text": "river", "k": K_CAP + 1}, 422, f"between 1 and {K_CAP}"),
    "k not int": ({"text": "river", "k": "many"}, 422, "k"),
    "unknown target": ({"text": "river", "target": "videos"}, 422, "unknown target"),
    "no query": ({"k": 3}, 422, "exactly one"),
    "both queries": ({"text": "a", "image_base64": "aGk="}, 422, "exactly one"),
    "unknown field": ({"text": "a", "query": "b"}, 422, "query"),
    "bad base64": ({"image_base64": "not base64 !!"}, 400, "base64"),
    "non-image bytes": (
        {"image_base64": base64.b64encode(b"just some text, not an image").decode()},
        415,
        "image",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_CASES))
def test_bad_json_queries_get_precise_4xx(service: Service, case: str) -> None:
    body, status, words = BAD_JSON_CASES[case]
    r = service.search(**body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert service.search(text="a river", k=3).status_code == 200


def test_bad_bodies_and_uploads_get_precise_4xx(service: Service) -> None:
    url = f"{service.url}/v1/search"
    s = service.session
    cases = [
        (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON"),
        (dict(data=b"[1, 2]", headers={"Content-Type": "application/json"}), 422, "object"),
        (dict(data=b"river", headers={"Content-Type": "text/plain"}), 415, "content type"),
        (dict(data={"text": "river"}), 415, "content type"),  # urlencoded form
        (dict(files={"image": ("q.txt", b"hello", "text/plain")}), 415, "text/plain"),
        (dict(files={"image": ("q.bin", b"\x00\x01garbage" * 10, "image/png")}), 415, "image"),
        (dict(files={"image": ("bomb.png", _bomb_png(), "image/png")}), 413, "pixels"),
        (
            dict(files={"image": ("big.png", b"\x89PNG" + b"0" * MAX_IMAGE_BYTES, "image/png")}),
            413,
            "bytes",
        ),
        (dict(files={"text": (None, "river"), "k": (None, "0")}), 422, "k"),
        (dict(files={"text": (None, "river"), "target": (None, "maps")}), 422, "unknown target"),
        (dict(files={"text": (None, "")}), 422, "empty"),
        (dict(files={"colour": (None, "red")}), 422, "colour"),
        (
            dict(data=b"no parts", headers={"Content-Type": "multipart/form-data; boundary=x"}),
            400,
            "multipart",
        ),
        (dict(data=b"--x", headers={"Content-Type": "multipart/form-data"}), 400, "boundary"),
    ]
    for kwargs, status, words in cases:
        r = s.post(url, timeout=60, **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.status_code, r.text)
        assert words in r.json()["detail"], r.text
        good = s.post(url, files={"text": (None, "a river"), "k": (None, "2")}, timeout=60)
        assert good.status_code == 200 and len(good.json()["hits"]) == 2


def test_auth_required_except_health(service: Service) -> None:
    url = service.url
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health == {"status": "ok", "index_version": str(service.art.manifest.version)}
    for method, path in (
        ("get", "/v1/index"),
        ("get", "/v1/status"),
        ("post", "/v1/search"),
        ("get", "/v1/items/forest_0000"),
        ("get", "/v1/thumbnails/forest_0000"),
        ("get", "/v1/items/forest_0000/thumbnail"),
        ("post", "/v1/reload"),
    ):
        r = requests.request(method, url + path, json={"text": "river"}, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.headers.get("www-authenticate") == "Bearer"
        r = requests.request(
            method,
            url + path,
            json={"text": "river"},
            timeout=30,
            headers={"Authorization": "Bearer wrong-token"},
        )
        assert r.status_code == 403, (path, r.text)
        assert TOKEN not in r.text
    r = requests.get(f"{url}/v1/index", headers={"Authorization": TOKEN}, timeout=30)
    assert r.status_code == 401  # a token without the Bearer scheme
    # the API token does not reload; the admin token does, and also searches
    assert service.session.post(f"{url}/v1/reload", timeout=30).status_code == 403
    assert requests.post(f"{url}/v1/reload", headers=ADMIN, timeout=60).status_code == 200
    r = requests.post(f"{url}/v1/search", json={"text": "river"}, headers=ADMIN, timeout=60)
    assert r.status_code == 200
    status = service.session.get(f"{url}/v1/status", timeout=30).json()
    assert status["auth"] == "token" and status["admin_token"] is True
    assert status["refused_requests"]["auth"] >= 14


# ---- the web page -----------------------------------------------------------------------------


class Browser:
    """Headless Chromium (no network but loopback) driven through the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--window-size=1280,900",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"chromium did not start: {err[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as f:
            page = next(t for t in json.load(f) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(str(r["exceptionDetails"]))
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.eval(expr):
                    return
            except RuntimeError:  # the page is being replaced by a navigation
                pass
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expr}")

    def goto(self, url: str) -> None:
        """Navigate and wait until the new document has loaded."""
        self.eval("window.__leaving = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.__leaving && document.readyState === 'complete'")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        )

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian chromium is not installed (apt-get install -y chromium); the page is untested",
)
def test_web_page_shows_thumbnails_in_headless_chromium(service: Service, tmp_path: Path) -> None:
    b = Browser(tmp_path / "profile")
    try:
        b.goto(f"{service.url}/")
        assert b.eval("document.querySelectorAll('figure.hit').length") == 0
        b.eval(f"localStorage.setItem('duch-token', {json.dumps(TOKEN)})")
        b.goto(f"{service.url}/")
        # type a query and press the button, as a person would
        b.eval(
            "document.getElementById('q').value = 'a river crossing farmland';"
            "document.getElementById('k').value = '8';"
            "document.getElementById('go').click(); true"
        )
        b.wait_for("document.body.dataset.state === 'done'")
        b.wait_for("document.querySelectorAll('img.thumb[data-loaded]').length === 8")
        shown = b.eval(
            "[...document.querySelectorAll('figure.hit')].map(f => "
            "[f.dataset.itemId, +f.dataset.distance, f.querySelector('img').naturalWidth])"
        )
        expected = service.ref.text(service.art.manifest, "a river crossing farmland", "images", 8)
        assert [(i, d) for i, d, _ in shown] == [(i, d) for i, d, _ in expected]
        assert all(0 < w <= THUMB for _, _, w in shown)
        assert "8 results" in b.eval("document.getElementById('status').textContent")
        b.screenshot(ARTIFACTS / "serve_web_page.png")
        # a page URL with ?q= searches on load
        b.goto(f"{service.url}/?q=parking+lot&k=4&target=captions")
        b.wait_for("document.querySelectorAll('img.thumb[data-loaded]').length === 4")
        assert b.eval("document.querySelectorAll('figure.hit .matched').length") == 4
    finally:
        b.close()


# ---- the serve CLI on a started cluster ---------------------------------------------------------


def test_serve_deploy_of_the_local_config_on_a_started_cluster(
    head_cluster: Any, tmp_path: Path
) -> None:
    """`serve deploy deploy/local_config.yaml` (index root pointed at a generated index, port at a
    free one) on a `ray start --head` cluster: the proxy and the ingress replica's own port (as
    `python -m deploy.endpoints` lists it) answer searches equal to the in-process reference,
    and `serve shutdown` takes the service down."""
    import yaml

    from duch_core.synthetic_archive import make_demo_archive

    archive = make_demo_archive(str(tmp_path / "archive"), n_per_class=2, image_size=64, seed=5)
    bundle = make_bundle(str(tmp_path / "bundle"), BITS, seed=1)
    manifest = encode_index(archive, bundle, str(tmp_path / "index"))
    cfg = yaml.safe_load((ROOT / "deploy" / "local_config.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["index_root"] = str(tmp_path / "index")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    serve_bin, env = head_cluster.cli("serve"), head_cluster.env
    deploy = [serve_bin, "deploy", str(config), "-a", head_cluster.dashboard_url]
    for _ in range(30):  # the dashboard's agent comes up a little after `ray start`
        out = subprocess.run(deploy, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout + out.stderr
    proxy = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{proxy}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the deployed service never became healthy"
        time.sleep(1)
    listed = subprocess.run(
        [sys.executable, "-m", "deploy.endpoints", "--address", head_cluster.gcs_address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    (direct,) = listed.stdout.split()
    assert direct.startswith("http://127.0.0.1:") and direct != proxy
    ref = Reference(bundle)
    for url in (proxy, direct):
        r = requests.post(f"{url}/v1/search", json={"text": "a sandy beach", "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        assert hits_of(r.json()) == ref.text(manifest, "a sandy beach", "images", 5)
        info = requests.get(f"{url}/v1/index", timeout=30).json()
        assert info["version"] == str(manifest.version) and info["n_searchers"] == 0
    down = subprocess.run(
        [serve_bin, "shutdown", "-y", "-a", head_cluster.dashboard_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    with pytest.raises(requests.RequestException):
        requests.get(f"{direct}/healthz", timeout=5).raise_for_status()


# ---- index versions (these change what is served: keep them last) ----------------------------


def wait_for_version(service: Service, version: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(f"{service.url}/healthz", timeout=10).json()
        if r.get("index_version") == version:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the service never switched to index version {version}")


def corrupt_index(art: Artifacts) -> Any:
    """Publish a new index version whose first shard file was damaged after the manifest was
    written (it fails its checksum when the searchers load it)."""
    from duch_core import index_store, storage

    bad = encode_index(art.archive_uri, art.bundle_uri, art.index_root, publish=False)
    shard_uri = bad.resolve(bad.shards[0].path)
    data = bytearray(storage.read_bytes(shard_uri))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(shard_uri, bytes(data))
    index_store.publish(art.index_root, bad)
    return bad


@pytest.mark.parametrize("defect", ["other bundle", "damaged shard"])
def test_reload_refuses_an_index_that_fails_validation(service: Service, defect: str) -> None:
    """A version made for another model, or one whose shard fails its checksum while the
    searchers load it, is refused (409 on reload, ignored by the poller); the old one stays."""
    from duch_core import index_store, pointers

    art = service.art
    good = str(art.manifest.version)
    if defect == "other bundle":
        bad = encode_index(
            art.archive_uri, art.bundle_uri, art.index_root, bundle_id="other-bundle"
        )
        words = ["other-bundle"]
    else:
        bad = corrupt_index(art)
        words = ["checksum", bad.shards[0].path]
    try:
        r = requests.post(f"{service.url}/v1/reload", headers=ADMIN, timeout=60)
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert str(bad.version) in detail and good in detail
        for w in words:
            assert w in detail, detail
        time.sleep(1.5)  # the poller sees the same LATEST and must not switch either
        assert service.session.get(f"{service.url}/v1/index", timeout=30).json()["version"] == good
        r = service.search(text="a river", k=3)
        assert r.status_code == 200 and r.json()["index_version"] == good
        assert requests.get(f"{service.url}/healthz", timeout=30).json()["index_version"] == good
        status = service.session.get(f"{service.url}/v1/status", timeout=30).json()
        assert status["status"] == "degraded" and str(bad.version) in status["refused_versions"]
        assert status["reload_failures"] >= 1
    finally:
        pointers.publish_pointer(index_store.latest_uri(art.index_root), good)
    r = requests.post(f"{service.url}/v1/reload", headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json() == {
        "changed": False,
        "version": good,
        "previous_version": good,
    }


def test_index_swap_under_load_never_fails_or_mixes(service: Service) -> None:
    """Clients query without pause while a new index version is published and picked up by the
    poller; every answer is a 200 that equals the reference search of the version it names."""
    from duch_core import storage
    from duch_core.synthetic_archive import make_demo_archive

    art = service.art
    v1 = art.manifest
    queries = [
        ("a river crossing farmland", "images"),
        ("cars in a parking lot", "captions"),
        ("sandy beach", "images"),
        ("green trees", "captions"),
    ]
    archive2 = make_demo_archive(
        storage.join(art.base, "archive2"), n_per_class=6, image_size=64, seed=3
    )
    answers: list[tuple[str, int, dict[str, Any]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {TOKEN}"
        for i in range(400):  # bounded even if stop never comes
            if stop.is_set():
                break
            qi = (n + i) % len(queries)
            text, target = queries[qi]
            try:
                r = s.post(
                    f"{service.url}/v1/search",
                    json={"text": text, "target": target, "k": 6},
                    timeout=60,
                )
            except requests.RequestException as e:
                failures.append(repr(e))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text[:200]}")
            else:
                answers.append((r.json()["index_version"], qi, r.json()))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, n) for n in range(4)]
        time.sleep(1.0)
        v2 = encode_index(archive2, art.bundle_uri, art.index_root)
        wait_for_version(service, str(v2.version))
        time.sleep(1.5)
        stop.set()
        for f in futures:
            f.result(timeout=120)

    assert not failures, failures[:5]
    versions = {v for v, _, _ in answers}
    assert versions == {str(v1.version), str(v2.version)}, versions
    manifests = {str(v1.version): v1, str(v2.version): v2}
    expected = {
        (v, qi): service.ref.text(manifests[v], queries[qi][0], queries[qi][1], 6)
        for v in manifests
        for qi in range(len(queries))
    }
    assert any(
        expected[(str(v1.version), qi)] != expected[(str(v2.version), qi)]
        for qi in range(len(queries))
    ), "the two versions answer alike: the test could not tell them apart"
    for v, qi, body in answers:
        assert hits_of(body) == expected[(v, qi)], (v, queries[qi])
    info = service.session.get(f"{service.url}/v1/index", timeout=30).json()
    assert info["version"] == str(v2.version) and info["counts"]["image"] == 48
