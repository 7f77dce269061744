"""Energy calibration: channel <-> energy, and fitting a calibration from identified peaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ._errors import CalibrationError, XRFNBError
from ._lines import line_energy_keV, parse_line

if TYPE_CHECKING:
    from ._spectrum import Spectrum

__all__ = ["CalibrationFit", "EnergyCalibration", "calibrate"]


@dataclasses.dataclass(frozen=True)
class EnergyCalibration:
    """Channel-to-energy relation ``E(ch) = offset_keV + gain_keV * ch + quadratic_keV * ch**2``.

    Channels are numbered from 0. The relation must increase over every channel it is used on:
    a non-positive gain is rejected here, and a quadratic term that turns the curve over inside the
    spectrum is rejected by :meth:`check_monotonic` (called by every reader and by :class:`Spectrum`).

    Parameters
    ----------
    offset_keV : float
        Energy of channel 0, keV.
    gain_keV : float
        keV per channel (> 0).
    quadratic_keV : float, optional
        keV per channel squared.
    """

    offset_keV: float
    gain_keV: float
    quadratic_keV: float = 0.0

    def __post_init__(self) -> None:
        for name in ("offset_keV", "gain_keV", "quadratic_keV"):
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise CalibrationError(f"calibration {name} must be a number, got {value!r}") from None
            if not np.isfinite(value):
                raise CalibrationError(f"calibration {name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)
        if self.gain_keV <= 0:
            raise CalibrationError(
                f"calibration gain must be > 0 keV/channel, got {self.gain_keV!r}: "
                "check the file header or pass a calibration explicitly"
            )

    def __str__(self) -> str:
        """The relation as a person reads it, e.g. ``E = -0.006 keV + 11.93 eV x channel``."""
        text = f"E = {self.offset_keV:.4g} keV + {self.gain_keV * 1e3:.4g} eV x channel"
        if self.quadratic_keV:
            text += f" + {self.quadratic_keV * 1e3:.3g} eV x channel^2"
        return text

    def check_monotonic(self, n_channels: int) -> EnergyCalibration:
        """Raise :class:`CalibrationError` unless energy increases over channels ``0 .. n_channels-1``."""
        if self.quadratic_keV != 0.0 and n_channels > 1:
            # dE/dch = gain + 2 q ch must stay > 0 on [0, n-1]
            slope_end = self.gain_keV + 2.0 * self.quadratic_keV * (n_channels - 1)
            if slope_end <= 0:
                raise CalibrationError(
                    f"quadratic calibration (q={self.quadratic_keV:g} keV/ch^2) is not monotonic over "
                    f"{n_channels} channels: energy turns over at channel "
                    f"{-self.gain_keV / (2 * self.quadratic_keV):.0f}"
                )
        return self

    def energy_keV(self, channel: np.ndarray | float) -> np.ndarray:
        """Energy in keV of (fractional) channel numbers."""
        ch = np.asarray(channel, dtype=float)
        return self.offset_keV + ch * (self.gain_keV + ch * self.quadratic_keV)

    def channel(self, energy_keV: np.ndarray | float) -> np.ndarray:
        """Fractional channel number of energies in keV (inverse of :meth:`energy_keV`)."""
        e = np.asarray(energy_keV, dtype=float)
        if self.quadratic_keV == 0.0:
            return (e - self.offset_keV) / self.gain_keV
        q, g = self.quadratic_keV, self.gain_keV
        disc = g * g + 4.0 * q * (e - self.offset_keV)
        with np.errstate(invalid="ignore"):
            root = np.sqrt(np.maximum(disc, 0.0))
        # numerically stable root of q ch^2 + g ch - (e - offset) = 0
        return 2.0 * (e - self.offset_keV) / (g + root)

    def energies_keV(self, n_channels: int) -> np.ndarray:
        """Energy axis in keV of a spectrum with ``n_channels`` channels, shape (n_channels,)."""
        return self.energy_keV(np.arange(n_channels))

    def to_dict(self) -> dict[str, float]:
        """Plain dictionary (JSON/HDF5 attributes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> EnergyCalibration:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(float(d["offset_keV"]), float(d["gain_keV"]), float(d.get("quadratic_keV", 0.0)))
        except KeyError as exc:
            raise CalibrationError(f"calibration is missing {exc.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class CalibrationFit:
    """Result of :func:`calibrate`.

    Attributes
    ----------
    calibration : EnergyCalibration
        The fitted calibration.
    lines : tuple of str
        The identified lines, in the order given.
    channels : numpy.ndarray
        Refined peak centroids (fractional channels), shape (n_peaks,).
    energies_keV : numpy.ndarray
        Reference energies of the lines (xraylib), shape (n_peaks,).
    residuals_keV : numpy.ndarray
        Fitted minus reference energy per peak, shape (n_peaks,).
    """

    calibration: EnergyCalibration
    lines: tuple[str, ...]
    channels: np.ndarray
    energies_keV: np.ndarray
    residuals_keV: np.ndarray

    @property
    def rms_residual_keV(self) -> float:
        """Root-mean-square residual in keV."""
        return float(np.sqrt(np.mean(self.residuals_keV**2)))


def _refine_centroid(counts: np.ndarray, guess: float, half_width: int) -> float:
    """Centroid of the peak nearest ``guess``: local maximum, then a Gaussian fit over its top.

    A Gaussian is a parabola in log space; it is fitted by weighted least squares to the channels
    above half maximum (baseline: the window minimum), which stays accurate for peaks many channels
    wide where a three-point fit is dominated by counting noise.
    """
    n = counts.size
    lo = max(0, round(guess) - half_width)
    hi = min(n, round(guess) + half_width + 1)
    if hi - lo < 3:
        raise CalibrationError(f"peak guess at channel {guess:g} lies outside the {n}-channel spectrum")
    window = counts[lo:hi].astype(float)
    k = int(np.argmax(window))
    if k == 0 or k == window.size - 1 or window[k] <= 0:
        raise CalibrationError(
            f"no peak maximum within +/-{half_width} channels of channel {guess:g}: "
            "give a closer channel or a wider search window"
        )
    y = window - window.min()
    half = 0.5 * y[k]
    left, right = k, k
    while left > 0 and y[left - 1] > half:
        left -= 1
    while right < y.size - 1 and y[right + 1] > half:
        right += 1
    left, right = min(left, k - 1), max(right, k + 1)
    x = np.arange(left, right + 1, dtype=float)
    top = np.maximum(y[left : right + 1], 0.5)
    a, b, _ = np.polyfit(x, np.log(top), 2, w=np.sqrt(top))
    centre = -b / (2 * a) if a < 0 else float(k)
    return lo + float(np.clip(centre, left, right))


def calibrate(
    spectrum: Spectrum | np.ndarray,
    peaks: Mapping[str, float],
    *,
    quadratic: bool = False,
    search_half_width: int = 15,
) -> CalibrationFit:
    """Fit an energy calibration from identified peaks by least squares.

    Parameters
    ----------
    spectrum : Spectrum or numpy.ndarray
        The spectrum (counts, shape (channels,)) in which the peaks were identified.
    peaks : mapping of str to float
        Line name (``"Co Ka"``, ``"Fe Kb"``, ``"Pb La"``) -> approximate channel of its peak. Each
        centroid is refined within ``search_half_width`` channels of the guess.
    quadratic : bool, optional
        Also fit a quadratic term (needs three or more peaks).
    search_half_width : int, optional
        Half width, in channels, of the window searched around each guess.

    Returns
    -------
    CalibrationFit
        Calibration, refined channels, reference energies and residuals.

    Raises
    ------
    CalibrationError
        Fewer peaks than parameters, unknown lines, no peak near a guess, or a fit that is not monotonic.
    """
    counts = np.asarray(getattr(spectrum, "counts", spectrum), dtype=float)
    n_params = 3 if quadratic else 2
    if len(peaks) < n_params:
        raise CalibrationError(
            f"calibrate needs at least {n_params} identified peaks for a "
            f"{'quadratic' if quadratic else 'linear'} calibration, got {len(peaks)}"
        )
    names, chans, energies = [], [], []
    for name, guess in peaks.items():
        try:
            element, _ = parse_line(name)
            energy = line_energy_keV(element, name.replace(element, "", 1).strip(" -_"))
        except XRFNBError as exc:
            raise CalibrationError(f"cannot use peak {name!r}: {exc}") from None
        names.append(name)
        chans.append(_refine_centroid(counts, float(guess), search_half_width))
        energies.append(energy)
    ch = np.array(chans)
    e = np.array(energies)
    if len(np.unique(np.round(ch, 3))) < n_params:
        raise CalibrationError(
            "the identified peaks do not lie at enough distinct channels to fit a calibration"
        )
    design = np.vander(ch, n_params, increasing=True)
    coef, *_ = np.linalg.lstsq(design, e, rcond=None)
    cal = EnergyCalibration(coef[0], coef[1], coef[2] if quadratic else 0.0).check_monotonic(counts.size)
    return CalibrationFit(cal, tuple(names), ch, e, cal.energy_keV(ch) - e)
