"""Notebook figure builders and helpers (xrfnb.ui.plotting): line markers, scores, peak and resolution fits,
and the structure of the Bokeh figures (titles, axis labels with units, legends)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import xrfnb
from xrfnb import FitError, XRFNBError
from xrfnb.ui import plotting as P

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


# ------------------------------------------------------------------------------------------------ markers
def test_line_markers_against_published_energies():
    # X-ray data booklet (Bearden; Deslattes et al.): Fe Ka1 6.404, Ka2 6.391; Pb La1 10.551, La2 10.449,
    # Lb1 12.614; Hg La1 9.989, La2 9.898; Pb Ma 2.346. A group's marker lies between its members, near the
    # strongest one.
    marks = {m.label: m for m in P.line_markers(["Fe", "Pb", "Hg"], 1.0, 15.0)}
    assert 6.391 <= marks["Fe Ka"].energy_keV <= 6.404
    assert 10.52 <= marks["Pb La"].energy_keV <= 10.551
    assert marks["Pb Lb"].energy_keV == pytest.approx(12.61, abs=0.01)
    assert 9.96 <= marks["Hg La"].energy_keV <= 9.989
    assert marks["Pb Ma"].energy_keV == pytest.approx(2.346, abs=0.01)
    assert marks["Pb Ma"].family == "M" and marks["Fe Kb"].family == "K"
    # Pb K lines (75 keV) lie outside the range; Fe has no M line drawn (below 1.5 keV)
    assert "Pb Ka" not in marks and "Fe Ma" not in marks
    energies = [m.energy_keV for m in P.line_markers(["Fe", "Pb", "Hg"], 1.0, 15.0)]
    assert energies == sorted(energies)


def test_line_markers_reject_unknown_names():
    with pytest.raises(XRFNBError):
        P.line_markers(["Xx"])
    with pytest.raises(XRFNBError):
        P.line_markers(["Fe"], lines=("Kz",))


# ------------------------------------------------------------------------------------------------ scores
def test_presence_scores_by_hand():
    truth = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], bool)
    s = P.presence_scores(pred, truth)
    # class 0: tp 1, fp 1, fn 1; class 1: tp 1, fp 0, fn 1; class 2: tp 0, fp 1, fn 0
    np.testing.assert_array_equal(s["tp"], [1, 1, 0])
    np.testing.assert_array_equal(s["fp"], [1, 0, 1])
    np.testing.assert_array_equal(s["fn"], [1, 1, 0])
    np.testing.assert_allclose(s["precision"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(s["recall"][:2], [0.5, 0.5])
    assert math.isnan(s["recall"][2])
    np.testing.assert_allclose(s["f1"], [0.5, 2 / 3, 0.0])
    # maps (rows, cols, K) and a validity mask: dropping pixel 3 removes class 0's false positive
    s2 = P.presence_scores(pred.reshape(2, 2, 3), truth.reshape(2, 2, 3), valid=[[1, 1], [1, 0]])
    np.testing.assert_allclose(s2["precision"][0], 1.0)
    with pytest.raises(xrfnb.DataError):
        P.presence_scores(pred, truth[:, :2])


def test_confusion_matrix_by_hand():
    truth = np.array([[1, 0], [1, 0], [0, 1], [1, 1]], bool)
    pred = np.array([[0, 1], [1, 0], [0, 0], [1, 1]], bool)
    m = P.confusion_matrix(pred, truth, normalize=False)
    # class 0 present at rows 0, 1, 3: called at 1, 3 (diagonal 2); class 1 wrongly called at row 0 (1);
    # nothing called at all: none of them. class 1 present at rows 2, 3: called at 3; row 2 empty call.
    np.testing.assert_array_equal(m, [[2, 1, 0], [0, 1, 1]])
    mn = P.confusion_matrix(pred, truth)
    np.testing.assert_allclose(np.diag(mn[:, :2]), P.presence_scores(pred, truth)["recall"])


# ------------------------------------------------------------------------------------------------ peaks
def _synthetic_spectrum(fwhm_of, lines, rng, area=2e5, background=30.0):
    """Gaussian doublets with xraylib energies/rates and a flat background, Poisson noise."""
    cal = xrfnb.EnergyCalibration(0.0, 0.01)
    e = cal.energies_keV(2048)
    lam = np.full(e.size, background)
    for line in lines:
        energies, rates = P._members(line)
        for ei, ri in zip(energies, rates, strict=True):
            s = fwhm_of(ei) / P.FWHM_PER_SIGMA
            lam += area * ri * 0.01 * np.exp(-0.5 * ((e - ei) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    return xrfnb.Spectrum(rng.poisson(lam), cal)


def test_fit_peak_and_resolution_recover_known_detector():
    noise, fano, w = 0.100, 0.118, 3.64

    def fwhm(e):
        return math.sqrt(noise**2 + P.FWHM_PER_SIGMA**2 * fano * w * 1e-3 * e)

    lines = ["Ca Ka", "Fe Ka", "Cu Ka", "Sr Ka"]
    sp = _synthetic_spectrum(fwhm, lines, np.random.default_rng(3))
    peaks = [P.fit_peak(sp, line) for line in lines]
    for p in peaks:
        e = p.energy_keV
        assert p.fwhm_keV == pytest.approx(fwhm(e), rel=0.02)
        assert abs(p.shift_keV) < 0.003
        assert p.area_counts == pytest.approx(2e5, rel=0.03)
    res = P.fit_resolution(peaks, pair_energy_eV=w)
    assert res.noise_keV == pytest.approx(noise, rel=0.08)
    assert res.fano == pytest.approx(fano, rel=0.1)
    # exact recovery from exact widths
    e = np.array([2.0, 6.4, 15.0])
    exact = P.fit_resolution(energies_keV=e, fwhm_keV=[fwhm(x) for x in e], pair_energy_eV=w)
    assert exact.noise_keV == pytest.approx(noise, rel=1e-6)
    assert exact.fano == pytest.approx(fano, rel=1e-6)
    # with the Fano factor fixed, one peak gives the noise
    one = P.fit_resolution(energies_keV=[6.4], fwhm_keV=[fwhm(6.4)], pair_energy_eV=w, fano=fano)
    assert one.noise_keV == pytest.approx(noise, rel=1e-6)
    assert float(one.fwhm_at(17.0)) == pytest.approx(fwhm(17.0), rel=1e-6)


def test_fit_peak_and_resolution_errors():
    sp = _synthetic_spectrum(lambda e: 0.15, ["Fe Ka"], np.random.default_rng(0))
    with pytest.raises(FitError):
        P.fit_peak(sp, "Pb La")  # no Pb in the spectrum
    with pytest.raises(FitError):
        P.fit_peak(sp, "U Ka")  # 98 keV, beyond the 20 keV spectrum
    with pytest.raises(FitError):
        P.fit_resolution(energies_keV=[6.4], fwhm_keV=[0.15])
    with pytest.raises(FitError, match="Fano"):
        # narrower at high energy than at low: no silicon detector
        P.fit_resolution(energies_keV=[2.0, 10.0], fwhm_keV=[0.30, 0.05])


@pytest.mark.skipif(not (REAL / "Steel.spe").is_file(), reason=f"real spectra not found in {REAL}")
def test_resolution_of_real_steel_spectrum_agrees_with_pymca():
    # PyMca's fit configuration of this spectrum (Steel.cfg, see PROVENANCE.md): zero -0.00612 keV,
    # gain 0.011928 keV/ch, noise 0.127 keV, Fano 0.101 with 3.85 eV per pair.
    sp = xrfnb.load(REAL / "Steel.spe").with_calibration(xrfnb.EnergyCalibration(-0.00612, 0.011928))
    peaks = [P.fit_peak(sp, line) for line in ("Cr Ka", "Fe Ka", "Ni Ka")]
    res = P.fit_resolution(peaks, pair_energy_eV=3.85)
    pymca = math.sqrt(0.127**2 + P.FWHM_PER_SIGMA**2 * 0.101 * 3.85e-3 * 6.4)
    assert float(res.fwhm_at(6.4)) == pytest.approx(pymca, rel=0.04)
    assert 0.07 < res.fano < 0.14
    # with PyMca's Fano factor fixed, the noise agrees with PyMca's
    fixed = P.fit_resolution(peaks, pair_energy_eV=3.85, fano=0.101)
    assert fixed.noise_keV == pytest.approx(0.127, rel=0.05)
    assert all(abs(p.shift_keV) < 0.01 for p in peaks)


# ------------------------------------------------------------------------------------------------ figures
hv = pytest.importorskip("holoviews")


@pytest.fixture(scope="module")
def bokeh():
    hv.extension("bokeh", inline=True)
    return hv


def _fig(obj):
    return hv.render(obj, backend="bokeh")


def _legend(fig):
    return [str(item.label.value) for leg in fig.legend for item in leg.items]


def test_spectrum_plot_structure(bokeh):
    cal = xrfnb.EnergyCalibration(0.0, 0.01)
    sp = xrfnb.Spectrum(np.random.default_rng(1).poisson(20, 2048), cal, metadata={"source": "test"})
    ov = P.spectrum_plot(sp, elements=["Fe", "Pb"], title="A spectrum", model_counts=np.full(2048, 20.0))
    fig = _fig(ov)
    assert fig.title.text == "A spectrum"
    assert fig.xaxis[0].axis_label == "Energy (keV)"
    assert "counts" in fig.yaxis[0].axis_label.lower()
    assert set(_legend(fig)) >= {"spectrum", "fit", "K lines", "L lines", "M lines"}
    markers = [el for el in ov if isinstance(el, hv.Segments)]
    k = next(s for s in markers if s.label == "K lines")
    assert any(abs(x - 6.40) < 0.01 for x in k.dimension_values("energy"))
    m = next(s for s in markers if s.label == "M lines")
    assert any(abs(x - 2.346) < 0.01 for x in m.dimension_values("energy"))  # Pb Ma
    with pytest.raises(xrfnb.DataError):
        P.spectrum_plot(sp, model_counts=np.zeros(10))


def test_probability_and_map_figures(bokeh):
    fig = _fig(P.probability_plot(["a", "b", "c"], [0.2, 0.9, 0.6], [0.5, 0.5, 0.7], top=2))
    assert fig.title.text and "Probability" in fig.xaxis[0].axis_label
    assert _legend(fig) == ["probability", "threshold"]
    bars = P.probability_plot(["a", "b", "c"], [0.2, 0.9, 0.6], [0.5, 0.5, 0.7], top=2).get(0)
    assert list(bars.dimension_values("pigment class")) == ["c", "b"]  # two most probable, best on top
    assert list(bars.dimension_values("called")) == ["absent", "present"]
    img = P.map_image(np.arange(12.0).reshape(3, 4), title="m", clabel="Pb (counts)", pixel_size_um=500)
    fig = _fig(img)
    assert fig.xaxis[0].axis_label == "x (mm)" and fig.yaxis[0].axis_label == "y (mm)"
    assert img.bounds.lbrt() == (0.0, 0.0, 2.0, 1.5)
    # row 0 of the map is drawn at the top, and pixel_at inverts the plot coordinates
    assert img[0.25, 1.25] == 0.0
    for r, c in [(0, 0), (2, 3), (1, 2)]:
        x, y = (c + 0.5) * 0.5, (3 - r - 0.5) * 0.5
        assert img[x, y] == 4 * r + c
        assert P.pixel_at(x, y, (3, 4), 500) == (r, c)
    assert P.pixel_at(-5, 99, (3, 4), 500) == (0, 0)
    cb = [r for r in fig.right if type(r).__name__ == "ColorBar"]
    assert cb and cb[0].title == "Pb (counts)"
    fig = _fig(P.rgb_image(np.zeros((3, 4, 3), np.uint8), title="rgb", legend={"lead white": "#eeeeee"}))
    assert _legend(fig) == ["lead white"]


def test_score_confusion_curves_resolution_figures(bokeh):
    fig = _fig(P.score_bars(["a", "b"], {"model": [0.5, 0.7], "baseline": [0.3, np.nan]}, title="F1"))
    assert fig.title.text == "F1" and "F1" in fig.yaxis[0].axis_label
    fig = _fig(P.confusion_plot(np.eye(2, 3), ["a", "b"], ["a", "b", "none"], title="cm"))
    assert fig.xaxis[0].axis_label == "Called class" and fig.yaxis[0].axis_label == "True class"
    fig = _fig(P.curves_plot([5, 10], {"10k counts": [0.9, 0.5]}, title="t", xlabel="Overpaint",
                             xunit="um", ylabel="P", yunit="0-1"))
    assert fig.xaxis[0].axis_label == "Overpaint (um)" and "10k counts" in _legend(fig)
    res = P.fit_resolution(energies_keV=[2.0, 6.4, 15.0], fwhm_keV=[0.11, 0.14, 0.19])
    fig = _fig(P.resolution_plot(res, reference={"preset": (0.09, 0.114, 3.64)}))
    assert fig.yaxis[0].axis_label == "FWHM (eV)"
    assert "preset" in _legend(fig) and "fitted peaks" in _legend(fig)


# ------------------------------------------------------------------------------------------------ demo model
@pytest.mark.slow
def test_demo_model_trains_an_announced_stand_in_and_reuses_it(tmp_path):
    model, note = P.demo_model(tmp_path, name="no-such-model")
    assert "TINY stand-in" in note and "NOT representative" in note
    assert (tmp_path / "xrfnb-tiny-demo" / "model.json").is_file()
    # the stand-in is a complete model (weights, thresholds, OOD statistics) that runs on a spectrum;
    # reloaded from its folder it gives the same probabilities
    inst = xrfnb.Instrument.preset("bruker-m6")
    stack = xrfnb.Stack([xrfnb.Layer({"lead white": 0.7}, thickness_um=30.0)])
    sp = xrfnb.simulate(stack, inst, counts=20000, rng=0)
    ident = model.identify(sp)
    assert ident.classes == model.classes
    again, note2 = P.demo_model(tmp_path, name="no-such-model")
    assert note2 == note and again.classes == model.classes
    np.testing.assert_allclose(again.identify(sp).probability, ident.probability, rtol=1e-5)
