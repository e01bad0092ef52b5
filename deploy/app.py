"""The Serve application: ``build_app(args: AppArgs)`` is what the serve configs import.

::

    serve run deploy/local_config.yaml                          # local, foreground
    serve deploy deploy/serve_config.yaml -a http://127.0.0.1:8265   # a running cluster

Deployments: one :class:`~deploy.encoder.QueryEncoder`, ``n_searchers``
:class:`~deploy.searcher.ShardSearcher` deployments named ``ShardSearcher0`` ..
``ShardSearcher{n-1}`` (each holds a row-balanced group of the index's shards), and the
FastAPI :class:`~deploy.ingress.Ingress`. The bearer token is never an argument: it is read by the
ingress from the environment variable named by ``auth_token_env``.

Latency (``bench/serve.py``, 1M 64-bit codes in 8 shards, 2 searchers, k = 20, on the shared
2-core development machine, shared: its load average was between 7 and 47 during the runs, so
single numbers move by tens of ms from run to run). A text query at concurrency 1 costs:

* Serve's HTTP path before the handler runs: ``GET /healthz`` (proxy -> ingress, no further
  call) takes 3-7 ms at p50; a POST costs one more proxy round trip, because the replica pulls
  the request body back from the proxy. End to end minus server-side time: 10-17 ms, which
  this application cannot remove.
* the encoder call (one handle hop; a tiny text model: 9-12 ms, about 5 ms of it compute);
* the searcher calls (the two run concurrently: 6-8 ms with ``handle_transport: grpc``,
  9.5-13.5 ms with Ray actor calls; the search itself is 0.4 ms);
* about 1 ms of parsing, catalog lookup and serialisation in the ingress.

Measured changes (A/B runs back to back, tiny backbones, 200 requests each, text c = 1,
p50 end to end / server-side total):

* catalog lookup by per-value column reads instead of ``Table.take`` on the 1M-row archive
  table: -5 to -20 ms per query (kept; the biggest single cost before);
* ``handle_transport: grpc`` (by-value gRPC to the encoder and searchers): 27 / 17 ms against
  36-42 / 22-28 ms with Ray actor calls (kept in both serve configs; ``AppArgs`` keeps
  ``"ray"`` as its default because Serve marks the gRPC transport experimental);
* ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` with ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0``
  on the workers: no gain (40 / 24 ms with Ray calls, 35 / 19 ms with gRPC); not used;
* ``RAY_SERVE_PROXY_USE_GRPC=1`` (proxy -> ingress over gRPC): ``/healthz`` 3.2 ms instead of
  6-7 ms, end to end 31 / 18 ms, no clear gain over gRPC handles alone; not used;
* encoding text queries in the ingress process (one hop fewer): rejected: the encoder forward
  pass took 84-194 ms there against about 10 ms in the encoder deployment (same model and
  threads; the cause, sharing the process with the ingress's event loops, was not isolated),
  and every ingress replica would hold the text tower;
* encoder and searchers warm up while loading (one query each), so the first request after
  start or after an index swap no longer pays lazy tower building or kernel compilation (the
  first web-page query took 22 s before);
* ``torch_threads``: on the shared 2-core machine two threads made a MiniLM text query 30x
  slower than one (458 against 14 ms at p50); the local config leaves it at Ray's default
  (one thread for a fractional-CPU replica), the production config sizes it to the replica's
  CPUs.

The issue's targets (text p99 <= 50 ms at concurrency 1; HTTP + Serve overhead <= 5 ms at p50)
are not met on this machine. With the tiny model the overhead is about 20-25 ms at p50, of
which Serve's proxy path alone is 10-17 ms. With MiniLM and MobileNetV2 (1M codes, final
configuration, two runs): text at concurrency 1 p50 49 / p99 144 ms at load average 7
(83 / 505 ms at load 25-47) against 13-14 ms in process; the encoder call is 22 ms of it.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from deploy.artifacts import Loaders, manifest_bundle_uri
from deploy.encoder import QueryEncoder
from deploy.ingress import Ingress, IngressSettings
from deploy.queries import Limits
from deploy.searcher import ShardSearcher


class AppArgs(BaseModel):
    """Arguments of the application (the ``args:`` block of a serve config)."""

    model_config = ConfigDict(extra="forbid")

    index_root: str = Field(description="Index root URI; the app serves what LATEST names.")
    bundle_uri: str | None = Field(
        None,
        description="Model bundle URI; default: the bundle the current index version names.",
    )
    n_searchers: int = Field(
        2,
        ge=0,
        le=64,
        description="Shard searcher deployments; 0 = the ingress searches the whole index itself.",
    )
    encode_in_ingress: bool = Field(
        False,
        description="The ingress encodes queries itself instead of calling a QueryEncoder.",
    )
    k_cap: int = Field(100, ge=1, le=10_000, description="Largest k a query may ask for.")
    max_text_chars: int = Field(1000, ge=1, description="Longest query text accepted.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image file.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height); refuses bombs."
    )
    poll_interval_s: float = Field(
        30.0, ge=0, description="How often LATEST is checked for a new version; 0 = never."
    )
    auth_token_env: str | None = Field(
        "DUCH_API_TOKEN",
        description="Environment variable holding the bearer token; unset or empty = no auth.",
    )
    thumbnail_size: int = Field(256, ge=16, le=2048, description="Thumbnail long side, pixels.")
    thumbnail_cache: int = Field(512, ge=0, description="Thumbnails kept in memory.")
    keep_versions: int = Field(2, ge=1, le=8, description="Index versions a searcher holds.")
    batch_max_size: int = Field(16, ge=1, le=256, description="Queries per encoder batch.")
    batch_wait_s: float = Field(0.001, ge=0, le=1, description="Wait to fill a batch.")
    torch_threads: int = Field(0, ge=0, description="Encoder torch threads; 0 = Ray's default.")
    handle_transport: Literal["ray", "grpc"] = Field(
        "ray",
        description=(
            "How the ingress calls the encoder and searchers: Ray actor calls, or Serve's "
            "by-value gRPC transport (lower latency; experimental in Ray 2.60)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if not self.index_root.strip():
            raise ValueError("index_root must name the index root URI")
        return self

    def limits(self) -> Limits:
        return Limits(
            k_cap=self.k_cap,
            max_text_chars=self.max_text_chars,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
        )

    def ingress_settings(self, bundle_uri: str | None = None) -> IngressSettings:
        return IngressSettings(
            index_root=self.index_root,
            limits=self.limits(),
            poll_interval_s=self.poll_interval_s,
            auth_token_env=self.auth_token_env,
            thumbnail_size=self.thumbnail_size,
            thumbnail_cache=self.thumbnail_cache,
            handle_transport=self.handle_transport,
            bundle_uri=bundle_uri,
            torch_threads=self.torch_threads,
            batch_max_size=self.batch_max_size,
            batch_wait_s=self.batch_wait_s,
            keep_versions=self.keep_versions,
        )


def resolve_bundle_uri(args: AppArgs, loaders: Loaders) -> str:
    """``args.bundle_uri``, else the bundle named by the index version LATEST points to."""
    if args.bundle_uri:
        return args.bundle_uri
    manifest = loaders.read_latest(args.index_root)
    uri = manifest_bundle_uri(manifest)
    if not uri:
        raise ValueError(
            f"the index under {args.index_root} does not name its bundle's location; "
            "set bundle_uri in the app args"
        )
    return str(uri)


def compose(
    args: AppArgs,
    loaders: Loaders | None = None,
    *,
    ingress_options: dict[str, Any] | None = None,
    encoder_options: dict[str, Any] | None = None,
    searcher_options: dict[str, Any] | None = None,
) -> Application:
    """Build the application with explicit loaders and deployment options (tests, tools)."""
    loaders = loaders or Loaders()
    bundle_uri = resolve_bundle_uri(args, loaders)
    encoder = None
    if not args.encode_in_ingress:
        encoder = QueryEncoder.options(**(encoder_options or {})).bind(
            bundle_uri, args.batch_max_size, args.batch_wait_s, args.torch_threads, loaders
        )
    searchers = [
        ShardSearcher.options(name=f"ShardSearcher{g}", **(searcher_options or {})).bind(
            g, args.n_searchers, args.keep_versions, loaders
        )
        for g in range(args.n_searchers)
    ]
    return Ingress.options(**(ingress_options or {})).bind(
        encoder, searchers, args.ingress_settings(bundle_uri), loaders
    )


def build_app(args: AppArgs) -> Application:
    """Application builder referenced by the serve configs (``deploy.app:build_app``)."""
    if not isinstance(args, AppArgs):  # a plain dict when called directly
        args = AppArgs.model_validate(args)
    return compose(args)
