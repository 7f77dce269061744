"""Calls checked by physics: the network's called set against its alternatives, by paint-stack fits.

The network reads a spectrum's shape; it cannot know that chrome yellow (PbCrO4) and lead white beside
viridian carry the same elements, and it sometimes calls both readings at once. The fundamental-parameter
simulator can weigh them: :func:`check_calls` fits a paint stack (:func:`xrfnb.fit_stack`, then a
continuous refinement, :func:`refine_stack_fit`) of the called classes and of each alternative that keeps
the same key elements, and compares the fits.

Alternatives (one move from the called set; each keeps the union of the key elements, so no element seen
loses its only explanation):

* **merge**: two called classes into one class whose key elements are theirs together (lead pigments (Pb)
  + chromium oxide greens (Cr) -> lead chromates (Pb, Cr); zinc white + cobalt pigments -> cobalt green;
  the class may be called already, then both are dropped for it);
* **split**: the reverse, a called class into two classes that together carry its key elements (lead
  chromates -> lead pigments + chromium oxide greens);
* **drop**: a called class whose key elements the other called classes carry;
* **swap**: a called class for another with the same key elements (the shipped model's classes are the
  library's ambiguity groups, one per key-element set, so this move only arises with other class sets);
  within a class, each pigment of its library group is tried (below).

When the lowest-BIC explanation is not the called set, its own alternatives are tried as well
(``max_rounds``). Each class is fitted first as its library representative
(:meth:`xrfnb.PigmentLibrary.representative`, the first pigment of its group), then as each other pigment
of its group, refined from the best fit so far (the best kept), in the layer the network called (a
merged class at the surface when either part was there); when no class is at the surface all are fitted
in one layer (``fit_stack`` cannot build a binder-only surface layer over them).

Criterion
---------
The Bayesian information criterion ``BIC = D + k ln N``: ``D`` the Poisson deviance of the refined fit
over the fitted energy range, ``k`` its free parameters (one weight fraction per pigment, the scale, the
surface thickness and the pile-up probability: ``pigments + 3``; see :func:`refine_stack_fit`), ``N`` the
counts in the fitted range. A spectrum is a histogram of ``N`` photon energies: the Poisson likelihood
with a free scale is the multinomial likelihood of those ``N`` observations, so ``N`` is BIC's sample
size. BIC rather than a likelihood-ratio test because merge,
split and swap alternatives are not nested in the called set (and a drop is): an LR test at a fixed level
is defined only for nested pairs, while BIC ranks any set of fits on one scale and approximates
``-2 ln`` of the Bayes factor between them (Schwarz 1978; Kass & Raftery 1995). A class whose library group
has ``M`` pigments is fitted as each of them in turn (the best kept: chrome orange as well as chrome
yellow) and adds ``2 ln M`` (a uniform prior over its members).

The physics-checked call (:attr:`PhysicsCheck.best`) is the explanation of lowest BIC *when the network's
call is worse than it by more than* ``switch`` (default :data:`SWITCH_MARGIN` = 10, "very strong"
evidence), else the network's call. The network was trained on this simulator, so its call counts as a
prior that a stack fit must overrule clearly: dropping a superfluous class overrules the call only where
``ln N``, less the deviance the class buys by chance, exceeds 10 (so never below about 22,000 counts).
Measured with ``benchmarks/eval_physics_check.py`` (``xrfnb.model.evaluate``'s four held-out sets and
seed, 100 spectra per set at 1,000 and at 3,000 counts, the shipped model; 394 of the 800 calls had
alternatives and were fitted; scored against the held-out labels, micro-F1 over classes and spectra):
following the lowest BIC outright changed 21-37 % of the fitted calls per set and count level (121 in
all) and lowered the F1 in every one, by 0.002-0.055 (0.907 to 0.879 over all); with the switch at 10
it changed 3-22 % (49) and the F1 moved by +0.003 to -0.022 (0.897 over all). The switch thus bounds
the loss, it does not remove it: the stack fit knows one or two layers of library pigments at their
library compositions, while the held-out spectra have grounds, impurities and varied compositions (an
umber's Fe/Mn off the library's fits "iron pigment + manganese violet" better, a zinc yellow "zinc white
+ chromium oxide green"), and their labels count a pigment only where its strongest line is detectable.
:attr:`PhysicsCheck.alternatives` lists, chosen first, every explanation within
``margin`` of it in BIC *or* in deviance (default :data:`DEFAULT_MARGIN` = 6: on Kass and Raftery's scale
a BIC difference below 2 is "not worth more than a bare mention", 2-6 "positive" and above 6 "strong"
evidence; a deviance difference of 6 is a likelihood ratio of e^3 = 20). The deviance clause keeps the
explanations that fit the counts as well but carry more classes: BIC's ``ln N`` per class (8 at 3,000
counts) alone would drop lead white + viridian beside a chrome yellow that fits no better, although the
spectrum cannot tell them apart.

The simulator's physics (secondary fluorescence and pile-up included in the refinement) is that of the
training data; a real paint can differ from it (impurities, a ground, particle effects). Read the
alternatives as what the spectrum cannot tell apart, not as a ruling.

Whole maps (:class:`CallPatterns`): the pixels of one call pattern (called set and count level, the
level ``floor(log2 counts)``) are checked once, on the mean spectrum of up to ``max_pixels`` (32) of them:
the deviance differences of a typical pixel of that pattern, its Poisson noise averaged down.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import DataError, PigmentError, SimulationError
from ..core.calibration import EnergyCalibration
from ..core.calls import is_buried, is_present
from ..fitting.stackfit import StackFit, fit_stack, poisson_deviance
from ..physics.instrument import Instrument
from ..physics.pigments import PigmentLibrary, pigments
from ..physics.simulate import simulate_batch, simulation_setup
from ..physics.stack import Layer, Stack

__all__ = [
    "DEFAULT_MARGIN",
    "MAX_CHECKED_CLASSES",
    "SWITCH_MARGIN",
    "CallPattern",
    "CallPatterns",
    "Candidate",
    "Explanation",
    "PhysicsCheck",
    "bin_spectrum",
    "candidate_sets",
    "check_calls",
    "count_level",
    "fitted_range_keV",
    "listed",
    "refine_stack_fit",
    "verbal_evidence",
]

#: explanations within this BIC difference of the best are listed (Kass & Raftery: > 6 is strong evidence)
DEFAULT_MARGIN = 6.0
#: the most classes a called set may hold to be checked: training stacks hold at most 3 paint layers of 1-3
#: pigments (``xrfnb.model.trainingdata``), and a stack fit of more pigments takes minutes (18 classes
#: called by an untrained network: 32 explanations, about 2 minutes) and says little
MAX_CHECKED_CLASSES = 9
#: the network's call gives way to a better explanation only when it is worse by more than this BIC
#: difference (Kass & Raftery: above 10 is very strong evidence against it); see the module docstring
SWITCH_MARGIN = 10.0
#: the criterion's name, as results and files record it
CRITERION = "BIC = D + k ln N"
#: the note of a pattern left for a check on demand
BEYOND_BUDGET = "beyond the {} patterns fitted while mapping: check it on demand"
#: the note of a check whose called set has no alternative (nothing is fitted)
NO_ALTERNATIVE = "no alternative: no merge, split, drop or swap keeps these key elements"
_BURIED_UM = 40.0  # fit_stack's default thickness of the buried layer (kept fixed, as there)
_PILEUP_MIN = 1e-6  # the least pile-up probability refined (none, in effect): its log is a parameter


# ---------------------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One explanation to fit: a set of classes with their layers, and how it differs from the called set.

    Attributes
    ----------
    classes : tuple of str
        The classes, in the called set's order, new ones last.
    layer : dict of str to str
        ``"surface"`` or ``"buried"`` per class.
    move : str
        ``"called"``, ``"merge"``, ``"split"``, ``"drop"`` or ``"swap"``.
    change : str
        The move in words (``"lead pigments (Pb) + chromium oxide greens (Cr) -> lead chromates (Pb, Cr)"``);
        empty for the called set.
    """

    classes: tuple[str, ...]
    layer: dict[str, str]
    move: str
    change: str = ""

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """The set with its layers, order-free: candidates with equal keys are the same fit."""
        return tuple(sorted((c, self.layer[c]) for c in self.classes))


def candidate_sets(
    called: Sequence[str], layer: Mapping[str, str], class_elements: Mapping[str, Sequence[str]]
) -> list[Candidate]:
    """The called set and its one-move alternatives (merge, split, drop, swap; see the module docstring).

    Parameters
    ----------
    called : sequence of str
        The called classes.
    layer : mapping of str to str
        ``"surface"`` or ``"buried"`` per called class (missing: surface).
    class_elements : mapping of str to sequence of str
        Key elements of every class the model knows (``PigmentModel.class_elements``).

    Returns
    -------
    list of Candidate
        The called set first, then the alternatives (no two with the same classes and layers).

    Examples
    --------
    >>> els = {"lead pigments (Pb)": ("Pb",), "chromium oxide greens (Cr)": ("Cr",),
    ...        "lead chromates (Pb, Cr)": ("Cr", "Pb"), "vermilion": ("Hg",)}
    >>> for c in candidate_sets(["lead pigments (Pb)", "chromium oxide greens (Cr)"], {}, els):
    ...     print(c.move, c.classes)
    called ('lead pigments (Pb)', 'chromium oxide greens (Cr)')
    merge ('lead chromates (Pb, Cr)',)
    """
    called = list(dict.fromkeys(called))
    lay = {c: str(layer.get(c, "surface")) for c in called}
    els = {c: frozenset(v) for c, v in class_elements.items()}
    for c in called:
        if c not in els:
            raise DataError(f"no key elements known for the class {c!r}")

    def label(c: str) -> str:  # "zinc white (Zn)"; a name that already says its elements stays as it is
        if "(" in c and all(el in c for el in els[c]):
            return c
        return f"{c} ({', '.join(sorted(els[c]))})"

    out: dict[tuple[tuple[str, str], ...], Candidate] = {}

    def add(classes: list[str], layers: dict[str, str], move: str, change: str) -> None:
        if not classes:
            return
        cand = Candidate(tuple(dict.fromkeys(classes)), {c: layers[c] for c in classes}, move, change)
        out.setdefault(cand.key, cand)

    add(called, lay, "called", "")
    for a, b in itertools.combinations(called, 2):
        union = els[a] | els[b]
        for c, ec in els.items():
            if c in (a, b) or ec != union:
                continue
            rest = [x for x in called if x not in (a, b)]
            layers = dict(lay)
            if c not in lay:
                layers[c] = "surface" if "surface" in (lay[a], lay[b]) else "buried"
            add([*rest, c] if c not in rest else rest, layers, "merge",
                f"{label(a)} + {label(b)} -> {label(c)}")
    for a in called:
        rest = [x for x in called if x != a]
        if rest and els[a] <= frozenset().union(*(els[x] for x in rest)):
            add(rest, lay, "drop", f"without {label(a)}")
        for b, eb in els.items():
            if b != a and b not in called and eb == els[a]:
                add([*rest, b], {**lay, b: lay[a]}, "swap", f"{label(a)} -> {label(b)}")
        parts = [c for c, ec in els.items() if c != a and ec and ec < els[a]]
        for b, c in itertools.combinations(parts, 2):
            if els[b] | els[c] != els[a] or els[b] & els[c]:
                continue
            layers = {**lay, b: lay.get(b, lay[a]), c: lay.get(c, lay[a])}
            add([*rest, *(x for x in (b, c) if x not in rest)], layers, "split",
                f"{label(a)} -> {label(b)} + {label(c)}")
    return list(out.values())


# ---------------------------------------------------------------------------------------------------------
# fits
# ---------------------------------------------------------------------------------------------------------
def fitted_range_keV(instrument: Instrument, low_keV: float = 1.0) -> tuple[float, float]:
    """The energies a stack fit compares: ``low_keV`` to 95 % of the tube voltage (or 1 keV above a
    monochromatic excitation), as :func:`xrfnb.fit_stack` chooses by default; given to it explicitly so
    that the grid search and :func:`refine_stack_fit` fit the same channels."""
    mono = getattr(instrument, "monochromatic_keV", None)
    hi = float(mono) + 1.0 if mono else 0.95 * float(instrument.tube_voltage_kV)
    return float(low_keV), hi


def bin_spectrum(counts: np.ndarray, instrument: Instrument, factor: int) -> tuple[np.ndarray, Instrument]:
    """Sums of ``factor`` adjacent channels and the instrument whose channels they are.

    Sums of Poisson counts are Poisson, so a fit to them is a fit to the same photons at a coarser energy
    step. The simulator gives a channel the line shape's density at its centre times its width: at 40 eV
    bins that is within about 4 % of the integral at the centre of a 2 keV line (FWHM 100 eV), less at
    higher energies, and the same for every explanation compared. A last incomplete group is left out.

    Parameters
    ----------
    counts : numpy.ndarray
        Counts, shape (channels,) on ``instrument.calibration``.
    instrument : Instrument
        Their instrument.
    factor : int
        Channels per bin.

    Returns
    -------
    (numpy.ndarray, Instrument)
        The binned counts, shape (channels // factor,), float64, and the instrument with the bins' calibration
        (centre of each group) and channel count.

    Examples
    --------
    >>> import xrfnb
    >>> inst = xrfnb.Instrument.preset("bruker-m6")
    >>> y, coarse = bin_spectrum(np.ones(inst.n_channels), inst, 4)
    >>> y.shape, coarse.n_channels, round(coarse.calibration.gain_keV, 3), float(y[0])
    ((1024,), 1024, 0.04, 4.0)
    """
    f = int(factor)
    y = np.asarray(counts, dtype=float)
    n = y.size // f
    cal = instrument.calibration
    c = 0.5 * (f - 1)  # the centre of a group in channels of the original calibration
    coarse = EnergyCalibration(
        cal.offset_keV + c * cal.gain_keV + c * c * cal.quadratic_keV,
        f * cal.gain_keV + 2 * f * c * cal.quadratic_keV,
        f * f * cal.quadratic_keV,
    )
    return y[: n * f].reshape(n, f).sum(axis=1), instrument.with_(calibration=coarse, n_channels=n)


def _stack_of(surface: Mapping[str, float], buried: Mapping[str, float], thickness_um: float,
              binder: str | None, ground: str | None) -> Stack:
    layers = [Layer(dict(surface), binder=binder, thickness_um=float(thickness_um))]
    if buried:
        layers.append(Layer(dict(buried), binder=binder, thickness_um=_BURIED_UM))
    return Stack(layers, ground=ground)


def refine_stack_fit(
    counts: np.ndarray,
    instrument: Instrument,
    fit: StackFit,
    *,
    energy_range_keV: tuple[float, float] | None = None,
    secondary: bool = True,
    binder: str | None = "linseed oil",
    ground: str | None = None,
    iterations: int = 6,
    pileup: bool = True,
) -> StackFit:
    """A :func:`xrfnb.fit_stack` result refined off its grid: weight fractions and surface thickness free.

    ``fit_stack`` searches relative amounts 1 : 3 : 9; a mixture between those steps keeps a misfit that
    grows with the counts and would decide comparisons between explanations by the grid, not the physics.
    This refines every pigment's weight fraction (log scale, the binder filling the rest of each layer,
    at most 95 % pigment) and the surface thickness by Levenberg-Marquardt steps on the Poisson deviance
    with the scale profiled, on a forward-difference Jacobian from the simulator. Each step simulates the
    trial point and the Jacobian there in one batch (a batch costs about the same for 1 or 6 stacks). The
    buried layer keeps ``fit_stack``'s 40 um.

    Secondary fluorescence (left out of ``fit_stack``'s batch simulation for speed; it raises light-element
    lines under heavy ones by up to tens of per cent) is taken in as the per-channel ratio of the start
    stack's spectrum with and without it, held fixed during the steps; the result is simulated with it
    exactly and its deviance is that exact one.

    Pile-up (two photons within the detector's pulse-pair resolving time recorded as one of their summed
    energy: sum peaks, :meth:`xrfnb.physics.detector.DetectorResponse.pileup`) is refined as a third kind
    of parameter, the probability ``p`` that a recorded event is such a sum (the count rate is not known
    from the counts alone), started from the best of a few levels (0 to 0.1) on the start stack. Left out,
    the sum peaks of a bright spectrum stay as a misfit that the explanations absorb unequally: a
    simulated cobalt green at 40,000 counts and 180 kcps (``p`` = 0.036) fitted a deviance of about 3,400
    over 975 bins without it (the simulated truth: 628), and zinc white + cobalt violet then beat cobalt
    green alone by 68 in deviance; with it the three explanations fitted came within 5-12 of the truth.

    Parameters
    ----------
    counts : numpy.ndarray
        The counts ``fit`` was fitted to, shape (channels,).
    instrument : Instrument
        The instrument of the fit.
    fit : StackFit
        The starting point (``fit_stack``'s best grid stack).
    energy_range_keV : (float, float), optional
        The fitted range (default :func:`fitted_range_keV`).
    secondary : bool
        Include secondary fluorescence (see above).
    binder, ground : str or None
        As given to ``fit_stack``.
    iterations : int
        At most this many accepted steps.
    pileup : bool
        Refine the pile-up probability (see above; nothing to refine for an instrument whose
        ``pileup_time_s`` is 0).

    Returns
    -------
    StackFit
        The refined stack, never worse than the start (both simulated alike); ``expected`` includes the
        sum peaks; ``n_candidates`` counts every stack simulated, the grid's included.
    """
    y_all = np.asarray(counts, dtype=float)
    e = instrument.calibration.energies_keV(y_all.size)
    lo, hi = energy_range_keV or fitted_range_keV(instrument)
    sel = (e >= lo) & (e <= hi)
    y = y_all[sel]
    total = float(y.sum())
    surf = dict(fit.weight_fractions[0])
    bur = dict(fit.weight_fractions[1]) if len(fit.weight_fractions) > 1 else {}
    names = [("s", p) for p in surf] + [("b", p) for p in bur]
    n_stack = len(names) + 1  # weight fractions and the surface thickness: what is simulated
    tau_s = float(getattr(instrument, "pileup_time_s", 0.0) or 0.0)
    response = simulation_setup(instrument).response if pileup and tau_s > 0 else None
    if response is not None and not hasattr(response, "pileup"):
        response = None
    n_sim = 0

    def unpack(t: np.ndarray) -> tuple[dict[str, float], dict[str, float], float, float]:
        s = {p: math.exp(v) for (w, p), v in zip(names, t[: n_stack - 1], strict=True) if w == "s"}
        b = {p: math.exp(v) for (w, p), v in zip(names, t[: n_stack - 1], strict=True) if w == "b"}
        for d in (s, b):
            tot = sum(d.values())
            if tot > 0.95:
                for p in d:
                    d[p] *= 0.95 / tot
        th = float(np.clip(math.exp(t[n_stack - 1]), 0.3, 500.0))
        pile = float(np.clip(math.exp(t[n_stack]), _PILEUP_MIN, 0.5)) if t.size > n_stack else 0.0
        return s, b, th, pile

    def project(t: np.ndarray) -> np.ndarray:
        s, b, th, pile = unpack(t)
        out = [max(s[p] if w == "s" else b[p], 1e-5) for w, p in names] + [th]
        return np.log([*out, pile] if response is not None else out)

    def simulate(thetas: list[np.ndarray], with_secondary: bool) -> np.ndarray:
        nonlocal n_sim
        stacks = [_stack_of(*unpack(t)[:3], binder, ground) for t in thetas]
        n_sim += len(stacks)
        try:
            f = simulate_batch(stacks, instrument, noise=False, dtype=np.float64, secondary=with_secondary)
        except (KeyError, ValueError) as exc:
            raise SimulationError(f"cannot simulate the stacks to refine: {exc}") from None
        return np.maximum(np.asarray(f, float), 1e-12)

    def piled(f: np.ndarray, pile: float) -> np.ndarray:
        """Spectra (rows, all channels) with the sum peaks of pile-up probability ``pile``."""
        if response is None:
            return f
        return np.maximum(response.pileup(f, pile / (2.0 * tau_s)), 1e-12)

    def dev(f: np.ndarray) -> float:
        return float(poisson_deviance(y, f * (total / f.sum())))

    h = 0.05
    step_h = h * np.eye(n_stack + (response is not None))

    def model(t: np.ndarray, plain: np.ndarray) -> np.ndarray:
        """The fitted channels at ``t`` and at its probes (rows): ``plain`` holds the spectra without
        pile-up at ``t`` and at its ``n_stack`` simulated probes; the pile-up probe reuses the first."""
        pile = unpack(t)[3]
        rows = piled(plain, pile)
        if response is not None:
            rows = np.vstack([rows, piled(plain[:1], unpack(t + step_h[n_stack])[3])])
        return rows[:, sel]

    theta0 = np.log([max(surf[p] if w == "s" else bur[p], 1e-4) for w, p in names]
                    + [max(fit.surface_thickness_um, 0.1)])
    plain = simulate([theta0, *(theta0 + h * np.eye(n_stack)[j] for j in range(n_stack))], False)
    ratio = np.ones(plain.shape[1])
    start_exact = None
    if secondary:
        start_exact = simulate([theta0], True)[0]
        ratio = start_exact / plain[0]
    plain = plain * ratio
    if response is not None:  # the pile-up probability to start from: the best of a few, on the start stack
        levels = (_PILEUP_MIN, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
        best_pile = min(levels, key=lambda q: dev(piled(plain[:1], q)[0, sel]))
        theta0 = np.append(theta0, math.log(best_pile))
    theta = theta_start = project(theta0)
    f = model(theta, plain)
    f0, fj = f[0], f[1:]
    d0 = dev(f0)
    lam = 1e-3
    accepted = 0
    for _attempt in range(4 * max(0, iterations)):
        if accepted >= iterations:
            break
        mu = f0 * (total / f0.sum())
        jac = np.vstack([(fj[j] - f0) / (h * f0) for j in range(theta.size)] + [np.ones_like(f0)]) * mu
        grad = -2.0 * jac @ ((y - mu) / mu)
        fisher = 2.0 * (jac / mu) @ jac.T
        a = fisher + lam * np.diag(np.maximum(np.diag(fisher), 1e-12))
        try:
            step = np.clip(np.linalg.solve(a, -grad)[:-1], -1.5, 1.5)
        except np.linalg.LinAlgError:
            break
        cand = project(theta + step)
        if np.max(np.abs(cand - theta)) < 1e-4:
            break
        # the trial point and the Jacobian there, in one batch
        plain = simulate([cand, *(cand + step_h[j] for j in range(n_stack))], False) * ratio
        f = model(cand, plain)
        dc = dev(f[0])
        if dc < d0:
            gain = d0 - dc
            theta, f0, fj, d0 = cand, f[0], f[1:], dc
            lam = max(lam / 5.0, 1e-6)
            accepted += 1
            if gain < 1e-2:  # deviance units: less is noise
                break
        else:
            lam *= 10.0
            if lam > 1e4:
                break
    raw = simulate([theta], secondary)[0] if (accepted or start_exact is None) else start_exact
    full = piled(raw[None, :], unpack(theta)[3])[0]
    d_final = dev(full[sel])
    if start_exact is not None and accepted:
        start_full = piled(start_exact[None, :], unpack(theta_start)[3])[0]
        d_start = dev(start_full[sel])
        if d_start <= d_final:  # the fixed secondary ratio misled the steps: keep the start
            theta, full, d_final = theta_start, start_full, d_start
    s, b, th, _ = unpack(theta)
    stack = _stack_of(s, b, th, binder, ground)
    scale = total / max(float(full[sel].sum()), 1e-300)
    return StackFit(
        stack=stack,
        expected=full * scale,
        deviance=d_final,
        n_channels_fitted=int(sel.sum()),
        n_candidates=fit.n_candidates + n_sim,
        surface_thickness_um=th,
        weight_fractions=(s, b) if bur else (s,),
    )


# ---------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------
def verbal_evidence(delta_bic: float) -> str:
    """Kass and Raftery's words for a BIC difference against the best explanation.

    Examples
    --------
    >>> verbal_evidence(1.0), verbal_evidence(4.0), verbal_evidence(8.0), verbal_evidence(30.0)
    ('explains it about as well', 'explains it less well', 'explains it clearly worse', 'is ruled out')
    """
    if delta_bic <= 2.0:
        return "explains it about as well"
    if delta_bic <= 6.0:
        return "explains it less well"
    if delta_bic <= 10.0:
        return "explains it clearly worse"
    return "is ruled out"


@dataclasses.dataclass(frozen=True, eq=False)
class Explanation:
    """One set of classes fitted to a spectrum, scored by BIC.

    Attributes
    ----------
    classes : tuple of str
        The classes.
    layer : dict of str to str
        ``"surface"`` or ``"buried"`` per class.
    pigments : tuple of str
        The library pigment fitted for each class (the best of its group's).
    move : str
        How it differs from the called set: ``"called"``, ``"merge"``, ``"split"``, ``"drop"``, ``"swap"``.
    change : str
        The move in words; empty for the called set.
    deviance : float
        Poisson deviance of the refined fit over the fitted channels.
    n_parameters : int
        Free parameters ``k`` (pigments + 2).
    bic : float
        ``deviance + k ln N``.
    delta_bic : float
        ``bic`` minus the chosen explanation's (0 for it; negative for one of lower BIC that did not
        overrule the network's call, see :data:`SWITCH_MARGIN`).
    delta_deviance : float
        ``deviance`` minus the chosen explanation's (negative: fits better).
    evidence : str
        One line for people, e.g. ``"Pb + Cr: chrome yellow; lead white + viridian explains it about as
        well (ΔBIC 1.4)"``.
    stack : str
        The fitted stack (:meth:`xrfnb.StackFit.describe`).
    fit : StackFit or None
        The fit itself (None when read back from a file).
    """

    classes: tuple[str, ...]
    layer: dict[str, str]
    pigments: tuple[str, ...]
    move: str
    change: str
    deviance: float
    n_parameters: int
    bic: float
    delta_bic: float = 0.0
    delta_deviance: float = 0.0
    evidence: str = ""
    stack: str = ""
    fit: StackFit | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (no fit), for JSON."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "fit"}
        d["classes"], d["pigments"] = list(self.classes), list(self.pigments)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Explanation:
        """The inverse of :meth:`to_dict` (``fit`` is None)."""
        return cls(
            classes=tuple(d["classes"]), layer=dict(d["layer"]), pigments=tuple(d["pigments"]),
            move=str(d["move"]), change=str(d.get("change", "")), deviance=float(d["deviance"]),
            n_parameters=int(d["n_parameters"]), bic=float(d["bic"]), delta_bic=float(d["delta_bic"]),
            delta_deviance=float(d.get("delta_deviance", 0.0)), evidence=str(d.get("evidence", "")),
            stack=str(d.get("stack", "")),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class PhysicsCheck:
    """The called set of one spectrum checked against its alternatives (:func:`check_calls`).

    Attributes
    ----------
    called : tuple of str
        The network's called classes.
    explanations : tuple of Explanation
        Every set fitted, the chosen one first (the lowest BIC where it beats the network's call by more
        than ``switch``, else the network's call), then by BIC (empty when the check could not run: see
        ``note``).
    margin : float
        BIC or deviance difference within which explanations are listed as alternatives.
    switch : float
        BIC difference by which the lowest BIC must beat the network's call to replace it.
    n_counts : float
        Counts ``N`` in the fitted range.
    elements : tuple of str
        The key elements the called set carries (every explanation carries them too).
    note : str
        Why the check did not run, or is empty.
    seconds : float
        Time the check took.
    """

    called: tuple[str, ...]
    explanations: tuple[Explanation, ...]
    margin: float = DEFAULT_MARGIN
    n_counts: float = 0.0
    elements: tuple[str, ...] = ()
    note: str = ""
    seconds: float = 0.0
    switch: float = SWITCH_MARGIN

    @property
    def checked(self) -> bool:
        """Whether any explanation was fitted."""
        return bool(self.explanations)

    @property
    def best(self) -> Explanation | None:
        """The chosen explanation, the physics-checked call (None when not checked)."""
        return self.explanations[0] if self.explanations else None

    @property
    def best_classes(self) -> tuple[str, ...]:
        """The physics-checked call: the chosen explanation's classes (the called set when not checked)."""
        return self.explanations[0].classes if self.explanations else self.called

    @property
    def alternatives(self) -> tuple[Explanation, ...]:
        """The explanations within ``margin`` of the chosen one in BIC or in deviance, the chosen first, then
        by BIC."""
        return tuple(x for x in self.explanations if listed(x, self.margin))

    @property
    def changed(self) -> bool:
        """Whether the physics-checked call differs from the network's."""
        return set(self.best_classes) != set(self.called)

    def summary(self) -> str:
        """A few lines for people."""
        if not self.checked:
            return f"calls not checked by physics: {self.note}" if self.note else "calls not checked"
        text = self.explanations[0].evidence
        if self.changed:
            text += f" (the network called {', '.join(self.called)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain values (no fits), for JSON."""
        return {
            "called": list(self.called), "explanations": [x.to_dict() for x in self.explanations],
            "margin": self.margin, "n_counts": self.n_counts, "elements": list(self.elements),
            "note": self.note, "seconds": self.seconds, "switch": self.switch,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhysicsCheck:
        """The inverse of :meth:`to_dict`."""
        return cls(
            called=tuple(d["called"]),
            explanations=tuple(Explanation.from_dict(x) for x in d["explanations"]),
            margin=float(d.get("margin", DEFAULT_MARGIN)), n_counts=float(d.get("n_counts", 0.0)),
            elements=tuple(d.get("elements", ())), note=str(d.get("note", "")),
            seconds=float(d.get("seconds", 0.0)), switch=float(d.get("switch", SWITCH_MARGIN)),
        )


def listed(x: Explanation, margin: float) -> bool:
    """Whether an explanation is an alternative: within ``margin`` of the chosen one in BIC or in
    deviance (or better)."""
    return x.delta_bic <= margin or x.delta_deviance <= margin


def _compare(x: Explanation, best: Explanation, margin: float) -> str:
    """How ``x`` does against the chosen explanation, in words with the numbers."""
    extra = x.n_parameters - best.n_parameters
    more = f"{extra} more pigment{'s' if extra > 1 else ''}"
    if x.delta_bic < -2.0:
        words = "explains it better, not by enough to overrule the network's call"
    elif x.delta_bic <= 2.0:
        words = "explains it about as well"
    elif extra > 0 and x.delta_deviance <= 2.0:
        words = f"fits as well with {more}"
    elif extra > 0 and x.delta_deviance <= margin:
        words = f"fits almost as well with {more}"
    else:
        words = verbal_evidence(x.delta_bic)
    return f"{' + '.join(x.pigments)} {words} (ΔBIC {x.delta_bic:.1f}, Δdeviance {x.delta_deviance:+.1f})"


def _evidence(best: Explanation, x: Explanation, others: Sequence[Explanation], elements: str,
              margin: float) -> str:
    if x is best:
        text = f"{elements}: {' + '.join(best.pigments)}"
        near = [o for o in others if o is not best and listed(o, margin)]
        if near:
            text += "; " + "; ".join(_compare(o, best, margin) for o in near)
        elif len(others) > 1:
            text += " (every alternative tried explains it clearly worse)"
        return text
    return f"{elements}: {_compare(x, best, margin)} than {' + '.join(best.pigments)}"


def check_calls(
    counts: np.ndarray,
    instrument: Instrument,
    called: Sequence[str],
    layer: Mapping[str, str],
    class_elements: Mapping[str, Sequence[str]],
    *,
    library: PigmentLibrary | None = None,
    margin: float = DEFAULT_MARGIN,
    switch: float = SWITCH_MARGIN,
    max_rounds: int = 2,
    secondary: bool = True,
    pileup: bool = True,
    max_candidates: int = 120,
    bin_channels: int = 4,
) -> PhysicsCheck:
    """Check a spectrum's called set against its alternatives by paint-stack fits and BIC.

    Parameters
    ----------
    counts : numpy.ndarray
        The spectrum, shape (channels,) on ``instrument.calibration`` (``instrument.n_channels`` channels);
        may be a mean of spectra (non-integer).
    instrument : Instrument
        The instrument that measured it.
    called : sequence of str
        The classes the network calls present.
    layer : mapping of str to str
        ``"surface"`` or ``"buried"`` per called class.
    class_elements : mapping of str to sequence of str
        Key elements of every class (``PigmentModel.class_elements``).
    library : PigmentLibrary, optional
        Where the classes' pigments come from (default :func:`xrfnb.pigments`).
    margin : float
        BIC difference within which alternatives are listed (default :data:`DEFAULT_MARGIN`).
    switch : float
        BIC difference by which the lowest BIC must beat the network's call to become the physics-checked
        call (default :data:`SWITCH_MARGIN`; 0: the lowest BIC always).
    max_rounds : int
        Rounds of alternatives: the called set's, then, while the best is new, the best's.
    secondary : bool
        Secondary fluorescence in the refined fits (see :func:`refine_stack_fit`).
    pileup : bool
        Refine the pile-up probability in every fit (see :func:`refine_stack_fit`; one parameter more
        for every explanation, so it changes no BIC difference by its count).
    max_candidates : int
        Grid stacks of each ``fit_stack`` search before refinement.
    bin_channels : int
        Fit sums of this many adjacent channels (:func:`bin_spectrum`): the simulator's cost grows with
        the channels, and 40 eV bins still resolve the lines (FWHM 70-180 eV); 1 fits every channel.

    Returns
    -------
    PhysicsCheck
        Not checked (``note`` says why, nothing is fitted) when nothing is called, more than
        :data:`MAX_CHECKED_CLASSES` classes are called, the called set has no
        alternative (:data:`NO_ALTERNATIVE`), a class has no library pigment, or the spectrum has no
        counts to fit; simulation errors propagate.
    """
    t0 = time.perf_counter()
    called = tuple(dict.fromkeys(called))
    if not called:
        return PhysicsCheck(called, (), margin, note="no class called")
    if len(called) > MAX_CHECKED_CLASSES:
        return PhysicsCheck(
            called, (), margin,
            note=f"{len(called)} classes called, more than the {MAX_CHECKED_CLASSES} a paint stack of the "
            "training holds: not checked by stack fits (treat the call with caution)")
    lib = library if library is not None else pigments()
    try:
        first = candidate_sets(called, layer, class_elements)
    except DataError as exc:
        return PhysicsCheck(called, (), margin, note=str(exc))
    rep: dict[str, str] = {}
    for c in {c for cand in first for c in cand.classes} | set(called):
        r = lib.representative(c)
        if r is None:
            return PhysicsCheck(called, (), margin, note=f"no library pigment stands for the class {c!r}")
        rep[c] = r
    y = np.asarray(counts, dtype=float)
    if y.ndim != 1 or y.size != int(instrument.n_channels):
        raise DataError(f"check_calls needs counts of shape ({instrument.n_channels},), got {y.shape}")
    if bin_channels > 1:
        y, instrument = bin_spectrum(y, instrument, bin_channels)
    erange = fitted_range_keV(instrument)
    e = instrument.calibration.energies_keV(y.size)
    n_counts = float(y[(e >= erange[0]) & (e <= erange[1])].sum())
    elements = tuple(sorted(frozenset().union(*(frozenset(class_elements[c]) for c in called))))
    if n_counts <= 0:
        return PhysicsCheck(called, (), margin, elements=elements, note="no counts in the fitted range")
    if len(first) == 1:  # nothing to weigh the called set against: no fit
        return PhysicsCheck(called, (), margin, n_counts, elements, NO_ALTERNATIVE)

    fitted: dict[tuple[tuple[str, str], ...], Explanation] = {}

    groups = lib.groups()
    n_pileup = int(pileup and float(getattr(instrument, "pileup_time_s", 0.0) or 0.0) > 0)

    def members(c: str) -> tuple[str, ...]:
        """The class's pigments, its representative first."""
        return (rep[c], *(m for m in groups.get(c, ()) if m != rep[c]))

    def fit_with(cand: Candidate, choice: Mapping[str, str], start: StackFit | None) -> StackFit:
        surface = [choice[c] for c in cand.classes if cand.layer[c] == "surface"]
        buried = [choice[c] for c in cand.classes if cand.layer[c] == "buried"]
        if not surface:  # fit_stack cannot build a binder-only surface layer: one layer of them all
            surface, buried = buried, []
        if start is None:
            start = fit_stack(
                y, instrument, surface, buried, energy_range_keV=erange, max_candidates=max_candidates
            )
        return refine_stack_fit(y, instrument, start, energy_range_keV=erange, secondary=secondary,
                                pileup=pileup)

    def fit_one(cand: Candidate) -> Explanation:
        for c in cand.classes:
            if c not in rep:
                r = lib.representative(c)
                if r is None:
                    raise PigmentError(f"no library pigment stands for the class {c!r}")
                rep[c] = r
        choice = {c: rep[c] for c in cand.classes}
        fit = fit_with(cand, choice, None)
        # swap within a class: its other pigments (same key elements, other ratios: chrome orange for
        # chrome yellow, burnt for raw umber), each refined from the best fit so far with the pigment renamed
        for c in cand.classes:
            for m in members(c)[1:]:
                old = choice[c]
                renamed = tuple({(m if p == old else p): w for p, w in layer_wf.items()}
                                for layer_wf in fit.weight_fractions)
                trial = fit_with(cand, {**choice, c: m}, dataclasses.replace(fit, weight_fractions=renamed))
                if trial.deviance < fit.deviance:
                    fit, choice = trial, {**choice, c: m}
        k = len(cand.classes) + 2 + n_pileup
        choices = sum(2.0 * math.log(len(members(c))) for c in cand.classes)
        return Explanation(
            classes=cand.classes, layer=dict(cand.layer), pigments=tuple(choice[c] for c in cand.classes),
            move=cand.move, change=cand.change, deviance=fit.deviance, n_parameters=k,
            bic=fit.deviance + k * math.log(n_counts) + choices, stack=fit.describe(), fit=fit,
        )

    todo = first
    for _round in range(max(1, max_rounds)):
        for cand in todo:
            if cand.key not in fitted:
                fitted[cand.key] = fit_one(cand)
        best = min(fitted.values(), key=lambda x: x.bic)
        if set(best.classes) == set(called):
            break
        todo = [
            dataclasses.replace(c, move=f"{best.move}, then {c.move}", change=f"{best.change}; {c.change}")
            for c in candidate_sets(best.classes, best.layer, class_elements)[1:]
        ]
        if all(c.key in fitted for c in todo):
            break
    ranked = sorted(fitted.values(), key=lambda x: x.bic)
    net = next(x for x in ranked if x.move == "called")
    if net.bic - ranked[0].bic <= switch:  # not decisive: the network's call stands, listed first
        ranked = [net, *(x for x in ranked if x is not net)]
    b0, d0 = ranked[0].bic, ranked[0].deviance
    ranked = [dataclasses.replace(x, delta_bic=x.bic - b0, delta_deviance=x.deviance - d0) for x in ranked]
    words = " + ".join(elements)
    ranked = [dataclasses.replace(x, evidence=_evidence(ranked[0], x, ranked, words, margin)) for x in ranked]
    seconds = time.perf_counter() - t0
    return PhysicsCheck(called, tuple(ranked), margin, n_counts, elements, "", seconds, switch)


# ---------------------------------------------------------------------------------------------------------
# call patterns of many spectra (whole maps)
# ---------------------------------------------------------------------------------------------------------
def count_level(total_counts: np.ndarray | float) -> np.ndarray:
    """The count level of spectra: ``floor(log2(total counts))`` (0 for fewer than 2 counts), int16.

    Examples
    --------
    >>> count_level(np.array([0, 1, 1500, 2047, 2048])).tolist()
    [0, 0, 10, 10, 11]
    """
    t = np.maximum(np.asarray(total_counts, dtype=np.float64), 1.0)
    return np.floor(np.log2(t)).astype(np.int16)


@dataclasses.dataclass(frozen=True, eq=False)
class CallPattern:
    """The spectra of one call pattern: one called set at one count level (:class:`CallPatterns`).

    Attributes
    ----------
    index : int
        Its number (the value of the pattern map).
    classes : tuple of str
        The called set, in the model's class order.
    layer : dict of str to str
        Per class, ``"buried"`` where most of the pattern's spectra call it buried, else ``"surface"``.
    count_level : int
        ``floor(log2 counts)``: the spectra have ``2**count_level`` to ``2**(count_level + 1)`` counts.
    n_pixels : int
        Spectra (pixels) with this pattern.
    mean_counts : float
        Their mean total counts.
    check : PhysicsCheck or None
        The physics check of the pattern's mean spectrum; None when it was not checked (see ``note``).
    note : str
        Why the pattern was not checked, or empty.
    mean_spectrum : numpy.ndarray or None
        The mean of up to ``max_pixels`` of its spectra, shape (channels,), float32: what it is (or can
        later be) checked on.
    """

    index: int
    classes: tuple[str, ...]
    layer: dict[str, str]
    count_level: int
    n_pixels: int
    mean_counts: float
    check: PhysicsCheck | None = None
    note: str = ""
    mean_spectrum: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def counts_range(self) -> tuple[int, int]:
        """The counts of its spectra, ``[lo, hi)``."""
        return 2**self.count_level, 2 ** (self.count_level + 1)

    @property
    def best_classes(self) -> tuple[str, ...]:
        """The physics-checked call (the called set when not checked)."""
        return self.check.best_classes if self.check is not None else self.classes

    @property
    def alternatives(self) -> tuple[Explanation, ...]:
        """Explanations within the margin, best first (empty when not checked)."""
        return self.check.alternatives if self.check is not None else ()

    @property
    def changed(self) -> bool:
        """Whether the physics-checked call differs from the called set."""
        return self.check is not None and self.check.changed

    def describe(self) -> str:
        """One or a few lines for people."""
        lo, hi = self.counts_range
        head = (f"{', '.join(self.classes) or 'nothing'} at {lo:,}-{hi:,} counts ({self.n_pixels:,} px)")
        if self.check is None:
            return f"{head}: not checked ({self.note})" if self.note else f"{head}: not checked"
        return f"{head}\n{self.check.summary()}"

    def checked_now(
        self,
        instrument: Instrument,
        class_elements: Mapping[str, Sequence[str]],
        *,
        margin: float = DEFAULT_MARGIN,
    ) -> CallPattern:
        """The same pattern checked now on its mean spectrum (itself when already checked or when it has
        no mean spectrum); a pattern not checked during mapping for lack of time is checked on demand."""
        if self.check is not None or self.mean_spectrum is None:
            return self
        res = check_calls(self.mean_spectrum, instrument, self.classes, self.layer, class_elements,
                          margin=margin)
        return dataclasses.replace(self, check=res if res.checked else None, note=res.note)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for JSON (the mean spectrum is stored apart)."""
        return {
            "index": self.index, "classes": list(self.classes), "layer": dict(self.layer),
            "count_level": self.count_level, "n_pixels": self.n_pixels, "mean_counts": self.mean_counts,
            "check": None if self.check is None else self.check.to_dict(), "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], mean_spectrum: np.ndarray | None = None) -> CallPattern:
        """The inverse of :meth:`to_dict`."""
        return cls(
            index=int(d["index"]), classes=tuple(d["classes"]), layer=dict(d["layer"]),
            count_level=int(d["count_level"]), n_pixels=int(d["n_pixels"]),
            mean_counts=float(d["mean_counts"]),
            check=None if d.get("check") is None else PhysicsCheck.from_dict(d["check"]),
            note=str(d.get("note", "")),
            mean_spectrum=mean_spectrum,
        )


def _accumulator(dtype: np.dtype, n_terms: int) -> type:
    """A fast exact sum type for ``n_terms`` values of ``dtype``: uint32 for 8- and 16-bit unsigned counts
    that cannot overflow it (about twice as fast as int64), else int64 or float64."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2 and n_terms * float(np.iinfo(dtype).max) < 2.0**32:
        return np.uint32
    return np.int64 if dtype.kind in "iub" else np.float64


class CallPatterns:
    """The call patterns of many spectra, gathered block by block, each checked once by physics.

    :meth:`add` takes a block of spectra with the network's results and returns each spectrum's pattern
    number (-1: masked, out of distribution or nothing called); it keeps, per pattern, the pixel count,
    the buried votes per class and the sum of up to ``max_pixels`` spectra (the first ones met). :meth:`check`
    then runs :func:`check_calls` once per pattern on its mean spectrum, the most frequent patterns first.

    Parameters
    ----------
    classes : sequence of str
        The model's classes (K).
    thresholds : numpy.ndarray
        Per-class decision thresholds, shape (K,).
    ood_threshold : float
        Spectra with a higher out-of-distribution score are not gathered.
    n_channels : int
        Channels of the spectra.
    max_pixels : int
        Spectra summed per pattern for its mean spectrum.
    max_spectra : int
        Patterns with a mean spectrum (the first met; 16 kB each at 4,096 channels): a scan with more
        distinct patterns leaves the later ones without, and so unchecked.
    """

    def __init__(self, classes: Sequence[str], thresholds: np.ndarray, ood_threshold: float,
                 n_channels: int, max_pixels: int = 32, max_spectra: int = 4096) -> None:
        self.classes = tuple(classes)
        self.thresholds = np.asarray(thresholds, dtype=np.float32).reshape(-1)
        self.ood_threshold = float(ood_threshold)
        self.n_channels = int(n_channels)
        self.max_pixels = int(max_pixels)
        self.max_spectra = int(max_spectra)
        self._ids: dict[bytes, int] = {}
        self._keys: list[tuple[tuple[int, ...], int]] = []
        k = len(self.classes)
        self._n = np.zeros(0, np.int64)
        self._n_summed = np.zeros(0, np.int64)
        self._total = np.zeros(0, np.float64)
        self._buried = np.zeros((0, k), np.int64)
        self._sum: list[np.ndarray | None] = []
        self.checks_run = 0

    def __len__(self) -> int:
        return len(self._keys)

    def _grow(self, size: int) -> None:
        """Room for ``size`` patterns in the per-pattern arrays (doubling)."""
        if size <= self._n.size:
            return
        new = max(size, 2 * self._n.size, 64)
        for name in ("_n", "_n_summed", "_total", "_buried"):
            old = getattr(self, name)
            grown = np.zeros((new, *old.shape[1:]), old.dtype)
            grown[: old.shape[0]] = old
            setattr(self, name, grown)

    def add(self, counts: np.ndarray, probability: np.ndarray, buried_probability: np.ndarray,
            ood_score: np.ndarray, valid: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
        """Gather one block.

        Parameters
        ----------
        counts : numpy.ndarray, shape (n, channels)
            Raw counts, any numeric dtype.
        probability, buried_probability : numpy.ndarray, shape (n, K)
            The network's probabilities.
        ood_score : numpy.ndarray, shape (n,)
            Out-of-distribution scores.
        valid : numpy.ndarray, shape (n,), bool
            Spectra that were identified (not masked).
        totals : numpy.ndarray, shape (n,), optional
            The spectra's counts for their count level (a map passes the model's, on its energy grid:
            ``BatchIdentification.total_counts``, free); default the sum over all channels.

        Returns
        -------
        numpy.ndarray, shape (n,), int32
            Pattern number per spectrum; -1 where masked, out of distribution or nothing called.
        """
        n = counts.shape[0]
        out = np.full(n, -1, dtype=np.int32)
        with np.errstate(invalid="ignore"):
            present = is_present(probability, self.thresholds) & valid[:, None]
            keep = valid & ~(ood_score > self.ood_threshold) & present.any(axis=1)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return out
        whole = idx.size == n
        acc = _accumulator(counts.dtype, max(counts.shape[1], self.max_pixels))
        if totals is None:
            totals = counts.sum(axis=1, dtype=acc)  # all rows: no copy of the block
        totals = np.asarray(totals, dtype=np.float64)
        totals = totals if whole else totals[idx]
        level = count_level(totals)
        pres = present if whole else present[idx]
        bits = np.packbits(pres, axis=1)
        key = np.concatenate([bits, level.astype("<i2").view(np.uint8).reshape(-1, 2)], axis=1)
        key = np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1]))).ravel()
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[order], np.arange(uniq.size + 1))
        sizes = np.diff(starts)
        pids = np.empty(uniq.size, dtype=np.int64)
        for u in range(uniq.size):  # one dictionary look-up per distinct pattern of the block
            kb = uniq[u].tobytes()
            pid = self._ids.get(kb)
            if pid is None:
                pid = self._ids[kb] = len(self._keys)
                f0 = int(first[u])
                self._keys.append((tuple(np.flatnonzero(pres[f0]).tolist()), int(level[f0])))
                self._sum.append(np.zeros(self.n_channels, np.float32) if pid < self.max_spectra else None)
            pids[u] = pid
        self._grow(len(self._keys))
        with np.errstate(invalid="ignore"):
            prob = probability if whole else probability[idx]
            bprob = buried_probability if whole else buried_probability[idx]
            bur = (is_buried(prob, bprob) & pres).astype(np.int64)
        head = starts[:-1]
        self._n[pids] += sizes
        self._total[pids] += np.add.reduceat(totals[order], head)
        self._buried[pids] += np.add.reduceat(bur[order], head, axis=0)
        # the first spectra of each pattern still short of max_pixels (and with room for a spectrum)
        take = np.minimum(np.maximum(self.max_pixels - self._n_summed[pids], 0), sizes)
        take[[self._sum[p] is None for p in pids]] = 0
        for u in np.flatnonzero(take):
            rows = idx[order[head[u] : head[u] + take[u]]]
            self._sum[pids[u]] += counts[rows].sum(axis=0, dtype=acc).astype(np.float32)
        self._n_summed[pids] += take
        out[idx] = pids[inverse].astype(np.int32)
        return out

    def check(
        self,
        instrument: Instrument,
        class_elements: Mapping[str, Sequence[str]],
        *,
        min_pixels: int = 16,
        max_checks: int = 48,
        margin: float = DEFAULT_MARGIN,
        check: Callable[..., PhysicsCheck] | None = None,
    ) -> tuple[CallPattern, ...]:
        """Check each pattern once, the most frequent first.

        Parameters
        ----------
        instrument : Instrument
            The instrument, with the spectra's calibration and channel count.
        class_elements : mapping
            Key elements of every class.
        min_pixels : int
            Patterns with fewer pixels are left unchecked (their mean spectrum is too noisy to judge, and
            there can be many of them).
        max_checks : int
            At most this many patterns are fitted (the others are left unchecked, with a note, and can be
            checked later: :meth:`CallPattern.checked_now`); a pattern without alternatives is not fitted
            and does not count.
        margin : float
            As for :func:`check_calls`.
        check : callable, optional
            The check to run (default :func:`check_calls`; tests count calls through it).

        Returns
        -------
        tuple of CallPattern
            In pattern-number order.
        """
        run = check or check_calls
        order = sorted(range(len(self)), key=lambda i: -self._n[i])
        checked: dict[int, tuple[PhysicsCheck | None, str]] = {}
        n_checked = 0
        for i in order:
            if self._n[i] < min_pixels:
                checked[i] = (None, f"fewer than {min_pixels} pixels")
                continue
            classes, layer = self._pattern(i)
            if n_checked >= max_checks or self._sum[i] is None:
                try:
                    alone = len(candidate_sets(classes, layer, class_elements)) == 1
                except DataError as exc:
                    checked[i] = (None, str(exc))
                    continue
                if alone:
                    checked[i] = (None, NO_ALTERNATIVE)
                elif self._sum[i] is None:
                    checked[i] = (None, f"no mean spectrum (kept for the first {self.max_spectra} patterns)")
                else:
                    checked[i] = (None, BEYOND_BUDGET.format(max_checks))
                continue
            mean = self._sum[i] / max(1, int(self._n_summed[i]))
            try:
                res = run(mean, instrument, classes, layer, class_elements, margin=margin)
            except (DataError, SimulationError, PigmentError) as exc:
                checked[i] = (None, f"check failed: {exc}")
                continue
            if res.checked:  # fits were run (a set without alternatives costs nothing)
                self.checks_run += 1
                n_checked += 1
            checked[i] = (res if res.checked else None, res.note)
        out = []
        for i in range(len(self)):
            classes, layer = self._pattern(i)
            res, note = checked.get(i, (None, ""))
            s = self._sum[i]
            keep = s is not None and self._n[i] >= min_pixels  # the others can never be checked
            mean = (s / max(1, int(self._n_summed[i]))).astype(np.float32) if keep else None
            n_i = int(self._n[i])
            out.append(CallPattern(i, classes, layer, self._keys[i][1], n_i,
                                   float(self._total[i]) / max(1, n_i), res, note, mean))
        return tuple(out)

    def _pattern(self, i: int) -> tuple[tuple[str, ...], dict[str, str]]:
        ks, _ = self._keys[i]
        classes = tuple(self.classes[k] for k in ks)
        votes = self._buried[i]
        layer = {self.classes[k]: ("buried" if 2 * votes[k] > self._n[i] else "surface") for k in ks}
        return classes, layer
