"""The physics check's calls against the network's on held-out spectra (issue #19 item 2).

For each of ``xrfnb.model.evaluate``'s held-out sets (single, mixture, buried, low; its seed
``EVAL_SEED``, its wider instrument envelope, its ground truth: a pigment's class counts when its strongest
line is detectable) and count level, ``--n`` spectra are drawn exactly as :func:`xrfnb.evaluate_model`
draws them (the cell it draws with ``n_per_cell = --n``; the same stacks at each count level). The
shipped model calls each one (``identify_batch``: the classes at or above their thresholds, buried
where ``is_buried``); every in-distribution call with alternatives is checked once by
:func:`check_calls`, on the held-out instrument with the calibration the user believes (the spectra
carry the evaluation's calibration error). One check gives both policies, since the explanations
fitted do not depend on the switch:

* ``lowest``: the explanation of lowest BIC, always (``switch = 0``);
* ``switch``: the lowest BIC only where it beats the network's call by more than ``SWITCH_MARGIN``
  (the default of :func:`check_calls`).

Printed per cell: spectra, spectra checked (fitted), how many of those each policy changes, and the
micro-F1 (over classes and spectra of the cell; unchecked spectra keep the network's call) of the network,
of ``lowest`` and of ``switch``; then the same summed over all cells. About 10 minutes on two cores with
the defaults.

``--perturbed`` draws the spectra instead from ``benchmarks/eval_perturbed.py``'s first perturbed set
(atomic parameters drawn with seed 9100, instruments and impurities outside the training ranges, stacks
from ``EVAL_SEED + 7000``): physics nobody trained or fitted on. The spectra are simulated under the
perturbation; the check itself fits with the unperturbed physics (xraylib's), as it would a user's data.

Usage: python benchmarks/eval_physics_check.py [--n 30] [--counts 1000,3000]
       [--sets single,mixture,buried,low] [--no-pileup] [--perturbed] [--verbose] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from xrfnb.core.calls import is_buried
from xrfnb.model.evaluate import EVAL_SEED, EVAL_SETS
from xrfnb.model.model import load_model
from xrfnb.model.physics_check import SWITCH_MARGIN, check_calls
from xrfnb.model.train import config_from_table, n_groups
from xrfnb.model.trainingdata import DataConfig, TrainingData
from xrfnb.physics.perturb import AtomicPerturbation, atomic_perturbation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_perturbed import PARTS, perturbed_config

#: eval_perturbed.py's first draw: its stack seed offset and its atomic-parameter seed
PERTURBED_SEED_OFFSET = 7000
PERTURBED_ATOMIC_SEED = 9100


def _tallies(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """True positives, false positives and false negatives over a cell, shape (3,)."""
    return np.array([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()], dtype=np.int64)


def _f1(t: np.ndarray) -> float:
    tp, fp, fn = (int(v) for v in t)
    return 2 * tp / max(1, 2 * tp + fp + fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="spectra per set and count level")
    ap.add_argument("--counts", default="1000,3000", help="count levels, comma-separated")
    ap.add_argument("--sets", default=",".join(EVAL_SETS), help="held-out sets, comma-separated")
    ap.add_argument("--no-pileup", action="store_true", help="fit without pile-up (check_calls pileup=False)")
    ap.add_argument("--perturbed", action="store_true",
                    help="spectra from eval_perturbed.py's first perturbed set (atomic parameters, "
                         "instruments, impurities outside training; held-out seeds)")
    ap.add_argument("--verbose", action="store_true", help="print each call the switch changes")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    sets = [s for s in args.sets.split(",") if s]

    model = load_model("default", precision="float32")
    table = dict(model.meta.get("training", {}).get("data", {}))
    dcfg = config_from_table(DataConfig, table, "model.json training.data")
    seed = EVAL_SEED
    if args.perturbed:
        dcfg = perturbed_config(model, PARTS)
        seed = EVAL_SEED + PERTURBED_SEED_OFFSET
    grid = model.meta["energy_grid"]
    data = TrainingData(dcfg, n_bins=int(grid["n_bins"]), e_min_keV=float(grid["e_min_keV"]),
                        e_max_keV=float(grid["e_max_keV"]), grid_noise_keV=float(grid["noise_keV"]))
    classes = list(model.classes)
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    total = {k: np.zeros(3, np.int64) for k in ("network", "lowest", "switch")}
    n_all = n_checked_all = changed_lowest_all = changed_switch_all = 0
    t_start = time.perf_counter()
    print(f"switch = {SWITCH_MARGIN:g}; {args.n} spectra per cell; seed {seed}; "
          f"pile-up {'not ' if args.no_pileup else ''}fitted; "
          + ("perturbed physics (eval_perturbed.py's first set)" if args.perturbed else "training physics"))
    print(f"{'set':8s} {'counts':>6s} {'n':>4s} {'checked':>7s} {'chg lowest':>10s} {'chg switch':>10s} "
          f"{'F1 net':>7s} {'F1 lowest':>9s} {'F1 switch':>9s} {'s/check':>7s}")
    for s in sets:
        for c in counts:
            rng = np.random.default_rng([seed, list(EVAL_SETS).index(s)])
            pert = AtomicPerturbation(seed=PERTURBED_ATOMIC_SEED) if args.perturbed else None
            with atomic_perturbation(pert) if pert is not None else contextlib.nullcontext():
                _, labels, raws, _ = data.batch_raw(args.n, rng, kind=s, counts=float(c), wider=True,
                                                    n_groups=n_groups(args.n))
            truth = labels > 0
            pred = {k: np.zeros_like(truth) for k in total}
            n_checked = changed_lowest = changed_switch = 0
            seconds = 0.0
            for idx, raw, cal, inst in raws:
                res = model.identify_batch(raw, cal)
                inst_user = inst.with_(calibration=cal, n_channels=int(raw.shape[1]))
                for row, i in enumerate(idx):
                    prob, bprob = res.probability[row], res.buried_probability[row]
                    present = prob >= model.thresholds
                    for k in pred:
                        pred[k][i] = present
                    if bool(res.ood[row]) or not present.any():
                        continue
                    called = [classes[k] for k in np.flatnonzero(present)]
                    layer = {cl: ("buried" if is_buried(float(prob[index[cl]]), float(bprob[index[cl]]))
                                  else "surface") for cl in called}
                    check = check_calls(np.asarray(raw[row], float), inst_user, called, layer,
                                        model.class_elements, pileup=not args.no_pileup)
                    if not check.checked:
                        continue
                    n_checked += 1
                    seconds += check.seconds
                    lowest = min(check.explanations, key=lambda x: x.bic)
                    net = next(x for x in check.explanations if x.move == "called")
                    chosen = lowest if net.bic - lowest.bic > SWITCH_MARGIN else net
                    assert set(chosen.classes) == set(check.best_classes)  # the check's own rule
                    for k, x in (("lowest", lowest), ("switch", chosen)):
                        pred[k][i] = np.isin(classes, x.classes)
                    changed_lowest += set(lowest.classes) != set(called)
                    changed_switch += set(chosen.classes) != set(called)
                    if args.verbose and set(chosen.classes) != set(called):
                        true = [classes[k] for k in np.flatnonzero(truth[i])]
                        print(f"  {s} {c} #{i}: truth {true}; {check.summary()}")
            t = {k: _tallies(pred[k], truth) for k in pred}
            for k in total:
                total[k] += t[k]
            n_all += args.n
            n_checked_all += n_checked
            changed_lowest_all += changed_lowest
            changed_switch_all += changed_switch
            row = {"set": s, "counts": c, "n": args.n, "checked": n_checked, "changed_lowest": changed_lowest,
                   "changed_switch": changed_switch, **{f"f1_{k}": _f1(t[k]) for k in t},
                   "seconds_per_check": seconds / max(1, n_checked)}
            rows.append(row)
            print(f"{s:8s} {c:6d} {args.n:4d} {n_checked:7d} {changed_lowest:10d} {changed_switch:10d} "
                  f"{row['f1_network']:7.3f} {row['f1_lowest']:9.3f} {row['f1_switch']:9.3f} "
                  f"{row['seconds_per_check']:7.1f}", flush=True)
    print(f"{'all':8s} {'':6s} {n_all:4d} {n_checked_all:7d} {changed_lowest_all:10d} "
          f"{changed_switch_all:10d} "
          f"{_f1(total['network']):7.3f} {_f1(total['lowest']):9.3f} {_f1(total['switch']):9.3f}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"switch": SWITCH_MARGIN, "n": args.n, "seed": seed, "pileup": not args.no_pileup,
                       "perturbed": args.perturbed, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
