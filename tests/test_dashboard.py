"""Object tests of the Panel dashboard: construct it, set parameters, assert state and plot structure.

The scene is synthetic and independent of the dashboard code: Poisson spectra drawn from Gaussian
peaks placed at xraylib line energies, painted in known regions, and pigment/element maps derived
from those regions. Expected values are computed here from the scene, never read back from the
dashboard.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import os
import zipfile
from pathlib import Path

import holoviews as hv
import numpy as np
import panel as pn
import pytest
from _net import free_port, wait_until_listening

import xrfnb
from xrfnb.physics.instrument import resolve_instrument
from xrfnb.ui import dashboard as _dashboard
from xrfnb.ui.dashboard import Dashboard, resolve_inside
from xrfnb.ui.dashboard import common as _common
from xrfnb.ui.dashboard import data as _data
from xrfnb.ui.dashboard import files as _files
from xrfnb.ui.dashboard import job as _job
from xrfnb.ui.dashboard import maps as _maps
from xrfnb.ui.dashboard import server as _server
from xrfnb.ui.dashboard import spectrum as _spectrum

ROWS, COLS, CHANNELS = 32, 32, 4096
GAIN_KEV = 0.01
CLASSES = ("lead white", "vermilion", "red ochre")
COLORS = ("#f0f0f0", "#e34234", "#8b2500")
# (element, line group) peaks of each pigment; energies from xraylib (line_energy_keV)
PEAKS = {
    "lead white": [("Pb", "La", 1.0), ("Pb", "Lb", 0.8), ("Pb", "Ma", 0.3)],
    "vermilion": [("Hg", "La", 1.0), ("Hg", "Lb", 0.7), ("S", "Ka", 0.4)],
    "red ochre": [("Fe", "Ka", 1.0), ("Fe", "Kb", 0.15)],
}
# published line energies (keV, X-ray Data Booklet) used to check the markers independently
PUBLISHED_KEV = {"Pb La1": 10.5515, "Hg La1": 9.9888, "S Ka1": 2.3078, "Fe Ka1": 6.4038}
DEAD = (0, COLS - 1)
PIXEL_MM = 0.1  # the scene's pixel size (100 um): the map axes are in mm


def regions(rows: int = ROWS, cols: int = COLS) -> dict[str, np.ndarray]:
    """Where each pigment is: lead white left half, vermilion disc, red ochre (buried) bottom band."""
    r, c = np.mgrid[:rows, :cols]
    return {
        "lead white": c < cols // 2,
        "vermilion": (r - rows / 2) ** 2 + (c - cols / 2) ** 2 < (rows / 4) ** 2,
        "red ochre": r >= int(rows * 0.625),
    }


def make_scene(rows: int = ROWS, cols: int = COLS, channels: int = CHANNELS, seed: int = 0):
    """(scan, maps, truth): a Poisson scan, PigmentMaps and ElementMaps of a known painted scene."""
    rng = np.random.default_rng(seed)
    cal = xrfnb.EnergyCalibration(0.0, GAIN_KEV)
    energy = cal.energies_keV(channels)
    truth = regions(rows, cols)
    expected = np.full((rows, cols, channels), 0.02, dtype=np.float64)  # flat background, counts/channel
    for name, peaks in PEAKS.items():
        template = np.zeros(channels)
        for el, line, rel in peaks:
            e0 = xrfnb.line_energy_keV(el, line)
            sigma = np.sqrt(0.06**2 + 0.0025 * e0) / 2.355
            template += rel * np.exp(-0.5 * ((energy - e0) / sigma) ** 2)
        template *= 60.0 / template.max()
        expected += truth[name][..., None] * template
    counts = rng.poisson(expected).astype(np.uint16)
    dead = (0, cols - 1)  # DEAD in the default scene
    counts[dead] = 0
    scan = xrfnb.Scan(counts, cal, pixel_size_um=100.0, live_time_s=0.05, metadata={"source": "synthetic"})

    k = len(CLASSES)
    prob = np.empty((rows, cols, k), dtype=np.float32)
    buried = np.empty((rows, cols, k), dtype=np.float32)
    for i, name in enumerate(CLASSES):
        noise = rng.uniform(-0.04, 0.04, size=(rows, cols))
        prob[..., i] = np.where(truth[name], 0.9, 0.1) + noise
        buried[..., i] = np.where(truth[name] & (name == "red ochre"), 0.8, 0.02) * prob[..., i]
    mask = np.zeros((rows, cols), dtype=bool)
    mask[dead] = True
    prob[mask] = np.nan
    buried[mask] = np.nan
    ood = rng.uniform(0, 0.5, size=(rows, cols)).astype(np.float32)
    ood[mask] = np.nan

    elements = ("S", "Fe", "Hg", "Pb")
    families = ("K", "K", "L", "L")
    owner = {"S": "vermilion", "Fe": "red ochre", "Hg": "vermilion", "Pb": "lead white"}
    intensity = np.stack([truth[owner[e]] * 500.0 + 1.0 for e in elements], axis=-1).astype(np.float32)
    em = xrfnb.ElementMaps(
        elements=elements,
        families=families,
        intensity=intensity,
        sigma=np.sqrt(intensity),
        detection_limit=np.full_like(intensity, 30.0),
        chi2=np.ones((rows, cols), np.float32),
        residual=np.zeros(channels),
    )
    maps = xrfnb.PigmentMaps(
        classes=CLASSES,
        probability=prob,
        buried_probability=buried,
        ood_score=ood,
        thresholds=np.array([0.5, 0.5, 0.5]),
        ood_threshold=0.4,
        mask=mask,
        colors=COLORS,
        element_maps=em,
        metadata={"source": "synthetic"},
    )
    return scan, maps, truth


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(autouse=True)
def _no_session_document_left_current():
    """After each test, Bokeh's current document in this thread is no server session's.

    The in-process server tests run Bokeh's server in a thread; its callbacks patch Bokeh's current
    document, a process-wide setting, so a session's document could stay current here after the server
    stopped. Panel then took it for the session of later tests' Dashboards and put their stylesheets in
    its cache for that document ('ImportedStyleSheet ... is already in a doc' in
    test_opening_a_smaller_scan_after_a_larger_one after the slow-file server test and
    test_a_served_session_waits_for_its_page_to_connect)."""
    yield
    from bokeh.document import Document
    from bokeh.io import curdoc
    from bokeh.io.doc import set_curdoc

    if curdoc().session_context is not None:
        set_curdoc(Document())


@pytest.fixture
def dash(scene):
    scan, maps, _ = scene
    return Dashboard(scan=scan, maps=maps)


def render(obj):
    """The Bokeh plot HoloViews makes of ``obj`` (plot structure, no browser)."""
    return hv.renderer("bokeh").get_plot(obj)


def gallery_tile(dash, i):
    """Tile ``i`` of the gallery mosaic, shape (ROWS, COLS, 3), located with the mosaic's cell geometry."""
    data = dash.gallery_data()
    cell_h, cell_w, band, ncols = data["cell"]
    r0, c0 = (i // ncols) * cell_h + band, (i % ncols) * cell_w
    return data["rgb"][r0 : r0 + ROWS, c0 : c0 + COLS]


def png_map(png_bytes):
    """The map inside an exported PNG figure, one value per scan pixel, (rows, cols, 3) uint8, read
    from the box its text chunks give."""
    from PIL import Image

    img = Image.open(io.BytesIO(png_bytes))
    left, top, width, height = (int(v) for v in img.info["xrfnb:map_box"].split(","))
    up = int(img.info["xrfnb:upscale"])
    arr = np.asarray(img.convert("RGB"))[top : top + height, left : left + width]
    return arr[up // 2 :: up, up // 2 :: up]


def elements_of(overlay, kind):
    return [el for el in overlay.traverse(lambda x: x, [kind])]


# --------------------------------------------------------------------------------------------------
def test_construct_shows_scan_maps_and_controls(dash, scene):
    assert dash.classes == CLASSES
    assert dash.thresholds == dict.fromkeys(CLASSES, 0.5)
    assert dash.view == "Composite"
    assert dash.pixel == (ROWS // 2, COLS // 2)
    assert dash.param.element.objects == ["S", "Fe", "Hg", "Pb"]
    assert [t for *_, t in dash.gallery_data()["labels"]] == [
        "lead white (50%)",
        "vermilion (19%)",
        "red ochre (38%)",
    ]
    assert set(dash.threshold_panel.class_sliders) == set(CLASSES)
    assert "32 x 32" in dash.status_text
    plot = render(dash.map_panel.main.dmap)
    tools = {type(t).__name__ for t in plot.state.tools}
    assert {"TapTool", "BoxSelectTool", "LassoSelectTool", "HoverTool"} <= tools
    assert type(plot.handles["glyph"]).__name__ == "ImageRGBA"
    rgba = plot.handles["source"].data["image"][0]
    assert rgba.shape == (ROWS, COLS)
    # the layout renders to a Bokeh model without errors
    assert dash.__panel__().get_root() is not None


def test_composite_colours_follow_regions(dash, scene):
    _, _, truth = scene
    kind, rgb = dash.main_array()
    assert kind == "rgb" and rgb.shape == (ROWS, COLS, 3)
    only_lead = truth["lead white"] & ~truth["vermilion"] & ~truth["red ochre"]
    r, c = np.argwhere(only_lead)[5]
    assert tuple(rgb[r, c]) == (0xF0, 0xF0, 0xF0)
    nothing = ~truth["lead white"] & ~truth["vermilion"] & ~truth["red ochre"]
    r, c = np.argwhere(nothing)[3]
    assert tuple(rgb[r, c]) == (0, 0, 0)


def test_tap_shows_that_pixels_spectrum_with_line_markers(dash, scene):
    scan, _, truth = scene
    r, c = 16, 12  # lead white and vermilion, no iron
    assert truth["lead white"][r, c] and truth["vermilion"][r, c] and not truth["red ochre"][r, c]
    dash.map_panel.tap.event(x=(c + 0.5) * PIXEL_MM, y=(r + 0.5) * PIXEL_MM)
    assert dash.pixel == (r, c)
    overlay = dash.spectrum_panel.spectrum.dmap[()]
    curve = elements_of(overlay, hv.Curve)[0]
    np.testing.assert_array_equal(curve.dimension_values("Counts"), np.asarray(scan.counts[r, c], float))
    np.testing.assert_allclose(
        curve.dimension_values("Energy (keV)")[[0, -1]], [0.0, (CHANNELS - 1) * GAIN_KEV]
    )
    lines = elements_of(overlay, hv.Segments)[0].dimension_values(0)
    for name in ("Pb La1", "Hg La1", "S Ka1"):
        assert min(abs(lines - PUBLISHED_KEV[name])) < 0.03, name
    assert min(abs(lines - PUBLISHED_KEV["Fe Ka1"])) > 0.2  # no iron here
    labels = elements_of(overlay, hv.Labels)[0]
    assert {"Pb La", "Hg La", "S Ka"} <= set(labels.dimension_values("line"))
    np.testing.assert_allclose(labels.dimension_values(0), lines)
    assert f"row {r}, col {c}" in dash.selection_info.info.object
    # class probabilities as bars with the thresholds drawn
    bars_overlay = dash.spectrum_panel.prob.dmap[()]
    bars = elements_of(bars_overlay, hv.Bars)[0]
    np.testing.assert_allclose(bars.dimension_values("probability"), scene[1].probability[r, c])
    marks = elements_of(bars_overlay, hv.Scatter)[0]
    np.testing.assert_allclose(marks.dimension_values("threshold"), [0.5, 0.5, 0.5])


def test_line_labels_do_not_overlap():
    """Labels closer than a label's width go to a second row; a weak line (Kb) between two labelled
    strong ones (Ka, La) loses its label, never a strong line to a weak one (the demo's pile of 'Ar Ka',
    'Ca Ka', 'Ca Kb' labels at 3-4 keV was unreadable)."""
    from xrfnb.core.lines import LineMarker
    from xrfnb.ui.dashboard.spectrum import label_tiers

    def m(el, line, e):
        return LineMarker(el, line, line[0], e)

    lines = [m("Hg", "La", 9.99), m("Pb", "La", 10.55), m("Xx", "Kb", 10.2), m("Fe", "Ka", 6.40)]
    tiers = label_tiers(lines, gap_keV=0.8)
    assert tiers == [0, 1, None, 0]  # Hg and Pb La both labelled, in two rows; the Kb between has no room
    # in each row the labels are at least the gap apart
    many = [m("X", g, e) for g, e in zip(["Ka", "Kb"] * 10, np.linspace(2.0, 12.0, 20), strict=True)]
    tiers = label_tiers(many, gap_keV=0.8)
    for t in (0, 1):
        row = sorted(x.energy_keV for x, tt in zip(many, tiers, strict=True) if tt == t)
        assert np.all(np.diff(row) >= 0.8)
    assert all(t is not None for x, t in zip(many, tiers, strict=True) if x.line == "Ka")


def test_log_scale_switches_the_spectrum_axis(dash):
    dash.log_scale = True
    plot = render(dash.spectrum_panel.spectrum.dmap)
    assert type(plot.state.y_scale).__name__ == "LogScale"
    dash.log_scale = False
    plot = render(dash.spectrum_panel.spectrum.dmap)
    assert type(plot.state.y_scale).__name__ == "LinearScale"


def test_threshold_changes_maps_without_rerunning_model(dash, scene):

    _, maps, truth = scene
    k = CLASSES.index("vermilion")
    valid = ~maps.mask
    before_lead = dash.gallery.tiles["lead white"]
    tile = gallery_tile(dash, k)
    absent, invalid = np.all(tile == (0xE6, 0xE6, 0xE6), axis=-1), np.all(tile == (0x80, 0x80, 0x80), axis=-1)
    np.testing.assert_array_equal(invalid, maps.mask)
    np.testing.assert_array_equal(absent[valid], ~truth["vermilion"][valid])
    dash.focus = "vermilion"
    dash.view = "Pigment"
    _, img = dash.main_array()
    np.testing.assert_array_equal(np.isfinite(img), valid)  # NaN only at the invalid pixel
    mapper = render(dash.map_panel.main.dmap).handles["color_mapper"]
    assert (mapper.low, mapper.high) == (0.5, 1.0)  # below the threshold: drawn as "absent"
    png = png_map(dash.export_png())
    absent = np.all(png == (0xE6, 0xE6, 0xE6), axis=-1)
    np.testing.assert_array_equal(absent[valid], ~truth["vermilion"][valid])

    dash.set_threshold("vermilion", 0.95)  # above every probability (0.9 + at most 0.04)
    assert not dash.binary_maps()[..., k].any()
    mapper = render(dash.map_panel.main.dmap).handles["color_mapper"]
    assert mapper.low == 0.95
    png = png_map(dash.export_png())
    assert np.all(png[valid] == (0xE6, 0xE6, 0xE6))
    tile = gallery_tile(dash, k)
    assert np.all(tile[valid] == (0xE6, 0xE6, 0xE6))
    assert "vermilion (0%)" in [t for *_, t in dash.gallery.shown["labels"]]
    assert dash.gallery.tiles["lead white"] is before_lead  # untouched class: not recoloured
    assert dash.threshold_panel.class_sliders["vermilion"].value == 0.95
    # the global slider sets every class
    dash.global_threshold = 0.05
    assert dash.thresholds == dict.fromkeys(CLASSES, 0.05)
    expected = np.nan_to_num(maps.probability, nan=-1) >= 0.05
    expected &= valid[..., None]
    np.testing.assert_array_equal(dash.binary_maps(), expected)
    assert all(s.value == 0.05 for s in dash.threshold_panel.class_sliders.values())
    dash.reset_thresholds()
    assert dash.thresholds == dict.fromkeys(CLASSES, 0.5)


def test_views_surface_buried_ood_elements_total(dash, scene):
    scan, maps, truth = scene
    dash.focus = "red ochre"
    dash.view = "Surface vs buried"
    _, cat = dash.main_array()
    valid = ~maps.mask
    np.testing.assert_array_equal(cat[truth["red ochre"] & valid], 2.0)
    np.testing.assert_array_equal(cat[~truth["red ochre"] & valid], 0.0)
    dash.focus = "lead white"
    _, cat = dash.main_array()
    np.testing.assert_array_equal(cat[truth["lead white"] & valid], 1.0)
    dash.view = "OOD score"
    _, ood = dash.main_array()
    np.testing.assert_array_equal(ood[valid], maps.ood_score[valid])
    dash.view = "Elements"
    dash.element = "Pb"
    _, pb = dash.main_array()
    np.testing.assert_array_equal(pb > 100, truth["lead white"])
    dash.view = "Total counts"
    _, total = dash.main_array()
    np.testing.assert_allclose(total, np.asarray(scan.counts).sum(axis=-1))
    assert total[DEAD] == 0
    dash.log_scale = True
    _, logtotal = dash.main_array()
    np.testing.assert_allclose(logtotal, np.log10(1 + np.asarray(scan.counts).sum(axis=-1)))
    plot = render(dash.map_panel.main.dmap)
    assert type(plot.handles["glyph"]).__name__ == "Image"


def test_gallery_tap_enlarges_that_pigment(dash):
    """The rendered gallery figure itself listens to taps (the browser's Tap event, in mosaic pixels)."""
    from bokeh import events

    doc = live_document(dash)
    figure = plot_in(doc, "xrfnb-gallery")
    assert "tap" in figure.subscribed_events
    cell_h, cell_w, band, ncols = dash.gallery_data()["cell"]
    i = 2
    figure._trigger_event(
        events.Tap(figure, x=(i % ncols) * cell_w + 5.5, y=(i // ncols) * cell_h + band + 7.5)
    )
    assert dash.focus == CLASSES[2] and dash.view == "Pigment"
    figure._trigger_event(events.Tap(figure, x=-5.0, y=3.0))  # outside every tile: nothing changes
    assert dash.focus == CLASSES[2] and not hasattr(dash, "last_message")


def test_box_and_lasso_selection_give_mean_spectrum_and_area_fractions(dash, scene):
    scan, _, truth = scene
    counts = np.asarray(scan.counts, dtype=float)
    # box over the left half: lead white everywhere valid there
    dash.map_panel.box.event(bounds=(0.0, 0.0, COLS / 2 * PIXEL_MM, ROWS * PIXEL_MM))
    assert dash.pixel is None and dash.region.sum() == ROWS * COLS // 2
    _, _, mean = dash.current_spectrum()
    np.testing.assert_allclose(mean, counts[:, : COLS // 2].reshape(-1, CHANNELS).mean(axis=0))
    fr = dash.area_fractions(dash.region)
    assert fr["lead white"] == 1.0
    left = np.zeros((ROWS, COLS), bool)
    left[:, : COLS // 2] = True
    assert fr["vermilion"] == pytest.approx(truth["vermilion"][left].mean())
    assert "lead white | 100.0 %" in dash.selection_info.fractions.object
    # lasso: a triangle; pixel centres inside by construction (below the diagonal of the top-left square)
    dash.map_panel.lasso.event(geometry=np.array([[0.0, 0.0], [16.0, 16.0], [0.0, 16.0]]) * PIXEL_MM)
    rr, cc = np.mgrid[:ROWS, :COLS] + 0.5
    expected = (cc < rr) & (rr < 16) & (cc > 0)
    np.testing.assert_array_equal(dash.region, expected)
    _, _, mean = dash.current_spectrum()
    np.testing.assert_allclose(mean, counts[expected].mean(axis=0))
    # a tap goes back to single pixels
    dash.map_panel.tap.event(x=1.5 * PIXEL_MM, y=2.5 * PIXEL_MM)
    assert dash.region is None and dash.pixel == (2, 1)


def test_sessions_are_independent(scene):
    scan, maps, _ = scene
    a = Dashboard(scan=scan, maps=maps)
    b = Dashboard(scan=scan, maps=maps)
    a.set_threshold("vermilion", 0.95)
    b.global_threshold = 0.05
    k = CLASSES.index("vermilion")
    assert not a.binary_maps()[..., k].any()
    assert b.binary_maps()[..., k].sum() == (~maps.mask).sum()
    assert a.thresholds["lead white"] == 0.5 and b.thresholds["vermilion"] == 0.05
    b.map_panel.tap.event(x=5.5 * PIXEL_MM, y=6.5 * PIXEL_MM)
    assert a.pixel == (ROWS // 2, COLS // 2) and b.pixel == (6, 5)
    np.testing.assert_array_equal(maps.thresholds, [0.5, 0.5, 0.5])  # shared result untouched


def test_exports(dash, scene, tmp_path):
    from PIL import Image

    scan, maps, _ = scene
    png_bytes = dash.export_png()
    np.testing.assert_array_equal(png_map(png_bytes), maps.composite_rgb(dash.threshold_array()))
    png = Image.open(io.BytesIO(png_bytes))
    assert png.info["Title"].startswith("Composite pigment map") and png.info["Source"] == "synthetic"
    legend = png.info["Description"]
    for name in CLASSES:  # every class is present somewhere in the scene: all three in the legend
        assert name in legend
    assert "no pigment above its threshold" in legend and "invalid pixel" in legend
    # the legend's swatches, right of the map, are in the classes' colours
    left, top, width, height = (int(v) for v in png.info["xrfnb:map_box"].split(","))
    side = np.asarray(png.convert("RGB"))[:, left + width + 8 :]
    for color in COLORS:
        rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        assert np.all(side == rgb, axis=-1).sum() >= 100, color  # a 14 x 14 swatch
    # 32 pixels of 0.1 mm: a 3.2 mm wide map gets a 0.5 mm scale bar (a quarter of it, rounded down)
    assert png.info["xrfnb:scale_bar"] == "0.5 mm" and "scale bar 0.5 mm" in legend
    up = int(png.info["xrfnb:upscale"])
    below = np.asarray(png.convert("RGB"))[top + height : top + height + 24, left : left + width]

    def longest_run(flags):
        best = run = 0
        for f in flags:
            run = run + 1 if f else 0
            best = max(best, run)
        return best

    black_runs = [longest_run(np.all(row == 0, axis=-1)) for row in below]
    assert max(black_runs) == 5 * up + 1  # the bar below the map: 5 scan pixels long, black
    dash.select_pixel(3, 4)
    rows = list(csv.reader(io.StringIO(dash.export_spectrum_csv().decode())))
    assert rows[1] == ["energy_keV", "counts"]
    data = np.array(rows[2:], dtype=float)
    np.testing.assert_allclose(data[:, 0], np.arange(CHANNELS) * GAIN_KEV, atol=1e-6)
    np.testing.assert_array_equal(data[:, 1], np.asarray(scan.counts[3, 4], float))
    dash.set_threshold("red ochre", 0.7)
    path = tmp_path / "maps.h5"
    path.write_bytes(dash.export_hdf5())
    back = xrfnb.PigmentMaps.from_hdf5(path)
    np.testing.assert_allclose(back.thresholds, [0.5, 0.5, 0.7])
    np.testing.assert_array_equal(back.probability, maps.probability)
    with zipfile.ZipFile(io.BytesIO(dash.export_tiff())) as zf:
        names = zf.namelist()
    assert names and all(n.endswith((".tif", ".tiff", ".json", ".txt", ".csv")) for n in names)
    # the download buttons produce the same bytes
    assert dash.export_panel.csv.callback().getvalue() == dash.export_spectrum_csv()


def test_path_traversal_refused(tmp_path, scene):
    root = tmp_path / "served"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "inside.txt").write_text("1 2 3\n")
    secret = tmp_path / "secret.h5"
    secret.write_bytes(b"not for you")
    (root / "link.h5").symlink_to(secret)
    assert resolve_inside(root, "sub/inside.txt") == (root / "sub" / "inside.txt").resolve()
    for bad in ("../secret.h5", str(secret), "link.h5", "sub/../../secret.h5", "/etc/passwd", "a\x00b"):
        with pytest.raises(xrfnb.DataError, match=r"refused|invalid"):
            resolve_inside(root, bad)
    dash = Dashboard(root)
    assert "link.h5" not in dash.param.source.objects
    assert "sub/inside.txt" in dash.param.source.objects
    with pytest.raises(xrfnb.DataError, match="refused"):
        dash.open("../secret.h5")
    with pytest.raises(ValueError):  # the selector accepts only listed files
        dash.source = "../secret.h5"
    assert dash.scan is None


def test_bad_file_and_oversized_upload_become_notifications(tmp_path, monkeypatch):
    monkeypatch.setattr(_data, "available_models", list)
    root = tmp_path / "served"
    root.mkdir()
    # an HDF5 signature (so it is listed) followed by garbage: the reader's error becomes a notification
    (root / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2048))
    dash = Dashboard(root, max_upload_mb=0.001)
    dash.source = "garbage.h5"  # must not raise
    level, message = dash.last_message
    assert level == "error" and "garbage.h5" in message
    assert dash.scan is None
    dash.data_panel.upload.value = {"big.h5": b"0" * 5000}
    level, message = dash.last_message
    assert level == "error" and "limit" in message and "big.h5" in message
    assert dash.scan is None


def _upload_events(name, payload, chunk_bytes):
    """The UploadEvents Panel's FileDropper sends for ``payload`` (as its browser code chunks a file)."""
    from panel.models.file_dropper import UploadEvent

    n = -(-(len(payload) + 1) // chunk_bytes)
    for i in range(n):
        piece = payload[i * chunk_bytes : (i + 1) * chunk_bytes]
        data = {"chunk": i + 1, "data": piece, "name": name, "total_chunks": n, "type": ""}
        yield UploadEvent(model=None, data=data)


def test_upload_limit_is_enforced_on_the_server_as_chunks_arrive(tmp_path, monkeypatch, scene):
    """A client that ignores the browser's size check sends chunks straight to the widget: the server
    stops buffering at the chunk that crosses the limit, ignores the rest and says so; a file under the
    limit, sent the same way, still opens."""
    monkeypatch.setattr(_data, "available_models", list)
    limit_mb = 0.05
    limit = int(limit_mb * 2**20)
    dash = Dashboard(max_upload_mb=limit_mb)
    widget = dash.data_panel.upload
    held = []
    for event in _upload_events("huge.h5", b"\x89HDF\r\n\x1a\n" + bytes(50 * limit), chunk_bytes=4096):
        widget._process_event(event)
        held.append(widget.buffered_bytes)
    assert max(held) <= limit  # never more than the limit held, although 50 times that was sent
    assert held[-1] == 0 and widget.value == {} and dash.scan is None
    level, message = dash.last_message
    assert level == "error" and "huge.h5" in message and "refused" in message and "limit" in message

    scan, _, _ = scene
    small = xrfnb.Scan(np.asarray(scan.counts)[:2, :3, :1024], scan.calibration)
    payload = Path(xrfnb.save(small, tmp_path / "small.h5")).read_bytes()
    assert len(payload) < limit
    for event in _upload_events("small.h5", payload, chunk_bytes=4096):
        widget._process_event(event)
    assert dash.scan is not None and dash.scan.shape == small.shape
    np.testing.assert_array_equal(np.asarray(dash.scan.counts), np.asarray(small.counts))


def test_upload_without_model_says_so(tmp_path, monkeypatch, scene):
    monkeypatch.setattr(_data, "available_models", list)
    scan, _, _ = scene
    path = xrfnb.save(scan, tmp_path / "scan.h5")
    dash = Dashboard()
    assert "No scan open" in dash.status_text and "No trained pigment model" in dash.status_text
    dash.data_panel.upload.value = {"../../evil/scan.h5": Path(path).read_bytes()}
    assert dash.scan is not None and dash.scan.shape == scan.shape
    # folders stripped from the name
    assert [f.name for f in dash.data_panel.upload_dir.iterdir()] == ["scan.h5"]
    assert dash.maps is None
    assert "No trained pigment model" in dash.status_text
    kind = dash.map_panel.main.dmap[()]
    assert isinstance(kind, hv.Text) and "model" in kind.text  # composite needs a model: says so
    dash.view = "Total counts"
    _, total = dash.main_array()
    np.testing.assert_allclose(total, np.asarray(scan.counts).sum(axis=-1))
    assert "No trained model" in dash.gallery.column.objects[0].object
    with pytest.raises(xrfnb.DataError, match="no pigment maps"):
        dash.export_hdf5()


def test_upload_written_inside_private_folder(tmp_path, scene):
    scan, _, _ = scene
    path = xrfnb.save(scan, tmp_path / "scan.h5")
    # a given model object; mapping needs the real one, not tested here
    dash = Dashboard(model=object(), blocking=True)
    dash.load_upload("../../../../tmp/evil name.h5", Path(path).read_bytes())
    files = list(dash.data_panel.upload_dir.iterdir())
    assert [f.name for f in files] == ["evil_name.h5"]
    assert dash.scan.shape == scan.shape


def test_symlink_loop_and_non_data_files_are_not_listed(tmp_path, scene, caplog):
    """A link loop (a.h5 -> b.h5 -> a.h5) in the served folder is skipped with a warning; every other
    session still lists the folder; notes and configuration files are not offered as scans."""
    scan, _, _ = scene
    root = tmp_path / "served"
    (root / "sub").mkdir(parents=True)
    xrfnb.save(scan, root / "scan.h5")
    (root / "sub" / "spectrum.txt").write_text("# counts\n" + "\n".join(str(i % 7) for i in range(256)))
    (root / "PROVENANCE.md").write_text("# Provenance\n\nMeasured in 2019 by ...\n")
    (root / "Steel.cfg").write_text("[attenuators]\nkapton = 0, -, 0.0, 0.0, 1.0\n")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    os.symlink("b.h5", root / "a.h5")
    os.symlink("a.h5", root / "b.h5")
    with caplog.at_level("WARNING", logger="xrfnb.ui.dashboard"):
        listed = _dashboard.list_data_files(root)
    assert listed == ["scan.h5", "sub/spectrum.txt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("symbolic link loop" in w for w in warnings)
    assert {Path(w.split()[1]).name for w in warnings} == {"a.h5", "b.h5"}
    assert all("\n" not in w for w in warnings)  # one line each
    with pytest.raises(xrfnb.DataError, match="link loop"):
        resolve_inside(root, "a.h5")
    dash = Dashboard(root, model=object())
    assert dash.param.source.objects[-2:] == ["scan.h5", "sub/spectrum.txt"]
    with pytest.raises(xrfnb.DataError, match="link loop"):
        dash.open("a.h5")  # scripted anyway: a clear error naming the loop, not an internal one
    assert dash.scan is None


def test_serve_target_and_data_folder_checks(tmp_path):
    f = tmp_path / "a.h5"
    f.write_bytes(b"x")
    assert _files.serve_target(f) == (tmp_path.resolve(), "a.h5")
    assert _files.serve_target(tmp_path) == (tmp_path.resolve(), None)
    assert _files.serve_target(None) == (None, None)
    with pytest.raises(xrfnb.DataError):
        _files.serve_target(tmp_path / "missing")
    with pytest.raises(xrfnb.DataError):
        Dashboard(tmp_path / "missing")


def test_polygon_mask_matches_box():
    m = _maps.polygon_mask(np.array([2.0, 6.0, 6.0, 2.0]), np.array([1.0, 1.0, 5.0, 5.0]), 8, 8)
    expected = np.zeros((8, 8), bool)
    expected[1:5, 2:6] = True
    np.testing.assert_array_equal(m, expected)


def test_invalid_pixel_and_outside_pixel(dash, scene):
    dash.select_pixel(*DEAD)
    overlay = dash.spectrum_panel.prob.dmap[()]
    assert "invalid pixel" in overlay.opts.get().kwargs["title"]
    assert "pigments: none above threshold" in dash.selection_info.info.object
    with pytest.raises(xrfnb.DataError, match="outside"):
        dash.select_pixel(ROWS, 0)
    # outside the map: reported, not raised
    dash.map_panel.tap.event(x=(COLS + 3.0) * PIXEL_MM, y=1.0 * PIXEL_MM)
    assert dash.last_message[0] == "error" and "outside" in dash.last_message[1]


def test_live_document_follows_view_and_axis_changes(dash):
    """In a live Bokeh document (what a browser session holds), every view and axis switch renders."""
    from bokeh.document import Document
    from bokeh.models import GlyphRenderer, Plot

    doc = Document()
    doc.add_root(dash.__panel__().get_root(doc))

    def plot_named(name):
        plots = [p for p in doc.select({"type": Plot}) if p.name == name]
        assert len(plots) == 1
        return plots[0]

    glyph = {"Composite": "ImageRGBA"}
    for view in (*_dashboard.VIEWS, "Composite", "Pigment"):
        dash.view = view
        renderers = plot_named("xrfnb-main").renderers
        kinds = {type(r.glyph).__name__ for r in renderers if isinstance(r, GlyphRenderer)}
        assert glyph.get(view, "Image") in kinds, view
    for log in (True, False, True):
        dash.log_scale = log
        assert type(plot_named("xrfnb-spectrum").y_scale).__name__ == ("LogScale" if log else "LinearScale")
    # taps still reach the dashboard after the main plot was rebuilt
    dash.map_panel.tap.event(x=7.5 * PIXEL_MM, y=9.5 * PIXEL_MM)
    assert dash.pixel == (9, 7)


def test_simulated_spectrum_of_the_predicted_stack(dash, scene):
    """The called pigments (lead white + vermilion at the surface) fitted with the physics simulator."""
    scan, _, _ = scene
    r, c = 16, 12
    dash.select_pixel(r, c)
    assert dash.predicted_pigments() == (("lead white", "vermilion"), ())
    stack, desc = dash.predicted_stack()
    assert "vermilion" in desc and "lead white" in desc
    assert len(stack.layers) == 1  # nothing predicted as buried here
    fit = dash.fitted_stack()
    _, expected = dash.simulated_spectrum()
    counts = np.asarray(scan.counts[r, c], float)
    energy = np.arange(CHANNELS) * GAIN_KEV
    assert expected.shape == counts.shape
    fitted = energy >= 1.0  # the fitted range: 1 keV to the end of this scan's calibration (< 47.5 keV)
    assert expected[fitted].sum() == pytest.approx(counts[fitted].sum())
    # it is the best of the stacks searched: better than the same pigments at the default guess
    guess = xrfnb.Stack([xrfnb.Layer({"lead white": 0.3, "vermilion": 0.3}, thickness_um=20.0)])
    g = xrfnb.simulate_batch([guess], dash.spectrum_panel.instrument(), noise=False)[0][fitted]
    from xrfnb.fitting.stackfit import poisson_deviance

    assert fit.deviance <= poisson_deviance(counts[fitted], g / g.sum() * counts[fitted].sum()) + 1e-6
    # the simulator's strongest fluorescence lines lie on the Hg/Pb L lines (published energies)
    peak_keV = energy[np.argmax(np.where(energy > 3.0, expected, 0))]
    assert min(abs(peak_keV - PUBLISHED_KEV["Pb La1"]), abs(peak_keV - PUBLISHED_KEV["Hg La1"])) < 0.1
    residual = dash.spectrum_panel.residual.dmap[()]
    assert isinstance(residual, hv.Overlay)
    np.testing.assert_allclose(elements_of(residual, hv.Curve)[0].dimension_values(1), counts - expected)
    title = residual.opts.get().kwargs["title"]
    assert "fitted stack" in title
    # the whole description is in the title, wrapped onto lines that fit the plot rather than cut off
    desc, _ = dash.simulated_spectrum()
    assert title.split() == f"Residual vs fitted stack: {desc}".split()
    assert max(len(line) for line in title.splitlines()) <= _spectrum.TITLE_CHARS
    overlay = dash.spectrum_panel.spectrum.dmap[()]
    assert len(elements_of(overlay, hv.Curve)) == 2  # measured and simulated
    # red ochre predicted as buried under lead white -> two layers, lead white on top
    dash.select_pixel(28, 5)
    assert dash.predicted_pigments() == (("lead white",), ("red ochre",))
    stack, desc = dash.predicted_stack()
    assert len(stack.layers) == 2 and desc.startswith("lead white ") and " over red ochre " in desc
    assert "µm)" in desc and " um" not in desc  # the surface thickness, in micrometres
    full = f"Residual vs fitted stack: {dash.simulated_spectrum()[0]}"
    title = dash.spectrum_panel.residual.dmap[()].opts.get().kwargs["title"]
    chars = _spectrum.TITLE_CHARS
    assert title.split() == full.split() and max(len(line) for line in title.splitlines()) <= chars
    assert ("\n" in title) == (len(full) > chars)
    dash.simulate_stack = False
    assert dash.simulated_spectrum() is None
    residual = dash.spectrum_panel.residual.dmap[()]
    assert "No simulated spectrum: switched off" in residual.opts.get().kwargs["title"]
    assert len(elements_of(residual, hv.Curve)[0]) == 0


def test_new_maps_arrive_in_a_live_document(dash):
    """New maps with other classes (what mapping a new scan does) replace the old ones without errors."""
    import dataclasses

    from bokeh.document import Document
    from bokeh.models import GlyphRenderer, Plot

    doc = Document()
    doc.add_root(dash.__panel__().get_root(doc))
    other = dataclasses.replace(dash.maps, classes=("a", "b", "c"), thresholds=np.array([0.25, 0.5, 0.75]))
    dash.set_maps(other)
    assert dash.thresholds == {"a": 0.25, "b": 0.5, "c": 0.75} and dash.focus == "a"
    assert not hasattr(dash, "last_message")  # no error was notified
    (main,) = [p for p in doc.select({"type": Plot}) if p.name == "xrfnb-main"]
    assert "ImageRGBA" in {type(r.glyph).__name__ for r in main.renderers if isinstance(r, GlyphRenderer)}
    assert dash.gallery_data()["labels"][0][2].startswith("a (")


# --------------------------------------------------------------------------------------------------
# threshold changes in a live Bokeh document: the rendered models themselves must hold the new maps
# --------------------------------------------------------------------------------------------------
def test_several_regions_are_kept_overlaid_removed_and_exported(dash, scene):
    """Box and lasso regions kept side by side: each with its colour, pixel count and bounds; their mean
    (or summed) spectra overlaid with a legend; outlined on the main map; removed one by one; exported
    as one CSV (energy_keV and a column per region, under lines naming scan, values and regions)."""
    from xrfnb.ui.dashboard.state import MAX_REGIONS

    scan, _, _ = scene
    counts = np.asarray(scan.counts, dtype=float)
    panel = dash.region_panel
    assert panel.keep_w.disabled and panel.plot_kind() == "Text"
    with pytest.raises(xrfnb.DataError, match="select a region first"):
        dash.keep_region()
    # a box over rows 0-4, columns 0-9 and a lasso triangle
    dash.map_panel.box.event(bounds=(0.0, 0.0, 10 * PIXEL_MM, 5 * PIXEL_MM))
    assert not panel.keep_w.disabled
    panel.keep_w.clicks += 1  # the button, as in the browser
    assert panel.keep_w.disabled  # kept: nothing new to keep until another selection
    box = np.zeros((ROWS, COLS), bool)
    box[:5, :10] = True
    dash.map_panel.lasso.event(geometry=np.array([[0.0, 0.0], [16.0, 16.0], [0.0, 16.0]]) * PIXEL_MM)
    lasso = dash.region.copy()
    dash.keep_region()
    with pytest.raises(xrfnb.DataError, match="already kept as Region 2"):
        dash.keep_region()
    one, two = dash.kept_regions
    assert (one.name, two.name) == ("Region 1", "Region 2") and one.color != two.color
    np.testing.assert_array_equal(one.mask, box)
    assert one.n_pixels == 50 and one.bounds == (0, 4, 0, 9)
    assert one.describe(PIXEL_MM) == "Region 1: 50 pixels, rows 0-4, columns 0-9 (x 0-1 mm, y 0-0.5 mm)"
    # the overlay: one curve per region, in its colour, labelled with its pixel count, mean counts
    overlay = panel.plot.dmap[()]
    curves = elements_of(overlay, hv.Curve)
    assert [c.label for c in curves] == ["Region 1 (50 px)", f"Region 2 ({int(lasso.sum())} px)"]
    colors = [hv.Store.lookup_options("bokeh", c, "style").kwargs["color"] for c in curves]
    assert colors == [one.color, two.color]
    np.testing.assert_allclose(curves[0].dimension_values(1), counts[box].mean(axis=0))
    np.testing.assert_allclose(curves[1].dimension_values(1), counts[lasso].mean(axis=0))
    assert curves[0].vdims[0].name == "Mean counts per pixel"
    assert hv.Store.lookup_options("bokeh", overlay, "plot").kwargs["show_legend"] is True
    # listed with their bounds, each with a Remove button
    assert len(panel.list.objects) == 2 and "rows 0-4, columns 0-9" in panel.list.objects[0][0].object
    # outlined on the main map, in their colours: the box's 30 pixel edges, in mm
    lines, labels = dash.map_panel.region_outlines()
    edges = zip(*(lines[k] for k in ("x0", "y0", "x1", "y1", "color")), strict=True)
    drawn = {tuple(round(v / PIXEL_MM) for v in e[:4]) for e in edges if e[4] == one.color}
    expected = {(x, y, x, y + 1) for x in (0, 10) for y in range(5)}
    expected |= {(x, y, x + 1, y) for y in (0, 5) for x in range(10)}
    assert drawn == expected and lines["color"].count(one.color) == 30
    assert labels["text"] == ["Region 1", "Region 2"] and labels["color"] == [one.color, two.color]
    # sums instead of means
    dash.region_stat = "sum"
    curves = elements_of(panel.plot.dmap[()], hv.Curve)
    np.testing.assert_allclose(curves[0].dimension_values(1), counts[box].sum(axis=0))
    assert curves[0].vdims[0].name == "Summed counts"
    # one CSV with both
    text = dash.export_regions_csv().decode()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[0] == "# xrfnb region spectra of synthetic (32 x 32 pixels, pixel 100 µm)"
    assert comments[1] == "# values: summed counts over each region's pixels"
    assert any(c.startswith("# Region 1: 50 pixels, rows 0-4, columns 0-9") for c in comments)
    table = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
    assert table[0] == ["energy_keV", "Region 1 sum (50 px)", f"Region 2 sum ({int(lasso.sum())} px)"]
    values = np.array(table[1:], dtype=float)
    np.testing.assert_allclose(values[:, 0], scan.energy_keV, atol=1e-6)
    np.testing.assert_allclose(values[:, 1], counts[box].sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(values[:, 2], counts[lasso].sum(axis=0), rtol=1e-5)
    # removed one by one (numbers are not reused), all at once; at most MAX_REGIONS
    panel.list.objects[0][1].clicks += 1  # Region 1's Remove button
    assert [k.name for k in dash.kept_regions] == ["Region 2"]
    assert dash.map_panel.region_outlines()[1]["text"] == ["Region 2"]
    for r in range(MAX_REGIONS - 1):
        dash.select_region(np.eye(ROWS, COLS, k=r, dtype=bool))
        dash.keep_region()
    assert dash.kept_regions[-1].name == f"Region {MAX_REGIONS + 1}"
    with pytest.raises(xrfnb.DataError, match=f"at most {MAX_REGIONS} regions"):
        dash.select_region(box)
        dash.keep_region()
    panel.clear_w.clicks += 1
    assert dash.kept_regions == [] and panel.plot_kind() == "Text"
    with pytest.raises(xrfnb.DataError, match="no region kept"):
        dash.export_regions_csv()
    # a new scan forgets them
    dash.select_region(box)
    dash.keep_region()
    dash.set_scan(scan, label="again")
    assert dash.kept_regions == []


def live_document(dash):
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    doc = Document()
    # rendered as a session renders it: with this document as Panel's current one, so Panel's per-document
    # stylesheet cache is this document's (after an in-process server test the current document can be
    # a finished session's, whose cached stylesheets cannot join another document)
    with set_curdoc(doc):
        doc.add_root(dash.__panel__().get_root(doc))
    return doc


def plot_in(doc, name):
    from bokeh.models import Plot

    (plot,) = [p for p in doc.select({"type": Plot}) if p.name == name]
    return plot


def image_source(plot):
    """The data source of the one image glyph (Image or ImageRGBA) of a Bokeh plot."""
    from bokeh.models import GlyphRenderer

    (renderer,) = [
        r
        for r in plot.renderers
        if isinstance(r, GlyphRenderer) and type(r.glyph).__name__ in ("Image", "ImageRGBA")
    ]
    return renderer


def document_rgb(plot):
    """The RGB pixels (rows, cols, 3) uint8 of a plot's ImageRGBA glyph, row 0 first, as Bokeh holds them."""
    renderer = image_source(plot)
    assert type(renderer.glyph).__name__ == "ImageRGBA"
    img = np.asarray(renderer.data_source.data["image"][0])
    assert img.dtype == np.uint32
    rgba = np.ascontiguousarray(img).view(np.uint8).reshape(*img.shape, 4)
    assert np.all(rgba[..., 3] == 255)  # opaque
    return rgba[..., :3]


def expected_composite(maps, thresholds):
    """Composite colours computed here: probability-weighted mean colour of the classes present."""
    prob = np.nan_to_num(np.asarray(maps.probability, dtype=np.float64), nan=0.0)
    weights = np.where(prob >= np.asarray(thresholds, dtype=float), prob, 0.0)
    colors = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in COLORS], dtype=np.float64)
    total = weights.sum(axis=-1, keepdims=True)
    rgb = np.where(total > 0, weights @ colors / np.maximum(total, 1e-12), 0.0)
    rgb[maps.mask] = 128
    return rgb


def document_tiles(doc, dash):
    """The gallery's tiles as the document holds them, one (ROWS, COLS, 3) array per class."""
    mosaic = document_rgb(plot_in(doc, "xrfnb-gallery"))
    cell_h, cell_w, band, ncols = dash.gallery_data()["cell"]  # geometry only, not colours
    return [
        mosaic[(i // ncols) * cell_h + band :][:ROWS, (i % ncols) * cell_w :][:, :COLS]
        for i in range(len(CLASSES))
    ]


def check_gallery(doc, dash, maps, thresholds):
    """Each tile: light grey exactly where a valid pixel's probability is below its class threshold."""
    valid = ~maps.mask
    for k, tile in enumerate(document_tiles(doc, dash)):
        absent = np.all(tile == (0xE6, 0xE6, 0xE6), axis=-1)
        invalid = np.all(tile == (0x80, 0x80, 0x80), axis=-1)
        np.testing.assert_array_equal(invalid, maps.mask, err_msg=CLASSES[k])
        with np.errstate(invalid="ignore"):
            below = maps.probability[..., k] < thresholds[k]
        np.testing.assert_array_equal(absent, valid & below, err_msg=CLASSES[k])


def test_threshold_change_patches_the_live_documents_maps(dash, scene, monkeypatch):
    """A threshold change writes the new main map and gallery into the rendered Bokeh models, without
    re-running the main map's HoloViews pipeline, and what is written is the thresholded map."""
    _, maps, truth = scene
    doc = live_document(dash)
    main, gallery = plot_in(doc, "xrfnb-main"), plot_in(doc, "xrfnb-gallery")
    main_source = image_source(main).data_source
    calls = []
    element = dash.map_panel.main._element
    monkeypatch.setattr(dash.map_panel.main, "_element", lambda: calls.append(1) or element())
    np.testing.assert_allclose(document_rgb(main), expected_composite(maps, [0.5] * 3), atol=1)
    check_gallery(doc, dash, maps, [0.5] * 3)

    dash.set_threshold("vermilion", 0.95)  # above every vermilion probability
    thr = [0.5, 0.95, 0.5]
    assert image_source(main).data_source is main_source  # the same models, new values
    rgb = document_rgb(main)
    np.testing.assert_allclose(rgb, expected_composite(maps, thr), atol=1)
    only_lead = truth["lead white"] & ~truth["red ochre"] & ~maps.mask
    assert np.all(rgb[only_lead] == (0xF0, 0xF0, 0xF0))  # vermilion no longer mixed in
    assert np.all(rgb[~truth["lead white"] & ~truth["red ochre"] & ~maps.mask] == 0)  # nothing present
    check_gallery(doc, dash, maps, thr)
    (labels,) = [r.data_source for r in gallery.renderers if "text" in r.data_source.data]
    assert list(labels.data["text"])[1] == "vermilion (0%)"
    # the global slider moves every class
    dash.global_threshold = 0.05
    np.testing.assert_allclose(document_rgb(main), expected_composite(maps, [0.05] * 3), atol=1)
    check_gallery(doc, dash, maps, [0.05] * 3)
    assert calls == []  # the main map was patched, not re-rendered through HoloViews
    # a fresh HoloViews render of the current state draws exactly what the document holds
    fresh = render(dash.map_panel.main.dmap).handles["source"].data["image"][0]
    np.testing.assert_array_equal(main_source.data["image"][0], fresh)
    fresh = [
        sub.handles["source"].data["image"][0]
        for sub in render(dash.gallery.column.objects[0].object).subplots.values()
        if "image" in sub.handles["source"].data
    ]
    np.testing.assert_array_equal(image_source(gallery).data_source.data["image"][0], fresh[0])

    # surface vs buried: categories follow the threshold (red ochre buried in its band)
    dash.focus = "red ochre"
    dash.view = "Surface vs buried"
    main = plot_in(doc, "xrfnb-main")
    buried = truth["red ochre"] & ~maps.mask
    for t in (0.5, 0.95, 0.3):
        dash.set_threshold("red ochre", t)
        cat = np.asarray(image_source(main).data_source.data["image"][0])
        k = CLASSES.index("red ochre")
        with np.errstate(invalid="ignore"):
            present = maps.probability[..., k] >= t
        np.testing.assert_array_equal(cat[present & buried], 2.0)
        np.testing.assert_array_equal(cat[~present & ~maps.mask], 0.0)
        assert np.isnan(cat[maps.mask]).all()
    # pigment view: the probabilities stay, the colour range starts at the threshold
    dash.view = "Pigment"
    main = plot_in(doc, "xrfnb-main")
    renderer = image_source(main)
    dash.set_threshold("red ochre", 0.8)
    mapper = renderer.glyph.color_mapper
    assert (mapper.low, mapper.high) == (0.8, 1.0)
    assert main.title.text == "red ochre: probability where >= 0.80"
    k = CLASSES.index("red ochre")
    np.testing.assert_array_equal(
        renderer.data_source.data["image"][0], np.where(maps.mask, np.nan, maps.probability[..., k])
    )
    check_gallery(doc, dash, maps, [0.05, 0.05, 0.8])


def test_threshold_change_updates_the_probability_bars_in_the_document(dash, scene):
    from bokeh.models import ColumnDataSource

    _, maps, _ = scene
    doc = live_document(dash)
    r, c = 16, 12  # lead white and vermilion present, red ochre absent
    dash.select_pixel(r, c)
    dash.set_threshold("vermilion", 0.95)
    (bars,) = [s for s in doc.select({"type": ColumnDataSource}) if "probability" in s.data]
    np.testing.assert_allclose(bars.data["probability"], maps.probability[r, c])
    np.testing.assert_allclose(bars.data["threshold"], [0.5, 0.95, 0.5])
    grey = "#cccccc"
    assert list(bars.data["color"]) == [COLORS[0], grey, grey]
    (marks,) = [
        s for s in doc.select({"type": ColumnDataSource}) if "threshold" in s.data and "color" not in s.data
    ]
    np.testing.assert_allclose(marks.data["threshold"], [0.5, 0.95, 0.5])
    info = dash.selection_info.info.object
    assert "pigments: lead white" in info and "vermilion" not in info


def test_sessions_patch_only_their_own_documents(scene):
    """Two sessions (two documents) with different thresholds: each document holds its own maps."""
    _, maps, _ = scene
    a, b = Dashboard(scan=scene[0], maps=maps), Dashboard(scan=scene[0], maps=maps)
    doc_a, doc_b = live_document(a), live_document(b)
    assert not {m.id for m in doc_a.models} & {m.id for m in doc_b.models}
    a.set_threshold("vermilion", 0.95)
    b.global_threshold = 0.05
    b.set_threshold("red ochre", 0.95)
    thr_a, thr_b = [0.5, 0.95, 0.5], [0.05, 0.05, 0.95]
    for doc, dash, thr in ((doc_a, a, thr_a), (doc_b, b, thr_b)):
        rgb = document_rgb(plot_in(doc, "xrfnb-main"))
        np.testing.assert_allclose(rgb, expected_composite(maps, thr), atol=1)
        check_gallery(doc, dash, maps, thr)
    assert not np.array_equal(
        document_rgb(plot_in(doc_a, "xrfnb-main")), document_rgb(plot_in(doc_b, "xrfnb-main"))
    )


def test_mapping_job_reports_progress_per_block_and_can_be_cancelled(scene):
    """The dashboard maps with map_pigments' progress callback: the job follows it block by block, equals
    a direct map_pigments run, and a cancelled job (another scan opened) stops at the next block."""
    scan, _, _ = scene
    model = xrfnb.load_model("default")
    rows, cols = scan.shape[:2]
    seen: list[tuple[int, int]] = []

    class Job(_job.MappingJob):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "done" and hasattr(self, "total"):
                seen.append((value, self.total))

    job = Job("map", scan=scan)
    seen.clear()  # the values the dataclass starts with are not progress reports
    maps = _job.map_with_progress(scan, model, job, chunk_pixels=cols, element_maps=False)
    # every pixel reported, then an uncounted stage for what map_pigments does after the last block
    assert job.stage == "pigment maps: finishing" and not job.determinate
    assert seen[-2] == (rows * cols, rows * cols) and seen[-1][0] == 0
    seen.pop()
    assert seen[0][0] == 0 and len(seen) >= rows  # one report per row block of one row (plus start)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    ref = xrfnb.map_pigments(scan, model, progress=False)
    np.testing.assert_array_equal(maps.probability, ref.probability)

    job = _job.MappingJob("map", scan=scan, cancelled=True)
    with pytest.raises(_job.Cancelled):
        _job.map_with_progress(scan, model, job, chunk_pixels=cols, element_maps=False)
    assert job.done == 0  # stopped at the first report, before any block was identified


def test_every_step_of_a_job_reports_what_it_does(scene):
    """Reading, the element fit's sum spectrum, its detection and set-up (nothing to count: the bar
    moves to and fro) and its pixel fit each report a stage; the counted stages count the rows read,
    and the element maps equal a direct fit_elements run. The progress line says the stage, how far
    and the seconds so far."""
    scan, _, _ = scene
    rows = scan.shape[0]
    seen: list[tuple[str, bool, int]] = []

    class Job(_job.MappingJob):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "done" and hasattr(self, "stage_started"):  # set_stage sets it last
                seen.append((self.stage, self.determinate, self.done))

    job = Job("load")
    loaded, total = _job.read_with_progress(lambda: scan, "synthetic.h5", job)
    assert loaded is scan
    np.testing.assert_allclose(total, np.asarray(scan.counts, dtype=float).sum(axis=-1))
    assert seen[0][:2] == ("reading synthetic.h5", False)
    assert seen[-1] == ("summing each pixel's counts", True, rows)

    seen.clear()
    job = Job("map", scan=scan)
    em = _job.fit_elements_with_progress(scan, job)
    stages = list(dict.fromkeys(stage for stage, _, _ in seen))
    assert stages == [
        "element maps: summing the spectra",
        "element maps: detecting the elements, setting up the fit",
        "element maps: fitting the pixels",
    ]
    for stage, counted in zip(stages, (True, False, True), strict=True):
        assert {d for st, d, _ in seen if st == stage} == {counted}
        done = [n for st, _, n in seen if st == stage]
        assert done == sorted(done) and (done[-1] == rows if counted else set(done) == {0})
    ref = xrfnb.fit_elements(scan, resolve_instrument(None, scan.metadata), progress=False)
    assert em.elements == ref.elements
    np.testing.assert_allclose(em.intensity, ref.intensity)

    # the line under the bar, and the bar: moving to and fro (-1) while nothing is counted
    dash = Dashboard(scan=scan)
    job = _job.MappingJob("map", scan=scan)
    job.set_stage("element maps: detecting the elements, setting up the fit")
    job.stage_started -= 3.2
    dash.data_panel.show_progress(job)
    line = dash.data_panel.progress_text
    assert dash.data_panel.progress_bar.value == -1
    assert line.object == "element maps: detecting the elements, setting up the fit (3 s)"
    job.set_stage("element maps: fitting the pixels", total=rows)
    job.report(rows // 2, rows)
    dash.data_panel.show_progress(job)
    assert dash.data_panel.progress_bar.value == 50
    assert line.object == f"element maps: fitting the pixels, {rows // 2} of {rows} rows ..."
    job.cancelled = True
    with pytest.raises(_job.Cancelled):
        job.set_stage("element maps: fitting the pixels", total=rows)


def test_a_failed_element_fit_is_said_in_words_for_the_page(scene, monkeypatch):
    """The pigment maps stand without element maps; the warning leaves out the fit's advice to API
    users (it reached the page as 'pass elements=[...] to fit chosen elements')."""
    scan, maps, _ = scene
    monkeypatch.setattr(_job, "map_pigments", lambda *args, **kwargs: maps)

    def fail(scan, job, instrument=None):
        raise xrfnb.FitError(
            "no element was detected in the (sum) spectrum: pass elements=[...] to fit chosen elements"
        )

    monkeypatch.setattr(_job, "fit_elements_with_progress", fail)
    job = _job.MappingJob("map", scan=scan)
    assert _job.map_with_progress(scan, None, job) is maps
    assert job.warning == (
        "no element maps for this scan: no element was detected in the (sum) spectrum (the pigment "
        "calls do not depend on them)"
    )


def test_opening_another_scan_cancels_the_running_job_silently(scene):
    scan, maps, _ = scene
    dash = Dashboard(scan=scan, maps=maps)
    other = xrfnb.Scan(np.asarray(scan.counts)[:, ::-1].copy(), scan.calibration)
    job = _job.MappingJob("map", scan=scan)
    dash.data_panel.jobs.job = job
    dash.set_scan(other, maps=maps)
    assert job.cancelled is True  # the worker thread stops at its next progress report
    job.error, job.finished = _job.Cancelled(), True
    dash.data_panel.finish_job(job)  # no notification, maps of the new scan stay
    assert not hasattr(dash, "last_message") and dash.scan is other and dash.maps is maps


def test_serve_app_refuses_callables_panel_would_render_as_text():
    """Panel calls only plain functions and methods per session; a functools.partial became a repr page."""
    import functools

    with pytest.raises(TypeError, match="plain function"):
        _dashboard.serve_app(functools.partial(_dashboard.make_app, None), port=1)


def test_serve_warns_when_binding_beyond_loopback(monkeypatch, caplog):
    """Binding every interface says, on one line, that anyone on the network can open the folder."""
    calls = []
    monkeypatch.setattr(_server, "serve_app", lambda app, **kw: calls.append(kw))
    with caplog.at_level("WARNING", logger="xrfnb.ui.dashboard"):
        _dashboard.serve(None, port=5999, address="127.0.0.1")
        _dashboard.serve(None, port=5999, address="localhost")
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        _dashboard.serve(None, port=5999, address="0.0.0.0")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "0.0.0.0" in warning and "anyone" in warning and "token" in warning
    assert [c["basic_auth"] for c in calls] == [None, None, None]
    caplog.clear()
    with caplog.at_level("WARNING", logger="xrfnb.ui.dashboard"):
        _dashboard.serve(None, port=5999, address="0.0.0.0", token=True)
    messages = [r.getMessage() for r in caplog.records]
    token = calls[-1]["basic_auth"]
    assert isinstance(token, str) and len(token) >= 16
    assert any(token in m for m in messages)  # the random token is told to whoever started the server
    assert any("log-in is required" in m for m in messages)
    with pytest.raises(xrfnb.DataError, match="not both"):
        _dashboard.serve(None, basic_auth="pw", token="tk")
    with pytest.raises(xrfnb.DataError, match="empty"):
        _dashboard.serve(None, token="  ")
    with pytest.raises(xrfnb.DataError, match="does not exist"):
        _dashboard.serve(None, basic_auth=Path("/nonexistent/users.json"))


def test_served_dashboard_needs_the_token(tmp_path):
    """With a token, the real server answers the app only after a log-in with that token; the log-in
    page loads nothing from a CDN."""
    import http.client
    import urllib.parse

    port = free_port()
    # an empty data folder: the session opens nothing (no mapping thread left running at exit)
    server = _dashboard.serve(tmp_path, port=port, token="correct-horse", threaded=True)
    try:
        wait_until_listening(port)

        def request(method, path, body=None, cookie=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
            if cookie:
                headers["Cookie"] = cookie
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            location, cookie = resp.getheader("Location") or "", resp.getheader("Set-Cookie") or ""
            out = resp.status, location, cookie, resp.read()
            conn.close()
            return out

        status, location, _, _ = request("GET", "/")
        assert status in (302, 303) and "login" in location  # no app without a log-in
        status, _, _, page = request("GET", "/login")
        assert status == 200 and b"password" in page and b"cdn" not in page.lower()
        assert b"http" not in page  # nothing loaded from elsewhere
        wrong = urllib.parse.urlencode({"username": "anna", "password": "wrong"})
        status, location, cookie, _ = request("POST", "/login", wrong)
        assert "error" in location and "user=" not in cookie
        right = urllib.parse.urlencode({"username": "anna", "password": "correct-horse"})
        status, _, cookie, _ = request("POST", "/login", right)
        assert status in (302, 303) and "user=" in cookie
        cookies = "; ".join(part.split(";")[0] for part in cookie.split(", ") if "=" in part.split(";")[0])
        status, _, _, page = request("GET", "/", cookie=cookies)
        assert status == 200 and b"Bokeh" in page
    finally:
        server.stop()


def test_a_slow_file_in_one_session_does_not_freeze_the_others(tmp_path, monkeypatch, scene):
    """The real server: session 1 opens a file whose reading blocks until the test releases it; session
    2's page must still be served meanwhile (the read runs off the event loop), and session 1 shows the
    scan, with its total counts, once the read is released."""
    import http.client
    import threading
    import time

    monkeypatch.setattr(_data, "available_models", list)  # no mapping: only the read is slow
    scan, _, _ = scene
    xrfnb.save(scan, tmp_path / "slow.h5")
    started, release = threading.Event(), threading.Event()

    def slow_load(path, **kwargs):
        if Path(path).name == "slow.h5":
            started.set()
            assert release.wait(120)
        return xrfnb.load(path, **kwargs)

    monkeypatch.setattr(_data, "load", slow_load)
    sessions = []

    def app():
        dash = _dashboard.make_app(tmp_path, None if sessions else "slow.h5")
        sessions.append(dash)
        return dash

    port = free_port()
    server = _dashboard.serve_app(app, port=port, threaded=True)
    pages = {}

    def get(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/")
        pages[i] = conn.getresponse().status
        conn.close()

    try:
        wait_until_listening(port)
        first = threading.Thread(target=get, args=(1,), daemon=True)
        first.start()
        assert started.wait(60), "session 1 never started reading the file"
        second = threading.Thread(target=get, args=(2,), daemon=True)
        second.start()
        second.join(timeout=60)
        answered = not second.is_alive()
        still_reading = not release.is_set()
        release.set()
        assert answered and pages.get(2) == 200, "session 2 was not served while session 1 read a file"
        assert still_reading and len(sessions) == 2
        first.join(timeout=60)
        assert pages.get(1) == 200
        deadline = time.monotonic() + 60
        while sessions[0].scan is None:
            assert time.monotonic() < deadline, "session 1 never showed the scan it read"
            time.sleep(0.2)
        assert sessions[0].scan.shape == scan.shape and sessions[1].scan is None
        total = np.asarray(scan.counts, dtype=float).sum(axis=-1)
        np.testing.assert_allclose(sessions[0].total_counts, total)
    finally:
        release.set()
        server.stop()


def test_a_served_session_waits_for_its_page_to_connect(tmp_path, monkeypatch):
    """The real server: a session whose page has not connected yet outlives Bokeh's unused-session
    lifetime (issue #14: under load, nine pages opened at once connected more than 15 s after their
    sessions were made; Bokeh discarded those sessions and built them again when the websockets came,
    which kept the event loop busy and left pages for minutes without their maps). It is kept until a
    connection arrives or :data:`~xrfnb.ui.dashboard.bokeh.UNCONNECTED_SESSION_KEPT_S` has passed; once
    its page connected and left, it is dropped after the usual lifetime."""
    import http.client
    import re
    import time

    from bokeh.client import pull_session
    from bokeh.util.token import get_session_id

    from xrfnb.ui.dashboard import bokeh as _bokeh

    destroyed: dict[int, float] = {}
    sessions: list[Dashboard] = []

    def app():
        dash = _dashboard.make_app(tmp_path)  # an empty folder: nothing is opened
        number = len(sessions)
        sessions.append(dash)
        pn_state.on_session_destroyed(lambda ctx: destroyed.setdefault(number, time.monotonic()))
        return dash

    from panel import state as pn_state

    port = free_port()
    # Bokeh drops a session 3 s after its last connection left (or after it was made, without one;
    # 15 s by default), looking every 0.2 s. Not less: the session is held from its first tick, after
    # its page has been written, which takes a loaded machine a good part of a second (at a load of 10,
    # with 2 s, it was once dropped first)
    fast = {"unused_session_lifetime_milliseconds": 3000, "check_unused_sessions_milliseconds": 200}
    server = _dashboard.serve_app(app, port=port, threaded=True, server_options=fast)

    def get_page() -> tuple[str, float]:
        """The page and when it was asked for (before its session was made)."""
        asked = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        page = resp.read().decode()
        conn.close()
        return page, asked

    try:
        wait_until_listening(port)
        # a page served, its websocket never opened: kept 11 s (here), not 3 s
        monkeypatch.setattr(_bokeh, "UNCONNECTED_SESSION_KEPT_S", 11.0)
        _, made = get_page()
        time.sleep(7.0)  # 2.3 lifetimes, 35 checks for unused sessions
        assert 0 not in destroyed, "a session was discarded before its page connected"
        deadline = made + 40
        while 0 not in destroyed:
            assert time.monotonic() < deadline, "a session nobody connected to was kept for ever"
            time.sleep(0.1)
        assert destroyed[0] - made >= 11.0
        # a page that connects: released at once; dropped soon after it left, not at the 60 s limit
        monkeypatch.setattr(_bokeh, "UNCONNECTED_SESSION_KEPT_S", 60.0)
        page, made = get_page()
        token = re.search(r'"token"\s*:\s*"([^"]+)"', page).group(1)
        client = pull_session(session_id=get_session_id(token), url=f"http://127.0.0.1:{port}/")
        assert len(sessions) == 2, "the connection built a second session for the same page"
        time.sleep(4.0)  # connected: kept, as Bokeh keeps any session with a connection
        assert 1 not in destroyed
        client.close()
        left = time.monotonic()
        while 1 not in destroyed:
            assert time.monotonic() < left + 30, "a session whose page had left was kept"
            time.sleep(0.1)
        assert len(sessions) == 2
    finally:
        server.stop()


def test_opening_a_smaller_scan_after_a_larger_one(scene):
    """The tapped pixel of a 48 x 48 scan lies outside a 24 x 24 one: opening the small one after it
    must move the selection into it and redraw every plot on the new scan, without an error."""
    big_scan, big_maps, _ = make_scene(48, 48, channels=1200, seed=1)
    small_scan, small_maps, _ = make_scene(24, 24, channels=1200, seed=2)
    dash = Dashboard(scan=big_scan, maps=big_maps)
    doc = live_document(dash)
    dash.select_pixel(40, 44)
    dash.set_scan(small_scan, maps=small_maps, label="small")
    assert not hasattr(dash, "last_message"), dash.last_message
    assert dash.pixel == (12, 12) and dash.region is None
    assert "pixel (row 12, col 12)" in dash.selection_info.info.object
    main = plot_in(doc, "xrfnb-main")
    assert document_rgb(main).shape[:2] == (24, 24)
    spectrum = dash.spectrum_panel.spectrum.dmap[()]
    assert "pixel (row 12, col 12)" in spectrum.opts.get().kwargs["title"]
    np.testing.assert_array_equal(
        elements_of(spectrum, hv.Curve)[0].dimension_values(1), np.asarray(small_scan.counts[12, 12], float)
    )
    # and the same without maps (a file opened while its maps are computed)
    dash.set_scan(big_scan, maps=big_maps)
    dash.select_pixel(47, 47)
    dash.set_scan(small_scan, label="small, no maps")
    assert not hasattr(dash, "last_message"), dash.last_message
    assert dash.pixel == (12, 12) and dash.maps is None


def test_out_of_distribution_banner(scene):
    """Pixels with an OOD score above the threshold: a banner gives the scan's share, and says loudly
    when the selected pixel is one of them; no banner when none is."""
    import dataclasses

    scan, maps, _ = scene
    dash = Dashboard(scan=scan, maps=maps)
    assert np.nanmax(maps.ood_score) > maps.ood_threshold  # the scene has some: uniform(0, 0.5) vs 0.4
    valid = ~maps.mask
    with np.errstate(invalid="ignore"):
        ood = (maps.ood_score > maps.ood_threshold) & valid
    assert dash.selection_info.ood_alert.visible
    assert f"{100 * ood.sum() / valid.sum():.1f} %" in dash.selection_info.ood_alert.object
    assert f"({int(ood.sum())} of {int(valid.sum())};" in dash.selection_info.ood_alert.object
    # adapting the model is suggested exactly when more than a fifth of the pixels are unfamiliar
    share = ood.sum() / valid.sum()
    assert ("xrfnb adapt SCAN" in dash.selection_info.ood_alert.object) == (share > 0.2)
    r, c = map(int, np.argwhere(ood)[0])
    dash.select_pixel(r, c)
    assert "selected pixel is out of distribution" in dash.selection_info.ood_alert.object
    assert dash.selection_info.ood_alert.alert_type == "danger"
    assert "OUT OF DISTRIBUTION" in dash.spectrum_panel.prob.dmap[()].opts.get().kwargs["title"]
    assert "out of distribution" in dash.selection_info.info.object
    r, c = map(int, np.argwhere(valid & ~ood)[0])
    dash.select_pixel(r, c)
    alert = dash.selection_info.ood_alert
    assert "selected pixel" not in alert.object and alert.alert_type == "warning"
    # every pixel unfamiliar (a real spectrum far from the training set): "All", in red
    dash.set_maps(dataclasses.replace(maps, ood_score=np.where(valid, 9.3, np.nan).astype(np.float32)))
    assert alert.visible and alert.object.count("All of this scan") == 1
    assert "adapt the model to it" in alert.object
    # the command line puts the model where the list and load_model find it by name
    from xrfnb.ui.dashboard.files import adapted_models_folder

    assert f"xrfnb adapt SCAN --out {adapted_models_folder() / 'NAME'}" in alert.object
    assert dash.selection_info.ood_alert.alert_type == "danger"
    dash.set_maps(dataclasses.replace(maps, ood_score=np.where(valid, 0.1, np.nan).astype(np.float32)))
    assert not dash.selection_info.ood_alert.visible


def test_only_buried_pigments_are_fitted_as_one_layer_not_an_internal_error(dash, monkeypatch):
    """Red ochre alone, called as buried (bottom right: no lead white, no vermilion): the residual
    shows a fitted stack, never the simulator's 'layer: pigments must be a non-empty mapping'."""
    dash.select_pixel(28, 28)
    assert dash.predicted_pigments() == ((), ("red ochre",))
    stack, desc = dash.predicted_stack()
    assert len(stack.layers) == 1 and "red ochre" in desc
    title = dash.spectrum_panel.residual.dmap[()].opts.get().kwargs["title"]
    assert title.startswith("Residual vs fitted stack") and "mapping" not in title
    # a simulator failure is told in words about the pigments, its internals go to the log only
    monkeypatch.setattr(
        _spectrum,
        "fit_stack",
        lambda *a, **k: (_ for _ in ()).throw(xrfnb.SimulationError("layer: internals")),
    )
    _files.FITS.clear()
    dash.select_pixel(28, 27)
    title = dash.spectrum_panel.residual.dmap[()].opts.get().kwargs["title"]
    assert "red ochre could not be simulated" in title and "internals" not in title


def test_long_messages_make_short_notifications(tmp_path, monkeypatch):
    """A non-data upload: the reader's message lists every format; the toast keeps its first clause,
    the status line keeps all of it."""
    monkeypatch.setattr(_data, "available_models", list)
    shown = []

    class Notifications:
        def error(self, text, duration):
            shown.append(text)

    monkeypatch.setattr(type(_common.pn.state), "notifications", property(lambda self: Notifications()))
    dash = Dashboard()
    dash.data_panel.upload.value = {"notes.md": b"# Provenance\n\nMeasured in 2019 by the museum's lab.\n"}
    level, message = dash.last_message
    assert level == "error" and message.startswith("notes.md: ") and len(message) > 300
    assert "xrfnb-upload" not in message  # the private temporary folder is not shown
    (toast,) = shown
    assert len(toast) < 260 and "notes.md" in toast and toast.endswith("(details in the status line)")
    assert dash._status.object == message


def test_maps_have_legends_labelled_colour_bars_and_mm_axes(dash, scene):
    """Composite: a legend of the classes present in their colours, hover without a packed RGBA
    number; surface vs buried: a categorical legend, no colour bar; continuous views: the colour bar
    names what is shown; axes in mm with a scale bar (the scene's pixels are 100 um)."""
    from bokeh.models import ColorBar, HoverTool, ScaleBar

    _, maps, truth = scene
    doc = live_document(dash)
    main = plot_in(doc, "xrfnb-main")
    assert main.xaxis[0].axis_label == "x (mm)" and main.yaxis[0].axis_label == "y (mm)"
    assert main.x_range.end == pytest.approx(COLS * PIXEL_MM)
    (bar,) = [a for a in main.center if isinstance(a, ScaleBar)]
    assert bar.unit == "mm"
    (hover,) = [t for t in main.tools if isinstance(t, HoverTool)]
    assert "RGBA" not in str(hover.tooltips) and "x (mm)" in str(hover.tooltips)
    entries = dict((text.split(" (")[0], color) for color, text in dash.legend_entries())
    for name, color in zip(CLASSES, COLORS, strict=True):
        assert entries[name] == color
    area = {c: f for c, f in zip(CLASSES, dash.map_panel.legend_fractions(), strict=True)}
    for name in CLASSES:
        expected = truth[name][~maps.mask].mean()
        assert area[name] == pytest.approx(expected, abs=1e-9)
        assert name in dash.map_panel.legend.object
    dash.set_threshold("vermilion", 0.99)  # vermilion nowhere now: not in the legend
    assert "vermilion" not in dash.map_panel.legend.object and "lead white" in dash.map_panel.legend.object

    dash.focus, dash.view = "red ochre", "Surface vs buried"
    main = plot_in(doc, "xrfnb-main")
    assert not [a for a in main.right if isinstance(a, ColorBar)]
    texts = [t for _, t in dash.legend_entries()]
    assert texts[0] == "red ochre at the surface" and texts[1].startswith("red ochre buried only")
    assert "buried only" in dash.map_panel.legend.object

    for view, element, label in (
        ("Pigment", None, "probability"),
        ("OOD score", None, "OOD score"),
        ("Elements", "Fe", "Fe counts"),
        ("Total counts", None, "counts"),
    ):
        dash.view = view
        if element:
            dash.element = element
        main = plot_in(doc, "xrfnb-main")
        (cbar,) = [a for a in main.right if isinstance(a, ColorBar)]
        assert cbar.title == label, view
    dash.log_scale = True
    (cbar,) = [a for a in plot_in(doc, "xrfnb-main").right if isinstance(a, ColorBar)]
    assert cbar.title == "log10(1 + counts)"


def test_map_axes_in_pixels_without_a_pixel_size(scene):
    scan, maps, _ = scene
    bare = xrfnb.Scan(scan.counts, scan.calibration)  # no pixel size
    dash = Dashboard(scan=bare, maps=maps)
    from bokeh.models import ScaleBar

    main = plot_in(live_document(dash), "xrfnb-main")
    assert main.xaxis[0].axis_label == "column" and main.x_range.end == COLS
    assert not [a for a in main.center if isinstance(a, ScaleBar)]
    dash.map_panel.tap.event(x=7.5, y=9.5)
    assert dash.pixel == (9, 7)
    assert "xrfnb:scale_bar" not in __import__("PIL.Image").Image.open(io.BytesIO(dash.export_png())).info


def single_spectrum_scene(scene, r=16, c=12):
    """The scene's pixel (r, c) alone: a 1 x 1 scan with its maps and element maps."""
    import dataclasses

    scan, maps, _ = scene
    sl = (slice(r, r + 1), slice(c, c + 1))
    em = maps.element_maps
    em1 = dataclasses.replace(
        em,
        intensity=em.intensity[sl],
        sigma=em.sigma[sl],
        detection_limit=em.detection_limit[sl],
        chi2=em.chi2[sl],
    )
    maps1 = dataclasses.replace(
        maps,
        probability=maps.probability[sl],
        buried_probability=maps.buried_probability[sl],
        ood_score=maps.ood_score[sl],
        mask=maps.mask[sl],
        element_maps=em1,
    )
    scan1 = xrfnb.Scan(np.asarray(scan.counts)[sl], scan.calibration, metadata={"source": "one spectrum"})
    return scan1, maps1


def test_a_single_spectrum_gets_a_spectrum_view(scene):
    """1 x 1 scan: no map and no gallery of one-pixel tiles, but the spectrum with its line markers,
    the calls with probabilities and their element evidence, and the fitted stack with its residual."""
    scan, maps, _ = scene
    scan1, maps1 = single_spectrum_scene(scene)
    dash = Dashboard(scan=scan1, maps=maps1)
    assert dash.single_spectrum and dash.pixel == (0, 0)
    assert not dash._map_column.visible and not dash.gallery.section.visible
    assert dash.gallery.column.objects == [] and not dash.export_panel.map_row.visible
    assert dash.selection_info.calls.visible
    rows = dash.calls_table()
    calls = {row["class"]: row["call"] for row in rows}
    assert calls == {"lead white": "surface", "vermilion": "surface", "red ochre": ""}
    assert [row["probability"] for row in rows] == sorted((row["probability"] for row in rows), reverse=True)
    lw = next(row for row in rows if row["class"] == "lead white")
    assert lw["probability"] == pytest.approx(float(maps.probability[16, 12, 0]))
    # evidence from the element fit: Pb detected with its intensity, Fe (red ochre) not detected
    assert "Pb 501 ± 22 counts" in lw["evidence"]
    ochre = next(row for row in rows if row["class"] == "red ochre")
    assert "Fe not detected (< 30)" in ochre["evidence"]
    table = dash.selection_info.calls.object
    assert "| lead white |" in table and "**surface**" in table and "absent" in table
    # the spectrum with the markers of the elements found, and the residual of the fitted stack
    spectrum = dash.spectrum_panel.spectrum.dmap[()]
    np.testing.assert_array_equal(
        elements_of(spectrum, hv.Curve)[0].dimension_values(1), np.asarray(scan.counts[16, 12], float)
    )
    markers = elements_of(spectrum, hv.Labels)[0].dimension_values("line")
    assert {name.split()[0] for name in markers} == {"Pb", "Hg", "S"}
    assert "fitted stack" in dash.spectrum_panel.residual.dmap[()].opts.get().kwargs["title"]
    # a map opened afterwards gets the map view back
    dash.set_scan(scan, maps=maps)
    assert not dash.single_spectrum and dash._map_column.visible and dash.gallery.section.visible
    assert not dash.selection_info.calls.visible and dash.gallery.column.objects


def test_new_maps_keep_their_per_class_thresholds(scene):
    """The model's calibrated thresholds differ per class: showing maps (at start or with a new scan)
    sets the global slider to their median without flattening them to it; moving the slider does."""
    import dataclasses

    scan, maps, _ = scene
    calibrated = dataclasses.replace(maps, thresholds=np.array([0.2, 0.3, 0.9]))
    expected = {c: pytest.approx(t) for c, t in zip(CLASSES, (0.2, 0.3, 0.9), strict=True)}
    dash = Dashboard(scan=scan, maps=calibrated)
    assert dash.thresholds == expected and dash.global_threshold == pytest.approx(0.3)
    dash = Dashboard(scan=scan, maps=maps)
    dash.set_scan(scan, maps=calibrated)
    assert dash.thresholds == expected and dash.global_threshold == pytest.approx(0.3)
    dash.global_threshold = 0.6
    assert dash.thresholds == dict.fromkeys(CLASSES, 0.6)


def test_report_export_has_the_sessions_thresholds_scan_and_instrument(dash, scene):
    import re

    _, maps, truth = scene
    dash.set_threshold("vermilion", 0.95)  # above every vermilion probability of the scene (<= 0.94)
    html = dash.export_report().decode()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    assert "<title>Pigment maps of synthetic</title>" in html
    assert "vermilion 0.95 (model 0.50)" in html  # the session's threshold, marked as changed
    # the scan's provenance and the session's instrument (the Bruker M6 preset, with the scan's gain)
    assert "32 x 32 pixels x 4096 channels" in html and "100 µm" in html and "Bruker M6" in html
    # area fractions at the session's thresholds, counted here from the scene's regions: OOD pixels
    # (score above 0.4) are left out; vermilion, above every probability now, is not listed as found
    valid = ~maps.mask
    in_dist = valid & ~(np.nan_to_num(maps.ood_score) > maps.ood_threshold)
    share = (truth["lead white"] & in_dist).sum() / in_dist.sum()
    summary = html[html.index('id="summary"') : html.index("</table>", html.index('id="summary"'))]
    row = re.search(r"lead white</td><td class=\"num\">([0-9.]+) %", summary)
    assert row is not None and float(row.group(1)) == pytest.approx(100 * share, abs=0.05)
    assert "vermilion" not in summary and "red ochre" in summary
    assert html.count("data:image/png;base64,") >= 4  # composite, per-class, OOD and element maps
    # the download button writes the same report (its date line aside)
    got = dash.export_panel.report.callback().getvalue().decode()
    strip = re.compile(r"Report made [^<]*")
    assert strip.sub("", got) == strip.sub("", html)
    button = dash.export_panel.report
    assert button.filename.endswith(".html") and button.label == "Report (HTML)"


def test_report_export_without_maps_says_so(scene):
    scan, _, _ = scene
    dash = Dashboard(scan=scan, model=None)
    dash.set_maps(None)
    assert dash.export_panel.report.callback() is None
    assert dash.last_message[0] == "error" and "no pigment maps" in dash.last_message[1]


STEEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "Steel.spe"


@pytest.mark.skipif(not STEEL.exists(), reason="the real Steel.spe is not in ../shared/data/real")
def test_an_uncalibrated_file_leads_to_the_calibration_card_and_maps_after_applying(tmp_path):
    import shutil

    reference = xrfnb.load(STEEL).calibration  # Steel.spe with its PyMca Steel.cfg beside it
    shutil.copy(STEEL, tmp_path / "Steel.spe")  # alone: read at 1 keV per channel
    dash = Dashboard(tmp_path)
    assert dash.model_name != _common.NO_MODEL, "a trained model ships with the package"
    dash.open("Steel.spe")
    # the model is not run on a channel axis; the status says what to do and the card is open
    assert dash.maps is None and dash.needs_calibration()
    assert "no energy calibration" in dash.status_text and "Energy calibration" in dash.status_text
    assert "Traceback" not in dash.status_text and "EnergyCalibration(" not in dash.status_text
    panel = dash.calibration_panel
    assert not panel.card.collapsed
    assert "needs an energy calibration" in dash.selection_info.calls.object
    # a click on the spectrum (x in the present calibration: keV = channel) enters the chosen line
    from bokeh import events

    panel.line.value = "Fe Kb"
    figure = render(dash.spectrum_panel.spectrum.dmap).state  # the rendered figure, as in a page
    figure._trigger_event(events.Tap(figure, x=593.0, y=10.0))
    assert panel.peaks.value == "Fe Kb=593"
    # a malformed entry is a message, not a traceback
    panel.peaks.value = "Fe Ka 537"
    panel.fit_button.clicks += 1
    assert dash.last_message[0] == "error" and "line=channel" in dash.last_message[1]
    fit = panel.fit("Fe Ka=537, Ni Ka=627, Cr Ka=454")
    assert fit.calibration.gain_keV == pytest.approx(reference.gain_keV, rel=2e-3)
    assert abs(fit.calibration.offset_keV - reference.offset_keV) < 0.02
    # the relation and each peak's residual in eV are shown
    text = panel.result.object
    assert str(fit.calibration) in text
    for name, res in zip(fit.lines, fit.residuals_keV, strict=True):
        assert f"| {name} |" in text and f"{res * 1e3:+.1f} |" in text
    assert np.all(np.abs(fit.residuals_keV) < 0.02)  # published K lines fit a steel to < 20 eV
    panel.apply_button.clicks += 1
    assert dash.scan.calibration == fit.calibration and not dash.needs_calibration()
    # the Fe Ka peak now sits at 6.40 keV (X-ray Data Booklet: Fe Ka1 6.4038, Ka2 6.3908 keV)
    assert dash.scan.calibration.energy_keV(537.0) == pytest.approx(6.40, abs=0.015)
    assert dash.maps is not None and dash.calls_table()
    assert "Showing Steel.spe" in dash.status_text and "calibrat" not in dash.status_text
    assert "fitted in the dashboard to Fe Ka, Ni Ka, Cr Ka" in dash.scan.metadata["calibration_source"]
    assert panel.card.collapsed and panel.apply_button.disabled


def test_calibration_peaks_are_parsed_strictly():
    from xrfnb.ui.dashboard.calibration import parse_peaks

    parsed = parse_peaks("Fe Ka=537, Ni  Ka = 627;\nCr Ka=454.5")
    assert parsed == {"Fe Ka": 537, "Ni Ka": 627, "Cr Ka": 454.5}
    for bad in ("Fe Ka 537", "Fe Ka=abc", "=537", "Fe Ka=1, Fe Ka=2"):
        with pytest.raises(xrfnb.CalibrationError):
            parse_peaks(bad)


def test_a_multi_element_epics_file_says_how_its_detectors_were_combined(tmp_path):
    from test_io_formats import _epics, _gauss_spectrum

    # four detector elements, each with its own calibration, seeing Fe Ka and Cu Ka
    cals = [xrfnb.EnergyCalibration(-0.03 + 0.02 * i, 0.0148 - 0.0003 * i) for i in range(4)]
    counts = [_gauss_spectrum(c) for c in cals]
    _epics(tmp_path / "four.mca", counts, cals, live=[9.0, 8.0, 8.5, 8.5], real=[10.0] * 4)
    dash = Dashboard(tmp_path)
    dash.open("four.mca")
    text = dash.scan_info_text()
    assert dash.selection_info.scan_info.object == text
    assert "**Detector:** 4 detector elements" in text
    assert "sum of all detector elements, each rebinned onto element 0's energy axis" in text
    assert "live time 8.5 s" in text  # the mean of the four elements' live times
    assert str(cals[0]) in text  # the sum is on element 0's energy axis
    # the sum holds the counts of all four elements (rebinning keeps counts), not one element's
    total = float(np.asarray(dash.scan.counts, dtype=float).sum())
    assert total == pytest.approx(sum(float(c.sum()) for c in counts), rel=0.01)
    # a one-detector file says nothing about detectors
    dash.set_scan(make_scene(8, 8, 1400)[0], label="one")
    info = dash.selection_info.scan_info.object
    assert "Detector" not in info and "8 x 8 pixels x 1400 channels" in info and "pixel 100 µm" in info


def test_the_selected_pixel_is_marked_on_the_main_map_and_the_marker_follows_taps(dash):
    doc = live_document(dash)

    def marker():
        plot = plot_in(doc, "xrfnb-main")
        (renderer,) = [r for r in plot.renderers if r.name == "xrfnb-pixel-marker"]
        return {k: list(v) for k, v in renderer.data_source.data.items()}

    # a tap at the centre of pixel (row 5, col 8) in mm (0.1 mm pixels, row 0 at the top)
    dash.map_panel.on_tap(x=(8 + 0.5) * PIXEL_MM, y=(5 + 0.5) * PIXEL_MM)
    assert dash.pixel == (5, 8)
    got = marker()
    assert got["x"] == pytest.approx([0.85]) and got["y"] == pytest.approx([0.55])
    assert got["w"] == pytest.approx([PIXEL_MM]) and got["h"] == pytest.approx([PIXEL_MM])
    dash.map_panel.on_tap(x=0.31, y=2.05)  # pixel (row 20, col 3)
    got = marker()
    assert dash.pixel == (20, 3) and got["x"] == pytest.approx([0.35]) and got["y"] == pytest.approx([2.05])
    # another view makes a new figure: it marks the same pixel
    dash.view = "Total counts"
    assert marker()["x"] == pytest.approx([0.35])
    # a region selected: no pixel marked
    mask = np.zeros((ROWS, COLS), bool)
    mask[:4, :4] = True
    dash.select_region(mask)
    assert marker()["x"] == []


def test_an_rgb_overlay_of_three_element_maps(dash, scene):
    _, maps, truth = scene
    views = dash.element_views
    assert views.section.visible

    def title(el):
        return hv.Store.lookup_options("bokeh", el, "plot").kwargs["title"]

    # by default the three strongest elements (by total fitted counts), one per channel
    em = maps.element_maps
    totals = {
        f"{e} {f}": float(np.nansum(em.intensity[..., i]))
        for i, (e, f) in enumerate(zip(em.elements, em.families, strict=True))
    }
    assert [views.red.value, views.green.value, views.blue.value] == sorted(
        totals, key=totals.get, reverse=True
    )[:3]
    # RGB overlay: Pb red, Hg green, Fe blue, each channel scaled to its own 99th percentile (501 counts:
    # more than 1 % of the pixels hold each element), so full brightness inside its region, ~0 outside
    views.red.value, views.green.value, views.blue.value = "Pb L", "Hg L", "Fe K"
    rgb, legend = views.overlay_rgb()
    valid = ~maps.mask
    for k, owner in enumerate(("lead white", "vermilion", "red ochre")):
        assert np.all(rgb[..., k][truth[owner] & valid] == 255)
        assert np.all(rgb[..., k][~truth[owner] & valid] <= 1)
    assert np.all(rgb[maps.mask] == 128)  # invalid pixel grey
    assert [(c, e) for c, e, _ in legend] == [("red", "Pb L"), ("green", "Hg L"), ("blue", "Fe K")]
    assert all(top == pytest.approx(501.0) for _, _, top in legend)
    html = views.legend.object
    assert "red: Pb L, 0 to 501 counts (its 99th percentile" in html and "invalid pixel" in html
    assert title(views.overlay.object) == "RGB overlay: Pb L / Hg L / Fe K"


def test_no_element_section_without_element_maps(scene):
    import dataclasses

    scan, maps, _ = scene
    dash = Dashboard(scan=scan, maps=dataclasses.replace(maps, element_maps=None))
    views = dash.element_views
    assert not views.shown and views.section.objects == []
    assert views.overlay.object is None and views.mosaic.object is None
    dash.set_maps(maps)  # maps with element maps arrive: the section fills
    assert views.shown and len(views.mosaic.object) == len(maps.element_maps.elements)


def test_element_maps_side_by_side(dash, scene):
    """One small map per fitted element in one layout: titled with element and line family, its own
    colour bar in counts from 0 to its 99.5th percentile, invalid pixels NaN (grey)."""
    _, maps, _ = scene
    em = maps.element_maps
    views = dash.element_views
    layout = views.mosaic.object
    tiles = list(layout)
    labels = [f"{e} {f}" for e, f in zip(em.elements, em.families, strict=True)]

    def opts(el):
        return hv.Store.lookup_options("bokeh", el, "plot").kwargs

    assert [opts(t)["title"] for t in tiles] == labels
    for j, tile in enumerate(tiles):
        o = opts(tile)
        assert o["colorbar"] is True and o["clabel"] == "counts"
        plane = np.asarray(em.intensity[..., j], dtype=float)
        assert o["clim"] == (0.0, pytest.approx(np.percentile(plane[~maps.mask], 99.5)))
        # the image as drawn: row 0 at the top (hv.Image holds it upside down), NaN at the dead pixel
        shown = np.flipud(tile.data)
        np.testing.assert_array_equal(np.isnan(shown), maps.mask)
        np.testing.assert_allclose(shown[~maps.mask], plane[~maps.mask])
        # on the main map's axes: the scan's extent in mm
        assert tile.bounds.lbrt() == pytest.approx((0, 0, COLS * PIXEL_MM, ROWS * PIXEL_MM))
    assert "99.5th percentile of counts" in views.mosaic_note.object
    # the log-scale toggle: log10(1 + counts), said on the colour bars
    dash.log_scale = True
    tile = list(views.mosaic.object)[labels.index("Pb L")]
    assert opts(tile)["clabel"] == "log10(1 + counts)"
    pb = np.asarray(em.intensity[..., labels.index("Pb L")], dtype=float)
    shown = np.flipud(tile.data)
    np.testing.assert_allclose(shown[~maps.mask], np.log10(1 + pb[~maps.mask]))


def test_element_maps_pan_and_zoom_with_the_main_map_and_a_click_selects_a_pixel(dash):
    """In a rendered document every element map, the RGB overlay and the main map share one pair of
    ranges (a pan or zoom in one moves all), also after the main map changes view; each element map
    has a scale bar; a click on an element map selects that pixel."""
    from bokeh.models import Plot, ScaleBar

    doc = live_document(dash)

    def figures():
        return {p.name: p for p in doc.select({"type": Plot}) if p.name and p.name.startswith("xrfnb-")}

    figs = figures()
    maps_ = [f for n, f in figs.items() if n.startswith("xrfnb-element") or n == "xrfnb-main"]
    assert len(maps_) == 4 + 2  # S, Fe, Hg, Pb, the RGB overlay and the main map
    x, y = figs["xrfnb-main"].x_range, figs["xrfnb-main"].y_range
    assert all(f.x_range is x and f.y_range is y for f in maps_)
    assert figs["xrfnb-gallery"].x_range is not x  # the gallery's tiles are a mosaic, not a map
    for name, f in figs.items():
        if name.startswith("xrfnb-element:"):
            (bar,) = [a for a in f.center if isinstance(a, ScaleBar)]
            assert bar.range is x and bar.unit == "mm"
    # a zoom (the browser writes the shared range) and another view: the new main map keeps it
    x.start, x.end = 1.0, 2.0
    dash.view = "Total counts"
    main = figures()["xrfnb-main"]
    assert main.x_range is x and (x.start, x.end) == (1.0, 2.0)
    # a click on an element map at pixel (row 7, col 21)
    fe = figures()["xrfnb-element:Fe K"]

    class Click:
        x, y = (21 + 0.5) * PIXEL_MM, (7 + 0.5) * PIXEL_MM

    (handler,) = [cb for cb in fe._event_callbacks["tap"]]
    handler(Click())
    assert dash.pixel == (7, 21)
    dash.element_views.on_tap(x=COLS * PIXEL_MM + 0.05, y=0.05)  # beside the scan: ignored
    assert dash.pixel == (7, 21) and not hasattr(dash, "last_message")


def test_block_means_of_large_element_maps():
    from xrfnb.ui.dashboard.elements import block_mean

    values = np.arange(35, dtype=float).reshape(5, 7)
    values[0, 0] = np.nan
    out = block_mean(values, 3)
    assert out.shape == (2, 3)
    assert out[0, 0] == pytest.approx(np.nanmean(values[:3, :3]))  # NaN ignored
    assert out[1, 2] == pytest.approx(values[3:, 6:].mean())  # the last, partial block
    assert np.isnan(block_mean(np.full((4, 4), np.nan), 2)).all()
    np.testing.assert_array_equal(block_mean(values, 1), values)


def test_a_dashboard_outside_a_server_links_no_stylesheet_from_a_cdn(dash):
    """In a notebook without xrfnb.setup_notebook(): Panel's component stylesheets are inlined."""
    from bokeh.document import Document
    from bokeh.models import ImportedStyleSheet
    from panel.viewable import Viewable

    from xrfnb.ui.notebook import localize_panel_stylesheets

    assert localize_panel_stylesheets in Viewable._preprocessing_hooks
    root = dash.__panel__().get_root(Document())
    urls = [s.url for s in root.select({"type": ImportedStyleSheet})]
    assert urls, "Panel's widgets carry stylesheets"
    assert not [u for u in urls if u.startswith(("http://", "https://", "//"))], urls


def test_a_closed_session_frees_its_dashboard():
    """A browser session that ends must not leave its Dashboard (scan, maps, plots) in the server: HoloViews
    keeps plot hooks in a process-wide registry, where a bound method kept every Dashboard alive."""
    import gc
    import weakref

    import panel as pn
    from bokeh.document import Document

    scan, maps, _ = make_scene()
    refs = []
    for _ in range(2):
        dash = Dashboard(scan=scan, maps=maps)
        viewable = pn.panel(dash)
        root = viewable.get_root(Document())  # rendered as a session renders it: every plot and hook
        dash.pixel = (5, 8)
        viewable._cleanup(root)  # what Panel does when the session is destroyed
        pn.state._views.pop(root.ref["id"], None)
        refs.append(weakref.ref(dash))
        del dash, viewable, root
    gc.collect()
    assert [r() is None for r in refs] == [True, True]


def test_served_session_documents_link_panel_stylesheets_locally_before_their_page_is_drawn(monkeypatch):
    """Until Panel renders a session's page, its document has no ``dist_url`` and Panel points every
    stylesheet it patches at cdn.holoviz.org; the dashboard pins the local one when a session starts
    (the ten-session browser test saw default.css, native.css and loading.css fetched from the CDN under
    load). The notebook hook, which would hide this by inlining stylesheets, is taken out here."""
    import panel as pn
    from bokeh.document import Document
    from bokeh.models import ImportedStyleSheet
    from panel.io.resources import LOCAL_DIST, set_resource_mode
    from panel.viewable import Viewable

    from xrfnb.ui.dashboard.common import pin_local_dist_url
    from xrfnb.ui.notebook import localize_panel_stylesheets

    hooks = [h for h in Viewable._preprocessing_hooks if h is not localize_panel_stylesheets]
    monkeypatch.setattr(Viewable, "_preprocessing_hooks", hooks)

    def urls(doc: Document) -> list[str]:
        pane = pn.pane.Markdown("a")
        with set_resource_mode("server"):  # as under `xrfnb serve`
            root = pane.get_root(doc)
            doc.add_root(root)  # a served session's models live in its document
            pane.object = "b"  # an update, as when a session's first maps arrive
        return [
            str(s.url)
            for m in root.references()
            for s in (getattr(m, "stylesheets", None) or [])
            if isinstance(s, ImportedStyleSheet)
        ]

    assert any("cdn.holoviz.org" in u for u in urls(Document()))  # Panel's own fallback, without the pin
    doc = Document()
    pin_local_dist_url(doc)
    assert doc._template_variables["dist_url"] == LOCAL_DIST
    pinned = urls(doc)
    assert pinned and not any("cdn.holoviz.org" in u for u in pinned), pinned


def test_model_selector_shows_the_model_in_use():
    """The Model select shows the chosen model, not its placeholder (the split dashboard set the first
    model without events after the Select existed, so the served page showed an empty selector)."""
    dash = Dashboard()
    assert dash.data_panel.model_w.value == dash.model_name


# ---------------------------------------------------------------------------------------------------
# the instrument from the scan (issue #18 item 1, issue #14 deliverable 4)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted_scan():
    """(scan, true calibration): a simulated Bruker M6 scan (Rh tube) whose stated calibration is 40 eV
    and 0.4 % off the one it was simulated with, as a drifted detector's file would be."""
    scan, _ = xrfnb.render_scan("hidden-painting", shape=(16, 16), counts_per_pixel=20000, rng=1401)
    true = scan.calibration
    wrong = xrfnb.EnergyCalibration(true.offset_keV + 0.04, true.gain_keV * 1.004)
    return scan.with_calibration(wrong, source="test: a drifted calibration"), true


def _shown_number(text):
    """The leading number of a value the card shows ("150.6 °" -> 150.6)."""
    return float(text.split()[0])


def test_the_instrument_fitted_from_the_scan_is_shown_and_its_calibration_applied(shifted_scan):
    from xrfnb.ui.dashboard import calibration as _calibration

    scan, true = shifted_scan
    dash = Dashboard(scan=scan)
    panel = dash.calibration_panel
    assert panel.instrument_button.name == "Fit the instrument from this scan"
    # before a fit, applying says what to do first, in words
    panel.instrument_apply_button.clicks += 1
    assert dash.last_message[0] == "error" and "Fit the instrument from this scan" in dash.last_message[1]
    assert dash.scan is scan

    panel.instrument_button.clicks += 1  # blocking outside a server: fitted here
    shown = panel.instrument_fit
    direct = xrfnb.fit_instrument(scan)  # the same call on the same data, outside the dashboard
    assert shown is not None and shown.source == direct.source and shown.n_pixels == 16 * 16
    # independent of the code: the preset's tube (Rh) and the calibration the scan was simulated with
    assert shown["anode"].value == "Rh"
    e10_eV = 1000 * (float(shown.instrument.calibration.energy_keV(true.channel(10.0))) - 10.0)
    assert abs(e10_eV) <= 15.0
    e10_before_eV = 1000 * (float(scan.calibration.energy_keV(true.channel(10.0))) - 10.0)
    assert abs(e10_before_eV) > 60.0  # the stated calibration was clearly off

    # the card shows every setting of the direct fit: its value, uncertainty, status and evidence
    rows = {row["name"]: row for row in _calibration.instrument_rows(shown)}
    assert list(rows) == list(direct.parameters)
    page = panel.instrument_result.object
    assert panel.instrument_result.visible
    for name, p in direct.parameters.items():
        row = rows[name]
        assert row["status"].startswith(p.status if p.status != "start" else "not fitted")
        assert row["evidence"] == p.evidence.replace(" um", " µm")
        assert html.escape(row["setting"]) in page and html.escape(row["evidence"]) in page
        if isinstance(p.value, str):
            assert row["value"] == p.value.replace(" um", " µm")
    for name, scale in (
        ("offset_keV", 1.0),
        ("gain_keV", 1e3),  # shown in eV per channel
        ("fwhm_mnka_eV", 1.0),
        ("scattering_angle_deg", 1.0),
    ):
        assert _shown_number(rows[name]["value"]) == pytest.approx(direct[name].value * scale, rel=1e-3)
        if direct[name].sigma:
            sigma = float(rows[name]["uncertainty"].split()[1])
            assert sigma == pytest.approx(direct[name].sigma * scale, rel=0.06)
    assert rows["scattering_angle_deg"]["value"].endswith("°")
    assert rows["anode"]["value"] == "Rh" and rows["anode"]["status"] == "fitted"
    assert "not determined" in rows["tube_voltage_kV"]["status"]  # the spectrum stops at 40 keV
    assert "± " in page and "eV at 10 keV" in page
    for bad in ("Traceback", "FittedParameter(", "InstrumentFit(", "EnergyCalibration("):
        assert bad not in page

    # applying gives the open scan the fitted calibration, as the manual apply does, and new maps
    assert not panel.instrument_apply_button.disabled
    maps_before = dash.maps
    panel.instrument_apply_button.clicks += 1
    assert dash.scan.calibration == shown.instrument.calibration
    assert dash.scan.calibration.offset_keV == pytest.approx(direct.instrument.calibration.offset_keV)
    assert dash.scan.calibration.gain_keV == pytest.approx(direct.instrument.calibration.gain_keV)
    assert dash.scan.counts is scan.counts  # the counts are untouched
    assert "fitted with the instrument in the dashboard" in dash.scan.metadata["calibration_source"]
    assert dash.maps is not None and dash.maps is not maps_before
    assert panel.instrument_apply_button.disabled and panel.instrument_result.visible
    # another scan forgets the fit
    other, _, _ = make_scene(rows=8, cols=8)
    dash.set_scan(other, label="other")
    assert panel.instrument_fit is None and not panel.instrument_result.visible


def test_the_instrument_fit_runs_off_the_event_loop_with_a_progress_line(shifted_scan, monkeypatch):
    from xrfnb.ui.dashboard import calibration as _calibration

    scan, _ = shifted_scan
    dash = Dashboard(scan=scan, maps=make_scene(16, 16, channels=scan.n_channels)[1], blocking=False)
    panel = dash.calibration_panel
    started = []
    monkeypatch.setattr(panel.jobs, "start", lambda job, work: started.append((job, work)))
    panel.instrument_button.clicks += 1
    # handed to the job runner (a worker thread in a session), the card says it is working
    ((job, work),) = started
    assert isinstance(job, _calibration.InstrumentJob) and panel.instrument_fit is None
    assert panel.instrument_progress.visible and panel.instrument_button.disabled
    stages: list[tuple[str, bool, int]] = []

    class Job(_calibration.InstrumentJob):
        def __setattr__(self, key, value):
            super().__setattr__(key, value)
            if key == "done" and hasattr(self, "stage_started"):
                stages.append((self.stage, self.determinate, self.done))

    recorded = Job("instrument", label=job.label, scan=job.scan)
    recorded.run(work)
    assert recorded.error is None and recorded.fit is not None
    names = list(dict.fromkeys(stage for stage, _, _ in stages))
    assert names == [
        "fitting the instrument: summing the spectra",
        "fitting the instrument: peaks, calibration, resolution, tube, scatter and air",
    ]
    summed = [n for st, counted, n in stages if st == names[0] and counted]
    assert summed[-1] == scan.shape[0] and summed == sorted(summed)
    panel._on_instrument_progress(recorded)
    assert panel.instrument_progress.object.startswith("fitting the instrument: peaks")
    panel.finish_instrument_fit(recorded)
    assert not panel.instrument_progress.visible and not panel.instrument_button.disabled
    assert panel.instrument_fit is recorded.fit and not panel.instrument_apply_button.disabled


def test_an_instrument_fit_that_cannot_be_made_is_said_in_words():
    cal = xrfnb.EnergyCalibration(0.0, 0.01)
    counts = np.random.default_rng(1402).poisson(0.002, size=(4, 4, 4096)).astype(np.uint16)
    counts[0, 0, 100] = 3  # a few counts, no peak
    scan = xrfnb.Scan(counts, cal, metadata={"source": "a nearly empty scan"})
    maps = make_scene(4, 4, channels=4096)[1]
    dash = Dashboard(scan=scan, maps=maps)
    panel = dash.calibration_panel
    panel.instrument_button.clicks += 1
    level, text = dash.last_message
    assert level == "error" and text.startswith("cannot fit the instrument from this scan")
    assert "too few counts" in text
    for bad in ("Traceback", "FitError", "Error("):
        assert bad not in text
    assert panel.instrument_fit is None and not panel.instrument_result.visible
    assert not panel.instrument_button.disabled


def _record_instruments(monkeypatch):
    """{"elements": [...], "check": [...]}: the instrument each element fit and each physics check of the
    dashboard receives (the real ones still run)."""
    from xrfnb.maps.pigmentmaps import PigmentMaps
    from xrfnb.model.model import PigmentModel

    seen: dict[str, list] = {"elements": [], "check": []}
    fit_elements, identify = _job.fit_elements, PigmentModel.identify
    check_pattern = PigmentMaps.check_pattern

    def recorded_fit(scan, instrument, **kw):
        seen["elements"].append(instrument)
        return fit_elements(scan, instrument, **kw)

    def recorded_check(self, index, instrument=None):
        seen["check"].append(instrument)
        return check_pattern(self, index, instrument=instrument)

    def recorded_identify(self, spectrum, *args, **kw):
        if kw.get("check_physics"):
            seen["check"].append(kw.get("instrument"))
        return identify(self, spectrum, *args, **kw)

    monkeypatch.setattr(_job, "fit_elements", recorded_fit)
    monkeypatch.setattr(PigmentMaps, "check_pattern", recorded_check)
    monkeypatch.setattr(PigmentModel, "identify", recorded_identify)
    return seen


def _check_a_call(dash):
    """Check by physics the call of the first pixel whose call can be checked now; False if none can."""
    rows, cols = dash.scan.shape[:2]
    for r in range(rows):
        for c in range(cols):
            dash.pixel = (r, c)
            view = dash.physics_panel.pixel_view()
            if view is not None and view.action:
                dash.physics_panel.check_selected()
                return True
    return False


def test_the_fitted_instrument_is_used_for_the_element_fit_physics_check_and_report(
    shifted_scan, monkeypatch
):
    from xrfnb.ui.dashboard import calibration as _calibration

    scan, _ = shifted_scan
    dash = Dashboard(scan=scan)
    panel = dash.calibration_panel
    preset = dash.spectrum_panel.instrument()
    assert preset.name == "bruker-m6" and preset.calibration == scan.calibration
    assert "**Instrument:** the file's or its preset (bruker-m6)." in dash.selection_info.scan_info.object
    assert panel.use_instrument_button.name == _calibration.USE_INSTRUMENT_LABEL
    assert _calibration.USE_INSTRUMENT_LABEL == "Use the fitted instrument"
    assert not panel.use_instrument_button.visible and not panel.file_instrument_button.visible
    # before a fit, using it says what to do first
    panel.use_instrument_button.clicks += 1
    assert dash.last_message[0] == "error" and "Fit the instrument from this scan" in dash.last_message[1]

    panel.instrument_button.clicks += 1
    fit = panel.instrument_fit
    assert fit is not None and not fit.calibration_blind  # the file states a calibration: not blind
    assert not panel.blind_warning.visible and not panel.blind_confirm.visible
    assert panel.use_instrument_button.visible and not panel.use_instrument_button.disabled
    # the fit differs from the preset beyond its calibration (else using it would show nothing)
    assert dataclasses.replace(fit.instrument, calibration=preset.calibration) != preset

    seen = _record_instruments(monkeypatch)
    panel.use_instrument_button.clicks += 1
    # the scan has the fitted calibration, its counts untouched, and new maps made with the fitted instrument
    assert dash.scan.calibration == fit.instrument.calibration and dash.scan.counts is scan.counts
    assert "fitted with the instrument in the dashboard" in dash.scan.metadata["calibration_source"]
    assert dash.maps is not None and seen["elements"] == [fit.instrument]
    assert xrfnb.Instrument.from_dict(dash.maps.metadata["physics_check"]["instrument"]) == fit.instrument
    assert dash.spectrum_panel.instrument() == fit.instrument  # simulated spectrum, stack fits, report
    info = dash.selection_info.scan_info.object
    assert f"**Instrument:** fitted to {html.escape(fit.source, quote=False)} (from this scan)." in info
    assert panel.use_instrument_button.disabled and panel.instrument_apply_button.disabled
    assert panel.file_instrument_button.visible
    # a check on demand fits its stacks with the fitted instrument
    seen["check"].clear()
    assert _check_a_call(dash)
    assert seen["check"] and all(inst == fit.instrument for inst in seen["check"])
    # the report names the fitted instrument
    assert html.escape(fit.instrument.name) in dash.export_report().decode()

    # a calibration applied afterwards replaces only the instrument's calibration
    shifted = xrfnb.EnergyCalibration(
        fit.instrument.calibration.offset_keV + 0.001, fit.instrument.calibration.gain_keV
    )
    panel.apply(shifted, source="test")
    assert dash.spectrum_panel.instrument() == dataclasses.replace(fit.instrument, calibration=shifted)

    # going back: the file's calibration and the preset, the maps made again with them
    seen["elements"].clear()
    panel.file_instrument_button.clicks += 1
    assert dash.scan.calibration == scan.calibration and dash.scan.counts is scan.counts
    assert dash.spectrum_panel.instrument() == preset
    assert len(seen["elements"]) == 1 and seen["elements"][0].name == "bruker-m6"
    assert seen["elements"][0] != fit.instrument
    assert "the file's or its preset (bruker-m6)" in dash.selection_info.scan_info.object
    assert not panel.file_instrument_button.visible and not panel.use_instrument_button.disabled
    assert panel.instrument_fit is fit  # the fit is kept: it may be used again


def test_a_blind_instrument_fit_is_said_and_applied_only_once_confirmed():
    """A spectrum without a calibration (``calibrated`` False, as a reader that found none says) is
    calibrated by a blind search: the card says it may be wrong and neither applies nor uses it before
    the user confirms having checked it against known peaks."""
    from xrfnb.ui.dashboard import calibration as _calibration

    inst = xrfnb.Instrument.preset("bruker-m6")
    stack = xrfnb.Stack([xrfnb.Layer({"yellow ochre": 0.5, "lead white": 0.2}, thickness_um=30)])
    sim = xrfnb.simulate(stack, inst, counts=5e6, live_time_s=100.0, rng=14_004)
    raw = xrfnb.Scan(
        np.asarray(sim.counts, dtype=np.float64)[None, None, :],
        xrfnb.EnergyCalibration(0.0, 1.0),
        live_time_s=100.0,
        metadata={"calibrated": False, "source": "uncalibrated"},
    )
    dash = Dashboard(scan=raw)
    panel = dash.calibration_panel
    panel.instrument_button.clicks += 1
    fit = panel.instrument_fit
    assert fit is not None and fit.calibration_blind
    assert panel.blind_warning.visible and "found blind" in panel.blind_warning.object
    assert "may be wrong" in panel.blind_warning.object or "often wrong" in panel.blind_warning.object
    assert panel.blind_confirm.visible and not panel.blind_confirm.value
    assert panel.blind_confirm.name == _calibration.BLIND_CONFIRM_LABEL
    assert panel.instrument_apply_button.disabled and panel.use_instrument_button.disabled
    # clicked anyway (or called from Python), nothing is applied, and the page says why
    for button in (panel.instrument_apply_button, panel.use_instrument_button):
        button.clicks += 1
        level, text = dash.last_message
        assert level == "error" and "blind" in text and _calibration.BLIND_CONFIRM_LABEL in text
        assert dash.scan is raw and panel.instrument_in_use is None
    # confirmed: both are offered, and using it gives the scan the blind calibration, said so
    panel.blind_confirm.value = True
    assert not panel.instrument_apply_button.disabled and not panel.use_instrument_button.disabled
    panel.use_instrument_button.clicks += 1
    assert dash.scan.calibration == fit.instrument.calibration
    assert "found blind, checked by the user" in dash.scan.metadata["calibration_source"]
    assert dash.spectrum_panel.instrument() == fit.instrument
    # unticking does not undo it; going back restores the uncalibrated spectrum
    panel.file_instrument_button.clicks += 1
    assert dash.scan is raw


def test_element_maps_are_fitted_once_for_several_sessions_on_the_same_file(tmp_path, monkeypatch):
    """Two sessions opening the same file share its pigment and element maps (read-only, cached per file
    and model in ``files.MAPS``): the model and the element fit run once; a changed file is mapped anew."""
    path = tmp_path / "scene.h5"
    xrfnb.render_scan("hidden-painting", shape=(12, 12), counts_per_pixel=1500, rng=1403, path=path)
    _files.MAPS.clear()
    _files.SCANS.clear()
    runs = {"fit_elements": 0, "map_pigments": 0}
    real_fit, real_map = _job.fit_elements, _job.map_pigments

    def counted_fit(*args, **kwargs):
        runs["fit_elements"] += 1
        return real_fit(*args, **kwargs)

    def counted_map(*args, **kwargs):
        runs["map_pigments"] += 1
        return real_map(*args, **kwargs)

    monkeypatch.setattr(_job, "fit_elements", counted_fit)
    monkeypatch.setattr(_job, "map_pigments", counted_map)
    first, second = Dashboard(tmp_path), Dashboard(tmp_path)
    first.open("scene.h5")
    assert runs == {"fit_elements": 1, "map_pigments": 1}
    assert first.maps is not None and first.maps.element_maps is not None
    second.open("scene.h5")
    assert runs == {"fit_elements": 1, "map_pigments": 1}  # the second session fitted nothing
    assert second.maps is first.maps and second.element_views.shown  # the same maps, element maps shown
    # sharing does not couple the sessions: a threshold in one leaves the other and the maps alone
    k = 0
    cls = first.classes[k]
    second.set_threshold(cls, 0.99)
    assert first.thresholds[cls] == pytest.approx(float(first.maps.thresholds[k]))
    assert float(second.maps.thresholds[k]) != 0.99
    # the file changed on disk (new modification time): mapped anew
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = Dashboard(tmp_path)
    third.open("scene.h5")
    assert runs == {"fit_elements": 2, "map_pigments": 2}
    _files.MAPS.clear()
    _files.SCANS.clear()


def test_two_sessions_opening_the_same_file_at_once_fit_its_elements_once(tmp_path, monkeypatch):
    """Session 2 opens a file while session 1 is still fitting its elements: it waits for session 1's
    maps (``files.MAPS.get_or_make``) instead of running the model and the element fit a second time,
    and both show the same maps."""
    import threading
    import time

    path = tmp_path / "scene.h5"
    xrfnb.render_scan("hidden-painting", shape=(12, 12), counts_per_pixel=1500, rng=1403, path=path)
    _files.MAPS.clear()
    _files.SCANS.clear()
    runs = {"fit_elements": 0, "map_pigments": 0}
    fitting, release = threading.Event(), threading.Event()
    real_fit, real_map = _job.fit_elements, _job.map_pigments

    def held_fit(*args, **kwargs):
        runs["fit_elements"] += 1
        fitting.set()
        assert release.wait(120), "the test never let the element fit go on"
        return real_fit(*args, **kwargs)

    def counted_map(*args, **kwargs):
        runs["map_pigments"] += 1
        return real_map(*args, **kwargs)

    monkeypatch.setattr(_job, "fit_elements", held_fit)
    monkeypatch.setattr(_job, "map_pigments", counted_map)
    first, second = Dashboard(tmp_path), Dashboard(tmp_path)
    stat = path.stat()
    key = ((str(path.resolve()), stat.st_mtime_ns, stat.st_size), first.model_name)
    errors: list[BaseException] = []

    def open_in(dash: Dashboard) -> None:
        try:
            dash.open("scene.h5")
        except BaseException as exc:  # raised again below, in the test's thread
            errors.append(exc)

    one = threading.Thread(target=open_in, args=(first,), daemon=True)
    two = threading.Thread(target=open_in, args=(second,), daemon=True)
    try:
        one.start()
        assert fitting.wait(120), "session 1 never reached the element fit"
        two.start()
        # session 2 has reached the maps: waiting for session 1's, or (the bug) mapping them itself
        deadline = time.monotonic() + 120
        while not (runs["map_pigments"] > 1 or _files.MAPS.waiting(key)):
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.05)
    finally:
        release.set()
        one.join(120)
        two.join(120)
    assert not errors, errors
    assert runs == {"fit_elements": 1, "map_pigments": 1}
    assert first.maps is not None and first.maps.element_maps is not None
    assert second.maps is first.maps and second.element_views.shown
    assert not _files.MAPS.waiting(key)
    _files.MAPS.clear()
    _files.SCANS.clear()


def test_a_cache_entry_being_made_is_waited_for_and_made_again_when_its_maker_gives_up():
    """``LRUCache.get_or_make``: a second thread asking for an entry being made waits for it (seeing the
    maker's object), gets the same value, and makes nothing; a maker cancelled (``retry_on``) lets the
    waiting thread make the entry itself; a maker's other failure is the waiting thread's too; a waiting
    thread that stops waiting (its ``on_wait`` raises) leaves the maker alone."""
    import threading

    cache: _files.LRUCache[object] = _files.LRUCache(2)
    made: list[str] = []
    started, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def slow(name, outcome):
        def make():
            made.append(name)
            started.set()
            assert release.wait(60)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return make

    def ask(name, key, make, **kw):
        try:
            results[name] = cache.get_or_make(key, make, maker=name, **kw)
        except BaseException as exc:
            results[name] = exc

    def waiting_for(key, n=1):
        for _ in range(1200):
            if cache.waiting(key) == n:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"nobody waits for {key}")

    # made once, the second asker waits and sees who makes it
    seen: list[object] = []
    value = object()
    maker = threading.Thread(target=ask, args=("maker", "a", slow("maker", value)))
    maker.start()
    assert started.wait(60)
    waiter = threading.Thread(
        target=ask, args=("waiter", "a", slow("waiter", None)), kwargs={"on_wait": seen.append}
    )
    waiter.start()
    waiting_for("a")
    release.set()
    maker.join(60)
    waiter.join(60)
    assert results == {"maker": value, "waiter": value} and made == ["maker"] and set(seen) == {"maker"}
    assert cache.get("a") is value and cache.waiting("a") == 0

    # the maker is cancelled: the waiting thread makes it itself
    for outcome, expected in ((_job.Cancelled(), "own"), (OSError("disk gone"), OSError)):
        started.clear()
        release.clear()
        made.clear()
        results.clear()
        key = f"b-{expected}"
        maker = threading.Thread(target=ask, args=("maker", key, slow("maker", outcome)))
        maker.start()
        assert started.wait(60)
        waiter = threading.Thread(
            target=ask,
            args=("waiter", key, lambda: made.append("waiter") or "own"),
            kwargs={"retry_on": (_job.Cancelled,)},
        )
        waiter.start()
        waiting_for(key)
        release.set()
        maker.join(60)
        waiter.join(60)
        assert results["maker"] is outcome
        if expected == "own":
            assert results["waiter"] == "own" and made == ["maker", "waiter"] and cache.get(key) == "own"
        else:  # the same failure, not made twice, nothing kept
            assert results["waiter"] is outcome and made == ["maker"] and cache.get(key) is None

    # a waiting thread that gives up (its job was dropped) raises its own Cancelled; the maker goes on
    started.clear()
    release.clear()
    results.clear()
    maker = threading.Thread(target=ask, args=("maker", "c", slow("maker", "c-value")))
    maker.start()
    assert started.wait(60)

    def give_up(other):
        raise _job.Cancelled

    ask("quitter", "c", lambda: "never", on_wait=give_up, retry_on=(_job.Cancelled,))
    assert isinstance(results["quitter"], _job.Cancelled)
    release.set()
    maker.join(60)
    assert results["maker"] == "c-value" and cache.get("c") == "c-value" and cache.waiting("c") == 0


def test_composite_hover_names_the_calls_at_the_pixel_not_an_rgba_number(dash, scene):
    """The composite map's hover gives the pigments called at the pixel (buried ones marked) and the most
    probable class with its probability -- not the image's packed RGBA value ("RGBA: 4284394386"); the
    words follow the thresholds. Expected calls come from the scene's painted regions."""
    from bokeh.models import CustomJSHover, HoverTool

    _, maps, truth = scene
    doc = live_document(dash)
    main = plot_in(doc, "xrfnb-main")
    (hover,) = [t for t in main.tools if isinstance(t, HoverTool)]
    tips = dict(hover.tooltips)
    assert "@image" not in str(hover.tooltips) and "RGBA" not in str(hover.tooltips)
    assert tips["pigments"] == "@calls{custom}" and tips["most probable"].startswith("@top{custom}")
    calls, top = hover.formatters["@calls"], hover.formatters["@top"]
    assert isinstance(calls, CustomJSHover) and isinstance(top, CustomJSHover)
    source = image_source(main).data_source
    rgba = np.asarray(source.data["image"][0])
    rgb = np.asarray(maps.composite_rgb(maps.thresholds), dtype=np.uint32)
    packed = (
        rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16) | (255 << 24)
    )  # Bokeh's RGBA, little-endian

    def shown(r, c):
        """What the hover says at map pixel (r, c): the columns at the image's index of that pixel."""
        assert rgba[r, c] == packed[r, c]  # the hover columns are laid out as the image
        code = int(source.data["calls"][0][r, c])
        k = int(source.data["top"][0][r, c])
        return calls.args["names"][code], top.args["classes"][k], float(source.data["p_top"][0][r, c])

    def expected(r, c, absent=()):
        names = [n for n in CLASSES if truth[n][r, c] and n not in absent]
        return (
            ", ".join(f"{n} (buried)" if n == "red ochre" else n for n in names) or "none above its threshold"
        )

    picks = {
        "lead white only": truth["lead white"] & ~truth["vermilion"] & ~truth["red ochre"],
        "lead white and vermilion": truth["lead white"] & truth["vermilion"],
        "vermilion over red ochre": truth["vermilion"] & truth["red ochre"],
        "nothing": ~truth["lead white"] & ~truth["vermilion"] & ~truth["red ochre"] & ~maps.mask,
    }
    for what, where in picks.items():
        for r, c in np.argwhere(where)[:: max(1, int(where.sum()) // 5)]:
            words, most, p = shown(r, c)
            assert words == expected(r, c), what
            present = [n for n in CLASSES if truth[n][r, c]]
            if present:
                assert most in present and 0.85 <= p <= 0.95, what  # the scene's 0.9 +- 0.04
    r, c = DEAD
    assert shown(r, c)[0] == "no spectrum (masked pixel)"
    # a threshold change rewrites the words in the live document: vermilion no longer called
    dash.set_threshold("vermilion", 0.99)
    main = plot_in(doc, "xrfnb-main")
    (hover,) = [t for t in main.tools if isinstance(t, HoverTool)]
    calls, source = hover.formatters["@calls"], image_source(main).data_source
    r, c = np.argwhere(picks["lead white and vermilion"])[0]
    assert calls.args["names"][int(source.data["calls"][0][r, c])] == expected(r, c, absent=("vermilion",))


def test_refitting_the_instrument_while_the_fitted_one_is_in_use(shifted_scan, monkeypatch):
    """A second 'Fit the instrument from this scan' while the first fit is in use: the session goes back
    to the file's instrument (its calibration, not the first fit's), the new fit is shown, and using it
    and going back again lead to the new fit's and then the file's calibration and instrument."""
    scan, _ = shifted_scan
    dash = Dashboard(scan=scan)
    panel = dash.calibration_panel
    preset = dash.spectrum_panel.instrument()
    panel.instrument_button.clicks += 1
    first = panel.instrument_fit
    panel.use_instrument_button.clicks += 1
    assert (
        panel.instrument_in_use == first.instrument and dash.scan.calibration == first.instrument.calibration
    )

    seen = _record_instruments(monkeypatch)
    panel.instrument_button.clicks += 1  # fitted again, from the scan with the first fit's calibration
    second = panel.instrument_fit
    assert getattr(dash, "last_message", ("none", ""))[0] != "error", dash.last_message
    assert second is not None and second is not first and panel.instrument_result.visible
    # back on the file's instrument: its calibration (not the first fit's) and the preset, maps made again
    assert panel.instrument_in_use is None
    assert dash.scan.calibration == scan.calibration and dash.scan.counts is scan.counts
    assert dash.spectrum_panel.instrument() == preset
    assert [inst.name for inst in seen["elements"]] == ["bruker-m6"] and dash.maps is not None
    assert "the file's or its preset (bruker-m6)" in dash.selection_info.scan_info.object
    assert not panel.file_instrument_button.visible
    assert not panel.use_instrument_button.disabled and not panel.instrument_apply_button.disabled
    # the new fit describes the same counts: fitted from another calibration, it finds the same one
    e10 = [
        float(f.instrument.calibration.energy_keV(scan.calibration.channel(10.0))) for f in (first, second)
    ]
    assert abs(e10[0] - e10[1]) < 0.005

    # the new fit in use, then the file's again (its calibration, not either fit's)
    seen["elements"].clear()
    panel.use_instrument_button.clicks += 1
    assert panel.instrument_in_use == second.instrument
    assert dash.scan.calibration == second.instrument.calibration
    assert dash.spectrum_panel.instrument() == second.instrument and seen["elements"] == [second.instrument]
    panel.file_instrument_button.clicks += 1
    assert dash.scan.calibration == scan.calibration and dash.spectrum_panel.instrument() == preset
    assert panel.instrument_in_use is None and panel.instrument_fit is second


def test_going_back_to_the_files_instrument_while_a_refit_runs_keeps_the_new_fit(shifted_scan):
    """In a server session the fit runs in a worker: going back to the file's instrument meanwhile
    changes the scan's calibration, not its counts, so the fit that arrives afterwards still describes
    the open scan and is shown (it was dropped as a fit of another scan)."""
    scan, _ = shifted_scan
    dash = Dashboard(scan=scan)
    panel = dash.calibration_panel
    panel.instrument_button.clicks += 1
    first = panel.instrument_fit
    panel.use_instrument_button.clicks += 1
    in_use = dash.scan

    started = []
    dash.data_panel._blocking = False  # as in a server session: the fit is handed to a worker
    panel.jobs.start = lambda job, work: started.append((job, work))
    panel.instrument_button.clicks += 1
    dash.data_panel._blocking = True
    ((job, work),) = started
    assert job.scan is in_use and panel.instrument_button.disabled and panel.instrument_progress.visible
    assert panel.use_instrument_button.disabled and panel.instrument_apply_button.disabled

    panel.file_instrument_button.clicks += 1  # while the worker fits
    assert dash.scan.calibration == scan.calibration and panel.instrument_in_use is None
    job.run(work)
    assert job.error is None and job.fit is not None
    panel.finish_instrument_fit(job)
    assert panel.instrument_fit is job.fit and panel.instrument_fit is not first
    assert panel.instrument_result.visible and not panel.instrument_progress.visible
    assert not panel.instrument_button.disabled and not panel.use_instrument_button.disabled
    assert dash.scan.calibration == scan.calibration and dash.spectrum_panel.instrument().name == "bruker-m6"
    panel.use_instrument_button.clicks += 1
    assert dash.scan.calibration == job.fit.instrument.calibration
    panel.file_instrument_button.clicks += 1
    assert dash.scan.calibration == scan.calibration


# ---------------------------------------------------------------------------------------------------
# the cold start (issue #14): the first scan prepared as the server starts, a page shown at once
# ---------------------------------------------------------------------------------------------------
def test_the_server_prepares_the_first_scan_and_a_session_shows_it_with_its_maps_in_one_update(
    tmp_path, monkeypatch
):
    """``warm_up`` (started by ``serve``) reads and maps the file a session opens first, under the keys a
    session uses: the session then maps nothing, and shows the scan with its maps in one update of the
    page (the scan, then again for its maps, before)."""
    path = tmp_path / "scene.h5"
    xrfnb.render_scan("hidden-painting", shape=(12, 12), counts_per_pixel=1500, rng=1404, path=path)
    _files.MAPS.clear()
    _files.SCANS.clear()
    runs = {"map_pigments": 0}
    real_map = _job.map_pigments

    def counted_map(*args, **kwargs):
        runs["map_pigments"] += 1
        return real_map(*args, **kwargs)

    monkeypatch.setattr(_job, "map_pigments", counted_map)
    _data.warm_up(tmp_path, "scene.h5").join(timeout=300)
    assert runs == {"map_pigments": 1}
    key = (_data.file_key(path), "default")
    prepared = _files.MAPS.get(key)
    assert prepared is not None and prepared.element_maps is not None

    dash = Dashboard(tmp_path)
    versions = []
    dash.param.watch(lambda event: versions.append(event.new), "data_version")
    dash.open("scene.h5")
    assert runs == {"map_pigments": 1}  # nothing mapped again
    assert dash.maps is prepared and dash.element_views.shown
    assert len(versions) == 1  # one update of the page: the scan with its maps
    assert dash.status_text.startswith("Showing scene.h5")
    # a served folder without a file to open first: nothing to prepare
    _files.MAPS.clear()
    _data.warm_up(tmp_path, None).join(timeout=60)
    assert runs == {"map_pigments": 1} and _files.MAPS.get(key) is None
    _files.MAPS.clear()
    _files.SCANS.clear()


def test_a_session_waiting_for_the_servers_warm_up_says_so(tmp_path, monkeypatch):
    """A session that opens the file while the warm-up still maps it waits for those maps and says that
    the server maps it since it started (not 'another session')."""
    import threading

    path = tmp_path / "scene.h5"
    xrfnb.render_scan("hidden-painting", shape=(12, 12), counts_per_pixel=1500, rng=1405, path=path)
    _files.MAPS.clear()
    _files.SCANS.clear()
    release, mapping = threading.Event(), threading.Event()
    real_map = _job.map_pigments

    def held_map(*args, **kwargs):
        mapping.set()
        assert release.wait(120)
        return real_map(*args, **kwargs)

    monkeypatch.setattr(_job, "map_pigments", held_map)
    warm = _data.warm_up(tmp_path, "scene.h5")
    assert mapping.wait(120)
    dash = Dashboard(tmp_path, blocking=False)
    started = []
    monkeypatch.setattr(dash.data_panel, "start_job", lambda job, work: started.append((job, work)))
    dash.data_panel.open_path(path, label="scene.h5")
    ((load, read),) = started
    load.run(read)
    dash.data_panel.finish_job(load)  # the scan is shown; its maps are not made yet: a mapping job
    assert dash.scan is not None and dash.maps is None
    ((_, _), (job, work)) = started
    waiter = threading.Thread(target=job.run, args=(work,))
    waiter.start()
    deadline = 120.0
    while "the server maps this file since it started" not in job.stage and deadline > 0:
        waiter.join(0.1)
        deadline -= 0.1
    assert job.stage.startswith("the server maps this file since it started: pigment maps"), job.stage
    release.set()
    waiter.join(300)
    warm.join(300)
    assert job.error is None and job.maps is _files.MAPS.get((_data.file_key(path), "default"))
    dash.data_panel.finish_job(job)
    assert dash.maps is job.maps
    _files.MAPS.clear()
    _files.SCANS.clear()


def test_serve_prepares_what_the_first_session_opens_and_serves_a_loading_page(tmp_path, monkeypatch):
    """``serve`` starts the warm-up of the scan a session opens first (the demo without a path, the
    file given), and each session's page is first the small loading page, which shows its dashboard once
    built (at once outside a server)."""
    calls, warmed = [], []
    monkeypatch.setattr(_server, "serve_app", lambda app, **kw: calls.append(app))
    monkeypatch.setattr(_server, "warm_up", lambda *args: warmed.append(args))
    _dashboard.serve(None, port=5999)
    (tmp_path / "a.h5").write_bytes(b"")
    _dashboard.serve(tmp_path / "a.h5", port=5999)
    _dashboard.serve(tmp_path, port=5999)
    assert warmed == [(None, None), (tmp_path.resolve(), "a.h5"), (tmp_path.resolve(), None)]

    built = []
    page = _server.loading_page(lambda: built.append(Dashboard()) or built[-1])
    (shown,) = page.objects
    assert len(built) == 1 and shown is built[0].__panel__()  # no server session: built at once

    def fails():
        raise xrfnb.DataError("the served data folder is gone")

    page = _server.loading_page(fails)
    (alert,) = page.objects
    assert "could not be built: the served data folder is gone" in alert.object


def test_a_served_page_is_the_loading_page_until_it_connects(tmp_path, monkeypatch):
    """The real server answers a page request with the small loading page: the dashboard (seconds of
    building) is made only once the page has been drawn and connected, which a bare HTTP request never
    does (the browser tests see it follow)."""
    import http.client

    pages, made = [], []
    real_serve_app, real_make_app = _server.serve_app, _server.make_app

    def serve_app(app, **kw):
        def recorded():
            pages.append(app())
            return pages[-1]

        return real_serve_app(recorded, **kw)

    monkeypatch.setattr(_server, "serve_app", serve_app)
    monkeypatch.setattr(_server, "make_app", lambda *args: made.append(args) or real_make_app(*args))
    port = free_port()
    server = _dashboard.serve(tmp_path, port=port, threaded=True)  # an empty folder: nothing to open
    try:
        wait_until_listening(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/")
        status = conn.getresponse().status
        conn.close()
    finally:
        server.stop()
    assert status == 200 and len(pages) == 1 and made == []
    _, text, progress = pages[0].objects
    assert "xrfnb-starting" in text.object and _server.LOADING_TEXT in text.object
    assert progress.value == -1 and progress.active  # a moving bar


def test_panel_serve_app_gets_the_loading_page_and_the_warm_up(tmp_path, monkeypatch):
    """``panel serve dashboards/xrfnb_app.py``: Panel runs the script once per session; each gets the
    loading page, and the first starts the warm-up of what a session opens first (once per target)."""
    warmed = []
    monkeypatch.setattr(_server, "warm_up", lambda *args: warmed.append(args))
    monkeypatch.setattr(_server, "_WARMED", set())
    (tmp_path / "a.h5").write_bytes(b"")
    monkeypatch.setenv("XRFNB_DATA", str(tmp_path))
    pages = [Dashboard.page_from_cli_args([]) for _ in range(2)]
    Dashboard.page_from_cli_args([str(tmp_path / "a.h5")])
    assert warmed == [(tmp_path.resolve(), None), (tmp_path.resolve(), "a.h5")]
    (shown,) = pages[0].objects  # no server session: the dashboard is built at once
    assert isinstance(shown, pn.viewable.Viewable) and shown is not pages[1].objects[0]


def test_panel_serve_of_the_app_script_serves_the_loading_page(tmp_path):
    """The README's second way to serve, run as written: the page a session gets is the loading page
    (a Python client never draws the page, so the dashboard is never built), not an error or a repr."""
    import subprocess
    import sys

    from bokeh.client import pull_session

    port = free_port()
    app = Path(__file__).resolve().parents[1] / "dashboards" / "xrfnb_app.py"
    env = {**os.environ, "XRFNB_DATA": str(tmp_path)}  # an empty folder: nothing to open or map
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", str(app), "--port", str(port), "--address", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_listening(port, timeout_s=120)
        with pull_session(url=f"http://127.0.0.1:{port}/xrfnb_app") as session:
            texts = [
                str(getattr(m, "text", "")) for m in session.document.models if hasattr(m, "text")
            ]
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert any(_server.LOADING_TEXT in t for t in texts), texts
    assert "Traceback" not in log and "functools.partial" not in " ".join(texts), log


class _ServedContext:
    """Stands for a served session's context: what a document of ``xrfnb serve`` has and others lack."""


def test_element_maps_of_a_served_session_follow_on_the_next_tick(scene):
    """In a server session the element maps are built in a callback of their own, after the update
    that shows the pigment maps has been sent; outside one they are built at once."""
    from bokeh.document import Document
    from bokeh.io.doc import set_curdoc

    scan, maps, _ = scene
    dash = Dashboard(scan=scan, maps=maps)
    assert dash.element_views.shown
    dash.element_views.section.objects = []  # as before new maps
    served = Document()
    context = _ServedContext()
    served._session_context = lambda: context  # what tells a served session's document (a weak reference)
    dash.data_panel._blocking = False
    set_curdoc(served)
    try:
        dash._refresh_element_views()
        dash._refresh_element_views()  # a second request joins the pending one
        assert not dash.element_views.shown
        (callback,) = served.session_callbacks
        callback.callback()
    finally:
        set_curdoc(Document())
    assert dash.element_views.shown and not dash._element_refresh_pending


def test_the_notebook_stylesheet_hook_leaves_served_documents_alone(scene):
    """The hook that inlines Panel's stylesheets for notebooks is registered process-wide; a served
    session's document (its stylesheets come from the server) is not walked or changed by it."""
    from bokeh.document import Document
    from bokeh.models import ImportedStyleSheet
    from panel.io.resources import set_resource_mode
    from panel.io.state import set_curdoc

    from xrfnb.ui.notebook import localize_panel_stylesheets

    def sheets(doc):
        import panel as pn

        pane = pn.pane.Markdown("a")
        with set_resource_mode("server"), set_curdoc(doc):  # as Panel renders a session's page
            root = pane.get_root(doc)
        doc.add_root(root)
        localize_panel_stylesheets(pane, root)
        return [
            str(s.url)
            for m in root.references()
            for s in (getattr(m, "stylesheets", None) or [])
            if isinstance(s, ImportedStyleSheet)
        ]

    local = sheets(Document())
    assert local and all(u.startswith("data:text/css") for u in local)
    served = Document()
    context = _ServedContext()
    served._session_context = lambda: context
    kept = sheets(served)
    assert kept and not any(u.startswith("data:") for u in kept)
