"""The expert baseline: pigments from element maps, by the reasoning a conservation scientist applies.

This is the procedure the deep-learning model must beat. It reads fitted element maps
(:class:`xrfnb.ElementMaps`) and the pigment library's ambiguity groups, and decides per pixel which
pigment groups the elements indicate:

1. **Element evidence.** An element counts where its fitted intensity exceeds its detection limit (3 sigma).
   Elements that come from grounds, dirt, clays and the air path at trace level (``trace_elements``: Ca,
   Fe, K, Si, ... by default) must in addition reach ``trace_fraction`` of the strongest element in the
   same pixel and ``map_fraction`` of their own high quantile over the map, so a thin film of dirt or a
   deep chalk ground does not indicate a pigment on its own. Every other element must reach
   ``minor_fraction`` (0.5 %) of the strongest element: weaker fitted signals are more often fit cross-talk,
   escape or sum-peak residues than a pigment an expert would name.
2. **Co-location.** A group is a *candidate* where all its key elements have evidence in the same pixel.
3. **Parsimony.** A candidate whose key elements are a strict subset of those of a group already indicated
   in that pixel is explained away (Pb + Cr -> chrome yellow, not also lead white and viridian), unless the
   shared elements show excess evidence: more signal than the larger group accounts for. The larger group's
   share is estimated from the intensity ratios it shows where it is indicated (the dominant ratio: most
   of a pigment's pixels are taken to be that pigment unmixed). A superset only explains a subset away when
   it adds at least one specific element; superset elements in ``nonspecific_elements`` (Ca, K, Si, ...
   present in most grounds) do not make it more specific, so Cu + Ca reports both the copper pigments and
   Egyptian blue (which in turn accounts for the Ca).
4. **Ambiguity.** The answer is an ambiguity group with its member pigments as alternatives, never one
   guessed pigment. XRF-silent pigments (organic lakes, carbon black) are never indicated.
5. **Unexplained elements.** Elements with evidence that no indicated group contains (in its key elements,
   composition or associated elements) are reported per pixel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from .._errors import FitError, PigmentError
from ..physics.pigments import SILENT_GROUP, PigmentLibrary
from ..physics.pigments import pigments as default_pigments
from .elements import ElementMaps

__all__ = ["BaselineAssignment", "assign_pigments_by_elements"]

#: Elements common at trace level from grounds, dirt, clays and the air path.
DEFAULT_TRACE_ELEMENTS: tuple[str, ...] = ("Al", "Si", "P", "S", "Cl", "K", "Ca", "Mn", "Fe")
#: Elements that do not make a pigment more specific than one without them (present in most grounds).
DEFAULT_NONSPECIFIC_ELEMENTS: tuple[str, ...] = ("Al", "Si", "P", "S", "Cl", "K", "Ca")
#: Elements never reported as unexplained (air path).
DEFAULT_IGNORE_ELEMENTS: tuple[str, ...] = ("Ar",)

_SCORE_MAX = 1.0e6


@dataclass(frozen=True, eq=False)
class BaselineAssignment:
    """Pigment groups indicated by element maps, per pixel.

    Attributes
    ----------
    classes : tuple of str
        Ambiguity group names (K), in library order; XRF-silent pigments are not among them.
    score : numpy.ndarray
        Evidence per group, shape (rows, cols, K), float32, in multiples of the threshold: the weakest key
        element's intensity over its threshold (detection limit or trace threshold); where the group is
        explained away by a larger group, the weakest key element's *excess* over its threshold instead.
        ``present == score > 1``. Use it to rank pixels (ROC curves) against model probabilities.
    present : numpy.ndarray
        Where each group is indicated, shape (rows, cols, K), bool.
    alternatives : Mapping[str, tuple[str, ...]]
        Group -> its member pigments (what XRF cannot tell apart).
    group_elements : Mapping[str, tuple[str, ...]]
        Group -> its key elements.
    colors : tuple of str
        Display colour per class (``"#rrggbb"``, of the group's first pigment).
    elements : tuple of str
        Elements of the input maps (n_el).
    detected : numpy.ndarray
        Element evidence after detection-limit and trace thresholds, shape (rows, cols, n_el), bool.
    unexplained : numpy.ndarray
        Detected elements that no indicated group contains, shape (rows, cols, n_el), bool.
    unassessable : Mapping[str, tuple[str, ...]]
        Groups that could not be assessed -> key elements missing from the maps.
    mixture_alternatives : Mapping[str, tuple[tuple[str, str], ...]]
        Group -> pairs of smaller groups whose mixture gives the same key elements (lithopone: zinc white
        with barium white). Element maps cannot exclude these mixtures either.
    silent : tuple of str
        Pigments XRF cannot see (never indicated), for the record.
    parameters : Mapping[str, float | tuple[str, ...]]
        The thresholds used.
    """

    classes: tuple[str, ...]
    score: np.ndarray
    present: np.ndarray
    alternatives: Mapping[str, tuple[str, ...]]
    group_elements: Mapping[str, tuple[str, ...]]
    colors: tuple[str, ...]
    elements: tuple[str, ...]
    detected: np.ndarray
    unexplained: np.ndarray
    unassessable: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mixture_alternatives: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    silent: tuple[str, ...] = ()
    parameters: Mapping[str, float | tuple[str, ...]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return (int(self.present.shape[0]), int(self.present.shape[1]))

    def index(self, group: str) -> int:
        """Position of a group (or of the group of a pigment name) in :attr:`classes`."""
        if group in self.classes:
            return self.classes.index(group)
        for i, g in enumerate(self.classes):
            if group.strip().lower() in self.alternatives[g]:
                return i
        raise PigmentError(f"no class {group!r}; classes are {', '.join(self.classes)}")

    def __getitem__(self, group: str) -> np.ndarray:
        """Boolean map (rows, cols) of one group (or of the group of a pigment name)."""
        return self.present[:, :, self.index(group)]

    def groups_at(self, row: int, col: int) -> tuple[str, ...]:
        """Groups indicated at one pixel, strongest evidence first."""
        idx = np.flatnonzero(self.present[row, col])
        idx = idx[np.argsort(-self.score[row, col, idx], kind="stable")]
        return tuple(self.classes[i] for i in idx)

    def unexplained_at(self, row: int, col: int) -> tuple[str, ...]:
        """Elements with evidence at one pixel that no indicated group explains."""
        return tuple(e for e, u in zip(self.elements, self.unexplained[row, col], strict=True) if u)

    def explain(self, row: int = 0, col: int = 0) -> str:
        """A short human-readable account of one pixel."""
        det = [e for e, d in zip(self.elements, self.detected[row, col], strict=True) if d]
        lines = [f"pixel ({row}, {col}): elements {', '.join(det) or 'none'}"]
        for g in self.groups_at(row, col):
            alts = self.alternatives[g]
            alt = alts[0] if len(alts) == 1 else " or ".join(alts)
            k = self.index(g)
            lines.append(
                f"  {g} [{', '.join(self.group_elements[g])}]: {alt} (score {self.score[row, col, k]:.1f})"
            )
            for a, b in self.mixture_alternatives.get(g, ()):
                lines.append(f"    or a mixture of {a} + {b}")
        unexplained = self.unexplained_at(row, col)
        if unexplained:
            lines.append(f"  unexplained: {', '.join(unexplained)}")
        return "\n".join(lines)

    def select(self, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Score and present maps reordered to ``classes`` (e.g. a model's), zeros for classes not assessed.

        Parameters
        ----------
        classes : sequence of str
            Group names, K'.

        Returns
        -------
        score : numpy.ndarray
            Shape (rows, cols, K'), float32.
        present : numpy.ndarray
            Shape (rows, cols, K'), bool.
        """
        rows, cols = self.shape
        score = np.zeros((rows, cols, len(classes)), dtype=np.float32)
        present = np.zeros((rows, cols, len(classes)), dtype=bool)
        for i, g in enumerate(classes):
            if g in self.classes:
                k = self.classes.index(g)
                score[:, :, i] = self.score[:, :, k]
                present[:, :, i] = self.present[:, :, k]
        return score, present

    def summary(self) -> dict[str, float]:
        """Fraction of pixels where each group is indicated."""
        n = max(1, self.shape[0] * self.shape[1])
        return {g: float(self.present[:, :, k].sum()) / n for k, g in enumerate(self.classes)}


def _dominant_ratio(ratios: np.ndarray, coverage: float) -> float:
    """Mode of positive ratios: centre (in log) of the narrowest interval holding ``coverage`` of them.

    Parameters
    ----------
    ratios : numpy.ndarray
        Positive ratios, shape (n,).
    coverage : float
        Fraction of the values the interval must hold, (0, 1].

    Returns
    -------
    float
        The geometric mean of the values in the narrowest such interval (0.0 if all ratios are 0).
    """
    r = np.asarray(ratios, dtype=np.float64)
    r = r[np.isfinite(r) & (r > 0)]
    if r.size == 0:
        return 0.0
    v = np.sort(np.log(r))
    h = max(1, int(np.ceil(coverage * v.size)))
    widths = v[h - 1 :] - v[: v.size - h + 1]
    i = int(np.argmin(widths))
    return float(np.exp(v[i : i + h].mean()))


def _check_fraction(name: str, value: float) -> float:
    """``value`` as a float in [0, 1); FitError naming the parameter otherwise."""
    v = float(value)
    if not (np.isfinite(v) and 0.0 <= v < 1.0):
        raise FitError(f"{name} must be in [0, 1), got {value!r}")
    return v


def _symbols(values: Sequence[str], name: str) -> frozenset[str]:
    """Element symbols of a parameter; FitError for a bare string (``"Ca"`` instead of ``("Ca",)``)."""
    if isinstance(values, str):
        raise FitError(f"{name} must be a sequence of element symbols, got the string {values!r}")
    return frozenset(str(v).strip() for v in values)


@dataclass(frozen=True)
class _Settings:
    """The checked thresholds of :func:`assign_pigments_by_elements` (see its parameters)."""

    trace: frozenset[str]
    trace_fraction: float
    minor_fraction: float
    map_fraction: float
    map_quantile: float
    nonspecific: frozenset[str]
    ratio_coverage: float
    excess_fraction: float
    ignore: frozenset[str]

    def parameters(self) -> dict[str, float | tuple[str, ...]]:
        """The thresholds as :attr:`BaselineAssignment.parameters` records them."""
        return {
            "trace_elements": tuple(sorted(self.trace)),
            "trace_fraction": self.trace_fraction,
            "minor_fraction": self.minor_fraction,
            "map_fraction": self.map_fraction,
            "map_quantile": self.map_quantile,
            "nonspecific_elements": tuple(sorted(self.nonspecific)),
            "ratio_coverage": self.ratio_coverage,
            "excess_fraction": self.excess_fraction,
            "ignore_elements": tuple(sorted(self.ignore)),
        }


@dataclass(frozen=True, eq=False)
class _Evidence:
    """Step 1's result: the element maps with their thresholds, shapes (rows, cols, n_el) unless noted.

    Attributes
    ----------
    elements : tuple of str
        Elements of the maps (n_el).
    inten : numpy.ndarray
        Intensities, counts, 0 where not finite.
    thr : numpy.ndarray
        Thresholds, counts: detection limit raised by the trace/minor rules (inf where not finite).
    detected : numpy.ndarray
        ``inten > thr`` on valid pixels, bool.
    ratio : numpy.ndarray
        ``inten / thr`` clipped to [0, _SCORE_MAX], 0 on invalid pixels.
    valid : numpy.ndarray
        Shape (rows, cols), bool: pixels not masked.
    """

    elements: tuple[str, ...]
    inten: np.ndarray
    thr: np.ndarray
    detected: np.ndarray
    ratio: np.ndarray
    valid: np.ndarray

    @property
    def col_of(self) -> dict[str, int]:
        """Element -> its index in :attr:`elements`."""
        return {el: j for j, el in enumerate(self.elements)}


@dataclass(frozen=True)
class _Groups:
    """The library's ambiguity groups as the baseline assesses them.

    Attributes
    ----------
    classes : tuple of str
        Groups with key elements, not XRF-silent, in library order (K).
    members : Mapping[str, tuple[str, ...]]
        Group -> member pigments (all groups of the library).
    key_elements : Mapping[str, tuple[str, ...]]
        Group -> key elements in library order (all groups of the library).
    keys : Mapping[str, frozenset[str]]
        The same as sets, for the classes.
    explains : Mapping[str, frozenset[str]]
        Group -> every element it accounts for (key elements, compositions, associated elements).
    silent : tuple of str
        Pigments of the other groups (XRF cannot see them).
    colors : tuple of str
        Display colour per class.
    """

    classes: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]
    key_elements: Mapping[str, tuple[str, ...]]
    keys: Mapping[str, frozenset[str]]
    explains: Mapping[str, frozenset[str]]
    silent: tuple[str, ...]
    colors: tuple[str, ...]


def _settings(
    trace_elements: Sequence[str], trace_fraction: float, minor_fraction: float, map_fraction: float,
    map_quantile: float, nonspecific_elements: Sequence[str], ratio_coverage: float, excess_fraction: float,
    ignore_elements: Sequence[str],
) -> _Settings:
    """The parameters of :func:`assign_pigments_by_elements`, checked; FitError when one is out of range."""
    trace_fraction = _check_fraction("trace_fraction", trace_fraction)
    minor_fraction = _check_fraction("minor_fraction", minor_fraction)
    map_fraction = _check_fraction("map_fraction", map_fraction)
    ratio_coverage = float(ratio_coverage)
    if not 0.0 < ratio_coverage <= 1.0:
        raise FitError(f"ratio_coverage must be in (0, 1], got {ratio_coverage!r}")
    excess_fraction = _check_fraction("excess_fraction", excess_fraction)
    map_quantile = float(map_quantile)
    if not 0.0 < map_quantile <= 1.0:
        raise FitError(f"map_quantile must be in (0, 1], got {map_quantile!r}")
    return _Settings(
        trace=_symbols(trace_elements, "trace_elements"),
        trace_fraction=trace_fraction,
        minor_fraction=minor_fraction,
        map_fraction=map_fraction,
        map_quantile=map_quantile,
        nonspecific=_symbols(nonspecific_elements, "nonspecific_elements"),
        ratio_coverage=ratio_coverage,
        excess_fraction=excess_fraction,
        ignore=_symbols(ignore_elements, "ignore_elements"),
    )


def _read_maps(
    element_maps: ElementMaps, mask: np.ndarray | None
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Elements, intensity and detection limit (rows, cols, n_el) float64, and the valid pixels (rows, cols).

    FitError for an object without ``elements``, ``intensity`` and ``detection_limit``, mismatched shapes
    or a mask of the wrong shape.
    """
    try:
        elements = tuple(str(e) for e in element_maps.elements)
        intensity = np.asarray(element_maps.intensity, dtype=np.float64)
        dl = np.asarray(element_maps.detection_limit, dtype=np.float64)
    except AttributeError as exc:
        raise FitError(
            f"element_maps must be ElementMaps (from xrfnb.fit_elements); got {type(element_maps).__name__} "
            f"without {exc.name!r}"
        ) from None
    if intensity.ndim != 3 or intensity.shape[2] != len(elements) or dl.shape != intensity.shape:
        raise FitError(
            f"element maps must have intensity and detection_limit of shape (rows, cols, {len(elements)}); "
            f"got {intensity.shape} and {dl.shape}"
        )
    rows, cols = intensity.shape[:2]
    valid = np.ones((rows, cols), dtype=bool)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != (rows, cols):
            raise FitError(f"mask must have shape {(rows, cols)}, got {m.shape}")
        valid &= ~m
    return elements, intensity, dl, valid


def _element_evidence(
    elements: tuple[str, ...], intensity: np.ndarray, dl: np.ndarray, valid: np.ndarray, settings: _Settings
) -> _Evidence:
    """Step 1: where each element counts, and by how much it exceeds its threshold.

    The threshold is the detection limit, raised for trace elements to ``trace_fraction`` of the pixel's
    strongest element and ``map_fraction`` of the element's ``map_quantile`` over the valid pixels, and for
    every other element to ``minor_fraction`` of the pixel's strongest element.
    """
    rows, cols = intensity.shape[:2]
    finite = np.isfinite(intensity) & np.isfinite(dl)
    inten = np.where(finite, intensity, 0.0)
    thr = np.where(finite, np.maximum(dl, 0.0), np.inf)
    counted = [j for j, el in enumerate(elements) if el not in settings.ignore]
    strongest = inten[:, :, counted].max(axis=2) if counted else np.zeros((rows, cols))
    for j, el in enumerate(elements):
        if el not in settings.trace:
            thr[:, :, j] = np.maximum(thr[:, :, j], settings.minor_fraction * strongest)
            continue
        t = np.maximum(thr[:, :, j], settings.trace_fraction * strongest)
        ref_pixels = inten[:, :, j][valid & finite[:, :, j]]
        if ref_pixels.size:
            t = np.maximum(t, settings.map_fraction * float(np.quantile(ref_pixels, settings.map_quantile)))
        thr[:, :, j] = t
    detected = (inten > thr) & (inten > 0) & valid[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(thr > 0, inten / thr, np.where(inten > 0, _SCORE_MAX, 0.0))
    ratio = np.clip(np.nan_to_num(ratio, nan=0.0), 0.0, _SCORE_MAX)
    ratio[~valid] = 0.0
    return _Evidence(elements, inten, thr, detected, ratio, valid)


def _library_groups(lib: PigmentLibrary) -> _Groups:
    """The library's visible ambiguity groups, what each explains, and the XRF-silent pigments."""
    group_members = lib.groups()
    group_keys = lib.group_elements()
    classes = tuple(g for g in group_members if g != SILENT_GROUP and group_keys[g])
    silent = tuple(n for g in group_members if g not in classes for n in group_members[g])
    colors = tuple(lib[group_members[g][0]].color for g in classes)
    explains: dict[str, frozenset[str]] = {}
    for g in classes:
        s: set[str] = set(group_keys[g])
        for name in group_members[g]:
            p = lib[name]
            s.update(p.composition)
            s.update(p.associated)
        explains[g] = frozenset(s)
    keys = {g: frozenset(group_keys[g]) for g in classes}
    return _Groups(classes, group_members, group_keys, keys, explains, silent, colors)


def _references(
    reference_ratios: Mapping[str, Mapping[str, float]] | None, lib: PigmentLibrary, groups: _Groups,
) -> dict[str, dict[str, float]]:
    """Known pure-pigment intensity ratios per group (keys: group or pigment names), checked."""
    references: dict[str, dict[str, float]] = {}
    for name, values in (reference_ratios or {}).items():
        group = name if name in groups.classes else (lib[name].group if name in lib else None)
        if group not in groups.classes:
            raise FitError(f"reference_ratios: {name!r} is neither a pigment group nor a visible pigment")
        if not isinstance(values, Mapping):
            raise FitError(f"reference_ratios[{name!r}] must map elements to intensities, got {values!r}")
        ref = {str(e): float(v) for e, v in values.items()}
        missing = [e for e in groups.key_elements[group] if not (ref.get(e, 0.0) > 0 and np.isfinite(ref[e]))]
        if missing:
            raise FitError(
                f"reference_ratios[{name!r}] needs a positive intensity for each key element of {group!r}; "
                f"missing or invalid: {missing}"
            )
        references[group] = ref
    return references


class _PureRatios:
    """Step 3's estimate of how much of an element a larger group accounts for: ``I_e / I_f`` of the pure
    pigment, from ``references`` or the dominant ratio over the pixels where the group is indicated.

    ``present`` is the (rows, cols, K) array being filled group by group (larger groups first), read
    when a ratio is first asked for; estimates are cached per (group index, e, f).
    """

    def __init__(
        self, classes: tuple[str, ...], references: Mapping[str, Mapping[str, float]], present: np.ndarray,
        evidence: _Evidence, coverage: float,
    ) -> None:
        self.classes = classes
        self.references = references
        self.present = present
        self.inten = evidence.inten
        self.col_of = evidence.col_of
        self.coverage = coverage
        self._cache: dict[tuple[int, str, str], float] = {}

    def __call__(self, kb: int, e: str, f: str) -> float:
        """Dominant ``I_e / I_f`` over the pixels where group ``kb`` is indicated (inf if none)."""
        ref = self.references.get(self.classes[kb])
        if ref is not None:
            return ref[e] / ref[f]
        key = (kb, e, f)
        if key not in self._cache:
            where = self.present[:, :, kb]
            ie = self.inten[:, :, self.col_of[e]][where]
            jf = self.inten[:, :, self.col_of[f]][where]
            ok = jf > 0
            self._cache[key] = _dominant_ratio(ie[ok] / jf[ok], self.coverage) if ok.any() else np.inf
        return self._cache[key]


def _explainers(
    k: int, groups: _Groups, unassessable: Mapping[str, tuple[str, ...]], nonspecific: frozenset[str]
) -> list[int]:
    """Step 3: the groups that may explain group ``k`` away.

    Those whose key elements are a strict superset of group ``k``'s, that can be assessed, and that add at
    least one specific (not ``nonspecific``) element.
    """
    classes, keys = groups.classes, groups.keys[groups.classes[k]]
    return [
        kb
        for kb in range(len(classes))
        if groups.keys[classes[kb]] > keys
        and classes[kb] not in unassessable
        and (groups.keys[classes[kb]] - keys) - nonspecific
    ]


def _excess_score(
    keys: frozenset[str], explainers: list[int], groups: _Groups, evidence: _Evidence, present: np.ndarray,
    pure_ratio: _PureRatios, settings: _Settings,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: where larger groups explain a group away, and its key elements' excess over what they claim.

    Each indicated explainer claims, of every shared key element ``e``, the smallest of
    ``pure_ratio(e / f) * I_f`` over its own specific elements ``f``.

    Returns
    -------
    explained : numpy.ndarray
        Shape (rows, cols), bool: pixels where an explainer is indicated.
    excess : numpy.ndarray
        Shape (rows, cols): the weakest key element's excess over ``max(threshold, excess_fraction * I)``,
        clipped to [0, _SCORE_MAX] (meaningful where ``explained``).
    """
    rows, cols = present.shape[:2]
    inten, thr, col_of = evidence.inten, evidence.thr, evidence.col_of
    explained = np.zeros((rows, cols), dtype=bool)
    claimed = {e: np.zeros((rows, cols)) for e in keys}
    for kb in explainers:
        here = present[:, :, kb]
        if not here.any():
            continue
        explained |= here
        own = sorted((groups.keys[groups.classes[kb]] - keys) - settings.nonspecific)
        for e in keys:
            claim = np.full((rows, cols), np.inf)
            for f in own:
                claim = np.minimum(claim, pure_ratio(kb, e, f) * inten[:, :, col_of[f]])
            claimed[e] += np.where(here, claim, 0.0)
    if not explained.any():
        return explained, np.zeros((rows, cols))
    excess_scores = []
    for e in keys:
        j = col_of[e]
        residual = inten[:, :, j] - claimed[e]
        bar = np.maximum(thr[:, :, j], settings.excess_fraction * inten[:, :, j])
        with np.errstate(divide="ignore", invalid="ignore"):
            ex = np.where(bar > 0, residual / bar, np.where(residual > 0, _SCORE_MAX, 0.0))
        excess_scores.append(np.nan_to_num(ex, nan=0.0, neginf=0.0, posinf=_SCORE_MAX))
    return explained, np.clip(np.min(np.stack(excess_scores, axis=-1), axis=-1), 0.0, _SCORE_MAX)


def _indicate(
    groups: _Groups, evidence: _Evidence, unassessable: Mapping[str, tuple[str, ...]],
    references: Mapping[str, Mapping[str, float]], settings: _Settings,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2 and 3: score and present maps of every group, shape (rows, cols, K).

    A group's raw score is its weakest key element's ``intensity / threshold`` (co-location: all key
    elements in the same pixel); where larger groups are indicated it is at most the excess score
    (:func:`_excess_score`). Groups are decided largest key-element set first, so a group's explainers
    are decided before it.
    """
    classes, ratio, col_of, valid = groups.classes, evidence.ratio, evidence.col_of, evidence.valid
    rows, cols = valid.shape
    K = len(classes)
    score = np.zeros((rows, cols, K), dtype=np.float32)
    present = np.zeros((rows, cols, K), dtype=bool)
    pure_ratio = _PureRatios(classes, references, present, evidence, settings.ratio_coverage)
    for k in sorted(range(K), key=lambda k: -len(groups.keys[classes[k]])):
        g = classes[k]
        if g in unassessable:
            continue
        keys = groups.keys[g]
        raw = np.min(np.stack([ratio[:, :, col_of[e]] for e in keys], axis=-1), axis=-1)
        explainers = _explainers(k, groups, unassessable, settings.nonspecific)
        final = raw.copy()
        if explainers and (raw > 1.0).any():
            explained, excess = _excess_score(
                keys, explainers, groups, evidence, present, pure_ratio, settings
            )
            if explained.any():
                final = np.where(explained, np.minimum(raw, excess), raw)
        final32 = np.where(valid, final, 0.0).astype(np.float32)
        score[:, :, k] = final32
        present[:, :, k] = final32 > 1.0
    return score, present


def _mixtures(groups: _Groups) -> dict[str, tuple[tuple[str, str], ...]]:
    """Step 4: per group, the pairs of smaller groups whose mixture has the same key elements."""
    classes, keysets = groups.classes, groups.keys
    mixtures: dict[str, tuple[tuple[str, str], ...]] = {}
    for g in classes:
        pairs = [
            (a, b)
            for i, a in enumerate(classes)
            for b in classes[i + 1 :]
            if keysets[a] < keysets[g] and keysets[b] < keysets[g] and keysets[a] | keysets[b] == keysets[g]
        ]
        if pairs:
            mixtures[g] = tuple(pairs)
    return mixtures


def _unexplained(
    evidence: _Evidence, groups: _Groups, present: np.ndarray, ignore: frozenset[str]
) -> np.ndarray:
    """Step 5: detected elements that no indicated group explains, shape (rows, cols, n_el), bool."""
    unexplained = evidence.detected.copy()
    for j, el in enumerate(evidence.elements):
        if el in ignore:
            unexplained[:, :, j] = False
            continue
        for k, g in enumerate(groups.classes):
            if el in groups.explains[g]:
                unexplained[:, :, j] &= ~present[:, :, k]
    return unexplained


def assign_pigments_by_elements(
    element_maps: ElementMaps,
    pigments: PigmentLibrary | None = None,
    *,
    trace_elements: Sequence[str] = DEFAULT_TRACE_ELEMENTS,
    trace_fraction: float = 0.02,
    minor_fraction: float = 0.005,
    map_fraction: float = 0.05,
    map_quantile: float = 0.99,
    nonspecific_elements: Sequence[str] = DEFAULT_NONSPECIFIC_ELEMENTS,
    ratio_coverage: float = 0.5,
    excess_fraction: float = 0.2,
    ignore_elements: Sequence[str] = DEFAULT_IGNORE_ELEMENTS,
    reference_ratios: Mapping[str, Mapping[str, float]] | None = None,
    mask: np.ndarray | None = None,
) -> BaselineAssignment:
    """Indicate pigment groups from element maps, as an expert would.

    Parameters
    ----------
    element_maps : ElementMaps
        Fitted element maps (from :func:`xrfnb.fit_elements` or :func:`xrfnb.roi_maps`); any object with
        ``elements`` (n_el,), ``intensity`` and ``detection_limit`` of shape (rows, cols, n_el) in counts.
    pigments : PigmentLibrary, optional
        Library whose ambiguity groups are assessed; default :func:`xrfnb.pigments`.
    trace_elements : sequence of str
        Elements that grounds, dirt and clays bring at trace level. Such an element counts only where its
        intensity also reaches ``trace_fraction`` of the pixel's strongest element intensity and
        ``map_fraction`` of its own ``map_quantile`` over the map.
    trace_fraction : float
        See ``trace_elements`` (default 0.02).
    minor_fraction : float
        Any other element counts only where its intensity reaches this fraction of the pixel's strongest
        element intensity (default 0.005; 0 disables).
    map_fraction : float
        See ``trace_elements`` (default 0.05). Has no effect on a single spectrum.
    map_quantile : float
        Quantile of an element's intensity over valid pixels used as its map reference (default 0.99).
    nonspecific_elements : sequence of str
        Elements that do not make a group more specific than a group without them: a group with extra key
        elements only of this kind does not explain a smaller group away.
    ratio_coverage : float
        How much of a shared element a larger group accounts for is estimated from the intensity ratios it
        shows where it is indicated: the dominant ratio, the centre of the narrowest range of log ratios
        holding this fraction of those pixels (default 0.5, a "shorth" mode estimate). The assumption, as an
        expert's looking at a scatter plot, is that most of a pigment's pixels are the pigment unmixed with
        other pigments of the same elements. On a single spectrum the ratio is that spectrum's, so no
        excess can be seen: chrome yellow with some lead white reads as chrome yellow alone.
    excess_fraction : float
        An explained-away group is indicated again only where the excess of each of its key elements
        exceeds both the element's threshold and this fraction of its intensity (default 0.2).
    reference_ratios : mapping, optional
        Known relative intensities of a group's key elements in the pure pigment on this instrument,
        ``{"chrome yellow": {"Pb": 6.0, "Cr": 1.0}}`` (keys: group or pigment names; values: intensities in
        any common unit). They replace the dominant-ratio estimate, so excess can be seen on a single
        spectrum too. For a group whose members differ (chrome yellow / chrome orange), give the ratio of
        the member richest in the shared element to stay conservative.
    ignore_elements : sequence of str
        Elements never reported as unexplained (default: Ar from the air path).
    mask : numpy.ndarray, optional
        (rows, cols) bool, True for invalid pixels (dead, saturated): nothing is indicated there.

    Returns
    -------
    BaselineAssignment
        Per group score and boolean maps, alternatives, element evidence and unexplained elements.

    Raises
    ------
    FitError
        If the maps are malformed or a parameter is out of range.

    Notes
    -----
    Intensities of different elements are compared only within ``trace_fraction`` and ``minor_fraction``
    (deliberately low, sensitivity-agnostic bars) and as ratios of the same pair of elements across
    pixels, so the result does not depend on the overall count level: scaling all intensities and
    detection limits by one factor changes nothing.
    """
    lib = default_pigments() if pigments is None else pigments
    if not isinstance(lib, PigmentLibrary):
        raise FitError(f"pigments must be a PigmentLibrary (xrfnb.pigments()), got {type(lib).__name__}")
    settings = _settings(
        trace_elements, trace_fraction, minor_fraction, map_fraction, map_quantile, nonspecific_elements,
        ratio_coverage, excess_fraction, ignore_elements,
    )
    elements, intensity, dl, valid = _read_maps(element_maps, mask)
    # 1. element evidence
    evidence = _element_evidence(elements, intensity, dl, valid, settings)
    groups = _library_groups(lib)
    col_of = evidence.col_of
    unassessable = {
        g: tuple(e for e in groups.key_elements[g] if e not in col_of)
        for g in groups.classes
        if any(e not in col_of for e in groups.key_elements[g])
    }
    references = _references(reference_ratios, lib, groups)
    # 2. co-location and 3. parsimony
    score, present = _indicate(groups, evidence, unassessable, references, settings)
    # 4. ambiguity: alternatives and mixtures; 5. unexplained elements
    mixtures = _mixtures(groups)
    unexplained = _unexplained(evidence, groups, present, settings.ignore)
    detected = evidence.detected
    for a in (score, present, detected, unexplained):
        a.flags.writeable = False
    return BaselineAssignment(
        classes=groups.classes,
        score=score,
        present=present,
        alternatives=MappingProxyType({g: groups.members[g] for g in groups.classes}),
        group_elements=MappingProxyType({g: tuple(groups.key_elements[g]) for g in groups.classes}),
        colors=groups.colors,
        elements=elements,
        detected=detected,
        unexplained=unexplained,
        unassessable=MappingProxyType(unassessable),
        mixture_alternatives=MappingProxyType(mixtures),
        silent=groups.silent,
        parameters=MappingProxyType(settings.parameters()),
    )
