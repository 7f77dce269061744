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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def sfs_zlib(content: bytes, block: int = 0x8000) -> bytes:
    """A file's content as stored in a zlib-compressed SFS container: an ``AACS`` header (uncompressed
    block size, number of blocks) padded to 0x80 bytes, then per block a 16-byte header and its zlib data."""
    parts = [zlib.compress(content[k : k + block]) for k in range(0, max(len(content), 1), block)]
    out = bytearray(struct.pack("<IIII", 0x53434141, block, 0, len(parts)).ljust(0x80, b"\0"))
    for part in parts:
        out += struct.pack("<IIII", len(part), block, 0, len(part) + 16) + part
    return bytes(out)


def _sfs_container(
    files: list[tuple[str, int, bytes | None]], chunk: int = _CHUNK, compressed: bool = False
) -> bytes:
    """AidAim SFS container (what a ``.bcf`` is), uncompressed, as rosettasciio's SFS_reader reads it.

    ``files``: (name, parent item index or -1, content or None for a folder), in item order.
    Chunk 0 holds the file header, chunk 1 the item tree; then per file its pointer-table chunks (chained
    through their chunk headers when the table spans several) and its data chunks.
    """
    usable = chunk - 32
    if compressed:
        files = [(name, parent, None if c is None else sfs_zlib(c)) for name, parent, c in files]
    chunks: dict[int, bytes] = {}
    heads: dict[int, bytes] = {}
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
        n_data = max(1, -(-len(content) // usable))
        n_table = -(-n_data * 4 // usable)
        table_chunks = list(range(next_chunk, next_chunk + n_table))
        data_chunks = list(range(table_chunks[-1] + 1, table_chunks[-1] + 1 + n_data))
        next_chunk = data_chunks[-1] + 1
        table = struct.pack(f"<{n_data}I", *data_chunks)
        for k, c in enumerate(table_chunks):
            chunks[c] = table[k * usable : (k + 1) * usable]
            if k + 1 < n_table:
                heads[c] = struct.pack("<I", table_chunks[k + 1])
        for k, c in enumerate(data_chunks):
            chunks[c] = content[k * usable : (k + 1) * usable]
        items.append(
            struct.pack(
                "<iQQQQIi176s?3s256s32s",
                table_chunks[0],
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
    assert len(items) * 0x200 <= usable
    chunks[1] = b"".join(items)
    out = bytearray(0x118 + next_chunk * chunk)
    out[0:8] = b"AAMVHFSS"
    out[0x124:0x12C] = struct.pack("<fI", 2.6, chunk)
    out[0x140:0x14C] = struct.pack("<III", 1, len(items), next_chunk)
    for n, payload in chunks.items():
        start = 0x118 + n * chunk + 32
        out[start : start + len(payload)] = payload
    for n, head in heads.items():
        start = 0x118 + n * chunk
        out[start : start + len(head)] = head
    return bytes(out)


def pack_pulses12(channels: np.ndarray) -> bytes:
    """Channels (< 4096) of a pixel's pulses packed 12-bit, four pulses in six bytes (Bruker flag 1)."""
    ch = np.zeros(-(-channels.size // 4) * 4, np.int64)
    ch[: channels.size] = channels
    c0, c1, c2, c3 = ch[0::4], ch[1::4], ch[2::4], ch[3::4]
    out = np.empty((c0.size, 6), np.uint8)
    out[:, 0] = ((c0 & 0xF) << 4) | (c1 >> 8)
    out[:, 1] = c0 >> 4
    out[:, 2] = c2 >> 4
    out[:, 3] = c1 & 0xFF
    out[:, 4] = c3 & 0xFF
    out[:, 5] = ((c2 & 0xF) << 4) | (c3 >> 8)
    return out.tobytes()


def pack_instructed(counts: np.ndarray, bunch: int = 13) -> bytes:
    """A pixel's counts (< 65536) as Delphi "instructed" bunches (Bruker flag > 1): runs of empty channels,
    then bunches of up to ``bunch`` channels as a gain plus 4-bit, 8-bit or 16-bit offsets."""
    out = bytearray()
    k, n = 0, counts.size
    while k < n:
        if counts[k] == 0:
            j = k
            while j < n and counts[j] == 0 and j - k < 255:
                j += 1
            out += bytes([0, j - k])
            k = j
            continue
        part = counts[k : k + bunch].astype(np.int64)
        gain = int(part.min())
        span = int(part.max()) - gain
        if span < 16 and gain < 256:  # a one-byte gain and 4-bit offsets, two per byte
            vals = np.zeros(-(-part.size // 2) * 2, np.int64)
            vals[: part.size] = part - gain
            out += bytes([1, part.size, gain]) + (vals[0::2] | (vals[1::2] << 4)).astype(np.uint8).tobytes()
        elif span < 256:
            out += bytes([2, part.size]) + struct.pack("<H", gain) + (part - gain).astype(np.uint8).tobytes()
        else:
            out += bytes([4, part.size]) + struct.pack("<I", gain) + (part - gain).astype("<u2").tobytes()
        k += part.size
    return bytes(out)


def bcf_stream(cube: np.ndarray, packing: str = "pulse16", skip_empty: bool = False) -> bytes:
    """The pulse stream of a hypermap (rows, cols, channels) in one packing: ``"pulse16"`` (flag 0),
    ``"pulse12"`` (flag 1), ``"instructed"`` (flag 2, with the last channel's counts as extra pulses)
    or ``"mixed"`` (the three in turn); ``skip_empty`` leaves pixels without counts out of their row."""
    rows, cols, n_ch = cube.shape
    data = bytearray(struct.pack("<ii", rows, cols))
    data += bytes(0x1A0 - len(data))
    kinds = ("pulse16", "pulse12", "instructed")
    for r in range(rows):
        pix = [c for c in range(cols) if not (skip_empty and not cube[r, c].any())]
        data += struct.pack("<i", len(pix))
        for c in pix:
            kind = kinds[(r * cols + c) % 3] if packing == "mixed" else packing
            counts = cube[r, c].astype(np.int64)
            if kind == "instructed":
                extra = int(counts[-1]) if n_ch > 1 else 0
                body = pack_instructed(np.concatenate([counts[:-1], [0]]) if extra else counts)
                data += struct.pack("<IHHIHHHI", c, n_ch, n_ch, 0, 2, 0, extra, len(body) + 4)
                data += body
                data += struct.pack("<I", 2 * extra) + np.full(extra, n_ch - 1, "<u2").tobytes()
                continue
            pulses = np.repeat(np.arange(n_ch, dtype="<u2"), counts)
            assert pulses.size < 0x10000
            if kind == "pulse12":
                body = pack_pulses12(pulses)
                data += struct.pack("<IHHIHHHI", c, n_ch, n_ch, 0, 1, 0, pulses.size, len(body))
            else:
                body = pulses.tobytes()
                data += struct.pack("<IHHIHHHI", c, n_ch, n_ch, 0, 0, 0, pulses.size, len(body))
            data += body
    return bytes(data)


def bcf_header(
    rows: int,
    cols: int,
    total: np.ndarray,
    *,
    offset_keV: float,
    gain_keV: float,
    pixel_um: float,
    live_time_s: float,
    real_time_s: float,
    voltage_kV: float = 50.0,
    n_maps: int = 1,
    detector_count: int = 1,
    map_headers: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """The ``EDSDatabase/HeaderData`` XML of a ``.bcf`` hypermap of (rows, cols, len(total)) counts.

    ``n_maps`` sum spectra ``SpectrumData0`` ...; ``map_headers[k]`` overrides ``total``, ``offset_keV``,
    ``gain_keV``, ``live_time_s`` or ``real_time_s`` of ``SpectrumData<k>``; ``detector_count`` is the
    header's ``DetectorCount``."""
    n_ch = len(total)
    base = {
        "total": total,
        "offset_keV": offset_keV,
        "gain_keV": gain_keV,
        "live_time_s": live_time_s,
        "real_time_s": real_time_s,
    }
    spectra = ""
    for k in range(n_maps):
        h = {**base, **(map_headers[k] if k < len(map_headers) else {})}
        inner = _spectrum_instance(
            h["total"], h["offset_keV"], h["gain_keV"], h["live_time_s"], h["real_time_s"], voltage_kV, "sum"
        )
        spectra += f"<SpectrumData{k}>{inner}</SpectrumData{k}>\n"
    image = base64.b64encode(np.zeros(rows * cols, "<u2").tobytes()).decode("ascii")
    return f"""<?xml version="1.0" encoding="WINDOWS-1252" standalone="yes"?>
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
<DetectorCount>{detector_count}</DetectorCount>
{spectra}
</ClassInstance>
</TRTSpectrumDatabase>
""".encode("cp1252")


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
    packing: str = "pulse16",
    skip_empty: bool = False,
    chunk: int = _CHUNK,
    extra_maps: int = 0,
    compressed: bool = False,
    detectors: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a Bruker ``.bcf`` hypermap of counts (rows, cols, channels).

    ``packing`` and ``skip_empty``: see :func:`bcf_stream`; ``chunk``: the container's chunk size;
    ``extra_maps``: further hypermaps ``SpectrumData1`` ... holding ``cube + k``; ``compressed``: a
    zlib-compressed container.

    ``detectors``: the file of a system with several EDS detectors, as Esprit writes it (rosettasciio
    issue #516: an M4 Tornado's two detectors are ``SpectrumData0`` and ``SpectrumData1``, their sum is
    the vendor's pixel spectrum): ``cube`` is detector 0's hypermap and each mapping of ``detectors``
    one more detector's (``cube``: its counts, same rows and columns; optional ``offset_keV``,
    ``gain_keV``, ``live_time_s``, ``real_time_s`` of its sum spectrum); the header's ``DetectorCount``
    is the number of detectors."""
    if detectors and extra_maps:
        raise ValueError("give detectors= or extra_maps=, not both")
    rows, cols, _ = cube.shape
    cubes = [cube + k for k in range(extra_maps + 1)] + [np.asarray(d["cube"]) for d in detectors]
    map_headers = [{}] + [
        {"total": c.sum(axis=(0, 1)), **{k: v for k, v in d.items() if k != "cube"}}
        for c, d in zip(cubes[1:], detectors, strict=False)
    ]
    header = bcf_header(
        rows,
        cols,
        cube.sum(axis=(0, 1)),
        offset_keV=offset_keV,
        gain_keV=gain_keV,
        pixel_um=pixel_um,
        live_time_s=live_time_s,
        real_time_s=real_time_s,
        voltage_kV=voltage_kV,
        n_maps=len(cubes),
        detector_count=len(detectors) + 1,
        map_headers=map_headers if detectors else (),
    )
    files = [("EDSDatabase", -1, None), ("HeaderData", 0, header)]
    for k, c in enumerate(cubes):
        files.append((f"SpectrumData{k}", 0, bcf_stream(c, packing, skip_empty)))
    path.write_bytes(_sfs_container(files, chunk, compressed))
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


def write_bcf_streamed(
    path: Path, header: bytes, rows: int, cols: int, row_bytes, chunk: int = _CHUNK
) -> Path:
    """Write a ``.bcf`` of any size as a stream: ``row_bytes`` yields the pulse-stream bytes of the rows in
    order (see :func:`bcf_stream`); the map's data chunks are written as they come, its pointer table
    (a chain of chunks) after them, so memory stays that of one row."""
    usable = chunk - 32
    with open(path, "wb") as fh:
        # chunks 0 (container header) and 1 (tree), then HeaderData (table + data), then the stream
        n_head = max(1, -(-len(header) // usable))
        # the header's pointer table, a chain of chunks like the stream's (a big map's header holds its
        # overview images: over 4 MB at 1273 x 1662)
        n_head_table = -(-n_head * 4 // usable)
        head_tables = list(range(2, 2 + n_head_table))
        head_table = head_tables[0]
        head_data = list(range(2 + n_head_table, 2 + n_head_table + n_head))
        first = head_data[-1] + 1
        fh.truncate(0x118 + first * chunk)

        def put(n: int, payload: bytes, chunk_head: bytes = b"") -> None:
            fh.seek(0x118 + n * chunk)
            fh.write(chunk_head.ljust(32, b"\0") + payload.ljust(usable, b"\0"))

        head_ptrs = struct.pack(f"<{n_head}I", *head_data)
        for k, c in enumerate(head_tables):
            link = struct.pack("<I", head_tables[k + 1]) if k + 1 < n_head_table else b""
            put(c, head_ptrs[k * usable : (k + 1) * usable], link)
        for k, c in enumerate(head_data):
            put(c, header[k * usable : (k + 1) * usable])
        pending = bytearray(struct.pack("<ii", rows, cols).ljust(0x1A0, b"\0"))
        n, size = first, 0
        for data in row_bytes:
            pending += data
            while len(pending) >= usable:
                put(n, bytes(pending[:usable]))
                del pending[:usable]
                n, size = n + 1, size + usable
        if pending or n == first:
            put(n, bytes(pending))
            n, size = n + 1, size + len(pending)
        data_chunks = list(range(first, n))
        table = struct.pack(f"<{len(data_chunks)}I", *data_chunks)
        n_table = -(-len(table) // usable)
        table_chunks = list(range(n, n + n_table))
        for k, c in enumerate(table_chunks):
            link = struct.pack("<I", table_chunks[k + 1]) if k + 1 < n_table else b""
            put(c, table[k * usable : (k + 1) * usable], link)
        total_chunks = n + n_table

        def item(pointer: int, length: int, parent: int, name: str, is_dir: bool) -> bytes:
            return struct.pack(
                "<iQQQQIi176s?3s256s32s",
                pointer,
                length,
                0,
                0,
                0,
                0,
                parent,
                b"",
                is_dir,
                b"",
                name.encode(),
                b"",
            )

        tree = (
            item(0, 0, -1, "EDSDatabase", True)
            + item(head_table, len(header), 0, "HeaderData", False)
            + item(table_chunks[0], size, 0, "SpectrumData0", False)
        )
        assert len(tree) <= usable, "the item tree must fit one chunk"
        put(1, tree)
        fh.seek(0)
        fh.write(b"AAMVHFSS")
        fh.seek(0x124)
        fh.write(struct.pack("<fI", 2.6, chunk))
        fh.seek(0x140)
        fh.write(struct.pack("<III", 1, 3, total_chunks))
    return path
