"""Bundles: round trip (local and S3) reproduces codes exactly, tampering is detected, and the
encoder rebuilt from the bundle alone matches the in-memory model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from duch_core import codes, storage
from duch_core.backbones import load_image_tower, load_text_tower
from duch_core.bundle import (
    Bundle,
    BundleError,
    content_hash,
    read_meta,
    save_bundle,
    save_untrained_bundle,
)
from duch_core.config import (
    DUCHConfig,
    ImageBackboneConfig,
    ModelConfig,
    TextBackboneConfig,
    to_dict,
)
from duch_core.hash_encoder import HashEncoder
from duch_core.imageio import CaptionError, ImageDecodeError, preprocess
from duch_core.model import DUCH

BITS = 32
STATS = {"image": {"mean": 0.25, "std": 1.5}, "text": {"mean": -0.1, "std": 0.7}}
CAPTIONS = ["Many buildings near a river.", "a plane parked at the airport", "green trees"]


def _cfg(**kw) -> DUCHConfig:
    return DUCHConfig(
        model=ModelConfig(bits=BITS, hidden_dim=64),
        image_backbone=ImageBackboneConfig(source="tiny:resnet", image_size=64, center_crop=56),
        text_backbone=TextBackboneConfig(source="tiny:bert", max_length=24),
        **kw,
    )


def _model(cfg: DUCHConfig, seed: int = 0) -> DUCH:
    torch.manual_seed(seed)
    img_dim = load_image_tower(cfg.image_backbone).dim
    txt_dim = load_text_tower(cfg.text_backbone).dim
    m = DUCH(img_dim, txt_dim, cfg.model.bits, cfg.model.hidden_dim)
    # make BatchNorm statistics non-trivial, as after training
    m.train()
    with torch.no_grad():
        m.image_head(torch.randn(16, img_dim) * 2 + 1)
        m.text_head(torch.randn(16, txt_dim) * 2 + 1)
    return m.eval()


def _images(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (70 + 3 * i, 80, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture()
def saved(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    uri = str(tmp_path / "bundle")
    bid = save_bundle(uri, model, cfg, STATS, {"map@20_i2t": 0.5})
    return uri, bid, cfg, model


def test_layout_and_meta(saved) -> None:
    uri, bid, cfg, _ = saved
    assert sorted(os.listdir(uri)) == ["config.json", "heads.pt", "meta.json"]
    meta = json.load(open(os.path.join(uri, "meta.json")))
    assert meta["bundle_id"] == bid and len(bid) == 64
    assert meta["bits"] == BITS and meta["bitorder"] == "big"
    assert meta["image_dim"] == 32 and meta["text_dim"] == 32 and meta["hidden_dim"] == 64
    assert meta["feature_stats"] == STATS and meta["metrics"] == {"map@20_i2t": 0.5}
    assert meta["created"].endswith("+00:00")
    assert json.load(open(os.path.join(uri, "config.json"))) == to_dict(cfg)


def test_bundle_id_is_a_content_hash(saved, tmp_path) -> None:
    uri, bid, cfg, model = saved
    again = save_bundle(str(tmp_path / "again"), model, cfg, STATS, {"other": 1.0})
    assert again == bid  # metrics and time are not content
    other_stats = {"image": {"mean": 0.3, "std": 1.5}, "text": STATS["text"]}
    assert save_bundle(str(tmp_path / "s"), model, cfg, other_stats, {}) != bid
    assert save_bundle(str(tmp_path / "c"), model, _cfg(paper_compat=True), STATS, {}) != bid
    assert save_bundle(str(tmp_path / "w"), _model(cfg, seed=1), cfg, STATS, {}) != bid


def test_round_trip_reproduces_codes_exactly(saved) -> None:
    uri, bid, cfg, model = saved
    bundle = Bundle.load(uri)
    assert bundle.bundle_id == bid and bundle.bits == BITS
    assert bundle.config == cfg and bundle.feature_stats == STATS
    assert not bundle.model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(bundle.model.state_dict()[k], v, rtol=0, atol=0)

    enc = HashEncoder(bundle)
    images = _images()
    got_img = enc.encode_images(images)
    got_txt = enc.encode_texts(CAPTIONS)
    assert got_img.shape == (5, BITS // 8) and got_img.dtype == np.uint8
    assert got_txt.shape == (3, BITS // 8) and got_txt.dtype == np.uint8

    # the same computation written out by hand with the in-memory model
    tower = load_image_tower(cfg.image_backbone)
    px = torch.from_numpy(np.stack([preprocess(im, cfg.image_backbone) for im in images]))
    ttower = load_text_tower(cfg.text_backbone)
    with torch.inference_mode():
        fi = (tower(px) - 0.25) / 1.5
        ft = (ttower(CAPTIONS) - (-0.1)) / 0.7
        want_img = codes.pack(model.image_head(fi))
        want_txt = codes.pack(model.text_head(ft))
    np.testing.assert_array_equal(got_img, want_img)
    np.testing.assert_array_equal(got_txt, want_txt)
    assert len({r.tobytes() for r in got_img}) > 1  # not a constant code

    # a second load gives identical codes, batching does not matter
    enc2 = HashEncoder(Bundle.load(uri), batch_size=2)
    np.testing.assert_array_equal(enc2.encode_images(images), got_img)
    np.testing.assert_array_equal(enc2.encode_texts(CAPTIONS), got_txt)
    # continuous codes for parity checks
    cont = enc.image_codes_from_features(tower(px).detach())
    assert cont.shape == (5, BITS) and cont.dtype == torch.float32
    np.testing.assert_array_equal(codes.pack(cont), got_img)
    assert enc.encode_texts([]).shape == (0, BITS // 8)
    assert enc.encode_images([]).shape == (0, BITS // 8)


def test_no_feature_stats_and_paper_compat(tmp_path) -> None:
    cfg = _cfg(paper_compat=True)
    model = _model(cfg)
    uri = str(tmp_path / "b")
    save_bundle(uri, model, cfg, None, {})
    enc = HashEncoder(Bundle.load(uri))
    assert enc.bundle.feature_stats is None
    assert not enc.text_tower.masked  # paper pooling rebuilt from the bundle config
    ttower = load_text_tower(cfg.text_backbone, paper_compat=True)
    with torch.inference_mode():
        want = codes.pack(model.text_head(ttower(CAPTIONS)))
    np.testing.assert_array_equal(enc.encode_texts(CAPTIONS), want)


def _tamper_json(path: str, key: str, value) -> None:
    data = json.load(open(path))
    data[key] = value
    json.dump(data, open(path, "w"))


def test_tampering_is_detected(saved) -> None:
    uri, bid, cfg, model = saved
    heads = os.path.join(uri, "heads.pt")
    state = torch.load(heads, weights_only=True)
    state["image_head.net.3.bias"][0] += 1e-3
    torch.save(state, heads)
    with pytest.raises(BundleError, match="integrity check"):
        Bundle.load(uri)

    save_bundle(uri, model, cfg, STATS, {})
    _tamper_json(
        os.path.join(uri, "meta.json"), "feature_stats", {**STATS, "image": {"mean": 0, "std": 1}}
    )
    with pytest.raises(BundleError, match="integrity check"):
        Bundle.load(uri)

    save_bundle(uri, model, cfg, STATS, {})
    cfg_path = os.path.join(uri, "config.json")
    data = json.load(open(cfg_path))
    data["text_backbone"]["masked_mean"] = False
    json.dump(data, open(cfg_path, "w"))
    with pytest.raises(BundleError, match="integrity check"):
        Bundle.load(uri)

    save_bundle(uri, model, cfg, STATS, {})
    _tamper_json(os.path.join(uri, "meta.json"), "bundle_id", "0" * 64)
    with pytest.raises(BundleError, match="integrity check"):
        Bundle.load(uri)

    save_bundle(uri, model, cfg, STATS, {})
    _tamper_json(os.path.join(uri, "meta.json"), "metrics", {"map": 1.0})  # descriptive only
    assert Bundle.load(uri).meta["metrics"] == {"map": 1.0}

    with open(heads, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(BundleError, match="unreadable"):
        Bundle.load(uri)


def test_read_meta_gives_identity_and_config_without_weights(saved) -> None:
    uri, bid, cfg, _ = saved
    meta = read_meta(uri)
    assert (meta.uri, meta.bundle_id, meta.bits) == (uri, bid, BITS)
    assert (meta.image_dim, meta.text_dim) == (32, 32)
    assert meta.config == cfg and meta.image_backbone == cfg.image_backbone
    # it needs no weights, but refuses what Bundle.load refuses in the JSON files
    os.remove(os.path.join(uri, "heads.pt"))
    assert read_meta(uri) == meta
    _tamper_json(os.path.join(uri, "meta.json"), "bitorder", "little")
    with pytest.raises(BundleError, match="bit order"):
        read_meta(uri)
    _tamper_json(os.path.join(uri, "meta.json"), "format", "other/9")
    with pytest.raises(BundleError, match="format"):
        read_meta(uri)
    os.remove(os.path.join(uri, "meta.json"))
    with pytest.raises(BundleError, match="meta.json not found.*incomplete"):
        read_meta(uri)


def test_encode_pixels_matches_encode_images(saved) -> None:
    enc = HashEncoder(Bundle.load(saved[0]), batch_size=2)
    images = _images(5)
    pixels = np.stack([preprocess(im, enc.bundle.config.image_backbone) for im in images])
    assert pixels.shape == (5, 3, 64, 64) and pixels.dtype == np.float32
    want = enc.encode_images(images)
    np.testing.assert_array_equal(enc.encode_pixels(pixels), want)
    np.testing.assert_array_equal(enc.encode_pixels(torch.from_numpy(pixels[:3])), want[:3])
    assert enc.encode_pixels(pixels[:0]).shape == (0, BITS // 8)


def test_incomplete_and_inconsistent_bundles(saved, tmp_path) -> None:
    uri, _, cfg, model = saved
    os.remove(os.path.join(uri, "meta.json"))
    with pytest.raises(BundleError, match="meta.json not found.*incomplete"):
        Bundle.load(uri)
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(str(tmp_path / "nothing"))
    with pytest.raises(BundleError, match="cfg.model.bits"):
        save_bundle(str(tmp_path / "x"), model, _cfg().__class__(model=ModelConfig(bits=64)))
    with pytest.raises(BundleError, match="std > 0"):
        save_bundle(
            str(tmp_path / "y"),
            model,
            cfg,
            {"image": {"mean": 0, "std": 0}, "text": {"mean": 0, "std": 1}},
        )
    with pytest.raises(BundleError, match="JSON"):
        save_bundle(str(tmp_path / "z"), model, cfg, None, {"bad": float("nan")})


def test_backbone_change_is_refused(saved) -> None:
    uri, _, _, _ = saved
    bundle = Bundle.load(uri)
    # a bundle whose recorded dims disagree with its backbone (e.g. a checkpoint directory
    # replaced by a different model) is refused when the tower is built
    bundle.meta["image_dim"] = 99
    with pytest.raises(BundleError, match="gives 32-d features but the heads expect 99-d"):
        HashEncoder(bundle).encode_images(_images(1))


def test_bad_inputs_to_the_encoder(saved) -> None:
    enc = HashEncoder(Bundle.load(saved[0]))
    with pytest.raises(CaptionError):
        enc.encode_texts(["ok caption", "  ?! "])
    with pytest.raises(ImageDecodeError):
        enc.encode_images([np.zeros((10, 10), np.uint8)])
    with pytest.raises(BundleError, match="features must be"):
        enc.image_codes_from_features(torch.zeros(2, 5))
    with pytest.raises(BundleError, match="one string"):
        enc.encode_texts("a caption")  # type: ignore[arg-type]


def test_feature_stats_accepts_objects(tmp_path) -> None:
    from dataclasses import dataclass

    @dataclass
    class Stats:
        image_mean: float
        image_std: float
        text_mean: float
        text_std: float

    cfg = _cfg()
    model = _model(cfg)
    a = save_bundle(str(tmp_path / "a"), model, cfg, Stats(0.25, 1.5, -0.1, 0.7), {})
    b = save_bundle(str(tmp_path / "b"), model, cfg, STATS, {})
    assert a == b


def test_s3_round_trip(s3_prefix) -> None:
    cfg = _cfg()
    model = _model(cfg)
    uri = storage.join(s3_prefix, "bundles", "b1")
    bid = save_bundle(uri, model, cfg, STATS, {"x": 1})
    bundle = Bundle.load(uri)
    assert bundle.bundle_id == bid
    state = {k: v for k, v in bundle.model.state_dict().items()}
    assert content_hash(state, to_dict(cfg), bundle.meta) == bid
    enc = HashEncoder(bundle)
    with torch.inference_mode():
        want = codes.pack(
            model.text_head((load_text_tower(cfg.text_backbone)(CAPTIONS) + 0.1) / 0.7)
        )
    np.testing.assert_array_equal(enc.encode_texts(CAPTIONS), want)
    storage.write_bytes(storage.join(uri, "heads.pt"), b"\0" * 10)
    with pytest.raises(BundleError):
        Bundle.load(uri)


def test_untrained_bundle_is_seeded_and_loads(tmp_path) -> None:  # noqa: ANN001
    cfg = _cfg()
    a = save_untrained_bundle(str(tmp_path / "a"), cfg, seed=3)
    assert save_untrained_bundle(str(tmp_path / "b"), cfg, seed=3) == a
    assert save_untrained_bundle(str(tmp_path / "c"), cfg, seed=4) != a
    bundle = Bundle.load(str(tmp_path / "a"))
    assert bundle.meta["bundle_id"] == a and bundle.model.bits == BITS


def test_bundle_id_covers_the_backbone_weights(saved, tmp_path, monkeypatch) -> None:
    uri, bid, cfg, model = saved
    meta = read_meta(uri)
    assert meta.backbones is not None
    assert set(meta.backbones) == {"image", "text"}
    assert meta.backbones["image"]["source"] == "tiny:resnet"
    assert "backbones" in json.loads(open(os.path.join(uri, "meta.json")).read())["hash_covers"]
    # the same heads and config over other backbone weights: another bundle id
    other = {k: {**v, "sha256": "0" * 64} for k, v in meta.backbones.items()}
    assert save_bundle(str(tmp_path / "o"), model, cfg, STATS, {}, backbones=other) != bid

    # the backbone changed under the same name (a hub model updated, a directory overwritten):
    # the encoder refuses it instead of computing codes that do not match the index
    import duch_core.backbones as backbones

    real = backbones.load_image_tower

    def drifted(c):  # noqa: ANN001, ANN202
        tower = real(c)
        with torch.no_grad():
            next(tower.model.parameters()).add_(1e-3)
        return tower

    monkeypatch.setattr(backbones, "load_image_tower", drifted)
    with pytest.raises(BundleError, match="image backbone 'tiny:resnet' now loads weights"):
        HashEncoder(Bundle.load(uri)).encode_images(_images(1))
    monkeypatch.undo()
    HashEncoder(Bundle.load(uri)).encode_images(_images(1))


def test_bundles_from_before_backbone_digests_still_load(saved) -> None:
    from duch_core.bundle import LEGACY_HASH_COVERS

    uri, _, _, _ = saved
    path = os.path.join(uri, "meta.json")
    meta = json.loads(open(path).read())
    del meta["backbones"]
    meta["hash_covers"] = list(LEGACY_HASH_COVERS)
    state = torch.load(os.path.join(uri, "heads.pt"), weights_only=True)
    config = json.loads(open(os.path.join(uri, "config.json")).read())
    meta["bundle_id"] = content_hash(state, config, meta, LEGACY_HASH_COVERS)
    with open(path, "w") as f:
        json.dump(meta, f)
    assert read_meta(uri).backbones is None
    bundle = Bundle.load(uri)
    assert bundle.bundle_id == meta["bundle_id"]
    assert HashEncoder(bundle).encode_texts(CAPTIONS).shape == (3, BITS // 8)


def test_pin_bundle_copies_to_an_immutable_path_by_id(saved, tmp_path) -> None:
    from duch_core.bundle import pin_bundle

    uri, bid, cfg, model = saved
    root = str(tmp_path / "index" / "bundles")
    pinned = pin_bundle(uri, root)
    assert pinned.uri == os.path.join(root, bid) and pinned.bundle_id == bid
    for name in ("heads.pt", "config.json", "meta.json"):
        assert (
            open(os.path.join(pinned.uri, name), "rb").read()
            == open(os.path.join(uri, name), "rb").read()
        )
    assert Bundle.load(pinned.uri).bundle_id == bid
    stamp = os.stat(os.path.join(pinned.uri, "heads.pt")).st_mtime_ns
    assert pin_bundle(uri, root).uri == pinned.uri  # pinned once: not written again
    assert os.stat(os.path.join(pinned.uri, "heads.pt")).st_mtime_ns == stamp
    # the mutable URI now holds another bundle: another pinned copy, the first one unchanged
    bid2 = save_bundle(uri, _model(cfg, seed=1), cfg, STATS, {})
    assert pin_bundle(uri, root).uri == os.path.join(root, bid2)
    assert Bundle.load(pinned.uri).bundle_id == bid
    # a bundle changed after saving is never pinned
    with open(os.path.join(uri, "config.json"), "a") as f:
        f.write(" ")
    config = json.loads(open(os.path.join(uri, "config.json")).read())
    config["model"]["hidden_dim"] = 65
    with open(os.path.join(uri, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(BundleError, match="integrity"):
        pin_bundle(uri, root)
