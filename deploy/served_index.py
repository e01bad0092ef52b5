"""Which index version the ingress serves, and the swap to a newer one without dropping requests.

The ingress serves one :class:`ServingState` at a time. A request takes the state once when it
starts and uses it throughout, so its answer comes from one version and says which. A new
version (from ``LATEST``, polled or on ``POST /v1/reload``) is validated against the encoder's
bits and bundle id, its catalog is read and every shard group loads its shards; only then is
the state reference replaced. A version that fails any step is refused and the current one
stays; the poller does not retry it until ``LATEST`` names another version.
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
from deploy.searcher import ShardResult, ShardStore, merge_results
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


def shard_groups(
    searchers: Sequence[Any], keep_versions: int, loaders: Loaders, mih: bool
) -> list[ShardGroup]:
    """The searcher deployments' remote calls, or one :class:`ShardStore` in this process for
    the whole index when there are no searchers (same call shapes, awaited the same way)."""
    if searchers:
        return [ShardGroup(s.prepare.remote, s.search.remote) for s in searchers]
    store = ShardStore(0, 1, keep_versions, loaders, mih)
    return [ShardGroup(store.prepare, store.search)]


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
    """

    def __init__(
        self,
        index_root: str,
        groups: Sequence[ShardGroup],
        loaders: Loaders,
        bits: int,
        bundle_id: str,
    ) -> None:
        self.index_root = index_root
        self.groups = list(groups)
        self.loaders = loaders
        self.bits = bits
        self.bundle_id = bundle_id
        self.state: ServingState | None = None
        self.last_error: str | None = None
        self._refused: dict[str, str] = {}
        self._reload_lock = asyncio.Lock()

    def current(self) -> ServingState:
        """The state to answer a request with (503 while no version is served)."""
        st = self.state
        if st is None:
            raise RequestError(503, f"no index version is being served: {self.last_error}")
        return st

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
                raise IndexRefusedError(f"cannot read LATEST under {self.index_root}: {e}") from e
            version = manifest.version
            if previous is not None and version == previous.version:
                return ReloadResponse(changed=False, version=version, previous_version=version)
            try:
                state = await self._prepare(manifest)
            except Exception as e:
                reason = f"index version {version} refused: {type(e).__name__}: {e}"
                if prev_version:
                    reason += f"; still serving {prev_version}"
                self._refused[version] = reason
                log.error("ingress: %s", reason)
                raise IndexRefusedError(reason) from e
            self.state = state  # the swap: requests that started earlier keep the old state
            self.last_error = None
            self._refused.pop(version, None)
            log.info("ingress: serving index version %s (was %s)", version, prev_version)
            return ReloadResponse(changed=True, version=version, previous_version=prev_version)

    async def _prepare(self, manifest: IndexManifest) -> ServingState:
        await asyncio.to_thread(self.loaders.validate, manifest, self.bits, self.bundle_id)
        table = None
        if manifest.archive:
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
                if version != current and version not in self._refused:
                    await self.reload()
            except IndexRefusedError:
                pass  # logged by reload(); retried when LATEST names another version
            except Exception as e:
                msg = f"polling {self.index_root}/LATEST failed: {e}"
                if msg != self.last_error:
                    log.warning("ingress: %s", msg)
                self.last_error = msg

    async def search(
        self, st: ServingState, modality: str, codes: np.ndarray, k: int
    ) -> ShardResult:
        """Exact top-k of ``codes`` ``(Q, bits // 8)`` uint8 over all shard groups of version
        ``st``, merged with ``loaders.merge_topk``."""

        async def one(group: ShardGroup) -> ShardResult:
            res = await group.search(st.version, modality, codes, k)
            if res is None:  # that replica does not hold the version: ask again with the manifest
                res = await group.search(st.version, modality, codes, k, st.manifest)
            if res is None:
                raise RuntimeError(f"a searcher did not load index version {st.version}")
            return res

        parts = await asyncio.gather(*(one(g) for g in self.groups))
        return merge_results(parts, k, self.loaders.merge_topk)
