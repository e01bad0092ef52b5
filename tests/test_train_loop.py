"""The code table, feature statistics, batching, optimisers, LR schedule and the training loop."""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import numpy as np
import pytest
import torch

from duch_core import codes
from duch_core.bundle import normalize_feature_stats
from duch_core.code_table import CodeTable, UnknownItemError
from duch_core.config import DUCHConfig, LossConfig, ModelConfig, OptimConfig
from duch_core.feature_batches import FeatureBatch, FeatureStats, make_batches
from duch_core.model import HashHead
from duch_core.optim import BlockedAdam, make_optimizers, step_lr
from duch_core.train_loop import (
    RetrievalSet,
    bit_imbalance,
    combine_records,
    drop_last_needed,
    encode_features,
    epoch_line,
    evaluate,
    fit,
    make_model,
    train_epoch,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():  # noqa: ANN202
    # These tests are small. On a busy 2-core machine a second OpenMP thread that waits for a
    # core makes every op many times slower; the tests that are about threads ask for them.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# code table


def ids_(n: int) -> list[str]:
    return [f"item-{i:03d}" for i in range(n)]


def test_code_table_init_is_seeded_pm1_and_order_free() -> None:
    ids = ids_(20)
    t1 = CodeTable(ids, 16, seed=3)
    t2 = CodeTable(list(reversed(ids)), 16, seed=3)
    assert set(torch.unique(t1.b).tolist()) == {-1, 1}
    assert torch.equal(t1.lookup(ids), t2.lookup(ids))
    assert not torch.equal(t1.b, CodeTable(ids, 16, seed=4).b)


def test_code_table_refresh_follows_ids_through_shuffling() -> None:
    ids = ids_(13)
    g = torch.Generator().manual_seed(0)
    outs = {i: [torch.tanh(torch.randn(16, generator=g)) for _ in range(4)] for i in ids}
    outs[ids[0]] = [torch.zeros(16)] * 4  # exactly zero fuses to +1
    table = CodeTable(ids, 16)
    perm = torch.randperm(13, generator=g).tolist()
    for lo in range(0, 13, 5):  # shuffled batches
        batch = [ids[p] for p in perm[lo : lo + 5]]
        hs = [torch.stack([outs[i][v] for i in batch]) for v in range(4)]
        table.record(batch, *hs)
    assert table.recorded == 13
    assert table.refresh() == 13
    for i in ids:  # the paper's formula, one id at a time
        v1, v2, t1, t2 = outs[i]
        fused = ((v1 + v2) / 2 + (t1 + t2) / 2) / 2
        want = [1.0 if x >= 0 else -1.0 for x in fused.tolist()]
        assert table.lookup([i])[0].tolist() == want
    assert table.lookup([ids[0]]).eq(1).all()
    assert table.recorded == 0


def test_code_table_refresh_uses_the_codes_module_sign() -> None:
    ids = ids_(6)
    h = torch.tensor([[0.0, -0.0, 1e-9, -1e-9, 0.5, -0.5, 0.0, -1.0]]).repeat(6, 1)
    table = CodeTable(ids, 8)
    table.record(ids, h, h, h, h)
    table.refresh()
    assert np.array_equal(table.b.numpy(), codes.sign(h))


def test_code_table_unrecorded_rows_keep_their_code() -> None:
    ids = ids_(4)
    table = CodeTable(ids, 8)
    before = table.b.clone()
    table.record(ids[:1], *[-torch.ones(1, 8)] * 4)
    table.refresh()
    assert table.lookup(ids[:1]).eq(-1).all()
    assert torch.equal(table.b[1:], before[1:])


def test_code_table_export_merge_equals_one_table() -> None:
    ids = ids_(10)
    g = torch.Generator().manual_seed(1)
    hs = [torch.tanh(torch.randn(10, 8, generator=g)) for _ in range(4)]
    single = CodeTable(ids, 8)
    single.record(ids, *hs)
    single.refresh()
    w0, w1 = CodeTable(ids, 8), CodeTable(ids, 8)
    w0.record(ids[:6], *[h[:6] for h in hs])
    w1.record(ids[6:], *[h[6:] for h in hs])
    e0, e1 = w0.export(), w1.export()
    w0.merge([e1])
    w1.merge([e0])
    for w in (w0, w1):
        assert w.refresh() == 10
        assert torch.equal(w.b, single.b)


def test_code_table_state_dict_roundtrip_and_checks() -> None:
    ids = ids_(5)
    table = CodeTable(ids, 8, seed=9)
    table.record(ids, *[torch.ones(5, 8)] * 4)
    table.refresh()
    again = CodeTable.from_state_dict(table.state_dict())
    assert torch.equal(again.b, table.b) and again.ids == table.ids
    with pytest.raises(ValueError, match="different item ids"):
        CodeTable(ids_(6), 8).load_state_dict(table.state_dict())
    with pytest.raises(ValueError, match="bits"):
        CodeTable(ids, 16).load_state_dict(table.state_dict())


def test_code_table_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        CodeTable(["a", "b", "a"], 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        CodeTable(["a"], 12)
    table = CodeTable(["a", "b"], 8)
    with pytest.raises(UnknownItemError, match="'zzz' is not in the code table"):
        table.lookup(["a", "zzz"])
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        table.record(["a", "b"], *[torch.zeros(2, 16)] * 4)


# --------------------------------------------------------------------------------------------
# feature statistics and batches


def test_feature_stats_is_a_global_scalar_zscore() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(3.0, 2.0, (50, 7)).astype(np.float32)
    txt = rng.normal(-1.0, 0.5, (40, 5)).astype(np.float32)
    st = FeatureStats.fit(img, txt)
    assert st.image_mean == pytest.approx(float(img.astype(np.float64).mean()))
    assert st.image_std == pytest.approx(float(img.astype(np.float64).std()))  # ddof 0
    assert st.text_std == pytest.approx(float(txt.astype(np.float64).std()))
    z = st.apply(img, "image")
    assert z.dtype == torch.float32
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(z.std(correction=0)) == pytest.approx(1.0, abs=1e-5)
    assert FeatureStats.from_dict(st.to_dict()) == st
    assert normalize_feature_stats(st) == st.to_dict()  # the bundle accepts it as is


def test_feature_stats_bad_input() -> None:
    with pytest.raises(ValueError, match="constant"):
        FeatureStats.fit(np.ones((4, 3), np.float32), np.random.default_rng(0).random((4, 3)))
    st = FeatureStats(0.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="modality"):
        st.apply(np.zeros((2, 3), np.float32), "audio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std > 0"):
        FeatureStats(0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_streamed_moments_equal_the_fit_on_all_features(chunks: int) -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(100.0, 0.01, (61, 5)).astype(np.float32)  # large mean, tiny spread
    txt = rng.normal(-2.0, 3.0, (17, 4)).astype(np.float32)
    parts = [
        [FeatureStats.partial_moments(c) for c in np.array_split(x, chunks)] for x in (img, txt)
    ]
    parts[0].append(FeatureStats.partial_moments(np.zeros((0, 5))))  # an empty block counts 0
    streamed = FeatureStats.from_partial_moments(*parts)
    whole = FeatureStats.fit(img, txt)
    for key in ("image_mean", "image_std", "text_mean", "text_std"):
        assert getattr(streamed, key) == pytest.approx(getattr(whole, key), rel=1e-9), key
    with pytest.raises(ValueError, match="empty image"):
        FeatureStats.from_partial_moments([(0.0, 0.0, 0.0)], parts[1])


def test_feature_batch_from_arrays_applies_the_stats() -> None:
    rng = np.random.default_rng(2)
    arrays = {
        "ids": np.array(["a", "b", "c"], dtype=object),
        "img": rng.random((3, 4), dtype=np.float32),
        "img_aug": rng.random((3, 4), dtype=np.float32),
        "txt": torch.rand(3, 2),
        "txt_aug": torch.rand(3, 2),
    }
    st = FeatureStats(0.5, 2.0, -1.0, 4.0)
    b = FeatureBatch.from_arrays(arrays, st)
    assert b.ids == ["a", "b", "c"]
    torch.testing.assert_close(b.img_aug, (torch.from_numpy(arrays["img_aug"]) - 0.5) / 2.0)
    torch.testing.assert_close(b.txt, (arrays["txt"] + 1.0) / 4.0)
    raw = FeatureBatch.from_arrays(arrays, None)
    assert torch.equal(raw.img, torch.from_numpy(arrays["img"]))


def test_combine_records_sums_counts_and_averages_the_rest() -> None:
    a = {"samples": 8.0, "batches": 2.0, "seconds": 1.0, "total": 1.0, "lr": 1e-4}
    b = {"samples": 6.0, "batches": 2.0, "seconds": 3.0, "total": 3.0, "lr": 1e-4}
    out = combine_records([a, b])
    assert out["samples"] == 14 and out["batches"] == 4 and out["seconds"] == 3.0
    assert out["total"] == 2.0 and out["lr"] == pytest.approx(1e-4)
    assert out["samples_per_s"] == pytest.approx(14 / 3)


def test_drop_last_needed_only_for_a_trailing_single_item() -> None:
    assert drop_last_needed(18, 2, 4)  # 9 rows per worker: 4 + 4 + 1
    assert not drop_last_needed(16, 2, 4) and not drop_last_needed(20, 2, 4)


def test_bit_imbalance() -> None:
    assert bit_imbalance(torch.tensor([[1, -1], [-1, 1]], dtype=torch.int8)) == 0.0
    assert bit_imbalance(torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)) == 0.5
    assert bit_imbalance(torch.ones(5, 3)) == 1.0


def test_epoch_line_shows_every_term_lr_balance_and_map() -> None:
    rec = {
        "epoch": 2.0,
        "total": 1.5,
        "inter": 0.5,
        "intra_image": 0.25,
        "intra_text": 0.125,
        "adversarial": -0.75,
        "quantization": 0.0625,
        "bit_balance": 0.03125,
        "discriminator": 1.25,
        "lr": 8e-5,
        "bit_imbalance": 0.0413,
        "seconds": 2.25,
    }
    line = epoch_line(rec, 30)
    assert line.startswith("epoch 3/30  loss 1.5 (inter 0.5, intra_img 0.25, intra_txt 0.125, ")
    assert "adv -0.75, quant 0.0625, balance 0.03125, disc 1.25)" in line
    assert "lr 8.00e-05" in line and "bit imbalance 0.041" in line and "2.2 s" in line
    assert "mAP" not in line and "\n" not in line
    assert "mAP@10 0.6250" in epoch_line({**rec, "map_mean": 0.625}, 30, k=10)


def _feats(n: int, seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ids_(n), [torch.randn(n, d, generator=g) for d in (6, 6, 5, 5)]


def test_make_batches_cover_every_item_once_and_merge_a_short_tail() -> None:
    ids, mats = _feats(21)
    batches = make_batches(ids, *mats, batch_size=4, seed=0, epoch=3)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 5]  # 21 = 5 * 4 + 1: the 1 joins
    seen = [i for b in batches for i in b.ids]
    assert sorted(seen) == ids
    row = {i: k for k, i in enumerate(ids)}
    for b in batches:  # every view stays aligned with its id
        idx = torch.tensor([row[i] for i in b.ids])
        assert torch.equal(b.txt_aug, mats[3][idx])
    again = make_batches(ids, *mats, batch_size=4, seed=0, epoch=3)
    assert [b.ids for b in again] == [b.ids for b in batches]
    other = make_batches(ids, *mats, batch_size=4, seed=0, epoch=4)
    assert [b.ids for b in other] != [b.ids for b in batches]


def test_make_batches_shards_are_the_global_batches() -> None:
    ids, mats = _feats(30)
    single = make_batches(ids, *mats, batch_size=8, seed=1, epoch=0)
    shards = [make_batches(ids, *mats, 8, 1, 0, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for k, b in enumerate(single):
        assert shards[0][k].ids + shards[1][k].ids == b.ids


def test_make_batches_bad_input() -> None:
    ids, mats = _feats(5)
    with pytest.raises(ValueError, match="rows"):
        make_batches(ids[:4], *mats, batch_size=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="too small"):
        make_batches(ids, *mats, batch_size=3, seed=0, epoch=0, world_size=2)
    with pytest.raises(ValueError, match="txt_aug"):
        FeatureBatch(ids, mats[0], mats[1], mats[2], mats[3][:4])


# --------------------------------------------------------------------------------------------
# optimisers and schedule


def test_optimizers_have_the_paper_settings() -> None:
    cfg = DUCHConfig(model=ModelConfig(bits=16, hidden_dim=32))
    model = make_model(6, 5, cfg)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    assert isinstance(opt_hash, BlockedAdam) and type(opt_disc) is torch.optim.Adam
    ref_hash, _ = make_optimizers(model, cfg.optim, reference=True)
    assert type(ref_hash) is torch.optim.Adam
    assert len(opt_hash.param_groups) == 2
    for group in opt_hash.param_groups:
        assert group["lr"] == 1e-4 and group["weight_decay"] == 5e-4
    (dg,) = opt_disc.param_groups
    assert dg["lr"] == 1e-4 and dg["betas"] == (0.5, 0.9) and dg["weight_decay"] == 1e-4
    hashed = {id(p) for g in opt_hash.param_groups for p in g["params"]}
    assert hashed == {id(p) for p in model.hash_parameters()}
    assert {id(p) for p in dg["params"]} == {id(p) for p in model.discriminator.parameters()}


def test_lr_schedule_matches_the_published_code() -> None:
    cfg = OptimConfig()
    model = make_model(6, 5, DUCHConfig(model=ModelConfig(bits=8, hidden_dim=8)))
    opt, _ = make_optimizers(model, cfg)
    used = []
    for epoch in range(100):
        used.append(opt.param_groups[0]["lr"])
        step_lr(opt, epoch, cfg)
    # 1-based: epoch 1 at 1e-4, 8e-5 from epoch 2, 6.4e-5 from epoch 52
    assert used[0] == pytest.approx(1e-4)
    assert all(lr == pytest.approx(8e-5) for lr in used[1:51])
    assert all(lr == pytest.approx(6.4e-5) for lr in used[51:])
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]


def test_lr_schedule_floor() -> None:
    cfg = OptimConfig(lr=1.1e-6, lr_decay_every=1)
    model = make_model(6, 5, DUCHConfig(model=ModelConfig(bits=8, hidden_dim=8)))
    opt, _ = make_optimizers(model, cfg)
    assert step_lr(opt, 0, cfg) == pytest.approx(1e-6)
    assert step_lr(opt, 1, cfg) == pytest.approx(1e-6)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest):  # noqa: ANN201
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _adam_pair(
    shapes: list[tuple[int, ...]], block: int, **kw: object
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.optim.Adam, BlockedAdam]:
    g = torch.Generator().manual_seed(3)
    ref = [torch.nn.Parameter(0.05 * torch.randn(s, generator=g)) for s in shapes]
    new = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    half = len(shapes) // 2
    groups = lambda ps: [{"params": ps[:half]}, {"params": ps[half:]}]  # noqa: E731
    opt_ref = torch.optim.Adam(groups(ref), lr=1e-3, **kw)  # type: ignore[arg-type]
    opt_new = BlockedAdam(groups(new), lr=1e-3, **kw)  # type: ignore[arg-type]
    opt_new.block = block
    return ref, new, opt_ref, opt_new


def _assert_same_adam(
    ref: list[torch.Tensor],
    new: list[torch.Tensor],
    o_ref: torch.optim.Adam,
    o_new: torch.optim.Adam,
) -> None:
    for a, b in zip(ref, new, strict=True):
        assert torch.equal(a, b)
        sa, sb = o_ref.state.get(a, {}), o_new.state.get(b, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_blocked_adam_is_bitwise_torch_adam(threads: int, weight_decay: float) -> None:
    # several blocks per tensor, odd sizes (scalar tails), a parameter without a gradient in
    # some steps, a learning-rate change between steps (step_lr), and the heads' real widths
    shapes = [(4096, 48), (4096,), (1, 2503), (3,), (64, 4096), (7, 5)]
    ref, new, o_ref, o_new = _adam_pair(shapes, block=10_000, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ref, new, strict=True)):
            if step % 3 == 2 and i == 3:
                a.grad = b.grad = None
                continue
            grad = 1e-3 * torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        if step == 4:
            for opt in (o_ref, o_new):
                for group in opt.param_groups:
                    group["lr"] *= 0.8
        o_ref.step()
        o_new.step()
        _assert_same_adam(ref, new, o_ref, o_new)
    # the state is torch's own: a plain Adam loads it and takes the same next step
    again = torch.optim.Adam([{"params": new[:3]}, {"params": new[3:]}])
    again.load_state_dict(o_new.state_dict())
    for a, b in zip(ref, new, strict=True):
        a.grad = b.grad = torch.ones_like(a)
    o_ref.step()
    again.step()
    _assert_same_adam(ref, new, o_ref, again)


def test_blocked_adam_defers_to_torch_for_other_options_and_runs_hooks_once() -> None:
    ref, new, o_ref, o_new = _adam_pair([(50, 3), (5,)], block=16, amsgrad=True, maximize=True)
    calls: list[str] = []
    o_new.register_step_pre_hook(lambda *_: calls.append("pre"))
    o_new.register_step_post_hook(lambda *_: calls.append("post"))
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        for a, b in zip(ref, new, strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        o_ref.step()
        o_new.step()
    _assert_same_adam(ref, new, o_ref, o_new)
    assert calls == ["pre", "post"] * 3


def _two_calls(head: HashHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return head(x), head(x)


@pytest.mark.parametrize("shape", [(7, 5, 32, 16), (84, 24, 512, 64)])
def test_forward_twice_is_bitwise_two_calls(threads: int, shape: tuple[int, ...]) -> None:
    n, d, hidden, bits = shape
    torch.manual_seed(0)
    fast = HashHead(d, bits, hidden)
    slow = HashHead(d, bits, hidden)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(n, d)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # parameters move between steps, BatchNorm statistics accumulate
        up1, up2 = torch.randn(n, bits, generator=g), torch.randn(n, bits, generator=g)
        for head, run in ((fast, HashHead.forward_twice), (slow, _two_calls)):
            h1, h2 = run(head, x)
            # the two codes get different gradients, and one term mixes them
            ((h1 * up1).sum() + (h2 * up2).sum() + (h1 * h2).sum()).backward()
        assert torch.equal(h1, h2)
        for (name, a), b in zip(fast.named_parameters(), slow.parameters(), strict=True):
            assert a.grad is not None and b.grad is not None
            assert torch.equal(a.grad, b.grad), name
        for a, b in zip(fast.buffers(), slow.buffers(), strict=True):
            assert torch.equal(a, b)
        with torch.no_grad():
            for head in (fast, slow):
                for p in head.parameters():
                    p -= 0.01 * p.grad  # type: ignore[operator]
                    p.grad = None
    fast.eval()
    e1, e2 = fast.forward_twice(x)
    assert torch.equal(e1, e2) and torch.equal(e1, fast(x))


# --------------------------------------------------------------------------------------------
# the training loop


def _small_cfg(**kw) -> DUCHConfig:  # noqa: ANN003
    return DUCHConfig(
        model=ModelConfig(bits=16, hidden_dim=32),
        optim=OptimConfig(batch_size=8, epochs=2),
        **kw,
    )


def _epoch(cfg: DUCHConfig, batches: list[FeatureBatch], ids: list[str]) -> tuple:  # noqa: ANN001
    model = make_model(6, 5, cfg)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    table = CodeTable(ids, cfg.model.bits)
    torch.manual_seed(0)
    rec = train_epoch(model, batches, opt_hash, opt_disc, table, cfg, epoch=0)
    return model, table, rec


def test_train_epoch_updates_heads_discriminator_and_table() -> None:
    ids, mats = _feats(20)
    cfg = _small_cfg()
    batches = make_batches(ids, *mats, cfg.optim.batch_size, seed=0, epoch=0)
    fresh = make_model(6, 5, cfg)
    model, table, rec = _epoch(cfg, batches, ids)
    for name in ("image_head", "text_head", "discriminator"):
        before = torch.cat([p.flatten() for p in getattr(fresh, name).parameters()])
        after = torch.cat([p.flatten() for p in getattr(model, name).parameters()])
        assert not torch.equal(before, after), name
    assert rec["samples"] == 20 and rec["batches"] == len(batches)
    assert rec["table_rows_updated"] == 20
    assert rec["bit_imbalance"] == bit_imbalance(table.b)
    for key in (
        "total",
        "contrastive",
        "adversarial",
        "quantization",
        "bit_balance",
        "discriminator",
    ):
        assert np.isfinite(rec[key])
    # after the refresh B is the sign of the (train-mode) outputs recorded during the epoch
    assert table.recorded == 0


def test_train_epoch_is_deterministic() -> None:
    ids, mats = _feats(20)
    cfg = _small_cfg()
    batches = make_batches(ids, *mats, cfg.optim.batch_size, seed=0, epoch=0)
    m1, t1, r1 = _epoch(cfg, batches, ids)
    m2, t2, r2 = _epoch(cfg, batches, ids)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(t1.b, t2.b)
    assert r1["total"] == r2["total"]


@pytest.mark.parametrize("paper_compat", [False, True], ids=["duch", "paper_compat"])
def test_fast_path_trains_bitwise_like_the_reference(
    threads: int, paper_compat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fast path (BlockedAdam, forward_twice under paper_compat) against plain torch Adam
    # and two text-head calls: every weight, buffer, loss term, code and mAP bit for bit
    monkeypatch.setattr(BlockedAdam, "block", 1000)  # several blocks per weight matrix
    ids, lab, img, img_aug, txt, txt_aug = _synthetic(n=120)
    cfg = DUCHConfig(
        model=ModelConfig(bits=16, hidden_dim=96),
        optim=OptimConfig(epochs=3, batch_size=32),
        paper_compat=paper_compat,
    )
    query, database = RetrievalSet(img[:20], txt[:20], lab[:20]), RetrievalSet(img, txt, lab)

    def run(reference: bool) -> tuple[torch.nn.Module, list[dict[str, float]]]:
        model = make_model(64, 48, cfg)
        hist = fit(
            model,
            lambda e: make_batches(ids, img, img_aug, txt, txt_aug, 32, 0, e),
            cfg,
            ids,
            query,
            database,
            reference=reference,
        )
        return model, [{k: v for k, v in r.items() if k != "seconds"} for r in hist]

    (m_ref, h_ref), (m_new, h_new) = run(True), run(False)
    assert h_new == h_ref  # every loss term, table update count, bit imbalance and mAP
    assert "map_mean" in h_new[-1]
    ref_state, new_state = m_ref.state_dict(), m_new.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], new_state[key]), key
    for mod, x in (("image", img), ("text", txt)):
        assert np.array_equal(
            codes.pack(encode_features(m_ref, x, mod)),  # type: ignore[arg-type]
            codes.pack(encode_features(m_new, x, mod)),  # type: ignore[arg-type]
        )


def _text_inputs(cfg: DUCHConfig) -> tuple[list[torch.Tensor], FeatureBatch]:
    """The inputs of the text head's first layer in one step."""
    ids, mats = _feats(6)
    batch = FeatureBatch(ids, *mats)
    model = make_model(6, 5, cfg)
    seen: list[torch.Tensor] = []
    model.text_head.net[0].register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach()))
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    train_epoch(model, [batch], opt_hash, opt_disc, CodeTable(ids, 16), cfg, epoch=0)
    return seen, batch


@pytest.mark.parametrize("switch", ["paper_compat", "loss.text_pair"])
def test_paper_compat_uses_the_caption_twice(switch: str) -> None:
    same = (
        _small_cfg(paper_compat=True)
        if switch == "paper_compat"
        else _small_cfg(loss=LossConfig(text_pair="same"))
    )
    assert same.same_caption_twice
    seen, batch = _text_inputs(same)
    assert len(seen) == 1 and torch.equal(seen[0], batch.txt)  # one product serves both
    # the augmented caption is never read: garbage there changes nothing
    ids, mats = _feats(16)
    cfg = same
    clean = make_batches(ids, *mats, 8, seed=0, epoch=0)
    nan = [dataclasses.replace(b, txt_aug=torch.full_like(b.txt_aug, math.nan)) for b in clean]
    (m1, t1, r1), (m2, t2, r2) = _epoch(cfg, clean, ids), _epoch(cfg, nan, ids)
    assert r1["total"] == r2["total"] and math.isfinite(r2["total"])
    assert torch.equal(t1.b, t2.b)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_default_uses_the_augmented_caption() -> None:
    seen, batch = _text_inputs(_small_cfg())
    assert len(seen) == 2
    assert torch.equal(seen[0], batch.txt) and torch.equal(seen[1], batch.txt_aug)


def test_paper_compat_switches_loss_forms() -> None:
    ids, mats = _feats(16)
    batches = make_batches(ids, *mats, 8, seed=0, epoch=0)
    tau = dataclasses.replace(LossConfig(), tau=0.5)
    _, _, fixed = _epoch(_small_cfg(loss=tau), batches, ids)
    _, _, published = _epoch(_small_cfg(loss=tau, paper_compat=True), batches, ids)
    assert fixed["inter"] != pytest.approx(published["inter"], rel=1e-3)


def test_train_epoch_rejects_a_batch_of_one() -> None:
    ids, mats = _feats(3)
    cfg = _small_cfg()
    one = FeatureBatch(ids[:1], *(m[:1] for m in mats))
    model = make_model(6, 5, cfg)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    with pytest.raises(ValueError, match="2\\+ items"):
        train_epoch(model, [one], opt_hash, opt_disc, CodeTable(ids, 16), cfg, epoch=0)


def test_encode_features_is_eval_mode_and_checks_dims() -> None:
    cfg = _small_cfg()
    model = make_model(6, 5, cfg)
    model.train()
    x = torch.randn(5, 6)
    full = encode_features(model, x, "image")
    one = encode_features(model, x[:1], "image")  # eval mode: a row does not depend on the batch
    assert full.shape == (5, 16) and torch.allclose(full[:1], one, atol=1e-6)
    assert model.training  # restored
    with pytest.raises(ValueError, match="dimension 5"):
        encode_features(model, torch.randn(2, 5), "image")
    with pytest.raises(ValueError, match="modality"):
        encode_features(model, x, "video")  # type: ignore[arg-type]


def _synthetic(seed: int = 0, n: int = 400, classes: int = 6):  # noqa: ANN202
    """Class-structured features: class centre + noise, in two unrelated feature spaces."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % classes
    ci, ct = torch.randn(classes, 64, generator=g), torch.randn(classes, 48, generator=g)
    img = ci[lab] + torch.randn(n, 64, generator=g)
    txt = ct[lab] + torch.randn(n, 48, generator=g)
    img_aug = img + 0.3 * torch.randn(n, 64, generator=g)
    txt_aug = txt + 0.3 * torch.randn(n, 48, generator=g)
    return ids_(n), lab.tolist(), img, img_aug, txt, txt_aug


def test_fit_learns_class_structure_and_is_deterministic() -> None:
    ids, lab, img, img_aug, txt, txt_aug = _synthetic()
    tr, q, db = slice(0, 200), slice(200, 240), slice(240, 400)
    st = FeatureStats.fit(img[tr], txt[tr])
    img, img_aug = st.apply(img, "image"), st.apply(img_aug, "image")
    txt, txt_aug = st.apply(txt, "text"), st.apply(txt_aug, "text")
    cfg = DUCHConfig(
        model=ModelConfig(bits=32, hidden_dim=1024), optim=OptimConfig(epochs=20, batch_size=32)
    )
    query = RetrievalSet(img[q], txt[q], lab[q])
    database = RetrievalSet(img[db], txt[db], lab[db])

    def run() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float]]:
        model = make_model(64, 48, cfg)
        before = evaluate(model, query, database, k=20)
        hist = fit(
            model,
            lambda e: make_batches(ids[tr], img[tr], img_aug[tr], txt[tr], txt_aug[tr], 32, 0, e),
            cfg,
            ids[tr],
            query,
            database,
        )
        return hist, before, evaluate(model, query, database, k=20)

    hist, before, after = run()
    assert before["i2t"] < 0.45 and before["t2i"] < 0.45
    assert after["i2t"] > 0.9 and after["t2i"] > 0.9
    assert hist[-1]["map_i2t"] == after["i2t"]  # evaluated after the last epoch only
    assert "map_i2t" not in hist[0]
    assert hist[0]["next_lr"] == pytest.approx(8e-5)
    hist2, _, after2 = run()
    assert after2 == after
    assert [h["total"] for h in hist2] == [h["total"] for h in hist]


def test_fit_logs_one_line_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    ids, lab, img, img_aug, txt, txt_aug = _synthetic(n=60)
    cfg = DUCHConfig(model=ModelConfig(bits=16, hidden_dim=32), optim=OptimConfig(epochs=3))
    q, db = RetrievalSet(img[:10], txt[:10], lab[:10]), RetrievalSet(img, txt, lab)
    with caplog.at_level(logging.INFO, logger="duch.train"):
        fit(
            make_model(64, 48, cfg),
            lambda e: make_batches(ids, img, img_aug, txt, txt_aug, 16, 0, e),
            cfg,
            ids,
            q,
            db,
            eval_every=2,
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "duch.train"]
    assert [re.match(r"epoch (\d+)/3 ", m).group(1) for m in lines] == ["1", "2", "3"]  # type: ignore[union-attr]
    assert ["mAP@20" in m for m in lines] == [False, True, True]  # every 2nd and the last
    assert all(" bit imbalance " in m and " lr " in m for m in lines)
