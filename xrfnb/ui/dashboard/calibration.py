"""The dashboard's "Energy calibration" card.

The card lets a user fit an energy calibration to peaks they recognise (``line=channel``, typed or
picked by choosing a line and clicking its peak on the spectrum), read the fitted relation and each
peak's residual in eV, and apply it: the scan is re-wrapped with the new calibration and its pigment
maps recomputed (off the event loop in a server session, like loading).

Or, with no peaks to name, the card fits the whole instrument from the scan (:func:`xrfnb.fit_instrument`
on its sum spectrum, off the event loop with a progress line: it takes seconds), shows every fitted
setting with its uncertainty, status and evidence, and applies the fitted energy calibration the same way
or makes the session use the whole fitted instrument (calibration, resolution, tube, geometry, air,
pile-up) for its element fit, physics check, simulated spectrum and report, until the user goes back to
the file's (or preset's) instrument. A calibration the fit found by a blind search (the file had none) is
said to be possibly wrong, and neither is applied before the user confirms having checked it.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn

from ..._errors import CalibrationError, DataError, XRFNBError
from ...core.calibration import EnergyCalibration
from ...core.spectrum import Scan
from ...fitting.calibration import CalibrationFit, calibrate
from ...fitting.instrument_fit import FittedParameter, InstrumentFit, fit_instrument
from ...physics.instrument import Instrument
from .common import micro
from .job import JobRunner, MappingJob, RowProgress, reraise_for_user

if TYPE_CHECKING:  # pragma: no cover
    from .app import Dashboard

__all__ = [
    "APPLY_INSTRUMENT_LABEL",
    "BLIND_CONFIRM_LABEL",
    "COMMON_LINES",
    "FILE_INSTRUMENT_LABEL",
    "FIT_INSTRUMENT_LABEL",
    "USE_INSTRUMENT_LABEL",
    "CalibrationPanel",
    "InstrumentJob",
    "instrument_rows",
    "looks_uncalibrated",
    "parse_peaks",
]

#: the label of the button that fits the instrument from the open scan
FIT_INSTRUMENT_LABEL = "Fit the instrument from this scan"
#: the label of the button that applies the fitted instrument's energy calibration
APPLY_INSTRUMENT_LABEL = "Apply the fitted calibration"
#: the label of the button that makes the session use the whole fitted instrument
USE_INSTRUMENT_LABEL = "Use the fitted instrument"
#: the label of the button that goes back to the file's (or preset's) instrument
FILE_INSTRUMENT_LABEL = "Back to the file's instrument"
#: the confirmation a blind calibration needs before it is applied or used
BLIND_CONFIRM_LABEL = "I checked the blind calibration against peaks I know"
#: what the card says of a calibration found by a blind search
BLIND_WARNING = (
    "<b>The energy calibration was found blind</b>: the file has none, so it was guessed from the peak "
    "pattern alone, and such guesses are often wrong on real spectra. Check it against peaks you know "
    "(choose a line above and compare its marker with its peak on the spectrum) before applying or using it."
)
#: what each fitted setting is called on the page (the names of :attr:`xrfnb.InstrumentFit.parameters`)
INSTRUMENT_LABELS = {
    "offset_keV": "calibration offset",
    "gain_keV": "calibration gain",
    "quadratic_keV": "calibration quadratic term",
    "noise_keV": "electronic noise (FWHM)",
    "fano": "Fano factor",
    "fwhm_mnka_eV": "resolution (FWHM at Mn Ka)",
    "anode": "tube anode",
    "monochromatic_keV": "monochromatic beam",
    "tube_voltage_kV": "tube voltage",
    "scattering_angle_deg": "scattering angle",
    "atmosphere": "atmosphere",
    "air_path_mm": "air on the beam path (at 1 atm)",
    "pileup_share": "pile-up (share of sum counts)",
    "count_rate_cps": "count rate",
    "pileup_time_s": "pulse-pair resolving time",
    "detector_thickness_um": "detector thickness",
    "detector_window": "detector window",
}
#: unit of a setting from the end of its name, for people
_UNITS = (
    ("_keV", "keV"),
    ("_eV", "eV"),
    ("_kV", "kV"),
    ("_deg", "°"),
    ("_mm", "mm"),
    ("_cps", "counts/s"),
    ("_um", "µm"),
    ("_s", "s"),
)
#: a status as the card says it
_STATUS_WORDS = {
    "fitted": "fitted",
    "derived": "derived",
    "fixed": "fixed",
    "start": "not fitted (the file's or the preset's value)",
    "not determined": "not determined (the file's or the preset's value kept)",
}

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


def _number(value: float) -> str:
    """A number to four significant digits, without exponent where that reads well."""
    v = float(value)
    if 1e4 <= abs(v) < 1e9:
        return f"{v:,.0f}"
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}" if abs(v) >= 1 or v == 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return f"{v:.3e}"


def instrument_rows(fit: InstrumentFit) -> list[dict[str, str]]:
    """The fitted instrument as the card shows it: one row per setting, in words.

    Parameters
    ----------
    fit : InstrumentFit
        What :func:`xrfnb.fit_instrument` returned.

    Returns
    -------
    list of dict
        Per setting (in the order of ``fit.parameters``): ``name`` (the parameter's name), ``setting``
        (its name for people), ``value`` and ``uncertainty`` (one sigma; "" where there is none), both
        with their unit, ``status`` and ``evidence`` (what it was determined from, or why not).
    """
    rows = []
    for name, p in fit.parameters.items():
        rows.append(
            {
                "name": name,
                "setting": INSTRUMENT_LABELS.get(name, name.replace("_", " ")),
                "value": _value_text(name, p),
                "uncertainty": _sigma_text(name, p),
                "status": _STATUS_WORDS.get(p.status, p.status),
                "evidence": micro(p.evidence),
            }
        )
    return rows


def _unit(name: str) -> str:
    return next((unit for end, unit in _UNITS if name.endswith(end)), "")


def _scaled(name: str, value: float) -> tuple[float, str]:
    """Value and unit for people: a resolving time in ns, a gain in eV per channel."""
    if name == "pileup_time_s":
        return value * 1e9, "ns"
    if name in ("gain_keV", "noise_keV"):
        return value * 1e3, "eV per channel" if name == "gain_keV" else "eV"
    if name == "quadratic_keV":
        return value * 1e3, "eV per channel²"
    return value, _unit(name)


def _value_text(name: str, p: FittedParameter) -> str:
    if p.value is None:
        return "none"
    if isinstance(p.value, str):
        return micro(p.value)
    value, unit = _scaled(name, float(p.value))
    return f"{_number(value)} {unit}".strip()


def _sigma_text(name: str, p: FittedParameter) -> str:
    if p.sigma is None or not np.isfinite(p.sigma) or isinstance(p.value, str):
        return ""
    sigma, unit = _scaled(name, float(p.sigma))
    return f"± {sigma:.2g} {unit}".strip()


@dataclasses.dataclass(eq=False)
class InstrumentJob(MappingJob):
    """An instrument fit run off the event loop (:class:`~xrfnb.ui.dashboard.job.JobRunner`).

    Attributes
    ----------
    fit : InstrumentFit or None
        The result.
    """

    fit: InstrumentFit | None = None


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
        #: the instrument fitted from the open scan, and that scan
        self.instrument_fit: InstrumentFit | None = None
        self._instrument_for: Scan | None = None
        self.jobs = JobRunner(self._on_instrument_progress, self.finish_instrument_fit)
        self.instrument_button = pn.widgets.Button(
            label=FIT_INSTRUMENT_LABEL, width=270, css_classes=["xrfnb-cal-instrument"]
        )
        self.instrument_progress = pn.pane.HTML(
            "", visible=False, width=270, styles={"font-size": "12px"},
            css_classes=["xrfnb-cal-instrument-progress"],
        )  # fmt: skip
        self.instrument_result = pn.pane.HTML(
            "", width=270, visible=False, css_classes=["xrfnb-cal-instrument-result"]
        )
        self.instrument_apply_button = pn.widgets.Button(
            label=APPLY_INSTRUMENT_LABEL, width=270, disabled=True, visible=False,
            css_classes=["xrfnb-cal-instrument-apply"],
        )  # fmt: skip
        self.use_instrument_button = pn.widgets.Button(
            label=USE_INSTRUMENT_LABEL, width=270, disabled=True, visible=False,
            css_classes=["xrfnb-cal-instrument-use"],
        )  # fmt: skip
        self.file_instrument_button = pn.widgets.Button(
            label=FILE_INSTRUMENT_LABEL, width=270, visible=False, css_classes=["xrfnb-cal-instrument-back"]
        )
        self.blind_warning = pn.pane.HTML(
            BLIND_WARNING, width=270, visible=False,
            styles={"font-size": "12px", "color": "#8a1c1c", "background": "#fdecea", "padding": "4px"},
            css_classes=["xrfnb-cal-instrument-blind"],
        )  # fmt: skip
        self.blind_confirm = pn.widgets.Checkbox(
            label=BLIND_CONFIRM_LABEL, value=False, width=270, visible=False,
            css_classes=["xrfnb-cal-instrument-confirm"],
        )  # fmt: skip
        #: the fitted instrument the session uses (None: the file's or preset's), and the scan before it
        #: was used (what going back restores)
        self.instrument_in_use: Instrument | None = None
        self._scan_before_use: Scan | None = None
        self._instrument_applied = False
        self._in_use_for: tuple[tuple[EnergyCalibration, int], Instrument] | None = None
        self.instrument_button.on_click(lambda event: self._guarded(self.fit_instrument))
        self.instrument_apply_button.on_click(lambda event: self._guarded(self.apply_instrument))
        self.use_instrument_button.on_click(lambda event: self._guarded(self.use_instrument))
        self.file_instrument_button.on_click(lambda event: self._guarded(self.use_file_instrument))
        self.blind_confirm.param.watch(lambda event: self._sync_instrument_buttons(), ["value"])
        owner.param.watch(self._on_data, ["data_version"])
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
            pn.pane.Markdown(
                "Or let the scan tell: the instrument (calibration, resolution, tube, geometry, air) is "
                "fitted to its sum spectrum, which takes seconds.",
                width=270,
            ),
            self.instrument_button,
            self.instrument_progress,
            self.instrument_result,
            self.blind_warning,
            self.blind_confirm,
            self.instrument_apply_button,
            self.use_instrument_button,
            self.file_instrument_button,
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
    def apply(self, calibration: EnergyCalibration | None = None, source: str | None = None) -> None:
        """Re-wrap the open scan with the fitted (or given) calibration and recompute its maps;
        ``source`` says where a given calibration came from (the scan's ``calibration_source``)."""
        scan = self._require_scan()
        source = source or "given in the dashboard"
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

    # -- the instrument from the data ----------------------------------------------------------
    def fit_instrument(self) -> None:
        """Fit the instrument to the open scan's sum spectrum (:func:`xrfnb.fit_instrument`); in a
        server session a worker thread fits it, with a progress line, and the card shows the result
        when it is done (:meth:`finish_instrument_fit`)."""
        scan = self._require_scan()
        rows = scan.shape[0]
        job = InstrumentJob("instrument", label=self._owner.label, scan=scan)

        def work(job: InstrumentJob) -> None:
            def on_rows(n: int) -> None:
                job.report(min(job.done + n, rows), rows)
                if job.done >= rows:  # the sum is complete: the fit itself follows, uncounted
                    job.set_stage(
                        "fitting the instrument: peaks, calibration, resolution, tube, scatter and air"
                    )

            job.set_stage("fitting the instrument: summing the spectra", total=rows)
            counted = dataclasses.replace(scan, counts=RowProgress(scan.counts, on_rows))
            job.fit = fit_instrument(counted)

        self.instrument_apply_button.disabled = self.use_instrument_button.disabled = True
        if self._owner.data_panel.is_blocking():
            job.run(work)
            self.finish_instrument_fit(job)
            return
        self.instrument_button.disabled = True
        self.instrument_progress.object = html.escape(job.describe())
        self.instrument_progress.visible = True
        self.jobs.start(job, work)

    def _forget_instrument(self) -> None:
        self.instrument_fit = self._instrument_for = None
        self.instrument_in_use = self._scan_before_use = self._in_use_for = None
        self.instrument_result.object = ""
        self.instrument_result.visible = False
        self._sync_instrument_buttons()

    def _sync_instrument_buttons(self) -> None:
        """Show and enable the buttons of the instrument fit: apply and use need a fit (and, for a blind
        calibration, the user's confirmation); going back is offered while the fitted instrument is used."""
        fit = self.instrument_fit
        shown = fit is not None
        blind = shown and bool(fit.calibration_blind)
        blocked = blind and not self.blind_confirm.value
        in_use = self.instrument_in_use is not None
        self.blind_warning.visible = self.blind_confirm.visible = blind
        self.instrument_apply_button.visible = self.use_instrument_button.visible = shown
        self.instrument_apply_button.disabled = not shown or blocked or in_use or self._instrument_applied
        self.use_instrument_button.disabled = not shown or blocked or in_use
        self.file_instrument_button.visible = in_use

    def _on_data(self, *events: Any) -> None:
        """Another scan (not the one fitted, re-wrapped with the fitted calibration) forgets the fit."""
        if self.instrument_fit is None:
            return
        scan = self._owner.scan
        fitted = self._instrument_for
        if scan is fitted:
            return
        if scan is not None and fitted is not None and scan.counts is fitted.counts:
            self._instrument_for = scan  # the same counts, recalibrated: the fit still describes them
            return
        self._forget_instrument()

    def _on_instrument_progress(self, job: MappingJob) -> None:
        text = html.escape(job.describe())
        if self.instrument_progress.object != text:
            self.instrument_progress.object = text

    def finish_instrument_fit(self, job: InstrumentJob) -> None:
        """Show a finished instrument fit (on the event loop); a fit of a scan no longer open is
        forgotten, a failed one said in words. The open scan recalibrated while the worker fitted (the
        user went back to the file's instrument, or applied a calibration) is the same scan: its fit is
        shown."""
        self.instrument_progress.visible = False
        self.instrument_button.disabled = False
        scan = self._owner.scan
        if job.cancelled or scan is None or job.scan is None or job.scan.counts is not scan.counts:
            self._sync_instrument_buttons()  # the buttons of the fit shown before, if any
            return
        try:
            if job.error is not None:
                reraise_for_user(job.error, "the instrument fit failed")
        except (XRFNBError, MemoryError) as exc:
            why = str(exc) if isinstance(exc, XRFNBError) else "not enough memory"
            self._forget_instrument()
            self._owner.notify(f"cannot fit the instrument from this scan: {why}", "error")
            return
        fit = job.fit
        if fit is None:  # pragma: no cover - a worker that neither failed nor fitted
            return
        if self.instrument_in_use is not None:  # a new fit replaces the one in use: back to the file's
            self.use_file_instrument()  # the same counts, with the calibration they had before
        self.instrument_fit, self._instrument_for = fit, self._owner.scan
        self._instrument_applied = False
        self.blind_confirm.value = False
        self.instrument_result.object = self.describe_instrument(fit)
        self.instrument_result.visible = True
        self._sync_instrument_buttons()

    @staticmethod
    def describe_instrument(fit: InstrumentFit) -> str:
        """HTML: what was fitted, then each setting's value, uncertainty, status and evidence."""
        cal = fit.instrument.calibration
        head = (
            f"<b>Instrument fitted to {html.escape(fit.source)}</b>: {fit.total_counts:,.0f} counts, "
            f"{fit.instrument.n_channels:,} channels, {fit.seconds:.1f} s.<br>"
            f"<b>Energy calibration</b>: {html.escape(str(cal))}, "
            f"± {1000 * fit.energy_sigma_keV(10.0):.1f} eV at 10 keV."
        )
        items = []
        for row in instrument_rows(fit):
            value = html.escape(row["value"]) + (
                f" {html.escape(row['uncertainty'])}" if row["uncertainty"] else ""
            )
            items.append(
                f'<div class="xrfnb-instrument-row" style="margin-top:4px">'
                f"<b>{html.escape(row['setting'])}</b>: {value} <i>({html.escape(row['status'])})</i>"
                f'<br><span style="color:#555">{html.escape(row["evidence"])}</span></div>'
            )
        return (
            '<div style="font-size:12px;max-height:360px;overflow-y:auto">' + head + "".join(items) + "</div>"
        )

    def _usable_fit(self) -> InstrumentFit:
        """The instrument fitted to the open scan, once its calibration may be applied (a blind one only
        after the user confirmed checking it)."""
        scan = self._require_scan()
        fit = self.instrument_fit
        if fit is None or not self._fitted_to(scan):
            raise CalibrationError(
                "no instrument fitted to this scan yet: click 'Fit the instrument from this scan' first"
            )
        if fit.calibration_blind and not self.blind_confirm.value:
            raise CalibrationError(
                "the fitted calibration was found blind and may be wrong: check it against peaks you know, "
                f"then tick '{BLIND_CONFIRM_LABEL}'"
            )
        return fit

    @staticmethod
    def _calibration_source(fit: InstrumentFit) -> str:
        p = fit.parameters.get("offset_keV")
        how = p.evidence if p is not None else "the instrument fit"
        blind = "; found blind, checked by the user" if fit.calibration_blind else ""
        return (
            f"fitted with the instrument in the dashboard ({how}; "
            f"± {1000 * fit.energy_sigma_keV(10.0):.1f} eV at 10 keV{blind})"
        )

    def apply_instrument(self) -> None:
        """Apply the fitted instrument's energy calibration to the open scan, as a calibration fitted
        to named peaks is applied (:meth:`apply`); a blind calibration only once confirmed."""
        fit = self._usable_fit()
        self._instrument_applied = True
        try:
            self.apply(fit.instrument.calibration, source=self._calibration_source(fit))
        finally:
            self._sync_instrument_buttons()

    def use_instrument(self) -> None:
        """Make the session use the fitted instrument (:attr:`instrument_in_use`): its calibration is
        applied to the scan as :meth:`apply_instrument` does, and its resolution, tube, geometry, air and
        pile-up serve the element fit, the physics check, the simulated spectrum and the report (the maps
        are made again with it). A blind calibration only once confirmed;
        :meth:`use_file_instrument` goes back."""
        fit = self._usable_fit()
        scan = self._require_scan()
        self._scan_before_use = scan
        self.instrument_in_use = fit.instrument
        self._in_use_for = None
        try:
            self.apply(fit.instrument.calibration, source=self._calibration_source(fit))
        except BaseException:
            self.instrument_in_use = self._scan_before_use = None
            raise
        finally:
            self._sync_instrument_buttons()

    def use_file_instrument(self) -> None:
        """Go back to the file's (or preset's) instrument: the scan gets back the calibration it had before
        :meth:`use_instrument` and its maps are made again with that instrument."""
        if self.instrument_in_use is None:
            raise CalibrationError("the session already uses the file's instrument")
        before = self._scan_before_use
        self.instrument_in_use = self._scan_before_use = self._in_use_for = None
        scan = self._owner.scan
        try:
            if before is not None and scan is not None and before.counts is scan.counts:
                self._owner.recalibrated(before)
            else:  # pragma: no cover - another scan forgets the fit (and the instrument in use) first
                self._owner.selection_info.update_scan_info()
        finally:
            self._sync_instrument_buttons()

    def _fitted_to(self, scan: Scan | None) -> bool:
        """Whether the instrument fit describes ``scan`` (the scan fitted, or its counts recalibrated)."""
        fitted = self._instrument_for
        return scan is not None and fitted is not None and (scan is fitted or scan.counts is fitted.counts)

    def fit_of_open_scan(self) -> InstrumentFit | None:
        """The instrument fitted to the open scan (or to its counts before a new calibration), or None."""
        fit = self.instrument_fit
        return fit if fit is not None and self._fitted_to(self._owner.scan) else None

    def used_instrument(self) -> Instrument | None:
        """The fitted instrument the session uses, with the open scan's calibration and channel count
        (the scan may have been calibrated again since); None while the file's or preset's is used."""
        inst = self.instrument_in_use
        scan = self._owner.scan
        if inst is None or scan is None or not self._fitted_to(scan):
            return None
        key = (scan.calibration, scan.n_channels)
        if inst.calibration == key[0] and inst.n_channels == key[1]:
            return inst
        cached = self._in_use_for
        if cached is None or cached[0] != key:
            adapted = dataclasses.replace(inst, calibration=scan.calibration, n_channels=scan.n_channels)
            cached = self._in_use_for = (key, adapted)
        return cached[1]

    def instrument_text(self) -> str:
        """Which instrument the session uses, in words (for the file's description)."""
        fit = self.instrument_fit
        if self.instrument_in_use is None or fit is None or not self._fitted_to(self._owner.scan):
            return ""
        return f"fitted to {fit.source} (from this scan)"
