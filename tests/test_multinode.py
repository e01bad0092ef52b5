"""The pipeline on a real 2-node Ray cluster (a head and a second `ray start --address` node).

One cluster serves the whole module (a start costs 30-60 s on 2 cores). The jobs run as separate
driver processes attached through ``RAY_ADDRESS``, as ``ray job submit`` runs them, with every
location on the test S3 server; where their tasks and actors ran is read back from the
workers' own records and from Ray's state API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from duch_core import storage
from jobs import _common

REPO = Path(__file__).resolve().parents[1]
SMOKE = "configs/smoke.yaml"
ENCODE_SMOKE = "configs/encode_smoke.yaml"


@pytest.fixture(scope="module")
def cluster(two_node_session) -> Any:
    """conftest's session-wide 2-node cluster, both nodes alive."""
    two_node_session.ensure_node2()
    return two_node_session


def _env(cluster: Any) -> dict[str, str]:
    """A driver's environment: the cluster's (S3 settings included) plus ``RAY_ADDRESS``."""
    env = dict(cluster.env, RAY_ADDRESS=cluster.gcs_address, PYTHONUNBUFFERED="1")
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        env[k] = os.environ[k]
    return env


def _driver(cluster, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a separate driver process attached to ``cluster``."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _job(cluster, args: list[str]) -> subprocess.Popen[str]:
    """Start ``python <args>`` as a driver of ``cluster`` (its pid names its Ray job)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 420) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _sets(*pairs: str) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


def _placements(cluster: Any, pid: int) -> dict[str, set[str]]:
    """Node ids by task or actor name of the Ray job whose driver had process id ``pid``."""
    from ray.util.state import list_actors, list_jobs, list_tasks

    addr = cluster.dashboard_url
    job = next(
        j.job_id
        for j in list_jobs(address=addr, limit=1000)
        if j.driver_info is not None and int(j.driver_info.pid) == pid
    )
    where: dict[str, set[str]] = {}
    deadline = time.monotonic() + 20  # task events reach the state API about a second late
    while True:
        tasks = list_tasks(address=addr, filters=[("job_id", "=", job)], limit=10_000, detail=True)
        actors = list_actors(address=addr, filters=[("job_id", "=", job)], limit=1000, detail=True)
        for t in tasks:
            if t.node_id and t.type == "NORMAL_TASK":
                where.setdefault(t.name, set()).add(t.node_id)
        for a in actors:
            if a.node_id:
                where.setdefault(a.class_name + " actor", set()).add(a.node_id)
        if where or time.monotonic() > deadline:
            return where
        time.sleep(1)


# --------------------------------------------------------------------------------------------
# the cluster itself and the location rule


@pytest.fixture(scope="module")
def nodes(cluster) -> dict[str, str]:
    """The node id of the head (``head``) and of the second node (``node2``)."""
    code = (
        "import json, ray\n"
        "ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
        "@ray.remote(num_cpus=0)\n"
        "def where():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "a = ray.get(where.options(resources={'head': 0.01}).remote())\n"
        "b = ray.get(where.options(resources={'node2': 0.01}).remote())\n"
        "print(json.dumps({'nodes': sum(n['Alive'] for n in ray.nodes()), 'head': a, 'node2': b}))\n"
    )
    out = _driver(cluster, code)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got.pop("nodes") == 2
    return got


def test_two_node_fixture_forms_a_cluster_and_tasks_reach_both_nodes(nodes):
    assert nodes["head"] != nodes["node2"]


def test_location_check_refuses_node_local_paths_on_two_nodes():
    with pytest.raises(_common.LocationError) as err:
        _common.check_shared_locations(
            {"run.storage_path": "/data/ray_results", "output": "s3://b/bundle", "x": None},
            nodes=2,
        )
    msg = str(err.value)
    assert "run.storage_path=/data/ray_results" in msg and "s3://" in msg
    assert "output" not in msg.split("node-local:")[1]
    # one node: local paths are fine
    _common.check_shared_locations({"run.storage_path": "/data/ray_results"}, nodes=1)


def test_train_job_with_local_locations_exits_2_naming_every_key(cluster, tmp_path):
    work = tmp_path / "work"
    proc = _job(cluster, ["jobs/train.py", "--config", SMOKE, *_sets(f"work_dir={work}")])
    rc, out = _finish(proc, timeout=180)
    assert rc == 2, out[-3000:]
    assert "this Ray cluster has 2 nodes" in out, out[-3000:]
    for key in ("work_dir", "run.storage_path", "features.cache_root", "output"):
        assert f"{key}={work}" in out, (key, out[-3000:])
    assert f"duch.data.archive={work}/demo_archive/" in out  # the demo archive would be local
    assert not work.exists()  # refused before anything was written


def test_extract_and_evaluate_jobs_refuse_local_locations(cluster, tmp_path, s3_server):
    work, s3 = tmp_path / "work", f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    code = (
        "import sys\n"
        "from jobs import evaluate, extract_features\n"
        f"a = extract_features.main(['--config', {SMOKE!r}, '--set', 'work_dir={work}'])\n"
        f"b = evaluate.main(['--config', {SMOKE!r}, '--set', 'work_dir={s3}',\n"
        f"                   '--bundle', '{work}/bundle'])\n"
        "print('RC', a, b)\n"
    )
    out = _driver(cluster, code, timeout=180)
    assert "RC 2 2" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "extract_features: this Ray cluster has 2 nodes" in out.stderr
    assert f"features.cache_root={work}/features" in out.stderr
    # evaluate: everything else on S3, only the bundle (given with --bundle) is node-local
    assert f"node-local: --bundle={work}/bundle. Put them" in out.stderr, out.stderr[-3000:]
    assert not work.exists()


def test_encode_job_refuses_local_locations(cluster, tmp_path, s3_server):
    s3 = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    code = (
        "from jobs import encode\n"
        f"rc = encode.main(['--bundle', '{s3}/bundle', '--archive', '{s3}/archive.jsonl',\n"
        f"                  '--out', '{tmp_path}/index'])\n"
        "print('RC', rc)\n"
    )
    out = _driver(cluster, code, timeout=180)
    assert "RC 2" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"node-local: out={tmp_path}/index. Put them" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "index").exists()


# --------------------------------------------------------------------------------------------
# training: SPREAD puts the workers on both nodes and changes nothing in the result


@pytest.fixture(scope="module")
def trained(cluster, s3_server) -> dict[str, Any]:
    """Two one-epoch smoke runs from one driver on the cluster, all locations in S3: 2 workers
    with ``SPREAD`` (computing the features), then the same 2 workers with ``PACK`` and the same
    seed (reusing the features)."""
    work = f"s3://{s3_server.bucket}/multinode-{uuid.uuid4().hex[:8]}"
    base = [
        f"work_dir={work}",
        "duch.optim.epochs=1",
        "scaling.num_workers=2",
        "features.placement_strategy=SPREAD",
    ]
    argv = {
        p.lower(): ["--config", SMOKE, *_sets(*base, f"run.name={p.lower()}")]
        + _sets(f"scaling.placement_strategy={p}")
        for p in ("SPREAD", "PACK")
    }
    code = (
        "import sys\n"
        "from jobs import train\n"
        f"rc = train.main({argv['spread']!r}) or train.main({argv['pack']!r})\n"
        "sys.exit(rc)\n"
    )
    proc = _job(cluster, ["-c", code])
    rc, out = _finish(proc)
    assert rc == 0, out[-5000:]
    runs = {
        name: storage.read_json(storage.join(work, "bundles", name, "training.json"))
        for name in argv
    }
    return {
        "work": work,
        "runs": runs,
        "log": out,
        "where": _placements(cluster, proc.pid),
    }


def test_spread_training_puts_one_worker_on_each_node(trained, nodes):
    spread = trained["runs"]["spread"]
    assert spread["config"]["scaling"]["placement_strategy"] == "SPREAD"
    by_rank = [w["node_id"] for w in spread["workers"]]
    name = {v: k for k, v in nodes.items()}
    print(
        "\ntraining workers by rank: SPREAD",
        [name.get(n, n[:8]) for n in by_rank],
        "PACK",
        [name.get(w["node_id"], w["node_id"][:8]) for w in trained["runs"]["pack"]["workers"]],
    )
    assert [w["rank"] for w in spread["workers"]] == [0, 1]
    assert sorted(by_rank) == sorted(nodes.values()), (by_rank, nodes)
    assert "2 worker(s) on 2 node(s)" in trained["log"]
    # PACK: both workers share one node
    pack = trained["runs"]["pack"]
    assert pack["config"]["scaling"]["placement_strategy"] == "PACK"
    assert len({w["node_id"] for w in pack["workers"]}) == 1
    assert pack["workers"][0]["node_id"] in nodes.values()


def test_spread_and_pack_give_the_same_model(trained):
    spread, pack = trained["runs"]["spread"], trained["runs"]["pack"]
    assert pack["features_reused"] is True and pack["features"] == spread["features"]
    assert spread["split"] == pack["split"]
    # the bundle id hashes the heads' weights, feature statistics and method config: the
    # same id means bit-identical models, so every code they give is the same
    assert spread["bundle_id"] == pack["bundle_id"]
    assert spread["metrics"] == pack["metrics"]
    timing = {"seconds", "samples_per_s"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in spread["history"]] == [
        {k: v for k, v in h.items() if k not in timing} for h in pack["history"]
    ]


def test_feature_stage_ran_on_both_nodes(trained, nodes):
    where = trained["where"]
    name = {v: k for k, v in nodes.items()}
    print("\ntraining job, where each task and actor ran:")
    for what, ids in sorted(where.items()):
        print(f"  {what}: {sorted(name.get(i, i[:8]) for i in ids)}")
    decode = set().union(*(ids for name, ids in where.items() if "decode_batch" in name))
    assert decode == set(nodes.values()), where
    workers = set().union(*(ids for name, ids in where.items() if "TrainWorker" in name))
    assert workers == set(nodes.values()), where


# --------------------------------------------------------------------------------------------
# encoding over both nodes


def _reference_codes(bundle: str, manifest: str) -> dict[tuple[str, int], bytes]:
    """Every image's and caption's code from the in-memory encoder, one process, no Ray:
    ``{(item_id, caption_index or -1): packed code}``."""
    from duch_core.archive import read_archive
    from duch_core.bundle import Bundle
    from duch_core.hash_encoder import HashEncoder
    from duch_core.imageio import decode_image, decode_options

    enc = HashEncoder(Bundle.load(bundle))
    opts = decode_options(enc.bundle.config.image_backbone)
    rows = read_archive(manifest).to_pylist()
    imgs = [decode_image(storage.read_bytes(r["image_uri"]), **opts) for r in rows]
    ref = {
        (r["item_id"], -1): c.tobytes() for r, c in zip(rows, enc.encode_images(imgs), strict=True)
    }
    keys = [(r["item_id"], j) for r in rows for j in range(len(r["captions"]))]
    texts = [t for r in rows for t in r["captions"]]
    ref |= {k: c.tobytes() for k, c in zip(keys, enc.encode_texts(texts), strict=True)}
    return ref


def test_encode_over_two_nodes_equals_the_in_memory_encoder(cluster, trained, nodes):
    """The encode job on both nodes publishes exactly the codes of one process.

    tests/test_encode_job.py holds the encode job on one node to the same reference.
    """
    from duch_core import index_store as ix

    work = trained["work"]
    bundle = storage.join(work, "bundles", "spread")
    archive = storage.join(work, "demo_archive", "n4-s64-seed0", "manifest.parquet")
    out = storage.join(work, "index")
    sets = _sets("manifest_block_rows=4", "decode_batch=4", "actors=2", "min_actors=2")
    argv = ["--config", ENCODE_SMOKE, "--bundle", bundle, "--archive", archive, "--out", out]
    proc = _job(cluster, ["jobs/encode.py", *argv, *sets])
    rc, log = _finish(proc)
    assert rc == 0, log[-5000:]
    where = _placements(cluster, proc.pid)
    name = {v: k for k, v in nodes.items()}
    print("\nencode job, where each task and actor ran:")
    for what, ids in sorted(where.items()):
        print(f"  {what}: {sorted(name.get(i, i[:8]) for i in ids)}")
    assert set().union(*where.values()) == set(nodes.values()), where

    m = ix.read_latest(out)
    rows = ix.read_rows(m)
    keys = list(
        zip(
            rows.column("item_id").to_pylist(),
            rows.column("caption_index").to_pylist(),
            strict=True,
        )
    )
    codes = ix.codes_from_column(rows.column("code"), m.bits)
    reference = _reference_codes(bundle, archive)
    assert len(keys) == len(set(keys)) == len(reference) > 32
    assert {k: c.tobytes() for k, c in zip(keys, codes, strict=True)} == reference
