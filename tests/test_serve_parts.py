"""The query service's parts without Ray: request parsing (JSON and multipart), shard
assignment, catalog and hits, thumbnails and their cache, index version swaps."""

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from deploy.app import AppArgs
from deploy.artifacts import Loaders, assign_shards
from deploy.catalog import Catalog, find_item, hits_from_result, item_response
from deploy.queries import (
    Limits,
    RequestError,
    check_text,
    decode_query_image,
    multipart_boundary,
    parse_form,
    parse_json,
    parse_search_request,
    read_form_fields,
)
from deploy.searcher import ShardResult
from deploy.served_index import IndexRefusedError, ServedIndex, ShardGroup
from deploy.thumbnails import ThumbnailCache, thumbnail_url
from duch_core.index_store import IndexManifest

LIMITS = Limits(k_cap=10, max_text_chars=20, max_image_bytes=10_000, max_image_pixels=4096)


def _status(fn, *args) -> tuple[int, str]:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value.status, e.value.message


def test_json_queries_parse_and_validate() -> None:
    q = parse_json(b'{"text": "  river  ", "k": 3, "target": "captions"}', LIMITS)
    assert (q.modality, q.text, q.k, q.target) == ("text", "river", 3, "captions")
    q = parse_json(json.dumps({"image_base64": base64.b64encode(b"abc").decode()}).encode(), LIMITS)
    assert (q.modality, q.image, q.k, q.target) == ("image", b"abc", 10, "images")
    data_url = "data:image/png;base64," + base64.b64encode(b"xyz").decode()
    assert parse_json(json.dumps({"image_base64": data_url}).encode(), LIMITS).image == b"xyz"
    cases = {
        b"{": 400,
        b"\xff\xfe": 400,
        b"[]": 422,
        b'{"text": ""}': 422,
        b'{"text": "' + b"y" * 21 + b'"}': 422,
        b'{"text": "a", "k": 0}': 422,
        b'{"text": "a", "k": 11}': 422,
        b'{"text": "a", "k": 2.5}': 422,
        b'{"text": "a", "target": "maps"}': 422,
        b'{"text": "a", "extra": 1}': 422,
        b'{"k": 2}': 422,
        b'{"image_base64": "@@@"}': 400,
        b'{"image_base64": ""}': 422,
    }
    for body, status in cases.items():
        assert _status(parse_json, body, LIMITS)[0] == status, body


def test_default_k_is_20_or_the_cap() -> None:
    assert parse_json(b'{"text": "river"}', Limits()).k == 20
    assert parse_json(b'{"text": "river"}', LIMITS).k == 10
    assert parse_form({"text": "river"}, LIMITS).k == 10


def test_form_queries() -> None:
    q = parse_form({"text": "river", "k": "4"}, LIMITS)
    assert (q.modality, q.text, q.k) == ("text", "river", 4)
    q = parse_form({"image": ("a.png", "image/png", b"123"), "target": "captions"}, LIMITS)
    assert (q.modality, q.image, q.target) == ("image", b"123", "captions")
    q = parse_form({"image": ("a", "application/octet-stream", b"1")}, LIMITS)
    assert q.modality == "image"
    assert _status(parse_form, {"image": ("a.txt", "text/plain", b"1")}, LIMITS)[0] == 415
    assert _status(parse_form, {"image": ("a.png", "image/png", b"1" * 10_001)}, LIMITS)[0] == 413
    assert _status(parse_form, {"image": "not a file"}, LIMITS)[0] == 422
    assert _status(parse_form, {"text": ("f", "text/plain", b"x")}, LIMITS)[0] == 422
    assert _status(parse_form, {"text": "a", "image": ("a", "image/png", b"1")}, LIMITS)[0] == 422
    assert _status(parse_form, {"text": "a", "size": "3"}, LIMITS)[0] == 422
    assert _status(parse_form, {}, LIMITS)[0] == 422


def test_text_limits_count_characters_as_sent_and_need_a_word() -> None:
    """As the published schema says: ``maxLength`` over the text as sent, and a ``pattern``
    asking for one character that caption cleaning keeps."""
    assert check_text("  " + "a" * 17 + "\n", LIMITS) == "a" * 17
    assert _status(check_text, " " * 10 + "a" * 11, LIMITS)[0] == 422
    assert _status(check_text, "a" * 21, LIMITS)[0] == 422
    assert _status(check_text, " \t\n", LIMITS)[0] == 422
    assert _status(check_text, " ...!? ,", LIMITS) == (
        422,
        "text has no word: only spaces and . , ! ?",
    )
    assert check_text("é.", LIMITS) == "é."


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def test_query_images_decode_and_bombs_are_refused_before_decoding() -> None:
    img = decode_query_image(_png(64, 32), LIMITS)
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8
    status, msg = _status(decode_query_image, _png(65, 64), LIMITS)
    assert status == 413 and "4160" in msg
    assert _status(decode_query_image, b"GIF89a not really", LIMITS)[0] == 415
    assert _status(decode_query_image, b"\x89PNG\r\n\x1a\n truncated", LIMITS)[0] == 415


@pytest.mark.parametrize("n_groups", [1, 2, 3, 5])
def test_shard_assignment_partitions_and_balances(n_groups: int) -> None:
    rng = np.random.default_rng(n_groups)
    rows = rng.integers(1, 1000, 11).tolist()
    groups = assign_shards(rows, n_groups)
    assert len(groups) == n_groups
    assert sorted(p for g in groups for p in g) == list(range(len(rows)))
    assert groups == assign_shards(rows, n_groups)  # deterministic
    loads = [sum(rows[p] for p in g) for g in groups]
    # greedy largest-first: no group exceeds the lightest by more than the largest shard
    assert max(loads) - min(loads) <= max(rows)
    assert assign_shards([], n_groups) == [[] for _ in range(n_groups)]


def test_catalog_lookup() -> None:
    t = pa.table(
        {
            "item_id": ["a", "b", "c"],
            "image_uri": ["/x/a.png", "/x/b.png", "/x/c.png"],
            "captions": [["one"], [], ["three", "drei"]],
            "label": ["l1", None, "l3"],
        }
    )
    cat = Catalog(t)
    assert len(cat) == 3 and "b" in cat and "z" not in cat
    recs = cat.lookup(["c", "z", "a", "c"])
    assert recs[0]["captions"] == ["three", "drei"] and recs[1] is None
    assert recs[2]["image_uri"] == "/x/a.png" and recs[3] == recs[0]
    assert Catalog(None).lookup(["a"]) == [None]
    with pytest.raises(ValueError, match="more than once"):
        Catalog(pa.table({"item_id": ["a", "a"], "image_uri": ["1", "2"]}))


def test_catalog_lookup_over_chunks_equals_take() -> None:
    """Columns chunked differently (as Parquet reads give them): the per-value fast path
    answers like ``Table.take`` for every row, first and last rows of chunks included."""
    n = 1000
    rng = np.random.default_rng(0)
    caps = [[f"c{i}-{j}" for j in range(i % 4)] for i in range(n)]
    ids = pa.chunked_array([[f"i{i:04d}" for i in range(a, b)] for a, b in ((0, 10), (10, n))])
    uris = pa.chunked_array([[f"/x/{i}.png" for i in range(a, b)] for a, b in ((0, 333), (333, n))])
    captions = pa.chunked_array(
        [caps[a:b] for a, b in ((0, 1), (1, 500), (500, 999), (999, n))], pa.list_(pa.string())
    )
    t = pa.table({"item_id": ids, "image_uri": uris, "captions": captions})
    cat = Catalog(t)
    rows = [0, 1, 9, 10, 332, 333, 499, 500, 998, 999] + rng.integers(0, n, 40).tolist()
    got = cat.lookup([f"i{r:04d}" for r in rows])
    assert got == t.select(["image_uri", "captions"]).take(rows).to_pylist()
    assert Catalog(pa.table({"item_id": ["a"]})).lookup(["a", "b"]) == [{}, None]


def test_app_args_are_strict() -> None:
    a = AppArgs.model_validate({"index_root": "s3://b/idx"})
    assert a.n_searchers == 2 and a.k_cap == 100 and a.ingress_settings().limits.k_cap == 100
    for bad in (
        {},
        {"index_root": " "},
        {"index_root": "x", "n_searchers": -1},
        {"index_root": "x", "n_searchers": 65},
        {"index_root": "x", "batch_max_size": 0},
        {"index_root": "x", "nope": 1},
    ):
        with pytest.raises(ValueError):
            AppArgs.model_validate(bad)


@pytest.mark.parametrize("name", ["serve_config.yaml", "local_config.yaml"])
def test_serve_configs_validate_and_name_real_deployments(name: str) -> None:
    """Both serve configs pass Serve's own schema, their args pass AppArgs, they listen on
    loopback only, and every deployment they configure is one the app builds."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from deploy.app import deployment_names

    path = Path(__file__).resolve().parent.parent / "deploy" / name
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "deploy.app:build_app"
    args = AppArgs.model_validate(app.args)
    configured = [d["name"] for d in raw["applications"][0]["deployments"]]
    assert configured and set(configured) <= set(deployment_names(args)), configured
    assert "Ingress" in configured


# ---- multipart bodies and the whole request path ------------------------------------------------

BOUNDARY = "b0undary"


def _multipart(parts: list[tuple[str, Any]], boundary: str = BOUNDARY) -> bytes:
    """A multipart body: ``(name, text)`` fields and ``(name, (filename, type, bytes))`` files."""
    out = b""
    for name, value in parts:
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, ctype, data = value
            out += (
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode() + data
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()
        out += b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _scope(content_type: str | None, length: int | None = None) -> dict[str, Any]:
    headers = [] if content_type is None else [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": "/v1/search", "headers": headers}


def _form(body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> Any:
    return asyncio.run(read_form_fields(_scope(content_type), body, LIMITS))


def _form_status(body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
    with pytest.raises(RequestError) as e:
        _form(body, content_type)
    return e.value.status, e.value.message


def test_multipart_fields_and_files_are_read() -> None:
    body = _multipart([("text", "river"), ("k", "3"), ("image", ("q.png", "image/png", b"\x89P"))])
    assert _form(body) == {"text": "river", "k": "3", "image": ("q.png", "image/png", b"\x89P")}
    quoted = f'multipart/form-data; charset=utf-8; BOUNDARY="{BOUNDARY}"'
    assert _form(_multipart([("text", "river")]), quoted) == {"text": "river"}
    assert multipart_boundary("multipart/form-data") == ""


@pytest.mark.parametrize(
    ("body", "ctype", "status", "words"),
    [
        (_multipart([("text", "a")]), "multipart/form-data", 400, "names no boundary"),
        (b"no parts here", None, 400, "no part starts with the boundary"),
        (_multipart([("text", "a"), ("text", "b")]), None, 422, "more than once"),
        (
            _multipart(
                [("image", ("a.png", "image/png", b"1")), ("x", ("b.png", "image/png", b"2"))]
            ),
            None,
            400,
            "malformed multipart body",
        ),
        (_multipart([("text", "y" * 2000)]), None, 400, "malformed multipart body"),
        (_multipart([(f"f{i}", "v") for i in range(9)]), None, 400, "malformed multipart body"),
    ],
    ids=["no boundary", "no part", "field twice", "two files", "long text part", "many fields"],
)
def test_malformed_multipart_bodies_are_refused(
    body: bytes, ctype: str | None, status: int, words: str
) -> None:
    got = _form_status(body, ctype or f"multipart/form-data; boundary={BOUNDARY}")
    assert got[0] == status and words in got[1], got


def _request(body: bytes, content_type: str | None, length: int | None = None) -> Any:
    from starlette.requests import Request

    chunks = [body[i : i + 100] for i in range(0, len(body), 100)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    return Request(_scope(content_type, length), receive)


def _parse(body: bytes, content_type: str | None, length: int | None = None) -> Any:
    return asyncio.run(parse_search_request(_request(body, content_type, length), LIMITS))


def test_search_requests_are_parsed_by_content_type_and_size() -> None:
    assert _parse(b'{"text": "river", "k": 2}', "application/json; charset=utf-8").k == 2
    form = _multipart([("text", "river"), ("target", "captions")])
    q = _parse(form, f"multipart/form-data; boundary={BOUNDARY}")
    assert (q.modality, q.text, q.target) == ("text", "river", "captions")
    cap = LIMITS.max_body_bytes("application/json")
    for body, ctype, length, status in (
        (b"river", "text/plain", None, 415),
        (b"river", None, None, 415),
        (b"text=river", "application/x-www-form-urlencoded", None, 415),
        (b"{}", "application/json", cap + 1, 413),  # refused on the declared length
        (b" " * (cap + 1), "application/json", None, 413),  # refused while streaming
    ):
        with pytest.raises(RequestError) as e:
            _parse(body, ctype, length)
        assert e.value.status == status, (ctype, length)


# ---- catalog records and hits -------------------------------------------------------------------


def _catalog() -> Catalog:
    return Catalog(
        pa.table(
            {
                "item_id": ["a", "b"],
                "image_uri": ["/x/a.png", None],
                "captions": [["one", "two"], []],
                "split": ["train", "query"],
            }
        )
    )


def test_items_are_found_by_id_or_refused_with_404() -> None:
    cat = _catalog()
    rec = find_item(cat, "a", "v1")
    item = item_response("a", rec, "v1")
    assert (item.image_uri, item.captions, item.split, item.label) == (
        "/x/a.png",
        ["one", "two"],
        "train",
        None,
    )
    assert item.thumbnail_url == "/v1/thumbnails/a" and item.index_version == "v1"
    with pytest.raises(RequestError) as e:
        find_item(cat, "zz", "v7")
    assert e.value.status == 404 and "'zz'" in e.value.message and "v7" in e.value.message
    assert thumbnail_url("tiles/1 2?") == "/v1/thumbnails/tiles%2F1%202%3F"


def test_hits_carry_archive_fields_and_the_matched_caption() -> None:
    res = ShardResult(
        "v1",
        np.array([[0, 3, 5]], np.int32),
        np.array([[7, 2, 9]], np.int64),
        {7: "a", 2: "b", 9: "gone"},
        {7: 1, 2: 0, 9: 0},
    )
    text = hits_from_result(res, _catalog(), "text")
    assert [(h.rank, h.item_id, h.distance) for h in text] == [
        (1, "a", 0),
        (2, "b", 3),
        (3, "gone", 5),
    ]
    assert (text[0].caption_index, text[0].caption, text[0].image_uri) == (1, "two", "/x/a.png")
    assert (text[1].caption_index, text[1].caption) == (0, None)  # b has no captions
    assert (text[2].captions, text[2].image_uri) == ([], None)  # not in the archive
    images = hits_from_result(res, _catalog(), "image")
    assert all(h.caption_index is None and h.caption is None for h in images)
    assert images[0].captions == ["one", "two"]
    assert hits_from_result(res, Catalog(None), "image")[0].captions == []


# ---- thumbnails -----------------------------------------------------------------------------------


class _Images:
    """Archive images by URI, counting reads."""

    def __init__(self) -> None:
        self.reads: dict[str, int] = {}

    def read(self, uri: str, limit: int | None = None) -> bytes:
        from deploy.artifacts import ObjectTooLargeError

        self.reads[uri] = self.reads.get(uri, 0) + 1
        if uri == "missing":
            raise FileNotFoundError(uri)
        if uri == "broken":
            return b"not an image"
        data = _png(200, 100)
        if limit is not None and len(data) > limit:
            raise ObjectTooLargeError(f"{uri}: {len(data)} bytes")
        return data


def test_thumbnails_are_small_jpegs_and_the_cache_drops_the_least_recently_used() -> None:
    from PIL import Image

    images = _Images()
    cache = ThumbnailCache(images.read, size=32, capacity=2)
    img = Image.open(io.BytesIO(cache.get("a")))
    assert img.format == "JPEG" and img.size == (32, 16)
    cache.get("b")
    cache.get("a")  # a hit: a becomes the most recently used
    cache.get("c")  # full: b goes
    assert len(cache) == 2 and "a" in cache and "c" in cache and "b" not in cache
    cache.get("b")
    assert images.reads == {"a": 1, "b": 2, "c": 1}
    with pytest.raises(FileNotFoundError):
        cache.get("missing")
    with pytest.raises(ValueError):
        cache.get("broken")
    assert "broken" not in cache

    none_kept = ThumbnailCache(images.read, size=32, capacity=0)
    none_kept.get("a")
    none_kept.get("a")
    assert len(none_kept) == 0 and images.reads["a"] == 3
    with pytest.raises(ValueError, match="bytes"):  # over the byte cap: refused, not decoded
        ThumbnailCache(images.read, size=32, capacity=2, max_bytes=100).get("a")


def test_thumbnails_of_large_images_are_made_from_a_reduced_decode() -> None:
    """A 4000 x 3000 scene becomes a 64-pixel thumbnail through a decode reduced toward twice
    that size, and looks like the full-size one."""
    from PIL import Image

    from deploy.thumbnails import make_thumbnail

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    scene = np.asarray(Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR))
    out = io.BytesIO()
    Image.fromarray(scene).save(out, format="PNG")
    thumb = Image.open(io.BytesIO(make_thumbnail(out.getvalue(), 64)))
    assert thumb.size == (64, 48)
    ref = Image.fromarray(scene)
    ref.thumbnail((64, 64))
    diff = np.abs(np.asarray(thumb, np.int16) - np.asarray(ref, np.int16))
    assert diff.mean() < 6, diff.mean()  # JPEG at quality 85 included


# ---- index versions ---------------------------------------------------------------------------------


def _manifest(
    version: str, bundle_id: str = "b1", n_images: int = 2, n_texts: int = 4
) -> IndexManifest:
    return IndexManifest(
        version=version, bundle_id=bundle_id, bits=32, counts={"image": n_images, "text": n_texts}
    )


class _Root:
    """An index root whose ``LATEST`` the test sets; counts validations per version."""

    def __init__(self) -> None:
        self.latest: IndexManifest | None = None
        self.validated: dict[str, int] = {}

    def read_latest(self, root: str) -> IndexManifest:
        if self.latest is None:
            raise FileNotFoundError(f"no LATEST under {root}")
        return self.latest

    def validate(self, manifest: IndexManifest, bits: int, bundle_id: str) -> None:
        from duch_core.index_store import validate

        self.validated[manifest.version] = self.validated.get(manifest.version, 0) + 1
        validate(manifest, bits, bundle_id)


class _Group:
    """A shard group holding one image and two caption codes of each version it loads."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.held: set[str] = set()
        self.lagging = False  # a manifest sent starts a load that is not done yet

    async def prepare(self, manifest: IndexManifest) -> dict[str, int]:
        self.held.add(manifest.version)
        return {"image": 1, "text": 2}

    async def code_of(self, version: str, modality: str, item_id: str, manifest=None):
        return version in self.held, None

    async def search(
        self,
        version: str,
        modality: str,
        codes: np.ndarray,
        k: int,
        manifest=None,
        spec=None,
        rerank=None,
    ):
        if version not in self.held:
            if manifest is None or self.lagging:
                return None
            self.held.add(manifest.version)
        dist, ids = np.array([[self.row]], np.int32), np.array([[self.row]], np.int64)
        return ShardResult(version, dist, ids, {self.row: f"{version}/{self.row}"}, {})


def _served(root: _Root, groups: list[_Group]) -> ServedIndex:
    loaders = Loaders(read_latest=root.read_latest, validate=root.validate)
    return ServedIndex(
        "mem://index",
        [ShardGroup(g.prepare, g.search, g.code_of) for g in groups],
        loaders,
        32,
        "b1",
    )


def test_served_index_swaps_only_to_valid_versions_and_old_requests_finish_on_theirs() -> None:
    root, groups = _Root(), [_Group(3), _Group(5)]
    idx = _served(root, groups)
    query = np.zeros((1, 4), np.uint8)

    async def scenario() -> None:
        with pytest.raises(IndexRefusedError, match="cannot read LATEST"):
            await idx.reload()
        with pytest.raises(RequestError) as e:
            idx.current()
        assert e.value.status == 503

        root.latest = _manifest("v1")
        r = await idx.reload()
        assert (r.changed, r.version, r.previous_version) == (True, "v1", None)
        assert idx.current().counts == {"image": 2, "text": 4}
        assert (await idx.reload()).changed is False
        old = idx.current()

        for bad, words in (
            (_manifest("v2", bundle_id="other"), "other"),
            (_manifest("v3", n_images=5), "searchers loaded 2 image codes, manifest says 5"),
        ):
            root.latest = bad
            with pytest.raises(IndexRefusedError) as refused:
                await idx.reload()
            assert bad.version in str(refused.value) and words in str(refused.value)
            assert "still serving v1" in str(refused.value)
            assert idx.current() is old

        root.latest = _manifest("v4")
        assert (await idx.reload()).previous_version == "v1"
        assert idx.current().version == "v4" and old.version == "v1"
        assert idx.previous is old
        # a request that took the v1 state before the swap is answered from v1
        st, res = await idx.search(old, "image", query, 2)
        assert st is old and res.version == "v1" and res.item_ids == {3: "v1/3", 5: "v1/5"}
        assert res.ids.tolist() == [[3, 5]]
        # a searcher replica that does not hold the version is sent the manifest
        groups[1].held.clear()
        st, res = await idx.search(idx.current(), "text", query, 1)
        assert res.version == "v4" and res.ids.tolist() == [[3]] and "v4" in groups[1].held
        # a replica that holds only v1 (still loading v4) answers the request from v1, whole
        groups[1].held = {"v1"}
        groups[1].lagging = True
        st, res = await idx.search(idx.current(), "image", query, 2)
        assert (
            st.version == "v1"
            and res.version == "v1"
            and set(res.item_ids.values())
            == {
                "v1/3",
                "v1/5",
            }
        )
        # a replica that holds none of them: 503 with Retry-After, never a mixed answer
        groups[1].held = set()
        with pytest.raises(RequestError) as e:
            await idx.search(idx.current(), "image", query, 2)
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"

    asyncio.run(scenario())


def test_poller_follows_latest_and_does_not_retry_a_refused_version() -> None:
    root = _Root()
    idx = _served(root, [_Group(0)])

    async def scenario() -> None:
        root.latest = _manifest("v1", n_images=1, n_texts=2)
        await idx.reload()
        root.latest = _manifest("v2", bundle_id="other")
        poller = asyncio.create_task(idx.poll(0.01))
        try:
            await asyncio.sleep(0.2)
            assert idx.current().version == "v1" and root.validated["v2"] == 1
            root.latest = _manifest("v3", n_images=1, n_texts=2)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if idx.current().version == "v3":
                    break
            assert idx.current().version == "v3"
            root.latest = None  # LATEST unreadable: kept serving v3, the error is reported
            await asyncio.sleep(0.1)
            assert idx.current().version == "v3" and "no LATEST" in (idx.last_error or "")
        finally:
            poller.cancel()

    asyncio.run(scenario())


# ---- hostile bodies, the published schema, the body budget -------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nested 100,000 deep
        (b'{"text": "a", "k": ' + b"9" * 5000 + b"}", 400),  # k of 5,000 digits
        (b'{"text": "a", "k": NaN}', 400),
        (b'{"text": "a", "k": -Infinity}', 400),
        (b'{"text": "a", "k": 1e999}', 422),  # a float: not an integer
        (b'{"text": "\xff\xfe"}', 400),  # invalid UTF-8
        (b'{"text": "\\ud800 river"}', 400),  # a lone surrogate
        (b'{"text": null, "image_base64": "aGk="}', 422),
        (b'{"text": "a", "target": null}', 422),
        (b'{"text": ["a"]}', 422),
        (b'{"text": {"a": 1}}', 422),
        (b'{"text": "a", "k": "3"}', 422),
        (b'{"text": "a", "k": true}', 422),
        (b"", 400),
        (b"\x00", 400),
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else str(v),
)
def test_malformed_json_of_every_kind_is_a_4xx(body: bytes, status: int) -> None:
    assert _status(parse_json, body, LIMITS)[0] == status


def test_an_image_upload_with_an_empty_text_field_is_an_image_query() -> None:
    q = parse_form({"image": ("a.png", "image/png", b"123"), "text": ""}, LIMITS)
    assert (q.modality, q.image) == ("image", b"123")
    assert _status(parse_form, {"text": ""}, LIMITS)[0] == 422


def test_the_published_body_schemas_accept_exactly_what_the_parser_accepts() -> None:
    """Bodies the schema allows parse (image bytes are decoded later), bodies it refuses get a
    4xx: what schemathesis checks against the running service, here without Ray."""
    import jsonschema

    from deploy.query_schemas import form_body_schema, json_body_schema

    schema = json_body_schema(LIMITS)
    b64 = base64.b64encode(b"abc").decode()
    bodies = [
        {"text": "river"},
        {"text": "river", "k": 10, "target": "captions"},
        {"text": "river", "k": None},
        {"image_base64": b64},
        {"image_base64": "data:image/png;base64," + b64},
        {"text": "  "},
        {"text": "?!"},
        {"text": "x" * 21},
        {"text": "river", "k": 11},
        {"text": "river", "k": 0},
        {"text": "river", "image_base64": b64},
        {},
        {"image_base64": "abc"},
        {"image_base64": ""},
        {"text": "river", "extra": 1},
        {"text": "river", "target": "maps"},
        {"item_id": "scene/r1_c2"},
        {"item_id": ""},
        {"item_id": "a", "text": "river"},
        {"text": "river", "filter": None},
        {"text": "river", "filter": {"bbox": [170, -10, -170, 10.5], "label": ["a", "b"]}},
        {"text": "river", "filter": {"datetime": "2024-01-01/..", "sensor": "landsat-8"}},
        {"text": "river", "filter": {"bbox": [0, 0, 1]}},
        {"text": "river", "filter": {"bbox": [0, 0, 200, 1]}},
        {"text": "river", "filter": {"bbox": [0, -91, 1, 1]}},
        {"text": "river", "filter": {"cloud_cover": 10}},
        {"text": "river", "filter": {"label": 3}},
        {"text": "river", "filter": {"label": []}},
        {"text": "river", "filter": "bbox"},
        {"text": "river", "rank": "asymmetric"},
        {"text": "river", "rank": "asymmetric", "shortlist": 1000},
        {"text": "river", "rank": "asymmetric", "shortlist": 2},
        {"image_base64": b64, "rank": "asymmetric", "shortlist": 50},
        {"text": "river", "rank": "hamming"},
        {"text": "river", "rank": "asymmetric", "shortlist": 1001},
        {"text": "river", "rank": "asymmetric", "shortlist": 0},
        {"text": "river", "shortlist": 50},
        {"text": "river", "rank": "hamming", "shortlist": 50},
        {"text": "river", "rank": "cosine"},
        {"text": "river", "rank": None},
        {"item_id": "scene/r1_c2", "rank": "asymmetric"},
        {"item_id": "scene/r1_c2", "rank": "hamming"},
    ]
    for body in bodies:
        valid = jsonschema.Draft202012Validator(schema).is_valid(body)
        try:
            parse_json(json.dumps(body).encode(), LIMITS)
            accepted = True
        except RequestError as e:
            assert 400 <= e.status < 500, e.status
            accepted = False
        assert valid == accepted, (body, valid, accepted)
    form = form_body_schema(LIMITS)
    forms = [
        ({"text": "river", "k": 3}, {"text": "river", "k": "3"}),
        ({"image": "x"}, {"image": ("a.png", "image/png", b"x")}),
        ({"image": "x", "text": ""}, {"image": ("a.png", "image/png", b"x"), "text": ""}),
        ({"image": "x", "text": "river"}, {"image": ("a", "image/png", b"x"), "text": "river"}),
        ({"text": ""}, {"text": ""}),
        ({}, {}),
        (
            {"text": "river", "rank": "asymmetric", "shortlist": 7},
            {"text": "river", "rank": "asymmetric", "shortlist": "7"},
        ),
        ({"text": "river", "shortlist": 7}, {"text": "river", "shortlist": "7"}),
        ({"text": "river", "rank": "asym"}, {"text": "river", "rank": "asym"}),
    ]
    for doc, fields in forms:
        valid = jsonschema.Draft202012Validator(form).is_valid(doc)
        try:
            parse_form(fields, LIMITS)
            accepted = True
        except RequestError:
            accepted = False
        assert valid == accepted, (doc, valid, accepted)


def test_the_body_budget_refuses_with_503_and_is_given_back() -> None:
    from deploy.queries import BodyBudget

    budget = BodyBudget(250)
    body = b'{"text": "river"}'.ljust(200)

    async def scenario() -> None:
        async with budget.hold() as first:
            q = await parse_search_request(_request(body, "application/json"), LIMITS, first)
            assert q.text == "river" and budget.used == 200
            async with budget.hold() as second:
                with pytest.raises(RequestError) as e:
                    await parse_search_request(_request(body, "application/json"), LIMITS, second)
                assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
                assert e.value.reason == "body_budget"
        assert budget.used == 0
        async with budget.hold() as third:
            await parse_search_request(_request(body, "application/json"), LIMITS, third)
        assert budget.used == 0

    asyncio.run(scenario())


# ---- auth fails closed ------------------------------------------------------------------------------


def test_auth_fails_closed_and_separates_the_admin_token() -> None:
    from deploy.auth import AuthConfigError, check_admin, check_api, resolve_tokens

    with pytest.raises(AuthConfigError, match="allow_anonymous"):
        resolve_tokens("API", "ADMIN", False, {})
    with pytest.raises(AuthConfigError):
        resolve_tokens("API", "ADMIN", False, {"API": "  "})  # blank is unset
    with pytest.raises(AuthConfigError):
        resolve_tokens(None, "ADMIN", False, {"ADMIN": "a"})
    t = resolve_tokens("API", "ADMIN", False, {"API": "k1", "ADMIN": "k2"})
    assert t.mode == "token"
    check_api(t, "Bearer k1")
    check_api(t, "bearer  k2 ")  # the admin token works everywhere
    check_admin(t, "Bearer k2")
    for fn, header, status in (
        (check_api, "", 401),
        (check_api, "k1", 401),
        (check_api, "Basic k1", 401),
        (check_api, "Bearer k3", 403),
        (check_admin, "Bearer k1", 403),  # the API token does not reload
        (check_admin, "", 401),
    ):
        assert _status(fn, t, header)[0] == status, (fn.__name__, header)
    no_admin = resolve_tokens("API", "ADMIN", False, {"API": "k1"})
    assert _status(check_admin, no_admin, "Bearer k1")[0] == 403
    anon = resolve_tokens("API", "ADMIN", True, {})
    assert anon.mode == "anonymous"
    check_api(anon, "")
    check_admin(anon, "")
    anon_admin = resolve_tokens("API", "ADMIN", True, {"ADMIN": "k2"})
    assert _status(check_admin, anon_admin, "")[0] == 401


def test_the_builder_pins_the_tokens_into_the_ingress_replicas_environment() -> None:
    from deploy.app import HEALTH_CHECK, _with_defaults, token_env_vars
    from deploy.auth import AuthConfigError

    args = AppArgs(index_root="x", auth_token_env="T", admin_token_env="A")
    with pytest.raises(AuthConfigError):
        token_env_vars(args, {})
    assert token_env_vars(args, {"T": "t", "A": "a", "B": "b"}) == {"T": "t", "A": "a"}
    assert token_env_vars(args.model_copy(update={"allow_anonymous": True}), {}) == {}
    opts = _with_defaults(
        {"ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"X": "1", "T": "own"}}}},
        {"T": "t", "A": "a"},
    )
    assert opts["ray_actor_options"] == {
        "num_cpus": 1,
        "runtime_env": {"env_vars": {"T": "own", "A": "a", "X": "1"}},
    }
    assert opts["health_check_timeout_s"] == HEALTH_CHECK["health_check_timeout_s"]
    assert _with_defaults({"health_check_timeout_s": 5}, {})["health_check_timeout_s"] == 5


# ---- searchers load off the request path ------------------------------------------------------


def test_a_searcher_never_loads_on_the_request_path() -> None:
    """A search for a version not held is answered ``None`` at once (with the manifest, the load
    starts in the background); versions are validated as the ingress does, refused ones are not
    retried, and the least recently searched version is dropped first."""
    from deploy.searcher import ShardStore

    codes = np.arange(8, dtype=np.uint8).reshape(2, 4)
    gate = asyncio.Event()
    loads: list[str] = []

    def load_codes(manifest, modality, shards):
        loads.append(manifest.version)
        return codes, ["a", "b"], np.array([-1, -1], np.int32), np.array([0, 1], np.int64)

    root = _Root()
    loaders = Loaders(
        load_codes=load_codes, validate=root.validate, read_latest_or_none=lambda r: root.latest
    )
    store = ShardStore(0, 1, keep_versions=2, loaders=loaders, expect=(32, "b1"))
    q = np.zeros((1, 4), np.uint8)

    async def scenario() -> None:
        assert await store.sync_latest("mem://") is None and store.ready()  # nothing published
        root.latest = _manifest("v1")
        assert await store.sync_latest("mem://", strict=True) == "v1"
        assert (await store.search("v1", "image", q, 1)).version == "v1"
        m2 = _manifest("v2")
        assert await store.search("v2", "image", q, 1) is None and "v2" not in loads
        assert await store.search("v2", "image", q, 1, m2) is None  # starts the load, no wait
        for _ in range(100):
            if "v2" in store.versions():
                break
            await asyncio.sleep(0.01)
        assert store.versions() == ["v1", "v2"]
        await store.search("v1", "image", q, 1)  # v1 searched last: v2 goes first
        await store.prepare(_manifest("v3"))
        assert store.versions() == ["v1", "v3"]
        root.latest = _manifest("v4", bundle_id="other")
        assert await store.sync_latest("mem://") == "v4"
        assert "v4" in store.refused and store.versions() == ["v1", "v3"]
        await store.sync_latest("mem://")
        assert root.validated["v4"] == 1  # not retried
        fresh = ShardStore(0, 1, loaders=loaders, expect=(32, "b1"))
        with pytest.raises(Exception, match="other"):
            await fresh.sync_latest("mem://", strict=True)  # a constructor refuses to start
        assert not fresh.ready()
        gate.set()

    asyncio.run(scenario())


_COMPILES_PROBE = """
import json, sys
import numpy as np, pyarrow as pa
from numba.core.registry import CPUDispatcher
from duch_core import _mih_kernel, _search_kernel, hamming_topk
from deploy.searcher import build_shard_data, search_shard
from duch_core.search import HammingIndex

def signatures():
    return {m.__name__ + "." + k: sorted(map(str, v.signatures))
            for m in (_search_kernel, _mih_kernel, hamming_topk)
            for k, v in vars(m).items() if isinstance(v, CPUDispatcher)}

rng = np.random.default_rng(0)
n = 300
ids = [f"it{i:04d}" for i in range(n)]
lon, lat = rng.uniform(-10, 10, n), rng.uniform(40, 50, n)
catalog = pa.table({
    "item_id": ids,
    "label": rng.choice(["forest", "river", "beach"], n).tolist(),
    "split": rng.choice(["train", "database"], n).tolist(),
    "sensor": rng.choice(["s2", "l8"], n).tolist(),
    "bbox": [[float(x), float(y), float(x) + 0.1, float(y) + 0.1] for x, y in zip(lon, lat)],
    "datetime": [f"2024-{m:02d}-01T00:00:00Z" for m in rng.integers(1, 13, n)],
})
codes = rng.integers(0, 256, (n, 4), dtype=np.uint8)
before = signatures()
data = build_shard_data(codes, pa.array(ids), np.full(n, -1), np.arange(n) * 3 + 5, 32,
                        HammingIndex, False, catalog)
loaded = signatures()
specs = json.loads(sys.argv[1])
for spec in specs:
    for k in (1, 3, 50):
        search_shard(data, codes[:1], k, "v", spec)
        search_shard(data, codes[:5], k, "v", spec)
print(json.dumps({"before": before, "loaded": loaded, "after": signatures()}))
"""


def test_a_loaded_searcher_compiles_nothing_on_a_filtered_query() -> None:
    """Loading a version compiles (or loads from numba's cache) every search kernel, so no
    query, filtered or not, waits for a compile (about 10 s on 2 cores, past the ingress's
    search deadline). Checked in a fresh process: the kernels' signatures after loading equal
    those after searches with every kind of filter."""
    import subprocess
    import sys

    specs = [
        {"label": "forest"},
        {"label": ["river", "beach"], "split": "database"},
        {"bbox": [-5, 42, 5, 48]},
        {"bbox": [170, -10, -170, 10]},
        {"datetime": "2024-03-01T00:00:00Z/2024-06-01T00:00:00Z"},
        {"datetime": "2024-03-01T00:00:00Z/.."},
        {"sensor": "s2", "bbox": [-10, 40, 0, 45]},
    ]
    out = subprocess.run(
        [sys.executable, "-c", _COMPILES_PROBE, json.dumps(specs)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    sigs = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(sigs["before"].values())  # a fresh process: nothing compiled yet
    assert sum(map(len, sigs["loaded"].values())) >= 3
    assert sigs["after"] == sigs["loaded"]


def test_calls_are_retried_when_the_replica_is_gone_and_only_then() -> None:
    from ray.exceptions import ActorDiedError

    from deploy import retry

    calls: list[int] = []

    async def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise ActorDiedError()
        return x * 2

    async def bad(x: int) -> int:
        calls.append(x)
        raise ValueError("bad input")

    async def scenario() -> None:
        assert await retry.retry_unavailable(flaky, 4) == 8 and len(calls) == 3
        calls.clear()
        with pytest.raises(ValueError):
            await retry.retry_unavailable(bad, 1)
        assert calls == [1]

    asyncio.run(scenario())


def test_query_images_are_reduced_toward_the_model_input_before_conversion() -> None:
    from duch_core.config import ImageBackboneConfig
    from duch_core.imageio import decode_image, preprocess

    cfg = ImageBackboneConfig(image_size=32, center_crop=0)
    limits = Limits(max_image_pixels=10_000_000)
    small = _png(100, 80)
    np.testing.assert_array_equal(
        decode_query_image(small, limits, cfg), decode_image(small)
    )  # under 4x the input: decoded whole, as the encode job does
    import imagecodecs

    y, x = np.mgrid[0:1200, 0:1600].astype(np.float64)
    smooth = np.stack([x / 1600, y / 1200, 0.5 + 0.5 * np.sin(x / 150 + y / 200)], axis=-1)
    big = (3000 + 4000 * smooth).astype(np.uint16)  # 1600 x 1200, 12-bit data in 16 bits
    data = imagecodecs.png_encode(big)
    img = decode_query_image(data, limits, cfg)
    assert img.shape == (1200 // 18, 1600 // 18, 3)  # factor 18 keeps 2 x 32 on the short side
    full = preprocess(decode_image(data), cfg)
    diff = np.abs(preprocess(img, cfg) - full)  # normalised units: 1 is about 57/255
    assert diff.mean() < 0.03 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_duch_serve_deploy_carries_the_tokens_from_the_shell_to_the_cluster() -> None:
    from jobs.serve import attach_tokens

    data = {
        "applications": [
            {"import_path": "deploy.app:build_app", "args": {"index_root": "x"}},
            {"import_path": "other:app", "args": {}},
        ]
    }
    env = {"DUCH_API_TOKEN": " t1 ", "DUCH_ADMIN_TOKEN": "t2", "OTHER": "no"}
    assert attach_tokens(data, env) == ["DUCH_API_TOKEN", "DUCH_ADMIN_TOKEN"]
    assert data["applications"][0]["runtime_env"] == {
        "env_vars": {"DUCH_API_TOKEN": "t1", "DUCH_ADMIN_TOKEN": "t2"}
    }
    assert "runtime_env" not in data["applications"][1]
    assert (
        attach_tokens(
            {
                "applications": [
                    {"import_path": "deploy.app:build_app", "args": {"index_root": "x"}}
                ]
            },
            {},
        )
        == []
    )


def test_an_answer_from_another_bundle_than_the_index_is_refused_with_503() -> None:
    """Encoder and ingress both check the bundle on every answer: a query is never answered
    with codes of one model searched among codes of another."""
    from deploy.artifacts import LoadedEncoder
    from deploy.encoder import EncoderClient, QueryEncoder
    from deploy.ingress import Ingress, IngressSettings
    from deploy.queries import Query
    from deploy.telemetry import Telemetry

    encoder = object.__new__(QueryEncoder.func_or_class)
    encoder.loaded = LoadedEncoder(encoder=None, bits=32, bundle_id="new")
    code, err, got, cont = asyncio.run(encoder.encode_text("river", "old"))
    assert code is None and cont is None and got == "new" and "not old" in (err or "")

    async def answer(_: Any, bundle_id: str) -> Any:
        return np.zeros(4, np.uint8), None, "new", None

    # the class under Serve's ASGI wrapper (whose async __del__ would warn, never awaited)
    plain = next(c for c in Ingress.func_or_class.__mro__ if "__serve_build_asgi_app__" in vars(c))
    svc = object.__new__(plain)
    svc.encoder = EncoderClient(answer, answer, 32, "new")
    svc.telemetry = Telemetry(export=False)
    svc.settings = IngressSettings(index_root="x")
    with pytest.raises(RequestError) as e:
        asyncio.run(svc.encode(Query("text", 3, "images", text="river"), "old"))
    assert e.value.status == 503 and e.value.reason == "bundle_mismatch"
    assert e.value.headers["Retry-After"] == "1"
    code, _, cont = asyncio.run(svc.encode(Query("text", 3, "images", text="river"), "new"))
    assert code.shape == (1, 4) and cont is None


def test_the_service_shows_the_versions_catalog_snapshot_not_the_live_archive(
    tmp_path: Path,
) -> None:
    """Daytime edits of the archive manifest do not change what last night's index shows."""
    from deploy.artifacts import read_items
    from duch_core import catalog_snapshot, storage
    from duch_core import index_store as ix
    from duch_core.archive import write_archive

    archive = str(tmp_path / "archive" / "manifest.jsonl")
    rows = [
        {"item_id": "a", "image_uri": "a.png", "captions": ["a field"], "label": "f"},
        {"item_id": "b", "image_uri": "b.png", "captions": ["a river"], "label": "r"},
    ]
    write_archive(rows, archive)
    root = str(tmp_path / "index")
    version = ix.new_version_id()
    vdir = ix.version_uri(root, version)
    snapshot = pa.table(
        {
            "item_id": ["a", "b"],
            "image_uri": [str(tmp_path / "archive" / u) for u in ("a.png", "b.png")],
            "captions": [["a field"], ["a river"]],
            "label": ["f", "r"],
            "split": [None, None],
        }
    )
    part = catalog_snapshot.write_catalog_part(vdir, snapshot)
    shard = ix.shard_table(["a"], ["image"], [-1], np.zeros((1, 8), np.uint8), ["fp"], "b1", 64)
    ix.finish_version(
        root,
        version,
        [ix.write_shard(vdir, shard)],
        "b1",
        64,
        archive=archive,
        catalog=ix.catalog_info([part]),
    )
    m = ix.read_latest(root)
    # the archive changes after the encode: a caption edited, an item added
    edited = [{**rows[0], "captions": ["edited"]}, rows[1], {**rows[1], "item_id": "c"}]
    write_archive(edited, archive)
    table = read_items(m)
    assert table.column("item_id").to_pylist() == ["a", "b"]
    assert table.column("captions").to_pylist() == [["a field"], ["a river"]]
    assert Catalog(table).lookup(["a"])[0]["captions"] == ["a field"]
    # a version written before snapshots falls back to the archive it names
    old = IndexManifest.from_dict({**m.to_dict(), "catalog": None}, uri=m.uri)
    assert read_items(old).column("captions").to_pylist()[0] == ["edited"]
    # a snapshot altered after publishing is refused, never shown
    storage.write_bytes(m.resolve(part.path), ix.table_bytes(snapshot.slice(0, 1)))
    with pytest.raises(ix.IndexCorruptError):
        read_items(m)


def test_asymmetric_ranking_is_parsed_with_its_shortlist() -> None:
    limits = Limits(k_cap=10, shortlist_cap=50)
    q = parse_json(b'{"text": "river", "rank": "asymmetric"}', limits)
    assert (q.rank, q.shortlist, q.k) == ("asymmetric", 50, 10)  # 100 capped, >= k
    q = parse_json(b'{"text": "river", "rank": "asymmetric", "shortlist": 3, "k": 5}', limits)
    assert q.shortlist == 5  # never fewer than k
    q = parse_json(b'{"text": "river", "rank": "asymmetric", "shortlist": 30.0}', limits)
    assert q.shortlist == 30
    assert parse_json(b'{"text": "river"}', limits).rank == "hamming"
    assert parse_json(b'{"text": "river"}', limits).shortlist == 0
    form = parse_form({"text": "river", "rank": "asymmetric", "shortlist": "12"}, limits)
    assert (form.rank, form.shortlist) == ("asymmetric", 12)
    for body, needle in (
        (b'{"text": "river", "shortlist": 5}', "only with rank"),
        (b'{"text": "river", "rank": "asymmetric", "shortlist": 51}', "between 1 and 50"),
        (b'{"item_id": "a", "rank": "asymmetric"}', "no continuous code"),
        (b'{"text": "river", "rank": "dot"}', "rank"),
    ):
        status, message = _status(parse_json, body, limits)
        assert status == 422 and needle in message, (body, message)


def test_the_encoder_answers_the_continuous_code_with_the_packed_one() -> None:
    from deploy.encoder import encode_batch
    from duch_core import codes as codes_mod

    rng = np.random.default_rng(0)
    cont = rng.uniform(-1, 1, (3, 16)).astype(np.float32)

    def embed(items: list[str]) -> np.ndarray:
        if "bad" in items:
            raise ValueError("no word")
        return cont[[int(i) for i in items]]

    out = encode_batch(embed, ["2", "bad", "0"])
    assert out[1][0] is None and "no word" in (out[1][1] or "") and out[1][2] is None
    for (packed, err, c), i in zip([out[0], out[2]], [2, 0], strict=True):
        assert err is None
        np.testing.assert_array_equal(c, cont[i])
        np.testing.assert_array_equal(packed, codes_mod.pack(cont[i : i + 1])[0])
    # an encoder with packed codes only: no continuous code
    packed_only = encode_batch(lambda items: codes_mod.pack(cont[: len(items)]), ["a"])
    assert packed_only[0][2] is None and packed_only[0][0].dtype == np.uint8


def test_asymmetric_search_of_one_or_two_searchers_equals_the_full_asymmetric_scan() -> None:
    """With a shortlist covering every (passing) row the answer is the exact asymmetric top-k,
    in one shard set or merged from two; with a filter, among the passing rows."""
    from deploy.searcher import Rerank, build_shard_data, merge_results, search_shard
    from duch_core import asymmetric
    from duch_core import codes as codes_mod
    from duch_core.search import HammingIndex

    rng = np.random.default_rng(3)
    bits, n, k = 32, 300, 12
    u = rng.uniform(-1, 1, (2, bits)).astype(np.float32)
    # few distinct codes: many Hamming ties, which the scores break
    pool = rng.integers(0, 256, (20, bits // 8), dtype=np.uint8)
    codes = pool[rng.integers(0, 20, n)]
    rows = rng.permutation(n * 3)[:n].astype(np.int64)  # global row ids, not positions
    labels = rng.choice(["a", "b", "c"], n)
    items = np.array([f"it{i}" for i in range(n)], dtype=object)
    catalog = pa.table({"item_id": items.tolist(), "label": labels.tolist()})

    def data(sel: np.ndarray) -> Any:
        return build_shard_data(
            codes[sel],
            items[sel],
            np.full(sel.size, -1, np.int32),
            rows[sel],
            bits,
            HammingIndex,
            catalog=catalog,
        )

    whole = data(np.arange(n))
    # two halves and a searcher holding no rows (its empty answer merges in)
    halves = [data(np.arange(0, n, 2)), data(np.arange(1, n, 2)), data(np.arange(0))]
    packed = codes_mod.pack(u)
    for spec in (None, {"label": ["a", "c"]}):
        keep = np.ones(n, bool) if spec is None else np.isin(labels, spec["label"])
        ref_s, ref_i = asymmetric.asymmetric_scan(u, codes[keep], bits, k, ids=rows[keep])
        rr = Rerank(u, n)
        one = search_shard(whole, packed, k, "v", spec, rr)
        two = merge_results(
            [search_shard(h, packed, k, "v", spec, rr) for h in halves], k, lambda p, kk: p[0]
        )
        for res in (one, two):
            np.testing.assert_array_equal(res.ids, ref_i)
            np.testing.assert_allclose(res.score, ref_s, rtol=1e-5, atol=1e-5)
            # each hit's Hamming distance is reported with its score
            want = [
                [
                    int(np.unpackbits(packed[q] ^ codes[np.flatnonzero(rows == r)[0]]).sum())
                    for r in res.ids[q]
                ]
                for q in range(2)
            ]
            assert res.dist.tolist() == want
            assert {whole.item_ids[np.flatnonzero(rows == r)[0]] for r in res.ids.ravel()} == {
                res.item_ids[int(r)] for r in res.ids.ravel()
            }
    # a short shortlist re-ranks the Hamming top-L only
    short = search_shard(whole, packed, 5, "v", None, Rerank(u, 5))
    ham_d, ham_i = whole.index.search(packed, 5)
    assert set(short.ids[0].tolist()) == set(ham_i[0].tolist())
