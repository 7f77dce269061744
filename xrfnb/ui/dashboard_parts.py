"""Parts of the dashboard kept out of :mod:`xrfnb.ui.dashboard`'s class: the energy-calibration card.

The card lets a user fit an energy calibration to peaks they recognise (``line=channel``, typed or
picked by choosing a line and clicking its peak on the spectrum), read the fitted relation and each
peak's residual in eV, and apply it: the scan is re-wrapped with the new calibration and its pigment
maps recomputed (off the event loop in a server session, like loading).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn

from .._errors import CalibrationError, DataError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..fitting.calibration import CalibrationFit, calibrate

if TYPE_CHECKING:  # pragma: no cover
    from ..core.spectrum import Scan
    from .dashboard import Dashboard

__all__ = ["CalibrationPanel", "looks_uncalibrated", "parse_peaks"]

#: lines a conservator meets most often in paintings (pigments, grounds, the tube's Rh and air's Ar)
COMMON_LINES = (
    "Fe Ka", "Fe Kb", "Pb La", "Pb Lb", "Pb Ma", "Ca Ka", "Ti Ka", "Cr Ka", "Mn Ka", "Co Ka", "Ni Ka",
    "Cu Ka", "Cu Kb", "Zn Ka", "Zn Kb", "As Ka", "Sr Ka", "Hg La", "Hg Lb", "Ba La", "Cd Ka", "Sn Ka",
    "Sb Ka", "K Ka", "S Ka", "Si Ka", "Ar Ka", "Rh Ka", "Rh La",
)  # fmt: skip
#: the keV-per-channel range the pigment model accepts (outside it a spectrum looks uncalibrated)
_GAIN_RANGE_KEV = (1e-4, 0.2)


def looks_uncalibrated(scan: Scan) -> bool:
    """Whether the scan has no usable energy calibration: its reader found none (``calibrated`` False
    in the metadata) or its keV per channel lies outside what a spectrometer gives (the model's check)."""
    if scan.metadata.get("calibrated") is False:
        return True
    n = scan.n_channels
    lo, hi = scan.calibration.energy_keV(np.array([0, n - 1]))
    per_channel = (hi - lo) / max(n - 1, 1)
    return not _GAIN_RANGE_KEV[0] <= per_channel <= _GAIN_RANGE_KEV[1]


def parse_peaks(text: str) -> dict[str, float]:
    """``"Fe Ka=537, Ni Ka=627"`` (commas, semicolons or new lines between peaks) -> ``{line: channel}``.

    Raises
    ------
    CalibrationError
        An entry is not ``line=channel`` with a number, or a line is given twice.
    """
    peaks: dict[str, float] = {}
    for raw in re.split(r"[,;\n]+", text or ""):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = " ".join(name.split())
        try:
            channel = float(value)
        except ValueError:
            channel = float("nan")
        if not sep or not name or not np.isfinite(channel):
            raise CalibrationError(
                f"cannot read the peak {item!r}: write each peak as line=channel, e.g. Fe Ka=537"
            )
        if name in peaks:
            raise CalibrationError(f"the line {name} is given twice: keep one channel per line")
        peaks[name] = channel
    return peaks


class CalibrationPanel:
    """The "Energy calibration" card of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    owner : Dashboard
        The dashboard whose scan is calibrated.
    """

    def __init__(self, owner: Dashboard) -> None:
        self._owner = owner
        self.fit_result: CalibrationFit | None = None
        self._fit_for: Scan | None = None
        self.line = pn.widgets.Select(
            label="Line (then click its peak on the spectrum)", options=list(COMMON_LINES), width=270
        )
        self.peaks = pn.widgets.TextAreaInput(
            label="Peaks, line=channel",
            placeholder="Fe Ka=537, Ni Ka=627, Cr Ka=454",
            height=70,
            width=270,
            css_classes=["xrfnb-cal-peaks"],
        )
        self.spectrum = pn.widgets.RadioButtonGroup(
            options=["sum spectrum", "shown spectrum"], value="sum spectrum", width=270
        )
        self.quadratic = pn.widgets.Checkbox(label="quadratic term (3 peaks or more)", width=270)
        self.fit_button = pn.widgets.Button(
            label="Fit calibration", color="primary", width=130, css_classes=["xrfnb-cal-fit"]
        )
        self.apply_button = pn.widgets.Button(
            label="Apply to the scan", width=130, disabled=True, css_classes=["xrfnb-cal-apply"]
        )
        self.result = pn.pane.Markdown("", width=270, css_classes=["xrfnb-cal-result"])
        self.fit_button.on_click(lambda event: self._guarded(self.fit))
        self.apply_button.on_click(lambda event: self._guarded(self.apply))
        self.card = pn.Card(
            pn.pane.Markdown(
                "Type the peaks you recognise as *line=channel*, or choose a line and click its peak "
                "on the spectrum; fit, check the residuals, then apply.",
                width=270,
            ),
            self.line,
            self.peaks,
            self.spectrum,
            self.quadratic,
            pn.Row(self.fit_button, self.apply_button),
            self.result,
            title="Energy calibration",
            collapsed=True,
            width=290,
            css_classes=["xrfnb-calibration"],
        )

    def _guarded(self, fn: Any) -> None:
        try:
            fn()
        except XRFNBError as exc:
            self._owner.notify(str(exc), "error")

    # -- picking --------------------------------------------------------------------------------
    def pick(self, energy_keV: float) -> float:
        """Enter the chosen line at the channel of ``energy_keV`` (a click on the spectrum, whose axis is
        in the scan's present calibration); returns that channel. A line already listed is replaced."""
        scan = self._require_scan()
        channel = float(np.round(float(scan.calibration.channel(energy_keV)), 1))
        try:
            peaks = parse_peaks(self.peaks.value)
        except CalibrationError:
            peaks = {}
        peaks[str(self.line.value)] = channel
        self.peaks.value = ", ".join(f"{name}={ch:g}" for name, ch in peaks.items())
        return channel

    # -- fitting --------------------------------------------------------------------------------
    def _require_scan(self) -> Scan:
        scan = self._owner.scan
        if scan is None:
            raise DataError("no scan open: open a scan before calibrating it")
        return scan

    def _counts(self, scan: Scan) -> np.ndarray:
        if self.spectrum.value == "shown spectrum":
            return np.asarray(self._owner.current_spectrum()[2], dtype=float)
        return np.asarray(scan.sum_spectrum().counts, dtype=float)

    def fit(
        self, peaks: str | Mapping[str, float] | None = None, quadratic: bool | None = None
    ) -> CalibrationFit:
        """Fit a calibration (:func:`xrfnb.calibrate`) to ``peaks`` (default: the text box) in the scan's
        sum spectrum (or the shown one) and show the relation and each peak's residual in eV."""
        scan = self._require_scan()
        if peaks is not None:
            text = peaks if isinstance(peaks, str) else ", ".join(f"{k}={v:g}" for k, v in peaks.items())
            self.peaks.value = text
        if quadratic is not None:
            self.quadratic.value = bool(quadratic)
        parsed = parse_peaks(self.peaks.value)
        if not parsed:
            raise CalibrationError("no peaks given: enter at least two as line=channel, e.g. Fe Ka=537")
        fit = calibrate(self._counts(scan), parsed, quadratic=bool(self.quadratic.value))
        self.fit_result, self._fit_for = fit, scan
        self.apply_button.disabled = False
        self.result.object = self.describe(fit)
        return fit

    @staticmethod
    def describe(fit: CalibrationFit) -> str:
        """Markdown: the fitted relation and a table of the peaks with their residuals in eV."""
        rows = [
            "| line | channel | reference (keV) | residual (eV) |",
            "|---|---:|---:|---:|",
        ]
        for name, ch, e, res in zip(
            fit.lines, fit.channels, fit.energies_keV, fit.residuals_keV, strict=True
        ):
            rows.append(f"| {name} | {ch:.1f} | {e:.4f} | {res * 1e3:+.1f} |")
        return (
            f"**{fit.calibration}**\n\n"
            + "\n".join(rows)
            + f"\n\nrms residual {fit.rms_residual_keV * 1e3:.1f} eV"
        )

    # -- applying -------------------------------------------------------------------------------
    def apply(self, calibration: EnergyCalibration | None = None) -> None:
        """Re-wrap the open scan with the fitted (or given) calibration and recompute its maps."""
        scan = self._require_scan()
        source = "given in the dashboard"
        if calibration is None:
            fit = self.fit_result
            if fit is None or self._fit_for is not scan:
                raise CalibrationError("no calibration fitted for this scan yet: fit one before applying it")
            calibration = fit.calibration
            source = (
                f"fitted in the dashboard to {', '.join(fit.lines)} "
                f"(rms residual {fit.rms_residual_keV * 1e3:.1f} eV)"
            )
        if not isinstance(calibration, EnergyCalibration):
            raise CalibrationError(f"expected an EnergyCalibration, got {type(calibration).__name__}")
        calibration.check_monotonic(scan.n_channels)
        meta = {**scan.metadata, "calibrated": True, "calibration_source": source}
        new = dataclasses.replace(scan, calibration=calibration, metadata=meta)
        self.apply_button.disabled = True
        self._owner.recalibrated(new)
        self.card.collapsed = True


# --------------------------------------------------------------------------------------------------
# an RGB overlay of three element maps
# --------------------------------------------------------------------------------------------------
_RGB_PERCENTILE = 99.0


def _element_label(element: str, family: str | None) -> str:
    return f"{element} {family}" if family else element


class ElementViews:
    """The "Element maps" section of a :class:`~xrfnb.ui.dashboard.Dashboard`: an RGB overlay of three
    chosen element maps, each channel scaled to its own 99th percentile (stated in its legend).

    Parameters
    ----------
    owner : Dashboard
        The dashboard whose element maps are shown.
    """

    def __init__(self, owner: Dashboard) -> None:
        self._owner = owner
        self.red = pn.widgets.Select(label="Red", options=[], width=110, css_classes=["xrfnb-rgb-red"])
        self.green = pn.widgets.Select(label="Green", options=[], width=110, css_classes=["xrfnb-rgb-green"])
        self.blue = pn.widgets.Select(label="Blue", options=[], width=110, css_classes=["xrfnb-rgb-blue"])
        self.overlay = pn.pane.HoloViews(None, linked_axes=False, css_classes=["xrfnb-element-rgb"])
        self.legend = pn.pane.HTML("", width=300, css_classes=["xrfnb-rgb-legend"])
        for w in (self.red, self.green, self.blue):
            w.param.watch(lambda event: self._refresh_overlay(), "value")
        self.section = pn.Column(
            pn.pane.Markdown("### Element maps: RGB overlay of three elements"),
            pn.Row(self.red, self.green, self.blue),
            pn.Row(self.overlay, self.legend),
            sizing_mode="stretch_width",
            visible=False,
        )
        self._refreshing = False

    # -- data -----------------------------------------------------------------------------------
    def _element_maps(self) -> Any:
        maps = self._owner.maps
        return getattr(maps, "element_maps", None) if maps is not None else None

    def _labels(self) -> dict[str, int]:
        em = self._element_maps()
        if em is None:
            return {}
        families = list(getattr(em, "families", None) or [None] * len(em.elements))
        return {_element_label(el, families[i]): i for i, el in enumerate(em.elements)}

    def _valid(self) -> np.ndarray:
        return ~np.asarray(self._owner.maps.mask, dtype=bool)

    def channel(self, label: str) -> tuple[np.ndarray, float]:
        """``(values in [0, 1] (rows, cols), 99th-percentile counts)`` of one element for the overlay:
        its counts divided by their 99th percentile over the valid pixels, clipped to 1."""
        index = self._labels()[label]
        counts = np.asarray(self._element_maps().intensity[..., index], dtype=float)
        finite = counts[self._valid() & np.isfinite(counts)]
        top = float(np.percentile(finite, _RGB_PERCENTILE)) if finite.size else 0.0
        scaled = np.clip(np.nan_to_num(counts) / top, 0.0, 1.0) if top > 0 else np.zeros_like(counts)
        return scaled, top

    def overlay_rgb(self) -> tuple[np.ndarray, list[tuple[str, str, float]]]:
        """``(RGB uint8 (rows, cols, 3), [(channel, element label, 99th-percentile counts)])`` of the
        chosen elements; invalid (masked) pixels grey."""
        em = self._element_maps()
        if em is None:
            raise DataError("no element maps for this scan (they come with the pigment maps)")
        rows, cols = self._owner.maps.mask.shape
        rgb = np.zeros((rows, cols, 3), dtype=np.uint8)
        legend = []
        for k, (name, widget) in enumerate((("red", self.red), ("green", self.green), ("blue", self.blue))):
            if not widget.value:
                continue
            scaled, top = self.channel(widget.value)
            rgb[..., k] = np.round(255 * scaled).astype(np.uint8)
            legend.append((name, widget.value, top))
        rgb[~self._valid()] = (128, 128, 128)
        return rgb, legend

    # -- views ----------------------------------------------------------------------------------
    def overlay_element(self) -> Any:
        """The RGB overlay as an :class:`holoviews.RGB` on the map's axes (mm or pixels)."""
        from .dashboard import _MAIN_PX, _rgb

        rgb, legend = self.overlay_rgb()
        owner = self._owner
        mm, axes = owner.map_scale()
        rows, cols = rgb.shape[:2]
        scale = (_MAIN_PX * 0.8) / max(rows, cols)
        names = " / ".join(label for _, label, _ in legend)
        return _rgb(rgb, mm, axes).opts(
            title=f"RGB overlay: {names}",
            frame_width=max(60, round(cols * scale)),
            frame_height=max(60, round(rows * scale)),
            xlabel=axes[0],
            ylabel=axes[1],
            hover_tooltips=[(axes[0], "$x{0.00}"), (axes[1], "$y{0.00}")],
            tools=["hover"],
            toolbar="above",
        )

    def legend_html(self) -> str:
        """The overlay's legend: each channel's element and the counts its full brightness stands for."""
        _, legend = self.overlay_rgb()
        swatch = {"red": "#ff0000", "green": "#00ff00", "blue": "#0000ff"}
        items = [
            f'<li><span style="display:inline-block;width:12px;height:12px;background:{swatch[name]};'
            f'border:1px solid #555;margin-right:6px"></span>{name}: {label}, 0 to '
            f"{top:,.0f} counts (its 99th percentile; brighter pixels are clipped)</li>"
            for name, label, top in legend
        ]
        return (
            '<ul style="list-style:none;padding:0;margin:0;font-size:12px">'
            + "".join(items)
            + '<li><span style="display:inline-block;width:12px;height:12px;background:#808080;'
            'border:1px solid #555;margin-right:6px"></span>invalid pixel (masked)</li></ul>'
            "<p style='font-size:12px'>Each channel is scaled to its own 99th percentile: colours compare "
            "where elements are, not how much of each.</p>"
        )

    def refresh(self) -> None:
        """Rebuild for the owner's current maps (new scan or maps, colour map)."""
        labels = list(self._labels())
        show = bool(labels) and not self._owner.single_spectrum
        self.section.visible = show
        if not show:
            self.overlay.object = None
            self.legend.object = ""
            return
        self._refreshing = True
        try:
            em = self._element_maps()
            totals = np.nansum(np.asarray(em.intensity, dtype=float), axis=(0, 1))
            strongest = [labels[i] for i in np.argsort(-totals)]
            for k, widget in enumerate((self.red, self.green, self.blue)):
                keep = widget.value in labels  # read before the options change: Select then takes the first
                widget.options = labels
                if not keep:
                    widget.value = strongest[k % len(strongest)]
        finally:
            self._refreshing = False
        self._refresh_overlay()

    def _refresh_overlay(self) -> None:
        if self._refreshing or self._element_maps() is None or not self.section.visible:
            return
        self.overlay.object = self.overlay_element()
        self.legend.object = self.legend_html()
