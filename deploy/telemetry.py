"""What operators see of an ingress replica: metrics through Ray's Prometheus endpoint, and the
process's memory.

Metrics (``ray.serve.metrics``; exported by every node's Ray metrics agent with the prefix
``ray_`` and the deployment, replica and application as tags):

* ``duch_stage_latency_ms`` (histogram, tag ``stage``): ``decode``, ``encode``, ``search`` and
  ``catalog`` time of each search.
* ``duch_index_version_age_s`` (gauge): seconds since the served index version was encoded.
* ``duch_reload_failures_total`` (counter): index versions refused or failing to load, and
  failed polls of ``LATEST``.
* ``duch_refused_requests_total`` (counter, tag ``reason``): requests answered 4xx/5xx, by
  reason (``auth``, ``bad_request``, ``too_large``, ``media_type``, ``invalid``,
  ``not_found``, ``body_budget``, ``decode_busy``, ``no_index``, ``bundle_mismatch``, ...).

Counts are also kept in the replica for ``GET /v1/status``.
"""

from collections import Counter
from typing import Any

#: Histogram buckets, milliseconds: 0.25 ms .. 10 s.
LATENCY_BOUNDARIES_MS = [
    0.25,
    0.5,
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
]
STAGES = ("decode", "encode", "search", "catalog")


class Telemetry:
    """The metrics of one replica. ``export=False`` keeps only the local counts (tests, tools
    without Ray)."""

    def __init__(self, export: bool = True) -> None:
        self.refused: Counter[str] = Counter()
        self.reload_failures = 0
        self._m: dict[str, Any] = {}
        if export:
            from ray.serve import metrics

            self._m = {
                "latency": metrics.Histogram(
                    "duch_stage_latency_ms",
                    description="Time of each stage of a search, milliseconds.",
                    boundaries=LATENCY_BOUNDARIES_MS,
                    tag_keys=("stage",),
                ),
                "age": metrics.Gauge(
                    "duch_index_version_age_s",
                    description="Seconds since the served index version was encoded.",
                ),
                "reload_failures": metrics.Counter(
                    "duch_reload_failures_total",
                    description="Index versions refused or failing to load, failed polls.",
                ),
                "refused": metrics.Counter(
                    "duch_refused_requests_total",
                    description="Requests refused, by reason.",
                    tag_keys=("reason",),
                ),
            }

    def observe(self, stage: str, seconds: float) -> None:
        if "latency" in self._m:
            self._m["latency"].observe(seconds * 1e3, tags={"stage": stage})

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        if "refused" in self._m:
            self._m["refused"].inc(1, tags={"reason": reason})

    def reload_failed(self) -> None:
        self.reload_failures += 1
        if "reload_failures" in self._m:
            self._m["reload_failures"].inc(1)

    def index_age(self, seconds: float | None) -> None:
        if seconds is not None and "age" in self._m:
            self._m["age"].set(seconds)


#: HTTP status -> refused-request reason, for errors that carry none of their own.
STATUS_REASONS = {
    400: "bad_request",
    401: "auth",
    403: "auth",
    404: "not_found",
    405: "method",
    409: "conflict",
    413: "too_large",
    415: "media_type",
    422: "invalid",
    502: "archive",
    503: "unavailable",
}


def process_memory() -> tuple[int | None, int | None]:
    """``(rss, peak rss)`` of this process in bytes from ``/proc/self/status`` (``None`` where
    the system has no such file)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found.get("VmRSS"), found.get("VmHWM")
