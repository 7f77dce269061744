"""Benchmark: end-to-end pigment mapping of a large chunked HDF5 scan, and the element fit on the same file.

Writes a synthetic uint16 scan (xrfnb's own HDF5 layout via ``xrfnb.save``: chunked, gzip) of 512 x 512
pixels x 4096 channels, then measures in fresh processes

* ``map_pigments(scan, model, out=...)``: spectra/s end to end (read, decompress, rebin, network, write)
  and the peak resident memory (``ru_maxrss``) of the process, and its baseline after imports and model
  loading;
* ``fit_elements(scan, instrument)`` on the same file (when available), and the speed ratio.

It repeats at 1024 x 1024 (4x the pixels) to show that memory does not grow with the scan size.
Targets on the 2-core project machine: >= 20,000 spectra/s end to end and peak RSS < 2 GB at both sizes.

The spectra are Poisson samples (about 2,000 counts per pixel, as in a 10-50 ms macro-XRF dwell) of a few
template spectra with Gaussian peaks at real line energies (xraylib) on a smooth background: not exact
physics, but realistic sparsity and compression. About 0.1 % of the pixels are dead (all zeros).

Usage::

    python benchmarks/bench_mapping.py            # 512^2 and 1024^2 (needs ~3 GB in /tmp, ~10 min)
    python benchmarks/bench_mapping.py --small    # 128^2 and 256^2, about a minute
    python benchmarks/bench_mapping.py --tmpdir /scratch --no-fit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_CHANNELS = 4096
GAIN_keV = 0.01
POOL = 512  # Poisson samples per template
TARGET_SPECTRA_PER_S = 20_000
TARGET_RSS_MB = 2048

#: template name -> (element, line, relative height) peaks
TEMPLATES = {
    "lead white": [("Pb", "La", 1.0), ("Pb", "Lb", 0.8), ("Pb", "Lg", 0.15), ("Pb", "Ma", 0.3)],
    "vermilion": [("Hg", "La", 1.0), ("Hg", "Lb", 0.7), ("S", "Ka", 0.3)],
    "zinc white": [("Zn", "Ka", 1.0), ("Zn", "Kb", 0.15)],
    "ochre": [("Fe", "Ka", 1.0), ("Fe", "Kb", 0.13), ("Ca", "Ka", 0.2)],
    "emerald green": [("Cu", "Ka", 1.0), ("Cu", "Kb", 0.14), ("As", "Ka", 0.8), ("As", "Kb", 0.13)],
    "chalk": [("Ca", "Ka", 1.0), ("Ca", "Kb", 0.12)],
}


def _templates() -> np.ndarray:
    import xrfnb

    e = np.arange(N_CHANNELS) * GAIN_keV
    base = 0.4 * np.exp(-(((e - 12.0) / 9.0) ** 2)) + 0.05  # bremsstrahlung-like hump
    base[e < 1.0] = 0.0
    rh = [(xrfnb.line_energy_keV("Rh", "Ka"), 0.6), (xrfnb.line_energy_keV("Rh", "Ka") - 0.7, 0.9)]
    out = []
    for peaks in TEMPLATES.values():
        s = base.copy()
        for el, line, h in peaks:
            c = xrfnb.line_energy_keV(el, line)
            sigma = np.sqrt(0.06**2 + 2.4e-3 * c) / 2.3548
            s += 25 * h * np.exp(-0.5 * ((e - c) / sigma) ** 2)
        for c, h in rh:
            s += 8 * h * np.exp(-0.5 * ((e - c) / 0.12) ** 2)
        out.append(s / s.sum())
    return np.array(out)


class _SyntheticCounts:
    """Array-like (rows, cols, channels) uint16 whose row blocks are generated on demand."""

    def __init__(self, rows: int, cols: int, seed: int = 0) -> None:
        self.shape = (rows, cols, N_CHANNELS)
        self.dtype = np.dtype(np.uint16)
        self.ndim = 3
        rng = np.random.default_rng(seed)
        t = _templates()
        lam = t[:, None, :] * rng.uniform(800, 4000, size=(len(t), POOL, 1))
        self.pool = rng.poisson(lam).astype(np.uint16)  # (templates, POOL, channels)
        self.seed = seed

    def __getitem__(self, index):
        if isinstance(index, tuple):
            index = index[0]
        rows, cols, _ = self.shape
        r = np.arange(rows)[index]
        rng = np.random.default_rng([self.seed, int(r[0]) if r.size else 0])
        # regions: vertical bands of templates, a second pigment in a diagonal band
        tpl = (np.arange(cols)[None, :] * len(TEMPLATES) // cols + 0 * r[:, None]) % len(TEMPLATES)
        pick = rng.integers(0, POOL, size=(r.size, cols))
        block = self.pool[tpl, pick]
        diag = ((r[:, None] + np.arange(cols)[None, :]) % (cols // 4 + 1)) < cols // 16
        block[diag] = block[diag] // 2 + self.pool[(tpl[diag] + 2) % len(TEMPLATES), pick[diag]] // 2
        dead = rng.random((r.size, cols)) < 1e-3
        block[dead] = 0
        return block


def generate(path: Path, n: int) -> None:
    import xrfnb

    scan = xrfnb.Scan(
        _SyntheticCounts(n, n),
        xrfnb.EnergyCalibration(0.0, GAIN_keV),
        pixel_size_um=100.0,
        live_time_s=0.02,
        metadata={"instrument": "bruker-m6", "synthetic": True},
    )
    xrfnb.save(scan, path)


def _fallback_model():
    """A freshly initialised PigmentModel with the default architecture (untrained weights)."""
    import torch

    from xrfnb.model.model import PigmentModel
    from xrfnb.model.nn import PigmentNet

    torch.manual_seed(0)
    classes = list(TEMPLATES) + [f"class {i}" for i in range(24 - len(TEMPLATES))]
    elements = {c: [p[0] for p in TEMPLATES.get(c, [("Fe", "Ka", 1)])] for c in classes}
    meta = {
        "name": "untrained-default-architecture",
        "classes": classes,
        "colors": ["#808080"] * len(classes),
        "class_pigments": {c: [c] for c in classes},
        "class_elements": elements,
        "energy_grid": {"n_bins": 512, "e_min_keV": 1.0, "e_max_keV": 41.0, "noise_keV": 0.08},
        "thresholds": [0.5] * len(classes),
        "ood": {"threshold": 1.0},
    }
    return PigmentModel(PigmentNet(512, len(classes)), meta, {})


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_map(path: Path, out: Path, chunk_pixels: int) -> dict:
    import xrfnb
    from xrfnb.maps.mapping import map_pigments

    note = "shipped model"
    try:
        model = xrfnb.load_model("default")
    except xrfnb.XRFNBError as exc:
        model, note = _fallback_model(), f"NO SHIPPED MODEL ({exc}); freshly initialised default architecture"
    scan = xrfnb.load(path)
    rows, cols, _ = scan.shape
    # warm up torch on a few spectra so one-time costs are not counted as throughput
    model.identify_batch(np.asarray(scan.counts[0, : min(cols, 64)]), scan.calibration)
    base = _rss_mb()
    t0 = time.perf_counter()
    maps = map_pigments(scan, model, out=out, progress=False, chunk_pixels=chunk_pixels)
    elapsed = time.perf_counter() - t0
    s = maps.summary()
    return {
        "what": "map_pigments",
        "model": f"{model.name} ({len(model.classes)} classes): {note}",
        "pixels": rows * cols,
        "elapsed_s": elapsed,
        "spectra_per_s": rows * cols / elapsed,
        "baseline_rss_mb": base,
        "peak_rss_mb": _rss_mb(),
        "masked": s.n_masked,
        "torch_threads": __import__("torch").get_num_threads(),
        "timing_s": maps.metadata.get("timing_s", {}),
    }


def worker_fit(path: Path) -> dict:
    import xrfnb

    try:
        from xrfnb.fitting.elements import fit_elements
        from xrfnb.physics.instrument import Instrument
    except ImportError as exc:
        return {"what": "fit_elements", "skipped": f"not available: {exc}"}
    scan = xrfnb.load(path)
    inst = Instrument.preset("bruker-m6")
    base = _rss_mb()
    t0 = time.perf_counter()
    em = fit_elements(scan, inst, progress=False)
    elapsed = time.perf_counter() - t0
    rows, cols, _ = scan.shape
    return {
        "what": "fit_elements",
        "elements": list(em.elements),
        "elapsed_s": elapsed,
        "spectra_per_s": rows * cols / elapsed,
        "baseline_rss_mb": base,
        "peak_rss_mb": _rss_mb(),
    }


def _subprocess(args: list[str], timeout_s: float, script: str = __file__) -> dict:
    """Run ``script`` (this benchmark by default) with ``args`` in a fresh process; its last stdout line
    is a JSON result (a fresh process per size, so peak RSS is that run's own)."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="128^2 and 256^2 pixels (quick check)")
    ap.add_argument("--tmpdir", default=None, help="where to write the scans (default: system temp)")
    ap.add_argument("--no-fit", action="store_true", help="skip the element fit")
    ap.add_argument("--chunk-pixels", type=int, default=None, help="default 8192 (2048 with --small)")
    ap.add_argument("--fit-timeout", type=float, default=1800.0, help="seconds allowed for each element fit")
    ap.add_argument("--worker", choices=["generate", "map", "fit"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "generate":
        generate(Path(args.path), args.n)
        print(json.dumps({"ok": True}))
        return 0
    if args.worker == "map":
        print(json.dumps(worker_map(Path(args.path), Path(args.path + ".maps.h5"), args.chunk_pixels)))
        return 0
    if args.worker == "fit":
        print(json.dumps(worker_fit(Path(args.path))))
        return 0

    sizes = (128, 256) if args.small else (512, 1024)
    if args.chunk_pixels is None:  # several blocks even at the smaller size, so the two sizes compare
        args.chunk_pixels = 2048 if args.small else 8192
    work = Path(tempfile.mkdtemp(prefix="xrfnb-bench-", dir=args.tmpdir))
    print(f"bench_mapping: scans in {work} (deleted afterwards); {os.cpu_count()} CPUs")
    results = []
    try:
        for n in sizes:
            path = work / f"scan_{n}.h5"
            t0 = time.perf_counter()
            gen = _subprocess(["--worker", "generate", "--path", str(path), "--n", str(n)], 3600)
            if "error" in gen:
                print(f"  generating {n}^2 failed: {gen['error']}")
                return 1
            size_mb = path.stat().st_size / 2**20
            raw_mb = n * n * N_CHANNELS * 2 / 2**20
            print(
                f"\n{n} x {n} x {N_CHANNELS} uint16: {raw_mb:.0f} MiB raw, {size_mb:.0f} MiB on disk "
                f"(written in {time.perf_counter() - t0:.0f} s)"
            )
            m = _subprocess(
                ["--worker", "map", "--path", str(path), "--chunk-pixels", str(args.chunk_pixels)], 3600
            )
            if "error" in m:
                print(f"  map_pigments failed: {m['error']}")
                return 1
            print(f"  model: {m['model']}")
            print(f"  stage seconds: {m['timing_s']} (read: background thread; wait: main thread idle)")
            print(
                f"  map_pigments: {m['spectra_per_s']:,.0f} spectra/s ({m['elapsed_s']:.1f} s), peak RSS "
                f"{m['peak_rss_mb']:.0f} MB (after imports and model load {m['baseline_rss_mb']:.0f} MB), "
                f"{m['masked']} masked pixels, torch threads {m['torch_threads']}"
            )
            f: dict = {"skipped": "--no-fit"}
            if not args.no_fit:
                f = _subprocess(["--worker", "fit", "--path", str(path)], args.fit_timeout)
                if "error" in f or "skipped" in f:
                    print(f"  fit_elements: {f.get('error') or f.get('skipped')}")
                else:
                    print(
                        f"  fit_elements: {f['spectra_per_s']:,.0f} spectra/s ({f['elapsed_s']:.1f} s), "
                        f"peak RSS {f['peak_rss_mb']:.0f} MB, {len(f['elements'])} elements"
                    )
                    ratio = m["spectra_per_s"] / f["spectra_per_s"]
                    print(f"  ratio map_pigments / fit_elements speed: {ratio:.2f}")
            results.append((n, m, f))
            path.unlink(missing_ok=True)
            Path(str(path) + ".maps.h5").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nsummary")
    ok = True
    for n, m, _ in results:
        speed_ok = m["spectra_per_s"] >= TARGET_SPECTRA_PER_S
        rss_ok = m["peak_rss_mb"] < TARGET_RSS_MB
        ok &= speed_ok and rss_ok
        print(
            f"  {n:>5}^2: {m['spectra_per_s']:>9,.0f} spectra/s [{'ok' if speed_ok else 'BELOW'} target "
            f"{TARGET_SPECTRA_PER_S:,}]  peak RSS {m['peak_rss_mb']:>6.0f} MB [{'ok' if rss_ok else 'ABOVE'} "
            f"target {TARGET_RSS_MB} MB]"
        )
    if len(results) == 2:
        growth = results[1][1]["peak_rss_mb"] - results[0][1]["peak_rss_mb"]
        print(f"  peak RSS change for 4x the pixels: {growth:+.0f} MB")
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
