"""The nightly encode under faults: real SeaweedFS, real Ray, a fault-injecting S3 proxy.

Every scenario ends with the same checks: ``LATEST`` names a complete index, no item that the
archive still lists and the index held before is missing from it, and a rerun equals a clean
run. The scenarios:

* S3 unavailable during a run (5xx, resets, slow answers through :class:`FaultProxy`): briefly
  (retried), for the image objects only (items keep their previous codes) and entirely (the run
  fails cleanly);
* a failed write of ``LATEST``: ``LATEST`` unchanged;
* two runs started together: one publishes, the other exits 3;
* the driver killed (SIGKILL) at each publish step: the rerun equals a clean run;
* empty, truncated and partly bad manifests;
* a worker node removed mid-encode on a 2-node cluster.

Runs that must see the proxy run as their own driver process attached to the session's Ray, with
the proxy's endpoint handed to their workers through the job's runtime environment (what
``ray job submit --runtime-env-json`` does).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from duch_core import catalog_snapshot, pointers, retention, storage
from duch_core import index_store as ix

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "encode_smoke.yaml")
BITS = 32
N_ITEMS = 12


# --------------------------------------------------------------------------------------------
# a fault-injecting S3 proxy


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that can fail requests.

    Requests pass through unchanged (the client's signature stays valid: headers and bodies are
    forwarded byte for byte) until :meth:`arm` sets faults: after ``after`` more requests, every
    request that ``match`` accepts fails, for ``seconds`` (or until :meth:`clear`), with one of
    ``kinds`` drawn from a seeded generator: ``"503"`` (SlowDown), ``"500"`` (InternalError),
    ``"reset"`` (the connection is reset, no answer) or ``"slow"`` (answered after ``delay``).
    """

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", int(u.port or 80))
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        self.kinds: tuple[str, ...] = ()
        self.clear()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def arm(
        self,
        kinds: tuple[str, ...] = ("503", "500", "reset", "slow"),
        seconds: float | None = None,
        after: int = 0,
        match: Callable[[str, str], bool] | None = None,
        delay: float = 1.0,
    ) -> None:
        with self.lock:
            self.kinds, self.seconds, self.match, self.delay = kinds, seconds, match, delay
            self.after, self.until = self.seen + after, None

    def clear(self) -> None:
        with self.lock:
            self.kinds, self.seconds, self.match, self.delay = (), None, None, 0.0
            self.after, self.until = 0, None
            self.seen = getattr(self, "seen", 0)
            self.injected: dict[str, int] = {}

    def _pick(self, method: str, path: str) -> str | None:
        with self.lock:
            self.seen += 1
            if not self.kinds or self.seen <= self.after:
                return None
            if self.match is not None and not self.match(method, path):
                return None
            now = time.monotonic()
            if self.until is None:
                self.until = now + self.seconds if self.seconds is not None else float("inf")
            if now > self.until:
                return None
            kind = self.rng.choice(self.kinds)
            self.injected[kind] = self.injected.get(kind, 0) + 1
            return kind

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            raw = []  # forwarded as sent (aws-chunked framing and trailers included)
            while True:
                line = h.rfile.readline()
                raw.append(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        tail = h.rfile.readline()
                        raw.append(tail)
                        if tail in (b"\r\n", b"\n", b""):
                            break
                    return b"".join(raw)
                raw.append(h.rfile.read(size + 2))
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        kind = self._pick(h.command, h.path)
        if kind == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if kind in ("503", "500"):
            code, name = (503, "SlowDown") if kind == "503" else (500, "InternalError")
            payload = (
                b""
                if h.command == "HEAD"
                else f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{name}</Code>"
                f"<Message>injected</Message></Error>".encode()
            )
            h.send_response(code)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        if kind == "slow":
            time.sleep(self.delay)
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            if body:
                conn.send(body)
            r = conn.getresponse()
            data = b"" if h.command == "HEAD" else r.read()
            h.send_response_only(r.status, r.reason)
            for k, v in r.getheaders():
                low = k.lower()
                if low in ("transfer-encoding", "connection") or (
                    low == "content-length" and h.command != "HEAD"
                ):
                    continue
                h.send_header(k, v)
            if h.command != "HEAD":
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            h.close_connection = True
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _is_image(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and "/images/" in path


def _is_latest_put(method: str, path: str) -> bool:
    return method == "PUT" and path.split("?")[0].endswith("/" + ix.LATEST_NAME)


# --------------------------------------------------------------------------------------------
# archive, bundle, runs


def _png(rng: np.random.Generator) -> bytes:
    yy, xx = np.mgrid[0:32, 0:32]
    img = rng.integers(0, 256, 3) + 40 * np.sin(xx / rng.uniform(2, 6))[..., None]
    img = img + rng.normal(0, 20, (32, 32, 3)) + yy[..., None]
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


WORDS = ["river", "forest", "field", "road", "houses", "beach", "lake", "harbour", "dense"]


@dataclass
class Archive:
    prefix: str
    rows: list[dict]

    @property
    def good_ids(self) -> set[str]:
        return {r["item_id"] for r in self.rows if not r["item_id"].startswith("bad")}

    def write(self, name: str, rows: list[dict] | None = None) -> str:
        from duch_core.archive import write_archive

        return write_archive(rows if rows is not None else self.rows, f"{self.prefix}/{name}")

    def add_image(self, rel: str, rng: np.random.Generator) -> None:
        storage.write_bytes(f"{self.prefix}/{rel}", _png(rng))


def _make_archive(prefix: str, n: int, seed: int, corrupt: bool = True) -> Archive:
    """``n`` good items with two captions each, and (``corrupt``) one item whose image does not
    decode (it keeps its caption rows, and is encoded again every night)."""
    rng = np.random.default_rng(seed)
    arch = Archive(prefix, [])
    for i in range(n):
        rel = f"images/g{i:03d}.png"
        arch.add_image(rel, rng)
        caps = [" ".join(rng.choice(WORDS, 4)) + "." for _ in range(2)]
        arch.rows.append(
            {"item_id": f"g{i:03d}", "image_uri": rel, "captions": caps, "sensor": "S2A"}
        )
    if corrupt:
        storage.write_bytes(f"{prefix}/images/corrupt.png", b"not an image at all")
        arch.rows.append(
            {"item_id": "bad_corrupt", "image_uri": "images/corrupt.png", "captions": ["a lake."]}
        )
    return arch


def _make_bundle(uri: str) -> str:
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=BITS, hidden_dim=32),
        image_backbone=ImageBackboneConfig(source="tiny:resnet", image_size=32, center_crop=0),
        text_backbone=TextBackboneConfig(source="tiny:bert"),
    )
    save_untrained_bundle(uri, cfg, 0)
    return uri


def _argv(bundle: str, manifest: str, out: str, *sets: str) -> list[str]:
    argv = ["--bundle", bundle, "--archive", manifest, "--out", out, "--config", SMOKE]
    for s in sets:
        argv += ["--set", s]
    return argv


def _encode(bundle: str, manifest: str, out: str, *sets: str) -> int:
    """A run in this process (the session's Ray, the store directly)."""
    from jobs import encode

    with contextlib.redirect_stdout(io.StringIO()):
        return encode.main(_argv(bundle, manifest, out, *sets))


def _driver(
    ray_address: str,
    argv: list[str],
    endpoint: str | None = None,
    attempts: int = 4,
) -> subprocess.Popen[str]:
    """``jobs/encode.py`` as its own driver process; its workers use ``endpoint`` too."""
    env_vars = {
        "AWS_ENDPOINT_URL": endpoint or os.environ["AWS_ENDPOINT_URL"],
        "DUCH_S3_ATTEMPTS": str(attempts),
        "DUCH_S3_BACKOFF_S": "0.2",
        "DUCH_S3_BACKOFF_MAX_S": "1.5",
    }
    env = {
        **os.environ,
        **env_vars,
        "RAY_ADDRESS": ray_address,
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env_vars}}),
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "encode.py"), *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"encode driver did not finish in {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def _rows(root: str) -> pa.Table:
    t = ix.read_rows(ix.read_latest(root))
    return t.sort_by(
        [("modality", "ascending"), ("item_id", "ascending"), ("caption_index", "ascending")]
    ).select(["item_id", "modality", "caption_index", "code", "bundle_id"])


def _ids(root: str) -> set[str]:
    return set(ix.read_rows(ix.read_latest(root), columns=["item_id"]).column(0).to_pylist())


def _summary(root: str) -> dict:
    return storage.read_json(ix.read_latest(root).resolve(ix.SUMMARY_NAME))


def _lost(before: set[str], root: str, archive_ids: set[str]) -> set[str]:
    """Items the index held and the archive still lists that the published index lacks."""
    return (before & archive_ids) - _ids(root)


@pytest.fixture(scope="module")
def world(s3_server, ray_session):
    """The bundle, a dozen-item archive and its clean reference index.

    The archive has nothing that fails, so a rerun over it encodes nothing and copies every
    row: the runs that only exercise publishing stay cheap.
    """
    import ray

    base = f"s3://{s3_server.bucket}/faults/{uuid4().hex}"
    bundle = _make_bundle(f"{base}/bundle")
    arch = _make_archive(f"{base}/archive", N_ITEMS, seed=1, corrupt=False)
    manifest = arch.write("manifest.parquet")
    clean = f"{base}/clean"
    assert _encode(bundle, manifest, clean) == 0
    return {
        "base": base,
        "bundle": bundle,
        "archive": arch,
        "manifest": manifest,
        "clean": clean,
        "ray": ray.get_runtime_context().gcs_address,
    }


@pytest.fixture(scope="module")
def proxy(s3_server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint)
    try:
        yield p
    finally:
        p.close()


def _published_copy(world: dict, name: str, arch: Archive | None = None) -> tuple[str, str]:
    """A fresh index root with one published version of an archive (default: the world's; a
    test that changes images brings its own, so the world's clean reference stays valid).

    Returns:
        ``(index root, manifest URI)``.
    """
    manifest = arch.write("manifest.parquet") if arch is not None else world["manifest"]
    out = f"{world['base']}/{name}-{uuid4().hex[:6]}"
    assert _encode(world["bundle"], manifest, out) == 0
    return out, manifest


# --------------------------------------------------------------------------------------------
# S3 faults


def test_s3_outage_during_encode_retries_keeps_items_or_fails_cleanly(world, proxy):
    """Brief outage: retried, published. Image outage: items keep their previous codes.
    Total outage: exit 1, LATEST intact. The rerun equals a clean run; no item is ever lost."""
    arch = _make_archive(f"{world['base']}/outage-archive", N_ITEMS, seed=2)
    out, _ = _published_copy(world, "outage", arch)
    v1, before = ix.read_latest_version(out), _ids(out)
    # tonight: 3 images replaced, 2 items added
    rng = np.random.default_rng(7)
    for r in arch.rows[:3]:
        arch.add_image(r["image_uri"], rng)
    rows = [*arch.rows]
    for k in range(2):
        arch.add_image(f"images/new{k}.png", rng)
        rows.append({"item_id": f"new{k}", "image_uri": f"images/new{k}.png", "captions": []})
    manifest = arch.write("manifest-tonight.parquet", rows)
    ids_now = {r["item_id"] for r in rows if not r["item_id"].startswith("bad")}
    reference = f"{world['base']}/outage-ref"
    assert _encode(world["bundle"], manifest, reference) == 0
    argv = _argv(world["bundle"], manifest, out, "max_error_rate=0.5")

    # 1. a brief outage of everything (5xx, resets, slow answers) once the run has started
    proxy.arm(seconds=2.0, after=40)
    rc, log = _finish(_driver(world["ray"], argv, proxy.endpoint, attempts=8))
    hits = dict(proxy.injected)
    proxy.clear()
    assert sum(hits.values()) > 0, "no fault was injected"
    assert rc == 0, log[-3000:]
    s = _summary(out)
    assert s["stale_items"] + s["unavailable_items"] == 0  # the retries covered it
    assert _rows(out).equals(_rows(reference)) and not _lost(before, out, ids_now)
    v2 = ix.read_latest_version(out)

    # 2. the image objects unavailable for the whole run: nothing can be looked up or read
    for r in rows[:2]:
        arch.add_image(r["image_uri"], rng)  # two more changes the run cannot see
    proxy.arm(kinds=("503", "reset"), match=_is_image)
    rc, log = _finish(_driver(world["ray"], argv, proxy.endpoint, attempts=2))
    proxy.clear()
    assert rc == 0, log[-3000:]
    s = _summary(out)
    assert s["previous_version"] == v2
    # every item kept its rows (the corrupt image's item its caption rows)
    assert s["stale_items"] == len(ids_now) + 1 and s["unavailable_items"] == 0
    assert s["failed_items"] == 0 and "kept their previous codes" in log
    assert _ids(out) == ids_now | {"bad_corrupt"} and not _lost(before, out, ids_now)
    assert _rows(out).equals(_rows(reference))  # yesterday's codes, not the new images'

    # 3. the store down for everything: the run cannot start; it fails cleanly
    proxy.arm(kinds=("503",))
    v3 = ix.read_latest_version(out)
    rc, log = _finish(_driver(world["ray"], argv, proxy.endpoint, attempts=2))
    proxy.clear()
    assert rc == 1, log[-3000:]
    assert ix.read_latest_version(out) == v3 != v1
    assert not storage.exists(f"{out}/{ix.LOCK_NAME}")

    # the rerun, the store healthy again: the same index as a clean run of tonight's archive
    assert _encode(world["bundle"], manifest, out) == 0
    clean_now = f"{world['base']}/outage-ref2"
    assert _encode(world["bundle"], manifest, clean_now) == 0
    assert _rows(out).equals(_rows(clean_now))
    assert not _rows(out).equals(_rows(reference))  # the two hidden changes are in now


def test_failed_pointer_write_leaves_latest_unchanged(world, proxy, monkeypatch):
    arch = _make_archive(f"{world['base']}/pointer-archive", N_ITEMS, seed=3)
    out, manifest = _published_copy(world, "pointer", arch)
    v1 = ix.read_latest_version(out)
    latest = ix.latest_uri(out)
    # the storage call itself: every PUT of LATEST fails (5xx, resets) through the proxy
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("DUCH_S3_ATTEMPTS", "3")
    monkeypatch.setenv("DUCH_S3_BACKOFF_S", "0.05")
    for kinds in (("503",), ("reset",), ("500", "reset")):
        proxy.arm(kinds=kinds, match=_is_latest_put)
        with pytest.raises(storage.TransientStorageError):
            pointers.publish_pointer(latest, "20990101T000000000000Z-ffffffff")
        with pytest.raises(storage.TransientStorageError):
            ix.publish_if(out, "20990101T000000000000Z-ffffffff", ix.read_latest_state(out))
        proxy.clear()
        assert pointers.read_pointer(latest) == v1  # still there, still the old value
    monkeypatch.undo()

    # the job: everything written, the pointer write fails, exit 1; LATEST unchanged
    arch.add_image(arch.rows[5]["image_uri"], np.random.default_rng(3))
    argv = _argv(world["bundle"], manifest, out)
    proxy.arm(kinds=("503", "reset"), match=_is_latest_put)
    rc, log = _finish(_driver(world["ray"], argv, proxy.endpoint, attempts=3))
    proxy.clear()
    assert rc == 1, log[-3000:]
    assert ix.read_latest_version(out) == v1
    unpublished = [v for v, st in retention.version_states(out).items() if not st.published]
    assert len(unpublished) == 1  # written whole, never published
    assert (
        "publishing failed"
        in storage.read_json(storage.join(ix.version_uri(out, unpublished[0]), ix.SUMMARY_NAME))[
            "refused"
        ]
    )
    assert _encode(world["bundle"], manifest, out) == 0
    assert ix.read_latest(out).previous_version == v1


def test_two_runs_started_together_one_publishes_the_other_exits_3(world):
    out, _ = _published_copy(world, "race")
    v1, before = ix.read_latest_version(out), _ids(out)
    argv = _argv(world["bundle"], world["manifest"], out)
    procs = [_driver(world["ray"], argv) for _ in range(2)]
    results = [_finish(p) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 3], [log[-2000:] for _, log in results]
    loser_log = next(log for rc, log in results if rc == 3)
    assert "another encode run" in loser_log or "published meanwhile" in loser_log
    m = ix.read_latest(out)
    assert m.previous_version == v1 and m.version != v1
    states = retention.version_states(out)
    assert v1 in states and states[v1].published  # no version lost
    assert states[m.version].published
    assert not _lost(before, out, world["archive"].good_ids)
    assert not storage.exists(f"{out}/{ix.LOCK_NAME}")


# --------------------------------------------------------------------------------------------
# the driver killed at each publish step


def test_driver_killed_at_each_publish_step_then_rerun_equals_clean_run(world):
    """SIGKILL at every step of a run, one step after the other on one index root; after each,
    a rerun (waiting for the dead run's lease to expire) publishes the clean run's index."""
    from jobs.encode import KILL_STEPS

    out = f"{world['base']}/kill"
    argv = _argv(world["bundle"], world["manifest"], out)
    clean = ix.read_latest(world["clean"])
    for step in KILL_STEPS:
        before = ix.read_latest_version(out)
        proc = _driver(world["ray"], argv + ["--set", f"kill_at={step}", "--set", "lock_ttl_s=2"])
        rc, log = _finish(proc)
        assert rc == -signal.SIGKILL, (step, log[-3000:])
        after = ix.read_latest_version(out)
        moved = step in ("published", "marked", "retention")
        assert (after != before) == moved, step
        assert storage.exists(f"{out}/{ix.LOCK_NAME}"), step  # left behind by the dead run
        assert _encode(world["bundle"], world["manifest"], out, "lock_wait_s=30") == 0, step
        m = ix.read_latest(out)
        assert m.previous_version == after, step
        assert _rows(out).equals(_rows(world["clean"])), step
        assert ix.read_errors(m).num_rows == ix.read_errors(clean).num_rows == 0, step
        assert catalog_snapshot.read_catalog(m).equals(catalog_snapshot.read_catalog(clean)), step
        assert retention.version_states(out)[m.version].published, step
    # every version that LATEST ever named is still there, as published
    assert all(st.manifest for v, st in retention.version_states(out).items() if st.published)


# --------------------------------------------------------------------------------------------
# manifests


def test_empty_truncated_and_partly_bad_manifests(world):
    from duch_core.archive import ARCHIVE_SCHEMA

    arch: Archive = world["archive"]
    out, _ = _published_copy(world, "manifests")
    v1 = ix.read_latest_version(out)
    bundle = world["bundle"]
    # empty: a Parquet file without rows, and an empty JSON-lines file
    storage.write_parquet(f"{arch.prefix}/empty.parquet", ARCHIVE_SCHEMA.empty_table())
    storage.write_bytes(f"{arch.prefix}/empty.jsonl", b"")
    # truncated: half a Parquet file, and JSON lines cut in the middle of a line
    whole = storage.read_bytes(world["manifest"])
    storage.write_bytes(f"{arch.prefix}/cut.parquet", whole[: len(whole) // 2])
    lines = storage.read_bytes(arch.write("all.jsonl"))
    cut = lines[: lines.index(b"\n", len(lines) // 2) + 12]
    storage.write_bytes(f"{arch.prefix}/cut.jsonl", cut)
    for name in ("empty.parquet", "empty.jsonl", "cut.parquet", "cut.jsonl"):
        assert _encode(bundle, f"{arch.prefix}/{name}", out) == 2, name
        assert ix.read_latest_version(out) == v1, name
    # a real shrink, accepted by hand
    assert _encode(bundle, f"{arch.prefix}/cut.jsonl", out, "allow_shrink=true") == 0
    kept = {json.loads(x)["item_id"] for x in cut.split(b"\n")[:-1]}
    assert _ids(out) == kept
    errors = ix.read_errors(ix.read_latest(out))
    assert errors.filter(pa.compute.equal(errors.column("stage"), "manifest")).num_rows == 1

    # one bad row among good ones: an error row, the night goes on
    text = lines + b"\xff\xfe garbage, not UTF-8\n" + b'{"item_id": null, "image_uri": "x"}\n'
    storage.write_bytes(f"{arch.prefix}/bad-rows.jsonl", text)
    assert _encode(bundle, f"{arch.prefix}/bad-rows.jsonl", out, "max_error_rate=0.3") == 0
    s = _summary(out)
    assert s["errors_by_stage"]["manifest"] == 2 and s["manifest_rows"] == len(arch.rows) + 2
    assert _ids(out) == arch.good_ids


# --------------------------------------------------------------------------------------------
# a node lost


def test_worker_node_removed_mid_encode_loses_nothing(two_node_cluster, s3_server, ray_session):
    # its own bundle and archive: the multi-node tests run last, after this module's `world`
    base = f"s3://{s3_server.bucket}/faults-node/{uuid4().hex}"
    bundle = _make_bundle(f"{base}/bundle")
    arch = _make_archive(f"{base}/archive", 48, seed=4)
    manifest = arch.write("manifest.parquet")
    clean = f"{base}/clean"
    assert _encode(bundle, manifest, clean) == 0
    out = f"{base}/index"
    env = dict(two_node_cluster.env, RAY_ADDRESS=two_node_cluster.gcs_address)
    # small blocks and two encoder actors, so both nodes hold blocks and run work (Ray Data
    # spreads tasks and actors over the nodes)
    sets = ("actors=2", "min_actors=2", "batch_size=8", "decode_batch=8", "manifest_block_rows=8")
    argv = _argv(bundle, manifest, out, *sets, "shard_rows=64")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "encode.py"), *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            parts = [u for u in storage.list_prefix(out) if "/catalog/" in u]
            if parts:  # the archive is read: the encode stage is starting
                time.sleep(1.0)
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before the node could be removed"
        two_node_cluster.kill_node2()
        rc, log = _finish(proc, timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log[-4000:]
    assert _rows(out).equals(_rows(clean))  # 0 items lost, the same codes
    assert catalog_snapshot.read_catalog(ix.read_latest(out)).num_rows == len(arch.rows)
