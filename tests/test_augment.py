"""Image presets against slow references, determinism under a seed, rule-based caption
paraphrases, and back-translation through a tiny MarianMT chain built offline."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from duch_core import augment as A


def _img(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _blur_reference(img: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2-D 3x3 convolution with reflect padding, one pixel at a time."""
    k1 = np.exp(-0.5 * (np.array([-1.0, 0.0, 1.0]) / sigma) ** 2)
    k1 /= k1.sum()
    k = np.outer(k1, k1)
    p = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    out = np.zeros(img.shape, np.float64)
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            out[y, x] = np.tensordot(k, p[y : y + 3, x : x + 3], axes=([0, 1], [0, 1]))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_blur_matches_2d_reference() -> None:
    img = _img(12, 15)
    got = A.gaussian_blur(img, 1.2)
    ref = _blur_reference(img, 1.2)
    assert np.abs(got.astype(int) - ref).max() <= 1  # rounding of separable sums only
    assert got.std() < img.std()


def test_aug_center_is_blur_then_rotation_with_drawn_parameters() -> None:
    img = _img(64, 64)
    out = A.augment_image(img, "aug_center", np.random.default_rng(7))
    rng = np.random.default_rng(7)
    sigma, angle = rng.uniform(1.1, 1.3), rng.uniform(-10, -5)
    assert 1.1 <= sigma <= 1.3 and -10 <= angle <= -5
    blurred = A.gaussian_blur(img, sigma)
    ref = np.asarray(
        Image.fromarray(blurred).rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=0)
    )
    np.testing.assert_array_equal(out, ref)
    assert out.shape == img.shape and out.dtype == np.uint8
    # a negative angle turns clockwise: the top-right corner gets filled black
    assert (out[0, -1] == 0).all() and (out[32, 32] == ref[32, 32]).all()


@pytest.mark.parametrize("preset", A.IMAGE_PRESETS)
def test_presets_are_seeded_and_shaped(preset: str) -> None:
    img = _img(256, 256, seed=1)
    a = A.augment_image(img, preset, np.random.default_rng(3))
    b = A.augment_image(img, preset, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    if preset in ("aug_random", "random_crop_only"):
        assert a.shape == (200, 200, 3)
    else:
        assert a.shape == img.shape
    if preset == "no_aug":
        np.testing.assert_array_equal(a, img)
        assert a is not img
    else:
        outs = {A.augment_image(img, preset, np.random.default_rng(s)).tobytes() for s in range(4)}
        assert len(outs) > 1  # the draw matters
        assert not np.array_equal(a, img[: a.shape[0], : a.shape[1]])


def test_random_crop_is_a_window_of_the_input() -> None:
    img = _img(256, 256, seed=2)
    out = A.augment_image(img, "random_crop_only", np.random.default_rng(0))
    hits = [
        (y, x)
        for y in range(57)
        for x in range(57)
        if np.array_equal(img[y : y + 200, x : x + 200], out)
    ]
    assert len(hits) == 1


def test_jitter_changes_colours_within_bounds() -> None:
    img = np.full((32, 32, 3), (120, 80, 40), np.uint8)
    outs = [A.augment_image(img, "jitter_cc", np.random.default_rng(s)) for s in range(6)]
    means = np.array([o.reshape(-1, 3).mean(0) for o in outs])
    assert np.ptp(means, axis=0).max() > 10  # colours vary between draws
    for o in outs:  # a flat image stays flat
        assert o.reshape(-1, 3).std(0).max() < 1e-6


def test_bad_image_input() -> None:
    with pytest.raises(A.AugmentError, match="unknown image augmentation preset"):
        A.augment_image(_img(), "sharpen", np.random.default_rng(0))
    with pytest.raises(A.AugmentError, match="uint8"):
        A.augment_image(_img().astype(np.float32), "blur_cc", np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------


def test_caption_rules() -> None:
    text = "There is a parking lot with many cars near two buildings."
    outs = {A.augment_caption(text, np.random.default_rng(s)) for s in range(30)}
    assert text not in outs and len(outs) > 5
    for out in outs:
        assert out.startswith("It is a ")  # "there is" -> "it is", case kept
        assert out.endswith(".")
    joined = " ".join(outs)
    assert any(w in joined for w in ("car park", "parking area", "parking place"))  # 2-word term
    assert "2 " in joined  # number word -> digit
    assert any(w in joined for w in ("vehicles", "automobiles"))  # plural kept plural


def test_caption_augmentation_is_deterministic_and_always_changes_something() -> None:
    caps = ["a river runs through the green forest", "Three planes are parked at the airport"]
    for cap in caps:
        a = A.augment_caption(cap, np.random.default_rng(11))
        assert a == A.augment_caption(cap, np.random.default_rng(11))
        for s in range(20):
            assert A.augment_caption(cap, np.random.default_rng(s)) != cap
    assert A.augment_caption("xyz qqq", np.random.default_rng(0)) == "xyz qqq"
    with pytest.raises(A.AugmentError):
        A.augment_caption(None, np.random.default_rng(0))  # type: ignore[arg-type]


def test_item_rngs_view_zero_is_the_fixed_view() -> None:
    for a, b in zip(A.item_rngs(42, "x"), A.item_rngs(42, "x", 0), strict=True):
        assert a.random() == b.random()
    draws = [tuple(float(g.random()) for g in A.item_rngs(42, "x", v)) for v in range(4)]
    assert len(set(draws)) == 4  # every view its own image and caption streams
    assert len({x for d in draws for x in d}) == 8
    with pytest.raises(ValueError, match="view"):
        A.item_rngs(42, "x", -1)


def test_item_rngs_depend_on_seed_and_id_only() -> None:
    first = [g.integers(0, 1 << 30) for g in A.item_rngs(7, "scene-1", 2)]
    again = [g.integers(0, 1 << 30) for g in A.item_rngs(7, "scene-1", 2)]
    assert first == again
    assert A.item_key("scene-1") == A.item_key("scene-1") < 2**63
    others = ((8, "scene-1"), (7, "scene-2"))
    for seed, item in others:
        assert [g.integers(0, 1 << 30) for g in A.item_rngs(seed, item, 2)] != first


def test_synonym_table_is_symmetric() -> None:
    syn = A._SYNONYMS
    for term, alts in syn.items():
        for alt in alts:
            assert term in syn[alt], (term, alt)


# --------------------------------------------------------------------------------------------
# back-translation
# --------------------------------------------------------------------------------------------

_CORPUS = [
    "many buildings and green trees are around the lake",
    "a plane is parked next to the runway of the airport",
    "several boats are in the harbor near the beach",
    "a river runs through the dense forest",
    "there is a baseball field near some houses",
    "cars are parked in the parking lot beside the road",
]


def _tiny_marian(directory: str, seed: int) -> str:
    """A randomly initialised MarianMT model with a SentencePiece tokenizer trained offline."""
    import json

    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(_CORPUS * 5))
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(directory, "sp"),
        vocab_size=60,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
    )
    os.replace(os.path.join(directory, "sp.model"), os.path.join(directory, "source.spm"))
    shutil.copy(os.path.join(directory, "source.spm"), os.path.join(directory, "target.spm"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "source.spm"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    tok = MarianTokenizer(
        os.path.join(directory, "source.spm"),
        os.path.join(directory, "target.spm"),
        os.path.join(directory, "vocab.json"),
    )
    torch.manual_seed(seed)
    cfg = MarianConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=160,
        pad_token_id=2,
        eos_token_id=0,
        decoder_start_token_id=2,
    )
    MarianMTModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def marian_dirs(tmp_path_factory) -> tuple[str, str]:
    pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("marian")
    return _tiny_marian(str(root / "en-xx"), 0), _tiny_marian(str(root / "xx-en"), 1)


def _greedy_reference(directory: str, texts: list[str]) -> list[str]:
    """One model, one sentence at a time, explicit greedy loop."""
    from transformers import AutoTokenizer, MarianMTModel

    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = MarianMTModel.from_pretrained(directory, local_files_only=True).eval()
    out = []
    for t in texts:
        enc = tok([t], return_tensors="pt", truncation=True, max_length=128)
        ids = torch.tensor([[model.config.decoder_start_token_id]])
        with torch.inference_mode():
            for _ in range(126):  # max_length 128 = start token + 126 + forced end token
                logits = model(**enc, decoder_input_ids=ids).logits[:, -1]
                logits[:, model.config.pad_token_id] = -float("inf")  # Marian never emits pad
                nxt = logits.argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                if nxt.item() == model.config.eos_token_id:
                    break
        out.append(tok.decode(ids[0], skip_special_tokens=True))
    return out


def test_back_translation_chain_equals_step_by_step_greedy(marian_dirs) -> None:
    a, b = marian_dirs
    chain = A.BackTranslator([a, b], device="cpu")
    texts = _CORPUS[:3] + ["a short one"] * 8  # more than one batch of 8
    out = chain(texts)
    assert len(out) == len(texts) and all(isinstance(t, str) for t in out)
    mid = chain.translate(texts, 0)
    assert out == chain.translate(mid, 1)
    assert mid[:3] == _greedy_reference(a, texts[:3])
    assert out[:3] == _greedy_reference(b, mid[:3])
    assert out[3:] == [out[3]] * 8  # batching does not change results
    assert chain([]) == []


def test_back_translate_random_routes_each_caption_to_one_chain(marian_dirs) -> None:
    a, b = marian_dirs
    ta, tb = A.BackTranslator([a], device="cpu"), A.BackTranslator([b], device="cpu")
    texts = _CORPUS
    out = A.back_translate_random(texts, [ta, tb], np.random.default_rng(0))
    pick = np.random.default_rng(0).integers(0, 2, size=len(texts))
    ra, rb = ta(texts), tb(texts)
    assert out == [ra[i] if p == 0 else rb[i] for i, p in enumerate(pick)]


def test_back_translator_errors(tmp_path) -> None:
    from duch_core.backbones import BackboneError

    with pytest.raises(A.AugmentError):
        A.BackTranslator([])
    with pytest.raises(BackboneError, match="huggingface-cli download"):
        A.BackTranslator(["Helsinki-NLP/opus-mt-en-zz-not-cached"])
    with pytest.raises(BackboneError, match="does not exist"):
        A.BackTranslator([str(tmp_path / "missing")])
