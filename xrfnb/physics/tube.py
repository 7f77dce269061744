"""X-ray tube spectra after H. Ebel's model: continuum and anode characteristic lines.

The model is the semi-empirical description of thick-target (reflection) X-ray tube spectra by Ebel:

* continuum (bremsstrahlung), a Kramers-type law with Ebel's exponent ``x``::

      dN/dE = 1.35e9 * Z * (E0/E - 1)**x * f(chi)            photons / (s sr mA keV)
      x = 1.109 - 0.00435 Z + 0.00175 E0

* characteristic lines of the K shell (Ebel 1999) and of the L1, L2, L3 subshells (Ebel 2003)::

      N = const_q * (1/S) * R * omega_q * p_line * f(chi)       photons / (s sr mA)

  with the stopping-power factor ``1/S`` and backscatter factor ``R`` of Ebel (1999), eqs. 11-13,
  ``const_K = 6.0e13`` and the subshell constants of Ebel (2003): ``const_L3 = 4.94e13``,
  ``const_L2 = 2.70e13 * f_corr(Z)``, ``const_L1 = 0.71e13 * f_corr(Z)``.

* anode self-absorption of the photons generated at the mean depth of the depth distribution::

      f(chi) = (1 - exp(-2 chi rho_z)) / (2 chi rho_z),   chi = tau(E) * sin(phi) / sin(eps)

  where ``rho_z`` is Love and Scott's mean depth of ionisation (g/cm2) for the overvoltage
  ``U0 = E0 / E_edge`` (lines) or ``U0 = E0 / E`` (continuum), ``phi`` the angle of the electron beam
  and ``eps`` the X-ray take-off angle, both measured from the anode surface, and ``tau`` the
  photo-absorption coefficient of the anode (Ebel uses the photo-absorption coefficient).

All atomic data (fluorescence yields, radiative rates, edge and line energies, atomic weights,
photo-absorption cross sections) come from xraylib. Ebel (2003) multiplies the L constants by a mean
L-shell fluorescence yield; here each subshell's own yield (xraylib ``FluorYield``) is used. Ebel's
conclusion gives 6.0e13 for K lines (used by PyMca's implementation too); his 1999 paper's 5.0e13 is
not used: the Bruker M4 blanks (``../shared/data/real/bruker_m4_rh50kv``) put the scattered Rh K lines at
1.25 times the simulated line-to-continuum ratio with 5.0e13, 1.1 times with 6.0e13
(``benchmarks/bench_physics_real.py``). Ebel validated the model
for 5-50 kV, electron incidence 50-90 deg and take-off 5-90 deg; it is used here up to 100 kV.

References
----------
.. [1] H. Ebel, "X-ray tube spectra", X-Ray Spectrom. 28 (1999) 255-266.
.. [2] H. Ebel, "Lα, Lβ, Lγ ... spectra of X-ray tubes", X-Ray Spectrom. 32 (2003) 46-51.
.. [3] V.D. Scott, G. Love, *Quantitative electron-probe microanalysis* (1983): mean depth of ionisation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np
import xraylib

from .._errors import InstrumentError

__all__ = ["TubeSpectrum", "anode_lines", "anode_z", "ebel_continuum", "tube_spectrum"]

#: Ebel's constant of the continuum, photons / (s sr mA keV)
CONTINUUM_CONST = 1.35e9
#: Ebel's constant of the K lines (his conclusion; PyMca's too), photons / (s sr mA)
K_CONST = 6.0e13
#: Ebel's (2003) constants of the L subshells, photons / (s sr mA)
L_CONST = {"L1": 0.71e13, "L2": 2.70e13, "L3": 4.94e13}
#: z_q b_q of the stopping factor for K and L shells (Ebel 1999, eq. 12)
_ZB = {"K": 2.0 * 0.35, "L": 8.0 * 0.25}

_SHELL_MACRO = {"K": xraylib.K_SHELL, "L1": xraylib.L1_SHELL, "L2": xraylib.L2_SHELL, "L3": xraylib.L3_SHELL}
_LINE_RE = re.compile(r"^(K|L1|L2|L3)([LMNOPQ][1-7]?)_LINE$")


@functools.cache
def _radiative_lines() -> tuple[tuple[str, str, int], ...]:
    """(IUPAC name, initial shell, xraylib macro) of every K and L1-L3 line xraylib knows."""
    out = []
    for attr in dir(xraylib):
        m = _LINE_RE.match(attr)
        if m:
            out.append((m.group(1) + m.group(2), m.group(1), getattr(xraylib, attr)))
    return tuple(sorted(out))


def anode_z(anode: str) -> int:
    """Atomic number of a pure-element tube anode.

    Parameters
    ----------
    anode : str
        Chemical symbol of the anode (``"Rh"``, ``"Mo"``, ``"W"`` ...).

    Returns
    -------
    int
        Atomic number, 4-92.

    Raises
    ------
    InstrumentError
        Not the symbol of an element 4-92.
    """
    try:
        z = xraylib.SymbolToAtomicNumber(str(anode).strip())
    except ValueError:
        z = 0
    if not 4 <= z <= 92:
        raise InstrumentError(
            f"unknown anode material {anode!r}: give the chemical symbol of a pure-element anode "
            "such as 'Rh', 'Mo', 'W', 'Cr', 'Cu' or 'Ag'"
        )
    return z


def _mean_depth_g_cm2(z: int, voltage_kV: float, u0: np.ndarray) -> np.ndarray:
    """Love-Scott mean depth of the ionisation depth distribution (Ebel 1999, eq. 4), g/cm2."""
    logz = math.log(z)
    m = 0.1382 - 0.9211 / math.sqrt(z)
    eta = (0.1904 - 0.2236 * logz + 0.1292 * logz**2 - 0.0149 * logz**3) * voltage_kV**m
    rho_zm = (
        xraylib.AtomicWeight(z)
        / z
        * (0.787e-5 * math.sqrt(0.0135 * z) * voltage_kV**1.5 + 0.735e-6 * voltage_kV**2)
    )
    logu = np.log(u0)
    p1 = logu * (0.49269 - 1.0987 * eta + 0.78557 * eta**2)
    p2 = 0.70256 - 1.09865 * eta + 1.0046 * eta**2 + logu
    return rho_zm * p1 / p2


def _self_absorption(chi_rho_z: np.ndarray) -> np.ndarray:
    """f(chi) = (1 - exp(-2 chi rho_z)) / (2 chi rho_z), with the limit 1 at chi rho_z -> 0."""
    t = 2.0 * np.asarray(chi_rho_z, dtype=float)
    out = np.ones_like(t)
    nz = t > 1e-12
    out[nz] = -np.expm1(-t[nz]) / t[nz]
    return out


def _check_angles(electron_incidence_deg: float, takeoff_deg: float) -> tuple[float, float]:
    for name, value in (("electron incidence", electron_incidence_deg), ("anode take-off", takeoff_deg)):
        if not 0.0 < value <= 90.0:
            raise InstrumentError(f"tube {name} angle must be in (0, 90] degrees, got {value!r}")
    return math.sin(math.radians(electron_incidence_deg)), math.sin(math.radians(takeoff_deg))


def ebel_continuum(
    anode: str,
    voltage_kV: float,
    energy_keV: np.ndarray,
    *,
    electron_incidence_deg: float = 90.0,
    takeoff_deg: float = 20.0,
) -> np.ndarray:
    """Spectral density of the tube continuum leaving the anode (before any window).

    Parameters
    ----------
    anode : str
        Chemical symbol of the anode element.
    voltage_kV : float
        Tube voltage E0 in kV (the Duane-Hunt limit, keV).
    energy_keV : numpy.ndarray
        Photon energies, keV, shape (n,).
    electron_incidence_deg, takeoff_deg : float, optional
        Angles of the electron beam and of the X-ray exit, measured from the anode surface, degrees.

    Returns
    -------
    numpy.ndarray
        Photons / (s sr mA keV), shape (n,); zero at and above ``voltage_kV`` and at non-positive energies.
    """
    z = anode_z(anode)
    sin_e, sin_x = _check_angles(electron_incidence_deg, takeoff_deg)
    e = np.atleast_1d(np.asarray(energy_keV, dtype=float))
    out = np.zeros_like(e)
    ok = (e > 0.0) & (e < voltage_kV)
    if not ok.any():
        return out
    eo = e[ok]
    u0 = voltage_kV / eo
    x = 1.109 - 0.00435 * z + 0.00175 * voltage_kV
    rho_z = _mean_depth_g_cm2(z, voltage_kV, u0)
    tau = np.fromiter((xraylib.CS_Photo(z, x) for x in eo.tolist()), dtype=float, count=eo.size)
    out[ok] = CONTINUUM_CONST * z * (u0 - 1.0) ** x * _self_absorption(tau * rho_z * sin_e / sin_x)
    return out


@dataclasses.dataclass(frozen=True)
class _Line:
    name: str
    shell: str
    energy_keV: float
    rate: float


@functools.cache
def _lines_of(z: int) -> tuple[_Line, ...]:
    lines = []
    for name, shell, macro in _radiative_lines():
        try:
            energy = xraylib.LineEnergy(z, macro)
            rate = xraylib.RadRate(z, macro)
        except ValueError:
            continue
        if energy > 0 and rate > 0:
            lines.append(_Line(name, shell, energy, rate))
    return tuple(lines)


def anode_lines(
    anode: str,
    voltage_kV: float,
    *,
    electron_incidence_deg: float = 90.0,
    takeoff_deg: float = 20.0,
    min_energy_keV: float = 0.0,
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Characteristic K and L lines of the anode leaving the anode surface (before any window).

    Parameters
    ----------
    anode : str
        Chemical symbol of the anode element.
    voltage_kV : float
        Tube voltage in kV; shells whose edge lies above it are not excited.
    electron_incidence_deg, takeoff_deg : float, optional
        Electron incidence and X-ray take-off angles from the anode surface, degrees.
    min_energy_keV : float, optional
        Lines below this energy are dropped.

    Returns
    -------
    names : tuple of str
        ``"Rh KL3"`` style names (IUPAC), length n.
    energy_keV : numpy.ndarray
        Line energies, keV, shape (n,).
    photons : numpy.ndarray
        Line intensities, photons / (s sr mA), shape (n,).
    """
    z = anode_z(anode)
    sin_e, sin_x = _check_angles(electron_incidence_deg, takeoff_deg)
    symbol = xraylib.AtomicNumberToSymbol(z)
    names, energies, intensities = [], [], []
    j_keV = 0.0135 * z
    for shell in ("K", "L1", "L2", "L3"):
        edge = xraylib.EdgeEnergy(z, _SHELL_MACRO[shell])
        if edge <= 0 or edge >= voltage_kV:
            continue
        shell_lines = [ln for ln in _lines_of(z) if ln.shell == shell]
        total_rate = sum(ln.rate for ln in shell_lines)
        # lines carrying less than 0.1 % of the shell's radiative rate are dropped
        lines = [ln for ln in shell_lines if ln.energy_keV > min_energy_keV and ln.rate >= 1e-3 * total_rate]
        if not lines:
            continue
        try:
            omega = xraylib.FluorYield(z, _SHELL_MACRO[shell])
        except ValueError:
            continue
        u0 = voltage_kV / edge
        logu = math.log(u0)
        su = math.sqrt(u0)
        core = u0 * logu + 1.0 - u0
        # stopping factor 1/S and backscatter factor R (Ebel 1999, eqs. 12-13)
        inv_s = (
            (_ZB["K" if shell == "K" else "L"] / z)
            * core
            * (1.0 + 16.05 * math.sqrt(j_keV / edge) * (su * logu + 2.0 * (1.0 - su)) / core)
        )
        r = 1.0 - 0.0081517 * z + 3.613e-5 * z * z + 0.009583 * z * math.exp(-u0) + 0.001141 * voltage_kV
        if shell == "K":
            const = K_CONST
        else:
            fcorr = 1.0 if z >= 80 else -0.4814 + 0.03781 * z - 2.413e-4 * z * z
            const = L_CONST[shell] * (1.0 if shell == "L3" else fcorr)
        rho_z = float(_mean_depth_g_cm2(z, voltage_kV, np.array([u0]))[0])
        e_lines = np.array([ln.energy_keV for ln in lines])
        tau = np.array([xraylib.CS_Photo(z, x) for x in e_lines.tolist()])
        f_chi = _self_absorption(tau * rho_z * sin_e / sin_x)
        rates = np.array([ln.rate for ln in lines])
        names.extend(f"{symbol} {ln.name}" for ln in lines)
        energies.append(e_lines)
        intensities.append(const * inv_s * r * omega * rates * f_chi)
    if not names:
        return (), np.zeros(0), np.zeros(0)
    e_all = np.concatenate(energies)
    i_all = np.concatenate(intensities)
    order = np.argsort(e_all, kind="stable")
    return tuple(names[k] for k in order), e_all[order], i_all[order]


@dataclasses.dataclass(frozen=True, eq=False)
class TubeSpectrum:
    """Spectrum leaving the anode of an X-ray tube (Ebel's model), before windows and filters.

    Attributes
    ----------
    bin_edges_keV : numpy.ndarray
        Edges of the continuum bins, keV, shape (n + 1,); the last edge is the tube voltage.
    continuum_energy_keV : numpy.ndarray
        Bin centres, keV, shape (n,).
    continuum_photons : numpy.ndarray
        Continuum photons / (s sr mA) in each bin (spectral density at the centre times bin width),
        shape (n,).
    line_names : tuple of str
        Anode line names (``"Rh KL3"``), length m.
    line_energy_keV : numpy.ndarray
        Line energies, keV, shape (m,).
    line_photons : numpy.ndarray
        Line intensities, photons / (s sr mA), shape (m,).
    """

    bin_edges_keV: np.ndarray
    continuum_energy_keV: np.ndarray
    continuum_photons: np.ndarray
    line_names: tuple[str, ...]
    line_energy_keV: np.ndarray
    line_photons: np.ndarray


def tube_spectrum(
    anode: str,
    voltage_kV: float,
    *,
    electron_incidence_deg: float = 90.0,
    takeoff_deg: float = 20.0,
    step_keV: float = 0.05,
    min_energy_keV: float = 0.5,
) -> TubeSpectrum:
    """Discretised tube spectrum (continuum in bins plus lines) leaving the anode.

    Parameters
    ----------
    anode : str
        Chemical symbol of the anode element.
    voltage_kV : float
        Tube voltage, kV (5 to 100).
    electron_incidence_deg, takeoff_deg : float, optional
        Angles from the anode surface, degrees.
    step_keV : float, optional
        Width of the continuum bins, keV.
    min_energy_keV : float, optional
        Lower edge of the first bin, keV.

    Returns
    -------
    TubeSpectrum
    """
    if not 5.0 <= voltage_kV <= 100.0:
        raise InstrumentError(
            f"tube voltage must be between 5 and 100 kV (Ebel's tube model), got {voltage_kV!r} kV"
        )
    if not 0.0 < step_keV <= 1.0:
        raise InstrumentError(f"tube spectrum step must be in (0, 1] keV, got {step_keV!r}")
    if not 0.0 < min_energy_keV < voltage_kV:
        raise InstrumentError(
            f"lowest tube-spectrum energy must be in (0, {voltage_kV}) keV, got {min_energy_keV!r}"
        )
    n = max(1, math.ceil((voltage_kV - min_energy_keV) / step_keV - 1e-9))
    edges = min_energy_keV + step_keV * np.arange(n + 1)
    edges[-1] = voltage_kV
    centres = 0.5 * (edges[:-1] + edges[1:])
    density = ebel_continuum(
        anode, voltage_kV, centres, electron_incidence_deg=electron_incidence_deg, takeoff_deg=takeoff_deg
    )
    names, e_lines, i_lines = anode_lines(
        anode,
        voltage_kV,
        electron_incidence_deg=electron_incidence_deg,
        takeoff_deg=takeoff_deg,
        min_energy_keV=min_energy_keV,
    )
    return TubeSpectrum(edges, centres, density * np.diff(edges), names, e_lines, i_lines)
