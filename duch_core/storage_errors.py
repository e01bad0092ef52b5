"""The errors of the storage layer, and which of them may pass if the request is repeated.

Every function of :mod:`duch_core.storage`, :mod:`duch_core.pointers` and :mod:`duch_core.uris`
raises these types: :class:`NotFoundError` (missing object or bucket), :class:`AccessDeniedError`
(wrong credentials, denied), :class:`BadURIError` (unsupported scheme, malformed URI),
:class:`TransientStorageError` (the store failed in a way that may pass; raised once the retries
are used up), :class:`PreconditionFailedError` (a conditional request found another version), and
:class:`StorageError` for any other failure of the store. :func:`is_transient` decides what
:func:`duch_core.storage_retry.retrying` retries.
"""

from __future__ import annotations


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

    Raised only after the retries (:func:`duch_core.storage_retry.retry_policy`) are used up.
    """


class PreconditionFailedError(StorageError):
    """A conditional request found the object in another state than the one it was given."""


# What pyarrow's AWS SDK and boto3 say when the store failed in a way that may pass.
TRANSIENT_MARKERS = (
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
    return any(m in msg for m in TRANSIENT_MARKERS)
