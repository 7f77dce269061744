"""The guided notebooks: committed without outputs, and each one runs top to bottom (nbclient) on small data.

The notebooks read ``XRFNB_NOTEBOOK_SMALL=1`` (small scans, tiny training runs), write their results under
``XRFNB_NOTEBOOK_OUTPUT`` and find the measured spectra of notebook 04 in ``XRFNB_REAL_DATA``, all through
``xrfnb.setup_notebook()``. They run in one shared temporary folder (not in ``notebooks/``), so a tiny
stand-in model trained by the first notebook (only while no shipped model exists) is reused by the others.
The kernel is this interpreter (the project's venv), through a kernel spec written into a temporary
``JUPYTER_PATH``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = (
    "01_quickstart",
    "02_spectrum_explorer",
    "03_layered_pigments",
    "04_your_instrument",
    "05_compare_with_element_maps",
)
#: the project's shared real spectra, ../shared/data/real beside the repository (notebooks/README.md)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_the_five_notebooks_exist_and_are_valid():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(EXPECTED)
    for name in EXPECTED:
        nbformat.validate(_read(name))


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs(name):
    nb = _read(name)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"


@pytest.mark.parametrize("name", EXPECTED)
def test_only_xrfnb_and_display_libraries_imported(name):
    allowed = {"os", "pathlib", "shutil", "numpy", "holoviews", "panel", "ipywidgets", "IPython", "xrfnb"}
    for cell in _read(name).cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] in allowed, f"{name}: {line.strip()!r}"
                # the public API only: no private xrfnb modules
                assert "xrfnb._" not in line and " _" not in line.split("import", 1)[-1], line


def _code(name: str) -> str:
    return "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")


@pytest.mark.parametrize("name", EXPECTED)
def test_one_setup_call_and_nothing_repeated(name):
    code = _code(name)
    assert code.count("xrfnb.setup_notebook(") == 1, name
    env_reads = ('environ.get("XRFNB_NOTEBOOK', 'environ["XRFNB_NOTEBOOK')
    for repeated in ("pn.extension(", "hv.extension(", *env_reads):
        assert repeated not in code, f"{name}: {repeated!r} is setup_notebook()'s job"


@pytest.mark.parametrize("name", ["01_quickstart", "02_spectrum_explorer"])
def test_the_explorer_is_the_package_dashboard(name):
    code = _code(name)
    assert "xrfnb.Dashboard(scan=scan, maps=maps" in code, name
    for by_hand in ("hv.streams", "DynamicMap", ".observe(", "ipywidgets", "clear_output"):
        assert by_hand not in code, f"{name}: {by_hand!r}: the map/spectrum explorer rebuilt by hand"


def test_04_finds_its_data_through_the_documented_setting():
    code = _code("04_your_instrument")
    assert "setup.real_data" in code
    for walking in (".parents", ".parent", "__file__", "Path.cwd()"):
        assert walking not in code, f"notebook 04 looks for its data by {walking!r}"


def write_kernel_spec(jupyter_dir: Path) -> None:
    """A ``python3`` kernel spec in ``jupyter_dir/kernels`` that runs this interpreter (the test venv)."""
    spec = jupyter_dir / "kernels" / "python3"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "xrfnb test kernel",
                "language": "python",
            }
        ),
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Shared working folder, a kernel spec for this interpreter and the small-data switch."""
    root = tmp_path_factory.mktemp("notebooks")
    write_kernel_spec(root / "jupyter")
    work = root / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "jupyter"))
        mp.setenv("XRFNB_NOTEBOOK_SMALL", "1")
        mp.setenv("XRFNB_NOTEBOOK_OUTPUT", str(work / "out"))
        mp.setenv("XRFNB_REAL_DATA", str(REAL))
        mp.setenv("MPLBACKEND", "Agg")
        yield work


def _execute(name: str, work: Path):
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
            if out.get("output_type") == "stream":
                text.append(out["text"])
    # xrfnb.setup_notebook() ran and read the small-data switch
    assert "small-data mode: True" in "".join(text), f"{name}: no set-up line from xrfnb.setup_notebook()"
    return nb, "".join(text)


def _model_note(text: str) -> None:
    # either the shipped model or an explicitly announced stand-in: never silently a different model
    assert "using the model" in text or "TINY stand-in" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_01_quickstart_runs(notebook_env):
    nb, text = _execute("01_quickstart", notebook_env)
    _model_note(text)
    out = notebook_env / "out"
    assert (out / "quickstart_pigment_maps.h5").is_file()
    assert any((out / "quickstart_tiff").glob("*.tif*"))
    assert "precision" in text and "recall" in text
    # the interactive layout was displayed (a Bokeh/Panel model in the outputs)
    mimes = {k for c in nb.cells for o in c.get("outputs", []) for k in o.get("data", {})}
    assert any("bokeh" in m or "holoviews" in m or m == "text/html" for m in mimes)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_02_spectrum_explorer_runs(notebook_env):
    _, text = _execute("02_spectrum_explorer", notebook_env)
    _model_note(text)
    assert "area" in text and "threshold" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_03_layered_pigments_runs(notebook_env):
    _, text = _execute("03_layered_pigments", notebook_env)
    _model_note(text)
    assert "Pb La/Lb" in text and "detection rate" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_04_your_instrument_runs(notebook_env):
    _, text = _execute("04_your_instrument", notebook_env)
    out = notebook_env / "out"
    assert (out / "my-xrf-pigments.toml").is_file()
    assert (out / "models" / "my-xrf-pigments" / "model.json").is_file()
    assert "loaded by name" in text
    if (REAL / "Steel.spe").is_file():
        assert "real spectrum" in text and "SIMULATED" not in text
    else:
        assert "SIMULATED" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_05_compare_with_element_maps_runs(notebook_env):
    _, text = _execute("05_compare_with_element_maps", notebook_env)
    _model_note(text)
    assert text.count("macro F1") >= 4  # model and baseline on both scenes
