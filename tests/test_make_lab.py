"""``make lab`` starts JupyterLab on the notebooks, as the README says, also as root.

``jupyter lab`` refuses to run as root without ``--allow-root`` (project machines and many containers run
as root); the Makefile adds it for uid 0. The command is run exactly as written in the Makefile, in a
process group of its own; the test waits for the server's URL in its log, asks the server's API with the
token printed there, checks that the notebooks folder is what it serves, and stops the group. As root
(as here and in CI), the server starting at all is the check that ``--allow-root`` was passed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(\d+)/lab\?token=([0-9a-f]+)")


def test_make_lab_serves_the_notebooks(tmp_path):
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("no installed .venv beside the checkout: `make lab` would install first (`make test`)")
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        pytest.skip("JupyterLab is not installed in .venv")
    env = dict(
        os.environ,
        BROWSER="true",  # webbrowser.open runs `true`: no browser is started on the test machine
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
    )
    log_path = tmp_path / "lab.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            ["make", "-s", "lab"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        match = None
        while match is None:
            text = log_path.read_text(encoding="utf-8", errors="replace")
            match = _URL.search(text)
            if match is None:
                if proc.poll() is not None:
                    pytest.fail(f"`make lab` exited with {proc.returncode}:\n{text[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"`make lab` printed no server URL in 120 s:\n{text[-3000:]}")
                time.sleep(0.5)
        port, token = match.groups()
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=10) as r:
            listing = json.load(r)
        names = {item["name"] for item in listing["content"]}
        shipped = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
        assert shipped and shipped <= names, f"served {sorted(names)}, notebooks/ holds {sorted(shipped)}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
