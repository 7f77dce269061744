"""Materials: compositions, mass attenuation and absorbing layers (filters, windows, gas paths)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xraylib

from .._errors import InstrumentError

__all__ = [
    "STANDARD_PRESSURE_MBAR",
    "Absorber",
    "atmosphere_absorber",
    "composition",
    "mass_attenuation_cm2_g",
]


#: named materials: name -> (xraylib NIST compound name or element symbol, density g/cm3)
_NAMED_MATERIALS: dict[str, tuple[str, float | None]] = {
    "air": ("Air, Dry (near sea level)", 0.001205),
    # helium gas at 20 degC, 1 atm (ideal gas: 4.0026 g/mol / 24.04 L/mol)
    "helium": ("He", 1.665e-4),
    "he": ("He", 1.665e-4),
    "kapton": ("Kapton Polyimide Film", None),
    "mylar": ("Polyethylene Terephthalate (Mylar)", None),
    "polypropylene": ("Polypropylene", None),
}


@functools.lru_cache(maxsize=256)
def composition(material: str, named: bool = True) -> tuple[np.ndarray, np.ndarray, float | None, str]:
    """Elemental composition of a material, by mass (cached).

    Parameters
    ----------
    material : str
        A named material (``"air"``, ``"helium"``, ``"kapton"``, ``"mylar"``, ``"polypropylene"``), an
        element symbol, an xraylib NIST compound name, a chemical formula (xraylib ``CompoundParser``) or
        a mixture by mass ``"formula:fraction, formula:fraction"``.
    named : bool, optional
        Look ``material`` up among the named materials first (default).

    Returns
    -------
    z : numpy.ndarray
        Atomic numbers, shape (k,), int.
    weight_fraction : numpy.ndarray
        Mass fractions, shape (k,), summing to 1.
    density_g_cm3 : float or None
        Default density, g/cm3 (None for formulas and mixtures: give it with the absorber).
    name : str
        Canonical name (lower case for named materials).

    Raises
    ------
    InstrumentError
        Empty or unknown material name, or an unreadable mixture.
    """
    key = str(material).strip()
    if not key:
        raise InstrumentError("empty material name: give an element symbol, formula or 'air'")
    alias = _NAMED_MATERIALS.get(key.lower()) if named else None
    if alias is not None:
        source, density = alias
        z, w, d, _ = composition(source, named=False)
        return z, w, density if density is not None else d, key.lower()
    if ":" in key:
        return _mixture(key)
    try:
        z = xraylib.SymbolToAtomicNumber(key)
    except ValueError:
        z = 0
    if z > 0:
        try:
            density = xraylib.ElementDensity(z)
        except ValueError:
            density = None
        return np.array([z]), np.array([1.0]), density, key
    try:
        nist = xraylib.GetCompoundDataNISTByName(key)
    except ValueError:
        nist = None
    if nist is not None:
        return np.array(nist["Elements"]), np.array(nist["massFractions"]), float(nist["density"]), key
    try:
        parsed = xraylib.CompoundParser(key)
    except ValueError:
        raise InstrumentError(
            f"unknown material {material!r}: give an element symbol ('Be', 'Al'), a chemical formula "
            "('Si3N4'), an xraylib NIST compound name, or one of " + ", ".join(sorted(_NAMED_MATERIALS))
        ) from None
    return np.array(parsed["Elements"]), np.array(parsed["massFractions"]), None, key


def _mixture(key: str) -> tuple[np.ndarray, np.ndarray, None, str]:
    """Mass fractions of a mixture written ``"formula:fraction, formula:fraction, ..."``."""
    totals: dict[int, float] = {}
    for part in key.split(","):
        formula, _, frac = part.partition(":")
        try:
            fraction = float(frac)
            parsed = xraylib.CompoundParser(formula.strip())
        except ValueError:
            raise InstrumentError(
                f"cannot read mixture {key!r}: write it as 'formula:mass_fraction, ...', "
                "e.g. 'C22H10N2O5:0.9, Al2O3:0.1'"
            ) from None
        if not (math.isfinite(fraction) and fraction > 0):
            raise InstrumentError(f"mixture {key!r}: mass fraction of {formula.strip()!r} must be > 0")
        for z, w in zip(parsed["Elements"], parsed["massFractions"], strict=True):
            totals[z] = totals.get(z, 0.0) + fraction * w
    z = np.array(sorted(totals))
    w = np.array([totals[k] for k in sorted(totals)])
    return z, w / w.sum(), None, key


def mass_attenuation_cm2_g(material: str, energy_keV: np.ndarray, *, kind: str = "total") -> np.ndarray:
    """Mass attenuation coefficient of a material (xraylib), cm2/g.

    Parameters
    ----------
    material : str
        Element symbol, formula, NIST compound name or named material (``"air"``).
    energy_keV : numpy.ndarray
        Photon energies, keV, shape (n,); must be positive.
    kind : {"total", "photo"}, optional
        Total attenuation (photo-absorption + Rayleigh + Compton) or photo-absorption only.

    Returns
    -------
    numpy.ndarray
        cm2/g, shape (n,).
    """
    z, w, _, _ = composition(material)
    e = np.atleast_1d(np.asarray(energy_keV, dtype=float))
    if e.size and not np.all(e > 0):
        raise InstrumentError(f"photon energies must be > 0 keV, got minimum {e.min():g} keV")
    fn = xraylib.CS_Total if kind == "total" else xraylib.CS_Photo
    return _cross_section(fn, z, w, e)


def _cross_section(
    fn: Callable[[int, float], float], z: np.ndarray, w: np.ndarray, e: np.ndarray
) -> np.ndarray:
    """Weighted sum over elements of an xraylib cross section, cm2/g, shape (n,).

    A plain loop over xraylib's scalar functions: xraylib_np's OpenMP threads are tens of times
    slower on a busy 2-core machine.
    """
    out = np.zeros(e.shape, dtype=float)
    for zi, wi in zip(z.tolist(), w.tolist(), strict=True):
        out += wi * np.fromiter((fn(zi, ei) for ei in e.tolist()), dtype=float, count=e.size)
    return out


@dataclasses.dataclass(frozen=True)
class Absorber:
    """A homogeneous absorbing foil or gas path: window, filter or atmosphere.

    Parameters
    ----------
    material : str
        Element symbol (``"Be"``), chemical formula (``"Si3N4"``, needs ``density_g_cm3``), xraylib NIST
        compound name, ``"air"``, ``"helium"``, ``"kapton"``, ``"mylar"``, ``"polypropylene"``, or a
        mixture by mass ``"formula:fraction, formula:fraction"`` (normalised; needs ``density_g_cm3``).
    thickness_um : float
        Thickness along the beam, micrometres (> 0).
    density_g_cm3 : float, optional
        Density, g/cm3; defaults to xraylib's element or NIST compound density.
    """

    material: str
    thickness_um: float
    density_g_cm3: float | None = None

    def __post_init__(self) -> None:
        _, _, default_density, _ = composition(self.material)
        try:
            thickness = float(self.thickness_um)
        except (TypeError, ValueError):
            raise InstrumentError(
                f"{self.material} thickness must be a number, got {self.thickness_um!r}"
            ) from None
        if not (math.isfinite(thickness) and thickness > 0):
            raise InstrumentError(
                f"{self.material} thickness must be > 0 um, got {self.thickness_um!r}: "
                "leave the absorber out instead of giving zero thickness"
            )
        density = self.density_g_cm3 if self.density_g_cm3 is not None else default_density
        if density is None:
            raise InstrumentError(f"material {self.material!r} has no known density: pass density_g_cm3")
        density = float(density)
        if not (math.isfinite(density) and density > 0):
            raise InstrumentError(f"{self.material} density must be > 0 g/cm3, got {density!r}")
        object.__setattr__(self, "thickness_um", thickness)
        object.__setattr__(self, "density_g_cm3", density)

    @property
    def mass_thickness_g_cm2(self) -> float:
        """Areal density rho * t, g/cm2."""
        return float(self.density_g_cm3) * self.thickness_um * 1e-4

    def transmission(self, energy_keV: np.ndarray, *, path_factor: float = 1.0) -> np.ndarray:
        """Beer-Lambert transmission ``exp(-mu/rho(E) * rho * t * path_factor)``, shape like ``energy_keV``.

        ``path_factor`` is 1/sin(angle) for an oblique passage.
        """
        e = np.asarray(energy_keV, dtype=float)
        mu = mass_attenuation_cm2_g(self.material, e.ravel()).reshape(e.shape)
        return np.exp(-mu * self.mass_thickness_g_cm2 * path_factor)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (TOML/JSON/HDF5 attributes)."""
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: Absorber | Mapping[str, Any] | tuple | None, what: str) -> Absorber | None:
        """Absorber from an Absorber, a mapping or a ``(material, thickness_um[, density])`` tuple."""
        if value is None or isinstance(value, Absorber):
            return value
        try:
            if isinstance(value, Mapping):
                return cls(**value)
            return cls(*value)
        except TypeError as exc:
            raise InstrumentError(
                f"{what}: expected {{material=..., thickness_um=...[, density_g_cm3=...]}}, "
                f"got {value!r} ({exc})"
            ) from None


#: pressure at which the named gases' densities hold, mbar (1 atm)
STANDARD_PRESSURE_MBAR = 1013.25


def atmosphere_absorber(
    atmosphere: str, path_mm: float, pressure_mbar: float = STANDARD_PRESSURE_MBAR
) -> Absorber | None:
    """The gas on a beam path as an :class:`Absorber` (None where nothing absorbs).

    Parameters
    ----------
    atmosphere : str
        ``"air"``, ``"helium"`` or ``"vacuum"``.
    path_mm : float
        Length of the gas path, mm.
    pressure_mbar : float, optional
        Gas pressure, mbar; the density of an ideal gas scales with it (default one atmosphere).

    Returns
    -------
    Absorber or None
        None for vacuum, a zero path or zero pressure.
    """
    if atmosphere == "vacuum" or path_mm == 0 or pressure_mbar == 0:
        return None
    if pressure_mbar == STANDARD_PRESSURE_MBAR:
        return Absorber(atmosphere, path_mm * 1000.0)
    density = composition(atmosphere)[2]  # ideal gas: the density scales with the pressure
    return Absorber(atmosphere, path_mm * 1000.0, float(density) * pressure_mbar / STANDARD_PRESSURE_MBAR)
