"""The ``xrfnb`` command line: identify, info, train, evaluate, serve; errors; interruption and --resume.

``identify`` runs with the deterministic test double of ``test_mapping.py`` (substituted for the model
loader) so these tests do not depend on a trained model; one test uses the shipped model when present.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import xrfnb
import xrfnb.ui.cli as cli
from xrfnb.maps.mapping import map_pigments
from xrfnb.maps.pigmentmaps import PigmentMaps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mapping import CAL, LinearTestModel, make_counts

TESTS_DIR = Path(__file__).resolve().parent
XRFNB = Path(sys.executable).with_name("xrfnb")


def _save_scan(path: Path, rows=24, cols=20) -> tuple[Path, np.ndarray, np.ndarray]:
    counts, truth = make_counts(rows, cols)
    xrfnb.save(xrfnb.Scan(counts, CAL, pixel_size_um=100.0, live_time_s=0.05), path)
    return path, counts, truth


@pytest.fixture
def test_model(monkeypatch):
    model = LinearTestModel()
    monkeypatch.setattr(cli, "_load_model", lambda name, precision="auto": model)
    return model


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = [str(XRFNB)] if XRFNB.exists() else [sys.executable, "-m", "xrfnb.ui.cli"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=timeout)


def test_identify_writes_maps_tiffs_and_summary(tmp_path, test_model, capsys):
    src, counts, truth = _save_scan(tmp_path / "scan.h5")
    before = src.read_bytes()
    out = tmp_path / "maps.h5"
    rc = cli.main(
        ["identify", str(src), "-o", str(out), "--tiff", str(tmp_path / "tif"), "--chunk-pixels", "60", "-q"]
    )
    assert rc == 0
    assert src.read_bytes() == before  # input untouched
    maps = PigmentMaps.from_hdf5(out)
    np.testing.assert_array_equal(maps.binary(), truth)
    ref = map_pigments(xrfnb.Scan(counts, CAL), LinearTestModel(), progress=False)
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)
    assert maps.metadata["pixel_size_um"] == 100.0
    tifs = sorted(p.name for p in (tmp_path / "tif").iterdir())
    assert "lead_white.tif" in tifs and "vermilion.tif" in tifs
    printed = capsys.readouterr().out
    assert "lead white" in printed and "masked: 0" in printed
    assert not (tmp_path / "maps.h5.partial").exists()


def test_info_describes_a_scan(tmp_path, capsys):
    src, _, _ = _save_scan(tmp_path / "scan.h5")
    assert cli.main(["info", str(src), "--no-elements"]) == 0
    out = capsys.readouterr().out
    assert "24 x 20 pixels x 2048 channels" in out
    assert "0.01 keV/ch" in out
    assert "0.05 s per pixel" in out
    assert "100 um" in out


def test_info_on_a_real_spectrum_detects_iron(capsys):
    real = TESTS_DIR.parents[1] / "shared" / "data" / "real"
    if not (real / "Steel.spe").exists():
        pytest.skip(f"real spectra not found in {real}")
    rc = cli.main(["info", str(real / "Steel.spe")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "spectrum" in out and "calibration" in out
    elements_line = next(line for line in out.splitlines() if line.startswith("elements:"))
    assert "Fe K" in elements_line  # steel


def test_info_unknown_instrument_fails_before_output(tmp_path):
    src, _, _ = _save_scan(tmp_path / "scan.h5", 3, 2)
    proc = _run("info", str(src), "--instrument", "no-such-instrument")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("xrfnb: error: ") and "no-such-instrument" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_on_pigment_maps(tmp_path, capsys, test_model):
    maps = map_pigments(xrfnb.Scan(make_counts(6, 5)[0], CAL), test_model, progress=False)
    path = maps.to_hdf5(tmp_path / "maps.h5")
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pigment maps" in out and "6 x 5 pixels, 3 classes" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["identify", "{tmp}/missing.h5", "-o", "{tmp}/out.h5"], "no such file"),
        (["identify", "{tmp}/garbage.h5", "-o", "{tmp}/out.h5"], "garbage.h5"),
        (["info", "{tmp}/garbage.h5"], "garbage.h5"),
        (["identify", "{tmp}/garbage.h5", "-o", "{tmp}/out.txt"], "should be an HDF5 file"),
    ],
)
def test_errors_are_one_line_exit_2_no_traceback(tmp_path, args, message):
    (tmp_path / "garbage.h5").write_bytes(b"\x00\x01garbage" * 50)
    proc = _run(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("xrfnb: error: ")
    assert message in proc.stderr
    assert not (tmp_path / "out.h5").exists()


def test_unknown_model_is_a_clear_error(tmp_path):
    src, _, _ = _save_scan(tmp_path / "scan.h5", 4, 3)
    proc = _run("identify", str(src), "-o", str(tmp_path / "o.h5"), "--model", "no-such-model", "-q")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown model 'no-such-model'" in proc.stderr


def test_bad_option_values_are_usage_errors():
    proc = _run("identify", "x.h5", "-o", "y.h5", "--chunk-pixels", "0")
    assert proc.returncode == 2 and "positive integer" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("serve", "--port", "70000")
    assert proc.returncode == 2 and "port must be" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "backend", "expected"),
    [
        (
            ["train", "--config", "{cfg}", "--out", "{tmp}/m", "--resume"],
            "train_model",
            (("{cfg}", "{tmp}/m"), {"resume": True, "progress": True}),
        ),
        (
            ["serve", "{tmp}", "--port", "5123", "--address", "0.0.0.0"],
            "serve",
            (
                ("{tmp}",),
                {
                    "port": 5123,
                    "address": "0.0.0.0",
                    "show": False,
                    "basic_auth": None,
                    "token": None,
                    "max_upload_mb": 256.0,
                },
            ),
        ),
    ],
)
def test_backends_receive_the_arguments(tmp_path, monkeypatch, argv, backend, expected):
    cfg = tmp_path / "train.toml"
    cfg.write_text("[train]\n")
    calls = []

    def fake_heavy(name):
        assert name == backend
        return lambda *a, **k: calls.append(([str(x) for x in a], k))

    monkeypatch.setattr(cli, "_heavy", fake_heavy)
    fmt = {"cfg": str(cfg), "tmp": str(tmp_path)}
    assert cli.main([a.format(**fmt) for a in argv]) == 0
    args, kwargs = expected
    assert calls == [([a.format(**fmt) for a in args], kwargs)]


def test_serve_protection_options_reach_the_server(tmp_path, monkeypatch, capsys):
    users = tmp_path / "users"  # no .json suffix: still a file of passwords, never a password itself
    users.write_text('{"conservator": "a long passphrase"}')
    calls = []
    monkeypatch.setattr(cli, "_heavy", lambda name: lambda *a, **k: calls.append(k))
    assert cli.main(["serve", str(tmp_path), "--address", "0.0.0.0", "--auth", str(users)]) == 0
    assert calls[-1]["basic_auth"] == users and calls[-1]["token"] is None
    monkeypatch.delenv("XRFNB_TOKEN", raising=False)
    assert cli.main(["serve", str(tmp_path), "--token", "--max-upload-mb", "16"]) == 0
    assert calls[-1]["basic_auth"] is None and calls[-1]["token"] is True
    assert calls[-1]["max_upload_mb"] == 16.0
    monkeypatch.setenv("XRFNB_TOKEN", "a shared secret")  # not visible in `ps`, unlike an argument
    assert cli.main(["serve", str(tmp_path), "--token"]) == 0
    assert calls[-1]["token"] == "a shared secret"
    assert cli.main(["serve", str(tmp_path), "--auth", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not allowed with
        cli.main(["serve", "--auth", str(users), "--token"])


# -- interruption and resume ---------------------------------------------------------------------------
_RUNNER = textwrap.dedent(
    """
    import signal
    import sys
    # a terminal's Ctrl-C: a test run started in the background (nohup, '&' without job control) inherits
    # SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    import xrfnb.ui.cli as cli
    from test_mapping import LinearTestModel
    cli._load_model = lambda name, precision="auto": LinearTestModel(delay_s={delay})
    sys.exit(cli.main({argv!r}))
    """
)


def _start(src: Path, out: Path, delay: float) -> subprocess.Popen:
    argv = ["identify", str(src), "-o", str(out), "--chunk-pixels", "20", "-q"]
    code = _RUNNER.format(tests=str(TESTS_DIR), delay=delay, argv=argv)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_blocks(partial: Path, n: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if partial.is_dir() and len(list(partial.glob("rows_*.npz"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"runner ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no completed blocks appeared")


def _uninterrupted(src: Path, folder: Path) -> PigmentMaps:
    """The maps of an uninterrupted ``xrfnb identify`` of ``src`` (same model and blocks)."""
    folder.mkdir()
    ref = folder / "maps.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load_model", lambda name, precision="auto": LinearTestModel())
        assert cli.main(["identify", str(src), "-o", str(ref), "--chunk-pixels", "20", "-q"]) == 0
    return PigmentMaps.from_hdf5(ref)


def _assert_bit_identical(a: PigmentMaps, b: PigmentMaps) -> None:
    for name in ("probability", "buried_probability", "ood_score", "mask", "mask_reason"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bit for bit, NaN patterns included


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_run_leaves_no_output_and_resume_completes(tmp_path, sig, test_model):
    src, counts, _ = _save_scan(tmp_path / "scan.h5")  # 24 rows x 20 cols: 24 blocks of one row
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    out = tmp_path / "maps.h5"
    partial = tmp_path / "maps.h5.partial"
    # 0.25 s per block: the 21 blocks left after the third take 5 s, so the signal arrives mid-run even
    # on a loaded 2-core machine
    proc = _start(src, out, delay=0.25)
    _wait_for_blocks(partial, 3, proc)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130
        assert "Traceback" not in stderr and "--resume" in stderr
    done = len(list(partial.glob("rows_*.npz")))
    assert 3 <= done < 24
    # resume: only the missing rows are computed, and the result equals an uninterrupted run
    rc = cli.main(["identify", str(src), "-o", str(out), "--chunk-pixels", "20", "--resume", "-q"])
    assert rc == 0
    assert test_model.calls == 24 - done
    assert not partial.exists()
    maps = PigmentMaps.from_hdf5(out)
    _assert_bit_identical(maps, _uninterrupted(src, tmp_path / "ref"))
    ref = map_pigments(xrfnb.Scan(counts, CAL), LinearTestModel(), progress=False)
    np.testing.assert_allclose(maps.probability, ref.probability, atol=1e-6)
    np.testing.assert_array_equal(maps.mask, ref.mask)
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before  # the input is never touched
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".maps.h5")]
    assert sig == signal.SIGKILL or not leftovers  # Ctrl-C and SIGTERM remove the temporary maps file


# -- the output's working folder, a full disk, damaged blocks (issue 15) -------------------------------
def test_input_inside_the_working_folder_is_refused_and_kept(tmp_path, test_model):
    """The issue's recipe: mkdir t/out.h5.partial; cp scan.h5 t/out.h5.partial/; identify -o t/out.h5."""
    work = tmp_path / "out.h5.partial"
    work.mkdir()
    src, _, _ = _save_scan(work / "scan.h5", 4, 3)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    for extra in ([], ["--resume"]):
        proc = _run("identify", str(src), "-o", str(tmp_path / "out.h5"), "-q", *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "lies inside" in proc.stderr, proc.stderr
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    assert [p.name for p in work.iterdir()] == ["scan.h5"]


def test_an_output_that_is_a_folder_is_refused_before_anything_is_created(tmp_path):
    src, _, _ = _save_scan(tmp_path / "scan.h5", 4, 3)
    (tmp_path / "dir.h5").mkdir()
    proc = _run("identify", str(src), "-o", str(tmp_path / "dir.h5"), "-q")
    assert proc.returncode == 2 and "is a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.h5", "scan.h5"]


def test_a_damaged_block_is_redone_with_a_warning(tmp_path, test_model, capsys):
    src, _, _ = _save_scan(tmp_path / "scan.h5")
    out = tmp_path / "maps.h5"
    proc = _start(src, out, delay=0.25)
    _wait_for_blocks(tmp_path / "maps.h5.partial", 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    bad = sorted((tmp_path / "maps.h5.partial").glob("rows_*.npz"))[1]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: BadZipFile before
    rc = cli.main(["identify", str(src), "-o", str(out), "--chunk-pixels", "20", "--resume", "-q"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"xrfnb: warning: damaged block file {bad}" in err
    _assert_bit_identical(PigmentMaps.from_hdf5(out), _uninterrupted(src, tmp_path / "ref"))


def test_disk_full_while_writing_blocks_is_one_line_and_resumable(tmp_path, test_model, monkeypatch, capsys):
    """A simulated ENOSPC (runs everywhere): the 4th block file cannot be written."""
    import errno

    import xrfnb.maps.sinks as sinks

    src, _, _ = _save_scan(tmp_path / "scan.h5")
    out = tmp_path / "maps.h5"
    real_savez, calls = np.savez, []

    def savez(fh, **arrays):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(fh, **arrays)

    monkeypatch.setattr(sinks.np, "savez", savez)
    rc = cli.main(["identify", str(src), "-o", str(out), "--chunk-pixels", "20", "-q"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert len(err) == 2 and err[0].startswith("xrfnb: ")
    assert err[1].startswith("xrfnb: error: no space left on ")
    assert "MB needed" in err[1] and "--resume" in err[1]
    assert len(list((tmp_path / "maps.h5.partial").glob("rows_*.npz"))) == 3 and not out.exists()
    monkeypatch.setattr(sinks.np, "savez", real_savez)
    assert cli.main(["identify", str(src), "-o", str(out), "--chunk-pixels", "20", "-q", "--resume"]) == 0
    assert test_model.calls == 4 + 21  # 4 blocks computed before the failure (the 4th lost), 21 after
    _assert_bit_identical(PigmentMaps.from_hdf5(out), _uninterrupted(src, tmp_path / "ref"))


_NO_SPACE_CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import xrfnb.ui.cli as cli
    import xrfnb.maps.mapping as mapping
    import xrfnb.maps.sinks as sinks
    from test_mapping import LinearTestModel
    cli._load_model = lambda name, precision="auto": LinearTestModel()
    if {fill_during_run!r}:  # the disk fills after the up-front checks (another program writing)
        mapping.check_free_space = sinks.check_free_space = lambda *a, **k: None
    sys.exit(cli.main({argv!r}))
    """
)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 600 KB tmpfs (the issue's set-up); skipped where this machine cannot mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the simulated ENOSPC tests cover the logic")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); simulated ENOSPC tests run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.parametrize(
    ("free_kb", "fill_during_run", "fails_on"),
    [
        (8, False, "maps.h5"),  # refused up front, before anything is written
        (40, True, "rows_"),  # a block file cannot be written
        (90, True, "rows_"),
        (110, True, "maps.h5"),  # the 24 blocks (a 4 KB page each) fit, the maps file does not
    ],
)
def test_disk_full_on_a_real_small_tmpfs(tmp_path, small_tmpfs, free_kb, fill_during_run, fails_on):
    import shutil

    src, _, _ = _save_scan(tmp_path / "scan.h5")  # the input lies outside the small file system
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    filler = small_tmpfs / "filler.bin"
    filler.write_bytes(b"\xff" * max(0, shutil.disk_usage(small_tmpfs).free - free_kb * 1024))
    out = small_tmpfs / "maps.h5"
    argv = ["identify", str(src), "-o", str(out), "--chunk-pixels", "20", "-q"]
    code = _NO_SPACE_CHECK.format(tests=str(TESTS_DIR), argv=argv, fill_during_run=fill_during_run)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # was 139 (segfault) after an errno 28 trace
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("xrfnb: error: no space left on "), proc.stderr
    assert "MB needed" in lines[1] and f" for {fails_on}" in lines[1]
    assert not out.exists() and not [p for p in small_tmpfs.iterdir() if p.name.startswith(".maps.h5.")]
    partial = small_tmpfs / "maps.h5.partial"
    if not fill_during_run:  # refused up front: nothing created
        assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler.bin"]
        return
    assert "--resume" in lines[1] and (partial / "manifest.json").is_file()
    assert not list(partial.glob(".*.tmp"))
    filler.unlink()  # space freed: --resume finishes, bit-identical to an uninterrupted run
    code = _NO_SPACE_CHECK.format(tests=str(TESTS_DIR), argv=[*argv, "--resume"], fill_during_run=False)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _assert_bit_identical(PigmentMaps.from_hdf5(out), _uninterrupted(src, tmp_path / "ref"))
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before and not partial.exists()


def test_shipped_model_through_the_cli(tmp_path, capsys):
    import xrfnb.model.model as model_mod
    if "xrfnb-pigments-v1" not in model_mod.available_models():
        pytest.skip("no shipped model yet")
    src, _, _ = _save_scan(tmp_path / "scan.h5", 6, 5)
    assert cli.main(["identify", str(src), "-o", str(tmp_path / "maps.h5"), "-q"]) == 0
    maps = PigmentMaps.from_hdf5(tmp_path / "maps.h5")
    model = xrfnb.load_model("default")
    assert maps.classes == model.classes
    assert np.all((maps.probability >= 0) & (maps.probability <= 1))


# -- with a real tiny model trained through the CLI ----------------------------------------------------
_TINY_TOML = """
name = "tiny-cli-test"
[model]
hidden = [32, 16]
conv_channels = 2
[data]
instruments = ["bruker-m6"]
instrument_weights = [1.0]
n_instrument_variants = 1
variants_per_batch = 1
[optim]
batch_size = 32
max_steps = 6
time_budget_min = 10.0
n_val = 128
workers = 0
checkpoint_every = 3
threads = 1
seed = 5
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cli")
    config = folder / "tiny.toml"
    config.write_text(_TINY_TOML)
    rc = cli.main(["train", "--config", str(config), "--out", str(folder / "model"), "-q"])
    assert rc == 0
    return folder / "model"


def test_train_identify_with_a_real_tiny_model(tiny_model_dir, tmp_path):
    from xrfnb.model.model import PigmentModel

    assert (tiny_model_dir / "model.safetensors").is_file() and (tiny_model_dir / "model.json").is_file()
    src, counts, _ = _save_scan(tmp_path / "scan.h5", 6, 5)
    out = tmp_path / "maps.h5"
    rc = cli.main(["identify", str(src), "-o", str(out), "--model", str(tiny_model_dir), "-q"])
    assert rc == 0
    model = PigmentModel.from_dir(tiny_model_dir)
    maps = PigmentMaps.from_hdf5(out)
    assert maps.classes == model.classes and maps.colors == model.colors
    ref = model.identify_batch(counts.reshape(-1, counts.shape[-1]), CAL)
    np.testing.assert_allclose(maps.probability.reshape(ref.probability.shape), ref.probability, atol=1e-5)
    np.testing.assert_allclose(maps.ood_score.reshape(-1), ref.ood_score, atol=1e-5)
    np.testing.assert_array_equal(maps.thresholds, model.thresholds)


def test_identify_precision_flag_is_used_and_recorded(tiny_model_dir, tmp_path):
    from xrfnb.model.model import PigmentModel

    src, counts, _ = _save_scan(tmp_path / "scan.h5", 4, 3)
    flat = counts.reshape(-1, counts.shape[-1])
    for precision in ("float32", "bfloat16"):
        out = tmp_path / f"maps-{precision}.h5"
        argv = ["identify", str(src), "-o", str(out), "--model", str(tiny_model_dir), "-q"]
        assert cli.main([*argv, "--precision", precision]) == 0
        maps = PigmentMaps.from_hdf5(out)
        assert maps.metadata["model_precision"] == precision
        ref = PigmentModel.from_dir(tiny_model_dir, precision=precision).identify_batch(flat, CAL)
        got = maps.probability.reshape(ref.probability.shape)
        np.testing.assert_allclose(got, ref.probability, atol=1e-5)


def test_train_with_a_worker_process_ends_without_a_traceback(tmp_path):
    """The batch workers inherit the CLI's SIGTERM handler; the pool's SIGTERM at the end must not make
    them print a KeyboardInterrupt traceback (seen at the end of a real training run)."""
    config = tmp_path / "tiny.toml"
    config.write_text(_TINY_TOML.replace("workers = 0", "workers = 1"))
    proc = _run("train", "--config", str(config), "--out", str(tmp_path / "model"), "-q", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_train_refuses_an_existing_run_without_resume(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(_TINY_TOML)
    assert cli.main(["train", "--config", str(config), "--out", str(tiny_model_dir), "-q"]) == 2
    assert capsys.readouterr().err.startswith("xrfnb: error: ")


def test_evaluate_writes_tables(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = cli.main(
        [
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--n-per-cell",
            "8",
            "--counts",
            "1000",
            "--sets",
            "single",
            "--no-baseline",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| single | 1,000 |" in printed
    assert (out / "evaluation.md").read_text().strip() == printed.strip()
    import json

    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    assert [(r["set"], r["counts"], r["n"]) for r in rows] == [("single", 1000, 8)]


def test_identify_puts_out_of_distribution_pixels_first_and_apart(capsys, tmp_path):
    """Issue 14: xrf_spectra.mca (not a painting: OOD score far above the threshold) used to be listed at
    100 % area with one OOD line at the end."""
    real = TESTS_DIR.parents[1] / "shared" / "data" / "real" / "xrf_spectra.mca"
    if not real.exists():
        pytest.skip(f"real spectrum not found: {real}")
    assert cli.main(["identify", str(real), "-o", str(tmp_path / "m.h5"), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("WARNING: 1 of 1 identified pixels (100.0 %) are out of distribution")
    assert "unreliable" in lines[0]
    rows = [line for line in lines[2:] if line[:1].isalpha() and not line.startswith(("pixels", "out-of"))]
    assert rows and all(float(r.split()[-3]) == 0.0 for r in rows)  # area % of in-distribution pixels: none
    assert any(float(r.split()[-1]) == 100.0 for r in rows)  # what it would call, shown apart


# -- calibration and detector elements from the command line (issue 14) ---------------------------------
REAL = TESTS_DIR.parents[1] / "shared" / "data" / "real"


def _uncalibrated_steel(tmp_path: Path) -> Path:
    """Steel SRM 1155 (.spe) without the PyMca .cfg that calibrates it: it loads at 1 keV per channel."""
    if not (REAL / "Steel.spe").exists():
        pytest.skip(f"real spectra not found in {REAL} (../shared/data/real beside the checkout)")
    target = tmp_path / "Steel.spe"
    target.write_bytes((REAL / "Steel.spe").read_bytes())
    return target


def test_calibrate_from_recognised_peaks_matches_the_publishers_calibration(tmp_path, capsys):
    steel = _uncalibrated_steel(tmp_path)
    reference = xrfnb.load(REAL / "Steel.spe").calibration  # from Steel.cfg, the data's own PyMca config
    assert reference.gain_keV < 0.1 and xrfnb.load(steel).calibration.gain_keV == 1.0
    # rough guesses, as read off a plot: the centroids are refined
    rc = cli.main(["info", str(steel), "--no-elements", "--calibrate", "Fe Ka=535,Ni Ka=630,Cr Ka=452"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "rms residual" in captured.err and "Fe Ka" in captured.err
    line = next(t for t in captured.out.splitlines() if t.startswith("calibration:"))
    gain = float(line.split("+")[1].split("keV/ch")[0])
    offset = float(line.split("E =")[1].split("keV")[0])
    assert gain == pytest.approx(reference.gain_keV, rel=2e-3)
    assert offset == pytest.approx(reference.offset_keV, abs=0.01)


def test_identify_takes_a_calibration_or_says_how_to_give_one(tmp_path, capsys):
    steel = _uncalibrated_steel(tmp_path)
    out = tmp_path / "maps.h5"
    rc = cli.main(["identify", str(steel), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "uncalibrated" in err and "--calibrate" in err and "--calibration" in err
    errors = [t for t in err.splitlines() if t.startswith("xrfnb: error:")]
    assert len(errors) == 1 and "EnergyCalibration(" not in err and "Traceback" not in err
    rc = cli.main(["identify", str(steel), "-o", str(out), "-q", "--calibration", "-0.00612,0.011928"])
    assert rc == 0
    maps = PigmentMaps.from_hdf5(out)
    assert maps.shape == (1, 1)
    assert maps.metadata["calibration"]["gain_keV"] == pytest.approx(0.011928)


def _nist_steel_with_offset(tmp_path: Path, offset_keV: float) -> Path:
    """NIST's Bruker M4 spectrum of steel (EMSA) with its header's OFFSET replaced: a file whose stated
    calibration is wrong by a known amount (its own Esprit calibration, -0.9553045 keV + 9.999 eV/ch, is
    the independent reference)."""
    src = REAL / "bruker_m4_rh50kv" / "pure_elements" / "Steel_50kv_50_ma_Rh_vac_D1.msa"
    if not src.exists():
        pytest.skip(f"real spectra not found in {REAL} (../shared/data/real beside the checkout)")
    text = src.read_text()
    assert "#OFFSET      : -0.9553045" in text
    target = tmp_path / "steel_shifted.msa"
    target.write_text(text.replace("#OFFSET      : -0.9553045", f"#OFFSET      : {offset_keV:.7f}"))
    return target


def test_identify_calibration_fit_corrects_a_wrong_calibration_from_the_peaks(tmp_path):
    steel = _nist_steel_with_offset(tmp_path, -0.8953045)  # 60 eV (6 channels) off
    out = tmp_path / "maps.h5"
    assert cli.main(["identify", str(steel), "-o", str(out), "-q"]) == 0
    assert PigmentMaps.from_hdf5(out).metadata["calibration"]["offset_keV"] == pytest.approx(-0.8953045)
    out.unlink()
    assert cli.main(["identify", str(steel), "-o", str(out), "-q", "--calibration", "fit"]) == 0
    cal = xrfnb.EnergyCalibration(**PigmentMaps.from_hdf5(out).metadata["calibration"])
    for e_keV in (2.0, 6.4, 10.0, 17.5):  # the file's own calibration, within 10 eV over the Steel lines
        ch = (e_keV + 0.9553045) / 0.0099990
        assert float(cal.energy_keV(ch)) == pytest.approx(e_keV, abs=0.010)


def test_identify_instrument_fit_uses_the_fitted_instrument_for_the_physics_check(tmp_path):
    steel = _nist_steel_with_offset(tmp_path, -0.8953045)
    out = tmp_path / "maps.h5"
    rc = cli.main(["identify", str(steel), "-o", str(out), "-q", "--instrument", "fit", "--anode", "Rh"])
    assert rc == 0
    meta = PigmentMaps.from_hdf5(out).metadata
    used = xrfnb.Instrument.from_dict(meta["physics_check"]["instrument"])
    assert used.name.startswith("fitted to") and used.anode == "Rh"
    assert used.calibration.offset_keV == pytest.approx(-0.9553, abs=0.01)
    assert meta["calibration"]["offset_keV"] == pytest.approx(used.calibration.offset_keV)
    # the resolution the header states (##MNFWHM 0.1439205 keV), read back from the peak widths
    assert float(used.fwhm_keV(5.8988)) == pytest.approx(0.1439205, rel=0.10)


def test_identify_instrument_fit_after_calibrate_fits_once_on_the_named_peaks(tmp_path, capsys):
    steel = _nist_steel_with_offset(tmp_path, -0.8953045)
    out = tmp_path / "maps.h5"
    # the peaks' channels under the file's own (Esprit) calibration
    peaks = ",".join(f"{line}={(e + 0.9553045) / 0.0099990:.0f}"
                     for line, e in (("Cr Ka", 5.4147), ("Fe Ka", 6.4038), ("Ni Ka", 7.4782)))
    rc = cli.main(["identify", str(steel), "-o", str(out), "--calibrate", peaks, "--instrument", "fit"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("fitting the instrument from the data") == 1
    meta = PigmentMaps.from_hdf5(out).metadata
    assert meta["calibration"]["offset_keV"] == pytest.approx(-0.9553, abs=0.01)
    assert xrfnb.Instrument.from_dict(meta["physics_check"]["instrument"]).name.startswith("fitted to")


def test_calibration_fit_refuses_to_apply_a_blind_calibration(tmp_path):
    steel = _uncalibrated_steel(tmp_path)
    out = tmp_path / "maps.h5"
    r = _run("identify", str(steel), "-o", str(out), "-q", "--calibration", "fit")
    assert r.returncode == 2 and not out.exists()
    errors = [t for t in r.stderr.splitlines() if t.startswith("xrfnb: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "no energy calibration" in errors[0] and "blind" in errors[0]
    assert "--calibration OFFSET_KEV,GAIN_KEV" in errors[0] and "--calibrate" in errors[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibration", "0.01"], "OFFSET_KEV,GAIN_KEV"),
        (["--calibration", "a,b"], "OFFSET_KEV,GAIN_KEV"),
        (["--calibration", "0,-0.01"], "gain must be > 0"),
        (["--calibrate", "Fe Ka 640"], "LINE=CHANNEL"),
        (["--calibrate", "Fe Ka=640"], "at least 2"),
        (["--calibrate", "Xx Ka=300,Fe Ka=640"], "Xx"),
        (["--calibration", "0,0.01", "--calibrate", "Fe Ka=1,Cu Ka=2"], "not both"),
    ],
)
def test_bad_calibration_options_are_one_line_errors(tmp_path, args, message):
    steel = _uncalibrated_steel(tmp_path)
    r = _run("info", str(steel), "--no-elements", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_info_says_how_detector_elements_were_combined(tmp_path, capsys):
    from test_io_formats import _epics, _gauss_spectrum

    cals = [xrfnb.EnergyCalibration(-0.03 + 0.002 * i, 0.0148 - 0.0002 * i) for i in range(4)]
    path = _epics(tmp_path / "four.mca", [_gauss_spectrum(c) for c in cals], cals, [9.0] * 4, [10.0] * 4)
    assert cli.main(["info", str(path), "--no-elements"]) == 0
    out = capsys.readouterr().out
    line = next(t for t in out.splitlines() if t.startswith("detectors:"))
    assert "4 detector elements, summed" in line and "rebinned onto element 0" in line
    assert cli.main(["info", str(path), "--no-elements", "--element", "3"]) == 0
    out = capsys.readouterr().out
    assert "showing element 3 only" in out
    assert f"{cals[3].gain_keV:.5g} keV/ch" in out


def test_identify_on_a_damaged_compressed_chunk_is_one_line_naming_the_chunk(tmp_path):
    """Bytes flipped inside one gzip chunk: exit 2, file, dataset and chunk named, input unchanged."""
    import h5py

    path, _, _ = _save_scan(tmp_path / "scan.h5", rows=6, cols=5)
    with h5py.File(path, "r") as f:
        d = f["entry/data/counts"]
        assert d.compression == "gzip"
        info = [d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())]
    chunk = info[len(info) // 2]
    raw = bytearray(path.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    path.write_bytes(bytes(raw))
    before = path.read_bytes()
    r = _run("identify", str(path), "-o", str(tmp_path / "maps.h5"), "-q")
    assert r.returncode == 2, r.stderr
    error = [t for t in r.stderr.splitlines() if t.startswith("xrfnb: error:")]
    assert len(error) == 1 and "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert "scan.h5:/entry/data/counts" in error[0] and "storage chunk at offset" in error[0]
    assert "damaged" in error[0]
    assert path.read_bytes() == before
    assert not (tmp_path / "maps.h5").exists()


# -- xrfnb convert: resumable conversion to HDF5, .bcf detectors (issue 21) ------------------------------
_CONVERT_RUNNER = textwrap.dedent(
    """
    import signal
    import sys
    import time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # see _RUNNER
    import xrfnb.io.bcf as bcf
    import xrfnb.io.hdf5 as hdf5
    import xrfnb.ui.cli as cli
    bcf.BLOCK_BYTES = 1  # one row per decoded block
    hdf5.WRITE_BLOCK_BYTES = 1  # one row per written block
    decode_rows = bcf.BcfRows.decode_rows
    def slow(self, start, stop):
        time.sleep({delay})
        return decode_rows(self, start, stop)
    bcf.BcfRows.decode_rows = slow
    class Bar:  # reports the rows done on stdout, for the test to time its signal
        def __init__(self, *args, **kwargs):
            self.n = 0
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def update(self, n):
            self.n += n
            print("rows", self.n, flush=True)
    cli.tqdm = Bar
    sys.exit(cli.main({argv!r}))
    """
)


def _bcf_input(tmp_path: Path, rows: int = 12, seed: int = 3, **kw) -> tuple[Path, np.ndarray]:
    from _bruker_files import write_bcf

    cube = np.random.default_rng(seed).poisson(0.4, (rows, 6, 256)).astype(np.uint16)
    cube[2, 3, 40] = 700
    path = write_bcf(
        tmp_path / f"scan{seed}.bcf",
        cube,
        offset_keV=-0.1,
        gain_keV=0.02,
        pixel_um=50.0,
        live_time_s=3.0,
        real_time_s=3.3,
        packing="mixed",
        **kw,
    )
    return path, cube


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_hdf5(a: Path, b: Path) -> None:
    """Every group, dataset and attribute of two HDF5 files equal, dataset values bit for bit."""
    import h5py

    def attrs(obj) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        assert attrs(fa) == attrs(fb)
        for name in names_a:
            x, y = fa[name], fb[name]
            assert attrs(x) == attrs(y), name
            if isinstance(x, h5py.Dataset):
                layout = ("dtype", "shape", "chunks", "compression", "compression_opts", "shuffle")
                assert [getattr(x, k) for k in layout] == [getattr(y, k) for k in layout], name
                assert np.asarray(x[()]).tobytes() == np.asarray(y[()]).tobytes(), name


class _InterruptingBar:
    """A progress bar that raises KeyboardInterrupt (Ctrl-C) after ``after`` updates."""

    after = 3

    def __init__(self, *args, **kwargs):
        self.n = 0
        self.updates = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.n += n
        if n:
            self.updates += 1
        if self.updates >= self.after:
            raise KeyboardInterrupt


def test_convert_interrupted_then_resumed_equals_an_uninterrupted_conversion(tmp_path, monkeypatch, capsys):
    import h5py

    from xrfnb.io import bcf, hdf5

    monkeypatch.setattr(bcf, "BLOCK_BYTES", 1)
    monkeypatch.setattr(hdf5, "WRITE_BLOCK_BYTES", 1)  # one row per block
    src, cube = _bcf_input(tmp_path)
    digest = _sha256(src)
    out = tmp_path / "scan.h5"
    partial = tmp_path / "scan.h5.partial"
    with monkeypatch.context() as mp:
        mp.setattr(cli, "tqdm", _InterruptingBar)
        assert cli.main(["convert", str(src), str(out)]) == 130
    err = capsys.readouterr().err
    assert f"rows converted so far are kept in {partial}: rerun with --resume" in err
    assert not out.exists() and partial.is_file()
    with h5py.File(partial, "r") as f:
        assert f.attrs["xrfnb_partial_rows"] == 3  # three blocks of one row flushed
    reads: list[tuple[int, int]] = []
    decode_rows = bcf.BcfRows.decode_rows
    monkeypatch.setattr(
        bcf.BcfRows, "decode_rows", lambda self, a, b: reads.append((a, b)) or decode_rows(self, a, b)
    )
    assert cli.main(["convert", str(src), str(out), "--resume", "-q"]) == 0
    assert reads == [(r, r + 1) for r in range(2, 12)]  # the last complete row checked, then the rest
    assert not partial.exists() and out.is_file()
    ref = tmp_path / "ref" / "scan.h5"
    ref.parent.mkdir()
    assert cli.main(["convert", str(src), str(ref), "-q"]) == 0
    _assert_same_hdf5(out, ref)
    back = xrfnb.load(out)
    np.testing.assert_array_equal(np.asarray(back.counts), cube)
    assert back.live_time_s == pytest.approx(3.0 / 72) and back.pixel_size_um == 50.0
    with h5py.File(out, "r") as f:
        assert "xrfnb_partial" not in f.attrs and "xrfnb_partial_rows" not in f.attrs
    assert _sha256(src) == digest  # the input is never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "scan.h5", src.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_convert_killed_then_resumed_equals_an_uninterrupted_conversion(tmp_path, sig):
    src, cube = _bcf_input(tmp_path, rows=40)
    digest = _sha256(src)
    out = tmp_path / "scan.h5"
    code = _CONVERT_RUNNER.format(delay=0.15, argv=["convert", str(src), str(out)])
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("rows") and int(line.split()[1]) >= 4:
            break
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "Traceback" not in stderr
        assert "kept in" in stderr and "rerun with --resume to continue" in stderr
    assert not out.exists() and (tmp_path / "scan.h5.partial").is_file()
    assert cli.main(["convert", str(src), str(out), "--resume", "-q"]) == 0
    ref = tmp_path / "ref" / "scan.h5"
    ref.parent.mkdir()
    assert cli.main(["convert", str(src), str(ref), "-q"]) == 0
    _assert_same_hdf5(out, ref)
    np.testing.assert_array_equal(np.asarray(xrfnb.load(out).counts), cube)
    assert _sha256(src) == digest


def test_convert_resume_refuses_another_input_and_foreign_files(tmp_path, monkeypatch, capsys):
    from xrfnb.io import bcf, hdf5

    monkeypatch.setattr(bcf, "BLOCK_BYTES", 1)
    monkeypatch.setattr(hdf5, "WRITE_BLOCK_BYTES", 1)
    src, _ = _bcf_input(tmp_path)
    other, _ = _bcf_input(tmp_path, seed=4)
    out = tmp_path / "scan.h5"
    partial = tmp_path / "scan.h5.partial"
    with monkeypatch.context() as mp:
        mp.setattr(cli, "tqdm", _InterruptingBar)
        assert cli.main(["convert", str(src), str(out), "-q"]) == 130
    capsys.readouterr()
    before = partial.read_bytes()
    assert cli.main(["convert", str(other), str(out), "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume: {partial} was made from a different input" in err and "without --resume" in err
    assert partial.read_bytes() == before and not out.exists()
    assert cli.main(["convert", str(src), str(out), "--calibration", "0,0.02", "--resume", "-q"]) == 2
    assert f"cannot resume: {partial} was made from a different calibration" in capsys.readouterr().err
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # the input changed since
    assert cli.main(["convert", str(src), str(out), "--resume", "-q"]) == 2
    assert "different input" in capsys.readouterr().err
    assert partial.read_bytes() == before
    # without --resume the unfinished conversion is replaced
    assert cli.main(["convert", str(src), str(out), "-q"]) == 0
    assert "starting over" in capsys.readouterr().err and not partial.exists()
    # a file of that name that xrfnb did not write is never deleted
    for foreign in (b"my notes", None):
        if foreign is None:
            import h5py

            with h5py.File(partial, "w") as f:
                f["x"] = 1
        else:
            partial.write_bytes(foreign)
        keep = partial.read_bytes()
        for extra in ([], ["--resume"]):
            assert cli.main(["convert", str(src), str(out), "-q", *extra]) == 2
            err = capsys.readouterr().err
            assert "is not an unfinished xrfnb conversion" in err and "never deletes" in err
            assert partial.read_bytes() == keep
    assert cli.main(["convert", str(src), str(tmp_path / "scan.npz"), "--resume", "-q"]) == 2
    assert "--resume continues conversions to HDF5" in capsys.readouterr().err


def test_convert_a_detector_of_a_two_detector_bcf(tmp_path, capsys):
    cube1 = np.random.default_rng(8).poisson(0.6, (12, 6, 256)).astype(np.uint16)
    src, cube0 = _bcf_input(tmp_path, detectors=[{"cube": cube1, "live_time_s": 4.0}])
    for det, expect in (("1", cube1), ("sum", cube0.astype(np.uint32) + cube1)):
        out = tmp_path / f"det{det}.h5"
        assert cli.main(["convert", str(src), str(out), "--detector", det, "-q"]) == 0
        back = xrfnb.load(out)
        np.testing.assert_array_equal(np.asarray(back.counts), expect)
        assert back.metadata["bcf_detector"] == (1 if det == "1" else "sum")
    assert cli.main(["convert", str(src), str(tmp_path / "x.h5"), "--detector", "2", "-q"]) == 2
    assert "detector=2: the file holds detectors 0..1 or 'sum'" in capsys.readouterr().err


def test_identify_elements_tiff_writes_element_maps_equal_to_those_in_the_output(tmp_path, test_model):
    """``xrfnb identify SCAN OUT.h5 --elements --tiff DIR``: one 32-bit TIFF per fitted element line family
    in DIR/elements, each equal to that element's map stored in OUT.h5; the zinc painted in the first row
    only is there and nowhere else (the scene's truth, not the code's output)."""
    tifffile = pytest.importorskip("tifffile")
    from test_mapping import _element_scan

    src = tmp_path / "scan.h5"
    xrfnb.save(_element_scan(rows=4, cols=3), src)
    out, tif = tmp_path / "maps.h5", tmp_path / "tif"
    rc = cli.main(["identify", str(src), "-o", str(out), "--elements", "--tiff", str(tif), "-q"])
    assert rc == 0
    em = PigmentMaps.from_hdf5(out).element_maps
    assert em is not None and {"Pb", "Fe", "Zn"} <= set(em.elements)
    written = sorted(p.name for p in (tif / "elements").iterdir())
    assert written == sorted(f"{e}_{f}.tif" for e, f in zip(em.elements, em.families, strict=True))
    for i, (element, family) in enumerate(zip(em.elements, em.families, strict=True)):
        image = tifffile.imread(tif / "elements" / f"{element}_{family}.tif")
        assert image.dtype == np.float32 and image.shape == (4, 3)
        np.testing.assert_array_equal(image, np.asarray(em.intensity[..., i], dtype=np.float32))
    zn = tifffile.imread(tif / "elements" / f"Zn_{em.families[em.elements.index('Zn')]}.tif")
    assert zn[0].min() > zn[1:].max()
