"""What the dashboard says in words about the selection: the selected pixel's counts and pigments, the
area fractions of a selected region, the out-of-distribution banner, the calls table of a single
spectrum with the element evidence behind each call, and the open file's description."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn

from ..._errors import XRFNBError
from ...core.calls import is_present
from ...physics.pigments import pigments
from .files import adapted_models_folder

if TYPE_CHECKING:  # pragma: no cover
    from .app import Dashboard

__all__ = ["ADAPT_LABEL", "ADAPT_OOD_SHARE", "SelectionInfo"]


#: share of out-of-distribution pixels above which the banner suggests adapting the model (as
#: ``xrfnb identify`` does)
ADAPT_OOD_SHARE = 0.2
#: the label of the dashboard's buttons that adapt the model (:mod:`.adaptation`)
ADAPT_LABEL = "Adapt the model to this scanner"


class SelectionInfo(pn.viewable.Viewer):
    """Texts about the selection of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose selection is described.
    """

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self._dash = dash
        self.info = pn.pane.Markdown("", sizing_mode="stretch_width", css_classes=["xrfnb-info"])
        self.ood_alert = pn.pane.Alert(
            "", alert_type="warning", visible=False, sizing_mode="stretch_width", css_classes=["xrfnb-ood"]
        )
        self.fractions = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.scan_info = pn.pane.Markdown("", sizing_mode="stretch_width", css_classes=["xrfnb-scan-info"])
        self.calls = pn.pane.Markdown(
            "", sizing_mode="stretch_width", visible=False, css_classes=["xrfnb-calls"]
        )
        self._class_element_cache: dict[tuple[int, str], tuple[str, ...]] = {}

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.ood_alert, self.info, self.fractions, self.calls)

    # -- the selection ----------------------------------------------------------------------------
    def update_selection(self) -> None:
        """The info line under the map and, for a region, its pigment area fractions."""
        d = self._dash
        maps = d.maps
        if maps is None or d.region is None:
            self.fractions.object = ""
        else:
            fr = d.area_fractions(d.region)
            lines = ["| pigment | area fraction |", "|---|---|"]
            lines += [f"| {c} | {100 * v:.1f} % |" for c, v in sorted(fr.items(), key=lambda kv: -kv[1])]
            self.fractions.object = "**Pigment area fractions in the selected region**\n\n" + "\n".join(lines)
        if d.pixel is not None and d.scan is not None:
            r, c = d.pixel
            text = f"Selected: pixel (row {r}, col {c}), {d.total_counts[r, c]:.0f} counts"
            if maps is not None:
                here = is_present(np.asarray(maps.probability[r, c], dtype=float), d.threshold_array())
                present = [cl for k, cl in enumerate(d.classes) if here[k]]
                text += "; pigments: " + (", ".join(present) if present else "none above threshold")
                score = float(maps.ood_score[r, c])
                text += f"; OOD score {score:.2f}"
                if score > float(maps.ood_threshold):
                    text += f" (**out of distribution**: above {float(maps.ood_threshold):.2f})"
            self.info.object = text
        elif d.region is not None:
            self.info.object = f"Selected: region of {int(d.region.sum())} pixels"

    def update_ood_alert(self) -> None:
        """The out-of-distribution banner: the scan's share of OOD pixels and whether the selection is."""
        summary = self._dash.ood_summary()
        if summary is None or (summary["n_ood"] == 0):
            self.ood_alert.visible = False
            self.ood_alert.object = ""
            return
        thr = summary["threshold"]
        n_ood, n_valid = summary["n_ood"], summary["n_valid"]
        parts = []
        if summary.get("pixel_ood"):
            parts.append(
                f"**The selected pixel is out of distribution** (OOD score {summary['pixel_score']:.2f}, "
                f"above {thr:.2f}): its spectrum is unlike the simulated paintings the model was trained "
                "on, so its pigment calls are **not reliable**."
            )
        elif "region_fraction" in summary and summary["region_fraction"] > 0:
            parts.append(
                f"**{100 * summary['region_fraction']:.0f} % of the selected region is out of "
                "distribution**: treat its pigment calls with caution."
            )
        share = "All" if n_ood == n_valid else f"{100 * summary['fraction']:.1f} %"
        parts.append(
            f"Out of distribution: {share} of this scan's pixels ({n_ood} of {n_valid}; OOD score above "
            f"{thr:.2f}). Pigment calls on those pixels are unreliable; the *OOD score* view shows where."
        )
        if summary["fraction"] > ADAPT_OOD_SHARE:
            parts.append(
                "So many unfamiliar pixels usually mean a scanner unlike the model's training: adapt the "
                f"model to it with *{ADAPT_LABEL}* below (about 15 minutes; the page stays usable, and the "
                "maps are made again with the adapted model), or on the command line: `xrfnb adapt SCAN "
                f"--out {adapted_models_folder() / 'NAME'}` puts it where this list, `xrfnb identify "
                "--model NAME` and `xrfnb.load_model('NAME')` find it."
            )
        self.ood_alert.object = " ".join(parts)
        self.ood_alert.alert_type = "danger" if summary.get("pixel_ood") or n_ood == n_valid else "warning"
        self.ood_alert.visible = True

    def update_scan_info(self) -> None:
        """The open file's description under the map."""
        self.scan_info.object = self._dash.scan_info_text()

    # -- the calls of a single spectrum -----------------------------------------------------------
    def class_elements(self, cls: str) -> tuple[str, ...]:
        """Key elements of a class (its pigments' ``elements``), cached per maps."""
        key = (id(self._dash.maps), cls)
        if key not in self._class_element_cache:
            library = pigments()
            members = library.groups().get(cls) or (cls,)
            out: list[str] = []
            for name in members:
                try:
                    out.extend(library[name].elements)
                except XRFNBError:
                    continue
            self._class_element_cache[key] = tuple(dict.fromkeys(out))
        return self._class_element_cache[key]

    def calls_table(self) -> list[dict[str, Any]]:
        """The pigment calls at the selected pixel (:meth:`xrfnb.PigmentMaps.calls_at`) with their
        evidence, most probable first.

        Returns
        -------
        list of dict
            One per class: ``class``, ``probability``, ``threshold``, ``call`` ("surface", "buried" or
            "" when below the threshold), ``evidence`` (the class's key elements as the element fit found
            them at the pixel: net counts +- sigma, or "not detected (< detection limit)").
        """
        d = self._dash
        maps = d.maps
        if maps is None or d.pixel is None:
            return []
        r, c = d.pixel
        em = getattr(maps, "element_maps", None)
        fit: dict[str, tuple[float, float, float, bool]] = {}
        if em is not None:
            det = np.asarray(em.present(), dtype=bool)[r, c]
            for i, el in enumerate(em.elements):
                fit[el] = (
                    float(em.intensity[r, c, i]),
                    float(em.sigma[r, c, i]),
                    float(em.detection_limit[r, c, i]),
                    bool(det[i]),
                )
        rows = []
        for call in maps.calls_at(r, c, d.threshold_array()):
            evidence = []
            for el in self.class_elements(call.class_name):
                if el not in fit:
                    continue
                value, sigma, limit, detected = fit[el]
                evidence.append(
                    f"{el} {value:,.0f} ± {sigma:,.0f} counts"
                    if detected
                    else f"{el} not detected (< {limit:,.0f})"
                )
            rows.append(
                {
                    "class": call.class_name,
                    "probability": call.probability,
                    "threshold": call.threshold,
                    "call": call.call,
                    "evidence": "; ".join(evidence) if evidence else "no element lines fitted",
                }
            )
        return rows

    def update_calls(self) -> None:
        """The calls table of a single spectrum (hidden for a map)."""
        d = self._dash
        single = d.single_spectrum
        self.calls.visible = single
        if not single:
            self.calls.object = ""
            return
        rows = self.calls_table()
        if not rows:
            if not d.model_available():
                why = "no trained model"
            elif d.needs_calibration():
                why = "the spectrum needs an energy calibration first (see 'Energy calibration')"
            else:
                why = "the model has not finished yet"
            self.calls.object = "### Pigment calls\n\nNo pigment calls: " + why
            return
        called = [row for row in rows if row["call"]]
        shown = called + [row for row in rows if not row["call"]][:5]
        lines = [
            "### Pigment calls for this spectrum",
            "",
            "| pigment class | probability | threshold | call | evidence (element fit) |",
            "|---|---:|---:|---|---|",
        ]
        for row in shown:
            call = f"**{row['call']}**" if row["call"] else "absent"
            lines.append(
                f"| {row['class']} | {row['probability']:.2f} | {row['threshold']:.2f} | {call} | "
                f"{row['evidence']} |"
            )
        if not called:
            lines.insert(2, "No class reaches its threshold. The most probable ones:\n")
        self.calls.object = "\n".join(lines)
