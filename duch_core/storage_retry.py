"""Translating store errors, and retrying the transient ones with backoff.

Errors of pyarrow, the OS and boto3 are mapped to :mod:`duch_core.storage_errors`. Transient
failures of the store (HTTP 5xx, throttling, time-outs, refused or reset connections) are retried
with exponential backoff and jitter: ``DUCH_S3_ATTEMPTS`` tries in all (default 5), waits from
``DUCH_S3_BACKOFF_S`` (0.5 s) doubling up to ``DUCH_S3_BACKOFF_MAX_S`` (8 s), read at every call.
After :data:`BREAKER_THRESHOLD` operations in a row have used up their retries, later operations
try once until one succeeds, so a long outage fails fast instead of waiting per object. Missing
objects, denied requests and bad URIs are never retried.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from duch_core.storage_errors import (
    TRANSIENT_MARKERS,
    AccessDeniedError,
    BadURIError,
    NotFoundError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
    is_transient,
)
from duch_core.uris import boto_client, env, is_s3, resolve, split_s3

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# translating errors

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


def bucket_missing(uri: str) -> bool:
    """Whether ``uri``'s S3 bucket is known not to exist (``False`` when that cannot be told)."""
    try:
        fs, path = resolve(uri)
        bucket = path.split("/", 1)[0]
        return fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except (OSError, pa.ArrowException, StorageError):
        return False


def translate(exc: BaseException, uri: str, action: str) -> StorageError:
    """Map a pyarrow/OS error for ``uri`` to the :mod:`duch_core.storage_errors` types."""
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
        if is_s3(uri) and bucket_missing(uri):
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


IO_ERRORS = (OSError, pa.ArrowException)
"""What pyarrow and the OS raise for a failed request."""


def _translate_boto(exc: BaseException, uri: str, action: str) -> StorageError:
    """Map a boto3/botocore error for ``uri`` to the :mod:`duch_core.storage_errors` types."""
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
        if status >= 500 or status in (408, 409, 429) or any(m in code for m in TRANSIENT_MARKERS):
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


def boto_call(uri: str, action: str, call: Callable[[Any, str, str], T]) -> T:
    """``call(client, bucket, key)`` once, its errors translated (no retry)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    if not key:
        raise BadURIError(f"{uri!r} names a bucket, not an object")
    try:
        return call(boto_client(bucket), bucket, key)
    except (ClientError, BotoCoreError, OSError) as e:
        raise _translate_boto(e, uri, action) from e


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

_breaker_lock = threading.Lock()
_breaker = {"exhausted": 0}


def _env_number(name: str, default: float, kind: Callable[[str], float]) -> float:
    raw = env(name)
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

    Errors of the store are translated to the :mod:`duch_core.storage_errors` types (``action`` and ``uri``
    name the operation in messages). For several requests that must succeed or fail together,
    e.g. reading a Parquet footer.

    Raises:
        TransientStorageError: still failing once the retries are used up.
        NotFoundError, AccessDeniedError, BadURIError, StorageError: at once, not retried.
    """
    policy = retry_policy()
    with _breaker_lock:
        open_ = _breaker["exhausted"] >= BREAKER_THRESHOLD
    attempts = 1 if open_ else policy.attempts
    for i in range(attempts):
        try:
            out = fn()
        except StorageError as e:
            err: StorageError = e
            cause: BaseException = e
        except OSError as e:
            err, cause = translate(e, uri, action), e
        else:
            with _breaker_lock:
                _breaker["exhausted"] = 0
            return out
        if not isinstance(err, TransientStorageError):
            raise err from (None if err is cause else cause)
        if i == attempts - 1:
            with _breaker_lock:
                _breaker["exhausted"] += 1
            if attempts > 1:
                err = TransientStorageError(f"{err} (after {attempts} tries)")
            raise err from cause
        time.sleep(policy.delay(i))
    raise AssertionError("unreachable")
