"""Data model: single spectra and (possibly lazy) scans."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .._errors import DataError
from .calibration import EnergyCalibration

__all__ = ["Scan", "Spectrum", "check_counts", "is_dask"]


def check_counts(counts: np.ndarray, where: str) -> None:
    """Reject NaN, infinite and negative counts in a loaded block, naming the first bad position.

    Parameters
    ----------
    counts : numpy.ndarray
        Counts of any shape (a spectrum (channels,), a block of a scan (..., channels)); integer or
        float dtype.
    where : str
        What the counts are (a file name, ``"identify_batch"``): the start of the error message.

    Raises
    ------
    DataError
        Negative, NaN or infinite counts (the first bad index named), or a non-numeric dtype.
    """
    if counts.dtype.kind in "iu":
        if counts.dtype.kind == "i" and counts.size and counts.min() < 0:
            idx = np.unravel_index(int(np.argmin(counts)), counts.shape)
            raise DataError(f"{where}: negative counts ({counts[idx]}) at index {tuple(map(int, idx))}")
        return
    if counts.dtype.kind != "f":
        raise DataError(f"{where}: counts must be numeric, got dtype {counts.dtype}")
    bad = ~np.isfinite(counts)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), counts.shape)
        raise DataError(f"{where}: non-finite counts (NaN or inf) at index {tuple(map(int, idx))}")
    if counts.size and counts.min() < 0:
        idx = np.unravel_index(int(np.argmin(counts)), counts.shape)
        raise DataError(f"{where}: negative counts ({counts[idx]:g}) at index {tuple(map(int, idx))}")


@dataclasses.dataclass(frozen=True, eq=False)
class Spectrum:
    """One XRF spectrum.

    Parameters
    ----------
    counts : numpy.ndarray
        Counts per channel, shape (channels,), non-negative and finite.
    calibration : EnergyCalibration
        Channel-to-energy relation.
    live_time_s : float, optional
        Detector live time in seconds.
    real_time_s : float, optional
        Real (clock) time in seconds.
    metadata : mapping, optional
        Free-form metadata (source file, instrument, position ...).
    """

    counts: np.ndarray
    calibration: EnergyCalibration
    live_time_s: float | None = None
    real_time_s: float | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        where = str(self.metadata.get("source", "spectrum")) if self.metadata else "spectrum"
        if counts.ndim != 1:
            raise DataError(f"{where}: a spectrum's counts must be 1-D, got shape {counts.shape}")
        if counts.size < 2:
            raise DataError(f"{where}: a spectrum needs at least 2 channels, got {counts.size}")
        check_counts(counts, where)
        if not isinstance(self.calibration, EnergyCalibration):
            raise DataError(
                f"{where}: calibration must be an EnergyCalibration, got {type(self.calibration)}"
            )
        self.calibration.check_monotonic(counts.size)
        for name in ("live_time_s", "real_time_s"):
            value = getattr(self, name)
            if value is not None:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise DataError(f"{where}: {name} must be a number, got {value!r}") from None
                if not np.isfinite(value) or value < 0:
                    raise DataError(f"{where}: {name} must be a finite non-negative number, got {value!r}")
                object.__setattr__(self, name, value)
        counts.flags.writeable = False
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return int(self.counts.size)

    @property
    def energy_keV(self) -> np.ndarray:
        """Energy of each channel in keV, shape (channels,)."""
        return self.calibration.energies_keV(self.n_channels)

    @property
    def total_counts(self) -> float:
        """Sum of counts over all channels."""
        return float(self.counts.sum())

    def with_calibration(self, calibration: EnergyCalibration, *, source: str | None = None) -> Spectrum:
        """The same spectrum with another calibration.

        Parameters
        ----------
        calibration : EnergyCalibration
            The new channel-to-energy relation.
        source : str, optional
            Where it came from (``"given to load()"``, ``"fitted to Fe Ka, Pb La"``): recorded in the
            metadata as ``calibration_source``, with ``calibrated=True``.
        """
        meta = dict(self.metadata)
        if source is not None:
            meta.update(calibrated=True, calibration_source=source)
        return dataclasses.replace(self, calibration=calibration, metadata=meta)

    def __repr__(self) -> str:
        return (
            f"Spectrum({self.n_channels} channels, {self.total_counts:.0f} counts, "
            f"{self.calibration}, live_time_s={self.live_time_s})"
        )


def is_dask(a: Any) -> bool:
    """Whether ``a`` is a dask collection (a :class:`dask.array.Array` of counts), without importing dask."""
    return type(a).__module__.startswith("dask")


@dataclasses.dataclass(frozen=True, eq=False)
class Scan:
    """A hyperspectral XRF map: one spectrum per pixel.

    The counts may be lazy: an in-memory :class:`numpy.ndarray`, an open :class:`h5py.Dataset` or a
    :class:`dask.array.Array`. Nothing is read in full unless asked (``np.asarray(scan.counts)``);
    reductions read block by block.

    Parameters
    ----------
    counts : array-like
        Counts, shape (rows, cols, channels).
    calibration : EnergyCalibration
        Channel-to-energy relation shared by all pixels.
    pixel_size_um : float, optional
        Pixel pitch in micrometres.
    live_time_s : float or numpy.ndarray, optional
        Live time per pixel in seconds: a scalar, or shape (rows, cols).
    metadata : mapping, optional
        Free-form metadata.
    """

    counts: Any
    calibration: EnergyCalibration
    pixel_size_um: float | None = None
    live_time_s: float | np.ndarray | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = self.counts
        if not hasattr(counts, "shape") or not hasattr(counts, "dtype"):
            counts = np.asarray(counts)
            object.__setattr__(self, "counts", counts)
        where = str(self.metadata.get("source", "scan")) if self.metadata else "scan"
        if len(counts.shape) != 3:
            raise DataError(
                f"{where}: scan counts must have shape (rows, cols, channels), got {counts.shape}"
            )
        if min(counts.shape) < 1 or counts.shape[2] < 2:
            raise DataError(f"{where}: scan has an empty axis or fewer than 2 channels: shape {counts.shape}")
        if np.dtype(counts.dtype).kind not in "iuf":
            raise DataError(f"{where}: counts must be numeric, got dtype {counts.dtype}")
        self.calibration.check_monotonic(counts.shape[2])
        lt = self.live_time_s
        if lt is not None:
            try:
                lt_arr = np.asarray(lt, dtype=float)
            except (TypeError, ValueError):
                raise DataError(f"{where}: live_time_s must be a number or a (rows, cols) array") from None
            if lt_arr.ndim == 0:
                lt = float(lt_arr)
            elif lt_arr.shape != tuple(counts.shape[:2]):
                raise DataError(
                    f"{where}: live_time_s has shape {lt_arr.shape}, "
                    f"expected a scalar or {tuple(counts.shape[:2])}"
                )
            else:
                lt = lt_arr
            if not np.all(np.isfinite(lt_arr)) or np.any(lt_arr < 0):
                raise DataError(f"{where}: live_time_s must be finite and non-negative")
            object.__setattr__(self, "live_time_s", lt)
        if self.pixel_size_um is not None:
            try:
                pixel = float(self.pixel_size_um)
            except (TypeError, ValueError):
                raise DataError(f"{where}: pixel_size_um must be a number: {self.pixel_size_um!r}") from None
            if not np.isfinite(pixel) or pixel <= 0:
                raise DataError(f"{where}: pixel_size_um must be finite and > 0, got {pixel!r}")
            object.__setattr__(self, "pixel_size_um", pixel)
        object.__setattr__(self, "metadata", dict(self.metadata))

    @classmethod
    def from_spectrum(cls, spectrum: Spectrum, *, metadata: Mapping[str, Any] | None = None) -> Scan:
        """A one-pixel scan (1 x 1 x channels) of a single spectrum.

        Parameters
        ----------
        spectrum : Spectrum
            Its counts, calibration, live time and metadata become the scan's.
        metadata : mapping, optional
            Entries added to the spectrum's metadata.

        Returns
        -------
        Scan

        Examples
        --------
        >>> s = Spectrum(np.arange(8.0), EnergyCalibration(0.0, 0.01), live_time_s=2.0)
        >>> Scan.from_spectrum(s).shape, Scan.from_spectrum(s).live_time_s
        ((1, 1, 8), 2.0)
        """
        return cls(
            np.asarray(spectrum.counts)[None, None, :],
            spectrum.calibration,
            live_time_s=spectrum.live_time_s,
            metadata={**spectrum.metadata, **(metadata or {})},
        )

    def with_calibration(self, calibration: EnergyCalibration, *, source: str | None = None) -> Scan:
        """The same scan (counts not copied) with another calibration.

        Parameters
        ----------
        calibration : EnergyCalibration
            The new channel-to-energy relation.
        source : str, optional
            Where it came from: recorded in the metadata as ``calibration_source``, with
            ``calibrated=True``.
        """
        meta = dict(self.metadata)
        if source is not None:
            meta.update(calibrated=True, calibration_source=source)
        return dataclasses.replace(self, calibration=calibration, metadata=meta)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, cols, channels)."""
        return tuple(int(s) for s in self.counts.shape)  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return self.shape[2]

    @property
    def energy_keV(self) -> np.ndarray:
        """Energy of each channel in keV, shape (channels,)."""
        return self.calibration.energies_keV(self.n_channels)

    @property
    def is_lazy(self) -> bool:
        """True when counts are not an in-memory NumPy array."""
        return not isinstance(self.counts, np.ndarray)

    def pixel_live_time_s(self, row: int, col: int) -> float | None:
        """Live time of one pixel in seconds (None when unknown)."""
        if self.live_time_s is None:
            return None
        if isinstance(self.live_time_s, np.ndarray):
            return float(self.live_time_s[row, col])
        return float(self.live_time_s)

    # -- access ------------------------------------------------------------------------------------
    def __getitem__(self, index: tuple[int, int]) -> Spectrum:
        """``scan[row, col]`` -> :class:`Spectrum` of that pixel (reads one pixel only)."""
        if not (isinstance(index, tuple) and len(index) == 2):
            raise DataError("index a scan with scan[row, col]")
        rows, cols, _ = self.shape
        r, c = (int(i) for i in index)
        if r < 0:
            r += rows
        if c < 0:
            c += cols
        if not (0 <= r < rows and 0 <= c < cols):
            raise DataError(f"pixel ({index[0]}, {index[1]}) is outside the {rows} x {cols} scan")
        block = self.counts[r, c]
        block = np.asarray(block.compute() if is_dask(block) else block)
        meta = {**self.metadata, "pixel": (r, c)}
        return Spectrum(block, self.calibration, live_time_s=self.pixel_live_time_s(r, c), metadata=meta)

    def block_rows(self, max_pixels: int = 65536) -> int:
        """Rows per block for chunked reading: aligned to the storage chunks, about ``max_pixels`` pixels."""
        rows, cols, _ = self.shape
        per = max(1, max_pixels // max(cols, 1))
        chunks = getattr(self.counts, "chunks", None)
        if chunks and not is_dask(self.counts):
            crow = int(chunks[0])
            per = max(crow, (per // crow) * crow)
        elif is_dask(self.counts):
            crow = int(self.counts.chunks[0][0])
            per = max(crow, (per // crow) * crow)
        return min(per, rows)

    def iter_blocks(self, max_pixels: int = 65536) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(row_slice, counts_block)`` over the scan, reading one block of rows at a time.

        Blocks are aligned to the HDF5 or dask chunking so each storage chunk is read once.
        ``counts_block`` has shape (block_rows, cols, channels) and the scan's dtype.
        """
        rows = self.shape[0]
        step = self.block_rows(max_pixels)
        for r0 in range(0, rows, step):
            sl = slice(r0, min(rows, r0 + step))
            block = self.counts[sl]
            block = block.compute() if is_dask(block) else np.asarray(block)
            yield sl, block

    def sum_spectrum(self, max_pixels: int = 65536) -> Spectrum:
        """Sum of all pixel spectra, computed block by block with bounded memory."""
        total = np.zeros(self.n_channels, dtype=np.float64)
        for _, block in self.iter_blocks(max_pixels):
            total += block.reshape(-1, block.shape[-1]).sum(axis=0, dtype=np.float64)
        lt = None
        if self.live_time_s is not None:
            lt = float(
                np.sum(self.live_time_s)
                if isinstance(self.live_time_s, np.ndarray)
                else self.live_time_s * self.shape[0] * self.shape[1]
            )
        check_counts(total, str(self.metadata.get("source", "scan")))
        return Spectrum(
            total, self.calibration, live_time_s=lt, metadata={**self.metadata, "reduction": "sum"}
        )

    def max_pixel_spectrum(self, max_pixels: int = 65536) -> Spectrum:
        """Channel-wise maximum over all pixels (Bruker's "max pixel spectrum"), block by block."""
        out = np.zeros(self.n_channels, dtype=np.float64)
        for _, block in self.iter_blocks(max_pixels):
            np.maximum(out, block.reshape(-1, block.shape[-1]).max(axis=0), out=out)
        check_counts(out, str(self.metadata.get("source", "scan")))
        return Spectrum(out, self.calibration, metadata={**self.metadata, "reduction": "max-pixel"})

    def total_counts_image(self, max_pixels: int = 65536) -> np.ndarray:
        """Total counts per pixel, shape (rows, cols), float64, block by block."""
        img = np.zeros(self.shape[:2], dtype=np.float64)
        for sl, block in self.iter_blocks(max_pixels):
            img[sl] = block.sum(axis=-1, dtype=np.float64)
        return img

    def __repr__(self) -> str:
        rows, cols, ch = self.shape
        kind = type(self.counts).__name__
        return f"Scan({rows} x {cols} pixels x {ch} channels, {kind}, {self.calibration})"
