"""xrfnb: pigment maps from X-ray fluorescence spectra and scans of paintings.

The public API is flat: everything a user needs is importable from ``xrfnb``. Heavy parts (the
simulator, torch models, dashboards) are imported lazily on first use, so ``import xrfnb`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ._calibration import CalibrationFit, EnergyCalibration, calibrate
from ._errors import (
    CalibrationError,
    DataError,
    FitError,
    FormatError,
    InstrumentError,
    ModelError,
    PigmentError,
    SimulationError,
    XRFNBError,
)
from ._lines import line_energy_keV
from ._spectrum import Scan, Spectrum

try:
    __version__ = version("xrfnb")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

#: name -> internal module, imported on first attribute access
_LAZY: dict[str, str] = {
    # readers and writers
    "load": "._io",
    "save": "._io",
    # pigment library
    "Pigment": "._pigments",
    "PigmentLibrary": "._pigments",
    "pigments": "._pigments",
    # instrument and physics
    "Instrument": "._instrument",
    "instruments": "._instrument",
    "Layer": "._stack",
    "Stack": "._stack",
    "LineTable": "._simulate",
    "argon_lines": "._simulate",
    "line_intensities": "._simulate",
    "simulate": "._simulate",
    "simulate_batch": "._simulate",
    "GroundTruth": "._scenes",
    "render_scan": "._scenes",
    "scenes": "._scenes",
    "StackFit": "._stackfit",
    "fit_stack": "._stackfit",
    # element detection, maps and the expert baseline
    "DetectedElement": "._fit",
    "ElementMaps": "._fit",
    "detect_elements": "._fit",
    "fit_elements": "._fit",
    "roi_maps": "._fit",
    "snip_background": "._fit",
    "BaselineAssignment": "._baseline",
    "assign_pigments_by_elements": "._baseline",
    # deep-learning identification
    "Identification": "._model",
    "PigmentModel": "._model",
    "load_model": "._model",
    "train_model": "._train",
    # whole-scan maps
    "PigmentMaps": "._mapping",
    "map_pigments": "._mapping",
    # reports for the conservation file
    "write_report": "._report",
    # dashboard
    "Dashboard": "._dashboard",
    # notebooks
    "NotebookSetup": "._notebook",
    "setup_notebook": "._notebook",
}

__all__ = [
    "CalibrationError",
    "CalibrationFit",
    "DataError",
    "EnergyCalibration",
    "FitError",
    "FormatError",
    "InstrumentError",
    "ModelError",
    "PigmentError",
    "Scan",
    "SimulationError",
    "Spectrum",
    "XRFNBError",
    "__version__",
    "calibrate",
    "line_energy_keV",
    "plotting",
    *sorted(_LAZY),
]


#: public submodules, imported on first attribute access
_SUBMODULES = ("plotting",)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xrfnb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
