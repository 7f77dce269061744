"""EnergyCalibration and calibrate(): conversions, validation, least-squares fits from identified peaks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xrfnb
from xrfnb import CalibrationError, EnergyCalibration, calibrate

# Published K alpha-1 / L alpha-1 energies (keV; Deslattes et al., Rev. Mod. Phys. 75, 35 (2003)),
# independent of xraylib: the calibration must reproduce them through the lines named in calibrate().
PUBLISHED_KEV = {
    "Fe Ka1": 6.40384,
    "Cu Ka1": 8.04778,
    "Pb La1": 10.5515,
    "Sr Ka1": 14.1650,
    "Ca Ka1": 3.69168,
}


def _spectrum(cal: EnergyCalibration, lines_keV, n=4096, height=5000.0, fwhm_keV=0.14) -> np.ndarray:
    e = cal.energies_keV(n)
    sigma = fwhm_keV / 2.3548
    y = 3.0 + sum(height * np.exp(-0.5 * ((e - c) / sigma) ** 2) for c in lines_keV)
    return np.random.default_rng(0).poisson(y).astype(float)


def test_linear_conversions():
    cal = EnergyCalibration(-0.05, 0.01)
    assert cal.energy_keV(0) == pytest.approx(-0.05)
    assert cal.energy_keV(645.384) == pytest.approx(6.40384)
    assert cal.channel(6.40384) == pytest.approx(645.384)
    np.testing.assert_allclose(cal.energies_keV(3), [-0.05, -0.04, -0.03])


@settings(max_examples=60, deadline=None)
@given(
    offset=st.floats(-1.0, 1.0),
    gain=st.floats(1e-3, 0.05),
    quad=st.floats(-2e-7, 2e-7),
    ch=st.floats(0, 4095),
)
def test_channel_is_the_inverse_of_energy(offset, gain, quad, ch):
    cal = EnergyCalibration(offset, gain, quad)
    try:
        cal.check_monotonic(4096)
    except CalibrationError:
        return
    assert float(cal.channel(cal.energy_keV(ch))) == pytest.approx(ch, abs=1e-6)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((0.0, 0.0), "gain must be > 0"),
        ((0.0, -0.01), "gain must be > 0"),
        ((float("nan"), 0.01), "must be finite"),
        ((0.0, float("inf")), "must be finite"),
        (("zero", 0.01), "must be a number"),
    ],
)
def test_invalid_calibrations_are_rejected(args, pattern):
    with pytest.raises(CalibrationError, match=pattern):
        EnergyCalibration(*args)


def test_non_monotonic_quadratic_is_rejected_where_used():
    cal = EnergyCalibration(0.0, 0.01, -1e-5)  # slope 0.01 - 2e-5 ch turns over at channel 500
    cal.check_monotonic(400)
    with pytest.raises(CalibrationError, match=r"not monotonic over 2048 channels.*channel 500"):
        cal.check_monotonic(2048)
    with pytest.raises(CalibrationError, match="not monotonic"):
        xrfnb.Spectrum(np.ones(2048), cal)


def test_dict_round_trip_and_missing_key():
    cal = EnergyCalibration(-0.01, 0.02, 1e-8)
    assert EnergyCalibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(CalibrationError, match="gain_keV"):
        EnergyCalibration.from_dict({"offset_keV": 0.0})


def test_xraylib_line_energies_agree_with_published_values():
    for name, published in PUBLISHED_KEV.items():
        element, line = name.split()
        assert xrfnb.line_energy_keV(element, line) == pytest.approx(published, abs=0.003)


def test_calibrate_linear_recovers_the_true_calibration():
    true = EnergyCalibration(-0.0731, 0.010032)
    names = ["Ca Ka1", "Fe Ka1", "Cu Ka1", "Pb La1", "Sr Ka1"]
    counts = _spectrum(true, [PUBLISHED_KEV[n] for n in names])
    # rough guesses, several channels off, as a user reads them from a plot
    guesses = {
        n: float(true.channel(PUBLISHED_KEV[n])) + d for n, d in zip(names, [4, -6, 3, -2, 5], strict=True)
    }
    fit = calibrate(counts, guesses)
    assert fit.calibration.gain_keV == pytest.approx(true.gain_keV, rel=1e-4)
    assert fit.calibration.offset_keV == pytest.approx(true.offset_keV, abs=0.001)
    assert fit.rms_residual_keV < 0.001  # sub-eV: centroids good to ~0.02 channel
    assert fit.lines == tuple(names)
    np.testing.assert_allclose(fit.channels, true.channel([PUBLISHED_KEV[n] for n in names]), atol=0.05)
    np.testing.assert_allclose(fit.energies_keV, [PUBLISHED_KEV[n] for n in names], atol=0.003)
    np.testing.assert_allclose(
        fit.residuals_keV, fit.calibration.energy_keV(fit.channels) - fit.energies_keV, atol=1e-12
    )


def test_calibrate_from_a_spectrum_object_and_quadratic():
    true = EnergyCalibration(0.02, 0.0098, 4e-7)
    names = ["Ca Ka1", "Fe Ka1", "Cu Ka1", "Pb La1", "Sr Ka1"]
    spectrum = xrfnb.Spectrum(_spectrum(true, [PUBLISHED_KEV[n] for n in names]), EnergyCalibration(0, 1))
    guesses = {n: float(true.channel(PUBLISHED_KEV[n])) for n in names}
    linear = calibrate(spectrum, guesses)
    quad = calibrate(spectrum, guesses, quadratic=True)
    assert quad.rms_residual_keV < linear.rms_residual_keV
    assert quad.calibration.quadratic_keV == pytest.approx(4e-7, rel=0.1)
    assert quad.calibration.energy_keV(1200) == pytest.approx(true.energy_keV(1200), abs=0.004)


def test_calibrate_errors():
    true = EnergyCalibration(0.0, 0.01)
    counts = _spectrum(true, [PUBLISHED_KEV["Fe Ka1"], PUBLISHED_KEV["Cu Ka1"]])
    with pytest.raises(CalibrationError, match="at least 2 identified peaks"):
        calibrate(counts, {"Fe Ka": 640})
    with pytest.raises(CalibrationError, match="at least 3 identified peaks"):
        calibrate(counts, {"Fe Ka": 640, "Cu Ka": 804}, quadratic=True)
    with pytest.raises(CalibrationError, match="Xx Ka"):
        calibrate(counts, {"Xx Ka": 640, "Cu Ka": 804})
    with pytest.raises(CalibrationError, match="outside the 4096-channel spectrum"):
        calibrate(counts, {"Fe Ka": 640, "Cu Ka": 9000})
    with pytest.raises(CalibrationError, match="no peak maximum"):
        calibrate(np.ones(4096), {"Fe Ka": 640, "Cu Ka": 804})
    with pytest.raises(CalibrationError, match="distinct channels"):
        calibrate(counts, {"Fe Ka": 640, "Fe Ka1": 641})


def test_calibration_reads_as_a_relation_in_messages():
    """Messages show the calibration as E = offset + gain x channel, never the dataclass repr."""
    cal = EnergyCalibration(-0.00612, 0.0119282)
    assert str(cal) == "E = -0.00612 keV + 11.93 eV x channel"
    assert "EnergyCalibration(" not in f"{cal}"
    assert "channel^2" in str(EnergyCalibration(0.0, 0.01, 2e-8))
    assert repr(cal).startswith("EnergyCalibration(offset_keV=")  # the repr stays exact for developers
