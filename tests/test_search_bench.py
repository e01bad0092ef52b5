"""Smoke test of ``bench/search.py --filtered`` at a small size: every engine runs on every
archive layout and every filter, and the parity checks (against the numpy reference over the
passing rows, and the peers' tie-aware comparison) hold."""

from __future__ import annotations

import json

from bench import search as bench


def test_filtered_benchmark_runs_with_parity(tmp_path) -> None:
    out = tmp_path / "rows.json"
    code = bench.main(
        ["--filtered", "--filter-sizes", "40000", "--milvus-size", "0", "--single", "2",
         "--repeats", "1", "--filter-batches", "1,4", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    rows = [r for r in json.loads(out.read_text()) if "engine" in r and "parity" in r]
    assert {r["layout"] for r in rows} == set(bench.LAYOUTS) == {"chips", "scenes", "uniform"}
    assert {r["filter"].split()[0] for r in rows} == {"bbox", "date", "label", "split"}
    checked = [r for r in rows if r["engine"] in ("duch", "duch+filter", "faiss")]
    assert checked and all(r["parity"] == "ok" for r in checked)
    notes = {r["note"].split(";")[0] for r in rows if r["engine"] == "duch"}
    # every candidate form the planner builds was searched: positions, a row range, row tests
    assert any("positions" in n for n in notes)
    assert any(n.startswith("rows ") and "tests" not in n for n in notes)
    assert any("tests in the scan" in n for n in notes)
    # a labelled chip archive is scanned only in the zones its label occupies
    assert any("in zones that may pass" in n for n in notes)
