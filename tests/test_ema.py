"""The heads' moving average (``optim.ema_decay``): the recurrence, what it touches, and that
training, checkpoints and the exported model use it."""

from __future__ import annotations

import pytest
import torch

from duch_core import checkpoint as ckpt
from duch_core.code_table import CodeTable
from duch_core.config import ConfigError, DUCHConfig, LossConfig, ModelConfig, OptimConfig, load
from duch_core.ema import HeadAverage
from duch_core.feature_batches import make_batches
from duch_core.optim import make_optimizers
from duch_core.train_loop import fit, make_average, make_model, make_queue, train_epoch

IDS = [f"item{i:03d}" for i in range(24)]


def _mats() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(24, d, generator=g) for d in (6, 6, 5, 5)]


def _cfg(**optim) -> DUCHConfig:  # noqa: ANN003
    return DUCHConfig(
        model=ModelConfig(bits=16, hidden_dim=32),
        optim=OptimConfig(batch_size=8, epochs=3, **optim),
        loss=LossConfig(tau=0.5, queue_size=8),
    )


def test_average_follows_the_recurrence_and_touches_only_the_heads() -> None:
    torch.manual_seed(0)
    model = make_model(6, 5, _cfg())
    avg = HeadAverage(model, 0.9)
    w = model.image_head.net[0].weight
    want = w.detach().clone()
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (t + 1))
        avg.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        want = d * want + (1 - d) * w.detach()
    assert torch.allclose(avg.shadow["image_head.net.0.weight"], want, atol=1e-6)
    # BatchNorm's step counter is copied, not averaged
    assert torch.equal(
        avg.shadow["image_head.net.1.num_batches_tracked"],
        model.image_head.net[1].num_batches_tracked,
    )
    live = {k: v.clone() for k, v in model.state_dict().items()}
    copy = avg.averaged(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in live.items())  # untouched
    assert torch.allclose(copy.image_head.net[0].weight, want, atol=1e-6)
    assert torch.equal(copy.discriminator.net[0].weight, model.discriminator.net[0].weight)
    assert not torch.equal(copy.text_head.net[0].weight, model.text_head.net[0].weight)
    with pytest.raises(ValueError, match="decay"):
        HeadAverage(model, 1.0)


def test_config_and_factory() -> None:
    assert make_average(make_model(6, 5, DUCHConfig()), DUCHConfig()) is None
    for bad in ("optim.ema_decay=1", "optim.ema_decay=-0.1"):
        with pytest.raises(ConfigError, match="ema_decay"):
            load(DUCHConfig, None, [bad])


def test_fit_ends_with_the_average_and_evaluates_it() -> None:
    from duch_core.train_loop import RetrievalSet, evaluate

    cfg, mats = _cfg(ema_decay=0.8), _mats()
    labels = [i % 3 for i in range(24)]
    rs = RetrievalSet(mats[0], mats[2], labels)

    def batches(e: int):  # noqa: ANN202
        return make_batches(IDS, *mats, 8, seed=0, epoch=e)

    torch.manual_seed(1)
    model = make_model(6, 5, cfg)
    hist = fit(model, batches, cfg, IDS, query=rs, database=rs)
    assert hist[-1]["map_mean"] == pytest.approx(evaluate(model, rs, rs, 20)["mean"])

    torch.manual_seed(1)  # the same run without the average ends elsewhere
    plain_cfg = _cfg()
    plain = make_model(6, 5, plain_cfg)
    fit(plain, batches, plain_cfg, IDS)
    assert not torch.equal(plain.image_head.net[0].weight, model.image_head.net[0].weight)
    assert torch.equal(plain.discriminator.net[0].weight, model.discriminator.net[0].weight)


def test_checkpoint_carries_the_average_and_exports_it() -> None:
    cfg, mats = _cfg(ema_decay=0.8), _mats()

    def setup():  # noqa: ANN202
        torch.manual_seed(0)
        model = make_model(6, 5, cfg)
        opt_hash, opt_disc = make_optimizers(model, cfg.optim)
        table = CodeTable(IDS, 16)
        return model, opt_hash, opt_disc, table, make_queue(cfg), make_average(model, cfg)

    def epoch(s, e: int) -> dict[str, float]:  # noqa: ANN001
        batches = make_batches(IDS, *mats, 8, seed=0, epoch=e)
        return train_epoch(s[0], batches, s[1], s[2], s[3], cfg, e, queue=s[4], average=s[5])

    straight = setup()
    recs = [epoch(straight, e) for e in range(3)]
    assert straight[5].steps == 9  # 3 epochs of 3 batches: one update per hashing step
    first = setup()
    epoch(first, 0)
    state = ckpt.training_state(*first[:4], 0, [], None, 6, 5, first[4], first[5])
    with pytest.raises(ValueError, match="no moving average"):
        ckpt.restore(dict(state, average=None), *setup()[:5], first[5])
    resumed = setup()
    ckpt.restore(state, *resumed[:5], resumed[5])  # (restore sets torch's RNG: nothing after)
    for e in (1, 2):
        got = epoch(resumed, e)
        assert {k: v for k, v in got.items() if k != "seconds"} == {
            k: v for k, v in recs[e].items() if k != "seconds"
        }
    final = ckpt.training_state(*resumed[:4], 2, [], None, 6, 5, resumed[4], resumed[5])
    exported = ckpt.model_from_state(final, cfg)
    assert torch.equal(
        exported.image_head.net[0].weight, straight[5].shadow["image_head.net.0.weight"]
    )
    assert not torch.equal(exported.image_head.net[0].weight, resumed[0].image_head.net[0].weight)
