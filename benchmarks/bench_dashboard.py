"""Dashboard responsiveness on a 512 x 512 x 4096 scan (server side; target < 200 ms each).

Measures, on a live Bokeh document (the models a browser session would be sent):

* tap -> spectrum: from a Tap event on the main map until the spectrum, probability bars and info text
  of the new pixel, and the spectrum of the paint stack fitted to it (``xrfnb.fit_stack`` of the called
  pigments, the evidence view) with its residual, are in the document's models; the classes are
  pigment-library groups with about 3-5 present per pixel, so every tap fits real pigments;
* threshold -> maps: from a threshold change (one pigment's slider, and the global slider that moves
  every class) until the main map and the gallery maps are updated.

Each timed action is followed (outside the timing) by a check that the document's models already hold
its result: the tapped pixel's spectrum; the composite of the new thresholds (or, in the pigment view,
the colour range starting at the new threshold) in the main map's data source; and, in the gallery
mosaic's data source, exactly as many below-threshold ("absent") pixels as the thumbnails of
``maps.probability`` have at the new thresholds. An update that has not reached the models by the time
the action returns fails the benchmark instead of being timed short.

The browser's drawing time and the websocket transfer are not included in those. The cold start is
measured end to end instead: ``xrfnb serve`` (what ``make serve`` runs, the shipped demo) is started, and a
headless Chromium (``/usr/bin/chromium``, Playwright) opens its page as soon as the server listens (or
``--open-after S`` seconds later, as a person typing the address would); the script prints, on one clock
from the command's start, when the server listens, when the page is opened, the browser's navigation
timings, when the page first shows anything (a rendered root) and the loading state, when it holds its
Figure models and when the demo's maps are drawn (the main map's and the gallery's images in the page);
then the seconds a second page takes from its opening to its maps. Interleaved with these, the server's
steps (``TRACE`` lines the server process prints: the same command line, ``xrfnb.ui.cli.main``, with the
dashboard's steps wrapped): imports done, the warm-up started, each session's ``make_app``, its page's
HTML, a page's websocket connecting, the reading and mapping workers, and each update of the page with
the scan and its maps (``set_scan``, ``set_maps``). ``--no-trace`` runs the ``xrfnb`` script itself;
``XRFNB_BENCH_PROFILE=FILE`` writes a cProfile of the first session's showing of its maps. Print
``uptime`` with the figures: on a shared machine they follow its load.
Run:
``.venv/bin/python benchmarks/bench_dashboard.py [--rows 512] [--cols 512] [--channels 4096] [--classes 20]``
``[--only cold-start|responsiveness] [--open-after S] [--no-trace]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bokeh.document import Document
from bokeh.models import ColumnDataSource, GlyphRenderer, Plot

import xrfnb
from xrfnb.ui.dashboard import Dashboard
from xrfnb.ui.dashboard.common import ABSENT_COLOR
from xrfnb.ui.dashboard.gallery import THUMB_PX
from xrfnb.ui.report import HEADLESS_CHROMIUM_ARGS

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
        classes=library_classes(k),
        probability=prob,
        buried_probability=(prob * 0.3).astype(np.float32),
        ood_score=rng.uniform(0, 1, size=(rows, cols)).astype(np.float32),
        thresholds=np.full(k, 0.85),  # about 3-5 classes present at a pixel, as in paintings
        ood_threshold=0.8,
        mask=mask,
        colors=tuple(f"#{rng.integers(0, 0xFFFFFF):06x}" for _ in range(k)),
    )
    return scan, maps


def library_classes(k: int) -> tuple[str, ...]:
    """The first ``k`` ambiguity groups of the pigment library (so a tap fits real pigments' stacks)."""
    groups = [
        g
        for g, members in xrfnb.pigments().groups().items()
        if not all(xrfnb.pigments()[m].xrf_silent for m in members)
    ]
    if k > len(groups):
        raise SystemExit(f"--classes {k}: the pigment library has only {len(groups)} XRF-visible groups")
    return tuple(groups[:k])


def spectrum_sum(doc: Document) -> list[float]:
    return [
        float(np.sum(m.data["Counts"])) for m in doc.select({"type": ColumnDataSource}) if "Counts" in m.data
    ]


def image_renderer(doc: Document, plot_name: str) -> GlyphRenderer:
    """The image glyph renderer of the plot called ``plot_name`` (one per document)."""
    (plot,) = [p for p in doc.select({"type": Plot}) if p.name == plot_name]
    (renderer,) = [
        r
        for r in plot.renderers
        if isinstance(r, GlyphRenderer) and type(r.glyph).__name__ in ("Image", "ImageRGBA")
    ]
    return renderer


def rgb_of(renderer: GlyphRenderer) -> np.ndarray:
    """(rows, cols, 3) uint8 pixels of an ImageRGBA glyph's data source (uint32 RGBA per pixel)."""
    img = np.ascontiguousarray(renderer.data_source.data["image"][0])
    assert img.dtype == np.uint32, img.dtype
    return img.view(np.uint8).reshape(*img.shape, 4)[..., :3]


class DocumentCheck:
    """Asserts that a document's main map and gallery hold the maps at given thresholds."""

    def __init__(self, doc: Document, maps: xrfnb.PigmentMaps) -> None:
        self.doc, self.maps = doc, maps
        rows, cols = maps.probability.shape[:2]
        stride = max(1, -(-max(rows, cols) // THUMB_PX))
        valid = ~np.asarray(maps.mask)[::stride, ::stride]
        self.thumbs = np.asarray(maps.probability[::stride, ::stride], dtype=float)[valid]  # (n, K)
        self.absent_rgb = tuple(int(ABSENT_COLOR[i : i + 2], 16) for i in (1, 3, 5))

    def __call__(self, view: str, thresholds: np.ndarray, focus: int = 0) -> None:
        main = image_renderer(self.doc, "xrfnb-main")
        if view == "Composite":
            expected = np.asarray(self.maps.composite_rgb(thresholds), dtype=np.uint8)
            assert np.array_equal(rgb_of(main), expected), "main map in the document is not the new composite"
        else:
            mapper = main.glyph.color_mapper
            assert mapper.low == thresholds[focus], "main map's colour range does not start at the threshold"
        mosaic = rgb_of(image_renderer(self.doc, "xrfnb-gallery"))
        absent = int(np.all(mosaic == self.absent_rgb, axis=-1).sum())
        expected_absent = int((self.thumbs < thresholds).sum())
        assert absent == expected_absent, f"gallery holds {absent} absent pixels, expected {expected_absent}"


def timed(fn, n: int, check=None) -> list[float]:
    """Wall time (ms) of ``fn(i)`` for i < n; ``check(i)``, untimed, runs after each call."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(1e3 * (time.perf_counter() - t0))
        if check is not None:
            check(i)
    return out


def report(name: str, ms: list[float]) -> None:
    med = statistics.median(ms)
    p90 = sorted(ms)[max(0, int(0.9 * len(ms)) - 1)]
    flag = "OK" if med < TARGET_MS else "SLOW"
    print(
        f"{name:<44} median {med:7.1f} ms   p90 {p90:7.1f} ms   "
        f"(n={len(ms)}, target < {TARGET_MS:.0f} ms) {flag}"
    )


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = list(HEADLESS_CHROMIUM_ARGS)
# what the page shows: a rendered Bokeh root (anything on screen), the loading state's text, Figure models,
# and image data sources holding an image (main map, gallery, element maps)
_PAGE_JS = """() => {
  const out = {views: 0, figures: 0, images: 0, loading: false};
  if (!window.Bokeh || !Bokeh.documents.length) return out;
  out.views = Bokeh.index ? Object.keys(Bokeh.index).length : 0;
  for (const m of Bokeh.documents[0].all_models) {
    if (m.constructor && m.constructor.__name__ === 'Figure') out.figures++;
    const src = m.data;
    if (src && (src instanceof Map ? src.has('image') : 'image' in src)) out.images++;
    const text = typeof m.text === 'string' ? m.text : '';
    if (text.includes('xrfnb-starting')) out.loading = true;
  }
  return out;
}"""

#: run by the server process in place of the ``xrfnb`` script: the same command line (``xrfnb.ui.cli.main``),
#: with timestamps (seconds since the benchmark started the command) printed as ``TRACE <t> <what>`` on
#: stderr around the server's steps; the functions are wrapped where their callers look them up
_TRACED_SERVE = r"""
import os, sys, time, functools, threading
T0 = float(os.environ["XRFNB_BENCH_T0"])
def trace(what):
    print(f"TRACE {time.time() - T0:.3f} {what}", file=sys.stderr, flush=True)
trace("python started")
import xrfnb.ui.cli as cli
from xrfnb.ui import dashboard as dmod
from xrfnb.ui.dashboard import app, data, server, job, files
import bokeh.server.views.ws as ws
trace("dashboard modules imported")
_n = [0]
def wrap(owner, name, label, args_label=None):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def inner(*a, **k):
        what = label + (f" ({args_label(*a, **k)})" if args_label else "")
        trace(f"{what} begins [{threading.current_thread().name}]")
        try:
            return fn(*a, **k)
        finally:
            trace(f"{what} ends")
    setattr(owner, name, inner)
wrap(server, "make_app", "session: make_app")
import panel.io.server as pserver
wrap(pserver, "server_html_page_for_session", "session: the page's HTML (its document serialised)")
wrap(data, "read_with_progress", "worker: read the scan")
wrap(data, "map_with_progress", "worker: map pigments and elements")
wrap(data, "load_model_cached", "worker: load the model")
wrap(data.DataPanel, "finish_job", "session: show the job's result", lambda self, job: job.kind)
wrap(app.Dashboard, "set_scan", "session: set_scan")
wrap(app.Dashboard, "set_maps", "session: set_maps", lambda s, m, *a, **k: "none" if m is None else "maps")
if os.environ.get("XRFNB_BENCH_PROFILE"):  # profile the first session's showing of its maps
    import cProfile
    _finish = data.DataPanel.finish_job
    def finish_profiled(self, job):
        if job.kind != "map" or os.path.exists(os.environ["XRFNB_BENCH_PROFILE"]):
            return _finish(self, job)
        prof = cProfile.Profile()
        try:
            return prof.runcall(_finish, self, job)
        finally:
            prof.dump_stats(os.environ["XRFNB_BENCH_PROFILE"])
    data.DataPanel.finish_job = finish_profiled
_open = ws.WSHandler.open
def ws_open(self, *a, **k):
    trace("websocket: a page connects")
    return _open(self, *a, **k)
ws.WSHandler.open = ws_open
if hasattr(server, "warm_up"):
    wrap(server, "warm_up", "server: start the warm-up thread")
if hasattr(data, "demo_scan"):
    wrap(data, "demo_scan", "the demo scan (rendered once, then cached)")
else:
    wrap(data.DataPanel, "demo_scan", "the demo scan (rendered once, then cached)")
sys.exit(cli.main(sys.argv[1:]))
"""


#: the browser's navigation timings reported (PerformanceNavigationTiming)
_NAVIGATION = {
    "responseEnd": "browser: the page's HTML received",
    "domContentLoadedEventEnd": "browser: the page's scripts run (DOMContentLoaded)",
    "loadEventEnd": "browser: the page loaded (load event)",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> str:
    with contextlib.suppress(OSError):
        return "load average " + ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "load average unknown"


def cold_start(timeout_s: float = 180.0, trace: bool = True, open_after_s: float = 0.0) -> None:
    """Seconds from starting ``xrfnb serve`` (the demo) until it listens, until the first page shows
    anything (a rendered root), until it holds its Figure models, and until the demo's maps are drawn in it;
    with ``trace``, the server's steps on the same clock (the command line run by :data:`_TRACED_SERVE`).
    The first page is opened ``open_after_s`` seconds after the server listens (0: at once; a person
    typing the address takes a few seconds)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("cold start: skipped (playwright is not installed: pip install -e .[test])")
        return
    if not CHROMIUM.exists():
        print(f"cold start: skipped (no Chromium at {CHROMIUM}: make browser-deps)")
        return
    exe = Path(sys.executable).with_name("xrfnb")
    if trace:
        command = [sys.executable, "-c", _TRACED_SERVE]
    else:
        command = [str(exe)] if exe.exists() else [shutil.which("xrfnb") or "xrfnb"]
    port = _free_port()
    load_before = _load()
    events: list[tuple[float, str]] = []
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        env = {**os.environ, "XRFNB_BENCH_T0": repr(time.time())}
        proc = subprocess.Popen(
            [*command, "serve", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"xrfnb serve exited ({proc.returncode}):\n{log.read()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.perf_counter() - t0 > timeout_s:
                        raise SystemExit("xrfnb serve never listened") from None
                    time.sleep(0.05)
            t_listen = time.perf_counter() - t0
            time.sleep(open_after_s)
            seen: dict[str, float] = {}
            t_second = None
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1440, "height": 900})
                    seen["page opened"] = time.perf_counter() - t0
                    page.goto(f"http://127.0.0.1:{port}/", timeout=timeout_s * 1000, wait_until="commit")
                    while time.perf_counter() - t0 < timeout_s:
                        state = page.evaluate(_PAGE_JS)
                        now = time.perf_counter() - t0
                        if state["views"] > 0:
                            seen.setdefault("first visible content (a rendered root)", now)
                        if state["loading"]:
                            seen.setdefault("the loading state is shown", now)
                        if state["figures"] > 0:
                            seen.setdefault("first page holds its Figure models", now)
                        if state["images"] >= 2:  # the main map's and the gallery's
                            seen["demo's pigment maps drawn in the page"] = now
                            break
                        page.wait_for_timeout(50)
                    nav = page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
                    for key, what in _NAVIGATION.items():  # ms after the navigation started (goto)
                        if nav.get(key):
                            seen[what] = seen["page opened"] + nav[key] / 1e3
                    # a second session: the demo's scan and maps come from the server's cache
                    t1 = time.perf_counter()
                    second = browser.new_page(viewport={"width": 1440, "height": 900})
                    second.goto(f"http://127.0.0.1:{port}/", timeout=timeout_s * 1000, wait_until="commit")
                    while time.perf_counter() - t1 < timeout_s:
                        if second.evaluate(_PAGE_JS)["images"] >= 2:
                            t_second = time.perf_counter() - t1
                            break
                        second.wait_for_timeout(50)
                finally:
                    browser.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            for line in log:
                if line.startswith("TRACE "):
                    _, t, what = line.rstrip("\n").split(" ", 2)
                    events.append((float(t), what))

    def sec(t: float | None) -> str:
        return f"{t:6.1f} s" if t is not None else f"not within {timeout_s:.0f} s"

    print(f"cold start of `xrfnb serve` (the demo), from the command's start ({load_before} before):")
    browser_events = [(t_listen, "server listening"), *((t, what) for what, t in seen.items())]
    for t, what in sorted(browser_events + [(t, "  server: " + what) for t, what in events]):
        print(f"  {t:6.1f} s  {what}")
    if "demo's pigment maps drawn in the page" not in seen:
        print(f"  the demo's maps were not drawn within {timeout_s:.0f} s")
    print(f"a second page, from its opening to its maps    {sec(t_second)}")
    print(f"({_load()} after)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--channels", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--only", choices=("cold-start", "responsiveness"), help="run only the cold start or only the timings"
    )
    ap.add_argument(
        "--open-after", type=float, default=0.0, help="cold start: open the first page S s after it listens"
    )
    ap.add_argument(
        "--no-trace", action="store_true", help="cold start: the xrfnb script without the server's steps"
    )
    args = ap.parse_args()
    if args.only != "responsiveness":
        cold_start(trace=not args.no_trace, open_after_s=args.open_after)
    if args.only == "cold-start":
        return

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
        dash.map_panel.tap.event(x=c + 0.5, y=r + 0.5)

    def tapped(i: int) -> None:
        r, c = pixels[i]
        assert dash.pixel == (r, c)
        assert float(counts[r, c].sum()) in spectrum_sum(doc), (
            "spectrum in the document is not the tapped pixel's"
        )
        # the evidence: the stack fitted to this pixel's spectrum is drawn (its expected counts)
        sim = dash.simulated_spectrum()
        if sim is not None:
            shown = np.maximum(sim[1], 0.5) if dash.log_scale else sim[1]
            assert any(abs(x - float(shown.sum())) < 1e-6 * float(shown.sum()) for x in spectrum_sum(doc)), (
                "the fitted stack's spectrum in the document is not the tapped pixel's"
            )
            fits.append(sim[0])

    fits: list[str] = []
    report("tap -> spectrum, bars, info, fitted stack", timed(tap, args.repeats, tapped))
    print(f"  (a stack was fitted at {len(fits)} of {args.repeats} taps, e.g. {fits[0] if fits else '-'})")

    check = DocumentCheck(doc, maps)
    k = len(maps.classes)
    values = [0.3, 0.7]
    for view in ("Composite", "Pigment"):
        dash.view = view
        dash.focus = dash.classes[0]
        check(view, dash.threshold_array())

        target = [0.0]

        def one(i: int, target=target) -> None:
            # always a change (setting the value a slider already has would time a no-op)
            target[0] = values[1] if dash.thresholds[dash.classes[0]] != values[1] else values[0]
            dash.set_threshold(dash.classes[0], target[0])

        def one_done(i: int, view=view, target=target) -> None:
            thr = dash.threshold_array()
            assert thr[0] == target[0]
            check(view, thr)

        report(f"one pigment's threshold -> maps ({view})", timed(one, args.repeats, one_done))

        def every(i: int, target=target) -> None:
            target[0] = values[1] if dash.global_threshold != values[1] else values[0]
            dash.global_threshold = target[0]

        def every_done(i: int, view=view, target=target) -> None:
            thr = np.full(k, target[0])
            assert np.array_equal(dash.threshold_array(), thr)
            check(view, thr)

        report(f"global threshold -> {args.classes} maps ({view})", timed(every, args.repeats, every_done))


if __name__ == "__main__":
    main()
