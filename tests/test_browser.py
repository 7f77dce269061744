"""Real-browser test of the dashboard: headless Chromium (Debian package) driven by Playwright.

Starts the Panel server in a thread on a free loopback port with the synthetic scene of
``test_dashboard.py``, opens it, waits for the maps, clicks a pixel and checks that the spectrum plot
now holds that pixel's counts, moves the global threshold slider to 1 and checks that the browser's
main map and gallery then hold maps with no pigment present, saves a screenshot to ``test-output/`` and
checks that every request stayed on the local server (no CDN).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from test_dashboard import CLASSES, COLS, ROWS, make_scene

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
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

_SOURCES_JS = """() => {
  const out = {counts: [], images: 0, image_sum: 0, image_finite: 0};
  const doc = Bokeh.documents[0];
  for (const m of doc.all_models) {
    if (!m.data) continue;
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


def _rgba_number(rgb: tuple[int, int, int]) -> int:
    """An opaque colour as the uint32 a browser reads from an ImageRGBA buffer (little endian)."""
    return int(np.array([[*rgb, 255]], dtype=np.uint8).view("<u4")[0, 0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    from xrfnb._dashboard import Dashboard, serve_app

    scan, maps, _ = make_scene()
    sessions: list[Dashboard] = []

    def app() -> Dashboard:
        dash = Dashboard(scan=scan, maps=maps)
        sessions.append(dash)
        return dash

    port = _free_port()
    thread = serve_app(app, port=port, address="127.0.0.1", threaded=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:  # wait until the server listens (a GET would open a session)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
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

            # move the global threshold slider to its maximum: every map changes
            handle = page.locator(".xrfnb-global-threshold .noUi-handle").first
            handle.click()
            handle.press("End")
            page.wait_for_function(
                f"() => ({_SOURCES_JS})().image_sum !== {before['image_sum']}", timeout=15000
            )
            assert sessions[-1].thresholds == dict.fromkeys(CLASSES, 1.0)
            assert not sessions[-1].binary_maps().any()
            # the browser holds the new maps: no pigment anywhere, so the composite is black at every
            # valid pixel (grey at the invalid one) and every gallery tile is "absent" grey there
            n_valid = int((~maps.mask).sum())
            black, grey, absent = (_rgba_number(c) for c in ((0, 0, 0), (128, 128, 128), (0xE6,) * 3))
            page.wait_for_function(
                f"() => JSON.stringify(({_PIXEL_COUNTS_JS})(['xrfnb-main', [{black}, {grey}]]))"
                f" === '[{n_valid},{ROWS * COLS - n_valid}]'",
                timeout=15000,
            )
            page.wait_for_function(
                f"() => JSON.stringify(({_PIXEL_COUNTS_JS})(['xrfnb-gallery', [{absent}]]))"
                f" === '[{len(CLASSES) * n_valid}]'",
                timeout=15000,
            )
            page.get_by_text("none above threshold").first.wait_for(timeout=15000)
            page.wait_for_timeout(1500)  # let the gallery and sliders repaint before the screenshot
            page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme not in ("data", "blob")}
    assert hosts == {"127.0.0.1"}, f"requests left the local server: {sorted(hosts)}"
