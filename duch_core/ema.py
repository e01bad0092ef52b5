"""An exponential moving average of the hashing heads' weights (``optim.ema_decay``).

After every hashing step ``w_avg <- d w_avg + (1 - d) w`` for each weight and BatchNorm running
statistic of both heads (the step counter of BatchNorm is copied), with the decay warmed up as
``d_t = min(decay, (1 + t) / (10 + t))`` so the random initial weights are forgotten after a few
hundred steps. Training itself uses the live weights; the averaged ones are what the run
evaluates and exports (:meth:`HeadAverage.copy_to`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from duch_core.model import DUCH

__all__ = ["HeadAverage"]

_HEADS = ("image_head", "text_head")


def _head_state(model: DUCH) -> dict[str, torch.Tensor]:
    return {
        f"{head}.{k}": v for head in _HEADS for k, v in getattr(model, head).state_dict().items()
    }


class HeadAverage:
    """The moving average of ``model``'s heads.

    Args:
        model: the model being trained (its current heads start the average).
        decay: ``d`` in ``(0, 1)``.
    """

    def __init__(self, model: DUCH, decay: float) -> None:
        if not (math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in _head_state(model).items()}

    @torch.no_grad()
    def update(self, model: DUCH) -> None:
        """Fold the heads' current weights in (call after each hashing step)."""
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        for k, v in _head_state(model).items():
            avg = self.shadow[k]
            if avg.is_floating_point():
                avg.mul_(d).add_(v.detach().to(avg.device), alpha=1.0 - d)
            else:
                avg.copy_(v)
        self.steps += 1

    @torch.no_grad()
    def copy_to(self, model: DUCH) -> None:
        """Load the averaged weights into ``model``'s heads (the discriminator is untouched)."""
        for head in _HEADS:
            module = getattr(model, head)
            prefix = f"{head}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in self.shadow.items() if k.startswith(prefix)}
            )

    def averaged(self, model: DUCH) -> DUCH:
        """A copy of ``model`` with the averaged heads (``model`` keeps its live weights)."""
        out = copy.deepcopy(model)
        self.copy_to(out)
        return out

    def state(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "steps": self.steps,
            "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the averaged weights in the checkpoint do not fit this model")
        self.decay, self.steps = float(state["decay"]), int(state["steps"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
