"""Request and response models of the HTTP API (published in the OpenAPI document)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Target = Literal["images", "captions"]
QueryModality = Literal["text", "image", "item"]
Ranking = Literal["hamming", "asymmetric"]
Box = list[float]


class SearchFilter(BaseModel):
    """Which items may be returned (all given keys must hold). The result is the exact top-k
    among the items that pass, never fewer than k when at least k pass."""

    model_config = ConfigDict(extra="forbid")

    bbox: list[float] | None = Field(
        None,
        description="[min_lon, min_lat, max_lon, max_lat], WGS84 degrees; min_lon > max_lon "
        "crosses the antimeridian. Items whose footprint box intersects it pass.",
    )
    datetime: str | None = Field(
        None,
        description="ISO 8601 'start/end' (either end '..' for open) or one instant; ends "
        "inclusive, a date alone covers its whole day (UTC).",
    )
    label: str | list[str] | None = Field(None, description="One label or a list of labels.")
    split: str | list[str] | None = Field(None, description="train, query or database.")
    sensor: str | list[str] | None = Field(None, description="One sensor or a list.")


class SearchRequest(BaseModel):
    """A search by text, by image or by an archive item (JSON body of ``POST /v1/search``).

    Exactly one of ``text``, ``image_base64`` and ``item_id`` is given. ``k`` is bounded by the
    service's cap (``GET /v1/index`` reports it as ``k_cap``).
    """

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Query text, e.g. 'a river crossing farmland'.")
    image_base64: str | None = Field(
        None, description="Query image (JPEG, PNG or TIFF file bytes), base64-encoded."
    )
    item_id: str | None = Field(
        None,
        description="An archive item whose stored image code is the query ('more like this'; "
        "no encoder call).",
    )
    k: int | None = Field(
        None, ge=1, description="Number of results, 1 .. k_cap (default 20, or k_cap if lower)."
    )
    target: Target = Field("images", description="Search the archive's images or its captions.")
    filter: SearchFilter | None = Field(None, description="Only items that pass this filter.")
    rank: Ranking = Field(
        "hamming",
        description="'hamming': by Hamming distance, ties by index position. 'asymmetric': "
        "each searcher's Hamming shortlist re-ranked by the query's continuous code against "
        "the stored bits (score = <tanh outputs, ±1 bits>, higher first); text and image "
        "queries only.",
    )
    shortlist: int | None = Field(
        None,
        ge=1,
        description="Asymmetric ranking only: Hamming candidates re-ranked per searcher, at "
        "most shortlist_cap (default 100; fewer than k count as k).",
    )

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [self.text, self.image_base64, self.item_id]
        if sum(v is not None for v in given) != 1:
            raise ValueError("give exactly one of 'text', 'image_base64' and 'item_id'")
        return self


class Hit(BaseModel):
    """One result: an archive item (image hit) or one of its captions (caption hit)."""

    rank: int = Field(description="1-based rank.")
    item_id: str
    distance: int = Field(description="Hamming distance between the query code and the item code.")
    score: float | None = Field(
        None, description="Asymmetric ranking: <query's continuous code, item's ±1 bits>."
    )
    image_uri: str | None = Field(description="Where the item's image lives in the archive.")
    captions: list[str] = Field(description="All captions of the item.")
    caption_index: int | None = Field(
        None, description="For caption hits: which of the item's captions matched."
    )
    caption: str | None = Field(None, description="For caption hits: the matched caption.")
    thumbnail_url: str = Field(description="Relative URL of a small preview image.")
    bbox: Box | None = Field(
        None, description="Footprint box [min_lon, min_lat, max_lon, max_lat]."
    )
    datetime: str | None = Field(None, description="Acquisition time (ISO 8601, UTC).")
    sensor: str | None = None
    crs: str | None = Field(None, description="CRS of the source scene (e.g. EPSG:32618).")


class SearchResponse(BaseModel):
    """Top-k results, all from one index version."""

    index_version: str
    bundle_id: str
    bits: int
    query_modality: QueryModality
    target: Target
    k: int
    rank: Ranking = "hamming"
    hits: list[Hit]
    timings_ms: dict[str, float] = Field(
        default_factory=dict, description="Server-side time spent in encode, search and total."
    )


class IndexInfo(BaseModel):
    """The index version being served."""

    version: str
    manifest_uri: str
    bundle_id: str
    bits: int
    bitorder: str
    counts: dict[str, int] = Field(description="Indexed codes per modality (image, text).")
    n_searchers: int
    k_cap: int
    shortlist_cap: int = Field(1000, description="Largest shortlist of asymmetric ranking.")
    loaded_at: float = Field(description="Unix time the version started serving.")
    archive_uri: str | None = None


class Item(BaseModel):
    """An archive item."""

    item_id: str
    image_uri: str | None
    captions: list[str]
    label: str | None = None
    split: str | None = None
    thumbnail_url: str
    index_version: str
    bbox: Box | None = Field(
        None, description="Footprint box [min_lon, min_lat, max_lon, max_lat]."
    )
    datetime: str | None = Field(None, description="Acquisition time (ISO 8601, UTC).")
    sensor: str | None = None
    crs: str | None = Field(None, description="CRS of the source scene (e.g. EPSG:32618).")


class ReloadResponse(BaseModel):
    """Outcome of a reload: the version served now and whether it changed."""

    changed: bool
    version: str
    previous_version: str | None


class Health(BaseModel):
    """Liveness for load balancers, without internals (details: ``GET /v1/status``).

    ``ok``: serving and following ``LATEST``; ``degraded``: serving, but the last reload or poll
    failed; ``unavailable`` (answered 503): no index version is served.
    """

    status: Literal["ok", "degraded", "unavailable"]
    index_version: str | None = None


class ReplicaMemory(BaseModel):
    """Memory of the answering replica's process (from ``/proc/self/status``)."""

    rss_bytes: int | None = Field(description="Resident set size now.")
    peak_rss_bytes: int | None = Field(description="Highest resident set size (VmHWM).")


class Status(BaseModel):
    """What an operator needs to see about the answering ingress replica."""

    status: Literal["ok", "degraded", "unavailable"]
    index_version: str | None
    index_created: str | None = Field(description="When the served version was encoded.")
    index_age_s: float | None = Field(description="Seconds since the served version was encoded.")
    previous_version: str | None
    bundle_id: str = Field(description="Bundle of the query encoder.")
    last_error: str | None = Field(description="Why the last reload or poll failed, if it did.")
    refused_versions: dict[str, str] = Field(description="Versions refused, with the reason.")
    reload_failures: int
    refused_requests: dict[str, int] = Field(description="Requests refused, by reason.")
    auth: Literal["token", "anonymous"]
    admin_token: bool = Field(description="Whether an admin token is configured.")
    decode_slots: int = Field(description="Image decodes this replica runs at once.")
    body_budget_bytes: int = Field(description="Request body bytes this replica may hold.")
    body_bytes_held: int
    memory: ReplicaMemory
    pid: int = Field(description="Process id of the answering replica.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    detail: str
