"""Shard searcher deployment: exact Hamming top-k over a subset of an index version's shards.

Searcher ``g`` of ``n`` holds group ``g`` of the manifest's shards, split so every searcher
holds about the same number of rows (:func:`deploy.artifacts.assign_shards`), for both
modalities. It keeps up to ``keep_versions`` index versions in memory, dropping the least
recently searched first, so requests tagged with the previous version finish on it while the
ingress switches to a new one.

A version is never loaded on the request path. Every replica of a searcher deployment loads the
version ``LATEST`` names in its constructor (Serve sends it no request before), then follows
``LATEST`` in the background, refusing versions that do not fit the model (bits, bundle id) or
fail to load, as the ingress does. A search for a version the replica does not hold is answered
``None`` at once (the ingress then asks another version or replica); when it comes with the
manifest, the replica also starts loading that version in the background. ``check_health``
fails while the replica holds no version although one is published, so Serve sends it no
traffic.
"""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray import serve

from deploy.artifacts import MODALITIES, Loaders, TopK, assigned_shards
from duch_core.filters import FilterError, build_candidates
from duch_core.index_store import IndexManifest
from duch_core.item_metadata import METADATA_COLUMNS, ItemMetadata, metadata_from_table
from duch_core.search import HammingIndex, warmup

log = logging.getLogger("ray.serve")

# A search over at most this many codes (about 1.5 ms for one 64-bit query on one core) runs on
# the event loop; larger ones in a worker thread, so the loop keeps serving meanwhile.
INLINE_SEARCH_MAX_ROWS = 4_000_000


@dataclass(frozen=True)
class ShardData:
    """One modality's codes of the shards a searcher holds, for one index version.

    ``index`` holds the codes under their global row ids. ``order``/``sorted_rows`` map a row id
    back to its local position, where ``item_ids`` and ``caption_index`` are looked up.
    """

    index: HammingIndex
    item_ids: np.ndarray  # (N,) object (str)
    caption_index: np.ndarray  # (N,) int32, -1 for image rows
    order: np.ndarray  # (N,) int64 argsort of the row ids
    sorted_rows: np.ndarray  # (N,) int64 row ids, ascending
    # each index position's item metadata (positions are ranks in row-id order), for filters
    meta: ItemMetadata | None = None

    def rows_to_local(self, rows: np.ndarray) -> np.ndarray:
        return self.order[np.searchsorted(self.sorted_rows, rows)]

    def code_of(self, item_id: str) -> np.ndarray | None:
        """The stored code ``(bits // 8,)`` uint8 of an item's first row here, or ``None``."""
        local = np.flatnonzero(self.item_ids == item_id)
        if not local.size:
            return None
        position = np.flatnonzero(self.order == local[0])  # ranks in row-id order
        return self.index.codes_at(position)[0]


@dataclass(frozen=True)
class ShardResult:
    """Top-k of one searcher for ``Q`` queries.

    ``dist`` ``(Q, k')`` int32 and ``ids`` ``(Q, k')`` int64 (global row ids), sorted by
    (distance, id); ``item_ids``/``caption_index`` map each returned row id to its item. An
    asymmetric search also gives ``score`` ``(Q, k')`` float32 and is sorted by (score
    descending, id) instead.
    """

    version: str
    dist: np.ndarray
    ids: np.ndarray
    item_ids: dict[int, str]
    caption_index: dict[int, int]
    score: np.ndarray | None = None


def build_shard_data(
    codes: np.ndarray,
    item_ids: Any,
    caption_index: np.ndarray,
    row_ids: np.ndarray,
    bits: int,
    new_index: Callable[[int], HammingIndex],
    mih: bool = False,
    catalog: pa.Table | None = None,
) -> ShardData:
    """Put loaded codes into an exact Hamming index (from ``new_index(bits)``) keyed by row id;
    with the version's ``catalog``, also each row's item metadata for filtered searches."""
    rows = np.asarray(row_ids, dtype=np.int64)
    ids = np.asarray(
        item_ids.to_pylist() if hasattr(item_ids, "to_pylist") else list(item_ids), dtype=object
    )
    cap = np.asarray(caption_index, dtype=np.int32)
    if not (len(rows) == len(ids) == len(cap) == len(codes)):
        raise ValueError(
            f"shard columns differ in length: codes {len(codes)}, item ids {len(ids)}, "
            f"caption index {len(cap)}, row ids {len(rows)}"
        )
    index = new_index(bits)
    if mih:
        index.enable_mih()  # its tables are built by the warm-up query below
    if len(rows):
        index.add(np.ascontiguousarray(codes, dtype=np.uint8), rows)
        # every kernel compiled (or loaded from numba's cache) before the version is served, so
        # no request, filtered or not, waits for a compile; then one query on this index (its
        # MIH tables, when enabled, are built by it)
        warmup(bits)
        index.search(np.ascontiguousarray(codes[:1], dtype=np.uint8), 1)
    order = np.argsort(rows, kind="stable").astype(np.int64)
    if catalog is None:  # no metadata: every field unknown, so a filter keeps nothing
        catalog = pa.table({"item_id": pa.array([], pa.string())})
    meta = metadata_from_table(item_metadata_rows(catalog, ids[order]))
    return ShardData(index, ids, cap, order, rows[order], meta)


def item_metadata_rows(catalog: pa.Table, item_ids: np.ndarray) -> pa.Table:
    """The filterable catalog columns (:data:`duch_core.item_metadata.METADATA_COLUMNS`) of each of
    ``item_ids``, in that order (null where the catalog lacks the item)."""
    cols = [c for c in METADATA_COLUMNS if c in catalog.column_names]
    table = catalog.select(["item_id", *cols])
    pos = pc.index_in(pa.array(item_ids.tolist(), pa.string()), value_set=table.column("item_id"))
    return table.select(cols).take(pos)


@dataclass(frozen=True)
class Rerank:
    """Asymmetric ranking of a search: the queries' continuous codes ``(Q, bits)`` float32 and
    how many Hamming candidates each searcher re-ranks (``shortlist >= k``)."""

    queries: np.ndarray
    shortlist: int


def search_shard(
    data: ShardData,
    queries: np.ndarray,
    k: int,
    version: str,
    spec: Any = None,
    rerank: Rerank | None = None,
) -> ShardResult:
    """Exact top-k of ``queries`` ``(Q, bits // 8)`` uint8 in one shard set; with a filter
    ``spec`` (:mod:`duch_core.filters`), the exact top-k among the rows whose item passes.

    With ``rerank``, the Hamming top-``shortlist`` (filtered the same way) is re-ranked by
    :func:`duch_core.asymmetric.rerank_shortlist` and the best ``k`` by score are returned;
    a shortlist that covers every passing row gives the exact asymmetric top-k.

    Raises:
        duch_core.filters.FilterError: a bad spec, or a filter on an index without metadata.
    """
    q = queries.shape[0]
    candidates = None
    empty = ShardResult(
        version,
        np.zeros((q, 0), np.int32),
        np.zeros((q, 0), np.int64),
        {},
        {},
        None if rerank is None else np.zeros((q, 0), np.float32),
    )
    if spec:
        if data.meta is None:
            raise FilterError(None, "this index version has no item metadata to filter on")
        candidates = build_candidates(data.meta, spec)
        if isinstance(candidates, np.ndarray) and not candidates.size:  # no row passes
            return empty
    if data.index.ntotal == 0:
        return empty
    score = None
    if rerank is None:
        dist, ids = data.index.search(queries, k, candidates=candidates)
    else:
        from duch_core.asymmetric import rerank_shortlist

        d_short, i_short = data.index.search(
            queries, max(k, rerank.shortlist), candidates=candidates
        )
        score, ids, dist = rerank_shortlist(data.index, rerank.queries, i_short, k, d_short)
    flat = np.unique(ids[ids >= 0])
    local = data.rows_to_local(flat)
    items = {int(r): str(data.item_ids[p]) for r, p in zip(flat, local, strict=True)}
    caps = {int(r): int(data.caption_index[p]) for r, p in zip(flat, local, strict=True)}
    return ShardResult(
        version, np.asarray(dist), np.asarray(ids, dtype=np.int64), items, caps, score
    )


class ShardStore:
    """Holds shard group ``group`` of the served index versions; answers exact top-k.

    The :class:`ShardSearcher` deployment is one; with ``n_searchers: 0`` the ingress holds
    one for the whole index (group 0 of 1) and searches in its own process.

    Args:
        group: this searcher's position among the searchers, ``0 <= group < n_groups``.
        n_groups: number of searcher deployments.
        keep_versions: index versions kept in memory (the current one and the one before).
        loaders: how artifacts are read (see :class:`deploy.artifacts.Loaders`).
        mih: enable multi-index hashing on the indexes (see
            :meth:`duch_core.search.HammingIndex.enable_mih`).
    """

    def __init__(
        self,
        group: int,
        n_groups: int,
        keep_versions: int = 2,
        loaders: Loaders | None = None,
        mih: bool = False,
        expect: tuple[int, str] | None = None,
    ) -> None:
        if not 0 <= group < n_groups:
            raise ValueError(f"searcher group {group} is outside 0..{n_groups - 1}")
        self.group = group
        self.n_groups = n_groups
        self.keep_versions = max(1, keep_versions)
        self.loaders = loaders or Loaders()
        self.mih = bool(mih)
        self.expect = expect  # (bits, bundle id) a version must have; None = any
        self._versions: OrderedDict[str, dict[str, ShardData]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[dict[str, ShardData]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.refused: dict[str, str] = {}  # version -> why it was not loaded
        self.published = False  # whether LATEST named a version when last read

    def _load(self, manifest: IndexManifest) -> dict[str, ShardData]:
        if self.expect is not None:
            self.loaders.validate(manifest, *self.expect)
        shards = assigned_shards(manifest, self.group, self.n_groups)
        catalog = None
        if manifest.catalog is not None or manifest.archive:
            catalog = self.loaders.read_items(manifest)
        out: dict[str, ShardData] = {}
        for modality in MODALITIES:
            codes, item_ids, caption_index, row_ids = self.loaders.load_codes(
                manifest, modality, shards
            )
            out[modality] = build_shard_data(
                codes,
                item_ids,
                caption_index,
                row_ids,
                manifest.bits,
                self.loaders.new_index,
                self.mih,
                catalog,
            )
        return out

    async def _get(self, manifest: IndexManifest) -> dict[str, ShardData]:
        version = manifest.version
        data = self._versions.get(version)
        if data is not None:
            self._versions.move_to_end(version)
            return data
        fut = self._loading.get(version)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._loading[version] = fut
            try:
                data = await asyncio.to_thread(self._load, manifest)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: the caller below re-raises it
                del self._loading[version]
                raise
            self._versions[version] = data
            while len(self._versions) > self.keep_versions:
                old, _ = self._versions.popitem(last=False)
                log.info("searcher %d/%d dropped index version %s", self.group, self.n_groups, old)
            del self._loading[version]
            fut.set_result(data)
            log.info(
                "searcher %d/%d loaded index version %s: %s",
                self.group,
                self.n_groups,
                version,
                {m: d.index.ntotal for m, d in data.items()},
            )
            return data
        return await fut

    async def prepare(self, manifest: IndexManifest) -> dict[str, int]:
        """Load an index version (if not held yet) and report its code count per modality.

        The control path (the ingress validating a new version), never a search."""
        data = await self._get(manifest)
        return {m: int(d.index.ntotal) for m, d in data.items()}

    def preload(self, manifest: IndexManifest) -> bool:
        """Start loading ``manifest``'s version in the background unless it is held, loading or
        was refused; returns whether a load started."""
        v = manifest.version
        if v in self._versions or v in self._loading or v in self.refused:
            return False
        task = asyncio.get_running_loop().create_task(self._load_quietly(manifest))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _load_quietly(self, manifest: IndexManifest) -> None:
        try:
            await self._get(manifest)
        except Exception as e:
            self.refused[manifest.version] = f"{type(e).__name__}: {e}"
            log.error(
                "searcher %d/%d refused index version %s: %s",
                self.group,
                self.n_groups,
                manifest.version,
                self.refused[manifest.version],
            )

    async def sync_latest(self, index_root: str, strict: bool = False) -> str | None:
        """Load the version ``LATEST`` names (if new and not refused); returns it.

        Args:
            index_root: the index root URI.
            strict: raise when that version cannot be loaded (a replica's constructor), instead
                of remembering it as refused and keeping what is held.
        """
        manifest = await asyncio.to_thread(self.loaders.read_latest_or_none, index_root)
        if manifest is None:
            self.published = False
            return None
        self.published = True
        v = manifest.version
        if v in self._versions or (v in self.refused and not strict):
            return v
        try:
            await self._get(manifest)
        except Exception as e:
            if strict:
                raise
            self.refused[v] = f"{type(e).__name__}: {e}"
            log.error(
                "searcher %d/%d refused index version %s: %s",
                self.group,
                self.n_groups,
                v,
                self.refused[v],
            )
        return v

    async def follow(self, index_root: str, interval_s: float) -> None:
        """Every ``interval_s``, load the version ``LATEST`` names if it is new."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync_latest(index_root)
            except Exception as e:  # LATEST unreadable: keep what is held, try again later
                log.warning(
                    "searcher %d/%d: reading LATEST failed: %s", self.group, self.n_groups, e
                )

    def ready(self) -> bool:
        """Whether this store can answer: it holds a version, or none is published."""
        return bool(self._versions) or not self.published

    async def search(
        self,
        version: str,
        modality: str,
        queries: np.ndarray,
        k: int,
        manifest: IndexManifest | None = None,
        spec: Any = None,
        rerank: Rerank | None = None,
    ) -> ShardResult | None:
        """Exact top-k among this searcher's ``modality`` codes of index ``version`` (with a
        filter ``spec``, among the codes whose item passes it; with ``rerank``, ranked
        asymmetrically, see :func:`search_shard`).

        Args:
            version: the index version id the answer must come from.
            modality: ``"image"`` or ``"text"``.
            queries: ``(Q, bits // 8)`` uint8 packed query codes.
            k: results per query.
            manifest: that version's manifest; when given and the version is not held, this
                replica starts loading it in the background. Either way a version not held is
                answered ``None`` at once: a search never waits for a load.
        """
        data = self._versions.get(version)
        if data is None:
            if manifest is not None:
                if manifest.version != version:
                    raise ValueError(f"manifest of {manifest.version} sent for {version}")
                self.preload(manifest)
            return None
        self._versions.move_to_end(version)  # least recently searched is dropped first
        shard = data[modality]
        if shard.index.ntotal > INLINE_SEARCH_MAX_ROWS:
            return await asyncio.to_thread(search_shard, shard, queries, k, version, spec, rerank)
        return search_shard(shard, queries, k, version, spec, rerank)

    async def code_of(
        self, version: str, modality: str, item_id: str, manifest: IndexManifest | None = None
    ) -> tuple[bool, np.ndarray | None]:
        """``(held, code)``: whether this searcher holds ``version`` (when not, and the manifest
        is given, it starts loading it) and the stored ``modality`` code of ``item_id`` here."""
        data = self._versions.get(version)
        if data is None:
            if manifest is not None:
                self.preload(manifest)
            return False, None
        return True, data[modality].code_of(item_id)

    def versions(self) -> list[str]:
        """Index versions held, oldest first."""
        return list(self._versions)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ShardSearcher(ShardStore):
    """A :class:`ShardStore` as a Serve deployment: one per shard group, called by the ingress.

    Args (besides :class:`ShardStore`'s):
        index_root: the index root URI; the constructor loads what ``LATEST`` names and then
            follows it every ``poll_interval_s`` (0 = only when asked, through
            :meth:`ShardStore.prepare` and manifests sent with searches).
    """

    # Serve awaits an async constructor: the replica takes requests once its version is loaded.
    async def __init__(  # type: ignore[misc]
        self,
        group: int,
        n_groups: int,
        keep_versions: int = 2,
        loaders: Loaders | None = None,
        mih: bool = False,
        expect: tuple[int, str] | None = None,
        index_root: str | None = None,
        poll_interval_s: float = 0.0,
    ) -> None:
        super().__init__(group, n_groups, keep_versions, loaders, mih, expect)
        self._follower: asyncio.Task[None] | None = None
        if index_root:
            await self.sync_latest(index_root, strict=True)
            if poll_interval_s > 0:
                self._follower = asyncio.get_running_loop().create_task(
                    self.follow(index_root, poll_interval_s)
                )

    def check_health(self) -> None:
        """Serve's readiness and health probe."""
        if not self.ready():
            raise RuntimeError("this searcher holds no index version although one is published")
        if self._follower is not None and self._follower.done():
            raise RuntimeError("this searcher stopped following LATEST")

    def __del__(self) -> None:
        follower = getattr(self, "_follower", None)  # unset when the constructor failed
        if follower is not None:
            follower.cancel()


def merge_results(
    parts: Sequence[ShardResult], k: int, merge: Callable[[list[TopK], int], TopK]
) -> ShardResult:
    """Merge per-searcher top-k into the exact global top-k with ``merge`` (``merge_topk``);
    asymmetric results (with ``score``) by (score descending, id).

    Raises:
        RuntimeError: the parts come from different index versions (never served).
    """
    versions = {p.version for p in parts}
    if len(versions) != 1:
        raise RuntimeError(f"searchers answered from different index versions: {sorted(versions)}")
    if len(parts) == 1:  # already the exact top-k, ranked by (distance, id)
        return parts[0]
    q = parts[0].ids.shape[0]
    score = None
    if any(p.score is not None for p in parts):
        dist, ids, score = merge_scored(parts, k)
    else:
        nonempty = [(p.dist, p.ids) for p in parts if p.ids.shape[1]]
        if not nonempty:
            dist, ids = np.zeros((q, 0), np.int32), np.zeros((q, 0), np.int64)
        else:
            dist, ids = merge(nonempty, k)
    items: dict[int, str] = {}
    caps: dict[int, int] = {}
    for p in parts:
        items.update(p.item_ids)
        caps.update(p.caption_index)
    return ShardResult(versions.pop(), np.asarray(dist), np.asarray(ids), items, caps, score)


def merge_scored(parts: Sequence[ShardResult], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dist, ids, score)`` of the best ``k`` by (score descending, id) over asymmetric
    per-searcher results (each already its searcher's best by that order)."""
    q = parts[0].ids.shape[0]
    if any(p.score is None and p.ids.shape[1] for p in parts):
        raise RuntimeError("searchers answered with different rankings")
    parts = [p for p in parts if p.score is not None]
    score = np.concatenate([np.asarray(p.score, np.float32).reshape(q, -1) for p in parts], 1)
    ids = np.concatenate([np.asarray(p.ids, np.int64).reshape(q, -1) for p in parts], 1)
    dist = np.concatenate([np.asarray(p.dist, np.int32).reshape(q, -1) for p in parts], 1)
    order = np.lexsort((ids, -score), axis=-1)[:, :k]
    return (
        np.take_along_axis(dist, order, 1),
        np.take_along_axis(ids, order, 1),
        np.take_along_axis(score, order, 1),
    )
