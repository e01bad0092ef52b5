"""The web page's map: footprints of the hits and a drawn box as the ``bbox`` filter.

One colocated Serve application on 127.0.0.1 serves a small index with real footprints: 16
places in the Alps seen on 3 dates each (same footprint, different acquisition times) and 12
chips around Fiji, some crossing the antimeridian; codes are random, the bundle is a tiny
untrained one so text queries encode. Headless Chromium (Debian's ``chromium``, driven through
the DevTools protocol) checks that every hit's footprint is drawn where the GeoJSON answer says,
that hovering links a footprint and its figure, and that a box dragged with real mouse events,
"this place, other dates", "more like this" and "clear box" each give exactly the JSON API's
answer to the same request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import requests
from test_serve_app import ARTIFACTS, CHROMIUM, Browser, free_port, make_bundle

pytestmark = pytest.mark.timeout(300)

TOKEN_ENV, TOKEN = "DUCH_MAP_API_TOKEN", "map-test-token-5e2a"
BITS = 32
K = 20
TEXT = "a river crossing farmland"
ALPS_PLACES, DATES, FIJI = 16, 3, 12


# ---- the index: footprints, dates, sensors ----------------------------------------------------


def _items(rng: np.random.Generator) -> list[dict[str, Any]]:
    items = []
    for p in range(ALPS_PLACES):
        lon, lat = rng.uniform(6.2, 11.5), rng.uniform(44.2, 47.6)
        w, h = rng.uniform(0.1, 0.3, 2)
        box = [round(lon, 6), round(lat, 6), round(lon + w, 6), round(lat + h, 6)]
        for d in range(DATES):
            day = np.datetime64("2023-04-01") + np.timedelta64(int(120 * d + rng.integers(30)), "D")
            items.append(
                {
                    "item_id": f"alps/p{p:02d}/t{d}",
                    "bbox": box,
                    "datetime": f"{day}T10:20:00Z",
                    "sensor": "sentinel-2a" if d % 2 == 0 else "landsat-8",
                    "crs": "EPSG:32632",
                    "label": "alpine",
                    "color": (40 + 12 * p, 120 + 40 * d, 90),
                }
            )
    for i in range(FIJI):
        # the first four straddle 180°; the rest lie on either side of it
        centre = 179.95 + rng.uniform(-0.05, 0.05) if i < 4 else rng.uniform(178.6, 181.4)
        west, east = centre - 0.15, centre + 0.15
        wrap = lambda x: round((x + 180) % 360 - 180, 6)  # noqa: E731
        lat = rng.uniform(-18.0, -16.3)
        items.append(
            {
                "item_id": f"fiji/c{i:02d}",
                "bbox": [wrap(west), round(lat, 6), wrap(east), round(lat + 0.3, 6)],
                "datetime": f"2024-0{1 + i % 9}-15T22:05:00Z",
                "sensor": "sentinel-2b",
                "crs": "EPSG:32760",
                "label": "island",
                "color": (30, 80 + 10 * i, 200),
            }
        )
    return items


def build_index(work: Path) -> tuple[str, str, list[dict[str, Any]]]:
    """Bundle, chip images and an index version with a catalog snapshot; returns the bundle
    URI, the index root and the items."""
    from PIL import Image

    from deploy.artifacts import bundle_identity
    from duch_core import catalog_snapshot
    from duch_core import index_store as ix

    rng = np.random.default_rng(11)
    bundle = make_bundle(str(work / "bundle"), BITS, seed=0)
    bits, bundle_id = bundle_identity(bundle)
    items = _items(rng)
    (work / "chips").mkdir()
    for it in items:
        path = work / "chips" / (it["item_id"].replace("/", "_") + ".png")
        img = np.zeros((32, 32, 3), np.uint8) + np.array(it["color"], np.uint8)
        img[8:24, 8:24] = 255 - img[8:24, 8:24]
        Image.fromarray(img).save(path)
        it["image_uri"] = str(path)
    ids = [it["item_id"] for it in items]
    n = len(items)
    catalog = pa.table(
        {
            "item_id": ids,
            "image_uri": [it["image_uri"] for it in items],
            "captions": [[f"chip {it['item_id']}", f"{it['label']} scene"] for it in items],
            "label": [it["label"] for it in items],
            "split": pa.nulls(n, pa.string()),
            "bbox": pa.array([it["bbox"] for it in items], pa.list_(pa.float64())),
            "datetime": [it["datetime"] for it in items],
            "sensor": [it["sensor"] for it in items],
            "crs": [it["crs"] for it in items],
        }
    )
    root = str(work / "index")
    version = ix.new_version_id()
    vdir = ix.version_uri(root, version)
    part = catalog_snapshot.write_catalog_part(vdir, catalog)
    img_codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    txt_codes = rng.integers(0, 256, (2 * n, bits // 8), dtype=np.uint8)
    shard = ix.shard_table(
        ids + [i for i in ids for _ in range(2)],
        ["image"] * n + ["text"] * 2 * n,
        [-1] * n + [j for _ in ids for j in range(2)],
        np.concatenate([img_codes, txt_codes]),
        ["fp"] * 3 * n,
        bundle_id,
        bits,
    )
    ix.finish_version(
        root,
        version,
        [ix.write_shard(vdir, shard)],
        bundle_id,
        bits,
        catalog=ix.catalog_info([part]),
        bundle_uri=bundle,
    )
    return bundle, root, items


@dataclass
class MapService:
    url: str
    session: requests.Session
    items: dict[str, dict[str, Any]]

    def search(self, geojson: bool = False, **body: Any) -> dict[str, Any]:
        headers = {"Accept": "application/geo+json"} if geojson else {}
        r = self.session.post(f"{self.url}/v1/search", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory) -> Any:  # noqa: ARG001
    from ray import serve

    from deploy.app import CONTROLLER_OPTIONS, AppArgs, compose

    t0 = time.monotonic()
    bundle, root, items = build_index(tmp_path_factory.mktemp("map"))
    t_index = time.monotonic() - t0
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, controller_options=CONTROLLER_OPTIONS
    )
    args = AppArgs(
        index_root=root,
        bundle_uri=bundle,
        n_searchers=0,
        encode_in_ingress=True,
        poll_interval_s=0,
        auth_token_env=TOKEN_ENV,
        admin_token_env=None,
        thumbnail_size=64,
    )
    try:
        serve.run(
            compose(
                args,
                ingress_options={"ray_actor_options": {"num_cpus": 0.25}},
                ingress_env={TOKEN_ENV: TOKEN},
            ),
            name="duch-map",
            route_prefix="/",
        )
        print(f"map service: index {t_index:.1f} s, up after {time.monotonic() - t0:.1f} s")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield MapService(f"http://127.0.0.1:{port}", session, {it["item_id"]: it for it in items})
    finally:
        serve.shutdown()


# ---- helpers ------------------------------------------------------------------------------------


def geojson_box(geometry: dict[str, Any]) -> list[float]:
    """``[w, s, e, n]`` of a footprint geometry as one continuous box: a MultiPolygon split at
    the antimeridian (RFC 7946 3.1.9) is joined again, its eastern half moved by +360°."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    rings = [np.asarray(p[0], float) for p in polys]
    if len(rings) == 2:  # [w, 180] and [-180, e]
        west_half, east_half = sorted(rings, key=lambda r: -r[:, 0].max())
        assert west_half[:, 0].max() == 180.0 and east_half[:, 0].min() == -180.0
        rings = [west_half, east_half + np.array([360.0, 0.0])]
    pts = np.concatenate(rings)
    return [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]


def same_place(drawn: list[float], expected: list[float]) -> bool:
    """Whether a box drawn on the map is ``expected`` on one of the world's copies."""
    turns = round((drawn[0] - expected[0]) / 360)
    shifted = [expected[0] + 360 * turns, expected[1], expected[2] + 360 * turns, expected[3]]
    return bool(np.allclose(drawn, shifted, rtol=0, atol=1e-9))


def intersects(a: list[float], b: list[float]) -> bool:
    """Whether two boxes that do not cross the antimeridian intersect."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def shown(b: Browser) -> list[tuple[str, int]]:
    return [
        (i, d)
        for i, d in b.eval(
            "[...document.querySelectorAll('figure.hit')].map(f => "
            "[f.dataset.itemId, +f.dataset.distance])"
        )
    ]


def expected(api: dict[str, Any]) -> list[tuple[str, int]]:
    return [(h["item_id"], h["distance"]) for h in api["hits"]]


LAYERS = (
    "Object.fromEntries([...duchMap.footprints].map(([id, l]) => { const b = l.getBounds();"
    " return [id, [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]]; }))"
)
# each footprint's SVG path on screen vs. where Leaflet projects its bounds, in pixels (container
# points start inside the map's border)
PIXEL_ERROR = (
    "Math.max(0, ...[...duchMap.footprints.values()].map(l => {"
    " const m = duchMap.map, r = l.getElement().getBoundingClientRect(), e = m.getContainer(),"
    " c = e.getBoundingClientRect(), b = l.getBounds(),"
    " nw = m.latLngToContainerPoint(b.getNorthWest()),"
    " se = m.latLngToContainerPoint(b.getSouthEast());"
    " const x = c.left + e.clientLeft, y = c.top + e.clientTop;"
    " return Math.max(Math.abs(r.left - x - nw.x), Math.abs(r.top - y - nw.y),"
    " Math.abs(r.right - x - se.x), Math.abs(r.bottom - y - se.y)); }))"
)


def check_footprints(b: Browser, fc: dict[str, Any]) -> None:
    """One footprint layer per hit, each where the GeoJSON Feature of that hit says."""
    layers = b.eval(LAYERS)
    assert sorted(layers) == sorted(f["id"] for f in fc["features"])
    for f in fc["features"]:
        assert same_place(layers[f["id"]], geojson_box(f["geometry"])), (f, layers[f["id"]])
    assert b.eval("document.querySelectorAll('path.footprint').length") == len(fc["features"])
    assert b.eval(PIXEL_ERROR) <= 1.0  # Leaflet rounds to whole pixels


def wait_searches(b: Browser, n: int) -> None:
    b.wait_for(f"+document.body.dataset.searches >= {n} && document.body.dataset.state === 'done'")
    assert b.eval("+document.body.dataset.searches") == n


def client_point(b: Browser, lat: float, lon: float) -> list[int]:
    """Viewport pixel of a lon/lat on the map (integers, as mouse events carry them)."""
    return b.eval(
        f"(() => {{ const m = duchMap.map, e = m.getContainer(), c = e.getBoundingClientRect(),"
        f" p = m.latLngToContainerPoint([{lat}, {lon}]);"
        " return [Math.round(c.left + e.clientLeft + p.x), Math.round(c.top + e.clientTop + p.y)];"
        " })()"
    )


def mouse(b: Browser, kind: str, x: float, y: float, pressed: bool = False) -> None:
    b.call(
        "Input.dispatchMouseEvent",
        type=kind,
        x=x,
        y=y,
        button="left" if kind != "mouseMoved" or pressed else "none",
        buttons=1 if pressed or kind == "mousePressed" else 0,
        clickCount=0 if kind == "mouseMoved" else 1,
    )


def click(b: Browser, selector: str) -> None:
    """A real mouse click in the middle of an element (scrolled into view first)."""
    x, y = b.eval(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
        " e.scrollIntoView({block: 'nearest'}); const r = e.getBoundingClientRect();"
        " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    mouse(b, "mouseMoved", x, y)
    mouse(b, "mousePressed", x, y)
    mouse(b, "mouseReleased", x, y)


# ---- tests --------------------------------------------------------------------------------------


def test_static_files_are_served_without_listing_or_escape(service: MapService) -> None:
    js = requests.get(f"{service.url}/static/vendor/leaflet/leaflet.js", timeout=30)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "1.9.4" in js.text
    css = requests.get(f"{service.url}/static/vendor/leaflet/leaflet.css", timeout=30)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for path in ("/static/", "/static/vendor/", "/static/vendor/leaflet", "/static/../app.py"):
        assert requests.get(f"{service.url}{path}", timeout=30).status_code == 404, path
    page = requests.get(f"{service.url}/", timeout=30).text
    assert '<body data-tiles-url="" data-tiles-attribution="">' in page  # no tiles: graticule
    assert "unpkg" not in page and "cdn" not in page.lower()


def test_tile_url_is_validated_and_escaped_into_the_page() -> None:
    from pydantic import ValidationError

    from deploy.app import AppArgs
    from deploy.ingress import render_page

    ok = "https://{s}.tile.example.org/{z}/{x}/{y}{r}.png?key=a&b=c"
    args = AppArgs(index_root="s3://b/i", map_tiles_url=ok, map_tiles_attribution="© <Maps> & co")
    settings = args.ingress_settings()
    assert settings.map_tiles_url == ok
    assert AppArgs(index_root="x", map_tiles_url="/tiles/{z}/{x}/{y}.png").map_tiles_url
    page = render_page("<html><body>x</body></html>", ok, settings.map_tiles_attribution)
    assert 'data-tiles-url="https://{s}.tile.example.org/{z}/{x}/{y}{r}.png?key=a&amp;b=c"' in page
    assert 'data-tiles-attribution="© &lt;Maps&gt; &amp; co"' in page
    for bad in (
        "tile.example.org/{z}/{x}/{y}.png",  # no scheme
        "ftp://example.org/{z}/{x}/{y}.png",
        "javascript:alert(1)//{z}{x}{y}",
        "//example.org/{z}/{x}/{y}.png",
        "https://example.org/{z}/{x}.png",  # no {y}
        "https://example.org/{z}/{x}/{y}/{token}.png",
        'https://example.org/{z}/{x}/{y}.png" onload="x',
        "https://example.org/{z}/{x}/{y}.png\n",
    ):
        with pytest.raises(ValidationError, match="map_tiles_url"):
            AppArgs(index_root="x", map_tiles_url=bad)
    with pytest.raises(ValidationError, match="map_tiles_attribution"):
        AppArgs(index_root="x", map_tiles_attribution="© someone")  # attribution without tiles
    with pytest.raises(ValidationError, match="map_tiles_attribution"):
        AppArgs(index_root="x", map_tiles_url=ok, map_tiles_attribution="a\nb")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian chromium is not installed (apt-get install -y chromium); the map is untested",
)
def test_map_draws_footprints_and_a_drawn_box_filters_the_search(
    service: MapService, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    b = Browser(tmp_path / "profile")
    try:
        b.goto(f"{service.url}/")
        b.eval(f"localStorage.setItem('duch-token', {json.dumps(TOKEN)})")
        b.goto(f"{service.url}/")
        assert b.eval("typeof L === 'object' && L.version") == "1.9.4"
        # no tile URL: a lon/lat graticule and no tile layer
        assert b.eval("document.querySelectorAll('.leaflet-graticule-pane path').length") > 4
        assert b.eval("document.querySelectorAll('.leaflet-tile').length") == 0

        # 1. a text search: one footprint per hit, where the GeoJSON answer says
        b.eval(
            f"document.getElementById('q').value = {json.dumps(TEXT)};"
            f"document.getElementById('k').value = '{K}';"
            "document.getElementById('go').click(); true"
        )
        wait_searches(b, 1)
        api = service.search(text=TEXT, k=K)
        assert shown(b) == expected(api)
        fc = service.search(geojson=True, text=TEXT, k=K)
        assert [f["id"] for f in fc["features"]] == [h["item_id"] for h in api["hits"]]
        check_footprints(b, fc)

        # 2. hovering a footprint highlights its figure; hovering a figure, its footprint
        top = api["hits"][0]["item_id"]
        lat = (service.items[top]["bbox"][1] + service.items[top]["bbox"][3]) / 2
        b.eval(
            "document.getElementById('map').scrollIntoView({block: 'nearest'});"
            "duchMap.map.setView(duchMap.footprints.get("
            f"{json.dumps(top)}).getBounds().getCenter(), 9, {{animate: false}}); true"
        )
        x, y = client_point(
            b, lat, b.eval(f"duchMap.footprints.get({json.dumps(top)}).getBounds().getCenter().lng")
        )
        mouse(b, "mouseMoved", x, y)
        under = b.eval(f"document.elementFromPoint({x}, {y}).dataset.itemId")
        assert under in {h["item_id"] for h in api["hits"]}
        b.wait_for(
            f"document.querySelector('figure.hit.hl')?.dataset.itemId === {json.dumps(under)}", 5
        )
        assert b.eval(f"duchMap.footprints.get({json.dumps(under)}).options.color") == "#d9480f"
        second = api["hits"][1]["item_id"]
        frame = "figure.hit:nth-child(2) .frame"
        fx, fy = b.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(frame)});"
            " e.scrollIntoView({block: 'nearest'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        mouse(b, "mouseMoved", fx, fy)
        b.wait_for(f"duchMap.footprints.get({json.dumps(second)}).options.color === '#d9480f'", 5)
        assert b.eval("[...document.querySelectorAll('figure.hit.hl')].length") == 1
        if under != second:
            color = b.eval(f"duchMap.footprints.get({json.dumps(under)}).options.color")
            assert color != "#d9480f"

        # 3. "draw box", then drag a box over the western Alps with real mouse events
        b.eval(
            "window.scrollTo(0, 0);"
            "document.getElementById('map').scrollIntoView({block: 'nearest'});"
            "duchMap.map.fitBounds([[43.5, 4.5], [48.5, 12.5]], {animate: false}); true"
        )
        click(b, "#draw-box")
        assert b.eval("document.body.dataset.drawing") == "1"
        # from the south-east corner to the north-west one
        (x0, y0), (x1, y1) = client_point(b, 45.3, 9.0), client_point(b, 47.5, 6.2)
        corners = b.eval(
            "(() => { const m = duchMap.map, e = m.getContainer(), c = e.getBoundingClientRect();"
            f" return [[{x0}, {y0}], [{x1}, {y1}]].map(([x, y]) => m.containerPointToLatLng("
            "[x - c.left - e.clientLeft, y - c.top - e.clientTop])); })()"
        )
        mouse(b, "mouseMoved", x0, y0)
        mouse(b, "mousePressed", x0, y0)
        for f in (0.25, 0.5, 0.75, 1.0):
            mouse(b, "mouseMoved", x0 + f * (x1 - x0), y0 + f * (y1 - y0), pressed=True)
        mouse(b, "mouseReleased", x1, y1)
        wait_searches(b, 2)
        box = json.loads(b.eval("document.body.dataset.bbox"))
        lons = sorted(c["lng"] for c in corners)
        lats = sorted(c["lat"] for c in corners)
        # where the page says the mouse went, to a fraction of a pixel (~0.015° here)
        assert np.allclose(box, [lons[0], lats[0], lons[1], lats[1]], rtol=0, atol=0.005), box
        assert b.eval("document.body.dataset.drawing") == ""
        api_box = service.search(text=TEXT, k=K, filter={"bbox": box})
        assert shown(b) == expected(api_box) != expected(api)
        assert 0 < len(api_box["hits"]) <= K
        assert all(intersects(h["bbox"], box) for h in api_box["hits"])
        check_footprints(b, service.search(geojson=True, text=TEXT, k=K, filter={"bbox": box}))
        assert f"bbox={','.join(str(v) for v in box)}".replace(",", "%2C") in b.eval(
            "location.search"
        )
        b.wait_for(
            "[...document.querySelectorAll('figure.hit img.thumb')].every(i => i.dataset.loaded)"
        )
        # the screenshot: the whole map in view, the best hit's footprint under the mouse
        b.eval("document.getElementById('map').scrollIntoView({block: 'nearest'}); true")
        best = api_box["hits"][0]
        bw, bs, be, bn = best["bbox"]
        mouse(b, "mouseMoved", *client_point(b, (bs + bn) / 2, (bw + be) / 2))
        b.wait_for("document.querySelectorAll('figure.hit.hl').length === 1", 5)
        b.screenshot(ARTIFACTS / "serve_map.png")

        # 4. "this place, other dates" of the best hit: its code, its footprint as the box
        item = api_box["hits"][0]["item_id"]
        place = service.items[item]["bbox"]
        b.eval("document.querySelector('figure.hit .actions button.dates').click(); true")
        wait_searches(b, 3)
        api_place = service.search(item_id=item, k=K, filter={"bbox": place})
        assert shown(b) == expected(api_place)
        assert expected(api_place)[0] == (item, 0)
        same = {i for i, it in service.items.items() if it["bbox"] == place}
        assert len(same) == DATES and same <= {h["item_id"] for h in api_place["hits"]}
        assert json.loads(b.eval("document.body.dataset.bbox")) == place
        assert same_place(
            b.eval(
                "(() => { const x = duchMap.box().getBounds();"
                " return [x.getWest(), x.getSouth(), x.getEast(), x.getNorth()]; })()"
            ),
            place,
        )

        # 5. "more like this" of the second figure keeps the box; "clear box" drops it
        other = shown(b)[1][0]
        b.eval("document.querySelectorAll('figure.hit .actions button.more')[1].click(); true")
        wait_searches(b, 4)
        assert shown(b) == expected(service.search(item_id=other, k=K, filter={"bbox": place}))
        click(b, "#clear-box")
        wait_searches(b, 5)
        assert b.eval("document.body.dataset.bbox") == ""
        api_other = service.search(item_id=other, k=K)
        assert shown(b) == expected(api_other)
        check_footprints(b, service.search(geojson=True, item_id=other, k=K))

        # 6. an antimeridian footprint is one small box east of 180°, not a band round the world
        crossing = "fiji/c00"
        w, s, e, n = service.items[crossing]["bbox"]
        assert w > e
        b.goto(f"{service.url}/?item={crossing}&k=6")
        wait_searches(b, 1)
        fc = service.search(geojson=True, item_id=crossing, k=6)
        assert fc["features"][0]["geometry"]["type"] == "MultiPolygon"
        assert shown(b)[0] == (crossing, 0)
        check_footprints(b, fc)
        west, _, east, _ = b.eval(LAYERS)[crossing]
        assert 0 < east - west < 1 and (west < 180 < east or west < -180 < east)
        b.screenshot(ARTIFACTS / "serve_map_antimeridian.png")
    finally:
        b.close()
    print(f"map browser test: {time.monotonic() - t0:.1f} s")
