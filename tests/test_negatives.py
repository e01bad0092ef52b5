"""The negative queue (``loss.queue_size``): the loss against a loop over the rows, the queue's
ring order, masking of an item's own codes, and a checkpoint that carries the queue."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from duch_core import checkpoint as ckpt
from duch_core.code_table import CodeTable
from duch_core.config import ConfigError, DUCHConfig, LossConfig, ModelConfig, OptimConfig, load
from duch_core.feature_batches import make_batches
from duch_core.losses import duch_loss, nt_xent
from duch_core.model import Discriminator
from duch_core.negatives import NegativeQueue, Negatives
from duch_core.optim import make_optimizers
from duch_core.train_loop import make_model, make_queue, train_epoch


def _codes(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(2 * torch.randn(n, k, generator=g, dtype=torch.float64))


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def ref_nt_xent_extra(
    a: torch.Tensor, b: torch.Tensor, tau: float, extra: torch.Tensor, extra_rows: list[int],
    rows: list[int],
) -> float:  # fmt: skip
    z = list(a) + list(b)
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        denom = sum(math.exp(_cos(z[i], z[j]) / tau) for j in range(2 * n) if j != i)
        denom += sum(
            math.exp(_cos(z[i], e) / tau)
            for e, r in zip(extra, extra_rows, strict=True)
            if r != rows[i % n]
        )
        total -= math.log(math.exp(_cos(z[i], z[partner]) / tau) / denom)
    return total


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_nt_xent_with_extra_negatives_matches_the_loop(tau: float) -> None:
    a, b = _codes(5, 8, 1), _codes(5, 8, 2)
    extra = _codes(7, 8, 3)
    rows = [10, 11, 12, 13, 14]
    extra_rows = [3, 11, 4, 14, 5, 6, 11]  # rows 11 and 14 are items of this batch
    got = nt_xent(a, b, tau, Negatives(extra, torch.tensor(extra_rows)), torch.tensor(rows))
    assert float(got) == pytest.approx(ref_nt_xent_extra(a, b, tau, extra, extra_rows, rows))
    # the masked codes matter: without the mask the loss is larger
    unmasked = nt_xent(a, b, tau, Negatives(extra, torch.full((7,), -1)), torch.tensor(rows))
    assert float(unmasked) > float(got)
    # no extra negatives: the plain loss
    none = Negatives(extra[:0], torch.zeros(0, dtype=torch.int64))
    assert float(nt_xent(a, b, tau, none, torch.tensor(rows))) == pytest.approx(
        float(nt_xent(a, b, tau))
    )
    with pytest.raises(ValueError, match="rows"):
        nt_xent(a, b, tau, Negatives(extra, torch.tensor(extra_rows)))


def test_queue_keeps_the_last_codes_oldest_first_and_round_trips() -> None:
    q = NegativeQueue(6, 4)
    assert len(q) == 0 and len(q.negatives("image")) == 0
    pushed = []
    for step in range(3):  # 3 batches of 4 into 6 slots
        img, txt = _codes(4, 4, 10 + step).float(), _codes(4, 4, 20 + step).float()
        rows = torch.arange(4) + 100 * step
        q.push(img, txt, rows)
        pushed.append((img, txt, rows))
    img_all = torch.cat([p[0] for p in pushed])
    txt_all = torch.cat([p[1] for p in pushed])
    rows_all = torch.cat([p[2] for p in pushed])
    got_i, got_t = q.negatives("image"), q.negatives("text")
    assert torch.equal(got_i.codes, img_all[-6:]) and torch.equal(got_t.codes, txt_all[-6:])
    assert torch.equal(got_i.rows, rows_all[-6:]) and torch.equal(got_t.rows, rows_all[-6:])
    big = NegativeQueue(6, 4)  # a batch larger than the queue keeps its last rows
    big.push(img_all, txt_all, rows_all)
    assert torch.equal(big.negatives("image").codes, img_all[-6:])

    again = NegativeQueue(6, 4)
    again.load_state(q.state())
    q.push(img_all[:2], txt_all[:2], rows_all[:2])
    again.push(img_all[:2], txt_all[:2], rows_all[:2])
    assert torch.equal(again.negatives("text").codes, q.negatives("text").codes)
    assert torch.equal(again.negatives("text").rows, q.negatives("text").rows)
    with pytest.raises(ValueError, match="does not fit"):
        NegativeQueue(5, 4).load_state(q.state())
    with pytest.raises(ValueError, match="bits"):
        q.push(_codes(2, 8, 0), _codes(2, 8, 0), torch.arange(2))
    with pytest.raises(ValueError, match="do not match"):
        q.push(_codes(2, 4, 0), _codes(3, 4, 0), torch.arange(2))


def test_duch_loss_gives_each_term_its_negatives() -> None:
    n, k = 4, 8
    hv1, hv2, ht1, ht2 = (_codes(n, k, 30 + i) for i in range(4))
    b = torch.where(_codes(n, k, 40) >= 0, 1.0, -1.0).double()
    q_img = Negatives(_codes(3, k, 50), torch.tensor([1, 7, 8]))
    q_txt = Negatives(_codes(2, k, 51), torch.tensor([9, 2]))
    rows = torch.tensor([0, 1, 2, 3])
    cfg = LossConfig(w_inter=1.0, w_intra_image=0.5, w_intra_text=0.25, tau=0.5)
    disc = Discriminator(k).double().eval()
    _, parts = duch_loss(hv1, hv2, ht1, ht2, b, disc, cfg, negatives=(q_img, q_txt), rows=rows)
    both = Negatives.join(q_img, q_txt)
    assert float(parts["inter"]) == pytest.approx(float(nt_xent(hv1, ht1, 0.5, both, rows)))
    assert float(parts["intra_image"]) == pytest.approx(float(nt_xent(hv1, hv2, 0.5, q_img, rows)))
    assert float(parts["intra_text"]) == pytest.approx(float(nt_xent(ht1, ht2, 0.5, q_txt, rows)))
    with pytest.raises(ValueError, match="exact NT-Xent"):
        duch_loss(hv1, hv2, ht1, ht2, b, disc, cfg, True, negatives=(q_img, q_txt), rows=rows)


def test_queue_config_is_checked() -> None:
    assert make_queue(DUCHConfig()) is None
    with pytest.raises(ConfigError, match="queue_size"):
        load(DUCHConfig, None, ["loss.queue_size=-1"])
    with pytest.raises(ConfigError, match="exact"):
        load(DUCHConfig, None, ["loss.queue_size=8", "loss.contrast=published"])
    with pytest.raises(ConfigError, match="exact"):
        load(DUCHConfig, None, ["loss.queue_size=8", "paper_compat=true"])


def _setup(cfg: DUCHConfig, ids: list[str]):  # noqa: ANN202
    torch.manual_seed(0)
    model = make_model(6, 5, cfg)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    return model, opt_hash, opt_disc, CodeTable(ids, cfg.model.bits), make_queue(cfg)


def test_training_with_a_queue_resumes_from_a_checkpoint_exactly() -> None:
    cfg = DUCHConfig(
        model=ModelConfig(bits=16, hidden_dim=32),
        optim=OptimConfig(batch_size=8, epochs=3),
        loss=LossConfig(queue_size=12, tau=0.5),
    )
    ids = [f"item{i:03d}" for i in range(24)]
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(24, d, generator=g) for d in (6, 6, 5, 5)]

    def epoch(state: tuple, e: int) -> dict[str, float]:  # noqa: ANN001
        model, opt_hash, opt_disc, table, queue = state
        batches = make_batches(ids, *mats, 8, seed=0, epoch=e)
        return train_epoch(model, batches, opt_hash, opt_disc, table, cfg, e, queue=queue)

    straight = _setup(cfg, ids)
    recs = [epoch(straight, e) for e in range(3)]
    assert len(straight[4]) == 12  # the queue filled
    plain_cfg = DUCHConfig(model=cfg.model, optim=cfg.optim, loss=LossConfig(tau=0.5))
    plain = _setup(plain_cfg, ids)
    plain_rec = train_epoch(
        plain[0], make_batches(ids, *mats, 8, seed=0, epoch=0), *plain[1:4], plain_cfg, 0
    )
    assert recs[0]["inter"] != pytest.approx(plain_rec["inter"])  # the queue took part

    first = _setup(cfg, ids)
    epoch(first, 0)
    with tempfile.TemporaryDirectory() as d:
        state = ckpt.training_state(*first[:4], 0, [], None, 6, 5, first[4])
        ckpt.save_state(d, state, {})
        without = _setup(plain_cfg, ids)
        with pytest.raises(ValueError, match="no negative queue"):
            state_nq = dict(ckpt.load_state(d), queue=None)
            ckpt.restore(state_nq, *without[:4], make_queue(cfg))
        resumed = _setup(cfg, ids)  # (restore sets torch's RNG: nothing may draw after it)
        ckpt.restore(ckpt.load_state(d), *resumed[:4], resumed[4])

    def timeless(rec: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in rec.items() if k != "seconds"}

    for e in (1, 2):
        assert timeless(epoch(resumed, e)) == timeless(recs[e])
    for a, b in zip(
        straight[0].state_dict().values(), resumed[0].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(straight[4].negatives("image").codes, resumed[4].negatives("image").codes)
