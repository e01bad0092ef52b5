"""Filtered search, search by item and GeoJSON in the query service, without Ray: an index
version with a catalog snapshot (footprints, acquisition times, sensors) on local disk, the
service's in-process shard store, and brute force as the reference."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from deploy.artifacts import Loaders
from deploy.catalog import feature, feature_collection, footprint, hits_from_result
from deploy.models import SearchResponse
from deploy.queries import Limits, RequestError, parse_json
from deploy.served_index import ServedIndex, shard_groups
from duch_core import catalog_snapshot
from duch_core import index_store as ix
from duch_core.filters import filter_mask
from duch_core.item_metadata import metadata_from_table

BITS = 32
N = 400


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    root = str(tmp_path_factory.mktemp("filtered") / "index")
    ids = [f"scene{i // 20:02d}/r{i % 20:02d}" for i in range(N)]
    lon = rng.uniform(-179, 179, N)
    lat = rng.uniform(-60, 60, N)
    boxes = [
        [float(x), float(y), float(x) + 0.5, float(y) + 0.5] for x, y in zip(lon, lat, strict=True)
    ]
    boxes[0] = [179.8, 10.0, -179.7, 10.5]  # crosses the antimeridian
    boxes[1] = None  # unknown footprint
    days = rng.integers(0, 730, N)
    times = [
        str(np.datetime64("2023-01-01T10:30:00") + np.timedelta64(int(d), "D")) + "Z" for d in days
    ]
    times[2] = None
    sensors = rng.choice(["sentinel-2a", "sentinel-2b", "landsat-8"], N).tolist()
    labels = rng.choice(["forest", "farmland", "harbour"], N).tolist()
    catalog = pa.table(
        {
            "item_id": ids,
            "image_uri": [f"s3://archive/{i}.tif" for i in ids],
            "captions": [[f"caption of {i}", f"another caption of {i}"] for i in ids],
            "label": labels,
            "split": pa.nulls(N, pa.string()),
            "bbox": pa.array(boxes, pa.list_(pa.float64())),
            "datetime": times,
            "sensor": sensors,
            "crs": ["EPSG:32618"] * N,
        }
    )
    version = ix.new_version_id()
    vdir = ix.version_uri(root, version)
    part = catalog_snapshot.write_catalog_part(vdir, catalog)
    img = rng.integers(0, 256, (N, BITS // 8), dtype=np.uint8)
    txt = rng.integers(0, 256, (2 * N, BITS // 8), dtype=np.uint8)
    shards = []
    for half in (slice(0, N // 2), slice(N // 2, N)):
        sel = list(range(N))[half]
        t = ix.shard_table(
            [ids[i] for i in sel] + [ids[i] for i in sel for _ in range(2)],
            ["image"] * len(sel) + ["text"] * 2 * len(sel),
            [-1] * len(sel) + [j for _ in sel for j in range(2)],
            np.concatenate([img[sel], np.concatenate([txt[2 * i : 2 * i + 2] for i in sel])]),
            ["fp"] * 3 * len(sel),
            "b1",
            BITS,
        )
        shards.append(ix.write_shard(vdir, t))
    ix.finish_version(root, version, shards, "b1", BITS, catalog=ix.catalog_info([part]))
    loaders = Loaders()
    index = ServedIndex(root, shard_groups([], 2, loaders, False), loaders, BITS, "b1")
    asyncio.run(index.reload())
    return {"index": index, "catalog": catalog, "img": img, "ids": ids, "loaders": loaders}


def _brute(served: dict[str, Any], query: np.ndarray, spec: dict, k: int) -> list[tuple]:
    """Filter, then rank every image code by (distance, row id): ``[(item_id, distance)]``."""
    index = served["index"]
    codes, item_ids, _, rows = served["loaders"].load_codes(index.state.manifest, "image", None)
    item_ids = item_ids.to_pylist()
    meta = metadata_from_table(
        served["catalog"]
        .take(pa.array([served["ids"].index(i) for i in item_ids], pa.int64()))
        .select(["bbox", "datetime", "label", "split", "sensor"])
    )
    keep = filter_mask(meta, spec)
    bits = np.unpackbits(codes, axis=1).astype(np.int32)
    qb = np.unpackbits(query.reshape(1, -1), axis=1).astype(np.int32)
    dist = (bits != qb).sum(1)
    order = sorted((int(dist[i]), int(rows[i]), item_ids[i]) for i in np.flatnonzero(keep))
    return [(item, d) for d, _, item in order[:k]]


SPECS = [
    {},
    {"bbox": [-30.0, -20.0, 40.0, 50.0]},
    {"bbox": [179.9, 10.1, -179.9, 10.2]},  # only the antimeridian item
    {"bbox": [170.0, -60.0, -170.0, 60.0]},  # a box that crosses the antimeridian too
    {"datetime": "2024-01-01/.."},
    {"datetime": "../2023-03-31"},
    {"datetime": "2023-06-01/2023-06-30", "sensor": "landsat-8"},
    {"sensor": ["sentinel-2a", "sentinel-2b"], "label": "forest"},
    {"bbox": [0.0, 0.0, 1.0, 1.0], "datetime": "2030-01-01/.."},  # nothing passes
    {"label": "harbour", "bbox": [-180.0, -90.0, 180.0, 90.0]},
]


def _search(served: dict[str, Any], query: np.ndarray, spec: dict, k: int) -> SearchResponse:
    index = served["index"]
    st = index.current()
    st, res = asyncio.run(index.search(st, "image", query.reshape(1, -1), k, spec or None))
    hits = hits_from_result(res, st.catalog, "image")
    return SearchResponse(
        index_version=st.version,
        bundle_id=st.bundle_id,
        bits=st.bits,
        query_modality="image",
        target="images",
        k=k,
        hits=hits,
    )


@pytest.mark.parametrize("spec", SPECS, ids=[str(s) for s in SPECS])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_filtered_search_is_the_exact_top_k_among_the_items_that_pass(served, spec, k):
    rng = np.random.default_rng(k)
    for _ in range(3):
        query = rng.integers(0, 256, BITS // 8, dtype=np.uint8)
        got = [(h.item_id, h.distance) for h in _search(served, query, spec, k).hits]
        assert got == _brute(served, query, spec, k)


def test_hits_carry_geo_fields_and_geojson_footprints(served):
    resp = _search(served, served["img"][0], {"bbox": [179.9, 10.1, -179.9, 10.2]}, 5)
    assert [h.item_id for h in resp.hits] == [served["ids"][0]]
    hit = resp.hits[0]
    assert hit.bbox == [179.8, 10.0, -179.7, 10.5] and hit.crs == "EPSG:32618"
    assert hit.sensor in ("sentinel-2a", "sentinel-2b", "landsat-8") and hit.datetime
    fc = feature_collection(resp)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 1
    geom = fc["features"][0]["geometry"]
    assert geom["type"] == "MultiPolygon"  # split at the antimeridian (RFC 7946 3.1.9)
    west, east = geom["coordinates"]
    assert west[0][1] == [180.0, 10.0] and east[0][0] == [-180.0, 10.0]
    assert fc["features"][0]["properties"]["distance"] == 0
    assert fc["properties"]["index_version"] == resp.index_version
    assert footprint([1.0, 2.0, 3.0, 4.0]) == {
        "type": "Polygon",
        "coordinates": [[[1.0, 2.0], [3.0, 2.0], [3.0, 4.0], [1.0, 4.0], [1.0, 2.0]]],
    }
    unknown = feature({"item_id": "x", "bbox": None})
    assert unknown["geometry"] is None and "bbox" not in unknown


def test_an_item_query_uses_its_stored_code_and_this_place_other_dates_is_one_request(served):
    index = served["index"]
    st = index.current()
    item = served["ids"][5]
    code = asyncio.run(index.code_of(st, "image", item))
    assert code.tobytes() == served["img"][5].tobytes()
    resp = _search(served, code[0], {}, 3)
    assert resp.hits[0].item_id == item and resp.hits[0].distance == 0
    # "this place, other dates": the item's code, its own footprint as the box
    box = served["catalog"].column("bbox")[5].as_py()
    spec = {"bbox": box, "datetime": "2023-01-01/.."}
    got = [(h.item_id, h.distance) for h in _search(served, code[0], spec, 10).hits]
    assert got == _brute(served, code[0], spec, 10) and got[0] == (item, 0)
    with pytest.raises(RequestError) as e:
        asyncio.run(index.code_of(st, "image", "no/such/item"))
    assert e.value.status == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"text": "river", "filter": {"bbox": [0, 50, 1, 10]}}', "bbox"),
        ('{"text": "river", "filter": {"bbox": [0, 0, 200, 10]}}', "bbox"),
        ('{"text": "river", "filter": {"bbox": [0, 0, 1]}}', "bbox"),
        ('{"text": "river", "filter": {"datetime": "last summer"}}', "datetime"),
        ('{"text": "river", "filter": {"datetime": "2024-13-01/.."}}', "datetime"),
        ('{"text": "river", "filter": {"cloud_cover": 10}}', "cloud_cover"),
        ('{"text": "river", "filter": {"sensor": 3}}', "sensor"),
        ('{"item_id": ""}', "item_id"),
        ('{"item_id": "a", "text": "river"}', "item_id"),
    ],
)
def test_bad_filters_and_item_queries_are_422_naming_the_field(body, field):
    with pytest.raises(RequestError) as e:
        parse_json(body.encode(), Limits())
    assert e.value.status == 422 and field in e.value.message, e.value.message


def test_good_filters_parse():
    q = parse_json(
        b'{"item_id": "scene01/r03", "k": 5, "filter": {"bbox": [170, -10, -170, 10], '
        b'"datetime": "2024-01-01/..", "sensor": ["landsat-8"]}}',
        Limits(),
    )
    assert q.modality == "item" and q.item_id == "scene01/r03" and q.k == 5
    assert q.filter == {
        "bbox": [170.0, -10.0, -170.0, 10.0],
        "datetime": "2024-01-01/..",
        "sensor": ["landsat-8"],
    }


def test_the_served_catalog_is_the_snapshot(served, tmp_path: Path):
    st = served["index"].current()
    assert len(st.catalog) == N
    rec = st.catalog.lookup([served["ids"][0]])[0]
    assert rec["bbox"] == [179.8, 10.0, -179.7, 10.5] and rec["crs"] == "EPSG:32618"
