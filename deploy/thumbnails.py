"""Thumbnails of archive images for the web page and API clients, with an in-memory LRU cache.

A thumbnail is a JPEG at most ``size`` pixels on its long side, made from the archive image on
the first request and kept by image URI; the least recently used ones are dropped past
``capacity``. Requests run in worker threads, so the cache is guarded by a lock; two threads
missing the same image both make it, and the second simply replaces the first.

Memory: an archive object larger than ``max_bytes`` is refused before it is read, and the image
is reduced toward twice the thumbnail size while it is decoded
(:func:`duch_core.imageio.decode_image` with ``reduce``), so a large scene never exists as
floats or at full size in 8 bits. A chip (a window of a georeferenced scene) is read by window
at the thumbnail's size, from the band files' overviews where they have them.
"""

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

#: Largest archive image a thumbnail is made from (pixels), as the encode job's default.
THUMBNAIL_MAX_PIXELS = 1 << 26


def thumbnail_url(item_id: str) -> str:
    """Relative URL of an item's thumbnail (``GET /v1/thumbnails/{id}``)."""
    return f"/v1/thumbnails/{quote(item_id, safe='')}"


def make_thumbnail(data: bytes, size: int) -> bytes:
    """Decode archive image bytes and return a JPEG at most ``size`` pixels on its long side.

    Raises:
        duch_core.imageio.ImageDecodeError: the bytes are not a decodable image (a ValueError).
    """
    from PIL import Image

    from duch_core.imageio import decode_image, image_size, reduction_for

    w, h = image_size(data)
    reduce = reduction_for(max(w, h), size)
    img = Image.fromarray(decode_image(data, max_pixels=THUMBNAIL_MAX_PIXELS, reduce=reduce))
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def make_chip_thumbnail(chip: dict[str, Any], size: int) -> bytes:
    """A JPEG at most ``size`` pixels on its long side of a chip (a window of a scene, see
    :mod:`duch_core.chip_io`): only the window is read, at the thumbnail's size, so GDAL takes
    it from an overview level where the band files have one.

    Raises:
        FileNotFoundError: a band file is missing.
        ValueError: the chip cannot be read (``duch_core.chip_io.SceneError``).
    """
    from PIL import Image

    from duch_core import chip_io

    _, _, w, h = chip_io.parse_chip_uri(str(chip["image_uri"])).window
    scale = min(1.0, size / max(w, h))
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    try:
        picture = chip_io.decode_chip(chip, out_shape=shape, max_pixels=THUMBNAIL_MAX_PIXELS)
    except chip_io.SceneError as e:
        if e.stage == "open" and "no such file" in e.reason:
            raise FileNotFoundError(str(e)) from e
        raise
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="JPEG", quality=85)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails by image URI, at most ``capacity`` of them (least recently used dropped first).

    Args:
        read: ``(image URI, byte limit)`` -> the archive file's bytes (refusing larger objects
            with a ValueError).
        size: thumbnail long side, pixels.
        capacity: thumbnails kept; 0 keeps none.
        max_bytes: largest archive image read for a thumbnail.
    """

    def __init__(
        self,
        read: Callable[[str, int | None], bytes],
        size: int,
        capacity: int,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._read = read
        self.size = size
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, image_uri: str) -> bool:
        return image_uri in self._items

    def get(self, image_uri: str, bands: list[str] | None = None) -> bytes:
        """The JPEG thumbnail of ``image_uri``, made on a miss (blocking: call from a thread).
        A chip URI (a window of a scene, with its ``bands`` files) is read by window.

        Raises:
            FileNotFoundError: the image is missing.
            ValueError: the image is over ``max_bytes`` or cannot be decoded.
        """
        from duch_core.chip_io import is_chip_uri

        with self._lock:
            hit = self._items.get(image_uri)
            if hit is not None:
                self._items.move_to_end(image_uri)
                return hit
        if is_chip_uri(image_uri):
            data = make_chip_thumbnail({"image_uri": image_uri, "bands": bands}, self.size)
        else:
            data = make_thumbnail(self._read(image_uri, self.max_bytes), self.size)
        with self._lock:
            self._items[image_uri] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data
