"""A pigment model adapted to one instrument: fine-tuned on simulated spectra of a fitted instrument.

:func:`adapt_model` takes a trained model and an :class:`xrfnb.fitting.instrument_fit.InstrumentFit` (what
:func:`xrfnb.fit_instrument` read from the user's own scan) and fine-tunes the model's network on spectra
simulated for that instrument, jittered within the fit's uncertainties, with the full paint variation of the
model's own training (layers, mixtures, grounds, impurities, count levels), then re-fits temperature,
thresholds and out-of-distribution statistics on a validation set of the same distribution
(:func:`xrfnb.model.train.train_model` does the optimisation, checkpoints, resume and calibration). The
folder it writes is a model like any other (``xrfnb identify --model FOLDER``) whose ``model.json`` records
``adapted`` (from which model, to which instrument, for how long, its validation figures) and whose
``README.md`` card says so.

How the fitted instrument becomes a training distribution (:func:`adaptation_config`):

- the fitted instrument is the preset (its anode, voltage, geometry, atmosphere, calibration and
  channel count); ``n_instrument_variants`` variants of it are drawn as in training:
- FWHM at Mn Ka: within +/- 2 sigma of the fit (at least +/- 5 %);
- tube voltage: within +/- 2 sigma where fitted, else the base model's range (the spectrum did not reach
  the continuum's end);
- scattering angle: the detector azimuth giving the fitted angle +/- 2 sigma
  (:func:`xrfnb.fitting.instrument_fit.geometry_for_angle`) where fitted;
- detector air path within +/- 2 sigma where fitted;
- calibration: the fit's, with gain and offset errors of its own uncertainty (at least the training's);
- tube anode: the fitted one; where the data could not settle it, the base model's anodes;
- count rate (pile-up): the fitted rate within a factor of two, with the fitted pulse-pair resolving time;
- optics (polycapillary or none): the fitted ones where the fit settled them or the file's header gave
  them; otherwise the fitted instrument with each, half the variants each;
- primary tube filter: the fitted instrument's (the best candidate even where the material is not settled:
  the ties shape the spectrum alike); where its thickness is fitted, drawn within +/- 2 sigma;
- detector thickness: within +/- 2 sigma where fitted, else the base model's range;
- atmosphere where the fit could not settle it (and no header gave it): the base model's air / helium /
  vacuum mixture;
- what the fit cannot determine (detector window, partial collection) keeps the base model's ranges.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ModelError
from ..fitting.instrument_fit import InstrumentFit, geometry_for_angle
from .evaluate import evaluate_model
from .model import PigmentModel, load_model
from .train import OptimConfig, TrainingConfig, load_config, train_model
from .trainingdata import DataConfig

__all__ = ["ADAPT_SEED", "adapt_model", "adaptation_config"]

#: seeds of the adaptation's training data and validation set (never the evaluation seeds)
ADAPT_SEED = 7_340_033
#: held-out seed of the adapted model's validation figures in its card
ADAPT_EVAL_SEED = 27_182_818


def _param(fit: InstrumentFit, name: str) -> tuple[Any, float | None, str]:
    p = fit.parameters.get(name)
    if p is None:
        return None, None, "not determined"
    return p.value, p.sigma, p.status


def _known(status: str) -> bool:
    return status in ("fitted", "derived", "fixed")


def _from_header(fit: InstrumentFit, field: str) -> bool:
    """Whether the fit's start instrument took ``field`` from a file's header (``Instrument.from_file``
    lists each such field in its description as ``"  field: header ..."``)."""
    return f"\n  {field}: header" in (getattr(fit.start, "description", "") or "")


def adaptation_config(
    model: PigmentModel, fit: InstrumentFit, *, minutes: float = 15.0, name: str | None = None,
    seed: int = ADAPT_SEED, n_val: int = 2048,
) -> TrainingConfig:
    """The training configuration that adapts ``model`` to the fitted instrument (see the module docstring).

    Parameters
    ----------
    model : PigmentModel
        The model to fine-tune; its ``model.json`` holds the training config it was made with.
    fit : InstrumentFit
        From :func:`xrfnb.fit_instrument`.
    minutes : float
        Optimisation budget in minutes (calibration comes on top, about a minute).
    name : str, optional
        Name of the adapted model (default: the model's name + ``"-adapted"``).
    seed : int
        Seed of the training data (the validation set uses ``seed + 1``).
    n_val : int
        Validation spectra for temperature, thresholds and OOD statistics.

    Returns
    -------
    TrainingConfig
    """
    table = model.meta.get("training")
    if not isinstance(table, dict) or "data" not in table:
        raise ModelError(
            f"model {model.name!r} has no training record in its model.json: it cannot be adapted")
    base = load_config({k: v for k, v in table.items() if k in ("name", "model", "data", "optim")})
    bd = base.data
    assert bd is not None
    inst = fit.instrument
    # what a sum spectrum cannot tell, unless the file's header said it: the optics (the fit does not
    # fit them) and the atmosphere where not determined come from the base model's ranges, not from the
    # fit's start preset (a polycapillary lens in air for a bare tube in vacuum raised the adapted model's
    # OOD rate from 0.03 to 0.14 in benchmarks/eval_instruments.py)
    variants = [inst]
    _, _, optics_status = _param(fit, "optics")
    if not (_from_header(fit, "optics") or _known(optics_status)):
        other = "none" if inst.optics == "polycapillary" else "polycapillary"
        variants.append(inst.with_(optics=other))
    _, _, atm_status = _param(fit, "atmosphere")
    atmosphere_known = _known(atm_status) or _from_header(fit, "atmosphere")
    changes: dict[str, Any] = {
        "instruments": tuple(v.to_dict() for v in variants),
        "instrument_weights": tuple(1.0 / len(variants) for _ in variants),
        "channel_gains_keV": (),
        "atmosphere_probs": None if atmosphere_known else (bd.atmosphere_probs or (1.0, 1.0, 1.0)),
        "beam_path_mm": None if bd.beam_path_mm is None else (
            max(0.0, inst.beam_path_mm * 0.5), inst.beam_path_mm * 1.5 + 1.0),
        "incidence_deg": None,
        "takeoff_deg": None,
        "detector_azimuth_deg": None,
        "n_instrument_variants": max(16, min(bd.n_instrument_variants, 40)),
    }
    # primary filter: the fitted instrument's own (no drawn sets, which would replace it), its thickness
    # within +/- 2 sigma where fitted (one material: the fit's candidates are single foils)
    material, _, _ = _param(fit, "tube_filter")
    t_um, t_s, st = _param(fit, "tube_filter_um")
    changes["tube_filters"] = ()
    changes["tube_filter_weights"] = ()
    if (material not in (None, "none") and _known(st) and t_um and t_s
            and len(inst.tube_filters) == 1 and inst.tube_filters[0].material == material):
        t, ts = float(t_um), float(t_s)
        changes["tube_filters"] = tuple(f"{material}:{max(t + k * ts, 0.25 * t):.4g}"
                                        for k in (-2, -1, 0, 1, 2))
    # detector thickness: within +/- 2 sigma where fitted, else the base model's range
    d_um, d_s, st = _param(fit, "detector_thickness_um")
    if _known(st) and d_um:  # fitted, fixed or from the header (the fit marks those fixed)
        span = 2.0 * (d_s or 0.1 * float(d_um))
        changes["detector_thickness_um"] = (max(50.0, float(d_um) - span), float(d_um) + span)
    # resolution
    fwhm, fwhm_s, st = _param(fit, "fwhm_mnka_eV")
    rel = 2.0 * fwhm_s / fwhm if (_known(st) and fwhm and fwhm_s) else 0.1
    rel = min(max(rel, 0.05), 0.3)
    changes["fwhm_scale"] = (1.0 - rel, 1.0 + rel)
    # tube voltage
    kv, kv_s, st = _param(fit, "tube_voltage_kV")
    if _known(st) and kv is not None:
        span = 2.0 * (kv_s or 0.05 * kv)
        changes["tube_voltage_kV"] = (max(5.0, kv - span), kv + span)
    elif bd.tube_voltage_kV is None:
        changes["tube_voltage_rel"] = max(bd.tube_voltage_rel, 0.2)
    # anode: the fitted one, else the base model's set
    _, _, st = _param(fit, "anode")
    changes["anodes"] = () if _known(st) else (bd.anodes or ("Rh", "Mo", "W", "Ag", "Pd", "Cu", "Cr"))
    changes["anode_weights"] = () if _known(st) else bd.anode_weights
    # scattering angle through the detector azimuth
    ang, ang_s, st = _param(fit, "scattering_angle_deg")
    if _known(st) and ang is not None:
        d = 2.0 * (ang_s or 5.0)
        az = sorted(geometry_for_angle(inst, a)["detector_azimuth_deg"] for a in (ang - d, ang + d))
        if all(geometry_for_angle(inst, a)["takeoff_deg"] == inst.takeoff_deg for a in (ang - d, ang + d)):
            changes["detector_azimuth_deg"] = (az[0], az[1])
    # detector air path
    air, air_s, st = _param(fit, "air_path_mm")
    if _known(st) and air is not None:
        d = 2.0 * (air_s or 0.5 * air)
        changes["air_path_mm"] = (max(0.0, air - d), air + d + 0.1)
    else:
        changes["air_path_mm"] = (inst.detector_path_mm * 0.5, inst.detector_path_mm * 1.5 + 1.0)
    # count rate (pile-up): the fit's own rate within a factor of two, where the data gave it; the base
    # model's range with a fitted resolving time could reach sum shares no real spectrum has
    rate, _, st = _param(fit, "count_rate_cps")
    if _known(st) and rate:
        changes["count_rate_cps"] = (float(rate) / 2.0, float(rate) * 2.0)
    # calibration errors: the fit's own uncertainty at 5 and 20 keV, at least the training's jitter
    s5, s20 = fit.energy_sigma_keV(5.0), fit.energy_sigma_keV(20.0)
    changes["offset_jitter_keV"] = max(bd.offset_jitter_keV, s5)
    changes["gain_jitter_rel"] = max(bd.gain_jitter_rel, abs(s20 - s5) / 15.0)
    data = dataclasses.replace(bd, **changes)
    optim = dataclasses.replace(
        base.optim,
        seed=int(seed),
        val_seed=int(seed) + 1,
        time_budget_min=float(minutes),
        max_steps=max(base.optim.max_steps, 100_000),
        lr=base.optim.lr * 0.25,
        warmup_frac=0.05,
        n_val=int(n_val),
        init_from="",
    )
    # the network as it is, not as it was trained (PigmentModel.network_config)
    arch = dataclasses.replace(base.model, rank=int(model.network_config["rank"]))
    return TrainingConfig(name=name or f"{model.name}-adapted", model=arch, data=data, optim=optim)


def _validation(model: PigmentModel, data: DataConfig, n_per_cell: int) -> list[dict[str, Any]]:
    rep = evaluate_model(model, n_per_cell=n_per_cell, counts=(1000, 3000), seed=ADAPT_EVAL_SEED,
                         baseline=False, progress=False, data=data)
    return [{k: r[k] for k in ("set", "counts", "macro_f1", "target_f1", "ood_rate")} for r in rep.table()]


def _card(meta: dict[str, Any]) -> str:
    a = meta["adapted"]
    lines = [
        f"# {meta['name']}: {a['from_model']} adapted to one instrument",
        "",
        f"Made by `xrfnb adapt` / `PigmentModel.adapt` on {a['created']} with xrfnb "
        f"{meta.get('code_version', '?')}:"
        f" the network of `{a['from_model']}` fine-tuned for {a['train_time_s'] / 60:.1f} minutes"
        f" ({a['steps']:,} steps of {a['batch_size']} spectra) on spectra simulated for the instrument below,"
        " jittered within the fit's uncertainties, with the paint variation of the original training; then"
        " temperature, thresholds and out-of-distribution statistics re-fitted on "
        f"{a['n_val']:,} validation spectra of that distribution.",
        "",
        "Use it only for scans from this instrument: `xrfnb identify SCAN OUT.h5 --model THIS_FOLDER`.",
        "",
        "## The instrument it was adapted to",
        "",
        "```",
        a["instrument_fit"],
        "```",
        "",
        "## Validation (simulated, held-out seed, the adapted instrument's distribution)",
        "",
        f"{a['validation_n_per_cell']} spectra per set and count level; macro F1 over the classes present;"
        " buried: F1 on buried-only pigments; low: recall of the visible minor pigment.",
        "",
        "| set | counts | original F1 | adapted F1 | original target | adapted target | adapted OOD |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b, r in zip(a["validation_before"], a["validation"], strict=True):
        def f(x: Any) -> str:
            return "-" if x is None else f"{x:.3f}"
        lines.append(f"| {r['set']} | {r['counts']:,} | {f(b['macro_f1'])} | {f(r['macro_f1'])} | "
                     f"{f(b['target_f1'])} | {f(r['target_f1'])} | {r['ood_rate']:.2f} |")
    lines += ["", "These figures are on simulated spectra of the fitted instrument: they say the adaptation "
              "learned that instrument's simulated spectra, not that the simulator matches the real one.", ""]
    return "\n".join(lines)


def adapt_model(
    model: PigmentModel | str | os.PathLike[str],
    instrument_fit: InstrumentFit,
    out_dir: str | os.PathLike[str],
    *,
    minutes: float = 15.0,
    resume: bool = False,
    progress: bool = True,
    name: str | None = None,
    seed: int = ADAPT_SEED,
    n_val: int = 2048,
    validation_n_per_cell: int = 100,
) -> PigmentModel:
    """Fine-tune a model on simulated spectra of a fitted instrument and write it as a model folder.

    Parameters
    ----------
    model : PigmentModel, str or path
        The model to adapt (default in the CLI: the shipped one).
    instrument_fit : InstrumentFit
        From :func:`xrfnb.fit_instrument` on the user's scan or spectrum.
    out_dir : path
        The new model's folder (``model.safetensors``, ``model.json``, ``README.md``, ``train_log.jsonl``,
        ``checkpoint/``).
    minutes : float
        Optimisation budget (default 15); validation and calibration add one to three minutes.
    resume : bool
        Continue an interrupted adaptation in ``out_dir`` (same model, fit and settings).
    progress : bool
        Progress bars on stderr.
    name : str, optional
        The adapted model's name (default ``NAME-adapted``).
    seed : int
        Training-data seed (fixed: the same inputs give the same model).
    n_val : int
        Validation spectra for the calibration.
    validation_n_per_cell : int
        Spectra per set and count level in the card's validation table (0: no table).

    Returns
    -------
    PigmentModel
        The adapted, calibrated model (also saved in ``out_dir``).

    Raises
    ------
    ModelError
        A model without a training record, a ``minutes`` that is not positive, or ``out_dir`` already
        holding an adaptation without ``resume``.
    """
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise ModelError(f"minutes must be a positive number, got {minutes!r}")
    if not isinstance(instrument_fit, InstrumentFit):
        raise ModelError(
            f"adapt needs an InstrumentFit from xrfnb.fit_instrument, got {type(instrument_fit).__name__}")
    base = load_model(model) if not isinstance(model, PigmentModel) else model
    out = Path(out_dir)
    base_path = getattr(base, "path", None)
    if base_path is not None and Path(base_path).resolve() == out.resolve():
        raise ModelError(f"{out} is the model being adapted: give another --out folder")
    cfg = adaptation_config(base, instrument_fit, minutes=minutes, name=name, seed=seed, n_val=n_val)
    out.mkdir(parents=True, exist_ok=True)
    if base_path is not None and (Path(base_path) / "model.safetensors").is_file():
        init = Path(base_path)
    else:  # a model in memory: its weights are kept with the run
        init = out / "start-weights"
        if not (init / "model.safetensors").exists():
            base._with_precision("float32").save(init)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, init_from=str(init.resolve())))
    adapted = train_model(cfg, out, resume=resume, progress=progress)
    meta = adapted.meta
    optim: OptimConfig = cfg.optim
    record: dict[str, Any] = {
        "from_model": base.name,
        "from_path": str(base_path) if base_path is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "minutes": float(minutes),
        "steps": int(meta["training"]["steps"]),
        "batch_size": int(optim.batch_size),
        "train_time_s": float(meta["training"]["train_time_s"]),
        "n_val": int(optim.n_val),
        "instrument": instrument_fit.instrument.to_dict(),
        "instrument_fit": instrument_fit.summary(),
        "validation_n_per_cell": int(validation_n_per_cell),
        "validation": [],
        "validation_before": [],
    }
    if validation_n_per_cell > 0:
        record["validation"] = _validation(adapted, cfg.data, validation_n_per_cell)
        record["validation_before"] = _validation(base, cfg.data, validation_n_per_cell)
    meta["adapted"] = json.loads(json.dumps(record, default=_jsonable))
    adapted.save(out)
    tmp = out / "README.md.tmp"
    tmp.write_text(_card(meta), encoding="utf-8")
    os.replace(tmp, out / "README.md")
    return adapted


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
