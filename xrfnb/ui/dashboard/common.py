"""What every part of the dashboard shares: its constants, the Panel/HoloViews set-up, small text and
image helpers, and the guard that turns a callback's exception into a notification.

Nothing here holds session state; the parts (:mod:`.maps`, :mod:`.spectrum`, ...) and the
:class:`~xrfnb.ui.dashboard.app.Dashboard` that composes them do.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import holoviews as hv
import numpy as np
import panel as pn
from bokeh.models import MetricLength, ScaleBar
from bokeh.palettes import Cividis256, Greys256, Inferno256, Magma256, Viridis256
from panel.io.resources import LOCAL_DIST
from panel.viewable import Viewable

from ..._errors import XRFNBError
from ..notebook import localize_panel_stylesheets
from ..report_html import ABSENT_COLOR, INVALID_COLOR, SURFACE_BURIED_COLORS

if TYPE_CHECKING:
    from bokeh.document import Document
    from holoviews.plotting.bokeh.element import ElementPlot

__all__ = [
    "ABSENT_COLOR",
    "DEMO_LABEL",
    "INVALID_COLOR",
    "MAIN_PX",
    "NO_MODEL",
    "NO_SCAN",
    "PALETTES",
    "SURFACE_BURIED_COLORS",
    "TOAST_CSS",
    "VIEWS",
    "Notifier",
    "colorize",
    "ensure_extensions",
    "escape_html",
    "guarded",
    "hex_rgb",
    "image",
    "message_plot",
    "micro",
    "palette_lut",
    "percent",
    "pigment_clim",
    "pin_local_dist_url",
    "rgb_image",
    "scale_bar_hook",
    "size_text",
    "stride",
    "toast_text",
]

log = logging.getLogger(__name__)

#: colour maps offered for continuous images (same palettes on screen and in PNG export)
PALETTES: dict[str, tuple[str, ...]] = {
    "viridis": tuple(Viridis256),
    "magma": tuple(Magma256),
    "inferno": tuple(Inferno256),
    "cividis": tuple(Cividis256),
    "gray": tuple(Greys256[::-1]),
}

#: what the main map can show
VIEWS: tuple[str, ...] = (
    "Composite",
    "Pigment",
    "Surface vs buried",
    "OOD score",
    "Elements",
    "Total counts",
)

#: label of the built-in demo scene in the scan selector
DEMO_LABEL = "demo: hidden-painting"
#: the scan selector's entry before a scan is chosen
NO_SCAN = "(choose a scan)"
#: the model selector's only entry when no trained model exists
NO_MODEL = "(no trained model found)"

#: the main map's longer side on screen, pixels
MAIN_PX = 460


#: the notifications' style: Panel's toasts (notyf) sit outside the components' shadow DOM, in the page's
#: body, which sets no font: without this they showed in the browser's default serif at 16 px
TOAST_CSS = (
    ".notyf{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;"
    "font-size:13px}"
    ".notyf__toast{max-width:420px}"
    ".notyf__message{font-size:13px;line-height:1.35}"
)


class Notifier(Protocol):
    """Anything that tells the user a message: the Dashboard and each of its parts."""

    def notify(self, message: str, level: str = "error") -> None:
        """Show ``message`` (level: info, warning, error, success)."""


def ensure_extensions() -> None:
    """Load Panel and the HoloViews Bokeh backend with inline (local) resources, no CDN.

    Outside a server session (a notebook) Panel still links its component stylesheets from a CDN
    despite ``inline=True``; the notebook hook of :func:`xrfnb.setup_notebook` that inlines them is
    registered here too, so that a Dashboard shown without that call fetches nothing either. Served
    pages get those files from the server's own static route and are left alone.
    """
    if not getattr(ensure_extensions, "_done", False):
        pn.extension("filedropper", inline=True, notifications=True)
        hv.extension("bokeh", inline=True, logo=False)
        ensure_extensions._done = True  # type: ignore[attr-defined]
    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        if localize_panel_stylesheets not in Viewable._preprocessing_hooks:
            Viewable._preprocessing_hooks.append(localize_panel_stylesheets)
    else:
        pin_local_dist_url(doc)
    pn.config.inline = True
    pn.config.notifications = True
    if TOAST_CSS not in pn.config.raw_css:
        pn.config.raw_css = [*pn.config.raw_css, TOAST_CSS]


def pin_local_dist_url(doc: Document) -> None:
    """Give a served session's document Panel's local ``dist`` URL from the start.

    Panel sets ``dist_url`` (where its stylesheets are served from) only when it renders the session's
    page. Until then, every stylesheet Panel patches for a model of that document (a pane whose text
    changes, a theme's ``default.css`` and ``native.css``, ``loading.css``) is pointed at
    ``cdn.holoviz.org``: Panel's fallback when the document has no ``dist_url``. The dashboard starts
    reading and mapping as soon as a session opens, so on a loaded machine its first updates could land
    before the page was rendered, and the page then asked the CDN for those stylesheets (seen by
    tests/test_browser_sessions.py under load). The value is the one Panel sets itself for server
    resources (``panel.io.server.server_html_page_for_session``).
    """
    rel_path = pn.state.rel_path
    doc._template_variables.setdefault("dist_url", f"{rel_path}/{LOCAL_DIST}" if rel_path else LOCAL_DIST)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a UI callback method of a :class:`Notifier`: any exception becomes a notification
    instead of a traceback (XRFNBError in its own words, MemoryError and bugs explained)."""

    @functools.wraps(fn)
    def wrapper(self: Notifier, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except XRFNBError as exc:
            self.notify(str(exc), "error")
        except MemoryError:
            self.notify("not enough memory for this request: try a smaller scan or region", "error")
        except Exception as exc:  # never let one session's bug surface as a traceback
            log.exception("dashboard callback %s failed", fn.__name__)
            self.notify(
                f"internal error in {fn.__name__} ({type(exc).__name__}: {exc}); see the server log", "error"
            )
        return None

    return wrapper


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------
def size_text(n_bytes: float) -> str:
    """A byte count for people: '12.3 MiB', '4.1 KiB', '512 bytes'."""
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    if n_bytes >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{int(n_bytes)} bytes"


def toast_text(message: str, max_chars: int = 220) -> str:
    """A notification's text: the message, or its beginning up to a clause boundary when it is long
    (a reader's list of every supported format); the whole message stays in the status line."""
    if len(message) <= max_chars:
        return message
    cut = max(message.rfind(sep, 0, max_chars) for sep in ("; ", ": ", " (", ", "))
    cut = cut if cut > max_chars // 3 else message.rfind(" ", 0, max_chars)
    return message[: max(cut, 1)].rstrip(" ,;:(") + " ... (details in the status line)"


def micro(text: str) -> str:
    """Micrometres written for people: '31.6 um' -> '31.6 µm'."""
    return re.sub(r"(\d) um\b", "\\1 µm", text)


def percent(fraction: float) -> str:
    """An area fraction as text: '12 %', '0.4 %', '< 0.1 %'."""
    pct = 100.0 * fraction
    if pct >= 10:
        return f"{pct:.0f} %"
    return f"{pct:.1f} %" if pct >= 0.1 else "< 0.1 %"


def escape_html(text: str) -> str:
    """``text`` escaped for an HTML pane (quotes too)."""
    return html.escape(text, quote=True)


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def stride(rows: int, cols: int, max_px: int) -> int:
    """The step that samples a (rows, cols) image down to at most ``max_px`` pixels a side."""
    return max(1, math.ceil(max(rows, cols) / max_px))


def image(
    arr: np.ndarray,
    kdims_label: str = "value",
    scale: float = 1.0,
    axes: tuple[str, str] = ("column", "row"),
    **opts: Any,
) -> hv.Image:
    """An hv.Image of ``arr`` (rows, cols) whose pixel (row r, col c) covers x in [c, c+1) * scale,
    y in [r, r+1) * scale; row 0 at the top (``scale``: mm per pixel when the pixel size is known, else
    1 with pixel axes)."""
    rows, cols = arr.shape[:2]
    img = hv.Image(
        np.flipud(arr), bounds=(0, 0, cols * scale, rows * scale), kdims=list(axes), vdims=[kdims_label]
    )
    return img.opts(invert_yaxis=True, **opts)


def rgb_image(arr: np.ndarray, scale: float = 1.0, axes: tuple[str, str] = ("column", "row")) -> hv.RGB:
    """An hv.RGB of ``arr`` (rows, cols, 3) uint8 on the same axes as :func:`image`."""
    rows, cols = arr.shape[:2]
    return hv.RGB(np.flipud(arr), bounds=(0, 0, cols * scale, rows * scale), kdims=list(axes)).opts(
        invert_yaxis=True
    )


def scale_bar_hook(plot: ElementPlot, element: hv.Element) -> None:
    """Add a scale bar (Bokeh's ScaleBar, data units in mm) to a map figure, once (a plot hook)."""
    figure = plot.state
    if any(isinstance(a, ScaleBar) for a in figure.center):
        return
    figure.add_layout(
        ScaleBar(
            range=figure.x_range,
            unit="mm",
            dimensional=MetricLength(),
            location="bottom_left",
            bar_length=0.25,
            background_fill_alpha=0.75,
            label_text_font_size="11px",
            name="xrfnb-scale-bar",
        )
    )


def message_plot(text: str, width: int = MAIN_PX, height: int = 200) -> hv.Text:
    """A plot that shows a sentence instead of data (no model, no scan ...)."""
    return hv.Text(0.5, 0.5, text, fontsize=11).opts(
        xaxis=None,
        yaxis=None,
        width=width,
        height=height,
        toolbar=None,
        show_frame=False,
        xlim=(0, 1),
        ylim=(0, 1),
    )


def pigment_clim(threshold: float) -> tuple[float, float]:
    """Colour range of a pigment probability map: from its threshold (below: 'absent' colour) to 1."""
    return float(threshold), max(1.0, float(threshold) + 1e-3)


def hex_rgb(color: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` -> (r, g, b) in 0-255."""
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def palette_lut(palette: tuple[str, ...]) -> np.ndarray:
    """RGB lookup table (len(palette), 3) uint8 of a palette of '#rrggbb' colours (read-only, cached)."""
    lut = np.array([hex_rgb(c) for c in palette], dtype=np.uint8)
    lut.flags.writeable = False
    return lut


def colorize(
    values: np.ndarray, palette: Sequence[str], lo: float, hi: float, below: str | None = None
) -> np.ndarray:
    """Map a float image to RGBA uint8 with ``palette``; NaN -> transparent; values < lo -> ``below``.

    Returns shape (rows, cols, 4).
    """
    lut = palette_lut(tuple(palette))
    finite = np.isfinite(values)
    span = hi - lo if hi > lo else 1.0
    idx = np.clip(((np.where(finite, values, lo) - lo) / span * (len(lut) - 1)).round(), 0, len(lut) - 1)
    rgba = np.zeros((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = lut[idx.astype(int)]
    rgba[..., 3] = np.where(finite, 255, 0)
    if below is not None:
        with np.errstate(invalid="ignore"):
            rgba[finite & (values < lo), :3] = hex_rgb(below)
    return rgba
