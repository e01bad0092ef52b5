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

The bearer token is never an argument: the ingress reads it from the environment variable named
by ``auth_token_env``.

Latency by layout and way in: ``bench/serve.py`` and the README's performance section.
"""

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application, Deployment

from deploy.artifacts import Loaders
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
    mih: bool = Field(
        False,
        description=(
            "Multi-index hashing in the searchers: much faster single queries when neighbours "
            "are near (trained codes), tables of about 4 bytes per code and table"
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
            mih=self.mih,
        )


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
    encoder: Application | None = None
    if not args.encode_in_ingress:
        encoder = (
            _deployment(QueryEncoder)
            .options(**(encoder_options or {}))
            .bind(bundle_uri, args.batch_max_size, args.batch_wait_s, args.torch_threads, loaders)
        )
    searchers = [
        _deployment(ShardSearcher)
        .options(name=f"ShardSearcher{g}", **(searcher_options or {}))
        .bind(g, args.n_searchers, args.keep_versions, loaders, args.mih)
        for g in range(args.n_searchers)
    ]
    return (
        _deployment(Ingress)
        .options(**(ingress_options or {}))
        .bind(encoder, searchers, args.ingress_settings(bundle_uri), loaders)
    )


def build_app(args: AppArgs) -> Application:
    """Application builder referenced by the serve configs (``deploy.app:build_app``)."""
    if not isinstance(args, AppArgs):  # a plain dict when called directly
        args = AppArgs.model_validate(args)
    return compose(args)
