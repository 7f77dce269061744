"""HTML and PNG building blocks of the report (:mod:`xrfnb.ui.report`): maps as PNG ``data:`` URIs, colour
tables, colour bars, legends, scale bars, figures and tables, with the colours the dashboard uses too.

Everything here returns a string of HTML (or PNG bytes); nothing is fetched or written.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import struct
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from .._errors import DataError

__all__ = [
    "ABSENT_COLOR",
    "INVALID_COLOR",
    "NONE_PRESENT_COLOR",
    "OOD_COLOR",
    "SURFACE_BURIED_COLORS",
    "Geometry",
    "Row",
    "categorical",
    "color_table",
    "colorbar",
    "colorize",
    "data_uri",
    "encode_png",
    "esc",
    "figure",
    "hex_rgb",
    "img_tag",
    "legend_html",
    "nice_length",
    "num",
    "percent",
    "scale_bar",
    "swatch",
    "table",
    "tick",
]


#: colour of invalid (masked) pixels, in the report and the dashboard
INVALID_COLOR = "#808080"
#: colour of pixels below a pigment's threshold
ABSENT_COLOR = "#e6e6e6"
#: colour of pixels where no class is present (the composite map)
NONE_PRESENT_COLOR = "#000000"
#: colours of the surface-vs-buried categories: absent, surface, buried only
SURFACE_BURIED_COLORS = ("#f2f2f2", "#d95f02", "#1b9e77")
#: colour of the out-of-distribution warning
OOD_COLOR = "#d62728"


# --------------------------------------------------------------------------------------------------
# PNG and colours
# --------------------------------------------------------------------------------------------------
def encode_png(rgb: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """Encode an image as PNG (8-bit RGB, no filter, zlib), with optional ``tEXt`` chunks.

    Parameters
    ----------
    rgb : numpy.ndarray
        Shape (height, width, 3), uint8.
    text : mapping of str to str, optional
        Latin-1 keyword -> value text chunks (``Title``, ``Software`` ...).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DataError(f"an image must have shape (height, width, 3), got {rgb.shape}")
    h, w = rgb.shape[:2]
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # filter byte 0 (none) before every row
    raw[:, 1:] = rgb.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    out = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(
            chunk(b"tEXt", key.encode("latin-1", "replace") + b"\0" + value.encode("latin-1", "replace"))
        )
    out.append(chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)))
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,...`` URI, so the report needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def hex_rgb(color: str) -> tuple[int, int, int]:
    """``"#d95f02"`` -> (217, 95, 2); anything that is not ``#rrggbb`` -> mid grey."""
    c = str(color).lstrip("#")
    if len(c) != 6:
        return (136, 136, 136)
    try:
        return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))
    except ValueError:
        return (136, 136, 136)


def color_table(name: str) -> np.ndarray:
    """256 x 3 uint8 colour table: ``viridis``, ``inferno`` (Bokeh's palettes) or ``greys`` (white->black)."""
    if name == "greys":
        ramp = np.linspace(235, 40, 256).round().astype(np.uint8)
        return np.stack([ramp, ramp, ramp], axis=1)
    from bokeh import palettes

    table = {"viridis": palettes.Viridis256, "inferno": palettes.Inferno256}[name]
    return np.array([hex_rgb(c) for c in table], dtype=np.uint8)


def colorize(values: np.ndarray, lut: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(rows, cols) float -> (rows, cols, 3) uint8 on ``lut`` over ``lo .. hi``; NaN -> invalid grey."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    span = hi - lo if hi > lo else 1.0
    idx = np.clip(np.rint((np.where(finite, values, lo) - lo) / span * (len(lut) - 1)), 0, len(lut) - 1)
    rgb = lut[idx.astype(np.intp)]
    rgb[~finite] = hex_rgb(INVALID_COLOR)
    return rgb


def categorical(cat: np.ndarray, colors: Sequence[str]) -> np.ndarray:
    """(rows, cols) int categories (-1 = invalid) -> (rows, cols, 3) uint8 in ``colors``."""
    palette = np.array([hex_rgb(c) for c in (*colors, INVALID_COLOR)], dtype=np.uint8)
    return palette[np.where(cat < 0, len(colors), cat)]


# --------------------------------------------------------------------------------------------------
# geometry: display size, scale bar, pixel axes
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a (rows, cols) map is shown: every ``step``-th pixel, each as ``up`` x ``up`` screen pixels."""

    rows: int
    cols: int
    step: int
    up: int
    pixel_size_um: float | None

    @classmethod
    def fit(cls, rows: int, cols: int, target_px: int, pixel_size_um: float | None) -> Geometry:
        n = max(rows, cols)
        if n <= target_px:
            return cls(rows, cols, 1, max(1, target_px // n), pixel_size_um)
        return cls(rows, cols, math.ceil(n / target_px), 1, pixel_size_um)

    @property
    def width_px(self) -> int:
        return math.ceil(self.cols / self.step) * self.up

    @property
    def height_px(self) -> int:
        return math.ceil(self.rows / self.step) * self.up

    @property
    def screen_px_per_pixel(self) -> float:
        return self.up / self.step

    def image(self, rgb: np.ndarray) -> np.ndarray:
        sub = np.asarray(rgb)[:: self.step, :: self.step]
        if self.up > 1:
            sub = np.repeat(np.repeat(sub, self.up, axis=0), self.up, axis=1)
        return sub


def nice_length(target: float) -> float:
    """The 1, 2 or 5 x 10^k nearest below ``target`` (> 0)."""
    k = math.floor(math.log10(target))
    for m in (5.0, 2.0, 1.0):
        if m * 10**k <= target:
            return m * 10**k
    return 10.0**k


def scale_bar(geom: Geometry) -> str:
    """A scale bar in mm under the map (pixel size known), else a line saying the axes are pixels."""
    if geom.pixel_size_um:
        mm_per_px = geom.pixel_size_um / 1000.0
        width_mm = geom.cols * mm_per_px
        length_mm = nice_length(0.25 * width_mm)
        bar_px = round(length_mm / mm_per_px * geom.screen_px_per_pixel)
        extent = (
            f"{num(width_mm)} x {num(geom.rows * mm_per_px)} mm "
            f"({geom.cols} x {geom.rows} pixels of {num(geom.pixel_size_um)} µm)"
        )
        return (
            f'<div class="scalebar" data-length-mm="{length_mm:g}" data-bar-px="{bar_px}">'
            f'<span class="bar" style="width:{bar_px}px"></span><span>{length_mm:g} mm</span></div>'
            f'<div class="extent">{esc(extent)}</div>'
        )
    return (
        f'<div class="extent">pixel size unknown: axes in pixels (columns 0 to {geom.cols - 1} left to '
        f"right, rows 0 to {geom.rows - 1} top to bottom)</div>"
    )


def num(x: float) -> str:
    """A number for the text: three significant digits, whole numbers from 100 up."""
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def esc(text: object) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal (``"< 0.1 %"`` for tiny non-zero ones)."""
    pct = 100.0 * float(fraction)
    if pct == 0:
        return "0 %"
    return f"{pct:.1f} %" if pct >= 0.1 else "< 0.1 %"


# --------------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------------
def img_tag(rgb: np.ndarray, alt: str, kind: str, width: int, height: int) -> str:
    """An ``<img>`` of an (rows, cols, 3) uint8 image as an inline PNG, ``width`` x ``height`` CSS px."""
    png = encode_png(rgb, {"Title": alt, "Software": "xrfnb"})
    return f'<img class="{kind}" src="{data_uri(png)}" width="{width}" height="{height}" alt="{esc(alt)}">'


def tick(value: float, fmt: str) -> str:
    """A colour-bar tick: ``fmt``, but counts of 1000 and more as whole numbers (1030, not 1.03e+03)."""
    return f"{value:.0f}" if abs(value) >= 1000 else fmt.format(value)


def colorbar(lut: np.ndarray, lo: float, hi: float, label: str, fmt: str = "{:.2f}") -> str:
    """A horizontal colour bar of ``lut`` from ``lo`` to ``hi`` with three ticks and a label."""
    width, height = 200, 12
    idx = np.linspace(0, len(lut) - 1, width).round().astype(np.intp)
    strip = np.repeat(lut[idx][None, :, :], height, axis=0)
    mid = 0.5 * (lo + hi)
    ticks = "".join(f"<span>{esc(tick(v, fmt))}</span>" for v in (lo, mid, hi))
    return (
        f'<div class="cbar">{img_tag(strip, label, "cbar-strip", width, height)}'
        f'<div class="ticks">{ticks}</div><div class="label">{esc(label)}</div></div>'
    )


def legend_html(entries: Sequence[tuple[str, str, str]]) -> str:
    """``(colour or '', text, data-class or '')`` -> a legend list."""
    items = []
    for color, text, cls in entries:
        sw = f'<span class="sw" style="background:{esc(color)}"></span>' if color else ""
        data = f' data-class="{esc(cls)}"' if cls else ""
        items.append(f"<li{data}>{sw}{esc(text)}</li>")
    return f'<ul class="legend">{"".join(items)}</ul>'


def figure(
    rgb: np.ndarray,
    geom: Geometry,
    *,
    title: str,
    map_id: str,
    side: str,
    note: str = "",
    narrow: bool = False,
) -> str:
    """A map as an HTML ``<figure>``: the image, its scale bar or pixel axes, a title, a side panel
    (legend or colour bar) and an optional note."""
    img = img_tag(geom.image(rgb), title, "map", geom.width_px, geom.height_px)
    if geom.pixel_size_um:
        box = f'<div class="map-box">{img}{scale_bar(geom)}</div>'
    else:
        axes = (
            f'<span class="ax x0">0</span><span class="ax x1">{geom.cols}</span>'
            f'<span class="ax y0">0</span><span class="ax y1">{geom.rows}</span>'
        )
        box = f'<div class="map-box pixel-axes">{axes}{img}</div>{scale_bar(geom)}'
        box = f"<div>{box}</div>"
    shown = ""
    if geom.step > 1:
        shown = f" Shown at 1/{geom.step} of the scan's resolution (every {geom.step}th pixel)."
    note_html = f'<p class="note">{esc(note)}{esc(shown)}</p>' if note or shown else ""
    cls = "map narrow" if narrow else "map"
    return (
        f'<figure class="{cls}" data-map="{esc(map_id)}"><div class="map-title">{esc(title)}</div>'
        f'<div class="map-row">{box}<div class="map-side">{side}</div></div>{note_html}</figure>'
    )


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], num_cols: Sequence[int] = (), **attrs: str
) -> str:
    """An HTML table; cells are HTML already (escape text before); ``num_cols`` are right-aligned."""
    def cell(tag: str, i: int, content: str) -> str:
        cls = ' class="num"' if i in num_cols else ""
        return f"<{tag}{cls}>{content}</{tag}>"

    extra = "".join(f' {k.rstrip("_")}="{esc(v)}"' for k, v in attrs.items())
    head = "<tr>" + "".join(cell("th", i, esc(h)) for i, h in enumerate(header)) + "</tr>"
    body = []
    for row in rows:
        row_cls = ""
        if isinstance(row, Row):
            row_cls = f' class="{row.cls}"' if row.cls else ""
            row = row.cells
        body.append(f"<tr{row_cls}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
    return f"<table{extra}><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row (cells are HTML) with a CSS class, e.g. ``"changed"`` for a threshold the user moved."""

    cells: Sequence[str]
    cls: str = ""


def swatch(color: str) -> str:
    """A small square of ``color`` for tables and legends."""
    return f'<span class="sw" style="background:{esc(color)}"></span>'
