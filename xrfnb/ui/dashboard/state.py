"""The dashboard's state: its parameters (what a user sets), the open scan and maps, and the selection.

:class:`DashboardState` is the part of the :class:`~xrfnb.ui.dashboard.app.Dashboard` that holds data
and answers questions about it (thresholds, present classes, the selected spectrum, the map's axes);
the panels (:mod:`.maps`, :mod:`.spectrum`, ...) draw it and the Dashboard composes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
from typing import TYPE_CHECKING

import numpy as np
import panel as pn
import param

from ..._errors import DataError
from ...core.calls import is_buried, is_present
from ...core.spectrum import Scan
from .bokeh import DocumentHold
from .calibration import looks_uncalibrated
from .common import NO_MODEL, NO_SCAN, PALETTES, VIEWS, micro

if TYPE_CHECKING:  # pragma: no cover
    from ...maps.pigmentmaps import PigmentMaps
    from ...model.model import PigmentModel

__all__ = ["MAX_REGIONS", "REGION_COLORS", "DashboardState", "KeptRegion"]

#: colours of kept regions, in order (Category10 without the red of the simulated spectrum)
REGION_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#393b79",
)
#: at most this many regions are kept at once (one colour each)
MAX_REGIONS = len(REGION_COLORS)


@dataclasses.dataclass(frozen=True, eq=False)
class KeptRegion:
    """A region of the open scan kept to compare its spectrum with others'.

    Attributes
    ----------
    name : str
        "Region 1", "Region 2", ... (numbers are not reused while the scan is open).
    mask : numpy.ndarray
        Its pixels, (rows, cols) bool.
    color : str
        Its colour ('#rrggbb') on the map and in the spectra.
    summed_counts : numpy.ndarray
        The sum of its pixels' spectra, (channels,) float64.
    """

    name: str
    mask: np.ndarray
    color: str
    summed_counts: np.ndarray

    @property
    def n_pixels(self) -> int:
        """How many pixels it holds."""
        return int(self.mask.sum())

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(first row, last row, first column, last column)`` of its bounding box (inclusive)."""
        rr = np.flatnonzero(self.mask.any(axis=1))
        cc = np.flatnonzero(self.mask.any(axis=0))
        return int(rr[0]), int(rr[-1]), int(cc[0]), int(cc[-1])

    def counts(self, stat: str) -> np.ndarray:
        """Its spectrum: ``"mean"`` counts per pixel or ``"sum"`` of its pixels, (channels,) float64."""
        return self.summed_counts / self.n_pixels if stat == "mean" else self.summed_counts

    def describe(self, mm_per_px: float | None = None) -> str:
        """'Region 1: 120 pixels, rows 3-12, columns 5-16' (and its box in mm when the pixel size is
        known)."""
        r0, r1, c0, c1 = self.bounds
        n = self.n_pixels
        text = f"{self.name}: {n} pixel{'s' if n != 1 else ''}, rows {r0}-{r1}, columns {c0}-{c1}"
        if mm_per_px:
            text += (
                f" (x {c0 * mm_per_px:g}-{(c1 + 1) * mm_per_px:g} mm, y {r0 * mm_per_px:g}-"
                f"{(r1 + 1) * mm_per_px:g} mm)"
            )
        return text


class DashboardState(pn.viewable.Viewer):
    """Parameters, data and selection of a dashboard session (see :class:`~xrfnb.ui.dashboard.Dashboard`).

    Every control is a ``param`` parameter, so the state can be driven from Python (tests, notebooks)
    exactly as a user drives it in the browser.
    """

    source = param.Selector(default=NO_SCAN, objects=[NO_SCAN], doc="Scan to open (served folder or demo)")
    model_name = param.Selector(default=NO_MODEL, objects=[NO_MODEL], doc="Trained model")
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
    kept_regions = param.List(default=[], item_type=KeptRegion, doc="Regions kept to compare their spectra")
    region_stat = param.Selector(
        default="mean", objects=["mean", "sum"], doc="Kept regions' spectra: mean counts per pixel, or sum"
    )
    data_version = param.Integer(default=0, precedence=-1, doc="Bumped whenever scan or maps change")
    busy = param.Boolean(default=False, precedence=-1)
    progress = param.Integer(default=0, bounds=(0, 100), precedence=-1)

    def __init__(self, model: PigmentModel | None = None, **params: object) -> None:
        self._model_obj = model
        self._scan: Scan | None = None
        self._maps: PigmentMaps | None = None
        self._total: np.ndarray | None = None
        self._energy_keV: np.ndarray | None = None
        self._label = ""
        self._region_number = 0
        self._hold = DocumentHold()
        super().__init__(**params)

    # -- data -------------------------------------------------------------------------------------
    @property
    def scan(self) -> Scan | None:
        """The scan shown, or None."""
        return self._scan

    @property
    def maps(self) -> PigmentMaps | None:
        """The pigment maps shown, or None when no model result exists."""
        return self._maps

    @property
    def model_obj(self) -> PigmentModel | None:
        """The model object given to the dashboard (instead of one chosen by name), or None."""
        return self._model_obj

    @property
    def label(self) -> str:
        """The open scan's name as the user knows it (file, upload or demo)."""
        return self._label

    @property
    def total_counts(self) -> np.ndarray | None:
        """Total counts per pixel of the open scan, (rows, cols) float, or None."""
        return self._total

    @property
    def classes(self) -> tuple[str, ...]:
        """Pigment classes of the maps shown (empty without maps)."""
        return tuple(self._maps.classes) if self._maps is not None else ()

    @property
    def single_spectrum(self) -> bool:
        """Whether the open scan is one spectrum (1 x 1): shown as a spectrum with its calls, no maps."""
        return self._scan is not None and tuple(self._scan.shape[:2]) == (1, 1)

    def forget_model_obj(self) -> None:
        """Drop the model object given to the dashboard: models are chosen by name from now on."""
        self._model_obj = None

    def model_available(self) -> bool:
        """Whether pigment maps can be computed (a model object was given or one can be chosen)."""
        return self._model_obj is not None or self.model_name != NO_MODEL

    def needs_calibration(self) -> bool:
        """Whether the open scan has no usable energy calibration (the model refuses it)."""
        return self._scan is not None and looks_uncalibrated(self._scan)

    def valid(self) -> np.ndarray:
        """Valid (unmasked) pixels of the maps, (rows, cols) bool."""
        return ~np.asarray(self._maps.mask, dtype=bool)

    # -- one user action ---------------------------------------------------------------------------
    @property
    def document_hold(self) -> DocumentHold:
        """The hold on the rendered documents during one user action (see :meth:`action`)."""
        return self._hold

    def action(self) -> contextlib.AbstractContextManager[None]:
        """A context for one user action: rendered documents re-walk their models at most once
        (:class:`~xrfnb.ui.dashboard.bokeh.DocumentHold`)."""
        return self._hold.action()

    def hold_documents(self) -> None:
        """Freeze the rendered documents until the current action ends (no-op outside an action)."""
        self._hold.hold()

    # -- thresholds -------------------------------------------------------------------------------
    def threshold_array(self) -> np.ndarray:
        """Current per-class thresholds as an array (K,) in the order of :attr:`classes`."""
        return np.array([float(self.thresholds[c]) for c in self.classes], dtype=float)

    def binary_maps(self) -> np.ndarray:
        """Present/absent maps at the current thresholds, shape (rows, cols, K) bool."""
        if self._maps is None:
            raise DataError("no pigment maps: open a scan and choose a trained model first")
        return np.asarray(self._maps.binary(self.threshold_array()), dtype=bool)

    def area_fractions(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """Fraction of valid pixels (inside ``mask`` (rows, cols) bool if given) where each class is
        present."""
        if self._maps is None:
            return {}
        valid = self.valid()
        if mask is not None:
            valid &= mask
        n = int(valid.sum())
        binary = self.binary_maps()
        return {c: (float(binary[..., k][valid].mean()) if n else 0.0) for k, c in enumerate(self.classes)}

    def set_threshold(self, cls: str, value: float) -> None:
        """Set the threshold of one pigment class (maps update without re-running the model)."""
        if cls not in self.thresholds:
            raise DataError(f"unknown pigment class {cls!r}; classes are {', '.join(self.classes)}")
        if not 0.0 <= value <= 1.0:
            raise DataError(f"threshold must lie in [0, 1], got {value}")
        with self.action():
            self.thresholds = {**self.thresholds, cls: float(value)}

    def selection_layers(self, thresholds: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """``(present (K,), buried (K,))`` bool of the selected pixel, or of the region's mean
        probabilities, under ``thresholds`` (the rule of :mod:`xrfnb.core.calls`)."""
        if self.region is not None:
            prob = np.nanmean(np.asarray(self._maps.probability[self.region], dtype=float), axis=0)
            bur = np.nanmean(np.asarray(self._maps.buried_probability[self.region], dtype=float), axis=0)
        else:
            r, c = self.pixel
            prob = np.asarray(self._maps.probability[r, c], dtype=float)
            bur = np.asarray(self._maps.buried_probability[r, c], dtype=float)
        thr = np.array([thresholds.get(c, np.nan) for c in self.classes], dtype=float)
        with np.errstate(invalid="ignore"):
            present = is_present(prob, thr)
            buried = present & is_buried(prob, bur)
        return present, buried

    # -- selection --------------------------------------------------------------------------------
    def select_pixel(self, row: int, col: int) -> None:
        """Show the spectrum and class probabilities of pixel (row, col)."""
        if self._scan is None:
            raise DataError("no scan open")
        rows, cols = self._scan.shape[:2]
        if not (0 <= row < rows and 0 <= col < cols):
            raise DataError(f"pixel ({row}, {col}) is outside the {rows} x {cols} scan")
        with self.action(), param.parameterized.batch_call_watchers(self):
            self.region = None
            self.pixel = (row, col)

    def select_region(self, mask: np.ndarray) -> None:
        """Show the mean spectrum and pigment area fractions of a region (bool mask (rows, cols))."""
        if self._scan is None:
            raise DataError("no scan open")
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self._scan.shape[:2]:
            raise DataError(f"region mask has shape {mask.shape}, expected {self._scan.shape[:2]}")
        if not mask.any():
            raise DataError("the selected region contains no pixel centre: select a larger area")
        with self.action(), param.parameterized.batch_call_watchers(self):
            self.pixel = None
            self.region = mask

    def region_sum(self, mask: np.ndarray) -> np.ndarray:
        """The sum of the spectra of the pixels of ``mask`` (rows, cols) bool, (channels,) float64
        (only the rows and columns of its bounding box are read)."""
        rr = np.flatnonzero(mask.any(axis=1))
        cc = np.flatnonzero(mask.any(axis=0))
        block = np.asarray(self._scan.counts[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1])
        sub = mask[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1]
        return block[sub].astype(np.float64).sum(axis=0)

    def current_spectrum(self) -> tuple[str, np.ndarray, np.ndarray]:
        """``(label, energy_keV (channels,), counts (channels,))`` of the tapped pixel or region mean."""
        if self._scan is None:
            raise DataError("no scan open")
        energy = self._energy_keV
        if self.region is not None:
            mask = self.region
            counts = self.region_sum(mask) / int(mask.sum())
            return f"mean of {int(mask.sum())} selected pixels", energy, counts
        if self.pixel is None:
            raise DataError("tap a pixel on the map to see its spectrum")
        r, c = self.pixel
        spec = self._scan[r, c]
        return f"pixel (row {r}, col {c})", energy, np.asarray(spec.counts, dtype=np.float64)

    # -- kept regions -----------------------------------------------------------------------------
    def keep_region(self) -> KeptRegion:
        """Keep the selected region (box or lasso) to compare its spectrum with other kept regions';
        returns it. At most :data:`MAX_REGIONS` at once; the same pixels are not kept twice."""
        if self._scan is None:
            raise DataError("no scan open")
        if self.region is None:
            raise DataError("select a region first: the box or lasso tool on the map")
        mask = np.array(self.region, dtype=bool)
        for kept in self.kept_regions:
            if np.array_equal(kept.mask, mask):
                raise DataError(f"these pixels are already kept as {kept.name}")
        if len(self.kept_regions) >= MAX_REGIONS:
            raise DataError(f"at most {MAX_REGIONS} regions can be kept: remove one first")
        used = {k.color for k in self.kept_regions}
        color = next(c for c in REGION_COLORS if c not in used)
        self._region_number += 1
        mask.flags.writeable = False
        kept = KeptRegion(f"Region {self._region_number}", mask, color, self.region_sum(mask))
        with self.action():
            self.kept_regions = [*self.kept_regions, kept]
        return kept

    def remove_region(self, name: str) -> None:
        """Forget the kept region called ``name``."""
        if name not in {k.name for k in self.kept_regions}:
            raise DataError(f"no kept region called {name!r}")
        with self.action():
            self.kept_regions = [k for k in self.kept_regions if k.name != name]

    def clear_regions(self) -> None:
        """Forget every kept region (a new scan forgets them too)."""
        self._region_number = 0
        if self.kept_regions:
            with self.action():
                self.kept_regions = []

    def present_elements(self) -> list[tuple[str, str | None]]:
        """``(element, family)`` of the elements detected at the pixel (or on half the region's pixels)
        by the element maps, for the spectrum's line markers."""
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

    def map_scale(self) -> tuple[float, tuple[str, str]]:
        """``(mm per pixel, (x label, y label))`` of the map axes: millimetres when the scan's pixel size
        is known, else ``(1.0, ("column", "row"))`` (pixel indices)."""
        px = getattr(self._scan, "pixel_size_um", None) if self._scan is not None else None
        if px:
            return float(px) / 1000.0, ("x (mm)", "y (mm)")
        return 1.0, ("column", "row")

    # -- descriptions -----------------------------------------------------------------------------
    def ood_summary(self) -> dict[str, float | int | bool] | None:
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
        valid = self.valid()
        n_valid = int(valid.sum())
        n_ood = int((ood & valid).sum())
        out: dict[str, float | int | bool] = {
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

    def scan_info_text(self) -> str:
        """Markdown about the open file: format, shape, pixel size, live time, energy calibration and
        its source, how the detector elements of a multi-element file were combined, and which instrument
        the session uses (the file's or preset's, or the one fitted to the scan)."""
        scan = self._scan
        if scan is None:
            return ""
        meta = scan.metadata
        rows, cols, channels = scan.shape
        fmt = meta.get("format")
        parts = [f"**File:** {html.escape(self._label, quote=False)}" + (f" ({fmt})" if fmt else "")]
        parts.append(f"{rows} x {cols} pixels x {channels} channels")
        if scan.pixel_size_um:
            parts.append(f"pixel {micro(f'{float(scan.pixel_size_um):g} um')}")
        live = scan.live_time_s
        if live is not None:
            value = float(np.mean(live)) if isinstance(live, np.ndarray) else float(live)
            parts.append(f"live time {value:.3g} s" + (" per pixel (mean)" if rows * cols > 1 else ""))
        cal = f"calibration {scan.calibration}"
        if meta.get("calibration_source"):
            cal += f" ({html.escape(str(meta['calibration_source']), quote=False)})"
        parts.append(cal)
        text = "; ".join(parts) + "."
        fitted = self.calibration_panel.instrument_text()
        if fitted:
            text += f"\n\n**Instrument:** {html.escape(fitted, quote=False)}."
        else:
            name = html.escape(str(meta.get("instrument") or "bruker-m6"), quote=False)
            text += f"\n\n**Instrument:** the file's or its preset ({name})."
        n_el = int(meta.get("n_elements") or 1)
        if n_el > 1:
            how = meta.get("sum_note") if meta.get("element") == "sum" else None
            how = how or f"element {meta.get('element')} shown alone"
            text += f"\n\n**Detector:** {n_el} detector elements, {html.escape(str(how), quote=False)}."
        return text
