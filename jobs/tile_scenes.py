"""Cut georeferenced scenes into chips: an archive manifest of windows, not of pixel copies.

    python jobs/tile_scenes.py --scenes URI [--scenes URI ...] --out URI
        [--config configs/tile_scenes.yaml] [--set key=value ...]
    ray job submit --working-dir . -- python jobs/tile_scenes.py --scenes ... --out ...

Scene lists (:func:`duch_core.scene_lists.read_scene_list`): scene manifests (JSON lines or Parquet:
``scene_id``, ``bands`` or ``image_uri``, ``datetime``, ``sensor``, ``captions``), STAC
ItemCollections (``.json``) and stac-geoparquet files, local or on S3. They are small metadata
and are read on the driver; the band files are only opened by the tasks.

Pipeline (Ray Data):

1. **Plan** (one task per scene): open the band files' headers, build the chip grid
   (:func:`duch_core.scenes.tile_scene` with no chip rows), read the last pixel of every band
   file (``check_read``: truncated files fail here) and split the scene into tasks of
   ``rows_per_task`` chip rows, so a big scene is tiled by several tasks.
2. **Tile** (one task per row band): chip rows with WGS84 boxes; masks are read only for files
   that have nodata; each task writes its chips as one Parquet part of the manifest and returns
   counts. A failing scene returns an error row instead.
3. **Write** (driver, small): ``errors.parquet``, ``summary.json``, then ``LATEST``.

Output, a new version per run (nothing is overwritten)::

    <out>/versions/<version>/manifest.parquet/part-<time>-<scene key>-<first chip row>.parquet
    <out>/versions/<version>/errors.parquet     scene_id, stage, reason, source
    <out>/versions/<version>/summary.json       counts, errors by stage, resolved config
    <out>/LATEST                                the version id, written last

``manifest.parquet`` is an archive manifest (a directory of Parquet parts) that
:func:`duch_core.archive.read_archive` and the encode job read: ``item_id``, ``image_uri`` (a chip
URI, see :mod:`duch_core.chip_io`), ``captions``, and the metadata ``scene_id``, ``bands``,
``crs``, ``bounds``, ``bbox``, ``datetime``, ``sensor``, ``nodata_fraction``. A scene is either
wholly in the manifest or in the errors table: parts of a scene that failed are removed from the
run's own version.

Bad scenes never stop the run: a :class:`~duch_core.chip_io.SceneError` is recorded with its stage,
any other failure of one scene with stage ``internal``. When the share of scenes with an error exceeds
``max_error_rate`` the version is written for inspection but ``LATEST`` is not moved (exit 1).
Exit status: 0 done, 1 error rate over the limit or the run failed, 2 bad arguments or no usable
scene at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from duch_core import config as config_mod
from duch_core import pointers, storage
from duch_core.chip_io import SceneError
from duch_core.scene_lists import read_scene_list
from duch_core.scenes import Scene, tile_scene
from jobs import _common

log = logging.getLogger("duch.tile_scenes")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("scene_id", pa.string()),
        pa.field("bands", pa.list_(pa.string())),
        pa.field("crs", pa.string()),
        pa.field("bounds", pa.list_(pa.float64())),
        pa.field("bbox", pa.list_(pa.float64())),
        pa.field("datetime", pa.string()),
        pa.field("sensor", pa.string()),
        pa.field("nodata_fraction", pa.float64()),
    ]
)
"""Columns of the chip manifest parts (label and split are added as nulls by the reader)."""

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("scene_id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("source", pa.string()),
    ]
)


@dataclass(frozen=True)
class TileConfig:
    """Configuration of the tiling job (``configs/tile_scenes.yaml``)."""

    scenes: tuple[str, ...] = ()  # scene list URIs (manifest .jsonl/.parquet, STAC .json)
    out: str = ""  # output root (LATEST + versions/)
    assets: tuple[str, ...] = ()  # STAC assets / band names, channel order; () = all data assets
    chip_size: int = 256  # chip side, grid pixels
    overlap: int = 0  # pixels shared by neighbouring chips
    resolution: float = 0.0  # grid pixel size in CRS units; 0 = the finest band's
    edge: str = "clip"  # clip: exact tiling, smaller edge chips | shift: all chips full size
    max_nodata: float = 0.5  # chips with a larger nodata fraction are skipped
    footprint_tolerance: float = 1.0  # band footprints may differ by this many of their pixels
    check_read: bool = True  # read one pixel per band file so truncated files are caught here
    rows_per_task: int = 8  # chip rows per tiling task
    task_cpus: float = 0.25  # CPUs per plan/tile task
    max_error_rate: float = 0.5  # above this share of failed scenes LATEST is not moved


EXPECTED_ERRORS = (config_mod.ConfigError, _common.LocationError)


class NoScenesError(ValueError):
    """No scene list yielded a usable scene."""


# --------------------------------------------------------------------------------------------
# stage functions (module level so Ray pickles them by reference)


def _tile_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "chip_size": cfg["chip_size"],
        "overlap": cfg["overlap"],
        "resolution": cfg["resolution"] or None,
        "max_nodata": cfg["max_nodata"],
        "edge": cfg["edge"],
        "footprint_tolerance": cfg["footprint_tolerance"],
    }


def _failure(e: Exception, scene_id: str) -> tuple[str, str]:
    """``(stage, reason)`` of a failed scene; anything but a SceneError is stage ``internal``."""
    if isinstance(e, SceneError):
        return e.stage, e.reason
    log.exception("scene %s failed unexpectedly", scene_id)
    return "internal", f"{type(e).__name__}: {e}"


def plan_scene(row: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One task row per ``rows_per_task`` chip rows of a scene, or one error row."""
    scene = Scene.from_dict(json.loads(row["scene"]))
    base = {"scene": row["scene"], "scene_id": scene.scene_id, "stage": "", "reason": ""}
    try:
        tiles = tile_scene(
            scene, chip_rows=(0, 0), check_read=cfg["check_read"], **_tile_kwargs(cfg)
        )
    except Exception as e:  # noqa: BLE001 - one bad scene must not stop the run
        stage, reason = _failure(e, scene.scene_id)
        return [{**base, "start": -1, "stop": -1, "stage": stage, "reason": reason}]
    n = tiles.chip_rows
    step = cfg["rows_per_task"]
    return [{**base, "start": s, "stop": min(s + step, n)} for s in range(0, n, step)]


def part_uri(version_dir: str, scene: Scene, start: int) -> str:
    """The manifest part of one task, named by scene and first chip row, so reruns replace it.

    The name starts with the acquisition time (UTC, digits only), so the parts, read in name
    order, list the chips in time order and each scene's chips together: the order the encode
    job keeps in the index, which filtered search reads in runs.
    """
    key = hashlib.sha1(scene.scene_id.encode("utf-8")).hexdigest()[:16]
    digits = re.sub(r"[^0-9T]", "", scene.datetime)
    when = (digits + "0" * 21)[:21] if digits else "undated"  # fixed width: sorts by time
    name = f"part-{when}-{key}-{start:06d}.parquet"
    return storage.join(version_dir, "manifest.parquet", name)


def tile_task(row: dict[str, Any], cfg: dict[str, Any], version_dir: str) -> dict[str, Any]:
    """Tile one row band of a scene and write its manifest part; returns counts or the error."""
    out = {
        "scene_id": row["scene_id"],
        "chips": 0,
        "skipped_nodata": 0,
        "part": "",
        "stage": row["stage"],
        "reason": row["reason"],
    }
    if row["stage"]:
        return out
    scene = Scene.from_dict(json.loads(row["scene"]))
    try:
        tiles = tile_scene(
            scene, chip_rows=(row["start"], row["stop"]), check_read=False, **_tile_kwargs(cfg)
        )
    except Exception as e:  # noqa: BLE001 - one bad scene must not stop the run
        stage, reason = _failure(e, scene.scene_id)
        return {**out, "stage": stage, "reason": reason}
    out["skipped_nodata"] = tiles.skipped_nodata
    if tiles.rows:
        uri = part_uri(version_dir, scene, row["start"])
        storage.write_parquet(uri, pa.Table.from_pylist(tiles.rows, schema=MANIFEST_SCHEMA))
        out.update(chips=len(tiles.rows), part=uri)
    return out


# --------------------------------------------------------------------------------------------
# driver


def read_scene_lists(cfg: TileConfig) -> tuple[list[tuple[Scene, str]], list[dict[str, str]]]:
    """``(scene, scene list URI)`` of all scene lists (first occurrence of an id wins), and the
    errors (one per unusable entry or unreadable list)."""
    scenes: list[tuple[Scene, str]] = []
    errors: list[dict[str, str]] = []
    seen: set[str] = set()
    for uri in cfg.scenes:
        try:
            listed = read_scene_list(uri, assets=cfg.assets)
        except SceneError as e:
            errors.append({"scene_id": "", "stage": e.stage, "reason": e.reason, "source": uri})
            continue
        for bad in listed.errors:
            errors.append(
                {"scene_id": bad.scene_id, "stage": bad.stage, "reason": bad.reason, "source": uri}
            )
        for s in listed.scenes:
            if s.scene_id in seen:
                errors.append(
                    {
                        "scene_id": s.scene_id,
                        "stage": "scene_list",
                        "reason": "duplicate scene_id (also in an earlier scene list)",
                        "source": uri,
                    }
                )
                continue
            seen.add(s.scene_id)
            scenes.append((s, uri))
    return scenes, errors


def run(cfg: TileConfig) -> dict[str, Any]:
    """Tile every scene; returns the summary (also written as ``summary.json``)."""
    import ray.data

    t0 = time.monotonic()
    listed, errors = read_scene_lists(cfg)
    if not listed:
        why = "; ".join(f"{e['source']}: [{e['stage']}] {e['reason']}" for e in errors[:5])
        raise NoScenesError(f"no usable scene in {list(cfg.scenes)}" + (f": {why}" if why else ""))
    _common.ensure_ray()
    _common.check_shared_locations({"out": cfg.out})
    version = pointers.new_version_id()
    vdir = storage.join(cfg.out, "versions", version)
    scenes = [s for s, _ in listed]
    source_of = {s.scene_id: src for s, src in listed}
    plain = config_mod.to_dict(cfg)

    items = [{"scene": json.dumps(s.to_dict())} for s in scenes]
    plan = (
        ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
        .flat_map(functools.partial(plan_scene, cfg=plain), num_cpus=cfg.task_cpus)
        .materialize()
    )
    n_tasks = plan.count()
    results = (
        plan.repartition(n_tasks)
        .map(functools.partial(tile_task, cfg=plain, version_dir=vdir), num_cpus=cfg.task_cpus)
        .take_all()
    )

    failed: dict[str, dict[str, str]] = {}
    for r in results:
        if r["stage"] and r["scene_id"] not in failed:
            failed[r["scene_id"]] = {
                "scene_id": r["scene_id"],
                "stage": r["stage"],
                "reason": r["reason"],
                "source": source_of.get(r["scene_id"], ""),
            }
    # a scene is all in the manifest or all in the errors table: drop the parts of failed scenes
    for r in results:
        if r["part"] and r["scene_id"] in failed:
            storage.delete(r["part"], missing_ok=True)
    good = [r for r in results if r["scene_id"] not in failed]
    chips = sum(r["chips"] for r in good)
    manifest = storage.join(vdir, "manifest.parquet")
    if chips == 0:  # an empty archive is still a readable manifest
        storage.write_parquet(
            storage.join(manifest, "part-empty.parquet"), MANIFEST_SCHEMA.empty_table()
        )
    errors += list(failed.values())
    storage.write_parquet(
        storage.join(vdir, "errors.parquet"), pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
    )

    # every error row is one failed entry: a scene, a bad scene-list entry or a whole list
    failed_share = len(errors) / (len(scenes) + len(errors) - len(failed))
    publish = failed_share <= cfg.max_error_rate
    summary = {
        "version": version,
        "manifest": manifest,
        "errors_table": storage.join(vdir, "errors.parquet"),
        "scene_lists": list(cfg.scenes),
        "scenes": len(scenes),
        "scenes_tiled": len(scenes) - len(failed),
        "scenes_failed": len(failed),
        "chips": chips,
        "chips_skipped_nodata": sum(r["skipped_nodata"] for r in good),
        "errors": len(errors),
        "errors_by_stage": dict(sorted(Counter(e["stage"] for e in errors).items())),
        "tasks": n_tasks,
        "seconds": round(time.monotonic() - t0, 3),
        "published": publish,
        "exit_code": _common.EXIT_OK if publish else _common.EXIT_FAILED,
        "config": plain,
    }
    storage.write_json(storage.join(vdir, "summary.json"), summary)
    if publish:
        pointers.publish_pointer(storage.join(cfg.out, "LATEST"), version)
    return summary


def report(summary: dict[str, Any]) -> str:
    """The short console summary."""
    by_stage = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_stage"].items())
    lines = [
        f"tiled {summary['scenes_tiled']} of {summary['scenes']} scenes into {summary['chips']} "
        f"chips ({summary['chips_skipped_nodata']} skipped as nodata) in {summary['seconds']:.1f} s",
        f"errors: {summary['errors']}" + (f" ({by_stage})" if by_stage else ""),
        f"manifest: {summary['manifest']}",
        f"errors table: {summary['errors_table']}",
        f"version {summary['version']} "
        + (
            "published (LATEST)"
            if summary["published"]
            else "NOT published: error rate over max_error_rate"
        ),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str = "tile_scenes") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Cut georeferenced scenes (GeoTIFF/COG/JPEG 2000, local or S3) into chips and "
        "write an archive manifest of chip windows (Ray Data).",
    )
    p.add_argument(
        "--scenes",
        action="append",
        default=[],
        metavar="URI",
        help="scene list (manifest .jsonl/.parquet, STAC .json, stac-geoparquet); repeatable; "
        "replaces the config's list",
    )
    p.add_argument("--out", help="output root URI (LATEST and versions/ live there)")
    _common.add_common_arguments(p, config_required=False)
    return p


def load_config(args: argparse.Namespace, require_locations: bool = True) -> TileConfig:
    """The config file, ``--set`` overrides, then ``--scenes/--out``; validated.

    Raises:
        ConfigError: unknown key, wrong type, a value out of range, or a missing location.
    """
    cfg = config_mod.load(TileConfig, args.config, args.set)
    if args.scenes:
        cfg = dataclasses.replace(cfg, scenes=tuple(args.scenes))
    if args.out:
        cfg = dataclasses.replace(cfg, out=args.out)
    if require_locations and (not cfg.scenes or not cfg.out):
        raise config_mod.ConfigError("give at least one --scenes URI and --out")
    if cfg.chip_size < 1 or not 0 <= cfg.overlap < cfg.chip_size:
        raise config_mod.ConfigError(
            f"need chip_size >= 1 and 0 <= overlap < chip_size, got {cfg.chip_size}, {cfg.overlap}"
        )
    if cfg.edge not in ("clip", "shift"):
        raise config_mod.ConfigError(f"edge must be clip or shift, got {cfg.edge!r}")
    if cfg.resolution < 0 or cfg.footprint_tolerance < 0 or cfg.task_cpus <= 0:
        raise config_mod.ConfigError(
            "resolution and footprint_tolerance must be >= 0, task_cpus > 0"
        )
    if cfg.rows_per_task < 1:
        raise config_mod.ConfigError(f"rows_per_task must be >= 1, got {cfg.rows_per_task}")
    for key in ("max_nodata", "max_error_rate"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise config_mod.ConfigError(f"{key} must be in [0, 1], got {getattr(cfg, key)}")
    return cfg


def main(argv: list[str] | None = None, prog: str = "tile_scenes") -> int:
    """Run the job. Exit status: 0 done, 1 failed or error rate over the limit, 2 bad input."""
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        cfg = load_config(args, require_locations=not args.print_config)
    except config_mod.ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    if args.print_config:
        _common.print_config(cfg)
        return _common.EXIT_OK

    def body() -> int:
        summary = run(cfg)
        print(report(summary))
        return int(summary["exit_code"])

    return _common.run_cli(prog, body, (*EXPECTED_ERRORS, NoScenesError))


if __name__ == "__main__":
    sys.exit(main())
