"""Fit a paint stack of given pigments to a measured spectrum (the evidence behind a pigment call).

The model says *which* pigment classes are present and whether each lies in the surface layer or below
it; :func:`fit_stack` finds *how*: the surface-layer thickness and the weight fractions of the pigments in
each layer whose simulated spectrum (the fundamental-parameters simulator, :func:`xrfnb.simulate_batch`,
noise-free, with Rayleigh and Compton scatter) best explains the measured counts. The residual of that
spectrum is what a user should judge a call by: a pigment the spectrum does not support, or a line no
called pigment explains, shows up in it.

The fit is a search over a grid, simulated in one batch: surface thickness (``surface_thickness_um``)
times the surface layer's pigment load (``surface_load``) times, in each layer, every combination of
relative pigment amounts 1 : 3 : 9 (fewer levels, then one load, when there are many pigments, so that
at most ``max_candidates`` stacks are simulated), then a finer search of the surface thickness between the
neighbours of the best grid value. Each candidate's spectrum is scaled to the measured counts and scored
by the Poisson deviance over the fitted energy range; the best one is returned. A surface layer without
pigments (binder only, e.g. a varnish or an XRF-silent paint) stands in when the model calls only buried
classes.

XRF constrains a layer's mass of each element per area better than its thickness and concentration
apart: a thin, rich surface layer and a thicker, leaner one can fit about equally well (the attenuation
of the lines from below, and their K/L line ratios, are what separate them). Read the fitted thickness
and weight fractions as one stack that explains the spectrum, not as a measurement of either.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from .._errors import DataError, SimulationError
from ..physics.instrument import Instrument
from ..physics.simulate import simulate_batch
from ..physics.stack import Layer, Stack

__all__ = ["StackFit", "fit_stack", "poisson_deviance"]

_LEVELS = (1.0, 3.0, 9.0)


@dataclasses.dataclass(frozen=True, eq=False)
class StackFit:
    """The paint stack that best explains a spectrum, among the candidates searched.

    Attributes
    ----------
    stack : Stack
        The best stack (layers from the surface down).
    expected : numpy.ndarray
        Its expected counts per channel, scaled to the measured counts in the fitted range,
        shape (channels,), float64.
    deviance : float
        Poisson deviance of the measured counts against ``expected`` over the fitted channels.
    n_channels_fitted : int
        Channels in the fitted energy range.
    n_candidates : int
        Stacks simulated.
    surface_thickness_um : float
        Thickness of the surface layer of the best stack, micrometres.
    weight_fractions : tuple of dict
        Per layer (surface first), pigment -> weight fraction.
    """

    stack: Stack
    expected: np.ndarray
    deviance: float
    n_channels_fitted: int
    n_candidates: int
    surface_thickness_um: float
    weight_fractions: tuple[dict[str, float], ...]

    @property
    def reduced_deviance(self) -> float:
        """Deviance per fitted channel: compare stacks by it; with many counts per channel it is about 1
        for a stack that explains the spectrum up to counting noise (less at a few counts per channel)."""
        return self.deviance / max(1, self.n_channels_fitted)

    def describe(self) -> str:
        """One line for people, e.g. ``"vermilion 45 wt% (8 um) over lead white 60 wt%"``."""
        parts = []
        for i, wf in enumerate(self.weight_fractions):
            text = ", ".join(f"{p} {100 * w:.0f} wt%" for p, w in wf.items()) or "binder only"
            if i == 0 and len(self.weight_fractions) > 1:
                text += f" ({self.surface_thickness_um:.1f} µm)"
            parts.append(text)
        return " over ".join(parts)


def poisson_deviance(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Poisson deviance ``2 sum(y ln(y / mu) - (y - mu))`` along the last axis.

    Parameters
    ----------
    counts : numpy.ndarray
        Measured counts ``y``, shape (..., channels), non-negative.
    expected : numpy.ndarray
        Expected counts ``mu``, broadcastable to ``counts``, positive.

    Returns
    -------
    numpy.ndarray
        Shape (...,).
    """
    y = np.asarray(counts, dtype=float)
    mu = np.maximum(np.asarray(expected, dtype=float), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)
    return 2.0 * np.sum(term - (y - mu), axis=-1)


def _combos(names: Sequence[str], levels: Sequence[float], load: float) -> list[dict[str, float]]:
    if not names:
        return [{}]
    out, seen = [], set()
    for w in itertools.product(levels, repeat=len(names)):
        total = sum(w)
        key = tuple(round(x / total, 6) for x in w)
        if key in seen:
            continue
        seen.add(key)
        out.append({n: load * x / total for n, x in zip(names, w, strict=True)})
    return out


def fit_stack(
    counts: np.ndarray,
    instrument: Instrument,
    surface: Sequence[str],
    buried: Sequence[str] = (),
    *,
    surface_thickness_um: Sequence[float] = (3.0, 8.0, 20.0, 50.0),
    buried_thickness_um: float = 40.0,
    pigment_load: float = 0.6,
    surface_load: Sequence[float] = (0.15, 0.35, 0.7),
    binder: str | None = "linseed oil",
    ground: str | None = None,
    energy_range_keV: tuple[float, float | None] = (1.0, None),
    max_candidates: int = 400,
) -> StackFit:
    """The stack of the given pigments whose simulated spectrum best explains ``counts``.

    Parameters
    ----------
    counts : numpy.ndarray
        Measured counts, shape (channels,) on ``instrument.calibration`` (a pixel, or a region's mean).
    instrument : Instrument
        The instrument (its calibration and channel count must be those of ``counts``).
    surface : sequence of str
        Library pigments of the surface layer (may be empty: a binder-only surface layer).
    buried : sequence of str
        Library pigments of one layer below it (empty: a single paint layer).
    surface_thickness_um : sequence of float
        Surface-layer thicknesses searched, micrometres.
    buried_thickness_um : float
        Thickness of the buried layer, micrometres.
    pigment_load : float
        Weight fraction of all pigments in the buried layer (the rest is binder).
    surface_load : sequence of float
        Weight fractions of all pigments in the surface layer searched (the rest is binder).
    binder : str or None
        Binder of both layers.
    ground : str or None
        Ground below the layers (a library pigment or ground name), or none.
    energy_range_keV : (float, float or None)
        Energies fitted; None as the upper bound: 95 % of the tube voltage, or 1 keV above a
        monochromatic excitation energy (its Rayleigh and Compton peaks included).
    max_candidates : int
        At most this many stacks are simulated (fewer relative-amount levels when there are many pigments).

    Returns
    -------
    StackFit

    Raises
    ------
    DataError
        Counts of the wrong shape, negative or without counts in the fitted range; no pigment at all.
    SimulationError
        Unknown pigments or a simulation failure.
    """
    y_all = np.asarray(counts, dtype=float)
    n_ch = int(getattr(instrument, "n_channels", y_all.size))
    if y_all.ndim != 1 or y_all.size != n_ch:
        raise DataError(f"fit_stack needs counts of shape ({n_ch},) for this instrument, got {y_all.shape}")
    if not np.all(np.isfinite(y_all)) or (y_all < 0).any():
        raise DataError("fit_stack needs finite, non-negative counts")
    surface, buried = list(dict.fromkeys(surface)), list(dict.fromkeys(buried))
    if not surface and not buried:
        raise DataError("fit_stack needs at least one pigment (surface or buried)")
    energy = instrument.calibration.energies_keV(n_ch)
    e_lo, e_hi = energy_range_keV
    if e_hi is None:  # the tube's continuum up to near its voltage; a monochromatic beam with its scatter
        mono = getattr(instrument, "monochromatic_keV", None)
        e_hi = float(mono) + 1.0 if mono else 0.95 * float(instrument.tube_voltage_kV)
    sel = (energy >= e_lo) & (energy <= e_hi)
    y = y_all[sel]
    if y.sum() <= 0:
        raise DataError(f"no counts between {e_lo:g} and {e_hi:g} keV to fit a stack to")

    loads = [float(x) for x in surface_load] if surface else [0.0]
    levels: Sequence[float] = _LEVELS
    thick = [float(t) for t in surface_thickness_um]

    def n_grid() -> int:  # candidates before generating them (len(levels) ** n grows fast)
        n_s = len(levels) ** len(surface) if surface else 1
        n_b = len(levels) ** len(buried) if buried else 1
        return len(thick) * len(loads) * n_s * n_b

    while n_grid() > max_candidates and (len(levels) > 1 or len(loads) > 1):
        if len(levels) > 1:
            levels = levels[:-1] if len(levels) > 2 else (1.0,)
        else:
            loads = loads[len(loads) // 2 : len(loads) // 2 + 1]
    if n_grid() > max_candidates:  # one level, one load: thin out the thicknesses
        thick = thick[:: math.ceil(n_grid() / max_candidates)]
    cs = [c for ld in loads for c in _combos(surface, levels, ld)]
    cb = _combos(buried, levels, pigment_load)

    def search(grid: list[tuple[float, dict[str, float], dict[str, float]]]) -> tuple[np.ndarray, ...]:
        stacks = []
        try:
            for t, ws, wb in grid:
                layers = [Layer(ws, binder=binder, thickness_um=t)]
                if buried:
                    layers.append(Layer(wb, binder=binder, thickness_um=float(buried_thickness_um)))
                stacks.append(Stack(layers, ground=ground))
            expected = np.asarray(simulate_batch(stacks, instrument, noise=False, dtype=np.float64), float)
        except (KeyError, ValueError) as exc:
            raise SimulationError(f"cannot simulate the stacks to fit: {exc}") from None
        norm = expected[:, sel].sum(axis=1)
        ok = norm > 0
        mu = expected[:, sel] / np.where(ok, norm, 1.0)[:, None] * y.sum()
        dev = np.where(ok, poisson_deviance(y[None, :], np.where(ok[:, None], mu, 1.0)), math.inf)
        return np.asarray(stacks, dtype=object), expected, norm, dev

    grid = [(t, ws, wb) for t in thick for ws in cs for wb in cb]
    stacks, expected, norm, dev = search(grid)
    if not np.isfinite(dev).any():
        raise SimulationError("none of the candidate stacks gives counts in the fitted energy range")
    n_simulated = len(grid)
    best = int(np.argmin(dev))
    if len(thick) > 1:  # refine the surface thickness between the neighbours of the best grid value
        t0, ws, wb = grid[best]
        i = thick.index(t0)
        lo, hi = thick[max(0, i - 1)], thick[min(len(thick) - 1, i + 1)]
        fine = [float(t) for t in np.geomspace(lo, hi, 9) if not np.isclose(t, t0)]
        grid2 = [(t, ws, wb) for t in fine]
        s2, e2, n2, d2 = search(grid2)
        n_simulated += len(grid2)
        j = int(np.argmin(d2))
        if d2[j] < dev[best]:
            grid, stacks, expected, norm, dev, best = grid2, s2, e2, n2, d2, j
    t, ws, wb = grid[best]
    scale = y.sum() / float(norm[best])
    return StackFit(
        stack=stacks[best],
        expected=expected[best] * scale,
        deviance=float(dev[best]),
        n_channels_fitted=int(sel.sum()),
        n_candidates=n_simulated,
        surface_thickness_um=t,
        weight_fractions=(dict(ws), dict(wb)) if buried else (dict(ws),),
    )
