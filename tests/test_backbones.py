"""Image and text towers: tiny seeded towers, the offline MobileNetV2 key mapping checked against a
plain torchvision-layout reference, MiniLM pooling against a hand-written reference, freezing,
fine-tuning, S3 checkpoints and clear errors."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from torch import nn

from duch_core import backbones as bb
from duch_core import offline_weights as ow
from duch_core.config import ImageBackboneConfig, TextBackboneConfig
from duch_core.imageio import CaptionError, decode_image, preprocess

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rs_samples")
TINY_IMAGE = ["tiny:resnet", "tiny:mobilenet_v2", "tiny:vit", "tiny:clip_vision"]


# --------------------------------------------------------------------------------------------
# a plain MobileNetV2 in torchvision's layout (keys match the checkpoint as is)
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(cin, hidden, 1))
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class _ReferenceMobileNetV2(nn.Module):
    """MobileNetV2 as in Sandler et al. / torchvision, with its classifier."""

    def __init__(self) -> None:
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2)]
        settings += [(6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        feats: list[nn.Module] = [_conv_bn_relu(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in settings:
            for i in range(n):
                feats.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_conv_bn_relu(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def _sample_files() -> list[str]:
    files = sorted(glob.glob(os.path.join(SAMPLES, "*_images", "*")))
    if not files:
        pytest.skip(f"real samples not found under {os.path.abspath(SAMPLES)}")
    return files


@pytest.fixture(scope="module")
def offline_mobilenet() -> bb.ImageTower:
    try:
        return bb.load_image_tower(ImageBackboneConfig(source="offline:mobilenet_v2"))
    except bb.BackboneError as e:  # the weights package is part of the install
        pytest.fail(str(e))


def test_mobilenet_key_map_is_complete_and_shape_exact() -> None:
    from transformers import MobileNetV2Model

    state = torch.load(ow.offline_mobilenet_v2_path(), map_location="cpu", weights_only=True)
    kmap = ow.mobilenet_v2_key_map()
    hf = MobileNetV2Model(ow.torchvision_mobilenet_v2_config()).state_dict()
    assert sorted(set(state) - set(kmap)) == ["classifier.1.bias", "classifier.1.weight"]
    assert set(kmap) <= set(state)
    assert sorted(kmap.values()) == sorted(hf)  # every model key filled, nothing extra
    assert len(set(kmap.values())) == len(kmap)  # injective
    for tv, name in kmap.items():
        assert tuple(state[tv].shape) == tuple(hf[name].shape), (tv, name)


def test_offline_mobilenet_matches_plain_reference(offline_mobilenet: bb.ImageTower) -> None:
    ref = _ReferenceMobileNetV2()
    state = torch.load(ow.offline_mobilenet_v2_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = offline_mobilenet(x), ref.pooled(x)
    assert ours.shape == (3, 1280)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # odd sizes exercise the padding rule (TF "SAME" padding would differ here)
    x = torch.randn(1, 3, 197, 211, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(offline_mobilenet(x), ref.pooled(x), atol=1e-4, rtol=1e-4)


def test_offline_mobilenet_features_are_meaningful(offline_mobilenet: bb.ImageTower) -> None:
    files = _sample_files()
    ucm = [f for f in files if "UCM_images" in f][:2]
    rsicd = [f for f in files if "RSICD_images" in f][:2]
    sydney = [f for f in files if "Sydney_images" in f][:2]
    if not (ucm and rsicd and sydney):
        pytest.skip("need UCM, RSICD and Sydney samples")
    cfg = ImageBackboneConfig(center_crop=0)
    crops, others = [], []
    for f in ucm + rsicd + sydney:
        img = decode_image(open(f, "rb").read())
        h, w = img.shape[:2]
        a = img[: int(h * 0.8), : int(w * 0.8)]  # two overlapping crops of one scene
        b = img[h - int(h * 0.8) :, w - int(w * 0.8) :]
        crops.append((preprocess(a, cfg), preprocess(b, cfg)))
        others.append(preprocess(img, cfg))
    with torch.inference_mode():
        fa = offline_mobilenet(torch.from_numpy(np.stack([c[0] for c in crops])))
        fb = offline_mobilenet(torch.from_numpy(np.stack([c[1] for c in crops])))
    fa, fb = nn.functional.normalize(fa, dim=1), nn.functional.normalize(fb, dim=1)
    sim = fa @ fb.T  # (6, 6): same scene on the diagonal
    same = sim.diagonal()
    # RSICD / Sydney images are different scenes from each other and from UCM farmland
    for i in range(6):
        different = [sim[i, j] for j in range(6) if j // 2 != i // 2]
        assert same[i] > max(different), (i, sim)
    # ImageNet classifier on top of the mapped features is confident (weights are not random)
    state = torch.load(ow.offline_mobilenet_v2_path(), map_location="cpu", weights_only=True)
    with torch.inference_mode():
        feats = offline_mobilenet(torch.from_numpy(np.stack(others)))
        logits = feats @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    assert logits.softmax(1).max(1).values.mean() > 0.1  # random weights give ~0.001


@pytest.mark.parametrize("source", TINY_IMAGE)
def test_tiny_image_towers_are_seeded_frozen_and_pooled(source: str) -> None:
    cfg = ImageBackboneConfig(source=source, image_size=64, seed=3)
    a, b = bb.load_image_tower(cfg), bb.load_image_tower(cfg)
    c = bb.load_image_tower(ImageBackboneConfig(source=source, image_size=64, seed=4))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fa, fb, fc = a(x), b(x), c(x)
    assert fa.shape == (2, a.dim) and fa.dtype == torch.float32
    torch.testing.assert_close(fa, fb)
    assert not torch.allclose(fa, fc)
    assert not any(p.requires_grad for p in a.parameters())
    a.train()  # a frozen backbone stays in eval mode under .train()
    assert not any(m.training for m in a.model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(a(x), fa)
        # another input size still gives pooled features
        assert a(torch.rand(1, 3, 48, 48)).shape == (1, a.dim)


def test_tiny_towers_do_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bb.load_image_tower(ImageBackboneConfig(source="tiny:resnet"))
    bb.load_text_tower(TextBackboneConfig(source="tiny:bert"))
    torch.testing.assert_close(torch.rand(3), expected)


def test_finetune_last_blocks() -> None:
    cfg = ImageBackboneConfig(source="tiny:vit", image_size=32, finetune_blocks=1)
    tower = bb.load_image_tower(cfg)
    trainable = {n for n, p in tower.model.named_parameters() if p.requires_grad}
    last = tower.blocks[-1]
    assert trainable == {
        n for n, p in tower.model.named_parameters() if any(p is q for q in last.parameters())
    }
    tower.train()
    assert last.training and not tower.blocks[0].training
    loss = tower(torch.rand(2, 3, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is not None for p in last.parameters())
    with pytest.raises(bb.BackboneError, match="out of range"):
        bb.load_image_tower(ImageBackboneConfig(source="tiny:vit", finetune_blocks=99))


def test_batchnorm_train_mode_uses_batch_statistics() -> None:
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    frozen = bb.load_image_tower(ImageBackboneConfig(source="tiny:resnet", image_size=64))
    paper = bb.load_image_tower(
        ImageBackboneConfig(source="tiny:resnet", image_size=64, batchnorm_train_mode=True)
    )
    buffers = {k: v.clone() for k, v in paper.model.state_dict().items()}
    with torch.inference_mode():
        f_all, f_half = paper(x), paper(x[:2])
        g_all, g_half = frozen(x), frozen(x[:2])
    torch.testing.assert_close(g_all[:2], g_half)  # eval mode: per-image features
    assert not torch.allclose(f_all[:2], f_half)  # batch statistics: depends on the batch
    for k, v in paper.model.state_dict().items():
        torch.testing.assert_close(v, buffers[k])  # running statistics untouched


def _reference_pooling(model: nn.Module, tok, texts, n_last: int, masked: bool, max_len: int):
    enc = tok(
        texts,
        padding="longest" if masked else "max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
    )
    with torch.inference_mode():
        hs = model(**enc, output_hidden_states=True).hidden_states
    out = []
    for i in range(len(texts)):
        acc = sum(hs[-k][i] for k in range(1, n_last + 1))  # (L, D)
        keep = enc["attention_mask"][i].bool() if masked else torch.ones(acc.shape[0]).bool()
        out.append(acc[keep].mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("paper_compat", [False, True])
def test_tiny_bert_pooling_matches_reference(paper_compat: bool) -> None:
    cfg = TextBackboneConfig(source="tiny:bert", max_length=16)
    tower = bb.load_text_tower(cfg, paper_compat=paper_compat)
    texts = ["Many buildings, near a river.", "a plane", "green trees around a lake!"]
    with torch.inference_mode():
        got = tower(texts)
    cleaned = ["many buildings near a river", "a plane", "green trees around a lake"]
    want = _reference_pooling(tower.model, tower.tokenizer, cleaned, 4, not paper_compat, 16)
    assert got.shape == (3, tower.dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if paper_compat:
        assert tower.tokenize(["a"])["input_ids"].shape == (1, 16)


def test_masked_pooling_ignores_padding() -> None:
    tower = bb.load_text_tower(TextBackboneConfig(source="tiny:bert"))
    with torch.inference_mode():
        alone = tower(["a plane"])
        padded = tower(["a plane", "many buildings near a river and a lake with boats"])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_minilm_offline_features() -> None:
    tower = bb.load_text_tower(TextBackboneConfig(source="offline:minilm"))
    assert tower.dim == 384
    texts = [
        "many planes are parked at the airport",
        "several airplanes parked near the terminal of an airport",
        "a green farmland with crops in rows",
    ]
    with torch.inference_mode():
        f = nn.functional.normalize(tower(texts), dim=1)
    sim = f @ f.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]  # paraphrases are closest
    with pytest.raises(CaptionError):
        tower(["   "])


def test_unknown_sources_raise_actionable_errors(tmp_path) -> None:
    with pytest.raises(bb.BackboneError, match="built-in ones are offline:mobilenet_v2"):
        bb.load_image_tower(ImageBackboneConfig(source="tiny:alexnet"))
    with pytest.raises(bb.BackboneError, match="built-in ones are offline:minilm"):
        bb.load_text_tower(TextBackboneConfig(source="offline:gpt"))
    with pytest.raises(bb.BackboneError, match="does not exist"):
        bb.load_image_tower(ImageBackboneConfig(source=str(tmp_path / "missing")))
    with pytest.raises(bb.BackboneError, match="huggingface-cli download"):
        bb.load_image_tower(ImageBackboneConfig(source="nobody-here/not-a-model-xyz"))
    with pytest.raises(bb.BackboneError, match="unknown image_backbone.arch"):
        bb.load_image_tower(ImageBackboneConfig(source="tiny:resnet", arch="vgg"))
    with pytest.raises(bb.BackboneError, match="is a resnet"):
        bb.load_image_tower(ImageBackboneConfig(source="tiny:resnet", arch="vit"))
    with pytest.raises(bb.BackboneError, match="sum_last_layers"):
        bb.load_text_tower(TextBackboneConfig(source="tiny:bert", sum_last_layers=9))


def _save_tiny_models(root) -> tuple[str, str, str]:
    import transformers as tf

    torch.manual_seed(0)
    vit = root / "vit"
    tf.ViTModel(
        tf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(vit)
    clip = root / "clip"
    clip_cfg = tf.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    tf.CLIPModel(clip_cfg).save_pretrained(clip)
    bert = root / "bert"
    tok = bb.build_tiny_tokenizer()
    tf.BertModel(
        tf.BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(bert)
    tok.save_pretrained(bert)
    return str(vit), str(clip), str(bert)


def test_local_directories_load_with_detected_arch(tmp_path) -> None:
    vit, clip, bert = _save_tiny_models(tmp_path)
    t = bb.load_image_tower(ImageBackboneConfig(source=vit, image_size=32))
    assert t.arch == "vit" and t.dim == 32
    c = bb.load_image_tower(ImageBackboneConfig(source=clip, image_size=32))  # full CLIP dir
    assert c.arch == "clip_vision" and c.dim == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert t(x).shape == (2, 32) and c(x).shape == (2, 32)
    import transformers as tf

    full = tf.CLIPModel.from_pretrained(clip, local_files_only=True).eval()
    with torch.inference_mode():  # the vision weights of the full CLIP checkpoint were loaded
        want = full.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(c(x), want)
    text = bb.load_text_tower(TextBackboneConfig(source=bert, sum_last_layers=2))
    with torch.inference_mode():
        assert text(["a plane"]).shape == (1, 32)


def test_s3_checkpoint_is_cached_locally(s3_prefix, tmp_path, monkeypatch) -> None:
    from duch_core import storage

    vit, _, _ = _save_tiny_models(tmp_path)
    for name in os.listdir(vit):
        with open(os.path.join(vit, name), "rb") as f:
            storage.write_bytes(storage.join(s3_prefix, "vit", name), f.read())
    monkeypatch.setenv("DUCH_CACHE_DIR", str(tmp_path / "cache"))
    uri = storage.join(s3_prefix, "vit")
    remote = bb.load_image_tower(ImageBackboneConfig(source=uri, image_size=32))
    local = bb.load_image_tower(ImageBackboneConfig(source=vit, image_size=32))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(remote(x), local(x))
    assert bb.fetch_checkpoint_dir(uri) == bb.fetch_checkpoint_dir(uri)  # one cache entry
    assert len(os.listdir(tmp_path / "cache")) == 1
    with pytest.raises(bb.BackboneError, match="no objects under"):
        bb.load_image_tower(ImageBackboneConfig(source=storage.join(s3_prefix, "nothing")))
