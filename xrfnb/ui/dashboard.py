"""Panel dashboard: pigment maps linked to spectra, threshold tuning, evidence and export.

The dashboard is a :class:`Dashboard` (a :class:`panel.viewable.Viewer`): every control is a ``param``
parameter, so it can be driven from Python (tests, notebooks) exactly as a user drives it in the browser.
:func:`serve` starts a Bokeh server with one independent :class:`Dashboard` per browser session.

Security model: the server binds to ``127.0.0.1`` unless told otherwise; only files inside the served data
folder can be opened (paths are resolved, symlinks followed, and anything outside refused); uploads are
bounded in size and written to a private temporary folder per session; all resources (Bokeh, Panel,
HoloViews JavaScript) are served by the server itself, never from a CDN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import html
import importlib
import inspect
import io
import logging
import math
import os
import re
import shutil
import tempfile
import textwrap
import threading
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from bokeh.palettes import Cividis256, Greys256, Inferno256, Magma256, Viridis256
from holoviews import streams

from .._errors import DataError, FormatError, ModelError, XRFNBError
from ..core.lines import atomic_number, line_energy_keV
from ..core.spectrum import Scan, Spectrum
from .dashboard_parts import CalibrationPanel, ElementViews, looks_uncalibrated

__all__ = ["Dashboard", "serve"]

log = logging.getLogger(__name__)

#: colour maps offered for continuous images (same palettes on screen and in PNG export)
PALETTES: dict[str, tuple[str, ...]] = {
    "viridis": tuple(Viridis256),
    "magma": tuple(Magma256),
    "inferno": tuple(Inferno256),
    "cividis": tuple(Cividis256),
    "gray": tuple(Greys256[::-1]),
}

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
_NO_SCAN = "(choose a scan)"
_NO_MODEL = "(no trained model found)"

#: colours of the surface-vs-buried categories: absent, surface, buried only
_SURFACE_BURIED_COLORS = ("#f2f2f2", "#d95f02", "#1b9e77")
_THUMB_PX = 128
_TILE_LABEL_CHARS = 22  # characters per line of a gallery tile's label (8 pt under a ~140-px tile)
_GALLERY_COLUMNS = 6
_GALLERY_WIDTH = 900
#: colour of pixels below a pigment's threshold, and of invalid (masked) pixels
_ABSENT_COLOR = "#e6e6e6"
_INVALID_COLOR = "#808080"
_MAIN_PX = 460
_TITLE_CHARS = 52  # characters per title line of the residual plot's frame (bold 9 pt: 66 were cut)
_MAX_LISTED_FILES = 500


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def _ensure_extensions() -> None:
    """Load Panel and the HoloViews Bokeh backend with inline (local) resources, no CDN.

    Outside a server session (a notebook) Panel still links its component stylesheets from a CDN
    despite ``inline=True``; the notebook hook of :func:`xrfnb.setup_notebook` that inlines them is
    registered here too, so that a Dashboard shown without that call fetches nothing either. Served
    pages get those files from the server's own static route and are left alone.
    """
    if not getattr(_ensure_extensions, "_done", False):
        pn.extension("filedropper", inline=True, notifications=True)
        hv.extension("bokeh", inline=True, logo=False)
        _ensure_extensions._done = True  # type: ignore[attr-defined]
    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        from panel.viewable import Viewable

        from .notebook import _localize_panel_stylesheets

        if _localize_panel_stylesheets not in Viewable._preprocessing_hooks:
            Viewable._preprocessing_hooks.append(_localize_panel_stylesheets)
    pn.config.inline = True
    pn.config.notifications = True


def resolve_inside(root: Path, name: str | os.PathLike[str]) -> Path:
    """Resolve ``name`` relative to ``root`` and refuse anything outside ``root``.

    Parameters
    ----------
    root : pathlib.Path
        The served data folder.
    name : str or path-like
        A path relative to ``root`` (absolute paths are accepted only if they lie inside ``root``).

    Returns
    -------
    pathlib.Path
        The resolved path (symlinks followed), guaranteed to lie inside ``root``.

    Raises
    ------
    DataError
        If the path escapes the folder (``..``, absolute path elsewhere, symlink out), is a symlink
        loop, or is not a file.
    """
    root = Path(root).resolve()
    text = os.fspath(name)
    if "\x00" in text:
        raise DataError(f"refused to open {text!r}: invalid character in the file name")
    try:
        path = (root / text).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise DataError(
            f"cannot open {text!r}: it is a symbolic link that points back to itself (a link loop); "
            f"fix or remove the link in the served data folder {root}"
        ) from None
    if not path.is_relative_to(root):
        raise DataError(
            f"refused to open {text!r}: only files inside the served data folder {root} can be opened"
        )
    if not path.is_file():
        raise DataError(f"cannot open {text!r}: no such file in the served data folder {root}")
    return path


def _readable_format(path: Path) -> str | None:
    """The xrfnb reader format of ``path`` sniffed from its first bytes, or None when no reader fits.

    A ripple ``.raw`` data file is not listed on its own when its ``.rpl`` header is beside it (the
    header opens both).
    """
    detect = _io_detect_format()
    if detect is None:
        return ""  # no sniffer in this installation: list everything, the reader will say
    try:
        fmt = detect(path)
    except (XRFNBError, OSError, ValueError):
        return None
    if fmt == "rpl" and path.suffix.lower() == ".raw":
        return None
    return fmt


def _io_detect_format() -> Callable[[Path], str] | None:
    try:
        return importlib.import_module(".io.detect", "xrfnb").detect_format
    except ModuleNotFoundError:
        return None


def list_data_files(root: Path, max_files: int = _MAX_LISTED_FILES, readable_only: bool = True) -> list[str]:
    """Regular, non-hidden files under ``root`` that xrfnb can read (relative POSIX paths, sorted).

    Parameters
    ----------
    root : pathlib.Path
        The served data folder; nothing outside it is listed (symlinks pointing out are skipped).
    max_files : int, optional
        Stop after this many files.
    readable_only : bool, optional
        List only files whose content one of xrfnb's readers recognises (sniffed from the first bytes,
        the readers' content sniffing): notes, configuration files and images are left out.

    Returns
    -------
    list of str

    Notes
    -----
    An entry that cannot be resolved (a symbolic link loop such as ``a.h5 -> b.h5 -> a.h5``, a link
    into an unreadable folder) is skipped with a one-line warning in the server log; it never stops the
    listing of the other files.
    """
    root = Path(root).resolve()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            try:
                if not p.resolve().is_relative_to(root) or not p.is_file():
                    continue
            except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python < 3.13
                log.warning("skipped %s in the served folder: %s", p, _unresolvable_reason(exc))
                continue
            if readable_only and _readable_format(p) is None:
                continue
            out.append(p.relative_to(root).as_posix())
            if len(out) >= max_files:
                return out
    return out


def _unresolvable_reason(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "symbolic link loop"
    return getattr(exc, "strerror", None) or str(exc)


def _safe_filename(name: str) -> str:
    """A file name stripped of folders and unusual characters (keeps the suffix for format detection)."""
    base = Path(str(name).replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    return base[:120] or "upload.bin"


def _size_text(n_bytes: float) -> str:
    """A byte count for people: '12.3 MiB', '4.1 KiB', '512 bytes'."""
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    if n_bytes >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{int(n_bytes)} bytes"


def _toast_text(message: str, max_chars: int = 220) -> str:
    """A notification's text: the message, or its beginning up to a clause boundary when it is long
    (a reader's list of every supported format); the whole message stays in the status line."""
    if len(message) <= max_chars:
        return message
    cut = max(message.rfind(sep, 0, max_chars) for sep in ("; ", ": ", " (", ", "))
    cut = cut if cut > max_chars // 3 else message.rfind(" ", 0, max_chars)
    return message[: max(cut, 1)].rstrip(" ,;:(") + " ... (details in the status line)"


def _micro(text: str) -> str:
    """Micrometres written for people: '31.6 um' -> '31.6 µm'."""
    return re.sub(r"(\d) um\b", "\\1 µm", text)


def _percent(fraction: float) -> str:
    """An area fraction as text: '12 %', '0.4 %', '< 0.1 %'."""
    pct = 100.0 * fraction
    if pct >= 10:
        return f"{pct:.0f} %"
    return f"{pct:.1f} %" if pct >= 0.1 else "< 0.1 %"


def _html(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _parse_size_mb(value: float) -> int:
    return int(float(value) * 1024 * 1024)


def _to_scan(obj: Any, source: str) -> Scan:
    """Accept what a reader returns (Scan, Spectrum, or a tuple starting with one) as a Scan."""
    if isinstance(obj, tuple) and obj:
        obj = obj[0]
    if isinstance(obj, Scan):
        return obj
    if isinstance(obj, Spectrum):
        return Scan(
            np.asarray(obj.counts)[None, None, :],
            obj.calibration,
            live_time_s=obj.live_time_s,
            metadata={**obj.metadata, "source": source},
        )
    raise FormatError(f"{source}: the reader returned {type(obj).__name__}, not a scan or spectrum")


def _stride(rows: int, cols: int, max_px: int) -> int:
    return max(1, math.ceil(max(rows, cols) / max_px))


def _image(
    arr: np.ndarray,
    kdims_label: str = "value",
    scale: float = 1.0,
    axes: tuple[str, str] = ("column", "row"),
    **opts: Any,
) -> hv.Image:
    """An hv.Image whose pixel (row r, col c) covers x in [c, c+1) * scale, y in [r, r+1) * scale;
    row 0 at the top (``scale``: mm per pixel when the pixel size is known, else 1 with pixel axes)."""
    rows, cols = arr.shape[:2]
    img = hv.Image(
        np.flipud(arr), bounds=(0, 0, cols * scale, rows * scale), kdims=list(axes), vdims=[kdims_label]
    )
    return img.opts(invert_yaxis=True, **opts)


def _rgb(arr: np.ndarray, scale: float = 1.0, axes: tuple[str, str] = ("column", "row")) -> hv.RGB:
    rows, cols = arr.shape[:2]
    return hv.RGB(np.flipud(arr), bounds=(0, 0, cols * scale, rows * scale), kdims=list(axes)).opts(
        invert_yaxis=True
    )


def _scale_bar_hook(plot: Any, element: Any) -> None:
    """Add a scale bar (Bokeh's ScaleBar, data units in mm) to a map figure, once."""
    from bokeh.models import MetricLength, ScaleBar

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


def _message(text: str, width: int = _MAIN_PX, height: int = 200) -> hv.Text:
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


def _pigment_clim(threshold: float) -> tuple[float, float]:
    """Colour range of a pigment probability map: from its threshold (below: 'absent' colour) to 1."""
    return float(threshold), max(1.0, float(threshold) + 1e-3)


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def _palette_lut(palette: tuple[str, ...]) -> np.ndarray:
    """RGB lookup table (len(palette), 3) uint8 of a palette of '#rrggbb' colours (read-only, cached)."""
    lut = np.array([_hex_rgb(c) for c in palette], dtype=np.uint8)
    lut.flags.writeable = False
    return lut


def _colorize(
    values: np.ndarray, palette: Sequence[str], lo: float, hi: float, below: str | None = None
) -> np.ndarray:
    """Map a float image to RGBA uint8 with ``palette``; NaN -> transparent; values < lo -> ``below``.

    Returns shape (rows, cols, 4).
    """
    lut = _palette_lut(tuple(palette))
    finite = np.isfinite(values)
    span = hi - lo if hi > lo else 1.0
    idx = np.clip(((np.where(finite, values, lo) - lo) / span * (len(lut) - 1)).round(), 0, len(lut) - 1)
    rgba = np.zeros((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = lut[idx.astype(int)]
    rgba[..., 3] = np.where(finite, 255, 0)
    if below is not None:
        with np.errstate(invalid="ignore"):
            rgba[finite & (values < lo), :3] = _hex_rgb(below)
    return rgba


def _nice_length(target: float) -> float:
    """The 1, 2 or 5 x 10^k nearest below ``target`` (> 0)."""
    k = math.floor(math.log10(target))
    for m in (5.0, 2.0, 1.0):
        if m * 10**k <= target:
            return m * 10**k
    return 10.0**k


def _figure_png(
    rgba: np.ndarray,
    *,
    title: str,
    legend: Sequence[tuple[str, str]],
    colorbar: tuple[Sequence[str], float, float, str] | None,
    mm_per_px: float | None,
    source: str,
) -> bytes:
    """A map figure as PNG bytes: title above, map, scale bar on the map, legend or colour bar right.

    Parameters
    ----------
    rgba : numpy.ndarray
        The map, (rows, cols, 4) uint8.
    title : str
        Title (wrapped to the figure's width).
    legend : sequence of (colour, text)
        Legend entries ('' colour: text only).
    colorbar : (palette, low, high, label) or None
        A colour bar for continuous maps.
    mm_per_px : float or None
        Pixel size in mm (a scale bar is drawn), or None.
    source : str
        The scan's name, stored in the PNG's ``Source`` text chunk.
    """
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    rows, cols = rgba.shape[:2]
    up = max(1, math.ceil(480 / max(rows, cols)))
    if max(rows, cols) * up > 2048:
        up = 1
    map_img = Image.fromarray(np.repeat(np.repeat(rgba, up, axis=0), up, axis=1), "RGBA")
    mw, mh = map_img.size
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    margin = 16
    side = 300 if legend or colorbar else 0
    width = margin + mw + (margin + side if side else 0) + margin
    title_lines = textwrap.wrap(title, max(20, int(width / 8.5))) or [""]
    top = margin + 20 * len(title_lines) + 8
    legend_h = sum(18 * len(textwrap.wrap(t, 36) or [""]) + 4 for _, t in legend)
    height = max(top + mh + margin + 28, top + legend_h + margin + (mh if colorbar else 0))
    fig = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    draw = ImageDraw.Draw(fig)
    for i, line in enumerate(title_lines):
        draw.text((margin, margin + 20 * i), line, fill=(0, 0, 0), font=font)
    fig.alpha_composite(map_img, (margin, top))
    draw.rectangle((margin - 1, top - 1, margin + mw, top + mh), outline=(90, 90, 90))
    scale_text = ""
    if mm_per_px:
        length_mm = _nice_length(0.25 * cols * mm_per_px)
        bar_px = round(length_mm / mm_per_px * up)
        scale_text = f"{length_mm:g} mm"
        x0, y0 = margin, top + mh + 10  # below the map: no scan pixel is covered
        draw.rectangle((x0, y0, x0 + bar_px, y0 + 5), fill=(0, 0, 0))
        draw.text((x0 + bar_px + 8, y0 - 5), scale_text, fill=(0, 0, 0), font=small)
    x = margin + mw + margin
    if colorbar is not None:
        palette, lo, hi, label = colorbar
        lut = _palette_lut(tuple(palette))
        bar_h = max(60, mh - 40)
        idx = np.linspace(len(lut) - 1, 0, bar_h).round().astype(int)
        strip = np.repeat(lut[idx][:, None, :], 22, axis=1)
        fig.paste(Image.fromarray(strip, "RGB"), (x, top))
        draw.rectangle((x - 1, top - 1, x + 22, top + bar_h), outline=(90, 90, 90))
        draw.text((x + 28, top - 2), f"{hi:.3g}", fill=(0, 0, 0), font=small)
        draw.text((x + 28, top + bar_h - 14), f"{lo:.3g}", fill=(0, 0, 0), font=small)
        draw.text((x + 28, top + bar_h // 2 - 7), label, fill=(0, 0, 0), font=small)
        y = top + bar_h + 12
    else:
        y = top
    for color, text in legend:
        tx = x
        if color:
            draw.rectangle((x, y + 2, x + 14, y + 16), fill=_hex_rgb(color), outline=(90, 90, 90))
            tx = x + 20
        for line in textwrap.wrap(text, 36) or [""]:
            draw.text((tx, y + 1), line, fill=(0, 0, 0), font=small)
            y += 18
        y += 4
    info = PngInfo()
    info.add_text("Title", title)
    info.add_text(
        "Description", "; ".join(t for _, t in legend) + (f"; scale bar {scale_text}" if scale_text else "")
    )
    info.add_text("Source", source)
    info.add_text("Software", "xrfnb")
    info.add_text("xrfnb:map_box", f"{margin},{top},{mw},{mh}")
    info.add_text("xrfnb:upscale", str(up))
    if scale_text:
        info.add_text("xrfnb:scale_bar", scale_text)
    buf = io.BytesIO()
    fig.convert("RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Pixels whose centres lie inside the polygon (even-odd rule), shape (rows, cols) bool."""
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


def _family_lines(element: str, family: str | None, max_keV: float) -> list[tuple[str, float]]:
    """Named line groups of ``element`` (K: Ka, Kb; L: La, Lb, Lg; M: Ma) inside (0.9, max_keV] keV."""
    groups = {"K": ("Ka", "Kb"), "L": ("La", "Lb", "Lg"), "M": ("Ma",)}
    if family is None:
        z = atomic_number(element)
        families = ["K"]
        if z >= 45:
            families.append("L")
        if z >= 72:
            families.append("M")
    else:
        families = [family[0].upper()]
    out = []
    for fam in families:
        for g in groups.get(fam, ()):
            try:
                e = line_energy_keV(element, g)
            except XRFNBError:
                continue
            if 0.9 < e <= max_keV:
                out.append((f"{element} {g}", e))
    return out


# --------------------------------------------------------------------------------------------------
# caches shared by sessions (read-only data only; per-session state lives on the Dashboard)
# --------------------------------------------------------------------------------------------------
class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


_SCANS = _LRU(4)
_MAPS = _LRU(8)
_MODELS = _LRU(3)
_INSTRUMENTS = _LRU(4)
_FITS = _LRU(256)  # StackFit of the called pigments per spectrum


def _xrfnb_attr(name: str) -> Any | None:
    """A lazily imported public xrfnb symbol, or None while the module providing it does not exist."""
    import xrfnb

    module = xrfnb._LAZY.get(name)
    if module is None:
        return None
    try:
        importlib.import_module(module, "xrfnb")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("xrfnb."):
            return None
        raise
    return getattr(xrfnb, name, None)


def available_models() -> list[str]:
    """Names of the trained models that can be chosen (``"default"`` first when it exists).

    The models shipped with the package (``xrfnb.model.model.available_models``) and the model folders under
    the folders listed in ``$XRFNB_MODELS``; an empty list means no model has been trained or shipped.
    """
    try:
        mod = importlib.import_module(".model.model", "xrfnb")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("xrfnb"):
            return []
        raise
    names = list(mod.available_models())
    for root in filter(None, os.environ.get("XRFNB_MODELS", "").split(os.pathsep)):
        folder = Path(root)
        if folder.is_dir():
            names += [d.name for d in sorted(folder.iterdir()) if (d / "model.json").is_file()]
    names = list(dict.fromkeys(names))
    default = getattr(mod, "DEFAULT_MODEL", None)
    if default in names:
        names.remove(default)
        names.insert(0, "default")
    return names


def _load_model_cached(name: str) -> Any:
    model = _MODELS.get(name)
    if model is None:
        load_model = _xrfnb_attr("load_model")
        if load_model is None:
            raise ModelError("the pigment model code is not available in this installation of xrfnb")
        model = load_model(name)
        _MODELS.put(name, model)
    return model


class _BoundedFileDropper(pn.widgets.FileDropper):
    """A FileDropper that enforces the upload size limit on the server, chunk by chunk, as bytes arrive.

    Panel's FileDropper checks ``max_file_size`` only in the browser and buffers every chunk a client
    sends until the last one; a client that ignores the browser check could fill the server's memory.
    Here the bytes buffered for the widget (all files together) never exceed ``max_bytes`` by more than
    the one chunk that crosses the limit: that chunk drops the file's buffer, the rest of the file is
    ignored as it arrives, and ``on_refused(name, received_bytes)`` is called once.

    Parameters
    ----------
    max_bytes : int
        Largest accepted upload in bytes (all files of one upload together).
    on_refused : callable
        Called as ``on_refused(name, received_bytes)`` when a file is refused.
    **params
        FileDropper parameters.
    """

    def __init__(self, max_bytes: int, on_refused: Callable[[str, int], None], **params: Any) -> None:
        super().__init__(**params)
        self._max_bytes = int(max_bytes)
        self._on_refused = on_refused
        self._received: dict[str, int] = {}
        self._refused: set[str] = set()

    @property
    def buffered_bytes(self) -> int:
        """Bytes of unfinished uploads held on the server now."""
        return sum(len(piece) for pieces in self._file_buffer.values() for piece in pieces)

    def _process_event(self, event: Any) -> None:
        data = getattr(event, "data", None)
        if getattr(event, "event_name", None) != "upload_event":
            return super()._process_event(event)
        if not isinstance(data, dict) or not {"name", "chunk", "total_chunks", "data", "type"} <= set(data):
            log.warning("ignored a malformed upload message (fields: %s)", sorted(data or ()))
            return
        name, chunk, piece = str(data["name"]), data["chunk"], data["data"]
        if chunk == 1:  # a new file (or the same name again): start counting afresh
            self._refused.discard(name)
            self._file_buffer.pop(name, None)
            self._received[name] = 0
        elif name in self._refused or name not in self._file_buffer:
            return  # the rest of a refused file, or chunks without a first one
        self._received[name] = self._received.get(name, 0) + len(piece or b"")
        if sum(self._received.values()) > self._max_bytes:
            self._file_buffer.pop(name, None)
            received = self._received.pop(name)
            self._refused.add(name)
            self._on_refused(name, received)
            return
        if chunk == data["total_chunks"]:
            self._received.pop(name, None)
        super()._process_event(event)


# --------------------------------------------------------------------------------------------------
# the dashboard
# --------------------------------------------------------------------------------------------------
def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a UI callback; turn any exception into a notification instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(self: Dashboard, *args: Any, **kwargs: Any) -> Any:
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


class Dashboard(pn.viewable.Viewer):
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
        Initial values of the parameters below.
    """

    source = param.Selector(default=_NO_SCAN, objects=[_NO_SCAN], doc="Scan to open (served folder or demo)")
    model_name = param.Selector(default=_NO_MODEL, objects=[_NO_MODEL], doc="Trained model")
    view = param.Selector(default="Composite", objects=list(VIEWS), doc="What the main map shows")
    focus = param.Selector(default=None, objects=[], allow_None=True, doc="Pigment class shown enlarged")
    element = param.Selector(default=None, objects=[], allow_None=True, doc="Element map shown")
    global_threshold = param.Number(
        default=0.5, bounds=(0.0, 1.0), step=0.01, doc="Moving it sets every pigment threshold to this value"
    )
    thresholds = param.Dict(default={}, doc="Decision threshold per pigment class, in [0, 1]")
    cmap = param.Selector(default="viridis", objects=list(PALETTES), doc="Colour map of continuous images")
    log_scale = param.Boolean(default=False, doc="Logarithmic counts (spectra, total counts, elements)")
    simulate_stack = param.Boolean(
        default=True, doc="Overlay the simulated spectrum of the predicted paint stack and its residual"
    )
    pixel = param.Parameter(default=None, doc="(row, col) of the tapped pixel, or None")
    region = param.Parameter(default=None, doc="Selected region: bool mask (rows, cols), or None")
    data_version = param.Integer(default=0, precedence=-1, doc="Bumped whenever scan or maps change")
    busy = param.Boolean(default=False, precedence=-1)
    progress = param.Integer(default=0, bounds=(0, 100), precedence=-1)

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        scan: Scan | None = None,
        maps: Any = None,
        model: Any = None,
        max_upload_mb: float = 256.0,
        blocking: bool | None = None,
        **params: Any,
    ) -> None:
        _ensure_extensions()
        self._data_dir = Path(data_dir).resolve() if data_dir is not None else None
        if self._data_dir is not None and not self._data_dir.is_dir():
            raise DataError(f"the served data folder {data_dir} does not exist or is not a folder")
        self.max_upload_bytes = _parse_size_mb(max_upload_mb)
        self._blocking = blocking
        self._model_obj = model
        self._scan: Scan | None = None
        self._maps: Any = None
        self._total: np.ndarray | None = None
        self._energy_keV: np.ndarray | None = None
        self._label = ""
        self._upload_dir: Path | None = None
        self._job: dict[str, Any] | None = None
        self._job_cb: Any = None
        self._syncing = False
        self._loading = False
        self._last_curve: dict[str, np.ndarray] = {}
        self._action: contextlib.ExitStack | None = None
        self._action_held = False
        super().__init__(**params)
        self._refresh_choices()
        self._build_widgets()
        self._build_plots()
        self._layout = self._build_layout()
        self.param.watch(self._on_source, "source")
        self.param.watch(self._on_model, "model_name")
        self.param.watch(self._on_global_threshold, "global_threshold")
        self.param.watch(self._on_thresholds, "thresholds")
        self.param.watch(self._on_cmap, "cmap")
        self.param.watch(self._on_data_version, "data_version")
        self.param.watch(self._update_legend, ["view", "focus", "element", "thresholds", "log_scale"])
        if scan is not None:
            self.set_scan(scan, maps=maps, label=str(scan.metadata.get("source", "scan")))
        elif maps is not None:
            raise DataError("pigment maps need the scan they were computed from: pass scan= too")
        self._update_status()

    @classmethod
    def from_cli_args(cls, argv: Sequence[str] | None = None) -> Dashboard:
        """A dashboard for ``panel serve dashboards/xrfnb_app.py [--args FILE_OR_DIR]``.

        The data folder (or file) is the first argument after ``--args``, else ``$XRFNB_DATA``; with
        neither, the demo scene opens when it is available.
        """
        import sys

        args = list(sys.argv[1:] if argv is None else argv)
        target = args[0] if args else os.environ.get("XRFNB_DATA") or None
        data_dir, initial = _serve_target(target)
        return make_app(data_dir, initial)

    # -- public state ------------------------------------------------------------------------------
    @property
    def scan(self) -> Scan | None:
        """The scan shown, or None."""
        return self._scan

    @property
    def maps(self) -> Any:
        """The pigment maps shown (PigmentMaps), or None when no model result exists."""
        return self._maps

    @property
    def classes(self) -> tuple[str, ...]:
        """Pigment classes of the maps shown (empty without maps)."""
        return tuple(self._maps.classes) if self._maps is not None else ()

    def threshold_array(self) -> np.ndarray:
        """Current per-class thresholds as an array (K,) in the order of :attr:`classes`."""
        return np.array([float(self.thresholds[c]) for c in self.classes], dtype=float)

    def binary_maps(self) -> np.ndarray:
        """Present/absent maps at the current thresholds, shape (rows, cols, K) bool."""
        if self._maps is None:
            raise DataError("no pigment maps: open a scan and choose a trained model first")
        return np.asarray(self._maps.binary(self.threshold_array()), dtype=bool)

    def area_fractions(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """Fraction of valid pixels (inside ``mask`` if given) where each class is present."""
        if self._maps is None:
            return {}
        valid = ~np.asarray(self._maps.mask, dtype=bool)
        if mask is not None:
            valid &= mask
        n = int(valid.sum())
        binary = self.binary_maps()
        return {c: (float(binary[..., k][valid].mean()) if n else 0.0) for k, c in enumerate(self.classes)}

    def notify(self, message: str, level: str = "error") -> None:
        """Show ``message`` in the status line and as a notification (level: info, warning, error).

        The private upload folder is left out of the text (the user knows the file by its name).
        """
        if self._upload_dir is not None:
            message = message.replace(f"{self._upload_dir}{os.sep}", "")
        self.last_message = (level, message)
        alert = {"error": "danger", "warning": "warning", "success": "success"}.get(level, "info")
        self._status.object = message
        self._status.alert_type = alert
        self._status.visible = True
        notifications = getattr(pn.state, "notifications", None)
        if notifications is not None:
            try:
                getattr(notifications, level if level in ("info", "warning", "error", "success") else "info")(
                    _toast_text(message), duration=10000
                )
            except Exception:  # pragma: no cover - notification area not attached to this document
                log.debug("notification failed", exc_info=True)

    # -- choices ----------------------------------------------------------------------------------
    def _refresh_choices(self) -> None:
        sources = [_NO_SCAN]
        if _xrfnb_attr("render_scan") is not None:
            sources.append(DEMO_LABEL)
        if self._data_dir is not None:
            sources.extend(list_data_files(self._data_dir))
        self.param.source.objects = sources
        if self.source not in sources:
            self.source = _NO_SCAN
        models = available_models() if self._model_obj is None else ["(given model)"]
        self.param.model_name.objects = models or [_NO_MODEL]
        if self.model_name not in self.param.model_name.objects:
            with param.parameterized.discard_events(self):
                self.model_name = self.param.model_name.objects[0]

    def _model_available(self) -> bool:
        return self._model_obj is not None or self.model_name != _NO_MODEL

    # -- loading ----------------------------------------------------------------------------------
    @_guarded
    def _on_source(self, event: param.parameterized.Event) -> None:
        if event.new == _NO_SCAN:
            return
        self.open(event.new)

    def open(self, name: str) -> None:
        """Open a scan: a path inside the served folder, or :data:`DEMO_LABEL`; then map it.

        In a server session the file is read (and its total-counts image made) in a worker thread, so
        that one large file never stalls the other sessions; the scan is shown when it is ready.
        """
        if name == DEMO_LABEL:
            self._load_in_background(self._demo_scan, DEMO_LABEL, ("demo",))
            return
        if self._data_dir is None:
            raise DataError(
                "no data folder is served: start the dashboard with a folder to open files from it"
            )
        path = resolve_inside(self._data_dir, name)
        self._open_path(path, label=name)

    def _open_path(self, path: Path, label: str, cache: bool = True) -> None:
        load = _xrfnb_attr("load")
        if load is None:
            raise FormatError("the file readers are not available in this installation of xrfnb")
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)

        def read() -> Scan:
            scan = _SCANS.get(key) if cache else None
            if scan is None:
                scan = _to_scan(load(path), label)
                if cache:
                    _SCANS.put(key, scan)
            return scan

        self._load_in_background(read, label, key if cache else None)

    def _is_blocking(self) -> bool:
        """Whether work runs in the caller's thread (no server session: tests, notebooks)."""
        return self._blocking if self._blocking is not None else pn.state.curdoc is None

    def _load_in_background(self, read: Callable[[], Scan], label: str, cache_key: Any) -> None:
        """``read()`` the scan and make its total-counts image off the event loop, then show and map it.

        Blocking (no server session): all at once, here. In a session: a worker thread does the
        reading; the session's periodic poll (:meth:`_poll_job`, on the document's event loop, so with
        the document lock held) shows the result. Opening something else meanwhile drops this job.
        """
        def work(job: dict[str, Any]) -> None:
            scan = read()
            job["result"] = (scan, scan.total_counts_image())

        if self._is_blocking():
            scan = read()
            self.set_scan(scan, label=label, total=scan.total_counts_image())
            self._map_current(cache_key=cache_key)
            return
        job = self._new_job("load", label=label, key=cache_key)
        self._status.object = f"Opening {label} ..."
        self._status.alert_type = "info"
        self._status.visible = True
        self._start_job(job, work)

    def _new_job(self, kind: str, **fields: Any) -> dict[str, Any]:
        job: dict[str, Any] = {
            "kind": kind,
            "done": 0,
            "total": 1,
            "result": None,
            "error": None,
            "finished": False,
            "scan": None,
            "key": None,
        }
        job.update(fields)
        return job

    def _drop_job(self) -> None:
        """Forget the running job (its thread stops at its next progress report, or its result is
        ignored) and its poller."""
        if self._job is not None:
            self._job["cancel"] = True
        if self._job_cb is not None:
            self._job_cb.stop()
            self._job_cb = None
        self._job = None

    def _start_job(self, job: dict[str, Any], work: Callable[[dict[str, Any]], None]) -> None:
        """Run ``work(job)`` in a daemon thread; :meth:`_poll_job` reports progress and the result."""
        def run() -> None:
            try:
                work(job)
            except BaseException as exc:  # reported to the session by _poll_job
                job["error"] = exc
            finally:
                job["finished"] = True

        self._drop_job()
        self.busy = True
        self.progress = 0
        self._progress_bar.visible = True
        self._job = job
        threading.Thread(target=run, name=f"xrfnb-{job['kind']}", daemon=True).start()
        self._job_cb = pn.state.add_periodic_callback(self._poll_job, period=250)

    def _demo_scan(self) -> Scan:
        scan = _SCANS.get(("demo",))
        if scan is None:
            render_scan = _xrfnb_attr("render_scan")
            if render_scan is None:
                raise DataError("the demo scene is not available in this installation of xrfnb")
            scan = _to_scan(render_scan("hidden-painting"), DEMO_LABEL)
            _SCANS.put(("demo",), scan)
        return scan

    @_guarded
    def _on_upload(self, event: param.parameterized.Event) -> None:
        value = event.new or {}
        if not value:
            return
        name, data = next(iter(value.items()))
        self.load_upload(name, data)

    def _on_upload_refused(self, filename: str, received_bytes: int) -> None:
        self.notify(
            f"upload {_safe_filename(filename)!r} refused after {_size_text(received_bytes)}: larger than "
            f"the {_size_text(self.max_upload_bytes)} limit; copy it into the served data folder instead",
            "error",
        )

    def load_upload(self, filename: str, data: bytes | str) -> None:
        """Open an uploaded file (bytes) after checking its size; it is kept in a private temp folder."""
        if isinstance(data, str):
            data = data.encode()
        if len(data) > self.max_upload_bytes:
            raise DataError(
                f"upload {filename!r} is {_size_text(len(data))}, larger than the "
                f"{_size_text(self.max_upload_bytes)} limit: copy it into the served data folder instead"
            )
        if not data:
            raise DataError(f"upload {filename!r} is empty")
        if self._upload_dir is None:
            self._upload_dir = Path(tempfile.mkdtemp(prefix="xrfnb-upload-"))
            try:
                pn.state.on_session_destroyed(lambda ctx: shutil.rmtree(self._upload_dir, ignore_errors=True))
            except Exception:  # no session (tests): removed by __del__
                pass
        path = self._upload_dir / _safe_filename(filename)
        path.write_bytes(data)
        self._open_path(path, label=f"upload: {_safe_filename(filename)}", cache=False)

    def set_scan(
        self, scan: Scan, maps: Any = None, label: str = "scan", total: np.ndarray | None = None
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
        if self._job is not None and self._job["scan"] is not scan:
            # nobody waits for those maps (or that file) any more: stop after the current block
            self._drop_job()
        total = np.asarray(total if total is not None else scan.total_counts_image(), dtype=float)
        rows, cols = scan.shape[:2]
        # scan, selection and maps change together: no watcher may see the new scan with the old pixel
        # (outside a smaller scan) or the old maps. The batch's watchers run when it ends, still
        # "loading": the new maps' global threshold must not overwrite their per-class thresholds
        was_loading, self._loading = self._loading, True
        try:
            with self._frozen(), param.parameterized.batch_call_watchers(self):
                self._scan = scan
                self._label = label
                self._energy_keV = scan.energy_keV
                self._total = total
                self.region = None
                self.pixel = (rows // 2, cols // 2)
                self._set_maps(maps, bump=False)
                self.data_version += 1
        finally:
            self._loading = was_loading

    def _set_maps(self, maps: Any, bump: bool = True) -> None:
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
        self._build_threshold_sliders()

    def _map_current(self, cache_key: Any = None) -> None:
        """Run the model on the current scan (background thread in a server session) with progress."""
        if self._scan is None or self._maps is not None:
            return
        if not self._model_available() and self._maps is None:
            self._update_status()
            return
        if self.needs_calibration():  # the model would refuse it: lead the user to the calibration card
            self._calibration.card.collapsed = False
            self._update_status()
            return
        name = self.model_name
        given = self._model_obj
        key = None if cache_key is None else (cache_key, name if given is None else id(given))
        cached = _MAPS.get(key) if key is not None else None
        if cached is not None:
            self._set_maps(cached)
            self._update_status()
            return
        scan = self._scan
        job = self._new_job("map", scan=scan, key=key)

        def work(job: dict[str, Any]) -> None:
            model = given if given is not None else _load_model_cached(name)
            job["result"] = _map_with_progress(scan, model, job)

        self._status.object = f"Mapping pigments in {self._label} ..."
        self._status.alert_type = "info"
        if self._is_blocking():
            self.busy = True
            try:
                work(job)
            except Exception as exc:  # worded for the user by _finish_job, as from a worker
                job["error"] = exc
            job["finished"] = True
            self._finish_job(job)
            return
        self._start_job(job, work)

    def _poll_job(self) -> None:
        job = self._job
        if job is None:
            return
        self.progress = int(100 * job["done"] / max(job["total"], 1))
        if job["finished"]:
            if self._job_cb is not None:
                self._job_cb.stop()
                self._job_cb = None
            self._job = None
            self._finish_job(job)

    @_guarded
    def _finish_job(self, job: dict[str, Any]) -> None:
        self.busy = False
        self._progress_bar.visible = False
        self.progress = 100
        if job.get("kind") == "load":
            if job["error"] is not None:
                self._update_status()
                _reraise_for_user(job["error"], "opening the scan failed")
            scan, total = job["result"]
            self.set_scan(scan, label=job["label"], total=total)
            self._map_current(cache_key=job["key"])
            return
        if isinstance(job["error"], _Cancelled) or job["scan"] is not self._scan:
            return  # the user opened something else meanwhile
        if job["error"] is not None:
            _reraise_for_user(job["error"], "pigment mapping failed")
        if job["key"] is not None:
            _MAPS.put(job["key"], job["result"])
        self._set_maps(job["result"])
        self._update_status()
        if job.get("warning"):
            self.notify(job["warning"], "warning")

    @_guarded
    def _on_model(self, event: param.parameterized.Event) -> None:
        if self._scan is None or event.new == _NO_MODEL:
            return
        self._set_maps(None)
        self._map_current(cache_key=None)

    # -- thresholds -------------------------------------------------------------------------------
    def _build_threshold_sliders(self) -> None:
        sliders = []
        for c in self.classes:
            s = pn.widgets.FloatSlider(
                label=c, start=0.0, end=1.0, step=0.01, value=float(self.thresholds[c]), width=250
            )
            s.param.watch(functools.partial(self._on_class_slider, c), "value_throttled")
            sliders.append(s)
        self._class_sliders = dict(zip(self.classes, sliders, strict=True))
        self._slider_box.objects = sliders or [pn.pane.Markdown("No pigment classes (no maps yet).")]

    def _on_class_slider(self, cls: str, event: param.parameterized.Event) -> None:
        if self._syncing or event.new is None:
            return
        self.set_threshold(cls, float(event.new))

    def set_threshold(self, cls: str, value: float) -> None:
        """Set the threshold of one pigment class (maps update without re-running the model)."""
        if cls not in self.thresholds:
            raise DataError(f"unknown pigment class {cls!r}; classes are {', '.join(self.classes)}")
        if not 0.0 <= value <= 1.0:
            raise DataError(f"threshold must lie in [0, 1], got {value}")
        with self._frozen():
            self.thresholds = {**self.thresholds, cls: float(value)}

    def _on_global_threshold(self, event: param.parameterized.Event) -> None:
        if self._syncing or self._loading or not self.classes:
            return
        with self._frozen():
            self.thresholds = dict.fromkeys(self.classes, float(event.new))

    @_guarded
    def reset_thresholds(self, event: Any = None) -> None:
        """Back to the model's calibrated thresholds."""
        if self._maps is not None:
            defaults = np.asarray(self._maps.thresholds, dtype=float)
            with self._frozen():
                self.thresholds = {c: float(defaults[k]) for k, c in enumerate(self.classes)}

    def _on_thresholds(self, event: param.parameterized.Event) -> None:
        old = event.old or {}
        self._syncing = True
        try:
            for c, s in getattr(self, "_class_sliders", {}).items():
                if c in self.thresholds and s.value != self.thresholds[c]:
                    s.value = self.thresholds[c]
        finally:
            self._syncing = False
        changed = [c for c in self.classes if old.get(c) != self.thresholds.get(c)]
        self._update_thumbnails(changed)

    def _on_cmap(self, event: param.parameterized.Event) -> None:
        self._update_thumbnails(list(self.classes))
        self._element_views.refresh()

    def _on_data_version(self, event: param.parameterized.Event) -> None:
        self._scan_info.object = self.scan_info_text()
        self._element_views.refresh()
        self._rebuild_gallery()
        self._update_status()
        self._update_ood_alert()
        self._update_legend()
        self._update_calls()

    # -- widgets and layout -----------------------------------------------------------------------
    def _build_widgets(self) -> None:
        self._status = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self._progress_bar = pn.indicators.Progress(
            value=0, max=100, width=280, visible=False, bar_color="info"
        )
        self._progress_bar.value = 0
        self.param.watch(lambda e: setattr(self._progress_bar, "value", e.new), "progress")
        self._source_w = pn.widgets.Select.from_param(
            self.param.source, label="Scan (served folder)", width=280
        )
        self._upload = _BoundedFileDropper(
            self.max_upload_bytes,
            self._on_upload_refused,
            max_file_size=f"{max(1, int(self.max_upload_bytes / 2**20))}MB",
            multiple=False,
            width=280,
            height=90,
        )
        self._upload.param.watch(self._on_upload, "value")
        self._model_w = pn.widgets.Select.from_param(self.param.model_name, label="Model", width=280)
        self._view_w = pn.widgets.RadioButtonGroup.from_param(
            self.param.view, orientation="vertical", width=280
        )
        self._focus_w = pn.widgets.Select.from_param(self.param.focus, label="Pigment", width=280)
        self._element_w = pn.widgets.Select.from_param(self.param.element, label="Element", width=280)
        self._cmap_w = pn.widgets.Select.from_param(self.param.cmap, label="Colour map", width=135)
        self._log_w = pn.widgets.Checkbox.from_param(
            self.param.log_scale, label="log counts", width=135, css_classes=["xrfnb-log"]
        )
        self._sim_w = pn.widgets.Checkbox.from_param(
            self.param.simulate_stack, label="simulate the predicted stack", width=280
        )
        self._global_w = pn.widgets.FloatSlider.from_param(
            self.param.global_threshold,
            label="Global threshold",
            width=280,
            css_classes=["xrfnb-global-threshold"],
        )
        self._reset_w = pn.widgets.Button(label="Reset to model thresholds", width=280)
        self._reset_w.on_click(self.reset_thresholds)
        self._slider_box = pn.Column(sizing_mode="stretch_width")
        self._dl_png = pn.widgets.FileDownload(
            callback=self._guard_export(self.export_png), filename="map.png", label="Map as PNG", width=135
        )
        self._dl_tiff = pn.widgets.FileDownload(
            callback=self._guard_export(self.export_tiff),
            filename="pigment_maps_tiff.zip",
            label="Maps as TIFF",
            width=135,
        )
        self._dl_h5 = pn.widgets.FileDownload(
            callback=self._guard_export(self.export_hdf5),
            filename="pigment_maps.h5",
            label="Maps as HDF5",
            width=135,
        )
        self._dl_csv = pn.widgets.FileDownload(
            callback=self._guard_export(self.export_spectrum_csv),
            filename="spectrum.csv",
            label="Spectrum as CSV",
            width=135,
        )
        self._dl_report = pn.widgets.FileDownload(
            callback=self._guard_export(self.export_report),
            filename="pigment_report.html",
            label="Report (HTML)",
            width=135,
            css_classes=["xrfnb-report"],
        )
        self._info = pn.pane.Markdown("", sizing_mode="stretch_width", css_classes=["xrfnb-info"])
        self._legend = pn.pane.HTML("", width=_MAIN_PX + 60, css_classes=["xrfnb-legend"])
        self._ood_alert = pn.pane.Alert(
            "", alert_type="warning", visible=False, sizing_mode="stretch_width", css_classes=["xrfnb-ood"]
        )
        self._fractions = pn.pane.Markdown("", sizing_mode="stretch_width")
        self._calibration = CalibrationPanel(self)
        self._element_views = ElementViews(self)
        self._scan_info = pn.pane.Markdown("", sizing_mode="stretch_width", css_classes=["xrfnb-scan-info"])

    def _guard_export(self, fn: Callable[[], bytes]) -> Callable[[], io.BytesIO | None]:
        def callback() -> io.BytesIO | None:
            try:
                return io.BytesIO(fn())
            except XRFNBError as exc:
                self.notify(str(exc), "error")
            except Exception as exc:
                log.exception("export failed")
                self.notify(f"export failed ({type(exc).__name__}: {exc})", "error")
            return None

        return callback

    def _build_plots(self) -> None:
        self._tap = streams.Tap(x=None, y=None)
        self._box = streams.BoundsXY(bounds=None)
        self._lasso = streams.Lasso(geometry=None)
        self._tap.add_subscriber(self._on_tap)
        self._box.add_subscriber(self._on_box)
        self._lasso.add_subscriber(self._on_lasso)
        self._main = _SwitchingPlot(
            self,
            self._main_element,
            self._main_kind,
            ["view", "focus", "element", "thresholds", "cmap", "log_scale", "data_version"],
            css_classes=["xrfnb-main-map"],
            on_new=self._attach_selection_streams,
            unchanged=self._main_unchanged,
            patch=self._patch_main,
        )
        self._spectrum = _SwitchingPlot(
            self,
            self._spectrum_element,
            self._spectrum_kind,
            ["pixel", "region", "thresholds", "log_scale", "simulate_stack", "data_version"],
            css_classes=["xrfnb-spectrum"],
            unchanged=self._spectrum_unchanged,
        )
        self._prob = _SwitchingPlot(
            self,
            self._probability_element,
            self._probability_kind,
            ["pixel", "region", "thresholds", "data_version"],
            patch=self._patch_probability,
        )
        self._residual = _SwitchingPlot(
            self,
            self._residual_element,
            self._residual_kind,
            ["pixel", "region", "thresholds", "simulate_stack", "data_version"],
            unchanged=self._spectrum_unchanged,
        )
        self._main_pane, self._spectrum_pane, self._prob_pane = (
            self._main.pane,
            self._spectrum.pane,
            self._prob.pane,
        )
        self._gallery = pn.Column()
        self.param.watch(self._on_pixel_region, ["pixel", "region", "thresholds"])

    def _spectrum_unchanged(self, events: Sequence[Any]) -> bool:
        """Threshold changes alter the spectrum and residual plots only through the simulated stack,
        i.e. only when they change which classes are present (or buried) at the selection."""
        if not all(e.name == "thresholds" for e in events):
            return False
        if not self.simulate_stack or self._maps is None or (self.pixel is None and self.region is None):
            return True
        before = self._selection_layers(events[0].old or {})
        after = self._selection_layers(events[-1].new or {})
        return all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))

    def _main_unchanged(self, events: Sequence[Any]) -> bool:
        """Threshold changes that the main map's view does not show (another class, or no class at all)."""
        if not all(e.name == "thresholds" for e in events):
            return False
        if self.view in ("Total counts", "Elements", "OOD score"):
            return True
        if self.view in ("Pigment", "Surface vs buried"):
            return all((e.old or {}).get(self.focus) == (e.new or {}).get(self.focus) for e in events)
        return False

    def _patch_main(self, events: Sequence[Any], plots: list[Any]) -> bool:
        """Write a threshold change straight into the rendered main map; False when it cannot.

        A threshold changes the main map's values (composite colours, surface-vs-buried categories) or,
        in the pigment view, only its colour range and title, never its shape, bounds or glyph: the new
        values replace the old ones in the plot's existing data source and colour mapper, without
        HoloViews' update (ranges, styles, glyphs). Anything else (another view, a scan of another
        shape, a plot not drawn as expected) returns False with nothing changed.
        """
        if not all(e.name == "thresholds" for e in events) or self._main_kind().split("-")[0] not in (
            "RGB",
            "Image",
        ):
            return False
        view = self.view
        image: np.ndarray | None = None
        clim: tuple[float, float] | None = None
        if view == "Composite":
            image = _rgba_u32(np.asarray(self._maps.composite_rgb(self.threshold_array()), dtype=np.uint8))
        elif view == "Surface vs buried" and self.focus in self.classes:
            image = self.main_array()[1]
        elif view == "Pigment" and self.focus in self.classes:
            clim = _pigment_clim(self.thresholds[self.focus])
        else:
            return False
        title = self._main_title()
        for plot in plots:
            handles = getattr(plot, "handles", {})
            source, figure = handles.get("source"), handles.get("plot")
            if source is None or figure is None or figure.title is None or "image" not in source.data:
                return False
            old = np.asarray(source.data["image"][0])
            if image is not None and (old.shape != image.shape or old.dtype != image.dtype):
                return False
            if clim is not None and handles.get("color_mapper") is None:
                return False

        def write(plot: Any) -> None:
            if image is not None:
                plot.handles["source"].data["image"] = [image]
            if clim is not None:
                plot.handles["color_mapper"].update(low=clim[0], high=clim[1])
            if plot.handles["plot"].title.text != title:
                plot.handles["plot"].title.text = title

        for plot in plots:
            _write_to_plot(plot, functools.partial(write, plot))
        return True

    @property
    def _main_dmap(self) -> hv.DynamicMap:
        return self._main.dmap

    @property
    def _spectrum_dmap(self) -> hv.DynamicMap:
        return self._spectrum.dmap

    @property
    def _prob_dmap(self) -> hv.DynamicMap:
        return self._prob.dmap

    def _attach_selection_streams(self, dmap: hv.DynamicMap) -> None:
        for stream in (self._tap, self._box, self._lasso):
            stream.source = dmap

    def _spectrum_tap_hook(self, plot: Any, element: Any) -> None:
        """Listen to clicks on the rendered spectrum figure (once per figure): a HoloViews Tap stream on
        a DynamicMap of overlays gets no callback (see :meth:`_gallery_tap_hook`)."""
        self._subscribe_tap(plot.state, self._on_spectrum_click)

    @_guarded
    def _on_spectrum_click(self, event: Any) -> None:
        """A click on the spectrum while the calibration card is open enters the chosen line there."""
        if event.x is None or self._scan is None or self._calibration.card.collapsed:
            return
        self._calibration.pick(float(event.x))

    def recalibrated(self, scan: Scan) -> None:
        """Show ``scan``, the open scan with a new energy calibration, and recompute its pigment maps
        (in a worker thread in a server session)."""
        self.set_scan(scan, label=self._label, total=self._total)
        self._map_current(cache_key=None)
        self._update_status()

    def needs_calibration(self) -> bool:
        """Whether the open scan has no usable energy calibration (the model refuses it)."""
        return self._scan is not None and looks_uncalibrated(self._scan)

    def _main_kind(self) -> str:
        """Element type the main map needs now (a new plot is made when it changes)."""
        if self._scan is None:
            return "Text"
        v = self.view
        # a plot per view (and axis unit): a colour bar keeps its title and ticks across refreshes
        image = f"Image-{v}-{self._colorbar_label()}-{self.map_scale()[1][0]}"
        if v == "Total counts":
            return image
        if v == "Elements":
            em = getattr(self._maps, "element_maps", None) if self._maps is not None else None
            return image if em is not None and self.element is not None else "Text"
        if self._maps is None:
            return "Text"
        if v == "Composite":
            return f"RGB-{self.map_scale()[1][0]}"
        return image if self.focus is not None else "Text"

    def _spectrum_kind(self) -> str:
        # one plot per axis type: Bokeh cannot switch a linear axis to log in place
        if self._scan is None or (self.pixel is None and self.region is None):
            return "Text"
        return "Overlay-log" if self.log_scale else "Overlay"

    def _probability_kind(self) -> str:
        return "Text" if self._maps is None or (self.pixel is None and self.region is None) else "Overlay"

    def _build_layout(self) -> pn.viewable.Viewable:
        # a 1440 x 900 screen: data, model and exports come first; the per-class sliders (one per
        # class: 31 with the shipped model) sit in a collapsed card below the global threshold
        self._threshold_card = pn.Card(
            self._slider_box, title="Per-pigment thresholds", collapsed=True, width=290
        )
        self._map_exports = pn.Row(self._dl_png, self._dl_tiff)
        self._map_controls = pn.Column(self._view_w, self._focus_w, self._element_w, self._cmap_w)
        sidebar = pn.Column(
            pn.pane.Markdown("### Data"),
            self._source_w,
            pn.pane.Markdown(f"or upload a scan (max {_size_text(self.max_upload_bytes)}):"),
            self._upload,
            self._model_w,
            self._progress_bar,
            self._calibration.card,
            pn.pane.Markdown("### Export"),
            self._map_exports,
            pn.Row(self._dl_h5, self._dl_csv),
            pn.Row(self._dl_report),
            pn.pane.Markdown("### View"),
            self._map_controls,
            self._log_w,
            self._sim_w,
            pn.pane.Markdown("### Thresholds"),
            self._global_w,
            self._reset_w,
            self._threshold_card,
            width=300,
        )
        # fixed width: the spectrum column beside it must fit on a 1440-px screen
        self._map_column = pn.Column(
            self._main_pane, self._legend, self._info, self._scan_info, width=_MAIN_PX + 70
        )
        self._calls = pn.pane.Markdown(
            "", sizing_mode="stretch_width", visible=False, css_classes=["xrfnb-calls"]
        )
        self._gallery_section = pn.Column(
            pn.pane.Markdown("### Pigment maps (click one to enlarge it)"),
            self._gallery,
            sizing_mode="stretch_width",
        )
        main = pn.Column(
            self._status,
            self._ood_alert,
            pn.Row(
                self._map_column,
                pn.Column(self._spectrum_pane, self._residual.pane, self._prob_pane, self._fractions),
                self._calls,
            ),
            self._gallery_section,
            self._element_views.section,
            sizing_mode="stretch_width",
        )
        header = pn.pane.Markdown("## xrfnb: pigment maps from XRF scans", sizing_mode="stretch_width")
        return pn.Column(
            header, pn.Row(sidebar, main, sizing_mode="stretch_width"), sizing_mode="stretch_width"
        )

    def scan_info_text(self) -> str:
        """Markdown about the open file: format, shape, pixel size, live time, energy calibration and
        its source, and how the detector elements of a multi-element file were combined."""
        scan = self._scan
        if scan is None:
            return ""
        meta = scan.metadata
        rows, cols, channels = scan.shape
        fmt = meta.get("format")
        parts = [f"**File:** {html.escape(self._label, quote=False)}" + (f" ({fmt})" if fmt else "")]
        parts.append(f"{rows} x {cols} pixels x {channels} channels")
        if scan.pixel_size_um:
            parts.append(f"pixel {_micro(f'{float(scan.pixel_size_um):g} um')}")
        live = scan.live_time_s
        if live is not None:
            value = float(np.mean(live)) if isinstance(live, np.ndarray) else float(live)
            parts.append(f"live time {value:.3g} s" + (" per pixel (mean)" if rows * cols > 1 else ""))
        cal = f"calibration {scan.calibration}"
        if meta.get("calibration_source"):
            cal += f" ({html.escape(str(meta['calibration_source']), quote=False)})"
        parts.append(cal)
        text = "; ".join(parts) + "."
        n_el = int(meta.get("n_elements") or 1)
        if n_el > 1:
            how = meta.get("sum_note") if meta.get("element") == "sum" else None
            how = how or f"element {meta.get('element')} shown alone"
            text += f"\n\n**Detector:** {n_el} detector elements, {html.escape(str(how), quote=False)}."
        return text

    # -- a single spectrum ------------------------------------------------------------------------
    @property
    def single_spectrum(self) -> bool:
        """Whether the open scan is one spectrum (1 x 1): shown as a spectrum with its calls, no maps."""
        return self._scan is not None and tuple(self._scan.shape[:2]) == (1, 1)

    def calls_table(self) -> list[dict[str, Any]]:
        """The pigment calls at the selected pixel with their evidence, most probable first.

        Returns
        -------
        list of dict
            One per class: ``class``, ``probability``, ``threshold``, ``call`` ("surface", "buried" or
            "" when below the threshold), ``evidence`` (the class's key elements as the element fit found
            them at the pixel: net counts +- sigma, or "not detected (< detection limit)").
        """
        if self._maps is None or self.pixel is None:
            return []
        r, c = self.pixel
        prob = np.asarray(self._maps.probability[r, c], dtype=float)
        thr = self.threshold_array()
        present, buried = self._selection_layers(self.thresholds)
        em = getattr(self._maps, "element_maps", None)
        fit: dict[str, tuple[float, float, float, bool]] = {}
        if em is not None:
            det = np.asarray(em.present(), dtype=bool)[r, c]
            for i, el in enumerate(em.elements):
                fit[el] = (
                    float(em.intensity[r, c, i]),
                    float(em.sigma[r, c, i]),
                    float(em.detection_limit[r, c, i]),
                    bool(det[i]),
                )
        rows = []
        for k, cls in enumerate(self.classes):
            evidence = []
            for el in self._class_elements(cls):
                if el not in fit:
                    continue
                value, sigma, limit, detected = fit[el]
                evidence.append(
                    f"{el} {value:,.0f} ± {sigma:,.0f} counts"
                    if detected
                    else f"{el} not detected (< {limit:,.0f})"
                )
            call = ("buried" if buried[k] else "surface") if present[k] else ""
            rows.append(
                {
                    "class": cls,
                    "probability": float(prob[k]),
                    "threshold": float(thr[k]),
                    "call": call,
                    "evidence": "; ".join(evidence) if evidence else "no element lines fitted",
                }
            )
        rows.sort(key=lambda row: -row["probability"] if np.isfinite(row["probability"]) else 1.0)
        return rows

    def _class_elements(self, cls: str) -> tuple[str, ...]:
        """Key elements of a class (its pigments' ``elements``), cached per maps."""
        cache = self.__dict__.setdefault("_class_element_cache", {})
        key = (id(self._maps), cls)
        if key not in cache:
            pigments_fn = _xrfnb_attr("pigments")
            out: list[str] = []
            if pigments_fn is not None:
                library = pigments_fn()
                members = library.groups().get(cls) or (cls,)
                for name in members:
                    try:
                        out.extend(library[name].elements)
                    except XRFNBError:
                        continue
            cache[key] = tuple(dict.fromkeys(out))
        return cache[key]

    def _update_calls(self) -> None:
        """The single-spectrum view: calls table shown, maps, gallery and map-only controls hidden."""
        single = self.single_spectrum
        for widget in (self._map_column, self._gallery_section, self._map_controls, self._map_exports):
            widget.visible = not single
        self._calls.visible = single
        if not single:
            self._calls.object = ""
            return
        rows = self.calls_table()
        if not rows:
            if not self._model_available():
                why = "no trained model"
            elif self.needs_calibration():
                why = "the spectrum needs an energy calibration first (see 'Energy calibration')"
            else:
                why = "the model has not finished yet"
            self._calls.object = "### Pigment calls\n\nNo pigment calls: " + why
            return
        called = [row for row in rows if row["call"]]
        shown = called + [row for row in rows if not row["call"]][:5]
        lines = [
            "### Pigment calls for this spectrum",
            "",
            "| pigment class | probability | threshold | call | evidence (element fit) |",
            "|---|---:|---:|---|---|",
        ]
        for row in shown:
            call = f"**{row['call']}**" if row["call"] else "absent"
            lines.append(
                f"| {row['class']} | {row['probability']:.2f} | {row['threshold']:.2f} | {call} | "
                f"{row['evidence']} |"
            )
        if not called:
            lines.insert(2, "No class reaches its threshold. The most probable ones:\n")
        self._calls.object = "\n".join(lines)

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    @contextlib.contextmanager
    def _frozen(self) -> Any:
        """One user action: every rendered Bokeh document re-walks its models at most once, at the end.

        Each HoloViews plot refresh freezes its document and Bokeh re-walks every model of it when the
        freeze ends; a threshold change can refresh five plots. The documents are frozen lazily, by
        :meth:`_hold_documents`, the first time something in the action changes the model graph (a
        HoloViews refresh, a new plot): an action that only writes new values into existing models
        (images patched into their data sources, slider values, texts) needs no walk at all. Nested
        actions join the outer one.
        """
        if self._action is not None:
            yield
            return
        self._action = contextlib.ExitStack()
        self._action_held = False
        try:
            with self._action:
                yield
        finally:
            self._action = None

    def _hold_documents(self) -> None:
        """Freeze the rendered documents until the current action ends (no-op outside an action)."""
        if self._action is None or self._action_held:
            return
        self._action_held = True
        seen: set[int] = set()
        for model, _ in list(getattr(getattr(self, "_layout", None), "_models", {}).values()):
            doc = getattr(model, "document", None)
            if doc is not None and id(doc) not in seen:
                seen.add(id(doc))
                self._action.enter_context(doc.models.freeze())

    # -- status -----------------------------------------------------------------------------------
    def _update_status(self) -> None:
        parts = []
        if self._scan is None:
            parts.append(
                "No scan open: choose one from the served folder"
                + (" or the demo" if DEMO_LABEL in self.param.source.objects else "")
                + ", or upload a file."
            )
            if DEMO_LABEL not in self.param.source.objects:
                parts.append("The demo scene is not available in this installation.")
        if not self._model_available() and self._maps is None:
            parts.append(
                "No trained pigment model is available (none shipped with the package or in "
                "$XRFNB_MODELS): pigment maps cannot be computed. Train one with `xrfnb train`; "
                "total counts and spectra still work."
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

    # -- main map ---------------------------------------------------------------------------------
    def _valid(self) -> np.ndarray:
        return ~np.asarray(self._maps.mask, dtype=bool)

    def main_array(self) -> tuple[str, np.ndarray]:
        """The main view's image: ``(kind, array)`` with kind "rgb" (rows, cols, 3) uint8 or "value"."""
        view = self.view
        if self._scan is None:
            raise DataError("no scan open")
        if view == "Total counts":
            img = self._total.copy()
            return "value", (np.log10(1.0 + img) if self.log_scale else img)
        if view == "Elements":
            em = getattr(self._maps, "element_maps", None) if self._maps is not None else None
            if em is None or self.element is None:
                raise DataError("no element maps for this scan (they come with the pigment maps)")
            img = np.asarray(em[self.element], dtype=float)
            return "value", (np.log10(1.0 + np.maximum(img, 0)) if self.log_scale else img)
        if self._maps is None:
            raise DataError(
                "no pigment maps: "
                + ("a trained model is needed" if not self._model_available() else "mapping has not finished")
            )
        valid = self._valid()
        if view == "Composite":
            rgb = np.array(self._maps.composite_rgb(self.threshold_array()), dtype=np.uint8)
            return "rgb", rgb
        if self.focus not in self.classes:
            raise DataError("choose a pigment to show")
        k = self.classes.index(self.focus)
        prob = np.asarray(self._maps.probability[..., k], dtype=float)
        thr = self.thresholds[self.focus]
        if view == "Pigment":
            return "value", np.where(valid, prob, np.nan)
        if view == "Surface vs buried":
            buried = np.asarray(self._maps.buried_probability[..., k], dtype=float)
            with np.errstate(invalid="ignore"):
                present = prob >= thr
                # the same rule as PigmentMaps.buried: more likely buried than at the surface
                cat = np.where(present, np.where(buried >= 0.5 * prob, 2.0, 1.0), 0.0)
            return "value", np.where(valid, cat, np.nan)
        if view == "OOD score":
            return "value", np.where(valid, np.asarray(self._maps.ood_score, dtype=float), np.nan)
        raise DataError(f"unknown view {view!r}")

    def _main_title(self) -> str:
        v = self.view
        if v == "Pigment":
            return f"{self.focus}: probability where >= {self.thresholds.get(self.focus, 0):.2f}"
        if v == "Surface vs buried":
            return f"{self.focus}: surface (orange) vs buried only (green)"
        if v == "OOD score":
            return f"OOD score (unfamiliar spectra above {float(self._maps.ood_threshold):.2f})"
        if v == "Elements":
            return f"{self.element} element map" + (" (log10 counts)" if self.log_scale else " (counts)")
        if v == "Total counts":
            return "Total counts" + (" (log10)" if self.log_scale else "")
        return "Composite pigment map"

    def _main_element(self, **kwargs: Any) -> hv.Element:
        try:
            kind, arr = self.main_array()
        except XRFNBError as exc:
            return _message(str(exc), height=_MAIN_PX)
        rows, cols = arr.shape[:2]
        scale = _MAIN_PX / max(rows, cols)
        size = {"frame_width": max(60, round(cols * scale)), "frame_height": max(60, round(rows * scale))}
        mm, axes = self.map_scale()
        unit = "mm" if axes[0].endswith("(mm)") else ""
        tools = ["tap", "box_select", "lasso_select"]
        hooks = [_name_hook("xrfnb-main"), _weak_hook(self._pixel_marker_hook)]
        hooks += [_scale_bar_hook] if unit else []
        common = {
            "title": self._main_title(),
            "tools": tools,
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
            # the composite's colours are mixtures: the legend beside the map names them; hover gives
            # the position only (its raw value is a packed RGBA number)
            return _rgb(arr, mm, axes).opts(
                hover_tooltips=where,
                tools=["hover", *tools],
                **{k: v for k, v in common.items() if k != "tools"},
            )
        if self.view == "Surface vs buried":
            return _image(arr, "category", mm, axes).opts(
                cmap=list(_SURFACE_BURIED_COLORS),
                clim=(-0.5, 2.5),
                colorbar=False,  # categories: the legend beside the map names them
                clipping_colors={"NaN": _INVALID_COLOR},
                hover_tooltips=[*where, ("0 absent, 1 surface, 2 buried only", "@image")],
                tools=["hover", *tools],
                **{k: v for k, v in common.items() if k != "tools"},
            )
        label = self._colorbar_label()
        clim = _pigment_clim(self.thresholds[self.focus]) if self.view == "Pigment" else (None, None)
        if self.view == "OOD score":
            finite = arr[np.isfinite(arr)]
            clim = (
                0.0,
                float(max(finite.max() if finite.size else 1.0, float(self._maps.ood_threshold) * 1.5)),
            )
        return _image(arr, label, mm, axes).opts(
            cmap=list(PALETTES[self.cmap]),
            colorbar=True,
            clabel=label,
            clim=clim,
            clipping_colors={"NaN": _INVALID_COLOR, "min": _ABSENT_COLOR},
            hover_tooltips=[*where, (label, "@image")],
            tools=["hover", *tools],
            **{k: v for k, v in common.items() if k != "tools"},
        )

    def pixel_marker(self) -> dict[str, list[float]]:
        """Data of the selected-pixel marker on the main map, in the map's axis units: the pixel's
        centre (``x``, ``y``) and its size (``w``, ``h``); empty lists without a selected pixel."""
        if self._scan is None or self.pixel is None:
            return {"x": [], "y": [], "w": [], "h": []}
        mm, _ = self.map_scale()
        r, c = self.pixel
        return {"x": [(c + 0.5) * mm], "y": [(r + 0.5) * mm], "w": [mm], "h": [mm]}

    def _pixel_marker_hook(self, plot: Any, element: Any) -> None:
        """Draw the selected pixel on a main-map figure: its outline (data units) and a ring of fixed
        screen size around it (visible when a pixel is smaller than a screen pixel), each white under
        black so that they show on every colour map; added once per figure, moved by
        :meth:`_move_pixel_marker`."""
        from bokeh.models import ColumnDataSource, GlyphRenderer, Rect, Scatter

        figure = plot.state
        if any(getattr(r, "name", None) == "xrfnb-pixel-marker" for r in figure.renderers):
            self._move_pixel_marker([figure])
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

    def _move_pixel_marker(self, figures: Sequence[Any] | None = None) -> None:
        """Move the marker of every rendered main map (one per document) to the selected pixel."""
        data = self.pixel_marker()
        if figures is not None:
            for figure in figures:
                for r in figure.renderers:
                    if getattr(r, "name", None) == "xrfnb-pixel-marker":
                        r.data_source.data = dict(data)
            return
        for plot in self._main.plots():
            sources = [r.data_source for r in plot.state.renderers if r.name == "xrfnb-pixel-marker"]
            if not sources:
                continue

            def write(sources: list[Any] = sources) -> None:
                for src in sources:
                    src.data = dict(data)

            _write_to_plot(plot, write)

    def _colorbar_label(self) -> str:
        """What the main map's values are, for its colour bar and hover."""
        log10 = self.log_scale and self.view in ("Elements", "Total counts")
        return (
            {
                "Pigment": "probability",
                "OOD score": "OOD score",
                "Elements": f"{self.element} counts",
                "Total counts": "counts",
                "Surface vs buried": "category",
            }.get(self.view, "value")
            if not log10
            else (f"log10(1 + {self.element} counts)" if self.view == "Elements" else "log10(1 + counts)")
        )

    def map_scale(self) -> tuple[float, tuple[str, str]]:
        """``(mm per pixel, (x label, y label))`` of the map axes: millimetres when the scan's pixel size
        is known, else ``(1.0, ("column", "row"))`` (pixel indices)."""
        px = getattr(self._scan, "pixel_size_um", None) if self._scan is not None else None
        if px:
            return float(px) / 1000.0, ("x (mm)", "y (mm)")
        return 1.0, ("column", "row")

    # -- gallery ----------------------------------------------------------------------------------
    # One Bokeh figure holds every pigment's map as a tile of an RGB mosaic: a figure per pigment would
    # put thousands of models in the document, and Bokeh walks all of them after every update.
    def _tile_geometry(self) -> tuple[int, int, int, int, int]:
        """(tile_rows, tile_cols, stride, mosaic columns, label band height) of the gallery mosaic."""
        rows, cols = self._maps.probability.shape[:2]
        stride = _stride(rows, cols, _THUMB_PX)
        th, tw = -(-rows // stride), -(-cols // stride)
        return th, tw, stride, min(len(self.classes), _GALLERY_COLUMNS), max(4, th // 4)

    def _tile_rgb(self, cls: str) -> np.ndarray:
        """One gallery tile, shape (tile_rows, tile_cols, 3) uint8: colour from threshold to 1."""
        prob = self._thumb_prob.get(cls)
        if prob is None:
            k = self.classes.index(cls)
            stride = self._tile_geometry()[2]
            prob = np.asarray(self._maps.probability[::stride, ::stride, k], dtype=float)
            prob[~self._valid()[::stride, ::stride]] = np.nan
            self._thumb_prob[cls] = prob
        lo, hi = _pigment_clim(self.thresholds[cls])
        rgba = _colorize(prob, PALETTES[self.cmap], lo, hi, below=_ABSENT_COLOR)
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = _hex_rgb(_INVALID_COLOR)
        return rgb

    def gallery_data(self) -> dict[str, Any]:
        """The gallery mosaic: ``rgb`` (H, W, 3) uint8 and tile ``labels`` [(x, y, text)] in mosaic pixels."""
        th, tw, _, ncols, band = self._tile_geometry()
        gap = max(2, tw // 16)
        nrows = -(-len(self.classes) // ncols)
        cell_h, cell_w = th + band + gap, tw + gap
        mosaic = np.full((nrows * cell_h, ncols * cell_w, 3), 255, dtype=np.uint8)
        labels = []
        for i, cls in enumerate(self.classes):
            tile = self._tiles.get(cls)
            if tile is None:
                tile = self._tiles[cls] = self._tile_rgb(cls)
            r0, c0 = (i // ncols) * cell_h + band, (i % ncols) * cell_w
            mosaic[r0 : r0 + th, c0 : c0 + tw] = tile
            prob = self._thumb_prob[cls]
            finite = np.isfinite(prob)
            with np.errstate(invalid="ignore"):
                frac = float((prob[finite] >= self.thresholds[cls]).mean()) if finite.any() else 0.0
            # two lines at most, wrapped to the tile's width: long class names overlapped their
            # neighbours on one line
            text = textwrap.fill(f"{cls} ({100 * frac:.0f}%)", _TILE_LABEL_CHARS, break_long_words=False)
            labels.append((c0 + tw / 2, r0 - band / 2, text))
        return {"rgb": mosaic, "labels": labels, "cell": (cell_h, cell_w, band, ncols)}

    def _gallery_element(self, data: dict[str, Any] | None = None) -> hv.Overlay:
        data = data if data is not None else self.gallery_data()
        rgb = data["rgb"]
        h, w = rgb.shape[:2]
        scale = min(_GALLERY_WIDTH / w, 3.0)
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
                hooks=[_name_hook("xrfnb-gallery"), _weak_hook(self._gallery_tap_hook)],
            )
        )

    def _gallery_tap_hook(self, plot: Any, element: Any) -> None:
        """Listen to clicks on the rendered gallery figure (once per figure).

        A HoloViews Tap stream on the gallery's DynamicMap of overlays never reaches the figure (no
        callback is attached to an overlay plot), so a click did nothing in the browser; the figure's
        own Bokeh tap event is subscribed to instead. Its x, y are mosaic pixels, y downwards.
        """
        self._subscribe_tap(plot.state, self._on_gallery_click)

    def _subscribe_tap(self, figure: Any, handler: Callable[[Any], None]) -> None:
        """Call ``handler`` on Bokeh tap events of ``figure``, once per figure (hooks run on every redraw)."""
        from bokeh import events

        seen = self.__dict__.setdefault("_tap_figures", set())
        if (figure.id, handler.__name__) in seen:
            return
        seen.add((figure.id, handler.__name__))
        figure.on_event(events.Tap, handler)

    @_guarded
    def _on_gallery_click(self, event: Any) -> None:
        self._on_gallery_tap(x=event.x, y=event.y)

    def _rebuild_gallery(self) -> None:
        self._hold_documents()
        self._tiles: dict[str, np.ndarray] = {}
        self._thumb_prob: dict[str, np.ndarray] = {}
        self._gallery_shown: dict[str, Any] | None = None
        self._gallery_refresh: streams.Stream | None = None
        self._gallery_pane = None
        if self.single_spectrum:
            self._gallery.objects = []  # one spectrum: the calls table instead of a gallery of 1-pixel maps
            return
        if self._maps is None:
            self._gallery.objects = [
                pn.pane.Markdown(
                    "No pigment maps to show."
                    + (
                        ""
                        if self._model_available()
                        else " No trained model is available, so pigments cannot be mapped."
                    )
                )
            ]
            return
        self._gallery_shown = self.gallery_data()
        self._gallery_refresh = _Refresh(version=0)
        dmap = hv.DynamicMap(
            lambda version: self._gallery_element(self._gallery_shown), streams=[self._gallery_refresh]
        )
        self._gallery_pane = pn.pane.HoloViews(dmap, linked_axes=False, css_classes=["xrfnb-gallery"])
        self._gallery.objects = [
            self._gallery_pane,
            pn.pane.Markdown(
                "Each map is coloured from its pigment's threshold (dark) to probability 1 (bright); light "
                "grey: below the threshold; dark grey: invalid pixel. Click a map to enlarge it.",
                styles={"font-size": "small"},
            ),
        ]

    def _update_thumbnails(self, classes: Sequence[str]) -> None:
        """Recolour the gallery tiles of ``classes`` (their threshold or the colour map changed)."""
        if self._maps is None or getattr(self, "_gallery_refresh", None) is None:
            return
        for cls in classes:
            self._tiles.pop(cls, None)
        self._gallery_shown = data = self.gallery_data()
        version = self._gallery_refresh.version + 1
        if self._patch_gallery(data):
            # no refresh, but a later render of the gallery (another root, a rebuilt layout) must call
            # the callback again instead of reusing the DynamicMap's cached, memoized last element
            self._gallery_refresh.update(version=version)
            self._gallery_pane.object.reset()
            return
        self._hold_documents()
        self._gallery_refresh.event(version=version)

    def _patch_gallery(self, data: dict[str, Any]) -> bool:
        """Write a new mosaic and tile labels into the rendered gallery plots; False when it cannot.

        Recolouring keeps the mosaic's shape and the labels' positions, so only the image of the RGB
        glyph's data source and the text column of the labels' source change. False (nothing changed)
        when the gallery is not rendered or a rendered plot does not have that structure.
        """
        pane = getattr(self, "_gallery_pane", None)
        plots = _rendered_plots(pane) if pane is not None else []
        if not plots:
            return False
        image = _rgba_u32(data["rgb"])
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
                old.shape != image.shape
                or lx.shape != xs.shape
                or not (np.array_equal(lx, xs) and np.array_equal(ly, ys))
            ):
                return False
            targets.append((plot, images[0], labels[0]))

        def write(image_source: Any, label_source: Any) -> None:
            image_source.data["image"] = [image]
            old_text = label_source.data["text"]
            label_source.data["text"] = (
                np.array(texts, dtype=old_text.dtype) if isinstance(old_text, np.ndarray) else list(texts)
            )

        for plot, image_source, label_source in targets:
            _write_to_plot(plot, functools.partial(write, image_source, label_source))
        return True

    def _on_gallery_tap(self, x: float | None = None, y: float | None = None, **kwargs: Any) -> None:
        if x is None or y is None or self._maps is None:
            return
        cell_h, cell_w, _, ncols = self._gallery_shown["cell"]
        col, row = int(x // cell_w), int(y // cell_h)
        i = row * ncols + col
        if 0 <= col < ncols and 0 <= i < len(self.classes):
            with self._frozen(), param.parameterized.batch_call_watchers(self):
                self.focus = self.classes[i]
                self.view = "Pigment"

    # -- selection --------------------------------------------------------------------------------
    @_guarded
    def _on_tap(self, x: float | None = None, y: float | None = None, **kwargs: Any) -> None:
        if x is None or y is None or self._scan is None:
            return
        mm, _ = self.map_scale()
        self.select_pixel(math.floor(y / mm), math.floor(x / mm))

    def select_pixel(self, row: int, col: int) -> None:
        """Show the spectrum and class probabilities of pixel (row, col)."""
        if self._scan is None:
            raise DataError("no scan open")
        rows, cols = self._scan.shape[:2]
        if not (0 <= row < rows and 0 <= col < cols):
            raise DataError(f"pixel ({row}, {col}) is outside the {rows} x {cols} scan")
        with self._frozen(), param.parameterized.batch_call_watchers(self):
            self.region = None
            self.pixel = (row, col)

    @_guarded
    def _on_box(self, bounds: tuple[float, float, float, float] | None = None, **kwargs: Any) -> None:
        if bounds is None or self._scan is None:
            return
        mm, _ = self.map_scale()
        x0, y0, x1, y1 = (float(b) / mm for b in bounds)
        rows, cols = self._scan.shape[:2]
        mask = np.zeros((rows, cols), dtype=bool)
        r0, r1 = sorted((y0, y1))
        c0, c1 = sorted((x0, x1))
        rr = np.arange(rows) + 0.5
        cc = np.arange(cols) + 0.5
        mask[np.ix_((rr >= r0) & (rr <= r1), (cc >= c0) & (cc <= c1))] = True
        self.select_region(mask)

    @_guarded
    def _on_lasso(self, geometry: np.ndarray | None = None, **kwargs: Any) -> None:
        if geometry is None or self._scan is None or len(geometry) < 3:
            return
        g = np.asarray(geometry, dtype=float) / self.map_scale()[0]
        self.select_region(_polygon_mask(g[:, 0], g[:, 1], *self._scan.shape[:2]))

    def select_region(self, mask: np.ndarray) -> None:
        """Show the mean spectrum and pigment area fractions of a region (bool mask (rows, cols))."""
        if self._scan is None:
            raise DataError("no scan open")
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self._scan.shape[:2]:
            raise DataError(f"region mask has shape {mask.shape}, expected {self._scan.shape[:2]}")
        if not mask.any():
            raise DataError("the selected region contains no pixel centre: select a larger area")
        with self._frozen(), param.parameterized.batch_call_watchers(self):
            self.pixel = None
            self.region = mask

    def current_spectrum(self) -> tuple[str, np.ndarray, np.ndarray]:
        """``(label, energy_keV (channels,), counts (channels,))`` of the tapped pixel or region mean."""
        if self._scan is None:
            raise DataError("no scan open")
        energy = self._energy_keV
        if self.region is not None:
            mask = self.region
            rr = np.flatnonzero(mask.any(axis=1))
            cc = np.flatnonzero(mask.any(axis=0))
            block = np.asarray(self._scan.counts[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1])
            sub = mask[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1]
            counts = block[sub].astype(np.float64).mean(axis=0)
            return f"mean of {int(mask.sum())} selected pixels", energy, counts
        if self.pixel is None:
            raise DataError("tap a pixel on the map to see its spectrum")
        r, c = self.pixel
        spec = self._scan[r, c]
        return f"pixel (row {r}, col {c})", energy, np.asarray(spec.counts, dtype=np.float64)

    def _present_elements(self) -> list[tuple[str, str | None]]:
        """(element, family) of the elements detected at the pixel/region (element maps), for markers."""
        em = getattr(self._maps, "element_maps", None) if self._maps is not None else None
        if em is None:
            return []
        present = np.asarray(em.present(), dtype=bool)
        if self.region is not None:
            here = present[self.region].mean(axis=0) >= 0.5
        elif self.pixel is not None:
            here = present[self.pixel[0], self.pixel[1]]
        else:
            return []
        fams = list(getattr(em, "families", [None] * len(em.elements)))
        return [(el, fams[i]) for i, el in enumerate(em.elements) if here[i]]

    def _spectrum_element(self, **kwargs: Any) -> hv.Element:
        try:
            label, energy, counts = self.current_spectrum()
        except XRFNBError as exc:
            return _message(str(exc), width=560, height=300)
        self._last_curve = {"energy_keV": energy, "counts": counts}
        y = np.maximum(counts, 0.5) if self.log_scale else counts
        curve = hv.Curve((energy, y), "Energy (keV)", "Counts", label="measured").opts(
            color="#222222", line_width=1
        )
        total = float(counts.sum())
        ymax = float(y.max()) if y.size else 1.0
        y0 = 0.5 if self.log_scale else 0.0
        ytxt = ymax * (1.6 if self.log_scale else 1.06)
        lines = [
            (name, e)
            for el, fam in self._present_elements()
            for name, e in _family_lines(el, fam, float(energy[-1]))
        ]
        seg = hv.Segments([(e, y0, e, ymax * 1.02) for _, e in lines], ["Energy (keV)", "Counts", "x1", "y1"])
        labels = hv.Labels([(e, ytxt, name) for name, e in lines], ["Energy (keV)", "Counts"], "line")
        sim = self.simulated_spectrum()
        sim_y = np.zeros(0) if sim is None else (np.maximum(sim[1], 0.5) if self.log_scale else sim[1])
        sim_curve = hv.Curve((energy[: sim_y.size], sim_y), "Energy (keV)", "Counts", label="simulated").opts(
            color="#d62728", line_width=1, alpha=0.8
        )
        overlay = (
            curve
            * sim_curve
            * seg.opts(color="#1f77b4", line_dash="dashed", line_width=1, alpha=0.7)
            * labels.opts(text_font_size="8pt", text_color="#1f77b4", angle=90, text_align="left")
        )
        # the y range follows the shown spectrum (framewise) and leaves room above the highest peak for
        # the vertical line labels, which start at 1.06 x the maximum
        top = ytxt * (6.0 if self.log_scale else 1.3) if lines else ymax * (2.0 if self.log_scale else 1.08)
        return overlay.opts(
            hv.opts.Curve(framewise=True),
            hv.opts.Segments(framewise=True),
            hv.opts.Labels(framewise=True),
            hv.opts.Overlay(
                title=f"Spectrum of {label}: {total:.0f} counts",
                width=560,
                height=300,
                ylim=(y0, max(top, y0 + 1.0)),
                logy=self.log_scale,
                show_legend=False,
                tools=["hover"],
                hooks=[_name_hook("xrfnb-spectrum"), _weak_hook(self._spectrum_tap_hook)],
                framewise=True,
            ),
        )

    # -- simulated spectrum of the predicted stack ------------------------------------------------
    def predicted_pigments(self) -> tuple[tuple[str, ...], tuple[str, ...]] | str:
        """``(surface pigments, buried pigments)`` the maps call at the pixel or region, or the reason why
        there are none.

        Classes above threshold go to the surface layer, or below it where the model says the class is
        present only below the surface; each class is represented by the first pigment of its ambiguity
        group (XRF cannot tell the group's members apart).
        """
        if self._maps is None:
            return "no pigment maps"
        if self.pixel is None and self.region is None:
            return "no pixel selected"
        present, buried = self._selection_layers(self.thresholds)
        pigments_fn = _xrfnb_attr("pigments")
        if pigments_fn is None or _xrfnb_attr("fit_stack") is None:
            return "the simulator is not available"
        names: dict[bool, list[str]] = {True: [], False: []}
        for k, cls in enumerate(self.classes):
            if present[k]:
                pigment = self._pigment_of(cls, pigments_fn)
                if pigment is not None:
                    names[bool(buried[k])].append(pigment)
        if not names[True] and not names[False]:
            return "no library pigment above threshold"
        return tuple(names[False]), tuple(names[True])

    def fitted_stack(self) -> Any:
        """The :class:`~xrfnb.StackFit` of the called pigments to the pixel's (or region's mean) spectrum.

        :func:`xrfnb.fit_stack` searches surface thickness, pigment load and the pigments' relative
        amounts for the stack whose simulated spectrum best explains the measured counts, so the residual
        shows what the calls leave unexplained. Returns ``None`` with the reason in ``_sim_reason`` when
        there is nothing to fit. Cached per spectrum and pigments.
        """
        called = self.predicted_pigments()
        if isinstance(called, str):
            self._sim_reason = called
            return None
        _, _, counts = self.current_spectrum()
        inst = self._instrument()
        surface, buried = called
        if not surface:
            # only pigments called as buried: nothing is known about the layer above them (fit_stack
            # cannot build a pigment-free surface layer), so they are fitted as one paint layer
            surface, buried = buried, ()
        key = (surface, buried, id(inst), hash(counts.tobytes()))
        fit = _FITS.get(key)
        if fit is None:
            fit = _xrfnb_attr("fit_stack")(counts, inst, surface, buried)
            _FITS.put(key, fit)
        return fit

    def predicted_stack(self) -> tuple[Any, str]:
        """The fitted paint stack at the pixel or region and its description (pigments, weight fractions,
        surface thickness); ``(None, reason)`` when there is nothing to simulate."""
        fit = self.fitted_stack()
        if fit is None:
            return None, self._sim_reason
        return fit.stack, _micro(fit.describe())

    def _selection_layers(self, thresholds: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """(present (K,), buried (K,)) bool of the selected pixel or region mean under ``thresholds``."""
        if self.region is not None:
            prob = np.nanmean(np.asarray(self._maps.probability[self.region], dtype=float), axis=0)
            bur = np.nanmean(np.asarray(self._maps.buried_probability[self.region], dtype=float), axis=0)
        else:
            r, c = self.pixel
            prob = np.asarray(self._maps.probability[r, c], dtype=float)
            bur = np.asarray(self._maps.buried_probability[r, c], dtype=float)
        thr = np.array([thresholds.get(c, np.nan) for c in self.classes], dtype=float)
        with np.errstate(invalid="ignore"):
            present = prob >= thr
            buried = present & (bur >= 0.5 * prob)
        return present, buried

    def _pigment_of(self, cls: str, pigments_fn: Callable[[], Any]) -> str | None:
        """The library pigment standing for a class (first member of its group), cached per maps."""
        cache = self.__dict__.setdefault("_pigment_cache", {})
        key = (id(self._maps), cls)
        if key not in cache:
            library = pigments_fn()
            members = library.groups().get(cls)
            if not members:  # a class named by a pigment rather than by its group
                try:
                    members = (library[cls].name,)
                except XRFNBError:
                    members = (None,)
            cache[key] = members[0]
        return cache[key]

    def _instrument(self) -> Any:
        inst_cls = _xrfnb_attr("Instrument")
        name = str(self._scan.metadata.get("instrument") or "bruker-m6")
        key = (name, self._scan.calibration, self._scan.n_channels)
        inst = _INSTRUMENTS.get(key)
        if inst is None:
            import dataclasses

            try:
                base = inst_cls.preset(name)
            except XRFNBError:
                base = inst_cls.preset("bruker-m6")
            inst = dataclasses.replace(
                base, calibration=self._scan.calibration, n_channels=self._scan.n_channels
            )
            _INSTRUMENTS.put(key, inst)
        return inst

    def simulated_spectrum(self) -> tuple[str, np.ndarray] | None:
        """``(description, expected counts (channels,))`` of the fitted stack (:meth:`fitted_stack`),
        scaled to the measured counts in the fitted energy range; None when switched off or nothing can be
        simulated (the reason is kept)."""
        self._sim_reason = "switched off"
        if not self.simulate_stack or self._scan is None:
            return None
        try:
            fit = self.fitted_stack()
        except XRFNBError as exc:
            # the simulator's own wording (layer internals) stays in the log; the plot says what failed
            log.warning("simulating the called stack of %s failed: %s", self._label, exc)
            called = self.predicted_pigments()
            what = ", ".join(called[0] + called[1]) if not isinstance(called, str) else "the called pigments"
            self._sim_reason = f"{what} could not be simulated for this spectrum"
            return None
        if fit is None:
            return None
        self._sim_reason = ""
        return f"{_micro(fit.describe())}; deviance {fit.reduced_deviance:.2f} per channel", fit.expected

    def _residual_kind(self) -> str:
        # always an overlay (an empty one with the reason when nothing is simulated), but a fresh plot when
        # switching between empty and data: an empty first frame leaves Bokeh's axes at (0, 1)
        if not self.simulate_stack or self._maps is None or (self.pixel is None and self.region is None):
            return "Overlay-empty"
        try:
            return "Overlay" if not isinstance(self.predicted_pigments(), str) else "Overlay-empty"
        except XRFNBError:
            return "Overlay-empty"

    def _residual_element(self, **kwargs: Any) -> hv.Element:
        sim = self.simulated_spectrum() if self._maps is not None else None
        zero = hv.HLine(0.0).opts(color="#555555", line_width=1)
        opts = {
            "width": 560,
            "height": 170,
            "framewise": True,
            "show_legend": False,
            "tools": ["hover"],
            "fontsize": {"title": 9},
        }
        if sim is None:
            reason = self._sim_reason if self._maps is not None else "no pigment maps"
            empty = hv.Curve([], "Energy (keV)", "Measured - simulated")
            return (empty * zero).opts(hv.opts.Overlay(title=f"No simulated spectrum: {reason}", **opts))
        desc, expected = sim
        _, energy, counts = self.current_spectrum()
        residual = counts - expected
        curve = hv.Curve((energy, residual), "Energy (keV)", "Measured - simulated").opts(
            color="#d62728", line_width=1
        )
        # a long stack description wraps onto more title lines (Bokeh draws "\n") instead of being cut off
        title = textwrap.fill(f"Residual vs fitted stack: {desc}", _TITLE_CHARS, break_long_words=False)
        opts["height"] += 12 * title.count("\n")
        # framewise on the curve itself: the y range follows each new residual, not the first one
        return (curve * zero).opts(hv.opts.Curve(framewise=True), hv.opts.Overlay(title=title, **opts))

    def marker_lines(self) -> list[tuple[str, float]]:
        """``(label, energy_keV)`` of the line markers drawn on the current spectrum."""
        if self._energy_keV is None:
            return []
        top = float(self._energy_keV[-1])
        return [(name, e) for el, fam in self._present_elements() for name, e in _family_lines(el, fam, top)]

    def _probability_element(self, **kwargs: Any) -> hv.Element:
        if self._maps is None or (self.pixel is None and self.region is None):
            msg = "No class probabilities: " + (
                "no trained model"
                if not self._model_available()
                else "no pigment maps yet"
                if self._maps is None
                else "tap a pixel"
            )
            return _message(msg, width=560, height=220)
        title, table = self._probability_table()
        # horizontal bars, one row per class: every class name is legible (31 classes with the shipped
        # model; rotated names under vertical bars were cut)
        n = len(table["class"])
        bars = hv.Bars(table, "class", ["probability", "threshold", "color"]).opts(
            color="color", ylim=(0, 1.05), invert_axes=True, tools=["hover"], line_color="#555555"
        )
        marks = hv.Scatter(table, "class", "threshold").opts(
            marker="dash",
            angle=90,  # degrees: a vertical tick across the horizontal bar
            size=max(8, min(22, 300 // max(n, 1))),
            color="black",
            line_width=2,
            invert_axes=True,
        )
        return (bars * marks).opts(
            hv.opts.Overlay(
                title=title,
                width=560,
                height=max(200, 60 + 15 * n),
                show_legend=False,
                framewise=True,
                fontsize={"yticks": "8pt" if n > 12 else "9pt", "title": "10pt"},
            )
        )

    def _probability_table(self) -> tuple[str, dict[str, Any]]:
        """Title and columns (class, probability, threshold, bar color) of the class-probability bars."""
        if self.region is not None:
            prob = np.asarray(self._maps.probability, dtype=float)[self.region].mean(axis=0)
            title = "Mean class probability in the region"
        else:
            r, c = self.pixel
            prob = np.asarray(self._maps.probability[r, c], dtype=float)
            title = f"Class probabilities at pixel (row {r}, col {c})"
            if bool(np.asarray(self._maps.mask)[r, c]):
                title += " (invalid pixel)"
            elif float(np.asarray(self._maps.ood_score[r, c], dtype=float)) > float(self._maps.ood_threshold):
                title += "\nOUT OF DISTRIBUTION: these calls are unreliable"
        thr = self.threshold_array()
        colors = list(getattr(self._maps, "colors", None) or ["#888888"] * len(self.classes))
        table = {
            "class": list(self.classes),
            "probability": prob,
            "threshold": thr,
            "color": [colors[k] if prob[k] >= thr[k] else "#cccccc" for k in range(len(prob))],
        }
        return title, table

    def _patch_probability(self, events: Sequence[Any], plots: list[Any]) -> bool:
        """Write new thresholds (marks, bar colours) into the rendered probability bars; False if it cannot.

        The bars' classes and heights stay as they are (checked against the plot's data source), and
        so do the axes (the y range is fixed at 0 to 1.05).
        """
        if not all(e.name == "thresholds" for e in events) or self._probability_kind() != "Overlay":
            return False
        _, table = self._probability_table()
        targets = []
        for plot in plots:
            sources = [sub.handles.get("source") for sub in getattr(plot, "subplots", {}).values()]
            bars = [s for s in sources if s is not None and {"color", "probability"} <= set(s.data)]
            marks = [s for s in sources if s is not None and "color" not in s.data and "threshold" in s.data]
            if len(bars) != 1 or len(marks) != 1:
                return False
            for src in (bars[0], marks[0]):
                if list(src.data["class"]) != table["class"]:
                    return False
            if not np.array_equal(np.asarray(bars[0].data["probability"], float), table["probability"]):
                return False
            targets.append((plot, bars[0], marks[0]))

        def write(bar_source: Any, mark_source: Any) -> None:
            bar_source.data.update(threshold=table["threshold"], color=table["color"])
            mark_source.data["threshold"] = table["threshold"]

        for plot, bar_source, mark_source in targets:
            _write_to_plot(plot, functools.partial(write, bar_source, mark_source))
        return True

    def ood_summary(self) -> dict[str, Any] | None:
        """How much of the scan, and whether the selection, is out of distribution (OOD).

        Returns
        -------
        dict or None
            None without maps. Otherwise ``n_valid``, ``n_ood`` (valid pixels with ``ood_score >
            ood_threshold``), ``fraction`` (n_ood / n_valid), ``threshold``, and for the selection
            ``pixel_score`` (float, NaN for an invalid pixel) and ``pixel_ood`` (bool) when a pixel is
            selected, ``region_fraction`` when a region is.
        """
        if self._maps is None:
            return None
        ood = np.asarray(self._maps.ood(), dtype=bool)
        valid = self._valid()
        n_valid = int(valid.sum())
        n_ood = int((ood & valid).sum())
        out: dict[str, Any] = {
            "n_valid": n_valid,
            "n_ood": n_ood,
            "fraction": n_ood / n_valid if n_valid else 0.0,
            "threshold": float(self._maps.ood_threshold),
        }
        if self.pixel is not None:
            r, c = self.pixel
            out["pixel_score"] = float(np.asarray(self._maps.ood_score[r, c], dtype=float))
            out["pixel_ood"] = bool(ood[r, c] and valid[r, c])
        elif self.region is not None:
            inside = self.region & valid
            out["region_fraction"] = float((ood & inside).sum() / max(int(inside.sum()), 1))
        return out

    def _update_ood_alert(self) -> None:
        """The out-of-distribution banner: the scan's share of OOD pixels and whether the selection is."""
        summary = self.ood_summary()
        if summary is None or (summary["n_ood"] == 0):
            self._ood_alert.visible = False
            self._ood_alert.object = ""
            return
        thr = summary["threshold"]
        n_ood, n_valid = summary["n_ood"], summary["n_valid"]
        parts = []
        if summary.get("pixel_ood"):
            parts.append(
                f"**The selected pixel is out of distribution** (OOD score {summary['pixel_score']:.2f}, "
                f"above {thr:.2f}): its spectrum is unlike the simulated paintings the model was trained "
                "on, so its pigment calls are **not reliable**."
            )
        elif "region_fraction" in summary and summary["region_fraction"] > 0:
            parts.append(
                f"**{100 * summary['region_fraction']:.0f} % of the selected region is out of "
                "distribution**: treat its pigment calls with caution."
            )
        share = "All" if n_ood == n_valid else f"{100 * summary['fraction']:.1f} %"
        parts.append(
            f"Out of distribution: {share} of this scan's pixels ({n_ood} of {n_valid}; OOD score above "
            f"{thr:.2f}). Pigment calls on those pixels are unreliable; the *OOD score* view shows where."
        )
        self._ood_alert.object = " ".join(parts)
        self._ood_alert.alert_type = "danger" if summary.get("pixel_ood") or n_ood == n_valid else "warning"
        self._ood_alert.visible = True

    def _on_pixel_region(self, *events: Any) -> None:
        if any(e.name in ("pixel", "region") for e in events):
            self._move_pixel_marker()
        self._update_ood_alert()
        if self.single_spectrum:
            self._update_calls()
        if self._maps is None or self.region is None:
            self._fractions.object = ""
        else:
            fr = self.area_fractions(self.region)
            lines = ["| pigment | area fraction |", "|---|---|"]
            lines += [f"| {c} | {100 * v:.1f} % |" for c, v in sorted(fr.items(), key=lambda kv: -kv[1])]
            self._fractions.object = "**Pigment area fractions in the selected region**\n\n" + "\n".join(
                lines
            )
        if self.pixel is not None and self._scan is not None:
            r, c = self.pixel
            text = f"Selected: pixel (row {r}, col {c}), {self._total[r, c]:.0f} counts"
            if self._maps is not None:
                present = [
                    cl
                    for k, cl in enumerate(self.classes)
                    if self._maps.probability[r, c, k] >= self.thresholds[cl]
                ]
                text += "; pigments: " + (", ".join(present) if present else "none above threshold")
                score = float(self._maps.ood_score[r, c])
                text += f"; OOD score {score:.2f}"
                if score > float(self._maps.ood_threshold):
                    text += f" (**out of distribution**: above {float(self._maps.ood_threshold):.2f})"
            self._info.object = text
        elif self.region is not None:
            self._info.object = f"Selected: region of {int(self.region.sum())} pixels"

    # -- legend -----------------------------------------------------------------------------------
    def legend_entries(self) -> list[tuple[str, str]]:
        """``(colour '#rrggbb', text)`` of the main map's legend, in display order.

        Composite: each class present somewhere (area at the current thresholds, largest first) in its
        display colour, then "no pigment above threshold" and "invalid pixel"; surface vs buried: its
        three categories; pigment and OOD views: the colours below the colour bar's range.
        """
        if self._scan is None:
            return []
        invalid = (_INVALID_COLOR, "invalid pixel (masked)")
        view = self.view
        if self._maps is None or view in ("Total counts", "Elements"):
            return []
        if view == "Composite":
            colors = list(getattr(self._maps, "colors", None) or ["#888888"] * len(self.classes))
            fractions = self._legend_fractions()
            present = sorted((k for k, f in enumerate(fractions) if f > 0), key=lambda k: -fractions[k])
            entries = [(colors[k], f"{self.classes[k]} ({_percent(fractions[k])})") for k in present]
            entries.append(("#000000", "no pigment above its threshold"))
            if len(present) > 1:
                entries.append(("", "pixels holding several pigments show their colours blended"))
            return [*entries, invalid]
        if view == "Surface vs buried":
            absent, surface, buried = _SURFACE_BURIED_COLORS
            return [
                (surface, f"{self.focus} at the surface"),
                (buried, f"{self.focus} buried only (under another layer)"),
                (absent, f"no {self.focus} (below its threshold {self.thresholds.get(self.focus, 0):.2f})"),
                invalid,
            ]
        if view == "Pigment":
            thr = self.thresholds.get(self.focus, 0.0)
            return [(_ABSENT_COLOR, f"{self.focus} below its threshold {thr:.2f}"), invalid]
        if view == "OOD score":
            return [("", f"out of distribution above {float(self._maps.ood_threshold):.2f}"), invalid]
        return []

    def _legend_fractions(self) -> list[float]:
        """Area fraction per class at the current thresholds (on at most ~256 x 256 sampled pixels)."""
        rows, cols = self._maps.probability.shape[:2]
        stride = _stride(rows, cols, 256)
        prob = np.asarray(self._maps.probability[::stride, ::stride], dtype=float)
        valid = self._valid()[::stride, ::stride]
        n = max(int(valid.sum()), 1)
        with np.errstate(invalid="ignore"):
            present = prob >= self.threshold_array()
        return [float((present[..., k] & valid).sum() / n) for k in range(len(self.classes))]

    def _update_legend(self, *events: Any) -> None:
        entries = self.legend_entries()
        items = []
        for color, text in entries:
            swatch = (
                f'<span style="display:inline-block;width:14px;height:14px;background:{color};'
                f'border:1px solid #888;vertical-align:middle;margin-right:4px"></span>'
                if color
                else ""
            )
            items.append(f'<span style="margin-right:14px;white-space:nowrap">{swatch}{_html(text)}</span>')
        self._legend.object = (
            '<div style="font-size:12px;line-height:1.7">' + " ".join(items) + "</div>" if items else ""
        )

    # -- export -----------------------------------------------------------------------------------
    def map_rgba(self) -> tuple[np.ndarray, tuple[tuple[str, ...], float, float, str] | None]:
        """The main map as drawn and its colour bar.

        Returns RGBA (rows, cols, 4) uint8 (invalid pixels dark grey, values below the colour range in
        the 'absent' light grey) and ``(palette, low, high, label)``, or None for categorical and
        composite maps (they have a legend instead).
        """
        kind, arr = self.main_array()
        if kind == "rgb":
            rgba = np.concatenate([arr, np.full((*arr.shape[:2], 1), 255, np.uint8)], axis=-1)
            return rgba, None
        if self.view == "Surface vs buried":
            rgba = _colorize(arr, _SURFACE_BURIED_COLORS, 0.0, 2.0)
            rgba[rgba[..., 3] == 0] = (*_hex_rgb(_INVALID_COLOR), 255)
            return rgba, None
        finite = arr[np.isfinite(arr)]
        if self.view == "Pigment":
            lo, hi = _pigment_clim(self.thresholds[self.focus])
        elif self.view == "OOD score":
            lo = 0.0
            hi = float(max(finite.max() if finite.size else 1.0, float(self._maps.ood_threshold) * 1.5))
        else:
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        palette = PALETTES[self.cmap]
        rgba = _colorize(arr, palette, lo, hi, below=_ABSENT_COLOR)
        rgba[rgba[..., 3] == 0] = (*_hex_rgb(_INVALID_COLOR), 255)  # invalid pixels, as on screen
        return rgba, (palette, lo, hi, self._colorbar_label())

    def export_png(self) -> bytes:
        """The main map as a PNG figure for a report: title, the map (small maps upscaled), its legend
        or colour bar, and a scale bar when the pixel size is known.

        The PNG's text chunks hold ``Title``, ``Description`` (the legend), ``Source`` (the scan) and
        ``xrfnb:map_box`` ("left,top,width,height" of the map in the image, pixels) with
        ``xrfnb:upscale`` (image pixels per scan pixel).
        """
        rgba, colorbar = self.map_rgba()
        mm, _ = self.map_scale()
        return _figure_png(
            rgba,
            title=f"{self._main_title()}: {self._label}",
            legend=self.legend_entries(),
            colorbar=colorbar,
            mm_per_px=mm if self.map_scale()[1][0].endswith("(mm)") else None,
            source=self._label,
        )

    def _require_maps(self) -> Any:
        if self._maps is None:
            raise DataError("no pigment maps to export: open a scan with a trained model first")
        return self._maps

    def export_hdf5(self) -> bytes:
        """The pigment maps (with the current thresholds) as HDF5 bytes (``PigmentMaps.to_hdf5``)."""
        maps = self._with_current_thresholds(self._require_maps())
        with tempfile.TemporaryDirectory(prefix="xrfnb-export-") as tmp:
            path = Path(tmp) / "pigment_maps.h5"
            maps.to_hdf5(path)
            return path.read_bytes()

    def export_tiff(self) -> bytes:
        """The pigment maps as TIFF files (``PigmentMaps.to_tiff``) in a zip archive."""
        maps = self._with_current_thresholds(self._require_maps())
        with tempfile.TemporaryDirectory(prefix="xrfnb-export-") as tmp:
            folder = Path(tmp) / "tiff"
            folder.mkdir()
            maps.to_tiff(folder)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(folder.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(folder).as_posix())
            return buf.getvalue()

    def export_report(self) -> bytes:
        """The report for the conservation file (:func:`xrfnb.write_report`) as self-contained HTML bytes:
        the maps with the session's current thresholds, the open scan's provenance and the instrument
        the session simulates and fits with (the scan's, else the Bruker M6 preset)."""
        maps = self._require_maps()
        write_report = _xrfnb_attr("write_report")
        if write_report is None:
            raise DataError("reports are not available in this installation of xrfnb")
        with tempfile.TemporaryDirectory(prefix="xrfnb-export-") as tmp:
            path = Path(tmp) / "pigment_report.html"
            write_report(
                maps,
                path,
                scan=self._scan,
                title=f"Pigment maps of {self._label}",
                thresholds=dict(self.thresholds),
                instrument=self._instrument(),
            )
            return path.read_bytes()

    def _with_current_thresholds(self, maps: Any) -> Any:
        import dataclasses

        if dataclasses.is_dataclass(maps) and any(f.name == "thresholds" for f in dataclasses.fields(maps)):
            return dataclasses.replace(maps, thresholds=self.threshold_array().astype(np.float32))
        return maps

    def export_spectrum_csv(self) -> bytes:
        """The shown spectrum (pixel or region mean) as CSV: energy_keV, counts."""
        label, energy, counts = self.current_spectrum()
        buf = io.StringIO()
        buf.write(f"# xrfnb spectrum of {label} from {self._label}\n")
        buf.write("energy_keV,counts\n")
        for e, c in zip(energy, counts, strict=True):
            buf.write(f"{e:.6f},{c:.6g}\n")
        return buf.getvalue().encode()

    def __del__(self) -> None:
        if getattr(self, "_upload_dir", None) is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)


class _SwitchingPlot:
    """A HoloViews pane whose DynamicMap is replaced when the element type it must show changes.

    A DynamicMap must return one element type, and a Bokeh axis cannot change between linear and log in
    place; ``kind()`` names what is needed now and a new DynamicMap is made when that changes. Between
    the parameter change and the swap, the old DynamicMap repeats its last element.

    ``patch(events, plots)``, when given, may write a change straight into the Bokeh models of the
    rendered ``plots`` (HoloViews element plots, one per document the pane is shown in) and return True;
    it returns False, having changed nothing, when it cannot (the plot must then be refreshed).
    """

    def __init__(
        self,
        owner: Dashboard,
        element: Callable[[], hv.Element],
        kind: Callable[[], str],
        params: list[str],
        css_classes: list[str] | None = None,
        on_new: Callable[[hv.DynamicMap], None] | None = None,
        unchanged: Callable[[Sequence[Any]], bool] | None = None,
        patch: Callable[[Sequence[Any], list[Any]], bool] | None = None,
    ) -> None:
        self._owner, self._element, self._kind_fn, self._params = owner, element, kind, params
        self._on_new = on_new
        self._unchanged = unchanged
        self._patch = patch
        self.kind: str | None = None
        self.dmap: hv.DynamicMap | None = None
        self._refresh: streams.Stream | None = None
        self._last: dict[int, hv.Element] = {}
        self.pane = pn.pane.HoloViews(None, css_classes=css_classes or [], linked_axes=False)
        owner.param.watch(self.sync, params)
        self.sync()

    def plots(self) -> list[Any]:
        """The HoloViews plots of the current DynamicMap, one per rendered root (document)."""
        return _rendered_plots(self.pane)

    def sync(self, *events: Any) -> None:
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
            self._owner._hold_documents()
            self._refresh.event(version=self._refresh.version + 1)
            return
        self._owner._hold_documents()
        self.kind = kind
        self._refresh = _Refresh(version=0)
        dmap = hv.DynamicMap(functools.partial(self._call, kind), streams=[self._refresh])
        self.dmap = dmap
        if self._on_new is not None:
            self._on_new(dmap)
        self.pane.object = dmap

    def _call(self, kind: str, **kwargs: Any) -> hv.Element:
        element = self._element()
        key = kind
        base = type(element).__name__
        if base == kind.split("-")[0] and kind == self._kind_fn():
            self._last[key] = element
            return element
        # a stale DynamicMap about to be replaced: repeat its last element (same type)
        return self._last.get(key, element)


def _rendered_plots(pane: pn.pane.HoloViews) -> list[Any]:
    """The HoloViews plots Panel made of ``pane``'s object, one per rendered root (document)."""
    return [plot for plot, _ in list(getattr(pane, "_plots", {}).values())]


def _rgba_u32(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) uint8 RGB as the (rows, cols) uint32 RGBA image Bokeh's ``ImageRGBA`` draws.

    The layout HoloViews' ``RGBPlot`` writes for an opaque image: alpha 255, one uint32 per pixel; row 0
    first (the ``hv.RGB`` of :func:`_rgb` holds the array upside down and HoloViews flips it back).
    """
    rows, cols = rgb.shape[:2]
    rgba = np.empty((rows, cols, 4), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return rgba.view(np.uint32).reshape(rows, cols)


def _write_to_plot(plot: Any, write: Callable[[], None]) -> None:
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


_Refresh = streams.Stream.define("Refresh", version=0)


def _name_hook(name: str) -> Callable[[Any, Any], None]:
    def hook(plot: Any, element: Any) -> None:
        plot.state.name = name

    return hook


def _weak_hook(method: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A plot hook calling a Dashboard's bound ``method`` without keeping the Dashboard alive.

    HoloViews keeps plot options in a process-wide registry (``Store._custom_options``) until the
    element dies, and the Dashboard holds its elements: a bound method there kept every closed browser
    session's Dashboard, with its scan and maps, for the life of the server.
    """
    ref = weakref.WeakMethod(method)

    def hook(plot: Any, element: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(plot, element)

    return hook


def _reraise_for_user(exc: BaseException, what: str) -> None:
    """Raise a worker's exception in the session: XRFNBError and MemoryError as they are (the guard
    words them), anything else logged with its traceback and raised as an XRFNBError saying ``what``."""
    if isinstance(exc, XRFNBError):
        raise exc
    if isinstance(exc, MemoryError):
        raise MemoryError
    log.error("%s", what, exc_info=exc)
    raise XRFNBError(f"{what} ({type(exc).__name__}: {exc}); see the server log")


class _Cancelled(Exception):
    """Raised from the progress callback to stop a mapping job nobody waits for any more."""


def _map_with_progress(
    scan: Scan, model: Any, job: dict[str, Any], *, chunk_pixels: int = 16384, element_maps: bool = True
) -> Any:
    """Pigment maps of ``scan`` with :func:`xrfnb.map_pigments`, reporting progress in ``job``.

    ``job["done"]`` and ``job["total"]`` (pixels) follow map_pigments' progress callback, block by block;
    setting ``job["cancel"]`` stops the run after the current block (:class:`_Cancelled`). Element maps
    (:func:`xrfnb.fit_elements`) follow as a second stage (``job["stage"]``); a failing element fit is
    reported in ``job["warning"]`` and leaves ``element_maps`` None.
    """
    map_pigments = _xrfnb_attr("map_pigments")
    if map_pigments is None:
        raise ModelError("pigment mapping is not available in this installation of xrfnb")
    rows, cols, _ = scan.shape
    job["total"] = rows * cols
    job["stage"] = "pigment maps"

    def report(done: int, total: int) -> None:
        job["done"], job["total"] = int(done), max(1, int(total))
        if job.get("cancel"):
            raise _Cancelled

    maps = map_pigments(scan, model, chunk_pixels=chunk_pixels, progress=report)
    fit_elements = _xrfnb_attr("fit_elements") if element_maps else None
    if fit_elements is None:
        return maps
    job["stage"] = "element maps"
    try:
        instrument_cls = _xrfnb_attr("Instrument")
        inst = instrument_cls.preset(str(scan.metadata.get("instrument") or "bruker-m6"))
        em = fit_elements(scan, inst)
    except XRFNBError as exc:
        job["warning"] = f"element maps could not be fitted: {exc}"
        return maps
    return dataclasses.replace(maps, element_maps=em)


# --------------------------------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------------------------------
def _serve_target(path: str | os.PathLike[str] | None) -> tuple[Path | None, str | None]:
    """(served data folder, file to open first) for ``xrfnb serve [FILE_OR_DIR]``."""
    if path is None:
        return None, None
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        return p, None
    if p.is_file():
        return p.parent, p.name
    raise DataError(f"cannot serve {path}: no such file or folder")


def make_app(
    data_dir: Path | None = None, initial: str | None = None, max_upload_mb: float = 256.0
) -> Dashboard:
    """A new :class:`Dashboard` for one browser session (opens ``initial`` or the demo scene)."""
    dash = Dashboard(data_dir, max_upload_mb=max_upload_mb)
    if initial is not None:
        dash.source = initial
    elif data_dir is None and DEMO_LABEL in dash.param.source.objects:
        dash.source = DEMO_LABEL
    return dash


def _exception_handler(exc: Exception) -> None:
    log.error("unhandled dashboard error", exc_info=exc)
    notifications = getattr(pn.state, "notifications", None)
    if notifications is not None:
        msg = str(exc) if isinstance(exc, XRFNBError) else f"internal error ({type(exc).__name__}: {exc})"
        notifications.error(msg, duration=10000)


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (host name or IP) binds only this machine's loopback interface."""
    import ipaddress

    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    path: str | os.PathLike[str] | None = None,
    port: int = 5006,
    address: str = "127.0.0.1",
    show: bool = False,
    *,
    max_upload_mb: float = 256.0,
    threaded: bool = False,
    basic_auth: str | os.PathLike[str] | dict[str, str] | None = None,
    token: str | bool | None = None,
) -> Any:
    """Serve the dashboard with Bokeh/Panel, one independent :class:`Dashboard` per browser session.

    Parameters
    ----------
    path : path-like, optional
        A scan file (its folder is served and it opens first) or a data folder. None: the demo scene.
    port : int, optional
        TCP port.
    address : str, optional
        Interface to bind; loopback unless told otherwise. Any other address (``"0.0.0.0"``: every
        interface) lets anyone who can reach this machine read the served folder: a warning says so,
        and ``basic_auth`` or ``token`` should protect it.
    show : bool, optional
        Open a browser tab.
    max_upload_mb : float, optional
        Largest accepted upload in MiB (enforced on the server as the bytes arrive).
    threaded : bool, optional
        Run the server in a background thread and return it (``.stop()`` ends it); otherwise block.
    basic_auth : str, path-like or dict, optional
        Require a log-in (Panel's basic-auth provider, a ``/login`` page and a signed cookie): a
        password (any user name), a ``{user: password}`` mapping, or the path of a JSON file holding one.
    token : str or True, optional
        Require a shared secret as the password on the ``/login`` page (any user name); ``True`` makes a
        random one and logs it, for handing to colleagues. Cannot be combined with ``basic_auth``.

    Returns
    -------
    object
        The Panel server (or its thread when ``threaded``).

    Raises
    ------
    DataError
        ``path`` does not exist; both ``basic_auth`` and ``token``; an empty password or token; a
        ``basic_auth`` file that does not exist.
    """
    data_dir, initial = _serve_target(path)
    auth = _auth_setting(basic_auth, token)
    log.info("xrfnb dashboard on http://%s:%s (data folder: %s)", address, port, data_dir)
    if not _is_loopback(address):
        where = f"the served folder {data_dir}" if data_dir is not None else "the demo scene and uploads"
        log.warning(
            "serving on %s: anyone who can reach this machine on port %s can open %s%s",
            address,
            port,
            where,
            " (a log-in is required)" if auth is not None else "; give a password or token for a log-in",
        )

    def app() -> Dashboard:
        # a plain function: Panel calls functions and methods once per session, but renders any other
        # callable (a functools.partial) as its repr text
        return make_app(data_dir, initial, max_upload_mb)

    return serve_app(app, port=port, address=address, show=show, threaded=threaded, basic_auth=auth)


def _auth_setting(
    basic_auth: str | os.PathLike[str] | dict[str, str] | None, token: str | bool | None
) -> str | dict[str, str] | None:
    """What Panel's ``basic_auth`` option gets for :func:`serve`'s ``basic_auth`` and ``token``."""
    if basic_auth is not None and token not in (None, False):
        raise DataError("pass either a password (basic_auth) or a token, not both")
    if token is True:
        import secrets

        token = secrets.token_urlsafe(16)
        log.warning("log-in token for this dashboard (any user name): %s", token)
    if isinstance(token, str):
        if not token.strip():
            raise DataError("the dashboard token is empty: give a non-empty secret, or True for a random one")
        return token
    if basic_auth is None:
        return None
    if isinstance(basic_auth, dict):
        if not basic_auth or not all(isinstance(v, str) and v for v in basic_auth.values()):
            raise DataError("basic_auth: give a {user: password} mapping with non-empty passwords")
        return {str(k): v for k, v in basic_auth.items()}
    text = os.fspath(basic_auth)
    if not text:
        raise DataError("basic_auth: the password is empty")
    looks_like_file = isinstance(basic_auth, os.PathLike) or text.lower().endswith(".json")
    if looks_like_file:
        p = Path(text).expanduser()
        if not p.is_file():
            raise DataError(f"basic_auth: the credentials file {p} does not exist")
        return str(p.resolve())
    return text


#: log-in page for basic auth / token (Panel's own loads its logo and icon from a CDN)
_LOGIN_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>xrfnb: log in</title>
<link rel="icon" href="data:,">
<style>body{font-family:sans-serif;background:#f4f4f4;display:flex;justify-content:center;margin-top:12vh}
form{background:#fff;padding:2em 2.5em;border-radius:6px;box-shadow:0 1px 4px #0003;width:20em}
input,button{display:block;width:100%;margin:.6em 0;padding:.5em;box-sizing:border-box;font-size:1em}
.err{color:#b00020;font-weight:bold}</style></head>
<body><form action=".{{ login_endpoint }}" method="post">
<h2>xrfnb dashboard</h2><p>Log in with the user name and password (or token) you were given.</p>
<p class="err">{{ errormessage|escape }}</p>
<input name="username" type="text" autocapitalize="off" autocorrect="off" placeholder="user name">
<input name="password" type="password" placeholder="password or token">
<button type="submit">Log in</button></form></body></html>
"""


def serve_app(
    factory: Callable[[], Any],
    *,
    port: int,
    address: str = "127.0.0.1",
    show: bool = False,
    threaded: bool = False,
    basic_auth: str | dict[str, str] | None = None,
) -> Any:
    """Serve ``factory()`` (called once per browser session) with local resources and error notifications.

    ``factory`` must be a plain function or method: Panel renders any other callable as text.
    ``basic_auth`` (a password, a ``{user: password}`` mapping or a JSON file of one) turns on Panel's
    basic-auth provider: every page and websocket then needs the signed cookie ``/login`` sets.
    """
    if not (inspect.isfunction(factory) or inspect.ismethod(factory)):
        raise TypeError(f"serve_app needs a plain function or method, not {type(factory).__name__}")
    _ensure_extensions()
    pn.config.exception_handler = _exception_handler
    hosts = {address, "localhost", "127.0.0.1"}
    if not _is_loopback(address):  # other machines reach it under this machine's names and addresses
        import socket

        with contextlib.suppress(OSError):
            name, aliases, ips = socket.gethostbyname_ex(socket.gethostname())
            hosts |= {name, socket.getfqdn(), *aliases, *ips}
    origins = sorted(f"{h}:{port}" for h in hosts if h)
    auth: dict[str, Any] = {}
    if basic_auth is not None:
        import secrets

        # a fresh secret per server signs the log-in cookie (Panel needs one for basic auth)
        template = Path(tempfile.mkdtemp(prefix="xrfnb-login-")) / "login.html"
        template.write_text(_LOGIN_TEMPLATE, encoding="utf-8")
        auth = {
            "basic_auth": basic_auth,
            "cookie_secret": secrets.token_hex(32),
            "basic_login_template": str(template),
        }
    return pn.serve(
        factory,
        port=port,
        address=address,
        show=show,
        threaded=threaded,
        title="xrfnb",
        websocket_origin=origins,
        websocket_max_message_size=16 * 2**20,
        start=True,
        **auth,
    )
