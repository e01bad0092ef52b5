"""Parsing and validation of search queries: every bad input becomes a :class:`RequestError`.

The HTTP layer turns a :class:`RequestError` into its status code and a ``{"detail": message}``
body. Status codes:

* 400: the body is not what its content type says (malformed JSON or multipart, bad base64).
* 413: the body, the image file or the decoded image (pixels) is over its cap.
* 415: a content type the endpoint does not take, or bytes that are not a decodable image.
* 422: a well-formed request with invalid values (empty or over-long text, k out of range,
  unknown target, both or neither of text and image, a form field given twice).

:func:`parse_search_request` is the whole path from an HTTP request to a :class:`Query`: content
type, body size (checked while the body streams in), then JSON (:func:`parse_json`) or
multipart (:func:`read_form_fields` + :func:`parse_form`).
"""

import base64
import binascii
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
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


class RequestError(Exception):
    """A request the service refuses, with the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Caps applied to every query."""

    k_cap: int = 100
    max_text_chars: int = 1000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000

    def max_body_bytes(self, content_type: str) -> int:
        """Largest body accepted for a content type (base64 in JSON costs 4/3 of the bytes)."""
        slack = 64 * 1024 + 4 * self.max_text_chars
        if content_type == "application/json":
            return self.max_image_bytes * 4 // 3 + slack
        return self.max_image_bytes + slack


@dataclass(frozen=True)
class Query:
    """A validated query. ``image`` holds the original file bytes, not yet decoded."""

    modality: Literal["text", "image"]
    k: int
    target: Literal["images", "captions"]
    text: str | None = None
    image: bytes | None = None


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


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """Read a streamed body, refusing it (413) as soon as it grows past ``limit`` bytes."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise RequestError(413, f"request body is larger than {limit} bytes")
    return bytes(buf)


DEFAULT_K = 20


def check_k(k: int | None, limits: Limits) -> int:
    """``k`` within ``1 .. k_cap``; ``None`` means the default (20, or the cap if lower)."""
    if k is None:
        return min(DEFAULT_K, limits.k_cap)
    if k < 1 or k > limits.k_cap:
        raise RequestError(422, f"k must be between 1 and {limits.k_cap}, got {k}")
    return k


def check_text(text: str, limits: Limits) -> str:
    """Strip and bound a query text (422 when empty or longer than the cap)."""
    t = text.strip()
    if not t:
        raise RequestError(422, "text is empty")
    if len(t) > limits.max_text_chars:
        raise RequestError(
            422, f"text is {len(t)} characters long; at most {limits.max_text_chars} are accepted"
        )
    return t


def check_image_bytes(data: bytes, limits: Limits) -> bytes:
    if not data:
        raise RequestError(422, "image is empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            413, f"image file is {len(data)} bytes; at most {limits.max_image_bytes} are accepted"
        )
    return data


def _from_model(req: SearchRequest, limits: Limits) -> Query:
    k = check_k(req.k, limits)
    if req.text is not None:
        return Query("text", k, req.target, text=check_text(req.text, limits))
    b64 = req.image_base64 or ""
    if b64.startswith("data:") and "," in b64:  # data URL from a browser
        b64 = b64.split(",", 1)[1]
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image_base64 is not valid base64: {e}") from None
    return Query("image", k, req.target, image=check_image_bytes(data, limits))


def parse_json(body: bytes, limits: Limits) -> Query:
    """Parse a JSON search body (see :class:`deploy.models.SearchRequest`)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(422, "request body must be a JSON object")
    try:
        req = SearchRequest.model_validate(obj)
    except ValidationError as e:
        raise RequestError(422, format_validation_error(e)) from None
    return _from_model(req, limits)


def parse_form(fields: dict[str, Any], limits: Limits) -> Query:
    """Parse a multipart form: ``image`` (file) or ``text``, plus optional ``k`` and ``target``.

    ``fields`` maps names to strings, or for file parts to ``(filename, content_type, bytes)``.
    """
    unknown = sorted(set(fields) - {"image", "text", "k", "target"})
    if unknown:
        raise RequestError(
            422, f"unknown form field(s) {', '.join(unknown)}; expected image or text, k, target"
        )
    image = fields.get("image")
    text = fields.get("text")
    if isinstance(text, tuple):
        raise RequestError(422, "text must be a plain form field, not a file")
    obj: dict[str, Any] = {}
    for name in ("k", "target"):
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
    k = check_k(req.k, limits)
    if req.text is not None:
        return Query("text", k, req.target, text=check_text(req.text, limits))
    if not isinstance(image, tuple):
        raise RequestError(422, "image must be uploaded as a file part")
    _, ctype, data = image
    ctype = media_type(ctype)
    if not (ctype.startswith("image/") or ctype in GENERIC_FILE_TYPES):
        raise RequestError(
            415, f"uploaded file has content type {ctype!r}; send an image (JPEG, PNG or TIFF)"
        )
    return Query("image", k, req.target, image=check_image_bytes(data, limits))


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


async def parse_search_request(request: Request, limits: Limits) -> Query:
    """The :class:`Query` of a ``POST /v1/search`` request: JSON or a multipart form.

    Raises:
        RequestError: 415 for another content type, 413 for a body over
            :meth:`Limits.max_body_bytes` (declared or streamed), else as the parsers.
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
    body = await read_limited(request.stream(), limit)
    if ctype == "application/json":
        return parse_json(body, limits)
    fields = await read_form_fields(request.scope, body, limits)
    return parse_form(fields, limits)


def decode_query_image(data: bytes, limits: Limits) -> np.ndarray:
    """Decode query image bytes to ``(H, W, 3)`` uint8, refusing bombs and non-images.

    The pixel count is read from the file header first, so a decompression bomb is refused
    (413) before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    from duch_core.imageio import ImageDecodeError, decode_image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image has too many pixels: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        w = h = 0  # not readable by Pillow's header parser; the decoder decides
    if w * h > limits.max_image_pixels:
        raise RequestError(
            413, f"image is {w}x{h} = {w * h} pixels; at most {limits.max_image_pixels} accepted"
        )
    try:
        img = decode_image(data, max_pixels=limits.max_image_pixels)
    except ImageDecodeError as e:
        msg = str(e)
        status = 413 if "pixel" in msg.lower() else 415
        raise RequestError(status, f"cannot use the image: {msg}") from None
    return np.ascontiguousarray(img)
