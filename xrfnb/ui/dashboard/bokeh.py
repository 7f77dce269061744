"""Bokeh and HoloViews plumbing of the dashboard: plots that switch element type, patching rendered
models in place, holding documents during one user action, plot hooks and tap subscriptions.

None of it knows about pigments: the parts (:mod:`.maps`, :mod:`.spectrum`, :mod:`.gallery`) build
their figures with it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from bokeh import events
from holoviews import streams

if TYPE_CHECKING:
    from bokeh.document import Document
    from bokeh.events import Tap
    from bokeh.model import Model
    from holoviews.plotting.bokeh.element import ElementPlot
    from param.parameterized import Event

__all__ = [
    "UNCONNECTED_SESSION_KEPT_S",
    "DocumentHold",
    "LinkedRanges",
    "Refresh",
    "SwitchingPlot",
    "TapSubscriptions",
    "keep_session_until_connected",
    "name_hook",
    "rendered_plots",
    "rgba_u32",
    "weak_hook",
    "write_to_plot",
]

log = logging.getLogger(__name__)

#: how long a served session is kept for a page that has not connected to it yet, seconds: Bokeh's
#: default session token lifetime (``session_token_expiration``), after which the page could not
#: connect anyway
UNCONNECTED_SESSION_KEPT_S = 300.0

#: a stream whose only job is to make a DynamicMap call its callback again (``version`` bumped)
Refresh = streams.Stream.define("Refresh", version=0)


def rendered_plots(pane: pn.pane.HoloViews) -> list[Any]:
    """The HoloViews plots Panel made of ``pane``'s object, one per rendered root (document)."""
    return [plot for plot, _ in list(getattr(pane, "_plots", {}).values())]


def rgba_u32(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) uint8 RGB as the (rows, cols) uint32 RGBA image Bokeh's ``ImageRGBA`` draws.

    The layout HoloViews' ``RGBPlot`` writes for an opaque image: alpha 255, one uint32 per pixel; row 0
    first (an ``hv.RGB`` made by :func:`~xrfnb.ui.dashboard.common.rgb_image` holds the array upside
    down and HoloViews flips it back).
    """
    rows, cols = rgb.shape[:2]
    rgba = np.empty((rows, cols, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return rgba.view(np.uint32).reshape(rows, cols)


def write_to_plot(plot: ElementPlot, write: Callable[[], None]) -> None:
    """Run ``write`` (which changes Bokeh models of ``plot``) the way HoloViews applies a plot refresh.

    In a server session whose document lock this thread does not hold, the change is scheduled on the
    session's event loop; otherwise it is applied now, dispatched immediately to the browser
    (``unlocked``), and pushed through the plot's comm in a notebook.
    """
    doc = plot.document
    if (
        plot.renderer.mode == "server"
        and doc is not None
        and doc.session_context is not None
        and not pn.state._unblocked(doc)
    ):
        doc.add_next_tick_callback(write)
        return
    with pn.io.unlocked():
        write()
    plot.push()


def keep_session_until_connected(
    doc: Document | None = None, max_wait_s: float | None = None, check_ms: int = 500
) -> bool:
    """Keep a served session alive until its page has connected to it (at most ``max_wait_s``).

    Bokeh makes a session when it serves the page (the HTTP request) and discards one that no browser
    has connected to within ``unused_session_lifetime_milliseconds`` (15 s by default), checked every
    17 s. The page connects its websocket only once the server's event loop gets to it; while other
    sessions are being built (about 2.4 s each for the demo, several times that on a loaded machine,
    with their scans opened and maps drawn) the wait easily passes 15 s. The session is then destroyed
    and built again when the websocket arrives, which costs the loop another build and delays the
    next pages in turn: with nine pages opened at once, 7 of 9 sessions were built twice and the last
    pages took minutes. Here the session's expiration is blocked (Bokeh's
    ``ServerSession.block_expiration``) from its first tick until a connection is subscribed, then
    unblocked, so a closed page's session is still dropped as usual.

    Parameters
    ----------
    doc : bokeh.document.Document, optional
        The session's document (default: Panel's current one).
    max_wait_s : float, optional
        Unblock after this many seconds without a connection (default
        :data:`UNCONNECTED_SESSION_KEPT_S`, read when called).
    check_ms : int, optional
        How often the connection is looked for, milliseconds.

    Returns
    -------
    bool
        Whether ``doc`` is a server session's (outside a server nothing is done).
    """
    doc = doc if doc is not None else pn.state.curdoc
    if doc is None or doc.session_context is None:
        return False
    limit_s = UNCONNECTED_SESSION_KEPT_S if max_wait_s is None else float(max_wait_s)
    started = time.monotonic()
    held: list[Any] = []  # the ServerSession while its expiration is blocked
    watcher: list[Any] = []

    def release() -> None:
        if held:
            held.pop().unblock_expiration()
        if watcher:
            with contextlib.suppress(ValueError):  # already gone with the session
                doc.remove_periodic_callback(watcher.pop())

    def block() -> None:
        # a next-tick callback runs once Bokeh has made the ServerSession, long before its 15 s
        session = getattr(doc.session_context, "session", None)
        if session is None or session.destroyed or session.connection_count > 0:
            return
        session.block_expiration()
        held.append(session)
        watcher.append(doc.add_periodic_callback(check, check_ms))

    def check() -> None:
        session = held[0] if held else None
        if session is None or session.destroyed or session.connection_count > 0:
            release()
        elif time.monotonic() - started > limit_s:
            log.info("no page connected to session %s within %.0f s: it may now expire", session.id, limit_s)
            release()

    doc.add_next_tick_callback(block)
    return True


def name_hook(name: str) -> Callable[[Any, Any], None]:
    """A plot hook naming the Bokeh figure ``name`` (tests and the browser find figures by it)."""

    def hook(plot: ElementPlot, element: hv.Element) -> None:
        plot.state.name = name

    return hook


def weak_hook(method: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A plot hook calling a bound ``method`` (of a Dashboard or one of its parts) without keeping its
    object alive.

    HoloViews keeps plot options in a process-wide registry (``Store._custom_options``) until the
    element dies, and the Dashboard holds its elements: a bound method there kept every closed browser
    session's Dashboard, with its scan and maps, for the life of the server.
    """
    ref = weakref.WeakMethod(method)

    def hook(plot: ElementPlot, element: hv.Element) -> None:
        bound = ref()
        if bound is not None:
            bound(plot, element)

    return hook


class TapSubscriptions:
    """Calls handlers on Bokeh tap events of rendered figures, once per figure and handler.

    A HoloViews Tap stream on a DynamicMap of overlays never reaches the figure (no callback is attached
    to an overlay plot); the figure's own Bokeh tap event is subscribed to instead, from a plot hook,
    which runs on every redraw: this remembers which figures are subscribed.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def subscribe(self, figure: Model, handler: Callable[[Tap], None]) -> None:
        """Call ``handler(event)`` on tap events of the Bokeh ``figure`` (once per figure and handler)."""
        key = (figure.id, handler.__name__)
        if key in self._seen:
            return
        self._seen.add(key)
        figure.on_event(events.Tap, handler)


class LinkedRanges:
    """Map figures that pan and zoom together: every figure given to :meth:`link` (a plot hook) shares
    the x and y ranges of the first one linked in the same rendered root (one per browser page or
    notebook output).

    The figures show the same scan on the same axes (mm or pixels), so one pair of Bokeh ranges serves
    them all: a pan or zoom in one moves every other, in the browser, with no round trip to the server.
    HoloViews writes a figure's new extent (a scan of another shape) into the shared ranges, and a
    figure made later (another view of the main map, rebuilt element maps) joins them, keeping the
    zoom. Bokeh models belong to one document, hence one pair per root.
    """

    def __init__(self) -> None:
        self._ranges: dict[str, tuple[Model, Model]] = {}

    def link(self, plot: ElementPlot, element: hv.Element) -> None:
        """Plot hook: share the ranges of the figure's root (the first figure's become the shared
        ones). Listed before hooks that use the figure's ranges (the scale bar)."""
        root = getattr(plot, "root", None)
        if root is None:
            return
        figure = plot.state
        shared = self._ranges.setdefault(root.ref["id"], (figure.x_range, figure.y_range))
        for axis, rng in zip(("x_range", "y_range"), shared, strict=True):
            if getattr(figure, axis) is not rng:
                setattr(figure, axis, rng)
                plot.handles[axis] = rng

    def ranges(self, root_id: str) -> tuple[Model, Model] | None:
        """The shared ``(x_range, y_range)`` of a rendered root, or None before a figure is linked."""
        return self._ranges.get(root_id)


class DocumentHold:
    """One user action: every rendered Bokeh document re-walks its models at most once, at the end.

    Each HoloViews plot refresh freezes its document and Bokeh re-walks every model of it when the
    freeze ends; a threshold change can refresh five plots. The documents are frozen lazily, by
    :meth:`hold`, the first time something in the action changes the model graph (a HoloViews refresh,
    a new plot): an action that only writes new values into existing models (images patched into their
    data sources, slider values, texts) needs no walk at all. Nested actions join the outer one.

    Attributes
    ----------
    layout : panel.viewable.Viewable or None
        The rendered layout whose documents are held (set once the layout exists).
    """

    def __init__(self) -> None:
        self.layout: pn.viewable.Viewable | None = None
        self._stack: contextlib.ExitStack | None = None
        self._held = False

    @contextlib.contextmanager
    def action(self) -> Iterator[None]:
        """A context for one user action (nested actions join the outer one)."""
        if self._stack is not None:
            yield
            return
        self._stack = contextlib.ExitStack()
        self._held = False
        try:
            with self._stack:
                yield
        finally:
            self._stack = None

    def hold(self) -> None:
        """Freeze the rendered documents until the current action ends (no-op outside an action)."""
        if self._stack is None or self._held:
            return
        self._held = True
        seen: set[int] = set()
        for model, _ in list(getattr(self.layout, "_models", {}).values()):
            doc = getattr(model, "document", None)
            if doc is not None and id(doc) not in seen:
                seen.add(id(doc))
                self._stack.enter_context(doc.models.freeze())


class SwitchingPlot:
    """A HoloViews pane whose DynamicMap is replaced when the element type it must show changes.

    A DynamicMap must return one element type, and a Bokeh axis cannot change between linear and log in
    place; ``kind()`` names what is needed now and a new DynamicMap is made when that changes. Between
    the parameter change and the swap, the old DynamicMap repeats its last element.

    ``patch(events, plots)``, when given, may write a change straight into the Bokeh models of the
    rendered ``plots`` (HoloViews element plots, one per document the pane is shown in) and return True;
    it returns False, having changed nothing, when it cannot (the plot must then be refreshed).

    Parameters
    ----------
    owner : param.Parameterized
        The object whose parameters ``params`` are watched (the Dashboard).
    element : callable
        Makes the element to show now.
    kind : callable
        Names the element type needed now (a new DynamicMap when it changes).
    params : list of str
        Parameters of ``owner`` whose changes refresh the plot.
    hold : DocumentHold
        Holds the documents before the model graph changes.
    css_classes : list of str, optional
        CSS classes of the pane.
    on_new : callable, optional
        Called with each new DynamicMap (to attach streams).
    unchanged : callable, optional
        ``unchanged(events)`` is True when the changes cannot alter the element.
    patch : callable, optional
        Writes changes into the rendered plots (see above).
    """

    def __init__(
        self,
        owner: param.Parameterized,
        element: Callable[[], hv.Element],
        kind: Callable[[], str],
        params: list[str],
        hold: DocumentHold,
        css_classes: list[str] | None = None,
        on_new: Callable[[hv.DynamicMap], None] | None = None,
        unchanged: Callable[[Sequence[Any]], bool] | None = None,
        patch: Callable[[Sequence[Any], list[Any]], bool] | None = None,
    ) -> None:
        self._element, self._kind_fn, self._params = element, kind, params
        self._hold = hold
        self._on_new = on_new
        self._unchanged = unchanged
        self._patch = patch
        self.kind: str | None = None
        self.dmap: hv.DynamicMap | None = None
        self._refresh: streams.Stream | None = None
        self._last: dict[str, hv.Element] = {}
        self.pane = pn.pane.HoloViews(None, css_classes=css_classes or [], linked_axes=False)
        owner.param.watch(self.sync, params)
        self.sync()

    def plots(self) -> list[Any]:
        """The HoloViews plots of the current DynamicMap, one per rendered root (document)."""
        return rendered_plots(self.pane)

    def sync(self, *events: Event) -> None:
        """Called once per batch of changes of ``params``: new plot, refresh, patch, or nothing.

        ``unchanged(events)`` says when the changes cannot alter the element (e.g. a threshold change
        under a spectrum that does not depend on thresholds); the plot is then left alone, which spares
        HoloViews' update and Bokeh's re-walk of the document. ``patch`` writes changes that keep the
        plot's structure (new image values, colour range, title) into its Bokeh models directly, which
        spares HoloViews' element-to-model pipeline (ranges, styles, glyph updates).
        """
        kind = self._kind_fn()
        if kind == self.kind and self.dmap is not None:
            if events and self._unchanged is not None and self._unchanged(events):
                return
            if events and self._patch is not None:
                plots = self.plots()
                if plots and self._patch(events, plots):
                    # the DynamicMap's cached and memoized last element is stale now: a new plot of
                    # it (another root, a rebuilt layout) must call the callback again
                    self._refresh.update(version=self._refresh.version + 1)
                    self.dmap.reset()
                    return
            self._hold.hold()
            self._refresh.event(version=self._refresh.version + 1)
            return
        self._hold.hold()
        self.kind = kind
        self._refresh = Refresh(version=0)
        dmap = hv.DynamicMap(functools.partial(self._call, kind), streams=[self._refresh])
        self.dmap = dmap
        if self._on_new is not None:
            self._on_new(dmap)
        self.pane.object = dmap

    def _call(self, kind: str, **kwargs: Any) -> hv.Element:
        element = self._element()
        base = type(element).__name__
        if base == kind.split("-")[0] and kind == self._kind_fn():
            self._last[kind] = element
            return element
        # a stale DynamicMap about to be replaced: repeat its last element (same type)
        return self._last.get(kind, element)
