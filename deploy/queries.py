"""Parsing and validation of search queries: every bad input becomes a :class:`RequestError`.

The HTTP layer turns a :class:`RequestError` into its status code and a ``{"detail": message}``
body. Status codes:

* 400: the body is not what its content type says: malformed JSON of any kind (syntax, invalid
  UTF-8, NaN/Infinity, numbers too long to convert, nesting too deep, lone surrogates),
  malformed multipart, bad base64.
* 413: the body, the image file or the decoded image (pixels) is over its cap.
* 415: a content type the endpoint does not take, or bytes that are not a decodable image.
* 422: a well-formed request with invalid values (text without a word or over-long, k out of
  range, unknown target, both or neither of text and image, a form field given twice).
* 503 (with ``Retry-After``): the replica holds as many request bodies as it may buffer.

What is accepted is also published as JSON Schema (:mod:`deploy.query_schemas`) with the
service's limits, so a request the schema allows is not
refused for its shape.

:func:`parse_search_request` is the whole path from an HTTP request to a :class:`Query`: content
type, body size (checked while the body streams in), then JSON (:func:`parse_json`) or
multipart (:func:`read_form_fields` + :func:`parse_form`).
"""

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi.exceptions import HTTPException
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Scope

from deploy.models import SearchRequest

#: Content types ``POST /v1/search`` takes.
SEARCH_TYPES = ("application/json", "multipart/form-data")

#: Media types accepted for multipart image uploads besides ``image/*``: browsers and curl send
#: these for files whose type they do not know; the bytes are then checked by decoding.
GENERIC_FILE_TYPES = frozenset({"application/octet-stream", ""})


#: Seconds a client is asked to wait after a 503.
RETRY_AFTER_S = 1


class RequestError(Exception):
    """A request the service refuses, with the HTTP status, a message for the client and any
    headers (a 503 always carries ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        #: a short label for the refused-requests metric (defaults to the status)
        self.reason = reason or str(status)


@dataclass(frozen=True)
class Limits:
    """Caps applied to every query."""

    k_cap: int = 100
    max_text_chars: int = 1000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 16_777_216  # 4096 x 4096
    shortlist_cap: int = 1000  # largest Hamming shortlist an asymmetric search re-ranks

    def max_body_bytes(self, content_type: str) -> int:
        """Largest body accepted for a content type (base64 in JSON costs 4/3 of the bytes)."""
        slack = 64 * 1024 + 4 * self.max_text_chars
        if content_type == "application/json":
            return self.max_image_bytes * 4 // 3 + slack
        return self.max_image_bytes + slack


@dataclass(frozen=True)
class Query:
    """A validated query. ``image`` holds the original file bytes, not yet decoded."""

    modality: Literal["text", "image", "item"]
    k: int
    target: Literal["images", "captions"]
    text: str | None = None
    image: bytes | None = None
    item_id: str | None = None
    filter: dict[str, Any] | None = None  # a checked duch_core.filters spec
    rank: Literal["hamming", "asymmetric"] = "hamming"
    shortlist: int = 0  # asymmetric: Hamming candidates re-ranked per searcher (>= k)


def format_validation_error(err: ValidationError) -> str:
    """One line per pydantic error: ``field: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "literal_error" and loc == "target":
            msg = f"unknown target {e.get('input')!r}; expected 'images' or 'captions'"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def media_type(content_type: str | None) -> str:
    """``'multipart/form-data; boundary=x'`` -> ``'multipart/form-data'`` (lower case)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class BodyBudget:
    """Bytes of request bodies one replica may hold at once, shared by its requests.

    Each request reserves its body's bytes while they stream in (:meth:`hold`) and gives them
    back when it is answered; a body that would take the total past ``capacity`` is refused
    with 503, before it is read further. Without it, ``max_ongoing_requests`` bodies of the
    largest accepted size could be buffered together.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def reserve(self, n: int) -> None:
        if self.used + n > self.capacity:
            raise RequestError(
                503,
                "the service is holding as many request bodies as it may; retry shortly",
                reason="body_budget",
            )
        self.used += n

    def hold(self) -> "BodyHold":
        return BodyHold(self)


@dataclass
class BodyHold:
    """One request's share of a :class:`BodyBudget` (an async context manager)."""

    budget: BodyBudget | None
    held: int = field(default=0)

    def add(self, n: int) -> None:
        if self.budget is not None:
            self.budget.reserve(n)
            self.held += n

    async def __aenter__(self) -> "BodyHold":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.budget is not None:
            self.budget.used -= self.held
        self.held = 0


async def read_limited(
    chunks: AsyncIterator[bytes], limit: int, hold: BodyHold | None = None
) -> bytes:
    """Read a streamed body, refusing it (413) as soon as it grows past ``limit`` bytes, and
    (503) as soon as ``hold``'s budget is spent."""
    buf = bytearray()
    async for chunk in chunks:
        if len(buf) + len(chunk) > limit:
            raise RequestError(413, f"request body is larger than {limit} bytes")
        if hold is not None:
            hold.add(len(chunk))
        buf += chunk
    return bytes(buf)


DEFAULT_K = 20


def check_k(k: int | None, limits: Limits) -> int:
    """``k`` within ``1 .. k_cap``; ``None`` means the default (20, or the cap if lower)."""
    if k is None:
        return min(DEFAULT_K, limits.k_cap)
    if k < 1 or k > limits.k_cap:
        raise RequestError(422, f"k must be between 1 and {limits.k_cap}, got {k}")
    return k


#: A query text needs one character that caption cleaning keeps (not a space or ``. , ! ?``);
#: published as the schema's ``pattern``.
TEXT_PATTERN = r"[^\s.,!?]"
_TEXT_WORD = re.compile(TEXT_PATTERN)


def check_text(text: str, limits: Limits) -> str:
    """Bound a query text and strip it (422 when it has no word or is longer than the cap,
    counted as sent, as the schema's ``maxLength`` counts)."""
    if len(text) > limits.max_text_chars:
        raise RequestError(
            422,
            f"text is {len(text)} characters long; at most {limits.max_text_chars} are accepted",
        )
    if not text.strip():
        raise RequestError(422, "text is empty")
    if not _TEXT_WORD.search(text):
        raise RequestError(422, "text has no word: only spaces and . , ! ?")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, "text is not valid Unicode (lone surrogate)") from None
    return text.strip()


def check_image_bytes(data: bytes, limits: Limits) -> bytes:
    if not data:
        raise RequestError(422, "image is empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            413, f"image file is {len(data)} bytes; at most {limits.max_image_bytes} are accepted"
        )
    return data


MAX_ITEM_ID_CHARS = 1024


def check_filter(spec: Any) -> dict[str, Any] | None:
    """A filter spec checked by :mod:`duch_core.filters` (422 naming the field), ``None`` when
    empty."""
    from duch_core.filters import FilterError, filter_mask
    from duch_core.item_metadata import empty_metadata

    if spec is None:
        return None
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(exclude_none=True)
    if not isinstance(spec, dict):
        raise RequestError(422, "filter: must be an object")
    spec = {key: value for key, value in spec.items() if value is not None}
    try:
        filter_mask(empty_metadata(), spec)
    except FilterError as e:
        raise RequestError(422, str(e), reason="bad_filter") from None
    return spec or None


DEFAULT_SHORTLIST = 100


def check_ranking(rank: str, shortlist: int | None, k: int, modality: str, limits: Limits) -> int:
    """The shortlist of an asymmetric search (0 for Hamming ranking): the one given (at most
    ``shortlist_cap``; one below ``k`` counts as ``k``), by default the larger of 100 (capped)
    and ``k``. 422 for a shortlist without asymmetric ranking, one over the cap, or an
    asymmetric ``item_id`` query (a stored code has only its bits)."""
    if rank != "asymmetric":
        if shortlist is not None:
            raise RequestError(422, "shortlist: only with rank 'asymmetric'")
        return 0
    if modality == "item":
        raise RequestError(
            422,
            "rank: an item_id query has only its stored bits, no continuous code; "
            "use rank 'hamming'",
        )
    if shortlist is None:
        return max(k, min(DEFAULT_SHORTLIST, limits.shortlist_cap))
    if not 1 <= shortlist <= limits.shortlist_cap:
        raise RequestError(
            422, f"shortlist must be between 1 and {limits.shortlist_cap}, got {shortlist}"
        )
    return max(k, shortlist)


def check_item_id(item_id: str) -> str:
    """A query's ``item_id``: not empty, at most :data:`MAX_ITEM_ID_CHARS` characters."""
    if not item_id or len(item_id) > MAX_ITEM_ID_CHARS:
        raise RequestError(422, f"item_id: must be 1 .. {MAX_ITEM_ID_CHARS} characters")
    return item_id


def _query(
    req: SearchRequest,
    limits: Limits,
    spec: dict[str, Any] | None,
    modality: Literal["text", "image", "item"],
    payload: Callable[[], dict[str, Any]],
) -> Query:
    """The :class:`Query` of a validated request: ``k`` and the ranking checked first, then
    ``payload()`` (the checked text, image bytes or item id)."""
    k = check_k(req.k, limits)
    shortlist = check_ranking(req.rank, req.shortlist, k, modality, limits)
    return Query(
        modality, k, req.target, filter=spec, rank=req.rank, shortlist=shortlist, **payload()
    )


def _image_base64(b64: str, limits: Limits) -> dict[str, Any]:
    if b64.startswith("data:") and "," in b64:  # data URL from a browser
        b64 = b64.split(",", 1)[1]
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image_base64 is not valid base64: {e}") from None
    return {"image": check_image_bytes(data, limits)}


def _from_model(req: SearchRequest, limits: Limits) -> Query:
    spec = check_filter(req.filter)
    if req.text is not None:
        text = req.text
        return _query(req, limits, spec, "text", lambda: {"text": check_text(text, limits)})
    if req.item_id is not None:
        item = req.item_id
        return _query(req, limits, spec, "item", lambda: {"item_id": check_item_id(item)})
    b64 = req.image_base64 or ""
    return _query(req, limits, spec, "image", lambda: _image_base64(b64, limits))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes, limits: Limits) -> Query:
    """Parse a JSON search body (see :class:`deploy.models.SearchRequest`).

    Anything ``json.loads`` cannot turn into a value is a 400: syntax errors, invalid UTF-8,
    ``NaN``/``Infinity``, integers too long for Python to convert, nesting deeper than the
    interpreter's recursion limit.
    """
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise RequestError(400, f"request body is not valid JSON: {msg}") from None
    if not isinstance(obj, dict):
        raise RequestError(422, "request body must be a JSON object")
    nulls = [
        n
        for n in ("text", "image_base64", "item_id", "target", "rank")
        if n in obj and obj[n] is None
    ]
    if nulls:
        raise RequestError(422, f"{nulls[0]}: must be a string, not null")
    for name in ("k", "shortlist"):
        v = obj.get(name)
        if isinstance(v, float) and v.is_integer():
            obj[name] = int(v)  # 3.0 is an integer to JSON Schema
    try:  # strict: "3" is not a JSON integer, 1 is not a string (the form parser is lax)
        req = SearchRequest.model_validate(obj, strict=True)
    except ValidationError as e:
        raise RequestError(422, format_validation_error(e)) from None
    return _from_model(req, limits)


def parse_form(fields: dict[str, Any], limits: Limits) -> Query:
    """Parse a multipart form: ``image`` (file) or ``text``, plus optional ``k``, ``target``,
    ``filter``, ``rank`` and ``shortlist``.

    ``fields`` maps names to strings, or for file parts to ``(filename, content_type, bytes)``.
    """
    unknown = sorted(set(fields) - {"image", "text", "k", "target", "filter", "rank", "shortlist"})
    if unknown:
        raise RequestError(
            422,
            f"unknown form field(s) {', '.join(unknown)}; expected image or text, k, target, "
            "filter, rank, shortlist",
        )
    spec = None
    if "filter" in fields:
        raw = fields["filter"]
        if isinstance(raw, tuple):
            raise RequestError(422, "filter must be a plain form field, not a file")
        try:
            spec = json.loads(raw, parse_constant=_no_constant) if raw else None
        except (ValueError, RecursionError):
            raise RequestError(422, "filter: must be a JSON object") from None
        spec = check_filter(spec)
    image = fields.get("image")
    text = fields.get("text")
    if isinstance(text, tuple):
        raise RequestError(422, "text must be a plain form field, not a file")
    if text == "" and image is not None:
        text = None  # an empty text field next to an image: browsers send one for an empty box
    obj: dict[str, Any] = {}
    for name in ("k", "target", "rank", "shortlist"):
        if name in fields:
            v = fields[name]
            if isinstance(v, tuple):
                raise RequestError(422, f"{name} must be a plain form field, not a file")
            obj[name] = v
    if text is not None:
        obj["text"] = text
    if image is not None:
        obj["image_base64"] = ""  # placeholder so the model checks "exactly one"
    try:
        req = SearchRequest.model_validate(obj)
    except ValidationError as e:
        raise RequestError(422, format_validation_error(e)) from None
    if req.text is not None:
        text = req.text
        return _query(req, limits, spec, "text", lambda: {"text": check_text(text, limits)})
    return _query(req, limits, spec, "image", lambda: _uploaded_image(image, limits))


def _uploaded_image(image: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(image, tuple):
        raise RequestError(422, "image must be uploaded as a file part")
    _, ctype, data = image
    ctype = media_type(ctype)
    if not (ctype.startswith("image/") or ctype in GENERIC_FILE_TYPES):
        raise RequestError(
            415, f"uploaded file has content type {ctype!r}; send an image (JPEG, PNG or TIFF)"
        )
    return {"image": check_image_bytes(data, limits)}


def multipart_boundary(content_type: str) -> str:
    """The ``boundary`` parameter of a multipart content type (``""`` when it names none)."""
    boundary = ""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    return boundary


async def read_form_fields(scope: Scope, body: bytes, limits: Limits) -> dict[str, Any]:
    """Parse a multipart body already read (and size-checked) into the fields of a form.

    Args:
        scope: the request's ASGI scope (its headers give the boundary).
        body: the whole body.
        limits: caps; a text part may be at most about ``4 * max_text_chars`` bytes.

    Returns:
        name -> string for plain fields, ``(filename, content_type, bytes)`` for file parts
        (what :func:`parse_form` takes).

    Raises:
        RequestError: 400 for a malformed body (no boundary, no part, parser errors, more than
            one file or eight fields), 422 for a field given twice.
    """
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    ctype = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
    boundary = multipart_boundary(ctype)
    if not boundary:
        raise RequestError(400, "malformed multipart body: the content type names no boundary")
    if b"--" + boundary.encode("latin-1") not in body:
        raise RequestError(400, "malformed multipart body: no part starts with the boundary")
    req = Request(scope, receive)
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


async def parse_search_request(
    request: Request, limits: Limits, hold: BodyHold | None = None
) -> Query:
    """The :class:`Query` of a ``POST /v1/search`` request: JSON or a multipart form.

    Args:
        request: the HTTP request; its body is read here, chunk by chunk.
        limits: the caps.
        hold: the request's share of the replica's :class:`BodyBudget`, or none.

    Raises:
        RequestError: 415 for another content type, 413 for a body over
            :meth:`Limits.max_body_bytes` (declared or streamed), 503 when the replica's body
            budget is spent, else as the parsers.
    """
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
    body = await read_limited(request.stream(), limit, hold)
    if ctype == "application/json":
        return parse_json(body, limits)
    fields = await read_form_fields(request.scope, body, limits)
    return parse_form(fields, limits)


def decode_query_image(data: bytes, limits: Limits, image_cfg: Any = None) -> np.ndarray:
    """Decode query image bytes to ``(H, W, 3)`` uint8, refusing bombs and non-images.

    The pixel count is read from the file header first, so a decompression bomb is refused
    (413) before any pixel is decoded. With the encoder's ``image_cfg``
    (:class:`duch_core.config.ImageBackboneConfig`) the image is reduced toward the model's
    input size before any conversion (:func:`duch_core.imageio.decode_for_model`).
    """
    from PIL import Image

    from duch_core.imageio import ImageDecodeError, decode_for_model, decode_image, image_size

    try:
        w, h = image_size(data)
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image has too many pixels: {e}") from None
    if w * h > limits.max_image_pixels:
        raise RequestError(
            413, f"image is {w}x{h} = {w * h} pixels; at most {limits.max_image_pixels} accepted"
        )
    try:
        if image_cfg is not None:
            img = decode_for_model(data, image_cfg, max_pixels=limits.max_image_pixels)
        else:
            img = decode_image(data, max_pixels=limits.max_image_pixels)
    except ImageDecodeError as e:
        msg = str(e)
        status = 413 if "pixel" in msg.lower() else 415
        raise RequestError(status, f"cannot use the image: {msg}") from None
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image has too many pixels: {e}") from None
    return np.ascontiguousarray(img)
