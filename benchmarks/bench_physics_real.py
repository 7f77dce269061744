"""Benchmark: the simulator against real Bruker micro-XRF spectra (Rh and Mo tubes, 50 kV).

Issue #17 item 3, the measuring half. Two sets of real spectra from ``../shared/data/real/`` (see its
``PROVENANCE.md``; NIST's NeXLSpectrum test data, public domain), never copied into the repository:

1. ``bruker_m4_rh50kv/acrylic_blanks/*.spx``: an acrylic (PMMA) blank under Rh and Mo tubes at 50 kV
   with six primary filters, full Bruker XRF headers. Each is compared with a simulated infinitely thick
   PMMA blank (``C5H8O2``, 1.18 g/cm3, as the Stack's substrate) under
   ``Instrument.from_file(path, preset="bruker-m4")`` with the file's live time and calibration, in
   seven windows: the anode's L lines, the continuum in
   4-8, 8-14, 14-18 and 24-35 keV, and the Compton and Rayleigh peaks of the anode's Ka line. Printed
   per blank and window: measured counts, simulated/measured on the simulator's *own absolute scale*
   (no scaling at all), and simulated/measured after one global factor fitted on 2-40 keV (the
   simulation scaled to the measured counts in 2-40 keV). Target: within [0.8, 1.25] wherever the
   window holds >= 2,000 measured counts (PASS/FAIL; ``-`` where the window holds fewer).
2. ``bruker_m4_rh50kv/pure_elements/*.msa``: thick pure-element targets (Ti, Cr, Fe, Ni, Cu, Zr, Sn, S,
   Si) under a Rh 50 kV tube in vacuum. The files carry no XRF header, so the instrument is the
   ``bruker-m4`` preset with: vacuum, the MSA file's calibration, detector thickness, dead layer,
   Fano factor and FWHM at Mn Ka, and a tube current chosen so that the simulated detected count rate
   equals the measured one (so pile-up is simulated at the measured rate). Printed per element:
   Kb/Ka (target within 5 %), the Si escape-peak fraction (E - E(Si Ka)), the Ka+Ka sum-peak fraction
   (2 E), the low-energy tail (1.5-4 FWHM below Ka) and shelf (per keV, between escape peak and Ka),
   each measured and simulated with the same windows and side-band backgrounds; the simulator's own
   exact fractions (the difference of simulations with and without escape / pile-up / incomplete charge
   collection) are printed beside them. A closing block collects the evidence on whether the vendor
   software corrected escape and pile-up in the exported spectra.
3. ``bruker_m6_jetstream_p059.spx``: the header's scattering angle against the measured Compton peak,
   and the spread of its scatter windows under the lens carried over from the M4 and the lens before.

``--fit`` refits the ``bruker-m4`` preset's lens transmission and source solid angle (blanks by depth)
to the Rh blanks f1-f3 (see :func:`fit_lens`); ``--fit-floor`` fits the back-layer shelf and the
instrument's own wall lines (``chamber_walls_sr``) to the floor behind Al 630 um (f3, see
:func:`fit_floor`). f4, f5, the pure elements and the M6 file stay out of both fits, as checks (f1 and
f2 also stay out of ``--fit-floor``).

Everything uses the public API only (``xrfnb.load``, ``xrfnb.Instrument``, ``xrfnb.simulate``,
``xrfnb.line_intensities``, ``xrfnb.line_energy_keV``). Without ``../shared/data/real`` the benchmark
prints why and exits 0. A full run takes about a minute and a half on the 2-core project machine.

Usage::

    python benchmarks/bench_physics_real.py            # every blank and element
    python benchmarks/bench_physics_real.py --quick    # two Rh blanks, one Mo blank, Fe and Cu
    python benchmarks/bench_physics_real.py --blanks-only   # or --elements-only
    python benchmarks/bench_physics_real.py --fit           # refit the bruker-m4 lens (about 4 minutes)
    python benchmarks/bench_physics_real.py --fit-floor     # refit its shelf and wall lines (f3, 20 s)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import xraylib

import xrfnb
from xrfnb.physics.depth import depth_weight, simulate_depth_weighted

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "real" / "bruker_m4_rh50kv"

# ---------------------------------------------------------------------------------------------- constants
#: Electron rest energy m_e c^2, keV (CODATA 2018: 510.99895 keV), for the Compton shift.
ME_C2_KEV = 510.99895
#: Si K absorption edge, keV (xraylib EdgeEnergy): only lines above it make escape peaks.
SI_K_EDGE_KEV = float(xraylib.EdgeEnergy(14, xraylib.K_SHELL))
#: Si Ka energy, keV: the escape peak of a line at E sits at E - E(Si Ka).
SI_KA_KEV = xrfnb.line_energy_keV("Si", "Ka")
#: The issue's acceptance band for simulated/measured in a blank's window, and the count threshold.
#: the preset that supplies what the files lack: the M4 Tornado these spectra come from
PRESET = "bruker-m4"
BAND = (0.8, 1.25)
MIN_COUNTS = 2000.0
#: The issue's target for Kb/Ka simulated vs measured.
KBKA_TOL = 0.05
#: Global-scale range, keV (the issue's "scaled to the measured counts in 2-40 keV"); the measured
#: spectra stop at 40 keV (the pulse processor's range; every file is empty above 40.0 keV).
SCALE_RANGE = (2.0, 40.0)
#: Fixed continuum windows of the issue, keV (no tube or PMMA line inside them for the Rh tube; the
#: Mo tube's Ka Compton and Rayleigh peaks fall in 14-18 keV, flagged in the output).
CONTINUUM = ((4.0, 8.0), (8.0, 14.0), (14.0, 18.0), (24.0, 35.0))
#: Channels below this energy hold the zero peak (the pulse processor's 0 keV reference, CHOFFSET
#: 96 in the MSA files) and the low-energy cut; excluded from measured count rates.
ZERO_PEAK_KEV = 0.2
#: PMMA (poly(methyl methacrylate), C5H8O2), density 1.18 g/cm3 (typical datasheet value).
PMMA = xrfnb.Layer({"C5H8O2": 1.0}, binder=None, thickness_um=10_000.0, density_g_cm3=1.18,
                   name="PMMA")
#: Pure elements with K lines to measure, and the MSA file name pattern.
ELEMENTS = ("Si", "S", "Ti", "Cr", "Fe", "Ni", "Cu", "Zr", "Sn")
MSA_NAME = "{}_50kv_50_ma_Rh_vac_D1.msa"
#: Tube current for the MSA files before the rate match, mA: the file names say "50_ma"; the blanks'
#: "100mA" files state 99 uA in their headers, so "50_ma" is read as 50 uA (only the start value of
#: the rate match; the result does not depend on it).
MSA_TUBE_MA = 0.050


# ---------------------------------------------------------------------------------------------- helpers
def window_sum(spec: xrfnb.Spectrum, lo: float, hi: float) -> float:
    """Counts in the channels whose centre lies in ``[lo, hi)`` keV."""
    e = spec.energy_keV
    return float(spec.counts[(e >= lo) & (e < hi)].sum())


def net_counts(spec: xrfnb.Spectrum, lo: float, hi: float, width: float) -> float:
    """Counts in ``[lo, hi)`` minus a straight-line background from two side bands.

    Parameters
    ----------
    spec : xrfnb.Spectrum
        The spectrum.
    lo, hi : float
        The window, keV.
    width : float
        Width of each side band, keV: ``[lo - width, lo)`` and ``[hi, hi + width)``.

    Returns
    -------
    float
        Net counts (may be negative where the window holds less than the interpolated background).
    """
    e = spec.energy_keV
    c = spec.counts
    inside = (e >= lo) & (e < hi)
    left = (e >= lo - width) & (e < lo)
    right = (e >= hi) & (e < hi + width)
    if not (left.any() and right.any() and inside.any()):
        return float("nan")
    x = np.array([e[left].mean(), e[right].mean()])
    y = np.array([c[left].mean(), c[right].mean()])
    background = np.interp(e[inside], x, y)
    return float(c[inside].sum() - background.sum())


def compton_keV(energy_keV: float, angle_deg: float) -> float:
    """Energy of a photon Compton-scattered by a free electron at rest through ``angle_deg``.

    ``E' = E / (1 + E / (m_e c^2) (1 - cos theta))`` (Compton 1923).
    """
    return energy_keV / (1.0 + energy_keV / ME_C2_KEV * (1.0 - np.cos(np.radians(angle_deg))))


def simulate_blank(inst: xrfnb.Instrument, live_time_s: float) -> xrfnb.Spectrum:
    """The expected spectrum of the infinitely thick PMMA blank, each depth seen under its own detector
    solid angle (:func:`xrfnb.physics.depth.simulate_depth_weighted`: the blank's 20-40 keV scatter
    comes from 5-20 mm deep, where the detector 18.9 mm away subtends 0.2-0.6 of its solid angle from
    the spot). Without noise and pile-up."""
    return simulate_depth_weighted(PMMA, inst, live_time_s=live_time_s)


def verdict(ratio: float, measured: float) -> str:
    """``PASS``/``FAIL`` against :data:`BAND` where ``measured >= MIN_COUNTS``, otherwise ``-``."""
    if measured < MIN_COUNTS or not np.isfinite(ratio):
        return "-"
    return "PASS" if BAND[0] <= ratio <= BAND[1] else "FAIL"


# ---------------------------------------------------------------------------------------------- blanks
def blank_windows(inst: xrfnb.Instrument) -> list[tuple[str, float, float]]:
    """The seven windows of a blank, from the instrument's anode, geometry and resolution.

    * anode L: from ``La - 1.5 FWHM`` to ``Lb1 + 1 FWHM`` (La and Lb1 of the anode, xraylib energies;
      for Rh 2.697 and 2.834 keV; the upper edge stays below Ar Ka 2.957 keV's centre);
    * the four continuum windows of :data:`CONTINUUM`;
    * anode Ka Rayleigh: from ``Ka2 - 1.5 FWHM`` to ``Ka1 + 1.5 FWHM`` (elastic scatter keeps the
      energy);
    * anode Ka Compton: ``E_C +- 2 FWHM`` around the Compton energy of the anode's Ka (rate-weighted
      mean of Ka1 and Ka2) at the scattering angle ``incidence + take-off`` (the angle between the
      incident and the detected beam in the reflection geometry, as in the simulator), cut at the
      Rayleigh window's lower edge; 2 FWHM rather than 1.5 because Compton peaks are Doppler-broadened.

    FWHM is the header's detector resolution at the line (``Instrument.fwhm_keV``).
    """
    anode = inst.anode
    fw = inst.fwhm_keV
    la = xrfnb.line_energy_keV(anode, "La")
    lb1 = xrfnb.line_energy_keV(anode, "Lb1")
    ka = xrfnb.line_energy_keV(anode, "Ka")
    ka1 = xrfnb.line_energy_keV(anode, "Ka1")
    ka2 = xrfnb.line_energy_keV(anode, "Ka2")
    ray_lo, ray_hi = ka2 - 1.5 * float(fw(ka2)), ka1 + 1.5 * float(fw(ka1))
    angle = inst.incidence_deg + inst.takeoff_deg
    e_c = compton_keV(ka, angle)
    w_c = 2.0 * float(fw(e_c))
    wins = [(f"{anode} L", la - 1.5 * float(fw(la)), lb1 + 1.0 * float(fw(lb1)))]
    wins += [(f"cont {lo:g}-{hi:g}", lo, hi) for lo, hi in CONTINUUM]
    wins.append((f"{anode} Ka Compton", e_c - w_c, min(e_c + w_c, ray_lo)))
    wins.append((f"{anode} Ka Rayleigh", ray_lo, ray_hi))
    return wins


def compare_blank(label: str, spec: xrfnb.Spectrum, inst: xrfnb.Instrument, stack: xrfnb.Stack,
                  rows: list[tuple], thickness_check: bool = False) -> None:
    """Print one blank's windows (measured, absolute and scaled sim/meas) and append them to ``rows``."""
    t0 = time.perf_counter()
    sim = simulate_blank(inst, spec.live_time_s)
    dt = time.perf_counter() - t0
    scale = window_sum(spec, *SCALE_RANGE) / window_sum(sim, *SCALE_RANGE)
    rate_meas = window_sum(spec, ZERO_PEAK_KEV, 41.0) / spec.live_time_s
    print(f"\n{label}")
    print(f"  measured {rate_meas:,.0f} cps (above {ZERO_PEAK_KEV} keV), simulated "
          f"{sim.metadata['count_rate_cps']:,.0f} cps; global factor meas/sim on 2-40 keV = "
          f"{scale:.3g}  (simulation {dt:.1f} s)")
    print(f"  {'window':<22} {'keV':>13} {'measured':>11} {'abs sim/meas':>13} {'':>5} "
          f"{'scaled':>8} {'':>5}")
    wins = blank_windows(inst)
    # Informational: a Compton window wide enough for the peak at any angle 90-180 deg (the measured
    # peak is not where the header's angles put it, see the centroid line); not in the PASS tally.
    ka = xrfnb.line_energy_keV(inst.anode, "Ka")
    f = float(inst.fwhm_keV(ka))
    wins.append((f"{inst.anode} Ka Compton wide", compton_keV(ka, 180.0) - 2 * f, wins[-1][1]))
    for name, lo, hi in wins:
        m = window_sum(spec, lo, hi)
        s = window_sum(sim, lo, hi)
        r_abs = s / m if m > 0 else float("nan")
        r_sc = r_abs * scale
        info = name.endswith("wide")
        note = "  (info, not tallied)" if info else ""
        if inst.anode != "Rh" and name == "cont 14-18":
            note = f"  (holds the {inst.anode} Ka Compton/Rayleigh peaks)"
        mark = "*" if m >= MIN_COUNTS else " "
        print(f"  {name:<22} {lo:6.2f}-{hi:<6.2f} {m:11,.0f}{mark} {r_abs:13.3f} "
              f"{verdict(r_abs, m):>5} {r_sc:8.3f} {verdict(r_sc, m):>5}{note}")
        if not info:
            rows.append((label.split(":")[0], name, m, r_abs, r_sc))
    if thickness_check:
        flat = xrfnb.simulate(stack, inst, live_time_s=spec.live_time_s, noise=False, pileup=False)
        parts = [f"{name}: {window_sum(sim, lo, hi) / window_sum(flat, lo, hi):.2f}"
                 for name, lo, hi in wins[:7]]
        print("  depth weighting, sim(solid angle by depth)/sim(the spot's solid angle at every depth): "
              + ", ".join(parts) + f" (w = {depth_weight(inst, 5.0):.2f} at 5 mm, "
              f"{depth_weight(inst, 10.0):.2f} at 10 mm)")
    cm, am = compton_centroid(spec, inst)
    cs, as_ = compton_centroid(sim, inst)
    print(f"  {inst.anode} Ka Compton peak centroid: measured {cm:.3f} keV (scattering angle "
          f"{am:.0f} deg), "
          f"simulated {cs:.3f} keV ({as_:.0f} deg; the instrument's geometry gives "
          f"{inst.scattering_angle_deg:.0f} deg, {inst.incidence_deg + inst.takeoff_deg:g} deg in the "
          "plane of incidence)")
    blank_escape_check(spec, sim, inst, stack, scale)


def run_blanks(files: list[Path]) -> dict[str, list[tuple]]:
    """Simulate and compare every blank; returns the per-window rows by anode for the summary."""
    stack = xrfnb.Stack([], substrate=PMMA)
    rows: dict[str, list[tuple]] = {}
    seen: dict[bytes, str] = {}
    print("=" * 100)
    print("1. Acrylic (PMMA) blanks (.spx, 2017): simulated / measured per window")
    print("   sample: infinitely thick PMMA (C5H8O2, 1.18 g/cm3, the Stack's substrate);")
    print(f"   instrument: Instrument.from_file(path, preset={PRESET!r}) (tube, filters, optics, angles,")
    print("   paths, 20 mbar air, detector, resolution and calibration from the header; lens transmission,")
    print("   source solid angle, azimuth, detector area and line shape from the")
    print(f"   {PRESET} preset, fitted to the Rh blanks f1-f3 with --fit; its back-layer shelf and wall")
    print("   lines fitted to f3 with --fit-floor); the file's live time.")
    print(f"   'abs': the simulator's own absolute scale; 'scaled': after one factor fitted on "
          f"{SCALE_RANGE[0]:g}-{SCALE_RANGE[1]:g} keV.")
    print(f"   PASS/FAIL: ratio within [{BAND[0]}, {BAND[1]}] where measured >= {MIN_COUNTS:,.0f} "
          "counts (marked *).")
    for i, path in enumerate(files):
        spec = xrfnb.load(path)
        key = spec.counts.tobytes()
        if key in seen:
            print(f"\n{path.name}: identical counts to {seen[key]} (a duplicate file): not repeated")
            continue
        seen[key] = path.name
        inst = xrfnb.Instrument.from_file(path, preset=PRESET)
        header = spec.metadata["bruker_header"]
        if inst.calibration != spec.calibration or inst.n_channels != spec.n_channels:
            raise SystemExit(f"{path.name}: instrument calibration differs from the spectrum's")
        label = (f"{path.name}: {inst.anode} {inst.tube_voltage_kV:g} kV "
                 f"{inst.tube_current_mA * 1e3:g} uA, filter {header.get('filter_name', '?')}, "
                 f"live {spec.live_time_s:.1f} s")
        compare_blank(label, spec, inst, stack, rows.setdefault(inst.anode, []), thickness_check=i == 0)
    return rows


def blank_escape_check(spec: xrfnb.Spectrum, sim: xrfnb.Spectrum, inst: xrfnb.Instrument,
                       stack: xrfnb.Stack, scale: float) -> None:
    """Can a blank show whether escape peaks were removed? The simulated escape of the anode's Ka.

    The escape peak of the scattered anode Ka lies at ``E(Ka) - E(Si Ka)`` on the Compton shoulder;
    prints the simulator's escape counts there (scaled, with minus without escape) beside the Poisson
    noise of the measured window, i.e. whether the blank could detect it at all.
    """
    e_esc = xrfnb.line_energy_keV(inst.anode, "Ka") - SI_KA_KEV
    f = float(inst.fwhm_keV(e_esc))
    lo, hi = e_esc - f, e_esc + f
    sim_off = simulate_blank(inst.with_(escape=False), spec.live_time_s)
    exact = (window_sum(sim, lo, hi) - window_sum(sim_off, lo, hi)) * scale
    noise = np.sqrt(window_sum(spec, lo, hi))
    print(f"  escape of the scattered {inst.anode} Ka at {e_esc:.2f} keV: simulated {exact:,.0f} counts "
          f"(scaled) against a measured window of {window_sum(spec, lo, hi):,.0f} +- {noise:,.0f}: "
          f"{'detectable' if exact > 3 * noise else 'not detectable'} in a blank")


def compton_centroid(spec: xrfnb.Spectrum, inst: xrfnb.Instrument) -> tuple[float, float]:
    """Centroid of the anode Ka Compton peak and the scattering angle it implies.

    Centroid of the counts above a straight line through the side bands, between the Compton energy
    at 180 deg - 2 FWHM and at 90 deg + 2 FWHM, cut at the Ka2 Rayleigh line - 2 FWHM; the angle is
    the inverse of :func:`compton_keV` at the anode's Ka energy.
    """
    ka = xrfnb.line_energy_keV(inst.anode, "Ka")
    f = float(inst.fwhm_keV(ka))
    lo = compton_keV(ka, 180.0) - 2 * f
    hi = min(compton_keV(ka, 90.0) + 2 * f, xrfnb.line_energy_keV(inst.anode, "Ka2") - 2 * f)
    e = spec.energy_keV
    c = spec.counts
    inside = (e >= lo) & (e < hi)
    left = (e >= lo - f) & (e < lo)
    right = (e >= hi) & (e < hi + 0.5 * f)
    bg = np.interp(e[inside], [e[left].mean(), e[right].mean()], [c[left].mean(), c[right].mean()])
    net = np.clip(c[inside] - bg, 0.0, None)
    centroid = float((e[inside] * net).sum() / net.sum())
    cos_t = 1.0 - (ka / centroid - 1.0) * ME_C2_KEV / ka
    return centroid, float(np.degrees(np.arccos(np.clip(cos_t, -1.0, 1.0))))


# ---------------------------------------------------------------------------------------------- elements
def element_instrument(spec: xrfnb.Spectrum) -> xrfnb.Instrument:
    """``bruker-m6`` preset with vacuum and the MSA file's calibration and detector keywords."""
    det = spec.metadata.get("emsa_detector", {})
    changes = {"atmosphere": "vacuum", "calibration": spec.calibration,
               "n_channels": spec.n_channels, "tube_current_mA": MSA_TUBE_MA}
    for key in ("fwhm_mnka_eV", "fano", "dead_layer_um"):
        if key in det:
            changes[key] = det[key]
    if "active_layer_um" in det:
        changes["detector_thickness_um"] = det["active_layer_um"]
    return xrfnb.Instrument.preset(PRESET).with_(**changes)


def peak_windows(inst: xrfnb.Instrument, el: str) -> dict[str, tuple[float, float]]:
    """Ka, Kb, escape, sum, tail and shelf windows of a pure element, keV.

    Ka and Kb: ``+- 1.5 FWHM`` around the rate-weighted group energies, split at their midpoint where
    they overlap (one background line under both, from side bands outside the pair); escape:
    ``E(Ka) - E(Si Ka) +- 1 FWHM`` (only above the Si K edge); sum: ``2 E(Ka) +- 1.5 FWHM(2 E)`` (only
    below 40 keV, where the spectra stop); tail: ``[Ka - 4 FWHM, Ka - 1.5 FWHM)``; shelf: from 2 FWHM
    above the escape peak (or 0.5 keV) to 4 FWHM below Ka, at least 0.3 keV wide, else absent.
    """
    ka = xrfnb.line_energy_keV(el, "Ka")
    kb = xrfnb.line_energy_keV(el, "Kb")
    fa, fb = float(inst.fwhm_keV(ka)), float(inst.fwhm_keV(kb))
    mid = 0.5 * (ka + kb)
    w = {"Ka": (ka - 1.5 * fa, min(ka + 1.5 * fa, mid)), "Kb": (max(kb - 1.5 * fb, mid), kb + 1.5 * fb)}
    if ka > SI_K_EDGE_KEV:
        e_esc = ka - SI_KA_KEV
        fe = float(inst.fwhm_keV(e_esc))
        w["escape"] = (e_esc - fe, e_esc + fe)
        shelf_lo = e_esc + 2.0 * fe
    else:
        shelf_lo = 0.5
    fs = float(inst.fwhm_keV(2 * ka))
    if 2 * ka + 3 * fs < SCALE_RANGE[1]:  # the spectra stop at 40 keV
        w["sum"] = (2 * ka - 1.5 * fs, 2 * ka + 1.5 * fs)
    w["tail"] = (ka - 4.0 * fa, ka - 1.5 * fa)
    if ka - 4.0 * fa - shelf_lo >= 0.3:
        w["shelf"] = (shelf_lo, ka - 4.0 * fa)
    return w


def fractions(spec: xrfnb.Spectrum, w: dict[str, tuple[float, float]], side: float) -> dict[str, float]:
    """Kb/Ka, escape, sum, tail and shelf (per keV) of a spectrum relative to its net Ka counts."""
    # One straight-line background under both Ka and Kb, from side bands outside the pair (side
    # bands between them would sit on the other peak).
    e, c = spec.energy_keV, spec.counts
    lo, hi = w["Ka"][0], w["Kb"][1]
    left = (e >= lo - side) & (e < lo)
    right = (e >= hi) & (e < hi + side)
    x = [e[left].mean(), e[right].mean()]
    y = [c[left].mean(), c[right].mean()]
    net = {}
    for key in ("Ka", "Kb"):
        m = (e >= w[key][0]) & (e < w[key][1])
        net[key] = float(c[m].sum() - np.interp(e[m], x, y).sum())
    ka = net["Ka"]
    out = {"Ka": ka, "Kb/Ka": net["Kb"] / ka}
    for key in ("escape", "sum"):
        if key in w:
            lo, hi = w[key]
            out[key] = net_counts(spec, lo, hi, 0.75 * (hi - lo)) / ka
    out["tail"] = window_sum(spec, *w["tail"]) / ka
    if "shelf" in w:
        lo, hi = w["shelf"]
        out["shelf"] = window_sum(spec, lo, hi) / (hi - lo) / ka
    return out


def run_elements(data: Path, elements: list[str]) -> list[dict]:
    """Measure and simulate every pure element; returns one result dict per element."""
    print("\n" + "=" * 100)
    print("2. Pure thick elements (Rh 50 kV, vacuum; MSA exports): line ratios and detector artefacts")
    print("   instrument: bruker-m6 preset + vacuum + the file's calibration, Si thickness, dead layer,")
    print("   Fano factor and FWHM at Mn Ka; tube current set so the simulated detected rate equals the")
    print(f"   measured rate above {ZERO_PEAK_KEV} keV (so the simulated pile-up is at the measured rate;")
    print("   pile-up resolving time from the preset). Sample: 10 mm of the pure element (xraylib density).")
    print("   Fractions are relative to the net Ka counts; escape and sum are net of a side-band line,")
    print("   tail = counts 1.5-4 FWHM below Ka, shelf = counts per keV between escape peak and Ka.")
    print("   'sim exact': the simulator's own share (with minus without escape / pile-up / ICC tail).")
    # The 2019 acrylic blank of the same session: the scatter of this instrument on the preset's
    # absolute scale at 50 uA (the pure elements' fluorescence is compared on the same scale below).
    blank = data / "pure_elements" / "Acrylic_50kv_50_ma_Rh_vac_D1_600s.msa"
    rows: list[tuple] = []
    if blank.is_file():
        spec = xrfnb.load(blank)
        compare_blank(f"{blank.name}: acrylic blank of this session, preset instrument at "
                      f"{MSA_TUBE_MA * 1e3:g} uA, live {spec.live_time_s:.1f} s", spec,
                      element_instrument(spec), xrfnb.Stack([], substrate=PMMA), rows)
    results = []
    for el in elements:
        path = data / "pure_elements" / MSA_NAME.format(el)
        spec = xrfnb.load(path)
        inst0 = element_instrument(spec)
        stack = xrfnb.Stack([xrfnb.Layer({el: 1.0}, binder=None, thickness_um=10_000.0)])
        lt = spec.live_time_s
        rate_meas = window_sum(spec, ZERO_PEAK_KEV, 41.0) / lt
        sim0 = xrfnb.simulate(stack, inst0, live_time_s=lt, noise=False, pileup=False)
        rate_abs = sim0.metadata["count_rate_cps"]
        inst = inst0.with_(tube_current_mA=MSA_TUBE_MA * rate_meas / rate_abs)
        sim = xrfnb.simulate(stack, inst, live_time_s=lt, noise=False)
        sim_noesc = xrfnb.simulate(stack, inst.with_(escape=False), live_time_s=lt, noise=False)
        sim_nopu = xrfnb.simulate(stack, inst, live_time_s=lt, noise=False, pileup=False)
        sim_noicc = xrfnb.simulate(stack, inst.with_(icc_layer_um=0.0), live_time_s=lt, noise=False)
        w = peak_windows(inst, el)
        side = 1.0 * float(inst.fwhm_keV(xrfnb.line_energy_keV(el, "Ka")))
        fm = fractions(spec, w, side)
        fsim = fractions(sim, w, side)
        ka_sim = fsim["Ka"]
        exact = {}
        for key, other in (("escape", sim_noesc), ("sum", sim_nopu)):
            if key in w:
                exact[key] = (window_sum(sim, *w[key]) - window_sum(other, *w[key])) / ka_sim
        exact["tail"] = (window_sum(sim, *w["tail"]) - window_sum(sim_noicc, *w["tail"])) / ka_sim
        if "shelf" in w:
            lo, hi = w["shelf"]
            exact["shelf"] = (window_sum(sim, lo, hi) - window_sum(sim_noicc, lo, hi)) / (hi - lo) / ka_sim
        table = xrfnb.line_intensities(stack, inst)
        kbka_lines = table.total(el, "Kb") / table.total(el, "Ka")
        neg = spec.metadata.get("emsa_negative_counts")
        results.append({"el": el, "meas": fm, "sim": fsim, "exact": exact, "lines": kbka_lines,
                        "rate": rate_meas, "rate_abs": rate_abs, "w": w, "neg": neg})
        print(f"\n{el}: {path.name}, live {lt:.1f} s, measured {rate_meas:,.0f} cps; simulated at "
              f"{MSA_TUBE_MA * 1e3:g} uA: {rate_abs:,.0f} cps (abs sim/meas {rate_abs / rate_meas:.3g}); "
              f"matched at {inst.tube_current_mA * 1e3:.3g} uA"
              + (f"; {len(neg['channels'])} negative channel(s) below 1 keV in the file, clipped"
                 if neg else ""))
        print(f"  {'quantity':<16} {'window keV':>13} {'measured':>11} {'simulated':>11} "
              f"{'sim/meas':>9} {'sim exact':>11}")
        kb_ok = abs(fsim["Kb/Ka"] / fm["Kb/Ka"] - 1.0) <= KBKA_TOL
        overlap = w["Ka"][1] == w["Kb"][0]
        note = "  Ka/Kb unresolved: window ratio" if overlap else ""
        print(f"  {'Kb/Ka':<16} {'':>13} {fm['Kb/Ka']:11.4f} {fsim['Kb/Ka']:11.4f} "
              f"{fsim['Kb/Ka'] / fm['Kb/Ka']:9.3f} {kbka_lines:11.4f}  "
              f"{'PASS' if kb_ok else 'FAIL'} (5 %){note}")
        for key, label in (("escape", "escape/Ka"), ("sum", "sum 2Ka/Ka"), ("tail", "tail/Ka"),
                           ("shelf", "shelf/Ka per keV")):
            if key not in w:
                continue
            lo, hi = w[key]
            a, b = fm[key], fsim[key]
            print(f"  {label:<16} {lo:6.2f}-{hi:<6.2f} {a:11.2e} {b:11.2e} {b / a:9.3g} "
                  f"{exact.get(key, float('nan')):11.2e}")
    return results


# ---------------------------------------------------------------------------------------------- --fit
#: the blanks and 1 keV bins the lens is fitted to: primary scatter from 2 (f1), 5 (f2) and 9 keV (f3,
#: behind Al 630 um), plus f3's 4-7 keV, where only the detector's shelf puts counts
FIT_SETS = (("20170510_D1_Rh_50kv_100mA_acryl__f1_0.spx", tuple((a, a + 1) for a in range(2, 40))),
            ("20170510_D1_Rh_50kv_100mA_acryl_f2_0.spx", tuple((a, a + 1) for a in range(5, 40))),
            ("20170510_D1_Rh_50kv_100mA_acryl_f3_0.spx",
             ((4, 5), (5, 6), (6, 7), *((a, a + 1) for a in range(9, 40)))))
FIT_FIELDS = ("polycapillary_cutoff_keV", "polycapillary_slope", "polycapillary_floor",
              "source_solid_angle_sr")


def fit_lens(data: Path) -> None:
    """Least-squares fit of the lens transmission, source solid angle and back-layer shelf.

    Minimises the log of simulated/measured counts in the bins of :data:`FIT_SETS` (bins with > 400
    counts), starting from the preset; prints the fitted values for ``xrfnb/data/instruments.toml``.
    The blanks f4 and f5 (Ti and Cu filters) and the pure elements are left out, as checks. About four
    minutes on the 2-core machine.
    """
    from scipy.optimize import least_squares  # deferred: only this mode needs scipy

    blanks = data / "acrylic_blanks"
    specs = [xrfnb.load(blanks / f) for f, _ in FIT_SETS]
    insts = [xrfnb.Instrument.from_file(blanks / f, preset=PRESET) for f, _ in FIT_SETS]
    meas = [np.array([window_sum(s, a, b) for a, b in bins])
            for s, (_, bins) in zip(specs, FIT_SETS, strict=True)]

    def residuals(x: np.ndarray) -> np.ndarray:
        out = []
        for spec, inst, m, (_, bins) in zip(specs, insts, meas, FIT_SETS, strict=True):
            sim = simulate_blank(inst.with_(**dict(zip(FIT_FIELDS, x, strict=True))), spec.live_time_s)
            sm = np.array([window_sum(sim, a, b) for a, b in bins])
            ok = m > 400
            out.append(np.log(sm[ok] / m[ok]))
        return np.concatenate(out)

    x0 = np.array([getattr(insts[0], f) for f in FIT_FIELDS])
    fit = least_squares(residuals, x0, x_scale=[1, 1, 0.003, 3e-4], diff_step=1e-3,
                        bounds=([5, 1, 0, 1e-5], [30, 15, 0.2, 1e-2]))
    r = np.exp(fit.fun)
    print(f"fit of {PRESET}: " + ", ".join(f"{f} = {v:.4g}" for f, v in zip(FIT_FIELDS, fit.x, strict=True)))
    print(f"  {r.size} bins: simulated/measured {r.min():.2f} .. {r.max():.2f}, rms log "
          f"{np.sqrt(np.mean(fit.fun ** 2)):.3f}")


# ---------------------------------------------------------------------------------------------- --fit-chamber
#: the blank the instrument's wall lines are fitted to: behind Al 630 um the beam holds nothing below
#: 9 keV, so 5-8 keV holds only the detector's shelf and the walls' K lines (f1, f2, f4, f5 and the
#: 2019 spectra are held out)
CHAMBER_FIT_BLANK = "20170510_D1_Rh_50kv_100mA_acryl_f3_0.spx"
#: the wall elements fitted (the K lines seen in the blanks: Cr, Fe, Co, Ni; no Cu or Zn) and the window
CHAMBER_ELEMENTS = ("Cr", "Fe", "Co", "Ni")
CHAMBER_WINDOW_KEV = (5.0, 8.0)
#: the line-free part of the f3 floor (below Cr Ka, above Ca Kb), where only the detector's shelf lies
FLOOR_WINDOW_KEV = (4.1, 5.3)


def fit_floor(data: Path) -> tuple[float, dict[str, float]]:
    """Fit the f3 blank's floor: the back-layer shelf, then the instrument's wall lines.

    First ``back_icc_layer_um`` (with ``partial_collection`` 0) so that the simulated counts in the
    line-free :data:`FLOOR_WINDOW_KEV` equal the measured ones (the shelf is linear in the thin layer;
    two steps of the secant), then :func:`fit_chamber` with that layer. Prints both for
    ``xrfnb/data/instruments.toml``.
    """
    path = data / "acrylic_blanks" / CHAMBER_FIT_BLANK
    spec = xrfnb.load(path)
    inst = xrfnb.Instrument.from_file(path, preset=PRESET).with_(partial_collection=0.0)
    measured = window_sum(spec, *FLOOR_WINDOW_KEV)

    def floor(b_um: float) -> float:
        sim = simulate_blank(inst.with_(back_icc_layer_um=b_um), spec.live_time_s)
        return window_sum(sim, *FLOOR_WINDOW_KEV)

    f0, b = floor(0.0), 10.0
    for _ in range(2):
        b = b * (measured - f0) / (floor(b) - f0)
    print(f"fit of {PRESET} back_icc_layer_um on {path.name}, {FLOOR_WINDOW_KEV[0]:g}-"
          f"{FLOOR_WINDOW_KEV[1]:g} keV ({measured:,.0f} counts; {f0:,.0f} without the shelf): {b:.3g} um")
    return b, fit_chamber(data, back_icc_layer_um=b)


def fit_chamber(data: Path, back_icc_layer_um: float | None = None) -> dict[str, float]:
    """Least-squares fit of ``chamber_walls_sr`` (Cr, Fe, Co, Ni) to the f3 blank's 5-8 keV channels.

    The walls' lines are linear in their solid angles: the measured counts minus the simulation without
    walls are fitted, channel by channel in :data:`CHAMBER_WINDOW_KEV`, with one spectrum per element
    (simulated with 1 sr of that element's wall, minus without) and a straight line (what is left of the
    continuum and shelf, so that the solid angles follow the lines alone); weights 1/sqrt(counts),
    solid angles >= 0. Prints the solid angles for ``xrfnb/data/instruments.toml`` and returns them.
    """
    from scipy.optimize import lsq_linear  # deferred: only this mode needs scipy

    path = data / "acrylic_blanks" / CHAMBER_FIT_BLANK
    spec = xrfnb.load(path)
    inst = xrfnb.Instrument.from_file(path, preset=PRESET).with_(chamber_walls_sr={})
    if back_icc_layer_um is not None:
        inst = inst.with_(back_icc_layer_um=back_icc_layer_um, partial_collection=0.0)
    lt = spec.live_time_s
    base = simulate_blank(inst, lt).counts
    e = spec.energy_keV
    win = (e >= CHAMBER_WINDOW_KEV[0]) & (e < CHAMBER_WINDOW_KEV[1])
    cols = []
    bare = base
    for el in CHAMBER_ELEMENTS:
        unit = simulate_blank(inst.with_(chamber_walls_sr={el: 1.0}), lt).counts
        cols.append((unit - bare)[win])
    x = (e[win] - e[win].mean()) / np.ptp(e[win])
    a = np.column_stack([*cols, np.ones_like(x), x])
    y = spec.counts[win] - base[win]
    w = 1.0 / np.sqrt(np.maximum(spec.counts[win], 1.0))
    n = len(CHAMBER_ELEMENTS)
    bounds = ([0.0] * n + [-np.inf] * 2, [2 * np.pi] * n + [np.inf] * 2)
    fit = lsq_linear(a * w[:, None], y * w, bounds=bounds)
    cov = np.linalg.pinv((a * w[:, None]).T @ (a * w[:, None]))
    sd = np.sqrt(np.diag(cov))
    out = {el: float(v) for el, v in zip(CHAMBER_ELEMENTS, fit.x[:n], strict=True)}
    print(f"fit of {PRESET} chamber_walls_sr on {path.name}, {CHAMBER_WINDOW_KEV[0]:g}-"
          f"{CHAMBER_WINDOW_KEV[1]:g} keV ({int(win.sum())} channels): " + ", ".join(
              f"{el} {v:.3g} +- {s:.2g} sr" for (el, v), s in zip(out.items(), sd[:n], strict=True)))
    chi2 = float(np.sum((a @ fit.x - y) ** 2 * w**2))
    print(f"  chi2/dof {chi2 / (win.sum() - a.shape[1]):.2f}; straight line left under the lines: "
          f"{fit.x[n]:.3g} counts per channel, slope {fit.x[n + 1]:.3g}")
    return out


# ---------------------------------------------------------------------------------------------- M6
M6_FILE = DATA.parent / "bruker_m6_jetstream_p059.spx"


def check_m6() -> None:
    """The Bruker M6 Jetstream spectrum (a calcium phosphate on a calcium ground, helium flush): its
    header's geometry against its Compton peak, and the shape of its scatter against the simulator with
    the lens carried over from the M4 (the sample is only roughly known, so only the scatter windows'
    spread is meaningful, not their level)."""
    if not M6_FILE.is_file():
        print(f"\nSKIP M6 check: {M6_FILE} not found")
        return
    spec = xrfnb.load(M6_FILE)
    inst = xrfnb.Instrument.from_file(M6_FILE)
    print("\n" + "=" * 100)
    print(f"3. Bruker M6 Jetstream spectrum {M6_FILE.name}: {inst.tube_current_mA * 1e3:g} uA, "
          f"{inst.atmosphere}, live {spec.live_time_s:.1f} s")
    cm, am = compton_centroid(spec, inst)
    print(f"  Rh Ka Compton centroid: measured {cm:.3f} keV ({am:.1f} deg); the header's geometry "
          f"(incidence {inst.incidence_deg:g}, take-off {inst.takeoff_deg:g}) gives "
          f"{inst.scattering_angle_deg:.1f} deg")
    sample = xrfnb.Stack([], substrate=xrfnb.Layer({"Ca5(PO4)3(OH)": 0.5, "CaCO3": 0.5}, binder=None,
                                                   thickness_um=5000.0, density_g_cm3=2.0))
    wins = (("cont 8-9.5", 8.0, 9.5), ("cont 14-18", 14.0, 18.0), ("Rh Ka Compton", 18.5, 19.8),
            ("Rh Ka Rayleigh", 19.9, 20.5), ("cont 24-35", 24.0, 35.0))
    old = inst.with_(polycapillary_cutoff_keV=20.0, polycapillary_slope=4.0, polycapillary_floor=0.0,
                     polycapillary_low_keV=0.0, partial_collection=0.0)
    for label, i in (("lens 1/(1+(E/20)^4) (the preset before the blanks)", old),
                     ("lens fitted to the M4 blanks", inst)):
        sim = xrfnb.simulate(sample, i, live_time_s=spec.live_time_s, noise=False)
        ratios = [window_sum(sim, a, b) / window_sum(spec, a, b) for _, a, b in wins]
        ref = ratios[0]
        print(f"  {label}: scatter windows sim/meas relative to 8-9.5 keV: " + ", ".join(
            f"{n} {r / ref:.2f}" for (n, _, _), r in zip(wins, ratios, strict=True)))


def summary(rows: dict[str, list[tuple]], results: list[dict]) -> None:
    """Compact tables: windows that fail, Kb/Ka, and the evidence on vendor corrections."""
    print("\n" + "=" * 100)
    print("Summary")
    for anode, rr in rows.items():
        tested = [r for r in rr if r[2] >= MIN_COUNTS]
        for col, label in ((3, "absolute"), (4, "scaled 2-40 keV")):
            fails = [r for r in tested if not BAND[0] <= r[col] <= BAND[1]]
            print(f"  {anode} blanks, {label}: {len(tested) - len(fails)}/{len(tested)} windows with >= "
                  f"{MIN_COUNTS:,.0f} counts PASS")
        by_window: dict[str, list[float]] = {}
        for r in tested:
            by_window.setdefault(r[1], []).append(r[4])
        for name, vals in by_window.items():
            print(f"    {name:<18} scaled sim/meas {min(vals):.2f} .. {max(vals):.2f} "
                  f"over {len(vals)} blank(s)")
    if results:
        print("  Kb/Ka sim/meas: " + ", ".join(
            f"{r['el']} {r['sim']['Kb/Ka'] / r['meas']['Kb/Ka']:.3f}" for r in results))
        esc = [(r["el"], r["meas"]["escape"], r["exact"]["escape"]) for r in results if "escape" in r["w"]]
        print("  escape/Ka measured vs simulated (exact): " + ", ".join(
            f"{el} {m:.1e}/{s:.1e}" for el, m, s in esc))
        sums = [(r["el"], r["meas"]["sum"], r["exact"]["sum"]) for r in results if "sum" in r["w"]]
        print("  sum/Ka measured vs simulated (exact): " + ", ".join(
            f"{el} {m:.1e}/{s:.1e}" for el, m, s in sums))
        negs = [r["el"] for r in results if r["neg"]]
        print("  files with negative counts below 1 keV (clipped by xrfnb.load): "
              f"{', '.join(negs) or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="two Rh blanks, one Mo blank, Fe and Cu only")
    ap.add_argument("--blanks-only", action="store_true", help="only the acrylic blanks")
    ap.add_argument("--elements-only", action="store_true", help="only the pure elements")
    ap.add_argument("--fit", action="store_true",
                    help=f"refit the {PRESET} preset's lens, solid angle and partial collection (~4 min)")
    ap.add_argument("--fit-floor", action="store_true",
                    help=f"refit the {PRESET} preset's back-layer shelf and chamber walls (Cr, Fe, Co, "
                    "Ni) to the f3 blank's floor")
    ap.add_argument("--data", type=Path, default=DATA,
                    help="folder holding acrylic_blanks/ and pure_elements/ (default: %(default)s)")
    args = ap.parse_args()
    data = args.data
    if not (data / "acrylic_blanks").is_dir() or not (data / "pure_elements").is_dir():
        print(f"SKIP: real reference data not found at {data} (expected ../shared/data/real/"
              "bruker_m4_rh50kv relative to the repository root; see its PROVENANCE.md)")
        sys.exit(0)
    t0 = time.perf_counter()
    if args.fit:
        fit_lens(data)
        return
    if args.fit_floor:
        fit_floor(data)
        return
    rows: dict[str, list[tuple]] = {}
    results: list[dict] = []
    if not args.elements_only:
        files = sorted((data / "acrylic_blanks").glob("*.spx"))
        rh = [f for f in files if "_Rh_" in f.name]
        mo = [f for f in files if "_Mo_" in f.name]
        if args.quick:
            rh = [f for f in rh if "acryl_f1_0" in f.name or "acryl_f4_0" in f.name]
            mo = mo[:1]
        rows = run_blanks(rh + mo)
    if not args.blanks_only:
        results = run_elements(data, ["Fe", "Cu"] if args.quick else list(ELEMENTS))
    if not (args.blanks_only or args.elements_only):
        check_m6()
    summary(rows, results)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
