"""A model adapted to the user's own instrument (issue #18 item 2): ``PigmentModel.adapt``, ``xrfnb adapt``
and ``xrfnb identify --adapt``.

The instrument is one no preset describes (a W tube at 40 kV, 1,024 channels of 40 eV, 120 deg), simulated
with a seed used nowhere else (18301); the fit must read it back and the adaptation must train on *that*
instrument (its anode, calibration and channel count, compared with the simulation's truth), starting from
the base model's weights and re-fitting thresholds and OOD statistics. The base is a tiny model trained
here (the shipped one takes minutes to fine-tune); its simulation runs in a worker process started after
torch has run in this process (the case that hung with forked workers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import xrfnb
from xrfnb import EnergyCalibration, Instrument, Layer, Stack
from xrfnb.maps.pigmentmaps import PigmentMaps
from xrfnb.model.adapt import adapt_model, adaptation_config
from xrfnb.model.train import train_model
from xrfnb.ui import cli

TINY = {
    "name": "tiny-base",
    "model": {"hidden": [32, 16], "conv_channels": 2},
    "data": {"instruments": ["bruker-m6"], "instrument_weights": [1.0], "n_instrument_variants": 1,
             "variants_per_batch": 1},
    "optim": {"batch_size": 32, "max_steps": 10, "time_budget_min": 10.0, "n_val": 192, "workers": 1,
              "checkpoint_every": 5, "threads": 1, "seed": 3},
}
TRUTH = Instrument(
    name="w-tube", anode="W", tube_voltage_kV=40.0, incidence_deg=60.0, takeoff_deg=60.0,
    atmosphere="air", beam_path_mm=10.0, detector_path_mm=10.0, optics="none", source_solid_angle_sr=1e-4,
    pileup_time_s=2e-7, calibration=EnergyCalibration(-0.05, 0.04), n_channels=1024,
).with_(fwhm_mnka_eV=150.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> xrfnb.PigmentModel:
    return train_model(TINY, tmp_path_factory.mktemp("base"), progress=False)


@pytest.fixture(scope="module")
def spectrum() -> xrfnb.Spectrum:
    paint = Stack([Layer({"lead white": 0.5, "vermilion": 0.2}, thickness_um=20)],
                  substrate=Layer({"chalk": 0.9}, thickness_um=500))
    return xrfnb.simulate(paint, TRUTH, counts=5e6, live_time_s=100.0, rng=18301)


@pytest.fixture(scope="module")
def fit(spectrum) -> xrfnb.InstrumentFit:
    return xrfnb.fit_instrument(spectrum)


@pytest.fixture(scope="module")
def adapted(base, fit, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted")
    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's thread pool is running in this process
    model = base.adapt(fit, out, minutes=0.05, progress=False, n_val=128, validation_n_per_cell=8)
    return out, model


def test_the_adaptation_trains_on_the_fitted_instrument(base, fit):
    cfg = adaptation_config(base, fit, minutes=3.0)
    if fit["optics"].status == "fitted":  # the fit settled them: the fitted optics only
        (inst,) = (Instrument.from_dict(d) for d in cfg.data.instruments)
        assert inst.optics == TRUTH.optics
    else:  # not settled by the sum spectrum: drawn both ways, half the variants each
        inst, twin = (Instrument.from_dict(d) for d in cfg.data.instruments)
        assert {inst.optics, twin.optics} == {"polycapillary", "none"}
        assert cfg.data.instrument_weights == (0.5, 0.5)
        assert twin.with_(optics=inst.optics) == inst
    if fit["atmosphere"].status in ("fitted", "derived", "fixed"):
        assert cfg.data.atmosphere_probs is None  # the fitted one
    else:
        assert cfg.data.atmosphere_probs is not None and len(cfg.data.atmosphere_probs) == 3
    assert inst.anode == TRUTH.anode and inst.n_channels == TRUTH.n_channels
    e10 = float(inst.calibration.energy_keV(TRUTH.calibration.channel(10.0)))
    assert abs(e10 - 10.0) < 0.015
    assert cfg.data.anodes == ()  # the fitted anode, not the base model's list
    lo, hi = cfg.data.fwhm_scale
    assert lo < 1.0 < hi and hi - lo <= 0.6
    # the paint variation is the base model's own
    base_data = base.meta["training"]["data"]
    assert list(cfg.data.layer_probs) == list(base_data["layer_probs"])
    assert cfg.optim.time_budget_min == 3.0 and cfg.model.hidden == (32, 16)


def test_the_fitted_hardness_is_what_the_adaptation_trains_on(base, fit):
    """A settled lens, a fitted Cu filter and a fitted detector thickness: one optics, the filter's
    thickness within +/- 2 sigma (the fitted instrument's own filter otherwise), the detector within
    +/- 2 sigma; unsettled optics are drawn both ways."""
    import dataclasses

    from xrfnb.fitting.instrument_fit import FittedParameter
    from xrfnb.model.trainingdata import TrainingData
    from xrfnb.physics.materials import Absorber

    params = dict(fit.parameters)
    params["optics"] = FittedParameter("polycapillary", None, "fitted", "test")
    params["tube_filter"] = FittedParameter("Cu", None, "fitted", "test")
    params["tube_filter_um"] = FittedParameter(50.0, 3.0, "fitted", "test")
    params["detector_thickness_um"] = FittedParameter(1000.0, 100.0, "fitted", "test")
    hard = dataclasses.replace(fit, parameters=params, instrument=fit.instrument.with_(
        optics="polycapillary", tube_filters=(Absorber("Cu", 50.0),), detector_thickness_um=1000.0))
    cfg = adaptation_config(base, hard, minutes=1.0)
    assert len(cfg.data.instruments) == 1
    assert cfg.data.tube_filters == ("Cu:44", "Cu:47", "Cu:50", "Cu:53", "Cu:56")
    assert cfg.data.detector_thickness_um == (800.0, 1200.0)
    variant = TrainingData(cfg.data, n_bins=64)._make_variant(
        cfg.data.instruments[0], np.random.default_rng(1), False)
    assert variant.optics == "polycapillary" and 800.0 <= variant.detector_thickness_um <= 1200.0
    assert [a.material for a in variant.tube_filters] == ["Cu"]
    assert 44 <= variant.tube_filters[0].thickness_um <= 56
    # the thickness not fitted: the fitted instrument's filter as it is; the optics not settled: both ways
    params["tube_filter_um"] = FittedParameter(50.0, None, "not determined", "test")
    params["optics"] = FittedParameter("polycapillary", None, "not determined", "test")
    params["detector_thickness_um"] = FittedParameter(1000.0, None, "not determined", "test")
    loose = adaptation_config(base, dataclasses.replace(hard, parameters=params), minutes=1.0)
    assert loose.data.tube_filters == () and len(loose.data.instruments) == 2
    assert loose.data.detector_thickness_um == cfg_base_detector(base)
    kept = Instrument.from_dict(loose.data.instruments[0])
    assert [(a.material, a.thickness_um) for a in kept.tube_filters] == [("Cu", 50.0)]


def cfg_base_detector(base) -> tuple[float, float] | None:
    value = base.meta["training"]["data"].get("detector_thickness_um")
    return None if value is None else tuple(value)


def test_optics_and_atmosphere_from_a_bruker_header_are_kept(base):
    """Started from the M6 file's own XRF header (Instrument.from_file), the adaptation keeps the
    header's lens and atmosphere instead of drawing them."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "bruker_m6_jetstream_p059.spx"
    if not path.exists():
        pytest.skip(f"the real M6 spectrum is not at {path} (../shared/data/real beside the checkout)")
    header = Instrument.from_file(path)
    fit = xrfnb.fit_instrument(xrfnb.load(path), start=header)
    cfg = adaptation_config(base, fit, minutes=1.0)
    (inst_d,) = cfg.data.instruments
    assert Instrument.from_dict(inst_d).optics == header.optics == "polycapillary"
    assert cfg.data.atmosphere_probs is None
    # the header's lens, filters and detector are not re-guessed from the continuum's shape
    assert fit["optics"].status == "fixed" and "header" in fit["optics"].evidence
    assert fit["detector_thickness_um"].value == header.detector_thickness_um
    assert fit.instrument.tube_filters == header.tube_filters


def test_adapted_model_is_a_model_folder_with_its_record_and_card(base, adapted, fit):
    out, model = adapted
    again = xrfnb.load_model(out)
    assert again.classes == base.classes
    record = json.loads((out / "model.json").read_text())["adapted"]
    assert record["from_model"] == "tiny-base" and record["steps"] >= 1
    assert record["instrument"]["anode"] == "W" and record["instrument"]["n_channels"] == 1024
    sets = {r["set"] for r in record["validation"]}
    assert sets == {"single", "mixture", "buried", "low"}
    # fine-tuned from the base weights: changed, but close to them (60 small steps, not a fresh net)
    w0 = {k: p.detach() for k, p in base.net.named_parameters()}

    def params(m: xrfnb.PigmentModel) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in m.net.named_parameters()}

    changed = [float((p - w0[k]).abs().max()) for k, p in params(model).items()]
    assert max(changed) > 0
    fresh = train_model({**TINY, "optim": {**TINY["optim"], "seed": 99, "max_steps": 1, "workers": 0}},
                        out.parent / "fresh", progress=False)
    to_base = sum(float((p - w0[k]).norm()) for k, p in params(model).items())
    fresh_to_base = sum(float((p - w0[k]).norm()) for k, p in params(fresh).items())
    assert to_base < 0.5 * fresh_to_base
    # thresholds and OOD statistics re-fitted on the adapted distribution
    assert not np.array_equal(model.thresholds, base.thresholds)
    card = (out / "README.md").read_text()
    assert "tube anode" in card and "W" in card and "| single | 1,000 |" in card
    assert "Use it only for scans from this instrument" in card


def test_adapting_into_a_used_folder_needs_resume(base, adapted, fit):
    out, _ = adapted
    with pytest.raises(xrfnb.XRFNBError, match="resume"):
        adapt_model(base, fit, out, minutes=0.05, progress=False)
    with pytest.raises(xrfnb.XRFNBError, match="positive"):
        adapt_model(base, fit, out.parent / "x", minutes=0)
    with pytest.raises(xrfnb.XRFNBError, match="InstrumentFit"):
        adapt_model(base, TRUTH, out.parent / "y")  # type: ignore[arg-type]


def test_an_instrument_named_by_metadata_but_no_preset_is_a_clear_error(spectrum):
    with pytest.raises(xrfnb.XRFNBError, match="names the instrument 'w-tube', which is not a preset"):
        xrfnb.physics.instrument.resolve_instrument(None, spectrum.metadata)


def test_cli_adapt_and_identify_advice(base, spectrum, tmp_path, capsys, monkeypatch):
    src = tmp_path / "w_tube.h5"
    # as a user's file: counts, calibration and live time, no simulator metadata
    plain = xrfnb.Spectrum(spectrum.counts, spectrum.calibration, live_time_s=spectrum.live_time_s)
    xrfnb.save(xrfnb.Scan.from_spectrum(plain), src)
    folder = tmp_path / "maps-model"  # where `identify -o maps.h5 --adapt` keeps its adapted model
    rc = cli.main(["adapt", str(src), "--out", str(folder), "--model", str(base.path), "--minutes", "0.05",
                   "--anode", "W", "-q"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "adapted model written to" in err and f"--model {folder}" in err
    assert json.loads((folder / "model.json").read_text())["adapted"]["instrument"]["anode"] == "W"
    # an existing model is never overwritten
    assert cli.main(["adapt", str(src), "--out", str(folder), "--model", str(base.path), "-q"]) != 0
    assert "already holds a model" in capsys.readouterr().err
    # identify says plainly when most pixels are out of distribution, and how to adapt
    monkeypatch.setattr(cli, "_ood_share", lambda maps: 0.8)
    rc = cli.main(["identify", str(src), "-o", str(tmp_path / "plain.h5"), "--model", str(base.path), "-q"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "80 % of the pixels are unlike anything the model was trained on" in err
    assert f"xrfnb adapt {src} --out MODEL_FOLDER" in err
    # identify --adapt uses the adapted model kept beside its output (no second adaptation)
    maps_h5 = tmp_path / "maps.h5"
    rc = cli.main(["identify", str(src), "-o", str(maps_h5), "--model", str(base.path), "--adapt", "-q"])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"using the adapted model in {folder}" in err and "adapting" not in err
    maps = PigmentMaps.from_hdf5(tmp_path / "maps.h5")
    assert "tiny-base-adapted" in json.dumps(maps.metadata["model"])


def test_a_factored_model_is_adapted_as_the_network_it_is(base, fit, tmp_path):
    """A model factored after training (``factor_model``: a full layer in its training record, a factored
    one in its weights) is fine-tuned with its factored layer, not rebuilt from the record."""
    from xrfnb.model.train import factor_model

    factored = factor_model(base, 8, tmp_path / "factored")
    cfg = adaptation_config(factored, fit, minutes=0.05)
    assert cfg.model.rank == 8 and factored.meta["training"]["model"]["rank"] == 0
    assert adaptation_config(base, fit, minutes=0.05).model.rank == 0
    adapted = factored.adapt(fit, tmp_path / "adapted", minutes=0.05, progress=False, n_val=128,
                             validation_n_per_cell=8)
    assert adapted.net.rank == 8
    assert xrfnb.load_model(tmp_path / "adapted").meta["architecture"]["rank"] == 8
