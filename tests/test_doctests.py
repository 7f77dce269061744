"""Every docstring example in the package runs: one test per module under ``xrfnb/``.

The modules are found by walking the package (``pkgutil.walk_packages``), so a module added or split later is
collected without editing this file. Each module's examples run with ``doctest.DocTestFinder`` and
``doctest.DocTestRunner`` (``ELLIPSIS | NORMALIZE_WHITESPACE``); any failure fails that module's test with the
runner's report. An example that cannot run here (it needs a user's file, a server or a long run) carries
``# doctest: +SKIP`` next to a sentence saying why; everything else runs on tiny arrays, the presets and the
shipped demo data.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from pathlib import Path

import numpy as np
import pytest

import xrfnb

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    """Every module and subpackage of xrfnb, the package itself included, sorted by name."""
    names = {xrfnb.__name__}
    for info in pkgutil.walk_packages(xrfnb.__path__, prefix=xrfnb.__name__ + "."):
        names.add(info.name)
    return sorted(names)


MODULES = _module_names()


def test_the_walk_finds_the_rooms():
    """A sanity check on the collection itself: it is not silently empty or flat."""
    rooms = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert {"core", "io", "physics", "fitting", "model", "maps", "ui"} <= rooms
    assert len(MODULES) > 30


def test_every_source_file_is_collected():
    """Nothing is skipped silently: every ``.py`` file under ``xrfnb/`` is a walked module (a folder without
    ``__init__.py`` would hide its modules from the walk)."""
    package = Path(xrfnb.__file__).resolve().parent
    files = {
        ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in package.rglob("*.py")
    }
    assert sorted(files - set(MODULES)) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    # only the module's own objects: a re-exported function is tested in the module that defines it
    tests = [t for t in finder.find(module, name) if t.examples]
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    printoptions = np.get_printoptions()
    try:
        for test in sorted(tests, key=lambda t: t.name):
            runner.run(test, out=out.write)
    finally:
        np.set_printoptions(**printoptions)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, (
        f"{name}: {result.failed} of {result.attempted} examples failed\n{out.getvalue()}"
    )
