"""Training data generated on the fly: random paint stacks, domain randomisation and labels.

Samples
-------
Each training spectrum is a random stack of 1-3 paint layers over a ground (or no ground):

* a paint layer holds 1-3 library pigments (the class is drawn uniformly over the pigment classes, then
  a pigment of that class, so rare classes are seen as often as common ones; with probability
  ``silent_prob`` an XRF-silent pigment such as carbon black or a lake instead) in a binder (linseed oil,
  egg tempera or gum arabic). The pigments make up ``pigment_load`` of the layer's weight; the split among
  them is log-uniform, so minor pigments go down to ``min_weight_fraction`` (1 wt%) of the layer;
* the top layer is ``top_thickness_um`` thick (log-uniform, 2-60 um), lower layers
  ``lower_thickness_um``;
* grounds: chalk, gypsum or lead white in animal glue / oil, 50-300 um, or none;
* trace impurities that are not pigments (Si, K, Ca, Fe from grounds and dirt), 0.01-0.3 wt% of the
  element in a random layer;
* with ``composition_variant_prob`` > 0, a pigment that has composition variants in the library
  (natural earths with their K, Al, Si, Ca, Ti, Mn; lead white's hydrocerussite/cerussite ratio; cadmium
  red's Se fraction; smalt's Co, K, As; each range with its source in ``xrfnb/data/pigments.toml``) takes
  a variant drawn from those ranges instead of its formula with that probability, each time it is drawn.
  Its label stays its class.

Domain randomisation: instrument preset (Rh-tube macro-XRF, Mo-tube lab micro-XRF, monochromatic
synchrotron), tube voltage, detector air path (its attenuation), detector resolution (FWHM at Mn Ka
times ``fwhm_scale``, 0.8-1.3 in the shipped config), total counts log-uniform 100-50,000, and a
calibration offset and gain error applied when the spectrum is rebinned onto the model grid (the model
sees spectra whose calibration is slightly wrong, as real ones are).

Pile-up sum peaks are added when ``pileup`` is on (count rate log-uniform over ``count_rate_cps``), and
the argon K lines of the irradiated air when ``argon`` is on (:func:`xrfnb.argon_lines`; the beam path
through air drawn from ``beam_path_mm`` when given). Both are off by default, so a config without them
reproduces weights trained before they existed. With ``atomic_perturbation`` every instrument variant
of the training distribution simulates under its own draw of the atomic parameters
(:func:`xrfnb.physics.perturb.training_perturbation`: fluorescence and Coster-Kronig yields, jump and line
ratios within the spread between compilations; seeds never used by the evaluation sets); the widened
evaluation envelope and a caller's own ``atomic_perturbation`` block are left alone. Not in training
spectra: secondary fluorescence (``secondary`` adds it, at about 100 times the cost per spectrum, for
evaluation sets). The out-of-distribution score explains argon lines away.

Labels
------
Per class (the library's ambiguity groups, XRF-silent group excluded) and per spectrum, one of
0 = absent, 1 = present in the surface (top) layer, 2 = present only below the surface layer.
A pigment counts as present only when it is **visible**: the expected counts ``S`` of its strongest line
(its own contribution, from the layer it is in, after attenuation by the layers above, detector
efficiency and scaling to the spectrum's total counts, within +/- 1 FWHM of the line) satisfy

    S >= 3 * sqrt(B)  and  S >= 4 counts,

where ``B`` is the number of counts of everything else in that window of the (noisy) spectrum. So a
pigment too deep, too dilute or measured with too few counts to be seen is labelled absent; the same rule
defines the ground truth of the evaluation sets. A class is "surface" when a visible pigment of it is in
the top layer, "buried" when visible pigments of it are only in lower layers or the ground.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import ModelError, XRFNBError
from ..core.calibration import EnergyCalibration
from ..core.lines import atomic_number, element_symbol
from ..physics.instrument import Instrument
from ..physics.materials import Absorber
from ..physics.perturb import (
    AtomicPerturbation,
    atomic_perturbation,
    current_perturbation,
    training_perturbation,
)
from ..physics.pigments import pigments
from ..physics.simulate import StackArrays, simulate_batch, simulation_setup, tables_for
from ..physics.tube import anode_z
from .nn import energy_grid_edges_keV, rebin_counts

__all__ = ["DataConfig", "StackBatch", "TrainingData", "sample_stacks"]

BINDERS = ("linseed oil", "egg tempera", "gum arabic")
BINDER_WEIGHTS = (0.7, 0.2, 0.1)
IMPURITIES = ("Si", "K", "Ca", "Fe")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Distribution of the simulated training spectra (see the module docstring).

    Attributes
    ----------
    instruments, instrument_weights
        Instrument presets and their sampling weights; an entry may also be a mapping of
        :class:`~xrfnb.Instrument` settings (``Instrument.to_dict()``, e.g. a user's calibrated instrument).
    n_instrument_variants : int
        Randomised instruments (tube voltage, air path, FWHM, and the ranges below) prepared in all,
        presets in proportion to their weights; each training batch is split over ``variants_per_batch``
        of them. Keep it <= 48: the simulator caches the set-up of about twice that many instruments.
    anodes, anode_weights : tuple of str, tuple of float
        Tube anodes drawn for the tube presets' variants, with their weights (empty: uniform); no
        anodes: the preset's own.
    tube_voltage_kV : (float, float) or None
        Tube voltage range, kV, uniform (replaces ``tube_voltage_rel``); ``None``: the preset's +/- rel.
    incidence_deg, takeoff_deg, detector_azimuth_deg : (float, float) or None
        Geometry ranges, degrees, uniform (scattering angles from ``incidence + takeoff`` to
        ``180 - |incidence - takeoff|``); ``None``: the preset's.
    detector_thickness_um, detector_window_um : (float, float) or None
        Si thickness and Be window ranges, um, uniform; ``None``: the preset's.
    partial_collection : (float, float) or None
        Range of the detector's flat partial-collection shelf (share of photons), uniform.
    atmosphere_probs : (float, float, float) or None
        Probabilities of air, helium and vacuum on the beam paths; ``None``: the preset's.
    channel_gains_keV : tuple of float
        Channel widths drawn (uniformly), with as many channels as reach 41 keV; empty: the preset's.
    fwhm_scale : (float, float)
        Range of the FWHM at Mn Ka relative to the preset (floored at the Fano limit + 10 eV).
    tube_voltage_rel : float
        Relative spread of the tube voltage (uniform +/-).
    air_path_mm : (float, float)
        Range of the sample-detector air path.
    counts : (float, float)
        Total counts per spectrum, log-uniform.
    count_rate_cps : (float, float)
        Input count rate for pile-up, log-uniform; used only with ``pileup``.
    pileup : bool
        Add pile-up sum peaks (:func:`xrfnb.simulate_batch` ``count_rate_cps``, the instrument's
        resolving time) at a count rate drawn per spectrum from ``count_rate_cps``. Off by default, so
        that configs written before pile-up was simulated reproduce their weights; the shipped config
        turns it on.
    argon : bool
        Add the argon K lines of the air the beam crosses (:func:`xrfnb.simulate_batch` ``argon``). Off
        by default for the same reason; on in the shipped config.
    beam_path_mm : (float, float) or None
        Range of the air path of the beam before the sample (it sets the argon signal), uniform; ``None``:
        the presets' own.
    secondary : bool
        Add secondary fluorescence (within and between layers) to the spectra. Slow (about 8 ms per
        stack against 0.06 ms without, one thread), so meant for evaluation sets, not training; the labels
        still follow the primary line counts (secondary enhancement only makes a line more visible).
    gain_jitter_rel, offset_jitter_keV : float
        Standard deviations of the calibration error.
    layer_probs : tuple of float
        Probabilities of 1, 2, 3 paint layers.
    pigments_per_layer_probs : tuple of float
        Probabilities of 1, 2, 3 pigments in a layer.
    pigment_load : (float, float)
        Pigment weight fraction of a layer (the binder fills the rest).
    min_weight_fraction : float
        Smallest weight fraction of a pigment in a layer.
    top_thickness_um, lower_thickness_um, ground_thickness_um : (float, float)
        Thickness ranges (log-uniform).
    ground_probs : tuple of float
        Probabilities of a chalk, gypsum, lead white ground and of no ground.
    silent_prob : float
        Probability that a drawn pigment is an XRF-silent one.
    impurity_prob : float
        Probability that a spectrum has trace impurities.
    impurity_wt : (float, float)
        Range of the impurity weight fraction (element), log-uniform.
    composition_variant_prob : float
        Probability that a drawn pigment with composition variants in the library (natural earths, lead
        white, cadmium red, smalt: :class:`xrfnb.physics.pigments.CompositionVariants`) takes a variant
        drawn within the table's ranges instead of its formula. 0 (the default): formulas only, the
        stacks of configs written before variants existed.
    atomic_perturbation : bool
        Simulate each instrument variant of the training distribution (not the widened evaluation
        envelope) under its own atomic-parameter draw (:func:`xrfnb.physics.perturb.training_perturbation`,
        index = the variant's). Off by default: older configs keep their spectra.
    atomic_spread_scale : float
        Factor on the default spreads of those draws (1: K 4-10 %, L 10 %, M 20 % on the shells).
    tube_filters, tube_filter_weights : tuple of str, tuple of float
        Primary-beam filter sets drawn for the tube presets' variants, replacing the preset's own filters,
        with their weights (empty: uniform). Each set is ``"none"`` or layers ``"material:thickness_um"``
        joined by ``+`` (``"Al:100+Ti:25"``; materials as :class:`~xrfnb.Absorber` takes them). Empty (the
        default): the presets' filters, and the variants of configs written before this option.
    """

    instruments: tuple[str, ...] = ("bruker-m6", "lab-mo", "synchrotron")
    instrument_weights: tuple[float, ...] = (0.6, 0.25, 0.15)
    n_instrument_variants: int = 8
    variants_per_batch: int = 2
    fwhm_scale: tuple[float, float] = (0.85, 1.2)
    tube_voltage_rel: float = 0.1
    anodes: tuple[str, ...] = ()
    anode_weights: tuple[float, ...] = ()
    tube_voltage_kV: tuple[float, float] | None = None
    incidence_deg: tuple[float, float] | None = None
    takeoff_deg: tuple[float, float] | None = None
    detector_azimuth_deg: tuple[float, float] | None = None
    detector_thickness_um: tuple[float, float] | None = None
    detector_window_um: tuple[float, float] | None = None
    partial_collection: tuple[float, float] | None = None
    atmosphere_probs: tuple[float, ...] | None = None
    channel_gains_keV: tuple[float, ...] = ()
    air_path_mm: tuple[float, float] = (3.0, 30.0)
    counts: tuple[float, float] = (100.0, 50000.0)
    count_rate_cps: tuple[float, float] = (1e3, 2e5)
    pileup: bool = False
    argon: bool = False
    beam_path_mm: tuple[float, float] | None = None
    secondary: bool = False
    gain_jitter_rel: float = 0.002
    offset_jitter_keV: float = 0.01
    layer_probs: tuple[float, ...] = (0.45, 0.35, 0.2)
    pigments_per_layer_probs: tuple[float, ...] = (0.45, 0.35, 0.2)
    pigment_load: tuple[float, float] = (0.3, 0.85)
    min_weight_fraction: float = 0.01
    top_thickness_um: tuple[float, float] = (2.0, 60.0)
    lower_thickness_um: tuple[float, float] = (5.0, 80.0)
    ground_thickness_um: tuple[float, float] = (50.0, 300.0)
    ground_probs: tuple[float, ...] = (0.35, 0.2, 0.2, 0.25)
    silent_prob: float = 0.08
    impurity_prob: float = 0.7
    impurity_wt: tuple[float, float] = (1e-4, 3e-3)
    composition_variant_prob: float = 0.0
    atomic_perturbation: bool = False
    atomic_spread_scale: float = 1.0
    tube_filters: tuple[str, ...] = ()
    tube_filter_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("instrument_weights", "layer_probs", "pigments_per_layer_probs", "ground_probs"):
            v = np.asarray(getattr(self, name), dtype=float)
            if v.ndim != 1 or v.size == 0 or np.any(v < 0) or v.sum() <= 0:
                raise ModelError(f"[data] {name} must be non-negative weights, got {getattr(self, name)}")
        if len(self.instrument_weights) != len(self.instruments):
            raise ModelError("[data] instrument_weights needs one weight per instrument")
        if self.atmosphere_probs is not None and len(self.atmosphere_probs) != 3:
            raise ModelError("[data] atmosphere_probs needs 3 weights: air, helium, vacuum")
        for a in self.anodes:
            anode_z(a)  # an unknown anode fails here, not in a training worker
        if self.anode_weights and len(self.anode_weights) != len(self.anodes):
            raise ModelError("[data] anode_weights needs one weight per anode")
        if len(self.ground_probs) != 4:
            raise ModelError("[data] ground_probs needs 4 weights: chalk, gypsum, lead white, none")
        if self.beam_path_mm is not None and not 0 <= self.beam_path_mm[0] <= self.beam_path_mm[1]:
            raise ModelError(
                f"[data] beam_path_mm must be an increasing range >= 0 mm, got {self.beam_path_mm}")
        lo, hi = self.counts
        if not 0 < lo <= hi:
            raise ModelError(f"[data] counts range must be positive and increasing, got {self.counts}")
        if not 0.0 <= self.composition_variant_prob <= 1.0:
            raise ModelError(
                f"[data] composition_variant_prob must be in [0, 1], got {self.composition_variant_prob}")
        if not (math.isfinite(self.atomic_spread_scale) and 0.0 <= self.atomic_spread_scale <= 5.0):
            raise ModelError(f"[data] atomic_spread_scale must be in [0, 5], got {self.atomic_spread_scale}")
        for text in self.tube_filters:
            filter_set(text)  # a bad filter fails here, not in a training worker
        w = np.asarray(self.tube_filter_weights, dtype=float)
        if self.tube_filter_weights and (len(w) != len(self.tube_filters) or np.any(w < 0) or w.sum() <= 0):
            raise ModelError("[data] tube_filter_weights needs one non-negative weight per tube_filters "
                             f"entry, got {list(self.tube_filter_weights)} for {len(self.tube_filters)} sets")


def filter_set(text: str) -> tuple[Absorber, ...]:
    """The absorbers of a ``DataConfig.tube_filters`` entry.

    Parameters
    ----------
    text : str
        ``"none"`` or layers ``"material:thickness_um"`` joined by ``+``, e.g. ``"Al:100+Ti:50+Cu:25"``.

    Returns
    -------
    tuple of Absorber
        In beam order; empty for ``"none"``.

    Raises
    ------
    ModelError
        A layer without a ``:``, a thickness that is not a positive number, or an unknown material.
    """
    if not isinstance(text, str):
        raise ModelError(
            f"[data] tube_filters: expected strings such as 'Al:100+Ti:25' or 'none', got {text!r}")
    if text.strip().lower() == "none":
        return ()
    layers = []
    for part in text.split("+"):
        material, sep, thickness = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError("no ':' between material and thickness")
            layers.append(Absorber(material.strip(), float(thickness)))
        except (ValueError, XRFNBError) as exc:
            raise ModelError(f"[data] tube_filters entry {text!r}: layer {part.strip()!r} is not "
                             f"'material:thickness_um' ({exc})") from None
    return tuple(layers)


def _instrument_of(entry: str | Mapping[str, Any]) -> Instrument:
    """An instrument of ``DataConfig.instruments``: a preset name or a mapping of Instrument settings."""
    if isinstance(entry, Mapping):
        return Instrument.from_dict(entry)
    return Instrument.preset(entry)


# ---------------------------------------------------------------------------------------------------------
# the pigment table as arrays
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class PigmentTable:
    """The library as arrays: pigments, their classes, compositions over a fixed element list."""

    names: tuple[str, ...]  # P pigments
    pigment_class: np.ndarray  # (P,) class index or -1 (XRF-silent)
    classes: tuple[str, ...]  # K
    colors: tuple[str, ...]
    class_pigments: dict[str, tuple[str, ...]]
    class_elements: dict[str, tuple[str, ...]]
    key_elements: tuple[tuple[int, ...], ...]  # per pigment: indices into elements of its key elements
    elements: tuple[str, ...]  # E
    composition: np.ndarray  # (P, E) weight fractions
    density: np.ndarray  # (P,)
    binder_composition: np.ndarray  # (n_binders, E)
    binder_density: np.ndarray
    glue_composition: np.ndarray  # (E,)
    glue_density: float
    #: per pigment with composition variants: (members (1 + C, E): balance then components, low (C,),
    #: high (C,)) over the table's elements
    variants: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def max_key(self) -> int:
        """Most key elements of one pigment."""
        return max((len(k) for k in self.key_elements), default=0)

    def index(self, name: str) -> int:
        return self.names.index(name)


@functools.cache
def pigment_table() -> PigmentTable:
    """Arrays of the default pigment library (cached)."""
    lib = pigments()
    groups = lib.groups()
    silent_groups = {g for g, names in groups.items() if all(lib[n].xrf_silent for n in names)}
    classes = tuple(g for g in groups if g not in silent_groups)
    names = tuple(p.name for p in lib)
    binder_names = [*BINDERS, "animal glue"]
    binders = []
    for b in binder_names:
        try:
            binders.append(lib.binder(b))
        except Exception:
            binders.append(lib.binder("gum arabic"))
    elements = set(IMPURITIES)
    for p in lib:
        elements |= set(p.composition)
    for b in binders:
        elements |= set(b.composition)
    for p in lib:
        if p.variants is not None:
            elements |= set(p.variants.elements)
    elements_t = tuple(sorted(elements, key=atomic_number))
    eidx = {e: i for i, e in enumerate(elements_t)}
    comp = np.zeros((len(names), len(elements_t)))
    for i, p in enumerate(lib):
        for e, w in p.composition.items():
            comp[i, eidx[e]] = w
    bcomp = np.zeros((len(binders), len(elements_t)))
    for i, b in enumerate(binders):
        for e, w in b.composition.items():
            bcomp[i, eidx[e]] = w
    cls_idx = {c: i for i, c in enumerate(classes)}
    pclass = np.array([cls_idx.get(p.group, -1) for p in lib], dtype=np.int64)
    class_pigments = {c: tuple(groups[c]) for c in classes}
    class_elements = {
        c: tuple(sorted({e for n in groups[c] for e in lib[n].elements}, key=atomic_number)) for c in classes
    }
    colors = tuple(lib[groups[c][0]].color for c in classes)
    key = tuple(tuple(eidx[e] for e in p.elements if e in eidx) for p in lib)
    variants = {}
    for i, p in enumerate(lib):
        v = p.variants
        if v is None:
            continue
        members = np.zeros((1 + len(v.components), len(elements_t)))
        for r, c in enumerate((v.balance_composition, *(m.composition for m in v.components))):
            for e, w in c.items():
                members[r, eidx[e]] = w
        variants[i] = (members, np.array([m.wt_range[0] for m in v.components]),
                       np.array([m.wt_range[1] for m in v.components]))
    return PigmentTable(
        names=names,
        pigment_class=pclass,
        classes=classes,
        colors=colors,
        class_pigments=class_pigments,
        class_elements=class_elements,
        key_elements=key,
        elements=elements_t,
        composition=comp,
        density=np.array([p.density_g_cm3 for p in lib]),
        binder_composition=bcomp[: len(BINDERS)],
        binder_density=np.array([b.density_g_cm3 for b in binders[: len(BINDERS)]]),
        glue_composition=bcomp[-1],
        glue_density=float(binders[-1].density_g_cm3),
        variants=variants,
    )


# ---------------------------------------------------------------------------------------------------------
# sampling stacks as arrays
# ---------------------------------------------------------------------------------------------------------
MAX_PAINT_LAYERS = 3
N_LAYERS = MAX_PAINT_LAYERS + 1  # + ground


@dataclasses.dataclass(frozen=True, eq=False)
class StackBatch:
    """A batch of random stacks as arrays (layers from the surface down; index 3 is the ground).

    Attributes
    ----------
    W : numpy.ndarray
        (B, 4, E) element weight fractions per layer (zero rows for missing layers).
    mt : numpy.ndarray
        (B, 4) mass thickness g/cm^2 (0 for missing layers).
    pigment_wt : numpy.ndarray
        (B, 4, P) weight fraction of every library pigment in every layer.
    n_paint : numpy.ndarray
        (B,) number of paint layers.
    key_wt : numpy.ndarray or None
        (B, 4, P, K) weight fraction of each pigment's k-th key element (``PigmentTable.key_elements``)
        that the pigment brings to each layer; given when pigments may take composition variants (their
        key-element content then differs from the formula's), None: ``pigment_wt`` times the formula's.
    """

    W: np.ndarray
    mt: np.ndarray
    pigment_wt: np.ndarray
    n_paint: np.ndarray
    key_wt: np.ndarray | None = None

    def subset(self, idx: np.ndarray) -> StackBatch:
        """The stacks ``idx``."""
        key = self.key_wt[idx] if self.key_wt is not None else None
        return StackBatch(self.W[idx], self.mt[idx], self.pigment_wt[idx], self.n_paint[idx], key)

    def __len__(self) -> int:
        return int(self.W.shape[0])


def _loguniform(rng: np.random.Generator, lo: float, hi: float,
                size: int | tuple[int, ...] | None = None) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _pick(rng: np.random.Generator, cum: Sequence[float]) -> int:
    """Index drawn with probabilities given by a cumulative sum (a list: bisect beats numpy on scalars)."""
    return bisect.bisect_right(cum, rng.random() * cum[-1])


@functools.cache
def _class_members() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    tab = pigment_table()
    members = tuple(np.flatnonzero(tab.pigment_class == c) for c in range(len(tab.classes)))
    return members, np.flatnonzero(tab.pigment_class < 0)


def _draw_pigments(rng: np.random.Generator, k: int, silent_prob: float) -> list[int]:
    """``k`` distinct pigment indices: class uniform, then pigment uniform within the class."""
    members, silent = _class_members()
    chosen: list[int] = []
    tries = 0
    while len(chosen) < k and tries < 50:
        tries += 1
        if silent.size and rng.random() < silent_prob:
            group = silent
        else:
            group = members[int(rng.integers(len(members)))]
        p = int(group[int(rng.integers(group.size))])
        if p not in chosen:
            chosen.append(p)
    return chosen


def draw_variant(rng: np.random.Generator, pigment: int) -> np.ndarray:
    """A composition variant of pigment ``pigment`` (index into the pigment table) over the table's
    elements, shape (E,): component weights uniform within their ranges (redrawn while they sum to more
    than 1, as :meth:`xrfnb.physics.pigments.CompositionVariants.draw_weights`), the balance the rest."""
    members, lo, hi = pigment_table().variants[pigment]
    for _ in range(100):
        w = rng.uniform(lo, hi)
        if w.sum() <= 1.0:
            break
    else:
        w = lo
    return (1.0 - w.sum()) * members[0] + w @ members[1:]


def sample_stacks(
    n: int,
    rng: np.random.Generator,
    cfg: DataConfig,
    *,
    kind: str = "train",
) -> StackBatch:
    """Draw ``n`` random stacks.

    Parameters
    ----------
    n : int
        Number of stacks.
    rng : numpy.random.Generator
    cfg : DataConfig
    kind : {"train", "single", "mixture", "buried", "low"}
        ``"train"``: the training distribution. The evaluation sets: ``"single"`` one pigment in one
        layer; ``"mixture"`` 2-3 pigments in one layer; ``"buried"`` a 5-40 um layer of one pigment over a
        layer of 1-2 others; ``"low"`` a main pigment with a second one at 1-10 wt%. All over the same
        grounds as training.

    Returns
    -------
    StackBatch
        With ``key_wt`` when ``cfg.composition_variant_prob`` > 0.
    """
    tab = pigment_table()
    n_el, n_pig = len(tab.elements), len(tab.names)
    W = np.zeros((n, N_LAYERS, n_el))
    mt = np.zeros((n, N_LAYERS))
    pw = np.zeros((n, N_LAYERS, n_pig))
    vprob = float(cfg.composition_variant_prob)
    key_wt = np.zeros((n, N_LAYERS, n_pig, tab.max_key)) if vprob > 0 else None
    key_el = [np.asarray(k, dtype=np.intp) for k in tab.key_elements]
    n_paint = np.zeros(n, dtype=np.int64)
    lp = np.cumsum(cfg.layer_probs, dtype=float).tolist()
    kp = np.cumsum(cfg.pigments_per_layer_probs, dtype=float).tolist()
    gp = np.cumsum(cfg.ground_probs, dtype=float).tolist()
    bp = np.cumsum(BINDER_WEIGHTS, dtype=float).tolist()
    impurity_idx = [tab.elements.index(el) for el in IMPURITIES]
    log_imp = (math.log(cfg.impurity_wt[0]), math.log(cfg.impurity_wt[1]))
    ground_pigments = ("chalk", "gypsum", "lead white")
    for b in range(n):
        if kind == "train":
            nl = _pick(rng, lp) + 1
        elif kind == "buried":
            nl = 2
        else:
            nl = 1
        n_paint[b] = nl
        for j in range(nl):
            silent_prob = cfg.silent_prob
            if kind == "train":
                k = _pick(rng, kp) + 1
            elif kind == "single" or (kind == "buried" and j == 0):
                k, silent_prob = 1, 0.0
            elif kind == "mixture":
                k, silent_prob = int(rng.integers(2, 4)), 0.0
            elif kind == "buried":
                k, silent_prob = int(rng.integers(1, 3)), 0.0
            elif kind == "low":
                k, silent_prob = 2, 0.0
            else:
                raise ModelError(f"unknown sample kind {kind!r}")
            pigs = _draw_pigments(rng, k, silent_prob)
            load = rng.uniform(cfg.pigment_load[0], cfg.pigment_load[1])
            if kind == "low":
                minor = rng.uniform(0.01, 0.10)
                fr = np.array([load - minor, minor])[: len(pigs)]
            else:
                raw = _loguniform(rng, 0.02, 1.0, len(pigs))
                fr = raw / raw.sum() * load
                fr = np.maximum(fr, cfg.min_weight_fraction)
            bi = _pick(rng, bp)
            binder_w = max(0.0, 1.0 - fr.sum())
            pig_comp = tab.composition[pigs]
            if vprob > 0:  # drawn only when asked: configs without variants keep their stacks
                pig_comp = pig_comp.copy()
                for i, p in enumerate(pigs):
                    if p in tab.variants and rng.random() < vprob:
                        pig_comp[i] = draw_variant(rng, p)
            comp = fr @ pig_comp + binder_w * tab.binder_composition[bi]
            inv_rho = float(np.sum(fr / tab.density[pigs]) + binder_w / tab.binder_density[bi])
            W[b, j] = comp / comp.sum()
            pw[b, j, pigs] = fr / comp.sum()
            if key_wt is not None:
                for i, p in enumerate(pigs):
                    key_wt[b, j, p, : key_el[p].size] = fr[i] * pig_comp[i, key_el[p]] / comp.sum()
            if j == 0:
                lo, hi = (5.0, 40.0) if kind == "buried" else cfg.top_thickness_um
            else:
                lo, hi = cfg.lower_thickness_um
            mt[b, j] = math.exp(rng.uniform(math.log(lo), math.log(hi))) * 1e-4 / inv_rho
        g = _pick(rng, gp)
        if g < 3:
            gi = tab.index(ground_pigments[g])
            frac = rng.uniform(0.8, 0.95)
            g_comp = tab.composition[gi]
            if vprob > 0 and gi in tab.variants and rng.random() < vprob:
                g_comp = draw_variant(rng, gi)
            if ground_pigments[g] == "lead white":
                comp = frac * g_comp + (1 - frac) * tab.binder_composition[0]
                inv_rho = frac / tab.density[gi] + (1 - frac) / tab.binder_density[0]
            else:
                comp = frac * g_comp + (1 - frac) * tab.glue_composition
                inv_rho = frac / tab.density[gi] + (1 - frac) / tab.glue_density
            W[b, MAX_PAINT_LAYERS] = comp
            pw[b, MAX_PAINT_LAYERS, gi] = frac
            if key_wt is not None:
                key_wt[b, MAX_PAINT_LAYERS, gi, : key_el[gi].size] = frac * g_comp[key_el[gi]]
            mt[b, MAX_PAINT_LAYERS] = _loguniform(rng, *cfg.ground_thickness_um) * 1e-4 / inv_rho
        if rng.random() < cfg.impurity_prob:
            layers = [*range(nl), *([MAX_PAINT_LAYERS] if g < 3 else [])]
            for ei in impurity_idx:
                if rng.random() < 0.5:
                    j = layers[int(rng.integers(len(layers)))]
                    w = math.exp(rng.uniform(*log_imp))
                    W[b, j] *= 1.0 - w
                    pw[b, j] *= 1.0 - w
                    if key_wt is not None:
                        key_wt[b, j] *= 1.0 - w
                    W[b, j, ei] += w
    return StackBatch(W, mt, pw, n_paint, key_wt)


# ---------------------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _pigment_lines(line_elements: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per pigment: indices of the lines of its key elements, given each line's table element."""
    tab = pigment_table()
    el = np.asarray(line_elements)
    return tuple(
        np.flatnonzero(np.isin(el, key)) if key else np.zeros(0, np.intp) for key in tab.key_elements
    )


def visibility_labels(
    batch: StackBatch,
    line_counts: np.ndarray,
    line_element: np.ndarray,
    line_energy_keV: np.ndarray,
    element_index: np.ndarray,
    counts: np.ndarray,
    channel_energy_keV: np.ndarray,
    fwhm_keV: np.ndarray,
) -> np.ndarray:
    """Per-class labels 0/1/2 (absent / surface / buried only) from the visibility rule.

    Parameters
    ----------
    batch : StackBatch
    line_counts : numpy.ndarray
        (B, N, L) expected detected counts of every line from every layer, scaled to each spectrum's counts.
    line_element : numpy.ndarray
        (L,) index into the simulator's element list of each line's element.
    line_energy_keV : numpy.ndarray
        (L,).
    element_index : numpy.ndarray
        (E_sim,) index into the pigment table's element list of each simulator element.
    counts : numpy.ndarray
        (B, channels) the noisy spectra.
    channel_energy_keV : numpy.ndarray
        (channels,).
    fwhm_keV : numpy.ndarray
        (L,) detector FWHM at each line.

    Returns
    -------
    numpy.ndarray
        (B, K) int64.
    """
    tab = pigment_table()
    bsz = len(batch)
    k = len(tab.classes)
    labels = np.zeros((bsz, k), dtype=np.int64)
    # window sums of the noisy spectra for every line: cumulative sums at window edges
    cum = np.concatenate([np.zeros((bsz, 1)), np.cumsum(counts, axis=1, dtype=np.float64)], axis=1)
    lo = np.searchsorted(channel_energy_keV, line_energy_keV - fwhm_keV)
    hi = np.searchsorted(channel_energy_keV, line_energy_keV + fwhm_keV)
    window_counts = cum[:, hi] - cum[:, lo]  # (B, L)
    tab_el_of_line = element_index[line_element]  # (L,) pigment-table element of each line
    pigment_lines = _pigment_lines(tuple(int(i) for i in tab_el_of_line))
    present_pigments = np.flatnonzero(batch.pigment_wt.any(axis=(0, 1)))
    rows = np.arange(bsz)
    for p in present_pigments:
        c = tab.pigment_class[p]
        lines = pigment_lines[p]
        if c < 0 or lines.size == 0:
            continue
        wp = batch.pigment_wt[:, :, p]  # (B, N)
        has = wp > 0
        if not has.any():
            continue
        # share of each line's element in the layer that comes from this pigment
        if batch.key_wt is not None:  # composition variants: the pigment's own key-element content
            k_of_line = [tab.key_elements[p].index(int(e)) for e in tab_el_of_line[lines]]
            share = batch.key_wt[:, :, p, :][:, :, k_of_line]
        else:
            share = wp[:, :, None] * tab.composition[p, tab_el_of_line[lines]][None, None, :]
        w_el = batch.W[:, :, tab_el_of_line[lines]]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(w_el > 0, share / w_el, 0.0)
        s = line_counts[:, :, lines] * np.minimum(share, 1.0) * 0.98  # (B, N, Lp): +/-1 FWHM holds 98 %
        s_total = s.sum(axis=1)  # (B, Lp) from all layers holding the pigment
        bkg = np.maximum(window_counts[:, lines] - s_total, 0.0)
        best = np.argmax(s_total - 3 * np.sqrt(bkg), axis=1)
        s_best, b_best = s_total[rows, best], bkg[rows, best]
        visible = (s_best >= 3.0 * np.sqrt(b_best)) & (s_best >= 4.0)
        # visible in the surface layer: the top layer's own contribution passes the same rule
        s_top = s[rows, 0, best]
        top_visible = visible & has[:, 0] & (s_top >= 3.0 * np.sqrt(b_best + s_best - s_top)) & (s_top >= 4.0)
        labels[:, c] = np.where(top_visible, 1, np.where(visible & (labels[:, c] == 0), 2, labels[:, c]))
    return labels


# ---------------------------------------------------------------------------------------------------------
# the data source used by training
# ---------------------------------------------------------------------------------------------------------
class TrainingData:
    """Batches of (spectra on the model grid, labels) from the simulator, for training and evaluation.

    Parameters
    ----------
    cfg : DataConfig
    n_bins, e_min_keV, e_max_keV, grid_noise_keV
        The model's energy grid.
    """

    def __init__(self, cfg: DataConfig, *, n_bins: int = 512, e_min_keV: float = 1.0, e_max_keV: float = 41.0,
                 grid_noise_keV: float = 0.08) -> None:
        self.cfg = cfg
        self.table = pigment_table()
        self.edges_keV = energy_grid_edges_keV(n_bins, e_min_keV, e_max_keV, grid_noise_keV)
        self._variants: dict[int, list[Instrument]] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        return self.table.classes

    @property
    def colors(self) -> tuple[str, ...]:
        return self.table.colors

    @property
    def class_pigments(self) -> dict[str, tuple[str, ...]]:
        return self.table.class_pigments

    @property
    def class_elements(self) -> dict[str, tuple[str, ...]]:
        return self.table.class_elements

    def default_input(self) -> dict[str, Any]:
        """Calibration and channel count assumed for bare arrays (the first instrument preset)."""
        inst = _instrument_of(self.cfg.instruments[0])
        return {
            "instrument": inst.name,
            "calibration": inst.calibration.to_dict(),
            "n_channels": inst.n_channels,
        }

    def envelope(self) -> dict[str, Any]:
        """The instrument envelope of the training data (for model.json and the card)."""
        c = self.cfg
        return {
            "instruments": list(c.instruments),
            "instrument_weights": list(c.instrument_weights),
            "fwhm_scale_at_MnKa": list(c.fwhm_scale),
            "tube_voltage_rel": c.tube_voltage_rel,
            "air_path_mm": list(c.air_path_mm),
            "counts": list(c.counts),
            "pileup_count_rate_cps": list(c.count_rate_cps) if c.pileup else None,
            "argon": c.argon,
            "beam_path_mm": list(c.beam_path_mm) if c.beam_path_mm is not None else None,
            "calibration_gain_jitter_rel": c.gain_jitter_rel,
            "calibration_offset_jitter_keV": c.offset_jitter_keV,
            "top_thickness_um": list(c.top_thickness_um),
            "min_weight_fraction": c.min_weight_fraction,
            # new options only when on: envelopes of configs without them stay as they were
            **({"composition_variant_prob": c.composition_variant_prob}
               if c.composition_variant_prob else {}),
            **({"atomic_perturbation_spread_scale": c.atomic_spread_scale}
               if c.atomic_perturbation else {}),
            **({"tube_filters": list(c.tube_filters),
                "tube_filter_weights": list(c.tube_filter_weights) or None} if c.tube_filters else {}),
        }

    def label_definition(self) -> str:
        return (
            "per class: 0 absent, 1 present in the top layer, 2 present only below it; a pigment is present "
            "when the expected counts S of its strongest line (own contribution, +/-1 FWHM) satisfy "
            "S >= 3 sqrt(B) and S >= 4, B = other counts in that window of the noisy spectrum"
        )

    # the simulator glue is below (_simulate_group); batches are split over instrument variants
    def batch(self, n: int, rng: np.random.Generator, *, kind: str = "train",
              counts: float | None = None, wider: bool = False,
              n_groups: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Simulate ``n`` spectra and labels.

        Parameters
        ----------
        n : int
        rng : numpy.random.Generator
        kind : str
            Stack distribution (see :func:`sample_stacks`).
        counts : float, optional
            Fixed total counts (evaluation); default log-uniform over ``cfg.counts``.
        wider : bool
            Evaluation: widen the instrument envelope (FWHM x0.8-1.3, calibration errors x2, other
            instrument variants).
        n_groups : int, optional
            Number of instrument groups: the spectra are split into this many groups, each simulated
            with one instrument variant drawn at random (default ``cfg.variants_per_batch``, as in a
            training batch). Sets meant to cover the whole instrument envelope (validation, evaluation)
            need many groups.

        Returns
        -------
        binned : numpy.ndarray
            (n, n_bins) float32 counts on the model grid.
        labels : numpy.ndarray
            (n, K) int64 in {0, 1, 2}.
        """
        binned, labels, _, _ = self.batch_raw(n, rng, kind=kind, counts=counts, wider=wider,
                                              n_groups=n_groups)
        return binned, labels

    def batch_raw(self, n: int, rng: np.random.Generator, *, kind: str = "train",
                  counts: float | None = None, wider: bool = False,
                  n_groups: int | None = None) -> tuple[np.ndarray, ...]:
        """As :meth:`batch`, plus the raw spectra (list per instrument group) and their calibrations."""
        cfg = self.cfg
        stacks = sample_stacks(n, rng, cfg, kind=kind)
        if counts is None:
            total = _loguniform(rng, *cfg.counts, n)
        else:
            total = np.full(n, float(counts))
        n_groups = cfg.variants_per_batch if n_groups is None else int(n_groups)
        groups = np.array_split(rng.permutation(n), max(1, min(n_groups, n)))
        binned = np.zeros((n, self.edges_keV.size - 1), np.float32)
        labels = np.zeros((n, len(self.classes)), np.int64)
        raws = []
        for idx in groups:
            if idx.size == 0:
                continue
            inst = self._instrument(rng, wider)
            sub = stacks.subset(idx)
            pert = self._perturbation(inst, wider)
            if pert is not None and current_perturbation() is None:  # a caller's own block wins
                with atomic_perturbation(pert):
                    raw, lab = self._simulate_group(sub, inst, total[idx], rng)
            else:
                raw, lab = self._simulate_group(sub, inst, total[idx], rng)
            g = (2.0 if wider else 1.0)
            cal = inst.calibration
            true_cal = EnergyCalibration(
                cal.offset_keV + rng.normal(0, g * cfg.offset_jitter_keV),
                cal.gain_keV * (1 + rng.normal(0, g * cfg.gain_jitter_rel)),
                cal.quadratic_keV,
            )
            # the spectrum was simulated with `cal`; the user believes `true_cal` (a calibration error)
            binned[idx] = rebin_counts(raw, true_cal, self.edges_keV)
            labels[idx] = lab
            raws.append((idx, raw, true_cal, inst))
        return binned, labels, raws, stacks

    # -- instruments ------------------------------------------------------------------------------------
    def _instrument(self, rng: np.random.Generator, wider: bool) -> Instrument:
        """One of ``n_instrument_variants`` randomised instruments (presets in proportion to their weights).

        The variants are fixed per run (drawn from their own seed), because the simulator caches its
        per-instrument set-up; each batch is split over ``variants_per_batch`` of them.
        """
        cfg = self.cfg
        key = 1 if wider else 0
        if key not in self._variants:
            vrng = np.random.default_rng([7919, key])
            w = np.asarray(cfg.instrument_weights, float)
            n = max(cfg.n_instrument_variants, len(cfg.instruments))
            # every preset at least once, the rest in proportion to the weights
            presets = list(range(len(cfg.instruments)))
            quota = w / w.sum() * n
            while len(presets) < n:
                counts = np.bincount(presets, minlength=len(w))
                presets.append(int(np.argmax(quota - counts)))
            self._variants[key] = [
                self._make_variant(cfg.instruments[i], vrng, wider) for i in sorted(presets)
            ]
        variants = self._variants[key]
        return variants[int(rng.integers(len(variants)))]

    def _perturbation(self, inst: Instrument, wider: bool) -> AtomicPerturbation | None:
        """The atomic-parameter draw of a training instrument variant (``cfg.atomic_perturbation``): the
        ``i``-th variant simulates under :func:`~xrfnb.physics.perturb.training_perturbation` ``(i)``, so
        the draws are fixed per run like the variants (the simulator caches tables per instrument and
        draw: as many as without it). None when off and for the widened evaluation envelope."""
        if not self.cfg.atomic_perturbation or wider:
            return None
        variants = self._variants.get(0, [])
        index = next((i for i, v in enumerate(variants) if v is inst), 0)
        return training_perturbation(index, self.cfg.atomic_spread_scale)

    def _make_variant(self, preset: str, rng: np.random.Generator, wider: bool) -> Instrument:
        inst = _instrument_of(preset)
        cfg = self.cfg
        lo, hi = (0.8, 1.3) if wider else cfg.fwhm_scale
        fwhm_mnka = float(inst.fwhm_keV(5.8988)) * rng.uniform(lo, hi)
        fano_only = math.sqrt(8 * math.log(2) * inst.fano * inst.pair_energy_eV * 1e-3 * 5.8988)
        fwhm_mnka = max(fwhm_mnka, fano_only + 0.010)
        noise = math.sqrt(max(fwhm_mnka**2 - fano_only**2, 1e-6))
        changes: dict[str, Any] = {"noise_keV": noise, "detector_path_mm": rng.uniform(*cfg.air_path_mm)}
        if inst.anode is not None and inst.monochromatic_keV is None:
            factor = 1 + rng.uniform(-1, 1) * cfg.tube_voltage_rel
            changes["tube_voltage_kV"] = inst.tube_voltage_kV * factor
        if cfg.beam_path_mm is not None:  # drawn last: configs without it keep their variants
            changes["beam_path_mm"] = rng.uniform(*cfg.beam_path_mm)
        # the wider envelope, each drawn only where configured (older configs keep their variants)
        tube = inst.anode is not None and inst.monochromatic_keV is None
        if tube and cfg.anodes:
            w = np.asarray(cfg.anode_weights or [1.0] * len(cfg.anodes), dtype=float)
            changes["anode"] = str(cfg.anodes[int(rng.choice(len(cfg.anodes), p=w / w.sum()))])
        if tube and cfg.tube_voltage_kV is not None:
            changes["tube_voltage_kV"] = rng.uniform(*cfg.tube_voltage_kV)
        for field in ("incidence_deg", "takeoff_deg", "detector_azimuth_deg", "detector_thickness_um",
                      "partial_collection"):
            span = getattr(cfg, field)
            if span is not None:
                changes[field] = rng.uniform(*span)
        if cfg.detector_window_um is not None:
            changes["detector_window"] = Absorber("Be", float(rng.uniform(*cfg.detector_window_um)))
        if cfg.atmosphere_probs is not None:
            w = np.asarray(cfg.atmosphere_probs, dtype=float)
            changes["atmosphere"] = ("air", "helium", "vacuum")[int(rng.choice(3, p=w / w.sum()))]
        if cfg.channel_gains_keV:
            gain = float(cfg.channel_gains_keV[int(rng.integers(len(cfg.channel_gains_keV)))])
            offset = float(rng.uniform(-0.1, 0.0)) if gain > 0.015 else inst.calibration.offset_keV
            changes["calibration"] = EnergyCalibration(offset, gain)
            changes["n_channels"] = math.ceil((41.0 - offset) / gain)
        if tube and cfg.tube_filters:  # drawn last: configs without it keep their variants
            w = np.asarray(cfg.tube_filter_weights or [1.0] * len(cfg.tube_filters), dtype=float)
            changes["tube_filters"] = filter_set(cfg.tube_filters[int(rng.choice(len(w), p=w / w.sum()))])
        return inst.with_(**changes)

    # -- physics ----------------------------------------------------------------------------------------
    def _simulate_group(self, stacks: StackBatch, inst: Instrument, total: np.ndarray,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Noisy spectra from the simulator's batch path, and visibility labels.

        The spectra come from the simulator's batch path (:func:`xrfnb.simulate_batch`: primary
        fluorescence, Rayleigh and Compton scatter, detector response, Poisson noise). The labels need each
        line's expected counts per layer, which the batch path hands out beside the spectra: the primary
        intensities per layer, times detector efficiency and in-range response, times the same per-spectrum
        scale that turned the spectrum's intensities into its expected total counts.
        """
        tab = self.table
        arr = StackArrays(tab.elements, stacks.W, stacks.mt)
        parts: dict[str, np.ndarray] = {}
        rate = _loguniform(rng, *self.cfg.count_rate_cps, len(total)) if self.cfg.pileup else None
        raw = simulate_batch(arr, inst, counts=total, rng=rng, keep=parts, count_rate_cps=rate,
                             argon=self.cfg.argon, secondary=self.cfg.secondary)
        T = tables_for(tab.elements, simulation_setup(inst))
        line_counts = parts["primary"] * parts["line_detected"][None, None, :] * parts["scale"][:, None, None]
        sim_el = np.array([tab.elements.index(element_symbol(z)) for z in T.elements], dtype=np.int64)
        labels = visibility_labels(
            stacks,
            line_counts,
            T.line_element,
            T.line_energy_keV,
            sim_el,
            raw,
            inst.channel_energy_keV,
            np.asarray(inst.fwhm_keV(T.line_energy_keV), dtype=float),
        )
        return raw, labels
