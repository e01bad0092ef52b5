"""DUCH losses against slow hand-written references (explicit Python loops), and where the
gradients of each term go."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from duch_core.config import LossConfig
from duch_core.losses import (
    adversarial_discriminator_loss,
    adversarial_generator_loss,
    bit_balance_loss,
    duch_loss,
    gradient_penalty,
    nt_xent,
    nt_xent_published,
    quantization_loss,
)
from duch_core.model import DUCH, Discriminator

SIZES = [1, 2, 5, 7]
TAUS = [1.0, 0.5, 0.2, 2.0]


def codes(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(2 * torch.randn(n, k, generator=g, dtype=torch.float64))


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in r] for r in t]


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def ref_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    z = rows(a) + rows(b)
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        denom = sum(math.exp(_cos(z[i], z[j]) / tau) for j in range(2 * n) if j != i)
        total -= math.log(math.exp(_cos(z[i], z[partner]) / tau) / denom)
    return total


def ref_nt_xent_published(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    z = rows(a) + rows(b)
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        neg = sum(math.exp(_cos(z[i], z[j]) / tau) for j in range(2 * n)) - math.e
        pos = math.exp(_cos(z[i % n], z[i % n + n]) / tau)
        total -= math.log(pos / (neg + 1e-6))
    return total


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def eval_disc(bits: int, seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    d = Discriminator(bits).double()
    # non-trivial BatchNorm statistics so the eval-mode network is not near-linear
    d.net[1].running_mean.normal_()
    d.net[1].running_var.uniform_(0.5, 2.0)
    return d.eval()


def logit(disc: torch.nn.Module, row: list[float]) -> float:
    with torch.no_grad():
        return float(disc(torch.tensor([row], dtype=torch.float64))[0])


def ref_quantization(hs: list[torch.Tensor], b: torch.Tensor) -> float:
    total = 0.0
    for h in hs:
        for hr, br in zip(rows(h), rows(b), strict=True):
            for x, y in zip(hr, br, strict=True):
                total += (y - x) ** 2
    return total


def ref_bit_balance(hs: list[torch.Tensor]) -> float:
    total = 0.0
    for h in hs:
        for r in rows(h):
            s = 0.0
            for x in r:
                s += x
            total += s * s
    return total


# --------------------------------------------------------------------------------------------
# NT-Xent


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tau", TAUS)
def test_nt_xent_matches_reference(n: int, tau: float) -> None:
    a, b = codes(n, 16, 1), codes(n, 16, 2)
    assert float(nt_xent(a, b, tau)) == pytest.approx(ref_nt_xent(a, b, tau), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tau", TAUS)
def test_nt_xent_published_matches_reference(n: int, tau: float) -> None:
    a, b = codes(n, 8, 3), codes(n, 8, 4)
    got = float(nt_xent_published(a, b, tau))
    try:
        want = ref_nt_xent_published(a, b, tau)
    except ValueError:  # tau > 1: subtracting e can leave a negative "negative sum"
        assert math.isnan(got)
        return
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_published_form_is_exact_only_at_tau_one() -> None:
    a, b = codes(6, 32, 5), codes(6, 32, 6)
    # at tau = 1 the two differ only through the 1e-6 guard
    assert float(nt_xent_published(a, b, 1.0)) == pytest.approx(float(nt_xent(a, b, 1.0)), abs=1e-4)
    # elsewhere subtracting e leaves (or over-removes) the self term
    for tau in (0.5, 2.0):
        assert abs(float(nt_xent_published(a, b, tau)) - float(nt_xent(a, b, tau))) > 0.5


def test_nt_xent_float32_is_stable_at_small_tau() -> None:
    a, b = codes(9, 64, 7).float(), codes(9, 64, 8).float()
    got = nt_xent(a, b, 0.05)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(ref_nt_xent(a.double(), b.double(), 0.05), rel=1e-4)


def test_nt_xent_is_zero_when_only_the_positive_remains() -> None:
    a, b = codes(1, 8, 9), codes(1, 8, 10)
    assert float(nt_xent(a, b, 0.3)) == pytest.approx(0.0, abs=1e-12)


def test_nt_xent_rewards_aligned_pairs() -> None:
    a = codes(8, 32, 11)
    aligned = nt_xent(a, a + 0.01 * codes(8, 32, 12), 0.5)
    shuffled = nt_xent(a, a[torch.randperm(8, generator=torch.Generator().manual_seed(0))], 0.5)
    assert float(aligned) < float(shuffled)


@pytest.mark.parametrize("fn", [nt_xent, nt_xent_published])
def test_nt_xent_bad_input(fn) -> None:  # noqa: ANN001
    a = codes(3, 8, 0)
    with pytest.raises(ValueError, match="tau"):
        fn(a, a, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        fn(a, a[:2], 1.0)
    with pytest.raises(ValueError, match="empty"):
        fn(a[:0], a[:0], 1.0)


# --------------------------------------------------------------------------------------------
# adversarial


@pytest.mark.parametrize("n", [1, 2, 5])
def test_discriminator_bce_matches_reference(n: int) -> None:
    disc = eval_disc(8)
    real, fake = codes(n, 8, 20), codes(n, 8, 21)
    got = float(adversarial_discriminator_loss(disc, real, fake, gp_weight=0.0).detach())
    want = sum(-_logsig(logit(disc, r)) for r in rows(real)) / n
    want += sum(-_logsig(-logit(disc, r)) for r in rows(fake)) / n  # log(1 - s(x)) = log s(-x)
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_gradient_penalty_matches_reference(n: int) -> None:
    disc = eval_disc(8, seed=1)
    real, fake = codes(n, 8, 22), codes(n, 8, 23)
    got = float(gradient_penalty(disc, real, fake, torch.Generator().manual_seed(5)).detach())
    u = torch.rand(real.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = 0.0
    for i in range(n):  # one interpolate at a time, its own backward pass
        x = (u[i] * real[i] + (1 - u[i]) * fake[i]).clone().requires_grad_(True)
        disc(x[None]).sum().backward()
        assert x.grad is not None
        norm = math.sqrt(sum(float(g) ** 2 for g in x.grad))
        want += (norm - 1.0) ** 2
    assert got == pytest.approx(want / n, rel=1e-9)


def test_discriminator_loss_combines_bce_and_weighted_penalty() -> None:
    disc = eval_disc(8, seed=2)
    real, fake = codes(4, 8, 24), codes(4, 8, 25)
    bce = adversarial_discriminator_loss(disc, real, fake, 0.0)
    gp = gradient_penalty(disc, real, fake, torch.Generator().manual_seed(3))
    full = adversarial_discriminator_loss(disc, real, fake, 10.0, torch.Generator().manual_seed(3))
    assert float(full) == pytest.approx(float(bce + 10.0 * gp), rel=1e-9)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_generator_loss_matches_reference(n: int) -> None:
    disc = eval_disc(16, seed=3)
    h = codes(n, 16, 26)
    want = sum(-math.log(1.0 / (1.0 + math.exp(-logit(disc, r)))) for r in rows(h))
    assert float(adversarial_generator_loss(disc, h)) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------------------------
# quantization and bit balance


@pytest.mark.parametrize("n", SIZES)
def test_quantization_matches_reference(n: int) -> None:
    hs = [codes(n, 16, 30 + i) for i in range(4)]
    b = torch.where(codes(n, 16, 40) >= 0, 1.0, -1.0).double()
    assert float(quantization_loss(hs, b)) == pytest.approx(ref_quantization(hs, b), rel=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_bit_balance_matches_reference(n: int) -> None:
    hs = [codes(n, 16, 50 + i) for i in range(4)]
    assert float(bit_balance_loss(hs)) == pytest.approx(ref_bit_balance(hs), rel=1e-12)


def test_quantization_targets_are_constants() -> None:
    h = codes(3, 8, 60).requires_grad_(True)
    b = torch.ones(3, 8, dtype=torch.float64, requires_grad=True)
    quantization_loss([h], b).backward()
    assert b.grad is None
    assert h.grad is not None and torch.allclose(h.grad, 2 * (h - 1).detach())


def test_quantization_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="differ"):
        quantization_loss([codes(3, 8, 0)], torch.ones(3, 16, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# the combined loss


def ref_duch(hv1, hv2, ht1, ht2, b, disc, cfg: LossConfig, paper_compat: bool) -> float:  # noqa: ANN001
    published_nt = paper_compat or cfg.contrast == "published"
    nt = ref_nt_xent_published if published_nt else ref_nt_xent
    tau = cfg.tau  # the published form: one temperature at every length
    if cfg.tau_bits and not published_nt and hv1.shape[1] > cfg.tau_bits:
        tau = cfg.tau * (cfg.tau_bits / hv1.shape[1]) ** 0.5  # the exact form of long codes
    l_c = (
        cfg.w_inter * nt(hv1, ht1, tau)
        + cfg.w_intra_image * nt(hv1, hv2, tau)
        + cfg.w_intra_text * nt(ht1, ht2, tau)
    )
    adv_codes = [ht1, ht2] if paper_compat or cfg.generator == "text" else [hv1, hv2]
    l_adv = sum(-_logsig(logit(disc, r)) for h in adv_codes for r in rows(h))
    hs = [hv1, hv2, ht1, ht2]
    return (
        l_c
        + cfg.alpha * l_adv
        + cfg.beta * ref_quantization(hs, b)
        + cfg.gamma * ref_bit_balance(hs)
    )


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize(
    ("paper_compat", "contrast", "generator"),
    [
        (False, "exact", "image"),
        (True, "exact", "image"),  # paper_compat overrides the switches
        (False, "published", "image"),
        (False, "exact", "text"),
    ],
)
@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("tau_bits", [64, 0, 8])
def test_duch_loss_matches_reference(
    n: int, paper_compat: bool, contrast: str, generator: str, tau: float, tau_bits: int
) -> None:
    cfg = LossConfig(
        tau=tau,
        tau_bits=tau_bits,
        w_inter=1.0,
        w_intra_image=0.7,
        w_intra_text=0.4,
        contrast=contrast,
        generator=generator,
    )
    disc = eval_disc(16, seed=4)
    hv1, hv2, ht1, ht2 = (codes(n, 16, 70 + i) for i in range(4))
    b = torch.where(codes(n, 16, 80) >= 0, 1.0, -1.0).double()
    total, parts = duch_loss(hv1, hv2, ht1, ht2, b, disc, cfg, paper_compat)
    want = ref_duch(hv1, hv2, ht1, ht2, b, disc, cfg, paper_compat)
    assert float(total) == pytest.approx(want, rel=1e-9)
    assert float(parts["total"]) == pytest.approx(want, rel=1e-9)
    recombined = (
        parts["contrastive"]
        + cfg.alpha * parts["adversarial"]
        + cfg.beta * parts["quantization"]
        + cfg.gamma * parts["bit_balance"]
    )
    assert float(recombined) == pytest.approx(want, rel=1e-9)
    assert all(not v.requires_grad for v in parts.values())


def test_duch_loss_defaults_are_the_paper_weights() -> None:
    cfg = LossConfig()
    assert (cfg.alpha, cfg.beta, cfg.gamma, cfg.tau, cfg.gp_weight) == (
        0.01,
        0.001,
        0.01,
        1.0,
        10.0,
    )
    assert (cfg.w_inter, cfg.w_intra_image, cfg.w_intra_text) == (1.0, 1.0, 1.0)


def test_temperature_follows_the_code_length() -> None:
    cfg = LossConfig()
    assert cfg.tau_bits == 64
    assert [cfg.temperature(k) for k in (16, 32, 64, 256)] == [1.0, 1.0, 1.0, 0.5]
    assert cfg.temperature(128) == pytest.approx(0.5**0.5)
    assert LossConfig(tau=0.5, tau_bits=32).temperature(128) == pytest.approx(0.25)
    assert LossConfig(tau=0.5, tau_bits=32).temperature(16) == 0.5
    assert LossConfig(tau=0.7, tau_bits=0).temperature(1024) == 0.7  # as published: fixed
    with pytest.raises(ValueError, match="bits"):
        cfg.temperature(0)
    # the loss at 128 bits is the loss of the fixed temperature tau * sqrt(64 / 128)
    disc = eval_disc(128, seed=4)
    hs = [codes(6, 128, 90 + i) for i in range(4)]
    b = torch.where(codes(6, 128, 99) >= 0, 1.0, -1.0).double()
    scaled, _ = duch_loss(*hs, b, disc, LossConfig())
    fixed, _ = duch_loss(*hs, b, disc, LossConfig(tau=0.5**0.5, tau_bits=0))
    unscaled, _ = duch_loss(*hs, b, disc, LossConfig(tau_bits=0))
    assert float(scaled) == pytest.approx(float(fixed), rel=1e-12)
    assert float(scaled) != pytest.approx(float(unscaled), rel=1e-3)
    # the published form (paper_compat, or contrast: published) keeps tau whatever tau_bits says
    for compat, contrast in ((True, "exact"), (False, "published")):
        a, _ = duch_loss(*hs, b, disc, LossConfig(contrast=contrast), compat)
        c, _ = duch_loss(*hs, b, disc, LossConfig(contrast=contrast, tau_bits=0), compat)
        assert float(a) == float(c)


def test_duch_loss_shape_mismatch() -> None:
    h = codes(4, 16, 0)
    with pytest.raises(ValueError, match="h_t2"):
        duch_loss(h, h, h, h[:3], h, eval_disc(16), LossConfig())


# --------------------------------------------------------------------------------------------
# where the gradients go


def _model() -> DUCH:
    torch.manual_seed(0)
    return DUCH(12, 10, 16, hidden_dim=32)


def _forward(model: DUCH, n: int = 6):  # noqa: ANN202
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)
    return (
        model.image_head(img),
        model.image_head(img + 0.1),
        model.text_head(txt),
        model.text_head(txt + 0.1),
    )


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("paper_compat", "generator", "image_grad", "text_grad"),
    [
        (False, "image", True, False),
        (True, "image", False, True),
        (False, "text", False, True),
    ],
)
def test_generator_term_reaches_the_right_head(
    paper_compat: bool, generator: str, image_grad: bool, text_grad: bool
) -> None:
    model = _model()
    hv1, hv2, ht1, ht2 = _forward(model)
    only_adv = LossConfig(
        w_inter=0, w_intra_image=0, w_intra_text=0, alpha=1, beta=0, gamma=0, generator=generator
    )
    b = torch.ones_like(hv1)
    total, parts = duch_loss(hv1, hv2, ht1, ht2, b, model.discriminator, only_adv, paper_compat)
    assert float(total) == pytest.approx(float(parts["adversarial"]))
    total.backward()
    assert (_grad_norm(model.image_head) > 0) is image_grad
    assert (_grad_norm(model.text_head) > 0) is text_grad


def test_full_loss_reaches_both_heads() -> None:
    model = _model()
    hv1, hv2, ht1, ht2 = _forward(model)
    total, _ = duch_loss(
        hv1, hv2, ht1, ht2, torch.ones_like(hv1), model.discriminator, LossConfig()
    )
    total.backward()
    assert _grad_norm(model.image_head) > 0 and _grad_norm(model.text_head) > 0


def test_discriminator_loss_does_not_touch_the_heads() -> None:
    model = _model()
    hv1, _, ht1, _ = _forward(model)
    loss = adversarial_discriminator_loss(model.discriminator, ht1, hv1, gp_weight=10.0)
    loss.backward()
    assert all(p.grad is None for p in model.hash_parameters())
    assert _grad_norm(model.discriminator) > 0


def test_gradient_penalty_alone_trains_the_discriminator() -> None:
    model = _model()
    hv1, _, ht1, _ = _forward(model)
    gradient_penalty(model.discriminator, ht1, hv1).backward()
    assert all(p.grad is None for p in model.hash_parameters())
    assert _grad_norm(model.discriminator) > 0


def test_contrastive_codes_replace_only_the_contrastive_terms() -> None:
    disc = eval_disc(16, seed=5)
    local = [codes(3, 16, 90 + i) for i in range(4)]
    extra = [codes(2, 16, 95 + i) for i in range(4)]
    gathered = tuple(torch.cat([lo, ex]) for lo, ex in zip(local, extra, strict=True))
    b = torch.ones(3, 16, dtype=torch.float64)
    cfg = dataclasses.replace(LossConfig(), tau=0.5, tau_bits=0)
    _, parts = duch_loss(*local, b, disc, cfg, contrastive_codes=gathered)  # type: ignore[arg-type]
    assert float(parts["inter"]) == pytest.approx(ref_nt_xent(gathered[0], gathered[2], 0.5))
    _, local_parts = duch_loss(*local, b, disc, cfg)
    for key in ("adversarial", "quantization", "bit_balance"):
        assert float(parts[key]) == pytest.approx(float(local_parts[key]))
