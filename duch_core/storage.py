"""All file I/O of the project, over :mod:`pyarrow.fs`: local paths, ``file://`` and ``s3://`` URIs.

Reading, listing, writing and deleting objects. URIs and S3 settings are described in
:mod:`duch_core.uris` (:func:`join`, :func:`is_s3`, :func:`resolve` and :func:`configure_s3` are
importable from here too); retries of transient failures in :mod:`duch_core.storage_retry`;
conditional requests and pointers in :mod:`duch_core.pointers`.

Local writes go to a temporary sibling (``.<name>.tmp-<hex>``, never listed) and are renamed into
place. S3 writes are buffered (in memory, spilling to a temporary file) and sent as one PUT
request when the stream closes: an aborted or failed write sends nothing, so the object keeps its
old content; it is never deleted. Readers therefore see the old or the new content, never a
partial object. (S3 writes go through boto3, since pyarrow cannot abort an upload without
completing it; reads and listings use pyarrow.)

Errors (:mod:`duch_core.storage_errors`, importable from here too): :class:`NotFoundError`
(missing object or bucket), :class:`AccessDeniedError` (wrong credentials, denied),
:class:`BadURIError` (unsupported scheme, malformed URI), :class:`TransientStorageError` (the
store failed in a way that may pass; raised once the retries are used up),
:class:`PreconditionFailedError` (a conditional request found another version), and
:class:`StorageError` for any other failure of the store.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from duch_core import storage_retry
from duch_core.storage_errors import (
    AccessDeniedError,
    BadURIError,
    NotFoundError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
)
from duch_core.storage_retry import IO_ERRORS, bucket_missing, retrying, translate
from duch_core.uris import TMP_RE, configure_s3, is_s3, join, resolve

__all__ = [
    "AccessDeniedError",
    "BadURIError",
    "NotFoundError",
    "ObjectInfo",
    "OutputStream",
    "PreconditionFailedError",
    "StorageError",
    "TransientStorageError",
    "configure_s3",
    "delete",
    "delete_prefix",
    "exists",
    "info",
    "is_s3",
    "join",
    "list_prefix",
    "open_input",
    "open_output",
    "read_bytes",
    "read_json",
    "read_parquet",
    "read_text",
    "resolve",
    "write_bytes",
    "write_json",
    "write_parquet",
    "write_text",
]


@dataclass(frozen=True)
class ObjectInfo:
    """Metadata of one object.

    Attributes:
        size: size in bytes.
        mtime_ns: last modification, nanoseconds since the epoch (``None`` if the store has none).
        etag: the S3 entity tag without quotes; ``None`` for local files.
    """

    size: int
    mtime_ns: int | None
    etag: str | None


# --------------------------------------------------------------------------------------------
# reading


def open_input(uri: str) -> pa.NativeFile:
    """Open an object for random-access binary reading (seekable; use as a context manager).

    Raises:
        NotFoundError: no such object or bucket.
        AccessDeniedError: the store refused the request.
        BadURIError: malformed URI.
    """
    fs, path = resolve(uri)

    def attempt() -> pa.NativeFile:
        try:
            return fs.open_input_file(path)
        except IO_ERRORS as e:
            raise translate(e, uri, "open for reading") from e

    return retrying(attempt, uri, "open for reading")


def read_bytes(uri: str) -> bytes:
    """The whole object as bytes.

    Objects are expected not to change while being read (write new keys, publish a pointer);
    :func:`read_pointer` is the reader for objects that are replaced in place.

    Raises:
        NotFoundError, AccessDeniedError, BadURIError, StorageError.
    """
    fs, path = resolve(uri)

    def attempt() -> bytes:
        try:
            with fs.open_input_stream(path) as f:
                return bytes(f.readall())
        except IO_ERRORS as e:
            raise translate(e, uri, "read") from e

    return retrying(attempt, uri, "read")


def read_text(uri: str, encoding: str = "utf-8") -> str:
    """The whole object decoded as text (``encoding``, strict)."""
    return read_bytes(uri).decode(encoding)


def read_json(uri: str) -> Any:
    """The object parsed as UTF-8 JSON (``json.JSONDecodeError`` for invalid JSON)."""
    return json.loads(read_bytes(uri).decode("utf-8"))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file (or a directory of Parquet files) as a table.

    Raises:
        NotFoundError, AccessDeniedError, BadURIError, StorageError; ``pyarrow.ArrowInvalid``
        for a file that is not Parquet.
    """
    fs, path = resolve(uri)

    def attempt() -> pa.Table:
        try:
            return pq.read_table(path, filesystem=fs, columns=columns)
        except OSError as e:
            raise translate(e, uri, "read parquet") from e

    return retrying(attempt, uri, "read parquet")


def exists(uri: str) -> bool:
    """Whether an object, or a directory / non-empty prefix, exists at ``uri``.

    Raises:
        AccessDeniedError, BadURIError, StorageError (a missing bucket is ``False``).
    """
    fs, path = resolve(uri)

    def attempt() -> bool:
        try:
            return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)
        except IO_ERRORS as e:
            raise translate(e, uri, "check existence") from e

    return retrying(attempt, uri, "check existence")


def _parse_http_time(value: str) -> int | None:
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            dt = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
    return int(dt.timestamp()) * 1_000_000_000


def info(uri: str) -> ObjectInfo:
    """Size, modification time and (S3) ETag of one object; one metadata request, no data read.

    Raises:
        NotFoundError: no such object (a directory or bare prefix is not an object).
        AccessDeniedError, BadURIError, StorageError.
    """
    return retrying(lambda: _info(uri), uri, "get information")


def _info(uri: str) -> ObjectInfo:
    fs, path = resolve(uri)
    try:
        if is_s3(uri):
            with fs.open_input_file(path) as f:
                meta = f.metadata()
            headers = {k.decode() if isinstance(k, bytes) else k: v for k, v in meta.items()}

            def header(name: str) -> str | None:
                v = headers.get(name)
                return v.decode() if isinstance(v, bytes) else v

            etag = header("ETag")
            modified = header("Last-Modified")
            size = header("Content-Length")
            if size is None:
                size = str(f.size())
            return ObjectInfo(
                size=int(size),
                mtime_ns=_parse_http_time(modified) if modified else None,
                etag=etag.strip('"') if etag else None,
            )
        fi = fs.get_file_info(path)
    except IO_ERRORS as e:
        raise translate(e, uri, "get information") from e
    if fi.type == pafs.FileType.NotFound:
        raise NotFoundError(f"{uri}: no such object")
    if fi.type != pafs.FileType.File:
        raise NotFoundError(f"{uri}: no such object (it is a directory)")
    return ObjectInfo(size=int(fi.size), mtime_ns=fi.mtime_ns, etag=None)


def list_prefix(uri: str, recursive: bool = True) -> list[str]:
    """The objects under a directory (local) or key prefix (S3), as sorted full URIs.

    ``uri`` is treated as a directory: ``list_prefix("s3://b/x")`` lists ``s3://b/x/...``, not
    ``s3://b/xy``. Results start with ``uri`` (trailing ``/`` removed) written as given, so a
    relative local path gives relative paths. Only objects are listed (no directories);
    ``recursive=False`` lists the objects directly under ``uri``. A missing prefix lists nothing.

    Raises:
        NotFoundError: the bucket does not exist.
        AccessDeniedError, BadURIError, StorageError.
    """
    fs, path = resolve(uri)
    sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)

    def attempt() -> list[pafs.FileInfo]:
        try:
            return list(fs.get_file_info(sel))
        except NotADirectoryError:
            return []
        except IO_ERRORS as e:
            raise translate(e, uri, "list") from e

    infos = retrying(attempt, uri, "list")
    if is_s3(uri) and not infos and bucket_missing(uri):
        raise NotFoundError(f"{uri}: bucket {path.split('/', 1)[0]!r} does not exist")
    base = uri.rstrip("/")
    root = path.rstrip("/") + "/" if path != "/" else "/"
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File or TMP_RE.match(fi.base_name):
            continue
        rel = fi.path[len(root) :] if fi.path.startswith(root) else fi.path
        out.append(base + "/" + rel)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# S3 writes through boto3

SPOOL_BYTES = 64 * 1024 * 1024
"""An S3 write is buffered in memory up to this size, then in a temporary file."""

SINGLE_PUT_BYTES = 4 * 1024**3
"""Objects up to this size are sent as one PUT (S3 allows 5 GiB); larger ones in parts."""


def _s3_put(uri: str, body: Any, size: int) -> str:
    """Send ``body`` (bytes or a seekable binary file at 0) as the object; returns its ETag."""

    def put(client: Any, bucket: str, key: str) -> str:
        if hasattr(body, "seek"):
            body.seek(0)
        if size <= SINGLE_PUT_BYTES:
            out = client.put_object(Bucket=bucket, Key=key, Body=body, ContentLength=size)
            return str(out.get("ETag", "")).strip('"')
        # a multipart upload that fails is aborted by the transfer manager, never completed
        client.upload_fileobj(body, bucket, key)
        return ""

    return retrying(lambda: storage_retry.boto_call(uri, "write", put), uri, "write")


# --------------------------------------------------------------------------------------------
# writing


class OutputStream:
    """A binary output stream that publishes its object only on a successful :meth:`close`.

    Local: data goes to a temporary sibling that ``close`` renames into place. S3: data is
    buffered and sent in one request on ``close`` (retried while it fails transiently). An
    aborted write (an exception inside ``with``, or :meth:`abort`) or a failed ``close`` leaves
    the old object untouched (or no object, if there was none); it never deletes it.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._fs, self._path = resolve(uri)
        self._s3 = is_s3(uri)
        self._done = False
        self._stream: Any = None
        try:
            if self._s3:
                self._stream = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
                return
            parent, name = os.path.split(self._path)
            self._fs.create_dir(parent, recursive=True)
            self._target = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
            self._stream = self._fs.open_output_stream(self._target)
        except IO_ERRORS as e:
            self._done = True
            raise translate(e, uri, "open for writing") from e

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; returns the number of bytes written."""
        try:
            return int(self._stream.write(data))
        except IO_ERRORS as e:
            self.abort()
            raise translate(e, self.uri, "write") from e

    def tell(self) -> int:
        """Bytes written so far."""
        return int(self._stream.tell())

    def flush(self) -> None:
        """Nothing is published before :meth:`close`; kept for the file protocol."""

    @property
    def closed(self) -> bool:
        return self._done

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        """Finish the write and publish the object (idempotent).

        Raises:
            TransientStorageError: the store kept failing; the old object is unchanged.
            NotFoundError (missing bucket), AccessDeniedError, StorageError.
        """
        if self._done:
            return
        self._done = True
        try:
            if self._s3:
                size = self._stream.tell()
                _s3_put(self.uri, self._stream, size)
            else:
                self._stream.close()
                os.replace(self._target, self._path)
        except IO_ERRORS as e:
            self._discard()
            raise translate(e, self.uri, "write") from e
        except BaseException:
            self._discard()
            raise
        finally:
            if self._s3:
                self._stream.close()

    def abort(self) -> None:
        """Give up the write without publishing it."""
        if self._done:
            return
        self._done = True
        self._discard()

    def _discard(self) -> None:
        """Drop what was written; the target object is never touched."""
        try:
            if not self._stream.closed:
                self._stream.close()
        except (*IO_ERRORS, ValueError):
            pass
        if not self._s3:
            try:
                self._fs.delete_file(self._target)
            except IO_ERRORS:
                pass

    def __enter__(self) -> OutputStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.abort()


def open_output(uri: str) -> OutputStream:
    """Open an object for binary writing; it is published on ``close`` (see :class:`OutputStream`).

    Parent directories of local paths are created.

    Raises:
        NotFoundError (missing bucket, possibly only at ``close``), AccessDeniedError,
        BadURIError, StorageError.
    """
    return OutputStream(uri)


def write_bytes(uri: str, data: bytes | bytearray | memoryview) -> None:
    """Write an object in one piece (atomic: readers see the old or the new content).

    On S3 this is one PUT, retried while the store fails transiently; a write that fails in the
    end leaves the old object as it was.

    Raises:
        NotFoundError (missing bucket), AccessDeniedError, BadURIError, TransientStorageError,
        StorageError.
    """
    if is_s3(uri):
        payload = bytes(data)
        _s3_put(uri, payload, len(payload))
        return
    with open_output(uri) as f:
        f.write(data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` encoded with ``encoding`` (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode(encoding))


def write_json(uri: str, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as UTF-8 JSON (keys kept in insertion order; see :func:`write_bytes`)."""
    write_bytes(uri, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def write_parquet(uri: str, table: pa.Table, **options: Any) -> None:
    """Write ``table`` as one Parquet file; ``options`` go to :func:`pyarrow.parquet.write_table`."""
    with open_output(uri) as f:
        pq.write_table(table, f, **options)


def delete(uri: str, missing_ok: bool = False) -> None:
    """Delete one object.

    Raises:
        NotFoundError: no such object (unless ``missing_ok``).
        AccessDeniedError, BadURIError, StorageError.
    """
    fs, path = resolve(uri)

    def attempt() -> None:
        try:
            fi = fs.get_file_info(path)
            if fi.type == pafs.FileType.Directory:
                raise NotFoundError(f"{uri}: no such object (it is a directory; use delete_prefix)")
            fs.delete_file(path)
        except IO_ERRORS as e:
            raise translate(e, uri, "delete") from e

    try:
        retrying(attempt, uri, "delete")
    except NotFoundError:
        if missing_ok:
            return
        raise


def delete_prefix(uri: str) -> None:
    """Delete every object under a directory / key prefix, and the directory itself.

    A missing prefix is not an error. A whole bucket or the filesystem root is refused.

    Raises:
        BadURIError: ``uri`` names a bucket or ``/``.
        AccessDeniedError, StorageError.
    """
    fs, path = resolve(uri)
    if (is_s3(uri) and "/" not in path) or path == "/":
        raise BadURIError(f"refusing to delete everything under {uri!r}")

    def attempt() -> None:
        try:
            fi = fs.get_file_info(path)
            if fi.type == pafs.FileType.NotFound:
                return
            if fi.type == pafs.FileType.File and not is_s3(uri):
                raise BadURIError(f"{uri} is a file, not a directory; use delete()")
            fs.delete_dir_contents(path, missing_dir_ok=True)
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)
        except IO_ERRORS as e:
            err = translate(e, uri, "delete")
            if isinstance(err, NotFoundError) and not bucket_missing(uri):
                return
            raise err from e

    retrying(attempt, uri, "delete")
