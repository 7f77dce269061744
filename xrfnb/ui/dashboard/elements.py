"""The dashboard's "Element maps" section: an RGB overlay of three chosen element maps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import holoviews as hv
import numpy as np
import panel as pn

from ..._errors import DataError
from .common import MAIN_PX, rgb_image

if TYPE_CHECKING:  # pragma: no cover
    from ...fitting.elements import ElementMaps
    from .app import Dashboard

__all__ = ["ElementViews"]

#: each overlay channel is scaled to this percentile of its element's counts
RGB_PERCENTILE = 99.0


def _element_label(element: str, family: str | None) -> str:
    return f"{element} {family}" if family else element


class ElementViews(pn.viewable.Viewer):
    """The "Element maps" section of a :class:`~xrfnb.ui.dashboard.Dashboard`: an RGB overlay of three
    chosen element maps, each channel scaled to its own 99th percentile (stated in its legend).

    Parameters
    ----------
    owner : Dashboard
        The dashboard whose element maps are shown.
    """

    def __init__(self, owner: Dashboard) -> None:
        super().__init__()
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

    def __panel__(self) -> pn.Column:
        return self.section

    # -- data -----------------------------------------------------------------------------------
    def _element_maps(self) -> ElementMaps | None:
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
        top = float(np.percentile(finite, RGB_PERCENTILE)) if finite.size else 0.0
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
    def overlay_element(self) -> hv.RGB:
        """The RGB overlay as an :class:`holoviews.RGB` on the map's axes (mm or pixels)."""
        rgb, legend = self.overlay_rgb()
        owner = self._owner
        mm, axes = owner.map_scale()
        rows, cols = rgb.shape[:2]
        scale = (MAIN_PX * 0.8) / max(rows, cols)
        names = " / ".join(label for _, label, _ in legend)
        return rgb_image(rgb, mm, axes).opts(
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
