"""Fuzz the readers: random bytes, truncations and byte mutations of real and generated files.

Any exception other than an :class:`xrfnb.XRFNBError` is a failure.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from _bruker_files import write_bcf, write_ripple, write_spx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xrfnb

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL_FILES = sorted(p for p in REAL.glob("*") if p.suffix not in (".md", ".cfg")) if REAL.is_dir() else []
SUFFIXES = [".mca", ".spe", ".txt", ".h5", ".npy", ".npz", ".spx", ".bcf", ".rpl", ".raw", ".xrf", ".dat"]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def _load_bytes(data: bytes, name: str, extra: dict[str, bytes] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        for other, content in (extra or {}).items():
            (Path(tmp) / other).write_bytes(content)
        try:
            obj = xrfnb.load(path)
            if isinstance(obj, xrfnb.Scan):  # read what a lazy reader deferred
                obj.sum_spectrum()
                close = getattr(getattr(obj.counts, "file", None), "close", None)
                if close is not None:
                    close()
        except xrfnb.XRFNBError:
            pass


def _generated() -> dict[str, tuple[bytes, dict[str, bytes]]]:
    """Small valid files of the binary and XML formats, written once."""
    out: dict[str, tuple[bytes, dict[str, bytes]]] = {}
    cal = xrfnb.EnergyCalibration(-0.02, 0.01)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        scan = xrfnb.Scan(
            rng.poisson(2, (3, 4, 32)).astype(np.uint16), cal, pixel_size_um=10.0, live_time_s=0.1
        )
        spec = xrfnb.Spectrum(rng.poisson(20, 64), cal, live_time_s=1.0)
        for name, obj in (("scan.h5", scan), ("spec.h5", spec), ("scan.npz", scan), ("spec.npy", spec)):
            p = xrfnb.save(obj, t / name)
            extra = {"spec.json": (t / "spec.json").read_bytes()} if name == "spec.npy" else {}
            out[name] = (p.read_bytes(), extra)
        out["spec.spx"] = (
            write_spx(
                t / "s.spx",
                rng.poisson(5, 64),
                offset_keV=-0.1,
                gain_keV=0.01,
                live_time_s=1.0,
                real_time_s=1.1,
            ).read_bytes(),
            {},
        )
        cube = rng.poisson(2, (3, 4, 64)).astype(np.uint16)
        bcf = write_bcf(
            t / "m.bcf", cube, offset_keV=-0.4, gain_keV=0.01, pixel_um=20.0, live_time_s=1.0, real_time_s=1.2
        )
        out["map.bcf"] = (bcf.read_bytes(), {})
        rpl = write_ripple(t / "m.rpl", rng.poisson(2, (2, 3, 16)).astype(np.uint16), {"ev-per-chan": 10})
        out["m.rpl"] = (rpl.read_bytes(), {"m.raw": rpl.with_suffix(".raw").read_bytes()})
        out["m.raw"] = (rpl.with_suffix(".raw").read_bytes(), {"m.rpl": rpl.read_bytes()})
    return out


GENERATED = _generated()


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(data, suffix):
    _load_bytes(data, "fuzz" + suffix)


@FUZZ
@given(
    text=st.text(alphabet=st.sampled_from(list("0123456789 .-+eE\n#:$<>DATACHNLSV_,nai")), max_size=400),
    prefix=st.sampled_from(
        [
            "",
            "VERSION: 3.1\nELEMENTS: 2\nCHANNELS: 4\n",
            "$SPEC_ID:\n\n$DATA:\n",
            "<<PMCA SPECTRUM>>\n",
            "# offset_keV = 0\n# gain_keV = 0.01\n",
        ]
    ),
)
def test_random_text_with_format_headers(text, prefix):
    _load_bytes((prefix + text).encode(), "fuzz.mca")


def _damage(content: bytes, cut: float, data) -> bytes:
    """Truncate ``content`` at fraction ``cut``, or overwrite 1-8 random bytes (drawn from ``data``)."""
    raw = bytearray(content)
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: int(len(raw) * cut)]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="n_mutations")):
            pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
            raw[pos] = data.draw(st.integers(0, 255), label="byte")
    return bytes(raw)


@pytest.mark.skipif(not REAL_FILES, reason=f"real reference spectra not found in {REAL}")
@FUZZ
@given(index=st.integers(0, 100), cut=st.floats(0.0, 1.0), data=st.data())
def test_truncated_and_mutated_real_files(index, cut, data):
    path = REAL_FILES[index % len(REAL_FILES)]
    extra = {"Steel.cfg": (REAL / "Steel.cfg").read_bytes()} if path.name == "Steel.spe" else {}
    _load_bytes(_damage(path.read_bytes(), cut, data), path.name, extra)


@FUZZ
@given(name=st.sampled_from(sorted(GENERATED)), cut=st.floats(0.0, 1.0), data=st.data())
def test_truncated_and_mutated_generated_files(name, cut, data):
    content, extra = GENERATED[name]
    _load_bytes(_damage(content, cut, data), name, extra)
