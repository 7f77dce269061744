"""The dashboard's main map: the view chosen (composite, one pigment, surface vs buried, OOD score,
element, total counts), its legend, the selected-pixel marker and the selection tools (tap, box,
lasso)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from bokeh.models import (
    ColumnDataSource,
    CustomJSHover,
    GlyphRenderer,
    HoverTool,
    Rect,
    Scatter,
    Segment,
    Text,
)
from holoviews import streams

from ..._errors import DataError, XRFNBError
from ...core.calls import is_buried, is_present
from .bokeh import SwitchingPlot, name_hook, rgba_u32, weak_hook, write_to_plot
from .common import (
    ABSENT_COLOR,
    INVALID_COLOR,
    MAIN_PX,
    PALETTES,
    SURFACE_BURIED_COLORS,
    escape_html,
    guarded,
    image,
    message_plot,
    percent,
    pigment_clim,
    rgb_image,
    scale_bar_hook,
    stride,
)

if TYPE_CHECKING:  # pragma: no cover
    from holoviews.plotting.bokeh.element import ElementPlot
    from param.parameterized import Event

    from .app import Dashboard

__all__ = ["COMPOSITE_HOVER", "MapPanel", "composite_calls", "mask_outline", "polygon_mask"]

#: the composite map's hover lines beside the position: the pigments called at the pixel (surface or
#: buried) and the most probable class with its probability -- never the packed RGBA colour number
COMPOSITE_HOVER = [
    ("pigments", "@calls{custom}"),
    ("most probable", "@top{custom} (@p_top{0.00})"),
]
#: what the hover says where a pixel has no spectrum, and where no class reaches its threshold
_MASKED_WORDS = "no spectrum (masked pixel)"
_NONE_WORDS = "none above its threshold"


def composite_calls(
    probability: np.ndarray,
    buried_probability: np.ndarray,
    thresholds: np.ndarray,
    classes: Sequence[str],
    valid: np.ndarray,
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The calls behind each pixel of the composite map, for its hover.

    Parameters
    ----------
    probability, buried_probability : numpy.ndarray
        Per-class probabilities, shape (rows, cols, classes).
    thresholds : numpy.ndarray
        Per-class thresholds, shape (classes,).
    classes : sequence of str
        The class names.
    valid : numpy.ndarray
        Pixels with a spectrum, shape (rows, cols) bool.

    Returns
    -------
    codes : numpy.ndarray
        Index into ``patterns`` per pixel, shape (rows, cols) int32; -1 at masked pixels.
    patterns : list of str
        The distinct call patterns in words ("lead white, red ochre (buried)", "none above its
        threshold"); pattern ``len(patterns) - 1`` is the masked pixels' words.
    top : numpy.ndarray
        Index of the most probable class per pixel, shape (rows, cols) int32; -1 at masked pixels.
    p_top : numpy.ndarray
        Its probability, shape (rows, cols) float32; NaN at masked pixels.
    """
    prob = np.asarray(probability, dtype=np.float32)
    buried = np.asarray(buried_probability, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    rows, cols, k = prob.shape
    with np.errstate(invalid="ignore"):
        present = is_present(prob, np.asarray(thresholds, dtype=np.float32)) & valid[..., None]
        below = present & is_buried(prob, buried)
    # one key per pixel: which classes are present, and which of them lie below the surface
    bits = np.packbits(np.concatenate([present, below], axis=-1), axis=-1).reshape(rows * cols, -1)
    keys, inverse = np.unique(bits, axis=0, return_inverse=True)
    patterns = []
    for key in keys:
        flags = np.unpackbits(key)[: 2 * k].astype(bool)
        here, deep = flags[:k], flags[k:]
        names = [f"{c} (buried)" if deep[i] else c for i, c in enumerate(classes) if here[i]]
        patterns.append(", ".join(names) if names else _NONE_WORDS)
    patterns.append(_MASKED_WORDS)
    codes = np.asarray(inverse, dtype=np.int32).reshape(rows, cols)
    codes[~valid] = len(patterns) - 1
    filled = np.where(np.isfinite(prob), prob, -1.0)
    top = np.argmax(filled, axis=-1).astype(np.int32)
    p_top = np.take_along_axis(filled, top[..., None], axis=-1)[..., 0].astype(np.float32)
    top[~valid] = -1
    p_top[~valid] = np.nan
    return codes, patterns, top, p_top


def polygon_mask(xs: np.ndarray, ys: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Pixels whose centres lie inside the polygon (even-odd rule), shape (rows, cols) bool.

    Parameters
    ----------
    xs, ys : numpy.ndarray
        The polygon's vertices in pixel units (x: column, y: row), shape (n,).
    rows, cols : int
        The map's shape.
    """
    xs = np.asarray(xs, dtype=float)
    ys = np.asarray(ys, dtype=float)
    mask = np.zeros((rows, cols), dtype=bool)
    if xs.size < 3:
        return mask
    r0 = max(0, int(np.floor(ys.min())))
    r1 = min(rows, int(np.ceil(ys.max())) + 1)
    c0 = max(0, int(np.floor(xs.min())))
    c1 = min(cols, int(np.ceil(xs.max())) + 1)
    if r0 >= r1 or c0 >= c1:
        return mask
    py, px = np.mgrid[r0:r1, c0:c1] + 0.5
    inside = np.zeros(py.shape, dtype=bool)
    xj, yj = xs[-1], ys[-1]
    for xi, yi in zip(xs, ys, strict=True):
        cond = (yi > py) != (yj > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = (xj - xi) * (py - yi) / (yj - yi) + xi
        inside ^= cond & (px < xcross)
        xj, yj = xi, yi
    mask[r0:r1, c0:c1] = inside
    return mask


def mask_outline(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The outline of a region: the edges between its pixels and the others, in pixel units.

    Parameters
    ----------
    mask : numpy.ndarray
        The region, (rows, cols) bool; pixel (r, c) covers x in [c, c + 1), y in [r, r + 1).

    Returns
    -------
    (x0, y0, x1, y1) : tuple of numpy.ndarray
        One unit segment per edge, each (n,) float.
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    vr, vc = np.nonzero(padded[1:-1, :-1] != padded[1:-1, 1:])  # vertical edge at x = c, rows r to r + 1
    hr, hc = np.nonzero(padded[:-1, 1:-1] != padded[1:, 1:-1])  # horizontal edge at y = r, cols c to c + 1
    x0 = np.concatenate([vc, hc]).astype(float)
    y0 = np.concatenate([vr, hr]).astype(float)
    x1 = np.concatenate([vc, hc + 1]).astype(float)
    y1 = np.concatenate([vr + 1, hr]).astype(float)
    return x0, y0, x1, y1


class MapPanel(pn.viewable.Viewer):
    """The main map of a :class:`~xrfnb.ui.dashboard.Dashboard`, its view controls and its legend.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose state is drawn.
    """

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self._dash = dash
        self.view_w = pn.widgets.RadioButtonGroup.from_param(
            dash.param.view, orientation="vertical", width=280
        )
        self.focus_w = pn.widgets.Select.from_param(dash.param.focus, label="Pigment", width=280)
        self.element_w = pn.widgets.Select.from_param(dash.param.element, label="Element", width=280)
        self.cmap_w = pn.widgets.Select.from_param(dash.param.cmap, label="Colour map", width=135)
        self.controls = pn.Column(self.view_w, self.focus_w, self.element_w, self.cmap_w)
        self.legend = pn.pane.HTML("", width=MAIN_PX + 60, css_classes=["xrfnb-legend"])
        self.tap = streams.Tap(x=None, y=None)
        self.box = streams.BoundsXY(bounds=None)
        self.lasso = streams.Lasso(geometry=None)
        self.tap.add_subscriber(self.on_tap)
        self.box.add_subscriber(self.on_box)
        self.lasso.add_subscriber(self.on_lasso)
        self.main = SwitchingPlot(
            dash,
            self._main_element,
            self.main_kind,
            ["view", "focus", "element", "thresholds", "cmap", "log_scale", "data_version"],
            dash.document_hold,
            css_classes=["xrfnb-main-map"],
            on_new=self._attach_selection_streams,
            unchanged=self._main_unchanged,
            patch=self._patch_main,
        )
        dash.param.watch(self._on_selection, ["pixel", "region"])
        dash.param.watch(self._on_kept_regions, ["kept_regions"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self.main.pane

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    # -- the image --------------------------------------------------------------------------------
    def main_array(self) -> tuple[str, np.ndarray]:
        """The main view's image: ``(kind, array)`` with kind "rgb" (rows, cols, 3) uint8 or "value"
        (rows, cols) float."""
        d = self._dash
        view = d.view
        if d.scan is None:
            raise DataError("no scan open")
        if view == "Total counts":
            img = d.total_counts.copy()
            return "value", (np.log10(1.0 + img) if d.log_scale else img)
        if view == "Elements":
            em = getattr(d.maps, "element_maps", None) if d.maps is not None else None
            if em is None or d.element is None:
                raise DataError("no element maps for this scan (they come with the pigment maps)")
            img = np.asarray(em[d.element], dtype=float)
            return "value", (np.log10(1.0 + np.maximum(img, 0)) if d.log_scale else img)
        if d.maps is None:
            raise DataError(
                "no pigment maps: "
                + ("a trained model is needed" if not d.model_available() else "mapping has not finished")
            )
        valid = d.valid()
        if view == "Composite":
            rgb = np.array(d.maps.composite_rgb(d.threshold_array()), dtype=np.uint8)
            return "rgb", rgb
        if d.focus not in d.classes:
            raise DataError("choose a pigment to show")
        k = d.classes.index(d.focus)
        prob = np.asarray(d.maps.probability[..., k], dtype=float)
        if view == "Pigment":
            return "value", np.where(valid, prob, np.nan)
        if view == "Surface vs buried":
            buried = np.asarray(d.maps.buried_probability[..., k], dtype=float)
            with np.errstate(invalid="ignore"):
                present = is_present(prob, d.thresholds[d.focus])
                cat = np.where(present, np.where(is_buried(prob, buried), 2.0, 1.0), 0.0)
            return "value", np.where(valid, cat, np.nan)
        if view == "OOD score":
            return "value", np.where(valid, np.asarray(d.maps.ood_score, dtype=float), np.nan)
        raise DataError(f"unknown view {view!r}")

    def main_title(self) -> str:
        """The main map's title."""
        d = self._dash
        v = d.view
        if v == "Pigment":
            return f"{d.focus}: probability where >= {d.thresholds.get(d.focus, 0):.2f}"
        if v == "Surface vs buried":
            return f"{d.focus}: surface (orange) vs buried only (green)"
        if v == "OOD score":
            return f"OOD score (unfamiliar spectra above {float(d.maps.ood_threshold):.2f})"
        if v == "Elements":
            return f"{d.element} element map" + (" (log10 counts)" if d.log_scale else " (counts)")
        if v == "Total counts":
            return "Total counts" + (" (log10)" if d.log_scale else "")
        return "Composite pigment map"

    def colorbar_label(self) -> str:
        """What the main map's values are, for its colour bar and hover."""
        d = self._dash
        log10 = d.log_scale and d.view in ("Elements", "Total counts")
        return (
            {
                "Pigment": "probability",
                "OOD score": "OOD score",
                "Elements": f"{d.element} counts",
                "Total counts": "counts",
                "Surface vs buried": "category",
            }.get(d.view, "value")
            if not log10
            else (f"log10(1 + {d.element} counts)" if d.view == "Elements" else "log10(1 + counts)")
        )

    def ood_clim(self, arr: np.ndarray) -> tuple[float, float]:
        """Colour range of the OOD-score view of ``arr``: 0 to the highest score, at least 1.5 x the
        OOD threshold."""
        finite = arr[np.isfinite(arr)]
        top = finite.max() if finite.size else 1.0
        return 0.0, float(max(top, float(self._dash.maps.ood_threshold) * 1.5))

    def main_kind(self) -> str:
        """Element type the main map needs now (a new plot is made when it changes)."""
        d = self._dash
        if d.scan is None:
            return "Text"
        v = d.view
        # a plot per view (and axis unit): a colour bar keeps its title and ticks across refreshes
        img = f"Image-{v}-{self.colorbar_label()}-{d.map_scale()[1][0]}"
        if v == "Total counts":
            return img
        if v == "Elements":
            em = getattr(d.maps, "element_maps", None) if d.maps is not None else None
            return img if em is not None and d.element is not None else "Text"
        if d.maps is None:
            return "Text"
        if v == "Composite":
            return f"RGB-{d.map_scale()[1][0]}"
        return img if d.focus is not None else "Text"

    def _main_element(self, **kwargs: Any) -> hv.Element:
        d = self._dash
        try:
            kind, arr = self.main_array()
        except XRFNBError as exc:
            return message_plot(str(exc), height=MAIN_PX)
        rows, cols = arr.shape[:2]
        scale = MAIN_PX / max(rows, cols)
        size = {"frame_width": max(60, round(cols * scale)), "frame_height": max(60, round(rows * scale))}
        mm, axes = d.map_scale()
        unit = "mm" if axes[0].endswith("(mm)") else ""
        tools = ["tap", "box_select", "lasso_select"]
        # the shared ranges first: the scale bar follows the figure's ranges
        hooks = [weak_hook(d.linked_ranges.link), name_hook("xrfnb-main"), weak_hook(self._regions_hook)]
        hooks += [weak_hook(self._pixel_marker_hook)]
        hooks += [scale_bar_hook] if unit else []
        common = {
            "title": self.main_title(),
            "active_tools": ["tap"],
            "xlabel": axes[0],
            "ylabel": axes[1],
            "toolbar": "above",
            "hooks": hooks,
            "framewise": True,
            **size,
        }
        fmt = "{0.00}" if unit else "{0}"
        where = [(axes[0], f"$x{fmt}"), (axes[1], f"$y{fmt}")]
        if kind == "rgb":
            # the composite's colours are mixtures: the legend beside the map names them; hover names
            # the calls at the pixel (from columns the hook adds), never the raw packed RGBA number
            return rgb_image(arr, mm, axes).opts(
                hover_tooltips=[*where, *COMPOSITE_HOVER],
                tools=["hover", *tools],
                **{**common, "hooks": [*hooks, weak_hook(self._composite_hover_hook)]},
            )
        if d.view == "Surface vs buried":
            return image(arr, "category", mm, axes).opts(
                cmap=list(SURFACE_BURIED_COLORS),
                clim=(-0.5, 2.5),
                colorbar=False,  # categories: the legend beside the map names them
                clipping_colors={"NaN": INVALID_COLOR},
                hover_tooltips=[*where, ("0 absent, 1 surface, 2 buried only", "@image")],
                tools=["hover", *tools],
                **common,
            )
        label = self.colorbar_label()
        clim = pigment_clim(d.thresholds[d.focus]) if d.view == "Pigment" else (None, None)
        if d.view == "OOD score":
            clim = self.ood_clim(arr)
        return image(arr, label, mm, axes).opts(
            cmap=list(PALETTES[d.cmap]),
            colorbar=True,
            clabel=label,
            clim=clim,
            clipping_colors={"NaN": INVALID_COLOR, "min": ABSENT_COLOR},
            hover_tooltips=[*where, (label, "@image")],
            tools=["hover", *tools],
            **common,
        )

    # -- threshold changes ------------------------------------------------------------------------
    def _main_unchanged(self, events: Sequence[Any]) -> bool:
        """Threshold changes that the main map's view does not show (another class, or no class at all)."""
        d = self._dash
        if not all(e.name == "thresholds" for e in events):
            return False
        if d.view in ("Total counts", "Elements", "OOD score"):
            return True
        if d.view in ("Pigment", "Surface vs buried"):
            return all((e.old or {}).get(d.focus) == (e.new or {}).get(d.focus) for e in events)
        return False

    def _patch_main(self, events: Sequence[Any], plots: list[Any]) -> bool:
        """Write a threshold change straight into the rendered main map; False when it cannot.

        A threshold changes the main map's values (composite colours, surface-vs-buried categories) or,
        in the pigment view, only its colour range and title, never its shape, bounds or glyph: the new
        values replace the old ones in the plot's existing data source and colour mapper, without
        HoloViews' update (ranges, styles, glyphs). Anything else (another view, a scan of another
        shape, a plot not drawn as expected) returns False with nothing changed.
        """
        d = self._dash
        if not all(e.name == "thresholds" for e in events) or self.main_kind().split("-")[0] not in (
            "RGB",
            "Image",
        ):
            return False
        view = d.view
        img: np.ndarray | None = None
        clim: tuple[float, float] | None = None
        if view == "Composite":
            img = rgba_u32(np.asarray(d.maps.composite_rgb(d.threshold_array()), dtype=np.uint8))
        elif view == "Surface vs buried" and d.focus in d.classes:
            img = self.main_array()[1]
        elif view == "Pigment" and d.focus in d.classes:
            clim = pigment_clim(d.thresholds[d.focus])
        else:
            return False
        title = self.main_title()
        for plot in plots:
            handles = getattr(plot, "handles", {})
            source, figure = handles.get("source"), handles.get("plot")
            if source is None or figure is None or figure.title is None or "image" not in source.data:
                return False
            old = np.asarray(source.data["image"][0])
            if img is not None and (old.shape != img.shape or old.dtype != img.dtype):
                return False
            if clim is not None and handles.get("color_mapper") is None:
                return False

        def write(plot: ElementPlot) -> None:
            if img is not None:
                plot.handles["source"].data["image"] = [img]
            if view == "Composite":
                self._write_composite_hover(plot)
            if clim is not None:
                plot.handles["color_mapper"].update(low=clim[0], high=clim[1])
            if plot.handles["plot"].title.text != title:
                plot.handles["plot"].title.text = title

        for plot in plots:
            write_to_plot(plot, functools.partial(write, plot))
        return True

    # -- the composite's hover ----------------------------------------------------------------------
    def composite_hover_data(self) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """The composite map's hover data at the present thresholds (see :func:`composite_calls`)."""
        d = self._dash
        maps = d.maps
        return composite_calls(
            np.asarray(maps.probability), np.asarray(maps.buried_probability), d.threshold_array(),
            d.classes, d.valid(),
        )  # fmt: skip

    def _write_composite_hover(self, plot: ElementPlot) -> None:
        """Put the calls behind each pixel into a composite figure: three columns of its image source
        (pattern, most probable class, its probability; same layout as the image) and the words the
        hover's formatters turn them into."""
        source, figure = plot.handles.get("source"), plot.handles.get("plot")
        if source is None or figure is None or "image" not in source.data or self._dash.maps is None:
            return
        codes, patterns, top, p_top = self.composite_hover_data()
        if np.asarray(source.data["image"][0]).shape != codes.shape:
            return
        source.data.update({"calls": [codes], "top": [top], "p_top": [p_top]})
        for hover in (t for t in figure.tools if isinstance(t, HoverTool)):
            formatters = dict(hover.formatters) if isinstance(hover.formatters, dict) else {}
            calls, top_fmt = formatters.get("@calls"), formatters.get("@top")
            if isinstance(calls, CustomJSHover) and isinstance(top_fmt, CustomJSHover):
                calls.args = {"names": patterns}
                top_fmt.args = {"classes": list(self._dash.classes)}
                continue
            formatters["@calls"] = CustomJSHover(
                args={"names": patterns}, code="return names[value] ?? ''", name="xrfnb-hover-calls"
            )
            formatters["@top"] = CustomJSHover(
                args={"classes": list(self._dash.classes)},
                code="return value >= 0 ? (classes[value] ?? '') : ''",
                name="xrfnb-hover-top",
            )
            hover.formatters = formatters

    def _composite_hover_hook(self, plot: ElementPlot, element: hv.Element) -> None:
        """Plot hook of the composite map: its hover data (refreshed whenever HoloViews redraws it)."""
        self._write_composite_hover(plot)

    # -- the selected pixel -----------------------------------------------------------------------
    def pixel_marker(self) -> dict[str, list[float]]:
        """Data of the selected-pixel marker on the main map, in the map's axis units: the pixel's
        centre (``x``, ``y``) and its size (``w``, ``h``); empty lists without a selected pixel."""
        d = self._dash
        if d.scan is None or d.pixel is None:
            return {"x": [], "y": [], "w": [], "h": []}
        mm, _ = d.map_scale()
        r, c = d.pixel
        return {"x": [(c + 0.5) * mm], "y": [(r + 0.5) * mm], "w": [mm], "h": [mm]}

    def _pixel_marker_hook(self, plot: ElementPlot, element: hv.Element) -> None:
        """Draw the selected pixel on a main-map figure: its outline (data units) and a ring of fixed
        screen size around it (visible when a pixel is smaller than a screen pixel), each white under
        black so that they show on every colour map; added once per figure, moved by
        :meth:`move_pixel_marker`."""
        figure = plot.state
        if any(getattr(r, "name", None) == "xrfnb-pixel-marker" for r in figure.renderers):
            self.move_pixel_marker([figure])
            return
        source = ColumnDataSource(self.pixel_marker())
        glyphs = [
            Rect(x="x", y="y", width="w", height="h", fill_alpha=0, line_color="white", line_width=3),
            Rect(x="x", y="y", width="w", height="h", fill_alpha=0, line_color="black", line_width=1.2),
            Scatter(x="x", y="y", size=22, marker="circle", fill_alpha=0, line_color="white", line_width=3),
            Scatter(
                x="x", y="y", size=22, marker="circle", fill_alpha=0, line_color="#d62728", line_width=1.5
            ),
        ]
        for i, glyph in enumerate(glyphs):
            renderer = GlyphRenderer(
                data_source=source,
                glyph=glyph,
                name="xrfnb-pixel-marker" if i == 0 else f"xrfnb-pixel-marker-{i}",
            )
            figure.renderers.append(renderer)

    def move_pixel_marker(self, figures: Sequence[Any] | None = None) -> None:
        """Move the marker of every rendered main map (one per document), or of ``figures``, to the
        selected pixel."""
        data = self.pixel_marker()
        if figures is not None:
            for figure in figures:
                for r in figure.renderers:
                    if getattr(r, "name", None) == "xrfnb-pixel-marker":
                        r.data_source.data = dict(data)
            return
        for plot in self.main.plots():
            sources = [r.data_source for r in plot.state.renderers if r.name == "xrfnb-pixel-marker"]
            if not sources:
                continue

            def write(sources: list[Any] = sources) -> None:
                for src in sources:
                    src.data = dict(data)

            write_to_plot(plot, write)

    def _on_selection(self, *events: Event) -> None:
        self.move_pixel_marker()

    # -- kept regions -----------------------------------------------------------------------------
    def region_outlines(self) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """The kept regions as the main map draws them, in its axis units: ``(outlines, labels)``, the
        outlines' unit edges (``x0``, ``y0``, ``x1``, ``y1``, ``color``) and each region's name at the
        top left of its box (``x``, ``y``, ``text``, ``color``)."""
        d = self._dash
        mm, _ = d.map_scale()
        lines: dict[str, list[Any]] = {"x0": [], "y0": [], "x1": [], "y1": [], "color": []}
        labels: dict[str, list[Any]] = {"x": [], "y": [], "text": [], "color": []}
        for kept in d.kept_regions:
            for key, values in zip(("x0", "y0", "x1", "y1"), mask_outline(kept.mask), strict=True):
                lines[key].extend((values * mm).tolist())
            lines["color"].extend([kept.color] * (len(lines["x0"]) - len(lines["color"])))
            r0, _, c0, _ = kept.bounds
            labels["x"].append(c0 * mm)
            labels["y"].append(r0 * mm)
            labels["text"].append(kept.name)
            labels["color"].append(kept.color)
        return lines, labels

    def _regions_hook(self, plot: ElementPlot, element: hv.Element) -> None:
        """Draw the kept regions on a main-map figure (outline and name, in the region's colour, over a
        white halo); added once per figure, redrawn by :meth:`update_region_outlines`."""
        figure = plot.state
        if any(getattr(r, "name", None) == "xrfnb-region-outlines" for r in figure.renderers):
            self.update_region_outlines([figure])
            return
        lines, labels = self.region_outlines()
        line_source, label_source = ColumnDataSource(lines), ColumnDataSource(labels)
        glyphs = [
            ("xrfnb-region-halo", line_source, Segment(line_color="white", line_width=4, line_alpha=0.8)),
            ("xrfnb-region-outlines", line_source, Segment(line_color="color", line_width=2)),
            (
                "xrfnb-region-labels",
                label_source,
                Text(
                    text_color="color",
                    text_font_size="11px",
                    text_font_style="bold",
                    text_baseline="bottom",
                    background_fill_color="white",
                    background_fill_alpha=0.75,
                ),
            ),
        ]
        for name, source, glyph in glyphs:
            if isinstance(glyph, Segment):
                glyph.update(x0="x0", y0="y0", x1="x1", y1="y1")
            else:
                glyph.update(x="x", y="y", text="text")
            figure.renderers.append(GlyphRenderer(data_source=source, glyph=glyph, name=name))

    def update_region_outlines(self, figures: Sequence[Any] | None = None) -> None:
        """Redraw the kept regions on every rendered main map (one per document), or on ``figures``."""
        lines, labels = self.region_outlines()

        def write(figs: Sequence[Any]) -> None:
            for figure in figs:
                for r in figure.renderers:
                    if getattr(r, "name", None) == "xrfnb-region-outlines":
                        r.data_source.data = dict(lines)
                    elif getattr(r, "name", None) == "xrfnb-region-labels":
                        r.data_source.data = dict(labels)

        if figures is not None:
            write(figures)
            return
        for plot in self.main.plots():
            write_to_plot(plot, functools.partial(write, [plot.state]))

    def _on_kept_regions(self, *events: Event) -> None:
        self.update_region_outlines()

    # -- selection tools --------------------------------------------------------------------------
    def _attach_selection_streams(self, dmap: hv.DynamicMap) -> None:
        for stream in (self.tap, self.box, self.lasso):
            stream.source = dmap

    @guarded
    def on_tap(self, x: float | None = None, y: float | None = None, **kwargs: Any) -> None:
        """A tap on the map at (x, y) in axis units selects that pixel."""
        d = self._dash
        if x is None or y is None or d.scan is None:
            return
        mm, _ = d.map_scale()
        d.select_pixel(math.floor(y / mm), math.floor(x / mm))

    @guarded
    def on_box(self, bounds: tuple[float, float, float, float] | None = None, **kwargs: Any) -> None:
        """A box (x0, y0, x1, y1 in axis units) selects the pixels whose centres lie inside it."""
        d = self._dash
        if bounds is None or d.scan is None:
            return
        mm, _ = d.map_scale()
        x0, y0, x1, y1 = (float(b) / mm for b in bounds)
        rows, cols = d.scan.shape[:2]
        mask = np.zeros((rows, cols), dtype=bool)
        r0, r1 = sorted((y0, y1))
        c0, c1 = sorted((x0, x1))
        rr = np.arange(rows) + 0.5
        cc = np.arange(cols) + 0.5
        mask[np.ix_((rr >= r0) & (rr <= r1), (cc >= c0) & (cc <= c1))] = True
        d.select_region(mask)

    @guarded
    def on_lasso(self, geometry: np.ndarray | None = None, **kwargs: Any) -> None:
        """A lasso polygon ((n, 2) in axis units) selects the pixels whose centres lie inside it."""
        d = self._dash
        if geometry is None or d.scan is None or len(geometry) < 3:
            return
        g = np.asarray(geometry, dtype=float) / d.map_scale()[0]
        d.select_region(polygon_mask(g[:, 0], g[:, 1], *d.scan.shape[:2]))

    # -- legend -----------------------------------------------------------------------------------
    def legend_entries(self) -> list[tuple[str, str]]:
        """``(colour '#rrggbb', text)`` of the main map's legend, in display order.

        Composite: each class present somewhere (area at the current thresholds, largest first) in its
        display colour, then "no pigment above threshold" and "invalid pixel"; surface vs buried: its
        three categories; pigment and OOD views: the colours below the colour bar's range.
        """
        d = self._dash
        if d.scan is None:
            return []
        invalid = (INVALID_COLOR, "invalid pixel (masked)")
        view = d.view
        if d.maps is None or view in ("Total counts", "Elements"):
            return []
        if view == "Composite":
            colors = list(getattr(d.maps, "colors", None) or ["#888888"] * len(d.classes))
            fractions = self.legend_fractions()
            present = sorted((k for k, f in enumerate(fractions) if f > 0), key=lambda k: -fractions[k])
            entries = [(colors[k], f"{d.classes[k]} ({percent(fractions[k])})") for k in present]
            entries.append(("#000000", "no pigment above its threshold"))
            if len(present) > 1:
                entries.append(("", "pixels holding several pigments show their colours blended"))
            return [*entries, invalid]
        if view == "Surface vs buried":
            absent, surface, buried = SURFACE_BURIED_COLORS
            return [
                (surface, f"{d.focus} at the surface"),
                (buried, f"{d.focus} buried only (under another layer)"),
                (absent, f"no {d.focus} (below its threshold {d.thresholds.get(d.focus, 0):.2f})"),
                invalid,
            ]
        if view == "Pigment":
            thr = d.thresholds.get(d.focus, 0.0)
            return [(ABSENT_COLOR, f"{d.focus} below its threshold {thr:.2f}"), invalid]
        if view == "OOD score":
            return [("", f"out of distribution above {float(d.maps.ood_threshold):.2f}"), invalid]
        return []

    def legend_fractions(self) -> list[float]:
        """Area fraction per class at the current thresholds (on at most ~256 x 256 sampled pixels)."""
        d = self._dash
        rows, cols = d.maps.probability.shape[:2]
        step = stride(rows, cols, 256)
        prob = np.asarray(d.maps.probability[::step, ::step], dtype=float)
        valid = d.valid()[::step, ::step]
        n = max(int(valid.sum()), 1)
        with np.errstate(invalid="ignore"):
            present = is_present(prob, d.threshold_array())
        return [float((present[..., k] & valid).sum() / n) for k in range(len(d.classes))]

    def update_legend(self, *events: param.parameterized.Event) -> None:
        """Redraw the legend beside the map."""
        items = []
        for color, text in self.legend_entries():
            swatch = (
                f'<span style="display:inline-block;width:14px;height:14px;background:{color};'
                f'border:1px solid #888;vertical-align:middle;margin-right:4px"></span>'
                if color
                else ""
            )
            items.append(
                f'<span style="margin-right:14px;white-space:nowrap">{swatch}{escape_html(text)}</span>'
            )
        self.legend.object = (
            '<div style="font-size:12px;line-height:1.7">' + " ".join(items) + "</div>" if items else ""
        )
