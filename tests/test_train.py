"""Training data, labels, the training loop (tiny runs), checkpoints/resume and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xraylib

import xrfnb._errors as xrfnb_errors
from xrfnb import Instrument, ModelError
from xrfnb.model.model import PigmentModel
from xrfnb.model.train import (
    GROUP_SIZE,
    _BatchStream,
    _training_data,
    best_f1_thresholds,
    fit_temperature,
    load_config,
    prf,
    recalibrate_model,
    train_model,
    validation_set,
)
from xrfnb.model.trainingdata import (
    MAX_PAINT_LAYERS,
    N_LAYERS,
    DataConfig,
    StackBatch,
    TrainingData,
    pigment_table,
    sample_stacks,
)

TINY = {
    "name": "tiny-test",
    "model": {"hidden": [32, 16], "conv_channels": 2},
    "data": {"instruments": ["bruker-m6"], "instrument_weights": [1.0], "n_instrument_variants": 1,
             "variants_per_batch": 1},
    "optim": {"batch_size": 32, "max_steps": 12, "time_budget_min": 10.0, "n_val": 192, "workers": 0,
              "checkpoint_every": 3, "threads": 1, "seed": 5},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    model = train_model(TINY, out, progress=False)
    return out, model


# -- sampling and labels ------------------------------------------------------------------------------
def test_sampled_stacks_are_valid_mixtures():
    rng = np.random.default_rng(0)
    sb = sample_stacks(200, rng, DataConfig())
    used = sb.mt > 0
    np.testing.assert_allclose(sb.W.sum(axis=2)[used], 1.0, atol=1e-9)
    assert np.all(sb.W >= 0) and np.all(sb.pigment_wt >= 0)
    # every sample has a top layer, layer counts follow the configured 1-3
    assert used[:, 0].all() and set(np.unique(sb.n_paint)) <= {1, 2, 3}
    # top layers 2-60 um of paint with densities between oil (0.93) and lead white (6.8 g/cm3)
    assert sb.mt[:, 0].min() >= 2e-4 * 0.93 and sb.mt[:, 0].max() <= 60e-4 * 6.8
    # pigments of a layer never exceed its weight; minor pigments reach down to ~1 wt%
    tab = pigment_table()
    pig_total = sb.pigment_wt.sum(axis=2)
    assert np.all(pig_total <= 1 + 1e-9)
    nz = sb.pigment_wt[:, :MAX_PAINT_LAYERS][sb.pigment_wt[:, :MAX_PAINT_LAYERS] > 0]
    assert nz.min() < 0.03
    # element mass balance of a pigment-only row: pigment weights x compositions <= element weights
    np.testing.assert_array_less(
        np.einsum("bnp,pe->bne", sb.pigment_wt, tab.composition) - 1e-9, sb.W + 1e-12
    )


def test_xrf_silent_group_is_not_a_class_and_classes_are_library_groups():
    import xrfnb

    lib = xrfnb.pigments()
    tab = pigment_table()
    groups = lib.groups()
    silent = [g for g, names in groups.items() if all(lib[n].xrf_silent for n in names)]
    assert silent and not set(silent) & set(tab.classes)
    assert set(tab.classes) == set(groups) - set(silent)


def _stack(tab, layers, ground=None):
    """One StackBatch from [(pigment, weight fraction, thickness_um), ...] in linseed oil."""
    n_el, n_pig = len(tab.elements), len(tab.names)
    W = np.zeros((1, N_LAYERS, n_el))
    mt = np.zeros((1, N_LAYERS))
    pw = np.zeros((1, N_LAYERS, n_pig))
    for j, (name, w, t_um) in enumerate(layers):
        p = tab.index(name)
        comp = w * tab.composition[p] + (1 - w) * tab.binder_composition[0]
        W[0, j] = comp
        pw[0, j, p] = w
        rho = 1.0 / (w / tab.density[p] + (1 - w) / tab.binder_density[0])
        mt[0, j] = rho * t_um * 1e-4
    return StackBatch(W, mt, pw, np.array([len(layers)]))


def test_visibility_label_follows_attenuation_by_overlayers():
    """Vermilion (Hg L lines ~10 keV) is visible on top, 'buried' under a thin layer of a light pigment and
    absent (invisible) under 200 um of lead white, whose transmission at Hg La alone is < 1e-3 (xraylib)."""
    tab = pigment_table()
    data = TrainingData(DataConfig(instruments=("bruker-m6",), instrument_weights=(1.0,),
                                   n_instrument_variants=1, variants_per_batch=1))
    k = tab.classes.index("vermilion")
    cases = {
        "top": [("vermilion", 0.6, 20.0)],
        "under thin ultramarine": [("ultramarine", 0.5, 5.0), ("vermilion", 0.6, 20.0)],
        "under thick lead white": [("lead white", 0.8, 200.0), ("vermilion", 0.6, 20.0)],
    }
    # independent check of the premise with xraylib: Hg La through 200 um of 80 % lead white in oil
    rho_lw = 1.0 / (0.8 / 6.8 + 0.2 / 0.93)
    mu = 0.8 * xraylib.CS_Total_CP("Pb3C2O8H2", 9.99) + 0.2 * xraylib.CS_Total_CP("C18H32O2", 9.99)
    assert math.exp(-mu * rho_lw * 200e-4 / math.sin(math.radians(40))) < 1e-3
    got = {}
    for name, layers in cases.items():
        sb = _stack(tab, layers)
        inst = data._make_variant("bruker-m6", np.random.default_rng(0), False)
        _, labels = data._simulate_group(sb, inst, np.array([20000.0]), np.random.default_rng(1))
        got[name] = int(labels[0, k])
    assert got == {"top": 1, "under thin ultramarine": 2, "under thick lead white": 0}


def test_low_counts_hide_a_trace_pigment():
    """The same 2 wt% cobalt blue in lead white is visible at 50,000 counts and not at 100."""
    tab = pigment_table()
    data = TrainingData(DataConfig(instruments=("bruker-m6",), instrument_weights=(1.0,),
                                   n_instrument_variants=1, variants_per_batch=1))
    n_el, n_pig = len(tab.elements), len(tab.names)
    W = np.zeros((2, N_LAYERS, n_el))
    pw = np.zeros((2, N_LAYERS, n_pig))
    lw, cb = tab.index("lead white"), tab.index("cobalt blue")
    comp = 0.6 * tab.composition[lw] + 0.02 * tab.composition[cb] + 0.38 * tab.binder_composition[0]
    W[:, 0] = comp
    pw[:, 0, lw], pw[:, 0, cb] = 0.6, 0.02
    mt = np.zeros((2, N_LAYERS))
    mt[:, 0] = 2.5 * 30e-4
    sb = StackBatch(W, mt, pw, np.array([1, 1]))
    inst = data._make_variant("bruker-m6", np.random.default_rng(0), False)
    _, labels = data._simulate_group(sb, inst, np.array([50000.0, 100.0]), np.random.default_rng(2))
    k = tab.classes.index("cobalt pigments (Co)")
    assert labels[0, k] == 1 and labels[1, k] == 0
    assert labels[0, tab.classes.index("lead pigments (Pb)")] == 1


# -- calibration helpers -----------------------------------------------------------------------------
def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    import torch

    rng = np.random.default_rng(0)
    n, k = 4000, 3
    true_logits = torch.from_numpy(rng.normal(0, 1.5, (n, k, 3)))
    p = torch.softmax(true_logits, dim=2).numpy()
    cum = p.cumsum(axis=2)
    u = rng.random((n, k, 1))
    labels = torch.from_numpy((u > cum).sum(axis=2).clip(0, 2))
    t = fit_temperature(true_logits * 2.0, labels)  # logits twice too sharp -> T ~ 2
    assert 1.6 < t < 2.5


def test_thresholds_and_prf_against_hand_counts():
    truth = np.array([[1, 0], [1, 0], [0, 0], [0, 1]], bool)
    prob = np.array([[0.9, 0.1], [0.4, 0.2], [0.3, 0.1], [0.2, 0.8]])
    thr = best_f1_thresholds(prob, truth)
    assert 0.3 < thr[0] <= 0.4 and 0.2 < thr[1] <= 0.8
    pc = prf(prob >= 0.5, truth)
    # class 0: tp 1, fn 1 -> P 1, R 0.5, F1 2/3; class 1: tp 1 -> 1, 1, 1
    np.testing.assert_allclose(pc["precision"], [1, 1])
    np.testing.assert_allclose(pc["recall"], [0.5, 1])
    np.testing.assert_allclose(pc["f1"], [2 / 3, 1])


def test_load_config_rejects_unknown_keys_and_reads_the_default():
    cfg = load_config(None)
    assert cfg.name == "xrfnb-pigments-v1" and cfg.optim.time_budget_min <= 60
    with pytest.raises(ModelError, match="unknown keys"):
        load_config({"optim": {"learning_rate": 1}})
    with pytest.raises(ModelError, match="unknown sections"):
        load_config({"trainer": {}})
    with pytest.raises(ModelError, match="does not exist"):
        load_config("/nonexistent/config.toml")


# -- tiny end-to-end run ------------------------------------------------------------------------------
def test_tiny_training_run_end_to_end(tiny_run):
    out, model = tiny_run
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == list(pigment_table().classes)
    assert meta["training"]["steps"] == 12 and meta["training"]["optim"]["seed"] == 5
    assert len(meta["thresholds"]) == len(meta["classes"]) and meta["temperature"] > 0
    assert math.isfinite(meta["ood"]["threshold"])
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12
    reloaded = PigmentModel.from_dir(out, precision=model.precision)
    data = TrainingData(load_config(TINY).data)
    _, _, raws, _ = data.batch_raw(8, np.random.default_rng(9), counts=2000.0)
    _, raw, cal, _ = raws[0]
    a = model.identify_batch(raw, cal)
    b = reloaded.identify_batch(raw, cal)
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.ood_score, b.ood_score)
    ident = reloaded.identify(raw[0], cal)
    assert ident.probability.shape == (len(model.classes),)


def test_existing_run_needs_resume(tiny_run):
    out, _ = tiny_run
    with pytest.raises(ModelError, match="resume"):
        train_model(TINY, out, progress=False)


def test_interrupted_run_resumes_to_the_same_weights(tiny_run, tmp_path, monkeypatch):
    _, model_a = tiny_run
    original = _BatchStream.get
    calls = {"n": 0}

    def interrupt_once(self, step):
        if step == 7 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(_BatchStream, "get", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        train_model(TINY, tmp_path, progress=False)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7
    model_b = train_model(TINY, tmp_path, resume=True, progress=False)
    for (ka, va), (kb, vb) in zip(model_a.net.state_dict().items(), model_b.net.state_dict().items(),
                                  strict=True):
        assert ka == kb
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-5, atol=1e-6)


def test_init_from_starts_a_new_run_from_trained_weights(tiny_run, tmp_path):
    out, model_a = tiny_run
    # lr = 0: AdamW (weight decay included) leaves the weights untouched, so the new run must end with
    # exactly the source model's weights; a random initialisation would not
    cfg = {**TINY, "optim": {**TINY["optim"], "max_steps": 3, "lr": 0.0, "seed": 6, "init_from": str(out)}}
    model_b = train_model(cfg, tmp_path / "ft", progress=False)
    for (ka, va), (kb, vb) in zip(model_a.net.state_dict().items(), model_b.net.state_dict().items(),
                                  strict=True):
        assert ka == kb
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    state = json.loads((tmp_path / "ft" / "checkpoint" / "state.json").read_text())
    assert state["init_from"].endswith("model.safetensors") and state["step"] == 3
    meta = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert meta["training"]["optim"]["init_from"] == str(out)
    # a checkpoint folder works too (its weights are the final ones of the run)
    from xrfnb.model.nn import PigmentNet
    from xrfnb.model.train import _init_weights

    net = PigmentNet(512, len(model_a.classes), conv_channels=2, hidden=(32, 16), dropout=0.1)
    assert _init_weights(net, out / "checkpoint").name == "state.safetensors"
    for va, vc in zip(model_a.net.state_dict().values(), net.state_dict().values(), strict=True):
        np.testing.assert_array_equal(va.numpy(), vc.numpy())
    # a different network shape or a missing source is refused
    bigger = {**cfg, "model": {"hidden": [48, 16], "conv_channels": 2}}
    with pytest.raises(ModelError, match="init_from: cannot load"):
        train_model(bigger, tmp_path / "bad", progress=False)
    with pytest.raises(ModelError, match="init_from: no model"):
        train_model({**cfg, "optim": {**cfg["optim"], "init_from": str(tmp_path / "none")}}, tmp_path / "x",
                    progress=False)


def test_evaluate_runs_on_a_tiny_model(tiny_run):
    from xrfnb.model.evaluate import evaluate_model

    _, model = tiny_run
    rep = evaluate_model(model, n_per_cell=16, counts=(1000,), sets=("single", "buried"), baseline=False,
                         progress=False)
    rows = rep.table("model")
    assert [(r["set"], r["counts"]) for r in rows] == [("single", 1000), ("buried", 1000)]
    for r in rows:
        assert 0 <= r["macro_f1"] <= 1 and r["n"] == 16
    # the buried target F1 is the F1 of the error counts it reports; shared-element errors are a subset
    e = rows[1]["buried_errors"]
    assert rows[0]["buried_errors"] is None and e["tp"] + e["fn"] > 0
    assert rows[1]["target_f1"] == pytest.approx(2 * e["tp"] / (2 * e["tp"] + e["fp"] + e["fn"]))
    assert 0 <= e["fp_shared"] <= e["fp"] and 0 <= e["fn_shared"] <= e["fn"]
    md = rep.to_markdown()
    assert "| single | 1,000 |" in md
    with pytest.raises(ModelError, match="unknown evaluation sets"):
        evaluate_model(model, sets=("everything",), baseline=False, progress=False)


def test_validation_and_evaluation_sets_span_the_instrument_variants(tiny_run, monkeypatch):
    """Calibration and evaluation draw an instrument variant per group of GROUP_SIZE spectra, not one per
    ``variants_per_batch`` (2) for the whole set: thresholds, temperature and OOD references must see
    the whole instrument envelope, and each evaluation cell must cover the held-out one."""
    from xrfnb.model.evaluate import evaluate_model

    cfg = load_config({**TINY, "data": {"n_instrument_variants": 8, "variants_per_batch": 2},
                       "optim": {**TINY["optim"], "n_val": 4 * GROUP_SIZE}})
    data = TrainingData(cfg.data)
    drawn = []
    original = TrainingData._instrument

    def record(self, rng, wider):
        inst = original(self, rng, wider)
        drawn.append((wider, id(inst)))
        return inst

    monkeypatch.setattr(TrainingData, "_instrument", record)
    binned, labels = validation_set(data, cfg)
    assert binned.shape[0] == labels.shape[0] == 4 * GROUP_SIZE
    assert len(drawn) == 4 and len(set(drawn)) >= 3  # a training batch would have drawn 2
    assert all(not w for w, _ in drawn)
    # an evaluation cell: one held-out variant per group of GROUP_SIZE spectra
    drawn.clear()
    _, model = tiny_run
    evaluate_model(model, n_per_cell=3 * GROUP_SIZE, counts=(1000,), sets=("single",), baseline=False,
                   progress=False)
    assert len(drawn) == 3 and all(w for w, _ in drawn)


def test_recalibrating_a_trained_model_reproduces_its_calibration(tiny_run, tmp_path):
    """recalibrate_model is train_model's calibration step: same network and code, same calibration."""
    out, model = tiny_run
    again = recalibrate_model(out, tmp_path / "recal")
    assert again.meta["temperature"] == model.meta["temperature"]
    assert again.meta["thresholds"] == model.meta["thresholds"]
    assert again.meta["ood"] == model.meta["ood"]
    assert again.meta["metrics"] == model.meta["metrics"]
    for va, vb in zip(model.net.state_dict().values(), again.net.state_dict().values(), strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    meta = json.loads((tmp_path / "recal" / "model.json").read_text())
    assert meta["training"]["steps"] == 12 and "recalibrated" in meta["training"]
    assert (out / "model.json").read_text() != (tmp_path / "recal" / "model.json").read_text()


def _train_on_a_clock(tmp_path, monkeypatch, seconds_per_step, budget_min: float):
    """Train TINY for up to 5,000 steps against a fake clock that advances ``seconds_per_step(step)`` per
    batch fetched; returns the model."""
    import types

    import xrfnb.model.train as tr

    clock = {"t": 0.0}
    monkeypatch.setattr(tr, "time", types.SimpleNamespace(
        perf_counter=lambda: clock["t"], strftime=tr.time.strftime, gmtime=tr.time.gmtime))
    original = _BatchStream.get

    def timed_get(self, step):
        clock["t"] += seconds_per_step(step)
        return original(self, step)

    monkeypatch.setattr(_BatchStream, "get", timed_get)
    cfg = {**TINY, "optim": {**TINY["optim"], "max_steps": 5000, "time_budget_min": budget_min, "reuse": 100,
                             "checkpoint_every": 1000}}
    return train_model(cfg, tmp_path, progress=False)


def test_step_plan_comes_from_the_warmed_up_speed(tmp_path, monkeypatch):
    """The run is fitted into its time budget from the speed of steps 100-400, not the faster start."""
    # seconds per step (binary fractions: exact sums)
    model = _train_on_a_clock(tmp_path, monkeypatch, lambda step: 1 / 128 if step < 100 else 1 / 64, 0.25)
    # budget 15 s; at step 400 the clock reads 100/128 + 300/64 = 5.47 s, and the remaining 9.53 s at
    # 1/64 s per step make 610 more steps. (The step-40 speed, 1/128 s per step, would have planned 1,920.)
    assert model.meta["training"]["steps"] == 1010
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["planned_steps"] == 1010 and state["step"] == 1010


def test_a_slow_start_does_not_end_the_run_early(tmp_path, monkeypatch):
    """The first steps of a new instrument are slow (its tables are built); a plan fixed from them ended
    5-minute adaptations after 1.8 minutes. The run now uses its whole budget."""
    # seconds per step: slow start, then steady
    model = _train_on_a_clock(tmp_path, monkeypatch, lambda step: 1.0 if step < 40 else 1 / 16, 2.0)
    # budget 120 s: the first 40 steps take 40 s; at step 400 the clock reads 40 + 360/16 = 62.5 s, and
    # the remaining 57.5 s at 1/16 s per step make 920 more steps: 1,320 in all, 120 s. (Fixed at step 40
    # from the speed of steps 20-40, 1 s per step, the plan was 120 steps: 43 s of the 120.)
    assert model.meta["training"]["steps"] == 1320
    assert model.meta["training"]["train_time_s"] == pytest.approx(120.0, abs=0.1)


def test_pileup_option_adds_sum_peaks_to_training_spectra():
    """With [data] pileup on, training spectra carry Pb L + Pb L sum peaks (about 21.1 keV) at the drawn
    count rate; labels still follow the visibility rule. Off (the default) there are none."""
    tab = pigment_table()
    k_pb = tab.classes.index("lead pigments (Pb)")
    got = {}
    for on in (False, True):
        data = TrainingData(DataConfig(instruments=("bruker-m6",), instrument_weights=(1.0,),
                                       n_instrument_variants=1, variants_per_batch=1, pileup=on,
                                       count_rate_cps=(4e5, 4e5)))
        sb = _stack(tab, [("lead white", 0.7, 40.0)])
        sb = StackBatch(np.repeat(sb.W, 200, 0), np.repeat(sb.mt, 200, 0), np.repeat(sb.pigment_wt, 200, 0),
                        np.repeat(sb.n_paint, 200))
        inst = data._make_variant("bruker-m6", np.random.default_rng(0), False).with_(pileup_time_s=5e-7)
        raw, labels = data._simulate_group(sb, inst, np.full(200, 3000.0), np.random.default_rng(4))
        win = np.abs(inst.channel_energy_keV - 2 * 10.55) < 0.2
        got[on] = raw[:, win].sum(axis=1).mean()
        assert np.all(labels[:, k_pb] == 1)
        assert raw.sum(axis=1).mean() == pytest.approx(3000, rel=0.02)
        assert (data.envelope()["pileup_count_rate_cps"] is not None) == on
    assert got[True] > 10 * max(got[False], 0.1)


def test_argon_option_adds_the_air_lines_to_training_spectra():
    """With [data] argon on, training spectra of a weak emitter carry Ar Ka (2.957 keV) from the air; the
    beam path is drawn from [data] beam_path_mm. Off (the default) there is none, and the presets' beam
    path is kept."""
    tab = pigment_table()
    got = {}
    for on in (False, True):
        cfg = DataConfig(instruments=("bruker-m6",), instrument_weights=(1.0,), n_instrument_variants=1,
                         variants_per_batch=1, argon=on, beam_path_mm=(18.0, 20.0) if on else None)
        data = TrainingData(cfg)
        inst = data._make_variant("bruker-m6", np.random.default_rng(0), False)
        preset_mm = Instrument.preset("bruker-m6").beam_path_mm
        assert (18.0 <= inst.beam_path_mm <= 20.0) if on else inst.beam_path_mm == preset_mm
        sb = _stack(tab, [("ultramarine", 0.5, 40.0)])
        sb = StackBatch(np.repeat(sb.W, 200, 0), np.repeat(sb.mt, 200, 0), np.repeat(sb.pigment_wt, 200, 0),
                        np.repeat(sb.n_paint, 200))
        raw, _ = data._simulate_group(sb, inst, np.full(200, 3000.0), np.random.default_rng(4))
        win = np.abs(inst.channel_energy_keV - 2.957) < 0.08
        got[on] = raw[:, win].sum(axis=1).mean()
        assert data.envelope()["argon"] == on
    # argon_lines: several per cent of an ultramarine spectrum's counts on this instrument
    assert got[True] > got[False] + 50
    with pytest.raises(ModelError, match="beam_path_mm"):
        DataConfig(beam_path_mm=(5.0, 1.0))


def test_secondary_option_adds_the_enhancement_between_layers():
    """With [data] secondary on, Zn K lines of a zinc white layer (8.6 keV, above the Fe K edge at 7.11 keV)
    excite the iron of the ochre above it: Fe Ka takes a larger share of the counts. Labels do not change."""
    tab = pigment_table()
    sb = _stack(tab, [("yellow ochre", 0.3, 10.0), ("zinc white", 0.7, 40.0)])
    n = 50
    sb = StackBatch(np.repeat(sb.W, n, 0), np.repeat(sb.mt, n, 0), np.repeat(sb.pigment_wt, n, 0),
                    np.repeat(sb.n_paint, n))
    share, labels = {}, {}
    for on in (False, True):
        cfg = DataConfig(instruments=("bruker-m6",), instrument_weights=(1.0,), n_instrument_variants=1,
                         variants_per_batch=1, secondary=on)
        data = TrainingData(cfg)
        inst = data._make_variant("bruker-m6", np.random.default_rng(0), False)
        raw, labels[on] = data._simulate_group(sb, inst, np.full(n, 20000.0), np.random.default_rng(4))
        fe = np.abs(inst.channel_energy_keV - xraylib.LineEnergy(26, xraylib.KA_LINE)) < 0.1
        share[on] = raw[:, fe].sum() / raw.sum()
    assert share[True] > 1.03 * share[False]
    np.testing.assert_array_equal(labels[True], labels[False])


# -- the wider instrument envelope ----------------------------------------------------------------------
def test_wider_envelope_draws_every_option_within_its_range():
    """Each configured range is drawn per variant within its bounds; the channels reach 41 keV."""
    cfg = DataConfig(
        instruments=("bruker-m4", "synchrotron"), instrument_weights=(0.8, 0.2), n_instrument_variants=12,
        anodes=("W", "Ag", "Cr"), anode_weights=(0.5, 0.3, 0.2), tube_voltage_kV=(20.0, 45.0),
        incidence_deg=(45.0, 90.0), takeoff_deg=(35.0, 65.0), detector_azimuth_deg=(60.0, 180.0),
        detector_thickness_um=(300.0, 1000.0), detector_window_um=(8.0, 25.0),
        partial_collection=(0.0, 0.015), atmosphere_probs=(0.0, 0.5, 0.5), channel_gains_keV=(0.02, 0.04))
    data = TrainingData(cfg, n_bins=64)
    rng = np.random.default_rng(3)
    seen_anodes, seen_gains = set(), set()
    for preset in ("bruker-m4", "synchrotron") * 6:
        inst = data._make_variant(preset, rng, False)
        if preset == "synchrotron":
            assert inst.anode is None and inst.monochromatic_keV == 18.0  # no tube to change
        else:
            seen_anodes.add(inst.anode)
            assert 20.0 <= inst.tube_voltage_kV <= 45.0
        assert 45.0 <= inst.incidence_deg <= 90.0 and 35.0 <= inst.takeoff_deg <= 65.0
        assert 60.0 <= inst.detector_azimuth_deg <= 180.0
        assert 300.0 <= inst.detector_thickness_um <= 1000.0
        assert inst.detector_window.material == "Be" and 8.0 <= inst.detector_window.thickness_um <= 25.0
        assert 0.0 <= inst.partial_collection <= 0.015
        assert inst.atmosphere in ("helium", "vacuum")
        seen_gains.add(inst.calibration.gain_keV)
        gain = inst.calibration.gain_keV
        assert 41.0 - gain - 1e-9 <= inst.channel_energy_keV[-1] < 41.0 + 1e-9
    assert seen_anodes <= {"W", "Ag", "Cr"} and len(seen_anodes) >= 2
    assert seen_gains == {0.02, 0.04}


def test_unset_envelope_options_keep_older_configs_variants():
    """A config without the new options draws exactly the instruments it drew before they existed (the
    options are drawn after the older ones, and only when set)."""
    data = TrainingData(DataConfig(), n_bins=64)
    a = data._make_variant("bruker-m6", np.random.default_rng(11), False)
    rng = np.random.default_rng(11)
    base = TrainingData(DataConfig(), n_bins=64)._make_variant("bruker-m6", rng, False)
    assert a == base
    preset = load_config(None).data
    assert preset.anodes and preset.channel_gains_keV  # the shipped config uses them
    assert a.anode == "Rh" and a.calibration == base.calibration


def test_envelope_options_are_checked_early():
    with pytest.raises(ModelError, match="atmosphere_probs"):
        DataConfig(atmosphere_probs=(1.0, 0.0))
    with pytest.raises(ModelError, match="anode_weights"):
        DataConfig(anodes=("Rh", "W"), anode_weights=(1.0,))
    with pytest.raises(xrfnb_errors.InstrumentError):
        DataConfig(anodes=("Xx",))


def test_tube_filter_sets_are_drawn_per_tube_variant_after_every_other_option():
    """Filter sets replace the preset's filters on tube variants, by weight; a zero weight is never drawn;
    the monochromatic beam keeps its own; every other option draws as without filters (drawn last)."""
    from xrfnb.model.trainingdata import filter_set

    sets = ("none", "Al:630", "Al:100+Ti:50+Cu:25", "Cu:1000")
    kw = dict(instruments=("bruker-m4", "synchrotron"), instrument_weights=(0.8, 0.2),
              anodes=("Rh", "W"), tube_voltage_kV=(20.0, 50.0), channel_gains_keV=(0.01, 0.02))
    with_filters = TrainingData(DataConfig(**kw, tube_filters=sets, tube_filter_weights=(1.0, 1.0, 2.0, 0.0)),
                                n_bins=64)
    without = TrainingData(DataConfig(**kw), n_bins=64)
    seen = []
    for seed in range(40):
        for preset in ("bruker-m4", "synchrotron"):
            a = with_filters._make_variant(preset, np.random.default_rng(seed), False)
            b = without._make_variant(preset, np.random.default_rng(seed), False)
            if preset == "synchrotron":
                assert a == b
                continue
            assert a == b.with_(tube_filters=a.tube_filters)
            seen.append(a.tube_filters)
    assert filter_set("Cu:1000") not in seen
    counted = {s: sum(f == filter_set(s) for f in seen) for s in sets[:3]}
    assert all(n > 0 for n in counted.values()) and sum(counted.values()) == 40
    assert counted["Al:100+Ti:50+Cu:25"] > max(counted["none"], counted["Al:630"])  # weight 2 of 4
    layers = filter_set("Al:100+Ti:50+Cu:25")
    assert [(x.material, x.thickness_um) for x in layers] == [("Al", 100.0), ("Ti", 50.0), ("Cu", 25.0)]


def test_a_drawn_tube_filter_attenuates_the_beam_as_beer_lambert_says():
    """Al 630 um drawn into a lab-mo variant: the beam reaching the sample is multiplied by the foil's
    transmission and nothing else. Reference: NIST XCOM mu/rho of Al (Hubbell & Seltzer), 26.23 cm2/g at
    10 keV and 3.441 cm2/g at 20 keV, density 2.699 g/cm3."""
    import math

    filt = TrainingData(DataConfig(tube_filters=("Al:630",)), n_bins=64)._make_variant(
        "lab-mo", np.random.default_rng(0), False)
    assert [(x.material, x.thickness_um) for x in filt.tube_filters] == [("Al", 630.0)]
    e = np.array([10.0, 20.0])
    ratio = filt.incident_transmission(e) / filt.with_(tube_filters=()).incident_transmission(e)
    expected = [math.exp(-mu * 2.699 * 0.063) for mu in (26.23, 3.441)]
    assert ratio == pytest.approx(expected, rel=0.03)


def test_tube_filter_options_are_checked_early():
    with pytest.raises(ModelError, match="tube_filters entry 'Al100'"):
        DataConfig(tube_filters=("Al100",))
    with pytest.raises(ModelError, match="unknown material"):
        DataConfig(tube_filters=("none", "Xx:5"))
    with pytest.raises(ModelError, match="tube_filter_weights"):
        DataConfig(tube_filters=("none", "Al:12.5"), tube_filter_weights=(1.0,))


# -- a factored first layer ---------------------------------------------------------------------------
def _first_layer_error(net_full, net_small, binned):
    """Mean squared change of the first layer's output (before the ReLU) over the spectra."""
    import torch

    from xrfnb.model.nn import features_from_binned

    with torch.inference_mode():
        x, lc = features_from_binned(torch.from_numpy(binned))
        h = net_full.first_layer_inputs(x, lc)
        full = net_full.mlp[0](h)
        small = net_small.mlp[0](net_small.project(h)) if net_small.rank else net_small.mlp[0](h)
    return float(((full - small) ** 2).mean())


def test_a_factored_first_layer_is_the_best_of_its_rank_on_the_spectra_it_serves(tiny_run):
    """Eckart-Young in the inputs' metric: the factors fitted to the spectra change the layer's output
    on those spectra by no more than the plain truncated SVD of the weights at the same rank (which
    ignores where the inputs lie), and at full rank not at all."""
    import copy

    import torch

    from xrfnb.model.nn import factor_first_layer

    net = tiny_run[1].net
    binned, _ = validation_set(_training_data(load_config(TINY)), load_config(TINY))
    width = net.mlp[0].out_features  # 32
    exact = factor_first_layer(net, binned, width)
    assert exact.rank == width and _first_layer_error(net, exact, binned) < 1e-8
    for rank in (2, 4, 8):
        fitted = factor_first_layer(net, binned, rank)
        plain = copy.deepcopy(net)
        u, s, vh = torch.linalg.svd(net.mlp[0].weight.detach().double(), full_matrices=False)
        plain.mlp[0].weight.data = (u[:, :rank] * s[:rank] @ vh[:rank]).float()
        err_fitted = _first_layer_error(net, fitted, binned)
        err_plain = _first_layer_error(net, plain, binned)
        assert err_fitted <= err_plain * 1.0001, (rank, err_fitted, err_plain)
    assert err_fitted < err_plain  # at rank 8 of 32 the spectra's directions matter
    with pytest.raises(ModelError, match="already factored"):
        factor_first_layer(fitted, binned, 2)
    with pytest.raises(ModelError, match="rank must be"):
        factor_first_layer(net, binned, width + 1)


def test_init_from_a_full_model_into_a_factored_one_and_back_from_disk(tiny_run, tmp_path):
    """``[model] rank`` with ``init_from`` a full model factors it on the run's validation spectra; at the
    layer's full width that changes no probability, and the saved folder loads as a factored model."""
    import xrfnb

    out = tiny_run[0]
    cfg = {**TINY, "model": {**TINY["model"], "rank": 32},
           "optim": {**TINY["optim"], "max_steps": 0, "init_from": str(out)}}
    factored = train_model(cfg, tmp_path / "f", progress=False)
    loaded = xrfnb.load_model(tmp_path / "f", precision="float32")
    assert loaded.net.rank == 32 and loaded.meta["architecture"]["rank"] == 32
    assert json.loads((tmp_path / "f" / "model.json").read_text())["training"]["model"]["rank"] == 32
    import torch

    binned = torch.from_numpy(validation_set(_training_data(load_config(TINY)), load_config(TINY))[0])
    full = xrfnb.load_model(out, precision="float32")
    np.testing.assert_allclose(loaded._infer_binned(binned)[0].numpy(), full._infer_binned(binned)[0].numpy(),
                               atol=2e-4)
    assert factored.net.rank == 32
    # a rank wider than the layer is refused as the run starts, naming the config
    with pytest.raises(ModelError, match="rank must be"):
        train_model({**cfg, "model": {**cfg["model"], "rank": 33}}, tmp_path / "g", progress=False)


def test_factor_model_keeps_the_training_record_and_the_calls(tiny_run, tmp_path):
    """``factor_model`` at the first layer's full width changes no probability; its record keeps the
    training run as it was (a full layer) and says how it was factored; at a low rank the kept share of
    the layer's output is below one."""
    import torch

    import xrfnb
    from xrfnb.model.train import factor_model

    out, _ = tiny_run
    full = xrfnb.load_model(out, precision="float32")
    same = factor_model(out, 32, tmp_path / "r32")
    assert same.net.rank == 32 and same.meta["architecture"]["rank"] == 32
    record = json.loads((tmp_path / "r32" / "model.json").read_text())["training"]
    assert record["model"]["rank"] == 0 and record["optim"] == full.meta["training"]["optim"]
    assert record["factored"]["rank"] == 32 and record["factored"]["output_variance_kept"] > 0.999999
    binned = torch.from_numpy(validation_set(_training_data(load_config(TINY)), load_config(TINY))[0])
    loaded = xrfnb.load_model(tmp_path / "r32", precision="float32")
    np.testing.assert_allclose(loaded._infer_binned(binned)[0].numpy(), full._infer_binned(binned)[0].numpy(),
                               atol=2e-4)
    np.testing.assert_allclose(loaded.thresholds, full.thresholds, atol=0.011)  # the threshold grid's step
    low = factor_model(out, 2, tmp_path / "r2")
    assert low.meta["training"]["factored"]["output_variance_kept"] < 0.999
    # the network as it is: the record's [model] with the weights' rank, which a fine-tuning run needs
    assert low.network_config == {**record["model"], "rank": 2}
    # a factored start loaded into a full layer (the record's [model]) is the product of its factors: the
    # same function
    from xrfnb.model.nn import features_from_binned

    start = {**TINY["optim"], "max_steps": 0, "init_from": str(tmp_path / "r2")}
    full_again = train_model({**TINY, "optim": start}, tmp_path / "full", progress=False)
    assert full_again.net.rank == 0
    with torch.inference_mode():
        x, lc = features_from_binned(binned)
        torch.testing.assert_close(full_again.net.float()(x, lc)[0], low.net.float()(x, lc)[0], rtol=1e-4,
                                   atol=1e-4)
