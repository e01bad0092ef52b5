"""The nightly encode job end to end: real local Ray, real S3 (SeaweedFS), tiny towers.

One archive of 1,000+ generated images (PNG and JPEG, 32x32) with captions, including corrupt
files, truncated JPEGs, a zero-byte object, a missing object, bad captions and 16-bit and
multi-band TIFF/PNG files, is built once on S3. Codes in the published index are compared with the
in-memory ``HashEncoder``. The bundle selects bands ``(2, 1, 0)`` so that a job ignoring the
bundle's band rule would produce different codes.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from duch_core import catalog_snapshot, retention, storage
from duch_core import index_store as ix

REPO = Path(__file__).resolve().parents[1]
BITS = 32
N_GOOD = 1000
SMOKE = str(REPO / "configs" / "encode_smoke.yaml")
BANDS = (2, 1, 0)  # image_backbone.bands of the test bundle


# --------------------------------------------------------------------------------------------
# fixtures: a bundle with tiny towers and a generated archive


def _make_bundle(uri: str, seed: int, bands: tuple[int, ...] = BANDS) -> str:
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=BITS, hidden_dim=32),
        image_backbone=ImageBackboneConfig(
            source="tiny:resnet", image_size=32, center_crop=0, seed=seed, bands=bands
        ),
        text_backbone=TextBackboneConfig(source="tiny:bert", seed=seed),
    )
    save_untrained_bundle(uri, cfg, seed)
    return uri


def _image_bytes(rng: np.random.Generator, fmt: str, size: int = 32) -> bytes:
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    img = (base + 40 * np.sin(xx / rng.uniform(2, 6))[..., None]).astype(np.float64)
    img = img + rng.normal(0, 20, (size, size, 3)) + (yy[..., None] * rng.uniform(0, 3))
    arr = np.clip(img, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _wide_image_bytes(rng: np.random.Generator, kind: str, size: int = 32) -> bytes:
    """16-bit and multi-band files: ``tif16x3``, ``tif16x4``, ``tif8x5`` (TIFF), ``png16`` (grey)."""
    import tifffile

    yy, xx = np.mgrid[0:size, 0:size]
    bands = {"tif16x3": 3, "tif16x4": 4, "tif8x5": 5, "png16": 1}[kind]
    top = 255 if kind == "tif8x5" else 4095  # 12-bit data in 16-bit files, as Landsat-8
    ramp = (xx[..., None] * rng.uniform(0.2, 1.0, bands) + yy[..., None]) / (2 * size)
    arr = np.clip(ramp * top + rng.normal(0, top / 20, (size, size, bands)), 0, top)
    arr = arr.astype(np.uint8 if kind == "tif8x5" else np.uint16)
    buf = io.BytesIO()
    if kind == "png16":
        Image.fromarray(arr[..., 0]).save(buf, format="PNG")
    else:
        photometric = "rgb" if bands == 3 else "minisblack"
        tifffile.imwrite(buf, arr, photometric=photometric, planarconfig="contig")
    return buf.getvalue()


WIDE = ("tif16x3", "tif16x4", "tif8x5", "png16")

WORDS = ["river", "forest", "field", "road", "houses", "beach", "lake", "airport", "green", "dense"]


def _captions(rng: np.random.Generator, k: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(3, 7))) + "." for _ in range(k)]


@dataclass
class Archive:
    manifest: str
    rows: list[dict]
    bad_images: dict[str, str] = field(default_factory=dict)  # item id -> expected stage
    bad_captions: set[tuple[str, int]] = field(default_factory=set)


def _write_all(objs: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: storage.write_bytes(kv[0], kv[1]), objs.items()))


def _make_archive(prefix: str, n_good: int, seed: int = 0) -> Archive:
    rng = np.random.default_rng(seed)
    objs: dict[str, bytes] = {}
    rows: list[dict] = []
    for i in range(n_good):
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
        rel = f"images/g{i:05d}.{ext}"
        objs[storage.join(prefix, rel)] = _image_bytes(rng, fmt)
        rows.append({"item_id": f"g{i:05d}", "image_uri": rel, "captions": _captions(rng, 3)})
    arch = Archive(manifest=storage.join(prefix, "manifest.parquet"), rows=rows)
    # good 16-bit and multi-band images (decoded by the bundle's band and bit-depth rule)
    for kind in WIDE:
        rel = f"images/{kind}.{'png' if kind == 'png16' else 'tif'}"
        objs[storage.join(prefix, rel)] = _wide_image_bytes(rng, kind)
        rows.append({"item_id": f"wide_{kind}", "image_uri": rel, "captions": _captions(rng, 1)})
    # bad images: corrupt bytes, truncated JPEGs, a zero-byte object, a missing object
    for k in range(3):
        rel = f"images/corrupt{k}.png"
        objs[storage.join(prefix, rel)] = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
        rows.append({"item_id": f"bad_corrupt{k}", "image_uri": rel, "captions": _captions(rng, 1)})
        arch.bad_images[f"bad_corrupt{k}"] = "decode"
    for k in range(2):
        rel = f"images/trunc{k}.jpg"
        good = _image_bytes(rng, "JPEG", 48)
        objs[storage.join(prefix, rel)] = good[: len(good) // 3]
        rows.append({"item_id": f"bad_trunc{k}", "image_uri": rel, "captions": _captions(rng, 1)})
        arch.bad_images[f"bad_trunc{k}"] = "decode"
    objs[storage.join(prefix, "images/empty.png")] = b""
    rows.append({"item_id": "bad_empty", "image_uri": "images/empty.png", "captions": []})
    arch.bad_images["bad_empty"] = "decode"
    rows.append({"item_id": "bad_missing", "image_uri": "images/nope.png", "captions": ["a lake"]})
    arch.bad_images["bad_missing"] = "fetch"
    # bad captions on items with good images: empty, blank and oversized
    for k, caps in enumerate((["", "a river near a forest"], ["   "], ["x" * 5000, "ok field"])):
        rel = f"images/cap{k}.png"
        objs[storage.join(prefix, rel)] = _image_bytes(rng, "PNG")
        rows.append({"item_id": f"badcap{k}", "image_uri": rel, "captions": caps})
    arch.bad_captions |= {("badcap0", 0), ("badcap1", 0), ("badcap2", 0)}
    _write_all(objs)
    from duch_core.archive import write_archive

    write_archive(rows, arch.manifest)
    return arch


@pytest.fixture(scope="module")
def bundle(s3_server):
    from uuid import uuid4

    return _make_bundle(f"s3://{s3_server.bucket}/encode-bundles/{uuid4().hex}/a", seed=0)


@pytest.fixture(scope="module")
def archive(s3_server):
    from uuid import uuid4

    return _make_archive(f"s3://{s3_server.bucket}/encode-archive/{uuid4().hex}", N_GOOD)


@pytest.fixture(scope="module")
def reference(bundle, archive):
    """Codes of every good image and caption from the in-memory encoder: {(id, cap): code}."""
    from duch_core.bundle import Bundle
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import decode_image, decode_options

    enc = HashEncoder(Bundle.load(bundle))
    opts = decode_options(enc.bundle.config.image_backbone)
    assert opts["bands"] == BANDS
    base = archive.manifest.rpartition("/")[0]
    good = [r for r in archive.rows if r["item_id"] not in archive.bad_images]
    data = [storage.read_bytes(storage.join(base, r["image_uri"])) for r in good]
    imgs = [decode_image(d, **opts) for d in data]
    # the band rule must matter for these codes, else the test could not catch a job ignoring it
    plain = enc.encode_images([decode_image(d) for d in data[:64]])
    assert (plain != enc.encode_images(imgs[:64])).any()
    ref: dict[tuple[str, int], bytes] = {}
    for s in range(0, len(imgs), 128):
        codes = enc.encode_images(imgs[s : s + 128])
        for r, c in zip(good[s : s + 128], codes, strict=True):
            ref[(r["item_id"], -1)] = c.tobytes()
    texts, keys = [], []
    for r in archive.rows:
        for j, t in enumerate(r["captions"]):
            if (r["item_id"], j) not in archive.bad_captions:
                texts.append(t)
                keys.append((r["item_id"], j))
    for s in range(0, len(texts), 256):
        for k, c in zip(keys[s : s + 256], enc.encode_texts(texts[s : s + 256]), strict=True):
            ref[k] = c.tobytes()
    return ref


@pytest.fixture(scope="module")
def full_run(ray_session, bundle, archive):
    """One uninterrupted run of the job over the archive (reused by several tests)."""
    import contextlib

    from jobs import encode

    out = f"{archive.manifest.rpartition('/')[0]}-index-full"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        rc = encode.main(_argv(bundle, archive.manifest, out))
    return rc, out, console.getvalue()


def _argv(bundle: str, manifest: str, out: str, *sets: str) -> list[str]:
    argv = ["--bundle", bundle, "--archive", manifest, "--out", out, "--config", SMOKE]
    for s in sets:
        argv += ["--set", s]
    return argv


def _index_rows(root: str) -> pa.Table:
    m = ix.read_latest(root)
    t = ix.read_rows(m)
    return t.sort_by(
        [("modality", "ascending"), ("item_id", "ascending"), ("caption_index", "ascending")]
    )


def _summary(root: str) -> dict:
    m = ix.read_latest(root)
    return storage.read_json(m.resolve(ix.SUMMARY_NAME))


# --------------------------------------------------------------------------------------------
# tests


def test_full_encode_matches_in_memory_encoder(full_run, archive, reference, bundle):
    rc, out, printed = full_run
    assert rc == 0
    m = ix.read_latest(out)
    meta = storage.read_json(storage.join(bundle, "meta.json"))
    ix.validate(m, BITS, meta["bundle_id"])
    # the console gets a short report naming the version and where it is
    assert printed.startswith(f"version {m.version} published")
    assert m.base_uri in printed and len(printed.strip().splitlines()) <= 6
    rows = _index_rows(out)
    keys = list(
        zip(
            rows.column("item_id").to_pylist(),
            rows.column("caption_index").to_pylist(),
            strict=True,
        )
    )
    assert len(keys) == len(set(keys)), "duplicate rows in the index"
    assert set(keys) == set(reference), "index rows differ from the good items and captions"
    codes = ix.codes_from_column(rows.column("code"), BITS)
    mismatched = [k for k, c in zip(keys, codes, strict=True) if c.tobytes() != reference[k]]
    assert not mismatched, f"{len(mismatched)} codes differ from HashEncoder, e.g. {mismatched[:3]}"
    n_img = N_GOOD + 3 + len(WIDE)  # good images, the items with bad captions, wide images
    assert m.counts["image"] == n_img
    assert m.counts["text"] == len(reference) - n_img
    assert set(rows.column("bundle_id").to_pylist()) == {meta["bundle_id"]}

    errors = ix.read_errors(m)
    got = {(r["item_id"], r["stage"], r["caption_index"]) for r in errors.to_pylist()}
    want = {(i, stage, -1) for i, stage in archive.bad_images.items()}
    want |= {(i, "caption", j) for i, j in archive.bad_captions}
    assert got == want
    reasons = {r["item_id"]: r["reason"] for r in errors.to_pylist() if r["caption_index"] == -1}
    assert "0 bytes" in reasons["bad_empty"]
    assert "not found" in reasons["bad_missing"]
    assert all(reasons[i] for i in archive.bad_images)

    # the catalog snapshot: every valid archive row, image URIs resolved, checksummed
    cat = catalog_snapshot.read_catalog(m)
    base = archive.manifest.rpartition("/")[0]
    assert cat.column("item_id").to_pylist() == sorted(r["item_id"] for r in archive.rows)
    first = cat.slice(0, 1).to_pylist()[0]
    row = next(r for r in archive.rows if r["item_id"] == first["item_id"])
    assert first["image_uri"] == storage.join(base, row["image_uri"])
    assert first["captions"] == row["captions"]
    # the index names the immutable pinned copy of the bundle it was encoded with
    assert m.bundle_uri == storage.join(out, "bundles", meta["bundle_id"])
    assert m.bundle_source == bundle and m.previous_version is None
    assert storage.read_json(storage.join(m.bundle_uri, "meta.json")) == meta
    assert not storage.exists(storage.join(out, ix.LOCK_NAME))  # released

    s = _summary(out)
    assert s["encoded_items"] == len(archive.rows) and s["carried_over_items"] == 0
    assert s["stale_items"] == 0 and s["unavailable_items"] == 0
    assert s["encoded_images"] == n_img
    assert s["failed_items"] == len(archive.bad_images) + len(archive.bad_captions)
    assert s["shards"] == len(m.shards) > 1
    assert s["bytes"] == sum(sh.bytes for sh in m.shards)
    assert s["images_per_second"] > 0 and s["encode_seconds"] > 0 and s["published"] is True
    assert s["errors_by_stage"] == {"decode": 6, "fetch": 1, "caption": 3}
    assert {f"wide_{k}" for k in WIDE} <= set(rows.column("item_id").to_pylist())
    # every good item exactly once on the image side
    _, ids, caps, row_ids = ix.load_codes(m, "image")
    assert len(set(ids.to_pylist())) == len(ids) == n_img
    assert (caps == -1).all() and len(np.unique(row_ids)) == len(row_ids)


def test_dry_run_reports_and_writes_nothing(full_run, bundle, archive, capsys):
    from jobs import encode

    _, out, _ = full_run
    before = storage.list_prefix(out)
    args = encode.build_parser().parse_args(_argv(bundle, archive.manifest, out))
    report = encode.run(encode.load_config(args), dry_run=True)
    assert report["dry_run"] is True
    bad = len(archive.bad_images) + len(archive.bad_captions)
    assert report["unchanged"] == len(archive.rows) - bad
    assert report["changed"] == bad  # items that failed last time are retried
    assert report["new"] == 0 and report["deleted"] == 0
    assert report["would_encode"] == bad and report["full_reencode"] is False
    assert report["previous_version"] == ix.read_latest_version(out)
    assert storage.list_prefix(out) == before

    # the same archive as JSON lines (parsed in Ray tasks), through the CLI: the same plan,
    # told in a few lines
    from duch_core.archive import write_archive

    jsonl = write_archive(archive.rows, archive.manifest.replace(".parquet", ".jsonl"))
    capsys.readouterr()
    assert encode.main(_argv(bundle, jsonl, out) + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert len(printed.strip().splitlines()) <= 3 and "nothing written" in printed
    assert (
        f"{report['archive_items']} archive items: 0 new, {bad} changed, "
        f"{report['unchanged']} unchanged, 0 deleted (incremental)"
    ) in printed
    assert f"would encode {bad} and carry over {report['unchanged']} items" in printed
    assert storage.list_prefix(out) == before


def test_nightly_schedule_submits_this_job_with_a_valid_config(monkeypatch):
    """deploy/nightly-encode.cron: one well-formed cron line whose command this job accepts."""
    import shlex

    from jobs import encode

    lines = [ln for ln in (REPO / "deploy" / "nightly-encode.cron").read_text().splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines if "=" in ln.split()[0])
    entries = [ln for ln in lines if "=" not in ln.split()[0]]
    assert len(entries) == 1
    minute, hour, dom, mon, dow, user, command = entries[0].split(None, 6)
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and (dom, mon, dow) == ("*", "*", "*")
    assert user and "ray job submit" in command and "--working-dir ." in command
    job = shlex.split(command.split(" -- ", 1)[1].split(">>")[0])
    assert job[:2] == ["python", "jobs/encode.py"]
    # the job's arguments with the crontab's variables filled in
    args = [env[a.strip('"$')] if a.strip('"').startswith("$") else a for a in job[2:]]
    monkeypatch.chdir(REPO)
    cfg = encode.load_config(encode.build_parser().parse_args(args))
    assert (cfg.bundle, cfg.archive, cfg.out) == (
        env["DUCH_BUNDLE"],
        env["DUCH_ARCHIVE"],
        env["DUCH_INDEX"],
    )
    assert 0 < cfg.max_error_rate < 1 and cfg.keep_versions > 0


def test_crash_then_rerun_publishes_the_same_index(ray_session, bundle, archive):
    """A run that dies after writing some shards publishes nothing; the rerun publishes what a
    clean run does. On a small archive of the same make (small shards, so the dead run leaves
    several): this test is about the crash, not about volume."""
    from jobs import encode

    small = _make_archive(f"{archive.manifest.rpartition('/')[0]}-crash", 100, seed=3)
    base = small.manifest.rpartition("/")[0]
    sets = ("shard_rows=64",)
    full_out = f"{base}-index-clean"
    assert encode.main(_argv(bundle, small.manifest, full_out, *sets)) == 0
    out = f"{base}-index-crash"
    rc = encode.main(_argv(bundle, small.manifest, out, *sets, "fail_after_shards=3"))
    assert rc != 0
    assert ix.read_latest_version(out) is None  # nothing published
    dead = retention.list_versions(out)
    assert len(dead) == 1 and not any(dead.values())
    assert len(storage.list_prefix(storage.join(ix.version_uri(out, *dead), "shards"))) >= 3

    assert encode.main(_argv(bundle, small.manifest, out, *sets)) == 0
    assert _index_rows(out).equals(_index_rows(full_out))
    e1 = ix.read_errors(ix.read_latest(out))
    e2 = ix.read_errors(ix.read_latest(full_out))
    assert e1.num_rows == len(small.bad_images) + len(small.bad_captions)
    assert e1.drop_columns(["reason"]).equals(e2.drop_columns(["reason"]))
    assert ix.read_latest(out).counts == ix.read_latest(full_out).counts
    # the dead attempt's directory stays while it is younger than the grace age (it could be
    # a run still writing), then retention removes it
    assert set(retention.list_versions(out)) == {*dead, ix.read_latest_version(out)}
    assert encode.main(_argv(bundle, small.manifest, out, *sets, "orphan_grace_s=0")) == 0
    assert not set(dead) & set(retention.list_versions(out))


def test_incremental_run_encodes_only_new_and_changed(
    full_run, ray_session, bundle, archive, reference
):
    from duch_core.archive import write_archive
    from jobs import encode

    _, out, _ = full_run
    base = archive.manifest.rpartition("/")[0]
    rng = np.random.default_rng(99)
    rows = [dict(r) for r in archive.rows]
    good = [r for r in rows if r["item_id"].startswith("g")]
    changed = good[:10]  # image objects overwritten in place (new etag/mtime)
    _write_all({storage.join(base, r["image_uri"]): _image_bytes(rng, "PNG") for r in changed[:7]})
    for r in changed[7:]:  # captions edited in the manifest
        r["captions"] = r["captions"] + ["an extra caption about a harbour."]
    deleted = {r["item_id"] for r in good[10:25]}
    added = []
    objs = {}
    for k in range(20):
        rel = f"images/new{k:03d}.png"
        objs[storage.join(base, rel)] = _image_bytes(rng, "PNG")
        added.append({"item_id": f"new{k:03d}", "image_uri": rel, "captions": _captions(rng, 2)})
    _write_all(objs)
    rows = [r for r in rows if r["item_id"] not in deleted] + added
    manifest2 = storage.join(base, "manifest-v2.parquet")
    write_archive(rows, manifest2)
    v1 = ix.read_latest_version(out)

    assert encode.main(_argv(bundle, manifest2, out)) == 0
    s = _summary(out)
    failed_before = len(archive.bad_images) + len(archive.bad_captions)
    assert s["previous_version"] == v1 and s["version"] != v1
    assert s["new"] == 20 and s["changed"] == 10 + failed_before and s["deleted"] == 15
    assert s["encoded_items"] == 20 + 10 + failed_before
    assert s["carried_over_items"] == len(rows) - s["encoded_items"]
    # images actually run through the model: new + changed + the retried items with good images
    assert s["encoded_images"] == 20 + 10 + len(archive.bad_captions)

    m = ix.read_latest(out)
    t = ix.read_rows(m)
    ids = set(t.column("item_id").to_pylist())
    assert not ids & deleted
    assert {f"new{k:03d}" for k in range(20)} <= ids
    keys = list(
        zip(t.column("item_id").to_pylist(), t.column("caption_index").to_pylist(), strict=True)
    )
    assert len(keys) == len(set(keys))
    codes = {
        k: c.tobytes()
        for k, c in zip(keys, ix.codes_from_column(t.column("code"), BITS), strict=True)
    }
    # unchanged items keep their codes; overwritten images got new ones
    for r in good[25:60]:
        assert codes[(r["item_id"], -1)] == reference[(r["item_id"], -1)]
    assert sum(codes[(r["item_id"], -1)] != reference[(r["item_id"], -1)] for r in changed[:7]) >= 5
    assert (changed[8]["item_id"], 3) in codes


def test_new_bundle_reencodes_everything_retention_and_error_threshold(
    ray_session, s3_prefix, bundle
):
    from jobs import encode

    arch = _make_archive(s3_prefix + "small", 40, seed=5)
    out = s3_prefix + "index"
    bundle_b = _make_bundle(s3_prefix + "bundle-b", seed=1)
    sets = ("keep_versions=2", "max_error_rate=0.5")
    assert encode.main(_argv(bundle, arch.manifest, out, *sets)) == 0
    v1 = ix.read_latest_version(out)
    assert encode.main(_argv(bundle, arch.manifest, out, *sets)) == 0
    s2 = _summary(out)
    assert s2["encoded_images"] == 3 and s2["full_reencode"] is False  # only the bad-caption items
    assert encode.main(_argv(bundle_b, arch.manifest, out, *sets)) == 0
    s3 = _summary(out)
    assert s3["full_reencode"] is True and s3["carried_over_items"] == 0
    assert s3["encoded_images"] == 43 + len(WIDE)
    m = ix.read_latest(out)
    meta_b = storage.read_json(storage.join(bundle_b, "meta.json"))
    ix.validate(m, BITS, meta_b["bundle_id"])
    with pytest.raises(ix.IndexMismatchError):
        ix.validate(m, BITS, storage.read_json(storage.join(bundle, "meta.json"))["bundle_id"])
    versions = retention.list_versions(out)
    assert v1 not in versions and len(versions) == 2 and all(versions.values())

    # 10 of 54 items have errors: above a 10 % threshold the run fails and LATEST stays
    published = ix.read_latest_version(out)
    assert encode.main(_argv(bundle_b, arch.manifest, out, "max_error_rate=0.1")) == 1
    assert ix.read_latest_version(out) == published
    assert encode.main(["--bundle", bundle, "--out", out]) == 2  # no archive given
    assert encode.main(_argv(s3_prefix + "no-bundle", arch.manifest, out)) == 2
    assert ix.read_latest_version(out) == published


def test_cli_help_print_config_and_bad_config(capsys):
    """No Ray: ``python jobs/encode.py --help`` as a script, resolved config, bad values."""
    import yaml

    from jobs import encode

    r = subprocess.run(
        [sys.executable, "jobs/encode.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert all(f"--{o}" in r.stdout for o in ("bundle", "archive", "out", "dry-run", "config"))
    assert encode.main(["--config", SMOKE, "--set", "batch_size=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["batch_size"] == 7 and printed["shard_rows"] == 512 and printed["bundle"] == ""
    where = ["--bundle", "b", "--archive", "a", "--out", "o"]
    assert encode.main([*where, "--set", "batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert encode.main([*where, "--set", "max_error_rate=2"]) == 2
    assert encode.main([*where, "--set", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_driver_process_then_rerun(ray_session, s3_prefix, bundle):
    """A separate driver process killed with SIGKILL once shards exist; the rerun is complete."""
    import ray

    arch = _make_archive(s3_prefix + "arch", 400, seed=3)
    out = s3_prefix + "index"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    argv = _argv(bundle, arch.manifest, out, "shard_rows=64", "batch_size=16")
    killed = [*argv, "--set", "lock_ttl_s=3"]  # its lease outlives it by 3 s at most
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "encode.py"), *killed], env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            shards = [u for u in storage.list_prefix(out) if "/shards/" in u]
            if len(shards) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ix.read_latest_version(out) is None, "the driver finished before it could be killed"
    from jobs import encode

    assert encode.main([*argv, "--set", "lock_wait_s=30"]) == 0
    ref_out = s3_prefix + "ref"
    assert encode.main(_argv(bundle, arch.manifest, ref_out)) == 0
    assert _index_rows(out).equals(_index_rows(ref_out))
