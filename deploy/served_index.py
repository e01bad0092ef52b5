"""Which index version the ingress serves, and the swap to a newer one without dropping requests.

The ingress serves one :class:`ServingState` at a time. A request takes the state once when it
starts and uses it throughout, so its answer comes from one version and says which. A new
version (from ``LATEST``, polled or on ``POST /v1/reload``) is validated against the encoder's
bits and bundle id, its catalog is read and every shard group loads its shards; only then is
the state reference replaced (the one before is kept as ``previous``). A version that fails any
step is refused and the current one stays; the poller does not retry it until ``LATEST`` names
another version.

Searcher replicas follow ``LATEST`` on their own (:mod:`deploy.searcher`), so right after a swap
some replicas may not hold the new version yet, and a replica started later may hold only the
newest. A search therefore tries the version the request took, then the current one, then the
previous one, each over all shard groups, and answers from the first that every group holds:
never from two versions, never waiting for a load. Only when no replica holds any of them is
the answer a 503 with ``Retry-After``.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploy.artifacts import Loaders
from deploy.catalog import Catalog
from deploy.models import ReloadResponse
from deploy.queries import RequestError
from deploy.retry import retry_unavailable
from deploy.searcher import Rerank, ShardResult, ShardStore, merge_results
from deploy.telemetry import Telemetry
from duch_core.index_store import IndexManifest

log = logging.getLogger("ray.serve")

#: Loads an index version into one shard group; returns its code count per modality.
Prepare = Callable[[IndexManifest], Awaitable[dict[str, int]]]
#: Top-k in one shard group: ``(version, modality, codes, k[, manifest]) -> result | None``.
Search = Callable[..., Awaitable[ShardResult | None]]


@dataclass(frozen=True)
class ShardGroup:
    """One group of an index version's shards: a searcher deployment, or a store in process."""

    prepare: Prepare
    search: Search
    #: ``(version, modality, item_id[, manifest]) -> (held, code | None)``
    code_of: Callable[..., Awaitable[tuple[bool, np.ndarray | None]]]


def shard_groups(
    searchers: Sequence[Any],
    keep_versions: int,
    loaders: Loaders,
    mih: bool,
    search_timeout_s: float | None = None,
) -> list[ShardGroup]:
    """The searcher deployments' remote calls, or one :class:`ShardStore` in this process for
    the whole index when there are no searchers (same call shapes, awaited the same way).

    A searcher's ``search`` that has not answered within ``search_timeout_s`` (its retries
    included) is a 503 for the request (:func:`deploy.retry.retry_unavailable`).
    """
    if searchers:
        return [_remote_group(s, search_timeout_s) for s in searchers]
    store = ShardStore(0, 1, keep_versions, loaders, mih)
    return [ShardGroup(store.prepare, store.search, store.code_of)]


def _remote_group(handle: Any, search_timeout_s: float | None = None) -> ShardGroup:
    """A searcher deployment's calls, retried on another replica when the one called is gone."""

    async def prepare(manifest: IndexManifest) -> dict[str, int]:
        return await retry_unavailable(handle.prepare.remote, manifest)  # type: ignore[no-any-return]

    async def search(*args: Any) -> ShardResult | None:
        return await retry_unavailable(  # type: ignore[no-any-return]
            handle.search.remote, *args, timeout_s=search_timeout_s
        )

    async def code_of(*args: Any) -> tuple[bool, np.ndarray | None]:
        return await retry_unavailable(  # type: ignore[no-any-return]
            handle.code_of.remote, *args, timeout_s=search_timeout_s
        )

    return ShardGroup(prepare, search, code_of)


def version_age_s(created: str, now: float | None = None) -> float | None:
    """Seconds since an ISO 8601 ``created`` time (``None`` when it cannot be read)."""
    from datetime import datetime

    try:
        t = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None
    return max(0.0, (time.time() if now is None else now) - t)


@dataclass(frozen=True)
class ServingState:
    """One index version, ready to answer: never modified, only replaced."""

    manifest: IndexManifest
    version: str
    bits: int
    bundle_id: str
    bitorder: str
    counts: dict[str, int]
    catalog: Catalog
    loaded_at: float


class IndexRefusedError(Exception):
    """A new index version failed validation or loading; the current one is kept."""


class ServedIndex:
    """The index version being served across the shard groups, and how it is replaced.

    Args:
        index_root: index root URI; the version served is the one ``LATEST`` names.
        groups: the shard groups holding the index (see :func:`shard_groups`).
        loaders: how manifests and archive items are read.
        bits: code length of the query encoder; a version with other codes is refused.
        bundle_id: bundle of the query encoder; a version encoded with another is refused.
        telemetry: where reload failures are counted.
    """

    def __init__(
        self,
        index_root: str,
        groups: Sequence[ShardGroup],
        loaders: Loaders,
        bits: int,
        bundle_id: str,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.index_root = index_root
        self.groups = list(groups)
        self.loaders = loaders
        self.bits = bits
        self.bundle_id = bundle_id
        self.telemetry = telemetry or Telemetry(export=False)
        self.state: ServingState | None = None
        self.previous: ServingState | None = None
        self.last_error: str | None = None
        self._refused: dict[str, str] = {}
        self._reload_lock = asyncio.Lock()

    def current(self) -> ServingState:
        """The state to answer a request with (503 while no version is served; the reason is
        logged, not sent: it may name storage locations)."""
        st = self.state
        if st is None:
            raise RequestError(503, "no index version is being served yet", reason="no_index")
        return st

    def health(self) -> str:
        """``ok``, ``degraded`` (serving, but the last reload or poll failed) or
        ``unavailable`` (nothing served)."""
        if self.state is None:
            return "unavailable"
        return "degraded" if self.last_error else "ok"

    @property
    def refused(self) -> dict[str, str]:
        """Versions refused since they were last named by ``LATEST``, with the reason."""
        return dict(self._refused)

    async def _read_latest(self) -> IndexManifest:
        return await asyncio.to_thread(self.loaders.read_latest, self.index_root)

    async def reload(self) -> ReloadResponse:
        """Serve the version named by ``LATEST`` if it is new and valid.

        Raises:
            IndexRefusedError: the new version failed validation or loading (old one kept).
        """
        async with self._reload_lock:
            previous = self.state
            prev_version = previous.version if previous else None
            try:
                manifest = await self._read_latest()
            except Exception as e:
                self.telemetry.reload_failed()
                raise IndexRefusedError(f"cannot read LATEST under {self.index_root}: {e}") from e
            version = manifest.version
            if previous is not None and version == previous.version:
                self.last_error = None
                return ReloadResponse(changed=False, version=version, previous_version=version)
            try:
                state = await self._prepare(manifest)
            except Exception as e:
                reason = f"index version {version} refused: {type(e).__name__}: {e}"
                if prev_version:
                    reason += f"; still serving {prev_version}"
                self._refused[version] = reason
                self.last_error = reason
                self.telemetry.reload_failed()
                log.error("ingress: %s", reason)
                raise IndexRefusedError(reason) from e
            self.previous = previous
            self.state = state  # the swap: requests that started earlier keep the old state
            self.last_error = None
            self._refused.pop(version, None)
            log.info("ingress: serving index version %s (was %s)", version, prev_version)
            return ReloadResponse(changed=True, version=version, previous_version=prev_version)

    async def _prepare(self, manifest: IndexManifest) -> ServingState:
        await asyncio.to_thread(self.loaders.validate, manifest, self.bits, self.bundle_id)
        table = None
        if manifest.catalog is not None or manifest.archive:
            table = await asyncio.to_thread(self.loaders.read_items, manifest)
        catalog = await asyncio.to_thread(Catalog, table)
        loaded = await asyncio.gather(*(g.prepare(manifest) for g in self.groups))
        counts: dict[str, int] = {}
        for part in loaded:
            for m, n in part.items():
                counts[m] = counts.get(m, 0) + int(n)
        for m, n in manifest.counts.items():
            if m in counts and counts[m] != n:
                raise ValueError(f"searchers loaded {counts[m]} {m} codes, manifest says {n}")
        return ServingState(
            manifest=manifest,
            version=manifest.version,
            bits=int(manifest.bits),
            bundle_id=str(manifest.bundle_id),
            bitorder=str(manifest.bitorder),
            counts=counts,
            catalog=catalog,
            loaded_at=time.time(),
        )

    async def poll(self, interval_s: float) -> None:
        """Every ``interval_s``, reload when ``LATEST`` names a version not served or refused."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                version = (await self._read_latest()).version
                current = self.state.version if self.state else None
                if version == current:
                    self.last_error = None  # serving what LATEST names (again)
                elif version not in self._refused:
                    await self.reload()
            except IndexRefusedError:
                pass  # logged by reload(); retried when LATEST names another version
            except Exception as e:
                msg = f"polling {self.index_root}/LATEST failed: {e}"
                if msg != self.last_error:
                    log.warning("ingress: %s", msg)
                self.last_error = msg
                self.telemetry.reload_failed()
            if self.state is not None:
                self.telemetry.index_age(version_age_s(self.state.manifest.created))

    async def code_of(self, st: ServingState, modality: str, item_id: str) -> np.ndarray:
        """The stored ``modality`` code ``(1, bits // 8)`` of an item of version ``st``.

        Raises:
            RequestError: 404 when the version holds no such code; 503 when a shard group
                holds not that version yet.
        """
        for g in self.groups:
            held, code = await g.code_of(st.version, modality, item_id)
            if not held:
                held, code = await g.code_of(st.version, modality, item_id, st.manifest)
            if not held:
                raise RequestError(
                    503, "the searchers are loading the index; retry shortly", reason="loading"
                )
            if code is not None:
                return np.asarray(code, dtype=np.uint8).reshape(1, -1)
        raise RequestError(
            404, f"item {item_id!r} has no {modality} code in index version {st.version}"
        )

    async def search(
        self,
        st: ServingState,
        modality: str,
        codes: np.ndarray,
        k: int,
        spec: Any = None,
        rerank: Rerank | None = None,
    ) -> tuple[ServingState, ShardResult]:
        """Exact top-k of ``codes`` ``(Q, bits // 8)`` uint8 over all shard groups, merged with
        ``loaders.merge_topk``, from ``st`` or else the current or previous version (see the
        module docstring); returns the state answered from and the result. With ``rerank``
        each group re-ranks its Hamming shortlist asymmetrically and the merge is by score.

        Raises:
            RequestError: 503 when no version is held by a replica of every group.
        """
        tried: list[str] = []
        for cand in (st, self.state, self.previous):
            if cand is None or cand.version in tried:
                continue
            tried.append(cand.version)
            parts = await asyncio.gather(
                *(self._one(g, cand, modality, codes, k, spec, rerank) for g in self.groups)
            )
            if all(p is not None for p in parts):
                return cand, merge_results(
                    [p for p in parts if p is not None], k, self.loaders.merge_topk
                )
        log.warning("ingress: no searcher replica holds index versions %s yet", tried)
        raise RequestError(
            503, "the searchers are loading the index; retry shortly", reason="loading"
        )

    @staticmethod
    async def _one(
        group: ShardGroup,
        st: ServingState,
        modality: str,
        codes: np.ndarray,
        k: int,
        spec: Any = None,
        rerank: Rerank | None = None,
    ) -> ShardResult | None:
        res = await group.search(st.version, modality, codes, k, None, spec, rerank)
        if res is None:  # that replica lacks the version: another one may hold it, and the
            # manifest lets a replica without it start loading it (in the background)
            res = await group.search(st.version, modality, codes, k, st.manifest, spec, rerank)
        return res
