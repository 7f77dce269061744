"""The shipped model against models adapted to instruments outside its envelope (issue #18 item 3).

For each of six simulated instruments outside the shipped model's training envelope (taken from
``benchmarks/bench_instrument_fit.py``: Mo, W, Ag, Pd, Cu and Cr anodes at 25-50 kV; four with 1,024
channels of 25-40 eV, one 4,096-channel detector with a calibration offset no training preset has, one with
a 70 deg take-off; see :data:`SELECTED` and :func:`outside_envelope`, which reads the envelope from the
model's own ``model.json``), this script does what a user would:

1. **scan**: a 40 x 40-pixel scan of that instrument (six paint-like samples of ``bench_instrument_fit``,
   5,000 counts per pixel at 10^5 counts/s, secondary fluorescence and pile-up on; seeds
   ``[case seed, sample]``, case seeds 18101-18114 as in the fit benchmark);
2. **fit**: ``xrfnb.fit_instrument(scan)`` from the data alone (the truth is never handed on);
3. **adapt**: ``PigmentModel.adapt(fit, ...)`` of the shipped model for ``--minutes`` (default 15, the
   issue's figure), cached in ``--work DIR/<instrument>`` (``--resume`` reuses a finished adaptation of the
   same length and continues an interrupted one);
4. **held-out sets** of the TRUE instrument, per kind (single, mixture, buried, low; see
   :data:`xrfnb.model.evaluate.EVAL_SETS`) at 1,000 and 3,000 counts, ``--n-per-cell`` spectra each, scored
   for the shipped and the adapted model on the same spectra with :func:`xrfnb.model.evaluate.evaluate_model`
   (macro F1 over the classes present; buried: F1 on buried-only pigments; low: recall of the visible minor
   pigment), the same scoring as the model card.

The held-out spectra are those of the true instrument itself: its anode, voltage, geometry, detector,
atmosphere, channels and FWHM exactly, the stacks and impurities of the model's training distribution, a
count rate within x/1.5 of the scan's and the training's calibration errors (0.01 keV offset, 0.2 % gain,
1 sigma) on the calibration the spectra are handed with. Unlike the card's sets they are not widened
(FWHM x0.8-1.3, doubled calibration errors): a user's instrument is one instrument.

Seeds: the held-out stacks come from ``HELDOUT_SEED + case seed`` (18,418,101-18,418,114, the kinds drawn
from ``[seed, kind index]`` as in ``evaluate_model``); no training run uses them (shipped model 20261207,
its validation 1000001, adaptation :data:`xrfnb.model.adapt.ADAPT_SEED` 7340033 and 7340034, the adapted
card's validation 27182818, the card's evaluation ``EVAL_SEED`` 31415927, ``eval_perturbed`` 31422927+).

Reference ("in envelope"): the shipped model on its own held-out sets (``evaluate_model`` defaults: its
training envelope widened, seed ``EVAL_SEED``, the card's sets) at the same size, measured here. Targets
(the issue's): on every instrument the adapted model within 0.03 macro F1 of that reference in every kind
and count level, and the issue's nominal figures single >= 0.95, buried and low >= 0.85 (macro F1) at
1,000-3,000 counts.

Diagnostic ``--known-hardware``: the fit starts from the true optics, geometry, atmosphere, paths and
detector (:data:`HARDWARE`: what a user reads in the manual and a sum spectrum cannot tell; the default start
is the ``bruker-m6`` preset's, polycapillary optics, 90/60 deg, air), anode, voltage, calibration,
resolution and pile-up still fitted. It separates what the adaptation can do from what the fit cannot see.

Usage::

    python benchmarks/eval_instruments.py --quick                      # smoke run, a couple of minutes
    python benchmarks/eval_instruments.py --minutes 5 --work /tmp/ei --json out.json
    python benchmarks/eval_instruments.py --minutes 15 --only "Mo 25" --work /tmp/ei --resume
    python benchmarks/eval_instruments.py --minutes 5 --only "Mo 25" --known-hardware --work /tmp/ei
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

import xrfnb
from xrfnb import Instrument
from xrfnb.model import evaluate as _evaluate
from xrfnb.model.adapt import adapt_model
from xrfnb.model.evaluate import EVAL_SEED, EVAL_SETS, evaluate_model
from xrfnb.model.train import config_from_table
from xrfnb.model.trainingdata import DataConfig, TrainingData
from xrfnb.physics.instrument import resolve_instrument

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_instrument_fit as bif  # a sibling script, not a package

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "xrfnb-pigments-v1"
#: the instruments of bench_instrument_fit.simulated_cases() evaluated here: (anode, kV, channels)
SELECTED: tuple[tuple[str, float, int], ...] = (
    ("Mo", 25, 1024), ("W", 25, 1024), ("Ag", 50, 1024), ("Pd", 30, 4096), ("Cu", 25, 1024), ("Cr", 30, 2048),
)
#: held-out stacks: HELDOUT_SEED + the case's seed (18101-18114)
HELDOUT_SEED = 18_400_000
COUNTS = (1000, 3000)
#: the issue's nominal figures (macro F1 at 1,000-3,000 counts) and the allowed gap to the reference
NOMINAL = {"single": 0.95, "buried": 0.85, "low": 0.85}
GAP = 0.03
#: the scan each instrument is fitted from
SCAN_SHAPE = (40, 40)
SCAN_COUNTS_PER_PIXEL = 5000.0
SCAN_RATE_CPS = 1e5
#: what a user can read from the instrument's manual and the fit cannot tell (``--known-hardware``)
HARDWARE = ("optics", "source_solid_angle_sr", "incidence_deg", "takeoff_deg", "detector_azimuth_deg",
            "atmosphere", "beam_path_mm", "detector_path_mm", "detector_thickness_um", "detector_window")


# ---------------------------------------------------------------------------------------------- cases
def cases() -> list[bif.Case]:
    """The :data:`SELECTED` instruments of the fit benchmark, in that order."""
    by_key = {(c.instrument.anode, c.instrument.tube_voltage_kV, c.instrument.n_channels): c
              for c in bif.simulated_cases()}
    return [by_key[(a, float(kv), n)] for a, kv, n in SELECTED]


def slug(case: bif.Case) -> str:
    """A folder name for the case: ``Mo-25kV-1024ch``."""
    i = case.instrument
    return f"{i.anode}-{i.tube_voltage_kV:g}kV-{i.n_channels}ch"


def _training_data_table(model: xrfnb.PigmentModel) -> dict[str, Any]:
    return dict(model.meta.get("training", {}).get("data", {}))


def outside_envelope(inst: Instrument, data: Mapping[str, Any]) -> list[str]:
    """Why ``inst`` lies outside a training envelope (``model.json`` ``training.data``); empty: inside.

    Mirrors how :class:`xrfnb.model.trainingdata.TrainingData` draws its instrument variants: each tube
    preset's optics, solid angle and pile-up time with an anode, voltage, geometry, detector and channel
    width drawn from the configured ranges (or the preset's own where none is configured), a channel
    offset of -0.1-0 keV for channels wider than 15 eV (else the preset's), FWHM x0.8-1.3 of the
    presets'. An offset counts as outside when it misses the training's by more than three of the
    evaluation's (doubled) calibration-offset errors. Note that even an instrument inside every range is
    none of the ``n_instrument_variants`` fixed variants the model saw.
    """
    cfg = config_from_table(DataConfig, dict(data), "model.json training.data")
    presets = [Instrument.preset(p) if isinstance(p, str) else Instrument.from_dict(p)
               for p in cfg.instruments]
    tubes = [p for p in presets if p.anode is not None and p.monochromatic_keV is None]
    out: list[str] = []

    def span(name: str, value: float, rng: tuple[float, float] | None, own: list[float], unit: str) -> None:
        lo, hi = rng if rng is not None else (min(own), max(own))
        if not lo - 1e-9 <= value <= hi + 1e-9:
            out.append(f"{name} {value:g} {unit} outside the training's {lo:g}-{hi:g} {unit}")

    anodes = cfg.anodes or tuple(sorted({p.anode for p in tubes if p.anode}))
    if inst.anode not in anodes:
        out.append(f"anode {inst.anode} not among the training's {', '.join(anodes)}")
    rel = cfg.tube_voltage_rel
    kv_own = [p.tube_voltage_kV * f for p in tubes for f in (1 - rel, 1 + rel)]
    span("tube voltage", inst.tube_voltage_kV, cfg.tube_voltage_kV, kv_own, "kV")
    for field, unit in (("incidence_deg", "deg"), ("takeoff_deg", "deg"), ("detector_azimuth_deg", "deg"),
                        ("detector_thickness_um", "um")):
        span(field.rsplit("_", 1)[0].replace("_", " "), float(getattr(inst, field)), getattr(cfg, field),
             [float(getattr(p, field)) for p in tubes], unit)
    span("Be window", float(inst.detector_window.thickness_um), cfg.detector_window_um,
         [float(p.detector_window.thickness_um) for p in tubes], "um")
    fw = [1000 * float(p.fwhm_keV(5.8988)) for p in presets]
    span("FWHM at Mn Ka", round(1000 * float(inst.fwhm_keV(5.8988)), 1), (0.8 * min(fw), 1.3 * max(fw)), fw,
         "eV")
    gains = cfg.channel_gains_keV or tuple(p.calibration.gain_keV for p in presets)
    gain, offset = inst.calibration.gain_keV, inst.calibration.offset_keV
    tol = 3 * 2 * cfg.offset_jitter_keV
    if not any(math.isclose(gain, g, rel_tol=1e-3) for g in gains):
        out.append(f"channel width {1000 * gain:g} eV not among the training's "
                   f"{', '.join(f'{1000 * g:g}' for g in gains)} eV")
    elif cfg.channel_gains_keV and gain > 0.015:
        if not -0.1 - tol <= offset <= tol:
            out.append(f"calibration offset {offset:+g} keV outside the training's -0.1-0 keV at "
                       f"{1000 * gain:g} eV channels")
    else:
        own = [p.calibration.offset_keV for p in presets
               if cfg.channel_gains_keV or math.isclose(p.calibration.gain_keV, gain, rel_tol=1e-3)]
        if not any(abs(offset - o) <= tol for o in own):
            out.append(f"calibration offset {offset:+g} keV at {1000 * gain:g} eV channels: the training's "
                       f"are {', '.join(f'{o:+g}' for o in sorted(set(own)))} keV")
    if not any(p.optics == inst.optics and math.isclose(p.pileup_time_s, inst.pileup_time_s, rel_tol=1e-6)
               for p in tubes):
        out.append(f"optics {inst.optics!r} with a {inst.pileup_time_s:g} s pile-up time: no training preset")
    if cfg.atmosphere_probs is not None:
        if cfg.atmosphere_probs[("air", "helium", "vacuum").index(inst.atmosphere)] <= 0:
            out.append(f"atmosphere {inst.atmosphere} never drawn in training")
    elif inst.atmosphere not in {p.atmosphere for p in presets}:
        out.append(f"atmosphere {inst.atmosphere} in no training preset")
    return out


# ---------------------------------------------------------------------------------------------- the scan
def scan_of(case: bif.Case, shape: tuple[int, int] = SCAN_SHAPE) -> xrfnb.Scan:
    """A scan a user of that instrument would bring: the fit benchmark's six samples in patches."""
    lib = bif.samples()
    names = sorted(lib)
    n_px = shape[0] * shape[1]
    owner = np.arange(n_px) * len(names) // n_px
    live_s = SCAN_COUNTS_PER_PIXEL / SCAN_RATE_CPS
    cube = np.zeros((n_px, case.instrument.n_channels), np.uint16)
    for k, name in enumerate(names):
        idx = np.flatnonzero(owner == k)
        spectra = xrfnb.simulate_batch([lib[name]] * idx.size, case.instrument, counts=SCAN_COUNTS_PER_PIXEL,
                                       rng=np.random.default_rng([case.seed, k]), secondary=True,
                                       count_rate_cps=SCAN_RATE_CPS)
        cube[idx] = np.asarray(spectra)
    return xrfnb.Scan(cube.reshape(*shape, -1), case.instrument.calibration, live_time_s=live_s,
                      metadata={"source": f"simulated scan, {case.name}"})


def known_hardware_start(truth: Instrument) -> Instrument:
    """The fit's default start instrument with the true :data:`HARDWARE` settings: anode, voltage,
    calibration, resolution and pile-up are still the fit's to find (``--known-hardware``)."""
    return resolve_instrument(None, None).with_(**{k: getattr(truth, k) for k in HARDWARE})


# ---------------------------------------------------------------------------------------------- held-out
def true_instrument_config(model: xrfnb.PigmentModel, inst: Instrument,
                           rate_cps: float = SCAN_RATE_CPS) -> DataConfig:
    """The model's training distribution of paint, on one instrument exactly (nothing of it drawn)."""
    base = config_from_table(DataConfig, _training_data_table(model), "model.json training.data")
    return dataclasses.replace(
        base, instruments=(inst.to_dict(),), instrument_weights=(1.0,), n_instrument_variants=1,
        fwhm_scale=(1.0, 1.0), tube_voltage_rel=0.0, tube_voltage_kV=None, anodes=(), anode_weights=(),
        incidence_deg=None, takeoff_deg=None, detector_azimuth_deg=None, detector_thickness_um=None,
        detector_window_um=None, partial_collection=None, atmosphere_probs=None, channel_gains_keV=(),
        air_path_mm=(inst.detector_path_mm, inst.detector_path_mm), beam_path_mm=None,
        count_rate_cps=(rate_cps / 1.5, rate_cps * 1.5),
        # the held-out spectra follow the atomic data as they are (a model trained with atomic-parameter
        # randomisation would otherwise be scored on one of its own training draws)
        atomic_perturbation=False,
        # and through the instrument's own filters, not the training's drawn filter sets
        tube_filters=(), tube_filter_weights=(),
    )


class ExactInstrumentData(TrainingData):
    """:class:`TrainingData` that never widens the envelope: ``evaluate_model`` asks for ``wider=True``
    (FWHM x0.8-1.3, doubled calibration errors), which would not be the true instrument."""

    def batch_raw(self, n: int, rng: np.random.Generator, *, kind: str = "train", counts: float | None = None,
                  wider: bool = False, n_groups: int | None = None) -> tuple[np.ndarray, ...]:
        return super().batch_raw(n, rng, kind=kind, counts=counts, wider=False, n_groups=n_groups)


@contextmanager
def exact_instrument() -> Iterator[None]:
    """Within: ``evaluate_model`` simulates with :class:`ExactInstrumentData`."""
    with mock.patch.object(_evaluate, "TrainingData", ExactInstrumentData):
        yield


def score(model: xrfnb.PigmentModel, *, n_per_cell: int, counts: tuple[int, ...], seed: int,
          data: DataConfig | None) -> list[dict[str, Any]]:
    """``evaluate_model`` rows of the model (no baseline); ``data=None``: the model's own envelope."""
    keep = ("set", "counts", "n", "macro_precision", "macro_recall", "macro_f1", "target_f1", "ood_rate")
    if data is None:
        rep = evaluate_model(model, n_per_cell=n_per_cell, counts=counts, seed=seed, baseline=False,
                             progress=False)
    else:
        with exact_instrument():
            rep = evaluate_model(model, n_per_cell=n_per_cell, counts=counts, seed=seed, baseline=False,
                                 progress=False, data=data)
    return [{k: r[k] for k in keep} for r in rep.table()]


# ---------------------------------------------------------------------------------------------- adapt
def adapted_model(shipped: xrfnb.PigmentModel, fit: xrfnb.InstrumentFit, folder: Path, *, minutes: float,
                  resume: bool, n_val: int) -> tuple[xrfnb.PigmentModel, dict[str, Any]]:
    """The shipped model adapted to ``fit`` in ``folder``: reused (``resume``, same minutes), continued
    (``resume``, interrupted) or made afresh (the folder is emptied)."""
    rec: dict[str, Any] | None = None
    if resume and (folder / "model.json").is_file():
        done = xrfnb.load_model(folder)
        rec = done.meta.get("adapted")
        if rec and math.isclose(float(rec["minutes"]), minutes):
            return done, {**rec, "adapt_wall_s": None, "reused": True}
    ckpt = folder / "checkpoint" / "state.json"
    cont = resume and ckpt.is_file() and rec is None
    if folder.exists() and not cont:
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    model = adapt_model(shipped, fit, folder, minutes=minutes, resume=cont, progress=False, n_val=n_val,
                        validation_n_per_cell=0)
    wall = time.perf_counter() - t0
    return model, {**model.meta["adapted"], "adapt_wall_s": wall, "reused": False}


# ---------------------------------------------------------------------------------------------- report
def fit_values(fit: xrfnb.InstrumentFit, truth: Instrument) -> dict[str, Any]:
    """Fitted against true values (JSON-friendly)."""
    p = fit.parameters
    e10 = float(fit.instrument.calibration.energy_keV(truth.calibration.channel(10.0)))
    return {
        "anode": [p["anode"].value, truth.anode, p["anode"].status],
        "tube_voltage_kV": [p["tube_voltage_kV"].value, truth.tube_voltage_kV, p["tube_voltage_kV"].status],
        "scattering_angle_deg": [p["scattering_angle_deg"].value, truth.scattering_angle_deg,
                                 p["scattering_angle_deg"].status],
        "fwhm_mnka_eV": [p["fwhm_mnka_eV"].value, 1000 * float(truth.fwhm_keV(5.8988)),
                         p["noise_keV"].status],
        "energy_error_10keV_eV": 1000 * (e10 - 10.0),
        "atmosphere": [p["atmosphere"].value, truth.atmosphere],
        "count_rate_cps": [p["count_rate_cps"].value, SCAN_RATE_CPS, p["count_rate_cps"].status],
        "fit_s": fit.seconds,
    }


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_instrument(name: str, shipped: list[dict[str, Any]], adapted: list[dict[str, Any]],
                     ref: dict[tuple[str, int], dict[str, Any]]) -> None:
    print(f"\n{name}")
    print("| kind | counts | in-envelope F1 | shipped F1 | adapted F1 | shipped target | adapted target | "
          "shipped OOD | adapted OOD | adapted - in-envelope |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, a in zip(shipped, adapted, strict=True):
        r = ref.get((a["set"], a["counts"]))
        gap = "-" if r is None else f"{a['macro_f1'] - r['macro_f1']:+.3f}"
        print(f"| {a['set']} | {a['counts']:,} | {_f(r and r['macro_f1'])} | {s['macro_f1']:.3f} | "
              f"{a['macro_f1']:.3f} | {_f(s['target_f1'])} | {_f(a['target_f1'])} | {s['ood_rate']:.2f} | "
              f"{a['ood_rate']:.2f} | {gap} |")


def summary(results: list[dict[str, Any]], ref: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Each instrument against the targets."""
    print(f"\nSummary against the targets (adapted macro F1 >= in-envelope - {GAP}; nominal: "
          + ", ".join(f"{k} >= {v}" for k, v in NOMINAL.items()) + ")")
    print("| instrument | adapt min (steps) | adapted - shipped, mean (min) | within 0.03 of in-envelope | "
          "nominal met | worst cell |")
    print("|---|---:|---:|---:|---:|---|")
    for res in results:
        rows = res["adapted"]
        gaps = [(r["macro_f1"] - ref[(r["set"], r["counts"])]["macro_f1"], r) for r in rows
                if (r["set"], r["counts"]) in ref]
        ok_gap = sum(g >= -GAP for g, _ in gaps)
        nom = [r["macro_f1"] >= NOMINAL[r["set"]] for r in rows if r["set"] in NOMINAL]
        worst = min(gaps, key=lambda t: t[0]) if gaps else None
        worst_s = "-" if worst is None else f"{worst[1]['set']} {worst[1]['counts']:,}: {worst[0]:+.3f}"
        a = res["adapt"]
        d = [r["macro_f1"] - s["macro_f1"] for r, s in zip(rows, res["shipped"], strict=True)]
        print(f"| {res['name']} | {a['train_time_s'] / 60:.1f} ({a['steps']:,}) | "
              f"{sum(d) / len(d):+.3f} ({min(d):+.3f}) | {ok_gap}/{len(gaps)} | "
              f"{sum(nom)}/{len(nom)} | {worst_s} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0,
                    help="adaptation budget per instrument (default 15)")
    ap.add_argument("--n-per-cell", type=int, default=150, help="held-out spectra per kind and count level")
    ap.add_argument("--n-val", type=int, default=2048,
                    help="adaptation's calibration spectra (default 2048)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder of the adapted models (default: temporary)")
    ap.add_argument("--resume", action="store_true", help="reuse or continue adaptations in --work")
    ap.add_argument("--only", default=None, help="instruments whose name contains this (e.g. 'Mo 25')")
    ap.add_argument("--no-reference", action="store_true", help="skip the in-envelope reference")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: one instrument, 16 spectra per cell at 1,000 counts, 0.2 minutes")
    ap.add_argument("--known-hardware", action="store_true",
                    help="diagnostic: start the fit from the true optics, geometry, atmosphere and detector "
                         "(what a manual says), the rest fitted; adapted models in DIR/<instrument>-hw")
    ap.add_argument("--json", type=Path, default=None, help="save the figures here")
    args = ap.parse_args(argv)
    counts = COUNTS
    chosen = cases()
    if args.quick:
        args.minutes, args.n_per_cell, args.n_val, counts = 0.2, 16, 256, (1000,)
        chosen = chosen[:1]
    if args.only:
        chosen = [c for c in chosen if args.only in c.name]
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    work.mkdir(parents=True, exist_ok=True)
    shipped = xrfnb.load_model(MODEL_DIR)
    envelope = _training_data_table(shipped)
    t_all = time.perf_counter()

    ref: dict[tuple[str, int], dict[str, Any]] = {}
    ref_rows: list[dict[str, Any]] = []
    if not args.no_reference:
        t0 = time.perf_counter()
        ref_rows = score(shipped, n_per_cell=args.n_per_cell, counts=counts, seed=EVAL_SEED, data=None)
        ref = {(r["set"], r["counts"]): r for r in ref_rows}
        print(f"in-envelope reference (shipped model, its own held-out sets, seed {EVAL_SEED}, "
              f"{args.n_per_cell} per cell): " + ", ".join(f"{r['set']} {r['counts']}: {r['macro_f1']:.3f}"
                                                          for r in ref_rows)
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    results: list[dict[str, Any]] = []
    for case in chosen:
        reasons = outside_envelope(case.instrument, envelope)
        print(f"\n=== {case.name} ({case.sample} in the fit benchmark); outside the envelope: "
              + ("; ".join(reasons) or "NOTHING (inside)"), flush=True)
        t0 = time.perf_counter()
        scan = scan_of(case)
        t_scan = time.perf_counter() - t0
        start = known_hardware_start(case.instrument) if args.known_hardware else None
        fit = xrfnb.fit_instrument(scan, start=start)
        bif.print_table(f"fit of the {SCAN_SHAPE[0]} x {SCAN_SHAPE[1]} scan (fitted/true; scan simulated in "
                        f"{t_scan:.0f} s)", [bif.Row(case.name, case.instrument, fit,
                                                     bif.air_mm(case.instrument))])
        folder = work / (slug(case) + ("-hw" if args.known_hardware else ""))
        adapted, rec = adapted_model(shipped, fit, folder, minutes=args.minutes,
                                     resume=args.resume, n_val=args.n_val)
        print(f"adapted: {rec['train_time_s'] / 60:.1f} min of optimisation, {rec['steps']:,} steps of "
              f"{rec['batch_size']}" + (" (reused from --work)" if rec["reused"] else
                                        f", {rec['adapt_wall_s'] / 60:.1f} min with calibration"), flush=True)
        data = true_instrument_config(shipped, case.instrument)
        seed = HELDOUT_SEED + case.seed
        t0 = time.perf_counter()
        s_rows = score(shipped, n_per_cell=args.n_per_cell, counts=counts, seed=seed, data=data)
        a_rows = score(adapted, n_per_cell=args.n_per_cell, counts=counts, seed=seed, data=data)
        t_eval = time.perf_counter() - t0
        print_instrument(f"{case.name}: held-out seed {seed}, {args.n_per_cell} spectra per cell "
                         f"(evaluated in {t_eval:.0f} s)", s_rows, a_rows, ref)
        results.append({
            "name": case.name, "slug": slug(case), "seed": seed, "outside_envelope": reasons,
            "truth": case.instrument.to_dict(), "fit": fit_values(fit, case.instrument),
            "fit_summary": fit.summary(), "known_hardware": bool(args.known_hardware),
            "adapt": {k: rec[k] for k in ("minutes", "steps", "batch_size", "train_time_s", "adapt_wall_s",
                                          "reused")},
            "shipped": s_rows, "adapted": a_rows, "eval_s": t_eval,
        })
        if args.json:  # after every instrument: a long run that is stopped keeps what it measured
            _save(args, counts, ref_rows, results)
    if ref and results:
        summary(results, ref)
    print(f"\ntotal {(time.perf_counter() - t_all) / 60:.1f} min; kinds: "
          + "; ".join(f"{k} {v}" for k, v in EVAL_SETS.items()))
    if args.json:
        _save(args, counts, ref_rows, results)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _save(args: argparse.Namespace, counts: tuple[int, ...], ref_rows: list[dict[str, Any]],
          results: list[dict[str, Any]]) -> None:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"settings": {**settings, "counts": list(counts), "heldout_seed": HELDOUT_SEED,
                            "reference_seed": EVAL_SEED, "gap": GAP, "nominal": NOMINAL},
               "reference": ref_rows, "instruments": results}
    args.json.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
