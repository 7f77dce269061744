"""Pigment calls on spectra from perturbed physics, before and after (issue #19 item 3).

Held-out sets that the training simulator never made, in three ways at once:

1. atomic parameters: every line's production cross-section multiplied by a factor drawn within the
   spread between compilations (fluorescence yields, Coster-Kronig yields, line ratios; K 4-10 %, L 10 %,
   M 20 %: ``xrfnb.physics.perturb.AtomicPerturbation``), one draw per set of spectra;
2. instruments outside the training envelope of the shipped model (``xrfnb/data/train_finetune.toml``):
   take-off angles 25-35 deg (training 35-65), 150-300 um Si (300-1000), 25-40 um Be windows (8-25), plus
   the evaluation's own widening (FWHM x0.8-1.3, doubled calibration errors);
3. compositions: trace impurities (Si, K, Ca, Fe) at 0.3-1 wt% (training 0.01-0.3 wt%) in every spectrum;
4. (only with ``--parts`` naming it) ``filters``: a primary-beam filter on every tube instrument, drawn from
   Al 300 um, Ni 25 um, Cu 50 um, Mo 30 um and Al 200 + Cu 10 um (none of them the M4's filter sets that
   ``tube_filters`` in a training config may hold).

Seeds: the stacks from ``EVAL_SEED + 7000 + draw`` and the atomic draws from ``9100 + draw``, neither used
in training or in the card's evaluation. Each set (single, mixture, buried, low) at 1,000 and 3,000 counts
is scored for the shipped model ("after": wider envelope, fine-tuned on the measured presets) and for the
earlier weights ("before", read from a git commit), macro F1 over the classes present, the buried set's
F1 on buried-only pigments and the low set's recall of a visible minor pigment. The issue's targets at
1,000-3,000 counts on perturbed sets: single >= 0.95, mixtures >= 0.90, buried and low >= 0.85, minor
recall >= 0.80. ``--baseline`` also scores the expert element-map baseline on the
same spectra (given the exact instrument, as in the card's evaluation). The physics check is scored on
the same perturbed sets by ``benchmarks/eval_physics_check.py --perturbed`` (it takes seconds per
spectrum).

Usage: python benchmarks/eval_perturbed.py [--n-per-cell 150] [--draws 2] [--before-commit 9e93c22]
       [--no-before] [--baseline] [--parts atomic,instrument,impurities|none] [--json out.json]
       [--model LABEL=DIR ...]

``--model LABEL=DIR`` (repeatable) scores further model folders on the same spectra, e.g. a fine-tuning run
and its control; the sets are always built from the shipped model's training distribution.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tempfile
import time
from pathlib import Path

import xrfnb
from xrfnb.model.evaluate import EVAL_SEED, evaluate_model
from xrfnb.model.train import config_from_table
from xrfnb.model.trainingdata import DataConfig
from xrfnb.physics.perturb import AtomicPerturbation, atomic_perturbation

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = "models/xrfnb-pigments-v1"
TARGETS = {"single": 0.95, "mixture": 0.90, "buried": 0.85, "low": 0.85}


PARTS = ("atomic", "instrument", "impurities")
#: parts that run only when --parts names them
EXTRA_PARTS = ("filters",)
#: the filter sets of the "filters" part (outside the M4's set of none / Al 12.5 / Al 100 / Al 630 /
#: Al 100 + Ti 25 / Al 100 + Ti 50 + Cu 25 um and PyMca's Al 1.1 mm)
EVAL_FILTERS = ("Al:300", "Ni:25", "Cu:50", "Mo:30", "Al:200+Cu:10")


def perturbed_config(model: xrfnb.PigmentModel, parts: tuple[str, ...] = PARTS) -> DataConfig:
    """The model's training distribution with instruments and/or impurities outside it."""
    table = dict(model.meta.get("training", {}).get("data", {}))
    cfg = config_from_table(DataConfig, table, "model.json training.data")
    if "instrument" in parts:
        cfg = dataclasses.replace(cfg, takeoff_deg=(25.0, 35.0), detector_thickness_um=(150.0, 300.0),
                                  detector_window_um=(25.0, 40.0))
    if "impurities" in parts:
        cfg = dataclasses.replace(cfg, impurity_prob=1.0, impurity_wt=(3e-3, 1e-2))
    if "filters" in parts:
        cfg = dataclasses.replace(cfg, tube_filters=EVAL_FILTERS, tube_filter_weights=())
    return cfg


def model_at_commit(commit: str, into: Path) -> Path:
    """The model folder as it was at ``commit`` (git show of each file)."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "model.safetensors", "README.md"):
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{MODEL_DIR}/{name}"],
                              capture_output=True, check=True).stdout
        (into / name).write_bytes(blob)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-cell", type=int, default=150)
    ap.add_argument("--draws", type=int, default=2, help="atomic-parameter draws (sets of spectra)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--before-commit", default="9e93c22", help="commit holding the earlier weights")
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--baseline", action="store_true",
                    help="also score the expert element-map baseline (xrfnb.fit_elements + "
                         "assign_pigments_by_elements, given the exact instrument) on the same spectra")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="which perturbations, comma-separated from atomic,instrument,impurities "
                         "('none': the training distribution with held-out seeds); 'filters' adds a tube "
                         "filter outside the training sets to every tube instrument")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                    help="also score the model folder DIR as LABEL (repeatable)")
    args = ap.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p and p != "none")
    if set(parts) - set(PARTS + EXTRA_PARTS):
        ap.error(f"--parts: unknown {sorted(set(parts) - set(PARTS + EXTRA_PARTS))}; choose from "
                 f"{PARTS + EXTRA_PARTS} or none")

    after = xrfnb.load_model("default")
    data = perturbed_config(after, parts)
    models = {"after": after}
    for spec in args.model:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            ap.error(f"--model {spec!r}: expected LABEL=DIR")
        if label in ("after", "before", "baseline") or label in models:
            ap.error(f"--model {spec!r}: the label {label!r} is taken")
        models[label] = xrfnb.load_model(Path(folder))
    tmp = tempfile.TemporaryDirectory()
    if not args.no_before:
        models["before"] = xrfnb.load_model(model_at_commit(args.before_commit, Path(tmp.name) / "before"))
    rows = []
    t0 = time.perf_counter()
    for draw in range(args.draws):
        pert = AtomicPerturbation(seed=9100 + draw) if "atomic" in parts else None
        for label, model in models.items():
            with_baseline = args.baseline and label == "after"  # the same spectra for every model
            with atomic_perturbation(pert):
                rep = evaluate_model(model, n_per_cell=args.n_per_cell, counts=tuple(args.counts),
                                     seed=EVAL_SEED + 7000 + draw, baseline=with_baseline, progress=False,
                                     data=data)
            for r in rep.table("model"):
                rows.append({**r, "model": label, "draw": draw})
            if with_baseline:
                for r in rep.table("baseline"):
                    rows.append({**r, "model": "baseline", "draw": draw})
        print(f"draw {draw} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp.cleanup()
    if args.baseline:
        models["baseline"] = None

    print(f"\nperturbed: {', '.join(parts) or 'nothing'}; {args.draws} draws x {args.n_per_cell} spectra per "
          f"set and count level; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| set | counts | target | " + " | ".join(f"{m} F1 | {m} target figure | {m} OOD" for m in models)
          + " |")
    print("|---|---:|---:|" + "---:|---:|---:|" * len(models))
    for s in ("single", "mixture", "buried", "low"):
        for c in args.counts:
            cells = [f"| {s} | {c:,} | {TARGETS[s]:.2f}"]
            for m in models:
                sel = [r for r in rows if r["model"] == m and r["set"] == s and r["counts"] == c]
                f1 = sum(r["macro_f1"] for r in sel) / len(sel)
                tf = [r["target_f1"] for r in sel if r["target_f1"] is not None]
                tfs = f"{sum(tf) / len(tf):.3f}" if tf else "-"
                oods = [r["ood_rate"] for r in sel if r["ood_rate"] is not None]
                ood = f"{sum(oods) / len(oods):.2f}" if oods else "-"  # the baseline has no OOD flag
                cells.append(f"{f1:.3f} | {tfs} | {ood}")
            print(" | ".join(cells) + " |")
    print("\ntarget figure: buried = F1 on buried-only pigments; low = recall of the visible minor pigment "
          "(target 0.80); single and mixture: none (see F1)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "settings": vars(args) | {"json": str(args.json)}},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
