"""The dashboard's spectrum and its evidence: the measured spectrum of the selected pixel or region with
the lines of the elements found there, the spectrum of the paint stack fitted to the called pigments and
its residual, and the class probabilities as bars with their thresholds."""

from __future__ import annotations

import dataclasses
import functools
import logging
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn

from ..._errors import XRFNBError
from ...core.lines import FAMILY_LINES, LineMarker, element_lines, families_shown
from ...fitting.stackfit import StackFit, fit_stack
from ...physics.instrument import Instrument, resolve_instrument
from ...physics.pigments import pigments
from ...physics.stack import Stack
from .bokeh import SwitchingPlot, TapSubscriptions, name_hook, weak_hook, write_to_plot
from .common import guarded, message_plot, micro
from .files import FITS, INSTRUMENTS

if TYPE_CHECKING:  # pragma: no cover
    from bokeh.events import Tap
    from bokeh.models import ColumnDataSource
    from holoviews.plotting.bokeh.element import ElementPlot

    from .app import Dashboard

__all__ = ["TITLE_CHARS", "SpectrumPanel", "label_tiers", "marker_lines"]

log = logging.getLogger(__name__)

#: characters per title line of the residual plot's frame (bold 9 pt: 66 were cut)
TITLE_CHARS = 52
#: lowest line energy marked on a spectrum, keV (below it the detector sees little)
MARKER_MIN_KEV = 0.9
#: screen width of one upright line label (8 pt), and of the spectrum's frame, pixels
LABEL_PX, FRAME_PX = 13, 480
#: rows of line labels above a spectrum at most, and the share of the plot's height each takes
LABEL_TIERS, TIER_SHARE = 2, 0.2


def marker_lines(element: str, family: str | None, max_keV: float) -> list[LineMarker]:
    """The named line groups of ``element`` marked on a spectrum up to ``max_keV``: those of ``family``
    (``"K"``, ``"L"``, ``"M"``: the one the element fit found), else of every family a painting's
    spectrum shows for it (:func:`xrfnb.core.lines.families_shown`)."""
    families = families_shown(element) if family is None else (family[0].upper(),)
    groups = [g for fam in families for g in FAMILY_LINES.get(fam, ())]
    lines = element_lines(element, MARKER_MIN_KEV, max_keV, groups)
    return [m for m in lines if m.energy_keV > MARKER_MIN_KEV]


def label_tiers(lines: Sequence[LineMarker], gap_keV: float, tiers: int = LABEL_TIERS) -> list[int | None]:
    """The row of labels (0: the lowest) each line's label goes in, or None when it fits in none.

    Labels closer than ``gap_keV`` overlap in one row: a label takes the lowest row that has room, the
    strongest line groups (Ka, La, Ma) first, so that a weaker line (Kb, Lb, ...) next to them loses
    its label (its dashed marker stays) rather than hiding theirs.
    """
    order = sorted(range(len(lines)), key=lambda i: (not lines[i].line.endswith("a"), lines[i].energy_keV))
    placed: list[list[float]] = [[] for _ in range(tiers)]
    out: list[int | None] = [None] * len(lines)
    for i in order:
        e = lines[i].energy_keV
        for t in range(tiers):
            if all(abs(e - other) >= gap_keV for other in placed[t]):
                placed[t].append(e)
                out[i] = t
                break
    return out


class SpectrumPanel(pn.viewable.Viewer):
    """The spectrum, residual and class-probability plots of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose selection is shown.
    taps : TapSubscriptions
        The dashboard's record of subscribed figures (a click on the spectrum picks a calibration peak).
    """

    def __init__(self, dash: Dashboard, taps: TapSubscriptions) -> None:
        super().__init__()
        self._dash = dash
        self._taps = taps
        self.sim_reason = ""
        self._pigment_cache: dict[tuple[int, str], str | None] = {}
        self.spectrum = SwitchingPlot(
            dash,
            self._spectrum_element,
            self._spectrum_kind,
            ["pixel", "region", "thresholds", "log_scale", "simulate_stack", "data_version"],
            dash.document_hold,
            css_classes=["xrfnb-spectrum"],
            unchanged=self._spectrum_unchanged,
        )
        self.prob = SwitchingPlot(
            dash,
            self._probability_element,
            self.probability_kind,
            ["pixel", "region", "thresholds", "data_version"],
            dash.document_hold,
            patch=self._patch_probability,
        )
        self.residual = SwitchingPlot(
            dash,
            self._residual_element,
            self._residual_kind,
            ["pixel", "region", "thresholds", "simulate_stack", "data_version"],
            dash.document_hold,
            unchanged=self._spectrum_unchanged,
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.spectrum.pane, self.residual.pane, self.prob.pane)

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    # -- the measured spectrum --------------------------------------------------------------------
    def _spectrum_kind(self) -> str:
        # one plot per axis type: Bokeh cannot switch a linear axis to log in place
        d = self._dash
        if d.scan is None or (d.pixel is None and d.region is None):
            return "Text"
        return "Overlay-log" if d.log_scale else "Overlay"

    def _spectrum_unchanged(self, events: Sequence[Any]) -> bool:
        """Threshold changes alter the spectrum and residual plots only through the simulated stack,
        i.e. only when they change which classes are present (or buried) at the selection."""
        d = self._dash
        if not all(e.name == "thresholds" for e in events):
            return False
        if not d.simulate_stack or d.maps is None or (d.pixel is None and d.region is None):
            return True
        before = d.selection_layers(events[0].old or {})
        after = d.selection_layers(events[-1].new or {})
        return all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))

    def _spectrum_element(self, **kwargs: Any) -> hv.Element:
        d = self._dash
        try:
            label, energy, counts = d.current_spectrum()
        except XRFNBError as exc:
            return message_plot(str(exc), width=560, height=300)
        y = np.maximum(counts, 0.5) if d.log_scale else counts
        curve = hv.Curve((energy, y), "Energy (keV)", "Counts", label="measured").opts(
            color="#222222", line_width=1
        )
        total = float(counts.sum())
        ymax = float(y.max()) if y.size else 1.0
        y0 = 0.5 if d.log_scale else 0.0
        lines = [m for el, fam in d.present_elements() for m in marker_lines(el, fam, float(energy[-1]))]
        # line labels in up to two rows above the highest peak, where they do not overlap; the y range
        # (framewise: it follows the shown spectrum) leaves a share of the plot's height to each row
        gap = LABEL_PX * float(energy[-1] - energy[0]) / FRAME_PX if energy.size > 1 else 0.0
        tiers = label_tiers(lines, gap)
        rows = max((t + 1 for t in tiers if t is not None), default=0)

        def axis(v: float) -> float:
            return float(np.log10(v)) if d.log_scale else v

        def value(u: float) -> float:
            return float(10**u) if d.log_scale else u

        u0, upeak = axis(y0), axis(max(ymax * 1.02, y0 + 1.0))
        span = (upeak - u0) / (1.0 - TIER_SHARE * rows - 0.02)
        top = value(u0 + span)
        seg = hv.Segments(
            [(m.energy_keV, y0, m.energy_keV, ymax * 1.02) for m in lines],
            ["Energy (keV)", "Counts", "x1", "y1"],
        )
        labels = hv.Labels(
            [
                (m.energy_keV, value(upeak + (0.02 + TIER_SHARE * t) * span), m.label)
                for m, t in zip(lines, tiers, strict=True)
                if t is not None
            ],
            ["Energy (keV)", "Counts"],
            "line",
        )
        sim = self.simulated_spectrum()
        sim_y = np.zeros(0) if sim is None else (np.maximum(sim[1], 0.5) if d.log_scale else sim[1])
        sim_curve = hv.Curve((energy[: sim_y.size], sim_y), "Energy (keV)", "Counts", label="simulated").opts(
            color="#d62728", line_width=1, alpha=0.8
        )
        overlay = (
            curve
            * sim_curve
            * seg.opts(color="#1f77b4", line_dash="dashed", line_width=1, alpha=0.7)
            * labels.opts(text_font_size="8pt", text_color="#1f77b4", angle=90, text_align="left")
        )
        return overlay.opts(
            hv.opts.Curve(framewise=True),
            hv.opts.Segments(framewise=True),
            hv.opts.Labels(framewise=True),
            hv.opts.Overlay(
                title=f"Spectrum of {label}: {total:.0f} counts",
                width=560,
                height=300,
                ylim=(y0, top),
                logy=d.log_scale,
                show_legend=False,
                tools=["hover"],
                hooks=[name_hook("xrfnb-spectrum"), weak_hook(self._spectrum_tap_hook)],
                framewise=True,
            ),
        )

    def _spectrum_tap_hook(self, plot: ElementPlot, element: hv.Element) -> None:
        """Listen to clicks on the rendered spectrum figure (once per figure): a HoloViews Tap stream on
        a DynamicMap of overlays gets no callback."""
        self._taps.subscribe(plot.state, self._on_spectrum_click)

    @guarded
    def _on_spectrum_click(self, event: Tap) -> None:
        """A click on the spectrum while the calibration card is open enters the chosen line there."""
        d = self._dash
        if event.x is None or d.scan is None or d.calibration_panel.card.collapsed:
            return
        d.calibration_panel.pick(float(event.x))

    # -- the fitted stack of the called pigments --------------------------------------------------
    def representative(self, cls: str) -> str | None:
        """The library pigment standing for a class (:meth:`xrfnb.PigmentLibrary.representative`),
        cached per maps."""
        key = (id(self._dash.maps), cls)
        if key not in self._pigment_cache:
            self._pigment_cache[key] = pigments().representative(cls)
        return self._pigment_cache[key]

    def predicted_pigments(self) -> tuple[tuple[str, ...], tuple[str, ...]] | str:
        """``(surface pigments, buried pigments)`` the maps call at the pixel or region, or the reason why
        there are none.

        Classes above threshold go to the surface layer, or below it where the model says the class is
        present only below the surface; each class is represented by the first pigment of its ambiguity
        group (XRF cannot tell the group's members apart).
        """
        d = self._dash
        if d.maps is None:
            return "no pigment maps"
        if d.pixel is None and d.region is None:
            return "no pixel selected"
        present, buried = d.selection_layers(d.thresholds)
        names: dict[bool, list[str]] = {True: [], False: []}
        for k, cls in enumerate(d.classes):
            if present[k]:
                pigment = self.representative(cls)
                if pigment is not None:
                    names[bool(buried[k])].append(pigment)
        if not names[True] and not names[False]:
            return "no library pigment above threshold"
        return tuple(names[False]), tuple(names[True])

    def instrument(self) -> Instrument:
        """The instrument the session simulates and fits with: the one fitted to the scan when the user
        chose to use it (:meth:`~xrfnb.ui.dashboard.calibration.CalibrationPanel.used_instrument`), else
        the scan's preset (else the default one, :func:`xrfnb.physics.instrument.resolve_instrument`), with
        the scan's calibration and channels."""
        fitted = self._dash.calibration_panel.used_instrument()
        if fitted is not None:
            return fitted
        scan = self._dash.scan
        name = scan.metadata.get("instrument")
        key = (name, scan.calibration, scan.n_channels)
        inst = INSTRUMENTS.get(key)
        if inst is None:
            try:
                base = resolve_instrument(None, scan.metadata)
            except XRFNBError:
                base = resolve_instrument()
            inst = dataclasses.replace(base, calibration=scan.calibration, n_channels=scan.n_channels)
            INSTRUMENTS.put(key, inst)
        return inst

    def fitted_stack(self) -> StackFit | None:
        """The :class:`~xrfnb.StackFit` of the called pigments to the pixel's (or region's mean) spectrum.

        :func:`xrfnb.fit_stack` searches surface thickness, pigment load and the pigments' relative
        amounts for the stack whose simulated spectrum best explains the measured counts, so the residual
        shows what the calls leave unexplained. Returns ``None`` with the reason in :attr:`sim_reason`
        when there is nothing to fit. Cached per spectrum and pigments.
        """
        called = self.predicted_pigments()
        if isinstance(called, str):
            self.sim_reason = called
            return None
        _, _, counts = self._dash.current_spectrum()
        inst = self.instrument()
        surface, buried = called
        if not surface:
            # only pigments called as buried: nothing is known about the layer above them (fit_stack
            # cannot build a pigment-free surface layer), so they are fitted as one paint layer
            surface, buried = buried, ()
        key = (surface, buried, id(inst), hash(counts.tobytes()))
        fit = FITS.get(key)
        if fit is None:
            fit = fit_stack(counts, inst, surface, buried)
            FITS.put(key, fit)
        return fit

    def predicted_stack(self) -> tuple[Stack | None, str]:
        """The fitted paint stack at the pixel or region and its description (pigments, weight fractions,
        surface thickness); ``(None, reason)`` when there is nothing to simulate."""
        fit = self.fitted_stack()
        if fit is None:
            return None, self.sim_reason
        return fit.stack, micro(fit.describe())

    def simulated_spectrum(self) -> tuple[str, np.ndarray] | None:
        """``(description, expected counts (channels,))`` of the fitted stack (:meth:`fitted_stack`),
        scaled to the measured counts in the fitted energy range; None when switched off or nothing can be
        simulated (the reason is kept in :attr:`sim_reason`)."""
        d = self._dash
        self.sim_reason = "switched off"
        if not d.simulate_stack or d.scan is None:
            return None
        try:
            fit = self.fitted_stack()
        except XRFNBError as exc:
            # the simulator's own wording (layer internals) stays in the log; the plot says what failed
            log.warning("simulating the called stack of %s failed: %s", d.label, exc)
            called = self.predicted_pigments()
            what = ", ".join(called[0] + called[1]) if not isinstance(called, str) else "the called pigments"
            self.sim_reason = f"{what} could not be simulated for this spectrum"
            return None
        if fit is None:
            return None
        self.sim_reason = ""
        return f"{micro(fit.describe())}; deviance {fit.reduced_deviance:.2f} per channel", fit.expected

    def _residual_kind(self) -> str:
        # always an overlay (an empty one with the reason when nothing is simulated), but a fresh plot when
        # switching between empty and data: an empty first frame leaves Bokeh's axes at (0, 1)
        d = self._dash
        if not d.simulate_stack or d.maps is None or (d.pixel is None and d.region is None):
            return "Overlay-empty"
        try:
            return "Overlay" if not isinstance(self.predicted_pigments(), str) else "Overlay-empty"
        except XRFNBError:
            return "Overlay-empty"

    def _residual_element(self, **kwargs: Any) -> hv.Element:
        d = self._dash
        sim = self.simulated_spectrum() if d.maps is not None else None
        zero = hv.HLine(0.0).opts(color="#555555", line_width=1)
        opts = {
            "width": 560,
            "height": 170,
            "framewise": True,
            "show_legend": False,
            "tools": ["hover"],
            "fontsize": {"title": 9},
        }
        if sim is None:
            reason = self.sim_reason if d.maps is not None else "no pigment maps"
            empty = hv.Curve([], "Energy (keV)", "Measured - simulated")
            return (empty * zero).opts(hv.opts.Overlay(title=f"No simulated spectrum: {reason}", **opts))
        desc, expected = sim
        _, energy, counts = d.current_spectrum()
        residual = counts - expected
        curve = hv.Curve((energy, residual), "Energy (keV)", "Measured - simulated").opts(
            color="#d62728", line_width=1
        )
        # a long stack description wraps onto more title lines (Bokeh draws "\n") instead of being cut off
        title = textwrap.fill(f"Residual vs fitted stack: {desc}", TITLE_CHARS, break_long_words=False)
        opts["height"] += 12 * title.count("\n")
        # framewise on the curve itself: the y range follows each new residual, not the first one
        return (curve * zero).opts(hv.opts.Curve(framewise=True), hv.opts.Overlay(title=title, **opts))

    # -- class probabilities ----------------------------------------------------------------------
    def probability_kind(self) -> str:
        """Element type of the probability bars now ("Text" without maps or selection)."""
        d = self._dash
        return "Text" if d.maps is None or (d.pixel is None and d.region is None) else "Overlay"

    def _probability_element(self, **kwargs: Any) -> hv.Element:
        d = self._dash
        if d.maps is None or (d.pixel is None and d.region is None):
            msg = "No class probabilities: " + (
                "no trained model"
                if not d.model_available()
                else "no pigment maps yet"
                if d.maps is None
                else "tap a pixel"
            )
            return message_plot(msg, width=560, height=220)
        title, table = self.probability_table()
        # horizontal bars, one row per class: every class name is legible (31 classes with the shipped
        # model; rotated names under vertical bars were cut)
        n = len(table["class"])
        bars = hv.Bars(table, "class", ["probability", "threshold", "color"]).opts(
            color="color", ylim=(0, 1.05), invert_axes=True, tools=["hover"], line_color="#555555"
        )
        marks = hv.Scatter(table, "class", "threshold").opts(
            marker="dash",
            angle=90,  # degrees: a vertical tick across the horizontal bar
            size=max(8, min(22, 300 // max(n, 1))),
            color="black",
            line_width=2,
            invert_axes=True,
        )
        return (bars * marks).opts(
            hv.opts.Overlay(
                title=title,
                width=560,
                height=max(200, 60 + 15 * n),
                show_legend=False,
                framewise=True,
                fontsize={"yticks": "8pt" if n > 12 else "9pt", "title": "10pt"},
            )
        )

    def probability_table(self) -> tuple[str, dict[str, Any]]:
        """Title and columns (class, probability, threshold, bar color) of the class-probability bars."""
        d = self._dash
        maps = d.maps
        if d.region is not None:
            prob = np.asarray(maps.probability, dtype=float)[d.region].mean(axis=0)
            title = "Mean class probability in the region"
        else:
            r, c = d.pixel
            prob = np.asarray(maps.probability[r, c], dtype=float)
            title = f"Class probabilities at pixel (row {r}, col {c})"
            if bool(np.asarray(maps.mask)[r, c]):
                title += " (invalid pixel)"
            elif float(np.asarray(maps.ood_score[r, c], dtype=float)) > float(maps.ood_threshold):
                title += "\nOUT OF DISTRIBUTION: these calls are unreliable"
        thr = d.threshold_array()
        colors = list(getattr(maps, "colors", None) or ["#888888"] * len(d.classes))
        table = {
            "class": list(d.classes),
            "probability": prob,
            "threshold": thr,
            "color": [colors[k] if prob[k] >= thr[k] else "#cccccc" for k in range(len(prob))],
        }
        return title, table

    def _patch_probability(self, events: Sequence[Any], plots: list[Any]) -> bool:
        """Write new thresholds (marks, bar colours) into the rendered probability bars; False if it cannot.

        The bars' classes and heights stay as they are (checked against the plot's data source), and
        so do the axes (the y range is fixed at 0 to 1.05).
        """
        if not all(e.name == "thresholds" for e in events) or self.probability_kind() != "Overlay":
            return False
        _, table = self.probability_table()
        targets = []
        for plot in plots:
            sources = [sub.handles.get("source") for sub in getattr(plot, "subplots", {}).values()]
            bars = [s for s in sources if s is not None and {"color", "probability"} <= set(s.data)]
            marks = [s for s in sources if s is not None and "color" not in s.data and "threshold" in s.data]
            if len(bars) != 1 or len(marks) != 1:
                return False
            for src in (bars[0], marks[0]):
                if list(src.data["class"]) != table["class"]:
                    return False
            if not np.array_equal(np.asarray(bars[0].data["probability"], float), table["probability"]):
                return False
            targets.append((plot, bars[0], marks[0]))

        def write(bar_source: ColumnDataSource, mark_source: ColumnDataSource) -> None:
            bar_source.data.update(threshold=table["threshold"], color=table["color"])
            mark_source.data["threshold"] = table["threshold"]

        for plot, bar_source, mark_source in targets:
            write_to_plot(plot, functools.partial(write, bar_source, mark_source))
        return True
