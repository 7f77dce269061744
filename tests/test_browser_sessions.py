"""Ten concurrent browser sessions of ``xrfnb serve`` (the demo): independent thresholds, bounded memory.

The README's command runs once in a subprocess on a free loopback port. One headless Chromium opens ten
browser contexts (ten independent Bokeh sessions, as ten people would), all at once. Each session moves
its own global threshold slider to a different value; every page's live document must then show maps
at its own threshold (the gallery's count of "absent" pixels strictly increasing with the threshold,
none at 0, all but probabilities of exactly 1 at 1, consistent with the composite main map), and keep
them while the other nine change theirs. The server's resident memory is read after the first session,
after all ten, and after the ten are closed and Panel has logged their destruction: each added session
must cost a bounded amount (a session holding its own copy of the demo's scan would not), and nothing
may grow once the browsers are gone. RSS cannot show that Python freed the ten sessions (the allocator
keeps the pages for reuse), so the figures are printed for the README rather than asserted to fall.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlparse

import pytest
from test_browser import (
    _PIXEL_COUNTS_JS,
    CHROMIUM,
    _assert_clean_page,
    _launch,
    _rgba_number,
    _wait_for_figures,
    _xrfnb_serve,
)

pytestmark = pytest.mark.browser

SESSIONS = 10
# bound on the server's RSS growth per added session: about 1.5 times the measured 31 MiB (19.5 MiB before
# each session also drew the element maps side by side: eleven more figures in the demo)
PER_SESSION_MIB = 48.0
MIB = 2**20

# where each session drags its global threshold handle, as a fraction of the slider's track; None:
# the Home key (threshold 0), 1.0 here means the End key (threshold 1). All distinct and away from
# the demo's default (the median of the model's thresholds), so each session's change is one event.
_TARGETS: tuple[float | None, ...] = (None, 1.0, 0.06, 0.16, 0.26, 0.52, 0.62, 0.72, 0.82, 0.92)

# the global threshold slider's value and the values of all other 0..1 sliders (the per-class ones,
# which the server sets whenever the global one moves) in the live document
_SLIDERS_JS = """() => {
  const out = {global: null, classes: []};
  if (!window.Bokeh || !Bokeh.documents.length) return out;
  for (const m of Bokeh.documents[0].all_models) {
    if (!m.constructor || m.constructor.__name__ !== 'Slider') continue;
    if ((m.css_classes || []).includes('xrfnb-global-threshold')) out.global = m.value;
    else if (m.start === 0 && m.end === 1) out.classes.push(m.value);
  }
  return out;
}"""

# the gallery's tile labels ("vermilion (12%)"), one per pigment class
_GALLERY_LABELS_JS = """() => {
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name !== 'xrfnb-gallery' || !m.renderers) continue;
    for (const r of m.renderers) {
      const d = r.data_source && r.data_source.data;
      if (!d) continue;
      const o = d instanceof Map ? Object.fromEntries(d) : d;
      if ('text' in o) return Array.from(o['text']);
    }
  }
  return null;
}"""

# the size of the main map's image (pixels of the scan)
_MAIN_SIZE_JS = """() => {
  for (const m of Bokeh.documents[0].all_models) {
    if (m.name !== 'xrfnb-main' || !m.renderers) continue;
    for (const r of m.renderers) {
      const d = r.data_source && r.data_source.data;
      if (!d) continue;
      const o = d instanceof Map ? Object.fromEntries(d) : d;
      if ('image' in o) return (o['image'][0].array || o['image'][0]).length;
    }
  }
  return null;
}"""

_ABSENT = _rgba_number((0xE6, 0xE6, 0xE6))  # gallery: below the class's threshold
_INVALID = _rgba_number((128, 128, 128))  # invalid (masked) pixel, in the gallery and the main map
_BLACK = _rgba_number((0, 0, 0))  # composite main map: no pigment present


def _server_process(port: int):
    """The ``xrfnb serve`` process (a child of this one) listening on ``port``."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "serve" in cmd and str(port) in cmd:
            return child
    raise AssertionError(f"no xrfnb serve process on port {port} among this test's children")


def _rss_mib(proc) -> float:
    return proc.memory_info().rss / MIB


def _counts(page) -> dict[str, int]:
    gallery = page.evaluate(_PIXEL_COUNTS_JS, ["xrfnb-gallery", [_ABSENT, _INVALID]])
    main = page.evaluate(_PIXEL_COUNTS_JS, ["xrfnb-main", [_BLACK, _INVALID]])
    return {"absent": gallery[0], "gallery_invalid": gallery[1], "black": main[0], "invalid": main[1]}


def _wait_until(predicate, what, timeout_s: float = 90.0, poll_ms: int = 250, page=None) -> None:
    """Poll ``predicate`` until true; fail after ``timeout_s`` saying ``what`` (a text or a callable)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        if page is not None:
            page.wait_for_timeout(poll_ms)
        else:
            time.sleep(poll_ms / 1000)


def _set_threshold(page, target: float | None) -> None:
    """Move the page's global threshold slider with one user action (a key or one drag)."""
    handle = page.locator(".xrfnb-global-threshold .noUi-handle").first
    if target is None or target == 1.0:
        handle.click()
        handle.press("Home" if target is None else "End")
        return
    handle.scroll_into_view_if_needed()
    box = page.locator(".xrfnb-global-threshold .noUi-base").first.bounding_box()
    hb = handle.bounding_box()
    x0, y0 = hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(box["x"] + target * box["width"], y0)  # one move: one new value
    page.mouse.up()


# In two of three full `make test` runs on 2026-12-07 one of the nine pages opened at once never drew its
# maps (waits of 120 s and then 332 s ran out), and the test left the default run. The cause (#14): Bokeh
# discards a session no browser has connected to within 15 s; while the server built the nine sessions one
# after the other, the later pages connected later than that, their sessions were dropped and built again
# when their websockets came, which delayed the next pages in turn (17 sessions built for 10 pages in one
# run). Each session is now kept until its page connects (xrfnb.ui.dashboard.bokeh.
# keep_session_until_connected); the test checks that no session is built twice.
def test_ten_concurrent_sessions_have_their_own_thresholds_and_bounded_memory(tmp_path, monkeypatch):
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    pytest.importorskip("psutil", reason="psutil reads the server's memory")
    from playwright.sync_api import sync_playwright

    t_start = time.monotonic()
    monkeypatch.setenv("PANEL_LOG_LEVEL", "info")  # the log then says when Panel creates/destroys a session
    log_path = tmp_path / "serve.log"
    requests: list[str] = []
    rss: dict[str, float] = {}
    times: dict[str, float] = {}
    with _xrfnb_serve([], log_path) as url, sync_playwright() as p:
        proc = _server_process(urlparse(url).port)
        rss["idle"] = _rss_mib(proc)
        browser = _launch(p)
        try:
            contexts = [browser.new_context(viewport={"width": 1440, "height": 900}) for _ in range(SESSIONS)]
            pages = [ctx.new_page() for ctx in contexts]
            for page in pages:
                page.on("request", lambda req: requests.append(req.url))

            def ready(page, deadline: float) -> None:
                """Figures, maps and sliders drawn before ``deadline`` (time.monotonic)."""

                def left_ms() -> float:
                    return max(5000.0, 1000.0 * (deadline - time.monotonic()))

                _wait_for_figures(page, 4, timeout_s=left_ms() / 1000.0)
                page.wait_for_function(
                    f"() => ({_PIXEL_COUNTS_JS})(['xrfnb-gallery', [0]]) !== null"
                    f" && ({_PIXEL_COUNTS_JS})(['xrfnb-main', [0]]) !== null",
                    timeout=left_ms(),
                )
                page.wait_for_function(f"() => ({_SLIDERS_JS})().classes.length > 0", timeout=left_ms())

            # the first session loads the model and maps the demo (cached for the others)
            pages[0].goto(url)
            ready(pages[0], time.monotonic() + 240)
            times["first"] = time.monotonic() - t_start
            rss["one"] = _rss_mib(proc)
            # the other nine, all at once
            # nine pages built and drawn at once share the two cores with the server: about 140 s on the
            # 2-core project machine, so all nine get 420 s together (this test bounds memory and keeps
            # sessions apart; the time is printed, not judged)
            for page in pages[1:]:
                page.goto(url, wait_until="commit")
            deadline = time.monotonic() + 420
            for page in pages[1:]:
                ready(page, deadline)
            times["all"] = time.monotonic() - t_start
            rss["ten"] = _rss_mib(proc)
            assert len(set(re.findall(r"Session (\d+) created", log_path.read_text()))) == SESSIONS
            # no session was discarded before its page connected and built again for its websocket
            launched = set(re.findall(r"Session (\d+) launching", log_path.read_text()))
            assert len(launched) == SESSIONS, f"{len(launched)} sessions built for {SESSIONS} pages"

            n_pixels = pages[0].evaluate(_MAIN_SIZE_JS)
            n_classes = len(pages[0].evaluate(_GALLERY_LABELS_JS))
            default = pages[0].evaluate(_SLIDERS_JS)["global"]
            initial = [_counts(page) for page in pages]
            assert all(c == initial[0] for c in initial), "sessions of the same demo start differently"
            n_valid = n_pixels - initial[0]["invalid"]

            # each session moves its own slider; no page waits for the server before the next moves
            for page, target in zip(pages, _TARGETS, strict=True):
                _set_threshold(page, target)
            values: list[float] = []
            mine: list[dict[str, int]] = []
            for page in pages:
                # the server has applied this session's final value to every class of this session
                _wait_until(
                    lambda page=page: (
                        (s := page.evaluate(_SLIDERS_JS))["global"] != default
                        and all(v == s["global"] for v in s["classes"])
                    ),
                    lambda page=page: f"the server to apply the threshold: {page.evaluate(_SLIDERS_JS)}",
                    page=page,
                )
                values.append(page.evaluate(_SLIDERS_JS)["global"])
                before = initial[0]["absent"]
                page.wait_for_function(
                    f"() => ({_PIXEL_COUNTS_JS})(['xrfnb-gallery', [{_ABSENT}]])[0] !== {before}",
                    timeout=60000,
                )
                mine.append(_counts(page))
            times["thresholds"] = time.monotonic() - t_start
            assert len(set(values)) == SESSIONS, f"two sessions got the same threshold: {values}"
            assert values[0] == 0.0 and values[1] == 1.0, values

            print(f"\nthresholds {values}\ncounts {mine}")
            # maps at each session's own threshold: the absent count strictly grows with it (one
            # session showing another's maps would break the order or tie two counts) ...
            order = sorted(range(SESSIONS), key=lambda i: values[i])
            absent = [mine[i]["absent"] for i in order]
            assert absent == sorted(absent) and len(set(absent)) == SESSIONS, (values, mine)
            black = [mine[i]["black"] for i in order]
            assert black == sorted(black), (values, mine)
            # ... exact at the ends: nothing is below 0; at 1 only probabilities of exactly 1 remain
            assert mine[0]["absent"] == 0 and mine[0]["black"] == 0, mine[0]
            assert n_classes * n_valid - n_valid <= mine[1]["absent"] <= n_classes * n_valid, mine[1]
            for c in mine:
                # the gallery and the main map agree: each pixel the composite colours (not black)
                # holds at least one present class, i.e. at least one non-absent gallery pixel
                assert n_classes * n_valid - c["absent"] >= n_valid - c["black"], c
            # every page keeps its own maps after the nine others changed theirs
            page_counts = [_counts(page) for page in pages]
            assert page_counts == mine, "a session's maps changed when another session moved its threshold"
            assert [page.evaluate(_SLIDERS_JS)["global"] for page in pages] == values
            for page in pages:
                _assert_clean_page(page, log_path)
            rss["ten_moved"] = _rss_mib(proc)

            for ctx in contexts:
                ctx.close()
            times["closed"] = time.monotonic() - t_start
            # Bokeh drops a session some 15-35 s after its browser went away; Panel logs it
            _wait_until(
                lambda: len(set(re.findall(r"Session (\d+) destroyed", log_path.read_text()))) >= SESSIONS,
                "Panel to destroy the ten sessions",
                timeout_s=90,
                poll_ms=500,
            )
            rss["after"] = _rss_mib(proc)
            times["destroyed"] = time.monotonic() - t_start
        finally:
            browser.close()
    per_session = (rss["ten"] - rss["one"]) / (SESSIONS - 1)
    print(
        f"server RSS (MiB): idle {rss['idle']:.0f}, one session {rss['one']:.0f}, ten {rss['ten']:.0f},"
        f" ten after moving thresholds {rss['ten_moved']:.0f}, after the ten were destroyed"
        f" {rss['after']:.0f}; {per_session:.1f} MiB per added session; times (s) {times}"
    )
    # a session shares the demo's scan, maps and model with the others (measured: ~15 MiB each, the
    # first ~640 MiB with the model); its own copy of the scan or maps would cost far more than this
    assert per_session <= PER_SESSION_MIB, f"each session costs {per_session:.1f} MiB: {rss}"
    # closing the ten frees what they held for reuse: nothing grows after the browsers went away
    assert rss["after"] <= rss["ten_moved"] + 16, rss
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme not in ("data", "blob")}
    assert hosts == {"127.0.0.1"}, f"requests left the local server: {sorted(hosts)}"
