"""Dashboard responsiveness on a 512 x 512 x 4096 scan (server side; target < 200 ms each).

Measures, on a live Bokeh document (the models a browser session would be sent):

* tap -> spectrum: from a Tap event on the main map until the spectrum, probability bars and info text
  of the new pixel are in the document's models;
* threshold -> maps: from a threshold change (one pigment's slider, and the global slider that moves
  every class) until the main map and the gallery maps are updated.

The browser's drawing time and the websocket transfer are not included. Run:
``.venv/bin/python benchmarks/bench_dashboard.py [--rows 512] [--cols 512] [--channels 4096] [--classes 20]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from bokeh.document import Document
from bokeh.models import ColumnDataSource

import xrfnb
from xrfnb._dashboard import Dashboard

TARGET_MS = 200.0


def make_scan_and_maps(rows: int, cols: int, channels: int, k: int, seed: int = 0):
    """A scan built from Poisson spectra of a few regions (fancy-indexed, fast) and smooth maps."""
    rng = np.random.default_rng(seed)
    cal = xrfnb.EnergyCalibration(0.0, 40.0 / channels)
    energy = cal.energies_keV(channels)
    n_regions = 16
    templates = np.full((n_regions, channels), 0.05)
    for i in range(n_regions):
        for e0 in rng.uniform(2.0, 20.0, size=4):
            templates[i] += 40 * np.exp(-0.5 * ((energy - e0) / 0.07) ** 2)
    spectra = rng.poisson(templates[:, None, :].repeat(32, axis=1)).astype(np.uint16)  # (regions, 32, ch)
    r, c = np.mgrid[:rows, :cols]
    region = ((r // max(1, rows // 4)) * 4 + c // max(1, cols // 4)) % n_regions
    variant = rng.integers(0, 32, size=(rows, cols))
    counts = spectra[region, variant]  # (rows, cols, channels) uint16
    scan = xrfnb.Scan(counts, cal, live_time_s=0.02, metadata={"source": "benchmark"})

    yy, xx = r / rows, c / cols
    prob = np.empty((rows, cols, k), dtype=np.float32)
    for j in range(k):
        fx, fy, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.3)
        prob[..., j] = 0.5 + 0.5 * np.sin(2 * np.pi * fx * xx + ph) * np.cos(2 * np.pi * fy * yy)
    mask = np.zeros((rows, cols), dtype=bool)
    mask[0, :3] = True
    prob[mask] = np.nan
    maps = xrfnb.PigmentMaps(
        classes=tuple(f"pigment {j:02d}" for j in range(k)),
        probability=prob,
        buried_probability=(prob * 0.3).astype(np.float32),
        ood_score=rng.uniform(0, 1, size=(rows, cols)).astype(np.float32),
        thresholds=np.full(k, 0.5),
        ood_threshold=0.8,
        mask=mask,
        colors=tuple(f"#{rng.integers(0, 0xFFFFFF):06x}" for _ in range(k)),
    )
    return scan, maps


def spectrum_sum(doc: Document) -> list[float]:
    return [
        float(np.sum(m.data["Counts"])) for m in doc.select({"type": ColumnDataSource}) if "Counts" in m.data
    ]


def image_checksum(doc: Document) -> float:
    total = 0.0
    for m in doc.select({"type": ColumnDataSource}):
        for img in m.data.get("image", []):
            a = np.asarray(img, dtype=float)
            total += float(np.nansum(a)) + float(np.isnan(a).sum())
    return total


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def report(name: str, ms: list[float]) -> None:
    med = statistics.median(ms)
    p90 = sorted(ms)[max(0, int(0.9 * len(ms)) - 1)]
    flag = "OK" if med < TARGET_MS else "SLOW"
    print(
        f"{name:<44} median {med:7.1f} ms   p90 {p90:7.1f} ms   "
        f"(n={len(ms)}, target < {TARGET_MS:.0f} ms) {flag}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--channels", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    t0 = time.perf_counter()
    scan, maps = make_scan_and_maps(args.rows, args.cols, args.channels, args.classes)
    print(f"scene: {scan} , {len(maps.classes)} classes, built in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    dash = Dashboard(scan=scan, maps=maps)
    doc = Document()
    root = dash.__panel__().get_root(doc)
    doc.add_root(root)
    print(f"dashboard constructed and rendered in {time.perf_counter() - t0:.1f} s")
    counts = np.asarray(scan.counts)
    rng = np.random.default_rng(1)
    pixels = [(int(rng.integers(0, args.rows)), int(rng.integers(0, args.cols))) for _ in range(args.repeats)]

    def tap(i: int) -> None:
        r, c = pixels[i]
        dash._tap.event(x=c + 0.5, y=r + 0.5)

    ms = timed(tap, args.repeats)
    r, c = pixels[-1]
    assert dash.pixel == (r, c)
    assert float(counts[r, c].sum()) in spectrum_sum(doc), (
        "spectrum in the document is not the tapped pixel's"
    )
    report("tap -> spectrum, bars, info", ms)

    for view in ("Composite", "Pigment"):
        dash.view = view
        values = [0.3, 0.7]
        before = image_checksum(doc)

        def one(i: int, values=values) -> None:
            dash.set_threshold(dash.classes[0], values[i % 2])

        ms = timed(one, args.repeats)
        assert image_checksum(doc) != before, "maps in the document did not change"
        report(f"one pigment's threshold -> maps ({view})", ms)

        def every(i: int, values=values) -> None:
            dash.global_threshold = values[(i + 1) % 2]

        before = image_checksum(doc)
        ms = timed(every, args.repeats)
        assert image_checksum(doc) != before, "maps in the document did not change"
        report(f"global threshold -> {args.classes} maps ({view})", ms)


if __name__ == "__main__":
    main()
