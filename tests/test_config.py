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
