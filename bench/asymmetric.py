"""Asymmetric ranking: what the re-rank of a Hamming shortlist costs over the Hamming search,
and how much of the exact asymmetric top-k it finds.

    python -m bench.asymmetric [--sizes 1000000,10000000] [--bits 64] [--shortlists 100,1000]
        [--k 20] [--queries 30] [--threads 2] [--scan-max-n 1000000] [--json F]

Data: ``clustered`` codes as in ``bench/search.py`` (1000 random centres, every bit flipped with
probability 1/8), and continuous queries that imitate a hash head's ``tanh`` outputs:
``u = tanh(1.5 * c + 0.8 * z)`` for the ``±1`` bits ``c`` of a clustered code and standard normal
``z``, so ``sign(u)`` differs from ``c`` in about 3 % of the bits and ``|u|`` says how sure each
bit is.

Rows, per size and batch (1 = median over ``--queries`` single-query calls; 32 = best of three
calls):

* **hamming**: ``HammingIndex.search`` of ``sign(u)`` (the default ranking of the service);
* **rerank L**: ``duch_core.asymmetric.rerank`` with a shortlist of ``L``: the Hamming top-``L``,
  re-ranked by score (``<u, b>``);
* **scan**: ``duch_core.asymmetric.asymmetric_scan``, every code scored (only up to
  ``--scan-max-n``): the exact asymmetric top-k.

``x hamming`` is the Hamming search's time / this time. ``recall`` is the share of the exact
asymmetric top-k (the scan, or at sizes above ``--scan-max-n`` the largest shortlist) that the row
returns, over the timed queries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.search import make_codes  # the same data as bench/search.py


@dataclass
class ARow:
    n: int
    bits: int
    batch: int
    k: int
    ranking: str
    ms_per_query: float
    vs_hamming: float
    recall: float
    load: float


HEADER = (
    f"{'N':>9} {'bits':>4} {'batch':>5} {'k':>3} {'ranking':<12} {'ms/query':>9} "
    f"{'x hamming':>9} {'recall':>7} {'load':>5}"
)


def fmt(r: ARow) -> str:
    return (
        f"{r.n:>9} {r.bits:>4} {r.batch:>5} {r.k:>3} {r.ranking:<12} {r.ms_per_query:>9.3f} "
        f"{r.vs_hamming:>9.2f} {r.recall:>7.3f} {r.load:>5.1f}"
    )


def continuous_queries(nq: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """``(nq, bits)`` float32 imitations of tanh outputs around clustered codes."""
    from duch_core import codes

    c = codes.unpack(make_codes("clustered", nq, bits, rng), bits).astype(np.float32)
    return np.tanh(1.5 * c + 0.8 * rng.standard_normal(c.shape)).astype(np.float32)


def _timed(fn, queries: np.ndarray, batch: int, repeats: int) -> tuple[float, list[np.ndarray]]:
    """Seconds per query (median of single calls, or best batch) and the ids of every query."""
    ids: list[np.ndarray] = []
    if batch == 1:
        times = []
        for j in range(len(queries)):
            t = time.perf_counter()
            _, i = fn(queries[j : j + 1])
            times.append(time.perf_counter() - t)
            ids.append(i[0])
        return float(np.median(times)), ids
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _, i = fn(queries[:batch])
        best = min(best, (time.perf_counter() - t) / batch)
    return best, list(i)


def _recall(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    hit = sum(len(set(g.tolist()) & set(w.tolist())) for g, w in zip(got, want, strict=False))
    return hit / max(1, sum(len(w) for w in want[: len(got)]))


def run(args: argparse.Namespace) -> list[ARow]:
    from duch_core import asymmetric, codes, hamming_topk, search

    hamming_topk.set_num_threads(args.threads)
    rows: list[ARow] = []
    for n in args.sizes:
        rng = np.random.default_rng([n, args.bits])
        db = make_codes("clustered", n, args.bits, rng)
        index = search.HammingIndex.from_arrays(db, None, args.bits)
        queries = continuous_queries(max(args.queries, 32), args.bits, rng)
        search.warmup(args.bits)
        index.search(codes.pack(queries[:1]), args.k)
        for batch in (1, 32):
            qs = queries[: args.queries] if batch == 1 else queries[:32]
            engines = {"hamming": lambda x, ix=index: ix.search(codes.pack(x), args.k)}
            for sl in args.shortlists:
                engines[f"rerank {sl}"] = lambda x, ix=index, sl=sl: asymmetric.rerank(
                    ix, x, args.k, sl
                )
            if n <= args.scan_max_n:
                engines["scan"] = lambda x, d=db: asymmetric.asymmetric_scan(
                    x, d, args.bits, args.k
                )
            measured = {name: _timed(fn, qs, batch, 3) for name, fn in engines.items()}
            exact = measured["scan" if "scan" in measured else f"rerank {max(args.shortlists)}"]
            t_ham = measured["hamming"][0]
            for name, (t, ids) in measured.items():
                rows.append(
                    ARow(n, args.bits, batch, args.k, name, t * 1e3, t_ham / t,
                         _recall(ids, exact[1]), os.getloadavg()[0])
                )  # fmt: skip
                print(fmt(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.asymmetric", description=__doc__.split("\n\n")[0]
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=ints, default=[1_000_000, 10_000_000])
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--shortlists", type=ints, default=[100, 1000])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scan-max-n", type=int, default=1_000_000)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}, cores: {os.cpu_count()}", flush=True)
    print(HEADER, flush=True)
    rows = run(args)
    print(f"\n{HEADER}")
    for r in rows:
        print(fmt(r))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
