"""The archive's items by id, as the service shows them: hits of a search and ``GET /v1/items``.

Each served index version has its own :class:`Catalog`, built from the archive manifest the
version names, so a hit's image and captions always come from the archive that was encoded.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from deploy.models import Hit, Item
from deploy.queries import RequestError
from deploy.searcher import ShardResult
from deploy.thumbnails import thumbnail_url


class Catalog:
    """Archive items by id: image URI, captions, label, split and the geo fields.

    A lookup reads single values straight from the Arrow columns (``chunk[row].as_py()``),
    which for the few hits of a query is much cheaper than ``Table.take(rows).to_pylist()`` on
    a large archive.

    Args:
        table: the archive rows (``item_id`` and any of ``image_uri``, ``captions``, ``label``,
            ``split``); ``None`` for an index that names no archive (hits then carry ids only).

    Raises:
        ValueError: an item id is listed more than once.
    """

    COLUMNS = (
        "image_uri",
        "captions",
        "label",
        "split",
        "bbox",
        "datetime",
        "sensor",
        "crs",
        "bands",
    )

    def __init__(self, table: pa.Table | None) -> None:
        self._rows: dict[str, int] = {}
        # name -> (chunks, first row of each chunk); columns may be chunked differently
        self._columns: dict[str, tuple[list[pa.Array], np.ndarray]] = {}
        self._has_table = table is not None
        if table is None:
            return
        ids = table.column("item_id").to_pylist()
        self._rows = {str(i): n for n, i in enumerate(ids)}
        if len(self._rows) != len(ids):
            raise ValueError("the archive lists an item id more than once")
        for name in self.COLUMNS:
            if name in table.column_names:
                chunks = table.column(name).chunks
                starts = np.cumsum([0] + [len(ch) for ch in chunks], dtype=np.int64)
                self._columns[name] = (chunks, starts)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._rows

    def _value(self, name: str, row: int) -> Any:
        chunks, starts = self._columns[name]
        c = int(np.searchsorted(starts, row, side="right")) - 1
        return chunks[c][row - int(starts[c])].as_py()

    def lookup(self, item_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Archive fields of each id (``None`` for ids the archive does not list)."""
        if not self._has_table:
            return [None] * len(item_ids)
        out: list[dict[str, Any] | None] = []
        for item_id in item_ids:
            row = self._rows.get(item_id)
            out.append(
                None if row is None else {name: self._value(name, row) for name in self._columns}
            )
        return out


def find_item(catalog: Catalog, item_id: str, version: str) -> dict[str, Any]:
    """The archive fields of one item of index ``version`` (404 when it has none)."""
    rec = catalog.lookup([item_id])[0]
    if rec is None:
        raise RequestError(404, f"no item {item_id!r} in index version {version}")
    return rec


def item_response(item_id: str, rec: dict[str, Any], version: str) -> Item:
    """The ``GET /v1/items/{id}`` answer for an item's archive fields."""
    return Item(
        item_id=item_id,
        image_uri=rec.get("image_uri"),
        captions=list(rec.get("captions") or []),
        label=rec.get("label"),
        split=rec.get("split"),
        thumbnail_url=thumbnail_url(item_id),
        index_version=version,
        **geo_fields(rec),
    )


def geo_fields(rec: dict[str, Any] | None) -> dict[str, Any]:
    """``bbox``, ``datetime``, ``sensor`` and ``crs`` of a catalog record (``None`` where the
    archive has none or a value is malformed)."""
    rec = rec or {}
    box = rec.get("bbox")
    values: list[Any] = list(box) if isinstance(box, list | tuple) else []
    ok = len(values) == 4
    ok = ok and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
    out: dict[str, Any] = {"bbox": [float(v) for v in values] if ok else None}
    for name in ("datetime", "sensor", "crs"):
        value = rec.get(name)
        out[name] = None if value is None else str(value)
    return out


def hits_from_result(res: ShardResult, catalog: Catalog, modality: str) -> list[Hit]:
    """The ranked hits of the first query of ``res``, with their archive fields.

    For ``modality == "text"`` each hit also names the matched caption (``caption_index`` into
    the item's captions, and the caption itself when the archive has it).
    """
    rows = [int(i) for i in res.ids[0]]
    item_ids = [res.item_ids[r] for r in rows]
    recs = catalog.lookup(item_ids)
    scores = [None] * len(rows) if res.score is None else [float(v) for v in res.score[0]]
    hits = []
    for rank, (row, item_id, rec, d, score) in enumerate(
        zip(rows, item_ids, recs, res.dist[0], scores, strict=True), start=1
    ):
        captions = list((rec or {}).get("captions") or [])
        cap_idx = res.caption_index.get(row) if modality == "text" else None
        caption = (
            captions[cap_idx] if cap_idx is not None and 0 <= cap_idx < len(captions) else None
        )
        hits.append(
            Hit(
                rank=rank,
                item_id=item_id,
                distance=int(d),
                score=score,
                image_uri=(rec or {}).get("image_uri"),
                captions=captions,
                caption_index=cap_idx,
                caption=caption,
                thumbnail_url=thumbnail_url(item_id),
                **geo_fields(rec),
            )
        )
    return hits


def _ring(w: float, s: float, e: float, n: float) -> list[list[float]]:
    return [[w, s], [e, s], [e, n], [w, n], [w, s]]


def footprint(bbox: list[float] | None) -> dict[str, Any] | None:
    """A GeoJSON geometry of a footprint box: a Polygon, or a MultiPolygon of its two halves
    when it crosses the antimeridian (``min_lon > max_lon``, RFC 7946 section 3.1.9)."""
    if bbox is None:
        return None
    w, s, e, n = bbox
    if w <= e:
        return {"type": "Polygon", "coordinates": [_ring(w, s, e, n)]}
    return {
        "type": "MultiPolygon",
        "coordinates": [[_ring(w, s, 180.0, n)], [_ring(-180.0, s, e, n)]],
    }


def feature(fields: dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON Feature of a hit or an item (its fields as properties; ``bbox`` also as the
    Feature's ``bbox``)."""
    props = {k: v for k, v in fields.items() if k != "bbox"}
    out: dict[str, Any] = {
        "type": "Feature",
        "id": fields["item_id"],
        "geometry": footprint(fields.get("bbox")),
        "properties": props,
    }
    if fields.get("bbox") is not None:
        out["bbox"] = fields["bbox"]
    return out


def feature_collection(response: Any) -> dict[str, Any]:
    """A search answer as a GeoJSON FeatureCollection: one Feature per hit, in rank order (the
    answer's other fields under ``properties`` of the collection, a foreign member)."""
    body = response.model_dump()
    hits = body.pop("hits")
    return {
        "type": "FeatureCollection",
        "features": [feature(h) for h in hits],
        "properties": body,
    }
