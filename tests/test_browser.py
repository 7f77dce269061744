"""Real-browser test of the dashboard: headless Chromium (Debian package) driven by Playwright.

Starts the Panel server in a thread on a free loopback port with the synthetic scene of
``test_dashboard.py``, opens it, waits for the maps, clicks a pixel and checks that the spectrum plot
now holds that pixel's counts, moves the global threshold slider to 1 and checks that the browser's
main map and gallery then hold maps with no pigment present, saves a screenshot to ``test-output/`` and
checks that every request stayed on the local server (no CDN).

The README's own command is driven too: ``xrfnb serve`` (what ``make serve`` runs) in a subprocess,
with no argument (the demo) and with a folder of real measured files, each opened in turn. Both wait
for the app's own plots (Figure models), and fail on internal-error, traceback or repr text anywhere in
the live document, and on a traceback in the server's log.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from _net import free_port, wait_until_listening
from test_dashboard import CLASSES, COLS, ROWS, make_scene

from xrfnb.ui.report import HEADLESS_CHROMIUM_ARGS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = list(HEADLESS_CHROMIUM_ARGS)
OUTPUT = Path(__file__).resolve().parents[1] / "test-output"

pytestmark = pytest.mark.browser

# JavaScript helpers evaluated in the page -------------------------------------------------------------
_MAIN_FRAME_JS = """() => {
  if (!window.Bokeh || !Bokeh.index || !Bokeh.index.all_views) return null;
  for (const v of Bokeh.index.all_views()) {
    if (v.model && v.model.name === 'xrfnb-main' && v.frame) {
      const f = v.frame.bbox, r = v.el.getBoundingClientRect();
      if (f.width > 0) return {left: r.left + f.x0, top: r.top + f.y0, width: f.width, height: f.height};
    }
  }
  return null;
}"""

# the screen box of the frame (the data area) of the figure named NAME, or null
_FRAME_OF_JS = """(name) => {
  if (!window.Bokeh || !Bokeh.index || !Bokeh.index.all_views) return null;
  for (const v of Bokeh.index.all_views()) {
    if (v.model && v.model.name === name && v.frame) {
      const f = v.frame.bbox, r = v.el.getBoundingClientRect();
      return {left: r.left + f.x0, top: r.top + f.y0, width: f.width, height: f.height};
    }
  }
  return null;
}"""

# the sums of the kept regions' mean spectra in the page, one per curve
_REGION_SUMS_JS = """() => {
  const out = [];
  if (!window.Bokeh || !Bokeh.documents.length) return out;
  for (const m of Bokeh.documents[0].all_models) {
    if (!m.data || typeof m.data !== 'object') continue;  // a FileDownload's data is a string
    const d = m.data instanceof Map ? Object.fromEntries(m.data) : m.data;
    if ('Mean counts per pixel' in d) {
      let s = 0; for (const x of d['Mean counts per pixel']) s += x; out.push(s);
    }
  }
  return out;
}"""

# the x range (start, end) of the figure named NAME, or null
_X_RANGE_JS = """(name) => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name === name && m.x_range) return [m.x_range.start, m.x_range.end];
  }
  return null;
}"""

_SOURCES_JS = """() => {
  const out = {counts: [], images: 0, image_sum: 0, image_finite: 0};
  const doc = Bokeh.documents[0];
  for (const m of doc.all_models) {
    if (!m.data || typeof m.data !== 'object') continue;  // a FileDownload's data is a string
    const d = m.data instanceof Map ? Object.fromEntries(m.data) : m.data;
    if ('Counts' in d) {
      let s = 0; for (const x of d['Counts']) s += x; out.counts.push(s);
    }
    if ('image' in d) {
      for (const img of d['image']) {
        out.images += 1;
        const a = img.array || img;
        for (let i = 0; i < a.length; i++) {
          const x = a[i];
          if (Number.isFinite(x)) { out.image_sum += x; out.image_finite += 1; }
        }
      }
    }
  }
  return out;
}"""

# how many pixels of the image glyph of the plot named NAME hold each of VALUES (uint32 RGBA numbers)
_PIXEL_COUNTS_JS = """([name, values]) => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name !== name || !m.renderers) continue;
    for (const r of m.renderers) {
      const src = r.data_source;
      if (!src || !src.data) continue;
      const d = src.data instanceof Map ? Object.fromEntries(src.data) : src.data;
      if (!('image' in d)) continue;
      const a = d['image'][0].array || d['image'][0];
      const counts = values.map(() => 0);
      for (let i = 0; i < a.length; i++) {
        const j = values.indexOf(a[i]);
        if (j >= 0) counts[j] += 1;
      }
      return counts;
    }
  }
  return null;
}"""


# the selected-pixel marker's data on the main map ({x, y} in mm), or null
_MARKER_JS = """() => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name === 'xrfnb-pixel-marker' && m.data_source) {
      const src = m.data_source.data;
      const d = src instanceof Map ? Object.fromEntries(src) : src;
      return {x: Array.from(d.x), y: Array.from(d.y)};
    }
  }
  return null;
}"""

# the newest notification (toast): its message's computed font family and size, and its text; or null
_TOAST_JS = """() => {
  const toasts = document.querySelectorAll('.notyf__toast');
  if (!toasts.length) return null;
  const t = toasts[toasts.length - 1];
  const msg = t.querySelector('.notyf__message') || t;
  const s = getComputedStyle(msg);
  return {font: s.fontFamily, size_px: parseFloat(s.fontSize), text: msg.innerText.trim()};
}"""

# the y scale type of the spectrum figure in the page
_Y_SCALE_JS = """() => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  const names = [];
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name === 'xrfnb-spectrum' && m.y_scale) names.push(m.y_scale.constructor.__name__);
  }
  return names.length ? names[names.length - 1] : null;
}"""


def _rgba_number(rgb: tuple[int, int, int]) -> int:
    """An opaque colour as the uint32 a browser reads from an ImageRGBA buffer (little endian)."""
    return int(np.array([[*rgb, 255]], dtype=np.uint8).view("<u4")[0, 0])


@pytest.fixture(scope="module")
def server():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from xrfnb.ui.dashboard import Dashboard, serve_app

    scan, maps, _ = make_scene()
    sessions: list[Dashboard] = []

    def app() -> Dashboard:
        dash = Dashboard(scan=scan, maps=maps)
        sessions.append(dash)
        return dash

    port = free_port()
    thread = serve_app(app, port=port, address="127.0.0.1", threaded=True)
    url = f"http://127.0.0.1:{port}/"
    wait_until_listening(port)  # a bare connect: a GET would open a session
    yield url, sessions, scan, maps
    thread.stop()


def test_dashboard_in_headless_chromium(server):
    from playwright.sync_api import sync_playwright

    url, sessions, scan, maps = server
    counts = np.asarray(scan.counts, dtype=float)
    requests: list[str] = []
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1250})
            page.on("request", lambda req: requests.append(req.url))
            page.goto(url)
            page.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].roots().length > 0",
                timeout=40000,
            )
            # maps: the main map and the gallery mosaic are drawn
            page.wait_for_function(_MAIN_FRAME_JS, timeout=20000)
            page.wait_for_function(f"() => ({_SOURCES_JS})().images >= 2", timeout=20000)
            before = page.evaluate(_SOURCES_JS)
            r0, c0 = sessions[-1].pixel
            assert float(counts[r0, c0].sum()) in before["counts"]

            # click a pixel: its spectrum replaces the previous one
            r, c = 5, 8
            assert counts[r, c].sum() != counts[r0, c0].sum()
            frame = page.evaluate(_MAIN_FRAME_JS)
            page.mouse.click(
                frame["left"] + (c + 0.5) * frame["width"] / COLS,
                frame["top"] + (r + 0.5) * frame["height"] / ROWS,
            )
            expected = float(counts[r, c].sum())
            page.wait_for_function(
                f"() => ({_SOURCES_JS})().counts.some(s => Math.abs(s - {expected}) < 0.5)", timeout=15000
            )
            page.get_by_text(f"pixel (row {r}, col {c})").first.wait_for(timeout=10000)
            assert sessions[-1].pixel == (r, c)
            # the tapped pixel is marked on the map: the marker's centre is that pixel's (0.1 mm pixels)
            page.wait_for_function(
                f"() => {{ const m = ({_MARKER_JS})(); return m && m.x.length === 1 && "
                f"Math.abs(m.x[0] - {(c + 0.5) * 0.1}) < 1e-9 && "
                f"Math.abs(m.y[0] - {(r + 0.5) * 0.1}) < 1e-9; }}",
                timeout=15000,
            )
            # a box selection kept as a region: its mean spectrum is overlaid, and exported as CSV
            page.locator(".xrfnb-main-map [title='Box Select']").first.click()
            frame = page.evaluate(_MAIN_FRAME_JS)

            def at(col: float, row: float) -> tuple[float, float]:
                x = frame["left"] + col * frame["width"] / COLS
                return x, frame["top"] + row * frame["height"] / ROWS

            page.mouse.move(*at(3.1, 2.1))
            page.mouse.down()
            page.mouse.move(*at(9.9, 6.9), steps=8)
            page.mouse.up()
            page.get_by_text("Selected: region of 35 pixels").first.wait_for(timeout=15000)
            page.locator(".xrfnb-keep-region button").first.click()
            mean_sum = float(counts[2:7, 3:10].reshape(-1, counts.shape[-1]).mean(axis=0).sum())
            page.wait_for_function(
                f"() => ({_REGION_SUMS_JS})().some(s => Math.abs(s - {mean_sum}) < 1e-6 * {mean_sum})",
                timeout=15000,
            )
            drawn = f"(f => f && f.width > 100)(({_FRAME_OF_JS})('xrfnb-region-spectra'))"
            page.wait_for_function(f"() => {drawn}", timeout=15000)
            page.get_by_text("Region 1: 35 pixels, rows 2-6, columns 3-9").first.wait_for(timeout=10000)
            with page.expect_download(timeout=30000) as download:
                page.locator(".xrfnb-regions-csv").get_by_text("Regions as CSV").click()
            exported = Path(download.value.path()).read_text(encoding="utf-8").splitlines()
            assert "# Region 1: 35 pixels, rows 2-6, columns 3-9" in exported[3]
            assert exported[4] == "energy_keV,Region 1 mean (35 px)"
            page.locator(".xrfnb-main-map [title='Tap']").first.click()  # back to picking pixels

            # the element maps side by side: each drawn (a frame of its size, not an empty box)
            page.locator(".xrfnb-element-maps").first.scroll_into_view_if_needed()
            for label in ("S K", "Fe K", "Hg L", "Pb L"):
                drawn = f"(f => f && f.width > 100)(({_FRAME_OF_JS})('xrfnb-element:{label}'))"
                page.wait_for_function(f"() => {drawn}", timeout=20000)
            # a click on an element map selects that pixel: its spectrum replaces the previous one
            r, c = 20, 3
            frame = page.evaluate(f"() => ({_FRAME_OF_JS})('xrfnb-element:Fe K')")
            page.mouse.click(
                frame["left"] + (c + 0.5) * frame["width"] / COLS,
                frame["top"] + (r + 0.5) * frame["height"] / ROWS,
            )
            expected = float(counts[r, c].sum())
            _wait_for_counts(page, expected, timeout_ms=15000)
            assert sessions[-1].pixel == (r, c)
            # dragging an element map pans every map: the main map's x range moves with it, in the browser
            start = page.evaluate(f"() => ({_X_RANGE_JS})('xrfnb-main')")
            x0, y0 = frame["left"] + frame["width"] / 2, frame["top"] + frame["height"] / 2
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + frame["width"] / 4, y0, steps=8)
            page.mouse.up()
            page.wait_for_function(
                f"() => ({_X_RANGE_JS})('xrfnb-main')[0] < {start[0]} - 0.3", timeout=10000
            )
            moved = page.evaluate(f"() => ({_X_RANGE_JS})('xrfnb-main')")
            assert page.evaluate(f"() => ({_X_RANGE_JS})('xrfnb-element:Pb L')") == moved
            assert moved[1] - moved[0] == pytest.approx(start[1] - start[0])  # a pan: the same width
            page.evaluate("() => window.scrollTo(0, 0)")

            # the log toggle switches the spectrum's y axis to a log scale and back
            assert page.evaluate(_Y_SCALE_JS) == "LinearScale"
            log_box = page.locator(".xrfnb-log input[type=checkbox]")
            log_box.check()
            page.wait_for_function(f"() => ({_Y_SCALE_JS})() === 'LogScale'", timeout=20000)
            _wait_for_counts(page, expected)  # the same pixel's spectrum, on the log axis
            log_box.uncheck()
            page.wait_for_function(f"() => ({_Y_SCALE_JS})() === 'LinearScale'", timeout=20000)

            # move the global threshold slider to its maximum: every map changes
            handle = page.locator(".xrfnb-global-threshold .noUi-handle").first
            handle.click()
            handle.press("End")
            # the browser holds the new maps: no pigment anywhere, so the composite is black at every
            # valid pixel (grey at the invalid one) and every gallery tile is "absent" grey there
            n_valid = int((~maps.mask).sum())
            black, grey, absent = (_rgba_number(c) for c in ((0, 0, 0), (128, 128, 128), (0xE6,) * 3))
            page.wait_for_function(
                f"() => JSON.stringify(({_PIXEL_COUNTS_JS})(['xrfnb-main', [{black}, {grey}]]))"
                f" === '[{n_valid},{ROWS * COLS - n_valid}]'",
                timeout=15000,
            )
            assert sessions[-1].thresholds == dict.fromkeys(CLASSES, 1.0)
            assert not sessions[-1].binary_maps().any()
            page.wait_for_function(
                f"() => JSON.stringify(({_PIXEL_COUNTS_JS})(['xrfnb-gallery', [{absent}]]))"
                f" === '[{len(CLASSES) * n_valid}]'",
                timeout=15000,
            )
            page.get_by_text("none above threshold").first.wait_for(timeout=15000)
            # a notification (the calibration card's fit with no peaks: an error) is a small sans-serif
            # toast of one short line, not the browser's default serif text (issue #14, "toasts")
            page.evaluate("() => window.scrollTo(0, 0)")
            card = page.locator(".xrfnb-calibration")
            card.get_by_text("Energy calibration").first.click()
            card.get_by_text("Fit calibration").first.click()
            page.wait_for_function(f"() => ({_TOAST_JS})() !== null", timeout=15000)
            toast = page.evaluate(_TOAST_JS)
            first_face = toast["font"].split(",")[0].strip().strip("'\"").lower()
            assert first_face not in ("serif", "times", "times new roman", "georgia"), toast
            assert "sans-serif" in toast["font"].lower(), toast
            assert toast["size_px"] <= 16, toast
            assert toast["text"].startswith("no peaks given") and "\n" not in toast["text"], toast
            assert len(toast["text"]) < 200 and ".spx" not in toast["text"], toast
            assert sessions[-1].last_message[1].startswith(toast["text"])
            # "Report (HTML)" downloads the report with the session's thresholds (all moved to 1)
            with page.expect_download(timeout=30000) as download:
                page.locator(".xrfnb-report").get_by_text("Report (HTML)").click()
            report = Path(download.value.path()).read_text(encoding="utf-8")
            assert download.value.suggested_filename == "pigment_report.html"
            assert "3 changed from the model" in report and "<script" not in report.lower()
            page.wait_for_timeout(1500)  # let the gallery and sliders repaint before the screenshot
            page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme not in ("data", "blob")}
    assert hosts == {"127.0.0.1"}, f"requests left the local server: {sorted(hosts)}"


# -- the README's own command: `xrfnb serve` in a subprocess, as `make serve` runs it ---------------------
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

# how many Figure models the live document holds (the app's own plots, not just any root)
_FIGURES_JS = """() => {
  if (!window.Bokeh || !Bokeh.documents.length) return 0;
  let n = 0;
  for (const m of Bokeh.documents[0].all_models) {
    if (m.constructor && m.constructor.__name__ === 'Figure') n++;
  }
  return n;
}"""

# every figure title with its measured width and the figure's width; the gallery's tile labels with theirs
# and the tile pitch; the class-probability bars' class labels and row height (all in screen pixels; widths
# measured with the canvas font Bokeh draws them in)
_TEXT_FIT_JS = """() => {
  if (!window.Bokeh || !Bokeh.index || !Bokeh.index.all_views) return null;
  const ctx = document.createElement('canvas').getContext('2d');
  const val = (p) => (p && typeof p === 'object' && 'value' in p) ? p.value : p;
  const px = (s) => {
    const m = /^([0-9.]+)(px|pt)$/.exec(String(val(s)));
    return m ? parseFloat(m[1]) * (m[2] === 'pt' ? 4 / 3 : 1) : null;
  };
  const font = (m, p) =>
    `${val(m[p + '_style']) || 'normal'} ${val(m[p + '_size'])} ${val(m[p]) || 'helvetica'}`;
  const widest = (text) => Math.max(...String(text).split('\\n').map(l => ctx.measureText(l).width));
  const out = {titles: [], labels: [], pitch: null, label_px: null, bars: []};
  for (const v of Bokeh.index.all_views()) {
    const m = v.model;
    if (!m || !v.frame || !m.title) continue;
    const box = v.el.getBoundingClientRect();
    const t = m.title;
    if (t.text) {
      ctx.font = font(t, 'text_font');
      out.titles.push({name: m.name, text: t.text, width: widest(t.text), figure: box.width});
    }
    if (m.name === 'xrfnb-gallery') {
      const scale = v.frame.bbox.width / (m.x_range.end - m.x_range.start);
      for (const r of m.renderers) {
        const g = r.glyph;
        if (!g || g.constructor.__name__ !== 'Text') continue;
        const src = r.data_source.data;
        const d = src instanceof Map ? Object.fromEntries(src) : src;
        const key = (g.text && g.text.field) || 'text';
        const xs = Array.from(d[g.x && g.x.field ? g.x.field : 'x']);
        ctx.font = font(g, 'text_font');
        out.label_px = px(g.text_font_size);
        Array.from(d[key]).forEach((text, i) => out.labels.push({text, width: widest(text), x: xs[i]}));
        const u = [...new Set(xs)].sort((a, b) => a - b);
        let pitch = Infinity;
        for (let i = 1; i < u.length; i++) pitch = Math.min(pitch, u[i] - u[i - 1]);
        out.pitch = pitch * scale;
      }
    }
    const factors = m.y_range && m.y_range.factors;
    if (factors && factors.length > 1) {
      const axis = m.left && m.left[0];
      out.bars.push({
        factors: Array.from(factors),
        row: v.frame.bbox.height / factors.length,
        label_px: axis ? px(axis.major_label_text_font_size) : null,
      });
    }
  }
  return out;
}"""

# every string held by the live document's models (texts, titles, options, notifications)
_TEXTS_JS = """() => {
  const out = [];
  const walk = (v, d) => {
    if (d > 3 || v == null) return;
    if (typeof v === 'string') { out.push(v); return; }
    if (Array.isArray(v)) { for (const x of v.slice(0, 500)) walk(x, d + 1); return; }
    if (typeof v === 'object' && v.constructor === Object) for (const x of Object.values(v)) walk(x, d + 1);
  };
  if (!window.Bokeh || !Bokeh.documents.length) return out;
  for (const m of Bokeh.documents[0].all_models) {
    for (const v of Object.values(m.attributes || {})) {
      if (typeof v !== 'object' || v === null || Array.isArray(v) || v.constructor === Object) walk(v, 0);
    }
  }
  return out;
}"""

# text that must never reach a user: internal errors, tracebacks, Python reprs
_BAD_TEXT = re.compile(
    r"internal error|Traceback \(most recent|functools\.partial|(<|&lt;)(function|bound method) "
    r"| at 0x[0-9a-f]{6,}|EnergyCalibration\(|Error\(['\"]"
)


def _xrfnb_command() -> str:
    """The ``xrfnb`` script installed beside this Python (what ``make serve`` runs from the venv)."""
    script = Path(sys.executable).with_name("xrfnb")
    if script.exists():
        return str(script)
    found = shutil.which("xrfnb")
    assert found, "the xrfnb command is not installed: run `make install`"
    return found


@contextlib.contextmanager
def _xrfnb_serve(args: list[str], log_path: Path):
    """Run ``xrfnb serve ARGS --port P`` as the README says; yield its URL; stop it afterwards."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [_xrfnb_command(), "serve", *args, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        def alive() -> None:
            assert proc.poll() is None, f"xrfnb serve exited ({proc.returncode}): {log_path.read_text()}"

        wait_until_listening(port, 60, poll_s=0.3, alive=alive,
                             why=lambda: f"(xrfnb serve never listened): {log_path.read_text()}")
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _assert_clean_page(page, log_path: Path) -> None:
    bad = sorted({t[:200] for t in page.evaluate(_TEXTS_JS) if _BAD_TEXT.search(t)})
    assert not bad, f"the page shows internal text: {bad}"
    log = log_path.read_text()
    assert "Traceback" not in log, f"the server logged a traceback:\n{log}"


def _wait_for_figures(page, n: int, timeout_s: float = 90) -> None:
    """Wait until the page holds ``n`` Figure models; fail at once when it shows internal text instead."""
    deadline = time.monotonic() + timeout_s
    while page.evaluate(_FIGURES_JS) < n:
        bad = sorted({t[:200] for t in page.evaluate(_TEXTS_JS) if _BAD_TEXT.search(t)})
        assert not bad, f"the page shows internal text instead of the dashboard: {bad}"
        assert time.monotonic() < deadline, f"the dashboard's {n} plots never appeared"
        page.wait_for_timeout(500)


def _wait_for_counts(page, expected: float, timeout_ms: int = 60000) -> None:
    """Wait until a spectrum data source in the page holds ``expected`` counts in all."""
    page.wait_for_function(
        f"() => ({_SOURCES_JS})().counts.some(s => Math.abs(s - {expected}) <= 0.5 + 1e-6 * {expected})",
        timeout=timeout_ms,
    )


def _launch(p):
    return p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


def test_xrfnb_serve_demo_in_chromium(tmp_path):
    """``xrfnb serve`` with no argument (``make serve``): the demo scan and its pigment maps are drawn."""
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from playwright.sync_api import sync_playwright

    log_path = tmp_path / "serve.log"
    requests: list[str] = []
    with _xrfnb_serve([], log_path) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("request", lambda req: requests.append(req.url))
            page.goto(url)
            # the app's own plots: main map, spectrum, residual, probabilities, gallery
            _wait_for_figures(page, 4)
            page.wait_for_function(_MAIN_FRAME_JS, timeout=60000)
            page.wait_for_function(f"() => ({_SOURCES_JS})().images >= 2", timeout=60000)
            page.wait_for_function(f"() => ({_SOURCES_JS})().counts.some(s => s > 0)", timeout=60000)
            page.get_by_text("Showing demo: hidden-painting").first.wait_for(timeout=20000)
            _assert_clean_page(page, log_path)
            # the RGB overlay starts on three different elements (it once showed Zn K in all three)
            rgb = [page.locator(f".xrfnb-rgb-{c} select").first for c in ("red", "green", "blue")]
            rgb[0].wait_for(state="attached", timeout=30000)
            # the element maps (and with them the overlay's choices) follow the pigment maps in a page
            # update of their own: wait for them, up to a minute
            for _ in range(120):
                values = [s.input_value() for s in rgb]
                if all(values):
                    break
                page.wait_for_timeout(500)
            assert len(set(values)) == 3 and all(values), f"RGB overlay channels: {values}"
            # a 1440 x 900 laptop screen: the exports are on the first screen, the 31 per-class sliders
            # wait in a collapsed card, and the composite map has its legend of class colours
            for label in ("Map as PNG", "Maps as TIFF", "Maps as HDF5", "Spectrum as CSV"):
                box = page.get_by_text(label, exact=True).first.bounding_box()
                assert box and box["y"] + box["height"] <= 900, f"{label!r} is below the first screen"
            page.get_by_text("Per-pigment thresholds").first.wait_for(timeout=5000)
            assert page.locator(".noUi-handle >> visible=true").count() == 1  # only the global slider
            legend = page.locator(".xrfnb-legend").first
            legend.get_by_text("no pigment above its threshold").wait_for(timeout=20000)
            # the selected pixel's call, as the physics check of the mapping sees it, beside its spectrum
            physics = page.locator(".xrfnb-physics-pixel").first
            physics.get_by_text("Checked by physics: pixel").wait_for(timeout=20000)
            page.wait_for_timeout(2000)
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "dashboard-demo.png"))  # the README's screenshot
            _assert_titles_and_class_labels_fit(page)
            _assert_composite_hover_names_the_calls(page)
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme not in ("data", "blob")}
    assert hosts == {"127.0.0.1"}, f"requests left the local server: {sorted(hosts)}"


def _assert_titles_and_class_labels_fit(page) -> None:
    """On a 1440 x 900 screen: no figure title is wider than its figure (once "red och", "per cha"); the
    gallery's tile labels hold the full class names, each line narrower than a tile, in a legible size;
    the probability bars name every class in full with a row per class at least as tall as its label."""
    import xrfnb

    classes = list(xrfnb.load_model("default").classes)  # the demo's model: the names to find in full
    fit = page.evaluate(_TEXT_FIT_JS)
    assert fit and fit["titles"], "no figure titles in the page"
    for t in fit["titles"]:
        assert t["width"] <= t["figure"], (
            f"title {t['text']!r} ({t['width']:.0f} px) is cut at {t['figure']:.0f} px"
        )
    names = [re.sub(r" \(\d+%\)$", "", " ".join(lab["text"].split())) for lab in fit["labels"]]
    assert names == classes, f"gallery labels {names} are not the class names {classes}"
    for lab in fit["labels"]:
        assert lab["width"] <= fit["pitch"], (
            f"label {lab['text']!r} is wider than a tile ({fit['pitch']:.0f} px)"
        )
    assert fit["label_px"] >= 10.0, f"gallery labels at {fit['label_px']} px are too small to read"
    (bars,) = [b for b in fit["bars"] if len(b["factors"]) == len(classes)]
    assert sorted(bars["factors"]) == sorted(classes)
    assert bars["label_px"] >= 10.0 and bars["row"] >= bars["label_px"], bars


def _assert_composite_hover_names_the_calls(page) -> None:
    """Hovering the composite map shows the pigments at that pixel, never a packed RGBA number."""
    frame = page.evaluate(_MAIN_FRAME_JS)
    assert frame, "the main map is not drawn"
    x, y = frame["left"] + frame["width"] * 0.3, frame["top"] + frame["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.move(x + 3, y + 3)
    tip = page.locator(".bk-tooltip-content >> visible=true").first
    tip.wait_for(timeout=10000)
    text = tip.inner_text()
    assert "pigments" in text and "most probable" in text, text
    assert "RGBA" not in text and not re.search(r"\d{7,}", text), f"the hover shows a raw number: {text!r}"
    page.mouse.move(0, 0)


REAL_FILES = ("bruker_m6_jetstream_p059.spx", "xrf_spectra.mca", "Steel.spe")


def test_xrfnb_serve_folder_of_real_files_in_chromium(tmp_path):
    """``xrfnb serve DIR`` on real measured files: each opens and its spectrum reaches the browser."""
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    if not REAL.is_dir():
        pytest.skip(f"real reference spectra not found at {REAL} (../shared/data/real beside the checkout)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from playwright.sync_api import sync_playwright

    import xrfnb

    data = tmp_path / "data"
    data.mkdir()
    totals = {}
    for name in REAL_FILES:
        shutil.copy2(REAL / name, data / name)
        totals[name] = float(np.asarray(xrfnb.load(REAL / name).counts, dtype=float).sum())
    for name in ("PROVENANCE.md", "Steel.cfg"):
        shutil.copy2(REAL / name, data / name)
    before = {name: (data / name).read_bytes() for name in REAL_FILES}
    log_path = tmp_path / "serve.log"
    with _xrfnb_serve([str(data)], log_path) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url)
            _wait_for_figures(page, 2)
            scan_select = page.locator("select").first
            scan_select.wait_for(timeout=30000)
            for name in REAL_FILES:
                scan_select.select_option(label=name)
                _wait_for_counts(page, totals[name])
                if name == "xrf_spectra.mca":
                    # far from the training data (OOD score ~9 against a threshold ~1.4): a visible banner
                    banner = page.locator(".xrfnb-ood")
                    banner.get_by_text("selected pixel is out of distribution").wait_for(timeout=90000)
                    banner.get_by_text("not reliable").first.wait_for(timeout=5000)  # in its shadow DOM
                    assert banner.first.is_visible()
                page.wait_for_timeout(500)
                _assert_clean_page(page, log_path)
            # notes and configuration files beside the data are not offered as scans
            labels = scan_select.locator("option").all_inner_texts()
            assert "PROVENANCE.md" not in labels and "Steel.cfg" not in labels
        finally:
            browser.close()
    assert {name: (data / name).read_bytes() for name in REAL_FILES} == before, "an input file changed"


# the y range (start, end) of the plot named NAME, and the y positions of its text glyphs (line labels)
_Y_RANGE_JS = """(name) => {
  if (!window.Bokeh || !Bokeh.documents.length) return null;
  const data = (s) => s.data instanceof Map ? Object.fromEntries(s.data) : s.data;
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name !== name || !m.y_range) continue;
    const labels = [];
    for (const r of m.renderers || []) {
      if (!r.glyph || r.glyph.constructor.__name__ !== 'Text') continue;
      const d = data(r.data_source);
      for (const k of Object.keys(d)) {
        if (k !== 'line' && k !== 'Energy (keV)' && d[k].length) labels.push(...d[k]);
      }
    }
    return {start: m.y_range.start, end: m.y_range.end, labels: labels.filter(Number.isFinite)};
  }
  return null;
}"""

# the on-screen box of the gallery's plot frame
_GALLERY_FRAME_JS = _MAIN_FRAME_JS.replace("xrfnb-main", "xrfnb-gallery")


def test_spectrum_range_follows_the_pixel_and_a_gallery_click_enlarges(tmp_path):
    """A scene whose bottom half is eight times brighter: the spectrum's y range follows the clicked
    pixel both ways (never clipped, never stuck at the first pixel's) with room for the line labels;
    clicking a gallery tile in the browser shows that pigment enlarged in the main map."""
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from playwright.sync_api import sync_playwright

    import xrfnb
    from xrfnb.ui.dashboard import Dashboard, serve_app

    scan, maps, _ = make_scene()
    counts = np.asarray(scan.counts).astype(np.uint32)
    counts[ROWS // 2 :] *= 8
    scan = xrfnb.Scan(counts, scan.calibration, pixel_size_um=scan.pixel_size_um)
    sessions: list[Dashboard] = []

    def app() -> Dashboard:
        sessions.append(Dashboard(scan=scan, maps=maps))
        return sessions[-1]

    port = free_port()
    thread = serve_app(app, port=port, address="127.0.0.1", threaded=True)
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1250})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_function(_MAIN_FRAME_JS, timeout=60000)
                r0, c0 = sessions[-1].pixel
                assert r0 >= ROWS // 2  # the first pixel is a bright one
                _wait_for_counts(page, float(counts[r0, c0].sum()))
                for r, c in ((5, 5), (28, 28), (12, 16)):  # dim, bright, dim; each with pigments
                    frame = page.evaluate(_MAIN_FRAME_JS)
                    page.mouse.click(
                        frame["left"] + (c + 0.5) * frame["width"] / COLS,
                        frame["top"] + (r + 0.5) * frame["height"] / ROWS,
                    )
                    _wait_for_counts(page, float(counts[r, c].sum()))
                    peak = float(counts[r, c].max())
                    page.wait_for_function(
                        f"() => {{ const y = ({_Y_RANGE_JS})('xrfnb-spectrum');"
                        f" return y && y.end >= 1.06 * {peak} && y.end <= 2 * {peak}; }}",
                        timeout=15000,
                    )
                    y = page.evaluate(_Y_RANGE_JS, "xrfnb-spectrum")
                    assert y["labels"] and max(y["labels"]) < y["end"], y  # every line label inside
                    assert y["start"] <= 0.0
                # a click on the second gallery tile (vermilion) enlarges it
                page.locator(".xrfnb-gallery").first.scroll_into_view_if_needed()
                page.wait_for_function(_GALLERY_FRAME_JS, timeout=20000)
                g = page.evaluate(_GALLERY_FRAME_JS)
                cell_h, cell_w, band, _ = sessions[-1].gallery_data()["cell"]
                h, w = sessions[-1].gallery_data()["rgb"].shape[:2]
                page.mouse.click(
                    g["left"] + (cell_w + cell_w / 2) * g["width"] / w,
                    g["top"] + (band + (cell_h - band) / 2) * g["height"] / h,
                )
                for _ in range(60):
                    if sessions[-1].view == "Pigment":
                        break
                    page.wait_for_timeout(250)
                assert sessions[-1].view == "Pigment" and sessions[-1].focus == "vermilion"
                # and the browser's main map is that pigment's map now (a colour-mapped image)
                page.wait_for_function(
                    "() => [...Bokeh.documents[0].all_models].some(m => m.name === 'xrfnb-main' && m.title"
                    " && m.title.text.startsWith('vermilion'))",
                    timeout=15000,
                )
                # its legend says what the light grey is; the surface-vs-buried view names its categories
                legend = page.locator(".xrfnb-legend").first
                legend.get_by_text("vermilion below its threshold 0.50").wait_for(timeout=15000)
                page.get_by_text("Surface vs buried", exact=True).first.click()
                legend.get_by_text("vermilion at the surface").wait_for(timeout=15000)
                legend.get_by_text("vermilion buried only").first.wait_for(timeout=15000)
            finally:
                browser.close()
    finally:
        thread.stop()


# the on-screen box of the spectrum's plot frame and its x range (keV)
_SPECTRUM_FRAME_JS = """() => {
  if (!window.Bokeh || !Bokeh.index || !Bokeh.index.all_views) return null;
  for (const v of Bokeh.index.all_views()) {
    if (v.model && v.model.name === 'xrfnb-spectrum' && v.frame) {
      const f = v.frame.bbox, r = v.el.getBoundingClientRect();
      if (f.width > 0) return {left: r.left + f.x0, top: r.top + f.y0, width: f.width, height: f.height,
                               x0: v.model.x_range.start, x1: v.model.x_range.end};
    }
  }
  return null;
}"""


def test_an_uncalibrated_file_is_calibrated_in_the_browser(tmp_path):
    """Steel.spe without its Steel.cfg opens at 1 keV per channel: the page says so and opens the
    calibration card; a line chosen and its peak clicked on the spectrum fill the peak list; fitting shows
    the relation, applying gives pigment calls."""
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    if not (REAL / "Steel.spe").exists():
        pytest.skip(f"Steel.spe not found in {REAL}")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from playwright.sync_api import sync_playwright

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy2(REAL / "Steel.spe", data / "Steel.spe")
    log_path = tmp_path / "serve.log"
    with _xrfnb_serve([str(data)], log_path) as url, sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url)
            _wait_for_figures(page, 2)
            page.locator("select").first.select_option(label="Steel.spe")
            page.get_by_text("has no energy calibration").first.wait_for(timeout=60000)
            card = page.locator(".xrfnb-calibration")
            card.get_by_text("Fit calibration").wait_for(timeout=10000)  # the card opened itself
            card.locator("select").select_option(label="Fe Ka")
            page.wait_for_function(_SPECTRUM_FRAME_JS, timeout=30000)
            frame = page.evaluate(_SPECTRUM_FRAME_JS)
            # the axis is the channel number (1 keV per channel): click the Fe Ka peak at channel 537
            x = frame["left"] + (537 - frame["x0"]) / (frame["x1"] - frame["x0"]) * frame["width"]
            page.mouse.click(x, frame["top"] + 0.8 * frame["height"])
            peaks = card.locator("textarea")
            page.wait_for_function(
                "(el) => el.value.startsWith('Fe Ka=')", arg=peaks.element_handle(), timeout=15000
            )
            picked = float(peaks.input_value().split("=")[1])
            assert abs(picked - 537) < 15, picked  # within the centroid search window
            peaks.fill(f"Fe Ka={picked:g}, Ni Ka=627, Cr Ka=454")
            peaks.press("Tab")  # commit the text area's value
            card.get_by_text("Fit calibration").click()
            card.get_by_text("11.93 eV x channel").wait_for(timeout=30000)
            card.get_by_text("residual (eV)").wait_for(timeout=5000)
            card.get_by_text("Apply to the scan").click()
            page.get_by_text("Showing Steel.spe").first.wait_for(timeout=90000)
            # the calls panel redrawn for the calibrated spectrum: a steel holds iron (its layer, on a metal
            # that has none, is not asserted)
            page.locator(".xrfnb-calls").get_by_text("iron pigments").first.wait_for(timeout=30000)
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "calibrated.png"))
            _assert_clean_page(page, log_path)
        finally:
            browser.close()
