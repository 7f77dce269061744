"""Mock-up scenes: deterministic rendering, consistent ground truth, and physics visible in the counts."""

import h5py
import numpy as np
import pytest

import xrfnb
from xrfnb.physics.scenes import GroundTruth


@pytest.fixture(scope="module")
def hidden():
    return xrfnb.render_scan("hidden-painting", shape=(40, 40), counts_per_pixel=2000, rng=3)


def _roi(scan, element, line, half_width_keV=0.1):
    e = xrfnb.line_energy_keV(element, line)
    window = np.abs(scan.energy_keV - e) < half_width_keV
    return np.asarray(scan.counts)[..., window].sum(axis=-1).astype(float)


def test_builtin_scenes_listed():
    assert set(xrfnb.scenes()) == {"mockup-panel", "hidden-painting"}


def test_render_is_deterministic(hidden):
    scan, truth = hidden
    again, truth2 = xrfnb.render_scan("hidden-painting", shape=(40, 40), counts_per_pixel=2000, rng=3)
    np.testing.assert_array_equal(np.asarray(scan.counts), np.asarray(again.counts))
    np.testing.assert_array_equal(truth.labels, truth2.labels)


def test_counts_per_pixel_and_live_time(hidden):
    scan, _ = hidden
    total = scan.total_counts_image()
    assert scan.shape == (40, 40, 4096)
    assert 1800 < np.median(total) < 2200
    assert np.all(scan.live_time_s > 0)


def test_ground_truth_layers(hidden):
    _, truth = hidden
    # the riders are painted in vermilion in the underlying picture: never at the surface
    riders = truth.present("vermilion")
    assert riders.any() and not truth.surface("vermilion").any()
    assert np.all(truth.depth_um[riders, truth.pigments.index("vermilion")] >= 10)
    # zinc white is in every surface paint
    assert truth.surface("zinc white").all()
    groups, present, surface = truth.group_maps()
    assert "vermilion" in groups
    assert np.array_equal(present[..., groups.index("vermilion")], riders)
    assert not (surface & ~present).any()


def test_buried_vermilion_shows_in_hg_counts(hidden):
    """Hg L lines from the buried riders pass the 10-15 um overpaint: the map shows the hidden figure."""
    scan, truth = hidden
    hg = _roi(scan, "Hg", "Lb")  # Hg Lb (11.8 keV) is free of the Pb La / As Ka overlap
    riders = truth.present("vermilion")
    assert hg[riders].mean() > 3 * hg[~riders].mean()


def test_surface_chrome_yellow_in_cr_counts(hidden):
    scan, truth = hidden
    cr = _roi(scan, "Cr", "Ka")
    bg = truth.surface("chrome yellow")
    assert cr[bg].mean() > 5 * cr[~truth.present("chrome yellow")].mean()


def test_mockup_panel_cells():
    _scan, truth = xrfnb.render_scan("mockup-panel", shape=(48, 48), counts_per_pixel=500, rng=0)
    lib = xrfnb.pigments()
    # every library pigment has its swatch, silent ones included
    assert set(truth.pigments) == set(lib.names)
    descriptions = truth.descriptions
    for t in (5, 10, 20, 40):
        assert any(f"{t} um over" in d for d in descriptions)
    for pct in (1, 5, 20, 50):
        assert any(f" {pct} wt % in chalk" in d for d in descriptions)
    assert any("(1:1)" in d for d in descriptions)


def test_saved_with_ground_truth(tmp_path, hidden):
    path = tmp_path / "scene.h5"
    scan, truth = xrfnb.render_scan("hidden-painting", shape=(16, 16), rng=1, path=path)
    loaded = xrfnb.load(path)
    assert isinstance(loaded, xrfnb.Scan)
    np.testing.assert_array_equal(np.asarray(loaded.counts), np.asarray(scan.counts))
    back = GroundTruth.from_file(path)
    np.testing.assert_array_equal(back.layer_index, truth.layer_index)
    assert back.descriptions == truth.descriptions
    assert [repr(s) for s in back.stacks] == [repr(s) for s in truth.stacks]
    with h5py.File(path, "r") as f:
        assert "entry/ground_truth/labels" in f


def test_bad_scene_requests():
    with pytest.raises(xrfnb.SimulationError, match="unknown scene"):
        xrfnb.render_scan("mona-lisa")
    with pytest.raises(xrfnb.SimulationError, match="too small"):
        xrfnb.render_scan("mockup-panel", shape=(10, 10))
    with pytest.raises(xrfnb.SimulationError, match="counts_per_pixel"):
        xrfnb.render_scan("hidden-painting", shape=(8, 8), counts_per_pixel=0)
    with pytest.raises(xrfnb.FormatError):
        GroundTruth.from_file(__file__)
