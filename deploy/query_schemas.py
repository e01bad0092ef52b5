"""The bodies ``POST /v1/search`` accepts, as JSON Schema with the service's limits (published
in the OpenAPI document): what :mod:`deploy.queries` parses, so that a request the schema
allows is not refused for its shape."""

from typing import Any

from deploy.queries import (
    DEFAULT_K,
    DEFAULT_SHORTLIST,
    MAX_ITEM_ID_CHARS,
    TEXT_PATTERN,
    Limits,
)

#: base64 (standard alphabet, padded), optionally behind a ``data:...,`` URL prefix, non-empty.
BASE64_PATTERN = (
    r"^(data:[^,]*,)?(?:[A-Za-z0-9+/]{4})*"
    r"(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$"
)


def _k_schema(limits: Limits) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 1,
        "maximum": limits.k_cap,
        "description": f"Number of results, 1 .. {limits.k_cap} (default "
        f"{min(DEFAULT_K, limits.k_cap)}).",
    }


def _text_schema(limits: Limits) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": limits.max_text_chars,
        "pattern": TEXT_PATTERN,
        "description": "Query text, e.g. 'a river crossing farmland'.",
    }


def _ranking_schema(limits: Limits) -> dict[str, Any]:
    return {
        "rank": {
            "type": "string",
            "enum": ["hamming", "asymmetric"],
            "default": "hamming",
            "description": "hamming, or asymmetric: each searcher's Hamming shortlist re-ranked "
            "by the query's continuous code (text and image queries).",
        },
        "shortlist": {
            "type": "integer",
            "minimum": 1,
            "maximum": limits.shortlist_cap,
            "description": "Asymmetric only: Hamming candidates re-ranked per searcher, at "
            f"most {limits.shortlist_cap} (default {DEFAULT_SHORTLIST}; fewer than k count as "
            "k).",
        },
    }


#: A shortlist only with asymmetric ranking, which an item_id query cannot have.
RANKING_RULES: dict[str, Any] = {
    "if": {"required": ["rank"], "properties": {"rank": {"const": "asymmetric"}}},
    "then": {"not": {"required": ["item_id"]}},
    "else": {"not": {"required": ["shortlist"]}},
}


TARGET_SCHEMA = {
    "type": "string",
    "enum": ["images", "captions"],
    "default": "images",
    "description": "Search the archive's images or its captions.",
}


_STRINGS = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
    ]
}
FILTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "Only items that pass (all keys must hold): the exact top-k among them.",
    "properties": {
        "bbox": {
            "type": "array",
            "prefixItems": [
                {"type": "number", "minimum": -180, "maximum": 180},
                {"type": "number", "minimum": -90, "maximum": 90},
                {"type": "number", "minimum": -180, "maximum": 180},
                {"type": "number", "minimum": -90, "maximum": 90},
            ],
            "items": False,
            "minItems": 4,
            "description": "[min_lon, min_lat, max_lon, max_lat], WGS84 degrees; min_lon > "
            "max_lon crosses the antimeridian.",
        },
        "datetime": {
            "type": "string",
            "description": "ISO 8601 'start/end' ('..' for an open end) or one instant.",
        },
        "label": _STRINGS,
        "split": _STRINGS,
        "sensor": _STRINGS,
    },
}


def json_body_schema(limits: Limits) -> dict[str, Any]:
    """JSON Schema of the JSON body of ``POST /v1/search`` under ``limits``."""
    return {
        "title": "SearchRequest",
        "description": "A search by text or by image: exactly one of text and image_base64.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "text": _text_schema(limits),
            "image_base64": {
                "type": "string",
                "pattern": BASE64_PATTERN,
                "description": "Query image (JPEG, PNG or TIFF file bytes), base64-encoded.",
            },
            "item_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_ITEM_ID_CHARS,
                "description": "An archive item whose stored image code is the query.",
            },
            "k": {"anyOf": [_k_schema(limits), {"type": "null"}]},
            "target": TARGET_SCHEMA,
            "filter": {"anyOf": [FILTER_SCHEMA, {"type": "null"}]},
            **_ranking_schema(limits),
        },
        "oneOf": [
            {"required": ["text"]},
            {"required": ["image_base64"]},
            {"required": ["item_id"]},
        ],
        **RANKING_RULES,
    }


def form_body_schema(limits: Limits) -> dict[str, Any]:
    """JSON Schema of the multipart form of ``POST /v1/search`` under ``limits``: an ``image``
    file, or a ``text`` field (an empty ``text`` next to an image counts as absent)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "binary", "minLength": 1},
            "text": {"type": "string", "maxLength": limits.max_text_chars},
            "k": _k_schema(limits),
            "target": TARGET_SCHEMA,
            "filter": {
                "type": "string",
                "contentMediaType": "application/json",
                "description": "The search filter as JSON text (see the JSON body's filter).",
            },
            **_ranking_schema(limits),
        },
        "oneOf": [
            {"required": ["image"], "properties": {"text": {"maxLength": 0}}},
            {"required": ["text"], "properties": {"text": _text_schema(limits), "image": False}},
        ],
        # a form has no item_id: the rule is only that a shortlist needs asymmetric ranking
        "dependentSchemas": {
            "shortlist": {"required": ["rank"], "properties": {"rank": {"const": "asymmetric"}}}
        },
    }
