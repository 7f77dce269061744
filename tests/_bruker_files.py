"""Build small valid Bruker ``.spx`` and ripple ``.rpl`` + ``.raw`` files by hand for the reader tests.

The ``.spx`` layout follows what Bruker Esprit writes (and rosettasciio's ``spx_reader`` reads): a
``TRTSpectrum`` class instance with hardware (``RealTime``/``LifeTime`` in ms), detector (``DetLayers``:
base64 of zlib-compressed XML), XRF (``Voltage`` kV, ``ExcitationAngle``) and spectrum
(``CalibAbs`` keV, ``CalibLin`` keV/channel, date, time) headers, and comma-separated ``Channels``.
"""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import numpy as np


def write_spx(
    path: Path,
    counts: np.ndarray,
    *,
    offset_keV: float,
    gain_keV: float,
    live_time_s: float,
    real_time_s: float,
    voltage_kV: float = 50.0,
) -> Path:
    """Write a Bruker ``.spx`` spectrum file."""
    layers = base64.b64encode(zlib.compress(b'<DetLayers><Layer0 Atom="14" Thickness="0.45"/></DetLayers>'))
    channels = ",".join(str(int(c)) for c in counts)
    xml = f"""<?xml version="1.0" encoding="WINDOWS-1252" standalone="yes"?>
<TRTSpectrum>
<RTHeader/>
<ClassInstance Type="TRTSpectrum" Name="test spectrum">
<TRTHeaderedClass>
<ClassInstance Type="TRTSpectrumHardwareHeader">
<RealTime>{real_time_s * 1000:.0f}</RealTime>
<LifeTime>{live_time_s * 1000:.0f}</LifeTime>
<DeadTime>5</DeadTime>
<Amplification>40000</Amplification>
<ShapingTime>130000</ShapingTime>
</ClassInstance>
<ClassInstance Type="TRTDetectorHeader">
<Type>XFlash 430</Type>
<DetectorThickness>0.45</DetectorThickness>
<SiDeadLayerThickness>0.029</SiDeadLayerThickness>
<DetLayers>{layers.decode("ascii")}</DetLayers>
</ClassInstance>
<ClassInstance Type="TRTXrfHeader">
<Voltage>{voltage_kV}</Voltage>
<Current>600</Current>
<Anode>45</Anode>
<ExcitationAngle>51</ExcitationAngle>
</ClassInstance>
</TRTHeaderedClass>
<ClassInstance Type="TRTSpectrumHeader">
<Date>25.11.2026</Date>
<Time>12:00:00</Time>
<ChannelCount>{len(counts)}</ChannelCount>
<CalibAbs>{offset_keV!r}</CalibAbs>
<CalibLin>{gain_keV!r}</CalibLin>
<SigmaAbs>2.4e-4</SigmaAbs>
<SigmaLin>1.4e-5</SigmaLin>
</ClassInstance>
<Channels>{channels}</Channels>
</ClassInstance>
</TRTSpectrum>
"""
    path.write_bytes(xml.encode("cp1252"))
    return path


def write_ripple(
    rpl: Path, counts: np.ndarray, header: dict[str, object], *, record_by: str = "vector"
) -> Path:
    """Write a ripple header and little-endian ``.raw`` data for counts (rows, cols, channels)."""
    rows, cols, depth = counts.shape
    kinds = {"i": "signed", "u": "unsigned", "f": "float"}
    data = counts if record_by == "vector" else np.moveaxis(counts, 2, 0)
    base = {
        "width": cols,
        "height": rows,
        "depth": depth,
        "offset": 0,
        "data-length": counts.dtype.itemsize,
        "data-type": kinds[counts.dtype.kind],
        "byte-order": "little-endian",
        "record-by": record_by,
    }
    lines = ["; written by the xrfnb test-suite"] + [f"{k}\t{v}" for k, v in {**base, **header}.items()]
    rpl.write_text("\n".join(lines) + "\n", encoding="latin-1")
    rpl.with_suffix(".raw").write_bytes(
        np.ascontiguousarray(data, dtype=counts.dtype.newbyteorder("<")).tobytes()
    )
    return rpl
