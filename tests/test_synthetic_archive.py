"""The built-in demo archive: determinism, real decodable files, balance, learnable classes."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duch_core import storage
from duch_core.archive import read_archive
from duch_core.synthetic_archive import DEMO_CLASSES, make_demo_archive, render_scene

N_PER_CLASS = 6
SIZE = 64
MAGIC = {"png": b"\x89PNG", "jpg": b"\xff\xd8\xff", "tif": (b"II*\x00", b"MM\x00*")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    manifest = make_demo_archive(str(out), n_per_class=N_PER_CLASS, seed=0, image_size=SIZE)
    assert manifest == str(out / "manifest.parquet")
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_for_a_seed(demo, tmp_path):
    make_demo_archive(
        str(tmp_path / "again"), n_per_class=N_PER_CLASS, seed=0, image_size=SIZE, workers=1
    )
    a, b = _files(demo), _files(tmp_path / "again")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k.startswith("images/")), "image bytes differ"
    assert read_archive(str(demo), resolve_images=False).equals(
        read_archive(str(tmp_path / "again"), resolve_images=False)
    )
    make_demo_archive(str(tmp_path / "other"), n_per_class=N_PER_CLASS, seed=1, image_size=SIZE)
    c = _files(tmp_path / "other")
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) == len(a) - 1  # all but manifest


def test_first_images_do_not_depend_on_n_per_class(tmp_path):
    make_demo_archive(str(tmp_path / "small"), n_per_class=2, image_size=SIZE, classes=("river",))
    make_demo_archive(str(tmp_path / "big"), n_per_class=3, image_size=SIZE, classes=("river",))
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    names = [k for k in small if k.startswith("images/")]
    assert len(names) == 2 and all(small[k] == big[k] for k in names)
    assert len(big) == 4


def test_manifest_balance_captions_and_split(demo):
    t = read_archive(str(demo))
    assert t.num_rows == N_PER_CLASS * len(DEMO_CLASSES)
    assert Counter(t.column("label").to_pylist()) == {c: N_PER_CLASS for c in DEMO_CLASSES}
    n = t.num_rows
    assert Counter(t.column("split").to_pylist()) == {
        "train": n // 2,
        "query": n // 10,
        "database": n - n // 2 - n // 10,
    }
    assert set(t.column("format").to_pylist()) == {"png", "jpg", "tif"}
    all_caps = []
    for caps in t.column("captions").to_pylist():
        assert len(caps) == 5 and len(set(caps)) == 5
        assert all(c[0].isupper() and c.endswith(" .") for c in caps)
        all_caps += caps
    assert len(set(all_caps)) > 0.8 * len(all_caps)  # varied, not one sentence per class


def test_files_are_real_images(demo):
    t = read_archive(str(demo))
    for uri, fmt in zip(
        t.column("image_uri").to_pylist(), t.column("format").to_pylist(), strict=True
    ):
        data = Path(uri).read_bytes()
        magic = MAGIC[fmt]
        assert data.startswith(magic if isinstance(magic, bytes) else tuple(magic)), uri
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)


def test_classes_are_distinct_and_vary_inside(demo):
    """A trivial colour/texture descriptor separates the classes (leave-one-out 1-NN), while no
    two images of a class are the same."""
    t = read_archive(str(demo))
    imgs = [
        np.asarray(Image.open(u).convert("RGB"), dtype=np.float32)
        for u in t.column("image_uri").to_pylist()
    ]
    labels = np.array(t.column("label").to_pylist())

    def descriptor(a: np.ndarray) -> np.ndarray:
        small = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((8, 8)), dtype=np.float32)
        grad = np.abs(np.diff(a, axis=0)).mean(axis=(0, 1))
        return np.concatenate(
            [
                a.mean(axis=(0, 1)),
                a.std(axis=(0, 1)),
                grad,
                np.sort(small.reshape(-1, 3), axis=0)[::8].ravel(),
            ]
        )

    x = np.stack([descriptor(a) for a in imgs])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    acc = (labels[d.argmin(1)] == labels).mean()
    assert acc >= 0.85, acc
    for c in DEMO_CLASSES:
        group = [imgs[i] for i in np.flatnonzero(labels == c)]
        diffs = [np.abs(group[i] - group[j]).mean() for i in range(len(group)) for j in range(i)]
        assert min(diffs) > 3.0, (c, min(diffs))


def test_render_scene_arguments():
    rng = np.random.default_rng(0)
    img, facts = render_scene("airport", rng, 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and isinstance(facts, dict)
    with pytest.raises(ValueError, match="unknown demo class"):
        render_scene("volcano", rng)
    with pytest.raises(ValueError, match="at least 32"):
        make_demo_archive("/nonexistent", image_size=8)
    with pytest.raises(ValueError, match="n_per_class"):
        make_demo_archive("/nonexistent", n_per_class=0)
    with pytest.raises(ValueError, match="unknown demo classes"):
        make_demo_archive("/nonexistent", classes=("forest", "volcano"))


def test_demo_on_s3(s3_prefix, demo):
    manifest = make_demo_archive(
        storage.join(s3_prefix, "demo"), n_per_class=N_PER_CLASS, seed=0, image_size=SIZE
    )
    t = read_archive(manifest)
    assert t.num_rows == N_PER_CLASS * len(DEMO_CLASSES)
    first = t.column("image_uri")[0].as_py()
    assert first == storage.join(s3_prefix, "demo", "images/forest_0000.png")
    assert storage.read_bytes(first) == (demo / "images" / "forest_0000.png").read_bytes()
