"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint directory holds ``state.pt`` (heads, both optimizers, the code table, epoch,
history, feature statistics, feature dimensions, the negative queue and the heads' moving
average when the config keeps them, torch RNG state) and ``config.json`` (the resolved job
config). Ray Train moves the directory to and from storage; this module only reads and writes
it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from duch_core.code_table import CodeTable
from duch_core.config import DUCHConfig
from duch_core.ema import HeadAverage
from duch_core.model import DUCH
from duch_core.negatives import NegativeQueue
from duch_core.train_loop import make_model

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


def training_state(
    model: DUCH,
    opt_hash: torch.optim.Optimizer,
    opt_disc: torch.optim.Optimizer,
    table: CodeTable,
    epoch: int,
    history: list[dict[str, float]],
    feature_stats: dict[str, dict[str, float]] | None,
    image_dim: int,
    text_dim: int,
    queue: NegativeQueue | None = None,
    average: HeadAverage | None = None,
) -> dict[str, Any]:
    """The state after epoch ``epoch`` (0-based) has finished, tensors on the CPU."""
    return {
        "average": average.state() if average is not None else None,
        "queue": queue.state() if queue is not None else None,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "opt_hash": opt_hash.state_dict(),
        "opt_disc": opt_disc.state_dict(),
        "table": table.state_dict(),
        "epoch": int(epoch),
        "history": list(history),
        "feature_stats": feature_stats,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "rng": torch.get_rng_state(),
    }


def save_state(directory: str, state: dict[str, Any], job_config: dict[str, Any]) -> None:
    """Write ``state.pt`` and ``config.json`` into the local directory ``directory``."""
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(job_config, f, indent=2, sort_keys=True)


def load_state(directory: str) -> dict[str, Any]:
    """Read ``state.pt`` of a local checkpoint directory (CPU tensors)."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def restore(
    state: dict[str, Any],
    model: DUCH,
    opt_hash: torch.optim.Optimizer,
    opt_disc: torch.optim.Optimizer,
    table: CodeTable,
    queue: NegativeQueue | None = None,
    average: HeadAverage | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Load ``state`` into the training objects (the negative queue and the heads' moving
    average too) and torch's RNG.

    Returns:
        ``(history, next_epoch)``: the epochs done so far and the epoch to run next.
    """
    model.load_state_dict(state["model"])
    opt_hash.load_state_dict(state["opt_hash"])
    opt_disc.load_state_dict(state["opt_disc"])
    table.load_state_dict(state["table"])
    if queue is not None:
        if state.get("queue") is None:
            raise ValueError("the checkpoint has no negative queue, the config asks for one")
        queue.load_state(state["queue"])
    if average is not None:
        if state.get("average") is None:
            raise ValueError("the checkpoint has no moving average, the config asks for one")
        average.load_state(state["average"])
    torch.set_rng_state(state["rng"])
    return list(state["history"]), int(state["epoch"]) + 1


def model_from_state(state: dict[str, Any], cfg: DUCHConfig) -> DUCH:
    """The heads stored in a checkpoint state (eval mode, CPU): the moving average of the
    heads when the run kept one (``optim.ema_decay``), else the trained weights."""
    model = make_model(int(state["image_dim"]), int(state["text_dim"]), cfg)
    model.load_state_dict(state["model"])
    if state.get("average") is not None:
        average = HeadAverage(model, state["average"]["decay"])
        average.load_state(state["average"])
        average.copy_to(model)
    return model.eval()
