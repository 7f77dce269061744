"""xrfnb.write_report: a self-contained HTML (or PDF) report of pigment maps for the conservation file.

The maps are built here by hand on a scene with known regions (lead white on the left third, vermilion
in the middle third, buried in its lower half, nothing on the right third, smalt nowhere, one dead
pixel, a 2 x 2 block out of distribution), so every expected colour, count and share below follows
from the scene's definition, not from the report code. PNGs are decoded with Pillow, independently of
the report's own PNG writer.
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import xrfnb
import xrfnb.ui.cli as cli
import xrfnb.ui.report as report

PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow (a Bokeh dependency) decodes the PNGs")

ROWS, COLS, CHANNELS = 24, 30, 64
CLASSES = ("lead white", "vermilion", "smalt")
COLORS = ("#f0ead6", "#e34234", "#1f3f9f")
DEAD = (0, COLS - 1)
OOD_BLOCK = (slice(20, 22), slice(24, 26))
PIXEL_UM = 100.0
CAL = xrfnb.EnergyCalibration(-0.96, 0.01)  # E = -0.96 keV + 10 eV x channel
SOURCE = "/data/scans/panel_A.h5"


def _rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def regions() -> dict[str, np.ndarray]:
    r, c = np.mgrid[0:ROWS, 0:COLS]
    return {
        "lead white": c < 10,
        "vermilion": (c >= 10) & (c < 20),
        "vermilion buried": (c >= 10) & (c < 20) & (r >= 12),
        "nothing": c >= 20,
    }


def make_maps(pixel_size_um: float | None = PIXEL_UM, element_maps: bool = True) -> xrfnb.PigmentMaps:
    reg = regions()
    prob = np.full((ROWS, COLS, 3), 0.1, dtype=np.float32)
    prob[reg["lead white"], 0] = 0.9
    prob[reg["vermilion"], 1] = 0.85
    buried = (0.05 * prob).astype(np.float32)
    buried[reg["vermilion buried"], 1] = 0.8 * 0.85
    ood = np.full((ROWS, COLS), 0.2, dtype=np.float32)
    ood[OOD_BLOCK] = 2.0
    mask = np.zeros((ROWS, COLS), dtype=bool)
    mask[DEAD] = True
    prob[mask] = np.nan
    buried[mask] = np.nan
    ood[mask] = np.nan
    em = None
    if element_maps:
        intensity = np.stack([reg["lead white"] * 400.0 + 5, reg["vermilion"] * 300.0 + 5], axis=-1)
        intensity = intensity.astype(np.float32)
        em = xrfnb.ElementMaps(
            elements=("Pb", "Hg"),
            families=("L", "L"),
            intensity=intensity,
            sigma=np.sqrt(intensity),
            detection_limit=np.full_like(intensity, 20.0),
            chi2=np.ones((ROWS, COLS), np.float32),
            residual=np.zeros(CHANNELS),
        )
    return xrfnb.PigmentMaps(
        classes=CLASSES,
        probability=prob,
        buried_probability=buried,
        ood_score=ood,
        thresholds=np.array([0.5, 0.5, 0.5]),
        ood_threshold=1.0,
        mask=mask,
        colors=COLORS,
        element_maps=em,
        metadata={
            "source": SOURCE,
            "model": "test-model-v0",
            "model_precision": "float32",
            "pixel_size_um": pixel_size_um,
            "calibration": CAL.to_dict(),
            "shape": [ROWS, COLS],
        },
        mask_reason=mask.astype(np.uint8),  # 1 = dead
    )


def make_scan() -> xrfnb.Scan:
    counts = np.random.default_rng(0).poisson(3.0, size=(ROWS, COLS, CHANNELS)).astype(np.uint16)
    counts[DEAD] = 0
    meta = {
        "source": SOURCE,
        "format": "hdf5",
        "sum_note": "4 detector elements summed after rebinning onto element 0's energy axis",
    }
    return xrfnb.Scan(counts, CAL, pixel_size_um=PIXEL_UM, live_time_s=0.05, metadata=meta)


class _Page(HTMLParser):
    """Images (attributes), figures (data-map -> their images), legend entries and visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.figures: dict[str, list[dict[str, str]]] = {}
        self.legend_classes: dict[str, list[str]] = {}
        self.scalebars: list[dict[str, str]] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "figure":
            self._figure = a.get("data-map", "")
            self.figures[self._figure] = []
        if tag == "img":
            self.images.append(a)
            if self._figure is not None:
                self.figures[self._figure].append(a)
        if tag == "li" and "data-class" in a and self._figure is not None:
            self.legend_classes.setdefault(self._figure, []).append(a["data-class"])
        if tag == "div" and "scalebar" in a.get("class", ""):
            self.scalebars.append({**a, "figure": self._figure or ""})

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def decode(img: dict[str, str]) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix)
    data = base64.b64decode(img["src"][len(prefix) :], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with PIL_Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def map_image(page: _Page, map_id: str) -> np.ndarray:
    imgs = [i for i in page.figures[map_id] if i.get("class") == "map"]
    assert len(imgs) == 1, map_id
    return decode(imgs[0])


def pixel(image: np.ndarray, row: int, col: int) -> tuple[int, int, int]:
    """Colour of scan pixel (row, col) in a map image upscaled by an integer factor."""
    up = image.shape[1] // COLS
    assert image.shape[:2] == (ROWS * up, COLS * up)
    return tuple(int(v) for v in image[row * up + up // 2, col * up + up // 2])


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, _Page]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    inst = xrfnb.Instrument.preset("bruker-m6")
    path = xrfnb.write_report(
        make_maps(), out, scan=make_scan(), thresholds={"vermilion": 0.7}, instrument=inst
    )
    assert path == out
    return out, parse(out)


def test_html_is_self_contained(written):
    path, page = written
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    refs = re.findall(r"""\b(?:src|href|srcset|action|poster|data)\s*=\s*["']?([^"'\s>]*)""", text)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), "only data: URIs"
    assert "url(" not in text and "@import" not in text
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert len(page.images) >= 10
    for img in page.images:  # every image a PNG of the size the page shows it at
        arr = decode(img)
        assert arr.shape[:2] == (int(img["height"]), int(img["width"]))


def test_states_model_thresholds_ood_calibration_and_provenance(written):
    _, page = written
    text = page.plain
    assert "test-model-v0" in text and "float32" in text
    assert "E = -0.96 keV + 10 eV x channel" in text and str(CAL) in text
    assert "panel_A.h5" in text and "hdf5" in text
    assert "24 x 30 pixels x 64 channels" in text
    assert "0.05 s per pixel" in text
    assert "4 detector elements summed" in text
    assert "bruker-m6" in text and "Rh tube at 50 kV" in text  # the preset's description
    # thresholds: vermilion changed from the model's 0.50 to 0.70, the others the model's
    assert "1 changed from the model's: vermilion 0.70 (model 0.50)" in text
    assert re.search(r"vermilion 0\.70 changed \(model 0\.50\)", text)
    assert re.search(r"lead white 0\.50 model's", text) and re.search(r"smalt 0\.50 model's", text)
    # OOD share: 4 of the 719 valid pixels, said before the summary table
    n_valid = ROWS * COLS - 1
    assert f"4 of {n_valid} identified pixels ({100 * 4 / n_valid:.1f} %)" in text
    assert text.index("Out of distribution") < text.index("pigment class area")
    # masked pixels by reason
    assert f"1 of {ROWS * COLS} (1 dead)" in text


def test_summary_areas_follow_the_scene(written):
    _, page = written
    text = page.plain
    n_in = ROWS * COLS - 1 - 4  # valid, in distribution
    lead = regions()["lead white"].sum()
    verm = regions()["vermilion"].sum()
    verm_buried = regions()["vermilion buried"].sum()
    assert f"lead white {100 * lead / n_in:.1f} % 0 %" in text
    assert f"vermilion {100 * verm / n_in:.1f} % {100 * verm_buried / n_in:.1f} %" in text
    assert "Not found (no pixel above its threshold): smalt." in text


def test_legend_and_maps_only_for_present_classes(written):
    _, page = written
    assert sorted(page.legend_classes["composite"]) == ["lead white", "vermilion"]
    assert "class:lead white" in page.figures and "class:vermilion" in page.figures
    assert "class:smalt" not in page.figures
    assert "buried:vermilion" in page.figures and "buried:lead white" not in page.figures
    assert {"composite", "surface-buried", "ood", "element:Pb L", "element:Hg L"} <= set(page.figures)


def test_composite_colours_in_the_known_regions(written):
    _, page = written
    image = map_image(page, "composite")
    reg = regions()
    for name, color in (("lead white", COLORS[0]), ("vermilion", COLORS[1]), ("nothing", "#000000")):
        rows, cols = np.nonzero(reg[name] & ~regions_ood() & (np.indices((ROWS, COLS))[1] != DEAD[1]))
        for r, c in zip(rows[::7], cols[::7], strict=True):
            assert pixel(image, r, c) == _rgb(color), (name, r, c)
    assert pixel(image, *DEAD) == (128, 128, 128)


def regions_ood() -> np.ndarray:
    ood = np.zeros((ROWS, COLS), dtype=bool)
    ood[OOD_BLOCK] = True
    return ood


def test_surface_buried_and_ood_maps(written):
    _, page = written
    image = map_image(page, "buried:vermilion")
    assert pixel(image, 3, 15) == _rgb("#d95f02")  # surface
    assert pixel(image, 18, 15) == _rgb("#1b9e77")  # buried only
    assert pixel(image, 5, 3) == _rgb("#f2f2f2")  # no vermilion
    ood = map_image(page, "ood")
    red = np.array([[pixel(ood, r, c) == (214, 39, 40) for c in range(COLS)] for r in range(ROWS)])
    np.testing.assert_array_equal(red, regions_ood())


def test_scale_bar_matches_the_pixel_size(written):
    _, page = written
    assert "100 µm" in page.plain and "3 x 2.4 mm" in page.plain
    bar = next(b for b in page.scalebars if b["figure"] == "composite")
    image = map_image(page, "composite")
    screen_px_per_scan_px = image.shape[1] / COLS
    length_mm = float(bar["data-length-mm"])
    assert length_mm == 0.5  # a round length near a quarter of the 3 mm width
    width = int(re.search(r'class="bar" style="width:(\d+)px"', written[0].read_text()).group(1))
    assert width == round(length_mm / (PIXEL_UM / 1000) * screen_px_per_scan_px)
    assert "0.5 mm" in page.plain


def test_unknown_pixel_size_gives_pixel_axes(tmp_path):
    out = xrfnb.write_report(make_maps(pixel_size_um=None), tmp_path / "r.html")
    page = parse(out)
    assert not page.scalebars
    assert "pixel size unknown: axes in pixels" in page.plain
    assert "columns 0 to 29" in page.plain and "rows 0 to 23" in page.plain


def test_single_spectrum_report_lists_the_calls(tmp_path):
    maps = make_maps(element_maps=False)
    one = xrfnb.PigmentMaps(
        classes=CLASSES,
        probability=maps.probability[14:15, 15:16],
        buried_probability=maps.buried_probability[14:15, 15:16],
        ood_score=maps.ood_score[14:15, 15:16],
        thresholds=maps.thresholds,
        ood_threshold=maps.ood_threshold,
        mask=maps.mask[14:15, 15:16],
        colors=COLORS,
        metadata={**maps.metadata, "pixel_size_um": None, "shape": [1, 1]},
    )
    page = parse(xrfnb.write_report(one, tmp_path / "one.html"))
    assert not [i for i in page.images if i.get("class") == "map"]
    text = page.plain
    assert "Pigment identification of panel_A.h5" in text
    # vermilion (buried there) first with its probability, then the absent classes
    assert re.search(r"vermilion 0\.850 0\.680 0\.50 buried only lead white 0\.100 0\.005 0\.50", text)
    assert "in distribution" in text


def test_write_is_atomic_and_leaves_the_maps_file_alone(tmp_path, monkeypatch):
    maps_file = make_maps().to_hdf5(tmp_path / "maps.h5")
    before = (maps_file.read_bytes(), os.stat(maps_file).st_mtime_ns)
    lazy = xrfnb.PigmentMaps.from_hdf5(maps_file, lazy=True)
    out = tmp_path / "report.html"
    xrfnb.write_report(lazy, out)
    assert (maps_file.read_bytes(), os.stat(maps_file).st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.h5", "report.html"]
    first = out.read_bytes()
    assert "maps.h5" in parse(out).plain  # the maps file is named in the provenance

    def broken(*args, **kwargs):
        raise xrfnb.DataError("boom")

    monkeypatch.setattr(report, "render_report_html", broken)
    with pytest.raises(xrfnb.DataError, match="boom"):
        xrfnb.write_report(lazy, out)
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.h5", "report.html"]


def test_bad_paths_and_mismatched_scan_are_clear_errors(tmp_path):
    maps = make_maps()
    with pytest.raises(xrfnb.FormatError, match=r"\.html or \.pdf"):
        xrfnb.write_report(maps, tmp_path / "report.txt")
    with pytest.raises(xrfnb.FormatError, match="does not exist"):
        xrfnb.write_report(maps, tmp_path / "missing" / "report.html")
    small = xrfnb.Scan(np.ones((2, 2, 8)), CAL)
    with pytest.raises(xrfnb.DataError, match="give the scan the maps were made from"):
        xrfnb.write_report(maps, tmp_path / "report.html", scan=small)
    assert list(tmp_path.iterdir()) == []


def test_pdf_without_chromium_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "find_chromium", lambda: None)
    with pytest.raises(xrfnb.XRFNBError, match=r"PDF report needs Chromium.*\.html"):
        xrfnb.write_report(make_maps(), tmp_path / "report.pdf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.browser
def test_pdf_with_chromium(tmp_path):
    if report.find_chromium() is None:
        pytest.skip("Chromium is not installed: PDF reports need it")
    out = xrfnb.write_report(make_maps(), tmp_path / "report.pdf", scan=make_scan())
    data = out.read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(data) > 20_000  # text and a dozen embedded images, not an empty page
    pages = len(re.findall(rb"/Type\s*/Page\b", data))
    assert pages >= 2, pages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.pdf"]


# -- command line ----------------------------------------------------------------------------------
def test_cli_report_round_trip(tmp_path, capsys):
    maps_file = make_maps().to_hdf5(tmp_path / "maps.h5")
    scan_file = xrfnb.save(make_scan(), tmp_path / "scan.h5")
    out = tmp_path / "report.html"
    argv = ["report", str(maps_file), "-o", str(out), "--scan", str(scan_file), "--title", "Panel A, verso"]
    assert cli.main([*argv, "--instrument", "bruker-m6"]) == 0
    text = parse(out).plain
    assert text.startswith("Panel A, verso")
    assert "scan.h5" in text and "24 x 30 pixels x 64 channels" in text and "0.05 s per pixel" in text
    assert str(CAL) in text and "bruker-m6" in text
    assert f"wrote {out}" in capsys.readouterr().err

    assert cli.main(["report", str(maps_file), "-o", str(tmp_path / "report.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xrfnb: error:") and ".html" in err and "\n" not in err
    assert cli.main(["report", str(tmp_path / "none.h5"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_identify_writes_the_report(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_mapping import CAL as MAP_CAL
    from test_mapping import LinearTestModel, make_counts

    monkeypatch.setattr(cli, "_load_model", lambda name, precision="auto": LinearTestModel())
    counts, truth = make_counts(12, 10)
    src = xrfnb.save(xrfnb.Scan(counts, MAP_CAL, pixel_size_um=50.0, live_time_s=0.02), tmp_path / "scan.h5")
    out, rep = tmp_path / "maps.h5", tmp_path / "report.html"
    assert cli.main(["identify", str(src), "-o", str(out), "-q", "--report", str(rep)]) == 0
    page = parse(rep)
    assert "linear-test-double" in page.plain and "50 µm" in page.plain
    present = {c for c, k in zip(LinearTestModel().classes, range(3), strict=True) if truth[..., k].any()}
    assert set(page.legend_classes["composite"]) == present
    capsys.readouterr()
    # a report that cannot be written is refused before the scan is mapped
    assert cli.main(["identify", str(src), "-o", str(tmp_path / "m2.h5"), "-q", "--report", "r.doc"]) == 2
    assert "should end in .html" in capsys.readouterr().err
    assert not (tmp_path / "m2.h5").exists()


def test_stray_buried_pixels_are_named_not_mapped(tmp_path):
    maps = make_maps(element_maps=False)
    buried = maps.buried_probability.copy()
    buried[2:5, 3, 0] = 0.9 * maps.probability[2:5, 3, 0]  # lead white buried on 3 pixels only
    stray = xrfnb.PigmentMaps(
        **{**{f: getattr(maps, f) for f in maps.__dataclass_fields__}, "buried_probability": buried}
    )
    page = parse(xrfnb.write_report(stray, tmp_path / "r.html"))
    assert "buried:lead white" not in page.figures and "buried:vermilion" in page.figures
    assert "Buried only on fewer than 5 pixels each" in page.plain and "lead white (3)" in page.plain
