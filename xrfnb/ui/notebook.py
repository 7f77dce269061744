"""One set-up call for the notebooks: display extensions with local resources only, small-data switch, output.

Panel 1.9 honours ``pn.extension(inline=True)`` only at the first render of a Panel object: it inlines the
stylesheets of that render (``Viewable._repr_mimebundle_``). Every HoloViews figure displayed as a cell
output (rendered by HoloViews' own notebook renderer), and every Markdown/HTML pane whose text changes
later (Panel hands it its cached stylesheet objects again), keeps Panel's stylesheets as links to
``cdn.holoviz.org``: ``css/loading.css``, ``css/listpanel.css``, ``bundled/theme/default.css`` and
``bundled/theme/native.css`` for each output, ``css/markdown.css`` and others by component. Offline, as on
many museum networks, these requests fail. :func:`setup_notebook` loads the extensions with ``inline=True``
and registers one Panel preprocessing hook (``Viewable._preprocessing_hooks``, the extension point Panel's
own HoloViews pane and links use; it runs at every render and at the updates that re-render part of an
output) that points each such stylesheet object, in place, at a ``data:`` URL holding the file from Panel's
installed ``dist`` folder.

The hook alone is not enough: a Markdown/HTML pane whose text changes (Panel's ``_updates`` panes, e.g. the
dashboard's legend) is updated without running the preprocessing hooks, and the update is pushed over the
comm (``panel.io.notebook.push``) right away. Such an update looks its stylesheets up in Panel's
per-document cache (``panel.io.state.state._stylesheets[doc]``), but under another key than the render
stored them: the render runs in Panel's ``inline`` resource mode, where ``get_dist_path()`` is the CDN, the
update in the session's default (``server``) mode, where it is ``static/extensions/panel/``. The lookup
misses, a fresh ``ImportedStyleSheet`` is made, ``Reactive._get_properties`` points it at the CDN
(``patch_stylesheet`` with no ``dist_url`` in a notebook document) and the browser fetches
``cdn.holoviz.org/.../css/loading.css``. So the hook also gives each document it sees a cache that makes
local every stylesheet stored in it (:class:`_LocalStylesheetCache`): every stylesheet such an update (or
a design) creates goes through that cache before it reaches the model, so it is local before the push.

Not covered: reassigning ``.stylesheets`` (or ``.design``) of an object already displayed; Panel then makes
fresh stylesheet objects that bypass the cache and links ``loading.css`` from the CDN again. Neither xrfnb
nor its notebooks do that.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import holoviews as hv
import panel as pn
from bokeh.models import ImportedStyleSheet, Model
from panel.io.resources import CDN_DIST, DIST_DIR, LOCAL_DIST
from panel.io.state import state
from panel.viewable import Viewable

from .. import __version__

__all__ = ["NotebookSetup", "localize_panel_stylesheets", "setup_notebook"]

#: environment switches the test suite sets (tests/test_notebooks.py)
SMALL_ENV = "XRFNB_NOTEBOOK_SMALL"
OUTPUT_ENV = "XRFNB_NOTEBOOK_OUTPUT"
DEFAULT_OUTPUT = "xrfnb-output"
#: the folder of measured spectra notebook 04 reads: ``$XRFNB_REAL_DATA``, else the project's shared data
#: beside the repository (``../shared/data/real`` from the repository root), relative to the notebook's
#: folder (``notebooks/``), where Jupyter starts the notebook's kernel
REAL_DATA_ENV = "XRFNB_REAL_DATA"
DEFAULT_REAL_DATA = Path("..", "..", "shared", "data", "real")

#: URL prefixes of Panel's own static files: its CDN, the Panel server's and the Jupyter server extension's
_DIST_PREFIXES = (CDN_DIST, "/panel-preview/" + LOCAL_DIST, "/" + LOCAL_DIST, LOCAL_DIST)


@dataclass(frozen=True)
class NotebookSetup:
    """What :func:`setup_notebook` decided.

    Attributes
    ----------
    small : bool
        Small-data mode (small scans, tiny training runs): ``XRFNB_NOTEBOOK_SMALL=1``, as the tests run.
    output_dir : pathlib.Path
        Folder the notebook writes its results to (created).
    real_data : pathlib.Path
        Folder of measured spectra to read (``$XRFNB_REAL_DATA``, else ``../../shared/data/real`` from the
        notebook's folder); it may not exist: check the files you need.
    """

    small: bool
    output_dir: Path
    real_data: Path


def setup_notebook(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    small: bool | None = None,
    announce: bool = True,
    real_data: str | os.PathLike[str] | None = None,
) -> NotebookSetup:
    """Prepare a Jupyter session for xrfnb: local display resources only, small-data switch, output folder.

    Loads HoloViews' Bokeh backend and Panel with inline resources (``hv.extension("bokeh", inline=True)``,
    ``pn.extension(inline=True)``) and makes every Panel stylesheet of every Panel/HoloViews output of the
    session inline, including those of models created or updated later by widgets and callbacks, so that
    nothing is requested from a CDN (Panel 1.9 would otherwise link four stylesheets per output from
    ``cdn.holoviz.org``). Calling it again is harmless.

    Parameters
    ----------
    output_dir : path-like, optional
        Where the notebook writes its results. Default: ``$XRFNB_NOTEBOOK_OUTPUT``, else ``xrfnb-output``
        (relative to the notebook's folder). Created if missing.
    small : bool, optional
        Small-data mode. Default: ``$XRFNB_NOTEBOOK_SMALL == "1"`` (set by the test suite).
    announce : bool
        Print one line with xrfnb's version, the mode and the output folder.
    real_data : path-like, optional
        Folder of measured spectra. Default: ``$XRFNB_REAL_DATA``, else ``../../shared/data/real``
        (relative to the notebook's folder: the project's shared data beside the repository). Not created.

    Returns
    -------
    NotebookSetup
        The mode, the (created) output folder and the folder of measured spectra.

    Examples
    --------
    The first code cell of each of xrfnb's notebooks (not run by the doctests: it changes the display
    set-up of the whole Python session, HoloViews' and Panel's extensions and a Panel hook):

    >>> import xrfnb
    >>> setup = xrfnb.setup_notebook()  # doctest: +SKIP
    >>> SMALL, OUT = setup.small, setup.output_dir  # doctest: +SKIP
    """
    if small is None:
        small = os.environ.get(SMALL_ENV, "0") == "1"
    if output_dir is None:
        output_dir = os.environ.get(OUTPUT_ENV) or DEFAULT_OUTPUT
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    hv.extension("bokeh", inline=True, logo=False)
    pn.extension(inline=True)
    if localize_panel_stylesheets not in Viewable._preprocessing_hooks:
        Viewable._preprocessing_hooks.append(localize_panel_stylesheets)
    if announce:
        print(f"xrfnb {__version__}; small-data mode: {small}; results go to {out.resolve()}")
    if real_data is None:
        real_data = os.environ.get(REAL_DATA_ENV) or DEFAULT_REAL_DATA
    return NotebookSetup(small=bool(small), output_dir=out, real_data=Path(real_data))


@cache
def _local_url(url: str) -> str | None:
    """A ``data:`` URL holding the file of Panel's ``dist`` folder that ``url`` names, or None if none."""
    path = url.split("?", 1)[0].split("#", 1)[0]
    for prefix in _DIST_PREFIXES:
        if path.startswith(prefix):
            relative = path[len(prefix) :]
            break
    else:
        return None
    dist = DIST_DIR.resolve()
    file = (dist / relative).resolve()
    if not file.is_relative_to(dist) or file.suffix != ".css" or not file.is_file():
        return None
    return "data:text/css;base64," + base64.b64encode(file.read_bytes()).decode("ascii")


def localize_stylesheets(models: Iterable[Model]) -> int:
    """Point every stylesheet link to Panel's static files among ``models`` at an inline ``data:`` copy.

    The stylesheet objects are changed in place rather than replaced, because Panel caches them per
    document (and per design) and hands the same objects to the models it updates later (e.g. a Markdown
    pane whose text changes).

    Parameters
    ----------
    models : iterable of bokeh.models.Model
        Models to look at; those that are not ``ImportedStyleSheet`` are skipped.

    Returns
    -------
    int
        Number of stylesheets changed. Links to other places (a user's own stylesheet) are kept.
    """
    changed = 0
    for sheet in models:
        if isinstance(sheet, ImportedStyleSheet):
            try:
                url = str(sheet.url)
            except Exception:  # an unset url (bokeh's UnsetValueError): nothing to point anywhere
                continue
            local = _local_url(url)
            if local is not None:
                sheet.url = local
                changed += 1
    return changed


def localize_panel_stylesheets(
    viewable: Viewable, root: Model, changed: Viewable | None = None, old_models: Any = None
) -> None:
    """Panel preprocessing hook (every render and update): make the root's stylesheets local.

    Registered in ``panel.viewable.Viewable._preprocessing_hooks`` by :func:`setup_notebook` and by the
    dashboard when it is shown outside a server session.

    Parameters
    ----------
    viewable : panel.viewable.Viewable
        The object rendered or updated.
    root : bokeh.models.Model
        Its root model; every ``ImportedStyleSheet`` under it is made local (:func:`localize_stylesheets`).
    changed : panel.viewable.Viewable, optional
        The object that changed (an update), as Panel passes it; unused.
    old_models : object, optional
        As Panel passes it; unused.

    Notes
    -----
    A served session's document (one with a session context: ``xrfnb serve``, ``panel serve``) is left
    alone: its page loads Panel's stylesheets from the server, and walking its models at every update cost
    seconds when a served dashboard showed its first maps (the hook is registered once per process, by
    whatever showed a dashboard first, so it also runs for served sessions).

    It walks the whole root each time (about 30 ms for the dashboard's 300 models): an update can give new
    stylesheets to models outside the object that changed (tests/test_notebook_offline.py finds a
    ``loading.css`` link left when only the changed object's models are walked). It also gives the root's
    document the cache :class:`_LocalStylesheetCache` (once; later calls keep it), so that the updates
    that do not run the hooks (a Markdown/HTML pane's new text) get local stylesheets too.
    """
    doc = root.document if root.document is not None else state.curdoc
    if doc is not None and doc.session_context is not None:
        return  # a served page: its stylesheets come from the server's own static route
    sheets = list(root.select({"type": ImportedStyleSheet}))
    localize_stylesheets(sheets)
    if root.document is not None:
        docs = [root.document]
    else:  # a first render: Panel runs the hooks before it adds the root to its document; find the
        # document by the cache Panel filled while it made the root's models (same stylesheet objects)
        ids = {id(sheet) for sheet in sheets}
        docs = [
            doc
            for doc, cache in list(state._stylesheets.items())
            if not isinstance(cache, _LocalStylesheetCache) and any(id(s) in ids for s in cache.values())
        ]
    for doc in docs:
        cache = state._stylesheets.get(doc, {})
        if not isinstance(cache, _LocalStylesheetCache):
            state._stylesheets[doc] = _LocalStylesheetCache(cache)


class _LocalStylesheetCache(dict[str, Any]):
    """Panel's per-document stylesheet cache (``state._stylesheets[doc]``) that makes what it stores local.

    Panel (1.9) stores every ``ImportedStyleSheet`` it makes for a document's models in this cache
    (``Reactive._get_properties``, the design's ``_apply_hooks``/``_patch_modifiers``) before it hands it to
    a model, and takes the cached object when it finds one; an update of a Markdown/HTML pane's text goes
    this way without running the preprocessing hooks. Storing a sheet here points it, in place, at its
    ``data:`` copy (:func:`localize_stylesheets`), so that no stylesheet Panel takes from or puts into the
    cache is a link to Panel's files (Panel's ``patch_stylesheet`` leaves a ``data:`` URL alone). Other
    links (a user's own stylesheets) are kept. Installed by :func:`localize_panel_stylesheets`, which
    replaces a plain cache by this one (its sheets made local) once per document; Panel then keeps it
    (``state._stylesheets.get(doc, {})``). The cache lives and dies with the document (a weak mapping).
    """

    def __init__(self, sheets: dict[str, Any]) -> None:
        super().__init__(sheets)
        localize_stylesheets(self.values())

    def __setitem__(self, url: str, sheet: Any) -> None:
        localize_stylesheets([sheet])
        super().__setitem__(url, sheet)

    def setdefault(self, url: str, sheet: Any = None) -> Any:
        if url not in self:
            self[url] = sheet
        return self[url]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for url, sheet in dict(*args, **kwargs).items():
            self[url] = sheet
