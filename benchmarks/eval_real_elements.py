"""Pigment calls on real spectra of known composition: NIST's Bruker M4 pure elements and acrylic blanks.

The spectra in ``../shared/data/real/bruker_m4_rh50kv/`` (PROVENANCE.md there) were measured for 120-600 s,
millions of counts each. Each is thinned to a pixel's counts (binomial draws: a spectrum of ``N`` counts
measured on the same instrument, the real line shapes, background and artefacts kept) and identified
``--draws`` times. The answer is known from the file: pure Cr, Cu, Fe, Ni, S, Si, Sn, Ti, Zr, a stainless
steel (Fe, Cr, Ni; Mn, Mo and Si allowed as minor elements) and acrylic (no element XRF sees). Per file and
model:

* ``expected``: the classes whose key elements the material holds as major elements (Fe: iron pigments;
  steel: iron pigments and chromium oxide greens; Ni, S, Si, Sn, Zr and the blanks: none), and the share
  of draws calling each;
* ``wrong``: share of draws calling a class with a key element the material lacks;
* ``wrong, unflagged``: the same without the OOD flag (a confident wrong call, what the user must never
  get silently);
* ``OOD``: share of draws flagged out of distribution.

Usage: python benchmarks/eval_real_elements.py [--counts 500 2000 10000] [--draws 50]
       [--model LABEL=DIR ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import xrfnb

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "bruker_m4_rh50kv"

#: major and allowed (minor) elements of each material, from the file name (PROVENANCE.md); a stainless steel
#: is Fe-Cr-Ni with up to 2 % Mn, 1 % Si and, in some grades, 2-3 % Mo
MATERIALS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "Cr": (frozenset({"Cr"}), frozenset()),
    "Cu": (frozenset({"Cu"}), frozenset()),
    "Fe": (frozenset({"Fe"}), frozenset()),
    "Ni": (frozenset({"Ni"}), frozenset()),
    "S": (frozenset({"S"}), frozenset()),
    "Si": (frozenset({"Si"}), frozenset()),
    "Sn": (frozenset({"Sn"}), frozenset()),
    "Ti": (frozenset({"Ti"}), frozenset()),
    "Zr": (frozenset({"Zr"}), frozenset()),
    "Steel": (frozenset({"Fe", "Cr", "Ni"}), frozenset({"Mn", "Mo", "Si"})),
    "Acrylic": (frozenset(), frozenset()),
}


def material_of(path: Path) -> str:
    """The material a file holds: the pure-element files start with it, the blanks are acrylic."""
    head = path.name.split("_")[0]
    return head if head in MATERIALS else "Acrylic"


def real_files() -> list[Path]:
    return sorted((REAL / "pure_elements").glob("*.msa")) + sorted((REAL / "acrylic_blanks").glob("*.spx"))


def thinned(counts: np.ndarray, total: float, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` binomial thinnings of ``counts`` to about ``total`` counts, shape (draws, channels)."""
    c = np.asarray(counts).astype(np.int64)
    p = min(1.0, total / max(float(c.sum()), 1.0))
    return rng.binomial(c[None, :], p, size=(draws, c.size))


def score(model: xrfnb.PigmentModel, path: Path, total: float, draws: int, seed: int) -> dict[str, object]:
    """Calls of ``model`` on ``draws`` thinnings of the file at ``path`` (see the module docstring)."""
    spec = xrfnb.load(path)
    major, minor = MATERIALS[material_of(path)]
    allowed = major | minor
    batch = model.identify_batch(thinned(spec.counts, total, draws, np.random.default_rng(seed)),
                                 spec.calibration)
    present = batch.probability >= batch.thresholds
    ood = batch.ood_score > batch.ood_threshold
    classes = list(model.classes)
    key = [frozenset(model.class_elements[c]) for c in classes]
    expected = [i for i, k in enumerate(key) if k <= major]
    wrong_cls = np.array([not k <= allowed for k in key])
    wrong = (present & wrong_cls[None, :]).any(1)
    calls = present.mean(0)
    return {
        "file": path.name, "material": material_of(path), "counts": total,
        "expected": {classes[i]: float(calls[i]) for i in expected},
        "wrong": float(wrong.mean()), "wrong_unflagged": float((wrong & ~ood).mean()),
        "ood": float(ood.mean()),
        "wrong_calls": {classes[i]: float(calls[i]) for i in np.flatnonzero(wrong_cls & (calls >= 0.05))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=float, nargs="+", default=[500.0, 2000.0, 10000.0])
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--seed", type=int, default=20261207)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                    help="also score the model folder DIR as LABEL (repeatable)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"the real spectra are not at {REAL}: see ../shared/data/real/PROVENANCE.md")
    models = {"shipped": xrfnb.load_model("default")}
    for spec in args.model:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder or label in models:
            ap.error(f"--model {spec!r}: expected LABEL=DIR with a new label")
        models[label] = xrfnb.load_model(Path(folder))
    rows = []
    for total in args.counts:
        print(f"\n{total:,.0f} counts per spectrum, {args.draws} draws per file\n")
        print("| file | material | model | expected classes called | wrong | wrong, unflagged | OOD | "
              "wrong calls |")
        print("|---|---|---|---|---:|---:|---:|---|")
        for i, path in enumerate(real_files()):
            for label, model in models.items():
                r = score(model, path, total, args.draws, args.seed + i)
                rows.append({**r, "model": label})
                exp = ", ".join(f"{c} {v:.2f}" for c, v in r["expected"].items()) or "(none)"
                bad = ", ".join(f"{c} {v:.2f}" for c, v in sorted(r["wrong_calls"].items(),
                                                                   key=lambda kv: -kv[1])) or "-"
                print(f"| {path.name} | {r['material']} | {label} | {exp} | {r['wrong']:.2f} | "
                      f"{r['wrong_unflagged']:.2f} | {r['ood']:.2f} | {bad} |", flush=True)
        for label in models:
            sel = [r for r in rows if r["model"] == label and r["counts"] == total]
            exp = [v for r in sel for v in r["expected"].values()]
            print(f"\n{label}: expected classes called {np.mean(exp):.2f} (mean over {len(exp)}), wrong "
                  f"{np.mean([r['wrong'] for r in sel]):.2f}, wrong unflagged "
                  f"{np.mean([r['wrong_unflagged'] for r in sel]):.2f}, OOD "
                  f"{np.mean([r['ood'] for r in sel]):.2f} (means over {len(sel)} files)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "settings": vars(args) | {"json": str(args.json)}},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
