"""HTTP ingress: the FastAPI routes and the ``Ingress`` deployment that serves them.

A search is parsed (:mod:`deploy.queries`), encoded (:mod:`deploy.encoder`), searched over the
served index version's shard groups and merged (:mod:`deploy.served_index`), and its hits are
filled in from that version's catalog (:mod:`deploy.catalog`). Thumbnails come from
:mod:`deploy.thumbnails`. Every refused request is a :class:`deploy.queries.RequestError`,
answered with its status and ``{"detail": message}``.
"""

import asyncio
import hmac
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from deploy.artifacts import TARGET_MODALITY, Loaders
from deploy.catalog import find_item, hits_from_result, item_response
from deploy.encoder import connect_encoder
from deploy.models import (
    ErrorResponse,
    Health,
    IndexInfo,
    Item,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
)
from deploy.queries import (
    Limits,
    Query,
    RequestError,
    decode_query_image,
    parse_search_request,
)
from deploy.served_index import IndexRefusedError, ServedIndex, shard_groups
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
    thumbnail_size: int = 256
    thumbnail_cache: int = 512
    handle_transport: str = "ray"
    # with no encoder handle the ingress encodes queries itself, with these:
    bundle_uri: str | None = None
    torch_threads: int = 0
    batch_max_size: int = 16
    batch_wait_s: float = 0.001
    # with no searcher handles the ingress searches the whole index itself, keeping this many
    # versions
    keep_versions: int = 2
    mih: bool = False


SEARCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                        "k": {"type": "integer", "minimum": 1},
                        "target": {"type": "string", "enum": ["images", "captions"]},
                    },
                }
            },
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 403, 413, 415, 422, 503)
}


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
    """

    # Serve awaits an async constructor: the replica takes requests once an index is loaded.
    async def __init__(  # type: ignore[misc]
        self,
        encoder: Any | None,
        searchers: list[Any],
        settings: IngressSettings,
        loaders: Loaders | None = None,
    ) -> None:
        if settings.handle_transport == "grpc":  # Serve's by-value gRPC handle transport
            encoder = encoder.options(_by_reference=False) if encoder is not None else None
            searchers = [s.options(_by_reference=False) for s in searchers]
        self.n_searchers = len(searchers)
        self.settings = settings
        self.loaders = loaders or Loaders()
        groups = shard_groups(searchers, settings.keep_versions, self.loaders, settings.mih)
        self.thumbnails = ThumbnailCache(
            self.loaders.read_image_bytes, settings.thumbnail_size, settings.thumbnail_cache
        )
        env = settings.auth_token_env
        token = os.environ.get(env, "") if env else ""
        self._token = token.encode("utf-8") if token else None
        log.info(
            "ingress: bearer-token auth %s",
            f"on (token from ${env})" if self._token else "off",
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

    async def check_auth(self, request: Request) -> None:
        """401 without credentials, 403 with a wrong token; compared in constant time.

        ``async`` so FastAPI runs it on the event loop rather than in its thread pool.
        """
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode("utf-8"), self._token):
            raise HTTPException(403, "invalid bearer token")

    async def encode(self, query: Query) -> np.ndarray:
        """The query's packed code, ``(1, bits // 8)`` uint8 (422 when it cannot be encoded)."""
        if query.modality == "text":
            code, err = await self.encoder.encode_text(query.text or "")
        else:
            img = await asyncio.to_thread(
                decode_query_image, query.image or b"", self.settings.limits
            )
            code, err = await self.encoder.encode_image(img)
        if code is None:
            raise RequestError(422, f"cannot encode the {query.modality} query: {err}")
        return np.asarray(code, dtype=np.uint8).reshape(1, -1)

    async def run_search(self, query: Query) -> SearchResponse:
        """Encode, search the served version, fill the hits in from its catalog."""
        t0 = time.perf_counter()
        st = self.index.current()
        codes = await self.encode(query)
        t1 = time.perf_counter()
        modality = TARGET_MODALITY[query.target]
        res = await self.index.search(st, modality, codes, query.k)
        t2 = time.perf_counter()
        hits = hits_from_result(res, st.catalog, modality)
        t3 = time.perf_counter()
        return SearchResponse(
            index_version=st.version,
            bundle_id=st.bundle_id,
            bits=st.bits,
            query_modality=query.modality,
            target=query.target,
            k=query.k,
            hits=hits,
            timings_ms={
                "encode": round((t1 - t0) * 1e3, 3),
                "search": round((t2 - t1) * 1e3, 3),
                "total": round((t3 - t0) * 1e3, 3),
            },
        )

    def __del__(self) -> None:
        poller = getattr(self, "_poller", None)  # unset when the constructor failed
        if poller is not None:
            poller.cancel()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)


def build_api(svc: Ingress) -> FastAPI:
    """The HTTP API around an :class:`Ingress`."""
    app = FastAPI(
        title="duch-rs search",
        version="1",
        description=(
            "Cross-modal (text <-> image) hash search over a remote-sensing archive. "
            "Send 'Authorization: Bearer <token>' when the service has a token configured."
        ),
    )
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    auth = [Depends(svc.check_auth)]

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"detail": msg}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Any:
        st = svc.index.state
        if st is None:
            body = Health(status="unavailable", detail=svc.index.last_error)
            return JSONResponse(body.model_dump(), status_code=503)
        return Health(status="ok", index_version=st.version)

    @app.get("/v1/index", response_model=IndexInfo, dependencies=auth, responses=ERRORS)
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
            k_cap=svc.settings.limits.k_cap,
            loaded_at=st.loaded_at,
            archive_uri=st.manifest.archive or None,
        )

    @app.post(
        "/v1/search",
        response_model=SearchResponse,
        dependencies=auth,
        responses=ERRORS,
        openapi_extra=SEARCH_OPENAPI,
        summary="Search by text or image",
    )
    async def search(request: Request) -> Response:
        """Body: JSON (:class:`SearchRequest`) or a multipart form with an ``image`` file or a
        ``text`` field, plus ``k`` and ``target``."""
        query = await parse_search_request(request, svc.settings.limits)
        result = await svc.run_search(query)
        # already a validated SearchResponse: serialise once, skip FastAPI's second validation
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post("/v1/reload", response_model=ReloadResponse, dependencies=auth, responses=ERRORS)
    async def reload() -> Any:
        """Switch to the index version named by ``LATEST`` now (409 if it is refused)."""
        try:
            return await svc.index.reload()
        except IndexRefusedError as e:
            return JSONResponse({"detail": str(e)}, status_code=409)

    @app.get(
        "/v1/items/{item_id:path}/thumbnail",
        dependencies=auth,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        response_class=Response,
    )
    async def item_thumbnail(item_id: str) -> Response:
        st = svc.index.current()
        uri = find_item(st.catalog, item_id, st.version).get("image_uri")
        if not uri:
            raise RequestError(404, f"item {item_id!r} has no image")
        try:
            data = await asyncio.to_thread(svc.thumbnails.get, uri)
        except FileNotFoundError:
            raise RequestError(404, f"the archive image of {item_id!r} is missing") from None
        except ValueError as e:
            raise RequestError(
                502, f"the archive image of {item_id!r} cannot be read: {e}"
            ) from None
        return Response(
            data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
        )

    @app.get("/v1/items/{item_id:path}", response_model=Item, dependencies=auth, responses=ERRORS)
    async def item(item_id: str) -> Item:
        st = svc.index.current()
        return item_response(item_id, find_item(st.catalog, item_id, st.version), st.version)

    return app
