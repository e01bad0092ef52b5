"""Compare-and-swap on small objects, and the pointers that publish versions with it.

Data objects are written first, then :func:`publish_pointer` writes a small pointer object last
(e.g. an index's ``LATEST``); a reader that follows the pointer finds the data complete.
Conditional requests (:func:`read_versioned`, :func:`put_conditional`, :func:`delete_conditional`)
compare-and-swap small objects by ETag (S3 ``If-Match`` / ``If-None-Match: *`` through boto3;
locally under an exclusive ``flock`` of the parent directory). Locks and the ``LATEST`` pointer of
an index use them. Version ids (:func:`new_version_id`) name the directories pointers point at.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from duch_core import storage, storage_retry
from duch_core.storage_errors import (
    NotFoundError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
)
from duch_core.storage_retry import retrying, translate
from duch_core.uris import is_s3, kind, local_path, resolve

MAX_POINTER_BYTES = 1024
"""Upper bound on a pointer object's size: a pointer names a version, it does not hold data."""


# --------------------------------------------------------------------------------------------
# conditional requests


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the ETag they were read with (for :func:`put_conditional`)."""

    data: bytes
    etag: str


def _local_etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class _DirLock:
    """An exclusive ``flock`` of a local directory: conditional local writes run under it."""

    def __init__(self, path: str) -> None:
        self.parent = os.path.dirname(path)

    def __enter__(self) -> None:
        import fcntl

        os.makedirs(self.parent, exist_ok=True)
        self.fd = os.open(self.parent, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _local_read(path: str, uri: str) -> Versioned:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise NotFoundError(f"{uri}: no such object") from e
    except IsADirectoryError as e:
        raise NotFoundError(f"{uri}: no such object (it is a directory)") from e
    except OSError as e:
        raise translate(e, uri, "read") from e
    return Versioned(data, _local_etag(data))


def _local_replace(path: str, data: bytes, uri: str) -> None:
    """Temporary file, fsync, rename into place, fsync of the directory."""
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise translate(e, uri, "write") from e


def read_versioned(uri: str) -> Versioned:
    """An object's bytes with its ETag, in one request (never a mixture of two versions).

    Locally the "ETag" is a hash of the content.

    Raises:
        NotFoundError: no such object.
        AccessDeniedError, BadURIError, TransientStorageError, StorageError.
    """
    if not is_s3(uri):
        kind(uri)
        return _local_read(local_path(uri), uri)

    def get(client: Any, bucket: str, key: str) -> Versioned:
        out = client.get_object(Bucket=bucket, Key=key)
        return Versioned(out["Body"].read(), str(out.get("ETag", "")).strip('"'))

    return retrying(lambda: storage_retry.boto_call(uri, "read", get), uri, "read")


def put_conditional(
    uri: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
) -> str:
    """Write a small object only if it is in the expected state; returns the new ETag.

    Args:
        uri: the object.
        data: its new content.
        if_match: write only if the object's ETag is this one (compare-and-swap).
        if_none_match: write only if there is no object yet (create once).

    Without either condition the write is unconditional. A retry after a failure whose outcome
    is unknown (the request may have landed) that then fails its condition reads the object
    back: finding ``data`` there means the earlier attempt succeeded.

    Raises:
        PreconditionFailedError: the object is not in the expected state.
        NotFoundError (missing bucket), AccessDeniedError, TransientStorageError, StorageError.
    """
    if if_match is not None and if_none_match:
        raise ValueError("give if_match or if_none_match, not both")
    payload = bytes(data)
    if not is_s3(uri):
        kind(uri)
        path = local_path(uri)
        with _DirLock(path):
            try:
                current: Versioned | None = _local_read(path, uri)
            except NotFoundError:
                current = None
            if if_none_match and current is not None:
                raise PreconditionFailedError(f"{uri}: exists already")
            if if_match is not None and (current is None or current.etag != if_match):
                raise PreconditionFailedError(f"{uri}: changed since it was read")
            _local_replace(path, payload, uri)
        return _local_etag(payload)

    landed_maybe = {"flag": False}

    def put(client: Any, bucket: str, key: str) -> str:
        extra: dict[str, str] = {}
        if if_match is not None:
            extra["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        out = client.put_object(Bucket=bucket, Key=key, Body=payload, **extra)
        return str(out.get("ETag", "")).strip('"')

    def attempt() -> str:
        try:
            return storage_retry.boto_call(uri, "write", put)
        except TransientStorageError:
            landed_maybe["flag"] = True
            raise
        except PreconditionFailedError:
            if landed_maybe["flag"]:
                try:
                    now = storage_retry.boto_call(
                        uri, "read", lambda c, b, k: c.get_object(Bucket=b, Key=k)
                    )
                    body, etag = now["Body"].read(), str(now.get("ETag", "")).strip('"')
                except NotFoundError:
                    raise PreconditionFailedError(f"{uri}: precondition failed") from None
                if body == payload:
                    return etag
            raise

    return retrying(attempt, uri, "write")


def delete_conditional(uri: str, if_match: str) -> None:
    """Delete an object only if its ETag is ``if_match``; a missing object is not an error.

    Raises:
        PreconditionFailedError: the object changed since it was read.
        AccessDeniedError, TransientStorageError, StorageError.
    """
    if not is_s3(uri):
        kind(uri)
        path = local_path(uri)
        with _DirLock(path):
            try:
                current = _local_read(path, uri)
            except NotFoundError:
                return
            if current.etag != if_match:
                raise PreconditionFailedError(f"{uri}: changed since it was read")
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
        return

    def rm(client: Any, bucket: str, key: str) -> None:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=f'"{if_match}"')

    def attempt() -> None:
        try:
            storage_retry.boto_call(uri, "delete", rm)
        except NotFoundError:
            return
        except PreconditionFailedError:
            try:  # some stores answer 412 for a missing object: that is nothing to delete
                storage_retry.boto_call(uri, "read", lambda c, b, k: c.head_object(Bucket=b, Key=k))
            except NotFoundError:
                return
            raise

    retrying(attempt, uri, "delete")


# --------------------------------------------------------------------------------------------
# pointers


def _check_pointer_value(value: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError("a pointer value must be a non-empty str")
    if value != value.strip() or "\n" in value or "\r" in value:
        raise ValueError(f"a pointer value must be one line without surrounding spaces: {value!r}")
    data = value.encode("utf-8")
    if len(data) > MAX_POINTER_BYTES:
        raise ValueError(f"a pointer value must be at most {MAX_POINTER_BYTES} bytes")
    return data


def new_version_id(now: datetime | None = None) -> str:
    """A fresh id for a versioned output directory: ``YYYYmmddTHHMMSSffffffZ-<8 hex>``.

    UTC with microseconds, so ids sort by creation time even for runs in the same second; the
    random suffix keeps concurrent runs apart. Index versions and feature-cache versions use it.
    """
    t = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{t:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def version_time(version: str) -> datetime | None:
    """The UTC creation time a :func:`new_version_id` id carries, or ``None`` for other names."""
    try:
        return datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def publish_pointer(pointer_uri: str, value: str) -> None:
    """Atomically point ``pointer_uri`` at ``value`` (e.g. a version id); call it last.

    Write every data object first; a reader that follows the pointer then finds them complete.
    Local: temporary file, fsync, ``os.replace``, fsync of the directory. S3: one PUT, retried
    while the store fails transiently. Readers see the old value or the new one, never a partial
    value; a write that fails leaves the old value in place (the pointer is never deleted).

    Raises:
        ValueError: ``value`` is empty, multi-line, padded with spaces or over 1 KiB.
        NotFoundError (missing bucket), AccessDeniedError, BadURIError, TransientStorageError,
        StorageError.
    """
    data = _check_pointer_value(value)
    if is_s3(pointer_uri):
        put_conditional(pointer_uri, data)
        return
    _, path = resolve(pointer_uri)
    _local_replace(path, data, pointer_uri)


def decode_pointer(data: bytes, pointer_uri: str) -> str:
    """A pointer object's value (stripped UTF-8 text).

    Raises:
        StorageError: the object is empty or not UTF-8.
    """
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise StorageError(f"{pointer_uri}: pointer is not UTF-8 text") from e
    if not value:
        raise StorageError(f"{pointer_uri}: pointer object is empty")
    return value


def read_pointer(pointer_uri: str) -> str:
    """The value last published at ``pointer_uri``.

    Raises:
        NotFoundError: nothing published there.
        StorageError: the pointer object is empty or not UTF-8.
        AccessDeniedError, BadURIError, TransientStorageError.
    """
    data = (
        read_versioned(pointer_uri).data if is_s3(pointer_uri) else storage.read_bytes(pointer_uri)
    )
    return decode_pointer(data, pointer_uri)
