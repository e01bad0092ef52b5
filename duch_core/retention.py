"""Retention: which index versions to delete, whole, and when.

:func:`apply_retention` keeps the newest published versions, never the one ``LATEST`` names nor
the one published before it, and deletes directories that were never published (runs that died
or were refused) only once they are older than a grace age. A version counts as published once
``LATEST`` has named it (its ``published.json``, :func:`duch_core.index_store.mark_published`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from duch_core import pointers, storage
from duch_core.index_store import (
    MANIFEST_NAME,
    PUBLISHED_NAME,
    SUMMARY_NAME,
    VERSIONS_DIR,
    IndexCorruptError,
    manifest_uri,
    read_latest_version,
    read_manifest,
    version_uri,
)

DEFAULT_GRACE_S = 2 * 24 * 3600.0
"""Unpublished version directories younger than this are never deleted (runs in progress)."""


@dataclass(frozen=True)
class VersionState:
    """A version directory: whether it has an ``index.json`` and whether it was published."""

    manifest: bool
    published: bool


def list_versions(root: str) -> dict[str, bool]:
    """Every version directory under ``root`` -> whether it holds an ``index.json``."""
    return {v: st.manifest for v, st in version_states(root).items()}


def version_states(root: str) -> dict[str, VersionState]:
    """Every version directory under ``root`` and its :class:`VersionState`, sorted by id.

    A version counts as published when it has ``published.json``; a version written before those
    markers existed counts when its ``summary.json`` says so.
    """
    base = storage.join(root, VERSIONS_DIR)
    prefix = base.rstrip("/") + "/"
    try:
        listed = storage.list_prefix(base, recursive=True)
    except FileNotFoundError:
        listed = []
    files: dict[str, set[str]] = {}
    for uri in listed:
        if not uri.startswith(prefix):
            continue
        version, _, tail = uri[len(prefix) :].partition("/")
        if version:
            files.setdefault(version, set()).add(tail)
    out = {}
    for version, names in sorted(files.items()):
        has_manifest = MANIFEST_NAME in names
        published = PUBLISHED_NAME in names
        if has_manifest and not published and SUMMARY_NAME in names:
            try:
                summary = storage.read_json(storage.join(version_uri(root, version), SUMMARY_NAME))
                published = summary.get("published") is True
            except (FileNotFoundError, ValueError, AttributeError):
                published = False
        out[version] = VersionState(has_manifest, published)
    return out


def apply_retention(
    root: str,
    keep: int,
    current: str | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    now: _dt.datetime | None = None,
) -> list[str]:
    """Delete old versions, whole.

    Kept: the ``keep`` newest published versions (``keep <= 0`` keeps every published one), the
    version ``LATEST`` names and the one it was published after (its ``previous_version``, else
    the newest published version before it), and ``current`` (a run in progress). A directory
    that was never published (a run that died, or one refused for its error rate or by a
    conflict) is deleted once its id says it is older than ``grace_s`` seconds, so a run still
    writing is never touched. Call it while holding the :class:`duch_core.encode_lock.EncodeLock`.

    Returns:
        The deleted version ids.
    """
    states = version_states(root)
    latest = read_latest_version(root)
    published = [v for v, st in states.items() if st.published]
    protected = {v for v in (latest, current) if v}
    if latest is not None:
        before = None
        try:
            before = read_manifest(manifest_uri(root, latest)).previous_version
        except IndexCorruptError:
            pass
        if before is None:
            older = [v for v in published if v < latest]
            before = older[-1] if older else None
        if before:
            protected.add(before)
    protected.update(published[-keep:] if keep > 0 else published)
    now = now or _dt.datetime.now(_dt.UTC)
    doomed = []
    for v, st in states.items():
        if v in protected:
            continue
        if st.published:
            doomed.append(v)
            continue
        born = pointers.version_time(v)
        if born is not None and (now - born).total_seconds() > grace_s:
            doomed.append(v)
    for v in doomed:
        storage.delete_prefix(version_uri(root, v))
    return doomed
