"""Notebooks need nothing from the internet: ``xrfnb.setup_notebook()`` keeps every output's resources local.

Panel 1.9.4 inlines its stylesheets only at the first render of a Panel object (``inline=True``); HoloViews
figures displayed as cell outputs and models made later by callbacks keep links to ``cdn.holoviz.org``
(``css/loading.css``, ``css/listpanel.css``, ``bundled/theme/default.css`` and ``bundled/theme/native.css``
for every output; measured in JupyterLab, issue 14). Two checks:

* the notebook renderers in this process (what a cell output goes through: HoloViews' notebook renderer and
  Panel's ``_repr_mimebundle_``), on xrfnb's figures, a notebook-style explorer and the ``Dashboard``, before
  and after updates that create new models: no stylesheet of any rendered document links off the machine,
  while the same renders without the set-up do (the control that shows the check can fail);
* JupyterLab on loopback in headless Chromium: the quick-start notebook, on its small data, runs top to
  bottom, a widget is changed, and every request the page makes stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

import xrfnb

hv = pytest.importorskip("holoviews")
pn = pytest.importorskip("panel")

from bokeh.models import ImportedStyleSheet, InlineStyleSheet  # noqa: E402
from panel.io.state import state  # noqa: E402
from panel.viewable import Viewable  # noqa: E402

from xrfnb.ui import notebook as _notebook  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _net import free_port  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from test_notebooks import write_kernel_spec  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


# --------------------------------------------------------------------------------------------------
# in-process renders
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def panel_hooks():
    """Leave Panel's preprocessing hooks as they were (setup_notebook adds one for the whole process)."""
    before = list(Viewable._preprocessing_hooks)
    yield
    Viewable._preprocessing_hooks[:] = before


def _off_machine(url: str) -> bool:
    """Whether the browser would fetch ``url`` from another host (a path or a data: URL stays here)."""
    parsed = urlparse(url)
    if parsed.scheme in ("data", "blob"):
        return False
    return bool(parsed.netloc) and parsed.hostname not in LOCAL_HOSTS


def _stylesheets(views_before: set[str]) -> tuple[list[str], int]:
    """Imported stylesheet URLs in the documents rendered since, and how many stylesheets are inline."""
    urls, inline = [], 0
    for ref, (_, root, doc, _) in list(state._views.items()):
        if ref in views_before:
            continue
        models = doc.models if root.document is doc else root.references()
        for model in models:
            if isinstance(model, ImportedStyleSheet):
                urls.append(str(model.url))
                inline += str(model.url).startswith("data:text/css;base64,")
            inline += isinstance(model, InlineStyleSheet)
    return urls, inline


def _scene(rows: int = 8, cols: int = 8):
    """A small synthetic scan (Pb, Hg, Fe peaks at their published energies) and pigment maps for it."""
    rng = np.random.default_rng(0)
    calibration = xrfnb.EnergyCalibration(offset_keV=0.0, gain_keV=0.02)
    energy = calibration.energy_keV(np.arange(1024))
    classes = ("lead white", "vermilion", "red ochre")
    lines_keV = (10.55, 9.99, 6.40)  # Pb La1, Hg La1, Fe Ka1 (X-ray Data Booklet)
    where = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).sum(-1) % 3
    expected = np.full((rows, cols, energy.size), 0.2)
    for k, e0 in enumerate(lines_keV):
        expected += 40.0 * (where == k)[..., None] * np.exp(-0.5 * ((energy - e0) / 0.07) ** 2)
    scan = xrfnb.Scan(rng.poisson(expected).astype(np.uint16), calibration, pixel_size_um=100.0)
    probability = np.stack([np.where(where == k, 0.9, 0.1) for k in range(3)], -1).astype(np.float32)
    maps = xrfnb.PigmentMaps(
        classes=classes,
        probability=probability,
        buried_probability=0.1 * probability,
        ood_score=np.full((rows, cols), 0.2, np.float32),
        thresholds=np.full(3, 0.5),
        ood_threshold=1.0,
        mask=np.zeros((rows, cols), bool),
        colors=("#eeeeee", "#e34234", "#a0522d"),
    )
    return scan, maps


def _render_and_update(scan, maps, dashboard: bool = True) -> list[str]:
    """Render what the notebooks display as a notebook cell would, then update each; the bundles' HTML."""
    from xrfnb import plotting as xp

    renderer = hv.renderer("bokeh")
    html = []
    # a HoloViews figure displayed as a cell output goes through the renderer's notebook components
    html.append(renderer.components(xp.spectrum_plot(scan[4, 4], elements=["Pb", "Hg"], title="pixel"))[0])
    k = 0
    image = xp.map_image(maps.probability[:, :, k], title="P", clabel="probability", pixel_size_um=None)
    tap = hv.streams.Tap(x=1.5, y=1.5)
    spectrum = hv.DynamicMap(
        lambda x, y: xp.spectrum_plot(scan[int(y) % 8, int(x) % 8], title=f"{x} {y}"), streams=[tap]
    )
    html.append(renderer.components(image + spectrum)[0])
    tap.event(x=3.5, y=2.5)  # the HoloViews stream callback re-renders the spectrum

    # a notebook-style explorer: a Panel widget whose value swaps the pane's content for new models
    select = pn.widgets.Select(label="class", options=list(maps.classes[:3]), value=maps.classes[0])

    def view(cls):
        if cls == maps.classes[0]:
            return pn.pane.Markdown(f"**{cls}**")
        return pn.Row(pn.widgets.Button(label=cls), pn.widgets.FloatSlider(label="threshold"), image)

    explorer = pn.Column(select, pn.bind(view, select), hv.DynamicMap(pn.bind(lambda c: image, select)))
    html.append(explorer._repr_mimebundle_()[0]["text/html"])
    select.value = maps.classes[1]
    select.value = maps.classes[2]

    if not dashboard:
        return html
    # the package's own dashboard shown in a cell
    dash = xrfnb.Dashboard(scan=scan, maps=maps)
    html.append(dash._repr_mimebundle_()[0]["text/html"])
    dash.view = "Pigment"
    dash.pixel = (2, 3)
    dash.log_scale = True
    return [h for h in html if isinstance(h, str)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_stylesheet_of_notebook_outputs_is_local(panel_hooks, tmp_path):
    scan, maps = _scene()

    # control: with Panel's own inline=True alone, HoloViews outputs link the CDN (if this fails, Panel now
    # inlines by itself and the hook in xrfnb/_notebook.py can go)
    hv.extension("bokeh", inline=True, logo=False)
    pn.extension(inline=True)
    Viewable._preprocessing_hooks[:] = [
        h for h in Viewable._preprocessing_hooks if h is not _notebook.localize_panel_stylesheets
    ]
    before = set(state._views)
    _render_and_update(scan, maps, dashboard=False)
    urls, _ = _stylesheets(before)
    assert any(_off_machine(u) for u in urls), "control: Panel no longer links its CDN stylesheets"

    setup = xrfnb.setup_notebook(tmp_path / "out", small=True, announce=False, real_data=tmp_path / "real")
    assert setup == xrfnb.NotebookSetup(small=True, output_dir=tmp_path / "out", real_data=tmp_path / "real")
    assert setup.output_dir.is_dir() and pn.config.inline
    before = set(state._views)
    html = _render_and_update(scan, maps)
    urls, inline = _stylesheets(before)
    assert inline > 0, "no inline stylesheets: nothing was rendered?"
    off = sorted({u for u in urls if _off_machine(u)})
    assert off == [], f"stylesheets still linked off the machine: {off}"
    for text in html:
        assert "cdn.holoviz.org" not in text and "cdn.jsdelivr.net" not in text
    assert xrfnb.setup_notebook(tmp_path / "out", announce=False).output_dir == tmp_path / "out"
    assert Viewable._preprocessing_hooks.count(_notebook.localize_panel_stylesheets) == 1


def test_text_updates_pushed_to_a_notebook_link_no_cdn_stylesheet(panel_hooks, tmp_path, monkeypatch):
    """A Markdown/HTML pane whose text changes after display (the dashboard's legend) is updated without
    Panel's preprocessing hooks and pushed over the comm at once; the stylesheets it gets then (looked up
    in Panel's per-document cache under the update's ``static/extensions/panel/`` key, not the render's
    CDN key) must already be local in the message sent (they linked ``cdn.holoviz.org/.../loading.css``)."""
    import panel.io.notebook as pn_notebook

    xrfnb.setup_notebook(tmp_path / "out", announce=False)
    sent: list[str] = []
    monkeypatch.setattr(pn_notebook, "send", lambda comm, msg: sent.append(msg.content_json))
    html = pn.pane.HTML("<b>a</b>")
    markdown = pn.pane.Markdown("m")
    col = pn.Column(html, markdown, pn.widgets.Button(label="b"))
    bundle = col._repr_mimebundle_()[0]["text/html"]
    assert "cdn.holoviz.org" not in bundle
    ref = next(r for r, view in state._views.items() if view[0] is col)
    comm = state._views[ref][3]
    monkeypatch.setattr(comm, "_comm", object())  # the comm counts as open: push sends at once
    for text in ("<b>b</b>", "", "<i>c</i>"):
        html.object = text
    markdown.object = "**n**"
    col.append(pn.pane.Markdown("new"))
    assert len(sent) >= 5, "no update was pushed"
    for message in sent:
        assert "cdn.holoviz.org" not in message, message[:500]
    sheets = [s for s in html._models[ref][0].stylesheets if isinstance(s, ImportedStyleSheet)]
    assert sheets and all(str(s.url).startswith("data:text/css;base64,") for s in sheets)
    # calling the hook again keeps the one cache (idempotent)
    cache = state._stylesheets[state._views[ref][2]]
    _notebook.localize_panel_stylesheets(col, state._views[ref][1])
    assert state._stylesheets[state._views[ref][2]] is cache


def test_localize_keeps_foreign_stylesheets_and_refuses_paths_outside_panel():
    own = ImportedStyleSheet(url="https://example.org/house.css")
    cdn = ImportedStyleSheet(url=f"{_notebook.CDN_DIST}css/listpanel.css?v=1")
    local = ImportedStyleSheet(url="/panel-preview/static/extensions/panel/css/loading.css")
    outside = ImportedStyleSheet(url=f"{_notebook.CDN_DIST}../../../../etc/passwd.css")
    missing = ImportedStyleSheet(url=f"{_notebook.CDN_DIST}css/no-such-file.css")
    sheets = [own, cdn, local, outside, missing, InlineStyleSheet(css="p { color: red }")]
    assert _notebook.localize_stylesheets(sheets) == 2
    assert own.url == "https://example.org/house.css"
    assert outside.url.endswith("passwd.css") and missing.url.endswith("no-such-file.css")
    for sheet, name in ((cdn, "listpanel.css"), (local, "loading.css")):
        head, data = sheet.url.split(",", 1)
        assert head == "data:text/css;base64"
        assert base64.b64decode(data) == (_notebook.DIST_DIR / "css" / name).read_bytes()


def test_setup_notebook_reads_the_test_switches(monkeypatch, tmp_path, capsys, panel_hooks):
    monkeypatch.setenv("XRFNB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("XRFNB_NOTEBOOK_OUTPUT", str(tmp_path / "results"))
    setup = xrfnb.setup_notebook()
    assert setup.small is True and setup.output_dir == tmp_path / "results" and setup.output_dir.is_dir()
    assert f"results go to {(tmp_path / 'results').resolve()}" in capsys.readouterr().out
    monkeypatch.setenv("XRFNB_NOTEBOOK_SMALL", "0")
    assert xrfnb.setup_notebook(announce=False).small is False


def test_setup_notebook_names_the_real_data_folder(monkeypatch, tmp_path, panel_hooks):
    """Notebook 04's measured spectra: ``$XRFNB_REAL_DATA``, else ../shared/data/real beside the repo."""
    monkeypatch.delenv("XRFNB_REAL_DATA", raising=False)
    monkeypatch.chdir(NOTEBOOKS)  # Jupyter starts a notebook's kernel in the notebook's folder
    out = tmp_path / "out"
    default = xrfnb.setup_notebook(out, announce=False).real_data
    assert default == Path("..", "..", "shared", "data", "real")
    assert Path(os.path.abspath(default)) == NOTEBOOKS.parent.parent / "shared" / "data" / "real"
    monkeypatch.setenv("XRFNB_REAL_DATA", str(tmp_path / "spectra"))
    assert xrfnb.setup_notebook(out, announce=False).real_data == tmp_path / "spectra"
    assert not (tmp_path / "spectra").exists()  # named, not created
    assert xrfnb.setup_notebook(out, announce=False, real_data="here").real_data == Path("here")


def test_every_notebook_uses_the_setup_helper():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        assert "xrfnb.setup_notebook()" in code[0], f"{path.name}: first code cell lacks setup_notebook()"
        text = "\n".join(code)
        assert "pn.extension(" not in text and "hv.extension(" not in text, path.name


# --------------------------------------------------------------------------------------------------
# JupyterLab in headless Chromium
# --------------------------------------------------------------------------------------------------
_CELLS_DONE_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  if (!cells.length) return false;
  return cells.every(c => /\\[\\d+\\]/.test(c.querySelector('.jp-InputPrompt').textContent));
}"""

# the dashboard's main map (named xrfnb-main) in some live document has a title starting with the prefix
_MAIN_TITLE_JS = """(prefix) => (window.Bokeh ? Bokeh.documents : []).some(
  d => [...d.all_models].some(m => m.name === 'xrfnb-main' && m.title && m.title.text.startsWith(prefix)))"""


@pytest.mark.browser
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quickstart_in_jupyterlab_requests_nothing_off_the_machine(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (/usr/bin/chromium): run `make browser-deps`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    pytest.importorskip("jupyterlab", reason="JupyterLab is in the test extra")
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        pytest.skip(f"no jupyter command beside {sys.executable}")

    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOKS / "01_quickstart.ipynb", root)
    write_kernel_spec(tmp_path / "jupyter")
    env = dict(
        os.environ,
        JUPYTER_PATH=str(tmp_path / "jupyter"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        XRFNB_NOTEBOOK_SMALL="1",
        XRFNB_NOTEBOOK_OUTPUT=str(root / "out"),
        MPLBACKEND="Agg",
    )
    port, token = free_port(), "xrfnb-offline-test"
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "lab.log"
    with open(log_path, "w", encoding="utf-8") as log:
        lab = subprocess.Popen(
            [str(jupyter), "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
             f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    requests, failed = [], []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                if lab.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log_path.read_text(encoding='utf-8')[-3000:]}")
                time.sleep(0.3)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.on("request", lambda r: requests.append(r.url))
                page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
                page.goto(f"{base}/lab/tree/01_quickstart.ipynb?token={token}")
                page.wait_for_function(
                    "() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-CodeCell')"
                    " && document.querySelector('.jp-Notebook')",
                    timeout=90_000,
                )
                page.wait_for_function(  # the kernel is up
                    "() => { const w = window.jupyterapp.shell.currentWidget;"
                    " return w && w.sessionContext && w.sessionContext.session &&"
                    " w.sessionContext.session.kernel && w.sessionContext.kernelDisplayStatus === 'idle'; }",
                    timeout=90_000,
                )
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                page.wait_for_function(_CELLS_DONE_JS, timeout=300_000, polling=500)
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
                assert errors.count() == 0, errors.first.inner_text()[:2000]
                text = page.locator(".jp-Notebook").inner_text()
                assert "precision" in text and "wrote" in text, text[-2000:]
                # the dashboard in the notebook: switch its view; the main map is re-rendered from Python
                page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=30_000)
                page.wait_for_function(_MAIN_TITLE_JS, arg="Composite pigment map", timeout=30_000)
                # a change made before the output's comm is open is lost: switch again until the map follows
                views = ("OOD score", "Total counts")
                for attempt in range(4):
                    choice, other = views[attempt % 2], views[(attempt + 1) % 2]
                    page.get_by_text(other, exact=True).last.click()
                    page.get_by_text(choice, exact=True).last.click()
                    try:
                        page.wait_for_function(_MAIN_TITLE_JS, arg=choice, timeout=15_000)
                        break
                    except sync_api.TimeoutError:
                        continue
                else:
                    pytest.fail(f"the dashboard's map never followed its view buttons (last {choice!r})")
                page.wait_for_timeout(1500)  # let any stylesheet the new models link be requested
            finally:
                browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait(10)
    off = sorted({u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
                  and urlparse(u).hostname != "127.0.0.1"})  # fmt: skip
    assert requests, "the page made no requests at all"
    assert off == [], f"requests left the machine: {off}\nfailed: {failed}"
