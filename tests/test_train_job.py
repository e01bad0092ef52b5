"""jobs/train.py end to end: Ray Train on the real S3 server, fault tolerance, resume,
`ray job submit` against a locally started cluster, and configuration errors.

Every run uses the smoke settings (tiny towers, 16-bit codes, 2 CPU workers).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from duch_core import checkpoint, codes, report, storage
from duch_core.bundle import Bundle
from duch_core.config import load
from duch_core.feature_batches import FeatureStats
from duch_core.features import load_feature_set, read_columns, read_items
from duch_core.hash_encoder import HashEncoder
from duch_core.train_loop import encode_features
from jobs import train
from jobs.train_config import TrainJobConfig, prepare_archive, validate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def smoke_config(*overrides: str) -> TrainJobConfig:
    return validate(load(TrainJobConfig, SMOKE, list(overrides)))


def read_state(checkpoint_uri: str) -> dict[str, Any]:
    data = storage.read_bytes(storage.join(checkpoint_uri, checkpoint.STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def s3_demo(s3_server, ray_session):  # noqa: ARG001 - both must be up
    """The smoke demo archive stored in S3, with a shared S3 feature cache."""
    from duch_core.synthetic_archive import make_demo_archive

    base = f"s3://{s3_server.bucket}/train-job-{uuid.uuid4().hex[:8]}"
    make_demo_archive(storage.join(base, "archive"), n_per_class=4, image_size=64, seed=0)
    return base


def s3_overrides(base: str, name: str, work_dir: Path) -> list[str]:
    return [
        f"work_dir={work_dir}",
        f"duch.data.archive={storage.join(base, 'archive', 'manifest.parquet')}",
        f"features.cache_root={storage.join(base, 'features')}",
        f"run.storage_path={storage.join(base, 'ray_results')}",
        f"run.name={name}",
        f"output={storage.join(base, 'bundles', name)}",
    ]


# --------------------------------------------------------------------------------------------
# Ray Train on S3


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def s3_run(s3_demo: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-worker smoke run on the S3 demo archive, checkpoints and bundle in S3, validated
    every epoch; the driver's ``duch.train`` log lines are kept."""
    work = tmp_path_factory.mktemp("s3run")
    sets = [*s3_overrides(s3_demo, "s3run", work), "run.eval_every=1"]
    cfg = smoke_config(*sets)
    logger, handler = logging.getLogger("duch.train"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = train.run(cfg, prepare_archive(cfg))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"cfg": cfg, "sets": sets, "work": work, "summary": summary, "log": handler.lines}


def test_two_workers_on_s3_bundle_reproduces_the_model(s3_demo: str, s3_run: dict) -> None:
    cfg, summary, tmp_path = s3_run["cfg"], s3_run["summary"], s3_run["work"]

    # checkpoints and outputs live in S3, nothing under the local work_dir but nothing at all
    assert summary["checkpoint"].startswith(storage.join(s3_demo, "ray_results", "s3run") + "/")
    assert summary["bundle"] == storage.join(s3_demo, "bundles", "s3run")
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "features").exists()
    assert [int(h["epoch"]) for h in summary["history"]] == [0, 1]
    assert all(h["samples"] == summary["split"]["train"] for h in summary["history"])
    assert summary["epochs"] == 2 and summary["features_reused"] is False
    # one local node: both workers (SPREAD by default for 2) on it, recorded by rank
    assert cfg.scaling.placement_strategy == "SPREAD"
    assert [w["rank"] for w in summary["workers"]] == [0, 1]
    assert len({w["node_id"] for w in summary["workers"]}) == 1

    # the exported bundle gives exactly the codes of the in-memory (checkpointed) model
    state = read_state(summary["checkpoint"])
    model = checkpoint.model_from_state(state, cfg.duch)
    stats = FeatureStats.from_dict(state["feature_stats"])
    bundle = Bundle.load(summary["bundle"])
    assert bundle.bundle_id == summary["bundle_id"] and bundle.bits == 16
    fs_ = load_feature_set(summary["features"], reused=True)
    assert fs_ is not None
    items = read_items(fs_, read_columns(fs_, ["item_id"]).column("item_id").to_pylist())
    enc = HashEncoder(bundle)
    for feats, modality, from_bundle in (
        (items.img, "image", enc.image_codes_from_features),
        (items.txt, "text", enc.text_codes_from_features),
    ):
        mine = codes.pack(encode_features(model, stats.apply(feats, modality), modality))
        theirs = codes.pack(from_bundle(feats))
        assert mine.shape == (len(items.ids), 2)
        np.testing.assert_array_equal(theirs, mine)
    # the bundle's own towers rebuild the cached features from the raw images
    manifest = prepare_archive(cfg)
    ids, image_uris = manifest.column("item_id").to_pylist(), manifest.column("image_uri")
    uris = dict(zip(ids, image_uris.to_pylist(), strict=True))
    from duch_core.imageio import decode_image

    some = items.ids[:4]
    pics = [decode_image(storage.read_bytes(uris[i])) for i in some]
    np.testing.assert_allclose(
        enc.image_features(pics).numpy(), items.img[:4], rtol=1e-4, atol=1e-4
    )

    # the end-of-run evaluation: metrics in the bundle, report files next to it
    assert bundle.meta["metrics"] == summary["metrics"]
    assert set(summary["metrics"]) >= {"map@20_i2t", "map@20_t2t", "map@10_mean"}
    assert all(0.0 <= v <= 1.0 for v in summary["metrics"].values())
    written = storage.read_json(summary["report"]["json"])
    assert report.flat_metrics(written) == summary["metrics"]
    assert written["bundle_id"] == bundle.bundle_id
    for png in ("pr_curve", "loss_curve"):
        assert storage.read_bytes(summary["report"][png])[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["report"]["loss_curve"] == storage.join(summary["bundle"], report.LOSS_PNG)
    training = storage.read_json(storage.join(summary["bundle"], "training.json"))
    assert training["config"]["run"]["name"] == "s3run"


def test_driver_logs_one_line_per_epoch_with_validation(s3_run: dict) -> None:
    summary = s3_run["summary"]
    lines = [m for m in s3_run["log"] if m.startswith("epoch ")]
    assert [m.split()[1] for m in lines] == ["1/2", "2/2"], s3_run["log"]
    for line, rec in zip(lines, summary["history"], strict=True):
        assert f"loss {rec['total']:.4g} (inter " in line and "bit imbalance" in line
        assert f"mAP@20 {rec['map_mean']:.4f}" in line  # run.eval_every=1: every epoch
    # worker 0 validated the same heads the final evaluation scores
    assert summary["history"][-1]["map_mean"] == pytest.approx(
        summary["metrics"]["map@20_mean"], abs=1e-12
    )


def test_evaluate_job_reproduces_the_training_evaluation(
    s3_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import evaluate

    summary = s3_run["summary"]
    argv = ["--config", SMOKE, "--bundle", summary["bundle"], "--out", str(tmp_path)]
    for kv in s3_run["sets"]:
        argv += ["--set", kv]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"report written to {tmp_path}" in printed and len(printed.splitlines()) <= 4
    written = storage.read_json(str(tmp_path / report.REPORT_JSON))
    # the bundle alone, through HashEncoder, scores exactly what the trained heads scored
    assert report.flat_metrics(written) == summary["metrics"]
    trained = storage.read_json(summary["report"]["json"])
    for key in ("map", "map_standard", "precision_at_k", "pr_curve", "n_query", "n_database"):
        assert written[key] == trained[key], key
    assert written["n_query"] == summary["split"]["query"]
    for png in (report.PR_PNG, report.PK_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mAP@20 |" in (tmp_path / report.REPORT_MD).read_text()


# --------------------------------------------------------------------------------------------
# data parallelism at the Ray Train level


def _global_batch() -> tuple[list[torch.Tensor], torch.Tensor, Any]:
    """A fixed global batch of 6 rows: four code views, targets and a discriminator."""
    from duch_core.model import Discriminator

    g = torch.Generator().manual_seed(3)
    hs = [torch.tanh(torch.randn(6, 16, generator=g, dtype=torch.float64)) for _ in range(4)]
    b = torch.where(torch.randn(6, 16, generator=g) >= 0, 1.0, -1.0).double()
    torch.manual_seed(3)
    return hs, b, Discriminator(16).double().eval()


def _loss_step(rank: int, world: int, collective: Any) -> dict[str, Any]:
    """The loss of one worker's contiguous slice of the global batch, negatives gathered."""
    from duch_core.config import LossConfig
    from duch_core.distributed import gather_with_grad
    from duch_core.losses import duch_loss

    hs, b, disc = _global_batch()
    n = hs[0].shape[0]
    sl = slice(rank * n // world, (rank + 1) * n // world)
    local = [h[sl].clone().requires_grad_(True) for h in hs]
    gathered = tuple(gather_with_grad(x, collective) for x in local) if collective else None
    cfg = LossConfig(tau=0.5, w_intra_image=0.8, w_intra_text=0.6)
    total, parts = duch_loss(*local, b[sl], disc, cfg, contrastive_codes=gathered)  # type: ignore[arg-type]
    total.backward()
    return {"parts": {k: float(v) for k, v in parts.items()}, "grads": [h.grad for h in local]}


def test_gathered_loss_with_two_ray_workers_equals_one_process(ray_session, tmp_path: Path) -> None:
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    step = _loss_step  # pickled by value with the trainer: tests/ is not importable in workers

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        from duch_core.distributed import TorchCollective

        ctx = ray.train.get_context()
        coll = TorchCollective()
        mine = step(ctx.get_world_rank(), ctx.get_world_size(), coll)
        everyone = coll.all_gather_object(mine)
        if ctx.get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(everyone, os.path.join(d, "steps.pt"))
                ray.train.report({"ok": 1.0}, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report({"ok": 1.0})

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = TorchTrainer(
            loop,
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="loss", storage_path=str(tmp_path)),
        ).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    with result.checkpoint.as_directory() as d:
        workers = torch.load(os.path.join(d, "steps.pt"), weights_only=False)
    single = _loss_step(0, 1, None)
    for key in ("inter", "intra_image", "intra_text", "contrastive"):  # global on each worker
        for w in workers:
            assert w["parts"][key] == pytest.approx(single["parts"][key], rel=1e-12)
    for key in ("adversarial", "quantization", "bit_balance"):  # per-row terms add up
        assert sum(w["parts"][key] for w in workers) == pytest.approx(
            single["parts"][key], rel=1e-12
        )
    for v in range(4):  # each worker's gradient is its rows of the single-process gradient
        joined = torch.cat([w["grads"][v] for w in workers])
        torch.testing.assert_close(joined, single["grads"][v], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# fault tolerance and resume


def test_killed_worker_resumes_from_the_last_checkpoint(s3_demo: str, tmp_path: Path) -> None:
    cfg = smoke_config(
        *s3_overrides(s3_demo, "faulty", tmp_path), "run.fail_at_epoch=1", "run.max_failures=1"
    )
    summary = train.run(cfg, prepare_archive(cfg))
    marker = storage.read_json(storage.join(s3_demo, "ray_results", "faulty", train.FAULT_MARKER))
    assert marker["epoch"] == 1 and marker["rank"] == 1  # the last worker died in epoch 1
    hist = summary["history"]
    assert [int(h["epoch"]) for h in hist] == [0, 1]  # nothing lost, nothing repeated
    # epoch 0 comes from the first attempt, epoch 1 from the attempt restored from epoch 0's
    # checkpoint (a fresh start would say 0 for both)
    assert [int(h["resumed_from"]) for h in hist] == [0, 1]
    assert summary["epochs"] == 2 and summary["features_reused"] is True  # cache hit
    state = read_state(summary["checkpoint"])
    assert state["epoch"] == 1 and state["history"] == hist


@pytest.mark.slow
def test_rerun_with_the_same_name_continues(s3_demo: str, tmp_path: Path) -> None:
    sets = s3_overrides(s3_demo, "rerun", tmp_path)
    first = train.run(cfg := smoke_config(*sets, "duch.optim.epochs=1"), prepare_archive(cfg))
    more = smoke_config(*sets, "duch.optim.epochs=3")
    again = train.run(more, prepare_archive(more))
    assert [int(h["epoch"]) for h in again["history"]] == [0, 1, 2]
    assert [int(h["resumed_from"]) for h in again["history"]] == [0, 1, 1]
    assert again["history"][:1] == first["history"]


# --------------------------------------------------------------------------------------------
# configuration errors: reported before Ray or any worker starts


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("duch.model.bits=13", "duch.model.bits"),
        ("duch.optim.batch_size=7", "split evenly into 2 workers"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("run.eval_every=-1", "run.eval_every"),
        ("run.name=has space", "run.name"),
        ("duch.augment.image_preset=sepia", "duch.augment.image_preset"),
        ("duch.optim.epoch=3", "epoch"),  # unknown key
        ("duch.data.archive=/nonexistent/archive/manifest.parquet", "/nonexistent/archive"),
    ],
)
def test_bad_config_fails_before_anything_starts(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    was_up = ray.is_initialized()
    rc = train.main(["--config", SMOKE, "--set", f"work_dir={tmp_path}", "--set", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("train: ") and message in err
    assert list(tmp_path.iterdir()) == []  # no demo archive, features or checkpoints written
    assert ray.is_initialized() == was_up


def test_missing_archive_file_in_s3_is_reported(
    s3_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/manifest.parquet"
    rc = train.main(
        ["--config", SMOKE, "--set", f"work_dir={tmp_path}", "--set", f"duch.data.archive={uri}"]
    )
    assert rc == 2 and uri.rsplit("/", 1)[0] in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# ray job submit against a cluster started with `ray start --head`


def test_ray_job_submit_runs_the_smoke_config(head_cluster: Any, tmp_path: Path) -> None:
    ray_bin = head_cluster.cli("ray")
    env = head_cluster.env
    work = tmp_path / "work"
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".venv", "out", ".git", "**/__pycache__", "*.egg-info", ".mypy_cache"],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    t0 = time.monotonic()
    submit = [
        ray_bin,
        "job",
        "submit",
        f"--address={head_cluster.dashboard_url}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        sys.executable,  # the project's interpreter: the cluster runs from this venv
        "jobs/train.py",
        "--config",
        "configs/smoke.yaml",
        "--set",
        f"work_dir={work}",
    ]
    for _ in range(30):  # the dashboard's job agent comes up a little after `ray start`
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=420)
        if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(2)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-5000:]
    assert "Started a local Ray instance" not in log  # the driver joined the cluster
    assert f"bundle written to {work}/bundles/smoke" in log
    # the per-epoch lines reach the driver console although workers' output does not (quiet)
    assert "epoch 1/2  loss " in log and "epoch 2/2  loss " in log, log[-5000:]
    bundle = Bundle.load(str(work / "bundles" / "smoke"))
    assert bundle.bits == 16 and "map@20_mean" in bundle.meta["metrics"]
    assert time.monotonic() - t0 < 400
