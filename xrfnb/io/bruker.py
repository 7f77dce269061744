"""Bruker Esprit ``.spx`` / ``.bcf`` and Lispix/ripple ``.rpl`` + ``.raw``, read through rosettasciio.

Any failure inside rosettasciio (a corrupted or unsupported file) becomes a :class:`FormatError`
naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import CalibrationError, DataError, FormatError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum
from .bcf import BcfDetectorSum, BcfRows, SfsStream, index_bcf_rows, select_bcf_maps
from .common import make_spectrum, read_text, short_repr

__all__ = ["read_bcf", "read_rpl", "read_spx", "read_xrf_header", "rsciio_read", "write_rpl"]

_LENGTH_TO_UM = {"nm": 1e-3, "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def rsciio_read(func: Callable[..., Any], path: Path, what: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Call a rosettasciio reader, turning every failure into :class:`FormatError`.

    Parameters
    ----------
    func : callable
        The reader (``rsciio.bruker.file_reader`` ...), called as ``func(str(path), **kwargs)`` with
        rosettasciio's log messages and warnings silenced.
    path : Path
        The file.
    what : str
        What the file should be (``"Bruker .spx spectrum"``), for the messages.
    **kwargs
        Passed to ``func``.

    Returns
    -------
    list of dict
        rosettasciio's items; the first holds ``"data"``.

    Raises
    ------
    FormatError
        The reader failed (anything it raises, a MemoryError included) or returned no spectrum data.
    """
    logger = logging.getLogger("rsciio")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = func(str(path), **kwargs)
    except XRFNBError:
        raise
    except MemoryError:
        raise FormatError(
            f"{path}: the {what} header asks for more memory than available (corrupted?)"
        ) from None
    except Exception as exc:  # rosettasciio raises anything from struct.error to KeyError on bad files
        raise FormatError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    finally:
        logger.setLevel(level)
    if not isinstance(out, list) or not out or not isinstance(out[0], dict) or "data" not in out[0]:
        raise FormatError(f"{path}: the {what} holds no spectrum data")
    return out


def _find(d: Any, key: str) -> Any:
    """First value of ``key`` anywhere in a nested mapping."""
    if isinstance(d, Mapping):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _energy_calibration(axis: Mapping[str, Any], path: Path, n_channels: int) -> EnergyCalibration:
    units = str(axis.get("units") or "keV").strip()
    scale = {"ev": 1e-3, "kev": 1.0}.get(units.lower())
    if scale is None:
        raise CalibrationError(f"{path}: energy axis in unsupported units {units!r} (expected eV or keV)")
    try:
        cal = EnergyCalibration(float(axis.get("offset", 0.0)) * scale, float(axis.get("scale", 0.0)) * scale)
        return cal.check_monotonic(n_channels)
    except (TypeError, ValueError, OverflowError):
        raise CalibrationError(
            f"{path}: energy calibration offset/gain (CalibAbs/CalibLin) are not finite numbers: "
            f"offset {short_repr(axis.get('offset'))}, gain {short_repr(axis.get('scale'))}; fix the header "
            "or pass calibration= to load()"
        ) from None
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def _pixel_size_um(axis: Mapping[str, Any]) -> float | None:
    factor = _LENGTH_TO_UM.get(str(axis.get("units") or "").strip())
    try:
        scale = float(axis.get("scale", 0.0))
    except (TypeError, ValueError, OverflowError):
        return None
    if factor is None or not np.isfinite(scale) or scale <= 0:
        return None
    return scale * factor


def read_spx(path: Path) -> Spectrum:
    """Bruker ``.spx`` spectrum: counts, ``CalibAbs``/``CalibLin`` calibration, live/real time."""
    from rsciio.bruker import file_reader

    item = rsciio_read(file_reader, path, "Bruker .spx spectrum")[0]
    counts = np.asarray(item["data"])
    if counts.ndim != 1:
        raise DataError(f"{path}: .spx data has shape {counts.shape}, expected one spectrum")
    cal = _energy_calibration(item["axes"][-1], path, counts.size)
    eds = _find(item.get("metadata", {}), "EDS") or {}
    live, real = eds.get("live_time"), eds.get("real_time")
    meta = {"format": "spx", "rsciio_metadata": item.get("metadata", {})}
    with contextlib.suppress(XRFNBError, OSError):  # the header is extra: the spectrum loads without it
        header = xrf_header(path.read_bytes(), path)
        if header:
            meta["bruker_header"] = header
    return make_spectrum(
        counts.astype(np.int64, copy=False) if counts.dtype.kind == "u" else counts,
        cal,
        path,
        live_time_s=live,
        real_time_s=real,
        metadata=meta,
        calibration_source="file header (CalibAbs/CalibLin)",
    )


def _check_sfs(path: Path) -> None:
    """Check the SFS container header and file tree of a ``.bcf`` before rosettasciio follows them.

    A corrupted chunk size, tree address or file size makes rosettasciio chase chunk chains without
    end (unbounded memory); every value is checked against the container's own size here.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(0x14C)
        if len(head) < 0x14C:
            raise FormatError(f"{path}: the .bcf container header is truncated ({size} bytes)")
        _, chunk = struct.unpack_from("<fI", head, 0x124)
        tree_address, n_items, _ = struct.unpack_from("<III", head, 0x140)
        if not 0x240 <= chunk <= max(size, 0x240) or chunk > 1 << 26:
            raise FormatError(f"{path}: .bcf container chunk size {chunk} is invalid (corrupted header)")
        if n_items < 1 or n_items * 0x200 > size or 0x118 + (tree_address + 1) * chunk > size + chunk:
            raise FormatError(f"{path}: .bcf container file tree is invalid (corrupted header or truncated)")
        usable = chunk - 32
        if n_items * 0x200 > usable:
            return  # a tree spanning several chunks: rosettasciio follows a chain bounded by n_items
        fh.seek(chunk * tree_address + 0x138)
        tree = fh.read(0x200 * n_items)
    if len(tree) < 0x200 * n_items:
        raise FormatError(f"{path}: .bcf container file tree is truncated")
    for k in range(n_items):
        pointer, item_size = struct.unpack_from("<iQ", tree, k * 0x200)
        is_dir = tree[k * 0x200 + 0xDC]
        if is_dir:
            continue
        if item_size > size or pointer < 0 or 0x138 + pointer * chunk > size:
            raise FormatError(
                f"{path}: .bcf container entry {k} claims {item_size} bytes at chunk {pointer} in a "
                f"{size}-byte file (truncated or corrupted)"
            )


def read_bcf(path: Path, index: int | None = None, detector: int | str | None = None) -> Scan:
    """Bruker ``.bcf`` hypermap as a lazy :class:`Scan`: rows decoded on demand, any map size.

    One pass over the pulse stream checks every pixel header and records where each row starts; the
    scan's counts are then a :class:`~xrfnb.io.bcf.BcfRows` that reads, checks (every record, every
    packed bunch) and decodes only the rows asked for, with rosettasciio's compiled decoder, one block
    of rows (about 48 MB of counts) at a time. Counts are ``uint16`` for pulse-list files and ``uint32``
    when some pixel is "instructed"-packed, so no pixel can overflow.

    Parameters
    ----------
    path : Path
        The file.
    index : int, optional
        Which hypermap of the file (``SpectrumData<index>``); default the first (on a file of several
        detectors: the sum of all, see ``detector``).
    detector : int or "sum", optional
        Files from systems with several EDS detectors (an M4 or M6 with two SDDs) hold one hypermap per
        detector, their number in the header's ``DetectorCount``: one detector (0, 1, ...; its own
        calibration and live time) or ``"sum"`` (the default, what Esprit shows): the detectors' counts
        added (as integers when their calibrations agree to 1 % of a channel, else each rebinned onto
        detector 0's energy axis, as ``float32``), lazily, with the mean of their live times.

    Returns
    -------
    Scan
        Counts (rows, cols, channels), lazy. Live time: a pixel record of the pulse stream holds its
        column, channel counts, packing flag, sizes and number of pulses, but no live or real time; the
        only times in a ``.bcf`` are those of each hypermap's sum spectrum (header ``LifeTime`` and
        ``RealTime``, milliseconds). The scan's ``live_time_s`` is therefore that total divided by the
        number of pixels, the same for every pixel (the totals are kept in
        ``metadata["bcf_total_live_time_s"]`` and ``["bcf_total_real_time_s"]``, per detector in
        ``["bcf_detector_live_time_s"]``). ``metadata["bcf_detector"]`` is the detector read (or
        ``"sum"``) on multi-detector files.

    Raises
    ------
    DataError
        An ``index`` or ``detector`` the file does not hold (the message lists the valid choices).
    FormatError
        A damaged file, or ``detector=`` where the header's ``DetectorCount`` does not match the number
        of hypermaps.
    """
    from rsciio.bruker import _api as bruker

    def open_maps(filename: str) -> list[dict[str, Any]]:
        reader = bruker.BCF_reader(filename)
        sel = select_bcf_maps(path, reader.available_indexes, reader.header.mapping_count, index, detector)
        rows, cols = reader.header.image.height, reader.header.image.width
        maps = []
        for which in sel.indexes:
            eds = reader.header.get_spectra_metadata(which)
            n_ch = int(eds.data.size)
            if rows < 1 or cols < 1 or n_ch < 2:
                raise FormatError(f"{path}: hypermap of {rows} x {cols} pixels x {n_ch} channels")
            stream = SfsStream(path, reader.get_file(f"EDSDatabase/SpectrumData{which}"))
            offsets, packed = index_bcf_rows(stream, rows, cols, path)
            dtype = np.dtype(np.uint32 if packed else np.uint16)
            hw = eds.hardware_metadata
            maps.append(
                {
                    "rows": BcfRows(stream, offsets, (rows, cols, n_ch), dtype, path),
                    "offset": eds.offset,
                    "scale": eds.scale,
                    "live_time": hw.get("LifeTime"),
                    "real_time": hw.get("RealTime"),
                }
            )
        return [
            {
                "data": maps,
                "selection": sel,
                "pixel": {"scale": reader.header.x_res, "units": reader.header.units},
                "name": reader.header.name,
                "indexes": sorted(reader.available_indexes),
            }
        ]

    _check_sfs(path)
    item = rsciio_read(open_maps, path, "Bruker .bcf hypermap")[0]
    header: dict[str, Any] = {}
    with contextlib.suppress(XRFNBError):  # the header is extra: the map loads without it
        header = read_xrf_header(path, "bcf")
    sel = item["selection"]
    maps = item["data"]
    cals = [
        _energy_calibration(
            {"offset": m["offset"], "scale": m["scale"], "units": "keV"}, path, m["rows"].shape[2]
        )
        for m in maps
    ]
    meta: dict[str, Any] = {
        "format": "bcf",
        "source": str(path),
        "calibrated": True,
        "name": item["name"],
        "calibration_source": "file header (hypermap sum spectrum CalibAbs/CalibLin)",
        "bcf_indexes": item["indexes"],
    }
    if len(maps) == 1:
        data: BcfRows | BcfDetectorSum = maps[0]["rows"]
        meta["bcf_index"] = sel.indexes[0]
    else:
        data = BcfDetectorSum([m["rows"] for m in maps], cals)
        meta["bcf_summed_indexes"] = list(sel.indexes)
        meta["sum_note"] = (
            f"sum of the {len(maps)} detectors' hypermaps"
            + (", each rebinned onto detector 0's energy axis" if any(data.rebinned) else "")
            + "; live_time_s is the mean of the detectors' live times"
        )
    if sel.detector is not None:
        meta["bcf_detector"] = sel.detector
        meta["bcf_detectors"] = sel.n_detectors
        meta["bcf_detector_calibrations"] = [c.to_dict() for c in cals]
    if header:
        meta["bruker_header"] = header
    n_pixels = data.shape[0] * data.shape[1]
    try:  # Esprit stores milliseconds
        lives = [None if m["live_time"] is None else float(m["live_time"]) / 1000.0 for m in maps]
        reals = [None if m["real_time"] is None else float(m["real_time"]) / 1000.0 for m in maps]
    except (TypeError, ValueError, OverflowError):
        raise FormatError(f"{path}: LifeTime/RealTime in the .bcf header are not numbers") from None
    live = None
    if all(v is not None for v in lives):
        meta["bcf_total_live_time_s"] = float(np.mean(lives))
        live = meta["bcf_total_live_time_s"] / n_pixels
        if len(maps) > 1:
            meta["bcf_detector_live_time_s"] = lives
    if all(v is not None for v in reals):
        meta["bcf_total_real_time_s"] = float(np.mean(reals))
    try:
        pixel = _pixel_size_um(item["pixel"])
        return Scan(data, cals[0], pixel_size_um=pixel, live_time_s=live, metadata=meta)
    except XRFNBError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _rpl_header(path: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    for line in read_text(path).splitlines():
        s = line.strip()
        if not s or s.startswith(";"):
            continue
        parts = s.split(None, 1)
        if len(parts) == 2:
            info[parts[0].lower()] = parts[1].strip()
    return info


def read_rpl(path: Path) -> Spectrum | Scan:
    """Lispix/ripple ``.rpl`` header + ``.raw`` data as a lazy (dask, memory-mapped) :class:`Scan`.

    Calibration from ``depth-origin``/``depth-scale``/``depth-units`` (HyperSpy, Bruker) or
    ``ev-per-chan``; ``live-time`` (seconds) is taken as the live time of every pixel; the pixel size from
    ``width-scale``/``width-units``. ``record-by image`` files are transposed (lazily) to
    (rows, cols, channels). A 1 x 1 map loads as a :class:`Spectrum`.
    """
    from rsciio.ripple import file_reader

    if path.suffix.lower() == ".raw":
        path = next(p for p in (path.with_suffix(".rpl"), path.with_suffix(".RPL")) if p.exists())
    head = _rpl_header(path)
    try:
        width, height, depth = (int(head[k]) for k in ("width", "height", "depth"))
        offset, length = int(head.get("offset", "0")), int(head["data-length"])
    except KeyError as exc:
        raise FormatError(f"{path}: ripple header lacks the {exc.args[0]!r} key") from None
    except ValueError:
        raise FormatError(f"{path}: ripple width/height/depth/offset/data-length must be integers") from None
    if min(width, height, depth, length) < 1 or offset < 0:
        raise FormatError(f"{path}: ripple header has a non-positive size: {width} x {height} x {depth}")
    record_by = head.get("record-by", "vector").lower()
    if record_by == "dont-care" and depth == 1:
        record_by = "vector"  # one value per pixel: both orders are the same
    if record_by not in ("vector", "image"):
        raise FormatError(
            f"{path}: ripple header says record-by {head.get('record-by')!r} for {depth} channels; it "
            "must be 'vector' (the channels of a pixel stored together) or 'image' (one image per channel) "
            "('dont-care' only for depth 1): fix the header"
        )
    raw = next((p for p in (path.with_suffix(".raw"), path.with_suffix(".RAW")) if p.is_file()), None)
    if raw is None:
        raise FormatError(
            f"{path}: the data file {path.with_suffix('.raw').name} is missing next to the header"
        )
    need = offset + width * height * depth * length
    have = raw.stat().st_size
    if have < need:
        raise FormatError(
            f"{raw}: holds {have} bytes but {path.name} describes {width} x {height} x {depth} values of "
            f"{length} bytes from offset {offset} ({need} bytes): truncated file or mismatched header"
        )
    item = rsciio_read(file_reader, path, "ripple .rpl/.raw pair", lazy=True)[0]
    data = item["data"]
    if record_by == "image":
        data = data.reshape(depth, height, width).transpose(1, 2, 0)
    else:
        data = data.reshape(height, width, depth)
    if "depth-scale" in head or "ev-per-chan" in head:
        key = "depth-scale" if "depth-scale" in head else "ev-per-chan"
        units = head.get("depth-units", "eV" if key == "ev-per-chan" else "")
        try:
            scale, origin = float(head[key]), float(head.get("depth-origin", "0"))
        except ValueError:
            raise CalibrationError(f"{path}: {key}/depth-origin are not numbers") from None
        if units.lower() not in ("ev", "kev"):
            # no units: an XRF/EDS channel is never 0.5 keV wide, so a large scale means eV
            units = "eV" if scale >= 0.5 else "keV"
        cal = _energy_calibration({"offset": origin, "scale": scale, "units": units}, path, depth)
        source = f"file header ({key}, {units})"
    else:
        cal, source = None, ""
    live = None
    if "live-time" in head:
        try:
            live = float(head["live-time"])
        except ValueError:
            raise FormatError(f"{path}: live-time is not a number: {head['live-time']!r}") from None
    meta: dict[str, Any] = {"format": "rpl", "ripple_header": head}
    if width == 1 and height == 1:
        return make_spectrum(
            np.asarray(data.compute()).reshape(depth),
            cal,
            path,
            live_time_s=live,
            metadata=meta,
            calibration_source=source,
        )
    meta.update(source=str(path), calibrated=cal is not None, calibration_source=source or "none in file")
    pixel = _pixel_size_um({"scale": head.get("width-scale", 0), "units": head.get("width-units", "")})
    try:
        return Scan(
            data, cal or EnergyCalibration(0.0, 1.0), pixel_size_um=pixel, live_time_s=live, metadata=meta
        )
    except XRFNBError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def write_rpl(obj: Spectrum | Scan, rpl_path: Path, raw_path: Path) -> None:
    """Write a ripple header (``record-by vector``, little-endian) and its ``.raw`` data file.

    Only linear calibrations fit the ripple format; a quadratic term raises :class:`CalibrationError`.
    """
    cal = obj.calibration
    if cal.quadratic_keV != 0.0:
        raise CalibrationError(
            f"{rpl_path}: the ripple format cannot store a quadratic calibration; save as .h5"
        )
    if isinstance(obj, Spectrum):
        rows, cols, depth = 1, 1, obj.n_channels
        blocks = [np.asarray(obj.counts).reshape(1, 1, -1)]
        dtype = np.dtype(obj.counts.dtype)
    else:
        rows, cols, depth = obj.shape
        dtype = np.dtype(obj.counts.dtype)
        blocks = (b for _, b in obj.iter_blocks())
    kinds = {"i": "signed", "u": "unsigned", "f": "float"}
    if (
        dtype.kind not in kinds
        or dtype.itemsize not in (1, 2, 4, 8)
        or (dtype.kind == "f" and dtype.itemsize < 4)
    ):
        dtype = np.dtype(np.float64)
    dtype = dtype.newbyteorder("<")
    head = {
        "width": cols,
        "height": rows,
        "depth": depth,
        "offset": 0,
        "data-length": dtype.itemsize,
        "data-type": kinds[dtype.kind],
        "byte-order": "little-endian",
        "record-by": "vector",
        "depth-origin": repr(cal.offset_keV),
        "depth-scale": repr(cal.gain_keV),
        "depth-units": "keV",
        "depth-name": "Energy",
        "signal": "EDS_SEM",
    }
    live = obj.live_time_s
    if live is not None and np.ndim(live) == 0:
        head["live-time"] = repr(float(live))
    if isinstance(obj, Scan) and obj.pixel_size_um is not None:
        for axis in ("width", "height"):
            head[f"{axis}-scale"] = repr(obj.pixel_size_um)
            head[f"{axis}-units"] = "um"
    rpl_path.write_text("".join(f"{k}\t{v}\n" for k, v in head.items()), encoding="latin-1")
    with open(raw_path, "wb") as fh:
        for block in blocks:
            fh.write(np.ascontiguousarray(block, dtype=dtype).tobytes())


# ---------------------------------------------------------------------------------------------- XRF header
#: (class instance, tag, key in the returned mapping, factor to the key's unit)
_XRF_NUMBERS: tuple[tuple[str, str, str, float], ...] = (
    ("TRTXrfHeader", "Voltage", "tube_voltage_kV", 1.0),
    ("TRTXrfHeader", "Current", "tube_current_uA", 1.0),
    ("TRTXrfHeader", "Anode", "anode_z", 1.0),
    ("TRTXrfHeader", "TubeIncidentAngle", "tube_incidence_deg", 1.0),
    ("TRTXrfHeader", "TubeTakeOffAngle", "tube_takeoff_deg", 1.0),
    ("TRTXrfHeader", "SpotSize", "spot_size_um", 1.0),
    ("TRTXrfHeader", "ExcitationAngle", "excitation_angle_deg", 1.0),
    ("TRTXrfHeader", "DetectionAngle", "detection_angle_deg", 1.0),
    ("TRTXrfHeader", "ExcitationPathLength", "excitation_path_mm", 1.0),
    ("TRTXrfHeader", "DetectionPathLength", "detection_path_mm", 1.0),
    # Esprit stores the fraction of the full sphere, not sr: 0.0065 (every M4 and M6 file here) is
    # 0.082 sr, a 30 mm2 XFlash at 19 mm, beside the header's 16-20 mm DetectionPathLength; read as sr it
    # would need a 2.6 mm2 detector at 20 mm, and the M4 blanks' absolute count rate says 4 pi
    # (benchmarks/bench_physics_real.py).
    ("TRTXrfHeader", "SolidAngleDetection", "detection_solid_angle_sr", 4.0 * 3.141592653589793),
    ("TRTXrfHeader", "ChamberPressure", "chamber_pressure_mbar", 1.0),
    ("TRTXrfHeader", "AzimutAngleAbs", "azimuth_angle_deg", 1.0),
    ("TRTXrfHeader", "DetAzimutAngle", "detector_azimuth_angle_deg", 1.0),
    ("TRTXrfHeader", "TiltAngle", "tilt_angle_deg", 1.0),
    ("TRTXrfHeader", "FlowRate", "flow_rate", 1.0),
    ("TRTDetectorHeader", "DetectorThickness", "detector_thickness_um", 1000.0),  # Esprit: mm
    ("TRTDetectorHeader", "SiDeadLayerThickness", "dead_layer_um", 1.0),
    ("TRTSpectrumHeader", "CalibAbs", "calibration_offset_keV", 1.0),
    ("TRTSpectrumHeader", "CalibLin", "calibration_gain_keV", 1.0),
    ("TRTSpectrumHeader", "ChannelCount", "n_channels", 1.0),
    ("TRTSpectrumHeader", "SigmaAbs", "sigma_abs_keV2", 1.0),
    ("TRTSpectrumHeader", "SigmaLin", "sigma_lin_keV", 1.0),
    ("TRTSpectrumHardwareHeader", "RealTime", "real_time_s", 1e-3),  # Esprit: ms
    ("TRTSpectrumHardwareHeader", "LifeTime", "live_time_s", 1e-3),
    ("TRTSpectrumHardwareHeader", "DeadTime", "dead_time_percent", 1.0),
    ("TRTSpectrumHardwareHeader", "PulseDensity", "pulse_density_cps", 1.0),
    ("TRTSpectrumHardwareHeader", "ShapingTime", "shaping_time", 1.0),
)
_XRF_TEXTS: tuple[tuple[str, str, str], ...] = (
    ("TRTXrfHeader", "TubeType", "tube_type"),
    ("TRTXrfHeader", "Optic", "optic"),
    ("TRTXrfHeader", "OpticParam", "optic_params"),
    ("TRTXrfHeader", "Atmosphere", "atmosphere"),
    ("TRTXrfHeader", "ChassisType", "chassis_type"),
    ("TRTDetectorHeader", "Type", "detector_type"),
    ("TRTDetectorHeader", "Technology", "detector_technology"),
    ("TRTDetectorHeader", "WindowType", "detector_window_type"),
    ("TRTXrfFPModelHeader", "FPModel", "fp_model"),
)


def _number_or_none(text: str | None) -> float | None:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _filter_layers(node: ET.Element) -> list[dict[str, float]]:
    """``<AtomicNumber>13,22</AtomicNumber><Thickness>1E2,2.5E1</Thickness>`` -> [{Z, thickness_um, ...}]."""
    if node is None:
        return []
    z = [v for v in (node.findtext("AtomicNumber") or "").split(",") if v.strip()]
    t = [v for v in (node.findtext("Thickness") or "").split(",") if v.strip()]
    area = [v for v in (node.findtext("RelativeArea") or "").split(",") if v.strip()]
    layers = []
    for k, (zk, tk) in enumerate(zip(z, t, strict=False)):
        zv, tv = _number_or_none(zk), _number_or_none(tk)
        if zv is None or tv is None:
            continue
        layer = {"Z": int(zv), "thickness_um": tv}
        if k < len(area) and _number_or_none(area[k]) is not None:
            layer["relative_area"] = float(area[k])
        layers.append(layer)
    return layers


def _atom_layers(node: ET.Element) -> list[dict[str, float]]:
    """``<Layer0 Atom="4" Thickness="1.3E1"/>`` children -> [{Z, thickness_um}] (Esprit: um)."""
    layers = []
    for child in list(node) if node is not None else []:
        z, t = _number_or_none(child.get("Atom")), _number_or_none(child.get("Thickness"))
        if z is not None and t is not None:
            layers.append({"Z": int(z), "thickness_um": t})
    return layers


def xrf_header(xml: bytes, path: Path) -> dict[str, Any]:
    """The XRF instrument header of a Bruker ``.spx`` (or ``.bcf`` header) as a plain mapping, units in names.

    Reads the first ``TRTSpectrum`` class instance that holds a ``TRTXrfHeader``: tube (anode Z, kV,
    current in uA, angles, window layers, type), optics, primary filter (name and layers), excitation and
    detection angles and path lengths (mm), detection solid angle (sr), atmosphere and chamber pressure
    (mbar), detector (type, thickness, Si dead layer, window layers and the decoded ``DetLayers``),
    calibration (``CalibAbs``/``CalibLin`` keV, ``SigmaAbs`` keV2 and ``SigmaLin`` keV of Esprit's
    resolution ``sigma^2 = SigmaAbs + SigmaLin * E``) and the hardware counters (times in s, dead time %,
    pulse density in counts/s). Only what the file holds is returned; an empty mapping when no
    ``TRTXrfHeader`` is found (an electron-microscope file). Unparsable values are left out.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise FormatError(f"{path}: the Bruker XML header is not well-formed ({exc})") from None
    spectrum = next(
        (
            node
            for node in root.iter("ClassInstance")
            if node.get("Type") == "TRTSpectrum"
            and node.find("TRTHeaderedClass/ClassInstance[@Type='TRTXrfHeader']") is not None
        ),
        None,
    )
    if spectrum is None:
        return {}
    headered = spectrum.find("TRTHeaderedClass")
    parts = {node.get("Type"): node for node in headered.findall("ClassInstance")}
    parts["TRTSpectrumHeader"] = spectrum.find("ClassInstance[@Type='TRTSpectrumHeader']")
    out: dict[str, Any] = {}
    for part, tag, key, factor in _XRF_NUMBERS:
        node = parts.get(part)
        value = _number_or_none(node.findtext(tag)) if node is not None else None
        if value is not None:
            out[key] = float(f"{value * factor:.12g}")
    for part, tag, key in _XRF_TEXTS:
        node = parts.get(part)
        text = node.findtext(tag) if node is not None else None
        if text is not None and text.strip():
            out[key] = text.strip()
    xrf, det = parts["TRTXrfHeader"], parts.get("TRTDetectorHeader")
    if xrf.find("TubeWindow") is not None:
        out["tube_window_layers"] = _filter_layers(xrf.find("TubeWindow"))
    excitation = xrf.find("ExcitationFilter")
    if excitation is not None:
        out["filter_name"] = (excitation.findtext("FilterId") or "").strip()
        out["filter_layers"] = _filter_layers(excitation)
    if det is not None:
        if det.find("WindowLayers") is not None:
            out["detector_window_layers"] = _atom_layers(det.find("WindowLayers"))
        packed = det.findtext("DetLayers")
        if packed and packed.strip():
            import base64
            import zlib

            try:
                inner = ET.fromstring(zlib.decompress(base64.b64decode(packed.strip()), bufsize=1 << 16))
                out["detector_layers"] = _atom_layers(inner)
            except (ValueError, zlib.error, ET.ParseError):
                pass  # a damaged DetLayers block: left out (it is not used for the instrument)
    return out


def read_xrf_header(path: Path, fmt: str) -> dict[str, Any]:
    """:func:`xrf_header` of a ``.spx`` file or of a ``.bcf`` container's ``EDSDatabase/HeaderData``.

    Parameters
    ----------
    path : Path
        The file.
    fmt : {"spx", "bcf"}
        Its format.

    Returns
    -------
    dict
        The parsed XRF, detector and spectrum header fields; empty without an XRF header.
    """
    if fmt == "spx":
        try:
            return xrf_header(path.read_bytes(), path)
        except OSError as exc:
            raise FormatError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    _check_sfs(path)

    def header_bytes(filename: str) -> list[dict[str, Any]]:
        from rsciio.bruker import _api as bruker

        sfs = bruker.SFS_reader(filename)
        return [{"data": sfs.get_file("EDSDatabase/HeaderData").get_as_BytesIO_string().getvalue()}]

    raw = rsciio_read(header_bytes, path, "Bruker .bcf header")[0]["data"]
    start = raw.find(b"<")
    return xrf_header(raw[max(start, 0) :].rstrip(b"\x00"), path)
