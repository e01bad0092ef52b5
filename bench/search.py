"""Exact Hamming top-k: ``duch_core.search.HammingIndex`` vs faiss ``IndexBinaryFlat`` vs numpy,
unfiltered, and filtered by item metadata (``--filtered``) vs faiss and Milvus Lite.

    python bench/search.py [--quick] [--sizes 1000000,10000000] [--bits 64,128]
        [--batches 1,32,1000] [--ks 20,100] [--data random,clustered] [--threads 2] [--json F]
    python bench/search.py --filtered [--filter-sizes 10000000] [--milvus-size 1000000]
        [--filter-bits 64] [--filter-k 20] [--filter-batches 1,32]

All engines run on the same codes and queries, with the same thread count
(``duch_core.hamming_topk.set_num_threads`` and faiss's OpenMP both set to ``--threads``):

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
batches are the best of ``--repeats`` calls (``--big-repeats`` when N * batch > 2e9). The
filtered table takes the best of interleaved calls instead (batch 1: ``--single`` rounds of one
query, each engine in turn; larger batches: ``--repeats`` rounds), so every engine meets the
same load.
``ms/query`` = time / batch, ``codes/s`` = codes compared per second per query stream
(N / time per query), ``mem`` = bytes the index holds (codes only for duch, whose ids are row
positions, and for faiss). ``x faiss`` is faiss's time / this time, where faiss's time is its
best: for batch 1 faiss also runs on one OpenMP thread (row ``faiss-1t``), because its
single-query search on two threads is far slower on a busy machine.

Memory table: ``B/code`` is what the engine reports holding per code; ``RSS MB`` the growth of
this process's resident set while the index was built (for Milvus Lite, the resident set of its
server process, scalar fields included), ``x codes`` that growth over ``N * bits / 8``.

Filtered (``--filtered``): a synthetic archive (:func:`make_metadata`) in three layouts
(``--filter-layouts``): ``scenes``, the row order the tiling and encode jobs produce (each scene's
chips consecutive rows, the scenes in order of acquisition time; labels and splits drawn per
chip); ``uniform``, every row with its own random place and time (the worst case: the row order
says nothing); and ``chips``, a labelled chip archive in the index's item-id order, where ids
begin with the class name (RSITMD, RSICD), so each label's chips are one run of rows. Four
filters of :data:`FILTERS` keep about 0.1 % (bbox), 1 % (datetime), 10 % (label) and 50 %
(split) of the items; ``duch_core.filters.build_candidates`` turns each into candidates
(positions, a row range, or a row filter tested in the scan over the zones that may pass; the
form and its build time are the ``note`` of the ``duch`` row, and the build is in the
``duch+filter`` row's time). Engines:

* **duch-scan**: the unfiltered ``HammingIndex.search``, the reference for ``x scan``;
* **duch**: ``HammingIndex.search(..., candidates=...)``, the candidates built beforehand;
* **duch+filter**: the same with the candidates built from the filter in every call (what a
  request to the service costs the searcher);
* **read-only**: numpy ``take`` of the passing rows' codes and nothing else, once per batch:
  the floor of any engine that ranks the candidates by reading their codes;
* **faiss**: ``IndexBinaryFlat`` takes no id selector, so k is doubled until every query has k
  results that pass the filter (``note``: the last k);
* **milvus-lite**: a local Milvus Lite collection (``BIN_FLAT``, ``HAMMING``) with the metadata
  as scalar fields and the filter as a scalar expression, at ``--milvus-size`` (inserting is too
  slow here for more; needs the ``bench`` extra); duch and faiss are measured at that size too.

Parity (filtered): duch must equal the numpy reference over the passing rows exactly (first two
queries); the peers must give the same distances, the same ids below the k-th distance after
sorting by (distance, id), and ids at the k-th distance that pass and are at that distance.
Unfiltered: duch must equal numpy exactly (same tie-break); against faiss (whose tie order
differs) the distance lists must be equal, the ids below each query's k-th distance must be the
same set, and every faiss id at the k-th distance must really be at that distance.

The machine's load average is printed with every row, since other processes share the cores.

Measured with ``--filtered --single 11 --filter-sizes 10000000 --filter-layouts
chips,scenes,uniform --milvus-size 0`` on a quiet 2-core AMD EPYC with AVX-512 (``VPOPCNTDQ``;
load 0.2-1.3 with the benchmark running), k = 20, ``x scan`` = our unfiltered scan's time / this
time (``+f`` = the duch+filter row, ``read`` = the read-only row):

    layout   N    filter (kept)    batch 1: duch / +f / read / faiss      batch 32: duch / +f / faiss
    chips    10M  bbox (0.094 %)   10.6x / 1.77x / 24.7x / 0.01x          46.9x / 13.5x / 0.01x
    chips    10M  date (1 %)       3.02x / 1.33x / 2.89x / 0.02x          21.0x / 12.8x / 0.02x
    chips    10M  label (10 %)     5.59x / 5.07x / 3.40x / 0.04x          4.63x / 4.41x / 0.03x
    chips    10M  split (50 %)     1.09x / 1.07x / 0.28x / 0.07x          0.98x / 0.97x / 0.04x
    scenes   10M  bbox (0.049 %)   15.4x / 2.95x / 150x / 0.01x           66.6x / 27.8x / 0.01x
    scenes   10M  date (1 %)       19.1x / 19.1x / 26.4x / 0.02x          29.1x / 33.8x / 0.01x
    scenes   10M  label (10 %)     1.06x / 1.08x / 0.54x / 0.03x          2.46x / 2.07x / 0.02x
    scenes   10M  split (50 %)     1.22x / 1.24x / 0.29x / 0.08x          1.02x / 1.08x / 0.05x
    uniform  10M  bbox (0.094 %)   10.6x / 1.67x / 18.5x / 0.01x          51.3x / 13.9x / 0.01x
    uniform  10M  date (1 %)       2.89x / 1.29x / 2.38x / 0.02x          17.0x / 9.59x / 0.01x
    uniform  10M  label (10 %)     1.06x / 1.05x / 0.49x / 0.03x          2.38x / 2.40x / 0.03x
    uniform  10M  split (50 %)     1.18x / 1.23x / 0.26x / 0.07x          0.98x / 0.98x / 0.04x

Parity held in every row. At 10M a single query of the unfiltered scan takes 2.5-3.3 ms on this
machine (5.9-8.0 ms on a 2-core EPYC without AVX-512). Between identical runs a cell moves by up
to about 15 %: in three runs the single-query label rows of ``scenes`` and ``uniform``, where
every row is scanned, measured 0.97-1.08x (duch) and 0.89-1.08x (+f), and the batch-32 split
rows 0.85-1.05x.
``duch_core.filters.build_candidates`` gives one of three forms (the ``note`` of the ``duch``
row): positions where an index (the grid, the time order) or the exact count of the row
classes says few rows pass; a row range where the index is in time order and the filter is a
datetime range (the ``scenes`` date row: 100k rows found by binary search in microseconds and
scanned in place, on one thread, since waking a second would cost three times the scan: 19x of
the scan, against 7.6-10.8x when the range was split across two threads); and otherwise a
row filter whose tests the kernel applies inside the scan, only to rows close enough to enter
the top-k (the threshold is the exact k-th distance among the rows that passed so far), and
only in the zones of 256 rows whose summaries
(``duch_core.zone_maps``) say a row may pass. In the ``chips`` layout the label filter leaves
10 % of the zones, and the search is 5.2-5.6x faster than the scan, filter included. Where a
label is drawn per row (``scenes``, ``uniform``) every zone holds every label and all rows are
scanned. There the label and split tests come as a bitmap of the passing rows
(``duch_core.row_bits``; one per value of a column, 1/8 byte per row each, and those built for
a filter of several values kept for the next search), read with the codes of each piece of 256
rows that comes close enough, so a row of another class is never looked up alone: about 1.0x
of the scan for a single query, where testing each close row's class in the 10M-row column
(about ten cache misses per row that enters the top-k, since among a tenth of the rows the
threshold settles as if k were ten times larger) measured 0.84-0.94x. A batch of 32 turns the
filter into positions first, taken from the rows grouped by class (no pass over the rows), and
gathers them: 2.1-2.5x. Rows of a 1 % time range spread at random (``chips``, ``uniform``) come
from the time order and are put in row order through a bitset (1.0 ms for 100k rows): 1.1-1.4x
of the scan for a single query, filter included, where merely reading those rows' codes
(``read``) is 2.4-2.9x; the 10x of the ``scenes`` layout needs the rows together, as the jobs
write them. Memory at 10M: 8.00 bytes per code for duch and faiss, resident growth 76.3 MB each
(1.00x the codes); the metadata with its indexes, zone maps, class row lists and value bitmaps
takes 57-69 bytes per row.
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


def run(args: argparse.Namespace) -> tuple[list[Row], list[MemRow]]:
    import faiss

    from duch_core import hamming_topk, search

    faiss.omp_set_num_threads(args.threads)
    hamming_topk.set_num_threads(args.threads)
    HammingIndex = search.HammingIndex
    rows: list[Row] = []
    mem: list[MemRow] = []
    for kind in args.data:
        for bits in args.bits:
            for n in args.sizes:
                rng = np.random.default_rng([n, bits, len(kind)])
                codes = make_codes(kind, n, bits, rng)
                queries = make_codes(kind, max(max(args.batches), args.single), bits, rng)
                search.warmup(bits)  # numba and the kernels load outside the measured growth
                t = time.perf_counter()
                r0 = rss_bytes()
                ours = HammingIndex.from_arrays(codes, None, bits)
                ours.search(queries[:1], 1)  # compile / load the kernel before timing
                build = time.perf_counter() - t
                mem.append(MemRow(n, bits, "duch", ours.nbytes / n, (rss_bytes() - r0) / 2**20,
                                  "ids are positions"))  # fmt: skip
                mih = None
                if args.mih:
                    t = time.perf_counter()
                    mih = HammingIndex.from_arrays(codes, None, bits)
                    mih.enable_mih()
                    mih.search(queries[:1], 1)  # builds the tables
                    print(f"# MIH tables built in {time.perf_counter() - t:.1f} s", flush=True)
                    mem.append(MemRow(n, bits, "duch+mih", (mih.nbytes + mih.mih_nbytes) / n, -1,
                                      "codes + MIH tables"))  # fmt: skip
                r0 = rss_bytes()
                flat = faiss.IndexBinaryFlat(bits)
                flat.add(codes)
                mem.append(MemRow(n, bits, "faiss", flat.code_size, (rss_bytes() - r0) / 2**20))
                for r in mem[-3:]:
                    print("# memory: " + fmt_mem(r), flush=True)
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
    return rows, mem


# --------------------------------------------------------------------------------------------
# memory


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux ``/proc``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident set size of the processes started by ``pid`` (not ``pid`` itself)."""
    total, todo = 0, _children(pid)
    while todo:
        c = todo.pop()
        try:
            total += rss_bytes(c)
            todo += _children(c)
        except OSError:
            pass
    return total


@dataclass
class MemRow:
    n: int
    bits: int
    engine: str
    bytes_per_code: float  # what the engine reports holding, per code
    resident_mb: float  # growth of the resident set while it was built (-1: not measured)
    note: str = ""


def fmt_mem(r: MemRow) -> str:
    per = f"{r.bytes_per_code:>8.2f}" if r.bytes_per_code >= 0 else f"{'-':>8}"
    res, ratio = f"{'-':>9}", f"{'-':>8}"
    if r.resident_mb >= 0:
        res = f"{r.resident_mb:>9.1f}"
        ratio = f"{r.resident_mb * 2**20 / (r.n * r.bits / 8):>8.2f}"
    return f"{r.n:>9} {r.bits:>4} {r.engine:<12} {per} {res} {ratio}  {r.note}"


# RSS MB: growth of the resident set while the engine was built; x codes: that over the code
# bytes (N * bits / 8)
MEM_HEADER = f"{'N':>9} {'bits':>4} {'engine':<12} {'B/code':>8} {'RSS MB':>9} {'x codes':>8}  note"


# --------------------------------------------------------------------------------------------
# filtered search


# (name, spec): kinds of filter a user sends, sized to keep about 0.1 %, 1 %, 10 % and 50 %
# of the synthetic archive of make_metadata
FILTERS: list[tuple[str, dict[str, Any]]] = [
    ("bbox 0.1%", {"bbox": [0.0, 0.0, 10.8, 5.4]}),
    ("date 1%", {"datetime": "2020-01-01/2020-02-06"}),
    ("label 10%", {"label": ["l00", "l01"]}),
    ("split 50%", {"split": "train"}),
]


# chips per side of a scene in the ``scenes`` layout: a Sentinel-2 tile (10,980 px at 10 m) cut
# into 256 px chips gives 43 x 43 = 1,849 chips
SCENE_SIDE = 43
LAYOUTS = ("scenes", "uniform", "chips")


def make_metadata(n: int, rng: np.random.Generator, layout: str = "uniform") -> dict[str, Any]:
    """Columns of a synthetic archive, acquisition times uniform over 2015-2024, 20 equally
    frequent labels and a 50/25/25 train/val/test split drawn per item.

    ``uniform``: every item a 0.1-degree tile uniform in lon/lat (none across the antimeridian)
    with its own time; the row order says nothing about place or time (the worst case for a
    filter). ``scenes``: what ``jobs/tile_scenes.py`` and ``jobs/encode.py`` index: scenes of
    ``SCENE_SIDE`` x ``SCENE_SIDE`` chips, each scene a 1-degree square uniform in lon/lat with
    one acquisition time. The encode job orders the index by acquisition time, then item id
    (``duch_core.shard_writer.IndexOrder``; exact within a shard, and across shards for a
    manifest in time order, which the tiling job writes), so each scene's chips are one run
    and the scenes follow each other in time. ``chips``: a labelled chip archive without
    acquisition times in the index order (item id): ids begin with the class name (UCM,
    RSITMD), so each label's chips are one run of rows; place, time and split as ``uniform``.
    """
    t0 = np.datetime64("2015-01-01", "us")
    span = int((np.datetime64("2025-01-01", "us") - t0).astype(np.int64))
    labels = np.array([f"l{i:02d}" for i in range(20)], dtype=object)
    splits = np.array(["train", "train", "val", "test"], dtype=object)
    if layout in ("uniform", "chips"):
        lon = rng.uniform(-180, 179.9, n)
        lat = rng.uniform(-90, 89.9, n)
        size = np.full(n, 0.1)
        when = t0 + rng.integers(0, span, n).astype("timedelta64[us]")
    elif layout == "scenes":
        per = SCENE_SIDE * SCENE_SIDE
        ns = -(-n // per)
        acquired = t0 + rng.integers(0, span, ns).astype("timedelta64[us]")
        chip = np.arange(n)
        scene = np.argsort(acquired, kind="stable")[chip // per]  # scenes in time order
        row, col = np.divmod(chip % per, SCENE_SIDE)
        size = np.full(n, 1.0 / SCENE_SIDE)
        lon = rng.uniform(-180, 179, ns)[scene] + col * size
        lat = rng.uniform(-90, 89, ns)[scene] + (SCENE_SIDE - 1 - row) * size
        when = acquired[scene]
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    label = labels[rng.integers(0, 20, n)]
    if layout == "chips":
        label = labels[np.arange(n) * 20 // n]  # in id order: the classes one after another
    return {
        "min_lon": lon,
        "min_lat": lat,
        "max_lon": lon + size,
        "max_lat": lat + size,
        "datetime": when,
        "label": label,
        "split": splits[rng.integers(0, 4, n)],
    }


def filters_for(layout: str, cols: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """:data:`FILTERS` for an archive of ``layout``. In ``scenes`` the box is centred on the
    first scene: it keeps about as many chips on average anywhere, but the scenes are few
    (5,400 at 10M chips), so a box placed at random often keeps none at all."""
    if layout != "scenes":
        return FILTERS
    w, s, e, n = FILTERS[0][1]["bbox"]
    clon = min(max(float(cols["min_lon"][0]) + 0.5, -174.0), 173.0)
    clat = min(max(float(cols["min_lat"][0]) + 0.5, -87.0), 86.0)
    box = [clon - (e - w) / 2, clat - (n - s) / 2, clon + (e - w) / 2, clat + (n - s) / 2]
    return [(FILTERS[0][0], {"bbox": [round(v, 6) for v in box]}), *FILTERS[1:]]


def milvus_expr(spec: dict[str, Any]) -> str:
    """The filter of FILTERS as a Milvus scalar expression (boxes do not cross 180 here)."""
    from duch_core.filters import parse_datetime_range

    parts = []
    for key, v in spec.items():
        if key == "bbox":
            w, s, e, n = v
            parts.append(f"min_lat <= {n} and max_lat >= {s} and min_lon <= {e} and max_lon >= {w}")
        elif key == "datetime":
            lo, hi = parse_datetime_range(v)
            parts += ([f"t >= {lo}"] if lo is not None else []) + (
                [f"t <= {hi}"] if hi is not None else []
            )
        else:
            vals = [v] if isinstance(v, str) else v
            parts.append(f"{key} in {json.dumps(vals)}")
    return " and ".join(parts)


def faiss_filtered(
    flat: Any, q: np.ndarray, k: int, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss ``IndexBinaryFlat`` has no id selector: search with k doubled until every query
    has ``k`` results that pass ``mask`` (or k covers the index). ``(dist, ids, last k)``."""
    n = flat.ntotal
    kk = min(k, n)
    want = min(k, int(np.count_nonzero(mask)))
    while True:
        d, i = flat.search(q, kk)
        ok = mask[i]
        if kk >= n or bool(np.all(ok.sum(axis=1) >= want)):
            break
        kk = min(2 * kk, n)
    dist = np.zeros((len(q), want), np.int32)
    ids = np.zeros((len(q), want), np.int64)
    for r in range(len(q)):
        sel = np.flatnonzero(ok[r])[:want]
        dist[r], ids[r] = d[r, sel], i[r, sel]
    return dist, ids, kk


def check_tie_aware(
    d: np.ndarray, i: np.ndarray, pd: np.ndarray, pi: np.ndarray, codes: np.ndarray,
    q: np.ndarray, mask: np.ndarray,
) -> str:  # fmt: skip
    """A peer's filtered (dist, ids) against ours: distances equal; ids sorted by (distance, id)
    equal below the k-th distance; the peer's ids at the k-th distance pass and are at it."""
    from duch_core.codes import hamming

    if d.shape != pd.shape or not np.array_equal(d, pd.astype(np.int32)):
        return "DIST-MISMATCH"
    for r in range(d.shape[0]):
        if d.shape[1] == 0:
            continue
        kth = d[r, -1]
        order = np.lexsort((pi[r], pd[r]))
        below = pd[r][order] < kth
        if not np.array_equal(i[r][d[r] < kth], pi[r][order][below]):
            return "ID-MISMATCH"
        tied = pi[r][pd[r] == kth]
        if not (np.all(mask[tied]) and np.all(hamming(q[r : r + 1], codes[tied])[0] == kth)):
            return "TIE-WRONG"
    return "ok"


@dataclass
class FRow:
    layout: str
    n: int
    bits: int
    filter: str
    kept: float  # fraction of rows that pass
    batch: int
    k: int
    engine: str
    ms_per_query: float
    vs_scan: float  # our unfiltered scan's time / this time
    parity: str
    load: float
    note: str = ""


FHEADER = (
    f"{'layout':<7} {'N':>9} {'bits':>4} {'filter':<10} {'kept %':>7} {'batch':>5} {'k':>3} {'engine':<12} "
    f"{'ms/query':>9} {'x scan':>7} {'parity':<8} {'load':>5}  note"
)


def fmt_frow(r: FRow) -> str:
    return (
        f"{r.layout:<7} {r.n:>9} {r.bits:>4} {r.filter:<10} {100 * r.kept:>7.3f} {r.batch:>5} {r.k:>3} "
        f"{r.engine:<12} {r.ms_per_query:>9.3f} {r.vs_scan:>7.2f} {r.parity:<8} {r.load:>5.1f}  "
        f"{r.note}"
    )


class MilvusPeer:
    """A Milvus Lite collection (BIN_FLAT, HAMMING) of the same codes and metadata."""

    def __init__(self, path: str, codes: np.ndarray, cols: dict[str, Any], bits: int) -> None:
        from pymilvus import DataType, MilvusClient

        self.client = MilvusClient(path)
        c = self.client
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.BINARY_VECTOR, dim=bits)
        for f in ("min_lon", "min_lat", "max_lon", "max_lat"):
            schema.add_field(f, DataType.DOUBLE)
        schema.add_field("t", DataType.INT64)
        schema.add_field("label", DataType.VARCHAR, max_length=16)
        schema.add_field("split", DataType.VARCHAR, max_length=16)
        ip = c.prepare_index_params()
        ip.add_index(field_name="v", index_type="BIN_FLAT", metric_type="HAMMING")
        if c.has_collection("codes"):
            c.drop_collection("codes")
        c.create_collection("codes", schema=schema, index_params=ip)
        t_us = cols["datetime"].astype("datetime64[us]").astype(np.int64)
        step = 20_000
        for s in range(0, len(codes), step):
            e = min(len(codes), s + step)
            c.insert(
                "codes",
                [
                    {"id": j, "v": codes[j].tobytes(), "min_lon": float(cols["min_lon"][j]),
                     "min_lat": float(cols["min_lat"][j]), "max_lon": float(cols["max_lon"][j]),
                     "max_lat": float(cols["max_lat"][j]), "t": int(t_us[j]),
                     "label": cols["label"][j], "split": cols["split"][j]}
                    for j in range(s, e)
                ],
            )  # fmt: skip
        c.flush("codes")
        c.load_collection("codes")

    def search(self, q: np.ndarray, k: int, expr: str) -> tuple[np.ndarray, np.ndarray]:
        res = self.client.search(
            "codes", data=[r.tobytes() for r in q], limit=k, filter=expr, anns_field="v",
            search_params={"metric_type": "HAMMING"}, output_fields=["id"],
        )  # fmt: skip
        w = min(len(h) for h in res)
        d = np.array([[int(x["distance"]) for x in h[:w]] for h in res], np.int32).reshape(-1, w)
        i = np.array([[int(x["id"]) for x in h[:w]] for h in res], np.int64).reshape(-1, w)
        return d, i

    def close(self) -> None:
        self.client.close()


def run_filtered(
    args: argparse.Namespace, n: int, milvus: bool, layout: str
) -> tuple[list[FRow], list[MemRow]]:
    """Filtered search rows at ``n`` codes of ``args.filter_bits`` bits, metadata of ``layout``
    (see :func:`make_metadata` and the docstring)."""
    import faiss

    from duch_core import hamming_topk, search
    from duch_core.filters import build_candidates, filter_mask
    from duch_core.item_metadata import ItemMetadata

    faiss.omp_set_num_threads(args.threads)
    hamming_topk.set_num_threads(args.threads)
    bits, k = args.filter_bits, args.filter_k
    rng = np.random.default_rng([n, bits, 7])
    codes = make_codes("random", n, bits, rng)
    queries = make_codes("random", max(max(args.filter_batches), args.single), bits, rng)
    t = time.perf_counter()
    cols = make_metadata(n, rng, layout)
    meta = ItemMetadata.from_columns(**cols)
    print(
        f"# N={n}, layout {layout}: metadata built in {time.perf_counter() - t:.1f} s", flush=True
    )
    meta_bytes = sum(a.nbytes for a in _arrays(meta))
    print(f"# metadata: {meta_bytes / n:.1f} bytes per row with its indexes", flush=True)
    mem: list[MemRow] = []
    search.warmup(bits)  # numba and the kernels load outside the measured growth
    r0 = rss_bytes()
    ours = search.HammingIndex.from_arrays(codes, None, bits)
    words = codes.view(np.uint64) if bits % 64 == 0 else codes  # (N, bits // 64) words
    ours.search(queries[:1], 1)
    mem.append(MemRow(n, bits, "duch", ours.nbytes / n, (rss_bytes() - r0) / 2**20,
                      "ids are positions"))  # fmt: skip
    r0 = rss_bytes()
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    mem.append(MemRow(n, bits, "faiss", flat.code_size, (rss_bytes() - r0) / 2**20))
    peer = None
    if milvus:
        try:
            import tempfile

            tmp = tempfile.mkdtemp(prefix="milvus-bench-")
            t = time.perf_counter()
            before = tree_rss_bytes(os.getpid())
            peer = MilvusPeer(os.path.join(tmp, "bench.db"), codes, cols, bits)
            used = (tree_rss_bytes(os.getpid()) - before) / 2**20
            mem.append(MemRow(n, bits, "milvus-lite", -1, used,
                              "server process, with scalar fields; B/code not reported"))  # fmt: skip
            print(f"# milvus-lite: collection built in {time.perf_counter() - t:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report why the peer is missing, go on
            print(f"# milvus-lite unavailable: {type(e).__name__}: {e}", flush=True)
            peer = None
    rows: list[FRow] = []
    for name, spec in filters_for(layout, cols):
        t_build = min(_timed_once(lambda spec=spec: build_candidates(meta, spec)) for _ in range(3))
        cand = build_candidates(meta, spec)
        mask = filter_mask(meta, spec)
        kept = np.count_nonzero(mask) / n
        form = _form(cand)
        expr = milvus_expr(spec)
        for batch in args.filter_batches:
            last_k = [0]

            def fa(
                x: np.ndarray, mask: np.ndarray = mask, last_k: list[int] = last_k
            ) -> tuple[np.ndarray, np.ndarray]:
                fd, fi, last_k[0] = faiss_filtered(flat, x, k, mask)
                return fd, fi

            engines: dict[str, Any] = {
                "duch-scan": lambda x: ours.search(x, k),
                "duch": lambda x, c=cand: ours.search(x, k, candidates=c),
                # what a request costs: the candidates built from the filter, then the search
                "duch+filter": lambda x, s=spec: ours.search(
                    x, k, candidates=build_candidates(meta, s)
                ),
                "faiss": fa,
                # the floor of any engine that ranks the candidates: only read their codes
                "read-only": lambda x, w=words, pos=np.flatnonzero(mask): w.take(pos, axis=0),
            }
            if peer is not None:
                engines["milvus-lite"] = lambda x, e=expr: peer.search(x, k, e)
            rounds = args.single if batch == 1 else args.repeats
            times, res = _best_interleaved(engines, queries, batch, rounds)
            d, i = res["duch"]
            qq = queries[: d.shape[0]]
            m = min(2, d.shape[0])
            rd, ri = ours.reference_search(qq[:m], k, candidates=mask)
            par = "ok" if np.array_equal(rd, d[:m]) and np.array_equal(ri, i[:m]) else "MISMATCH"
            d2, i2 = res["duch+filter"]
            if not (np.array_equal(rd, d2[:m]) and np.array_equal(ri, i2[:m])):
                par = "MISMATCH"
            load = os.getloadavg()[0]
            base = (layout, n, bits, name, kept, batch, k)
            t_scan = times["duch-scan"]
            notes = {
                "duch-scan": "unfiltered",
                "duch": f"{form}; filter built in {t_build * 1e3:.1f} ms",
                "duch+filter": "the candidates built per call, then the search",
                "faiss": f"k doubled to {last_k[0]}",
                "read-only": "numpy take of the passing rows' codes, no ranking (once per batch)",
                "milvus-lite": "BIN_FLAT HAMMING + scalar expression",
            }
            for eng, t_e in times.items():
                parity = "-" if eng in ("duch-scan", "read-only") else par
                if eng not in ("duch-scan", "duch", "duch+filter", "read-only"):
                    parity = check_tie_aware(d, i, *res[eng], codes, qq, mask)
                rows.append(FRow(*base, eng, t_e * 1e3, t_scan / t_e, parity, load, notes[eng]))
                print(fmt_frow(rows[-1]), flush=True)
    if peer is not None:
        peer.close()
    return rows, mem


def _best_interleaved(
    engines: dict[str, Any], queries: np.ndarray, batch: int, rounds: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Best seconds per query of each engine over ``rounds`` rounds, every round calling each
    engine once in turn (batch 1: round ``j`` asks query ``j``; else the first ``batch``
    queries), so that the engines share whatever load the machine has; and each engine's
    result for the first round's queries."""
    best = dict.fromkeys(engines, float("inf"))
    res: dict[str, Any] = {}
    for j in range(rounds):
        q = queries[j : j + 1] if batch == 1 else queries[:batch]
        for name, fn in engines.items():
            t = time.perf_counter()
            r = fn(q)
            best[name] = min(best[name], (time.perf_counter() - t) / batch)
            res.setdefault(name, r)
    return best, res


def _arrays(x: Any) -> list[np.ndarray]:
    """Every numpy array reachable from ``x`` (dataclass fields, tuples, dicts)."""
    if isinstance(x, np.ndarray):
        return [x]
    if isinstance(x, tuple | list):
        return [a for v in x for a in _arrays(v)]
    if isinstance(x, dict):
        return [a for v in x.values() for a in _arrays(v)]
    if hasattr(x, "__dataclass_fields__"):
        return [a for f in x.__dataclass_fields__ for a in _arrays(getattr(x, f))]
    return []


def _form(cand: Any) -> str:
    """What ``build_candidates`` gave, in words."""
    from duch_core.row_filter import RowFilter

    if isinstance(cand, RowFilter):
        span = f"rows {cand.lo}:{cand.hi}"
        if cand.zones is not None:
            span += f", {100 * cand.zone_fraction:.1f} % of them in zones that may pass"
        return f"{span}, tests in the scan" if cand.tested else span
    return "unfiltered" if cand is None else f"{len(cand)} positions"


def _timed_once(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
    p.add_argument(
        "--filtered", action="store_true", help="only the filtered-search table (see --filter-*)"
    )
    p.add_argument("--filter-sizes", type=ints, default=[10_000_000])
    p.add_argument(
        "--milvus-size",
        type=int,
        default=1_000_000,
        help="also compare with Milvus Lite at this size (0: never)",
    )
    p.add_argument(
        "--filter-layouts",
        type=strs,
        default=list(LAYOUTS),
        help=f"archive layouts of the filtered table, of {','.join(LAYOUTS)}",
    )
    p.add_argument("--filter-bits", type=int, default=64)
    p.add_argument("--filter-k", type=int, default=20)
    p.add_argument("--filter-batches", type=ints, default=[1, 32])
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    # faiss's OpenMP threads would otherwise spin after each search, on the cores the next
    # engine's call needs (read when faiss is first imported, below)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.quick:
        args.sizes, args.bits, args.data = [1_000_000], [64], ["random"]
    print(f"load average at start: {os.getloadavg()}, cores: {os.cpu_count()}", flush=True)
    t = time.perf_counter()
    rows: list[Any] = []
    mem: list[MemRow] = []
    if args.filtered:
        print(FHEADER, flush=True)
        sizes = list(args.filter_sizes)
        if args.milvus_size and args.milvus_size not in sizes:
            sizes.append(args.milvus_size)
        for layout in args.filter_layouts:
            for n in sizes:
                r, m = run_filtered(args, n, milvus=n == args.milvus_size, layout=layout)
                rows += r
                mem += m
        print(f"\n{FHEADER}")
        for r in rows:
            print(fmt_frow(r))
    else:
        print(HEADER, flush=True)
        rows, mem = run(args)
        print(f"\n{HEADER}")
        for r in rows:
            print(fmt_row(r))
    print(f"\n{MEM_HEADER}")
    for r in mem:
        print(fmt_mem(r))
    bad = [r for r in rows if r.parity not in ("ok", "-")]
    print(f"\n{len(rows)} rows in {time.perf_counter() - t:.0f} s; parity failures: {len(bad)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows + mem], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
