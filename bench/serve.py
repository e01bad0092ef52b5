"""Benchmark of the query service: HTTP latency and throughput next to the in-process cost.

Builds, in a temporary directory, a model bundle (the default offline backbones, untrained hashing
heads) and an index of ``--n-codes`` random ``--bits``-bit codes per modality in ``--shards``
shards, starts Ray Serve on 127.0.0.1 with ``--searchers`` shard searchers, and drives it with a
bounded load from a separate client process (keep-alive HTTP/1.1, one connection per thread):
text queries and image queries (PNG files, base64 in JSON) at each concurrency. In the same run it
measures the in-process cost of the same queries: encode (backbone + hashing head) plus exact
search over one flat index of the same codes, in a separate plain process, right before each
load run. ``overhead p50`` = HTTP p50 - in-process p50. ``GET /healthz`` at concurrency 1 gives
the floor of Serve's HTTP path. ``--workdir`` keeps the artifacts for the next run.

Layouts (see ``deploy/app.py``): split by default (QueryEncoder + ``--searchers`` searchers);
``--searchers 0 --encode-in-ingress`` is the colocated one. ``--direct-ingress`` starts Ray with
Serve's direct ingress and measures both ways in: through the proxy and on the ingress replica's
own port.

Run inside the loopback-only namespace::

    # the configuration that meets the targets, next to the proxy path:
    scripts/isolated .venv/bin/python bench/serve.py --no-access-log --direct-ingress \
        --searchers 0 --encode-in-ingress
    scripts/isolated .venv/bin/python bench/serve.py                  # split, proxy, c = 1, 8, 32
    scripts/isolated .venv/bin/python bench/serve.py --n-codes 100000 --requests 100   # quicker

Targets on the 2-core development machine: p99 <= 50 ms for text queries at concurrency 1 and an
HTTP + Serve overhead <= 5 ms at p50.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TEXT_QUERIES = (
    "a river crossing farmland",
    "dense green forest with tall trees",
    "many cars parked in a parking lot",
    "an airport with two airplanes near the runway",
    "a sandy beach next to the blue sea",
    "residential buildings along a street grid",
    "striped crop fields of different colours",
    "yellow desert dunes with ripples",
    "a winding river through the woods",
    "a half empty parking lot beside a road",
    "white waves breaking on a beach",
    "houses with red roofs and gardens",
)


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ---- the load client (runs in its own process) ------------------------------------------------


def run_client(
    host: str,
    port: int,
    bodies: list[tuple[str, bytes]],
    concurrency: int,
    n_requests: int,
    max_seconds: float,
    token: str | None,
    get_path: str | None = None,
) -> dict[str, Any]:
    """Send ``n_requests`` POST /v1/search bodies with ``concurrency`` threads (or plain GETs of
    ``get_path``, for the floor cost of one HTTP request through the proxy and the ingress).

    Returns latencies (ms) of successful requests, error count and wall time.
    """
    lock = threading.Lock()
    next_i = 0
    lat: list[float] = []
    server_total: list[float] = []
    server_parts: dict[str, list[float]] = {"encode": [], "search": []}
    errors: list[str] = []
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal next_i
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            with lock:
                i = next_i
                next_i += 1
            if i >= n_requests or time.perf_counter() > deadline:
                break
            ctype, body = bodies[i % len(bodies)]
            headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            t0 = time.perf_counter()
            try:
                if get_path:
                    conn.request("GET", get_path)
                else:
                    conn.request("POST", "/v1/search", body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            dt = (time.perf_counter() - t0) * 1e3
            with lock:
                if resp.status == 200:
                    lat.append(dt)
                if resp.status == 200 and not get_path:
                    timings = json.loads(data)["timings_ms"]
                    server_total.append(float(timings["total"]))
                    for part, values in server_parts.items():
                        values.append(float(timings[part]))
                elif resp.status != 200:
                    errors.append(f"{resp.status}: {data[:200]!r}")
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "latency_ms": lat,
        "server_ms": server_total,
        "server_parts_ms": server_parts,
        "errors": errors,
        "wall_s": wall,
    }


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/serve.py client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bodies", required=True, help="JSON file: list of [content_type, base64 body]")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--get", default=None, help="GET this path instead of searching")
    a = p.parse_args(argv)
    raw = json.loads(Path(a.bodies).read_text())
    bodies = [(c, base64.b64decode(b)) for c, b in raw]
    token = os.environ.get("DUCH_BENCH_TOKEN") or None
    # warm-up: one request per connection-to-be, not timed
    run_client("127.0.0.1", a.port, bodies, a.concurrency, a.concurrency, 30.0, token, a.get)
    out = run_client(
        "127.0.0.1", a.port, bodies, a.concurrency, a.requests, a.max_seconds, token, a.get
    )
    print(json.dumps(out))
    return 0


# ---- the in-process reference (runs in its own process) ------------------------------------------


def inproc_main(argv: list[str]) -> int:
    """Serve in-process measurements over stdin/stdout: one JSON request per line
    (``{"mode": "text" | "image" | "search", "n": N}``), one JSON list of latencies (ms) back.

    A process of its own, without Ray or Serve threads: measured in the driver, next to Serve's
    handle and router threads, a tiny-model text query took 212 ms at p50 against 5 ms in a
    plain process, which would have hidden the service's overhead.
    """
    p = argparse.ArgumentParser(prog="bench/serve.py inproc")
    p.add_argument("--workdir", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--torch-threads", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    a = p.parse_args(argv)

    import torch

    from duch_core import index_store
    from duch_core.bundle import Bundle
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import decode_image
    from duch_core.search import HammingIndex

    torch.set_num_threads(a.torch_threads)
    work = Path(a.workdir)
    enc = HashEncoder(Bundle.load(str(work / "bundle")))
    manifest = index_store.read_latest(str(work / "index"))
    codes, _, _, rows = index_store.load_codes(manifest, "image")
    flat = HammingIndex.from_arrays(codes, rows, int(manifest.bits))
    texts = list(TEXT_QUERIES)
    images = query_images(12, a.image_size)

    def text_once(i: int) -> None:
        flat.search(enc.encode_texts([texts[i % len(texts)]]), a.k)

    def image_once(i: int) -> None:
        img = decode_image(images[i % len(images)])
        flat.search(enc.encode_images([img]), a.k)

    def search_once(i: int) -> None:
        flat.search(codes[i : i + 1], a.k)

    once = {"text": text_once, "image": image_once, "search": search_once}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(in_process_latency(once[req["mode"]], int(req["n"]))), flush=True)
    return 0


class InProcess:
    """Client of an ``inproc`` process started next to the service."""

    def __init__(self, workdir: Path, k: int, torch_threads: int, image_size: int) -> None:
        cmd = [sys.executable, __file__, "inproc", "--workdir", str(workdir), "--k", str(k)]
        cmd += ["--torch-threads", str(torch_threads), "--image-size", str(image_size)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if json.loads(self._line()).get("ready") is not True:
            raise RuntimeError("the in-process reference did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process reference exited ({self.proc.wait()})")
        return line

    def measure(self, mode: str, n: int) -> list[float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"mode": mode, "n": n}) + "\n")
        self.proc.stdin.flush()
        return list(json.loads(self._line()))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


# ---- artifacts ----------------------------------------------------------------------------------


def make_bundle(out_uri: str, bits: int, image_source: str, text_source: str) -> str:
    """A bundle with the given backbones and seeded, untrained hashing heads (paper sizes)."""
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=bits),
        image_backbone=ImageBackboneConfig(source=image_source),
        text_backbone=TextBackboneConfig(source=text_source),
    )
    save_untrained_bundle(out_uri, cfg, seed=0)
    return out_uri


def make_index(
    root: str, archive_uri: str, bundle_uri: str, n_codes: int, bits: int, n_shards: int, seed: int
) -> Any:
    """Publish an index version of ``n_codes`` random image codes (and one caption code per
    1000 items) in ``n_shards`` shards, for the bundle at ``bundle_uri``."""
    from duch_core import index_store
    from duch_core.bundle import Bundle

    bundle = Bundle.load(bundle_uri)
    rng = np.random.default_rng(seed)
    version = index_store.new_version_id()
    vdir = index_store.version_uri(root, version)
    shards = []
    for part in np.array_split(np.arange(n_codes), n_shards):
        n = len(part)
        ids = [f"item_{i:07d}" for i in part.tolist()]
        cap_rows = part[part % 1000 == 0]
        ids += [f"item_{i:07d}" for i in cap_rows.tolist()]
        mods = ["image"] * n + ["text"] * len(cap_rows)
        caps = np.concatenate([np.full(n, -1), np.zeros(len(cap_rows))]).astype(np.int32)
        codes = rng.integers(0, 256, (len(ids), bits // 8), dtype=np.uint8)
        table = index_store.shard_table(
            ids, mods, caps, codes, ["bench"] * len(ids), bundle.bundle_id, bits
        )
        shards.append(index_store.write_shard(vdir, table))
    return index_store.finish_version(
        root,
        version,
        shards,
        str(bundle.bundle_id),
        bits,
        archive=archive_uri,
        bundle_uri=bundle_uri,
    )


def make_archive(out_dir: Path, n_items: int, images: list[bytes]) -> str:
    """An archive manifest of ``n_items`` items whose images cycle through ``images``."""
    import pyarrow as pa

    from duch_core.archive import write_archive

    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for j, data in enumerate(images):
        (img_dir / f"scene_{j:02d}.png").write_bytes(data)
        names.append(f"images/scene_{j:02d}.png")
    table = pa.table(
        {
            "item_id": pa.array([f"item_{i:07d}" for i in range(n_items)], pa.string()),
            "image_uri": pa.array([names[i % len(names)] for i in range(n_items)], pa.string()),
            "captions": pa.array(
                [[f"{TEXT_QUERIES[i % len(TEXT_QUERIES)]} ({i})"] for i in range(n_items)],
                pa.list_(pa.string()),
            ),
        }
    )
    uri = str(out_dir / "manifest.parquet")
    write_archive(table, uri)
    return uri


def query_images(n: int, size: int) -> list[bytes]:
    """PNG files of demo scenes (seeded) used as image queries."""
    from PIL import Image

    from duch_core.synthetic_archive import DEMO_CLASSES, render_scene

    out = []
    for j in range(n):
        rng = np.random.default_rng(j)
        img, _ = render_scene(DEMO_CLASSES[j % len(DEMO_CLASSES)], rng, size)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ---- in-process cost --------------------------------------------------------------------------


def in_process_latency(fn: Callable[[int], None], n: int, warmup: int = 5) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# ---- driver -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_load(
    port: int, bodies_file: Path, concurrency: int, n: int, max_s: float, get: str | None = None
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "client",
        "--port",
        str(port),
        "--bodies",
        str(bodies_file),
        "--concurrency",
        str(concurrency),
        "--requests",
        str(n),
        "--max-seconds",
        str(max_s),
        *(["--get", get] if get else []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_s + 120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    if argv[:1] == ["inproc"]:
        return inproc_main(argv[1:])
    p = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n-codes", type=int, default=1_000_000)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument(
        "--searchers", type=int, default=2, help="shard searcher deployments; 0 = in the ingress"
    )
    p.add_argument(
        "--encode-in-ingress", action="store_true", help="no QueryEncoder: the ingress encodes"
    )
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--modes", default="text,image")
    p.add_argument("--requests", type=int, default=300, help="timed requests per run")
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap per run")
    p.add_argument("--in-process", type=int, default=100, help="in-process repetitions")
    p.add_argument("--k", type=int, default=20)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the encoder and of the in-process reference; on the shared 2-core "
        "machine 2 threads made a MiniLM query 30x slower (458 ms against 14 ms at p50)",
    )
    p.add_argument("--no-access-log", action="store_true", help="Serve access logs off")
    p.add_argument(
        "--handle-transport", choices=("ray", "grpc"), default="grpc", help="as the serve configs"
    )
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the Ray workers, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0",
    )
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Serve's direct ingress: the client talks to the ingress replica's own HTTP port",
    )
    p.add_argument(
        "--paths",
        default=None,
        help="which ways in to measure: proxy, direct (default: all that are on)",
    )
    p.add_argument("--batch-wait-s", type=float, default=0.0, help="encoder batch fill wait")
    p.add_argument("--image-size", type=int, default=256, help="query image side")
    p.add_argument("--image-backbone", default="offline:mobilenet_v2")
    p.add_argument("--text-backbone", default="offline:minilm")
    p.add_argument(
        "--workdir",
        default=None,
        help="keep artifacts here and reuse them when made with the same sizes (default: temp dir)",
    )
    a = p.parse_args(argv)

    import ray
    from ray import serve

    from deploy.app import CONTROLLER_OPTIONS, AppArgs, compose
    from deploy.endpoints import DIRECT_INGRESS_ENV, ingress_urls
    from duch_core import index_store

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in a.modes.split(",") if m]
    concs = [int(c) for c in a.concurrency.split(",") if c]

    t0 = time.perf_counter()
    images = query_images(12, a.image_size)
    made = {
        "n_codes": a.n_codes,
        "bits": a.bits,
        "shards": a.shards,
        "image_backbone": a.image_backbone,
        "text_backbone": a.text_backbone,
        "image_size": a.image_size,
    }
    made_file = work / "artifacts.json"
    bundle_uri = str(work / "bundle")
    if made_file.exists() and json.loads(made_file.read_text()) == made:
        manifest = index_store.read_latest(str(work / "index"))
        reused = " (reused)"
    else:
        made_file.unlink(missing_ok=True)
        make_bundle(bundle_uri, a.bits, a.image_backbone, a.text_backbone)
        archive_uri = make_archive(work / "archive", a.n_codes, images)
        manifest = make_index(
            str(work / "index"), archive_uri, bundle_uri, a.n_codes, a.bits, a.shards, seed=1
        )
        made_file.write_text(json.dumps(made))
        reused = ""
    print(
        f"artifacts{reused}: index version {manifest.version}, {a.n_codes} codes x {a.bits} bits "
        f"in {a.shards} shards, "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    texts = list(TEXT_QUERIES)
    search_only: list[float] = []

    bodies_dir = work / "bodies"
    bodies_dir.mkdir(exist_ok=True)
    bodies = {
        "text": [
            [
                "application/json",
                base64.b64encode(json.dumps({"text": t, "k": a.k}).encode()).decode(),
            ]
            for t in texts
        ],
        "image": [
            [
                "application/json",
                base64.b64encode(
                    json.dumps({"image_base64": base64.b64encode(b).decode(), "k": a.k}).encode()
                ).decode(),
            ]
            for b in images
        ],
    }
    for m, b in bodies.items():
        (bodies_dir / f"{m}.json").write_text(json.dumps(b))

    for kv in a.serve_env:  # inherited by the Ray workers this driver starts
        name, sep, value = kv.partition("=")
        if not sep or not name:
            p.error(f"--serve-env wants NAME=VALUE, got {kv!r}")
        os.environ[name] = value
    if a.direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"
        # no load balancer to deregister from: a stopping replica need not stay up 30 s
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    results = []
    floors: dict[str, dict[str, Any]] = {}
    inproc = InProcess(work, a.k, a.torch_threads, a.image_size)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            controller_options=CONTROLLER_OPTIONS,
        )
        args = AppArgs(
            index_root=str(work / "index"),
            bundle_uri=bundle_uri,
            n_searchers=a.searchers,
            k_cap=max(100, a.k),
            poll_interval_s=0,
            auth_token_env=None,
            allow_anonymous=True,  # loopback benchmark
            torch_threads=a.torch_threads,
            batch_wait_s=a.batch_wait_s,
            handle_transport=a.handle_transport,
            encode_in_ingress=a.encode_in_ingress,
        )
        t1 = time.perf_counter()
        logging_config = {
            "enable_access_log": not a.no_access_log,
            "log_level": "WARNING" if a.no_access_log else "INFO",
        }
        serve.run(compose(args), name="bench", route_prefix="/", logging_config=logging_config)
        print(f"serve.run: {time.perf_counter() - t1:.1f} s", flush=True)
        ports = {"proxy": port}
        if a.direct_ingress:
            ports["direct"] = int(ingress_urls("bench")[0].rsplit(":", 1)[1])
            print(f"direct ingress: ingress replica on 127.0.0.1:{ports['direct']}", flush=True)
        paths = [x for x in (a.paths or ",".join(ports)).split(",") if x]
        for path in paths:
            if path not in ports:
                p.error(f"--paths: {path!r} is not one of {sorted(ports)}")
            floors[path] = run_load(
                ports[path], bodies_dir / "text.json", 1, a.requests, a.max_seconds, "/healthz"
            )
        for mode in modes:
            search_only.extend(inproc.measure("search", a.in_process))
            for path in paths:
                for c in concs:
                    # in-process cost of the same queries, measured just before each load run so
                    # both see the machine in the same state (it is shared)
                    ipr = inproc.measure(mode, a.in_process)
                    load1 = os.getloadavg()[0]
                    n = max(a.requests, 4 * c)
                    r = run_load(ports[path], bodies_dir / f"{mode}.json", c, n, a.max_seconds)
                    lat = r["latency_ms"]
                    results.append(
                        {
                            "mode": mode,
                            "path": path,
                            "c": c,
                            "load": load1,
                            "ip": (percentile(ipr, 50), percentile(ipr, 95), percentile(ipr, 99)),
                            "n": len(lat),
                            "errors": len(r["errors"]),
                            "p50": percentile(lat, 50),
                            "p95": percentile(lat, 95),
                            "p99": percentile(lat, 99),
                            "qps": len(lat) / r["wall_s"] if r["wall_s"] else float("nan"),
                            "server_p50": percentile(r["server_ms"], 50),
                            "enc_p50": percentile(r["server_parts_ms"]["encode"], 50),
                            "search_p50": percentile(r["server_parts_ms"]["search"], 50),
                            "first_error": r["errors"][0] if r["errors"] else "",
                        }
                    )
                    print(f"  {mode} via {path} c={c}: done", flush=True)
    finally:
        inproc.close()
        serve.shutdown()
        ray.shutdown()

    layout = (f"{a.searchers} searcher deployments" if a.searchers else "search in the ingress") + (
        ", encoding in the ingress" if a.encode_in_ingress else ", QueryEncoder deployment"
    )
    print()
    print(
        f"Query service on 127.0.0.1: {a.n_codes:,} codes x {a.bits} bits, {a.shards} shards, "
        f"k={a.k}, {os.cpu_count()} CPUs, torch threads {a.torch_threads}"
    )
    print(
        f"layout: {layout}; handle transport: {a.handle_transport}; "
        f"direct ingress: {'on' if a.direct_ingress else 'off'}; "
        f"access log: {'off' if a.no_access_log else 'on'}; worker env: {a.serve_env or '-'}"
    )
    print(f"in-process search only (flat index, 1 query): p50 {percentile(search_only, 50):.2f} ms")
    for path, floor in floors.items():
        print(
            f"HTTP floor via {path} (GET /healthz, no handle calls, c=1): "
            f"p50 {percentile(floor['latency_ms'], 50):.2f} ms, "
            f"p99 {percentile(floor['latency_ms'], 99):.2f} ms"
        )
    hdr = (
        f"{'query':<6} {'path':<6} {'conc':>4} {'load':>5} {'ok':>5} {'err':>4} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} {'QPS':>7} {'srv p50':>8} {'enc':>6} {'search':>6} | "
        f"{'in-proc p50':>11} {'p95':>7} {'p99':>7}"
        f" | {'overhead p50':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        i50, i95, i99 = r["ip"]
        print(
            f"{r['mode']:<6} {r['path']:<6} {r['c']:>4} {r['load']:>5.1f} {r['n']:>5} "
            f"{r['errors']:>4} {r['p50']:>8.2f} "
            f"{r['p95']:>8.2f} {r['p99']:>8.2f} {r['qps']:>7.1f} {r['server_p50']:>8.2f} "
            f"{r['enc_p50']:>6.2f} {r['search_p50']:>6.2f} | "
            f"{i50:>11.2f} {i95:>7.2f} {i99:>7.2f} | {r['p50'] - i50:>12.2f}"
        )
    for r in results:
        if r["first_error"]:
            print(f"first error ({r['mode']} via {r['path']} c={r['c']}): {r['first_error']}")
    for r in results:
        if r["mode"] != "text" or r["c"] != 1:
            continue
        over = r["p50"] - r["ip"][0]
        print(
            f"via {r['path']}: target p99 <= 50 ms (text, c=1): {r['p99']:.1f} ms -> "
            f"{'met' if r['p99'] <= 50.0 else 'MISSED'}; "
            f"target overhead <= 5 ms at p50: {over:.1f} ms -> "
            f"{'met' if over <= 5.0 else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
