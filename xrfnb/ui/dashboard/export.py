"""The dashboard's exports: the main map as a PNG figure, the maps as TIFF or HDF5, the shown spectrum
and the kept regions' spectra as CSV and the report for the conservation file, each a download button."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import tempfile
import textwrap
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import panel as pn
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..._errors import DataError, XRFNBError
from ..report import write_report
from ..report_html import nice_length
from .common import (
    ABSENT_COLOR,
    INVALID_COLOR,
    PALETTES,
    SURFACE_BURIED_COLORS,
    colorize,
    hex_rgb,
    micro,
    palette_lut,
    pigment_clim,
)

if TYPE_CHECKING:  # pragma: no cover
    from ...maps.pigmentmaps import PigmentMaps
    from .app import Dashboard

__all__ = ["ExportPanel", "figure_png"]

log = logging.getLogger(__name__)


def figure_png(
    rgba: np.ndarray,
    *,
    title: str,
    legend: Sequence[tuple[str, str]],
    colorbar: tuple[Sequence[str], float, float, str] | None,
    mm_per_px: float | None,
    source: str,
) -> bytes:
    """A map figure as PNG bytes: title above, map, scale bar on the map, legend or colour bar right.

    Parameters
    ----------
    rgba : numpy.ndarray
        The map, (rows, cols, 4) uint8.
    title : str
        Title (wrapped to the figure's width).
    legend : sequence of (colour, text)
        Legend entries ('' colour: text only).
    colorbar : (palette, low, high, label) or None
        A colour bar for continuous maps.
    mm_per_px : float or None
        Pixel size in mm (a scale bar is drawn), or None.
    source : str
        The scan's name, stored in the PNG's ``Source`` text chunk.
    """
    rows, cols = rgba.shape[:2]
    up = max(1, math.ceil(480 / max(rows, cols)))
    if max(rows, cols) * up > 2048:
        up = 1
    map_img = Image.fromarray(np.repeat(np.repeat(rgba, up, axis=0), up, axis=1), "RGBA")
    mw, mh = map_img.size
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    margin = 16
    side = 300 if legend or colorbar else 0
    width = margin + mw + (margin + side if side else 0) + margin
    title_lines = textwrap.wrap(title, max(20, int(width / 8.5))) or [""]
    top = margin + 20 * len(title_lines) + 8
    legend_h = sum(18 * len(textwrap.wrap(t, 36) or [""]) + 4 for _, t in legend)
    height = max(top + mh + margin + 28, top + legend_h + margin + (mh if colorbar else 0))
    fig = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(fig)
    for i, line in enumerate(title_lines):
        draw.text((margin, margin + 20 * i), line, fill=(0, 0, 0), font=font)
    fig.alpha_composite(map_img, (margin, top))
    draw.rectangle((margin - 1, top - 1, margin + mw, top + mh), outline=(90, 90, 90))
    scale_text = ""
    if mm_per_px:
        length_mm = nice_length(0.25 * cols * mm_per_px)
        bar_px = round(length_mm / mm_per_px * up)
        scale_text = f"{length_mm:g} mm"
        x0, y0 = margin, top + mh + 10  # below the map: no scan pixel is covered
        draw.rectangle((x0, y0, x0 + bar_px, y0 + 5), fill=(0, 0, 0))
        draw.text((x0 + bar_px + 8, y0 - 5), scale_text, fill=(0, 0, 0), font=small)
    x = margin + mw + margin
    if colorbar is not None:
        palette, lo, hi, label = colorbar
        lut = palette_lut(tuple(palette))
        bar_h = max(60, mh - 40)
        idx = np.linspace(len(lut) - 1, 0, bar_h).round().astype(int)
        strip = np.repeat(lut[idx][:, None, :], 22, axis=1)
        fig.paste(Image.fromarray(strip, "RGB"), (x, top))
        draw.rectangle((x - 1, top - 1, x + 22, top + bar_h), outline=(90, 90, 90))
        draw.text((x + 28, top - 2), f"{hi:.3g}", fill=(0, 0, 0), font=small)
        draw.text((x + 28, top + bar_h - 14), f"{lo:.3g}", fill=(0, 0, 0), font=small)
        draw.text((x + 28, top + bar_h // 2 - 7), label, fill=(0, 0, 0), font=small)
        y = top + bar_h + 12
    else:
        y = top
    for color, text in legend:
        tx = x
        if color:
            draw.rectangle((x, y + 2, x + 14, y + 16), fill=hex_rgb(color), outline=(90, 90, 90))
            tx = x + 20
        for line in textwrap.wrap(text, 36) or [""]:
            draw.text((tx, y + 1), line, fill=(0, 0, 0), font=small)
            y += 18
        y += 4
    info = PngInfo()
    info.add_text("Title", title)
    info.add_text(
        "Description", "; ".join(t for _, t in legend) + (f"; scale bar {scale_text}" if scale_text else "")
    )
    info.add_text("Source", source)
    info.add_text("Software", "xrfnb")
    info.add_text("xrfnb:map_box", f"{margin},{top},{mw},{mh}")
    info.add_text("xrfnb:upscale", str(up))
    if scale_text:
        info.add_text("xrfnb:scale_bar", scale_text)
    buf = io.BytesIO()
    fig.convert("RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class ExportPanel(pn.viewable.Viewer):
    """The export buttons of a :class:`~xrfnb.ui.dashboard.Dashboard` and what they write.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose maps, scan and selection are exported.
    """

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self._dash = dash
        self.png = pn.widgets.FileDownload(
            callback=self._guard(self.export_png), filename="map.png", label="Map as PNG", width=135
        )
        self.tiff = pn.widgets.FileDownload(
            callback=self._guard(self.export_tiff),
            filename="pigment_maps_tiff.zip",
            label="Maps as TIFF",
            width=135,
        )
        self.hdf5 = pn.widgets.FileDownload(
            callback=self._guard(self.export_hdf5),
            filename="pigment_maps.h5",
            label="Maps as HDF5",
            width=135,
        )
        self.csv = pn.widgets.FileDownload(
            callback=self._guard(self.export_spectrum_csv),
            filename="spectrum.csv",
            label="Spectrum as CSV",
            width=135,
        )
        self.regions_csv = pn.widgets.FileDownload(
            callback=self._guard(self.export_regions_csv),
            filename="region_spectra.csv",
            label="Regions as CSV",
            width=135,
            css_classes=["xrfnb-regions-csv"],
        )
        self.report = pn.widgets.FileDownload(
            callback=self._guard(self.export_report),
            filename="pigment_report.html",
            label="Report (HTML)",
            width=135,
            css_classes=["xrfnb-report"],
        )
        #: the map exports, hidden for a single spectrum
        self.map_row = pn.Row(self.png, self.tiff)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.map_row, pn.Row(self.hdf5, self.csv), pn.Row(self.report, self.regions_csv))

    def _guard(self, fn: Callable[[], bytes]) -> Callable[[], io.BytesIO | None]:
        def callback() -> io.BytesIO | None:
            try:
                return io.BytesIO(fn())
            except XRFNBError as exc:
                self._dash.notify(str(exc), "error")
            except Exception as exc:
                log.exception("export failed")
                self._dash.notify(f"export failed ({type(exc).__name__}: {exc})", "error")
            return None

        return callback

    # -- the main map -----------------------------------------------------------------------------
    def map_rgba(self) -> tuple[np.ndarray, tuple[tuple[str, ...], float, float, str] | None]:
        """The main map as drawn and its colour bar.

        Returns RGBA (rows, cols, 4) uint8 (invalid pixels dark grey, values below the colour range in
        the 'absent' light grey) and ``(palette, low, high, label)``, or None for categorical and
        composite maps (they have a legend instead).
        """
        d = self._dash
        maps_view = d.map_panel
        kind, arr = maps_view.main_array()
        if kind == "rgb":
            rgba = np.concatenate([arr, np.full((*arr.shape[:2], 1), 255, np.uint8)], axis=-1)
            return rgba, None
        if d.view == "Surface vs buried":
            rgba = colorize(arr, SURFACE_BURIED_COLORS, 0.0, 2.0)
            rgba[rgba[..., 3] == 0] = (*hex_rgb(INVALID_COLOR), 255)
            return rgba, None
        finite = arr[np.isfinite(arr)]
        if d.view == "Pigment":
            lo, hi = pigment_clim(d.thresholds[d.focus])
        elif d.view == "OOD score":
            lo, hi = maps_view.ood_clim(arr)
        else:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        palette = PALETTES[d.cmap]
        rgba = colorize(arr, palette, lo, hi, below=ABSENT_COLOR)
        rgba[rgba[..., 3] == 0] = (*hex_rgb(INVALID_COLOR), 255)  # invalid pixels, as on screen
        return rgba, (palette, lo, hi, maps_view.colorbar_label())

    def export_png(self) -> bytes:
        """The main map as a PNG figure for a report: title, the map (small maps upscaled), its legend
        or colour bar, and a scale bar when the pixel size is known.

        The PNG's text chunks hold ``Title``, ``Description`` (the legend), ``Source`` (the scan) and
        ``xrfnb:map_box`` ("left,top,width,height" of the map in the image, pixels) with
        ``xrfnb:upscale`` (image pixels per scan pixel).
        """
        d = self._dash
        rgba, colorbar = self.map_rgba()
        mm, axes = d.map_scale()
        return figure_png(
            rgba,
            title=f"{d.map_panel.main_title()}: {d.label}",
            legend=d.map_panel.legend_entries(),
            colorbar=colorbar,
            mm_per_px=mm if axes[0].endswith("(mm)") else None,
            source=d.label,
        )

    # -- the maps ---------------------------------------------------------------------------------
    def _require_maps(self) -> PigmentMaps:
        maps = self._dash.maps
        if maps is None:
            raise DataError("no pigment maps to export: open a scan with a trained model first")
        return maps

    def with_current_thresholds(self, maps: PigmentMaps) -> PigmentMaps:
        """``maps`` with the session's thresholds instead of the model's."""
        return dataclasses.replace(maps, thresholds=self._dash.threshold_array().astype(np.float32))

    def export_hdf5(self) -> bytes:
        """The pigment maps (with the current thresholds) as HDF5 bytes (``PigmentMaps.to_hdf5``)."""
        maps = self.with_current_thresholds(self._require_maps())
        with tempfile.TemporaryDirectory(prefix="xrfnb-export-") as tmp:
            path = Path(tmp) / "pigment_maps.h5"
            maps.to_hdf5(path)
            return path.read_bytes()

    def export_tiff(self) -> bytes:
        """The pigment maps as TIFF files (``PigmentMaps.to_tiff``) in a zip archive."""
        maps = self.with_current_thresholds(self._require_maps())
        with tempfile.TemporaryDirectory(prefix="xrfnb-export-") as tmp:
            folder = Path(tmp) / "tiff"
            folder.mkdir()
            maps.to_tiff(folder)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(folder).as_posix())
            return buf.getvalue()

    def export_report(self) -> bytes:
        """The report for the conservation file (:func:`xrfnb.write_report`) as self-contained HTML bytes:
        the maps with the session's current thresholds, the open scan's provenance and the instrument
        the session simulates and fits with (the scan's, else the default preset)."""
        d = self._dash
        maps = self._require_maps()
        with tempfile.TemporaryDirectory(prefix="xrfnb-export-") as tmp:
            path = Path(tmp) / "pigment_report.html"
            write_report(
                maps,
                path,
                scan=d.scan,
                title=f"Pigment maps of {d.label}",
                thresholds=dict(d.thresholds),
                instrument=d.spectrum_panel.instrument(),
            )
            return path.read_bytes()

    # -- the spectrum -----------------------------------------------------------------------------
    def export_spectrum_csv(self) -> bytes:
        """The shown spectrum (pixel or region mean) as CSV: energy_keV, counts."""
        d = self._dash
        label, energy, counts = d.current_spectrum()
        buf = io.StringIO()
        buf.write(f"# xrfnb spectrum of {label} from {d.label}\n")
        buf.write("energy_keV,counts\n")
        for e, c in zip(energy, counts, strict=True):
            buf.write(f"{e:.6f},{c:.6g}\n")
        return buf.getvalue().encode()

    def export_regions_csv(self) -> bytes:
        """The kept regions' spectra as one CSV: a column ``energy_keV`` and one per region (its mean
        counts per pixel, or its summed counts, as the dashboard shows them), under ``#`` lines naming
        the scan, what the values are and each region's pixel count, bounds and colour."""
        d = self._dash
        if d.scan is None or not d.kept_regions:
            raise DataError("no region kept: select one on the map (box or lasso) and keep it first")
        energy, spectra = d.region_panel.spectra()
        rows, cols = d.scan.shape[:2]
        mm, axes = d.map_scale()
        mm_per_px = mm if axes[0].endswith("(mm)") else None
        scan_text = f"{d.label} ({rows} x {cols} pixels"
        scan_text += micro(f", pixel {float(d.scan.pixel_size_um):g} um)") if d.scan.pixel_size_um else ")"
        mean = d.region_stat == "mean"
        buf = io.StringIO()
        buf.write(f"# xrfnb region spectra of {scan_text}\n")
        values = "mean counts per pixel" if mean else "summed counts"
        buf.write(f"# values: {values} over each region's pixels\n")
        buf.write("# rows and columns count from 0 at the top left; bounds are inclusive\n")
        for kept, _ in spectra:
            buf.write(f"# {micro(kept.describe(mm_per_px))}, colour {kept.color}\n")
        writer = csv.writer(buf, lineterminator="\n")
        stat = "mean" if mean else "sum"
        writer.writerow(["energy_keV", *(f"{k.name} {stat} ({k.n_pixels} px)" for k, _ in spectra)])
        for i, e in enumerate(energy):
            writer.writerow([f"{e:.6f}", *(f"{counts[i]:.6g}" for _, counts in spectra)])
        return buf.getvalue().encode()
