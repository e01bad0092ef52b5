"""The query service's parts without Ray: request parsing, shard assignment, merging, catalog."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deploy.app import AppArgs
from deploy.artifacts import assign_shards
from deploy.ingress import Catalog
from deploy.queries import (
    Limits,
    RequestError,
    check_text,
    decode_query_image,
    parse_form,
    parse_json,
)

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


def test_text_limits_count_characters_after_stripping() -> None:
    assert check_text(" " * 50 + "a" * 20 + "\n", LIMITS) == "a" * 20
    assert _status(check_text, "a" * 21, LIMITS)[0] == 422
    assert _status(check_text, " \t\n", LIMITS)[0] == 422


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
