"""xrfnb: pigment maps from X-ray fluorescence spectra and scans of paintings.

The public API is flat: everything a user needs is importable from ``xrfnb``. Heavy parts (the
simulator, torch models, dashboards) are imported lazily on first use, so ``import xrfnb`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

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
from .core.calibration import EnergyCalibration
from .core.lines import line_energy_keV
from .core.spectrum import Scan, Spectrum
from .fitting.calibration import CalibrationFit, calibrate

try:
    __version__ = version("xrfnb")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

#: name -> internal module, imported on first attribute access
_LAZY: dict[str, str] = {
    # readers and writers
    "load": ".io.load",
    "save": ".io.load",
    # pigment library
    "Pigment": ".physics.pigments",
    "PigmentLibrary": ".physics.pigments",
    "pigments": ".physics.pigments",
    # instrument and physics
    "Instrument": ".physics.instrument",
    "instruments": ".physics.instrument",
    "Layer": ".physics.stack",
    "Stack": ".physics.stack",
    "LineTable": ".physics.simulate",
    "argon_lines": ".physics.simulate",
    "line_intensities": ".physics.simulate",
    "simulate": ".physics.simulate",
    "simulate_batch": ".physics.simulate",
    "GroundTruth": ".physics.scenes",
    "render_scan": ".physics.scenes",
    "scenes": ".physics.scenes",
    "StackFit": ".fitting.stackfit",
    "fit_stack": ".fitting.stackfit",
    "InstrumentFit": ".fitting.instrument_fit",
    "fit_instrument": ".fitting.instrument_fit",
    # element detection, maps and the expert baseline
    "DetectedElement": ".fitting.detect",
    "ElementMaps": ".fitting.elements",
    "detect_elements": ".fitting.detect",
    "fit_elements": ".fitting.elements",
    "roi_maps": ".fitting.roi",
    "snip_background": ".fitting.background",
    "BaselineAssignment": ".fitting.baseline",
    "assign_pigments_by_elements": ".fitting.baseline",
    # deep-learning identification
    "Identification": ".model.model",
    "PigmentModel": ".model.model",
    "load_model": ".model.model",
    "train_model": ".model.train",
    # whole-scan maps
    "PigmentMaps": ".maps.pigmentmaps",
    "map_pigments": ".maps.mapping",
    # reports for the conservation file
    "write_report": ".ui.report",
    # dashboard
    "Dashboard": ".ui.dashboard",
    # notebooks
    "NotebookSetup": ".ui.notebook",
    "setup_notebook": ".ui.notebook",
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
