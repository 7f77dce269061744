"""Readers and writers: :func:`load` any supported spectrum or scan file, :func:`save` atomically.

Formats are detected from the file content (see :mod:`xrfnb.io.detect`); the extension only
breaks ties. Inputs are opened read-only and never modified. Writers write to a temporary file in
the destination folder and rename it into place (:func:`atomic_path`), so a failed save leaves
neither a partial file nor a damaged older one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .._errors import DataError, FormatError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum
from .atomic import atomic_path
from .bruker import read_bcf, read_rpl, read_spx, write_rpl
from .common import with_given_calibration
from .detect import FORMATS, detect_format
from .hdf5 import read_hdf5, trust_written_file, write_hdf5
from .mca import read_amptek_mca, read_epics_mca, write_epics_mca
from .msa import read_msa
from .npy import read_npy, read_npz, write_npy_sidecar, write_npz
from .spe import read_spe
from .text import read_text_spectrum, write_text_spectrum

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "atomic_path", "detect_format", "load", "save"]

#: extension (lower case) -> writer format for :func:`save`
SAVE_FORMATS: dict[str, str] = {
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".nxs": "hdf5",
    ".nx5": "hdf5",
    ".npy": "npy",
    ".npz": "npz",
    ".txt": "text",
    ".dat": "text",
    ".csv": "text",
    ".mca": "epics_mca",
    ".rpl": "rpl",
}


def load(
    path: str | os.PathLike[str],
    *,
    element: int | str | None = None,
    dataset: str | None = None,
    calibration: EnergyCalibration | None = None,
    detector: int | str | None = None,
) -> Spectrum | Scan:
    """Load a spectrum or a scan from a file, detecting its format from its content.

    Supported: xrfnb HDF5 (and NeXus NXdata / plain HDF5 datasets), EPICS/XIA MCA (one or several
    detector elements), Amptek ``.mca``, SPEC/ORTEC ``.spe``, plain-text columns, EMSA/MAS
    ``.msa``/``.emsa`` (also as ``.txt``), Bruker ``.spx`` and ``.bcf``, Lispix/ripple ``.rpl`` + ``.raw``,
    NumPy ``.npy``/``.npz`` with a JSON side-car.

    Parameters
    ----------
    path : str or os.PathLike
        The file (for ripple data, the ``.rpl`` header or its ``.raw`` file).
    element : int or "sum", optional
        Multi-element EPICS/XIA files: the detector element to return, or ``"sum"`` (default): the
        calibrated sum, each element rebinned onto element 0's energy axis; its ``live_time_s`` is the
        mean of the elements' live times, which are all kept in ``metadata["element_live_time_s"]``.
    dataset : str, optional
        HDF5 files: path inside the file of the group or dataset to load (default: the NeXus
        ``default`` entry, else the only spectrum or scan in the file).
    calibration : EnergyCalibration, optional
        Replace the file's calibration (needed for files that state none: those load with
        ``energy_keV`` equal to the channel number and ``metadata["calibrated"] is False``).
    detector : int or "sum", optional
        Bruker ``.bcf`` files from systems with several EDS detectors (one hypermap per detector): one
        detector (0, 1, ...) or ``"sum"`` (the default): their counts added, lazily (see
        :func:`xrfnb.io.bruker.read_bcf`).

    Returns
    -------
    Spectrum or Scan
        A :class:`Spectrum` (counts (channels,)) or a :class:`Scan` (counts (rows, cols, channels)).
        Scans from HDF5, ``.npy``, ``.bcf`` and ripple files are lazy (h5py dataset, memory map or
        dask array): nothing is read in full until asked. An HDF5 scan keeps its file open, read-only,
        while ``scan.counts`` is referenced; ``scan.counts.file.close()`` closes it early.

    Raises
    ------
    FormatError
        Missing, empty, truncated, corrupted or unsupported file.
    DataError
        Negative or NaN counts, wrong shape, mismatched channel counts, bad ``element`` or ``detector``
        (the message lists the file's choices).
    CalibrationError
        An invalid calibration in the file.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise FormatError(f"{p}: no such file")
    if p.is_dir():
        raise FormatError(f"{p}: is a folder; give the path of a spectrum or scan file")
    if not p.is_file():  # reading a FIFO or a device would wait forever or never end
        raise FormatError(f"{p}: not a regular file (a FIFO, socket or device); give a spectrum or scan file")
    fmt = detect_format(p)
    if element is not None and fmt != "epics_mca":
        if not (element == 0 or element == "sum"):
            raise DataError(f"{p}: element={element!r} applies only to multi-element EPICS/XIA MCA files")
    if detector is not None and fmt != "bcf":
        raise DataError(
            f"{p}: detector={detector!r} applies only to Bruker .bcf files, this is {FORMATS[fmt]}"
            + (" (its detector elements: element=)" if fmt == "epics_mca" else "")
        )
    if dataset is not None and fmt != "hdf5":
        raise DataError(f"{p}: dataset={dataset!r} applies only to HDF5 files, this is {FORMATS[fmt]}")
    if fmt == "hdf5":

        return read_hdf5(p, dataset=dataset, calibration=calibration)
    try:
        obj = _read(fmt, p, element, detector)
    except RecursionError:
        raise FormatError(f"{p}: nesting too deep to parse (corrupted file?)") from None
    except MemoryError:
        raise FormatError(
            f"{p}: the file describes more data than fits in memory (corrupted header?)"
        ) from None
    if calibration is not None:
        obj = with_given_calibration(obj, calibration)
    return obj


def _read(fmt: str, p: Path, element: int | str | None, detector: int | str | None) -> Spectrum | Scan:
    if fmt == "epics_mca":

        return read_epics_mca(p, element=element)
    if fmt == "amptek_mca":

        return read_amptek_mca(p)
    if fmt == "spe":

        return read_spe(p)
    if fmt == "text":

        return read_text_spectrum(p)
    if fmt == "npy":

        return read_npy(p)
    if fmt == "npz":

        return read_npz(p)
    if fmt == "spx":

        return read_spx(p)
    if fmt == "msa":

        return read_msa(p)
    if fmt == "bcf":

        return read_bcf(p, detector=detector)
    if fmt == "rpl":

        return read_rpl(p)
    raise FormatError(
        f"{p}: no reader for format {fmt!r}"
    )  # pragma: no cover - detect_format names only these


def save(obj: Spectrum | Scan, path: str | os.PathLike[str]) -> Path:
    """Save a spectrum or scan atomically; the format follows the extension.

    ``.h5``/``.hdf5``/``.nxs``: xrfnb HDF5 layout (lossless, recommended; ``docs/hdf5-layout.md``);
    ``.npy`` (plus a ``.json`` side-car) or ``.npz``; ``.mca``: EPICS MCA text (spectra);
    ``.txt``/``.dat``/``.csv``: two-column text (spectra); ``.rpl``: ripple header plus ``.raw``.

    Parameters
    ----------
    obj : Spectrum or Scan
        What to save. Lazy scans are written block by block.
    path : str or os.PathLike
        Destination file.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    p = Path(os.fspath(path))
    if not isinstance(obj, (Spectrum, Scan)):
        raise DataError(f"{p}: save() takes a Spectrum or a Scan, got {type(obj).__name__}")
    fmt = SAVE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise FormatError(
            f"{p}: cannot tell the format from the extension {p.suffix!r}; use one of "
            f"{', '.join(sorted(SAVE_FORMATS))}"
        )
    if fmt in ("text", "epics_mca") and isinstance(obj, Scan):
        raise DataError(f"{p}: {p.suffix} holds a single spectrum; save a scan as .h5, .npz, .npy or .rpl")
    try:
        if fmt == "hdf5":

            with atomic_path(p) as tmp:
                write_hdf5(obj, tmp)
            trust_written_file(p)
        elif fmt == "npz":

            with atomic_path(p) as tmp:
                write_npz(obj, tmp)
        elif fmt == "npy":

            side = p.with_suffix(".json")
            with atomic_path(p) as tmp, atomic_path(side) as tmp_side:
                write_npy_sidecar(obj, tmp, tmp_side)
        elif fmt == "rpl":

            with atomic_path(p) as tmp, atomic_path(p.with_suffix(".raw")) as tmp_raw:
                write_rpl(obj, tmp, tmp_raw)
        elif fmt == "text":

            with atomic_path(p) as tmp:
                write_text_spectrum(obj, tmp)
        else:

            with atomic_path(p) as tmp:
                write_epics_mca(obj, tmp)
    except XRFNBError:
        raise
    except OSError as exc:
        raise FormatError(f"{p}: cannot write the file ({exc.strerror or exc})") from None
    return p
