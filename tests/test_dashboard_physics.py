"""The dashboard's "Checked by physics" section (issue 19, item 2): the physics-checked call of the tapped
pixel with its alternatives, the check on demand, the single spectrum, and the call patterns of a region.

The scan is simulated here (xrfnb.simulate_batch on the Bruker M6 preset, Poisson draws; seeds 19_021_0xx
are used nowhere else): chrome yellow at two count levels and lead white + viridian, mapped by the shipped
model with one physics check allowed while mapping, so that some call patterns are checked and others wait
for a check on demand. What the section shows is compared with the package's own answers for the same
pixel or region (PigmentMaps.pattern_at / patterns_in / check_pattern, check_calls, PigmentModel.identify),
computed here, not with strings copied from the dashboard.
"""

from __future__ import annotations

import html
import time

import numpy as np
import pytest

import xrfnb
from xrfnb.model.model import load_model
from xrfnb.model.physics_check import check_calls
from xrfnb.ui.dashboard import Dashboard
from xrfnb.ui.dashboard import job as _job
from xrfnb.ui.dashboard.physics import CHECK_LABEL

ROWS, COLS = 12, 16


@pytest.fixture(scope="module")
def m6():
    return xrfnb.Instrument.preset("bruker-m6")


@pytest.fixture(scope="module")
def model():
    return load_model("default", precision="float32")


def simulated_scan(m6, seed=19_021_001):
    """12 x 16 pixels: chrome yellow at ~1,400 and ~5,000 counts, lead white + viridian at ~3,000, four
    rows each, every pixel its own Poisson draw; and which paint each pixel has (rows, cols) int."""
    rng = np.random.default_rng(seed)
    paints = [
        ({"chrome yellow": 0.5}, 1400.0),
        ({"chrome yellow": 0.5}, 5000.0),
        ({"lead white": 0.3, "viridian": 0.3}, 3000.0),
    ]
    stacks = [xrfnb.Stack([xrfnb.Layer(p, thickness_um=30.0)]) for p, _ in paints]
    mean = xrfnb.simulate_batch(stacks, m6, noise=False, dtype=np.float64)
    mean = mean / mean.sum(axis=1, keepdims=True) * np.array([c for _, c in paints])[:, None]
    paint = np.repeat(np.arange(3), ROWS // 3)[:, None] * np.ones((1, COLS), int)
    counts = rng.poisson(mean[paint]).astype(np.uint16)
    return xrfnb.Scan(counts, m6.calibration, metadata={"instrument": "bruker-m6"}), paint


@pytest.fixture(scope="module")
def scene(m6, model):
    scan, paint = simulated_scan(m6)
    return scan, paint


def mapped(scene, model, check_physics=1):
    """Fresh maps of the scene (a check on demand changes the maps it is made on)."""
    scan, _ = scene
    return xrfnb.map_pigments(scan, model, progress=False, check_physics=check_physics, element_maps=False)


def first_pixel(maps, pattern):
    r, c = np.argwhere(np.asarray(maps.pattern) == pattern.index)[0]
    return int(r), int(c)


def text_of(markdown):
    """A Markdown pane's text as read (HTML entities decoded)."""
    return html.unescape(markdown.object)


def assert_lists(text, alternatives):
    """Each explanation of ``alternatives`` (the package's), best first, is in ``text`` with its pigments,
    ΔBIC, fitted stack and evidence line."""
    positions = []
    for i, x in enumerate(alternatives):
        name = " + ".join(x.pigments)
        at = text.index(f"{i + 1}. **{name}**")
        positions.append(at)
        if i:
            assert f"ΔBIC {x.delta_bic:.1f}" in text[at:]
        assert x.stack.replace(" um", " µm") in text[at:]
        assert x.evidence.replace(" um", " µm") in text[at:]
    assert positions == sorted(positions)


# -- the tapped pixel --------------------------------------------------------------------------------
def test_a_pixel_checked_while_mapping_shows_the_checked_call_and_its_alternatives(scene, model):
    maps = mapped(scene, model)
    checked = [p for p in maps.patterns if p.check is not None]
    assert checked, [p.note for p in maps.patterns]
    dash = Dashboard(scan=scene[0], maps=maps, model=model)
    panel = dash.physics_panel
    for p in checked:
        r, c = first_pixel(maps, p)
        dash.select_pixel(r, c)
        want = maps.pattern_at(r, c)  # the package's answer for this pixel
        view = panel.pixel_view()
        assert view.checked and view.action == "" and not panel.check_w.visible
        assert view.network_call == want.classes and view.best_classes == want.best_classes
        assert view.changed == want.changed
        assert [x.classes for x in view.alternatives] == [x.classes for x in want.alternatives]
        text = text_of(panel.pixel_text)
        assert f"pixel (row {r}, col {c})" in text and ", ".join(want.classes) in text
        assert ("changed the call" in text) == want.changed
        assert ("keeps the network's call" in text) == (not want.changed)
        assert_lists(text, want.alternatives)
        assert "Traceback" not in text and "CallPattern(" not in text and "Explanation(" not in text


def test_the_button_checks_a_pattern_left_for_later_and_the_panel_shows_it(scene, model, m6):
    maps = mapped(scene, model)
    waiting = [p for p in maps.patterns if p.check is None and p.mean_spectrum is not None]
    waiting = [p for p in waiting if p.n_pixels >= 16]
    assert waiting, [p.note for p in maps.patterns]
    p = waiting[0]
    dash = Dashboard(scan=scene[0], maps=maps, model=model)
    panel = dash.physics_panel
    r, c = first_pixel(maps, p)
    dash.select_pixel(r, c)
    assert panel.pixel_view().action == "pattern"
    assert panel.check_w.visible and panel.check_w.label == CHECK_LABEL
    assert "Not checked" in text_of(panel.pixel_text)
    panel.check_w.clicks += 1  # the user's click (blocking outside a server session)
    done = maps.pattern_at(r, c)
    assert done.check is not None and not panel.check_w.visible
    # the same answer as the package's check of that pattern's mean spectrum, called directly
    direct = check_calls(p.mean_spectrum, m6, p.classes, p.layer, model.class_elements)
    view = panel.pixel_view()
    assert [x.classes for x in view.alternatives] == [x.classes for x in direct.alternatives]
    assert view.best_classes == direct.best_classes and view.changed == direct.changed
    assert_lists(text_of(panel.pixel_text), done.alternatives)


def test_a_pixel_of_a_rare_pattern_is_checked_on_its_own_spectrum(scene, model):
    """A pattern of too few pixels has no mean spectrum: the button identifies the pixel's own spectrum
    with the physics check, as PigmentModel.identify(check_physics=True) does."""
    maps = mapped(scene, model)
    rare = [p for p in maps.patterns if p.mean_spectrum is None and p.check is None]
    assert rare, [p.note for p in maps.patterns]
    dash = Dashboard(scan=scene[0], maps=maps, model=model)
    panel = dash.physics_panel
    r, c = first_pixel(maps, rare[0])
    dash.select_pixel(r, c)
    assert panel.pixel_view().action == "spectrum" and panel.check_w.visible
    panel.check_w.clicks += 1
    ident = model.identify(scene[0][r, c], check_physics=True)
    view = panel.pixel_view()
    assert view.network_call == ident.network_present
    assert view.checked == ident.physics_check.checked
    assert [x.classes for x in view.alternatives] == [x.classes for x in ident.alternatives]
    assert view.changed == (set(ident.present) != set(ident.network_present))
    if view.checked:
        assert_lists(text_of(panel.pixel_text), ident.alternatives)
    assert "this pixel's own spectrum" in text_of(panel.pixel_text)


def test_a_single_spectrum_is_checked_by_identify(scene, model):
    scan, _ = scene
    one = xrfnb.Scan(np.asarray(scan.counts)[:1, :1], scan.calibration, metadata={"instrument": "bruker-m6"})
    maps = xrfnb.map_pigments(one, model, progress=False, element_maps=False)
    dash = Dashboard(scan=one, maps=maps, model=model)
    panel = dash.physics_panel
    assert dash.single_spectrum and panel.section.visible
    view = panel.pixel_view()
    assert view.where == "this spectrum" and view.action == "spectrum"
    dash.physics_panel.check_selected()
    ident = model.identify(one[0, 0], check_physics=True)
    view = panel.pixel_view()
    assert [x.classes for x in view.alternatives] == [x.classes for x in ident.alternatives]
    assert view.network_call == ident.network_present
    assert "Checked by physics: this spectrum" in text_of(panel.pixel_text)


def test_the_check_runs_off_the_event_loop_with_a_progress_line(scene, model, monkeypatch):
    """In a server session the check runs in a worker thread: the button says it is checking and the line
    under it what is done, until the session's poll shows the result."""
    maps = mapped(scene, model)
    p = next(p for p in maps.patterns if p.check is None and p.mean_spectrum is not None and p.n_pixels >= 16)
    dash = Dashboard(scan=scene[0], maps=maps, model=model)
    panel = dash.physics_panel
    dash.data_panel._blocking = False

    class Callback:
        def stop(self):
            pass

    monkeypatch.setattr(_job.pn.state, "add_periodic_callback", lambda *a, **k: Callback())
    dash.select_pixel(*first_pixel(maps, p))
    panel.check_w.clicks += 1
    assert panel.check_w.disabled and panel.check_w.label.startswith("Checking")
    assert panel.progress_text.visible and "checking this call by physics" in panel.progress_text.object
    assert "rows" not in panel.progress_text.object and "pixels" not in panel.progress_text.object
    job = panel.jobs.job
    deadline = time.monotonic() + 60
    while not job.finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    panel.jobs.poll()
    assert not panel.progress_text.visible and not panel.check_w.disabled
    assert maps.patterns[p.index].check is not None and panel.pixel_view().checked


def test_a_failed_check_is_said_in_words(scene, model, monkeypatch):
    maps = mapped(scene, model)
    p = next(p for p in maps.patterns if p.check is None and p.mean_spectrum is not None and p.n_pixels >= 16)
    dash = Dashboard(scan=scene[0], maps=maps, model=model)

    def broken(self, index, instrument=None):
        raise xrfnb.XRFNBError("the stack fit found no counts in the fitted range")

    monkeypatch.setattr(xrfnb.PigmentMaps, "check_pattern", broken)
    dash.select_pixel(*first_pixel(maps, p))
    dash.physics_panel.check_w.clicks += 1  # no exception reaches the caller
    level, message = dash.last_message
    assert level == "error" and message == "the stack fit found no counts in the fitted range"
    assert "Not checked" in text_of(dash.physics_panel.pixel_text)


def test_maps_without_the_check_say_so_and_offer_the_pixels_own_check(scene, model):
    maps = mapped(scene, model, check_physics=False)
    dash = Dashboard(scan=scene[0], maps=maps, model=model)
    dash.select_pixel(0, 0)
    view = dash.physics_panel.pixel_view()
    assert "made without the physics check" in view.note and view.action == "spectrum"
    dash.select_region(np.ones(maps.shape, bool))
    assert "made without the physics check" in text_of(dash.physics_panel.region_text)
    assert dash.physics_panel.pixel_view() is None  # a region is selected, not a pixel


# -- regions -------------------------------------------------------------------------------------------
def pattern_lines(text, found):
    """The positions in ``text`` of each (pattern, pixels) of ``found`` as the listing writes them."""
    at = []
    for p, k in found:
        lo, hi = p.counts_range
        line = f"**{', '.join(p.classes)}** at {lo:,}-{hi:,} counts: {k:,} pixel{'s' if k != 1 else ''} here"
        at.append(text.index(line))
    return at


def test_a_region_lists_its_call_patterns_with_pixel_counts_and_checks(scene, model):
    maps = mapped(scene, model)
    scan, paint = scene
    dash = Dashboard(scan=scan, maps=maps, model=model)
    panel = dash.physics_panel
    mask = paint == 0  # the chrome yellow at ~1,400 counts
    dash.select_region(mask)
    found = maps.patterns_in(mask)
    assert found
    text = text_of(panel.region_text)
    assert pattern_lines(text, found) == sorted(pattern_lines(text, found))  # most pixels first
    # the pixels with a call, counted from the pattern map itself
    with_call = int((np.asarray(maps.pattern)[mask] >= 0).sum())
    assert sum(k for _, k in found) == with_call
    assert f"{with_call:,} of its {int(mask.sum()):,} pixels have a call" in text
    for p, _ in found:
        if p.check is not None:
            for x in p.alternatives:
                assert " + ".join(x.pigments) in text
    # kept: the same listing in the kept region's card
    dash.keep_region()
    card = dash.region_panel.list.objects[-1]
    kept_text = html.unescape(card.objects[0].object)
    assert "Region 1" in kept_text and pattern_lines(kept_text, found)
    # the region's unchecked patterns, checked by one click, then listed with their explanations
    todo = [p for p, _ in found if p.check is None and p.mean_spectrum is not None and p.n_pixels >= 16]
    if todo:
        assert panel.region_check_w.visible
        panel.region_check_w.clicks += 1
        text = text_of(panel.region_text)
        for p in todo:
            done = maps.patterns[p.index]
            assert done.check is not None
            assert " + ".join(done.alternatives[0].pigments) in text
        kept_text = html.unescape(dash.region_panel.list.objects[-1].objects[0].object)
        assert " + ".join(maps.patterns[todo[0].index].alternatives[0].pigments) in kept_text


def test_checked_from_a_region_each_pixel_says_whether_physics_changed_its_call(scene, model):
    """The region button checks the region's waiting patterns, a few per click; then every pixel's section
    says whether the check changed the network's call, as its pattern (the package) says. The region: the
    chrome yellow at ~5,000 counts and the lead white + viridian (the other test has the rest)."""
    maps = mapped(scene, model)
    dash = Dashboard(scan=scene[0], maps=maps, model=model)
    panel = dash.physics_panel
    dash.select_region(scene[1] >= 1)
    for _ in range(len(maps.patterns)):
        if not panel.region_check_w.visible:
            break
        panel.region_check_w.clicks += 1
    assert not panel.region_check_w.visible
    waiting = [p for p in maps.patterns if p.mean_spectrum is not None and p.check is None]
    assert all(p.note for p in waiting)  # a pattern left unchecked says why (no alternative)
    # lead white + viridian called with chrome yellow as well: a call the check changes (both wordings shown)
    assert any(p.changed for p, _ in maps.patterns_in(scene[1] >= 1)), [p.describe() for p in maps.patterns]
    for p in maps.patterns:
        if p.check is None:
            continue
        dash.select_pixel(*first_pixel(maps, p))
        text = text_of(panel.pixel_text)
        if p.changed:
            assert "**The physics check changed the call** to " + ", ".join(p.best_classes) in text
            called = next(x for x in p.check.explanations if set(x.classes) == set(p.classes))
            assert f"the network's call explains it worse by ΔBIC {called.delta_bic:.1f}" in text
            assert "keeps the network's call" not in text
        else:
            assert "keeps the network's call" in text and "changed the call" not in text
        assert_lists(text, p.alternatives)
