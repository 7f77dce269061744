"""Evaluate the pigment-identification model: accuracy against the expert baseline, speed, real spectra.

Prints Markdown tables (these are the tables of the model card, models/xrfnb-pigments-v1/README.md):

1. held-out synthetic sets (a) single pigments, (b) mixtures, (c) buried under 5-40 um, (d) 1-10 wt%,
   each at 300 / 1,000 / 3,000 / 10,000 counts, with a seed and an instrument envelope (FWHM x0.8-1.3,
   doubled calibration errors) never used in training; macro precision / recall / F1 of the model beside
   the expert element-map baseline (xrfnb.fit_elements + xrfnb.assign_pigments_by_elements) on the same
   spectra; per-class F1 at 1,000 and 3,000 counts;
2. pixel-wise macro F1 on the two demo scans (xrfnb.render_scan "mockup-panel" and "hidden-painting");
3. what the model says about the real (non-painting) spectra in ../shared/data/real/;
4. inference speed of identify_batch on 4096-channel uint16 spectra with torch limited to 2 threads.

Usage: python benchmarks/eval_identification.py [--model default] [--n-per-cell 200] [--no-baseline]
       [--precision auto|float32|bfloat16] [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import xrfnb
from xrfnb.model.evaluate import evaluate_model, evaluate_scenes

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL_FILES = ("Steel.spe", "xrf_spectra.mca", "srm1832.mca", "axorf4_21kev_i050.xrf", "XRFSpectrum.mca")


def speed(model: xrfnb.PigmentModel, n: int = 65536) -> dict[str, float]:
    """Spectra per second of identify_batch (rebinning + network + OOD score) on 2 threads."""
    torch.set_num_threads(2)
    inst = xrfnb.Instrument.preset("bruker-m6")
    stacks = [xrfnb.Stack([xrfnb.Layer({p: 0.5}, thickness_um=20)], ground="chalk")
              for p in ("lead white", "vermilion", "emerald green", "cobalt blue")]
    expected = xrfnb.simulate_batch(stacks, inst, counts=1500.0, noise=False)
    rng = np.random.default_rng(0)
    counts = rng.poisson(np.tile(expected, (n // len(stacks), 1))).astype(np.uint16)
    model.identify_batch(counts[:2048], inst.calibration)
    t = time.perf_counter()
    model.identify_batch(counts, inst.calibration)
    dt = time.perf_counter() - t
    return {"spectra": float(counts.shape[0]), "seconds": dt, "spectra_per_s": counts.shape[0] / dt,
            "threads": 2.0}


def real_spectra(model: xrfnb.PigmentModel) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in REAL_FILES:
        path = REAL / name
        if not path.is_file():
            continue
        spec = xrfnb.load(path)
        try:
            ident = model.identify(spec)
        except xrfnb.XRFNBError as exc:
            rows.append({"file": name, "result": f"refused: {exc}"})
            continue
        top = sorted(zip(ident.probability, ident.classes, strict=True), reverse=True)[:3]
        rows.append({
            "file": name,
            "counts": spec.total_counts,
            "ood": ident.ood,
            "ood_score": round(ident.ood_score, 2),
            "unexplained": round(ident.unexplained_fraction, 2),
            "present": list(ident.present),
            "top3": [f"{c} {p:.2f}" for p, c in top],
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n-per-cell", type=int, default=200)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--quick", action="store_true", help="50 spectra per cell, 1,000 and 3,000 counts only")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="network arithmetic (default auto: bfloat16 where the CPU has it natively)",
    )
    args = ap.parse_args()
    model = xrfnb.load_model(args.model, precision=args.precision)
    results: dict[str, object] = {"model": model.name, "precision": model.precision}

    print(f"## Inference speed ({model.name}, network in {model.precision})\n")
    sp = speed(model, 16384 if args.quick else 65536)
    results["speed"] = sp
    rate = sp["spectra_per_s"]
    print(f"identify_batch, 4096-channel uint16 spectra, torch 2 threads: {rate:,.0f} spectra/s\n")

    print("## Real spectra (none is a painting)\n")
    rs = real_spectra(model)
    results["real"] = rs
    print("| file | counts | OOD flag (score) | unexplained | called present | top 3 |")
    print("|---|---:|---|---:|---|---|")
    for r in rs:
        if "result" in r:
            print(f"| {r['file']} | - | {r['result']} | - | - | - |")
            continue
        print(f"| {r['file']} | {r['counts']:,.0f} | {r['ood']} ({r['ood_score']}) | {r['unexplained']} | "
              f"{', '.join(r['present']) or '-'} | {'; '.join(r['top3'])} |")
    print()

    n = 50 if args.quick else args.n_per_cell
    counts = (1000, 3000) if args.quick else (300, 1000, 3000, 10000)
    t = time.perf_counter()
    rep = evaluate_model(model, n_per_cell=n, counts=counts, baseline=not args.no_baseline)
    print(f"## Held-out synthetic test sets ({time.perf_counter() - t:.0f} s)\n")
    print(rep.to_markdown())
    for c in (1000, 3000):
        if c in counts:
            print()
            print(rep.per_class_markdown(c))
            if not args.no_baseline:
                print()
                print(rep.per_class_markdown(c, method="baseline"))
    results["evaluation"] = rep.to_dict()
    print()
    print("### Buried set: where the errors of the target F1 are (model)\n")
    print("| counts | TP | FP | FP on a class sharing an element with a present class | FN | FN sharing |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rep.table("model"):
        e = r.get("buried_errors")
        if e:
            fp_share, fn_share = e["fp_shared"] / max(1, e["fp"]), e["fn_shared"] / max(1, e["fn"])
            print(f"| {r['counts']:,} | {e['tp']} | {e['fp']} | {e['fp_shared']} ({fp_share:.0%}) "
                  f"| {e['fn']} | {e['fn_shared']} ({fn_share:.0%}) |")
    print()

    print("## Demo scans, pixel-wise macro F1 (1,500 counts per pixel)\n")
    sc = evaluate_scenes(model, shape=(48, 48) if args.quick else (64, 64), baseline=not args.no_baseline)
    results["scenes"] = sc
    print("| scene | classes scored | model macro F1 | baseline macro F1 | model OOD rate |")
    print("|---|---:|---:|---:|---:|")
    for name, e in sc.items():
        b = e.get("baseline", {}).get("macro_f1")
        print(f"| {name} | {len(e['classes'])} | {e['model']['macro_f1']:.2f} | "
              f"{'-' if b is None else f'{b:.2f}'} | {e['ood_rate']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
