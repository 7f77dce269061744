"""The dashboard's kept regions: several regions of the map (box or lasso selections) kept side by side,
their spectra overlaid in distinct colours (mean counts per pixel, or summed), listed with their pixel
counts and bounds and, where the pigment maps were checked by physics, their call patterns with the checks
(:mod:`.physics`), removed one by one; their outlines are drawn on the main map (:mod:`.maps`) and the
export panel writes them all to one CSV (:mod:`.export`)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn

from .bokeh import SwitchingPlot, name_hook
from .common import escape_html, guarded, message_plot, micro

if TYPE_CHECKING:  # pragma: no cover
    from param.parameterized import Event

    from .app import Dashboard
    from .state import KeptRegion

__all__ = ["STAT_LABELS", "RegionPanel"]

#: what each choice of :attr:`~xrfnb.ui.dashboard.state.DashboardState.region_stat` shows, for people
STAT_LABELS = {"mean": "mean counts per pixel", "sum": "summed counts"}
#: the region plot's size on screen, pixels
PLOT_WIDTH, PLOT_HEIGHT = 520, 280


class RegionPanel(pn.viewable.Viewer):
    """The "Region spectra" part of a :class:`~xrfnb.ui.dashboard.Dashboard`: keep the selected region,
    compare the kept regions' spectra, remove them.

    Parameters
    ----------
    dash : Dashboard
        The dashboard whose regions are kept (:meth:`~xrfnb.ui.dashboard.state.DashboardState.keep_region`).
    """

    def __init__(self, dash: Dashboard) -> None:
        super().__init__()
        self._dash = dash
        self.keep_w = pn.widgets.Button(
            label="Keep this region",
            color="primary",
            width=150,
            disabled=True,
            css_classes=["xrfnb-keep-region"],
        )
        self.clear_w = pn.widgets.Button(label="Remove all", width=110, disabled=True)
        self.stat_w = pn.widgets.RadioButtonGroup.from_param(
            dash.param.region_stat, options={label: stat for stat, label in STAT_LABELS.items()}, width=260
        )
        self.keep_w.on_click(self._on_keep)
        self.clear_w.on_click(self._on_clear)
        self.list = pn.Column(sizing_mode="stretch_width", css_classes=["xrfnb-region-list"])
        self.plot = SwitchingPlot(
            dash,
            self._plot_element,
            self.plot_kind,
            ["kept_regions", "region_stat", "log_scale", "data_version"],
            dash.document_hold,
            css_classes=["xrfnb-region-spectra"],
        )
        self.section = pn.Column(
            pn.pane.Markdown("### Region spectra"),
            pn.pane.Markdown(
                "Select a region on the map (box or lasso tool), then keep it to compare its spectrum "
                "with other regions'.",
                styles={"font-size": "small"},
            ),
            pn.Row(self.keep_w, self.clear_w),
            self.stat_w,
            self.list,
            self.plot.pane,
            width=PLOT_WIDTH + 10,
        )
        dash.param.watch(self._on_regions, ["kept_regions", "data_version"])
        dash.param.watch(self._on_selection, ["region", "pixel"])

    def __panel__(self) -> pn.viewable.Viewable:
        return self.section

    def notify(self, message: str, level: str = "error") -> None:
        """Tell the user (the dashboard's status line and notifications)."""
        self._dash.notify(message, level)

    # -- actions ----------------------------------------------------------------------------------
    @guarded
    def _on_keep(self, event: Any = None) -> None:
        self._dash.keep_region()

    @guarded
    def _on_clear(self, event: Any = None) -> None:
        self._dash.clear_regions()

    @guarded
    def _on_remove(self, name: str, event: Any = None) -> None:
        self._dash.remove_region(name)

    def _on_selection(self, *events: Event) -> None:
        d = self._dash
        # nothing to keep: no region selected, or the selected one is kept already
        region = d.region
        self.keep_w.disabled = region is None or any(np.array_equal(k.mask, region) for k in d.kept_regions)

    def _on_regions(self, *events: Event) -> None:
        self.refresh_list()

    def refresh_list(self) -> None:
        """The list of kept regions: each with its pixels, bounds and remove button and, for maps checked
        by physics, a card with its call patterns and their checks
        (:meth:`~xrfnb.ui.dashboard.physics.PhysicsPanel.region_markdown`)."""
        d = self._dash
        self._on_selection()
        self.clear_w.disabled = not d.kept_regions
        mm, axes = d.map_scale()
        mm_per_px = mm if axes[0].endswith("(mm)") else None
        rows = []
        for kept in d.kept_regions:
            remove = pn.widgets.Button(label="Remove", width=80, height=30, margin=(2, 5))
            remove.on_click(functools.partial(self._on_remove, kept.name))
            swatch = (
                f'<span style="display:inline-block;width:12px;height:12px;background:{kept.color};'
                'border:1px solid #555;margin-right:6px;vertical-align:middle"></span>'
            )
            what = escape_html(micro(kept.describe(mm_per_px)))
            text = pn.pane.HTML(
                f'<div style="font-size:12px;line-height:1.4">{swatch}{what}</div>',
                sizing_mode="stretch_width",
                margin=(2, 5),
            )
            rows.append(pn.Row(text, remove, sizing_mode="stretch_width"))
            if d.maps is not None and d.maps.pattern is not None:
                listing = pn.pane.Markdown(
                    d.physics_panel.region_markdown(kept.mask, kept.name),
                    sizing_mode="stretch_width",
                    css_classes=["xrfnb-region-physics"],
                )
                rows.append(
                    pn.Card(
                        listing,
                        title=f"{kept.name}: calls checked by physics",
                        collapsed=True,
                        sizing_mode="stretch_width",
                        margin=(0, 5, 5, 5),
                    )
                )
        self.list.objects = rows

    # -- the plot ---------------------------------------------------------------------------------
    def plot_kind(self) -> str:
        """Element type the plot needs now (a new plot when it changes: the log axis cannot switch)."""
        d = self._dash
        if d.scan is None or not d.kept_regions:
            return "Text"
        return "Overlay-log" if d.log_scale else "Overlay"

    def spectra(self) -> tuple[np.ndarray, list[tuple[KeptRegion, np.ndarray]]]:
        """``(energy_keV (channels,), [(region, counts (channels,))])`` of the kept regions, in the
        chosen statistic (mean counts per pixel or summed counts)."""
        d = self._dash
        return d.scan.energy_keV, [(k, k.counts(d.region_stat)) for k in d.kept_regions]

    def _plot_element(self, **kwargs: Any) -> hv.Element:
        d = self._dash
        if d.scan is None or not d.kept_regions:
            return message_plot(
                "No region kept yet: the spectra of kept regions are overlaid here.",
                width=PLOT_WIDTH,
                height=80,
            )
        energy, spectra = self.spectra()
        ylabel = "Mean counts per pixel" if d.region_stat == "mean" else "Summed counts"
        curves = []
        for kept, counts in spectra:
            # on a log axis, empty channels sit at half a count (of one pixel, for a mean)
            floor = 0.5 / kept.n_pixels if d.region_stat == "mean" else 0.5
            y = np.maximum(counts, floor) if d.log_scale else counts
            curve = hv.Curve((energy, y), "Energy (keV)", ylabel, label=f"{kept.name} ({kept.n_pixels} px)")
            curves.append(curve.opts(color=kept.color, line_width=1.2))
        what = "Mean spectra" if d.region_stat == "mean" else "Summed spectra"
        return hv.Overlay(curves).opts(
            hv.opts.Curve(framewise=True, tools=["hover"]),
            hv.opts.Overlay(
                title=f"{what} of the kept regions",
                width=PLOT_WIDTH,
                height=PLOT_HEIGHT,
                logy=d.log_scale,
                show_legend=True,
                legend_position="top_right",
                legend_opts={"click_policy": "hide", "label_text_font_size": "11px"},
                hooks=[name_hook("xrfnb-region-spectra")],
                framewise=True,
            ),
        )
