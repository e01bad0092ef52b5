"""Change detection: what a run must encode, what it may copy, and the shrink guard.

An archive is compared with the published index version by ``(item_id, fingerprint)``
(:func:`compute_diff`). A row is copied to the new version only when it was made by the same
bundle and code length from the same source and had no error; everything else is encoded again.
The fingerprint prefixes :data:`UNKNOWN_PREFIX` and :data:`MISSING_PREFIX` mark items whose image
could not be looked up or does not exist (:mod:`duch_core.source_fingerprints`).
:func:`check_shrink` refuses an archive that lost too many of the published items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from duch_core.index_store import IndexManifest, read_errors, read_rows


class ShrinkError(ValueError):
    """The archive lost more of the published items than allowed, or has none: not published."""


def _empty_ids() -> pa.Array:
    return pa.array([], pa.string())


UNKNOWN_PREFIX = "unknown-"
"""Fingerprint prefix of an item whose image could not be looked up because the store failed."""

MISSING_PREFIX = "missing-"
"""Fingerprint prefix of an item whose image does not exist."""


@dataclass
class IndexDiff:
    """What a run does to the published index: item counts and the id sets.

    Attributes:
        total: archive items.
        new: items the previous version never saw.
        changed: items seen before that must be encoded again (different fingerprint, failed
            last time, or image missing).
        unchanged: items whose rows are copied from the previous version.
        deleted: items of the previous version no longer in the archive.
        full_reencode: every item is encoded (no previous version, or another bundle).
        reason: why, in words.
        encode_ids: ids to encode, a string array.
        carry_ids: ids whose rows are carried over, a string array (``stale_ids`` included).
        stale_ids: items whose image could not be looked up (the store failed) and whose
            previous rows are therefore carried over unchanged.
        prev_row_ids: items with rows in the previous version (same bundle and bits only).
        prev_items: items of the previous version: with rows or with item errors (bad
            manifest rows not counted); what ``deleted`` is a share of.
    """

    total: int
    new: int
    changed: int
    unchanged: int
    deleted: int
    full_reencode: bool
    reason: str
    encode_ids: pa.Array
    carry_ids: pa.Array
    stale_ids: pa.Array = field(default_factory=_empty_ids)
    prev_row_ids: pa.Array = field(default_factory=_empty_ids)
    prev_items: int = 0

    @property
    def deleted_fraction(self) -> float:
        """``deleted / prev_items`` (0 without a previous version)."""
        return self.deleted / self.prev_items if self.prev_items else 0.0

    def plan(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict (what a dry run reports)."""
        return {
            "archive_items": self.total,
            "new": self.new,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "previous_items": self.prev_items,
            "would_encode": len(self.encode_ids),
            "would_carry_over": len(self.carry_ids),
            "stale_lookups": len(self.stale_ids),
            "full_reencode": self.full_reencode,
            "reason": self.reason,
        }


def check_shrink(diff: IndexDiff, max_deleted_fraction: float) -> None:
    """Refuse an archive that is empty or lost too many of the published items.

    A manifest that was truncated, replaced by an empty one or read half would otherwise publish
    an index without those items.

    Raises:
        ShrinkError: no valid archive items, or ``diff.deleted_fraction`` above the limit.
    """
    if diff.total == 0:
        raise ShrinkError(
            "the archive has no valid items; refusing to publish an empty index (check the "
            "archive manifest; --allow-shrink publishes it anyway)"
        )
    if diff.deleted_fraction > max_deleted_fraction:
        raise ShrinkError(
            f"{diff.deleted} of the {diff.prev_items} items of the published index are no longer "
            f"in the archive ({diff.deleted_fraction:.1%}, above max_deleted_fraction "
            f"{max_deleted_fraction:.1%}); refusing to publish. If the archive really shrank, "
            "rerun with --allow-shrink"
        )


def compute_diff(
    current: pa.Table, prev: IndexManifest | None, bundle_id: str, bits: int
) -> IndexDiff:
    """Compare an archive's ``(item_id, fingerprint)`` table with a published version.

    An item is carried over when ``prev`` was made by the same bundle and code length, it had the
    same fingerprint there, it had no error there and its image was found now. An item whose
    image could not be looked up because the store failed (fingerprint ``unknown-...``) keeps
    its previous rows if it has any (``stale_ids``). Everything else is encoded. Reads the
    previous version's rows (two columns, checksums verified) and errors.

    Raises:
        ArchiveError: ``current`` repeats an item id.
        IndexCorruptError: the previous version's shards or errors table cannot be read.
    """
    from duch_core.archive import ArchiveError

    ids = current.column("item_id").combine_chunks()
    total = current.num_rows
    if pc.count_distinct(ids).as_py() != total:
        counts = pc.value_counts(ids).to_pylist()
        dup = [v["values"] for v in counts if v["counts"] > 1][:5]
        raise ArchiveError(f"archive item_id values are not unique, e.g. {dup}")
    empty = _empty_ids()
    if prev is None:
        return IndexDiff(total, total, 0, 0, 0, True, "no published index", ids, empty)
    prev_items = (
        read_rows(prev, columns=["item_id", "fingerprint"])
        .group_by(["item_id", "fingerprint"])
        .aggregate([])
    )
    errors = read_errors(prev)
    failed_ids = errors.column("item_id").combine_chunks()
    item_errors = errors.filter(
        pc.and_(
            pc.not_equal(errors.column("stage"), "manifest"),
            pc.not_equal(errors.column("item_id"), ""),
        )
    )
    row_ids = pc.unique(prev_items.column("item_id").combine_chunks())
    prev_ids = pc.unique(
        pa.concat_arrays([row_ids, item_errors.column("item_id").combine_chunks()])
    )
    deleted = int(pc.sum(pc.invert(pc.is_in(prev_ids, value_set=ids))).as_py() or 0)
    n_prev = len(prev_ids)
    if prev.bundle_id != bundle_id or int(prev.bits) != int(bits):
        reason = f"bundle changed ({prev.bundle_id} -> {bundle_id})"
        new = int(pc.sum(pc.invert(pc.is_in(ids, value_set=prev_ids))).as_py() or 0)
        return IndexDiff(
            total, new, total - new, 0, deleted, True, reason, ids, empty, prev_items=n_prev
        )
    joined = current.join(prev_items, keys="item_id", right_suffix="_prev", join_type="left outer")
    fp_now = joined.column("fingerprint")
    same = pc.and_(
        pc.equal(fp_now, joined.column("fingerprint_prev")).fill_null(False),
        pc.invert(pc.is_in(joined.column("item_id"), value_set=failed_ids)),
    )
    same = pc.and_(same, pc.invert(pc.starts_with(fp_now, MISSING_PREFIX)))
    stale = pc.and_(
        pc.starts_with(fp_now, UNKNOWN_PREFIX), pc.is_valid(joined.column("fingerprint_prev"))
    )
    keep = pc.or_(same, stale)
    carry = pc.unique(joined.filter(keep).column("item_id").combine_chunks())
    stale_ids = pc.unique(joined.filter(stale).column("item_id").combine_chunks())
    encode = pc.unique(joined.filter(pc.invert(keep)).column("item_id").combine_chunks())
    encode = encode.filter(pc.invert(pc.is_in(encode, value_set=carry)))
    new = int(pc.sum(pc.invert(pc.is_in(encode, value_set=prev_ids))).as_py() or 0)
    return IndexDiff(
        total,
        new,
        len(encode) - new,
        len(carry) - len(stale_ids),
        deleted,
        False,
        "incremental",
        encode,
        carry,
        stale_ids=stale_ids,
        prev_row_ids=row_ids,
        prev_items=n_prev,
    )
