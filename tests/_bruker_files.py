"""Build small valid Bruker ``.spx`` and ripple ``.rpl`` + ``.raw`` files by hand for the reader tests.

The ``.spx`` layout follows what Bruker Esprit writes (and rosettasciio's ``spx_reader`` reads): a
``TRTSpectrum`` class instance with hardware (``RealTime``/``LifeTime`` in ms), detector (``DetLayers``:
base64 of zlib-compressed XML), XRF (``Voltage`` kV, ``ExcitationAngle``) and spectrum
(``CalibAbs`` keV, ``CalibLin`` keV/channel, date, time) headers, and comma-separated ``Channels``.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np


def _spectrum_instance(counts, offset_keV, gain_keV, live_time_s, real_time_s, voltage_kV, name) -> str:
    """The ``TRTSpectrum`` class instance Esprit writes in ``.spx`` files and ``.bcf`` headers."""
    layers = base64.b64encode(zlib.compress(b'<DetLayers><Layer0 Atom="14" Thickness="0.45"/></DetLayers>'))
    channels = ",".join(str(int(c)) for c in counts)
    return f"""<ClassInstance Type="TRTSpectrum" Name="{name}">
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
</ClassInstance>"""


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
    inner = _spectrum_instance(
        counts, offset_keV, gain_keV, live_time_s, real_time_s, voltage_kV, "test spectrum"
    )
    xml = f"""<?xml version="1.0" encoding="WINDOWS-1252" standalone="yes"?>
<TRTSpectrum>
<RTHeader/>
{inner}
</TRTSpectrum>
"""
    path.write_bytes(xml.encode("cp1252"))
    return path


_CHUNK = 0x1000  # SFS chunk size; chunk n occupies [0x118 + n*_CHUNK, 0x118 + (n+1)*_CHUNK)
_USABLE = _CHUNK - 32  # each chunk starts with a 32-byte header


def _sfs_container(files: list[tuple[str, int, bytes | None]]) -> bytes:
    """AidAim SFS container (what a ``.bcf`` is), uncompressed, as rosettasciio's SFS_reader reads it.

    ``files``: (name, parent item index or -1, content or None for a folder), in item order.
    Chunk 0 holds the file header, chunk 1 the item tree; then per file a pointer-table chunk and its
    data chunks.
    """
    chunks: dict[int, bytes] = {}
    next_chunk = 2
    items = []
    for name, parent, content in files:
        if content is None:
            items.append(
                struct.pack(
                    "<iQQQQIi176s?3s256s32s", 0, 0, 0, 0, 0, 0, parent, b"", True, b"", name.encode(), b""
                )
            )
            continue
        n_data = max(1, -(-len(content) // _USABLE))
        assert n_data * 4 <= _USABLE, "pointer table must fit one chunk"
        table_chunk = next_chunk
        data_chunks = list(range(table_chunk + 1, table_chunk + 1 + n_data))
        next_chunk = data_chunks[-1] + 1
        chunks[table_chunk] = struct.pack(f"<{n_data}I", *data_chunks)
        for k, c in enumerate(data_chunks):
            chunks[c] = content[k * _USABLE : (k + 1) * _USABLE]
        items.append(
            struct.pack(
                "<iQQQQIi176s?3s256s32s",
                table_chunk,
                len(content),
                0,
                0,
                0,
                0,
                parent,
                b"",
                False,
                b"",
                name.encode(),
                b"",
            )
        )
    assert len(items) * 0x200 <= _USABLE
    chunks[1] = b"".join(items)
    out = bytearray(0x118 + next_chunk * _CHUNK)
    out[0:8] = b"AAMVHFSS"
    out[0x124:0x12C] = struct.pack("<fI", 2.6, _CHUNK)
    out[0x140:0x14C] = struct.pack("<III", 1, len(items), next_chunk)
    for n, payload in chunks.items():
        start = 0x118 + n * _CHUNK + 32
        out[start : start + len(payload)] = payload
    return bytes(out)


def write_bcf(
    path: Path,
    cube: np.ndarray,
    *,
    offset_keV: float,
    gain_keV: float,
    pixel_um: float,
    live_time_s: float,
    real_time_s: float,
    voltage_kV: float = 50.0,
) -> Path:
    """Write a small Bruker ``.bcf`` hypermap of counts (rows, cols, channels) (16-bit pulse packing)."""
    rows, cols, n_ch = cube.shape
    total = cube.sum(axis=(0, 1))
    image = base64.b64encode(np.zeros(rows * cols, "<u2").tobytes()).decode("ascii")
    header = f"""<?xml version="1.0" encoding="WINDOWS-1252" standalone="yes"?>
<TRTSpectrumDatabase>
<ClassInstance Type="TRTSpectrumDatabase" Name="test map">
<Header><Date>25.11.2026</Date><Time>12:00:00</Time><FileVersion>2</FileVersion></Header>
<ClassInstance Type="TRTSEMData"><HV>{voltage_kV}</HV><DX>{pixel_um!r}</DX><DY>{pixel_um!r}</DY>
</ClassInstance>
<ClassInstance Type="TRTSEMStageData"><X>0</X><Y>0</Y></ClassInstance>
<ClassInstance Type="TRTDSPConfiguration"><LineAverage>1</LineAverage><PixelAverage>1</PixelAverage>
<PixelTime>10000</PixelTime></ClassInstance>
<ClassInstance Type="TRTImageData"><Width>{cols}</Width><Height>{rows}</Height><ItemSize>2</ItemSize>
<PlaneCount>1</PlaneCount><Plane0><Data>{image}</Data></Plane0></ClassInstance>
<LineCounter>{",".join(["1"] * rows)},</LineCounter>
<ChCount>{n_ch}</ChCount>
<DetectorCount>1</DetectorCount>
<SpectrumData0>{_spectrum_instance(total, offset_keV, gain_keV, live_time_s, real_time_s, voltage_kV, "sum")}
</SpectrumData0>
</ClassInstance>
</TRTSpectrumDatabase>
""".encode("cp1252")
    data = bytearray(struct.pack("<ii", rows, cols))
    data += bytes(0x1A0 - len(data))
    for r in range(rows):
        data += struct.pack("<i", cols)
        for c in range(cols):
            pulses = np.repeat(np.arange(n_ch, dtype="<u2"), cube[r, c].astype(int))
            assert pulses.size < 0x10000
            data += struct.pack("<IHHIHHHI", c, n_ch, n_ch, 0, 0, 0, pulses.size, 2 * pulses.size)
            data += pulses.tobytes()
    files = [("EDSDatabase", -1, None), ("HeaderData", 0, header), ("SpectrumData0", 0, bytes(data))]
    path.write_bytes(_sfs_container(files))
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
