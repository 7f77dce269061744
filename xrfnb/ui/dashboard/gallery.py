"""The dashboard's gallery: every pigment class's probability map as a small tile, coloured from its
threshold to 1; a click on a tile enlarges that pigment in the main map.

One Bokeh figure holds every pigment's map as a tile of an RGB mosaic: a figure per pigment would put
thousands of models in the document, and Bokeh walks all of them after every update.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from holoviews import streams

from .bokeh import Refresh, TapSubscriptions, name_hook, rendered_plots, rgba_u32, weak_hook, write_to_plot
from .common import (
    ABSENT_COLOR,
    INVALID_COLOR,
    PALETTES,
    colorize,
    guarded,
    hex_rgb,
    pigment_clim,
    stride,
)

if TYPE_CHECKING:  # pragma: no cover
    from bokeh.events import Tap
    from bokeh.models import ColumnDataSource
    from holoviews.plotting.bokeh.element import ElementPlot

    from .app import Dashboard

__all__ = ["GALLERY_COLUMNS", "GALLERY_WIDTH", "THUMB_PX", "TILE_LABEL_CHARS", "Gallery"]

#: longer side of a tile, scan pixels (larger maps are sampled down)
THUMB_PX = 128
#: characters per line of a tile's label (8 pt under a ~140-px tile)
TILE_LABEL_CHARS = 22
#: tiles per mosaic row
GALLERY_COLUMNS = 6
#: the mosaic's width on screen, pixels
GALLERY_WIDTH = 900


class Gallery(pn.viewable.Viewer):
    """The pigment-map gallery of a :class:`~xrfnb.ui.dashboard.Dashboard`.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose maps are shown.
    taps : TapSubscriptions
        The dashboard's record of subscribed figures.
    """

    def __init__(self, dash: Dashboard, taps: TapSubscriptions) -> None:
        super().__init__()
        self._dash = dash
        self._taps = taps
        self.column = pn.Column()
        self.section = pn.Column(
            pn.pane.Markdown("### Pigment maps (click one to enlarge it)"),
            self.column,
            sizing_mode="stretch_width",
        )
        self.tiles: dict[str, np.ndarray] = {}
        self._thumb_prob: dict[str, np.ndarray] = {}
        self.shown: dict[str, Any] | None = None
        self._refresh: streams.Stream | None = None
        self.pane: pn.pane.HoloViews | None = None

    def __panel__(self) -> pn.viewable.Viewable:
        return self.section

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    # -- the mosaic -------------------------------------------------------------------------------
    def _tile_geometry(self) -> tuple[int, int, int, int, int]:
        """(tile_rows, tile_cols, stride, mosaic columns, label band height) of the gallery mosaic."""
        d = self._dash
        rows, cols = d.maps.probability.shape[:2]
        step = stride(rows, cols, THUMB_PX)
        th, tw = -(-rows // step), -(-cols // step)
        return th, tw, step, min(len(d.classes), GALLERY_COLUMNS), max(4, th // 4)

    def _tile_rgb(self, cls: str) -> np.ndarray:
        """One gallery tile, shape (tile_rows, tile_cols, 3) uint8: colour from threshold to 1."""
        d = self._dash
        prob = self._thumb_prob.get(cls)
        if prob is None:
            k = d.classes.index(cls)
            step = self._tile_geometry()[2]
            prob = np.asarray(d.maps.probability[::step, ::step, k], dtype=float)
            prob[~d.valid()[::step, ::step]] = np.nan
            self._thumb_prob[cls] = prob
        lo, hi = pigment_clim(d.thresholds[cls])
        rgba = colorize(prob, PALETTES[d.cmap], lo, hi, below=ABSENT_COLOR)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = hex_rgb(INVALID_COLOR)
        return rgb

    def gallery_data(self) -> dict[str, Any]:
        """The gallery mosaic: ``rgb`` (H, W, 3) uint8, tile ``labels`` [(x, y, text)] in mosaic pixels
        and the ``cell`` geometry (cell height, cell width, label band height, columns)."""
        d = self._dash
        th, tw, _, ncols, band = self._tile_geometry()
        gap = max(2, tw // 16)
        nrows = -(-len(d.classes) // ncols)
        cell_h, cell_w = th + band + gap, tw + gap
        mosaic = np.full((nrows * cell_h, ncols * cell_w, 3), 255, dtype=np.uint8)
        labels = []
        for i, cls in enumerate(d.classes):
            tile = self.tiles.get(cls)
            if tile is None:
                tile = self.tiles[cls] = self._tile_rgb(cls)
            r0, c0 = (i // ncols) * cell_h + band, (i % ncols) * cell_w
            mosaic[r0 : r0 + th, c0 : c0 + tw] = tile
            prob = self._thumb_prob[cls]
            finite = np.isfinite(prob)
            with np.errstate(invalid="ignore"):
                frac = float((prob[finite] >= d.thresholds[cls]).mean()) if finite.any() else 0.0
            # two lines at most, wrapped to the tile's width: long class names overlapped their
            # neighbours on one line
            text = textwrap.fill(f"{cls} ({100 * frac:.0f}%)", TILE_LABEL_CHARS, break_long_words=False)
            labels.append((c0 + tw / 2, r0 - band / 2, text))
        return {"rgb": mosaic, "labels": labels, "cell": (cell_h, cell_w, band, ncols)}

    def _gallery_element(self, data: dict[str, Any] | None = None) -> hv.Overlay:
        data = data if data is not None else self.gallery_data()
        rgb = data["rgb"]
        h, w = rgb.shape[:2]
        scale = min(GALLERY_WIDTH / w, 3.0)
        img = hv.RGB(np.flipud(rgb), bounds=(0, 0, w, h), kdims=["x", "y"]).opts(
            invert_yaxis=True,
            xaxis=None,
            yaxis=None,
            toolbar=None,
            tools=["tap"],
            default_tools=[],
            frame_width=round(w * scale),
            frame_height=round(h * scale),
            show_frame=False,
        )
        labels = hv.Labels(data["labels"], ["x", "y"], "text").opts(
            text_font_size="8pt", text_color="#222222"
        )
        return (img * labels).opts(
            hv.opts.Overlay(
                title="",
                toolbar=None,
                hooks=[name_hook("xrfnb-gallery"), weak_hook(self._gallery_tap_hook)],
            )
        )

    # -- taps -------------------------------------------------------------------------------------
    def _gallery_tap_hook(self, plot: ElementPlot, element: hv.Element) -> None:
        """Listen to clicks on the rendered gallery figure (once per figure); its x, y are mosaic pixels,
        y downwards (:class:`~xrfnb.ui.dashboard.bokeh.TapSubscriptions`)."""
        self._taps.subscribe(plot.state, self._on_gallery_click)

    @guarded
    def _on_gallery_click(self, event: Tap) -> None:
        self.on_tap(x=event.x, y=event.y)

    def on_tap(self, x: float | None = None, y: float | None = None) -> None:
        """A click at (x, y) mosaic pixels: show that tile's pigment in the main map."""
        d = self._dash
        if x is None or y is None or d.maps is None:
            return
        cell_h, cell_w, _, ncols = self.shown["cell"]
        col, row = int(x // cell_w), int(y // cell_h)
        i = row * ncols + col
        if 0 <= col < ncols and 0 <= i < len(d.classes):
            with d.action(), param.parameterized.batch_call_watchers(d):
                d.focus = d.classes[i]
                d.view = "Pigment"

    # -- updates ----------------------------------------------------------------------------------
    def rebuild(self) -> None:
        """Start afresh for the dashboard's current scan and maps."""
        d = self._dash
        d.hold_documents()
        self.tiles = {}
        self._thumb_prob = {}
        self.shown = None
        self._refresh = None
        self.pane = None
        if d.single_spectrum:
            self.column.objects = []  # one spectrum: the calls table instead of a gallery of 1-pixel maps
            return
        if d.maps is None:
            why = " No trained model is available, so pigments cannot be mapped."
            why = "" if d.model_available() else why
            self.column.objects = [pn.pane.Markdown("No pigment maps to show." + why)]
            return
        self.shown = self.gallery_data()
        self._refresh = Refresh(version=0)
        dmap = hv.DynamicMap(lambda version: self._gallery_element(self.shown), streams=[self._refresh])
        self.pane = pn.pane.HoloViews(dmap, linked_axes=False, css_classes=["xrfnb-gallery"])
        self.column.objects = [
            self.pane,
            pn.pane.Markdown(
                "Each map is coloured from its pigment's threshold (dark) to probability 1 (bright); light "
                "grey: below the threshold; dark grey: invalid pixel. Click a map to enlarge it.",
                styles={"font-size": "small"},
            ),
        ]

    def update_thumbnails(self, classes: Sequence[str]) -> None:
        """Recolour the gallery tiles of ``classes`` (their threshold or the colour map changed)."""
        d = self._dash
        if d.maps is None or self._refresh is None:
            return
        for cls in classes:
            self.tiles.pop(cls, None)
        self.shown = data = self.gallery_data()
        version = self._refresh.version + 1
        if self._patch_gallery(data):
            # no refresh, but a later render of the gallery (another root, a rebuilt layout) must call
            # the callback again instead of reusing the DynamicMap's cached, memoized last element
            self._refresh.update(version=version)
            self.pane.object.reset()
            return
        d.hold_documents()
        self._refresh.event(version=version)

    def _patch_gallery(self, data: dict[str, Any]) -> bool:
        """Write a new mosaic and tile labels into the rendered gallery plots; False when it cannot.

        Recolouring keeps the mosaic's shape and the labels' positions, so only the image of the RGB
        glyph's data source and the text column of the labels' source change. False (nothing changed)
        when the gallery is not rendered or a rendered plot does not have that structure.
        """
        plots = rendered_plots(self.pane) if self.pane is not None else []
        if not plots:
            return False
        img = rgba_u32(data["rgb"])
        xs = np.array([x for x, _, _ in data["labels"]], dtype=float)
        ys = np.array([y for _, y, _ in data["labels"]], dtype=float)
        texts = [t for *_, t in data["labels"]]
        targets = []
        for plot in plots:
            sources = [sub.handles.get("source") for sub in getattr(plot, "subplots", {}).values()]
            images = [s for s in sources if s is not None and "image" in s.data]
            labels = [s for s in sources if s is not None and "text" in s.data]
            if len(images) != 1 or len(labels) != 1:
                return False
            old = np.asarray(images[0].data["image"][0])
            lx, ly = np.asarray(labels[0].data["x"], float), np.asarray(labels[0].data["y"], float)
            if (
                old.shape != img.shape
                or lx.shape != xs.shape
                or not (np.array_equal(lx, xs) and np.array_equal(ly, ys))
            ):
                return False
            targets.append((plot, images[0], labels[0]))

        def write(image_source: ColumnDataSource, label_source: ColumnDataSource) -> None:
            image_source.data["image"] = [img]
            old_text = label_source.data["text"]
            label_source.data["text"] = (
                np.array(texts, dtype=old_text.dtype) if isinstance(old_text, np.ndarray) else list(texts)
            )

        for plot, image_source, label_source in targets:
            write_to_plot(plot, functools.partial(write, image_source, label_source))
        return True
