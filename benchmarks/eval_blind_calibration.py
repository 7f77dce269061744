"""Blind energy calibration on real spectra: how often ``xrfnb.fit_instrument`` finds the right one.

Every real spectrum in ``../shared/data/real/`` that states its energy calibration (PyMca's and xraylarch's
reference spectra, the Bruker M6 ``.spx``, the Bruker M4 Rh and Mo blanks, NIST's pure-element ``.msa``
files) and the Roman fresco scans (their sum spectra) is stripped of its calibration (1 keV per channel,
``metadata["calibrated"] = False``) and handed to :func:`xrfnb.fit_instrument`, which must then search for
a calibration blind (the peaks' pattern against common lines, the anode's scatter, the zero-energy peak and
the Fano limit of the widths). The result is compared with the file's own calibration at 20, 50 and 80 % of
the channels: "right" within 30 eV (the fresco scans: within 100 eV of the line through the uploaders' five
calibration points, which scatter by about that much), "refused" where the fit raised a clear error, else
"wrong". A wrong blind calibration is the failure that matters: ``xrfnb identify --calibration fit`` never
applies a blind calibration unchecked, whatever this finds.

Usage: python benchmarks/eval_blind_calibration.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import xrfnb
from xrfnb import EnergyCalibration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_instrument_fit import fresco_scan

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def spectra() -> list[tuple[str, xrfnb.Spectrum, EnergyCalibration, float]]:
    """(name, sum spectrum, the file's calibration, tolerance keV) of every real file with a calibration."""
    files = [REAL / n for n in ("Steel.spe", "srm1832.mca", "xrf_spectra.mca", "axorf4_21kev_i050.xrf",
                                 "bruker_m6_jetstream_p059.spx")]
    m4 = REAL / "bruker_m4_rh50kv"
    files += sorted(m4.glob("*/*.spx")) + sorted(m4.glob("*/*.msa"))
    out = []
    for f in files:
        d = xrfnb.load(f)
        out.append((f.name, d, d.calibration, 0.030))
    if (REAL / "roman_fresco_vinca").is_dir():
        for name in ("prova1_det19511", "prova1_det10264", "ruotato_det19511"):
            s = fresco_scan(name, True)
            out.append((f"fresco {name}", s.sum_spectrum(), s.calibration, 0.100))
    return out


def main() -> int:
    if not REAL.is_dir():
        print(f"no real spectra at {REAL}: nothing to evaluate")
        return 0
    tally = {"right": 0, "refused": 0, "wrong": 0}
    for name, spec, truth, tol in spectra():
        n = spec.n_channels
        raw = xrfnb.Spectrum(
            np.asarray(spec.counts),
            EnergyCalibration(0.0, 1.0),
            live_time_s=spec.live_time_s,
            metadata={"calibrated": False},
        )
        try:
            fit = xrfnb.fit_instrument(raw)
        except xrfnb.XRFNBError as exc:
            tally["refused"] += 1
            print(f"  {name[:44]:44s} refused  {str(exc)[:90]}")
            continue
        cal = fit.instrument.calibration
        err = max(abs(float(cal.energy_keV(c) - truth.energy_keV(c))) for c in (0.2 * n, 0.5 * n, 0.8 * n))
        verdict = "right" if err <= tol else "wrong"
        tally[verdict] += 1
        print(f"  {name[:44]:44s} {verdict:8s} {err * 1e3:9.1f} eV  found {cal}  file {truth}  "
              f"{fit.seconds:.1f} s")
    total = sum(tally.values())
    print(f"blind calibration on {total} real spectra: right {tally['right']}, refused {tally['refused']}, "
          f"wrong {tally['wrong']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
