"""The ``xrfnb`` command line: identify, report, info, convert, train, evaluate, serve.

Every error a user can cause is reported as one line ``xrfnb: error: ...`` on stderr with exit status 2;
an interruption (Ctrl-C, SIGTERM) exits with status 130 and leaves no corrupt output. The model room
(torch) and the dashboard (panel) are imported only by the subcommands that need them (:func:`_heavy`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from .. import __version__
from .._errors import CalibrationError, DataError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.spectrum import Scan, Spectrum
from ..fitting.calibration import calibrate
from ..fitting.detect import DetectedElement, detect_elements
from ..fitting.instrument_fit import fit_instrument
from ..io.atomic import atomic_path as _atomic_output
from ..io.hdf5 import partial_path, preflight, write_hdf5_resumable
from ..io.load import SAVE_FORMATS, load, save
from ..maps.mapping import map_pigments
from ..maps.pigmentmaps import PigmentMaps
from ..maps.storage import check_input_outside_working_folder, check_output_path
from ..physics.instrument import DEFAULT_INSTRUMENT, Instrument, resolve_instrument
from .report import find_chromium, write_report

if TYPE_CHECKING:  # the model room loads torch: see _heavy
    from ..model.model import PigmentModel

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _heavy(name: str) -> Callable[..., Any]:
    """The torch- or panel-bearing function ``name`` of the model or ui room, imported on first use.

    The model room loads torch and the dashboard loads panel (about 2 s each): only the subcommands that
    need them (identify, train, evaluate, serve) pay for that, so ``xrfnb info`` and ``xrfnb report``
    start at once. Tests substitute this function to see what a subcommand hands its backend.
    """
    if name == "load_model":
        from ..model.model import load_model

        return load_model
    if name == "train_model":
        from ..model.train import train_model

        return train_model
    if name == "adapt_model":
        from ..model.adapt import adapt_model

        return adapt_model
    if name == "evaluate_model":
        from ..model.evaluate import evaluate_model

        return evaluate_model
    if name == "serve":
        from .dashboard import serve

        return serve
    raise KeyError(name)  # pragma: no cover - a programming error


# -- loading (module-level so tests can substitute them) -----------------------------------------------
def _parse_calibration(text: str) -> EnergyCalibration:
    """``OFFSET_KEV,GAIN_KEV[,QUADRATIC_KEV]`` -> EnergyCalibration (``--calibration``)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        values = [float(t) for t in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise CalibrationError(
            f"--calibration {text!r}: give OFFSET_KEV,GAIN_KEV (keV of channel 0, keV per channel) "
            "or OFFSET_KEV,GAIN_KEV,QUADRATIC_KEV, e.g. --calibration -0.96,0.01"
        )
    return EnergyCalibration(*values)


def _parse_peaks(text: str) -> dict[str, float]:
    """``"Ti Ka=452,Zn Ka=864"`` -> {line: channel} (``--calibrate``)."""
    peaks: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        name, sep, channel = item.partition("=")
        try:
            value = float(channel)
        except ValueError:
            value = None
        if not sep or not name.strip() or value is None:
            raise CalibrationError(
                f"--calibrate {text!r}: {item!r} is not LINE=CHANNEL; give the peaks you recognise as "
                "line names and channel numbers, e.g. --calibrate \"Fe Ka=640,Pb La=1050\""
            )
        peaks[" ".join(name.split())] = value
    return peaks


def _load_calibrated(
    args: argparse.Namespace, path: str, *, fitted_instrument: bool = False
) -> Spectrum | Scan:
    """Load ``path`` for a subcommand, applying ``--element``, ``--calibration`` or ``--calibrate``.

    ``--calibration fit`` (or ``fitted_instrument``: ``identify --instrument fit``) fits the instrument from
    the data (:func:`_instrument_fit`) and gives the data the fitted energy calibration.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    element = getattr(args, "element", None)
    detector = getattr(args, "detector", None)  # xrfnb convert --detector (Bruker .bcf)
    calibration = getattr(args, "calibration", None)
    peaks = getattr(args, "calibrate", None)
    if calibration is not None and peaks is not None:
        raise CalibrationError("give either --calibration or --calibrate, not both")
    fitted = calibration == "fit" or fitted_instrument
    if calibration is not None and calibration != "fit":
        return load(p, element=element, calibration=_parse_calibration(calibration), detector=detector)
    data = load(p, element=element, detector=detector)
    if fitted and peaks is None:
        fit = _instrument_fit(args, data, p)
        cal = fit.instrument.calibration
        if fit.calibration_blind:
            raise CalibrationError(
                f"{path} has no energy calibration, and the one the automatic fit found blind ({cal}, "
                f"from {', '.join(fit.lines) or 'no identified lines'}) is not applied unchecked: blind "
                "searches are often wrong on real spectra. Check it against peaks you recognise, then pass "
                "it with --calibration OFFSET_KEV,GAIN_KEV, or fit one to your peaks with --calibrate "
                '"Fe Ka=640,Pb La=1050"'
            )
        _info(f"applying the fitted calibration: {cal}")
        return data.with_calibration(cal, source="fitted by xrfnb.fit_instrument to " + ", ".join(fit.lines))
    if peaks is None:
        return data

    spectrum = data.sum_spectrum() if isinstance(data, Scan) else data
    fit = calibrate(spectrum, _parse_peaks(peaks))
    _info(f"calibration fitted to {len(fit.lines)} peaks: {fit.calibration}")
    for line, ch, e, r in zip(fit.lines, fit.channels, fit.energies_keV, fit.residuals_keV, strict=True):
        _info(f"  {line:<8} channel {ch:8.2f}  {e:7.4f} keV  residual {r * 1e3:+6.1f} eV")
    _info(f"  rms residual {fit.rms_residual_keV * 1e3:.1f} eV")
    return data.with_calibration(fit.calibration, source="fitted to --calibrate " + ", ".join(fit.lines))


def _add_load_options(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--calibration",
        metavar="OFFSET_KEV,GAIN_KEV",
        default=None,
        help="energy calibration to use instead of the file's: keV of channel 0 and keV per channel "
        "(optionally a third, quadratic term), e.g. -0.96,0.01; or 'fit': the calibration the automatic "
        "instrument fit (xrfnb.fit_instrument) reads from the data's peaks",
    )
    s.add_argument(
        "--calibrate",
        metavar="PEAKS",
        default=None,
        help='fit the calibration to peaks you recognise, as LINE=CHANNEL pairs, e.g. "Ti Ka=452,Zn Ka=864" '
        "(scans: in their sum spectrum)",
    )
    s.add_argument(
        "--element",
        type=_element_arg,
        default=None,
        metavar="N|sum",
        help="multi-detector files: one detector element (0, 1, ...) or 'sum' (the default: every element "
        "rebinned onto element 0's energy axis and summed)",
    )


def _element_arg(text: str) -> int | str:
    if text == "sum":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a detector element number or 'sum': {text!r}") from None


def _describe_detectors(meta: dict) -> str | None:
    """How a multi-element file's detectors were combined, for ``info`` (None for one detector)."""
    n = int(meta.get("n_elements", 1) or 1)
    if n <= 1:
        return None
    if meta.get("element") == "sum":
        return (
            f"{n} detector elements, summed: each rebinned onto element 0's energy axis; live time is "
            "their mean (--element N for one element)"
        )
    return f"{n} detector elements; showing element {meta.get('element')} only (--element sum for all)"


def _load_model(name: str | None, precision: str = "auto") -> PigmentModel:
    return _heavy("load_model")(name or "default", precision=precision)


# -- subcommands ----------------------------------------------------------------------------------
def _cmd_identify(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix.lower() not in (".h5", ".hdf5", ".nxs"):
        raise DataError(f"output {out} should be an HDF5 file ending in .h5")
    check_output_path(out)  # before the input and the model are loaded: nothing is created
    check_input_outside_working_folder(out, args.input)
    if args.report is not None:
        _check_report_path(Path(args.report))
    if args.instrument not in (None, "fit"):
        resolve_instrument(args.instrument)  # a bad name fails before the scan is read
    data = _load_calibrated(args, args.input, fitted_instrument=args.instrument == "fit")
    if isinstance(data, Spectrum):
        data = Scan.from_spectrum(data)
    if not isinstance(data, Scan):
        raise DataError(f"{args.input}: expected a scan or a spectrum, got {type(data).__name__}")
    model = _load_model(args.model, args.precision)
    if args.adapt:
        model = _adapted_for(args, data, model, out)
    instrument = args.instrument
    if instrument == "fit":  # fitted once (with --calibrate, after that calibration)
        instrument = _instrument_fit(args, data, Path(args.input)).instrument
    rows, cols, ch = data.shape
    _info(f"{args.input}: {rows} x {cols} pixels x {ch} channels -> {out}")
    maps = map_pigments(
        data,
        model,
        chunk_pixels=args.chunk_pixels,
        progress=not args.quiet,
        element_maps=args.elements,
        instrument=instrument,
        out=out,
        resume=args.resume,
    )
    if maps.metadata.get("element_maps_error"):
        _info(f"no element maps: {maps.metadata['element_maps_error']}")
    if args.tiff:
        paths = maps.to_tiff(args.tiff)
        _info(f"wrote {len(paths)} TIFF files to {args.tiff}")
    print(maps.summary().to_text())
    _info(f"wrote {out} ({maps.metadata.get('spectra_per_s', 0):.0f} spectra/s)")
    share = _ood_share(maps)
    if share > ADAPT_OOD_SHARE and not args.adapt:
        _info(
            f"{100 * share:.0f} % of the pixels are unlike anything the model was trained on (out of "
            f"distribution): its calls there are not to be trusted. Adapt the model to this scanner "
            f"(about 15 minutes): xrfnb adapt {args.input} --out MODEL_FOLDER, then xrfnb identify "
            f"{args.input} -o {out} --model MODEL_FOLDER (or rerun with --adapt)."
        )
    if args.report is not None:

        write_report(maps, args.report, scan=data, instrument=instrument)
        _info(f"wrote the report {args.report}")
    return 0


#: share of out-of-distribution pixels above which `xrfnb identify` advises adapting the model
ADAPT_OOD_SHARE = 0.2


def _ood_share(maps: PigmentMaps) -> float:
    """Share of the valid pixels that are out of distribution (:meth:`PigmentMaps.ood`)."""
    valid = ~np.asarray(maps.mask, dtype=bool)
    if not valid.any():
        return 0.0
    return float(maps.ood()[valid].mean())


def _start_instrument(args: argparse.Namespace, path: Path, meta: Mapping[str, Any]) -> Instrument | None:
    """Where an instrument fit starts: the preset ``--instrument`` names, else the file's Bruker header
    (``.spx``, ``.bcf``), else None (:func:`xrfnb.fit_instrument`'s default)."""
    named = getattr(args, "instrument", None)
    if named is not None and named != "fit":
        return resolve_instrument(named, meta)
    if path.suffix.lower() in (".spx", ".bcf"):
        try:
            return Instrument.from_file(path)
        except XRFNBError:
            return None
    return None


def _instrument_fit(args: argparse.Namespace, data: Spectrum | Scan, path: Path) -> Any:
    """The instrument fitted from ``data`` read from ``path`` (``--calibration fit``, ``identify --instrument
    fit``, ``--adapt``): fitted once per command, its summary printed once; ``--anode`` is fixed in the fit,
    the start is :func:`_start_instrument`'s."""
    fit = getattr(args, "_instrument_fit", None)
    if fit is not None:
        return fit
    fixed = {"anode": args.anode} if getattr(args, "anode", None) else None
    _info("fitting the instrument from the data (xrfnb.fit_instrument) ...")
    start = _start_instrument(args, path, dict(getattr(data, "metadata", {}) or {}))
    fit = fit_instrument(data, fixed=fixed, start=start)
    print(fit.summary())
    args._instrument_fit = fit
    return fit


def _adapt(args: argparse.Namespace, data: Spectrum | Scan, model: PigmentModel, folder: Path,
           resume: bool) -> PigmentModel:
    fit = _instrument_fit(args, data, Path(args.input))
    _info(f"adapting {model.name} to this instrument for {args.minutes:g} minutes -> {folder} "
          "(Ctrl-C keeps a checkpoint: rerun with --resume)")
    adapt_model = _heavy("adapt_model")
    return adapt_model(model, fit, folder, minutes=args.minutes, resume=resume, progress=not args.quiet)


def _adapted_for(
    args: argparse.Namespace, data: Spectrum | Scan, model: PigmentModel, out: Path
) -> PigmentModel:
    """``identify --adapt``: the model adapted to this scan's instrument, in ``OUTPUT-model/`` beside the
    output; a finished one there is used again, an interrupted one continued."""
    folder = out.with_name(out.stem + "-model")
    if (folder / "model.json").is_file():
        adapted = _load_model(str(folder), args.precision)
        record = adapted.meta.get("adapted")
        if not isinstance(record, dict) or record.get("from_model") != model.name:
            raise DataError(
                f"{folder} holds a model that is not {model.name} adapted by xrfnb: move it away, or use "
                f"it with --model {folder} instead of --adapt")
        _info(f"using the adapted model in {folder} (made {record.get('created', '?')}); remove the folder "
              "to adapt again")
        return adapted
    resume = (folder / "checkpoint" / "state.json").is_file()
    return _adapt(args, data, model, folder, resume)._with_precision(args.precision)


def _cmd_adapt(args: argparse.Namespace) -> int:
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--out {folder} exists and is not a folder")
    if (folder / "model.json").is_file() and not args.resume:
        raise DataError(f"{folder} already holds a model: choose another --out (nothing was changed)")
    if folder.is_dir() and any(folder.iterdir()) and not args.resume:
        raise DataError(f"{folder} is not empty: choose a new --out, or pass --resume to continue the "
                        "adaptation it holds")
    data = _load_calibrated(args, args.input)
    model = _load_model(args.model)
    adapted = _adapt(args, data, model, folder, args.resume)
    record = adapted.meta.get("adapted", {})
    _info(f"adapted model written to {folder} ({record.get('steps', 0):,} steps, "
          f"{record.get('train_time_s', 0) / 60:.1f} minutes); its card: {folder / 'README.md'}")
    _info(f"use it: xrfnb identify {args.input} -o MAPS.h5 --model {folder}")
    return 0


class _ProgressRows:
    """A scan's counts that advance a progress bar by the rows read (``xrfnb convert`` to .npz/.npy/.rpl)."""

    def __init__(self, counts: Any, bar: tqdm) -> None:
        self._counts, self._bar = counts, bar
        self.shape, self.dtype = tuple(counts.shape), np.dtype(counts.dtype)
        self.chunks = getattr(counts, "chunks", None)

    def __getitem__(self, key: Any) -> np.ndarray:
        block = np.asarray(self._counts[key])
        if isinstance(key, slice):
            self._bar.update(len(range(*key.indices(self.shape[0]))))
        return block


def _cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = SAVE_FORMATS.get(out.suffix.lower())
    if fmt not in ("hdf5", "npz", "npy", "rpl"):
        raise DataError(f"output {out} should end in .h5 (xrfnb's chunked HDF5), .npz, .npy or .rpl")
    if args.resume and fmt != "hdf5":
        raise DataError(f"--resume continues conversions to HDF5 (.h5); {out} is written in one go")
    if out.is_dir():
        raise DataError(f"output {out} is a folder; give a file name, e.g. {out / 'scan.h5'}")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise DataError(f"cannot write {out}: folder {out.parent} does not exist")
    for what, path in (("output", out), ("output's unfinished file", partial_path(out))):
        if path.exists() and path.resolve() == Path(args.input).resolve():
            raise DataError(f"{what} {path} is the input file; choose another name")
    data = _load_calibrated(args, args.input)
    rows = data.shape[0] if isinstance(data, Scan) else 1
    _info(f"{args.input} -> {out}")
    with tqdm(total=rows, disable=args.quiet, desc="converting", unit="row", file=sys.stderr) as bar:
        if isinstance(data, Scan) and fmt == "hdf5":
            # block by block into OUTPUT.partial, renamed into place when complete; an interrupted run
            # leaves it for --resume
            def progress(done: int, total: int) -> None:
                bar.update(done - bar.n)

            if partial_path(out).exists() and not args.resume:
                _info(f"starting over: replacing the unfinished {partial_path(out)} (--resume continues it)")
            write_hdf5_resumable(data, out, resume=args.resume, progress=progress)
        else:
            if isinstance(data, Scan):
                data = Scan(
                    _ProgressRows(data.counts, bar),
                    data.calibration,
                    pixel_size_um=data.pixel_size_um,
                    live_time_s=data.live_time_s,
                    metadata=data.metadata,
                )
            save(data, out)  # block by block into a temporary file, renamed into place when complete
            if not isinstance(data, Scan):
                bar.update(1)
    _info(f"wrote {out}")
    return 0


def _check_report_path(report: Path) -> None:
    """Refuse, before any work, a report that cannot be written (``--report``, ``report -o``)."""
    suffix = report.suffix.lower()
    if suffix not in (".html", ".htm", ".pdf"):
        raise DataError(f"report {report} should end in .html (or .pdf)")
    if report.is_dir():
        raise DataError(f"report {report} is a folder; give a file name, e.g. {report / 'report.html'}")
    parent = report.parent if str(report.parent) else Path(".")
    if not parent.is_dir():
        raise DataError(f"cannot write the report {report}: folder {parent} does not exist")
    if suffix == ".pdf" and find_chromium() is None:
        raise DataError(
            f"cannot write {report}: a PDF report needs Chromium, which was not found; write an .html "
            "report instead (and print it to PDF from a browser)"
        )


def _cmd_report(args: argparse.Namespace) -> int:
    maps_path = Path(args.maps)
    if not maps_path.is_file():
        raise DataError(f"{args.maps}: no such file")
    out = Path(args.output)
    _check_report_path(out)
    if out.resolve() == maps_path.resolve():
        raise DataError(f"the report {out} would overwrite the maps file: choose another name")
    maps = PigmentMaps.from_hdf5(maps_path, lazy=True)
    scan = None
    if args.scan is not None:
        scan_path = Path(args.scan)
        if not scan_path.exists():
            raise DataError(f"{args.scan}: no such file")
        cal = maps.metadata.get("calibration")
        # the calibration the maps were made with (it may have come from --calibration, not the file)
        kwargs = {"calibration": EnergyCalibration.from_dict(cal)} if isinstance(cal, dict) else {}
        scan = load(scan_path, **kwargs)
    write_report(maps, out, scan=scan, title=args.title, instrument=args.instrument)
    _info(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np


    path = Path(args.file)
    if path.suffix.lower() in (".h5", ".hdf5") and _is_pigment_maps(path):

        maps = PigmentMaps.from_hdf5(path, lazy=True)
        print(f"file:        {path}")
        print("format:      xrfnb pigment maps")
        print(f"shape:       {maps.shape[0]} x {maps.shape[1]} pixels, {len(maps.classes)} classes")
        print(f"model:       {maps.metadata.get('model', '?')}")
        print(maps.summary().to_text())
        return 0
    if not args.no_elements and args.instrument is not None:
        resolve_instrument(args.instrument)  # a bad name fails before any output
    data = _load_calibrated(args, args.file)
    meta = dict(getattr(data, "metadata", {}) or {})
    print(f"file:        {path}")
    print(f"format:      {meta.get('format', '?')}")
    detectors = _describe_detectors(meta)
    if detectors:
        print(f"detectors:   {detectors}")
    if isinstance(data, Scan):
        rows, cols, ch = data.shape
        print(f"kind:        scan, {rows} x {cols} pixels x {ch} channels ({np.dtype(data.counts.dtype)})")
        if data.pixel_size_um:
            print(f"pixel size:  {data.pixel_size_um:g} um")
        lt = data.live_time_s
        if lt is None:
            print("live time:   unknown")
        elif isinstance(lt, np.ndarray):
            print(f"live time:   {lt.mean():.4g} s per pixel (mean; {lt.min():.4g} .. {lt.max():.4g})")
        else:
            print(f"live time:   {lt:.4g} s per pixel")
        spectrum = data.sum_spectrum()
    elif isinstance(data, Spectrum):
        print(f"kind:        spectrum, {data.n_channels} channels, {data.total_counts:.0f} counts")
        print("live time:   " + ("unknown" if data.live_time_s is None else f"{data.live_time_s:.4g} s"))
        if data.real_time_s is not None:
            print(f"real time:   {data.real_time_s:.4g} s")
        spectrum = data
    else:
        raise DataError(f"{path}: unexpected content {type(data).__name__}")
    cal = data.calibration
    e = cal.energies_keV(spectrum.n_channels)
    quad = f" + {cal.quadratic_keV:.4g} keV ch^2" if cal.quadratic_keV else ""
    print(
        f"calibration: E = {cal.offset_keV:.5g} keV + {cal.gain_keV:.5g} keV/ch x ch{quad} "
        f"({e[0]:.3f} .. {e[-1]:.3f} keV)"
    )
    if args.fit_instrument:
        _print_instrument_fit(args, path, spectrum, meta)
    if args.no_elements:
        return 0
    instrument = resolve_instrument(args.instrument, meta)
    found = detect_elements(spectrum, instrument)
    sample = [d for d in found if d.origin != "setup"]
    setup = [d for d in found if d.origin == "setup"]
    print(f"instrument:  {instrument.name} (for element detection)")
    def listed(elements: list[DetectedElement]) -> str:
        return ", ".join(f"{d.label} ({d.score:.0f} sigma)" for d in elements)

    print("elements:    " + (listed(sample) or "none detected"))
    if setup:
        print("setup lines: " + listed(setup))
    return 0


def _print_instrument_fit(args: argparse.Namespace, path: Path, spectrum: Spectrum, meta: dict) -> None:
    """``info --fit-instrument``: the instrument fitted to the (sum) spectrum, started from the named
    preset, else the file's Bruker header, else the default preset."""
    fit = fit_instrument(spectrum, start=_start_instrument(args, path, meta))
    print("fitted instrument (xrfnb.fit_instrument):")
    print("\n".join("  " + line for line in fit.summary().splitlines()))


def _is_pigment_maps(path: Path) -> bool:
    import h5py


    preflight(path)  # a file whose metadata crashes libhdf5: FormatError here, not a dead process
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == "xrfnb-pigment-maps"
    except (OSError, ValueError):
        return False


def _cmd_train(args: argparse.Namespace) -> int:
    train_model = _heavy("train_model")
    config = Path(args.config)
    if not config.is_file():
        raise DataError(f"training config {config} does not exist")
    train_model(config, Path(args.out), resume=args.resume, progress=not args.quiet)
    _info(f"model written to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    evaluate = _heavy("evaluate_model")
    kwargs: dict[str, Any] = {"baseline": not args.no_baseline, "progress": not args.quiet}
    if args.n_per_cell is not None:
        kwargs["n_per_cell"] = args.n_per_cell
    if args.counts is not None:
        kwargs["counts"] = args.counts
    if args.sets is not None:
        kwargs["sets"] = args.sets
    if args.seed is not None:
        kwargs["seed"] = args.seed
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    model = _load_model(args.model)
    report = evaluate(model, **kwargs)
    text = report.to_markdown()
    per_class = getattr(report, "per_class_markdown", None)
    counts = kwargs.get("counts", (1000,))
    if callable(per_class):
        level = 1000 if 1000 in counts else counts[0]
        text += "\n\n" + per_class(level)
    print(text)
    if out is not None:

        out.mkdir(parents=True, exist_ok=True)
        with _atomic_output(out / "evaluation.md") as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        with _atomic_output(out / "evaluation.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=1, default=str), encoding="utf-8")
        _info(f"wrote {out / 'evaluation.md'} and {out / 'evaluation.json'}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    serve = _heavy("serve")
    path = args.path
    if path is not None and not Path(path).exists():
        raise DataError(f"{path}: no such file or folder")
    if args.auth is not None and not Path(args.auth).is_file():
        raise DataError(
            f"--auth {args.auth}: no such file; give a JSON file of user names and passwords, "
            'e.g. {"conservator": "a long passphrase"} (readable only by you: chmod 600)'
        )
    serve(
        path,
        port=args.port,
        address=args.address,
        show=args.show,
        basic_auth=None if args.auth is None else Path(args.auth),
        token=(os.environ.get("XRFNB_TOKEN") or True) if args.token else None,
        max_upload_mb=args.max_upload_mb,
    )
    return 0


# -- parser ---------------------------------------------------------------------------------------
#: what --model takes (the names xrfnb.load_model finds: xrfnb.model.folders)
_MODEL_HELP = (
    "a model's name (shipped, in a folder of $XRFNB_MODELS, or in the user's models folder, where the "
    "dashboard writes adapted models: ~/.local/share/xrfnb/models) or a model folder's path (default: the "
    "shipped model)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``xrfnb`` (exposed for documentation and tests)."""
    p = argparse.ArgumentParser(
        prog="xrfnb", description="Pigment maps from XRF spectra and scans of paintings."
    )
    p.add_argument("--version", action="version", version=f"xrfnb {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("identify", help="pigment maps of a scan (or one spectrum) into an HDF5 file")
    s.add_argument("input", metavar="INPUT", help="scan or spectrum file (any format xrfnb.load reads)")
    s.add_argument("-o", "--output", required=True, metavar="OUTPUT.h5", help="pigment maps (HDF5)")
    s.add_argument("--model", default=None, help=_MODEL_HELP)
    s.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="network arithmetic: auto = bfloat16 where the CPU has it natively (faster), else float32; "
        "float32 for results bit-reproducible across machines",
    )
    s.add_argument(
        "--tiff",
        metavar="DIR",
        help="also write one 32-bit ImageJ TIFF per pigment class (and per element, with --elements)",
    )
    s.add_argument("--elements", action="store_true", help="also fit element maps and store them alongside")
    s.add_argument(
        "--instrument",
        default=None,
        help="instrument for --elements, the physics check and --report: a preset name (default: the "
        f"file's, else {DEFAULT_INSTRUMENT}), or 'fit': the instrument fitted from the scan itself "
        "(xrfnb.fit_instrument: calibration, resolution, anode, voltage, scattering angle, air, pile-up; "
        "its calibration applied)",
    )
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTPUT.h5.partial")
    s.add_argument(
        "--adapt",
        action="store_true",
        help="first fit the instrument from the scan and adapt the model to it (about --minutes; kept in "
        "OUTPUT-model/ beside the output, used again or continued on the next run)",
    )
    s.add_argument("--minutes", type=_positive_float, default=15.0, help="--adapt: training minutes (15)")
    s.add_argument("--anode", default=None,
                   help="--adapt, --instrument fit, --calibration fit: the tube anode, if known (e.g. Rh)")
    s.add_argument(
        "--chunk-pixels",
        type=_positive_int,
        default=8192,
        metavar="N",
        help="pixels read per block (memory vs. speed; default 8192)",
    )
    s.add_argument(
        "--report",
        metavar="REPORT.html",
        default=None,
        help="also write a report for the conservation file: maps, legends, thresholds, model, instrument "
        "and provenance in one self-contained .html (or .pdf, printed with Chromium)",
    )
    _add_load_options(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_identify)

    s = sub.add_parser(
        "report", help="a report of pigment maps for the conservation file (self-contained HTML or PDF)"
    )
    s.add_argument("maps", metavar="MAPS.h5", help="pigment maps written by xrfnb identify")
    s.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="REPORT.html",
        help="the report: .html, or .pdf (needs Chromium)",
    )
    s.add_argument(
        "--scan",
        default=None,
        metavar="SCAN",
        help="the scan the maps were made from (its format, live time)",
    )
    s.add_argument("--title", default=None, help="report title (default: 'Pigment maps of <scan>')")
    s.add_argument(
        "--instrument", default=None, help="instrument preset or name for the report (default: the scan's)"
    )
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("info", help="describe a spectrum, scan or pigment-maps file")
    s.add_argument("file", metavar="FILE")
    s.add_argument(
        "--instrument",
        default=None,
        help=f"instrument preset for element detection (default: the file's, else {DEFAULT_INSTRUMENT})",
    )
    s.add_argument("--no-elements", action="store_true", help="skip element detection")
    s.add_argument(
        "--fit-instrument",
        action="store_true",
        help="fit the instrument from the data (calibration, resolution, anode, voltage, scattering angle, "
        "atmosphere, pile-up; xrfnb.fit_instrument) and print what was fitted and from which evidence",
    )
    _add_load_options(s)
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser(
        "convert",
        help="convert a spectrum or scan (e.g. a Bruker .bcf of any size) into xrfnb's chunked HDF5 (.h5), "
        "block by block with bounded memory, written atomically; an interrupted conversion to .h5 continues "
        "with --resume",
    )
    s.add_argument("input", metavar="INPUT")
    s.add_argument("output", metavar="OUTPUT.h5")
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted conversion to .h5 from OUTPUT.h5.partial (same input only)",
    )
    s.add_argument(
        "--detector",
        type=_element_arg,
        default=None,
        metavar="N|sum",
        help="Bruker .bcf files of several EDS detectors: one detector (0, 1, ...) or 'sum' (the default)",
    )
    _add_load_options(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser(
        "adapt",
        help="adapt a pigment model to your own scanner: fit the instrument from a scan, fine-tune the "
        "model on simulated spectra of it (about 15 minutes)",
    )
    s.add_argument("input", metavar="SCAN",
                   help="a scan or spectrum from the scanner (any format xrfnb.load reads)")
    s.add_argument("--out", required=True, metavar="MODEL_FOLDER", help="folder of the adapted model")
    s.add_argument("--model", default=None, help="model to adapt: " + _MODEL_HELP)
    s.add_argument("--minutes", type=_positive_float, default=15.0, help="training minutes (default 15)")
    s.add_argument("--anode", default=None, help="the tube anode, if known (e.g. Rh): fixed in the fit")
    s.add_argument("--resume", action="store_true", help="continue an interrupted adaptation in --out")
    _add_load_options(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_adapt)

    s = sub.add_parser("train", help="train a pigment model from a TOML config")
    s.add_argument("--config", required=True, metavar="CONFIG")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in DIR")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser(
        "evaluate", help="evaluate a model on held-out synthetic test sets beside the baseline"
    )
    s.add_argument("--model", default=None, help=_MODEL_HELP)
    s.add_argument(
        "--n-per-cell", type=_positive_int, default=None, metavar="N", help="spectra per (set, count level)"
    )
    s.add_argument(
        "--counts",
        type=_int_list,
        default=None,
        metavar="N,N,...",
        help="total counts per spectrum, e.g. 300,1000,3000,10000",
    )
    s.add_argument(
        "--sets", type=_str_list, default=None, metavar="SET,...", help="subset of single,mixture,buried,low"
    )
    s.add_argument("--seed", type=int, default=None, help="seed of the test spectra")
    s.add_argument("--no-baseline", action="store_true", help="skip the expert element-map baseline")
    s.add_argument("--out", default=None, metavar="DIR", help="also write evaluation.md and evaluation.json")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("serve", help="serve the dashboard in a browser")
    s.add_argument("path", nargs="?", default=None, metavar="FILE_OR_DIR")
    s.add_argument("--port", type=_port, default=5006)
    s.add_argument(
        "--address", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)"
    )
    s.add_argument("--show", action="store_true", help="open a browser tab")
    protect = s.add_mutually_exclusive_group()
    protect.add_argument(
        "--auth",
        metavar="USERS.json",
        default=None,
        help="require a log-in: a JSON file of user names and passwords (use it with --address beyond "
        "this machine: anyone on the network could otherwise open the served folder)",
    )
    protect.add_argument(
        "--token",
        action="store_true",
        help="require a log-in with a shared password: $XRFNB_TOKEN if set (kept out of the process list), "
        "else a random one printed at start for you to hand out",
    )
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=256.0,
        metavar="MB",
        help="largest file a browser may upload, MiB (enforced on the server; default 256)",
    )
    s.set_defaults(func=_cmd_serve)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _info(message: str) -> None:
    print(f"xrfnb: {message}", file=sys.stderr)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _one_line(text: str) -> str:
    """Messages of libraries (libhdf5's hold newlines) folded onto one line."""
    return " ".join(str(text).split())


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" for {exc.filename}" if exc.filename else ""
        return f"no space left on the device{where}: free some space or write elsewhere"
    if isinstance(exc, MemoryError):
        return "out of memory: try a smaller --chunk-pixels, or close other programs"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


class _StderrHandler(logging.Handler):
    """xrfnb's warnings (a damaged block file redone, ...) as ``xrfnb: warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"xrfnb: warning: {_one_line(record.getMessage())}", file=sys.stderr)
        except Exception:  # never let a warning end a run
            self.handleError(record)


def _join_negative_values(argv: list[str]) -> list[str]:
    """Join ``--calibration -0.96,0.01``: argparse would take the negative value for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--calibration" and i + 1 < len(argv) and argv[i + 1][:2].lstrip("-")[:1].isdigit():
            out.append(f"--calibration={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xrfnb`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    handler = _StderrHandler(logging.WARNING)
    logger = logging.getLogger("xrfnb")
    logger.addHandler(handler)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        msg = "interrupted"
        if getattr(args, "command", None) == "identify":
            msg += f"; completed blocks are kept in {args.output}.partial: rerun with --resume to continue"
        elif getattr(args, "command", None) == "convert" and partial_path(Path(args.output)).is_file():
            msg += (
                f"; the rows converted so far are kept in {partial_path(Path(args.output))}: rerun with "
                "--resume to continue"
            )
        print(f"xrfnb: {msg}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except XRFNBError as exc:
        print(f"xrfnb: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, MemoryError) as exc:
        print(f"xrfnb: error: {_one_line(_os_error_text(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still no traceback unless asked for
        if os.environ.get("XRFNB_DEBUG"):
            traceback.print_exc()
        print(
            f"xrfnb: internal error: {type(exc).__name__}: {_one_line(str(exc))} (please report it; set "
            "XRFNB_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        logger.removeHandler(handler)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
