"""The shipped model on real spectra of known composition (NIST's Bruker M4 pure elements and acrylic
blanks in ../shared/data/real/bruker_m4_rh50kv), thinned to a pixel's 2,000 counts.

The reference is the material named by each file (PROVENANCE.md), not the model's own output: a pure Fe,
Cu, Cr or Ti spectrum must be called iron pigments, copper pigments, chromium oxide greens or titanium white
in nearly every draw; a stainless steel iron and chromium; and on no file may a class whose key element the
material lacks be called often without the out-of-distribution flag (never a silent confident wrong call).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import xrfnb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ere():
    path = ROOT / "benchmarks" / "eval_real_elements.py"
    spec = importlib.util.spec_from_file_location("eval_real_elements", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not mod.REAL.is_dir():
        pytest.skip(f"the real Bruker M4 spectra are not at {mod.REAL} (../shared/data/real)")
    return mod


@pytest.fixture(scope="module")
def scores(ere):
    model = xrfnb.load_model("default", precision="float32")
    return {p.name: ere.score(model, p, 2000.0, 20, 20261207 + i) for i, p in enumerate(ere.real_files())}


def test_every_real_file_has_a_known_material(ere):
    files = ere.real_files()
    assert len(files) == 26
    assert {ere.material_of(p) for p in files} == set(ere.MATERIALS)


def test_thinning_keeps_the_spectrum_shape(ere):
    rng = np.random.default_rng(0)
    counts = np.array([0, 10_000, 1_000_000, 50_000, 0])
    draws = ere.thinned(counts, 2000.0, 400, rng)
    assert draws.shape == (400, 5) and draws[:, [0, 4]].sum() == 0
    assert draws.sum(1).mean() == pytest.approx(2000.0, rel=0.01)
    assert draws.mean(0)[2] / draws.mean(0)[1] == pytest.approx(100.0, rel=0.1)


@pytest.mark.parametrize("material", ["Fe", "Cu", "Cr", "Ti", "Steel"])
def test_pure_elements_are_called_as_their_pigment_class(scores, material):
    rows = [r for r in scores.values() if r["material"] == material]
    assert len(rows) == 1 and rows[0]["expected"], material
    for cls, share in rows[0]["expected"].items():
        assert share >= 0.9, f"{material}: {cls} called in {share:.0%} of the draws"
    assert rows[0]["ood"] <= 0.1


def test_no_silent_confident_wrong_calls_on_real_spectra(scores):
    for name, r in scores.items():
        assert r["wrong_unflagged"] <= 0.25, (name, r)
    assert np.mean([r["wrong_unflagged"] for r in scores.values()]) <= 0.05
