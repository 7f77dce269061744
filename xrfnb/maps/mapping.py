"""Whole-scan pigment maps: streaming and dask inference, masking of bad pixels, HDF5/TIFF output.

Memory model
------------
:func:`map_pigments` never holds the scan's spectra in memory. It reads one block of whole rows at a time
(aligned to the HDF5 chunks, about ``chunk_pixels`` pixels; the next block is read in a background thread
meanwhile), passes ``batch_pixels`` spectra at a time to the model, and writes the results:

* without ``out``: into preallocated in-memory maps, ``rows x cols x (2 K + 1) x 4`` bytes of float32 plus
  two bytes per pixel for the mask (a 1024 x 1024 scan with 30 classes: about 250 MB);
* with ``out``: block by block into ``OUT.partial/`` on disk (one small file per completed block, each written
  atomically), assembled into ``OUT`` at the end and opened *lazily* (h5py datasets, read row block by row
  block), so peak memory is independent of the scan size.

The dask path (a :class:`~xrfnb.Scan` whose counts are a :class:`dask.array.Array`) runs the same per-block
function with :func:`dask.array.blockwise`, locally or on a ``dask.distributed`` cluster; the client receives
only the maps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import DataError, FitError, FormatError, ModelError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.calls import is_buried, is_present
from ..core.spectrum import Scan, Spectrum, _is_dask
from ..fitting.elements import ElementMaps, fit_elements
from ..io.atomic import atomic_path
from ..io.chunks import ChunkReader
from ..io.hdf5 import check_self_contained, preflight
from ..physics.instrument import resolve_instrument

if TYPE_CHECKING:  # pragma: no cover
    from ..fitting.elements import ElementMaps

__all__ = ["MapSummary", "PigmentMaps", "dask_scan", "map_pigments"]

#: reasons a pixel is masked (values of :attr:`PigmentMaps.mask_reason`)
MASK_OK, MASK_DEAD, MASK_SATURATED, MASK_INVALID = 0, 1, 2, 3
MASK_REASONS: dict[int, str] = {MASK_DEAD: "dead", MASK_SATURATED: "saturated", MASK_INVALID: "invalid"}

_FORMAT = "xrfnb-pigment-maps"
_FORMAT_VERSION = 1
_PARTIAL_FORMAT = "xrfnb-pigment-maps-partial"
_MASKED_RGB = (128, 128, 128)
_DEFAULT_CHUNK_PIXELS = 8192
_DEFAULT_BATCH_PIXELS = 4096
#: files xrfnb writes in ``OUT.partial/`` (nothing else there is ever deleted)
_PARTIAL_ENTRY = re.compile(r"manifest\.json|\.manifest\.json\.tmp|\.?rows_(\d{7})_(\d{7})\.npz(\.tmp)?")
_BLOCK_FILE = re.compile(r"rows_(\d{7})_(\d{7})\.npz")
_BLOCK_ARRAYS = ("probability", "buried_probability", "ood_score", "mask_reason")
_H5_OVERHEAD_BYTES = 1 << 18  # HDF5 header, chunk index and attributes of a maps file (generous)
_NPZ_OVERHEAD_BYTES = 4096  # zip directory and .npy headers of one block file

_log = logging.getLogger("xrfnb.mapping")


# ------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------
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


def _rows_of(arr: Any, sl: slice) -> np.ndarray:
    return np.asarray(arr[sl])


def _row_blocks(n_rows: int, n_cols: int, per_block: int = 262144) -> Iterator[slice]:
    step = max(1, per_block // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))


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
    """

    classes: tuple[str, ...]
    probability: Any
    buried_probability: Any
    ood_score: Any
    thresholds: np.ndarray
    ood_threshold: float
    mask: Any
    colors: tuple[str, ...]
    element_maps: ElementMaps | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    mask_reason: Any = None

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
            import difflib

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
        _check_output_path(path)
        needed = _maps_file_bytes(rows, cols, len(self.classes), self.element_maps)
        _check_free_space(path.parent, needed, path)
        with atomic_path(path) as tmp, _h5_writer(tmp, path, needed) as (f, failed):
            _write_header(f, self.classes, self.colors, self.thresholds, self.ood_threshold, self.metadata)
            dsets = _create_map_datasets(f, rows, cols, len(self.classes))
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
                _write_element_maps(f, self.element_maps)
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
            if f.attrs.get("format") != _FORMAT:
                raise FormatError(
                    f"{path}: not an xrfnb pigment-maps file (attribute 'format' is "
                    f"{f.attrs.get('format')!r}; "
                    f"expected {_FORMAT!r}); produce one with `xrfnb identify` or PigmentMaps.to_hdf5"
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
            element_maps = _read_element_maps(f, path) if "element_maps" in f else None
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
        planes: list[tuple[str, Any, str]] = [
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
        _check_free_space(folder, needed, folder / "mask.tif")
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
            raise _write_error(exc, target, needed) from None
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


# ------------------------------------------------------------------------------------------------------
# HDF5 helpers
# ------------------------------------------------------------------------------------------------------
def _open_for_hdf5(path: Path) -> Any:
    """The raw, unbuffered file :class:`_GuardedFile` writes through (tests put a full disk here)."""
    return open(path, "w+b", buffering=0)  # closed by _GuardedFile.close


class _GuardedFile:
    """A binary file for h5py's ``fileobj`` driver that never hands libhdf5 a failed write.

    libhdf5 2.0 (h5py 3.16) does not survive a write that fails (``ENOSPC`` on a full disk): closing the
    file then raises "Can't decrement id ref count" and the interpreter segfaults when the dataset
    objects are freed. Here a failed write (or a Ctrl-C arriving inside one) is recorded in
    :attr:`error` and reported to libhdf5 as done; the writer stops writing (:meth:`failed`), the file
    is closed cleanly, and :func:`_h5_writer` raises the recorded error and drops the file.
    """

    def __init__(self, path: Path) -> None:
        self._fh = _open_for_hdf5(path)
        self.error: BaseException | None = None

    def failed(self) -> bool:
        """True once a write failed (the rest of the file is then not written)."""
        return self.error is not None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    n = self._fh.write(view[done:])
                    if not n:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += n
            except BaseException as exc:  # must never propagate into libhdf5
                self.error = exc
        return len(view)

    def readinto(self, buffer: Any) -> int:
        return self._fh.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self._fh.truncate(size)
        except BaseException as exc:  # as write
            self.error = self.error or exc
            return self._fh.tell() if size is None else size

    def flush(self) -> None:
        """Nothing to do: the file is unbuffered (and synced by :meth:`close`)."""

    def close(self) -> None:
        """Sync to disk (a delayed ``ENOSPC`` shows here) and close."""
        try:
            if self.error is None:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            self.error = exc
        finally:
            self._fh.close()


@contextlib.contextmanager
def _h5_writer(tmp: Path, target: Path, needed_bytes: int, hint: str = "") -> Iterator[tuple[Any, Any]]:
    """Open ``tmp`` for writing with h5py through a :class:`_GuardedFile`.

    Yields ``(file, failed)``: ``failed()`` turns True after a failed write, and the caller then stops
    writing. On exit the file is closed; a recorded write error is raised as :class:`FormatError` (no
    space left: with ``needed_bytes`` and ``hint``), a Ctrl-C caught inside a write as KeyboardInterrupt.
    """
    import h5py

    try:
        guard = _GuardedFile(tmp)
    except OSError as exc:
        raise _write_error(exc, target, needed_bytes, hint) from None
    try:
        f = h5py.File(guard, "w")
    except BaseException:
        guard.close()
        raise
    try:
        try:
            yield f, guard.failed
        finally:
            try:
                f.close()
            finally:
                guard.close()
    except BaseException:
        if isinstance(guard.error, OSError):  # a failure the body saw only as a consequence
            raise _write_error(guard.error, target, needed_bytes, hint) from None
        raise
    if isinstance(guard.error, OSError):
        raise _write_error(guard.error, target, needed_bytes, hint) from None
    if guard.error is not None:  # KeyboardInterrupt (or SystemExit) that arrived inside a write
        raise guard.error


def _fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


def _no_space_error(folder: Path, target: Path, needed_bytes: int, hint: str = "") -> FormatError:
    try:
        free = f", {_fmt_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    return FormatError(
        f"no space left on {folder} for {target.name} (about {_fmt_bytes(needed_bytes)} needed{free})"
        + (hint or ": free some space or write elsewhere")
    )


def _write_error(exc: OSError, target: Path, needed_bytes: int, hint: str = "") -> FormatError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _no_space_error(target.parent, target, needed_bytes, hint)
    reason = exc.strerror or str(exc)
    return FormatError(f"cannot write {target}: {reason}{hint}")


def _check_free_space(folder: Path, needed_bytes: int, target: Path, hint: str = "") -> None:
    """Refuse up front when ``folder``'s file system has less than ``needed_bytes`` free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # cannot tell: the writes themselves still report a full disk cleanly
        return
    if free < needed_bytes:
        raise _no_space_error(folder, target, needed_bytes, hint)


def _plane(stack: np.ndarray, index: int) -> np.ndarray:
    """``stack[:, :, index]`` as a contiguous 2-D float32 image."""
    return np.ascontiguousarray(stack[:, :, index], dtype=np.float32)


def _maps_file_bytes(rows: int, cols: int, k: int, element_maps: Any = None) -> int:
    """Upper estimate of a maps file's size: the uncompressed arrays (probabilities hardly compress),
    2 % for deflate's worst case, the HDF5 overhead and the element maps."""
    arrays = rows * cols * (8 * k + 4 + 1 + 1)
    em = 0
    if element_maps is not None:
        for name in ("intensity", "sigma", "detection_limit", "chi2", "residual"):
            value = getattr(element_maps, name, None)
            em += int(getattr(value, "nbytes", 0) or 0)
    return int(1.02 * (arrays + em)) + _H5_OVERHEAD_BYTES


def _block_file_bytes(n_pixels: int, k: int) -> int:
    """Size of one ``rows_*.npz`` block file of ``n_pixels`` pixels (uncompressed npz)."""
    return n_pixels * (8 * k + 4 + 1) + _NPZ_OVERHEAD_BYTES


def _write_header(f, classes, colors, thresholds, ood_threshold, metadata) -> None:
    f.attrs["format"] = _FORMAT
    f.attrs["format_version"] = _FORMAT_VERSION
    f.attrs["classes"] = json.dumps(list(classes))
    f.attrs["colors"] = json.dumps(list(colors))
    f.attrs["ood_threshold"] = float(ood_threshold)
    f.attrs["metadata"] = json.dumps(_jsonable(metadata))
    f.create_dataset("thresholds", data=np.asarray(thresholds, dtype=np.float32))


def _create_map_datasets(f, rows: int, cols: int, k: int) -> dict[str, Any]:
    cr, cc = min(rows, 64), min(cols, 64)
    opts = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    d = {
        "probability": f.create_dataset(
            "probability", (rows, cols, k), np.float32, chunks=(cr, cc, k), fillvalue=np.nan, **opts
        ),
        "buried_probability": f.create_dataset(
            "buried_probability", (rows, cols, k), np.float32, chunks=(cr, cc, k), fillvalue=np.nan, **opts
        ),
        "ood_score": f.create_dataset(
            "ood_score", (rows, cols), np.float32, chunks=(cr, cc), fillvalue=np.nan, **opts
        ),
        "mask": f.create_dataset("mask", (rows, cols), bool, chunks=(cr, cc), **opts),
        "mask_reason": f.create_dataset("mask_reason", (rows, cols), np.uint8, chunks=(cr, cc), **opts),
    }
    d["probability"].attrs["long_name"] = "probability that the pigment class is present"
    d["buried_probability"].attrs["long_name"] = (
        "probability that the class is present only below the surface"
    )
    d["mask_reason"].attrs["codes"] = json.dumps({str(k): v for k, v in MASK_REASONS.items()})
    return d


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 4096 else f"<array {obj.shape}>"
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _write_element_maps(f, em) -> None:
    g = f.create_group("element_maps")
    g.attrs["elements"] = json.dumps(list(em.elements))
    g.attrs["families"] = json.dumps(list(getattr(em, "families", ())))
    g.attrs["metadata"] = json.dumps(_jsonable(getattr(em, "metadata", {})))
    for name in ("intensity", "sigma", "detection_limit", "chi2", "residual"):
        value = getattr(em, name, None)
        if value is not None:
            g.create_dataset(name, data=np.asarray(value), compression="gzip", compression_opts=1)


def _read_element_maps(f, path: Path):
    g = f["element_maps"]
    fields = {
        name: g[name][()]
        for name in ("intensity", "sigma", "detection_limit", "chi2", "residual")
        if name in g
    }
    try:
        return ElementMaps(
            elements=tuple(json.loads(g.attrs["elements"])),
            families=tuple(json.loads(g.attrs.get("families", "[]"))),
            metadata=json.loads(g.attrs.get("metadata", "{}")),
            **fields,
        )
    except (TypeError, ValueError, XRFNBError) as exc:
        raise FormatError(f"{path}: element maps cannot be read ({exc})") from None


# ------------------------------------------------------------------------------------------------------
# per-block computation (shared by the streaming and the dask paths)
# ------------------------------------------------------------------------------------------------------
def classify_pixels(counts: np.ndarray, saturation_counts: float | None) -> np.ndarray:
    """Mask reason per spectrum: 0 valid, 1 dead, 2 saturated, 3 invalid.

    Parameters
    ----------
    counts : numpy.ndarray, shape (n, channels)
        Raw counts in any numeric dtype.
    saturation_counts : float or None
        A channel at or above this value marks the pixel saturated (None: never).

    Returns
    -------
    numpy.ndarray, shape (n,), uint8
    """
    kind = counts.dtype.kind
    reason = np.zeros(counts.shape[0], dtype=np.uint8)
    if counts.shape[0] == 0:
        return reason
    mx = counts.max(axis=1)
    if kind == "u":
        invalid = np.zeros(counts.shape[0], dtype=bool)
    else:
        mn = counts.min(axis=1)
        with np.errstate(invalid="ignore"):
            invalid = (mn < 0) if kind in "iu" else ~(np.isfinite(mx) & np.isfinite(mn)) | (mn < 0)
    with np.errstate(invalid="ignore"):
        dead = mx == 0
        if saturation_counts is not None:
            reason[mx >= saturation_counts] = MASK_SATURATED
    reason[dead] = MASK_DEAD
    reason[invalid] = MASK_INVALID
    return reason


def _default_saturation(dtype: np.dtype) -> float | None:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).max)
    return None


def _process_block(
    block: np.ndarray,
    model: Any,
    calibration: EnergyCalibration,
    live_time_s: float | np.ndarray | None,
    saturation_counts: float | None,
    batch_pixels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identify one block of pixels.

    Parameters
    ----------
    block : numpy.ndarray, shape (r, c, channels)
    live_time_s : float, numpy.ndarray of shape (r, c), or None

    Returns
    -------
    probability, buried_probability : (r, c, K) float32, NaN at masked pixels
    ood_score : (r, c) float32
    reason : (r, c) uint8 mask reasons
    """
    r, c, ch = block.shape
    k = len(model.classes)
    flat = block.reshape(r * c, ch)
    reason = classify_pixels(flat, saturation_counts)
    prob = np.full((r * c, k), np.nan, dtype=np.float32)
    bur = np.full((r * c, k), np.nan, dtype=np.float32)
    ood = np.full(r * c, np.nan, dtype=np.float32)
    valid_idx = np.flatnonzero(reason == MASK_OK)
    all_valid = valid_idx.size == r * c
    lt_flat = (
        None if live_time_s is None or np.ndim(live_time_s) == 0 else np.asarray(live_time_s).reshape(-1)
    )
    for s in range(0, valid_idx.size, batch_pixels):
        if all_valid:
            sel: Any = slice(s, min(s + batch_pixels, r * c))
        else:
            sel = valid_idx[s : s + batch_pixels]
        x = flat[sel]  # raw dtype: the model rebins any numeric dtype (no float copy of the block)
        lt = live_time_s if lt_flat is None else lt_flat[sel]
        res = model.identify_batch(x, calibration, live_time_s=lt)
        n = x.shape[0]
        p = np.asarray(res.probability, dtype=np.float32)
        b = np.asarray(res.buried_probability, dtype=np.float32)
        o = np.asarray(res.ood_score, dtype=np.float32).reshape(-1)
        if p.shape != (n, k) or b.shape != (n, k) or o.shape != (n,):
            raise ModelError(
                f"model returned probability {p.shape}, buried {b.shape}, ood {o.shape} for {n} spectra "
                f"and {k} classes"
            )
        prob[sel], bur[sel], ood[sel] = p, b, o
    return prob.reshape(r, c, k), bur.reshape(r, c, k), ood.reshape(r, c), reason.reshape(r, c)


def _dask_block(
    counts: np.ndarray,
    *maybe_lt: np.ndarray,
    model: Any,
    calibration: EnergyCalibration,
    live_time_s: float | None,
    saturation_counts: float | None,
    batch_pixels: int,
) -> np.ndarray:
    """Per-chunk function of the dask path: (r, c, channels) -> (r, c, 2 K + 2) float32 packed results."""
    lt = maybe_lt[0] if maybe_lt else live_time_s
    prob, bur, ood, reason = _process_block(
        np.asarray(counts), model, calibration, lt, saturation_counts, batch_pixels
    )
    return np.concatenate([prob, bur, ood[..., None], reason[..., None].astype(np.float32)], axis=-1)


# ------------------------------------------------------------------------------------------------------
# sinks: in memory, or completed blocks on disk with resume
# ------------------------------------------------------------------------------------------------------
class _MemorySink:
    def __init__(self, rows: int, cols: int, k: int) -> None:
        self.prob = np.full((rows, cols, k), np.nan, dtype=np.float32)
        self.bur = np.full((rows, cols, k), np.nan, dtype=np.float32)
        self.ood = np.full((rows, cols), np.nan, dtype=np.float32)
        self.reason = np.zeros((rows, cols), dtype=np.uint8)

    def done(self, sl: slice) -> bool:
        return False

    def write(self, sl: slice, prob, bur, ood, reason) -> None:
        self.prob[sl], self.bur[sl], self.ood[sl], self.reason[sl] = prob, bur, ood, reason


def _partial_dir(out: Path) -> Path:
    """The working folder of an output file: ``OUT.partial`` beside it."""
    return out.with_name(out.name + ".partial")


_RESUME_HINT = (
    ": the completed blocks are kept in {dir}; free some space, then rerun with --resume (resume=True) "
    "to continue from them"
)


class _PartialSink:
    """Completed blocks as ``OUT.partial/rows_<r0>_<r1>.npz`` files, each written atomically.

    The folder is xrfnb's when it holds a ``manifest.json`` of format ``xrfnb-pigment-maps-partial``
    (written first, before any block). Only the files xrfnb writes there (the manifest, ``rows_*.npz``
    and their ``.tmp`` files, recognised by name) are ever deleted; a folder of that name that is not
    xrfnb's is refused, and anything else found in xrfnb's folder is left alone (the folder then stays).
    """

    def __init__(self, out: Path, manifest: dict[str, Any], resume: bool, bytes_left: int = 0) -> None:
        self.out = out
        self.dir = _partial_dir(out)
        self.manifest = manifest
        self.bytes_left = bytes_left  # still to write (blocks and final file), for the no-space message
        self.completed: set[tuple[int, int]] = set()
        exists = self.dir.is_dir() and not self.dir.is_symlink()
        if exists and resume and (self.dir / "manifest.json").exists():
            self._load_existing()
            return
        if exists:
            if not self._is_ours():
                raise FormatError(
                    f"{self.dir} exists and is not an xrfnb working folder (no xrfnb manifest.json; it "
                    f"holds {', '.join(sorted(p.name for p in self.dir.iterdir())[:5])}): xrfnb never "
                    f"deletes what it did not write; move that folder away or choose another output"
                )
            self._clear()
        else:
            try:
                self.dir.mkdir()
            except OSError as exc:
                raise _write_error(exc, self.dir / "manifest.json", _NPZ_OVERHEAD_BYTES) from None
        try:
            _write_json_atomic(self.dir / "manifest.json", manifest)
        except OSError as exc:
            raise _write_error(exc, self.dir / "manifest.json", _NPZ_OVERHEAD_BYTES) from None

    def _is_ours(self) -> bool:
        """The folder holds xrfnb's manifest, or nothing but xrfnb's files (a run killed before the
        manifest was in place), or nothing at all."""
        try:
            manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") == _PARTIAL_FORMAT:
            return True
        names = [p.name for p in self.dir.iterdir()]
        return all(n == ".manifest.json.tmp" for n in names)

    def _clear(self) -> None:
        """Delete the files xrfnb wrote in the folder (by name), nothing else."""
        for p in self.dir.iterdir():
            if _PARTIAL_ENTRY.fullmatch(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink()

    def _load_existing(self) -> None:
        try:
            old = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(
                f"cannot resume: {self.dir / 'manifest.json'} is unreadable ({exc}); "
                f"delete {self.dir} or run "
                "without --resume to start over"
            ) from None
        if not isinstance(old, dict) or old.get("format") != _PARTIAL_FORMAT:
            raise FormatError(
                f"cannot resume: {self.dir} is not an xrfnb working folder (its manifest.json is not "
                "xrfnb's); move that folder away or choose another output"
            )
        for key in ("format", "input", "model", "shape", "block_rows"):
            if old.get(key) != self.manifest.get(key):
                raise DataError(
                    f"cannot resume: the partial results in {self.dir} were made with a different {key} "
                    f"({old.get(key)!r} != {self.manifest.get(key)!r}); run without --resume to start over"
                )
        for p in self.dir.iterdir():
            m = _BLOCK_FILE.fullmatch(p.name)
            if m is None:
                continue
            block = slice(int(m.group(1)), int(m.group(2)))
            problem = self._check_block(p, block)
            if problem is None:
                self.completed.add((block.start, block.stop))
                continue
            _log.warning(
                "damaged block file %s (%s): computing rows %d-%d again", p, problem, block.start, block.stop
            )
            with contextlib.suppress(OSError):
                p.unlink()

    def _check_block(self, path: Path, sl: slice) -> str | None:
        """Why a block file cannot be used (truncated, unreadable, wrong arrays), or None."""
        rows, cols = self.manifest["shape"]
        k = len(self.manifest["model"]["classes"])
        n = sl.stop - sl.start
        if not 0 <= sl.start < sl.stop <= rows:
            return f"rows outside the scan's {rows}"
        expect = {"probability": (n, cols, k), "buried_probability": (n, cols, k), "ood_score": (n, cols),
                  "mask_reason": (n, cols)}
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on errors too
                if sorted(z.files) != sorted(_BLOCK_ARRAYS):
                    return f"arrays {sorted(z.files)}"
                for name, shape in expect.items():
                    a = z[name]  # reads the whole member: a truncated file fails its CRC or its size here
                    if a.shape != shape:
                        return f"{name} has shape {a.shape}, expected {shape}"
        except Exception as exc:  # zipfile, zlib, numpy and OS errors alike: redo the block
            return f"{type(exc).__name__}: {exc}"
        return None

    def done(self, sl: slice) -> bool:
        return (sl.start, sl.stop) in self.completed

    def write(self, sl: slice, prob, bur, ood, reason) -> None:
        target = self.dir / f"rows_{sl.start:07d}_{sl.stop:07d}.npz"
        tmp = self.dir / f".{target.name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, probability=prob, buried_probability=bur, ood_score=ood, mask_reason=reason)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _write_error(exc, target, self.bytes_left, _RESUME_HINT.format(dir=self.dir)) from None
        self.completed.add((sl.start, sl.stop))
        with contextlib.suppress(OSError):
            self.bytes_left = max(0, self.bytes_left - target.stat().st_size)

    def read(self, sl: slice) -> dict[str, np.ndarray]:
        path = self.dir / f"rows_{sl.start:07d}_{sl.stop:07d}.npz"
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on errors too
                return {n: z[n] for n in z.files}
        except Exception as exc:  # damaged after it was checked: say which file
            raise FormatError(
                f"block file {path} is damaged ({type(exc).__name__}: {exc}); rerun with --resume "
                "(resume=True) to compute its rows again"
            ) from None

    def assemble(
        self, classes, colors, thresholds, ood_threshold, metadata, slices: list[slice], element_maps
    ) -> None:
        rows, cols = self.manifest["shape"]
        needed = _maps_file_bytes(rows, cols, len(classes), element_maps)
        hint = _RESUME_HINT.format(dir=self.dir)
        _check_free_space(self.out.parent, needed, self.out, hint)
        with atomic_path(self.out) as tmp, _h5_writer(tmp, self.out, needed, hint) as (f, failed):
            _write_header(f, classes, colors, thresholds, ood_threshold, metadata)
            d = _create_map_datasets(f, rows, cols, len(classes))
            for sl in slices:
                if failed():
                    break
                z = self.read(sl)
                d["probability"][sl] = z["probability"]
                d["buried_probability"][sl] = z["buried_probability"]
                d["ood_score"][sl] = z["ood_score"]
                d["mask_reason"][sl] = z["mask_reason"]
                d["mask"][sl] = z["mask_reason"] != MASK_OK
            if element_maps is not None and not failed():
                _write_element_maps(f, element_maps)
        self.remove()

    def remove(self) -> None:
        """Delete xrfnb's files and then the folder, if nothing else is left in it."""
        with contextlib.suppress(OSError):
            self._clear()
            self.dir.rmdir()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------------------------------------------
# the public entry point
# ------------------------------------------------------------------------------------------------------
def _model_identity(model: Any) -> dict[str, Any]:
    return {
        "name": str(getattr(model, "name", type(model).__name__)),
        "classes": list(model.classes),
        "thresholds": [round(float(t), 6) for t in np.asarray(model.thresholds).reshape(-1)],
        "ood_threshold": round(float(model.ood_threshold), 6),
        "precision": str(getattr(model, "precision", "float32")),
    }


def _input_identity(scan: Scan) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "shape": list(scan.shape),
        "dtype": str(np.dtype(scan.counts.dtype)),
        "calibration": scan.calibration.to_dict(),
    }
    source = scan.metadata.get("source") or getattr(getattr(scan.counts, "file", None), "filename", None)
    if source:
        ident["source"] = str(Path(str(source)).resolve())
        with contextlib.suppress(OSError):
            st = os.stat(str(source))
            ident["size"] = st.st_size
            ident["mtime_ns"] = st.st_mtime_ns
    return ident


def _resolve_model(model: Any) -> Any:
    if model is None or isinstance(model, str | os.PathLike):
        # the model room loads torch (~2 s): imported when a model is named, so that reading maps
        # (PigmentMaps.from_hdf5, xrfnb info, reports) never pays for it
        from ..model.model import load_model

        return load_model("default" if model is None else model)
    for attr in ("classes", "colors", "thresholds", "ood_threshold", "identify_batch"):
        if not hasattr(model, attr):
            raise ModelError(f"model {model!r} has no {attr!r}: pass a PigmentModel or a model name")
    return model


def _as_scan(scan: Any) -> Scan:
    if isinstance(scan, Scan):
        return scan

    if isinstance(scan, Spectrum):
        return Scan.from_spectrum(scan)
    raise DataError(f"map_pigments needs a Scan (or a Spectrum), got {type(scan).__name__}")


def map_pigments(
    scan: Scan,
    model: Any = None,
    *,
    chunk_pixels: int = _DEFAULT_CHUNK_PIXELS,
    batch_pixels: int = _DEFAULT_BATCH_PIXELS,
    progress: bool | Callable[[int, int], object] = True,
    element_maps: bool = False,
    instrument: Any = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    saturation_counts: float | None = None,
    use_dask: bool | None = None,
) -> PigmentMaps:
    """Pigment maps of a whole scan, streamed block by block with bounded memory.

    Parameters
    ----------
    scan : Scan
        The scan, shape (rows, cols, channels); counts may be in memory, an open HDF5 dataset, or a
        :class:`dask.array.Array` (then the work runs with dask, on a ``dask.distributed`` cluster if a
        client is active).
    model : PigmentModel, str or path, optional
        The model, or a name/path for :func:`xrfnb.load_model`; default ``"default"``.
    chunk_pixels : int
        Pixels read per block (whole rows, aligned to the HDF5 chunks). Peak memory is about
        ``2 x chunk_pixels x channels x itemsize`` bytes for the spectra (one block in use, the next
        being read in a background thread) plus the model's working memory for ``batch_pixels`` spectra.
    batch_pixels : int
        Spectra passed to the model at once (in the scan's dtype; the model rebins them to its grid).
    progress : bool or callable
        True: a progress bar (tqdm) on stderr. A callable ``progress(done_pixels, total_pixels)`` is called
        instead of drawing a bar (a dashboard or notebook widget): once at the start, after every finished
        block (streaming; on the dask path after every finished dask task, as a share of the tasks), and with
        ``done_pixels == total_pixels`` when the pigment maps are complete. It runs in the thread that calls
        ``map_pigments``; an exception it raises stops the run (streaming: after the current block, whose
        results stay resumable; dask: once the running computation ends).
    element_maps : bool
        Also fit element maps (:func:`xrfnb.fit_elements`) and keep them alongside. If the fit is
        impossible (e.g. no element detected) the pigment maps are still returned, without element maps,
        and ``metadata["element_maps_error"]`` says why.
    instrument : Instrument or str, optional
        Instrument for the element fit (default: ``scan.metadata["instrument"]`` or ``"bruker-m6"``).
    out : path-like, optional
        Write the maps to this HDF5 file while mapping (completed blocks go to ``OUT.partial/`` first and
        the file appears atomically at the end); the returned maps then read from it lazily.
    resume : bool
        With ``out``: continue from the completed blocks of an interrupted run.
    saturation_counts : float, optional
        A channel at or above this value marks the pixel saturated; default: the maximum of an integer
        dtype (a clipped counter), none for float data.
    use_dask : bool, optional
        Run with dask on the active scheduler (a ``dask.distributed`` client if one exists, else local
        threads). Default: only when the counts already are a dask array. With True, an HDF5-backed scan
        is wrapped in a dask array whose tasks open the file by path (see :func:`dask_scan`), so workers of
        a cluster that share the file system can read it. The dask path ignores ``resume``; with ``out``
        the maps are written (atomically) when the computation ends.

    Returns
    -------
    PigmentMaps
        Probabilities (rows, cols, K); invalid pixels (all-zero, saturated, NaN/inf or negative counts) are
        masked and counted in ``metadata["masked"]`` and :meth:`PigmentMaps.summary`.
    """
    scan = _as_scan(scan)
    model = _resolve_model(model)
    chunk_pixels = int(chunk_pixels)
    batch_pixels = int(batch_pixels)
    if chunk_pixels < 1 or batch_pixels < 1:
        raise DataError(f"chunk_pixels and batch_pixels must be >= 1, got {chunk_pixels}, {batch_pixels}")
    if saturation_counts is None:
        saturation_counts = _default_saturation(scan.counts.dtype)
    rows, cols, _ = scan.shape
    classes = tuple(model.classes)
    k = len(classes)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _check_output(out_path, scan)
    t0 = time.perf_counter()
    metadata: dict[str, Any] = {
        "source": str(scan.metadata.get("source", "")),
        "model": str(getattr(model, "name", type(model).__name__)),
        "model_precision": str(getattr(model, "precision", "float32")),
        "pixel_size_um": scan.pixel_size_um,
        "calibration": scan.calibration.to_dict(),
        "shape": [rows, cols],
    }

    if use_dask or (use_dask is None and _is_dask(scan.counts)):
        # the client receives the whole maps: packed (2 K + 2 planes) and then split into their arrays
        _check_memory(2 * rows * cols * (2 * k + 2) * 4, rows, cols, k)
        if out_path is not None:
            _check_free_space(out_path.parent, _maps_file_bytes(rows, cols, k), out_path)
        scan = dask_scan(scan, rows_per_chunk=scan.block_rows(chunk_pixels))
        prob, bur, ood, reason = _map_dask(scan, model, saturation_counts, batch_pixels, progress)
        if callable(progress):
            progress(rows * cols, rows * cols)
        sink: Any = None
    else:
        step = scan.block_rows(chunk_pixels)
        slices = [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        if out_path is not None:
            manifest = {
                "format": _PARTIAL_FORMAT,
                "input": _input_identity(scan),
                "model": _model_identity(model),
                "shape": [rows, cols],
                "block_rows": step,
            }
            hint = _RESUME_HINT.format(dir=_partial_dir(out_path))

            def needed(todo: list[slice]) -> int:  # bytes still to write: the blocks left, then the file
                blocks = sum(_block_file_bytes((sl.stop - sl.start) * cols, k) for sl in todo)
                return blocks + _maps_file_bytes(rows, cols, k)

            if not (resume and _partial_dir(out_path).is_dir()):  # nothing created before this check
                _check_free_space(out_path.parent, needed(slices), out_path)
            sink = _PartialSink(out_path, manifest, resume)
            sink.bytes_left = needed([sl for sl in slices if not sink.done(sl)])
            if resume:
                _check_free_space(out_path.parent, sink.bytes_left, out_path, hint)
        else:
            _check_memory(rows * cols * ((2 * k + 1) * 4 + 2), rows, cols, k)
            sink = _MemorySink(rows, cols, k)
        metadata["timing_s"] = _stream(scan, model, sink, slices, saturation_counts, batch_pixels, progress)

    elapsed = time.perf_counter() - t0
    em = None
    if element_maps:
        t_em = time.perf_counter()
        if progress is True:  # the sum spectrum and the element detection take seconds before the fit's bar
            _note("element maps: summing the scan's spectra, detecting its elements, setting up the fit ...")
        try:
            em = _element_maps(scan, instrument, progress is True)
        except FitError as exc:  # the pigment maps stand on their own: keep them, say why
            metadata["element_maps_error"] = str(exc)
        if progress is True and em is not None:
            elements = ", ".join(getattr(em, "elements", ()))
            _note(f"element maps: {elements} fitted in {time.perf_counter() - t_em:.1f} s")
    metadata["elapsed_s"] = round(elapsed, 3)
    metadata["spectra_per_s"] = round(rows * cols / max(elapsed, 1e-9), 1)

    if isinstance(sink, _PartialSink):
        masked = _count_reasons_blocks(sink, slices)
        metadata["masked"] = masked
        sink.assemble(classes, model.colors, model.thresholds, model.ood_threshold, metadata, slices, em)
        maps = PigmentMaps.from_hdf5(out_path, lazy=True)
        return dataclasses.replace(maps, element_maps=em) if em is not None else maps
    if isinstance(sink, _MemorySink):
        prob, bur, ood, reason = sink.prob, sink.bur, sink.ood, sink.reason
    metadata["masked"] = {name: int((reason == code).sum()) for code, name in MASK_REASONS.items()}
    maps = PigmentMaps(
        classes=classes,
        probability=prob,
        buried_probability=bur,
        ood_score=ood,
        thresholds=np.asarray(model.thresholds, dtype=np.float32),
        ood_threshold=float(model.ood_threshold),
        mask=reason != MASK_OK,
        colors=tuple(model.colors),
        element_maps=em,
        metadata=metadata,
        mask_reason=reason,
    )
    if out_path is not None:
        maps.to_hdf5(out_path)
    return maps


def _check_output_path(out: Path) -> None:
    """Refuse, before anything is written, an output that cannot become a file."""
    if out.is_dir():
        raise FormatError(
            f"cannot write pigment maps to {out}: it is a folder; give a file name, e.g. {out / 'maps.h5'}"
        )
    if not out.parent.is_dir():
        raise FormatError(f"cannot write {out}: folder {out.parent} does not exist")
    work = _partial_dir(out)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise FormatError(
            f"cannot write {out}: its working folder {work} exists and is not a folder xrfnb made; "
            "move it away or choose another output"
        )


def _check_input_outside_working_folder(out: Path, source: str | os.PathLike) -> None:
    """Refuse an input inside ``OUT.partial/``, which xrfnb clears and removes."""
    work = _partial_dir(out).resolve()
    src = Path(source).resolve()
    if src == work or work in src.parents:
        raise FormatError(
            f"the input {source} lies inside {work}, the working folder of {out} (xrfnb clears it and "
            "removes it when the maps are complete): move the input elsewhere or choose another output"
        )


def _check_output(out: Path, scan: Scan) -> None:
    _check_output_path(out)
    sources = {scan.metadata.get("source"), getattr(getattr(scan.counts, "file", None), "filename", None)}
    for source in filter(None, sources):
        _check_input_outside_working_folder(out, str(source))
        same = out.resolve() == Path(str(source)).resolve()
        if not same and out.exists() and Path(str(source)).exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, str(source))
        if same:
            raise FormatError(f"refusing to overwrite the input file {source} with pigment maps")


def _available_memory_bytes() -> int | None:
    """Memory this process can still use: the smaller of the system's available memory (psutil, else
    ``MemAvailable`` of /proc/meminfo, else free pages) and what a cgroup limit leaves; None if unknown."""
    avail: int | None = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        if avail is None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(limit_file).read_text().strip())  # "max" (no limit) fails here
            left = max(0, limit - int(Path(usage_file).read_text().strip()))
            avail = left if avail is None else min(avail, left)
            break
    return avail


def _check_memory(needed_bytes: int, rows: int, cols: int, k: int) -> None:
    """Refuse up front maps that cannot fit in memory (instead of a MemoryError, or swapping for hours)."""
    avail = _available_memory_bytes()
    if avail is not None and needed_bytes > avail:
        raise DataError(
            f"pigment maps of {rows} x {cols} pixels with {k} classes need about {_fmt_bytes(needed_bytes)} "
            f"of memory and about {_fmt_bytes(avail)} is available: pass out='maps.h5' to map_pigments "
            "(the command line: xrfnb identify SCAN -o maps.h5) to stream them to disk instead"
        )


def _count_reasons_blocks(sink: _PartialSink, slices: list[slice]) -> dict[str, int]:
    counts = dict.fromkeys(MASK_REASONS.values(), 0)
    for sl in slices:
        reason = sink.read(sl)["mask_reason"]
        for code, name in MASK_REASONS.items():
            counts[name] += int((reason == code).sum())
    return counts


def _stream(
    scan: Scan,
    model: Any,
    sink: Any,
    slices: list[slice],
    saturation_counts: float | None,
    batch_pixels: int,
    progress: bool | Callable[[int, int], object],
) -> dict[str, float]:
    """Read -> identify -> write over the row blocks; returns seconds spent per stage.

    ``read`` is the time spent reading blocks (in the background thread), ``wait`` the part of it the
    main thread waited for, ``identify`` masking plus the model, ``write`` the sink.
    """
    from tqdm.auto import tqdm

    timing = {"read": 0.0, "wait": 0.0, "identify": 0.0, "write": 0.0}
    rows, cols, _ = scan.shape
    todo = [sl for sl in slices if not sink.done(sl)]
    lt_all = scan.live_time_s

    fast = ChunkReader.maybe(scan.counts)
    done_px = rows * cols - sum((s.stop - s.start) * cols for s in todo)  # finished before (resume)

    def read(sl: slice) -> np.ndarray:
        t = time.perf_counter()
        block = fast.read_rows(sl.start, sl.stop) if fast is not None else np.asarray(scan.counts[sl])
        timing["read"] += time.perf_counter() - t
        return block

    with (
        tqdm(
            total=rows * cols,
            initial=done_px,
            unit="px",
            unit_scale=True,
            desc="pigment maps",
            disable=progress is not True,
            smoothing=0.1,
        ) as bar,
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrfnb-read") as pool,
        contextlib.closing(fast) if fast is not None else contextlib.nullcontext(),
    ):
        report = progress if callable(progress) else None
        if report is not None:
            report(done_px, rows * cols)
        # read the next block in a background thread while the model works on this one
        pending = pool.submit(read, todo[0]) if todo else None
        for i, sl in enumerate(todo):
            t0 = time.perf_counter()
            block = pending.result()
            t1 = time.perf_counter()
            pending = pool.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            lt = lt_all[sl] if isinstance(lt_all, np.ndarray) else lt_all
            prob, bur, ood, reason = _process_block(
                block, model, scan.calibration, lt, saturation_counts, batch_pixels
            )
            del block
            t2 = time.perf_counter()
            sink.write(sl, prob, bur, ood, reason)
            t3 = time.perf_counter()
            timing["wait"] += t1 - t0
            timing["identify"] += t2 - t1
            timing["write"] += t3 - t2
            bar.update((sl.stop - sl.start) * cols)
            done_px += (sl.stop - sl.start) * cols
            if report is not None:
                report(done_px, rows * cols)
    return {k: round(v, 3) for k, v in timing.items()}


def _read_rows_by_path(path: str, dataset: str, r0: int, r1: int) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f[dataset][r0:r1])


def dask_scan(scan: Scan, rows_per_chunk: int | None = None) -> Scan:
    """The same scan with its counts as a :class:`dask.array.Array` of whole-row blocks.

    An HDF5-backed scan becomes tasks that open the file read-only *by path* (they pickle, so they run on
    ``dask.distributed`` workers that see the same file system); an in-memory scan is wrapped with
    :func:`dask.array.from_array`; a dask scan is returned unchanged.

    Parameters
    ----------
    scan : Scan
        Shape (rows, cols, channels).
    rows_per_chunk : int, optional
        Rows per dask chunk (default: :meth:`Scan.block_rows`, aligned to the HDF5 chunks).
    """
    import dask
    import dask.array as da

    if _is_dask(scan.counts):
        return scan
    rows, cols, n_ch = scan.shape
    step = int(rows_per_chunk or scan.block_rows())
    counts = scan.counts
    try:
        import h5py

        is_h5 = isinstance(counts, h5py.Dataset)
    except ImportError:  # pragma: no cover
        is_h5 = False
    if is_h5:
        path, name = str(counts.file.filename), str(counts.name)
        read = dask.delayed(_read_rows_by_path, pure=True)
        blocks = [
            da.from_delayed(
                read(path, name, r0, min(rows, r0 + step)),
                shape=(min(rows, r0 + step) - r0, cols, n_ch),
                dtype=counts.dtype,
            )
            for r0 in range(0, rows, step)
        ]
        arr = da.concatenate(blocks, axis=0)
    else:
        arr = da.from_array(counts, chunks=(step, cols, n_ch))
    return dataclasses.replace(scan, counts=arr)


def _map_dask(
    scan: Scan,
    model: Any,
    saturation_counts: float | None,
    batch_pixels: int,
    progress: bool | Callable[[int, int], object],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import dask.array as da

    k = len(model.classes)
    counts = scan.counts.rechunk({2: -1})
    lt = scan.live_time_s
    fn = functools.partial(
        _dask_block,
        model=model,
        calibration=scan.calibration,
        live_time_s=None if isinstance(lt, np.ndarray) else lt,
        saturation_counts=saturation_counts,
        batch_pixels=batch_pixels,
    )
    args: list[Any] = [counts, "ijc"]
    if isinstance(lt, np.ndarray):
        args += [da.from_array(lt, chunks=(counts.chunks[0], counts.chunks[1])), "ij"]
    packed = da.blockwise(
        fn,
        "ijz",
        *args,
        new_axes={"z": 2 * k + 2},
        concatenate=True,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    total_px = int(scan.shape[0] * scan.shape[1])
    result = _compute(packed, progress, total_px)
    prob = result[..., :k]
    bur = result[..., k : 2 * k]
    ood = np.ascontiguousarray(result[..., 2 * k])
    reason = result[..., 2 * k + 1].astype(np.uint8)
    return np.ascontiguousarray(prob), np.ascontiguousarray(bur), ood, reason


def _compute(arr: Any, progress: bool | Callable[[int, int], object], total_px: int) -> np.ndarray:
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if callable(progress):
        return _compute_reporting(arr, progress, total_px, client)
    if client is not None:
        if progress:
            from distributed import progress as dprogress

            fut = client.compute(arr)
            with contextlib.suppress(Exception):
                dprogress(fut, notebook=False)
            return np.asarray(fut.result())
        return np.asarray(client.compute(arr).result())
    if progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="pigment maps"):
            return np.asarray(arr.compute())
    return np.asarray(arr.compute())


def _compute_reporting(
    arr: Any, report: Callable[[int, int], object], total_px: int, client: Any
) -> np.ndarray:
    """Compute a (rows, cols, z) dask array, calling ``report(done_pixels, total_pixels)`` as blocks finish.

    On a ``dask.distributed`` client the row-column blocks are submitted as futures and reported as they
    complete; with a local scheduler a :class:`dask.callbacks.Callback` reports the share of finished tasks.
    The callback always runs in the calling thread.
    """
    report(0, total_px)
    if client is not None:
        from distributed import as_completed

        blocks = arr.to_delayed()  # object array (n_row_blocks, n_col_blocks, 1) of delayed blocks
        futures = client.compute(list(blocks.ravel()))
        where = {f.key: i for i, f in enumerate(futures)}
        sizes = [r * c for r in arr.chunks[0] for c in arr.chunks[1]]
        results: list[Any] = [None] * len(futures)
        done = 0
        for fut in as_completed(futures):
            i = where[fut.key]
            results[i] = fut.result()
            done += sizes[i]
            report(done, total_px)
        grid = np.empty(blocks.shape[:2], dtype=object)
        for i, part in enumerate(results):
            grid[np.unravel_index(i, grid.shape)] = part
        return np.concatenate([np.concatenate(list(row), axis=1) for row in grid], axis=0)

    import queue

    from dask.callbacks import Callback

    finished: queue.SimpleQueue[int] = queue.SimpleQueue()

    class _Count(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            self.total = max(1, len(state["ready"]) + len(state["waiting"]) + len(state["running"]))

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            finished.put(len(state["finished"]))

    counter = _Count()
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with counter:
                out["value"] = np.asarray(arr.compute())
        except BaseException as exc:  # re-raised in the calling thread
            out["error"] = exc
        finally:
            finished.put(-1)

    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrfnb-dask")
    with worker:
        worker.submit(run)
        while True:
            n = finished.get()
            if n < 0:
                break
            total = getattr(counter, "total", 0)
            if total:
                report(min(total_px - 1, total_px * n // total), total_px)
    if "error" in out:
        raise out["error"]
    return out["value"]


def _note(message: str) -> None:
    """A progress message on stderr that does not break a tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _element_maps(scan: Scan, instrument: Any, progress: bool) -> Any:
    return fit_elements(scan, resolve_instrument(instrument, scan.metadata), progress=progress)
