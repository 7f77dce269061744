"""The environment the tests run in is the locked one: every pin in constraints.txt is what is installed.

``make install`` installs with ``-c constraints.txt``; a stale venv (or a dependency upgraded by hand)
would let the suite pass on versions a fresh clone does not get, as once hid a broken ``make serve``.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_constraints_pin_the_direct_dependencies():
    pins = _pins()
    dist = metadata.distribution("xrfnb")
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue  # bench-only extras are pinned too, but need not be installed here
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin the dependency {req.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_installed_versions_are_the_locked_ones():
    wrong = []
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for an extra that is not installed (bench)
        if installed.split("+")[0] != version.split("+")[0]:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, f"installed versions differ from constraints.txt: {wrong}; run `make clean install`"
