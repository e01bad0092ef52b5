"""Scene lists: scene manifests (JSON lines, Parquet), STAC Items/ItemCollections, stac-geoparquet.

Turns a list of acquisitions into :class:`~duch_core.scenes.Scene` objects for tiling, apart
from the tiling itself because it depends on pystac and the list formats, not on GDAL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from duch_core import storage
from duch_core.archive import manifest_dir, resolve_image_uri
from duch_core.chip_io import RASTER_EXTENSIONS, SceneError, _absolute
from duch_core.scenes import Scene, to_utc_iso

__all__ = ["SceneList", "read_scene_list", "scenes_from_stac"]


@dataclass
class SceneList:
    """Scenes read from a scene list, and the entries that could not be used."""

    scenes: list[Scene] = field(default_factory=list)
    errors: list[SceneError] = field(default_factory=list)


_MANIFEST_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines", ".ndjson")


def read_scene_list(uri: str, assets: Sequence[str] = ()) -> SceneList:
    """Read a scene list: a scene manifest, a STAC ItemCollection/Item, or stac-geoparquet.

    Formats, by suffix:

    * ``.json``: a STAC ItemCollection (``FeatureCollection``) or a single Item (``Feature``).
    * ``.jsonl`` (and other JSON-lines suffixes): one scene-manifest row per line
      (:meth:`Scene.from_dict`), or one STAC Item per line.
    * ``.parquet``/``.pq``: stac-geoparquet (an ``id`` and an ``assets`` column) or a scene
      manifest table.

    Args:
        uri: local path or ``s3://``.
        assets: STAC band selection, in channel order (see :func:`scenes_from_stac`).

    Returns:
        :class:`SceneList`; bad entries (missing fields, duplicate ids, unusable items) are in
        ``errors`` and the rest is kept.

    Raises:
        SceneError: stage ``scene_list``: unreadable file, unknown format, no entries at all.
    """
    low = uri.lower().rstrip("/")
    base = manifest_dir(uri)
    try:
        if low.endswith((".parquet", ".pq")):
            out = _from_parquet(uri, base, assets)
        elif low.endswith(".json"):
            obj = json.loads(storage.read_bytes(uri).decode("utf-8"))
            out = scenes_from_stac(obj, uri, assets, base)
        elif low.endswith(_MANIFEST_SUFFIXES):
            out = _from_rows(_json_lines(uri), uri, base, assets)
        else:
            raise SceneError(
                "scene_list",
                f"{uri}: unknown scene list format: use .json (STAC), .jsonl or .parquet",
            )
    except SceneError:
        raise
    except storage.NotFoundError as e:
        raise SceneError("scene_list", f"{uri}: scene list not found") from e
    except (OSError, ValueError, storage.StorageError) as e:
        raise SceneError("scene_list", f"{uri}: cannot read the scene list: {e}") from e
    if not out.scenes and not out.errors:
        raise SceneError("scene_list", f"{uri}: the scene list has no entries")
    return _dedupe(out)


def _json_lines(uri: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(storage.read_bytes(uri).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError(f"line {n} is not a JSON object")
        rows.append(obj)
    return rows


def _from_rows(
    rows: Sequence[Mapping[str, Any]], where: str, base: str, assets: Sequence[str]
) -> SceneList:
    out = SceneList()
    for row in rows:
        try:
            if row.get("type") == "Feature" and "assets" in row:
                out.scenes.append(_scene_from_item(row, base, assets))
            else:
                out.scenes.append(Scene.from_dict(row, base))
        except SceneError as e:
            out.errors.append(e)
    return out


def _from_parquet(uri: str, base: str, assets: Sequence[str]) -> SceneList:
    table = storage.read_parquet(uri)
    rows = table.to_pylist()
    if "assets" in table.column_names and "id" in table.column_names:
        return _from_rows([_geoparquet_item(r) for r in rows], uri, base, assets)
    return _from_rows(rows, uri, base, assets)


def _geoparquet_item(row: dict[str, Any]) -> dict[str, Any]:
    """A stac-geoparquet row (properties as top-level columns) back as a STAC Item dict."""
    top = {
        "type",
        "stac_version",
        "stac_extensions",
        "id",
        "geometry",
        "bbox",
        "links",
        "assets",
        "collection",
    }
    props = {
        k: (to_utc_iso(v) if isinstance(v, datetime) else v) for k, v in row.items() if k not in top
    }
    item_assets = {
        k: {kk: vv for kk, vv in a.items() if vv is not None}
        for k, a in (row.get("assets") or {}).items()
        if a
    }
    return {
        "type": "Feature",
        "stac_version": row.get("stac_version") or "1.0.0",
        "id": row.get("id"),
        "geometry": None,
        "properties": props,
        "links": [],
        "assets": item_assets,
    }


def scenes_from_stac(
    obj: Mapping[str, Any], where: str, assets: Sequence[str] = (), base_dir: str | None = None
) -> SceneList:
    """Scenes from a STAC ItemCollection or Item (a parsed JSON object), through pystac.

    Per item: ``id`` is the scene id; ``properties.datetime`` (or ``start_datetime``) the time;
    ``platform`` (else ``constellation``) the sensor; a ``captions`` property (list of strings),
    if any, the captions. Band files are the item's assets: with ``assets`` given, each entry
    names an asset key, or a band ``name``/``common_name`` from the asset's ``eo:bands`` (or
    STAC 1.1 ``bands``), in channel order; otherwise every asset with role ``data`` (or no role)
    whose media type or file name is a raster, preferring those that describe bands, in the
    item's order. Relative hrefs are resolved against the item's self link, else ``base_dir``.

    Raises:
        SceneError: stage ``scene_list``: not a STAC Item/ItemCollection, or an empty collection.
    """
    kind = obj.get("type") if isinstance(obj, Mapping) else None
    if kind == "Feature":
        items = [dict(obj)]
    elif kind == "FeatureCollection":
        items = list(obj.get("features") or [])
        if not items:
            raise SceneError("scene_list", f"{where}: the STAC ItemCollection has no items")
    else:
        raise SceneError(
            "scene_list", f"{where}: not a STAC ItemCollection or Item (type is {kind!r})"
        )
    out = SceneList()
    for it in items:
        try:
            out.scenes.append(_scene_from_item(it, base_dir, assets))
        except SceneError as e:
            out.errors.append(e)
    return out


_RASTER_TYPES = ("image/tiff", "image/jp2", "image/vnd.stac.geotiff")


def _asset_bands(asset: Any) -> list[Mapping[str, Any]]:
    extra = asset.extra_fields
    bands = extra.get("eo:bands") or extra.get("bands") or []
    return [b for b in bands if isinstance(b, Mapping)]


def _scene_from_item(item: Mapping[str, Any], base_dir: str | None, assets: Sequence[str]) -> Scene:
    import pystac

    sid = item.get("id") if isinstance(item, Mapping) else None
    sid = sid if isinstance(sid, str) and sid else ""
    try:
        parsed = pystac.Item.from_dict(dict(item), preserve_dict=True, migrate=False)
    except Exception as e:  # noqa: BLE001 - pystac raises many types for malformed items
        raise SceneError("scene_list", f"not a valid STAC Item: {e}", sid) from e
    sid = parsed.id
    props = parsed.properties

    def href(a: Any) -> str:
        h = a.get_absolute_href() or a.href
        if base_dir is not None:
            h = _absolute(resolve_image_uri(base_dir, h))
        return str(h)

    if assets:
        chosen = []
        for name in assets:
            found = None
            for key, a in parsed.assets.items():
                names = {key} | {
                    str(b.get(k))
                    for b in _asset_bands(a)
                    for k in ("name", "common_name")
                    if b.get(k)
                }
                if name in names:
                    found = a
                    break
            if found is None:
                raise SceneError(
                    "scene_list",
                    f"no asset or band named {name!r}; assets: {sorted(parsed.assets)}",
                    sid,
                )
            chosen.append(found)
    else:
        data = [
            a
            for a in parsed.assets.values()
            if (not a.roles or "data" in a.roles)
            and (
                (a.media_type or "").split(";")[0].strip() in _RASTER_TYPES
                or a.href.lower().endswith(RASTER_EXTENSIONS)
            )
        ]
        with_bands = [a for a in data if _asset_bands(a)]
        chosen = with_bands or data
        if not chosen:
            raise SceneError(
                "scene_list", f"no raster data assets (assets: {sorted(parsed.assets)})", sid
            )
    when = props.get("datetime") or props.get("start_datetime")
    try:
        when = to_utc_iso(when)
    except ValueError as e:
        raise SceneError("scene_list", f"no usable datetime: {e}", sid) from e
    sensor = props.get("platform") or props.get("constellation") or ""
    captions = props.get("captions") or []
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise SceneError("scene_list", "the 'captions' property must be a list of strings", sid)
    return Scene(
        scene_id=sid,
        bands=tuple(href(a) for a in chosen),
        datetime=when,
        sensor=str(sensor),
        captions=tuple(captions),
    )


def _dedupe(out: SceneList) -> SceneList:
    seen: set[str] = set()
    kept = []
    for s in out.scenes:
        if s.scene_id in seen:
            out.errors.append(
                SceneError("scene_list", "duplicate scene_id (the first one is kept)", s.scene_id)
            )
            continue
        seen.add(s.scene_id)
        kept.append(s)
    out.scenes = kept
    return out
