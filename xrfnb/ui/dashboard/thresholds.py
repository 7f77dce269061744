"""The dashboard's threshold controls: the global threshold, the reset to the model's calibrated
thresholds, and one slider per pigment class in a collapsed card."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import panel as pn
import param

from .common import guarded

if TYPE_CHECKING:  # pragma: no cover
    from .app import Dashboard

__all__ = ["ThresholdPanel"]


class ThresholdPanel(pn.viewable.Viewer):
    """Threshold sliders of a :class:`~xrfnb.ui.dashboard.Dashboard`, kept in step with its
    ``thresholds`` parameter.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose thresholds are set.
    """

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self._dash = dash
        self._syncing = False
        self.global_w = pn.widgets.FloatSlider.from_param(
            dash.param.global_threshold,
            label="Global threshold",
            width=280,
            css_classes=["xrfnb-global-threshold"],
        )
        self.reset_w = pn.widgets.Button(label="Reset to model thresholds", width=280)
        self.reset_w.on_click(self.reset_thresholds)
        self.slider_box = pn.Column(sizing_mode="stretch_width")
        # a 1440 x 900 screen: the per-class sliders (one per class: 31 with the shipped model) sit in a
        # collapsed card below the global threshold
        self.card = pn.Card(self.slider_box, title="Per-pigment thresholds", collapsed=True, width=290)
        self.class_sliders: dict[str, pn.widgets.FloatSlider] = {}

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.global_w, self.reset_w, self.card)

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    def build_sliders(self) -> None:
        """One slider per class of the dashboard's maps (new maps)."""
        d = self._dash
        sliders = []
        for c in d.classes:
            s = pn.widgets.FloatSlider(
                label=c, start=0.0, end=1.0, step=0.01, value=float(d.thresholds[c]), width=250
            )
            s.param.watch(functools.partial(self._on_class_slider, c), "value_throttled")
            sliders.append(s)
        self.class_sliders = dict(zip(d.classes, sliders, strict=True))
        self.slider_box.objects = sliders or [pn.pane.Markdown("No pigment classes (no maps yet).")]

    def _on_class_slider(self, cls: str, event: param.parameterized.Event) -> None:
        if self._syncing or event.new is None:
            return
        self._dash.set_threshold(cls, float(event.new))

    def sync_sliders(self) -> None:
        """Move the class sliders to the dashboard's thresholds (without feeding back)."""
        d = self._dash
        self._syncing = True
        try:
            for c, s in self.class_sliders.items():
                if c in d.thresholds and s.value != d.thresholds[c]:
                    s.value = d.thresholds[c]
        finally:
            self._syncing = False

    @property
    def syncing(self) -> bool:
        """Whether the sliders are being moved to the thresholds (their events are not the user's)."""
        return self._syncing

    @guarded
    def reset_thresholds(self, event: object = None) -> None:
        """Back to the model's calibrated thresholds."""
        d = self._dash
        if d.maps is not None:
            defaults = np.asarray(d.maps.thresholds, dtype=float)
            with d.action():
                d.thresholds = {c: float(defaults[k]) for k, c in enumerate(d.classes)}
