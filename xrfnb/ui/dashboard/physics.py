"""The dashboard's "Checked by physics" section: the network's call at the selected pixel (or of the single
spectrum) weighed against its alternatives by paint-stack fits (:mod:`xrfnb.model.physics_check`), and the
call patterns of a selected or kept region with their checks.

Where the check was made while mapping, the section shows it: the physics-checked call, whether it changed
the network's call, and the alternatives best first, each with its ΔBIC, its fitted stack and its evidence
line. Where it was not, a button checks it now, off the event loop in a server session:

- a pattern left beyond the mapping's budget of fits, on the mean spectrum the maps kept for it
  (:meth:`xrfnb.PigmentMaps.check_pattern`);
- a pixel whose pattern has too few pixels to have a mean spectrum, a single spectrum, or maps made without
  the check, on the pixel's own spectrum (:meth:`xrfnb.PigmentModel.identify` with ``check_physics=True``).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn

from ..._errors import DataError
from ...model.physics_check import NO_ALTERNATIVE, CallPattern, Explanation, PhysicsCheck
from ...physics.instrument import Instrument
from .common import guarded, micro
from .files import load_model_cached
from .job import JobRunner, MappingJob, reraise_for_user

if TYPE_CHECKING:  # pragma: no cover
    from param.parameterized import Event

    from ...model.model import Identification
    from .app import Dashboard

__all__ = ["CHECK_LABEL", "REGION_CHECKS", "CallCheckView", "CheckJob", "PhysicsPanel"]

#: the label of the button that checks the selected pixel's call now
CHECK_LABEL = "Check this call by physics"
#: the label of the button that checks the selected region's unchecked call patterns now
REGION_CHECK_LABEL = "Check this region's calls by physics"
#: at most this many unchecked patterns of a region are checked by one click (most pixels first)
REGION_CHECKS = 4
#: the panel's width on screen, pixels (that of the spectrum beside it)
PANEL_PX = 560
#: what ΔBIC means, for people (Kass and Raftery's scale, as :mod:`xrfnb.model.physics_check` uses it)
DELTA_BIC_WORDS = (
    "ΔBIC: how much worse an explanation accounts for the photons than the chosen one (below 2: about as "
    "well; above 6: clearly worse; negative: better, but not by enough to overrule the network's call). "
    "Alternatives are what this spectrum cannot tell apart, not a ruling: "
    "a real paint can differ from the simulator's (impurities, a ground)."
)


def _text(value: object) -> str:
    """``value`` as text safe in a Markdown pane (no HTML), micrometres written as µm."""
    return micro(html.escape(str(value), quote=False)).replace("|", "/")


def _names(classes: Sequence[str]) -> str:
    return ", ".join(classes) if classes else "nothing"


@dataclasses.dataclass(frozen=True)
class CallCheckView:
    """What the section says about the physics check of one call (:meth:`PhysicsPanel.pixel_view`).

    Attributes
    ----------
    where : str
        The call's place, for people ("pixel (row 3, col 5)", "this spectrum").
    network_call : tuple of str
        The network's called classes (at the model's calibrated thresholds).
    checked : bool
        Whether paint stacks were fitted.
    best_classes : tuple of str
        The physics-checked call (the network's when not checked).
    changed : bool
        Whether the physics check changed the network's call.
    alternatives : tuple of Explanation
        The explanations within the check's margin, the chosen one first (empty when not checked).
    fitted_on : str
        What the stacks were (or would be) fitted to, for people.
    note : str
        Why the call was not checked, or is empty.
    action : str
        What :meth:`PhysicsPanel.check_selected` would do: ``"pattern"`` (check the pattern's mean
        spectrum), ``"spectrum"`` (check the pixel's own spectrum) or ``""`` (nothing to check).
    pattern : CallPattern or None
        The pixel's call pattern in the maps, if it has one.
    called_delta_bic : float or None
        How much worse (BIC) the network's call explains the spectrum than the chosen explanation; None
        when not checked.
    """

    where: str
    network_call: tuple[str, ...]
    checked: bool
    best_classes: tuple[str, ...]
    changed: bool
    alternatives: tuple[Explanation, ...]
    fitted_on: str = ""
    note: str = ""
    action: str = ""
    pattern: CallPattern | None = None
    called_delta_bic: float | None = None


@dataclasses.dataclass(eq=False)
class CheckJob(MappingJob):
    """A physics check run off the event loop (:class:`~xrfnb.ui.dashboard.job.JobRunner`).

    Attributes
    ----------
    pixel : (int, int) or None
        The pixel whose own spectrum is checked (a ``"spectrum"`` check).
    indices : tuple of int
        The call patterns checked on their mean spectra (a ``"pattern"`` check).
    identification : Identification or None
        A ``"spectrum"`` check's result.
    """

    determinate: bool = False
    pixel: tuple[int, int] | None = None
    indices: tuple[int, ...] = ()
    identification: Identification | None = None

    @property
    def unit(self) -> str:
        """What :attr:`done` counts: call patterns checked."""
        return "call patterns"


class PhysicsPanel(pn.viewable.Viewer):
    """The "Checked by physics" part of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose selection is described.
    """

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self._dash = dash
        #: checks of single spectra made on demand: (id of the maps, row, col) -> Identification
        self._identified: dict[tuple[int, int, int], Identification] = {}
        #: call patterns checked on demand: (id of the maps, pattern index); one still unchecked says why
        self._tried: set[tuple[int, int]] = set()
        self.jobs = JobRunner(self._on_job_progress, self.finish_job)
        self.pixel_text = pn.pane.Markdown(
            "", sizing_mode="stretch_width", css_classes=["xrfnb-physics-pixel"]
        )
        self.check_w = pn.widgets.Button(
            label=CHECK_LABEL, width=230, visible=False, css_classes=["xrfnb-physics-check"]
        )
        self.region_check_w = pn.widgets.Button(
            label=REGION_CHECK_LABEL, width=270, visible=False, css_classes=["xrfnb-physics-region-check"]
        )
        self.progress_text = pn.pane.HTML(
            "", visible=False, styles={"font-size": "12px"}, css_classes=["xrfnb-physics-progress"]
        )
        self.region_text = pn.pane.Markdown(
            "", sizing_mode="stretch_width", css_classes=["xrfnb-physics-region"]
        )
        self.check_w.on_click(self._on_check)
        self.region_check_w.on_click(self._on_check_region)
        self.section = pn.Column(
            self.pixel_text,
            pn.Row(self.check_w, self.region_check_w),
            self.progress_text,
            self.region_text,
            width=PANEL_PX,
            css_classes=["xrfnb-physics"],
        )
        dash.param.watch(self._on_selection, ["pixel", "region", "thresholds"])
        dash.param.watch(self._on_data, ["data_version"])
        self.update()

    def __panel__(self) -> pn.viewable.Viewable:
        return self.section

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    # -- what is known --------------------------------------------------------------------------------
    def pixel_view(self) -> CallCheckView | None:
        """The physics check of the selected pixel's call (of the spectrum, for a single spectrum).

        Returns
        -------
        CallCheckView or None
            None without maps or without a selected pixel.
        """
        d = self._dash
        maps, pixel = d.maps, d.pixel
        if maps is None or pixel is None or d.region is not None:
            return None
        r, c = pixel
        where = "this spectrum" if d.single_spectrum else f"pixel (row {r}, col {c})"
        pattern = maps.pattern_at(r, c)
        own = "this pixel's own spectrum" if not d.single_spectrum else "the spectrum"

        def view(net: Sequence[str], check: PhysicsCheck | None = None, **kw: Any) -> CallCheckView:
            if check is not None and check.checked:
                called = [x for x in check.explanations if set(x.classes) == set(net)]
                kw.update(
                    checked=True,
                    best_classes=tuple(check.best_classes),
                    changed=bool(check.changed),
                    alternatives=tuple(check.alternatives),
                    called_delta_bic=float(called[0].delta_bic) if called else None,
                )
            kw.setdefault("best_classes", tuple(net))
            kw.setdefault("alternatives", ())
            kw.setdefault("changed", False)
            kw.setdefault("checked", False)
            return CallCheckView(where=where, network_call=tuple(net), pattern=pattern, **kw)

        ident = self._identified.get((id(maps), r, c))
        if ident is not None:
            check = ident.physics_check
            if check is None or not check.checked:
                note = check.note if check is not None else "not checked"
                return view(ident.network_present, fitted_on=own, note=note)
            return view(ident.network_present, check, fitted_on=own)
        if pattern is not None:
            lo, hi = pattern.counts_range
            on = (
                f"the mean spectrum of pixels with this call ({pattern.n_pixels:,} in the scan, "
                f"{lo:,}-{hi:,} counts each)"
            )
            if pattern.check is not None:
                return view(pattern.classes, pattern.check, fitted_on=on)
            if pattern.note == NO_ALTERNATIVE:
                note = (
                    "no alternative: no merge, split, drop or swap of these classes keeps their key "
                    "elements, so there is nothing to weigh the network's call against"
                )
                return view(pattern.classes, note=note)
            if pattern.mean_spectrum is not None and (id(maps), pattern.index) in self._tried:
                note = f"the check on demand could not run: {pattern.note or 'no reason given'}"
                return view(pattern.classes, fitted_on=on, note=note)
            if pattern.mean_spectrum is not None:
                note = "not checked while mapping (only the most frequent calls are fitted then)"
                return view(pattern.classes, fitted_on=on, note=note, action="pattern")
            note = (
                f"not checked while mapping: {pattern.note}"
                if not d.single_spectrum
                else "a single spectrum is not checked while mapping"
            )
            return view(pattern.classes, fitted_on=own, note=note, action=self._spectrum_action())
        # no pattern: say why
        net = tuple(call.class_name for call in maps.calls_at(r, c) if call.present)
        if bool(np.asarray(maps.mask[r, c])):
            return view((), note="this pixel is masked (dead, saturated or invalid counts): no call to check")
        if float(np.asarray(maps.ood_score[r, c], dtype=float)) > float(maps.ood_threshold):
            note = (
                "out of distribution: this spectrum is unlike the paintings the model was trained on, "
                "so its calls are not checked (they are unreliable)"
            )
            return view(net, note=note)
        if maps.pattern is None:
            note = "these pigment maps were made without the physics check"
            return view(net, fitted_on=own, note=note, action=self._spectrum_action() if net else "")
        return view(net, note="nothing is called here at the model's thresholds: there is no call to check")

    def _spectrum_action(self) -> str:
        return "spectrum" if self._dash.model_available() else ""

    def region_patterns(self, mask: np.ndarray) -> list[tuple[CallPattern, int]]:
        """The call patterns in a region and its pixels with each, most first
        (:meth:`xrfnb.PigmentMaps.patterns_in`); empty without maps."""
        maps = self._dash.maps
        return [] if maps is None else maps.patterns_in(mask)

    # -- words ------------------------------------------------------------------------------------------
    @staticmethod
    def explanation_lines(alternatives: Sequence[Explanation]) -> list[str]:
        """Markdown list items, one per explanation, the chosen one first: its pigments (classes), ΔBIC
        and Δdeviance, the fitted stack and its evidence line."""
        lines = []
        for i, x in enumerate(alternatives):
            head = f"{i + 1}. **{_text(' + '.join(x.pigments))}** ({_text(_names(x.classes))})"
            if i == 0:
                head += ", the chosen explanation"
            else:
                how = f", {_text(x.change)}" if x.change else ""
                head += f": ΔBIC {x.delta_bic:.1f}, Δdeviance {x.delta_deviance:+.1f}{how}"
            lines.append(head)
            if x.stack:
                lines.append(f"    - fitted stack: {_text(x.stack)}")
            if x.evidence:
                lines.append(f"    - evidence: {_text(x.evidence)}")
        return lines

    def pixel_markdown(self, view: CallCheckView | None) -> str:
        """The section's text about one call."""
        if view is None:
            return ""
        lines = [f"### Checked by physics: {_text(view.where)}", ""]
        lines.append(f"**The network called:** {_text(_names(view.network_call))}.")
        if view.checked:
            lines.append("")
            if view.changed:
                worse = (
                    f" (the network's call explains it worse by ΔBIC {view.called_delta_bic:.1f})"
                    if view.called_delta_bic is not None
                    else ""
                )
                lines.append(
                    f"**The physics check changed the call** to {_text(_names(view.best_classes))}: "
                    f"a paint stack of these explains the photons better{worse}."
                )
            else:
                lines.append("**The physics check keeps the network's call.**")
            lines += ["", f"Fitted to {_text(view.fitted_on)}. Explanations, best first:", ""]
            lines += self.explanation_lines(view.alternatives)
            lines += ["", f"<small>{_text(DELTA_BIC_WORDS)}</small>"]
        else:
            lines += ["", f"Not checked: {_text(view.note)}."]
            if view.action:
                lines += [
                    "",
                    f"'{CHECK_LABEL}' fits paint stacks to {_text(view.fitted_on)}; it takes seconds.",
                ]
        d = self._dash
        maps = d.maps
        if maps is not None and d.thresholds and not np.allclose(d.threshold_array(), maps.thresholds):
            lines += [
                "",
                "<small>The check is of the calls at the model's calibrated thresholds; some "
                "thresholds have been moved here.</small>",
            ]
        return "\n".join(lines)

    def region_markdown(self, mask: np.ndarray, title: str = "the selected region") -> str:
        """The call patterns of a region with their pixel counts and, for checked ones, their best
        explanation and alternatives."""
        maps = self._dash.maps
        if maps is None:
            return ""
        n = int(np.asarray(mask, dtype=bool).sum())
        head = f"### Calls checked by physics in {_text(title)}"
        if maps.pattern is None:
            return f"{head}\n\nThese pigment maps were made without the physics check."
        found = self.region_patterns(mask)
        with_call = sum(k for _, k in found)
        lines = [head, ""]
        if not found:
            lines.append(
                f"None of its {n:,} pixels has a call to check (masked, out of distribution or nothing "
                "called)."
            )
            return "\n".join(lines)
        lines.append(
            f"{with_call:,} of its {n:,} pixels have a call; {len(found)} call pattern"
            f"{'s' if len(found) != 1 else ''} (called classes and count level), most pixels first:"
        )
        lines.append("")
        for p, k in found:
            lo, hi = p.counts_range
            head = (
                f"- **{_text(_names(p.classes))}** at {lo:,}-{hi:,} counts: {k:,} "
                f"pixel{'s' if k != 1 else ''} here ({p.n_pixels:,} in the scan)"
            )
            if p.check is None:
                why = p.note or "not checked"
                if p.note == NO_ALTERNATIVE:
                    why = "no alternative keeps these key elements"
                elif p.mean_spectrum is not None:
                    why = "not checked yet"
                lines.append(f"{head}; {_text(why)}")
                continue
            verdict = (
                f"physics prefers **{_text(_names(p.best_classes))}**"
                if p.changed
                else "the physics check keeps this call"
            )
            lines.append(f"{head}; {verdict}")
            for i, x in enumerate(p.alternatives):
                what = f"{_text(' + '.join(x.pigments))} ({_text(_names(x.classes))})"
                score = "best" if i == 0 else f"ΔBIC {x.delta_bic:.1f}"
                stack = f"; fitted stack: {_text(x.stack)}" if x.stack else ""
                lines.append(f"    - {what}: {score}{stack}")
        return "\n".join(lines)

    # -- reactions --------------------------------------------------------------------------------------
    def update(self) -> None:
        """Redraw the section for the current selection (and the kept regions' listings)."""
        d = self._dash
        running = self.jobs.job is not None
        view = self.pixel_view()
        self.pixel_text.object = self.pixel_markdown(view)
        self.check_w.visible = view is not None and bool(view.action)
        self.check_w.disabled = running
        self.check_w.label = "Checking ..." if running else CHECK_LABEL
        if d.region is not None and d.maps is not None:
            self.region_text.object = self.region_markdown(d.region)
            self.region_check_w.visible = bool(self._checkable_in(d.region))
        else:
            self.region_text.object = ""
            self.region_check_w.visible = False
        self.region_check_w.disabled = running
        self.section.visible = d.maps is not None

    def _checkable_in(self, mask: np.ndarray) -> list[int]:
        """Patterns of the region that can be checked now (a mean spectrum, no check yet), most pixels
        first, at most :data:`REGION_CHECKS`."""
        maps = self._dash.maps
        out = [
            p.index
            for p, _ in self.region_patterns(mask)
            if p.check is None
            and p.mean_spectrum is not None
            and p.note != NO_ALTERNATIVE
            and (id(maps), p.index) not in self._tried
        ]
        return out[:REGION_CHECKS]

    def _on_selection(self, *events: Event) -> None:
        self.update()

    def _on_data(self, *events: Event) -> None:
        self.jobs.drop()
        self.progress_text.visible = False
        self._identified.clear()
        self._tried.clear()
        self.update()

    # -- checking now -----------------------------------------------------------------------------------
    @guarded
    def _on_check(self, event: Any = None) -> None:
        self.check_selected()

    @guarded
    def _on_check_region(self, event: Any = None) -> None:
        self.check_region()

    def check_selected(self) -> None:
        """Check the selected pixel's call now (see :class:`CallCheckView`'s ``action``); in a server
        session a worker thread fits the stacks and the section updates when it is done."""
        view = self.pixel_view()
        if view is None:
            raise DataError("tap a pixel on the map first: its call is checked by physics")
        if not view.action:
            raise DataError(f"nothing to check at {view.where}: {view.note}")
        if view.action == "pattern":
            job = CheckJob(
                "check",
                label=view.where,
                stage="checking this call by physics: fitting paint stacks",
                indices=(view.pattern.index,),
            )
        else:
            job = CheckJob(
                "check",
                label=view.where,
                stage="checking this call by physics: identifying and fitting paint stacks",
                pixel=self._dash.pixel,
            )
        self._run(job)

    def check_region(self) -> None:
        """Check the selected region's unchecked call patterns now, most pixels first (at most
        :data:`REGION_CHECKS`)."""
        d = self._dash
        if d.region is None:
            raise DataError("select a region first: the box or lasso tool on the map")
        todo = self._checkable_in(d.region)
        if not todo:
            raise DataError("every call pattern of this region that can be checked has been checked")
        stage = f"checking {len(todo)} call pattern{'s' if len(todo) != 1 else ''} of the region by physics"
        self._run(CheckJob("check", label="the selected region", stage=stage, indices=tuple(todo)))

    def _run(self, job: CheckJob) -> None:
        d = self._dash
        job.maps = d.maps
        job.scan = d.scan
        model, name = d.model_obj, d.model_name
        instrument = self._instrument()

        def work(job: CheckJob) -> None:
            maps = job.maps
            if job.pixel is not None:
                m = model if model is not None else load_model_cached(name)
                r, c = job.pixel
                job.identification = m.identify(job.scan[r, c], check_physics=True, instrument=instrument)
                return
            job.set_stage(job.stage, total=len(job.indices) if len(job.indices) > 1 else None)
            for i, index in enumerate(job.indices):
                maps.check_pattern(index, instrument=instrument)
                job.report(i + 1, len(job.indices))

        if d.data_panel.is_blocking():
            job.run(work)
            self.finish_job(job)
            return
        self.progress_text.object = html.escape(job.describe())
        self.progress_text.visible = True
        self.jobs.start(job, work)
        self.update()

    def _instrument(self) -> Instrument | None:
        """The instrument of the check: the one fitted to the scan when the session uses it, else the one
        the maps were checked with (None: the scan's, as identify resolves it)."""
        fitted = self._dash.calibration_panel.used_instrument()
        if fitted is not None:
            return fitted
        maps = self._dash.maps
        info = maps.metadata.get("physics_check", {}) if maps is not None else {}
        if isinstance(info, dict) and "instrument" in info:
            return Instrument.from_dict(info["instrument"])
        return None

    def _on_job_progress(self, job: CheckJob) -> None:
        text = html.escape(job.describe())
        if self.progress_text.object != text:
            self.progress_text.object = text

    @guarded
    def finish_job(self, job: CheckJob) -> None:
        """Show a finished check (on the event loop); a check of maps no longer shown is forgotten."""
        d = self._dash
        self.progress_text.visible = False
        try:
            if job.maps is not d.maps or job.cancelled:
                return
            if job.error is not None:
                reraise_for_user(job.error, "the physics check failed")
            if job.identification is not None and job.pixel is not None:
                self._identified[(id(job.maps), *job.pixel)] = job.identification
        finally:
            if job.error is None:  # a check that failed may be tried again
                self._tried.update((id(job.maps), i) for i in job.indices)
            self.update()
            d.region_panel.refresh_list()
