"""Pigment maps of a scan (:class:`PigmentMaps`), their area summary (:class:`MapSummary`) and the codes
of masked pixels.

A :class:`PigmentMaps` holds its arrays in memory or reads them from an open HDF5 file row block by row
block; it writes itself to HDF5 (through :mod:`xrfnb.maps.storage`) and to ImageJ TIFFs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import DataError, FormatError
from ..core.calls import is_buried, is_present
from ..fitting.elements import ElementMaps
from ..io.atomic import atomic_path
from ..io.hdf5 import check_self_contained, preflight
from ..model.physics_check import DEFAULT_MARGIN, CallPattern
from ..physics.instrument import Instrument
from .storage import (
    MAPS_FORMAT,
    check_free_space,
    check_output_path,
    create_map_datasets,
    h5_writer,
    maps_file_bytes,
    read_element_maps,
    write_element_maps,
    write_error,
    write_header,
)

if TYPE_CHECKING:  # pragma: no cover
    import h5py

__all__ = [
    "MASK_DEAD",
    "MASK_INVALID",
    "MASK_OK",
    "MASK_REASONS",
    "MASK_SATURATED",
    "MapSummary",
    "PigmentMaps",
    "PixelCall",
    "read_call_patterns",
    "write_call_patterns",
]

#: reasons a pixel is masked (values of :attr:`PigmentMaps.mask_reason`)
MASK_OK, MASK_DEAD, MASK_SATURATED, MASK_INVALID = 0, 1, 2, 3
#: mask reason code -> name, for the masked codes (``MASK_OK`` is not a reason)
MASK_REASONS: dict[int, str] = {MASK_DEAD: "dead", MASK_SATURATED: "saturated", MASK_INVALID: "invalid"}

_MASKED_RGB = (128, 128, 128)


@dataclasses.dataclass(frozen=True)
class MapSummary(Mapping):
    """Area fractions of a pigment map; behaves as a mapping ``class name -> area fraction``.

    Pixels flagged out of distribution (unlike the training spectra: their calls are unreliable) are left
    out of ``area_fraction`` and ``buried_fraction``; what the model calls on them is in
    ``ood_area_fraction``.

    Attributes
    ----------
    area_fraction : dict
        Class -> fraction of the valid (unmasked), in-distribution pixels where the class is present
        (above threshold); 0 for every class when no pixel is in distribution.
    buried_fraction : dict
        Class -> fraction of those pixels where the class is present only below the surface layer.
    n_pixels : int
        All pixels of the scan.
    n_masked : int
        Masked pixels (dead, saturated or invalid); they are excluded from the fractions.
    masked_by_reason : dict
        ``{"dead": n, "saturated": n, "invalid": n}``.
    ood_fraction : float
        Fraction of valid pixels whose out-of-distribution score exceeds the model's threshold.
    n_ood : int
        Valid pixels flagged out of distribution.
    ood_area_fraction : dict
        Class -> fraction of the out-of-distribution pixels where the class is called present (unreliable
        calls, shown apart); empty when no pixel is flagged.
    """

    area_fraction: dict[str, float]
    buried_fraction: dict[str, float]
    n_pixels: int
    n_masked: int
    masked_by_reason: dict[str, int]
    ood_fraction: float
    n_ood: int = 0
    ood_area_fraction: dict[str, float] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.area_fraction[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.area_fraction)

    def __len__(self) -> int:
        return len(self.area_fraction)

    @property
    def n_valid(self) -> int:
        """Pixels that were identified (not masked)."""
        return self.n_pixels - self.n_masked

    def to_text(self) -> str:
        """A plain-text table, most abundant class first; out-of-distribution pixels are said first and
        their (unreliable) calls shown in a column of their own."""
        lines = []
        n_in = self.n_valid - self.n_ood
        if self.n_ood:
            lines.append(
                f"WARNING: {self.n_ood} of {self.n_valid} identified pixels "
                f"({100 * self.ood_fraction:.1f} %) are out of distribution (unlike the paintings the "
                "model was trained on): their pigment calls are unreliable and are left out of the area "
                "fractions"
                + (" (no pixel is in distribution)" if n_in == 0 else "")
            )
        ood_col = f" {'on OOD px %':>12}" if self.n_ood else ""
        lines.append(f"{'pigment class':<32} {'area %':>8} {'buried %':>9}{ood_col}")
        key = self.area_fraction if n_in else self.ood_area_fraction
        for name in sorted(self.area_fraction, key=lambda k: -key.get(k, 0.0)):
            row = f"{name:<32} {100 * self.area_fraction[name]:8.2f} {100 * self.buried_fraction[name]:9.2f}"
            if self.n_ood:
                row += f" {100 * self.ood_area_fraction.get(name, 0.0):12.2f}"
            lines.append(row)
        reasons = ", ".join(f"{k} {v}" for k, v in self.masked_by_reason.items())
        lines.append(f"pixels: {self.n_pixels}, masked: {self.n_masked} ({reasons})")
        lines.append(
            f"out-of-distribution: {self.n_ood} pixels, {100 * self.ood_fraction:.2f} % of valid pixels"
            + (" (area % counts the in-distribution pixels only)" if self.n_ood else "")
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _rows_of(arr: np.ndarray | h5py.Dataset, sl: slice) -> np.ndarray:
    return np.asarray(arr[sl])


def _row_blocks(n_rows: int, n_cols: int, per_block: int = 262144) -> Iterator[slice]:
    step = max(1, per_block // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))


@dataclasses.dataclass(frozen=True)
class PixelCall:
    """The call of one pigment class at one pixel (:meth:`PigmentMaps.calls_at`).

    Attributes
    ----------
    class_name : str
        The pigment class.
    probability : float
        P(present) at the pixel; NaN at a masked pixel.
    threshold : float
        The class's decision threshold.
    present : bool
        ``probability >= threshold``.
    buried : bool
        Present and more likely only below the surface (:func:`xrfnb.core.calls.is_buried`).
    """

    class_name: str
    probability: float
    threshold: float
    present: bool
    buried: bool

    @property
    def call(self) -> str:
        """``"surface"``, ``"buried"``, or ``""`` when the class is not present."""
        return ("buried" if self.buried else "surface") if self.present else ""


@dataclasses.dataclass(frozen=True, eq=False)
class PigmentMaps:
    """Pigment maps of a scan.

    The arrays are :class:`numpy.ndarray` or, for maps returned by ``map_pigments(..., out=...)`` and
    ``PigmentMaps.from_hdf5(path, lazy=True)``, read-only :class:`h5py.Dataset` objects; every method
    works on both, row block by row block.

    Attributes
    ----------
    classes : tuple of str
        Pigment classes (ambiguity groups of the pigment library), K of them.
    probability : array, shape (rows, cols, K), float32
        Calibrated probability that each class is present within the probed depth; NaN at masked pixels.
    buried_probability : array, shape (rows, cols, K), float32
        Probability that the class is present only below the surface layer; NaN at masked pixels.
    ood_score : array, shape (rows, cols), float32
        Out-of-distribution score (higher = less like the training data); NaN at masked pixels.
    thresholds : numpy.ndarray, shape (K,)
        Per-class decision thresholds on ``probability``.
    ood_threshold : float
        Pixels with ``ood_score > ood_threshold`` are flagged as unlike the training data.
    mask : array, shape (rows, cols), bool
        True where the pixel is invalid (dead, saturated, NaN/inf or negative counts) and was not identified.
    colors : tuple of str
        Display colour per class, ``"#rrggbb"``.
    element_maps : ElementMaps or None
        Element maps of the same scan, when computed.
    metadata : dict
        Source, model, timing and the masked-pixel counts.
    mask_reason : array, shape (rows, cols), uint8, optional
        0 valid, 1 dead (all channels zero), 2 saturated, 3 invalid (NaN, inf or negative counts).
    pattern : array, shape (rows, cols), int32, optional
        Each pixel's call pattern: its index in ``patterns``; -1 where masked, out of distribution or
        nothing called. None when the calls were not checked by physics.
    patterns : tuple of CallPattern
        The call patterns (called set and count level) of the map, each checked once by physics
        (:class:`xrfnb.model.physics_check.CallPatterns`): its alternatives, the physics-checked best, and
        why it was not checked where it was not. See :meth:`pattern_at`, :meth:`patterns_in` and
        :meth:`checked_binary`.
    """

    classes: tuple[str, ...]
    probability: np.ndarray | h5py.Dataset
    buried_probability: np.ndarray | h5py.Dataset
    ood_score: np.ndarray | h5py.Dataset
    thresholds: np.ndarray
    ood_threshold: float
    mask: np.ndarray | h5py.Dataset
    colors: tuple[str, ...]
    element_maps: ElementMaps | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    mask_reason: np.ndarray | h5py.Dataset | None = None
    pattern: np.ndarray | h5py.Dataset | None = None
    patterns: tuple[CallPattern, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "colors", tuple(str(c) for c in self.colors))
        k = len(self.classes)
        thr = np.asarray(self.thresholds, dtype=np.float32).reshape(-1)
        if thr.shape != (k,):
            raise DataError(f"thresholds must have one value per class ({k}), got shape {thr.shape}")
        object.__setattr__(self, "thresholds", thr)
        object.__setattr__(self, "ood_threshold", float(self.ood_threshold))
        if len(self.colors) != k:
            raise DataError(f"colors must have one entry per class ({k}), got {len(self.colors)}")
        shape = tuple(self.probability.shape)
        if len(shape) != 3 or shape[2] != k:
            raise DataError(f"probability must have shape (rows, cols, {k}), got {shape}")
        if tuple(self.buried_probability.shape) != shape:
            raise DataError(f"buried_probability has shape {self.buried_probability.shape}, expected {shape}")
        for name in ("ood_score", "mask"):
            if tuple(getattr(self, name).shape) != shape[:2]:
                raise DataError(f"{name} has shape {getattr(self, name).shape}, expected {shape[:2]}")
        if self.mask_reason is None:
            object.__setattr__(self, "mask_reason", None)
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if self.pattern is not None and tuple(self.pattern.shape) != shape[:2]:
            raise DataError(f"pattern has shape {self.pattern.shape}, expected {shape[:2]}")

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return tuple(int(s) for s in self.probability.shape[:2])  # type: ignore[return-value]

    @property
    def is_lazy(self) -> bool:
        """True when the maps are read from an open HDF5 file on demand."""
        return not isinstance(self.probability, np.ndarray)

    def __getitem__(self, name: str) -> np.ndarray:
        """``maps["lead white"]`` -> probability map of that class, shape (rows, cols), float32."""
        return np.asarray(self.probability[..., self._class_index(name)])

    def _class_index(self, name: str) -> int:
        lower = [c.lower() for c in self.classes]
        try:
            return lower.index(str(name).lower())
        except ValueError:
            close = difflib.get_close_matches(str(name).lower(), lower, n=3)
            hint = (
                f"; did you mean {', '.join(repr(self.classes[lower.index(c)]) for c in close)}?"
                if close
                else ""
            )
            raise DataError(
                f"unknown pigment class {name!r}{hint} (classes: {', '.join(self.classes)})"
            ) from None

    def resolve_thresholds(
        self, thresholds: float | np.ndarray | Mapping[str, float] | None = None
    ) -> np.ndarray:
        """Per-class thresholds, shape (K,): the model's, a scalar for all, an array, or overrides by name."""
        k = len(self.classes)
        if thresholds is None:
            return self.thresholds.copy()
        if isinstance(thresholds, Mapping):
            thr = self.thresholds.copy()
            for name, value in thresholds.items():
                thr[self._class_index(name)] = float(value)
            return thr
        thr = np.asarray(thresholds, dtype=np.float32)
        if thr.ndim == 0:
            return np.full(k, float(thr), dtype=np.float32)
        if thr.shape != (k,):
            raise DataError(f"thresholds must be a scalar or have shape ({k},), got {thr.shape}")
        return thr

    # -- derived maps -------------------------------------------------------------------------------
    def _blocks(self) -> Iterator[slice]:
        rows, cols = self.shape
        return _row_blocks(rows, cols, max(1, 262144 // max(1, len(self.classes))) * 8)

    def binary(self, thresholds: float | np.ndarray | Mapping[str, float] | None = None) -> np.ndarray:
        """Presence maps ``probability >= threshold``, False at masked pixels; (rows, cols, K), bool."""
        thr = self.resolve_thresholds(thresholds)
        out = np.zeros((*self.shape, len(self.classes)), dtype=bool)
        for sl in self._blocks():
            p = _rows_of(self.probability, sl)
            with np.errstate(invalid="ignore"):
                out[sl] = is_present(p, thr)  # NaN (masked) compares False
            out[sl] &= ~_rows_of(self.mask, sl)[..., None]
        return out

    def buried(self, thresholds: float | np.ndarray | Mapping[str, float] | None = None) -> np.ndarray:
        """Classes present only below the surface: present (see :meth:`binary`) and
        more likely buried than at the surface (:func:`xrfnb.core.calls.is_buried`); shape (rows, cols, K),
        bool."""
        thr = self.resolve_thresholds(thresholds)
        out = np.zeros((*self.shape, len(self.classes)), dtype=bool)
        for sl in self._blocks():
            p = _rows_of(self.probability, sl)
            b = _rows_of(self.buried_probability, sl)
            with np.errstate(invalid="ignore"):
                out[sl] = is_present(p, thr) & is_buried(p, b)
            out[sl] &= ~_rows_of(self.mask, sl)[..., None]
        return out

    def calls_at(
        self, row: int, col: int, thresholds: float | np.ndarray | Mapping[str, float] | None = None
    ) -> list[PixelCall]:
        """The calls of every class at one pixel, most probable first (NaN, a masked pixel, last).

        Parameters
        ----------
        row, col : int
            The pixel.
        thresholds : float, numpy.ndarray (K,), mapping or None
            As for :meth:`binary` (None: the model's thresholds).

        Returns
        -------
        list of PixelCall
            One per class: its probability, threshold, and whether it is present and buried there
            (the rule of :mod:`xrfnb.core.calls`).

        Examples
        --------
        >>> import numpy as np
        >>> maps = PigmentMaps(classes=("lead white", "vermilion"),
        ...     probability=np.array([[[0.9, 0.3]]], np.float32),
        ...     buried_probability=np.array([[[0.6, 0.0]]], np.float32),
        ...     ood_score=np.zeros((1, 1), np.float32), thresholds=np.array([0.5, 0.5]), ood_threshold=1.0,
        ...     mask=np.zeros((1, 1), bool), colors=("#f0f0f0", "#e34234"))
        >>> [(c.class_name, c.call) for c in maps.calls_at(0, 0)]
        [('lead white', 'buried'), ('vermilion', '')]
        """
        rows, cols = self.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise DataError(f"pixel ({row}, {col}) is outside the {rows} x {cols} maps")
        thr = self.resolve_thresholds(thresholds).astype(float)
        prob = np.asarray(self.probability[row, col], dtype=float)
        bur = np.asarray(self.buried_probability[row, col], dtype=float)
        with np.errstate(invalid="ignore"):
            present = is_present(prob, thr)
            buried = present & is_buried(prob, bur)
        calls = [
            PixelCall(name, float(prob[k]), float(thr[k]), bool(present[k]), bool(buried[k]))
            for k, name in enumerate(self.classes)
        ]
        return sorted(calls, key=lambda c: -c.probability if np.isfinite(c.probability) else 1.0)

    def pattern_at(self, row: int, col: int) -> CallPattern | None:
        """The call pattern of one pixel, with its physics check (None where there is none: masked, out of
        distribution, nothing called, or maps made without the check).

        Its ``alternatives`` are the explanations of the pixel's spectra within the check's margin, best
        first, each with an ``evidence`` line; ``best_classes`` is the physics-checked call.
        """
        rows, cols = self.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise DataError(f"pixel ({row}, {col}) is outside the {rows} x {cols} maps")
        if self.pattern is None:
            return None
        i = int(self.pattern[row, col])
        return self.patterns[i] if 0 <= i < len(self.patterns) else None

    def patterns_in(self, region: np.ndarray) -> list[tuple[CallPattern, int]]:
        """The call patterns of a region and how many of its pixels have each, most pixels first.

        Parameters
        ----------
        region : numpy.ndarray, shape (rows, cols), bool
            The region's pixels.

        Returns
        -------
        list of (CallPattern, int)
            Empty for maps made without the physics check.
        """
        region = np.asarray(region, dtype=bool)
        if region.shape != self.shape:
            raise DataError(f"region has shape {region.shape}, expected {self.shape}")
        if self.pattern is None or not self.patterns:
            return []
        counts = np.zeros(len(self.patterns) + 1, dtype=np.int64)
        for sl in self._blocks():
            p = _rows_of(self.pattern, sl)[region[sl]].astype(np.int64)
            counts += np.bincount(p + 1, minlength=counts.size)[: counts.size]
        found = [(self.patterns[i], int(counts[i + 1])) for i in range(len(self.patterns)) if counts[i + 1]]
        return sorted(found, key=lambda t: -t[1])

    def check_pattern(self, index: int, instrument: Instrument | None = None) -> CallPattern:
        """Check a call pattern now that mapping left unchecked (beyond its budget of fits), on the mean
        spectrum kept for it; the result replaces it in ``patterns`` (in memory: a maps file is not
        rewritten). A pattern already checked, or without a mean spectrum, is returned as it is.

        Parameters
        ----------
        index : int
            The pattern (``pattern_at(row, col).index``).
        instrument : Instrument, optional
            Default: the instrument the maps were checked with (``metadata["physics_check"]``).

        Returns
        -------
        CallPattern
        """
        if not 0 <= index < len(self.patterns):
            raise DataError(f"no call pattern {index}: these maps have {len(self.patterns)}")
        info = self.metadata.get("physics_check", {})
        if instrument is None:
            if "instrument" not in info:
                raise DataError("these maps do not say which instrument their calls were checked with: "
                                "pass instrument=")
            instrument = Instrument.from_dict(info["instrument"])
        elements = info.get("class_elements")
        if not isinstance(elements, Mapping):
            raise DataError("these maps do not carry the classes' key elements: map them again")
        margin = float(info.get("margin", DEFAULT_MARGIN))
        done = self.patterns[index].checked_now(instrument, elements, margin=margin)
        patterns = list(self.patterns)
        patterns[index] = done
        object.__setattr__(self, "patterns", tuple(patterns))  # a cache of the frozen maps: same content
        return done

    def checked_binary(self) -> np.ndarray:
        """Presence maps that follow the physics check: at the model's thresholds, each pixel of a
        checked pattern gets its best explanation's classes (the network's calls elsewhere); shape
        (rows, cols, K), bool. Equal to :meth:`binary` for maps made without the check."""
        out = self.binary()
        if self.pattern is None or not any(p.changed for p in self.patterns):
            return out
        index = {c: k for k, c in enumerate(self.classes)}
        table = np.zeros((len(self.patterns), len(self.classes)), dtype=bool)
        changed = np.zeros(len(self.patterns), dtype=bool)
        for p in self.patterns:
            changed[p.index] = p.changed
            for c in p.best_classes:
                table[p.index, index[c]] = True
        for sl in self._blocks():
            pat = _rows_of(self.pattern, sl)
            hit = pat >= 0
            hit[hit] = changed[pat[hit]]
            out[sl][hit] = table[pat[hit]]
        return out

    def ood(self) -> np.ndarray:
        """Pixels unlike the training data (``ood_score > ood_threshold``), shape (rows, cols), bool."""
        with np.errstate(invalid="ignore"):
            return np.asarray(self.ood_score[...]) > self.ood_threshold

    def composite_rgb(self, thresholds: float | np.ndarray | Mapping[str, float] | None = None) -> np.ndarray:
        """One image in the classes' display colours, shape (rows, cols, 3), uint8.

        Each pixel is the probability-weighted mean colour of the classes present there (above
        threshold); black where no class is present; grey (128, 128, 128) at masked pixels.
        """
        thr = self.resolve_thresholds(thresholds)
        palette = np.array([_hex_to_rgb(c) for c in self.colors], dtype=np.float32).reshape(-1, 3)
        rgb = np.zeros((*self.shape, 3), dtype=np.uint8)
        for sl in self._blocks():
            p = np.nan_to_num(_rows_of(self.probability, sl).astype(np.float32), nan=0.0)
            w = np.where(p >= thr, p, 0.0).astype(np.float32)
            total = w.sum(axis=-1, keepdims=True)
            mix = (w @ palette) / np.maximum(total, 1e-12)
            block = np.clip(np.rint(mix), 0, 255).astype(np.uint8)
            block[_rows_of(self.mask, sl)] = _MASKED_RGB
            rgb[sl] = block
        return rgb

    def summary(self, thresholds: float | np.ndarray | Mapping[str, float] | None = None) -> MapSummary:
        """Area fraction per class over the valid pixels, masked-pixel counts and the OOD fraction."""
        thr = self.resolve_thresholds(thresholds)
        k = len(self.classes)
        present = np.zeros(k, dtype=np.int64)
        buried = np.zeros(k, dtype=np.int64)
        present_ood = np.zeros(k, dtype=np.int64)
        reasons = dict.fromkeys(MASK_REASONS.values(), 0)
        n_masked = n_ood = 0
        for sl in self._blocks():
            m = _rows_of(self.mask, sl)
            valid = ~m
            p = _rows_of(self.probability, sl)[valid]
            b = _rows_of(self.buried_probability, sl)[valid]
            with np.errstate(invalid="ignore"):
                ood = _rows_of(self.ood_score, sl)[valid] > self.ood_threshold
                pres = is_present(p, thr)
                present += pres[~ood].sum(axis=0)
                buried += (pres & is_buried(p, b))[~ood].sum(axis=0)
                present_ood += pres[ood].sum(axis=0)
                n_ood += int(ood.sum())
            n_masked += int(m.sum())
            if self.mask_reason is not None:
                r = _rows_of(self.mask_reason, sl)
                for code, name in MASK_REASONS.items():
                    reasons[name] += int((r == code).sum())
            else:
                reasons["invalid"] += int(m.sum())
        n_pixels = self.shape[0] * self.shape[1]
        n_valid = max(n_pixels - n_masked, 1)
        n_in = max(n_pixels - n_masked - n_ood, 1)
        return MapSummary(
            area_fraction={c: float(present[i]) / n_in for i, c in enumerate(self.classes)},
            buried_fraction={c: float(buried[i]) / n_in for i, c in enumerate(self.classes)},
            n_pixels=n_pixels,
            n_masked=n_masked,
            masked_by_reason=reasons,
            ood_fraction=n_ood / n_valid,
            n_ood=n_ood,
            ood_area_fraction=(
                {c: float(present_ood[i]) / n_ood for i, c in enumerate(self.classes)} if n_ood else {}
            ),
        )

    # -- I/O ------------------------------------------------------------------------------------------
    def to_hdf5(self, path: str | os.PathLike) -> Path:
        """Write the maps (and element maps when present) to an HDF5 file, atomically.

        The file is written under a temporary name in the same folder and renamed over ``path`` only
        when complete, so an interrupted write never leaves a corrupt file. Returns the path.
        """
        path = Path(path)
        rows, cols = self.shape
        check_output_path(path)
        needed = maps_file_bytes(rows, cols, len(self.classes), self.element_maps)
        check_free_space(path.parent, needed, path)
        with atomic_path(path) as tmp, h5_writer(tmp, path, needed) as (f, failed):
            write_header(f, self.classes, self.colors, self.thresholds, self.ood_threshold, self.metadata)
            dsets = create_map_datasets(f, rows, cols, len(self.classes), MASK_REASONS)
            for sl in self._blocks():
                if failed():
                    break
                dsets["probability"][sl] = _rows_of(self.probability, sl)
                dsets["buried_probability"][sl] = _rows_of(self.buried_probability, sl)
                dsets["ood_score"][sl] = _rows_of(self.ood_score, sl)
                dsets["mask"][sl] = _rows_of(self.mask, sl)
                if self.mask_reason is not None:
                    dsets["mask_reason"][sl] = _rows_of(self.mask_reason, sl)
                else:
                    dsets["mask_reason"][sl] = _rows_of(self.mask, sl).astype(np.uint8) * MASK_INVALID
            if self.element_maps is not None and not failed():
                write_element_maps(f, self.element_maps)
            if self.pattern is not None and not failed():
                write_call_patterns(f, self.pattern, self.patterns)
        return path

    @classmethod
    def from_hdf5(cls, path: str | os.PathLike, *, lazy: bool = False) -> PigmentMaps:
        """Read maps written by :meth:`to_hdf5` or :func:`map_pigments`.

        Parameters
        ----------
        path : path-like
            The HDF5 file (opened read-only).
        lazy : bool
            Keep the file open and return h5py datasets instead of loading the maps into memory.
        """
        import h5py

        path = Path(path)
        preflight(path)  # a file whose metadata crashes libhdf5 is a FormatError, not a dead process
        try:
            f = h5py.File(path, "r")
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: not a readable HDF5 file ({exc})") from None
        try:
            check_self_contained(f, path)  # never read another file's bytes as maps
            if f.attrs.get("format") != MAPS_FORMAT:
                raise FormatError(
                    f"{path}: not an xrfnb pigment-maps file (attribute 'format' is "
                    f"{f.attrs.get('format')!r}; "
                    f"expected {MAPS_FORMAT!r}); produce one with `xrfnb identify` or PigmentMaps.to_hdf5"
                )
            try:
                classes = tuple(json.loads(f.attrs["classes"]))
                colors = tuple(json.loads(f.attrs["colors"]))
                metadata = json.loads(f.attrs.get("metadata", "{}"))
                ood_threshold = float(f.attrs["ood_threshold"])
                thresholds = np.asarray(f["thresholds"][()], dtype=np.float32)
                arrays = {
                    n: f[n] for n in ("probability", "buried_probability", "ood_score", "mask", "mask_reason")
                }
            except KeyError as exc:
                raise FormatError(f"{path}: pigment-maps file is missing {exc.args[0]!r}") from None
            if not lazy:
                arrays = {n: d[()] for n, d in arrays.items()}
            element_maps = read_element_maps(f, path) if "element_maps" in f else None
            pattern, patterns = read_call_patterns(f, path)
            if pattern is not None and not lazy:
                pattern = pattern[()]
            maps = cls(
                classes=classes,
                probability=arrays["probability"],
                buried_probability=arrays["buried_probability"],
                ood_score=arrays["ood_score"],
                thresholds=thresholds,
                ood_threshold=ood_threshold,
                mask=arrays["mask"],
                colors=colors,
                element_maps=element_maps,
                metadata={**metadata, "file": str(path)},
                mask_reason=arrays["mask_reason"],
                pattern=pattern,
                patterns=patterns,
            )
        except BaseException:
            f.close()
            raise
        if not lazy:
            f.close()
        return maps

    def load(self) -> PigmentMaps:
        """The same maps held in memory (a no-op for in-memory maps)."""
        if not self.is_lazy:
            return self
        return dataclasses.replace(
            self,
            probability=self.probability[()],
            buried_probability=self.buried_probability[()],
            ood_score=self.ood_score[()],
            mask=self.mask[()],
            mask_reason=None if self.mask_reason is None else self.mask_reason[()],
            pattern=None if self.pattern is None else self.pattern[()],
        )

    def to_tiff(self, folder: str | os.PathLike) -> list[Path]:
        """Write one 32-bit float ImageJ TIFF per class (probability, NaN at masked pixels), plus
        ``ood_score.tif`` and ``mask.tif`` (8-bit, 255 = masked). Returns the written paths.

        File names are the class names with non-alphanumerics replaced by ``_``. When the pixel size is
        known (``metadata["pixel_size_um"]``) it is stored as the TIFF resolution in micrometres. Maps
        that carry element maps (``map_pigments(element_maps=True)``, ``xrfnb identify --elements``) also
        get ``elements/<El>_<family>.tif``: the fitted counts of each element's line family (32-bit).
        """
        import tifffile

        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FormatError(f"cannot create TIFF folder {folder}: {exc}") from None
        px = self.metadata.get("pixel_size_um")
        kwargs: dict[str, Any] = {}
        meta: dict[str, Any] = {"axes": "YX"}
        if px:
            kwargs["resolution"] = (1.0 / float(px), 1.0 / float(px))
            meta["unit"] = "um"
        written = []
        names = _unique_file_stems(self.classes)
        planes: list[tuple[str, Callable[[], np.ndarray], str]] = [
            (stem, functools.partial(self._class_plane, i), name)
            for i, (stem, name) in enumerate(zip(names, self.classes, strict=True))
        ]
        planes.append(("ood_score", lambda: np.asarray(self.ood_score[()], dtype=np.float32), "ood score"))
        em = self.element_maps
        if em is not None:
            intensity = np.asarray(em.intensity, dtype=np.float32)
            if intensity.shape[:2] == tuple(self.shape):
                (folder / "elements").mkdir(exist_ok=True)
                for j, (el, fam) in enumerate(zip(em.elements, em.families, strict=True)):
                    get = functools.partial(_plane, intensity, j)
                    planes.append((f"elements/{el}_{fam}", get, f"{el} {fam} counts"))
        rows, cols = self.shape
        needed = rows * cols * (4 * len(planes) + 1) + 8192 * (len(planes) + 1)
        check_free_space(folder, needed, folder / "mask.tif")
        try:
            for stem, get, label in planes:
                target = folder / f"{stem}.tif"
                with atomic_path(target) as tmp:
                    tifffile.imwrite(tmp, get(), imagej=True, metadata={**meta, "Labels": [label]}, **kwargs)
                written.append(target)
            target = folder / "mask.tif"
            with atomic_path(target) as tmp:
                mask = np.asarray(self.mask[()], dtype=np.uint8) * 255
                tifffile.imwrite(tmp, mask, imagej=True, metadata=meta, **kwargs)
            written.append(target)
        except OSError as exc:
            raise write_error(exc, target, needed) from None
        return written

    def _class_plane(self, index: int) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for sl in self._blocks():
            out[sl] = _rows_of(self.probability, sl)[..., index]
        return out

    def __repr__(self) -> str:
        rows, cols = self.shape
        lazy = ", lazy" if self.is_lazy else ""
        return f"PigmentMaps({rows} x {cols} pixels, {len(self.classes)} classes{lazy})"


def write_call_patterns(f: h5py.File, pattern: np.ndarray, patterns: tuple[CallPattern, ...]) -> None:
    """Write the pattern map (dataset ``pattern``, (rows, cols) int32, gzip), the call patterns with
    their physics checks (dataset ``call_patterns``: UTF-8 JSON bytes, uint8) and the mean spectra kept
    for checks on demand (``call_pattern_spectra`` (m, channels) float32, ``call_pattern_spectra_index``
    (m,) int32: their pattern numbers) into an open maps file."""
    rows, cols = pattern.shape
    opts = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    d = f.create_dataset("pattern", (rows, cols), np.int32, chunks=(min(rows, 64), min(cols, 64)), **opts)
    for sl in _row_blocks(rows, cols):
        d[sl] = np.asarray(pattern[sl], dtype=np.int32)
    d.attrs["long_name"] = "call pattern of the pixel (index into call_patterns; -1: none)"
    text = json.dumps([p.to_dict() for p in patterns], ensure_ascii=False).encode("utf-8")
    f.create_dataset("call_patterns", data=np.frombuffer(text, dtype=np.uint8), **opts)
    kept = [p for p in patterns if p.mean_spectrum is not None]
    if kept:  # the mean spectra of the patterns that can be checked (on demand), and their numbers
        spectra = np.stack([np.asarray(p.mean_spectrum, dtype=np.float32) for p in kept])
        f.create_dataset("call_pattern_spectra", data=spectra, **opts)
        f.create_dataset("call_pattern_spectra_index", data=np.array([p.index for p in kept], np.int32))


def read_call_patterns(
    f: h5py.File, path: str | os.PathLike
) -> tuple[h5py.Dataset | None, tuple[CallPattern, ...]]:
    """The pattern map (a dataset, or None in files without it) and the call patterns of a maps file."""
    if "pattern" not in f:
        return None, ()
    try:
        raw = bytes(np.asarray(f["call_patterns"][()], dtype=np.uint8))
        dicts = json.loads(raw.decode("utf-8"))
        spectra: list[np.ndarray | None] = [None] * len(dicts)
        if "call_pattern_spectra" in f:
            rows = f["call_pattern_spectra"][()]
            for i, row in zip(f["call_pattern_spectra_index"][()], rows, strict=True):
                spectra[int(i)] = row
        patterns = tuple(CallPattern.from_dict(d, s) for d, s in zip(dicts, spectra, strict=True))
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"{path}: unreadable call patterns ({exc})") from None
    return f["pattern"], patterns


def _hex_to_rgb(color: str) -> tuple[int, int, int]:
    c = str(color).lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", c):
        raise DataError(f"display colour must be '#rrggbb', got {color!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _unique_file_stems(names: tuple[str, ...]) -> list[str]:
    stems: list[str] = []
    for name in names:
        stem = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "class"
        base, i = stem, 2
        while stem in stems:
            stem, i = f"{base}_{i}", i + 1
        stems.append(stem)
    return stems


def _plane(stack: np.ndarray, index: int) -> np.ndarray:
    """``stack[:, :, index]`` as a contiguous 2-D float32 image."""
    return np.ascontiguousarray(stack[:, :, index], dtype=np.float32)

