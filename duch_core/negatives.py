"""Extra negatives for the contrastive terms: the codes of recent batches (``loss.queue_size``).

One batch gives NT-Xent ``2N - 2`` negatives per anchor. A queue of the last ``Q`` codes of each
modality (detached, as a memory bank; the heads move slowly, so recent codes are close to what
the heads give now) adds ``Q`` or ``2Q`` more without a larger batch:

* the image-image term gets the queued image codes, the text-text term the queued text codes,
  the image-text term both;
* a queued code of the same item as an anchor (the queue spans an epoch boundary once ``Q``
  approaches the training set) is masked out, so an item is never its own negative;
* with data-parallel workers the queue holds the gathered codes, the same on every worker.

The queue starts empty and fills batch by batch; :meth:`NegativeQueue.state` /
:meth:`NegativeQueue.load_state` carry it through a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NegativeQueue", "Negatives"]


@dataclass(frozen=True)
class Negatives:
    """``(Q, K)`` codes (constants) and the ``(Q,)`` int64 training rows of their items."""

    codes: torch.Tensor
    rows: torch.Tensor

    def __post_init__(self) -> None:
        if self.codes.ndim != 2 or self.rows.shape != (self.codes.shape[0],):
            raise ValueError(
                f"negatives: codes {tuple(self.codes.shape)} and rows {tuple(self.rows.shape)} "
                "do not match"
            )

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @staticmethod
    def join(*parts: Negatives) -> Negatives:
        return Negatives(torch.cat([p.codes for p in parts]), torch.cat([p.rows for p in parts]))


class NegativeQueue:
    """The last ``size`` codes of each modality, oldest replaced first.

    Args:
        size: ``Q``, codes kept per modality (``> 0``).
        bits: ``K``.
    """

    def __init__(self, size: int, bits: int) -> None:
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        self.size = size
        self.bits = bits
        self._codes = {m: torch.zeros(size, bits) for m in ("image", "text")}
        # one item per slot: both modalities fill the same slots
        self._rows = torch.full((size,), -1, dtype=torch.int64)
        self._next = 0  # slot the next code goes to (both modalities move together)
        self._filled = 0

    def negatives(self, modality: str, device: torch.device | str = "cpu") -> Negatives:
        """The queued codes of ``modality`` (``image`` or ``text``), oldest first."""
        n = self._filled
        order = (torch.arange(n) + (self._next - n)) % self.size
        return Negatives(self._codes[modality][order].to(device), self._rows[order].to(device))

    def push(self, image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor) -> None:
        """Queue one batch: ``(N, K)`` image and text codes of the items at ``rows``."""
        if image.shape != text.shape or image.shape[0] != rows.shape[0]:
            raise ValueError(
                f"queue push: image {tuple(image.shape)}, text {tuple(text.shape)} and rows "
                f"{tuple(rows.shape)} do not match"
            )
        if image.shape[1] != self.bits:
            raise ValueError(f"queue push: codes of {image.shape[1]} bits, queue of {self.bits}")
        n = min(int(image.shape[0]), self.size)
        slots = (torch.arange(n) + self._next) % self.size
        for m, x in (("image", image), ("text", text)):
            self._codes[m][slots] = x[-n:].detach().to("cpu", torch.float32)
        self._rows[slots] = rows[-n:].to("cpu", torch.int64)
        self._next = int((self._next + n) % self.size)
        self._filled = min(self._filled + n, self.size)

    def __len__(self) -> int:
        return self._filled

    def state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "bits": self.bits,
            "next": self._next,
            "filled": self._filled,
            "codes": {m: t.clone() for m, t in self._codes.items()},
            "rows": self._rows.clone(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if (state["size"], state["bits"]) != (self.size, self.bits):
            raise ValueError(
                f"queue state of size {state['size']} x {state['bits']} bits does not fit a "
                f"queue of {self.size} x {self.bits}"
            )
        self._next, self._filled = int(state["next"]), int(state["filled"])
        self._codes = {m: t.clone() for m, t in state["codes"].items()}
        self._rows = state["rows"].clone()
