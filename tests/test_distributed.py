"""Data-parallel DUCH: W workers with B / W items each take the step of one worker with B items.

Checked twice: with a fake collective in one process (no process group, as open_clip tests its
gather), and with a real 2-process gloo group on 127.0.0.1 (run inside scripts/isolated: the
TCPStore listens on every interface).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from duch_core.code_table import CodeTable
from duch_core.config import DUCHConfig, LossConfig, ModelConfig, OptimConfig
from duch_core.distributed import (
    TorchCollective,
    default_collective,
    gather_with_grad,
    sync_gradients,
)
from duch_core.feature_batches import make_batches
from duch_core.losses import duch_loss
from duch_core.model import Discriminator
from duch_core.optim import make_optimizers
from duch_core.train_loop import make_model, train_epoch

SPLITS = (slice(0, 3), slice(3, 5))  # uneven shards of a global batch of 5
CFG = LossConfig(tau=0.5, w_intra_image=0.8, w_intra_text=0.6)


def global_batch(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, Discriminator]:
    g = torch.Generator().manual_seed(seed)
    hs = [torch.tanh(torch.randn(5, 16, generator=g, dtype=torch.float64)) for _ in range(4)]
    b = torch.where(torch.randn(5, 16, generator=g) >= 0, 1.0, -1.0).double()
    torch.manual_seed(seed)
    disc = Discriminator(16).double().eval()  # eval: the adversarial term is per row
    return hs, b, disc


def single_process(hs: list[torch.Tensor], b: torch.Tensor, disc: Discriminator) -> dict[str, Any]:
    leaves = [h.clone().requires_grad_(True) for h in hs]
    total, parts = duch_loss(*leaves, b, disc, CFG)
    total.backward()
    return {"parts": parts, "grads": [h.grad for h in leaves]}


def worker_step(
    hs: list[torch.Tensor], b: torch.Tensor, disc: Discriminator, rank: int, collective: Any
) -> dict[str, Any]:
    sl = SPLITS[rank]
    local = [h[sl].clone().requires_grad_(True) for h in hs]
    gathered = tuple(gather_with_grad(x, collective) for x in local)
    total, parts = duch_loss(*local, b[sl], disc, CFG, contrastive_codes=gathered)  # type: ignore[arg-type]
    total.backward()
    return {"parts": parts, "grads": [h.grad for h in local]}


def check_equivalence(single: dict[str, Any], workers: list[dict[str, Any]]) -> None:
    for key in ("inter", "intra_image", "intra_text", "contrastive"):  # global on every worker
        for w in workers:
            assert float(w["parts"][key]) == pytest.approx(float(single["parts"][key]), rel=1e-12)
    for key in ("adversarial", "quantization", "bit_balance"):  # local sums add up
        total = sum(float(w["parts"][key]) for w in workers)
        assert total == pytest.approx(float(single["parts"][key]), rel=1e-12)
    for v in range(4):  # each worker's gradient is its slice of the single-process gradient
        joined = torch.cat([w["grads"][v] for w in workers])
        assert torch.allclose(joined, single["grads"][v], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# fake collective


class FakeCollective:
    """Two workers in one process: ``all_gather`` answers with the peers' known tensors."""

    def __init__(self, rank: int, world: list[list[torch.Tensor]]) -> None:
        self.rank = rank
        self.world_size = len(world[0])
        self._calls = iter(world)

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [t.detach().clone() for t in next(self._calls)]
        assert torch.equal(parts[self.rank], x)
        return parts

    def all_reduce_sum_(self, x: torch.Tensor) -> None:
        raise AssertionError("not used here")

    def all_gather_object(self, obj: Any) -> list[Any]:
        raise AssertionError("not used here")

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> None:
        raise AssertionError("not used here")


def test_gather_with_fake_collective_equals_one_worker() -> None:
    hs, b, disc = global_batch()
    single = single_process(hs, b, disc)
    world = [[h[sl] for sl in SPLITS] for h in hs]
    workers = [worker_step(hs, b, disc, r, FakeCollective(r, world)) for r in range(2)]
    check_equivalence(single, workers)


def test_gather_keeps_only_the_local_gradient() -> None:
    x = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    peer = torch.full((2, 2), 7.0)
    out = gather_with_grad(x, FakeCollective(1, [[peer, x.detach()]]))
    assert out.shape == (5, 2) and torch.equal(out[:2], peer) and torch.equal(out[2:], x.detach())
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones(3, 2))


def test_gather_is_identity_without_a_group() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    assert default_collective() is None
    assert gather_with_grad(x) is x
    with pytest.raises(RuntimeError, match="not initialised"):
        TorchCollective()


# --------------------------------------------------------------------------------------------
# real gloo group


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _small_cfg() -> DUCHConfig:
    return DUCHConfig(
        model=ModelConfig(bits=16, hidden_dim=32), optim=OptimConfig(batch_size=8, epochs=1)
    )


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        coll = TorchCollective()
        res: dict[str, Any] = {"world_size": coll.world_size, "rank": coll.rank}
        hs, b, disc = global_batch()
        step = worker_step(hs, b, disc, rank, coll)
        res["parts"] = {k: float(v) for k, v in step["parts"].items()}
        res["grads"] = step["grads"]

        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))
        sync_gradients([p], coll)
        res["summed_grad"] = p.grad.clone()
        res["objects"] = coll.all_gather_object({"rank": rank})

        # one training epoch, each worker on its shard of the same global batches
        cfg = _small_cfg()
        g = torch.Generator().manual_seed(0)
        ids = [f"id{i:02d}" for i in range(21)]
        mats = [torch.randn(21, d, generator=g) for d in (6, 6, 5, 5)]
        model = make_model(6, 5, cfg)
        opt_hash, opt_disc = make_optimizers(model, cfg.optim)
        table = CodeTable(ids, 16)
        batches = make_batches(ids, *mats, 8, seed=0, epoch=0, rank=rank, world_size=world)
        torch.manual_seed(rank)
        rec = train_epoch(model, batches, opt_hash, opt_disc, table, cfg, 0, gather=coll)
        res["epoch"] = rec
        res["hash_params"] = [t.detach().clone() for t in model.hash_parameters()]
        res["disc_params"] = [t.detach().clone() for t in model.discriminator.parameters()]
        res["buffers"] = [t.clone() for t in model.buffers() if t.is_floating_point()]
        res["table"] = table.b.clone()
        res["seen"] = sorted(i for bt in batches for i in bt.ids)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_two_processes_equal_one_worker(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in res] == [0, 1] and res[0]["world_size"] == 2

    hs, b, disc = global_batch()
    single = single_process(hs, b, disc)
    workers = [
        {
            "parts": {k: torch.tensor(v, dtype=torch.float64) for k, v in r["parts"].items()},
            "grads": r["grads"],
        }
        for r in res
    ]
    check_equivalence(single, workers)

    for r in res:
        assert torch.equal(r["summed_grad"], torch.full((3,), 3.0))
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]

    # after a synchronised epoch the two copies are identical and every row of B was refreshed
    for key in ("hash_params", "disc_params", "buffers"):
        for a, c in zip(res[0][key], res[1][key], strict=True):
            assert torch.allclose(a, c, atol=1e-6), key
    assert torch.equal(res[0]["table"], res[1]["table"])
    assert sorted(res[0]["seen"] + res[1]["seen"]) == [f"id{i:02d}" for i in range(21)]
    assert not set(res[0]["seen"]) & set(res[1]["seen"])
    for r in res:
        assert r["epoch"]["table_rows_updated"] == 21
        assert r["epoch"]["samples"] < 21
