"""HTTP ingress: validates queries, asks the encoder and the searchers, merges, answers.

Index versions: the ingress serves one :class:`ServingState` at a time. A request takes the
state once when it starts and uses it throughout, so its answer comes from one version and says
which. A new version (from ``LATEST``, polled or on ``POST /v1/reload``) is validated against
the encoder's bits and bundle id, its item table is read and every searcher loads its shards;
only then is the state reference replaced. A version that fails any step is refused and the
current one stays.
"""

import asyncio
import hmac
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from deploy.artifacts import (
    TARGET_MODALITY,
    Loaders,
    manifest_archive_uri,
    manifest_counts,
    manifest_uri,
    manifest_version,
)
from deploy.encoder import BatchedEncoder, encoder_info, open_query_encoder
from deploy.models import (
    ErrorResponse,
    Health,
    Hit,
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
    media_type,
    parse_form,
    parse_json,
    read_limited,
)
from deploy.searcher import ShardResult, ShardStore, merge_results

log = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SEARCH_TYPES = ("application/json", "multipart/form-data")


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


class Catalog:
    """Archive items by id: image URI, captions, label and split.

    A lookup reads single values straight from the Arrow columns (``chunk[row].as_py()``):
    for the 20 hits of a query over a million-item archive that takes about 0.1 ms, where
    ``Table.take(rows).to_pylist()`` took 5-20 ms.

    Args:
        table: a ``pyarrow.Table`` with ``item_id`` and ``image_uri``/``captions`` (the archive
            schema); ``None`` for an index that names no archive (hits then carry ids only).
    """

    COLUMNS = ("image_uri", "captions", "label", "split")

    def __init__(self, table: Any | None) -> None:
        self._rows: dict[str, int] = {}
        # name -> (chunks, first row of each chunk); columns may be chunked differently
        self._columns: dict[str, tuple[list[Any], np.ndarray]] = {}
        self._has_table = table is not None
        if table is None:
            return
        ids = table.column("item_id").to_pylist()
        self._rows = {str(i): n for n, i in enumerate(ids)}
        if len(self._rows) != len(ids):
            raise ValueError("the archive lists an item id more than once")
        for name in self.COLUMNS:
            if name in table.column_names:
                chunks = table.column(name).chunks
                starts = np.cumsum([0] + [len(ch) for ch in chunks], dtype=np.int64)
                self._columns[name] = (chunks, starts)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._rows

    def _value(self, name: str, row: int) -> Any:
        chunks, starts = self._columns[name]
        c = int(np.searchsorted(starts, row, side="right")) - 1
        return chunks[c][row - int(starts[c])].as_py()

    def lookup(self, item_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Archive fields of each id (``None`` for ids the archive does not list)."""
        if not self._has_table:
            return [None] * len(item_ids)
        out: list[dict[str, Any] | None] = []
        for item_id in item_ids:
            row = self._rows.get(item_id)
            out.append(
                None if row is None else {name: self._value(name, row) for name in self._columns}
            )
        return out


@dataclass(frozen=True)
class ServingState:
    """One index version, ready to answer: never modified, only replaced."""

    manifest: Any
    version: str
    bits: int
    bundle_id: str
    bitorder: str
    counts: dict[str, int]
    catalog: Catalog
    loaded_at: float


class IndexRefusedError(Exception):
    """A new index version failed validation or loading; the current one is kept."""


def thumbnail_url(item_id: str) -> str:
    return f"/v1/items/{quote(item_id, safe='')}/thumbnail"


def make_thumbnail(data: bytes, size: int) -> bytes:
    """Decode archive image bytes and return a JPEG at most ``size`` pixels on its long side."""
    from PIL import Image

    from duch_core.imageio import decode_image

    img = Image.fromarray(decode_image(data))
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


async def _form_fields(scope: dict[str, Any], body: bytes, limits: Limits) -> dict[str, Any]:
    """Parse a multipart body already read (and size-checked) into plain values and files."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as StarletteRequest

    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    params = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
    boundary = ""
    for part in params.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise RequestError(400, "malformed multipart body: the content type names no boundary")
    if b"--" + boundary.encode("latin-1") not in body:
        raise RequestError(400, "malformed multipart body: no part starts with the boundary")
    req = StarletteRequest(scope, receive)
    try:
        form = await req.form(
            max_files=1, max_fields=8, max_part_size=4 * limits.max_text_chars + 1024
        )
    except HTTPException as e:
        raise RequestError(400, f"malformed multipart body: {e.detail}") from None
    except Exception as e:  # the multipart parser's own errors
        raise RequestError(400, f"malformed multipart body: {e}") from None
    fields: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if name in fields:
                raise RequestError(422, f"form field {name!r} is given more than once")
            if isinstance(value, UploadFile):
                fields[name] = (value.filename, value.content_type, await value.read())
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields


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
    index. Doing both here saves two handle calls per query (about 5 ms each) for an index and
    model that fit one replica.

    Args:
        encoder: handle of the :class:`deploy.encoder.QueryEncoder` deployment, or ``None``.
        searchers: handles of the :class:`deploy.searcher.ShardSearcher` deployments, in group
            order, or none.
        settings: limits, index root, polling, auth, thumbnails and the in-replica parts.
        loaders: how artifacts are read.
    """

    async def __init__(
        self,
        encoder: Any | None,
        searchers: list[Any],
        settings: IngressSettings,
        loaders: Loaders | None = None,
    ) -> None:
        if settings.handle_transport == "grpc":  # Serve's by-value gRPC handle transport
            encoder = encoder.options(_by_reference=False) if encoder is not None else None
            searchers = [s.options(_by_reference=False) for s in searchers]
        self.searchers = list(searchers)
        self.settings = settings
        self.loaders = loaders or Loaders()
        # (prepare, search) of each shard group: the searcher deployments' remote calls, or one
        # store in this replica, which takes the same arguments and is awaited the same way
        if self.searchers:
            self._groups = [(s.prepare.remote, s.search.remote) for s in self.searchers]
        else:
            store = ShardStore(0, 1, settings.keep_versions, self.loaders, settings.mih)
            self._groups = [(store.prepare, store.search)]
        self.state: ServingState | None = None
        self.last_error: str | None = None
        self._refused: dict[str, str] = {}
        self._reload_lock = asyncio.Lock()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        env = settings.auth_token_env
        token = os.environ.get(env, "") if env else ""
        self._token = token.encode("utf-8") if token else None
        log.info(
            "ingress: bearer-token auth %s",
            f"on (token from ${env})" if self._token else "off",
        )
        if encoder is None:
            if not settings.bundle_uri:
                raise ValueError("the ingress encodes queries itself but names no bundle_uri")
            loaded = await asyncio.to_thread(
                open_query_encoder, settings.bundle_uri, settings.torch_threads, self.loaders
            )
            local = BatchedEncoder(loaded, settings.batch_max_size, settings.batch_wait_s)
            self._encode_text, self._encode_image = local.encode_text, local.encode_image
            info = encoder_info(loaded, settings.bundle_uri)
        else:
            self._encode_text = encoder.encode_text.remote
            self._encode_image = encoder.encode_image.remote
            info = await encoder.info.remote()
        self.encoder_bits = int(info["bits"])
        self.encoder_bundle_id = str(info["bundle_id"])
        try:
            await self.reload()
        except Exception as e:
            self.last_error = str(e)
            log.error("ingress: no index to serve yet: %s", e)
        self._poller: asyncio.Task[None] | None = None
        if settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    # ---- index versions ----------------------------------------------------------------------

    async def reload(self) -> ReloadResponse:
        """Serve the version named by ``LATEST`` if it is new and valid.

        Raises:
            IndexRefusedError: the new version failed validation or loading (old one kept).
        """
        async with self._reload_lock:
            previous = self.state
            prev_version = previous.version if previous else None
            try:
                manifest = await asyncio.to_thread(
                    self.loaders.read_latest, self.settings.index_root
                )
            except Exception as e:
                raise IndexRefusedError(
                    f"cannot read LATEST under {self.settings.index_root}: {e}"
                ) from e
            version = manifest_version(manifest)
            if previous is not None and version == previous.version:
                return ReloadResponse(changed=False, version=version, previous_version=version)
            try:
                state = await self._prepare(manifest)
            except Exception as e:
                reason = f"index version {version} refused: {type(e).__name__}: {e}"
                if prev_version:
                    reason += f"; still serving {prev_version}"
                self._refused[version] = reason
                log.error("ingress: %s", reason)
                raise IndexRefusedError(reason) from e
            self.state = state  # the swap: requests that started earlier keep the old state
            self.last_error = None
            self._refused.pop(version, None)
            log.info("ingress: serving index version %s (was %s)", version, prev_version)
            return ReloadResponse(changed=True, version=version, previous_version=prev_version)

    async def _prepare(self, manifest: Any) -> ServingState:
        await asyncio.to_thread(
            self.loaders.validate, manifest, self.encoder_bits, self.encoder_bundle_id
        )
        table = None
        if manifest_archive_uri(manifest):
            table = await asyncio.to_thread(self.loaders.read_items, manifest)
        catalog = await asyncio.to_thread(Catalog, table)
        loaded = await asyncio.gather(*(prepare(manifest) for prepare, _ in self._groups))
        counts: dict[str, int] = {}
        for part in loaded:
            for m, n in part.items():
                counts[m] = counts.get(m, 0) + int(n)
        expected = manifest_counts(manifest)
        for m, n in expected.items():
            if m in counts and counts[m] != n:
                raise ValueError(f"searchers loaded {counts[m]} {m} codes, manifest says {n}")
        return ServingState(
            manifest=manifest,
            version=manifest_version(manifest),
            bits=int(manifest.bits),
            bundle_id=str(manifest.bundle_id),
            bitorder=str(getattr(manifest, "bitorder", "big")),
            counts=counts,
            catalog=catalog,
            loaded_at=time.time(),
        )

    async def _poll(self) -> None:
        interval = self.settings.poll_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                manifest = await asyncio.to_thread(
                    self.loaders.read_latest, self.settings.index_root
                )
                version = manifest_version(manifest)
                current = self.state.version if self.state else None
                if version != current and version not in self._refused:
                    await self.reload()
            except IndexRefusedError:
                pass  # logged by reload(); retried when LATEST names another version
            except Exception as e:
                msg = f"polling {self.settings.index_root}/LATEST failed: {e}"
                if msg != self.last_error:
                    log.warning("ingress: %s", msg)
                self.last_error = msg

    def _serving(self) -> ServingState:
        st = self.state
        if st is None:
            raise RequestError(503, f"no index version is being served: {self.last_error}")
        return st

    # ---- auth --------------------------------------------------------------------------------

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

    # ---- search ------------------------------------------------------------------------------

    async def parse_request(self, request: Request) -> Query:
        limits = self.settings.limits
        ctype = media_type(request.headers.get("content-type"))
        if ctype not in SEARCH_TYPES:
            raise RequestError(
                415,
                f"unsupported content type {ctype or '(none)'!r}; send application/json "
                "or multipart/form-data",
            )
        limit = limits.max_body_bytes(ctype)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {declared} bytes; at most {limit} accepted")
        body = await read_limited(request.stream(), limit)
        if ctype == "application/json":
            return parse_json(body, limits)
        fields = await _form_fields(request.scope, body, limits)
        return parse_form(fields, limits)

    async def encode(self, query: Query) -> np.ndarray:
        """The query's packed code, ``(1, bits // 8)`` uint8."""
        if query.modality == "text":
            code, err = await self._encode_text(query.text)
        else:
            img = await asyncio.to_thread(
                decode_query_image, query.image or b"", self.settings.limits
            )
            code, err = await self._encode_image(img)
        if code is None:
            raise RequestError(422, f"cannot encode the {query.modality} query: {err}")
        return np.asarray(code, dtype=np.uint8).reshape(1, -1)

    async def search_codes(
        self, st: ServingState, modality: str, codes: np.ndarray, k: int
    ) -> ShardResult:
        """Exact top-k over all shard groups for index version ``st``."""

        async def one(search: Any) -> ShardResult:
            res = await search(st.version, modality, codes, k)
            if res is None:  # that replica does not hold the version: ask again with the manifest
                res = await search(st.version, modality, codes, k, st.manifest)
            return res

        parts = await asyncio.gather(*(one(search) for _, search in self._groups))
        return merge_results(parts, k, self.loaders.merge_topk)

    async def run_search(self, query: Query) -> SearchResponse:
        t0 = time.perf_counter()
        st = self._serving()
        codes = await self.encode(query)
        t1 = time.perf_counter()
        modality = TARGET_MODALITY[query.target]
        res = await self.search_codes(st, modality, codes, query.k)
        t2 = time.perf_counter()
        ids = [int(i) for i in res.ids[0]]
        item_ids = [res.item_ids[i] for i in ids]
        recs = st.catalog.lookup(item_ids)
        hits = []
        for rank, (row, item_id, rec, d) in enumerate(
            zip(ids, item_ids, recs, res.dist[0], strict=True), start=1
        ):
            captions = list((rec or {}).get("captions") or [])
            cap_idx = res.caption_index.get(row) if modality == "text" else None
            caption = (
                captions[cap_idx] if cap_idx is not None and 0 <= cap_idx < len(captions) else None
            )
            hits.append(
                Hit(
                    rank=rank,
                    item_id=item_id,
                    distance=int(d),
                    image_uri=(rec or {}).get("image_uri"),
                    captions=captions,
                    caption_index=cap_idx,
                    caption=caption,
                    thumbnail_url=thumbnail_url(item_id),
                )
            )
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

    # ---- items -------------------------------------------------------------------------------

    def item_record(self, st: ServingState, item_id: str) -> dict[str, Any]:
        rec = st.catalog.lookup([item_id])[0]
        if rec is None:
            raise RequestError(404, f"no item {item_id!r} in index version {st.version}")
        return rec

    def thumbnail(self, image_uri: str) -> bytes:
        with self._thumbs_lock:
            hit = self._thumbs.get(image_uri)
            if hit is not None:
                self._thumbs.move_to_end(image_uri)
                return hit
        data = make_thumbnail(
            self.loaders.read_image_bytes(image_uri), self.settings.thumbnail_size
        )
        with self._thumbs_lock:
            self._thumbs[image_uri] = data
            while len(self._thumbs) > self.settings.thumbnail_cache:
                self._thumbs.popitem(last=False)
        return data

    def __del__(self) -> None:
        if getattr(self, "_poller", None) is not None:
            self._poller.cancel()

    # ---- the FastAPI app ---------------------------------------------------------------------

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)


def build_api(svc: Any) -> FastAPI:
    """The HTTP API around an :class:`Ingress` (or any object with the same methods)."""
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
        st = svc.state
        if st is None:
            body = Health(status="unavailable", detail=svc.last_error)
            return JSONResponse(body.model_dump(), status_code=503)
        return Health(status="ok", index_version=st.version)

    @app.get("/v1/index", response_model=IndexInfo, dependencies=auth, responses=ERRORS)
    async def index_info() -> IndexInfo:
        st = svc._serving()
        return IndexInfo(
            version=st.version,
            manifest_uri=manifest_uri(st.manifest),
            bundle_id=st.bundle_id,
            bits=st.bits,
            bitorder=st.bitorder,
            counts=st.counts,
            n_searchers=len(svc.searchers),
            k_cap=svc.settings.limits.k_cap,
            loaded_at=st.loaded_at,
            archive_uri=manifest_archive_uri(st.manifest),
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
        query = await svc.parse_request(request)
        result = await svc.run_search(query)
        # already a validated SearchResponse: serialise once, skip FastAPI's second validation
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post("/v1/reload", response_model=ReloadResponse, dependencies=auth, responses=ERRORS)
    async def reload() -> Any:
        """Switch to the index version named by ``LATEST`` now (409 if it is refused)."""
        try:
            return await svc.reload()
        except IndexRefusedError as e:
            return JSONResponse({"detail": str(e)}, status_code=409)

    @app.get(
        "/v1/items/{item_id:path}/thumbnail",
        dependencies=auth,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        response_class=Response,
    )
    async def item_thumbnail(item_id: str) -> Response:
        st = svc._serving()
        rec = svc.item_record(st, item_id)
        uri = rec.get("image_uri")
        if not uri:
            raise RequestError(404, f"item {item_id!r} has no image")
        try:
            data = await asyncio.to_thread(svc.thumbnail, uri)
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
        st = svc._serving()
        rec = svc.item_record(st, item_id)
        return Item(
            item_id=item_id,
            image_uri=rec.get("image_uri"),
            captions=list(rec.get("captions") or []),
            label=rec.get("label"),
            split=rec.get("split"),
            thumbnail_url=thumbnail_url(item_id),
            index_version=st.version,
        )

    return app
