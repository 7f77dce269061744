"""Energy calibration: channel <-> energy, and fitting a calibration from identified peaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .._errors import CalibrationError

if TYPE_CHECKING:
    pass

__all__ = ["EnergyCalibration"]


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


