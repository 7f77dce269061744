"""Energy calibration from identified peaks: :func:`calibrate` and its :class:`CalibrationFit`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .._errors import CalibrationError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.lines import line_energy_keV, parse_line

if TYPE_CHECKING:
    from ..core.spectrum import Spectrum

__all__ = ['CalibrationFit', 'calibrate']


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
