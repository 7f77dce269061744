"""Content sniffing: which reader handles a file.

The format is decided from the first bytes of the file (magic numbers, header keywords); the file
name extension only breaks ties (for example ``.npz`` versus another ZIP file).
"""

from __future__ import annotations

import re
from pathlib import Path

from .._errors import FormatError
from .msa import looks_like_msa

__all__ = ["FORMATS", "detect_format"]

#: format name -> human-readable description (the names :func:`detect_format` returns)
FORMATS: dict[str, str] = {
    "hdf5": "HDF5 (xrfnb layout, NeXus NXdata or a plain dataset)",
    "npy": "NumPy .npy array with a JSON side-car holding the calibration",
    "npz": "NumPy .npz archive (counts, calibration and metadata arrays or a JSON side-car)",
    "bcf": "Bruker Esprit hypermap (.bcf)",
    "spx": "Bruker Esprit spectrum (.spx, XML)",
    "msa": "EMSA/MAS spectral data (.msa, .emsa, .txt: '#FORMAT : EMSA/MAS Spectral Data File')",
    "rpl": "Lispix/ripple header (.rpl) with its .raw data file",
    "epics_mca": "EPICS/XIA MCA text (VERSION/ELEMENTS/CHANNELS/CAL_OFFSET/...)",
    "amptek_mca": "Amptek MCA text (<<PMCA SPECTRUM>>)",
    "spe": "SPEC/ORTEC .spe text ($SPEC_ID / $DATA: block)",
    "text": "plain-text spectrum: one column of counts (or channel/energy + counts), '#' comments",
}

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_SFS_MAGIC = b"AAMVHFSS"
_NUM = rb"[-+]?(\d+(\.\d*)?|\.\d+|nan|inf(inity)?)([eEdD][-+]?\d+)?"
_NUMBER_LINE = re.compile(rb"^\s*" + _NUM + rb"([\s,;]+" + _NUM + rb")*\s*$", re.IGNORECASE)
_RPL_KEYS = (b"width", b"height", b"depth", b"data-type", b"data-length", b"record-by")


def detect_format(path: Path, head: bytes | None = None) -> str:
    """Name of the format of ``path`` (a key of :data:`FORMATS`), sniffed from its content.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    head : bytes, optional
        The first bytes of the file (read here when omitted).

    Raises
    ------
    FormatError
        Empty file, or content matching no supported format.
    """
    if head is None:
        try:
            with open(path, "rb") as fh:
                head = fh.read(8192)
        except OSError as exc:
            raise FormatError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if not head:
        raise FormatError(f"{path}: the file is empty (0 bytes); nothing to load")
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        if suffix == ".npz" or b".npy" in head:
            return "npz"
        raise FormatError(
            f"{path}: a ZIP archive that is not a NumPy .npz file; unzip it and load its contents"
        )
    if head.startswith(_SFS_MAGIC):
        return "bcf"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if suffix == ".raw" and (path.with_suffix(".rpl").exists() or path.with_suffix(".RPL").exists()):
        return "rpl"  # headerless binary: the ripple header next to it describes it
    if b"\x00" in head[:2048]:
        raise FormatError(
            f"{path}: binary content of unknown format (no HDF5, NumPy, Bruker or text signature). "
            f"Supported formats: {', '.join(FORMATS.values())}"
        )
    if looks_like_msa(text):
        return "msa"
    if text.startswith(b"<<PMCA SPECTRUM>>") or b"<<PMCA SPECTRUM>>" in head[:512]:
        return "amptek_mca"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        if b"TRTSpectrum" in head or b"TRTSpectrumDatabase" in head or suffix == ".spx":
            return "spx"
        raise FormatError(f"{path}: an XML file that is not a Bruker .spx spectrum (no TRTSpectrum element)")
    if re.match(rb"VERSION\s*:", text) or (b"\nCHANNELS:" in head and b"\nDATA:" in head):
        return "epics_mca"
    if text.startswith(b"$SPEC_ID") or re.search(rb"(^|\n)\$DATA:", head):
        return "spe"
    lowered = text.lower()
    if sum(key in lowered for key in _RPL_KEYS) >= 4 and suffix != ".raw":
        return "rpl"
    if _looks_like_text_spectrum(text):
        return "text"
    raise FormatError(
        f"{path}: unknown format: the content matches none of the supported formats "
        f"({', '.join(FORMATS.values())})"
    )


def _looks_like_text_spectrum(text: bytes) -> bool:
    """At least one numeric line and every non-comment line is numeric (the last line may be cut)."""
    lines = [ln.strip() for ln in text.splitlines()]
    data = [ln for ln in lines if ln and not ln.startswith((b"#", b"%", b";"))]
    if not data:
        return False
    body = data[:-1] if len(data) > 1 else data
    return all(_NUMBER_LINE.match(ln) for ln in body)
