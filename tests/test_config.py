"""Strict typed config loading with YAML files and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from duch_core import config
from duch_core.config import ConfigError, DUCHConfig


def test_defaults_are_the_papers_settings() -> None:
    cfg = config.load(DUCHConfig)
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.tau) == (0.01, 0.001, 0.01, 1.0)
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.epochs) == (1e-4, 256, 100)
    assert cfg.model.hidden_dim == 4096 and not cfg.paper_compat


def test_yaml_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  bits: 32\noptim:\n  lr: 1e-3\n  disc_betas: [0.4, 0.8]\n")
    cfg = config.load(DUCHConfig, str(p), ["model.bits=128", "paper_compat=true"])
    assert cfg.model.bits == 128 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.disc_betas == (0.4, 0.8) and cfg.paper_compat is True
    again = config.from_dict(DUCHConfig, config.to_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.bitz=3", "unknown config key"),
        ("model.bits=abc", "model.bits: expected an integer"),
        ("paper_compat=1", "expected true/false"),
        ("loss.contrast=cosine", "loss.contrast: expected 'exact' or 'published'"),
        ("loss.generator=both", "loss.generator: expected 'image' or 'text'"),
        ("loss.text_pair=none", "loss.text_pair: expected 'augmented' or 'same'"),
        ("loss.tau_bits=-1", "loss.tau_bits: expected >= 0"),
        ("optim.disc_betas=[1]", "expected 2 values"),
        ("loss=3", "expected a mapping"),
        ("nokey", "must look like"),
    ],
)
def test_bad_values_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config.load(DUCHConfig, None, [override])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(DUCHConfig, str(tmp_path / "nope.yaml"))


# --------------------------------------------------------------------------------------------
# the training pipeline's config: placement and locations

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def _train_config(*overrides: str):
    from jobs.train_config import TrainJobConfig, validate

    return validate(config.load(TrainJobConfig, SMOKE, ["work_dir=/tmp/duch", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "workers", "actors"),
    [
        ((), "SPREAD", "PACK"),  # smoke: 2 workers, 1 actor
        (("scaling.num_workers=1",), "PACK", "PACK"),
        (("features.actors=3",), "SPREAD", "SPREAD"),
        (
            ("scaling.placement_strategy=strict_spread", "features.placement_strategy=pack"),
            "STRICT_SPREAD",
            "PACK",
        ),
        (
            ("scaling.placement_strategy=PACK", "features.placement_strategy=SPREAD"),
            "PACK",
            "SPREAD",
        ),
    ],
)
def test_placement_defaults_to_spread_for_several_workers(
    overrides: tuple[str, ...], workers: str, actors: str
) -> None:
    from jobs import train

    cfg = _train_config(*overrides)
    assert (cfg.scaling.placement_strategy, cfg.features.placement_strategy) == (workers, actors)
    # the resolved value is what Ray Train gets (building the trainer starts nothing)
    trainer = train.make_trainer(cfg, None, ["a", "b", "c", "d"], None, 8, 8)
    assert trainer.scaling_config.placement_strategy == workers


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("scaling.placement_strategy=SPRED", "scaling.placement_strategy: must be one of"),
        ("features.placement_strategy=BEST", "features.placement_strategy: must be one of"),
        ("features.placement_strategy=STRICT_SPREAD", "cannot be strictly spread"),
        ("work_dir=s3://YOUR-BUCKET/duch", "work_dir: s3://YOUR-BUCKET/duch is a placeholder"),
        ("output=s3://YOUR-BUCKET/b", "output: s3://YOUR-BUCKET/b is a placeholder"),
    ],
)
def test_bad_placement_or_placeholder_names_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _train_config(override)


@pytest.mark.parametrize("name", ["paper_ucm", "paper_rsicd"])
def test_cluster_configs_use_s3_placeholders_until_replaced(name: str) -> None:
    from jobs.train_config import TrainJobConfig, shared_locations, validate

    path = str(Path(SMOKE).with_name(f"{name}.yaml"))
    assert "replace the s3://YOUR-BUCKET" in Path(path).read_text()
    with pytest.raises(ConfigError, match="YOUR-BUCKET"):
        validate(config.load(TrainJobConfig, path))
    sets = ["work_dir=s3://b/duch", "duch.data.archive=s3://b/a/manifest.parquet"]
    cfg = validate(config.load(TrainJobConfig, path, sets))
    # every location a worker touches is then on S3: fit for a multi-node cluster
    locations = shared_locations(cfg)
    assert set(locations) == {
        "work_dir",
        "features.cache_root",
        "duch.data.archive",
        "run.storage_path",
        "output",
    }
    assert all(uri.startswith("s3://b/") for uri in locations.values()), locations


def test_single_machine_configs_say_so() -> None:
    for name in ("smoke", "demo"):
        assert "For a single machine" in Path(SMOKE).with_name(f"{name}.yaml").read_text()
