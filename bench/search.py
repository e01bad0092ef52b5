"""Exact Hamming top-k: ``duch_core.search.HammingIndex`` vs faiss ``IndexBinaryFlat`` vs numpy.

    python bench/search.py [--quick] [--sizes 1000000,10000000] [--bits 64,128]
        [--batches 1,32,1000] [--ks 20,100] [--data random,clustered] [--threads 2] [--json F]

All three run in the same process on the same codes and queries, with the same thread count
(``duch_core.search.set_num_threads`` and faiss's OpenMP both set to ``--threads``):

* **duch**: ``HammingIndex.search`` (numba kernel, all threads for every batch size);
* **duch+mih**: the same index with multi-index hashing enabled (``HammingIndex.enable_mih``;
  ``--no-mih`` leaves it out). It picks MIH or the scan by itself; ``by MIH`` says how many of
  the timed queries MIH finished, and ``mem`` includes its tables;
* **faiss**: ``faiss.IndexBinaryFlat.search``;
* **numpy**: ``HammingIndex.reference_search`` (byte popcount table + full lexsort). It is slow, so
  it runs on the first ``--numpy-queries`` queries of each batch and only for ``N <=
  --numpy-max-n``.

Data: ``random`` codes are uniform bits. ``clustered`` codes imitate a trained model: 1000 random
centres, each code a centre with every bit flipped with probability 1/8 (queries drawn the same
way), so distances are small and ties frequent.

Timing: batch 1 is the median latency over ``--single`` separate single-query calls; larger
batches are the best of ``--repeats`` calls (``--big-repeats`` when N * batch > 2e9).
``ms/query`` = time / batch, ``codes/s`` = codes compared per second per query stream
(N / time per query), ``mem`` = bytes the index holds (codes + ids for duch and numpy, codes for
faiss, which keeps no ids). ``x faiss`` is faiss's time / this time, where faiss's time is its
best: for batch 1 faiss also runs on one OpenMP thread (row ``faiss-1t``), because its
single-query search on two threads is far slower on a busy machine.

Parity: duch must equal numpy exactly (same tie-break); against faiss (whose tie order differs)
the distance lists must be equal, the ids below each query's k-th distance must be the same set,
and every faiss id at the k-th distance must really be at that distance.

The machine's load average is printed with every row, since other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python bench/search.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Row:
    data: str
    n: int
    bits: int
    batch: int
    k: int
    impl: str
    ms_per_query: float
    codes_per_s: float
    mem_mb: float
    vs_faiss: float
    parity: str
    load: float
    mih: str = ""  # duch+mih: queries MIH finished / queries (the rest were scanned)


def make_codes(kind: str, n: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, bits // 8)`` uint8 codes of the given kind (``random`` or ``clustered``)."""
    nb = bits // 8
    if kind == "random":
        return rng.integers(0, 256, (n, nb), dtype=np.uint8)
    if kind == "clustered":
        crng = np.random.default_rng(1234)  # same centres for database and queries
        centres = crng.integers(0, 256, (1000, nb), dtype=np.uint8)
        out = centres[rng.integers(0, len(centres), n)]
        # AND of three random bytes: every bit is 1 with probability 1/8
        noise = rng.integers(0, 256, (n, nb), dtype=np.uint8)
        noise &= rng.integers(0, 256, (n, nb), dtype=np.uint8)
        noise &= rng.integers(0, 256, (n, nb), dtype=np.uint8)
        out ^= noise
        return out
    raise ValueError(f"unknown data kind {kind!r}")


def check_faiss(
    d: np.ndarray, i: np.ndarray, fd: np.ndarray, fi: np.ndarray, codes: np.ndarray, q: np.ndarray
) -> str:
    """Tie-aware comparison of our (dist, ids) with faiss's; ``ok`` or what differs."""
    from duch_core.codes import hamming

    if not np.array_equal(d, fd.astype(np.int32)):
        return "DIST-MISMATCH"
    for r in range(d.shape[0]):
        kth = d[r, -1]
        if set(i[r][d[r] < kth].tolist()) != set(fi[r][fd[r] < kth].tolist()):
            return "ID-MISMATCH"
        tied = fi[r][fd[r] == kth]
        if len(tied) and not np.all(hamming(q[r : r + 1], codes[tied])[0] == kth):
            return "FAISS-TIE-WRONG"
    return "ok"


def _time_batch(fn: Any, q: np.ndarray, batch: int, repeats: int, single: int) -> tuple[float, Any]:
    """Seconds per query and the result on ``q[:batch]`` (batch 1: median over ``single``)."""
    if batch == 1:
        times = []
        res = None
        for j in range(single):
            t = time.perf_counter()
            r = fn(q[j : j + 1])
            times.append(time.perf_counter() - t)
            res = r if res is None else res
        return float(np.median(times)), res
    best = float("inf")
    res = None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn(q[:batch])
        best = min(best, time.perf_counter() - t)
    return best / batch, res


def run(args: argparse.Namespace) -> list[Row]:
    import faiss

    from duch_core import search

    faiss.omp_set_num_threads(args.threads)
    search.set_num_threads(args.threads)
    HammingIndex = search.HammingIndex
    rows: list[Row] = []
    for kind in args.data:
        for bits in args.bits:
            for n in args.sizes:
                rng = np.random.default_rng([n, bits, len(kind)])
                codes = make_codes(kind, n, bits, rng)
                queries = make_codes(kind, max(max(args.batches), args.single), bits, rng)
                t = time.perf_counter()
                ours = HammingIndex.from_arrays(codes, None, bits)
                ours.search(queries[:1], 1)  # compile / load the kernel before timing
                build = time.perf_counter() - t
                mih = None
                if args.mih:
                    t = time.perf_counter()
                    mih = HammingIndex.from_arrays(codes, None, bits)
                    mih.enable_mih()
                    mih.search(queries[:1], 1)  # builds the tables
                    print(f"# MIH tables built in {time.perf_counter() - t:.1f} s", flush=True)
                flat = faiss.IndexBinaryFlat(bits)
                flat.add(codes)
                print(
                    f"# {kind} N={n} bits={bits}: built (duch {build:.1f} s incl. kernel load)",
                    flush=True,
                )
                mem_ours = ours.nbytes / 2**20
                mem_faiss = n * bits / 8 / 2**20
                for batch in args.batches:
                    for k in args.ks:
                        first = len(rows)
                        reps = args.repeats if n * batch <= 2e9 else args.big_repeats

                        def timed(
                            ix: Any,
                            q: Any = queries,
                            batch: int = batch,
                            reps: int = reps,
                            k: int = k,
                        ) -> Any:
                            """Seconds per query and result of ``ix.search`` at this setting."""
                            return _time_batch(
                                lambda x: ix.search(x, k), q, batch, reps, args.single
                            )

                        t_o, (d, i) = timed(ours)
                        t_f, (fd, fi) = timed(flat)
                        qq = queries[: d.shape[0]]
                        par_f = check_faiss(d, i, fd, fi, codes, qq)
                        t_f1 = float("inf")
                        if batch == 1:  # faiss's single query is faster on one OpenMP thread
                            faiss.omp_set_num_threads(1)
                            t_f1, _ = timed(flat, reps=1)
                            faiss.omp_set_num_threads(args.threads)
                        t_best = min(t_f, t_f1)
                        load = os.getloadavg()[0]
                        ours_row = (kind, n, bits, batch, k, "duch", t_o * 1e3, n / t_o, mem_ours)
                        rows.append(Row(*ours_row, t_best / t_o, par_f, load))
                        if mih is not None:
                            before = dict(mih.mih_stats)
                            t_m, (md, mi) = timed(mih)
                            par_m = check_faiss(md, mi, fd, fi, codes, qq)
                            fin = mih.mih_stats["mih_finished"] - before["mih_finished"]
                            tot = mih.mih_stats["queries"] - before["queries"]
                            mem_m = (mih.nbytes + mih.mih_nbytes) / 2**20
                            rows.append(
                                Row(kind, n, bits, batch, k, "duch+mih", t_m * 1e3, n / t_m,
                                    mem_m, t_best / t_m, par_m, load, f"{fin}/{tot}")
                            )  # fmt: skip
                        for name, tf in (("faiss", t_f), ("faiss-1t", t_f1)):
                            if tf < float("inf"):
                                rows.append(
                                    Row(kind, n, bits, batch, k, name, tf * 1e3, n / tf,
                                        mem_faiss, t_best / tf, "-", load)
                                )  # fmt: skip
                        if n <= args.numpy_max_n:
                            m = min(args.numpy_queries, d.shape[0])
                            t = time.perf_counter()
                            rd, ri = ours.reference_search(qq[:m], k)
                            t_n = (time.perf_counter() - t) / m
                            ok = np.array_equal(rd, d[:m]) and np.array_equal(ri, i[:m])
                            rows.append(
                                Row(
                                    kind,
                                    n,
                                    bits,
                                    batch,
                                    k,
                                    "numpy",
                                    t_n * 1e3,
                                    n / t_n,
                                    mem_ours,
                                    t_best / t_n,
                                    "ok" if ok else "MISMATCH",
                                    load,
                                )
                            )
                        for r in rows[first:]:
                            print(fmt_row(r), flush=True)
                del ours, flat, codes, mih
    return rows


HEADER = (
    f"{'data':<9} {'N':>9} {'bits':>4} {'batch':>5} {'k':>4} {'impl':<8} {'ms/query':>9} "
    f"{'codes/s':>9} {'mem MB':>7} {'x faiss':>7} {'parity':<8} {'load':>5} {'by MIH':>9}"
)


def fmt_row(r: Row) -> str:
    return (
        f"{r.data:<9} {r.n:>9} {r.bits:>4} {r.batch:>5} {r.k:>4} {r.impl:<8} "
        f"{r.ms_per_query:>9.3f} {r.codes_per_s:>9.2e} {r.mem_mb:>7.1f} {r.vs_faiss:>7.2f} "
        f"{r.parity:<8} {r.load:>5.1f} {r.mih:>9}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/search.py", description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="N=1M, 64 bits, random only")
    p.add_argument("--sizes", type=ints, default=[1_000_000, 10_000_000])
    p.add_argument("--bits", type=ints, default=[64, 128])
    p.add_argument("--batches", type=ints, default=[1, 32, 1000])
    p.add_argument("--ks", type=ints, default=[20, 100])
    p.add_argument("--data", type=strs, default=["random", "clustered"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per batch > 1 (best)")
    p.add_argument(
        "--big-repeats", type=int, default=1, help="timed calls when N * batch > 2e9 (best)"
    )
    p.add_argument("--single", type=int, default=15, help="single-query calls for batch 1")
    p.add_argument("--numpy-queries", type=int, default=3)
    p.add_argument("--numpy-max-n", type=int, default=1_000_000)
    p.add_argument(
        "--mih",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time an index with multi-index hashing enabled (row duch+mih)",
    )
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.bits, args.data = [1_000_000], [64], ["random"]
    print(f"load average at start: {os.getloadavg()}, cores: {os.cpu_count()}", flush=True)
    print(HEADER, flush=True)
    t = time.perf_counter()
    rows = run(args)
    print(f"\n{HEADER}")
    for r in rows:
        print(fmt_row(r))
    bad = [r for r in rows if r.parity not in ("ok", "-")]
    print(f"\n{len(rows)} rows in {time.perf_counter() - t:.0f} s; parity failures: {len(bad)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
