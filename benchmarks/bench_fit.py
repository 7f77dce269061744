"""Benchmark: element maps of a 256 x 256 x 4096 simulated scan read from HDF5.

Prints spectra per second and peak memory of ``xrfnb.fit_elements`` and, when ``pymca5`` is installed
(``pip install pymca5``, the ``bench`` extra), of PyMca's ``FastXRFLinearFit`` on the same file with the
same lines, in the same run, and their ratio. Target: xrfnb faster than PyMca's fast fit.

The scan mixes six simulated paints (xrfnb.simulate, Bruker M6 preset) with smooth spatial weights and
about 2000 counts per pixel, stored as uint16 with one-row chunks. Each method runs in its own process so
its peak resident memory (ru_maxrss) is its own.

Usage: ``python benchmarks/bench_fit.py [--rows 256 --cols 256] [--file scan.h5] [--no-pymca]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ELEMENTS = ("Pb", "Fe", "Cu", "Zn", "Ca", "Hg", "Cr", "Ti")
PAINTS = (
    {"lead white": 0.7, "chalk": 0.3},
    {"vermilion": 0.4, "lead white": 0.6},
    {"red ochre": 0.5, "chalk": 0.5},
    {"azurite": 0.6, "lead white": 0.4},
    {"zinc white": 0.5, "chrome yellow": 0.5},
    {"titanium white": 0.6, "chalk": 0.4},
)
COUNTS_PER_PIXEL = 2000.0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_scan(path: str, rows: int, cols: int, seed: int = 0) -> None:
    """Write the simulated scan to ``path`` (dataset ``counts``, (rows, cols, channels) uint16)."""
    import h5py

    import xrfnb

    inst = xrfnb.Instrument.preset("bruker-m6")
    spectra = []
    for paint in PAINTS:
        stack = xrfnb.Stack([xrfnb.Layer(paint, thickness_um=30)])
        s = np.asarray(xrfnb.simulate(stack, inst, noise=False, pileup=False).counts, dtype=np.float64)
        spectra.append(s / s.sum())
    basis = np.stack(spectra)  # (6, channels)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    centres = rng.uniform(0, 1, (len(PAINTS), 2))
    weights = np.exp(-((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2) / 0.05)
    weights /= weights.sum(axis=-1, keepdims=True)
    n_ch = basis.shape[1]
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("counts", (rows, cols, n_ch), dtype=np.uint16, chunks=(1, cols, n_ch))
        f.attrs["offset_keV"] = inst.calibration.offset_keV
        f.attrs["gain_keV"] = inst.calibration.gain_keV
        for r in range(rows):
            lam = COUNTS_PER_PIXEL * weights[r] @ basis
            ds[r] = np.minimum(rng.poisson(lam), 65535).astype(np.uint16)


def run_xrfnb(path: str, queue: mp.Queue) -> None:
    import h5py

    import xrfnb

    inst = xrfnb.Instrument.preset("bruker-m6")
    base = _peak_rss_mib()
    with h5py.File(path, "r") as f:
        scan = xrfnb.Scan(f["counts"], inst.calibration)
        t0 = time.perf_counter()
        maps = xrfnb.fit_elements(scan, inst, list(ELEMENTS), energy_range_keV=(1.0, 15.5), progress=True)
        dt = time.perf_counter() - t0
    n = maps.shape[0] * maps.shape[1]
    queue.put({"seconds": dt, "spectra": n, "peak_rss_mib": _peak_rss_mib(), "base_rss_mib": base,
               "mean": {e: float(maps[e].mean()) for e in maps.elements}})


def _pymca_config(inst, n_channels: int):
    from PyMca5.PyMcaIO import ConfigDict
    from PyMca5.PyMcaPhysics.xrf import ClassMcaTheory

    cfg = ConfigDict.ConfigDict()
    cfg.update(ClassMcaTheory.McaTheory().config)  # PyMca's defaults
    cal = inst.calibration
    lo = int(np.ceil((1.0 - cal.offset_keV) / cal.gain_keV))
    hi = int(np.floor((15.5 - cal.offset_keV) / cal.gain_keV))
    cfg["fit"].update({"xmin": lo, "xmax": hi, "stripflag": 1, "stripalgorithm": 1, "snipwidth": 30,
                       "linearfitflag": 1, "escapeflag": 1, "sumflag": 0, "scatterflag": 0,
                       "hypermetflag": 1, "continuum": 0, "fitweight": 1,
                       # one excitation energy (PyMca needs a matrix for several): Rh Ka
                       "energy": [20.216], "energyweight": [1.0], "energyflag": [1], "energyscatter": [1]})
    cfg["detector"].update({"zero": cal.offset_keV, "gain": cal.gain_keV,
                            "noise": float(inst.noise_keV), "fano": float(inst.fano)})
    families = {"Pb": "L", "Hg": "L"}
    cfg["peaks"] = {el: families.get(el, "K") for el in ELEMENTS}
    return cfg


def run_pymca(path: str, queue: mp.Queue) -> None:
    import h5py
    from PyMca5.PyMcaPhysics.xrf.FastXRFLinearFit import FastXRFLinearFit

    import xrfnb

    inst = xrfnb.Instrument.preset("bruker-m6")
    base = _peak_rss_mib()
    with h5py.File(path, "r") as f:
        data = f["counts"]
        cfg = _pymca_config(inst, data.shape[-1])
        fast = FastXRFLinearFit()
        t0 = time.perf_counter()
        out = fast.fitMultipleSpectra(y=data, configuration=cfg, weight=1, refit=1, concentrations=0)
        dt = time.perf_counter() - t0
        names = [str(n) for n in out["names"]] if "names" in out else []
    queue.put({"seconds": dt, "spectra": int(np.prod(data.shape[:2])), "peak_rss_mib": _peak_rss_mib(),
               "base_rss_mib": base, "names": names})


def _in_child(target, path: str) -> dict:
    """Run ``target(path, queue)`` in a fresh process; its result, or an error if it died."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(path, q))
    p.start()
    while True:
        try:
            result = q.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not p.is_alive():
                msg = f"{target.__name__} failed (exit code {p.exitcode}); see its traceback above"
                raise RuntimeError(msg) from None
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--file", type=str, default=None, help="HDF5 scan to reuse or create")
    ap.add_argument("--no-pymca", action="store_true")
    args = ap.parse_args()
    tmp = None
    path = args.file
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "bench_fit_scan.h5")
    if not Path(path).exists():
        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=make_scan, args=(path, args.rows, args.cols))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"simulating the scan failed (exit code {p.exitcode})")
        print(f"simulated {args.rows} x {args.cols} x 4096 scan in {time.perf_counter() - t0:.1f} s: {path}")
    size_mib = Path(path).stat().st_size / 2**20
    print(f"file size {size_mib:.0f} MiB (uint16, uncompressed)")

    ours = _in_child(run_xrfnb, path)
    rate = ours["spectra"] / ours["seconds"]
    print(f"xrfnb.fit_elements: {ours['spectra']} spectra in {ours['seconds']:.1f} s = {rate:,.0f}"
          f" spectra/s; peak RSS {ours['peak_rss_mib']:.0f} MiB (imports {ours['base_rss_mib']:.0f} MiB)",
          flush=True)
    if args.no_pymca:
        return
    try:
        import PyMca5  # noqa: F401
    except ImportError:
        print("pymca5 not installed (pip install pymca5): no PyMca comparison")
        return
    theirs = _in_child(run_pymca, path)
    rate_p = theirs["spectra"] / theirs["seconds"]
    print(f"PyMca FastXRFLinearFit (per-spectrum SNIP, same lines): {theirs['spectra']} spectra in "
          f"{theirs['seconds']:.1f} s = {rate_p:,.0f} spectra/s; peak RSS {theirs['peak_rss_mib']:.0f} MiB")
    print(f"speed ratio xrfnb / PyMca = {rate / rate_p:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
