"""HTTP ingress: the FastAPI routes and the ``Ingress`` deployment that serves them.

A search is parsed (:mod:`deploy.queries`), encoded (:mod:`deploy.encoder`), searched over the
served index version's shard groups and merged (:mod:`deploy.served_index`), and its hits are
filled in from that version's catalog (:mod:`deploy.catalog`). Thumbnails come from
:mod:`deploy.thumbnails`, auth from :mod:`deploy.auth`, metrics from :mod:`deploy.telemetry`.
Every refused request is a :class:`deploy.queries.RequestError`, answered with its status,
``{"detail": message}`` and its headers (``Retry-After`` on every 503); every status a route can
answer is listed in the OpenAPI document.

Memory of a replica is bounded by: the request bodies it holds at once (``max_buffered_bytes``,
else 503), image decodes running at once (``decode_concurrency``, each reduced toward the
model's input size before any conversion), the pixel cap of a query image, and the byte cap of
an archive image read for a thumbnail.
"""

import asyncio
import html
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.artifacts import TARGET_MODALITY, Loaders
from deploy.auth import announce, check_admin, check_api, resolve_tokens
from deploy.catalog import (
    feature,
    feature_collection,
    find_item,
    hits_from_result,
    item_response,
)
from deploy.encoder import connect_encoder
from deploy.models import (
    ErrorResponse,
    Health,
    IndexInfo,
    Item,
    ReloadResponse,
    ReplicaMemory,
    SearchResponse,
    Status,
)
from deploy.queries import (
    BodyBudget,
    Limits,
    Query,
    RequestError,
    decode_query_image,
    parse_search_request,
)
from deploy.query_schemas import form_body_schema, json_body_schema
from deploy.searcher import Rerank
from deploy.served_index import IndexRefusedError, ServedIndex, shard_groups, version_age_s
from deploy.telemetry import STATUS_REASONS, Telemetry, process_memory
from deploy.thumbnails import ThumbnailCache

log = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class IngressSettings:
    """Everything the ingress needs besides its handles (see :class:`deploy.app.AppArgs`)."""

    index_root: str
    limits: Limits = Limits()
    poll_interval_s: float = 30.0
    auth_token_env: str | None = "DUCH_API_TOKEN"
    admin_token_env: str | None = "DUCH_ADMIN_TOKEN"
    allow_anonymous: bool = False
    thumbnail_size: int = 256
    thumbnail_cache: int = 512
    thumbnail_max_bytes: int = 64 * 1024 * 1024
    handle_transport: str = "ray"
    decode_concurrency: int = 2
    decode_wait_s: float = 10.0
    max_buffered_bytes: int = 256 * 1024 * 1024
    export_metrics: bool = True
    # with no encoder handle the ingress encodes queries itself, with these:
    bundle_uri: str | None = None
    torch_threads: int = 0
    batch_max_size: int = 16
    batch_wait_s: float = 0.001
    # with no searcher handles the ingress searches the whole index itself, keeping this many
    # versions
    keep_versions: int = 2
    mih: bool = False
    # a shard search not answered in this time (a searcher node lost) is a 503
    search_timeout_s: float | None = 10.0
    # the web page's base map: an XYZ tile URL template ("" = a lon/lat graticule, no tiles)
    map_tiles_url: str = ""
    map_tiles_attribution: str = ""


_DESCRIPTIONS = {
    400: "Malformed body (JSON, multipart, base64).",
    401: "No bearer token.",
    403: "Wrong token (or the endpoint needs the admin token).",
    404: "No such item in the served index version, or its image is missing.",
    409: "The version LATEST names was refused; the current one is still served.",
    413: "Body, image file or image pixels over the cap.",
    415: "Unsupported content type, or not a decodable image.",
    422: "Invalid values.",
    502: "The archive image cannot be read or is over the thumbnail cap.",
    503: "Temporarily unable to answer (no index yet, busy, model mismatch, a part restarting);"
    " see Retry-After.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses (body :class:`ErrorResponse`)."""
    return {
        c: {"model": ErrorResponse, "description": _DESCRIPTIONS[c], "headers": _HEADERS.get(c, {})}
        for c in codes
    }


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    """``{"detail": ...}`` as ASCII JSON (any client text echoed in it cannot break encoding)."""
    return Response(
        json.dumps({"detail": detail}, ensure_ascii=True),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """The HTTP front of the service (FastAPI; OpenAPI at ``/openapi.json``, docs at ``/docs``).

    Where queries are encoded and searched is set by what it is given: with an ``encoder``
    handle, by the :class:`deploy.encoder.QueryEncoder` deployment, else in this replica (the
    bundle named by ``settings.bundle_uri``); with ``searchers`` handles, by the
    :class:`deploy.searcher.ShardSearcher` deployments, else in this replica over the whole
    index. Doing both here saves two handle calls per query for an index and model that fit
    one replica.

    Args:
        encoder: handle of the :class:`deploy.encoder.QueryEncoder` deployment, or ``None``.
        searchers: handles of the :class:`deploy.searcher.ShardSearcher` deployments, in group
            order, or none.
        settings: limits, index root, polling, auth, thumbnails and the in-replica parts.
        loaders: how artifacts are read.

    Raises:
        deploy.auth.AuthConfigError: no API token in this replica's environment and the
            application does not allow anonymous access (checked before anything else).
    """

    # Serve awaits an async constructor: the replica takes requests once an index is loaded.
    async def __init__(  # type: ignore[misc]
        self,
        encoder: Any | None,
        searchers: list[Any],
        settings: IngressSettings,
        loaders: Loaders | None = None,
    ) -> None:
        self.tokens = resolve_tokens(
            settings.auth_token_env, settings.admin_token_env, settings.allow_anonymous
        )
        announce(self.tokens, settings.auth_token_env, settings.admin_token_env)
        if settings.handle_transport == "grpc":  # Serve's by-value gRPC handle transport
            encoder = encoder.options(_by_reference=False) if encoder is not None else None
            searchers = [s.options(_by_reference=False) for s in searchers]
        self.n_searchers = len(searchers)
        self.settings = settings
        self.loaders = loaders or Loaders()
        self.telemetry = Telemetry(export=settings.export_metrics)
        self.bodies = BodyBudget(settings.max_buffered_bytes)
        self._decodes = asyncio.Semaphore(max(1, settings.decode_concurrency))
        groups = shard_groups(
            searchers,
            settings.keep_versions,
            self.loaders,
            settings.mih,
            settings.search_timeout_s,
        )
        self.thumbnails = ThumbnailCache(
            self.loaders.read_image_bytes,
            settings.thumbnail_size,
            settings.thumbnail_cache,
            settings.thumbnail_max_bytes,
        )
        self.encoder = await connect_encoder(
            encoder,
            settings.bundle_uri,
            settings.torch_threads,
            settings.batch_max_size,
            settings.batch_wait_s,
            self.loaders,
        )
        self.index = ServedIndex(
            settings.index_root,
            groups,
            self.loaders,
            self.encoder.bits,
            self.encoder.bundle_id,
            self.telemetry,
        )
        try:
            await self.index.reload()
        except Exception as e:
            self.index.last_error = str(e)
            log.error("ingress: no index to serve yet: %s", e)
        self._poller: asyncio.Task[None] | None = None
        if settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(
                self.index.poll(settings.poll_interval_s)
            )

    def refuse(self, exc: RequestError) -> Response:
        """Count a refused request by reason and answer it."""
        reason = exc.reason
        if reason == str(exc.status):
            reason = STATUS_REASONS.get(exc.status, reason)
        self.telemetry.refuse(reason)
        return error_response(exc.status, exc.message, exc.headers)

    async def decode(self, data: bytes) -> np.ndarray:
        """A query image as ``(H, W, 3)`` uint8, reduced toward the model's input size; at most
        ``decode_concurrency`` run at once (503 after waiting ``decode_wait_s`` for a slot)."""
        async with self._decode_slot():
            return await asyncio.to_thread(
                decode_query_image, data, self.settings.limits, self.encoder.image_cfg
            )

    def _decode_slot(self) -> "_Slot":
        return _Slot(self._decodes, self.settings.decode_wait_s)

    async def encode(
        self, query: Query, bundle_id: str
    ) -> tuple[np.ndarray, float, np.ndarray | None]:
        """The query's packed code ``(1, bits // 8)`` uint8, its decode time in seconds and its
        continuous code ``(1, bits)`` float32 (``None`` when the encoder gives none).

        Raises:
            RequestError: 422 when it cannot be encoded; 503 when the encoder that answered
                holds another bundle than ``bundle_id`` (the index version's).
        """
        decode_s = 0.0
        if query.modality == "text":
            code, err, got, cont = await self.encoder.encode_text(query.text or "", bundle_id)
        else:
            t0 = time.perf_counter()
            img = await self.decode(query.image or b"")
            decode_s = time.perf_counter() - t0
            self.telemetry.observe("decode", decode_s)
            code, err, got, cont = await self.encoder.encode_image(img, bundle_id)
        if got != bundle_id:
            log.error(
                "ingress: the query encoder holds bundle %s, the index version was built with %s:"
                " query refused",
                got,
                bundle_id,
            )
            raise RequestError(
                503,
                "the query encoder's model is not the one the index was built with; retry later",
                reason="bundle_mismatch",
            )
        if code is None:
            raise RequestError(422, f"cannot encode the {query.modality} query: {err}")
        packed = np.asarray(code, dtype=np.uint8).reshape(1, -1)
        continuous = None if cont is None else np.asarray(cont, np.float32).reshape(1, -1)
        return packed, decode_s, continuous

    async def run_search(self, query: Query) -> SearchResponse:
        """Encode, search the served version, fill the hits in from its catalog."""
        t0 = time.perf_counter()
        st = self.index.current()
        rerank = None
        if query.modality == "item":  # its stored image code is the query: no encoder call
            codes, decode_s = await self.index.code_of(st, "image", query.item_id or ""), 0.0
        else:
            codes, decode_s, continuous = await self.encode(query, st.bundle_id)
            if query.rank == "asymmetric":
                if continuous is None:
                    raise RequestError(
                        422, "rank: this service's encoder gives no continuous codes"
                    )
                rerank = Rerank(continuous, query.shortlist)
        t1 = time.perf_counter()
        modality = TARGET_MODALITY[query.target]
        st, res = await self.index.search(st, modality, codes, query.k, query.filter, rerank)
        t2 = time.perf_counter()
        hits = hits_from_result(res, st.catalog, modality)
        t3 = time.perf_counter()
        for stage, seconds in (("encode", t1 - t0 - decode_s), ("search", t2 - t1)):
            self.telemetry.observe(stage, seconds)
        self.telemetry.observe("catalog", t3 - t2)
        return SearchResponse(
            index_version=st.version,
            bundle_id=st.bundle_id,
            bits=st.bits,
            query_modality=query.modality,
            target=query.target,
            k=query.k,
            rank=query.rank,
            hits=hits,
            timings_ms={
                "decode": round(decode_s * 1e3, 3),
                "encode": round((t1 - t0 - decode_s) * 1e3, 3),
                "search": round((t2 - t1) * 1e3, 3),
                "catalog": round((t3 - t2) * 1e3, 3),
                "total": round((t3 - t0) * 1e3, 3),
            },
        )

    async def thumbnail(self, item_id: str) -> Response:
        st = self.index.current()
        rec = find_item(st.catalog, item_id, st.version)
        uri = rec.get("image_uri")
        if not uri:
            raise RequestError(404, f"item {item_id!r} has no image")
        try:
            async with self._decode_slot():
                data = await asyncio.to_thread(self.thumbnails.get, uri, rec.get("bands"))
        except FileNotFoundError:
            raise RequestError(404, f"the archive image of {item_id!r} is missing") from None
        except ValueError as e:
            log.error("ingress: thumbnail of %r: %s", item_id, e)
            raise RequestError(
                502, f"the archive image of {item_id!r} cannot be made into a thumbnail"
            ) from None
        return Response(
            data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
        )

    def status(self) -> Status:
        st = self.index.state
        age = version_age_s(st.manifest.created) if st else None
        self.telemetry.index_age(age)
        rss, peak = process_memory()
        return Status(
            status=self.index.health(),  # type: ignore[arg-type]
            index_version=st.version if st else None,
            index_created=(st.manifest.created or None) if st else None,
            index_age_s=age,
            previous_version=self.index.previous.version if self.index.previous else None,
            bundle_id=self.encoder.bundle_id,
            last_error=self.index.last_error,
            refused_versions=self.index.refused,
            reload_failures=self.telemetry.reload_failures,
            refused_requests=dict(self.telemetry.refused),
            auth=self.tokens.mode,  # type: ignore[arg-type]
            admin_token=self.tokens.admin is not None,
            decode_slots=max(1, self.settings.decode_concurrency),
            body_budget_bytes=self.bodies.capacity,
            body_bytes_held=self.bodies.used,
            memory=ReplicaMemory(rss_bytes=rss, peak_rss_bytes=peak),
            pid=os.getpid(),
        )

    def __del__(self) -> None:
        poller = getattr(self, "_poller", None)  # unset when the constructor failed
        if poller is not None:
            poller.cancel()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)


class _Slot:
    """One of the replica's decode slots, waited for at most ``wait_s`` (then 503)."""

    def __init__(self, sem: asyncio.Semaphore, wait_s: float) -> None:
        self.sem = sem
        self.wait_s = wait_s

    async def __aenter__(self) -> None:
        try:
            await asyncio.wait_for(self.sem.acquire(), self.wait_s)
        except TimeoutError:
            raise RequestError(
                503, "the service is busy decoding images; retry shortly", reason="decode_busy"
            ) from None

    async def __aexit__(self, *exc: object) -> None:
        self.sem.release()


GEOJSON = "application/geo+json"


def wants_geojson(request: Request) -> bool:
    """Whether the client asked for GeoJSON (``Accept: application/geo+json``)."""
    return GEOJSON in request.headers.get("accept", "")


def render_page(template: str, tiles_url: str, tiles_attribution: str) -> str:
    """The web page with its base-map settings as (escaped) data attributes of ``<body>``."""
    attrs = (
        f' data-tiles-url="{html.escape(tiles_url, quote=True)}"'
        f' data-tiles-attribution="{html.escape(tiles_attribution, quote=True)}"'
    )
    return template.replace("<body>", f"<body{attrs}>", 1)


def build_api(svc: Ingress) -> FastAPI:
    """The HTTP API around an :class:`Ingress`."""
    limits = svc.settings.limits
    app = FastAPI(
        title="duch-rs search",
        version="1",
        description=(
            "Cross-modal (text <-> image) hash search over a remote-sensing archive. Send "
            "'Authorization: Bearer <token>' (every endpoint but /healthz and the page)."
        ),
    )
    page = render_page(
        (STATIC_DIR / "index.html").read_text(encoding="utf-8"),
        svc.settings.map_tiles_url,
        svc.settings.map_tiles_attribution,
    )
    # Declared in the OpenAPI document only when a token is required.
    bearer = HTTPBearer(auto_error=False, description="The API token (or the admin token).")
    admin_bearer = HTTPBearer(auto_error=False, description="The admin token.")

    async def api_auth(request: Request) -> None:
        check_api(svc.tokens, request.headers.get("authorization", ""))

    async def admin_auth(request: Request) -> None:
        check_admin(svc.tokens, request.headers.get("authorization", ""))

    if svc.tokens.anonymous:
        auth = [Depends(api_auth)]
        admin = [Depends(admin_auth)]
    else:
        auth = [Security(bearer), Depends(api_auth)]
        admin = [Security(admin_bearer), Depends(admin_auth)]

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> Response:
        return svc.refuse(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return svc.refuse(RequestError(exc.status_code, str(exc.detail), exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        msg = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return svc.refuse(RequestError(422, msg))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    # the page's files and vendored libraries (Leaflet), public like the page; no directory
    # listings (html=False), no symlinks followed out of the directory
    app.mount("/static", StaticFiles(directory=STATIC_DIR, html=False), name="static")

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "headers": _HEADERS[503]}},
        summary="Liveness, without internals (details: /v1/status)",
    )
    async def healthz() -> Any:
        health = svc.index.health()
        st = svc.index.state
        body = Health(status=health, index_version=st.version if st else None)  # type: ignore[arg-type]
        if health == "unavailable":
            return Response(
                body.model_dump_json(),
                status_code=503,
                media_type="application/json",
                headers={"Retry-After": "1"},
            )
        return body

    @app.get(
        "/v1/status",
        response_model=Status,
        dependencies=auth,
        responses=errors(401, 403),
        summary="What an operator needs to see about this replica",
    )
    async def status() -> Status:
        return svc.status()

    @app.get(
        "/v1/index", response_model=IndexInfo, dependencies=auth, responses=errors(401, 403, 503)
    )
    async def index_info() -> IndexInfo:
        st = svc.index.current()
        return IndexInfo(
            version=st.version,
            manifest_uri=st.manifest.uri,
            bundle_id=st.bundle_id,
            bits=st.bits,
            bitorder=st.bitorder,
            counts=st.counts,
            n_searchers=svc.n_searchers,
            k_cap=limits.k_cap,
            shortlist_cap=limits.shortlist_cap,
            loaded_at=st.loaded_at,
            archive_uri=st.manifest.archive or None,
        )

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        dependencies=auth,
        responses={
            200: {
                "content": {GEOJSON: {"schema": {"type": "object"}}},
                "description": "The hits; with Accept: application/geo+json a GeoJSON "
                "FeatureCollection of their footprints.",
            },
            **errors(400, 401, 403, 404, 413, 415, 422, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": json_body_schema(limits)},
                    "multipart/form-data": {"schema": form_body_schema(limits)},
                },
            }
        },
        summary="Search by text or image",
    )
    async def search(request: Request) -> Response:
        """Body: JSON (``text``, ``image_base64`` or ``item_id``) or a multipart form with an
        ``image`` file or a ``text`` field, plus ``k``, ``target`` and ``filter``. With
        ``Accept: application/geo+json`` the answer is a GeoJSON FeatureCollection of the hits'
        footprints."""
        async with svc.bodies.hold() as hold:
            query = await parse_search_request(request, limits, hold)
            result = await svc.run_search(query)
        if wants_geojson(request):
            return Response(json.dumps(feature_collection(result)), media_type=GEOJSON)
        # already a validated SearchResponse: serialise once, skip FastAPI's second validation
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post(
        "/v1/reload",
        response_model=ReloadResponse,
        dependencies=admin,
        responses=errors(401, 403, 409),
        summary="Switch to the version LATEST names now (admin token)",
    )
    async def reload() -> Any:
        """Switch to the index version named by ``LATEST`` now (409 if it is refused)."""
        try:
            return await svc.index.reload()
        except IndexRefusedError as e:
            return svc.refuse(RequestError(409, str(e), reason="reload_refused"))

    @app.get(
        "/v1/thumbnails/{item_id:path}",
        dependencies=auth,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."},
            **errors(401, 403, 404, 502, 503),
        },
        response_class=Response,
        summary="An item's thumbnail (JPEG)",
    )
    async def thumbnail(item_id: str) -> Response:
        return await svc.thumbnail(item_id)

    @app.get(
        "/v1/items/{item_id:path}",
        response_model=Item,
        dependencies=auth,
        responses={
            200: {
                "content": {"image/jpeg": {}, GEOJSON: {"schema": {"type": "object"}}},
                "description": "The item (a GeoJSON Feature with Accept: "
                "application/geo+json); a JPEG for the former thumbnail URL "
                "/v1/items/{item_id}/thumbnail when no item has that whole id.",
            },
            **errors(401, 403, 404, 502, 503),
        },
        summary="An archive item by id (any characters, '/' included)",
    )
    async def item(item_id: str, request: Request) -> Any:
        st = svc.index.current()
        if item_id not in st.catalog and item_id.endswith("/thumbnail"):
            base = item_id.removesuffix("/thumbnail")
            if base in st.catalog:  # the former thumbnail URL keeps working
                return await svc.thumbnail(base)
        found = item_response(item_id, find_item(st.catalog, item_id, st.version), st.version)
        if wants_geojson(request):
            return Response(json.dumps(feature(found.model_dump())), media_type=GEOJSON)
        return found

    return app
