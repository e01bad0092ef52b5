"""The tables of :mod:`bench.quality` runs: mAP per variant and the leads over the published
behaviour, one table per Hamming tie order and one for the asymmetric ranking.

``python -m bench.quality --report --results FILE.jsonl`` prints them for a results file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DATASETS = ("ucm", "rsitmd")  # column order
TIES = ("position", "expected")
K = 20  # mAP@K


def _mean_sd(xs: Sequence[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}"


def _columns(records: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    return sorted(
        {(r["dataset"], r["bits"]) for r in records},
        key=lambda c: (DATASETS.index(c[0]) if c[0] in DATASETS else 99, c[0], c[1]),
    )


def table(records: Sequence[dict[str, Any]], ties: str, form: str = "djsrh") -> str:
    """Markdown table: rows = variant, columns = dataset x bits x (i2t, t2i), mean ± sd over
    the seeds; a cell with fewer runs than the fullest cell says how many (``n=2``)."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cols = _columns(records)
    full = max(
        sum(1 for r in records if (r["variant"], r["dataset"], r["bits"]) == (v, ds, b))
        for v in variants
        for ds, b in cols
    )
    head = ["variant"] + [f"{ds} {b} {d}" for ds, b in cols for d in ("i2t", "t2i")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [v]
        for ds, b in cols:
            runs = [r for r in records if (r["variant"], r["dataset"], r["bits"]) == (v, ds, b)]
            for d in ("i2t", "t2i"):
                xs = [r["map"][ties][form][d] for r in runs]
                cell = _mean_sd(xs) if xs else ""
                cells.append(f"{cell} (n={len(xs)})" if xs and len(xs) < full else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lead_table(
    records: Sequence[dict[str, Any]], ties: str, base: str = "paper_compat", form: str = "djsrh"
) -> str:
    """Markdown table: each other variant's mean lead over ``base`` (the published behaviour),
    over the seeds both have run, per dataset x bits x direction (``+0.012``); ``""`` where
    they share no seed. The issue's bar is +0.010 in every cell."""
    by = {(r["variant"], r["dataset"], r["bits"], r["seed"]): r for r in records}
    variants = [v for v in dict.fromkeys(r["variant"] for r in records) if v != base]
    cols = _columns(records)
    head = [f"lead over {base}"] + [f"{ds} {b} {d}" for ds, b in cols for d in ("i2t", "t2i")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [v]
        for ds, b in cols:
            seeds = sorted(
                s for (vv, dd, bb, s) in by if (vv, dd, bb) == (v, ds, b) and (base, ds, b, s) in by
            )
            for d in ("i2t", "t2i"):
                diffs = [
                    by[(v, ds, b, s)]["map"][ties][form][d]
                    - by[(base, ds, b, s)]["map"][ties][form][d]
                    for s in seeds
                ]
                lead = round(float(np.mean(diffs)), 3) + 0.0 if diffs else None  # no "-0.000"
                cells.append("" if lead is None else f"{lead:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distinct_configs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with ``@`` and the config digest appended to the variant of every record
    whose variant name was run under more than one config."""
    shas: dict[str, set[Any]] = {}
    for r in records:
        shas.setdefault(r["variant"], set()).add(r.get("config_sha"))
    return [
        dict(r, variant=f"{r['variant']}@{str(r.get('config_sha'))[:6]}")
        if len(shas[r["variant"]]) > 1
        else r
        for r in records
    ]


def report(records: Sequence[dict[str, Any]]) -> str:
    """Every table of ``records``: per tie order (and asymmetric ranking) the mAP table, then
    the leads over ``paper_compat`` when it was run. A variant name measured under more than
    one config (a default changed between runs) is split into one row per config,
    ``name@digest``."""
    records = distinct_configs(records)
    out = []
    groups = [(ties, f"Hamming ties by {ties}", list(records)) for ties in TIES]
    asym = [r for r in records if "asymmetric" in r["map"]]
    if asym:
        groups.append(("asymmetric", "asymmetric ranking", asym))
    for ties, title, recs in groups:
        out.append(f"\nmAP@{K} (DJSRH form), {title}, mean ± sd over seeds\n")
        out.append(table(recs, ties))
        if (
            any(r["variant"] == "paper_compat" for r in recs)
            and len({r["variant"] for r in recs}) > 1
        ):
            out.append("")
            out.append(lead_table(recs, ties))
    return "\n".join(out)
