"""The dashboard's "Energy calibration" card.

The card lets a user fit an energy calibration to peaks they recognise (``line=channel``, typed or
picked by choosing a line and clicking its peak on the spectrum), read the fitted relation and each
peak's residual in eV, and apply it: the scan is re-wrapped with the new calibration and its pigment
maps recomputed (off the event loop in a server session, like loading).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import panel as pn

from ..._errors import CalibrationError, DataError, XRFNBError
from ...core.calibration import EnergyCalibration
from ...core.spectrum import Scan
from ...fitting.calibration import CalibrationFit, calibrate

if TYPE_CHECKING:  # pragma: no cover
    from .app import Dashboard

__all__ = ["COMMON_LINES", "CalibrationPanel", "looks_uncalibrated", "parse_peaks"]

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


class CalibrationPanel(pn.viewable.Viewer):
    """The "Energy calibration" card of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    owner : Dashboard
        The dashboard whose scan is calibrated.
    """

    def __init__(self, owner: Dashboard) -> None:
        super().__init__()
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

    def __panel__(self) -> pn.Card:
        return self.card

    def _guarded(self, fn: Callable[[], object]) -> None:
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
        new = scan.with_calibration(calibration, source=source)
        self.apply_button.disabled = True
        self._owner.recalibrated(new)
        self.card.collapsed = True
