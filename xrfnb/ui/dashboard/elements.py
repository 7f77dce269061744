"""The dashboard's "Element maps" section: every fitted element map side by side (small multiples that
pan and zoom with the main map) and an RGB overlay of three chosen element maps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn

from ..._errors import DataError
from .bokeh import TapSubscriptions, name_hook, weak_hook
from .common import INVALID_COLOR, MAIN_PX, PALETTES, guarded, image, rgb_image, scale_bar_hook, stride

if TYPE_CHECKING:  # pragma: no cover
    from bokeh.events import Tap
    from holoviews.plotting.bokeh.element import ElementPlot

    from ...fitting.elements import ElementMaps
    from .app import Dashboard

__all__ = [
    "MOSAIC_COLUMNS",
    "MOSAIC_PERCENTILE",
    "TILE_PX",
    "TILE_SAMPLES",
    "ElementViews",
    "block_mean",
]

#: each overlay channel is scaled to this percentile of its element's counts
RGB_PERCENTILE = 99.0
#: each element map of the mosaic is coloured from 0 to this percentile of its counts (as in the report)
MOSAIC_PERCENTILE = 99.5
#: element maps per row of the mosaic (four fit beside their colour bars on a 1440-px screen)
MOSAIC_COLUMNS = 4
#: the longer side of one element map of the mosaic on screen, pixels
TILE_PX = 170
#: at most this many values a side per element map sent to the browser (block means of larger maps)
TILE_SAMPLES = 256


def _element_label(element: str, family: str | None) -> str:
    return f"{element} {family}" if family else element


def block_mean(values: np.ndarray, step: int) -> np.ndarray:
    """Means of ``step`` x ``step`` blocks of a (rows, cols) image, ignoring NaN (a block of NaN only
    is NaN); the last blocks of a side that ``step`` does not divide are the means of what they hold.

    Returns shape (ceil(rows / step), ceil(cols / step)) float.
    """
    values = np.asarray(values, dtype=float)
    if step <= 1:
        return values
    rows, cols = values.shape
    rb, cb = -(-rows // step), -(-cols // step)
    padded = np.full((rb * step, cb * step), np.nan)
    padded[:rows, :cols] = values
    blocks = padded.reshape(rb, step, cb, step)
    finite = np.isfinite(blocks)
    n = finite.sum(axis=(1, 3))
    total = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


class ElementViews(pn.viewable.Viewer):
    """The "Element maps" section of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Every fitted element map side by side (small multiples: one layout, each titled with its element and
    line family, with its own colour bar in counts and a scale bar), sharing the main map's pan and zoom
    (:class:`~xrfnb.ui.dashboard.bokeh.LinkedRanges`); a click on one selects that pixel. Below them, an
    RGB overlay of three chosen element maps, each channel scaled to its own 99th percentile (stated in
    its legend).

    Parameters
    ----------
    owner : Dashboard
        The dashboard whose element maps are shown.
    taps : TapSubscriptions
        The dashboard's record of subscribed figures (a click on an element map selects a pixel).
    """

    def __init__(self, owner: Dashboard, taps: TapSubscriptions) -> None:
        super().__init__()
        self._owner = owner
        self._taps = taps
        self.mosaic = pn.pane.HoloViews(None, linked_axes=False, css_classes=["xrfnb-element-maps"])
        self.mosaic_note = pn.pane.Markdown("", styles={"font-size": "small"}, sizing_mode="stretch_width")
        self.red = pn.widgets.Select(label="Red", options=[], width=110, css_classes=["xrfnb-rgb-red"])
        self.green = pn.widgets.Select(label="Green", options=[], width=110, css_classes=["xrfnb-rgb-green"])
        self.blue = pn.widgets.Select(label="Blue", options=[], width=110, css_classes=["xrfnb-rgb-blue"])
        self.overlay = pn.pane.HoloViews(None, linked_axes=False, css_classes=["xrfnb-element-rgb"])
        self.legend = pn.pane.HTML("", width=300, css_classes=["xrfnb-rgb-legend"])
        for w in (self.red, self.green, self.blue):
            w.param.watch(lambda event: self._refresh_overlay(), "value")
        self._contents = [
            pn.pane.Markdown("### Element maps (fitted counts of each element's lines)"),
            self.mosaic,
            self.mosaic_note,
            pn.pane.Markdown("#### RGB overlay of three elements"),
            pn.Row(self.red, self.green, self.blue),
            pn.Row(self.overlay, self.legend),
        ]
        # never hidden: figures made while their container is hidden keep an empty frame in Chromium
        # (Bokeh lays them out at size 0); without element maps the section is emptied instead
        self.section = pn.Column(sizing_mode="stretch_width", css_classes=["xrfnb-elements"])
        self._refreshing = False

    def __panel__(self) -> pn.Column:
        return self.section

    @property
    def shown(self) -> bool:
        """Whether the section shows element maps (it is empty without them, and for a single
        spectrum)."""
        return bool(self.section.objects)

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

    # -- the mosaic -----------------------------------------------------------------------------
    def tile_data(self, label: str) -> dict[str, Any]:
        """One element map of the mosaic as sent to the browser.

        Returns
        -------
        dict
            ``values``: the element's fitted counts (log10(1 + counts) with the dashboard's log scale),
            shape (rows, cols) float, NaN at invalid pixels, or block means of ``step`` x ``step`` pixels
            of a map larger than :data:`TILE_SAMPLES` a side; ``step``; ``clim``: (0, the
            :data:`MOSAIC_PERCENTILE` th percentile of the valid values); ``clabel``: the colour bar's
            title.
        """
        owner = self._owner
        index = self._labels()[label]
        counts = np.asarray(self._element_maps().intensity[..., index], dtype=float)
        values = np.log10(1.0 + np.maximum(counts, 0.0)) if owner.log_scale else counts.copy()
        values[~self._valid()] = np.nan
        rows, cols = values.shape
        step = stride(rows, cols, TILE_SAMPLES)
        finite = values[np.isfinite(values)]
        top = float(np.percentile(finite, MOSAIC_PERCENTILE)) if finite.size else 0.0
        return {
            "values": block_mean(values, step).astype(np.float32),  # half the bytes sent per session
            "step": step,
            "clim": (0.0, top if top > 0 else 1.0),
            "clabel": "log10(1 + counts)" if owner.log_scale else "counts",
        }

    def mosaic_layout(self) -> hv.Layout:
        """The element maps side by side: an :class:`holoviews.Layout` of one :class:`holoviews.Image`
        per fitted element, on the main map's axes (mm or pixels), in element-fit order."""
        owner = self._owner
        mm, axes = owner.map_scale()
        rows, cols = owner.maps.mask.shape
        scale = TILE_PX / max(rows, cols)
        size = {"frame_width": max(40, round(cols * scale)), "frame_height": max(40, round(rows * scale))}
        hooks_end = [scale_bar_hook] if axes[0].endswith("(mm)") else []
        tiles = []
        for label in self._labels():
            data = self.tile_data(label)
            what = f"{label} {data['clabel']}"
            if data["step"] > 1:
                what += f" (mean of {data['step']} x {data['step']} pixels)"
            tiles.append(
                image(data["values"], "value", mm * data["step"], axes).opts(
                    title=label,
                    cmap=list(PALETTES[owner.cmap]),
                    colorbar=True,
                    colorbar_opts={"width": 10, "padding": 4},
                    clabel=data["clabel"],
                    clim=data["clim"],
                    clipping_colors={"NaN": INVALID_COLOR},
                    xaxis=None,
                    yaxis=None,
                    # pan and zoom (shared with the other maps), a click, a value: no per-map box zoom or
                    # save (a session holds every map's tools)
                    default_tools=["pan", "wheel_zoom", "reset"],
                    tools=["tap", "hover"],
                    active_tools=["pan", "tap"],
                    hover_tooltips=[(what, "@image")],
                    hooks=[
                        weak_hook(owner.linked_ranges.link),
                        name_hook(f"xrfnb-element:{label}"),
                        *hooks_end,
                        weak_hook(self._tile_tap_hook),
                    ],
                    **size,
                )
            )
        return hv.Layout(tiles).cols(MOSAIC_COLUMNS).opts(hv.opts.Layout(shared_axes=True))

    def mosaic_note_text(self) -> str:
        """What the mosaic shows, under it."""
        owner = self._owner
        rows, cols = owner.maps.mask.shape
        step = stride(rows, cols, TILE_SAMPLES)
        text = (
            f"Each map is coloured from 0 to its own {MOSAIC_PERCENTILE:g}th percentile of "
            + ("log10(1 + counts)" if owner.log_scale else "counts")
            + " (the brightest pixels saturate); dark grey: invalid pixel."
        )
        if step > 1:
            text += f" Shown as means of {step} x {step} pixels (the main map's Elements view has them all)."
        return text + (
            " Pan or zoom one map and the others, the main map and the RGB overlay follow; click a pixel "
            "to see its spectrum."
        )

    def _tile_tap_hook(self, plot: ElementPlot, element: hv.Element) -> None:
        """Listen to clicks on a rendered element map (once per figure)."""
        self._taps.subscribe(plot.state, self._on_map_click)

    @guarded
    def _on_map_click(self, event: Tap) -> None:
        self.on_tap(event.x, event.y)

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._owner.notify(message, level)

    def on_tap(self, x: float | None, y: float | None) -> None:
        """A click at (x, y) in axis units on an element map or the overlay selects that pixel (a click
        beside the scan, on the padding of block means, is ignored)."""
        owner = self._owner
        if x is None or y is None or owner.scan is None:
            return
        mm, _ = owner.map_scale()
        row, col = math.floor(y / mm), math.floor(x / mm)
        rows, cols = owner.scan.shape[:2]
        if 0 <= row < rows and 0 <= col < cols:
            owner.select_pixel(row, col)

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
        hooks = [weak_hook(owner.linked_ranges.link), name_hook("xrfnb-element-rgb")]
        hooks += [scale_bar_hook] if axes[0].endswith("(mm)") else []
        return rgb_image(rgb, mm, axes).opts(
            title=f"RGB overlay: {names}",
            frame_width=max(60, round(cols * scale)),
            frame_height=max(60, round(rows * scale)),
            xlabel=axes[0],
            ylabel=axes[1],
            hover_tooltips=[(axes[0], "$x{0.00}"), (axes[1], "$y{0.00}")],
            tools=["hover", "tap"],
            active_tools=["pan", "tap"],
            toolbar="above",
            hooks=[*hooks, weak_hook(self._tile_tap_hook)],
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
        if not show:
            self.section.objects = []
            self.overlay.object = None
            self.legend.object = ""
            self.mosaic.object = None
            self.mosaic_note.object = ""
            return
        self.section.objects = self._contents
        self.refresh_mosaic()
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

    def refresh_mosaic(self) -> None:
        """Redraw the element maps side by side (new maps, colour map or log scale)."""
        if self._element_maps() is None or not self.shown:
            return
        self.mosaic.object = self.mosaic_layout()
        self.mosaic_note.object = self.mosaic_note_text()

    def _refresh_overlay(self) -> None:
        if self._refreshing or self._element_maps() is None or not self.shown:
            return
        self.overlay.object = self.overlay_element()
        self.legend.object = self.legend_html()
