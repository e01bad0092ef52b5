"""Where a URI points: parsing, S3 settings, and the filesystem (or boto3 client) per setting.

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
inherit it; use the environment for them). One filesystem object (and one boto3 client) is cached
per distinct setting. :mod:`duch_core.storage` re-exports :func:`join`, :func:`is_s3`,
:func:`resolve` and :func:`configure_s3`, the part most callers need.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from duch_core.storage_errors import BadURIError

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_HALF_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:/(?!/)")
TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
"""Names of the temporary siblings local writes go through (never listed)."""


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


def split_s3(uri: str) -> tuple[str, str]:
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


def local_path(uri: str) -> str:
    """The absolute local path of a local path or ``file://`` URI."""
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


def kind(uri: str) -> str:
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
    kind(base)
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
class S3Settings:
    """The S3 settings in force: environment and :func:`configure_s3` overrides combined."""

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


def env(name: str) -> str | None:
    """An environment variable's value, stripped; ``None`` when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def s3_settings() -> S3Settings:
    """The S3 settings in force now (overrides first, then the environment)."""
    with _lock:
        ov = dict(_overrides)
    endpoint_url = ov.get("endpoint") or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
    endpoint, scheme = _parse_endpoint(endpoint_url) if endpoint_url else (None, "https")
    region = ov.get("region") or env("AWS_REGION") or env("AWS_DEFAULT_REGION")
    if region is None and endpoint is not None:
        region = "us-east-1"
    if ov.get("access_key") or ov.get("secret_key"):
        access, secret, token = ov.get("access_key"), ov.get("secret_key"), None
    else:
        access, secret = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
        token = env("AWS_SESSION_TOKEN")
        if not (access and secret):
            access = secret = token = None
    return S3Settings(endpoint, scheme, region, access, secret, token)


def _region_for(s: S3Settings, bucket: str) -> str:
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
    s = s3_settings()
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
    if kind(uri) == "s3":
        bucket, key = split_s3(uri)
        return _s3_fs(bucket), f"{bucket}/{key}" if key else bucket
    return _LOCAL, local_path(uri)


def boto_client(bucket: str) -> Any:
    """A boto3 S3 client for ``bucket`` with the settings in force (cached; SDK retries off)."""
    import boto3
    from botocore.config import Config

    s = s3_settings()
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
