"""Response of a silicon drift detector: line shape, escape peaks, pile-up and counting noise.

For a photon of energy E absorbed in the detector, :class:`DetectorResponse` gives the probability of
each channel:

* a Gaussian photopeak whose FWHM adds electronic noise and Fano statistics in quadrature
  (:meth:`xrfnb.Instrument.fwhm_keV`);
* Si K escape peaks at ``E - E(Si Ka)`` and (30 times weaker) ``E - E(Si Kb)`` for ``E`` above the Si K
  edge, with the escape probability of Reed and Ware [1]_ for normal incidence on a thick detector::

      eta(E) = 1/2 * omega_K * (1 - 1/r_K) * p_line * [1 - (mu_line / mu_E) ln(1 + mu_E / mu_line)]

  (``omega_K`` Si K fluorescence yield, ``r_K`` K jump ratio, ``p_line`` share of K emission in the
  line, ``mu`` Si attenuation coefficients at ``E`` and at the line energy; all from xraylib);
* incomplete charge collection (ICC) near the entrance, after Campbell et al. [2]_: photons absorbed in
  an effective layer of thickness ``icc_layer_um`` below the entrance lose part of their charge. Their
  share ``P_icc(E) = (1 - exp(-mu rho d)) / (1 - exp(-mu rho T))`` is split between a flat shelf from 0
  to ``E`` (``shelf_share``) and an exponential tail of decay length ``tail_length_fwhm * FWHM(E)``
  convolved with the Gaussian (the hypermet form of PyMca and of Van Gysel et al. [3]_). ``P_icc`` rises
  steeply towards low energies and jumps at the Si K edge, as observed [2]_;
* partial collection anywhere in the crystal (``partial_collection``): a share of the photons of every
  energy, absorbed where the drift field does not collect all their charge (the crystal's border and
  back), lands evenly between 0 and ``E``. It is the shelf that remains at high energies, where the
  entrance layer absorbs almost nothing: behind 630 um of Al, where no primary photon below 8 keV
  reaches the sample, the Bruker M4 blanks (``../shared/data/real/bruker_m4_rh50kv``) hold 4.6e-4 of
  their counts per keV at 4-5 keV, about 0.9 % of the 15-25 keV photons spread over 0-20 keV;
* partial collection at the back of the crystal (``back_icc_layer_um``): photons absorbed within an
  effective layer ``b`` at the back (the readout side, where drift rings and oxide lie and the field does
  not collect all the charge) land evenly between 0 and ``E``. Their share of the absorbed photons is
  ``P_back(E) = exp(-mu rho T) (exp(mu rho b) - 1) / (1 - exp(-mu rho T))`` (Beer-Lambert absorption at
  depth ``T - b`` to ``T``): nil for photons absorbed near the entrance (below about 8 keV in 450 um Si),
  rising towards ``b / T`` for photons that cross the crystal and are absorbed evenly through it.
  The M4 blanks call for it rather than the energy-independent share above: their 4-5 keV floor per
  count is 5.6e-4 behind Al 630 um (mean energy above 8 keV 17.3 keV), 5.2e-4 behind Al + Ti (16.1 keV,
  softer) and 7.3e-4 behind Al + Ti + Cu (18.7 keV, harder); ``P_back`` fitted to the first gives
  0.98 and 0.79 of the other two, the energy-independent share 1.18 and 0.70 (the softer spectrum's
  shelf was 1.6x the measured one);
* Compton scattering in the crystal (``detector_compton``): a photon whose first interaction in the
  silicon is Compton scattering and whose scattered photon leaves the crystal records only the recoil
  electron's energy ``E - E'(theta)``, between 0 and the Compton edge (1.45 keV for 20 keV photons, 3.0
  keV for 30 keV, 5.4 keV for 40 keV). Per photo-absorbed photon there are
  ``r(E) = (sigma_C / tau) <P_esc>`` such events, ``sigma_C`` and ``tau`` silicon's incoherent and
  photo-absorption cross-sections, ``theta`` drawn from xraylib's ``DCS_Compt`` (Klein-Nishina with the
  incoherent scattering function) and ``P_esc`` the chance that the scattered photon crosses the rest of
  the crystal (exponential depth of the first interaction, straight path out through the nearer face).
  The detector efficiency then counts these events too (``1 + r`` times the photo-absorbed share), and
  each row gives them the share ``r / (1 + r)`` (photons from 10 keV up; below, the edge lies in the
  noise peak). In the M4 blanks they are the floor below 1.5 keV and
  0.6-0.8 of it at 1.5-3.5 keV (behind Al 100 um, 2.25-2.5 keV: 536 counts simulated without them,
  837 with them, 1,403 measured);
* pile-up (:meth:`DetectorResponse.pileup`): two photons within the pulse-pair resolving time ``tau``
  are recorded as one at the summed energy; at count rate ``R`` a fraction ``p = 2 R tau`` of recorded
  events pile up, and the sum spectrum is the self-convolution of the single-photon spectrum [4]_.

Rows of :meth:`DetectorResponse.matrix` sum to one (less what falls outside the channel range), so a
batch of spectra is ``intensities (B, L) @ matrix (L, channels)``.

References
----------
.. [1] S.J.B. Reed, N.G. Ware, "Escape peaks and internal fluorescence in X-ray spectra recorded with
   lithium drifted silicon detectors", J. Phys. E 5 (1972) 582-584.
.. [2] J.L. Campbell, J.A. Maxwell, T. Papp, G. White, "Si(Li) detector lineshapes: contributions from
   atomic physics and detector properties", X-Ray Spectrom. 26 (1997) 223-231.
.. [3] M. Van Gysel, P. Lemberge, P. Van Espen, "Description of Compton peaks in energy-dispersive X-ray
   fluorescence spectra", X-Ray Spectrom. 32 (2003) 139-147.
.. [4] P.J. Statham, "Pile-up rejection: limitations and corrections for residual errors in energy-
   dispersive spectrometers", X-Ray Spectrom. 6 (1977) 94-103.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import xraylib
from scipy import fft as sp_fft
from scipy.ndimage import gaussian_filter1d

from .._errors import DataError, InstrumentError
from .materials import mass_attenuation_cm2_g

if TYPE_CHECKING:
    from .instrument import Instrument

#: 2 sqrt(2 ln 2): FWHM / sigma of a Gaussian
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Mn K-alpha energy (keV), the conventional energy at which detector resolution is quoted
MN_KA_KEV = 5.8988

__all__ = [
    "FWHM_PER_SIGMA",
    "MN_KA_KEV",
    "DetectorResponse",
    "escape_fraction",
    "icc_fraction",
    "poisson_counts",
    "si_ka_keV",
    "si_kb_keV",
]

_SI_DENSITY_G_CM3 = 2.33
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
#: line-shape windows reach this many sigma (Gaussian) and tail decay lengths (exponential tail)
_N_SIGMA = 7.0
_N_BETA = 14.0
#: lines per window-size group in DetectorResponse.matrix
_CHUNK_LINES = 64


@dataclasses.dataclass(frozen=True)
class _SiK:
    """Si K-shell data (xraylib): line energies (rate-weighted), shares of K emission, edge, yield, jump."""

    ka_keV: float
    kb_keV: float
    p_ka: float
    p_kb: float
    edge_keV: float
    omega_k: float
    jump_k: float


@functools.cache
def _si_k() -> _SiK:
    z = 14

    def group(members: tuple[str, ...]) -> tuple[float, float]:
        rates, energies = [], []
        for m in members:
            try:
                rates.append(xraylib.RadRate(z, getattr(xraylib, f"{m}_LINE")))
                energies.append(xraylib.LineEnergy(z, getattr(xraylib, f"{m}_LINE")))
            except ValueError:
                continue
        total = sum(rates)
        return sum(r * e for r, e in zip(rates, energies, strict=True)) / total, total

    ka, p_ka = group(("KL2", "KL3"))
    kb, p_kb = group(("KM2", "KM3"))
    return _SiK(
        ka, kb, p_ka, p_kb, xraylib.EdgeEnergy(z, xraylib.K_SHELL), xraylib.FluorYield(z, xraylib.K_SHELL),
        xraylib.JumpFactor(z, xraylib.K_SHELL),
    )  # fmt: skip


def si_ka_keV() -> float:
    """Energy of Si K-alpha (rate-weighted KL2/KL3), keV: the energy the main escape peak is shifted by."""
    return _si_k().ka_keV


def si_kb_keV() -> float:
    """Energy of Si K-beta (rate-weighted KM2/KM3), keV: the shift of the weak K-beta escape peak."""
    return _si_k().kb_keV


def escape_fraction(energy_keV: np.ndarray | float, line: str = "all") -> np.ndarray:
    """Probability that a photon absorbed in a Si detector loses a Si K photon (escape peak).

    Reed and Ware (1972) for normal incidence on a thick detector (see the module docstring), applied
    to Si Ka and Si Kb with their shares of K emission; zero at and below the Si K edge (1.839 keV).

    Parameters
    ----------
    energy_keV : array_like
        Photon energies, keV, shape (n,).
    line : {"all", "Ka", "Kb"}, optional
        Which escaping Si line (``"all"``: their sum).

    Returns
    -------
    numpy.ndarray
        Escape probability per absorbed photon, shape like ``energy_keV``.
    """
    if line not in ("all", "Ka", "Kb"):
        raise InstrumentError(f"escape line must be 'all', 'Ka' or 'Kb', got {line!r}")
    e = np.asarray(energy_keV, dtype=float)
    flat = np.atleast_1d(e).ravel()
    si = _si_k()
    out = np.zeros_like(flat)
    above = flat > si.edge_keV
    if above.any():
        mu_e = mass_attenuation_cm2_g("Si", flat[above])
        for name, e_line, share in (("Ka", si.ka_keV, si.p_ka), ("Kb", si.kb_keV, si.p_kb)):
            if line in ("all", name):
                ratio = float(mass_attenuation_cm2_g("Si", np.array([e_line]))[0]) / mu_e
                out[above] += (
                    0.5 * si.omega_k * (1.0 - 1.0 / si.jump_k) * share * (1.0 - ratio * np.log1p(1.0 / ratio))
                )
    return out.reshape(e.shape)


def back_icc_fraction(energy_keV: np.ndarray | float, back_layer_um: float, thickness_um: float
                      ) -> np.ndarray:
    """Share of absorbed photons absorbed within ``back_layer_um`` of the back of the crystal.

    ``exp(-mu rho T) (exp(mu rho b) - 1) / (1 - exp(-mu rho T))`` for Si attenuation ``mu`` (xraylib),
    back layer ``b`` and detector thickness ``T``; shape like ``energy_keV``.

    Examples
    --------
    >>> f = back_icc_fraction([5.0, 17.0, 40.0], 10.0, 450.0)
    >>> bool(f[0] < 1e-6 < f[1] < f[2] < 10.0 / 450.0)
    True
    """
    e = np.asarray(energy_keV, dtype=float)
    if back_layer_um <= 0:
        return np.zeros(e.shape)
    flat = np.maximum(np.atleast_1d(e).ravel(), 0.1)
    mu_rho = mass_attenuation_cm2_g("Si", flat) * _SI_DENSITY_G_CM3 * 1e-4  # per um
    b = min(float(back_layer_um), float(thickness_um))
    # exp(-mu T) expm1(mu b) / -expm1(-mu T), written as exp(-mu (T - b)) - exp(-mu T) over it, stably
    out = (np.exp(-mu_rho * (thickness_um - b)) * -np.expm1(-mu_rho * b)) / -np.expm1(-mu_rho * thickness_um)
    return np.clip(out, 0.0, 1.0).reshape(e.shape)


#: photon energies of the detector-Compton tables, keV: below 10 keV the Compton edge (under 0.2 keV) lies
#: in the noise peak and r < 1e-3, so those events are left out
_COMPTON_GRID_KEV = np.arange(10.0, 100.001, 0.25)
#: scattering angles (xraylib's DCS_Compt cannot extrapolate to 0) and depths of the first interaction
#: (Gauss-Legendre nodes on [0, 1] of the crystal)
_COMPTON_THETA = np.linspace(0.05, np.pi - 1e-3, 90)
_DEPTH_X, _DEPTH_W = np.polynomial.legendre.leggauss(24)
_ELECTRON_REST_KEV = 510.99895


@functools.lru_cache(maxsize=1)
def _compton_dcs_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scattered energies (G, A), ``DCS_Compt sin(theta)`` (G, A) and ``sigma_C / tau`` (G,) of Si on
    :data:`_COMPTON_GRID_KEV` x :data:`_COMPTON_THETA` (xraylib), computed once."""
    g, th = _COMPTON_GRID_KEV, _COMPTON_THETA
    e_out = g[:, None] / (1.0 + g[:, None] / _ELECTRON_REST_KEV * (1.0 - np.cos(th)[None, :]))
    dcs = np.array([[xraylib.DCS_Compt(14, float(e), float(t)) for t in th] for e in g]) * np.sin(th)
    ratio = np.array([xraylib.CS_Compt(14, float(e)) / xraylib.CS_Photo(14, float(e)) for e in g])
    return e_out, dcs, ratio


@functools.lru_cache(maxsize=16)
def _compton_table(thickness_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid energy: the ratio r (G,) of escaping Compton events to photo-absorbed photons, the
    deposited energies (G, A), keV, and their weights (G, A), each row summing to 1."""
    e_out, dcs, ratio = _compton_dcs_table()
    g, th = _COMPTON_GRID_KEV, _COMPTON_THETA
    t_cm = float(thickness_um) * 1e-4
    mu = mass_attenuation_cm2_g("Si", g) * _SI_DENSITY_G_CM3  # (G,) 1/cm
    mu_out = (mass_attenuation_cm2_g("Si", e_out.ravel()) * _SI_DENSITY_G_CM3).reshape(e_out.shape)
    # depth of the first interaction: exp(-mu z) on [0, T], normalised
    z = 0.5 * (_DEPTH_X + 1.0) * t_cm  # (D,)
    pz = np.exp(-mu[:, None] * z[None, :]) * _DEPTH_W[None, :]
    pz = pz / pz.sum(axis=1, keepdims=True)  # (G, D)
    cos_t = np.cos(th)
    with np.errstate(divide="ignore"):
        path = np.where(cos_t[:, None] > 0, (t_cm - z[None, :]) / cos_t[:, None],
                        z[None, :] / np.abs(cos_t[:, None]))  # (A, D) straight out through the nearer face
    p_esc = np.einsum("gad,gd->ga", np.exp(-mu_out[:, :, None] * np.minimum(path, 1e3)[None]), pz)
    w = dcs * p_esc
    r = ratio * np.trapezoid(w, th, axis=1) / np.trapezoid(dcs, th, axis=1)
    return r, g[:, None] - e_out, w / w.sum(axis=1, keepdims=True)


def compton_escape_ratio(energy_keV: np.ndarray | float, thickness_um: float) -> np.ndarray:
    """Detector Compton events whose scattered photon leaves the crystal, per photo-absorbed photon.

    Interpolated on a 0.25 keV grid from 10 to 100 keV; 0 below 10 keV (their Compton edge, under
    0.2 keV, lies in the noise peak).

    Examples
    --------
    >>> r = compton_escape_ratio([5.0, 20.0, 40.0], 450.0)
    >>> bool(r[0] == 0.0 < r[1] < r[2])
    True
    """
    e = np.asarray(energy_keV, dtype=float)
    r = _compton_table(float(thickness_um))[0]
    g = _COMPTON_GRID_KEV
    out = np.where(e >= g[0], np.interp(e, g, r), 0.0)
    return np.asarray(out, dtype=float).reshape(e.shape)


def _compton_deposits(energy_keV: np.ndarray, thickness_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Deposited energies (L, A), keV, and weights (L, A) of the escaping Compton events of photons of
    ``energy_keV`` (L,) >= 10 keV: the nearest grid energy's angular weights, its energies scaled to the
    photon's own Compton edge."""
    _, dep, w = _compton_table(float(thickness_um))
    g = _COMPTON_GRID_KEV
    i = np.clip(np.rint((energy_keV - g[0]) / (g[1] - g[0])).astype(np.int64), 0, g.size - 1)
    def edge(x: np.ndarray) -> np.ndarray:  # the Compton edge 2 E^2 / (m c^2 + 2 E)
        return 2.0 * x * x / (_ELECTRON_REST_KEV + 2.0 * x)

    return dep[i] * (edge(energy_keV) / edge(g[i]))[:, None], w[i]


def icc_fraction(energy_keV: np.ndarray | float, icc_layer_um: float, thickness_um: float) -> np.ndarray:
    """Share of absorbed photons absorbed within the incomplete-charge-collection layer.

    ``(1 - exp(-mu rho d)) / (1 - exp(-mu rho T))`` for Si attenuation ``mu`` (xraylib), layer ``d`` and
    detector thickness ``T``; shape like ``energy_keV``.
    """
    e = np.asarray(energy_keV, dtype=float)
    flat = np.maximum(np.atleast_1d(e).ravel(), 0.1)
    if icc_layer_um <= 0:
        return np.zeros(e.shape)
    mu_rho = mass_attenuation_cm2_g("Si", flat) * _SI_DENSITY_G_CM3 * 1e-4  # per um
    out = np.expm1(-mu_rho * icc_layer_um) / np.expm1(-mu_rho * thickness_um)
    return np.clip(out, 0.0, 1.0).reshape(e.shape)


# Abramowitz & Stegun 7.1.26: erfc(x) = t P(t) exp(-x^2), t = 1 / (1 + p x), x >= 0, |error| < 1.5e-7.
# Several times faster than scipy.special.erfc/erfcx on float32, which matters for training.
_AS_P = 0.3275911
_AS_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def _erfcx_nonneg(x: np.ndarray) -> np.ndarray:
    """exp(x^2) erfc(x) for x >= 0 (absolute error of erfc below 1.5e-7), dtype of ``x``."""
    dt = x.dtype.type
    t = dt(1.0) / (dt(1.0) + dt(_AS_P) * x)
    poly = dt(_AS_A[0])
    for a in _AS_A[1:]:
        poly = poly * t + dt(a)
    return t * poly


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc(x) for any real x (absolute error below 1.5e-7), dtype of ``x``."""
    dt = x.dtype.type
    ax = np.abs(x)
    y = _erfcx_nonneg(ax) * np.exp(-ax * ax)
    return np.where(x >= 0, y, dt(2.0) - y)


#: what :class:`DetectorResponse` reads of an instrument (an :class:`~xrfnb.Instrument`; the detector
#: sits below the instrument in the physics room, so it checks these rather than the class)
_INSTRUMENT_FIELDS = (
    "channel_energy_keV", "fwhm_keV", "tail_length_fwhm", "pileup_time_s", "detector_thickness_um",
    "escape", "icc_layer_um", "shelf_share",
)


class DetectorResponse:
    """Detector response matrix and pile-up of an :class:`~xrfnb.Instrument`.

    Parameters
    ----------
    instrument : Instrument
        Supplies FWHM(E), line-shape parameters, pile-up resolving time and, by default, the channels.
    channel_energy_keV : numpy.ndarray, optional
        Energies of the channel centres, keV, strictly increasing, shape (channels,). Default: the
        instrument's calibration over ``n_channels``.

    Notes
    -----
    Channel contents are the line-shape density at the channel centre times the channel width. Use
    ``float32`` products for speed: :meth:`matrix` returns ``float32``.
    """

    def __init__(self, instrument: Instrument, channel_energy_keV: np.ndarray | None = None) -> None:
        if not all(hasattr(instrument, a) for a in _INSTRUMENT_FIELDS):
            raise InstrumentError(
                f"DetectorResponse needs an xrfnb.Instrument, got {type(instrument).__name__}"
            )
        self.instrument = instrument
        if channel_energy_keV is None:
            energies = instrument.channel_energy_keV
        else:
            energies = np.asarray(channel_energy_keV, dtype=float)
            if energies.ndim != 1 or energies.size < 2:
                raise DataError(
                    f"channel energies must be a 1-D array of >= 2 values, got shape {energies.shape}"
                )
            if not (np.all(np.isfinite(energies)) and np.all(np.diff(energies) > 0)):
                raise DataError("channel energies must be finite and strictly increasing")
        self.channel_energy_keV = energies
        self.n_channels = energies.size
        self._width = np.gradient(energies)
        self._index = np.arange(self.n_channels)
        # linear calibration? (then pile-up needs no resampling)
        gains = np.diff(energies)
        self._linear = bool(np.allclose(gains, gains[0], rtol=1e-6, atol=0))

    # ------------------------------------------------------------------ helpers
    def _fractional_channel(self, energy_keV: np.ndarray) -> np.ndarray:
        """Fractional channel index of energies (linear extrapolation outside the range)."""
        e = self.channel_energy_keV
        ch = np.interp(energy_keV, e, self._index.astype(float))
        lo = energy_keV < e[0]
        hi = energy_keV > e[-1]
        ch[lo] = (energy_keV[lo] - e[0]) / (e[1] - e[0])
        ch[hi] = self.n_channels - 1 + (energy_keV[hi] - e[-1]) / (e[-1] - e[-2])
        return ch

    def components(self, line_energy_keV: np.ndarray) -> dict[str, np.ndarray]:
        """Per-line areas of the response parts (each shape (L,)), summing to 1.

        Keys: ``"peak"``, ``"escape"`` (= ``"escape_ka"`` + ``"escape_kb"``), ``"tail"``, ``"shelf"``;
        and ``"fwhm_keV"``, ``"escape_ka_keV"``, ``"escape_kb_keV"`` (escape-peak energies).
        """
        inst = self.instrument
        e = np.atleast_1d(np.asarray(line_energy_keV, dtype=float))
        esc_ka = escape_fraction(e, "Ka") if inst.escape else np.zeros_like(e)
        esc_kb = escape_fraction(e, "Kb") if inst.escape else np.zeros_like(e)
        icc = icc_fraction(e, inst.icc_layer_um, inst.detector_thickness_um)
        partial = float(getattr(inst, "partial_collection", 0.0)) + back_icc_fraction(
            e, float(getattr(inst, "back_icc_layer_um", 0.0)), inst.detector_thickness_um)
        shelf = icc * inst.shelf_share + partial
        tail = icc * (1.0 - inst.shelf_share)
        if getattr(inst, "detector_compton", False):
            r = compton_escape_ratio(e, inst.detector_thickness_um)
        else:
            r = np.zeros_like(e)
        k = 1.0 / (1.0 + r)  # the photo-absorbed events' share of all recorded events
        return {
            "peak": (1.0 - esc_ka - esc_kb - icc - partial) * k,
            "escape": (esc_ka + esc_kb) * k,
            "escape_ka": esc_ka * k,
            "escape_kb": esc_kb * k,
            "tail": tail * k,
            "shelf": shelf * k,
            "compton": r * k,
            "fwhm_keV": inst.fwhm_keV(e),
            "escape_ka_keV": e - si_ka_keV(),
            "escape_kb_keV": e - si_kb_keV(),
        }

    # ------------------------------------------------------------------ response matrix
    def matrix(self, line_energy_keV: np.ndarray, *, dtype: type = np.float32) -> np.ndarray:
        """Response of the detector to monochromatic photons.

        Parameters
        ----------
        line_energy_keV : array_like
            Photon energies, keV, shape (L,); must be > 0.
        dtype : numpy dtype, optional
            Output dtype (float32 by default).

        Returns
        -------
        numpy.ndarray
            Counts per channel per detected photon, shape (L, channels): Gaussian photopeak, Si escape
            peak, exponential tail and shelf. Each row sums to 1 less what falls outside the channels.

        Raises
        ------
        InstrumentError
            For non-finite or non-positive energies.
        """
        e = np.atleast_1d(np.asarray(line_energy_keV, dtype=float))
        if e.ndim != 1:
            raise InstrumentError(f"line energies must be a 1-D array, got shape {e.shape}")
        if e.size and not (np.all(np.isfinite(e)) and np.all(e > 0)):
            raise InstrumentError("line energies must be finite and > 0 keV")
        n_lines, n_ch = e.size, self.n_channels
        if n_lines == 0:
            return np.zeros((0, n_ch), dtype=dtype)
        f32 = np.float32
        parts = self.components(e)
        sigma = parts["fwhm_keV"] / FWHM_PER_SIGMA
        beta = self.instrument.tail_length_fwhm * parts["fwhm_keV"]
        w_min = float(self._width.min())
        centre = self._fractional_channel(e)
        shelf_density = parts["shelf"] / e  # per keV, flat between 0 keV and the line

        # Each part is evaluated on a window of channels around its line. Lines of similar width share a
        # window size (chunks of lines sorted by width), so the cost is ~L x window, not L x channels. The
        # output is padded on both sides so that windows never need clipping; the padding is cut off.
        order = np.argsort(sigma + beta, kind="stable")
        chunks = np.array_split(order, max(1, math.ceil(n_lines / _CHUNK_LINES)))
        halves = [
            (
                math.ceil((_N_SIGMA * sigma[c].max() + _N_BETA * beta[c].max()) / w_min) + 1,
                math.ceil(_N_SIGMA * sigma[c].max() / w_min) + 1,
            )
            for c in chunks
        ]
        # escape peaks as extra Gaussians: (row, energy, area) for Si Ka and Si Kb escape
        has_esc = np.nonzero(parts["escape"] > 0)[0]
        esc_idx = np.concatenate([has_esc, has_esc])
        e_esc = np.concatenate([parts["escape_ka_keV"][has_esc], parts["escape_kb_keV"][has_esc]])
        a_esc = np.concatenate([parts["escape_ka"][has_esc], parts["escape_kb"][has_esc]])
        s_esc = np.maximum(self.instrument.fwhm_keV(np.maximum(e_esc, 0.0)) / FWHM_PER_SIGMA, 1e-3)
        # chunks never mix the Ka and Kb halves: a row must appear once per scatter-add (flat[idx] += ...)
        n_e = has_esc.size
        n_split = max(1, math.ceil(n_e / _CHUNK_LINES))
        esc_chunks = [
            *np.array_split(np.arange(n_e), n_split),
            *np.array_split(np.arange(n_e, 2 * n_e), n_split),
        ]
        esc_halves = [math.ceil(_N_SIGMA * s_esc[c].max() / w_min) + 1 if c.size else 0 for c in esc_chunks]
        pad_lo = max(max(h[0] for h in halves), max(esc_halves)) + 1
        pad_hi = max(max(h[1] for h in halves), max(esc_halves)) + 1
        n_pad = n_ch + pad_lo + pad_hi
        ch_pad = np.arange(-pad_lo, n_ch + pad_hi)
        e_pad = np.concatenate(
            [
                self.channel_energy_keV[0] + ch_pad[:pad_lo] * self._width[0],
                self.channel_energy_keV,
                self.channel_energy_keV[-1] + (ch_pad[pad_lo + n_ch :] - (n_ch - 1)) * self._width[-1],
            ]
        )
        w_pad = np.concatenate(
            [np.full(pad_lo, self._width[0]), self._width, np.full(pad_hi, self._width[-1])]
        ).astype(f32)
        first_positive = int(np.searchsorted(e_pad, 0.0, side="right"))
        out = np.zeros((n_lines, n_pad), dtype=dtype)
        flat = out.reshape(-1)

        def window(rows: np.ndarray, c0: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, ...]:
            """Padded start column, flat indices, energies and widths of windows [c0 - lo, c0 + hi]."""
            start = c0 - lo + pad_lo
            cols = start[:, None] + np.arange(lo + hi + 1)[None, :]
            return start, cols + (rows * n_pad)[:, None], e_pad[cols], w_pad[cols]

        def centre_channel(centre_ch: np.ndarray, lo: int, hi: int) -> np.ndarray:
            """Nearest channel, clipped so that [c - lo, c + hi] stays inside the padded range."""
            return np.clip(np.rint(centre_ch).astype(np.int64), lo - pad_lo, n_ch - 1 + pad_hi - hi)

        # --- photopeak, exponential tail and the shelf's edge -----------------------------------------
        # The window of a chunk is split: a core of +/- ~7 sigma around the line, where the hypermet
        # functions are evaluated in full, and the far low-energy side, where the Gaussian and the
        # complementary error functions have reached their limits (0 and 2 to < 1e-10), leaving the pure
        # exponential tail and the flat shelf. This keeps the cost of long tails low.
        for chunk, (lo, hi) in zip(chunks, halves, strict=True):
            s_c, b_c = sigma[chunk], beta[chunk]
            lo_core = min(lo, math.ceil(float(np.max(_N_SIGMA * s_c + s_c * s_c / b_c)) / w_min) + 1)
            c0 = centre_channel(centre[chunk], lo, hi)
            k = (s_c / b_c)[:, None].astype(f32)
            amp_peak = (parts["peak"][chunk] / (_SQRT2PI * s_c))[:, None].astype(f32)
            amp_tail = (parts["tail"][chunk] / (2.0 * b_c))[:, None].astype(f32)
            amp_shelf = (0.5 * shelf_density[chunk])[:, None].astype(f32)
            # core
            _, idx, x, wcol = window(chunk, c0, lo_core, hi)
            u = ((x - e[chunk, None]) / s_c[:, None]).astype(f32)
            g0 = np.exp(f32(-0.5) * u * u)
            b = (u + k) * f32(1.0 / _SQRT2)
            # tail density exp(u k + k^2/2) erfc(b) / (2 beta), evaluated stably through erfcx
            with np.errstate(over="ignore", under="ignore"):
                tail = np.where(
                    b >= 0,
                    g0 * _erfcx_nonneg(np.maximum(b, f32(0.0))),
                    np.exp(np.minimum(u * k + f32(0.5) * k * k, f32(50.0))) * _erfc(np.minimum(b, f32(0))),
                )
            step = _erfc(u * f32(1.0 / _SQRT2)) * (x > 0)  # the shelf's edge, smoothed by the resolution
            flat[idx] += ((amp_peak * g0 + amp_tail * tail + amp_shelf * step) * wcol).astype(
                dtype, copy=False
            )
            # far low-energy side: 2 exp(u k + k^2/2) tail and the full shelf
            start = c0 - lo_core + pad_lo
            if lo > lo_core:
                start, idx, x, wcol = window(chunk, c0, lo, -lo_core - 1)
                u = ((x - e[chunk, None]) / s_c[:, None]).astype(f32)
                with np.errstate(under="ignore"):
                    far = f32(2.0) * amp_tail * np.exp(u * k + f32(0.5) * k * k)
                flat[idx] += ((far + f32(2.0) * amp_shelf * (x > 0)) * wcol).astype(dtype, copy=False)
            # the flat shelf below the window, from 0 keV up to the window's first column
            for r, s0 in zip(chunk.tolist(), start.tolist(), strict=True):
                if s0 > first_positive and shelf_density[r] > 0:
                    out[r, first_positive:s0] += shelf_density[r] * w_pad[first_positive:s0]

        # --- escape peaks: Gaussians at E - E(Si Ka), E - E(Si Kb), resolution of the remaining energy --
        c_esc = self._fractional_channel(e_esc)
        for chunk, half in zip(esc_chunks, esc_halves, strict=True):
            if not chunk.size:
                continue
            rows = esc_idx[chunk]
            _, idx, x, wcol = window(rows, centre_channel(c_esc[chunk], half, half), half, half)
            u = ((x - e_esc[chunk, None]) / s_esc[chunk, None]).astype(f32)
            amp = (a_esc[chunk] / (_SQRT2PI * s_esc[chunk]))[:, None].astype(f32)
            flat[idx] += (amp * np.exp(f32(-0.5) * u * u) * wcol).astype(dtype, copy=False)
        out = out[:, pad_lo : pad_lo + n_ch]
        # --- Compton events in the crystal: the recoil energies, smoothed by the resolution at 1 keV ----
        rows = np.nonzero(parts["compton"] > 0)[0]
        if rows.size:
            dep, w = _compton_deposits(e[rows], float(self.instrument.detector_thickness_um))
            pos = self._fractional_channel(dep.ravel()).reshape(dep.shape)
            lo = np.floor(pos).astype(np.int64)
            frac = pos - lo
            hist = np.zeros((rows.size, n_ch))
            r_idx = np.broadcast_to(np.arange(rows.size)[:, None], lo.shape)
            for c, wt in ((lo, w * (1.0 - frac)), (lo + 1, w * frac)):
                ok = (c >= 0) & (c < n_ch)
                np.add.at(hist, (r_idx[ok], c[ok]), wt[ok])
            s_ch = float(self.instrument.fwhm_keV(1.0)) / FWHM_PER_SIGMA / w_min
            hist = gaussian_filter1d(hist, s_ch, axis=1, mode="constant")
            out[rows] += (parts["compton"][rows, None] * hist).astype(dtype)
        return np.ascontiguousarray(out)

    # ------------------------------------------------------------------ pile-up
    def pileup(
        self,
        expected: np.ndarray,
        count_rate_cps: float | np.ndarray,
        *,
        resolving_time_s: float | None = None,
    ) -> np.ndarray:
        """Add pile-up sum peaks to expected spectra.

        At input count rate ``R`` and pulse-pair resolving time ``tau`` a recorded event is the sum of two
        photons with probability ``p = 2 R tau`` (capped at 0.5); the recorded spectrum is
        ``N [(1 - p) s + (p / 2) (s * s)]`` with ``s`` the normalised single-photon spectrum, ``s * s``
        its self-convolution in energy (sum of the two energies) and ``N`` the expected counts. Sum
        peaks thus grow as ``R^2`` at fixed live time (``N`` grows as ``R``). Higher-order pile-up is
        neglected.

        Parameters
        ----------
        expected : numpy.ndarray
            Expected counts per channel, shape (channels,) or (B, channels).
        count_rate_cps : float or numpy.ndarray
            Input count rate, counts/s, scalar or shape (B,).
        resolving_time_s : float, optional
            Pulse-pair resolving time, s; default the instrument's ``pileup_time_s``.

        Returns
        -------
        numpy.ndarray
            Expected counts with pile-up, same shape as ``expected``: float32 for float32 input (about
            3 times faster: the self-convolution is an FFT per spectrum), float64 otherwise.
        """
        y = np.asarray(expected)
        if y.shape[-1] != self.n_channels:
            raise DataError(
                f"expected spectra have {y.shape[-1]} channels, the detector has {self.n_channels}"
            )
        tau = self.instrument.pileup_time_s if resolving_time_s is None else float(resolving_time_s)
        squeeze = y.ndim == 1
        y2 = np.atleast_2d(y).astype(np.float64 if y.dtype != np.float32 else np.float32, copy=False)
        rate = np.broadcast_to(np.asarray(count_rate_cps, dtype=float), (y2.shape[0],))
        if np.any(rate < 0) or tau < 0:
            raise DataError("count rate and resolving time must be >= 0")
        p = np.minimum(2.0 * rate * tau, 0.5)
        total = y2.sum(axis=1)
        safe = np.where(total > 0, total, 1.0)
        s = y2 / safe[:, None]
        conv = self._self_convolve(s)
        out = (1.0 - p)[:, None] * y2 + (0.5 * p * total)[:, None] * conv
        out = out.astype(y2.dtype, copy=False)
        return out[0] if squeeze else out

    def _self_convolve(self, s: np.ndarray) -> np.ndarray:
        """Distribution of the sum energy of two photons drawn from ``s`` (B, C), on the channel grid."""
        n = self.n_channels
        nfft = sp_fft.next_fast_len(2 * n - 1, real=True)
        f = sp_fft.rfft(s, nfft, axis=1)  # scipy keeps float32 in float32
        conv = sp_fft.irfft(f * f, nfft, axis=1)[:, : 2 * n - 1]
        np.maximum(conv, 0.0, out=conv)  # FFT round-off
        # sum bin m = i + j holds pairs of channels i, j. On a linear grid its energy is exactly
        # E_i + E_j = 2 E_0 + g m, i.e. channel m + E_0 / g: a constant shift, done with two slices.
        e = self.channel_energy_keV
        if self._linear:
            shift = e[0] / (e[1] - e[0])
            whole = math.floor(shift)
            frac = shift - whole
            res = np.zeros_like(s)
            for sh, wgt in ((whole, 1.0 - frac), (whole + 1, frac)):
                # res[:, k] += wgt * conv[:, k - sh] for valid k
                k0, k1 = max(0, sh), min(n, 2 * n - 1 + sh)
                if k1 > k0 and wgt > 0:
                    res[:, k0:k1] += wgt * conv[:, k0 - sh : k1 - sh]
            return res
        # on a curved grid the sum bin is placed at 2 E(m / 2) (error q (i - j)^2 / 2)
        m = np.arange(2 * n - 1)
        half = 0.5 * m
        e_half = np.interp(half, self._index, e)
        over = half > n - 1
        e_half[over] = e[-1] + (half[over] - (n - 1)) * (e[-1] - e[-2])
        ch = self._fractional_channel(2.0 * e_half)
        lo = np.floor(ch).astype(np.int64)
        fr = ch - lo
        res = np.zeros_like(s)
        for off, wgt in ((0, 1.0 - fr), (1, fr)):
            idx = lo + off
            ok = (idx >= 0) & (idx < n)
            np.add.at(res.T, idx[ok], (conv[:, ok] * wgt[ok]).T)
        return res


def poisson_counts(
    expected: np.ndarray,
    *,
    total_counts: float | np.ndarray | None = None,
    live_time_s: float | np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
    dtype: type = np.int32,
) -> np.ndarray:
    """Draw Poisson counts from expected spectra.

    Parameters
    ----------
    expected : numpy.ndarray
        Expected spectra, shape (channels,) or (B, channels). With ``total_counts`` they are shapes
        (any scale); with ``live_time_s`` they are count rates in counts/s per channel; with neither they
        are expected counts.
    total_counts : float or numpy.ndarray, optional
        Expected total counts per spectrum (scalar or (B,)): each spectrum is scaled to this sum before
        sampling, so the drawn total has this expectation.
    live_time_s : float or numpy.ndarray, optional
        Live time in seconds (scalar or (B,)); the expected counts are ``expected * live_time_s``.
    rng : numpy.random.Generator or int, optional
        Random generator or seed.
    dtype : numpy dtype, optional
        Integer dtype of the result.

    Returns
    -------
    numpy.ndarray
        Counts, same shape as ``expected``.
    """
    if total_counts is not None and live_time_s is not None:
        raise DataError("give either total_counts or live_time_s, not both")
    lam = np.asarray(expected, dtype=float)
    if lam.size and not (np.all(np.isfinite(lam)) and lam.min() >= 0):
        raise DataError("expected spectra must be finite and >= 0")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if total_counts is not None:
        tc = np.asarray(total_counts, dtype=float)
        if np.any(tc < 0) or not np.all(np.isfinite(tc)):
            raise DataError(f"total_counts must be finite and >= 0, got {total_counts!r}")
        sums = lam.sum(axis=-1, keepdims=True)
        if np.any((sums == 0) & (np.expand_dims(tc, -1) > 0)):
            raise DataError("cannot scale an all-zero expected spectrum to a positive total count")
        lam = lam / np.where(sums > 0, sums, 1.0) * np.expand_dims(tc, -1)
    elif live_time_s is not None:
        lt = np.asarray(live_time_s, dtype=float)
        if np.any(lt < 0) or not np.all(np.isfinite(lt)):
            raise DataError(f"live_time_s must be finite and >= 0, got {live_time_s!r}")
        lam = lam * np.expand_dims(lt, -1)
    return gen.poisson(lam).astype(dtype)
