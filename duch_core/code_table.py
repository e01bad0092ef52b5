"""The per-sample binary target table ``B`` of the quantization loss, keyed by item id.

Each training item has a ``±1`` code ``B[id]``, initialised as ``sign(randn)`` and refreshed once
per epoch from that epoch's outputs (docs/method.md §4.5)::

    B[id] = sign( ((h_v1 + h_v2) / 2 + (h_t1 + h_t2) / 2) / 2 )

with the project's sign convention (``0 -> +1``, :func:`duch_core.codes.sign`). Rows are found by
item id, so the table is unaffected by shuffling and by how items are sharded across
data-parallel workers: every worker holds the whole table, records the rows it saw, and the
workers exchange their records (:meth:`CodeTable.export` / :meth:`CodeTable.merge`) before the
refresh, so all copies stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from duch_core.codes import check_bits, sign


class UnknownItemError(KeyError):
    """An item id is not in the code table (it was not part of the training set)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CodeTable:
    """``B``: one ``±1`` code per training item.

    Row order is the sorted item ids, so the table (and its seeded initialisation) does not
    depend on the order in which ids are given.

    Args:
        item_ids: the training item ids (unique strings).
        bits: code length ``K``.
        seed: seed of the ``sign(randn)`` initialisation.
    """

    def __init__(self, item_ids: Iterable[str], bits: int, seed: int = 42) -> None:
        ids = sorted(str(i) for i in item_ids)
        if not ids:
            raise ValueError("CodeTable needs at least one item id")
        dup = [a for a, b in zip(ids, ids[1:], strict=False) if a == b]
        if dup:
            raise ValueError(f"CodeTable item ids must be unique; duplicated: {dup[:5]}")
        self.bits = check_bits(bits)
        self.seed = seed
        self.ids: list[str] = ids
        self._row = {item: i for i, item in enumerate(ids)}
        g = torch.Generator().manual_seed(seed)
        self.b = torch.from_numpy(sign(torch.randn(len(ids), bits, generator=g))).to(torch.int8)
        self._fused = torch.zeros(len(ids), bits, dtype=torch.float32)
        self._recorded = torch.zeros(len(ids), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        """``(N,)`` int64 row numbers of ``ids``.

        Raises:
            UnknownItemError: an id is not in the table.
        """
        try:
            return torch.tensor([self._row[str(i)] for i in ids], dtype=torch.int64)
        except KeyError as e:
            raise UnknownItemError(
                f"item id {e.args[0]!r} is not in the code table ({len(self.ids)} training items)"
            ) from None

    def lookup(
        self, ids: Sequence[str], device: str | torch.device = "cpu", dtype: Any = torch.float32
    ) -> torch.Tensor:
        """``(N, K)`` ``±1`` targets of ``ids`` (float32 by default) on ``device``."""
        return self.b[self.rows(ids)].to(device=device, dtype=dtype)

    def record(
        self,
        ids: Sequence[str],
        h_v1: torch.Tensor,
        h_v2: torch.Tensor,
        h_t1: torch.Tensor,
        h_t2: torch.Tensor,
    ) -> None:
        """Store this epoch's outputs for ``ids`` (each ``(N, K)`` continuous codes, detached).

        A later record of the same id within the epoch replaces the earlier one.
        """
        n = len(ids)
        for h in (h_v1, h_v2, h_t1, h_t2):
            if h.shape != (n, self.bits):
                raise ValueError(
                    f"record expects ({n}, {self.bits}) codes for {n} ids, got {tuple(h.shape)}"
                )
        fused = ((h_v1 + h_v2) / 2 + (h_t1 + h_t2) / 2) / 2
        rows = self.rows(ids)
        self._fused[rows] = fused.detach().to("cpu", torch.float32)
        self._recorded[rows] = True

    @property
    def recorded(self) -> int:
        """Number of rows recorded since the last refresh."""
        return int(self._recorded.sum())

    def export(self) -> dict[str, Any]:
        """This table's records since the last refresh, to send to the other workers.

        Returns:
            ``{"ids": list[str], "fused": (M, K) float32 numpy}``.
        """
        rows = torch.nonzero(self._recorded).flatten()
        return {"ids": [self.ids[int(r)] for r in rows], "fused": self._fused[rows].numpy().copy()}

    def merge(self, exports: Iterable[dict[str, Any]]) -> None:
        """Add records exported by other workers (:meth:`export`)."""
        for ex in exports:
            ids = list(ex["ids"])
            if not ids:
                continue
            fused = torch.as_tensor(np.asarray(ex["fused"], dtype=np.float32))
            if fused.shape != (len(ids), self.bits):
                raise ValueError(
                    f"merged records have shape {tuple(fused.shape)} for {len(ids)} ids, "
                    f"expected ({len(ids)}, {self.bits})"
                )
            rows = self.rows(ids)
            self._fused[rows] = fused
            self._recorded[rows] = True

    def refresh(self) -> int:
        """``B = sign(fused)`` for every recorded row, then clear the records.

        Rows not recorded this epoch keep their code. Returns the number of rows updated.
        """
        rows = torch.nonzero(self._recorded).flatten()
        if len(rows):
            self.b[rows] = torch.from_numpy(sign(self._fused[rows])).to(torch.int8)
        self._recorded.zero_()
        self._fused.zero_()
        return int(len(rows))

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: ``{"ids", "bits", "seed", "b" ((N, K) int8)}``."""
        return {"ids": list(self.ids), "bits": self.bits, "seed": self.seed, "b": self.b.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the ids must match this table's.

        Raises:
            ValueError: different ids or code length.
        """
        if int(state["bits"]) != self.bits:
            raise ValueError(f"checkpointed code table has {state['bits']} bits, not {self.bits}")
        if list(state["ids"]) != self.ids:
            raise ValueError("checkpointed code table holds different item ids")
        b = torch.as_tensor(state["b"]).to(torch.int8)
        if b.shape != self.b.shape or not bool(((b == 1) | (b == -1)).all()):
            raise ValueError("checkpointed code table must be an (N, K) array of -1/+1")
        self.b = b.clone()
        self._recorded.zero_()
        self._fused.zero_()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CodeTable:
        """A table rebuilt from :meth:`state_dict` output."""
        table = cls(state["ids"], int(state["bits"]), int(state.get("seed", 42)))
        table.load_state_dict(state)
        return table
