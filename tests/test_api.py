"""The public API is flat, explicit and complete: every name in ``__all__`` resolves."""

import importlib
import subprocess
import sys

import pytest

import xrfnb


@pytest.mark.parametrize("name", sorted(xrfnb.__all__))
def test_every_public_name_resolves(name):
    assert getattr(xrfnb, name) is not None


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        xrfnb.nonexistent  # noqa: B018


def test_errors_share_one_root():
    for name in xrfnb.__all__:
        obj = getattr(xrfnb, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, xrfnb.XRFNBError), name


def test_import_is_light():
    """``import xrfnb`` must not pull in torch or panel (they load lazily on first use)."""
    code = "import sys, xrfnb; print('torch' in sys.modules, 'panel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_private_modules_declare_all():
    for module in {*xrfnb._LAZY.values(), ".plotting"}:
        mod = importlib.import_module(module, "xrfnb")
        assert hasattr(mod, "__all__"), module
