"""The encode lock: a lease on an index root, so only one encode run publishes there at a time.

The lease is the object ``<root>/LOCK`` (:data:`duch_core.index_store.LOCK_NAME`), written with
the conditional requests of :mod:`duch_core.pointers`. It names its holder (:class:`LockInfo`) and
expires unless refreshed, so a run that dies leaves a lock that the next run takes over.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from duch_core import pointers, storage
from duch_core.index_store import LOCK_NAME, EncodeConflictError, utc_now_iso

log = logging.getLogger("duch.index")


class LockHeldError(EncodeConflictError):
    """Another run holds the encode lock of the index root."""


class LockLostError(EncodeConflictError):
    """This run's lease expired and another run took the lock."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock object says about its holder.

    Attributes:
        owner: the holder's random token.
        host, pid: where the holder runs.
        started: when it took the lock (UTC ISO time).
        expires: when the lease ends unless refreshed (seconds since the epoch).
        version: the index version the holder is writing, if it has one yet.
    """

    owner: str
    host: str = ""
    pid: int = 0
    started: str = ""
    expires: float = 0.0
    version: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": self.host,
                "pid": self.pid,
                "started": self.started,
                "expires": self.expires,
                "expires_utc": _dt.datetime.fromtimestamp(self.expires, _dt.UTC).isoformat(
                    timespec="seconds"
                ),
                "version": self.version,
            },
            indent=2,
        ).encode()

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        """The holder, or ``None`` when the object is not a lock (it then counts as expired)."""
        try:
            d = json.loads(data)
            return cls(
                owner=str(d["owner"]),
                host=str(d.get("host", "")),
                pid=int(d.get("pid", 0)),
                started=str(d.get("started", "")),
                expires=float(d["expires"]),
                version=str(d["version"]) if d.get("version") else None,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        left = self.expires - now
        when = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return (
            f"held by {self.host or '?'} pid {self.pid} since {self.started or '?'} "
            f"({when}; writing version {self.version or '-'})"
        )


class EncodeLock:
    """A lease on an index root: only the run that holds it publishes there.

    The lease is the object ``<root>/LOCK``, created with a conditional write (S3
    ``If-None-Match: *``; locally under an exclusive directory lock), so of two runs only one
    creates it. It names its holder and expires ``ttl_s`` seconds after the last refresh; a
    lease past its expiry may be taken over (a conditional write on its ETag, so only one run
    takes it). :meth:`start_heartbeat` refreshes it every ``ttl_s / 3`` seconds while the run
    works, and :meth:`refresh` right before publishing proves the lease is still this run's.
    Expiry compares wall clocks of different machines: keep ``ttl_s`` well above their skew.

    Args:
        root: the index root.
        ttl_s: lease length in seconds.
        clock: seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self, root: str, ttl_s: float = 600.0, clock: Callable[[], float] = time.time
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl_s}")
        self.root = root
        self.uri = storage.join(root, LOCK_NAME)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self.info = LockInfo(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=utc_now_iso(),
        )
        self.took_over: LockInfo | None = None
        self._etag: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def held(self) -> bool:
        return self._etag is not None and not self.lost

    def _body(self, version: str | None) -> bytes:
        self.info = LockInfo(
            self.info.owner,
            self.info.host,
            self.info.pid,
            self.info.started,
            self.clock() + self.ttl_s,
            version if version is not None else self.info.version,
        )
        return self.info.to_json()

    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds for a held one to go.

        Raises:
            LockHeldError: another run holds an unexpired lease (the message names it).
            TransientStorageError, StorageError: the store failed.
        """
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                self._etag = pointers.put_conditional(
                    self.uri, self._body(None), if_none_match=True
                )
                return
            except storage.PreconditionFailedError:
                pass
            try:
                current = pointers.read_versioned(self.uri)
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
            holder = LockInfo.parse(current.data)
            now = self.clock()
            if holder is None or holder.expires < now:
                try:
                    self._etag = pointers.put_conditional(
                        self.uri, self._body(None), if_match=current.etag
                    )
                except storage.PreconditionFailedError:
                    continue  # another run took it first, or its holder refreshed it
                self.took_over = holder
                log.warning(
                    "took over the expired encode lock of %s (%s)",
                    self.root,
                    holder.describe(now) if holder else "unreadable lock object",
                )
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockHeldError(
                    f"another encode run is working on {self.root}: the lock {self.uri} is "
                    f"{holder.describe(now)}; nothing was written. It is free again when that "
                    "run ends or its lease expires (lock_ttl_s)."
                )
            time.sleep(max(0.05, min(poll_s, left, holder.expires - now + 0.05)))

    def refresh(self, version: str | None = None) -> None:
        """Extend the lease (and record ``version``); proves the lock is still this run's.

        Raises:
            LockLostError: the lease expired and another run took the lock.
            TransientStorageError, StorageError: the store failed (the lease may still hold).
        """
        with self._mutex:
            if self._etag is None:
                raise LockLostError(f"{self.uri}: this run does not hold the lock")
            if self.lost:
                raise LockLostError(f"{self.uri}: this run's lease expired and was taken over")
            try:
                self._etag = pointers.put_conditional(
                    self.uri, self._body(version), if_match=self._etag
                )
            except storage.PreconditionFailedError:
                self.lost = True
                try:
                    holder = LockInfo.parse(pointers.read_versioned(self.uri).data)
                except (FileNotFoundError, storage.StorageError):
                    holder = None
                raise LockLostError(
                    f"{self.uri}: this run's lease expired and the lock was taken over"
                    + (f" ({holder.describe(self.clock())})" if holder else "")
                ) from None

    def _beat(self) -> None:
        period = self.ttl_s / 3
        while not self._stop.wait(period):
            try:
                self.refresh()
            except LockLostError as e:
                log.error("%s", e)
                return
            except storage.StorageError as e:
                log.warning("could not refresh the encode lock (will retry): %s", e)

    def start_heartbeat(self) -> None:
        """Refresh the lease every ``ttl_s / 3`` seconds in a background thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="encode-lock", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Stop refreshing and delete the lock if it is still this run's (never raises)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._mutex:
            if self._etag is None or self.lost:
                return
            etag, self._etag = self._etag, None
        try:
            pointers.delete_conditional(self.uri, etag)
        except storage.PreconditionFailedError:
            log.warning("the encode lock of %s was taken over before it was released", self.root)
        except storage.StorageError as e:
            log.warning("could not release the encode lock %s (it expires): %s", self.uri, e)
