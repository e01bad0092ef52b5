"""The evaluation report (duch_core.report) against the metric functions, the written files and
plots, and jobs/evaluate.py's input errors, all without Ray. (Its main() on a trained bundle runs
in tests/test_train_job.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from duch_core import metrics, report
from jobs import evaluate


def random_codes(seed: int = 0, nq: int = 12, ndb: int = 40, width: int = 2):
    rng = np.random.default_rng(seed)
    q_labels = rng.integers(0, 4, nq).tolist()
    db_labels = rng.integers(0, 4, ndb).tolist()
    codes = [rng.integers(0, 256, (n, width), dtype=np.uint8) for n in (nq, nq, ndb, ndb)]
    return codes, q_labels, db_labels


def test_protocol_report_matches_the_metric_functions() -> None:
    (iq, tq, idb, tdb), ql, dbl = random_codes()
    rep = report.protocol_report(iq, tq, idb, tdb, ql, dbl, ks=(20, 10), p_at_k=(1, 5, 100))
    pairs = {"i2t": (iq, tdb), "t2i": (tq, idb), "i2i": (iq, idb), "t2t": (tq, tdb)}
    assert rep["bits"] == 16 and rep["n_query"] == 12 and rep["n_database"] == 40
    for k in (20, 10):
        for d, (q, db) in pairs.items():
            assert rep["map"][str(k)][d] == metrics.map_at_k(q, db, ql, dbl, k)
            assert rep["map_standard"][str(k)][d] == metrics.map_at_k(q, db, ql, dbl, k, "standard")
        row = rep["map"][str(k)]
        assert row["mean"] == pytest.approx(np.mean([row[d] for d in pairs]))
    # P@K above the database size is replaced by P@N
    assert list(rep["precision_at_k"]["i2t"]) == ["1", "5", "40"]
    assert rep["precision_at_k"]["t2t"]["5"] == metrics.precision_at_k(tq, tdb, ql, dbl, [5])[5]
    curve = metrics.pr_curve(iq, idb, ql, dbl)
    assert rep["pr_curve"]["i2i"]["recall"] == curve["recall"].tolist()
    assert json.loads(json.dumps(rep)) == rep  # JSON-ready
    flat = report.flat_metrics(rep)
    assert flat["map@20_i2t"] == rep["map"]["20"]["i2t"] and "map@10_mean" in flat


def test_write_report_files(tmp_path: Path) -> None:
    (iq, tq, idb, tdb), ql, dbl = random_codes(1)
    rep = report.protocol_report(iq, tq, idb, tdb, ql, dbl)
    paths = report.write_report(rep, str(tmp_path / "out"))
    assert json.loads(Path(paths["json"]).read_text()) == rep
    md = Path(paths["markdown"]).read_text()
    assert f"| mAP@20 | {rep['map']['20']['i2t']:.4f} |" in md and "| P@K |" in md
    for key in ("pr_curve", "precision_at_k"):
        data = Path(paths[key]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _history(epochs: int) -> list[dict[str, float]]:
    terms = ("total", "inter", "intra_image", "intra_text", "adversarial", "bit_balance")
    return [
        {"epoch": float(e), **{t: 1.0 / (e + 1 + i) for i, t in enumerate(terms)}}
        for e in range(epochs)
    ]


def test_loss_curve_png_is_written_and_draws_each_term(tmp_path: Path) -> None:
    uri = report.write_loss_curve(_history(5), str(tmp_path / "bundle"))
    assert uri == str(tmp_path / "bundle" / report.LOSS_PNG)
    data = Path(uri).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # one line per loss term present in every record: more terms draw a different picture
    fewer = [{k: h[k] for k in ("epoch", "total")} for h in _history(5)]
    assert report.loss_curve_png(fewer) != data
    with pytest.raises(ValueError, match="at least one epoch"):
        report.loss_curve_png([])


def test_evaluation_refuses_unusable_items() -> None:
    from duch_core.features import EvalItems

    some = EvalItems(["a"], np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32), ["x"])
    none = EvalItems([], np.zeros((0, 4), np.float32), np.zeros((0, 3), np.float32), [])
    unlabelled = EvalItems(["b"], some.img, some.txt, [None])
    with pytest.raises(report.EvaluationError, match="nothing to evaluate"):
        report.check_items(some, none)
    with pytest.raises(report.EvaluationError, match="no label"):
        report.check_items(some, unlabelled)
    report.check_items(some, some)


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    missing = str(tmp_path / "no-bundle")
    assert evaluate.main(["--config", smoke, "--bundle", missing]) == 2
    assert "meta.json not found" in capsys.readouterr().err
    assert evaluate.main(["--config", smoke, "--bundle", missing, "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err
    assert evaluate.main(["--config", smoke, "--set", "eval_k=0"]) == 2
    assert "eval_k" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_config_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--bundle", "somewhere"])
    assert stop.value.code == 2 and "--config" in capsys.readouterr().err
