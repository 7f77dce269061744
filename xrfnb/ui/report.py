"""A one-file report of pigment maps for the conservation file: HTML, or PDF printed by Chromium.

The HTML is self-contained: styles inline, every image a PNG in a ``data:`` URI, no script, no font or
anything else fetched from elsewhere, so it opens offline and on museum networks that block the internet,
and can be archived as one file. The PNGs are written here with :mod:`zlib` and :mod:`struct` (no imaging
library); titles, legends, colour-bar ticks and scale bars are HTML around the images.

A PDF is the same HTML printed by headless Chromium (the only renderer on the project machines that lays
out HTML faithfully); without Chromium a PDF request is a clear error and the HTML is the way.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._errors import CalibrationError, DataError, FormatError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.calls import is_buried, is_present
from ..core.spectrum import Scan, Spectrum
from ..io.atomic import atomic_path
from ..maps.pigmentmaps import MASK_REASONS, MapSummary, PigmentMaps
from ..physics.instrument import Instrument, instruments
from .report_html import (
    ABSENT_COLOR,
    INVALID_COLOR,
    NONE_PRESENT_COLOR,
    OOD_COLOR,
    SURFACE_BURIED_COLORS,
    Geometry,
    Row,
    categorical,
    color_table,
    colorbar,
    colorize,
    esc,
    figure,
    hex_rgb,
    legend_html,
    num,
    percent,
    swatch,
    table,
    tick,
)

__all__ = ["find_chromium", "write_report"]

#: largest side of a map in the report, CSS pixels (two per-class maps side by side fit an A4 page)
_CLASS_PX = 300
_COMPOSITE_PX = 420
_PDF_TIMEOUT_S = 180.0
#: a class gets its own surface-vs-buried map when buried only on at least this many pixels (and share)
_MIN_BURIED_PX = 5
_MIN_BURIED_SHARE = 0.002

_CSS = """
@page { size: A4; margin: 12mm; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; box-sizing: border-box; }
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, Helvetica, sans-serif; font-size: 13px;
  color: #1a1a1a; max-width: 720px; margin: 16px auto; line-height: 1.4; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 17px; border-bottom: 1px solid #999; margin: 26px 0 8px 0; padding-bottom: 2px;
  break-after: avoid; page-break-after: avoid; }
h3 { font-size: 14px; margin: 0 0 4px 0; }
p { margin: 4px 0 8px 0; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 4px 0 8px 0; }
th, td { padding: 2px 7px; text-align: left; vertical-align: top; border-bottom: 1px solid #ddd; }
th { background: #f2f2f2; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.prov th { background: none; width: 175px; font-weight: 600; }
tr.changed td { font-weight: 700; }
table.thresholds { font-size: 12px; }
table.thresholds td, table.thresholds th { padding: 1px 5px; }
tr.present td { font-weight: 600; }
.warning { border: 2px solid #c0392b; background: #fdecea; padding: 8px 12px; margin: 10px 0;
  font-weight: 600; }
.notice { border: 1px solid #b9770e; background: #fef5e7; padding: 6px 12px; margin: 10px 0; }
.sw { display: inline-block; width: 13px; height: 13px; border: 1px solid #555; vertical-align: -2px;
  margin-right: 6px; }
.grid { display: flex; flex-wrap: wrap; gap: 16px 18px; }
.two-tables { display: flex; flex-wrap: wrap; gap: 0 18px; align-items: flex-start; }
figure.map { margin: 0 0 10px 0; break-inside: avoid; page-break-inside: avoid; }
figure.map.narrow { width: 332px; }
.map-title { font-weight: 700; margin-bottom: 4px; }
.map-row { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: flex-start; }
.map-box { position: relative; }
.map-box.pixel-axes { padding: 14px 0 0 30px; }
img.map { display: block; border: 1px solid #555; image-rendering: pixelated; max-width: none; }
.ax { position: absolute; font-size: 10px; color: #444; }
.ax.x0 { top: 0; left: 30px; } .ax.x1 { top: 0; right: 0; }
.ax.y0 { top: 14px; left: 0; } .ax.y1 { bottom: 0; left: 0; }
.scalebar { margin-top: 5px; font-size: 11px; display: flex; align-items: center; gap: 6px; }
.scalebar .bar { display: inline-block; height: 5px; background: #000; }
.extent { font-size: 11px; color: #555; }
ul.legend { list-style: none; padding: 0; margin: 0; font-size: 12px; max-width: 260px; }
ul.legend li { margin: 2px 0; }
.cbar { font-size: 11px; width: 200px; margin-bottom: 6px; }
.cbar img { display: block; border: 1px solid #555; }
.cbar .ticks { display: flex; justify-content: space-between; }
.cbar .label { color: #333; }
.note { font-size: 11px; color: #444; max-width: 700px; }
pre.desc { white-space: pre-wrap; font-family: inherit; margin: 0; }
"""


# --------------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------------
def _source_name(source: str) -> str:
    s = str(source)
    return Path(s).name if ("/" in s or os.sep in s) else s


def _calibration(maps: PigmentMaps, scan: Scan | None) -> EnergyCalibration | None:
    if scan is not None:
        return scan.calibration
    d = maps.metadata.get("calibration")
    if isinstance(d, Mapping):
        with contextlib.suppress(CalibrationError, TypeError, ValueError):
            return EnergyCalibration.from_dict(d)
    return None


def _live_time_text(lt: float | np.ndarray | None) -> str:
    if lt is None:
        return "unknown"
    arr = np.asarray(lt, dtype=float)
    if arr.ndim == 0:
        return f"{float(arr):.4g} s per pixel"
    return f"{arr.mean():.4g} s per pixel (mean; {arr.min():.4g} to {arr.max():.4g} s)"


def _detectors_text(meta: Mapping[str, Any]) -> str | None:
    note = meta.get("sum_note")
    if note:
        return str(note)
    n = int(meta.get("n_elements", 1) or 1)
    if n <= 1:
        return None
    if meta.get("element") == "sum":
        return f"{n} detector elements, summed (each rebinned onto element 0's energy axis)"
    return f"{n} detector elements; element {meta.get('element')} only"


def _instrument_info(
    instrument: Instrument | str | None, scan_meta: Mapping[str, Any], maps: PigmentMaps
) -> tuple[str, str]:
    """(name, description) of the instrument: given, or named by the scan; '' when unknown."""
    if instrument is None:
        instrument = scan_meta.get("instrument") or maps.metadata.get("instrument")
    if instrument is None or instrument == "":
        return "", ""
    if isinstance(instrument, str):

        if instrument.strip().lower() in instruments():
            instrument = Instrument.preset(instrument)
        else:
            return instrument, ""
    return str(getattr(instrument, "name", instrument)), str(getattr(instrument, "description", "") or "")


def _provenance(
    maps: PigmentMaps, scan: Scan | None, instrument: Instrument | str | None, summary: MapSummary
) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows (label, HTML) of the provenance table, and notices to show above it."""
    meta: Mapping[str, Any] = dict(getattr(scan, "metadata", {}) or {}) if scan is not None else {}
    mm = maps.metadata
    rows: list[tuple[str, str]] = []
    notices: list[str] = []
    source = str(meta.get("source") or mm.get("source") or "")
    if source:
        name = _source_name(source)
        full = f'<br><span class="meta">{esc(source)}</span>' if name != source else ""
        rows.append(("Scan", f"{esc(name)}{full}"))
    else:
        rows.append(("Scan", "not recorded"))
    maps_source = str(mm.get("source") or "")
    if scan is not None and maps_source and meta.get("source") and maps_source != str(meta.get("source")):
        notices.append(
            f"The maps were made from {maps_source}, but the scan given for this report is "
            f"{meta.get('source')}: check that they belong together."
        )
    if mm.get("file"):
        rows.append(("Pigment-maps file", esc(mm["file"])))
    if meta.get("simulated"):
        rows.append(
            (
                "Measurement",
                "<b>simulated</b> (a synthetic scan from xrfnb's physics simulator, "
                "not a measurement of a painting)",
            )
        )
        notices.append("This scan is simulated (xrfnb's physics simulator), not a measurement.")
    if scan is not None:
        fmt = meta.get("format") or (
            "none (simulated in memory)" if meta.get("simulated") else "not recorded"
        )
        rows.append(("Format", esc(fmt)))
    else:
        rows.append(("Format", "not recorded in the maps (give the scan for its format and live time)"))
    r, c = maps.shape
    shape = f"{r} x {c} pixels"
    if scan is not None:
        shape += f" x {scan.counts.shape[-1]} channels"
    rows.append(("Shape", esc(shape)))
    px = _pixel_size(maps, scan)
    if px:
        rows.append(
            ("Pixel size", esc(f"{num(px)} µm (scan area {num(c * px / 1000)} x {num(r * px / 1000)} mm)"))
        )
    else:
        rows.append(("Pixel size", "unknown (maps in pixels, no scale bar)"))
    if scan is not None:
        rows.append(("Live time", esc(_live_time_text(scan.live_time_s))))
    cal = _calibration(maps, scan)
    if cal is not None:
        text = str(cal)
        if scan is not None:
            e = cal.energies_keV(int(scan.counts.shape[-1]))
            text += f" (channels cover {e[0]:.2f} to {e[-1]:.2f} keV)"
        rows.append(("Energy calibration", esc(text)))
    det = _detectors_text(meta) or _detectors_text(mm)
    if det:
        rows.append(("Detectors", esc(det)))
    name, desc = _instrument_info(instrument, meta, maps)
    if name:
        desc = re.sub(r"(\d) um\b", "\\1 µm", desc)  # presets write um for micrometres
        body = esc(name) + (f'<br><pre class="desc">{esc(desc)}</pre>' if desc else "")
        rows.append(("Instrument", body))
    else:
        rows.append(("Instrument", "not given"))
    reasons = ", ".join(f"{v} {k}" for k, v in summary.masked_by_reason.items() if v)
    rows.append(
        (
            "Masked pixels",
            esc(
                f"{summary.n_masked} of {summary.n_pixels}"
                + (f" ({reasons}): not identified" if reasons else "")
            ),
        )
    )
    em = maps.element_maps
    if em is not None:
        fitted = ", ".join(f"{el} {fam}" for el, fam in zip(em.elements, em.families, strict=True))
        rows.append(("Element maps", esc(f"fitted: {fitted}")))
    elif mm.get("element_maps_error"):
        rows.append(("Element maps", esc(f"none: {mm['element_maps_error']}")))
    return rows, notices


def _pixel_size(maps: PigmentMaps, scan: Scan | None) -> float | None:
    px = getattr(scan, "pixel_size_um", None) if scan is not None else None
    if px is None:
        px = maps.metadata.get("pixel_size_um")
    try:
        px = float(px) if px is not None else None
    except (TypeError, ValueError):
        return None
    return px if px is not None and math.isfinite(px) and px > 0 else None


def _model_rows(maps: PigmentMaps, thr: np.ndarray) -> tuple[list[tuple[str, str]], str]:
    mm = maps.metadata
    rows = [
        ("Model", esc(mm.get("model", "not recorded"))),
        ("Arithmetic", esc(mm.get("model_precision", "not recorded"))),
        ("Pigment classes", esc(f"{len(maps.classes)} (ambiguity groups of the pigment library)")),
        (
            "Out-of-distribution threshold",
            esc(f"{maps.ood_threshold:.3g} (pixels scoring above it are unlike the training spectra)"),
        ),
    ]
    changed = _changed(maps, thr)
    if changed:
        parts = ", ".join(f"{maps.classes[k]} {thr[k]:.2f} (model {maps.thresholds[k]:.2f})" for k in changed)
        text = f"{len(changed)} changed from the model's: {parts}; the others are the model's."
    else:
        text = "all the model's (none changed)."
    rows.append(("Decision thresholds", esc(text)))
    return rows, text


def _changed(maps: PigmentMaps, thr: np.ndarray) -> list[int]:
    return [k for k in range(len(maps.classes)) if abs(float(thr[k]) - float(maps.thresholds[k])) > 1e-6]


def _prov_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="prov"><tbody>{body}</tbody></table>'


def _thresholds_tables(maps: PigmentMaps, thr: np.ndarray, present: np.ndarray | None) -> str:
    changed = set(_changed(maps, thr))
    rows = []
    for k, name in enumerate(maps.classes):
        note = f"changed (model {maps.thresholds[k]:.2f})" if k in changed else "model's"
        cls = "changed" if k in changed else ""
        rows.append(Row([swatch(maps.colors[k]) + esc(name), f"{thr[k]:.2f}", esc(note)], cls))
    half = math.ceil(len(rows) / 2) if len(rows) > 12 else len(rows)
    header = ("pigment class", "threshold", "")
    tables = [
        table(header, rows[i : i + half], num_cols=(1,), **{"class_": "thresholds"})
        for i in range(0, len(rows), half)
    ]
    return f'<div class="two-tables">{"".join(tables)}</div>'


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
def _ood_warning(summary: MapSummary) -> str:
    if not summary.n_ood:
        return ""
    n_in = summary.n_valid - summary.n_ood
    extra = " No pixel is in distribution." if n_in == 0 else ""
    return (
        f'<div class="warning" id="ood-warning">Out of distribution: {summary.n_ood} of '
        f"{summary.n_valid} identified pixels ({percent(summary.ood_fraction)}) are unlike the spectra the "
        "model was trained on. Their pigment calls are unreliable: they are left out of the area "
        f"fractions below and shown in a column apart; the OOD map shows where they are.{extra}</div>"
    )


def _summary_section(maps: PigmentMaps, summary: MapSummary, present: np.ndarray) -> str:
    parts = ['<h2 id="summary">Pigments found</h2>', _ood_warning(summary)]
    n_ood = summary.n_ood
    order = sorted(
        range(len(maps.classes)),
        key=lambda k: (
            -summary.area_fraction[maps.classes[k]],
            -summary.ood_area_fraction.get(maps.classes[k], 0),
        ),
    )
    rows = []
    for k in order:
        if not present[k]:
            continue
        name = maps.classes[k]
        cells = [
            swatch(maps.colors[k]) + esc(name),
            percent(summary.area_fraction[name]),
            percent(summary.buried_fraction[name]),
        ]
        if n_ood:
            cells.append(percent(summary.ood_area_fraction.get(name, 0.0)))
        rows.append(cells)
    header = ["pigment class", "area", "buried only"] + (["on OOD pixels (unreliable)"] if n_ood else [])
    n_in = summary.n_valid - n_ood
    parts.append(
        f"<p>Share of the {n_in} identified, in-distribution pixels where each class is called present "
        "(probability at or above its threshold); <i>buried only</i>: present under another layer and not "
        "at the surface. A pixel can hold several classes, so the shares need not add up to 100 %.</p>"
    )
    if rows:
        parts.append(table(header, rows, num_cols=tuple(range(1, len(header))), **{"class_": "summary"}))
    else:
        parts.append("<p><b>No pigment class is above its threshold anywhere.</b></p>")
    absent = [maps.classes[k] for k in range(len(maps.classes)) if not present[k]]
    if absent:
        parts.append(
            f'<p class="note">Not found (no pixel above its threshold): {esc(", ".join(absent))}.</p>'
        )
    reasons = ", ".join(f"{k} {v}" for k, v in summary.masked_by_reason.items())
    parts.append(
        f'<p class="note">Pixels: {summary.n_pixels}; masked {summary.n_masked} ({esc(reasons)}); out of '
        f"distribution {n_ood} ({percent(summary.ood_fraction)} of the identified pixels).</p>"
    )
    return "".join(parts)


def _map_sections(
    maps: PigmentMaps, thr: np.ndarray, summary: MapSummary, present: np.ndarray, px_um: float | None
) -> str:
    rows, cols = maps.shape
    mask = np.asarray(maps.mask[()], dtype=bool)
    binary = maps.binary(thr)
    buried = maps.buried(thr)
    with np.errstate(invalid="ignore"):
        ood = np.asarray(maps.ood_score[()], dtype=np.float64) > float(maps.ood_threshold)
    out: list[str] = []

    # composite
    geom = Geometry.fit(rows, cols, _COMPOSITE_PX, px_um)
    order = [
        k
        for k in sorted(range(len(maps.classes)), key=lambda k: -summary.area_fraction[maps.classes[k]])
        if present[k]
    ]
    entries = []
    for k in order:
        name = maps.classes[k]
        area = summary.area_fraction[name]
        label = f"{name} ({percent(area)})" if area > 0 else f"{name} (only on out-of-distribution pixels)"
        entries.append((maps.colors[k], label, name))
    entries.append((NONE_PRESENT_COLOR, "no pigment above its threshold", ""))
    if len(order) > 1:
        entries.append(("", "pixels holding several pigments show their colours blended", ""))
    if mask.any():
        entries.append((INVALID_COLOR, "invalid pixel (masked, not identified)", ""))
    note = (
        "Each pixel shows the colour of the pigment classes called present there, mixed in proportion "
        "to their probabilities."
    )
    if summary.n_ood:
        note += (
            f" {summary.n_ood} pixels are out of distribution: their colours are unreliable (see the "
            "OOD map)."
        )
    out.append('<h2 id="composite">Composite pigment map</h2>')
    out.append(
        figure(
            maps.composite_rgb(thr),
            geom,
            title="The pigment classes called present, in their colours",
            map_id="composite",
            side=legend_html(entries),
            note=note,
        )
    )

    # one map per present class
    geom = Geometry.fit(rows, cols, _CLASS_PX, px_um)
    viridis = color_table("viridis")
    cards = []
    for k in order:
        name = maps.classes[k]
        p = np.asarray(maps[name], dtype=np.float64)
        lo = float(thr[k])
        rgb = colorize(p, viridis, lo, max(1.0, lo + 1e-3))
        with np.errstate(invalid="ignore"):
            rgb[np.isfinite(p) & (p < lo)] = hex_rgb(ABSENT_COLOR)
        rgb[mask] = hex_rgb(INVALID_COLOR)
        legend = [(ABSENT_COLOR, f"below its threshold {lo:.2f}: not called", "")]
        if mask.any():
            legend.append((INVALID_COLOR, "invalid pixel (masked)", ""))
        bar = colorbar(viridis, lo, max(1.0, lo + 1e-3), f"probability that {name} is present")
        side = bar + legend_html(legend)
        area = summary.area_fraction[name]
        n_px = int(np.count_nonzero(binary[..., k] & ~ood))
        if n_px:
            title = f"{name}: {percent(area)} of the area ({n_px} pixel{'s' if n_px != 1 else ''})"
        else:
            title = f"{name}: only on out-of-distribution pixels (unreliable)"
        cards.append(figure(rgb, geom, title=title, map_id=f"class:{name}", side=side, narrow=True))
    if cards:
        out.append('<h2 id="classes">Map of each pigment found</h2>')
        out.append(
            "<p>Probability that the class is present, coloured from its decision threshold up to 1; pale "
            "grey where it is below the threshold (not called).</p>"
        )
        out.append(f'<div class="grid">{"".join(cards)}</div>')

    # surface vs buried
    out.append('<h2 id="buried">Surface vs buried</h2>')
    any_present = binary.any(axis=-1)
    any_buried = buried.any(axis=-1)
    cat = np.where(any_buried, 2, np.where(any_present, 1, 0))
    cat[mask] = -1
    absent_c, surface_c, buried_c = SURFACE_BURIED_COLORS
    legend = [
        (surface_c, "pigments at the surface only", ""),
        (buried_c, "a pigment buried under another layer (not at the surface)", ""),
        (absent_c, "no pigment above its threshold", ""),
    ]
    if mask.any():
        legend.append((INVALID_COLOR, "invalid pixel (masked)", ""))
    geom_c = Geometry.fit(rows, cols, _COMPOSITE_PX, px_um)
    n_buried = int(any_buried.sum())
    note = (
        f"{n_buried} pixels hold a pigment more likely below the surface than at it."
        if n_buried
        else "No pigment is found below the surface."
    )
    out.append(
        figure(
            categorical(cat, SURFACE_BURIED_COLORS),
            geom_c,
            title="Surface vs buried: all pigments",
            map_id="surface-buried",
            side=legend_html(legend),
            note=note,
        )
    )
    cards = []
    few: list[str] = []
    min_px = max(_MIN_BURIED_PX, math.ceil(_MIN_BURIED_SHARE * rows * cols))
    for k in order:
        n_k = int(np.count_nonzero(buried[..., k] & ~ood))
        if n_k == 0:
            continue
        if n_k < min_px:  # a few stray pixels: named, not mapped
            few.append(f"{maps.classes[k]} ({n_k})")
            continue
        name = maps.classes[k]
        cat = np.where(buried[..., k], 2, np.where(binary[..., k], 1, 0))
        cat[mask] = -1
        legend = [
            (surface_c, f"{name} at the surface", ""),
            (buried_c, f"{name} buried only (under another layer)", ""),
            (absent_c, f"no {name} (below its threshold {thr[k]:.2f})", ""),
        ]
        title = f"{name}: buried only, {percent(summary.buried_fraction[name])} of the area"
        cards.append(
            figure(
                categorical(cat, SURFACE_BURIED_COLORS),
                geom,
                title=title,
                map_id=f"buried:{name}",
                side=legend_html(legend),
                narrow=True,
            )
        )
    if cards:
        out.append(f'<div class="grid">{"".join(cards)}</div>')
    if few:
        out.append(
            f'<p class="note">Buried only on fewer than {min_px} pixels each (not mapped; in-distribution '
            f"pixels in brackets): {esc(', '.join(few))}.</p>"
        )

    # OOD
    out.append('<h2 id="ood">Out-of-distribution score</h2>')
    score = np.asarray(maps.ood_score[()], dtype=np.float64)
    greys = color_table("greys")
    t = float(maps.ood_threshold)
    rgb = colorize(score, greys, 0.0, t if t > 0 else 1.0)
    with np.errstate(invalid="ignore"):
        flagged = np.isfinite(score) & (score > t)
    rgb[flagged] = hex_rgb(OOD_COLOR)
    legend = [
        (
            OOD_COLOR,
            f"out of distribution (score above {t:.3g}): calls unreliable, "
            f"{summary.n_ood} pixels ({percent(summary.ood_fraction)})",
            "",
        )
    ]
    if mask.any():
        legend.append((INVALID_COLOR, "invalid pixel (masked)", ""))
    side = colorbar(greys, 0.0, t if t > 0 else 1.0, "OOD score (in distribution)", "{:.3g}") + legend_html(
        legend
    )
    out.append(
        figure(
            rgb,
            geom_c,
            title="Out-of-distribution score",
            map_id="ood",
            side=side,
            note="How unlike the model's training spectra each pixel is; red above the model's threshold.",
        )
    )

    # element maps
    em = maps.element_maps
    if em is not None:
        intensity = np.asarray(em.intensity, dtype=np.float64)
        if intensity.shape[:2] == (rows, cols):
            inferno = color_table("inferno")
            cards = []
            for j, (el, fam) in enumerate(zip(em.elements, em.families, strict=True)):
                plane = np.where(mask, np.nan, intensity[..., j])
                finite = plane[np.isfinite(plane)]
                hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
                hi = hi if hi > 0 else 1.0
                rgb = colorize(np.minimum(plane, hi), inferno, 0.0, hi)
                label = f"{el} {fam} fitted counts per pixel (brighter above {tick(hi, '{:.3g}')})"
                side = colorbar(inferno, 0.0, hi, label, "{:.3g}")
                if mask.any():
                    side += legend_html([(INVALID_COLOR, "invalid pixel (masked)", "")])
                cards.append(
                    figure(
                        rgb, geom, title=f"{el} {fam}", map_id=f"element:{el} {fam}", side=side, narrow=True
                    )
                )
            out.append('<h2 id="elements">Element maps</h2>')
            out.append(
                "<p>Counts of each element's line family from the spectrum fit, from 0 to the 99.5th "
                "percentile (the brightest 0.5 % of pixels saturate).</p>"
            )
            out.append(f'<div class="grid">{"".join(cards)}</div>')
    return "".join(out)


def _spectrum_section(maps: PigmentMaps, thr: np.ndarray) -> str:
    """Calls of a single spectrum (1 x 1 maps): a table of classes with probabilities, no maps."""
    p = np.asarray(maps.probability[()], dtype=np.float64).reshape(-1)
    b = np.asarray(maps.buried_probability[()], dtype=np.float64).reshape(-1)
    score = float(np.asarray(maps.ood_score[()], dtype=np.float64).reshape(-1)[0])
    masked = bool(np.asarray(maps.mask[()]).reshape(-1)[0])
    parts = ['<h2 id="calls">Pigment calls</h2>']
    if masked:
        reason = ""
        if maps.mask_reason is not None:

            reason = MASK_REASONS.get(int(np.asarray(maps.mask_reason[()]).reshape(-1)[0]), "")
        parts.append(
            f'<div class="warning">The spectrum is invalid ({esc(reason or "masked")}: all channels zero, '
            "saturated, or NaN/negative counts) and was not identified.</div>"
        )
        return "".join(parts)
    t = float(maps.ood_threshold)
    if score > t:
        parts.append(
            '<div class="warning" id="ood-warning">Out of distribution: this spectrum scores '
            f"{score:.3g}, above the model's threshold {t:.3g}: it is unlike the spectra the model was "
            "trained on, and the calls below are unreliable.</div>"
        )
    else:
        parts.append(f"<p>Out-of-distribution score {score:.3g} (threshold {t:.3g}): in distribution.</p>")
    changed = set(_changed(maps, thr))
    rows = []
    for k in sorted(range(len(maps.classes)), key=lambda k: -p[k]):
        present = bool(is_present(p[k], thr[k]))
        call = ("buried only" if is_buried(p[k], b[k]) else "present") if present else ""
        note = f" (changed; model {maps.thresholds[k]:.2f})" if k in changed else ""
        rows.append(
            Row(
                [
                    swatch(maps.colors[k]) + esc(maps.classes[k]),
                    f"{p[k]:.3f}",
                    f"{b[k]:.3f}",
                    esc(f"{thr[k]:.2f}{note}"),
                    esc(call),
                ],
                "present" if present else "",
            )
        )
    parts.append(
        "<p>Probability that each class is present within the probed depth, the probability that it lies "
        "only below the surface, and the decision threshold: a class is called present at or above it.</p>"
    )
    parts.append(
        table(
            ("pigment class", "probability", "buried only", "threshold", "call"),
            rows,
            num_cols=(1, 2, 3),
            **{"class_": "calls"},
        )
    )
    em = maps.element_maps
    if em is not None:
        inten = np.asarray(em.intensity, dtype=np.float64).reshape(-1, len(em.elements))[0]
        sig = np.asarray(em.sigma, dtype=np.float64).reshape(-1, len(em.elements))[0]
        dl = np.asarray(em.detection_limit, dtype=np.float64).reshape(-1, len(em.elements))[0]
        erows = [
            [esc(f"{el} {fam}"), f"{inten[j]:.0f} ± {sig[j]:.0f}", f"{dl[j]:.0f}"]
            for j, (el, fam) in enumerate(zip(em.elements, em.families, strict=True))
        ]
        parts.append('<h2 id="elements">Element fit</h2>')
        parts.append(table(("line family", "fitted counts", "detection limit"), erows, num_cols=(1, 2)))
    return "".join(parts)


def render_report_html(
    maps: PigmentMaps,
    *,
    scan: Scan | Spectrum | None = None,
    title: str | None = None,
    thresholds: float | np.ndarray | Mapping[str, float] | None = None,
    instrument: Instrument | str | None = None,
) -> str:
    """The report as one self-contained HTML document (see :func:`write_report`)."""
    if not isinstance(maps, PigmentMaps):
        raise DataError(f"write_report needs PigmentMaps (from map_pigments), got {type(maps).__name__}")
    if isinstance(scan, Spectrum):
        scan = Scan.from_spectrum(scan)
    if scan is not None and not isinstance(scan, Scan):
        raise DataError(f"scan must be a Scan or Spectrum, got {type(scan).__name__}")
    if scan is not None and tuple(scan.shape[:2]) != tuple(maps.shape):
        raise DataError(
            f"the scan is {scan.shape[0]} x {scan.shape[1]} pixels but the maps are {maps.shape[0]} x "
            f"{maps.shape[1]}: give the scan the maps were made from"
        )
    thr = maps.resolve_thresholds(thresholds)
    summary = maps.summary(thr)
    single = maps.shape == (1, 1)
    source = str((getattr(scan, "metadata", None) or {}).get("source") or maps.metadata.get("source") or "")
    if title is None:
        what = "Pigment identification" if single else "Pigment maps"
        title = f"{what} of {_source_name(source)}" if source else what
    now = datetime.datetime.now().astimezone()
    prov, notices = _provenance(maps, scan, instrument, summary)
    model_rows, thresholds_text = _model_rows(maps, thr)
    px_um = _pixel_size(maps, scan)

    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">Report made {esc(now.strftime("%Y-%m-%d %H:%M %Z"))} '
        f"by xrfnb {esc(__version__)}</p>",
    ]
    if single:
        p_ood = float(np.asarray(maps.ood_score[()], dtype=np.float64).reshape(-1)[0])
        if np.isfinite(p_ood) and p_ood > maps.ood_threshold:
            body.append(
                '<div class="warning">Out of distribution: the spectrum is unlike the model\'s training '
                "spectra; its pigment calls are unreliable (see Pigment calls).</div>"
            )
    else:
        body.append(_ood_warning(summary).replace(' id="ood-warning"', ""))
    body.extend(f'<div class="notice">{esc(n)}</div>' for n in notices)
    body.append('<h2 id="provenance">Scan and provenance</h2>')
    body.append(_prov_table(prov))
    body.append('<h2 id="model">Model</h2>')
    body.append(_prov_table(model_rows))
    if single:
        body.append(_spectrum_section(maps, thr))
    else:
        present = np.asarray(maps.binary(thr).any(axis=(0, 1)))
        body.append(_summary_section(maps, summary, present))
        body.append(_map_sections(maps, thr, summary, present, px_um))
        body.append('<h2 id="thresholds">Decision thresholds</h2>')
        body.append(
            "<p>A class is called present where its probability is at or above its threshold. Thresholds: "
            + esc(thresholds_text)
            + "</p>"
        )
        body.append(_thresholds_tables(maps, thr, present))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{esc(title)}</title><meta name="generator" content="xrfnb {esc(__version__)}">'
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# writing: HTML, PDF
# --------------------------------------------------------------------------------------------------
#: flags of a quiet headless Chromium (no sandbox, GPU, updates, sync or first-run work, nothing fetched in
#: the background): the PDF printer's, and the browser tests' and benchmarks' (they import it)
HEADLESS_CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) executable: ``$XRFNB_CHROMIUM``, then the usual names on PATH."""
    env = os.environ.get("XRFNB_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _print_pdf(document: str, target: Path) -> None:
    exe = find_chromium()
    if exe is None:
        raise XRFNBError(
            f"cannot write {target}: a PDF report needs Chromium, which was not found (install the "
            "'chromium' package or set XRFNB_CHROMIUM to its path); or write an .html report and print "
            "it to PDF from a browser"
        )
    with tempfile.TemporaryDirectory(prefix="xrfnb-report-") as work:
        page = Path(work) / "report.html"
        page.write_text(document, encoding="utf-8")
        with atomic_path(target) as tmp:
            cmd = [
                exe,
                "--headless",
                *HEADLESS_CHROMIUM_ARGS,
                "--disable-extensions",
                f"--user-data-dir={Path(work) / 'profile'}",
                "--no-pdf-header-footer",
                f"--print-to-pdf={tmp}",
                page.as_uri(),
            ]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=_PDF_TIMEOUT_S, stdin=subprocess.DEVNULL
                )
            except subprocess.TimeoutExpired:
                raise XRFNBError(
                    f"cannot write {target}: Chromium did not finish printing in {_PDF_TIMEOUT_S:.0f} s; "
                    "write an .html report instead"
                ) from None
            except OSError as exc:
                raise XRFNBError(f"cannot write {target}: Chromium ({exe}) did not start: {exc}") from None
            with open(tmp, "rb") as f:
                head = f.read(5)
            if head != b"%PDF-":
                lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
                why = f": {lines[-1].strip()}" if lines else f" (exit status {proc.returncode})"
                raise XRFNBError(
                    f"cannot write {target}: Chromium printed no PDF{why}; write an .html report instead"
                )


def write_report(
    maps: PigmentMaps,
    path: str | os.PathLike[str],
    *,
    scan: Scan | Spectrum | None = None,
    title: str | None = None,
    thresholds: float | np.ndarray | Mapping[str, float] | None = None,
    instrument: Instrument | str | None = None,
) -> Path:
    """Write a report of pigment maps for the conservation file: one self-contained HTML file or a PDF.

    The report holds the title and date; the scan's provenance (file, format, shape, pixel size, live
    time, energy calibration, how multi-element detectors were combined, instrument and its
    description, masked pixels); the model (name, arithmetic, out-of-distribution threshold); the
    decision thresholds, marking those changed from the model's; the area fractions, with
    out-of-distribution pixels said first; and PNG maps with legends and a scale bar in mm (axes in
    pixels when the pixel size is unknown): the composite, one probability map per class found,
    surface vs buried, the out-of-distribution score and the element maps when present. A single
    spectrum (1 x 1 maps) gets a table of its calls with probabilities instead of maps.

    Parameters
    ----------
    maps : PigmentMaps
        Maps from :func:`map_pigments` or :meth:`PigmentMaps.from_hdf5` (lazy maps are read, not changed).
    path : path-like
        ``.html`` (or ``.htm``): the HTML; ``.pdf``: the HTML printed by headless Chromium. Written
        atomically: an interrupted or failed write leaves ``path`` as it was.
    scan : Scan or Spectrum, optional
        The scan the maps were made from, for its format, channels, live time and detector notes (the
        maps themselves record source, pixel size, calibration and model). Must have the maps' shape.
    title : str, optional
        Report title; default "Pigment maps of <scan file name>".
    thresholds : float, array of shape (K,) or mapping of class name to float, optional
        Decision thresholds on the probability (as in :meth:`PigmentMaps.binary`); default the model's.
    instrument : Instrument or str, optional
        The instrument (an :class:`Instrument`, a preset name or a free name); default the one the scan
        names in its metadata.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FormatError
        ``path`` does not end in .html/.htm/.pdf, is a folder, or its folder does not exist.
    XRFNBError
        A PDF was asked for and Chromium is missing or failed (the message says to write .html).
    DataError
        ``maps`` is not PigmentMaps, or ``scan`` does not match it.

    Examples
    --------
    A tiny simulated scan, mapped with the shipped model:

    >>> import tempfile
    >>> import xrfnb
    >>> scan, _ = xrfnb.render_scan("hidden-painting", shape=(8, 8))
    >>> maps = xrfnb.map_pigments(scan, progress=False)
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = xrfnb.write_report(maps, Path(folder.name) / "report.html", scan=scan, instrument="bruker-m6")
    >>> path.name, path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    ('report.html', True)
    >>> folder.cleanup()
    """
    target = Path(os.fspath(path))
    suffix = target.suffix.lower()
    if suffix not in (".html", ".htm", ".pdf"):
        raise FormatError(f"cannot write a report to {target}: give a file name ending in .html or .pdf")
    if target.is_dir():
        raise FormatError(
            f"cannot write a report to {target}: it is a folder; give a file name, e.g. "
            f"{target / 'report.html'}"
        )
    if not (target.parent if str(target.parent) else Path(".")).is_dir():
        raise FormatError(f"cannot write {target}: the folder {target.parent} does not exist")
    document = render_report_html(maps, scan=scan, title=title, thresholds=thresholds, instrument=instrument)
    if suffix == ".pdf":
        _print_pdf(document, target)
        return target
    with atomic_path(target) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return target
