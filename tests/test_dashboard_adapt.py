"""The dashboard's "Adapt the model to this scanner" action (issue #18 item 2), driven as an object.

A tiny base model is trained here into a models folder named by ``$XRFNB_MODELS`` (the shipped one takes
minutes to fine-tune); the scan is the simulated hidden-painting scene (Rh tube, the base model's
instrument). The adaptation runs for a few seconds in the worker process the dashboard starts, as it would
for 15 minutes; the session's polls (the server's periodic callbacks) are called by hand.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

import xrfnb
from xrfnb.model.train import train_model
from xrfnb.ui.dashboard import Dashboard
from xrfnb.ui.dashboard import adapt_worker as _worker
from xrfnb.ui.dashboard import adaptation as _adaptation
from xrfnb.ui.dashboard import files as _files

TINY = {
    "name": "tiny-base",
    "model": {"hidden": [32, 16], "conv_channels": 2},
    "data": {"instruments": ["bruker-m6"], "instrument_weights": [1.0], "n_instrument_variants": 1,
             "variants_per_batch": 1},
    "optim": {"batch_size": 32, "max_steps": 10, "time_budget_min": 10.0, "n_val": 96, "workers": 1,
              "checkpoint_every": 5, "threads": 1, "seed": 3},
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The models folder ($XRFNB_MODELS) with the tiny base model in it."""
    folder = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XRFNB_MODELS", str(folder))
        train_model(TINY, folder / "tiny-base", progress=False)
        yield folder


@pytest.fixture(scope="module")
def scan():
    scan, _ = xrfnb.render_scan("hidden-painting", shape=(8, 8), counts_per_pixel=20000, rng=1401)
    return scan


@pytest.fixture(scope="module")
def base(models):
    return _files.load_model_cached("tiny-base")


@pytest.fixture(scope="module")
def base_maps(scan, base):
    return xrfnb.map_pigments(scan, base, progress=False)


def folders(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir())


def pump(*runners, until, timeout_s=300.0):
    """Call the runners' polls (as the server's periodic callbacks would) until ``until()``."""
    end = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < end, "timed out"
        for runner in runners:
            runner.poll()
        time.sleep(0.1)


def small(panel, minutes):
    panel.n_val, panel.validation_n_per_cell = 96, 4
    panel.minutes.value = minutes


def test_the_model_is_adapted_listed_and_used_for_the_maps(models, scan, base, base_maps):
    dash = Dashboard(scan=scan, maps=base_maps, model=base, blocking=False)
    panel, card = dash.adaptation_panel, dash.calibration_panel
    small(panel, 0.05)
    # the instrument fitted in the calibration card is the one adapted to (not fitted again)
    card.instrument_button.clicks += 1
    pump(card.jobs, until=lambda: card.instrument_fit is not None, timeout_s=120)
    fit = card.instrument_fit
    before = folders(models)
    panel.adapt_button.clicks += 1
    job = panel.job
    assert job is not None and job.fit is fit and _adaptation.running_adaptation() is job
    assert panel.progress_bar.visible and panel.cancel_button.visible and panel.adapt_button.disabled
    # a second request while it runs is refused, from this page and from another session
    other = Dashboard(scan=scan, maps=base_maps, model=base, blocking=False)
    for d in (dash, other):
        d.adaptation_panel.offer_button.clicks += 1
        level, text = d.last_message
        assert level == "error" and "already running on this server" in text
    assert "this page" in dash.last_message[1] and "another page" in other.last_message[1]
    # the other session shows the running one from then on (and can cancel it)
    assert "its progress is shown here" in other.last_message[1]
    assert panel.job is job and other.adaptation_panel.job is job
    assert other.adaptation_panel.cancel_button.visible
    assert job.watchers == {id(panel), id(other.adaptation_panel)}
    # the page follows the worker: its stages, from the instrument to the model's checks
    seen = []

    def done():
        seen.append(panel.progress_text.object)
        return panel.job is None

    pump(panel.jobs, until=done)
    assert job.error is None, job.error
    stages = " | ".join(dict.fromkeys(seen))
    assert "starting the adaptation" in stages
    assert any(
        s in stages for s in ("training the adapted model", "calibrating the adapted", "checking the")
    ), stages
    # the folder, complete, in $XRFNB_MODELS under a new name; nothing hidden left beside it
    new = sorted(set(folders(models)) - set(before))
    assert new == ["tiny-base-simulated-scene-hidden-painting-adapted"], folders(models)
    folder = models / new[0]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["adapted"]["from_model"] == "tiny-base" and (folder / "README.md").is_file()
    assert not (folder / "checkpoint").exists()
    assert meta["adapted"]["instrument_fit"] == fit.summary()
    # listed and chosen; the maps made again with it (poll the session's mapping job)
    assert new[0] in _files.available_models() and dash.model_name == new[0]
    assert dash.model_obj is None and new[0] in dash.param.model_name.objects
    pump(dash.data_panel.jobs, until=lambda: dash.maps is not None and not dash.busy, timeout_s=120)
    assert dash.maps.metadata["model"] == meta["name"] == new[0]
    assert not np.array_equal(dash.maps.probability, base_maps.probability, equal_nan=True)
    # said plainly: what was done, where, its validation beside the original's, the OOD share before/after
    text = panel.result.object
    assert panel.result.visible and "Adapted tiny-base to this scanner" in text
    assert new[0] in text and str(models) in text and "| original | adapted |" in text
    ood = dash.ood_summary()["fraction"]
    assert f"{100 * ood:.1f} % of this scan's pixels are out of distribution" in text
    assert f"({100 * job.ood_before:.1f} % with tiny-base)" in text
    assert "Traceback" not in text and _adaptation.running_adaptation() is None
    # a page opened later lists it ($XRFNB_MODELS)
    assert new[0] in Dashboard().param.model_name.objects


def hidden_folders(models: Path) -> list[Path]:
    return sorted(p for p in models.iterdir() if p.name.startswith("."))


def training_logged(models: Path) -> bool:
    """Whether the worker trains: its hidden folder holds a checkpoint and a line of training log."""
    hidden = hidden_folders(models)
    if not hidden:
        return False
    log_path = hidden[0] / "train_log.jsonl"
    checkpoint = hidden[0] / "checkpoint" / "state.json"
    return checkpoint.exists() and log_path.exists() and bool(log_path.read_text())


class _Session:
    """Stands for the server's session context of a page (Bokeh holds it by a weak reference)."""

    def __init__(self, name: str) -> None:
        self.id = name


def test_closing_the_last_page_that_shows_it_cancels_the_adaptation(models, scan, base, base_maps):
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    docs, sessions = [], []
    for k in range(2):  # two pages of one server, each with its session
        sessions.append(_Session(f"page-{k}"))
        docs.append(Document())
        docs[k]._session_context = weakref.ref(sessions[k])
    dash_a = Dashboard(scan=scan, maps=base_maps, model=base, blocking=False)
    dash_b = Dashboard(scan=scan, maps=base_maps, model=base, blocking=False)
    a, b = dash_a.adaptation_panel, dash_b.adaptation_panel
    small(a, 5.0)
    before = folders(models)
    with set_curdoc(docs[0]):  # the button's callback runs in its page's session
        a.adapt_button.clicks += 1
    job = a.job
    with set_curdoc(docs[1]):  # refused on the other page, which shows it from then on
        b.offer_button.clicks += 1
    assert dash_b.last_message[0] == "error" and "its progress is shown here" in dash_b.last_message[1]
    assert b.job is job and b.cancel_button.visible and job.watchers == {id(a), id(b)}

    def close(k):
        """What the server does when a page's session ends: its session-destroyed callbacks."""
        callbacks = list(docs[k].callbacks.session_destroyed_callbacks)
        assert callbacks, "the page registered nothing to do when its session ends"
        for callback in callbacks:
            callback(sessions[k])

    pump(a.jobs, until=lambda: training_logged(models), timeout_s=180)
    proc = job.proc
    # the page that started it closes: the other page still shows it, so it goes on there
    close(0)
    assert not job.cancelled and a.job is None and job.watchers == {id(b)}
    steps = job.steps
    pump(b.jobs, until=lambda: job.steps > steps, timeout_s=120)
    assert not job.finished and proc.poll() is None and _adaptation.running_adaptation() is job
    # the last page showing it closes: cancelled as by the button, the worker stopping as at Ctrl-C
    close(1)
    assert job.cancelled and b.job is None
    pump(until=lambda: job.finished, timeout_s=60)
    assert proc.returncode == 130 and job.path is None and _adaptation.running_adaptation() is None
    # no model; the checkpoint kept, in a hidden folder no model list shows
    assert [n for n in folders(models) if not n.startswith(".")] == before
    assert job.kept and (job.staging / "checkpoint" / "state.json").is_file()
    assert not any(n.startswith(".") for n in _files.available_models())
    # a page opened later offers to resume it, or to discard it
    later = Dashboard(scan=scan, maps=base_maps, model=base).adaptation_panel
    assert later.resume_button.visible and later.discard_button.visible
    later.discard_button.clicks += 1
    assert not job.staging.exists() and folders(models) == before and not later.resume_button.visible


def test_a_cancelled_adaptation_is_resumed_from_its_checkpoint(models, scan, base, base_maps):
    dash = Dashboard(scan=scan, maps=base_maps, model=base, blocking=False)
    panel = dash.adaptation_panel
    small(panel, 0.6)
    before = folders(models)
    assert not panel.resume_button.visible
    panel.adapt_button.clicks += 1
    job = panel.job
    pump(panel.jobs, until=lambda: training_logged(models), timeout_s=180)
    panel.cancel_button.clicks += 1
    pump(panel.jobs, until=lambda: panel.job is None, timeout_s=60)
    hidden = job.staging
    saved = json.loads((hidden / "checkpoint" / "state.json").read_text())["step"]
    logged = [json.loads(line)["step"] for line in (hidden / "train_log.jsonl").read_text().splitlines()]
    assert job.path is None and job.kept and saved >= logged[-1] >= 25
    assert [n for n in folders(models) if not n.startswith(".")] == before  # no model written
    text = panel.result.object
    assert f"Adaptation cancelled** after {saved:,} training steps" in text and "checkpoint is kept" in text
    # this page, and a page opened later on the same scan with the same model, offer to resume it
    assert panel.resume_button.visible and panel.resume_button.label.startswith(
        f"{_adaptation.RESUME_LABEL} ({saved:,} of "
    )
    later = Dashboard(scan=scan, maps=base_maps, model=base, blocking=False)
    assert later.adaptation_panel.resume_button.label == panel.resume_button.label
    # not for another scan
    other, _ = xrfnb.render_scan("hidden-painting", shape=(4, 4), counts_per_pixel=20000, rng=1404)
    assert not Dashboard(scan=other, model=base).adaptation_panel.resume_button.visible
    p2 = later.adaptation_panel
    small(p2, 5.0)  # the minutes field is not the kept run's: it goes on with its own minutes
    p2.resume_button.clicks += 1
    job2 = p2.job
    assert job2 is not None and job2.staging == hidden and job2.resumed_from == saved
    assert job2.minutes == 0.6 and job2.name == job.name and job2.fit is not None
    dash.data_version += 1  # the first page: the run going on is not offered to be resumed
    assert not panel.resume_button.visible
    pump(p2.jobs, until=lambda: p2.job is None, timeout_s=300)
    assert job2.error is None, job2.error
    folder = job2.path
    assert folder is not None and folder.name == job.name and not hidden.exists()
    # the training went on from the saved step: its log continues without counting a step twice
    steps = [json.loads(line)["step"] for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert steps[: len(logged)] == logged and steps == sorted(set(steps)) and steps[len(logged)] > saved
    meta = json.loads((folder / "model.json").read_text())
    assert meta["training"]["steps"] > saved and meta["adapted"]["from_model"] == "tiny-base"
    # a model like any other: no checkpoint or resume record left in it; loadable by name, chosen here
    assert not (folder / "checkpoint").exists() and not (folder / _worker.RESUME_DIR).exists()
    assert xrfnb.load_model(folder.name).name == folder.name == later.model_name
    assert [n for n in folders(models) if n.startswith(".")] == [] and not p2.resume_button.visible


def test_what_cannot_be_done_is_said_in_words(models, scan, base, base_maps, monkeypatch):
    # no counts to fit an instrument from
    cal = xrfnb.EnergyCalibration(0.0, 0.01)
    counts = np.random.default_rng(1402).poisson(0.002, size=(4, 4, 4096)).astype(np.uint16)
    empty = xrfnb.Scan(counts, cal, metadata={"source": "nearly empty"})
    dash = Dashboard(scan=empty, model=base)
    before = folders(models)
    dash.adaptation_panel.adapt_button.clicks += 1
    level, text = dash.last_message
    assert level == "error" and text.startswith("The model could not be adapted:"), text
    assert "too few counts to fit an instrument" in text  # the instrument fit's own words
    assert "Traceback" not in dash.adaptation_panel.result.object and folders(models) == before
    assert _adaptation.running_adaptation() is None
    # a full disk is said before anything starts
    dash = Dashboard(scan=scan, maps=base_maps, model=base)
    usage = type("Usage", (), {"total": 10**9, "used": 10**9, "free": 1000})
    monkeypatch.setattr(_adaptation.shutil, "disk_usage", lambda path: usage)
    dash.adaptation_panel.offer_button.clicks += 1
    level, text = dash.last_message
    assert level == "error" and f"the disk holding {models} is full" in text
    assert _adaptation.running_adaptation() is None and folders(models) == before


def test_the_worker_says_why_it_failed(models, scan, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    request = {"base": str(tmp_path / "no-such-model"), "fit": None, "minutes": 0.05, "name": "x",
               "staging": str(models / ".x.adapting-test"), "models": str(models), "n_val": 96,
               "validation_n_per_cell": 0}  # fmt: skip
    (run_dir / _worker.REQUEST_FILE).write_bytes(pickle.dumps(request))
    assert _worker.main([str(run_dir)]) == 1
    message = json.loads((run_dir / _worker.ERROR_FILE).read_text())["message"]
    assert "InstrumentFit" in message and not (run_dir / _worker.RESULT_FILE).exists()


def test_the_banner_offers_the_adaptation_only_above_the_share(models, scan, base, base_maps):
    valid = ~np.asarray(base_maps.mask, dtype=bool)
    dash = Dashboard(scan=scan, maps=base_maps, model=base)
    panel, alert = dash.adaptation_panel, dash.selection_info.ood_alert
    n = int(valid.sum())
    for n_ood in (0, n // 10, n // 5, n // 5 + 1, n):
        thr = float(base_maps.ood_threshold)
        score = np.full(valid.shape, thr - abs(thr) - 1.0, dtype=np.float32)
        score[tuple(np.argwhere(valid)[:n_ood].T)] = thr + abs(thr) + 1.0
        dash.set_maps(dataclasses.replace(base_maps, ood_score=np.where(valid, score, np.nan)))
        above = n_ood / n > 0.2
        assert panel.offer_button.visible == above, n_ood
        assert (_adaptation.ADAPT_LABEL in alert.object) == above
    assert panel.offer_button.label.startswith(_adaptation.ADAPT_LABEL)
    panel.minutes.value = 5
    assert panel.offer_button.label == f"{_adaptation.ADAPT_LABEL} (5.0 minutes)"


def test_progress_is_read_from_the_training_log(tmp_path):
    job = _adaptation.AdaptJob("adapt", minutes=15.0)
    (tmp_path / "train_log.jsonl").write_text(
        json.dumps({"step": 25, "elapsed_s": 10.0})
        + "\n"
        + json.dumps({"step": 250, "elapsed_s": 180.0})
        + "\n"
    )
    _adaptation._follow_training(job, tmp_path)
    assert job.training and job.steps == 250 and job.determinate
    assert job.total == 900 and 180 <= job.done < 200
    text = job.describe()
    assert text.startswith(
        "training the adapted model: 250 steps, 3.0 of 15 minutes, about 12.0 minutes left"
    )
    (tmp_path / "model.safetensors").write_bytes(b"")
    _adaptation._follow_training(job, tmp_path)
    assert not job.determinate and job.describe().startswith("checking the adapted model")


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="$XDG_DATA_HOME names the user's data folder")
def test_a_model_in_the_users_models_folder_is_found_by_name(tmp_path, monkeypatch):
    # no $XRFNB_MODELS: the dashboard writes adapted models into the user's data folder, and every way of
    # naming a model (load_model, `xrfnb identify --model`, the dashboard's list) must find them there
    from xrfnb.maps.pigmentmaps import PigmentMaps
    from xrfnb.model import folders as _folders
    from xrfnb.model.model import DEFAULT_MODEL
    from xrfnb.ui import cli

    monkeypatch.delenv("XRFNB_MODELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # nothing of that name in the working directory
    user = tmp_path / "data" / "xrfnb" / "models"
    name = "xrfnb-pigments-v1-fresco-adapted"
    shutil.copytree(_folders.package_models_folder() / DEFAULT_MODEL, user / name)
    meta = json.loads((user / name / "model.json").read_text())
    (user / name / "model.json").write_text(json.dumps({**meta, "name": name}))
    assert _files.adapted_models_folder() == user and _files.model_folders() == [user]
    model = xrfnb.load_model(name)
    assert Path(model.path).resolve() == (user / name).resolve() and model.name == name
    assert name in _files.available_models() and name in _folders.model_names()
    assert _files.load_model_cached(name) is model
    # the command line, by name
    src = tmp_path / "scan.h5"
    scan, _ = xrfnb.render_scan("hidden-painting", shape=(2, 2), counts_per_pixel=5000, rng=1403)
    xrfnb.save(scan, src)
    assert cli.main(["identify", str(src), "-o", str(tmp_path / "maps.h5"), "--model", name, "-q"]) == 0
    assert PigmentMaps.from_hdf5(tmp_path / "maps.h5").metadata["model"] == name
    # $XRFNB_MODELS comes before the user's folder (the dashboard's order): the same name there wins
    first = tmp_path / "first"
    shutil.copytree(user / name, first / name)
    monkeypatch.setenv("XRFNB_MODELS", str(first))
    assert _files.model_folders() == [first, user] and _files.adapted_models_folder() == first
    assert Path(xrfnb.load_model(name).path).resolve() == (first / name).resolve()
    # an unknown name says where it was looked for and what is there
    (user / "half-written").mkdir()
    with pytest.raises(xrfnb.ModelError) as err:
        xrfnb.load_model("half-written")
    text = str(err.value)
    assert str(_folders.package_models_folder()) in text and str(first) in text and str(user) in text
    assert f"{user / 'half-written'} has no model.json" in text and name in text and DEFAULT_MODEL in text
