"""The demo job end to end (train -> tile a real scene -> encode -> in-process and HTTP queries,
one filtered by place and time) on the smoke config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs import demo


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end_and_reruns_incrementally(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from duch_core import index_store
    from duch_core.archive import read_archive

    smoke = str(demo.REPO / "configs" / "smoke.yaml")
    work = tmp_path / "demo"
    assert demo.main(["--work-dir", str(work), "--train-config", smoke]) == 0
    out = capsys.readouterr().out
    assert "equal to in-process" in out  # the HTTP answer was checked against duch_core search
    assert "as the filtered reference" in out  # and the bbox + datetime filtered one
    assert len(out.splitlines()) < 80, out
    chips = read_archive(str(work / "tiles")).num_rows
    assert chips == 25  # 627 x 603 pixels in 128-pixel chips
    first = index_store.read_latest(str(work / "index"))
    assert first.counts["image"] == 32 + chips and first.counts["text"] == 32 * 5

    # second run: the bundle is reused and every item is carried over, nothing re-encoded
    assert demo.main(["--work-dir", str(work), "--train-config", smoke, "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "reusing the trained bundle" in out
    assert re.search(r"encoded 0 items .*carried over 57,", out), out
    second = index_store.read_latest(str(work / "index"))
    assert second.version != first.version and second.counts == first.counts
    assert second.bundle_id == first.bundle_id


def test_demo_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("duch: {model: {bits: 12}}\n")
    assert demo.main(["--work-dir", str(tmp_path / "w"), "--train-config", str(bad)]) == 2
    assert "bits" in capsys.readouterr().err
