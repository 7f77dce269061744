"""The :class:`Dashboard`: a Panel viewer composed of its state (:mod:`.state`) and one part per panel
(main map, gallery, spectrum and evidence, thresholds, exports, calibration card, element maps), which
opens scans (off the event loop in a server session) and maps their pigments (:mod:`.job`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn
import param

from ..._errors import DataError
from ...core.spectrum import Scan
from .adaptation import AdaptationPanel
from .bokeh import LinkedRanges, TapSubscriptions, keep_session_until_connected
from .calibration import CalibrationPanel
from .common import DEMO_LABEL, MAIN_PX, ensure_extensions, size_text, toast_text
from .data import DataPanel
from .elements import ElementViews
from .export import ExportPanel
from .files import (
    serve_target_from_args,
)
from .gallery import Gallery
from .info import SelectionInfo
from .maps import MapPanel
from .physics import PhysicsPanel
from .regions import RegionPanel
from .spectrum import SpectrumPanel
from .state import DashboardState
from .thresholds import ThresholdPanel

if TYPE_CHECKING:  # pragma: no cover
    from ...fitting.stackfit import StackFit
    from ...maps.pigmentmaps import PigmentMaps
    from ...model.model import PigmentModel
    from ...physics.stack import Stack

__all__ = ["Dashboard", "make_app"]

log = logging.getLogger(__name__)

#: the sidebar's width on screen, pixels
SIDEBAR_PX = 300


class Dashboard(DashboardState):
    """Interactive pigment-map explorer.

    Parameters
    ----------
    data_dir : path-like, optional
        The served data folder: scans can be opened only from inside it. None: no folder browsing
        (demo scene and uploads only).
    scan : Scan, optional
        A scan to show at start-up (e.g. from a notebook).
    maps : PigmentMaps, optional
        Pigment maps of ``scan`` (skips running the model).
    model : PigmentModel, optional
        A model object to use instead of choosing one by name.
    max_upload_mb : float, optional
        Largest accepted upload in MiB.
    blocking : bool, optional
        Run mapping synchronously (default when no server session is active, e.g. in tests).
    **params
        Initial values of the parameters (:class:`~xrfnb.ui.dashboard.state.DashboardState`).

    Attributes
    ----------
    map_panel, gallery, spectrum_panel, threshold_panel, export_panel, selection_info,
    calibration_panel, element_views, region_panel, physics_panel, adaptation_panel
        The parts, one per panel of the page.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        scan: Scan | None = None,
        maps: PigmentMaps | None = None,
        model: PigmentModel | None = None,
        max_upload_mb: float = 256.0,
        blocking: bool | None = None,
        **params: Any,
    ) -> None:
        ensure_extensions()
        self._data_dir = Path(data_dir).resolve() if data_dir is not None else None
        if self._data_dir is not None and not self._data_dir.is_dir():
            raise DataError(f"the served data folder {data_dir} does not exist or is not a folder")
        self.max_upload_bytes = int(float(max_upload_mb) * 1024 * 1024)
        self._loading = False
        self._element_refresh_pending = False
        super().__init__(model=model, **params)
        self.data_panel = DataPanel(self, self._data_dir, self.max_upload_bytes, blocking)
        self._build_parts()
        self._layout = self._build_layout()
        self.document_hold.layout = self._layout
        self.param.watch(self.data_panel.on_source, "source")
        self.param.watch(self.data_panel.on_model, "model_name")
        self.param.watch(self._on_global_threshold, "global_threshold")
        self.param.watch(self._on_thresholds, "thresholds")
        self.param.watch(self._on_cmap, "cmap")
        self.param.watch(self._on_log_scale, "log_scale")
        self.param.watch(self._on_data_version, "data_version")
        legend = ["view", "focus", "element", "thresholds", "log_scale"]
        self.param.watch(self.map_panel.update_legend, legend)
        if scan is not None:
            self.set_scan(scan, maps=maps, label=str(scan.metadata.get("source", "scan")))
        elif maps is not None:
            raise DataError("pigment maps need the scan they were computed from: pass scan= too")
        self.update_status()

    @classmethod
    def from_cli_args(cls, argv: Sequence[str] | None = None) -> Dashboard:
        """A dashboard for ``panel serve dashboards/xrfnb_app.py [--args FILE_OR_DIR]``.

        The data folder (or file) is the first argument after ``--args``, else ``$XRFNB_DATA``; with
        neither, the demo scene opens when it is available.
        """
        return make_app(*serve_target_from_args(argv))

    @classmethod
    def page_from_cli_args(cls, argv: Sequence[str] | None = None) -> pn.viewable.Viewable:
        """What ``panel serve dashboards/xrfnb_app.py [--args FILE_OR_DIR]`` serves: the page of ``xrfnb
        serve`` (first a small loading page, the dashboard once the browser has drawn it), and the scan a
        session opens first read and mapped in the background from the first request on.

        Arguments as :meth:`from_cli_args`; outside a server session the dashboard is built at once.
        """
        # deferred: the server module imports this one
        from .server import page_from_cli_args

        return page_from_cli_args(argv)

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def notify(self, message: str, level: str = "error") -> None:
        """Show ``message`` in the status line and as a notification (level: info, warning, error).

        The private upload folder is left out of the text (the user knows the file by its name).
        """
        upload_dir = self.data_panel.upload_dir
        if upload_dir is not None:
            message = message.replace(f"{upload_dir}{os.sep}", "")
        self.last_message = (level, message)
        alert = {"error": "danger", "warning": "warning", "success": "success"}.get(level, "info")
        self._status.object = message
        self._status.alert_type = alert
        self._status.visible = True
        notifications = getattr(pn.state, "notifications", None)
        if notifications is not None:
            try:
                getattr(notifications, level if level in ("info", "warning", "error", "success") else "info")(
                    toast_text(message), duration=10000
                )
            except Exception:  # pragma: no cover - notification area not attached to this document
                log.debug("notification failed", exc_info=True)

    # -- parts and layout -------------------------------------------------------------------------
    def _build_parts(self) -> None:
        self._status = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self._log_w = pn.widgets.Checkbox.from_param(
            self.param.log_scale, label="log counts", width=135, css_classes=["xrfnb-log"]
        )
        self._sim_w = pn.widgets.Checkbox.from_param(
            self.param.simulate_stack, label="simulate the predicted stack", width=280
        )
        taps = TapSubscriptions()
        #: the map figures that pan and zoom together (main map, element maps, RGB overlay)
        self.linked_ranges = LinkedRanges()
        self.threshold_panel = ThresholdPanel(self)
        self.export_panel = ExportPanel(self)
        self.calibration_panel = CalibrationPanel(self)
        self.adaptation_panel = AdaptationPanel(self)
        self.element_views = ElementViews(self, taps)
        self.map_panel = MapPanel(self)
        self.spectrum_panel = SpectrumPanel(self, taps)
        self.gallery = Gallery(self, taps)
        self.selection_info = SelectionInfo(self)
        self.physics_panel = PhysicsPanel(self)
        self.region_panel = RegionPanel(self)
        self.param.watch(self._on_pixel_region, ["pixel", "region", "thresholds"])

    def _build_layout(self) -> pn.viewable.Viewable:
        # a 1440 x 900 screen: data, model and exports come first; the per-class sliders sit in a
        # collapsed card below the global threshold
        maps, info, data = self.map_panel, self.selection_info, self.data_panel
        exports, thresholds = self.export_panel, self.threshold_panel
        sidebar = pn.Column(
            pn.pane.Markdown("### Data"),
            data.source_w,
            pn.pane.Markdown(f"or upload a scan (max {size_text(self.max_upload_bytes)}):"),
            data.upload,
            data.model_w,
            self.adaptation_panel.controls,
            data.progress_bar,
            data.progress_text,
            self.calibration_panel.card,
            pn.pane.Markdown("### Export"),
            exports.map_row,
            pn.Row(exports.hdf5, exports.csv),
            pn.Row(exports.report, exports.regions_csv),
            pn.pane.Markdown("### View"),
            maps.controls,
            self._log_w,
            self._sim_w,
            pn.pane.Markdown("### Thresholds"),
            thresholds.global_w,
            thresholds.reset_w,
            thresholds.card,
            width=SIDEBAR_PX,
        )
        # fixed width: the spectrum column beside it must fit on a 1440-px screen
        self._map_column = pn.Column(
            maps.main.pane,
            maps.legend,
            info.info,
            info.scan_info,
            self.region_panel.section,
            width=MAIN_PX + 70,
        )
        spectra = self.spectrum_panel
        main = pn.Column(
            self._status,
            info.ood_alert,
            self.adaptation_panel.section,
            pn.Row(
                self._map_column,
                pn.Column(
                    spectra.spectrum.pane,
                    spectra.residual.pane,
                    spectra.prob.pane,
                    info.fractions,
                    self.physics_panel.section,
                ),
                info.calls,
            ),
            self.gallery.section,
            sizing_mode="stretch_width",
        )
        header = pn.pane.Markdown("## xrfnb: pigment maps from XRF scans", sizing_mode="stretch_width")
        # the element maps go below the row, indented by the sidebar's width: inside the row (beside the
        # sidebar) Chromium drew their grid of figures as empty frames
        self.element_views.section.margin = (5, 10, 5, SIDEBAR_PX + 10)
        return pn.Column(
            header,
            pn.Row(sidebar, main, sizing_mode="stretch_width"),
            self.element_views.section,
            sizing_mode="stretch_width",
        )

    # -- showing a scan -------------------------------------------------------------------------
    def set_scan(
        self,
        scan: Scan,
        maps: PigmentMaps | None = None,
        label: str = "scan",
        total: np.ndarray | None = None,
    ) -> None:
        """Show ``scan`` (and its pigment maps, if given) and reset selections.

        ``total`` is the scan's total-counts image (rows, cols) when already computed (by a worker).
        """
        if not isinstance(scan, Scan):
            raise DataError(f"expected a Scan, got {type(scan).__name__}")
        if maps is not None:
            shape = tuple(np.shape(maps.probability))
            if shape[:2] != scan.shape[:2]:
                raise DataError(f"pigment maps of shape {shape[:2]} do not match the {scan.shape[:2]} scan")
        jobs = self.data_panel.jobs
        if jobs.job is not None and jobs.job.scan is not scan:
            # nobody waits for those maps (or that file) any more: stop after the current block
            jobs.drop()
        total = np.asarray(total if total is not None else scan.total_counts_image(), dtype=float)
        rows, cols = scan.shape[:2]
        # scan, selection and maps change together: no watcher may see the new scan with the old pixel
        # (outside a smaller scan) or the old maps. The batch's watchers run when it ends, still
        # "loading": the new maps' global threshold must not overwrite their per-class thresholds
        was_loading, self._loading = self._loading, True
        try:
            with self.action(), param.parameterized.batch_call_watchers(self):
                self._scan = scan
                self._label = label
                self._energy_keV = scan.energy_keV
                self._total = total
                self.region = None
                self.pixel = (rows // 2, cols // 2)
                self.clear_regions()
                self.set_maps(maps, bump=False)
                self.data_version += 1
        finally:
            self._loading = was_loading

    def set_maps(self, maps: PigmentMaps | None, bump: bool = True) -> None:
        """Show new pigment maps of the open scan (None: none), with their calibrated thresholds."""
        classes = tuple(maps.classes) if maps is not None else ()
        em = getattr(maps, "element_maps", None) if maps is not None else None
        elements = list(em.elements) if em is not None else []
        was_loading, self._loading = self._loading, True
        try:
            # all values change together: plots must never see new maps with old thresholds
            with param.parameterized.batch_call_watchers(self):
                self._maps = maps
                if maps is not None:
                    defaults = np.asarray(maps.thresholds, dtype=float)
                    self.thresholds = {c: float(defaults[k]) for k, c in enumerate(classes)}
                    self.global_threshold = float(np.round(np.median(defaults), 2)) if len(defaults) else 0.5
                else:
                    self.thresholds = {}
                self.param.focus.objects = list(classes)
                self.param.element.objects = elements
                self.focus = classes[0] if classes else None
                self.element = elements[0] if elements else None
                if bump:
                    self.data_version += 1
        finally:
            self._loading = was_loading
        self.threshold_panel.build_sliders()

    def recalibrated(self, scan: Scan) -> None:
        """Show ``scan``, the open scan with a new energy calibration, and recompute its pigment maps
        (in a worker thread in a server session)."""
        kept, number = self.kept_regions, self._region_number  # same pixels and counts: they stay
        self.set_scan(scan, label=self._label, total=self._total)
        self.kept_regions, self._region_number = kept, number
        self.data_panel.map_current(cache_key=None)
        self.update_status()

    def use_model(self, name: str) -> None:
        """Choose the listed model ``name`` (a model object given to the dashboard is dropped) and make the
        open scan's maps again with it (in a worker thread in a server session)."""
        self.forget_model_obj()
        self.data_panel.refresh_choices()
        if name not in self.param.model_name.objects:
            raise DataError(
                f"no model {name!r} in the model list: {', '.join(self.param.model_name.objects)}"
            )
        if self.model_name != name:
            self.model_name = name  # the model chooser's watcher maps the scan again
        elif self._scan is not None:  # the same name (a given model object was in use): map again here
            self.set_maps(None)
            self.data_panel.map_current(cache_key=None)

    # -- reactions --------------------------------------------------------------------------------
    def _on_global_threshold(self, event: param.parameterized.Event) -> None:
        if self.threshold_panel.syncing or self._loading or not self.classes:
            return
        with self.action():
            self.thresholds = dict.fromkeys(self.classes, float(event.new))

    def _on_thresholds(self, event: param.parameterized.Event) -> None:
        old = event.old or {}
        self.threshold_panel.sync_sliders()
        changed = [c for c in self.classes if old.get(c) != self.thresholds.get(c)]
        self.gallery.update_thumbnails(changed)

    def _on_cmap(self, event: param.parameterized.Event) -> None:
        self.gallery.update_thumbnails(list(self.classes))
        self.element_views.refresh()

    def _on_log_scale(self, event: param.parameterized.Event) -> None:
        self.element_views.refresh_mosaic()

    def _on_data_version(self, event: param.parameterized.Event) -> None:
        self.selection_info.update_scan_info()
        self._refresh_element_views()
        self.gallery.rebuild()
        self.update_status()
        self.selection_info.update_ood_alert()
        self.map_panel.update_legend()
        self._update_single_spectrum()

    def _refresh_element_views(self) -> None:
        """Rebuild the element maps for new data; in a server session on the next tick of its event loop.

        A new scan's page update is sent when the callback that made it ends: the element maps (a figure
        per element, a good part of the work) follow in a second update, so that the pigment maps above
        them are drawn seconds earlier. Outside a session (tests, notebooks) they are rebuilt at once.
        """
        doc = pn.state.curdoc
        if self.data_panel.is_blocking() or doc is None or doc.session_context is None:
            self.element_views.refresh()
            return
        if self._element_refresh_pending:
            return
        self._element_refresh_pending = True

        def refresh() -> None:
            self._element_refresh_pending = False
            with self.action():
                self.element_views.refresh()

        doc.add_next_tick_callback(refresh)

    def _on_pixel_region(self, *events: param.parameterized.Event) -> None:
        self.selection_info.update_ood_alert()
        if self.single_spectrum:
            self.selection_info.update_calls()
        self.selection_info.update_selection()

    def _update_single_spectrum(self) -> None:
        """The single-spectrum view: calls table shown, maps, gallery and map-only controls hidden."""
        single = self.single_spectrum
        map_only = (self._map_column, self.gallery.section, self.map_panel.controls)
        for widget in (*map_only, self.export_panel.map_row, self.export_panel.regions_csv):
            widget.visible = not single
        self.selection_info.update_calls()

    def show_status(self, message: str, alert_type: str = "info", visible: bool | None = True) -> None:
        """Write ``message`` in the status line (``visible`` None: leave its visibility)."""
        self._status.object = message
        self._status.alert_type = alert_type
        if visible is not None:
            self._status.visible = visible

    def update_status(self) -> None:
        """The status line: what is shown, or what is missing and what to do about it."""
        parts = []
        if self._scan is None:
            parts.append(
                "No scan open: choose one from the served folder"
                + (" or the demo" if DEMO_LABEL in self.param.source.objects else "")
                + ", or upload a file."
            )
        if not self.model_available() and self._maps is None:
            parts.append(
                "No trained pigment model is available (none shipped with the package, in $XRFNB_MODELS "
                "or in the user's models folder): pigment maps cannot be computed. Train one with "
                "`xrfnb train`; total counts and spectra still work."
            )
        elif self._scan is not None and self._maps is None and self.needs_calibration():
            parts.append(
                f"{self._label} has no energy calibration ({self._scan.calibration}; "
                f"{self._scan.metadata.get('calibration_source') or 'none in the file'}), so pigments "
                "cannot be identified yet. Calibrate it in the 'Energy calibration' card on the left: "
                "enter peaks you recognise as line=channel (e.g. Fe Ka=537), or choose a line and click "
                "its peak on the spectrum; fit, check the residuals, then apply."
            )
        elif self._scan is not None and self._maps is None and not self.busy:
            parts.append("No pigment maps for this scan yet.")
        if parts:
            self._status.object = " ".join(parts)
            self._status.alert_type = "warning"
            self._status.visible = True
        elif not self.busy:
            self._status.object = (
                f"Showing {self._label}: {self._scan.shape[0]} x {self._scan.shape[1]} pixels."
            )
            self._status.alert_type = "success"
            self._status.visible = True
        self.status_text = self._status.object

    # -- what the parts do, for scripts and notebooks ---------------------------------------------
    def main_array(self) -> tuple[str, np.ndarray]:
        """The main view's image: ``(kind, array)``, kind "rgb" (rows, cols, 3) uint8 or "value"
        (:meth:`~xrfnb.ui.dashboard.maps.MapPanel.main_array`)."""
        return self.map_panel.main_array()

    def legend_entries(self) -> list[tuple[str, str]]:
        """``(colour, text)`` of the main map's legend
        (:meth:`~xrfnb.ui.dashboard.maps.MapPanel.legend_entries`)."""
        return self.map_panel.legend_entries()

    def pixel_marker(self) -> dict[str, list[float]]:
        """The selected-pixel marker's data (:meth:`~xrfnb.ui.dashboard.maps.MapPanel.pixel_marker`)."""
        return self.map_panel.pixel_marker()

    def gallery_data(self) -> dict[str, Any]:
        """The gallery mosaic (:meth:`~xrfnb.ui.dashboard.gallery.Gallery.gallery_data`)."""
        return self.gallery.gallery_data()

    def calls_table(self) -> list[dict[str, Any]]:
        """The calls at the selected pixel with their evidence
        (:meth:`~xrfnb.ui.dashboard.info.SelectionInfo.calls_table`)."""
        return self.selection_info.calls_table()

    def predicted_pigments(self) -> tuple[tuple[str, ...], tuple[str, ...]] | str:
        """``(surface, buried)`` pigments called at the selection, or why there are none
        (:meth:`~xrfnb.ui.dashboard.spectrum.SpectrumPanel.predicted_pigments`)."""
        return self.spectrum_panel.predicted_pigments()

    def fitted_stack(self) -> StackFit | None:
        """The stack fitted to the called pigments
        (:meth:`~xrfnb.ui.dashboard.spectrum.SpectrumPanel.fitted_stack`)."""
        return self.spectrum_panel.fitted_stack()

    def predicted_stack(self) -> tuple[Stack | None, str]:
        """The fitted stack and its description
        (:meth:`~xrfnb.ui.dashboard.spectrum.SpectrumPanel.predicted_stack`)."""
        return self.spectrum_panel.predicted_stack()

    def simulated_spectrum(self) -> tuple[str, np.ndarray] | None:
        """``(description, expected counts (channels,))`` of the fitted stack
        (:meth:`~xrfnb.ui.dashboard.spectrum.SpectrumPanel.simulated_spectrum`)."""
        return self.spectrum_panel.simulated_spectrum()

    def reset_thresholds(self, event: object = None) -> None:
        """Back to the model's calibrated thresholds."""
        self.threshold_panel.reset_thresholds()

    def map_rgba(self) -> tuple[np.ndarray, tuple[tuple[str, ...], float, float, str] | None]:
        """The main map as drawn, RGBA (rows, cols, 4) uint8, and its colour bar
        (:meth:`~xrfnb.ui.dashboard.export.ExportPanel.map_rgba`)."""
        return self.export_panel.map_rgba()

    def export_png(self) -> bytes:
        """The main map as a PNG figure (:meth:`~xrfnb.ui.dashboard.export.ExportPanel.export_png`)."""
        return self.export_panel.export_png()

    def export_hdf5(self) -> bytes:
        """The pigment maps with the current thresholds as HDF5 bytes."""
        return self.export_panel.export_hdf5()

    def export_tiff(self) -> bytes:
        """The pigment maps as TIFF files in a zip archive."""
        return self.export_panel.export_tiff()

    def export_report(self) -> bytes:
        """The report for the conservation file as self-contained HTML bytes."""
        return self.export_panel.export_report()

    def export_spectrum_csv(self) -> bytes:
        """The shown spectrum (pixel or region mean) as CSV: energy_keV, counts."""
        return self.export_panel.export_spectrum_csv()

    def export_regions_csv(self) -> bytes:
        """The kept regions' spectra as one CSV
        (:meth:`~xrfnb.ui.dashboard.export.ExportPanel.export_regions_csv`)."""
        return self.export_panel.export_regions_csv()

    def open(self, name: str) -> None:
        """Open a scan: a path inside the served folder, or :data:`DEMO_LABEL`; then map it
        (:meth:`~xrfnb.ui.dashboard.data.DataPanel.open`)."""
        self.data_panel.open(name)

    def load_upload(self, filename: str, data: bytes | str) -> None:
        """Open an uploaded file (bytes) after checking its size
        (:meth:`~xrfnb.ui.dashboard.data.DataPanel.load_upload`)."""
        self.data_panel.load_upload(filename, data)


def make_app(
    data_dir: Path | None = None, initial: str | None = None, max_upload_mb: float = 256.0
) -> Dashboard:
    """A new :class:`Dashboard` for one browser session (opens ``initial`` or the demo scene).

    In a server session, the session is kept until its page connects
    (:func:`~xrfnb.ui.dashboard.bokeh.keep_session_until_connected`): Bokeh would otherwise discard it
    after 15 s without a connection, which a page opened while others are being built can take.
    """
    keep_session_until_connected()
    dash = Dashboard(data_dir, max_upload_mb=max_upload_mb)
    if initial is not None:
        dash.source = initial
    elif data_dir is None and DEMO_LABEL in dash.param.source.objects:
        dash.source = DEMO_LABEL
    return dash
