"""The Serve application: ``build_app(args: AppArgs)`` is what the serve configs import.

::

    serve run deploy/local_config.yaml                          # local, foreground
    serve deploy deploy/serve_config.yaml -a http://127.0.0.1:8265   # a running cluster

Two layouts, chosen by the args (:func:`deployment_names` lists what each builds):

* **split** (the default; ``deploy/serve_config.yaml``): one :class:`~deploy.encoder.QueryEncoder`,
  ``n_searchers`` :class:`~deploy.searcher.ShardSearcher` deployments named ``ShardSearcher0`` ..
  ``ShardSearcher{n-1}`` (each holds a row-balanced group of the index's shards) and the FastAPI
  :class:`~deploy.ingress.Ingress`, which fans a query out and merges the top-k exactly. Each part
  scales on its own: for indexes larger than one replica's memory and encoders that want a GPU.
* **colocated** (``n_searchers: 0`` and ``encode_in_ingress: true``; ``deploy/local_config.yaml``):
  the ingress encodes queries (still batched with ``@serve.batch``) and searches the whole index in
  its own process. For an index and model that fit one replica (1M 64-bit codes take 16 MB with
  their ids) it saves two handle calls per query.

Auth fails closed (:mod:`deploy.auth`). Tokens are never arguments: :func:`build_app` reads the
variables named by ``auth_token_env`` and ``admin_token_env`` where the application is built
(the ``serve run`` process, or the build task of ``serve deploy``, which sees the application's
``runtime_env``) and pins them into the Ingress deployment's ``runtime_env``, so every ingress
replica gets them whatever node it starts on. Without an API token the build fails, unless
``allow_anonymous: true``; an ingress replica that still finds no token refuses to start.

Start-up on busy machines: every deployment gets a generous health-check timeout
(:data:`HEALTH_CHECK`), and the serve configs give Serve's controller longer proxy readiness
and health-check timeouts (:data:`CONTROLLER_ENV`, as ``controller_options``); pass
``controller_options=CONTROLLER_OPTIONS`` to ``serve.start`` where Python starts Serve.

Latency by layout and way in: ``bench/serve.py`` and the README's performance section.
"""

import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application, Deployment

from deploy.artifacts import Loaders
from deploy.auth import read_secret, resolve_tokens
from deploy.encoder import QueryEncoder
from deploy.ingress import Ingress, IngressSettings
from deploy.queries import Limits
from deploy.searcher import ShardSearcher

log = logging.getLogger("ray.serve")

#: Environment of Serve's controller (``controller_options.runtime_env.env_vars``): on a busy
#: 2-core machine a new proxy took longer than the default 5 s readiness check three times and
#: ``serve run`` gave up. Only read when the controller is first created.
CONTROLLER_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}
CONTROLLER_OPTIONS: dict[str, Any] = {"runtime_env": {"env_vars": CONTROLLER_ENV}}
#: Health checks of every deployment (Serve's defaults: every 10 s, 30 s timeout); a replica
#: busy loading an index or decoding must not be killed for a slow probe.
HEALTH_CHECK = {"health_check_period_s": 10.0, "health_check_timeout_s": 60.0}


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
    shortlist_cap: int = Field(
        1000, ge=1, le=100_000, description="Largest shortlist an asymmetric search re-ranks."
    )
    max_text_chars: int = Field(1000, ge=1, description="Longest query text accepted.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image file.")
    max_image_pixels: int = Field(
        16_777_216,
        ge=1,
        description="Largest query image (width x height, as the file says); refuses bombs.",
    )
    poll_interval_s: float = Field(
        30.0, ge=0, description="How often LATEST is checked for a new version; 0 = never."
    )
    auth_token_env: str | None = Field(
        "DUCH_API_TOKEN",
        description="Environment variable holding the API bearer token (required unless "
        "allow_anonymous).",
    )
    admin_token_env: str | None = Field(
        "DUCH_ADMIN_TOKEN",
        description="Environment variable holding the admin token (POST /v1/reload); unset = "
        "reloads refused, the poller still follows LATEST.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Serve without auth when no API token is set (loopback demos only; logged "
        "as a warning). Without it the service refuses to start without a token.",
    )
    thumbnail_size: int = Field(256, ge=16, le=2048, description="Thumbnail long side, pixels.")
    thumbnail_cache: int = Field(512, ge=0, description="Thumbnails kept in memory.")
    thumbnail_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest archive image read for a thumbnail."
    )
    decode_concurrency: int = Field(
        2, ge=1, le=64, description="Image decodes (queries, thumbnails) a replica runs at once."
    )
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Request body bytes an ingress replica holds at once; more = 503.",
    )
    keep_versions: int = Field(2, ge=1, le=8, description="Index versions a searcher holds.")
    mih: bool = Field(
        False,
        description=(
            "Multi-index hashing in the searchers: much faster single queries when neighbours "
            "are near (trained codes), tables of about 4 bytes per code and table"
        ),
    )
    search_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description=(
            "Seconds the ingress waits for a shard searcher's answer, retries included; then "
            "503 with Retry-After (a searcher's node was lost and its replica is restarting)"
        ),
    )
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

    map_tiles_url: str = Field(
        "",
        max_length=2048,
        description=(
            "Base-map tiles of the web page's map: an XYZ URL template with {z}, {x} and {y} "
            "(and optionally {s}, {r}), http(s) or a path on this host, e.g. "
            "'https://tile.example.org/{z}/{x}/{y}.png'. Empty (the default): no tiles, the "
            "footprints are drawn on a lon/lat graticule (for deployments without internet)."
        ),
    )
    map_tiles_attribution: str = Field(
        "",
        max_length=500,
        description="Attribution shown with the tiles (plain text; required by most tile "
        "providers). Only with map_tiles_url.",
    )

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if not self.index_root.strip():
            raise ValueError("index_root must name the index root URI")
        check_tiles_url(self.map_tiles_url)
        if self.map_tiles_attribution and not self.map_tiles_url:
            raise ValueError("map_tiles_attribution is set but map_tiles_url is empty")
        if any(not c.isprintable() for c in self.map_tiles_attribution):
            raise ValueError("map_tiles_attribution must be one line of printable text")
        return self

    def limits(self) -> Limits:
        return Limits(
            k_cap=self.k_cap,
            shortlist_cap=self.shortlist_cap,
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
            admin_token_env=self.admin_token_env,
            allow_anonymous=self.allow_anonymous,
            thumbnail_size=self.thumbnail_size,
            thumbnail_cache=self.thumbnail_cache,
            thumbnail_max_bytes=self.thumbnail_max_bytes,
            decode_concurrency=self.decode_concurrency,
            max_buffered_bytes=self.max_buffered_bytes,
            handle_transport=self.handle_transport,
            bundle_uri=bundle_uri,
            torch_threads=self.torch_threads,
            batch_max_size=self.batch_max_size,
            batch_wait_s=self.batch_wait_s,
            keep_versions=self.keep_versions,
            mih=self.mih,
            search_timeout_s=self.search_timeout_s,
            map_tiles_url=self.map_tiles_url,
            map_tiles_attribution=self.map_tiles_attribution,
        )


_TILE_FIELDS = {"z", "x", "y", "s", "r"}


def check_tiles_url(url: str) -> None:
    """Refuse a base-map tile URL template the page could not use (empty = no tiles).

    Raises:
        ValueError: not an http(s) URL or a path on this host, characters that need quoting,
            a placeholder Leaflet does not fill, or one of {z}, {x}, {y} missing.
    """
    if not url:
        return
    if re.search(r"[\s\"'<>\\`]", url):
        raise ValueError("map_tiles_url must not contain spaces, quotes, '<', '>' or '\\'")
    parts = urlsplit(url)
    if not (parts.scheme in ("http", "https") and parts.netloc) and not (
        not parts.scheme and url.startswith("/") and not url.startswith("//")
    ):
        raise ValueError(
            "map_tiles_url must be an http(s) URL or a path on this host ('/tiles/{z}/{x}/{y}.png')"
        )
    fields = set(re.findall(r"\{([^{}]*)\}", url))
    if fields - _TILE_FIELDS:
        raise ValueError(
            f"map_tiles_url has unknown placeholders {sorted(fields - _TILE_FIELDS)}; "
            "use {z}, {x}, {y} and optionally {s}, {r}"
        )
    if not {"z", "x", "y"} <= fields:
        raise ValueError("map_tiles_url must contain {z}, {x} and {y}")


def resolve_bundle_uri(args: AppArgs, loaders: Loaders) -> str:
    """``args.bundle_uri``, else the bundle named by the index version LATEST points to."""
    if args.bundle_uri:
        return args.bundle_uri
    uri = loaders.read_latest(args.index_root).bundle_uri
    if not uri:
        raise ValueError(
            f"the index under {args.index_root} does not name its bundle's location; "
            "set bundle_uri in the app args"
        )
    return uri


def _deployment(cls: object) -> Deployment:
    """A ``@serve.deployment`` class as what it is at run time (mypy keeps seeing the class)."""
    return cast(Deployment, cls)


def deployment_names(args: AppArgs) -> list[str]:
    """Names of the deployments :func:`compose` builds for ``args`` (what a serve config's
    ``deployments:`` entries may name)."""
    names = ["Ingress"]
    if not args.encode_in_ingress:
        names.append("QueryEncoder")
    names.extend(f"ShardSearcher{g}" for g in range(args.n_searchers))
    return names


def token_env_vars(args: AppArgs, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The token variables to pin into the ingress replicas' environment, read here.

    Raises:
        deploy.auth.AuthConfigError: no API token and ``allow_anonymous`` is false.
    """
    environ = os.environ if environ is None else environ
    resolve_tokens(args.auth_token_env, args.admin_token_env, args.allow_anonymous, environ)
    out = {}
    for name in (args.auth_token_env, args.admin_token_env):
        value = read_secret(name, environ)
        if name and value:
            out[name] = value
    return out


def _with_defaults(options: dict[str, Any] | None, env_vars: Mapping[str, str]) -> dict[str, Any]:
    """Deployment options with :data:`HEALTH_CHECK` defaults and ``env_vars`` merged into
    ``ray_actor_options.runtime_env.env_vars`` (the caller's values win)."""
    out = {**HEALTH_CHECK, **(options or {})}
    if env_vars:
        actor = dict(out.get("ray_actor_options") or {})
        runtime_env = dict(actor.get("runtime_env") or {})
        runtime_env["env_vars"] = {**env_vars, **(runtime_env.get("env_vars") or {})}
        actor["runtime_env"] = runtime_env
        out["ray_actor_options"] = actor
    return out


def compose(
    args: AppArgs,
    loaders: Loaders | None = None,
    *,
    ingress_options: dict[str, Any] | None = None,
    encoder_options: dict[str, Any] | None = None,
    searcher_options: dict[str, Any] | None = None,
    ingress_env: Mapping[str, str] | None = None,
) -> Application:
    """Build the application with explicit loaders and deployment options (tests, tools).

    ``ingress_env`` is added to the ingress replicas' environment (:func:`build_app` passes the
    tokens there); the searchers learn the bundle's bits and id here, to refuse index versions
    made for another model as the ingress does.
    """
    loaders = loaders or Loaders()
    bundle_uri = resolve_bundle_uri(args, loaders)
    encoder: Application | None = None
    if not args.encode_in_ingress:
        encoder = (
            _deployment(QueryEncoder)
            .options(**_with_defaults(encoder_options, {}))
            .bind(bundle_uri, args.batch_max_size, args.batch_wait_s, args.torch_threads, loaders)
        )
    expect = loaders.bundle_identity(bundle_uri) if args.n_searchers else None
    searchers = [
        _deployment(ShardSearcher)
        .options(name=f"ShardSearcher{g}", **_with_defaults(searcher_options, {}))
        .bind(
            g,
            args.n_searchers,
            args.keep_versions,
            loaders,
            args.mih,
            expect,
            args.index_root,
            args.poll_interval_s,
        )
        for g in range(args.n_searchers)
    ]
    return (
        _deployment(Ingress)
        .options(**_with_defaults(ingress_options, ingress_env or {}))
        .bind(encoder, searchers, args.ingress_settings(bundle_uri), loaders)
    )


def build_app(args: AppArgs) -> Application:
    """Application builder referenced by the serve configs (``deploy.app:build_app``).

    Raises:
        deploy.auth.AuthConfigError: no API token where the app is built, and
            ``allow_anonymous`` is false.
    """
    if not isinstance(args, AppArgs):  # a plain dict when called directly
        args = AppArgs.model_validate(args)
    env = token_env_vars(args)
    if not env.get(args.auth_token_env or ""):
        log.warning(
            "!!! ANONYMOUS ACCESS: building the query service without an API token "
            "(allow_anonymous is true). Never expose it beyond loopback. !!!"
        )
    return compose(args, ingress_env=env)
