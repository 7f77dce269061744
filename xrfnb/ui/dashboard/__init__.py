"""Panel dashboard: pigment maps linked to spectra, threshold tuning, evidence and export.

The dashboard is a :class:`Dashboard` (a :class:`panel.viewable.Viewer`): every control is a ``param``
parameter, so it can be driven from Python (tests, notebooks) exactly as a user drives it in the browser.
:func:`serve` starts a Bokeh server with one independent :class:`Dashboard` per browser session.

Security model: the server binds to ``127.0.0.1`` unless told otherwise; only files inside the served data
folder can be opened (paths are resolved, symlinks followed, and anything outside refused); uploads are
bounded in size and written to a private temporary folder per session; all resources (Bokeh, Panel,
HoloViews JavaScript) are served by the server itself, never from a CDN.

Its modules, along the page:

- :mod:`.state`: the parameters, the open scan and maps, the selection (:class:`DashboardState`);
- :mod:`.app`: the :class:`Dashboard` that composes the parts below;
- :mod:`.data`: opening scans and uploads, mapping pigments; :mod:`.job`: the background work;
- :mod:`.maps` (main map, legend, selection tools, kept regions' outlines), :mod:`.gallery`,
  :mod:`.spectrum` (spectrum, fitted stack, residual, probability bars), :mod:`.regions` (kept regions
  and their spectra overlaid), :mod:`.info` (selection texts, calls of one spectrum), :mod:`.thresholds`,
  :mod:`.export`, :mod:`.calibration` and :mod:`.elements` (element maps side by side, RGB overlay): one
  viewer per panel;
- :mod:`.adaptation`: adapting the model to the scan's scanner from the page, in the process of
  :mod:`.adapt_worker`;
- :mod:`.bokeh`: figure patching, document holds, hooks and tap subscriptions;
- :mod:`.files`: the served folder, uploads and caches; :mod:`.server`: the server.
"""

from __future__ import annotations

from .app import Dashboard, make_app
from .calibration import CalibrationPanel, parse_peaks
from .common import DEMO_LABEL, PALETTES, VIEWS
from .files import available_models, list_data_files, resolve_inside
from .job import MappingJob
from .server import serve, serve_app
from .state import DashboardState

__all__ = [
    "DEMO_LABEL",
    "PALETTES",
    "VIEWS",
    "CalibrationPanel",
    "Dashboard",
    "DashboardState",
    "MappingJob",
    "available_models",
    "list_data_files",
    "make_app",
    "parse_peaks",
    "resolve_inside",
    "serve",
    "serve_app",
]
