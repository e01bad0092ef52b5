"""All file I/O of the project, over :mod:`pyarrow.fs`: local paths, ``file://`` and ``s3://`` URIs.

A *uri* is one of

* a local path (``/data/x.parquet``, ``out/x.json``; relative paths are relative to the cwd),
* ``file:///abs/path`` (percent-encoding is decoded),
* ``s3://bucket/key``.

S3 settings come from the standard AWS environment, read at every call so that a process that
changes its environment (a test fixture, a Ray worker) sees the change:

* ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (``http://host:port`` or ``https://host``) for
  S3-compatible stores; the scheme selects http or https, path-style addressing is used;
* ``AWS_REGION`` or ``AWS_DEFAULT_REGION``; with an endpoint and no region, ``us-east-1``; with
  neither, the bucket's region is looked up once per bucket;
* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``; without them the AWS
  SDK's default chain (profiles, instance metadata) is used.

:func:`configure_s3` overrides any of these for the current process only (Ray workers do not
inherit it; use the environment for them). One filesystem object is cached per distinct setting.

Publishing: data objects are written first, then :func:`publish_pointer` writes a small pointer
object last. Local writes go to a temporary sibling (``.<name>.tmp-<hex>``, never listed) and are
renamed into place. S3 writes are buffered (in memory, spilling to a temporary file) and sent as
one PUT request when the stream closes: an aborted or failed write sends nothing, so the object
keeps its old content; it is never deleted. Readers therefore see the old or the new content,
never a partial object. (S3 writes and the conditional requests below go through boto3, since
pyarrow can neither abort an upload without completing it nor send conditional headers; reads
and listings use pyarrow.)

Transient failures of the store (HTTP 5xx, throttling, time-outs, refused or reset connections)
are retried with exponential backoff and jitter: ``DUCH_S3_ATTEMPTS`` tries in all (default 5),
waits from ``DUCH_S3_BACKOFF_S`` (0.5 s) doubling up to ``DUCH_S3_BACKOFF_MAX_S`` (8 s), read at
every call. After :data:`BREAKER_THRESHOLD` operations in a row have used up their retries, later
operations try once until one succeeds, so a long outage fails fast instead of waiting per
object. Missing objects, denied requests and bad URIs are never retried.

Conditional requests (:func:`read_versioned`, :func:`put_conditional`, :func:`delete_conditional`)
compare-and-swap small objects by ETag (S3 ``If-Match`` / ``If-None-Match: *``; locally under an
exclusive ``flock`` of the parent directory). Locks and the ``LATEST`` pointer of an index use them.

Errors: :class:`NotFoundError` (missing object or bucket), :class:`AccessDeniedError` (wrong
credentials, denied), :class:`BadURIError` (unsupported scheme, malformed URI),
:class:`TransientStorageError` (the store failed in a way that may pass; raised once the retries
are used up), :class:`PreconditionFailedError` (a conditional request found another version), and
:class:`StorageError` for any other failure of the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "AccessDeniedError",
    "BadURIError",
    "NotFoundError",
    "ObjectInfo",
    "OutputStream",
    "PreconditionFailedError",
    "RetryPolicy",
    "StorageError",
    "TransientStorageError",
    "Versioned",
    "configure_s3",
    "delete",
    "delete_conditional",
    "delete_prefix",
    "decode_pointer",
    "exists",
    "info",
    "is_s3",
    "is_transient",
    "join",
    "list_prefix",
    "new_version_id",
    "open_input",
    "open_output",
    "publish_pointer",
    "put_conditional",
    "read_bytes",
    "read_json",
    "read_parquet",
    "read_pointer",
    "read_text",
    "read_versioned",
    "resolve",
    "retry_policy",
    "retrying",
    "version_time",
    "write_bytes",
    "write_json",
    "write_parquet",
    "write_text",
]

MAX_POINTER_BYTES = 1024
"""Upper bound on a pointer object's size: a pointer names a version, it does not hold data."""


class StorageError(Exception):
    """A storage operation failed."""


class NotFoundError(StorageError, FileNotFoundError):
    """No object (or no bucket) at the URI."""


class AccessDeniedError(StorageError, PermissionError):
    """The store refused the request: wrong or missing credentials, or no permission."""


class BadURIError(StorageError, ValueError):
    """The URI is empty, malformed, or uses an unsupported scheme."""


class TransientStorageError(StorageError):
    """The store failed in a way that may pass (5xx, throttling, time-out, connection reset).

    Raised only after the retries (:func:`retry_policy`) are used up.
    """


class PreconditionFailedError(StorageError):
    """A conditional request found the object in another state than the one it was given."""


T = TypeVar("T")


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
# URIs

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_HALF_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:/(?!/)")
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def _scheme(uri: str) -> str:
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else ""


def _check_str(uri: object) -> str:
    if not isinstance(uri, str):
        raise BadURIError(f"a URI must be a str, got {type(uri).__name__}")
    if not uri or not uri.strip():
        raise BadURIError("empty URI")
    if "\x00" in uri:
        raise BadURIError(f"URI contains a NUL character: {uri!r}")
    return uri


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/`` -> ``("bucket", "key")`` (trailing slashes dropped)."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise BadURIError(f"no bucket in S3 URI {uri!r} (expected s3://bucket/key)")
    if not _BUCKET_RE.match(bucket):
        raise BadURIError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
    if "?" in key or "#" in key:
        raise BadURIError(f"query strings and fragments are not supported in S3 URIs: {uri!r}")
    key = key.rstrip("/")
    if key and any(part == "" for part in key.split("/")):
        raise BadURIError(f"empty path component ('//') in S3 URI {uri!r}")
    return bucket, key


def _local_path(uri: str) -> str:
    if _scheme(uri) == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise BadURIError(f"file URIs must name a local path (file:///abs/path), got {uri!r}")
        if parts.query or parts.fragment:
            raise BadURIError(f"query strings and fragments are not supported: {uri!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise BadURIError(f"file URI without an absolute path: {uri!r}")
        return os.path.abspath(path)
    return os.path.abspath(os.path.expanduser(uri))


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (no validation beyond the scheme)."""
    return isinstance(uri, str) and _scheme(uri) == "s3"


def _kind(uri: str) -> str:
    """``"s3"`` or ``"local"``; raises :class:`BadURIError` for anything else."""
    _check_str(uri)
    scheme = _scheme(uri)
    if scheme == "s3":
        return "s3"
    if scheme in ("", "file"):
        if scheme == "" and _HALF_SCHEME_RE.match(uri):
            raise BadURIError(f"malformed URI {uri!r} (expected scheme://...)")
        return "local"
    raise BadURIError(
        f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://"
    )


def join(base: str, *parts: str) -> str:
    """Join path parts onto a path or URI with ``/``.

    Leading and trailing slashes of each part are dropped and empty parts skipped, so
    ``join("s3://b/x/", "/y", "z.json") == "s3://b/x/y/z.json"``. The scheme of ``base`` is kept.

    Raises:
        BadURIError: ``base`` is empty or has an unsupported scheme.
    """
    _kind(base)
    m = _SCHEME_RE.match(base)
    head, rest = (base[: m.end()], base[m.end() :]) if m else ("", base)
    pieces = [p.strip("/") for p in parts]
    pieces = [p for p in pieces if p]
    if not pieces:
        return base
    stem = rest.rstrip("/")
    if not stem and rest.startswith("/"):
        return head + "/" + "/".join(pieces)
    return head + (stem + "/" if stem else "") + "/".join(pieces)


# --------------------------------------------------------------------------------------------
# S3 settings and filesystem cache


@dataclass(frozen=True)
class _S3Settings:
    endpoint: str | None  # host[:port]
    scheme: str
    region: str | None
    access_key: str | None
    secret_key: str | None
    session_token: str | None


_lock = threading.Lock()
_overrides: dict[str, str | None] = {}
_fs_cache: dict[Any, Any] = {}  # pyarrow filesystems and boto3 clients, per setting
_region_cache: dict[tuple[str, str], str] = {}
_LOCAL = pafs.LocalFileSystem()


def configure_s3(
    endpoint: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
) -> None:
    """Override S3 settings for this process; ``None`` keeps the environment's value.

    Calling it with no arguments removes every override. Ray workers and other processes do not
    see the override: configure them through the AWS environment variables.

    Args:
        endpoint: ``http://host:port`` or ``https://host`` of an S3-compatible store.
        region: the region, e.g. ``"us-east-1"``.
        access_key: access key id; give ``secret_key`` with it.
        secret_key: secret access key.

    Raises:
        BadURIError: ``endpoint`` is not ``http(s)://host[:port]``.
    """
    if endpoint is not None:
        _parse_endpoint(endpoint)
    with _lock:
        _overrides.clear()
        _overrides.update(
            {
                "endpoint": endpoint,
                "region": region,
                "access_key": access_key,
                "secret_key": secret_key,
            }
        )


def _parse_endpoint(url: str) -> tuple[str, str]:
    """``http://127.0.0.1:8333/`` -> ``("127.0.0.1:8333", "http")``; no scheme means https."""
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadURIError(f"S3 endpoint must look like http(s)://host[:port], got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise BadURIError(f"S3 endpoint must not have a path or query: {url!r}")
    return parts.netloc, parts.scheme


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _s3_settings() -> _S3Settings:
    with _lock:
        ov = dict(_overrides)
    endpoint_url = ov.get("endpoint") or _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
    endpoint, scheme = _parse_endpoint(endpoint_url) if endpoint_url else (None, "https")
    region = ov.get("region") or _env("AWS_REGION") or _env("AWS_DEFAULT_REGION")
    if region is None and endpoint is not None:
        region = "us-east-1"
    if ov.get("access_key") or ov.get("secret_key"):
        access, secret, token = ov.get("access_key"), ov.get("secret_key"), None
    else:
        access, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
        token = _env("AWS_SESSION_TOKEN")
        if not (access and secret):
            access = secret = token = None
    return _S3Settings(endpoint, scheme, region, access, secret, token)


def _region_for(s: _S3Settings, bucket: str) -> str:
    """The configured region, else the bucket's (looked up once per bucket)."""
    if s.region is not None:
        return s.region
    key = (s.access_key or "", bucket)
    with _lock:
        region = _region_cache.get(key)
    if region is None:
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException):
            region = "us-east-1"
        with _lock:
            _region_cache[key] = region
    return region


def _s3_fs(bucket: str) -> pafs.FileSystem:
    s = _s3_settings()
    region = _region_for(s, bucket)
    cache_key = (s, region)
    with _lock:
        fs = _fs_cache.get(cache_key)
        if fs is None:
            fs = pafs.S3FileSystem(
                access_key=s.access_key,
                secret_key=s.secret_key,
                session_token=s.session_token,
                region=region,
                scheme=s.scheme,
                endpoint_override=s.endpoint,
                allow_delayed_open=True,
            )
            _fs_cache[cache_key] = fs
    return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path within it for ``uri``.

    Returns:
        ``(LocalFileSystem, "/abs/path")`` or ``(S3FileSystem, "bucket/key")``; trailing slashes
        are dropped.

    Raises:
        BadURIError: empty, malformed or unsupported URI.
    """
    if _kind(uri) == "s3":
        bucket, key = _split_s3(uri)
        return _s3_fs(bucket), f"{bucket}/{key}" if key else bucket
    return _LOCAL, _local_path(uri)


# --------------------------------------------------------------------------------------------
# errors

_NOT_FOUND_MARKERS = (
    "NO_SUCH_KEY",
    "NO_SUCH_BUCKET",
    "NoSuchKey",
    "NoSuchBucket",
    "does not exist",
)
_DENIED_MARKERS = (
    "ACCESS_DENIED",
    "AccessDenied",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "EXPIRED_TOKEN",
    "ExpiredToken",
    "INVALID_CLIENT_TOKEN_ID",
    "MISSING_AUTHENTICATION_TOKEN",
    "UNRECOGNIZED_CLIENT",
    "HTTP response code: 403",
    "Forbidden",
)


def _bucket_missing(uri: str) -> bool:
    try:
        fs, path = resolve(uri)
        bucket = path.split("/", 1)[0]
        return fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except (OSError, pa.ArrowException, StorageError):
        return False


def _translate(exc: BaseException, uri: str, action: str) -> StorageError:
    """Map a pyarrow/OS error for ``uri`` to the module's exception types."""
    if isinstance(exc, StorageError):
        return exc
    msg = str(exc)
    if isinstance(exc, PermissionError) or any(m in msg for m in _DENIED_MARKERS):
        return AccessDeniedError(
            f"{uri}: access denied while trying to {action} (check the credentials and the "
            f"permissions; S3 settings come from AWS_* variables): {msg}"
        )
    if isinstance(exc, FileNotFoundError | IsADirectoryError) or any(
        m in msg for m in _NOT_FOUND_MARKERS
    ):
        if is_s3(uri) and _bucket_missing(uri):
            bucket = uri[len("s3://") :].split("/", 1)[0]
            return NotFoundError(f"{uri}: bucket {bucket!r} does not exist")
        return NotFoundError(f"{uri}: no such object ({msg})")
    if "is a directory" in msg:
        return NotFoundError(f"{uri}: no such object (it is a directory)")
    hint = ""
    if "curlCode" in msg or "connect" in msg.lower():
        hint = " (is the S3 endpoint reachable? see AWS_ENDPOINT_URL)"
    if is_transient(exc):
        return TransientStorageError(f"{uri}: failed to {action}{hint}: {msg}")
    return StorageError(f"{uri}: failed to {action}{hint}: {msg}")


_IO_ERRORS = (OSError, pa.ArrowException)

# What pyarrow's AWS SDK and boto3 say when the store failed in a way that may pass.
_TRANSIENT_MARKERS = (
    "HTTP status 5",  # pyarrow: "AWS Error UNKNOWN (HTTP status 503)" (HEAD has no body)
    "HTTP status 429",
    "HTTP status 408",
    "SLOW_DOWN",
    "SlowDown",
    "INTERNAL_FAILURE",
    "InternalError",
    "SERVICE_UNAVAILABLE",
    "ServiceUnavailable",
    "THROTTLING",
    "Throttl",
    "REQUEST_TIMEOUT",
    "RequestTimeout",
    "NETWORK_CONNECTION",  # curl: refused, reset, timed out
    "curlCode",
    "Connection reset",
    "Broken pipe",
    "timed out",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the store that may pass if the request is repeated.

    HTTP 5xx, 408 and 429, throttling, time-outs, refused and reset connections are; missing
    objects, denied requests, bad URIs and unreadable data are not.
    """
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, StorageError | FileNotFoundError | PermissionError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    msg = str(exc)
    return any(m in msg for m in _TRANSIENT_MARKERS)


# --------------------------------------------------------------------------------------------
# retries


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried.

    Attributes:
        attempts: tries in all (1 = no retry).
        base_s: the first wait; each following wait doubles, up to ``max_s``.
        max_s: the longest wait. Each wait is drawn from ``[w / 2, w]`` (jitter).
    """

    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 8.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        w = min(self.max_s, self.base_s * (2.0**retry))
        return w * (0.5 + random.random() / 2)


BREAKER_THRESHOLD = 8
"""Operations in a row that used up their retries before later ones stop retrying."""

_breaker = {"exhausted": 0}


def _env_number(name: str, default: float, kind: Callable[[str], float]) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise StorageError(f"{name}={raw!r} is not a number") from e


def retry_policy() -> RetryPolicy:
    """The policy from ``DUCH_S3_ATTEMPTS``, ``DUCH_S3_BACKOFF_S``, ``DUCH_S3_BACKOFF_MAX_S``."""
    d = RetryPolicy()
    return RetryPolicy(
        attempts=max(1, int(_env_number("DUCH_S3_ATTEMPTS", d.attempts, int))),
        base_s=max(0.0, _env_number("DUCH_S3_BACKOFF_S", d.base_s, float)),
        max_s=max(0.0, _env_number("DUCH_S3_BACKOFF_MAX_S", d.max_s, float)),
    )


def retrying(fn: Callable[[], T], uri: str, action: str) -> T:
    """Call ``fn`` and retry it while it fails transiently (:func:`retry_policy`).

    Errors of the store are translated to this module's exception types (``action`` and ``uri``
    name the operation in messages). For several requests that must succeed or fail together,
    e.g. reading a Parquet footer.

    Raises:
        TransientStorageError: still failing once the retries are used up.
        NotFoundError, AccessDeniedError, BadURIError, StorageError: at once, not retried.
    """
    policy = retry_policy()
    with _lock:
        open_ = _breaker["exhausted"] >= BREAKER_THRESHOLD
    attempts = 1 if open_ else policy.attempts
    for i in range(attempts):
        try:
            out = fn()
        except StorageError as e:
            err: StorageError = e
            cause: BaseException = e
        except OSError as e:
            err, cause = _translate(e, uri, action), e
        else:
            with _lock:
                _breaker["exhausted"] = 0
            return out
        if not isinstance(err, TransientStorageError):
            raise err from (None if err is cause else cause)
        if i == attempts - 1:
            with _lock:
                _breaker["exhausted"] += 1
            if attempts > 1:
                err = TransientStorageError(f"{err} (after {attempts} tries)")
            raise err from cause
        time.sleep(policy.delay(i))
    raise AssertionError("unreachable")


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
        except _IO_ERRORS as e:
            raise _translate(e, uri, "open for reading") from e

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
        except _IO_ERRORS as e:
            raise _translate(e, uri, "read") from e

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
            raise _translate(e, uri, "read parquet") from e

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
        except _IO_ERRORS as e:
            raise _translate(e, uri, "check existence") from e

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
    except _IO_ERRORS as e:
        raise _translate(e, uri, "get information") from e
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
        except _IO_ERRORS as e:
            raise _translate(e, uri, "list") from e

    infos = retrying(attempt, uri, "list")
    if is_s3(uri) and not infos and _bucket_missing(uri):
        raise NotFoundError(f"{uri}: bucket {path.split('/', 1)[0]!r} does not exist")
    base = uri.rstrip("/")
    root = path.rstrip("/") + "/" if path != "/" else "/"
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File or _TMP_RE.match(fi.base_name):
            continue
        rel = fi.path[len(root) :] if fi.path.startswith(root) else fi.path
        out.append(base + "/" + rel)
    return sorted(out)


# --------------------------------------------------------------------------------------------
# S3 requests through boto3 (writes and conditional requests)

SPOOL_BYTES = 64 * 1024 * 1024
"""An S3 write is buffered in memory up to this size, then in a temporary file."""

SINGLE_PUT_BYTES = 4 * 1024**3
"""Objects up to this size are sent as one PUT (S3 allows 5 GiB); larger ones in parts."""


def _boto_client(bucket: str) -> Any:
    """A boto3 S3 client for ``bucket`` with this module's settings (cached; SDK retries off)."""
    import boto3
    from botocore.config import Config

    s = _s3_settings()
    region = _region_for(s, bucket)
    key = ("boto3", s, region)
    with _lock:
        client = _fs_cache.get(key)
    if client is not None:
        return client
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},  # retrying() does it, with backoff
        connect_timeout=5,
        read_timeout=30,
        s3={"addressing_style": "path"} if s.endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"{s.scheme}://{s.endpoint}" if s.endpoint else None,
        region_name=region,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        aws_session_token=s.session_token,
        config=config,
    )
    with _lock:
        _fs_cache.setdefault(key, client)
        return _fs_cache[key]


def _translate_boto(exc: BaseException, uri: str, action: str) -> StorageError:
    """Map a boto3/botocore error for ``uri`` to the module's exception types."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        msg = f"{code} (HTTP {status}): {err.get('Message', '')}"
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailedError(f"{uri}: precondition failed while trying to {action}")
        if status == 403 or code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
            return AccessDeniedError(
                f"{uri}: access denied while trying to {action} (check the credentials and the "
                f"permissions; S3 settings come from AWS_* variables): {msg}"
            )
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            if code == "NoSuchBucket":
                return NotFoundError(f"{uri}: bucket does not exist")
            return NotFoundError(f"{uri}: no such object ({msg})")
        if status >= 500 or status in (408, 409, 429) or any(m in code for m in _TRANSIENT_MARKERS):
            return TransientStorageError(f"{uri}: failed to {action}: {msg}")
        return StorageError(f"{uri}: failed to {action}: {msg}")
    if isinstance(
        exc,
        EndpointConnectionError | ConnectionClosedError | ReadTimeoutError | ConnectTimeoutError,
    ) or is_transient(exc):
        return TransientStorageError(
            f"{uri}: failed to {action} (is the S3 endpoint reachable? see AWS_ENDPOINT_URL): "
            f"{type(exc).__name__}: {exc}"
        )
    return StorageError(f"{uri}: failed to {action}: {type(exc).__name__}: {exc}")


def _boto_call(uri: str, action: str, call: Callable[[Any, str, str], T]) -> T:
    """``call(client, bucket, key)`` once, its errors translated (no retry)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split_s3(uri)
    if not key:
        raise BadURIError(f"{uri!r} names a bucket, not an object")
    try:
        return call(_boto_client(bucket), bucket, key)
    except (ClientError, BotoCoreError, OSError) as e:
        raise _translate_boto(e, uri, action) from e


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

    return retrying(lambda: _boto_call(uri, "write", put), uri, "write")


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
        except _IO_ERRORS as e:
            self._done = True
            raise _translate(e, uri, "open for writing") from e

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; returns the number of bytes written."""
        try:
            return int(self._stream.write(data))
        except _IO_ERRORS as e:
            self.abort()
            raise _translate(e, self.uri, "write") from e

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
        except _IO_ERRORS as e:
            self._discard()
            raise _translate(e, self.uri, "write") from e
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
        except (*_IO_ERRORS, ValueError):
            pass
        if not self._s3:
            try:
                self._fs.delete_file(self._target)
            except _IO_ERRORS:
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
        except _IO_ERRORS as e:
            raise _translate(e, uri, "delete") from e

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
        except _IO_ERRORS as e:
            err = _translate(e, uri, "delete")
            if isinstance(err, NotFoundError) and not _bucket_missing(uri):
                return
            raise err from e

    retrying(attempt, uri, "delete")


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
        raise _translate(e, uri, "read") from e
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
        raise _translate(e, uri, "write") from e


def read_versioned(uri: str) -> Versioned:
    """An object's bytes with its ETag, in one request (never a mixture of two versions).

    Locally the "ETag" is a hash of the content.

    Raises:
        NotFoundError: no such object.
        AccessDeniedError, BadURIError, TransientStorageError, StorageError.
    """
    if not is_s3(uri):
        _kind(uri)
        return _local_read(_local_path(uri), uri)

    def get(client: Any, bucket: str, key: str) -> Versioned:
        out = client.get_object(Bucket=bucket, Key=key)
        return Versioned(out["Body"].read(), str(out.get("ETag", "")).strip('"'))

    return retrying(lambda: _boto_call(uri, "read", get), uri, "read")


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
        _kind(uri)
        path = _local_path(uri)
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
            return _boto_call(uri, "write", put)
        except TransientStorageError:
            landed_maybe["flag"] = True
            raise
        except PreconditionFailedError:
            if landed_maybe["flag"]:
                try:
                    now = _boto_call(uri, "read", lambda c, b, k: c.get_object(Bucket=b, Key=k))
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
        _kind(uri)
        path = _local_path(uri)
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
            _boto_call(uri, "delete", rm)
        except NotFoundError:
            return
        except PreconditionFailedError:
            try:  # some stores answer 412 for a missing object: that is nothing to delete
                _boto_call(uri, "read", lambda c, b, k: c.head_object(Bucket=b, Key=k))
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
    data = read_versioned(pointer_uri).data if is_s3(pointer_uri) else read_bytes(pointer_uri)
    return decode_pointer(data, pointer_uri)
