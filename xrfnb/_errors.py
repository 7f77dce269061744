"""The one exception hierarchy of xrfnb.

Every error a user can trigger with bad input is an :class:`XRFNBError`. Messages say what was wrong,
where (file, dataset, channel) and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "DataError",
    "FitError",
    "FormatError",
    "InstrumentError",
    "ModelError",
    "PigmentError",
    "SimulationError",
    "XRFNBError",
]


class XRFNBError(Exception):
    """Base class of every error xrfnb raises on purpose."""


class FormatError(XRFNBError):
    """A file is unreadable, truncated, of an unknown or unsupported format, or inconsistent."""


class DataError(XRFNBError):
    """Array contents are invalid: negative or NaN counts, wrong shape, mismatched channel counts."""


class CalibrationError(XRFNBError):
    """An energy calibration is invalid or cannot be fitted."""


class PigmentError(XRFNBError):
    """A pigment is unknown, or a pigment table row is invalid."""


class InstrumentError(XRFNBError):
    """An instrument description is invalid or cannot measure what was asked."""


class SimulationError(XRFNBError):
    """A paint stack or simulation request is physically invalid."""


class FitError(XRFNBError):
    """Element detection or fitting cannot proceed with the given input."""


class ModelError(XRFNBError):
    """A model file is missing, unsafe (pickled) or incompatible with the input."""
