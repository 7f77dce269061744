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
from typing import Any

import numpy as np

from .._errors import FitError, PigmentError
from ..physics.pigments import SILENT_GROUP, PigmentLibrary
from ..physics.pigments import pigments as default_pigments

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
    parameters : Mapping[str, Any]
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
    parameters: Mapping[str, Any] = field(default_factory=dict)

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
    v = float(value)
    if not (np.isfinite(v) and 0.0 <= v < 1.0):
        raise FitError(f"{name} must be in [0, 1), got {value!r}")
    return v


def _symbols(values: Sequence[str], name: str) -> frozenset[str]:
    if isinstance(values, str):
        raise FitError(f"{name} must be a sequence of element symbols, got the string {values!r}")
    return frozenset(str(v).strip() for v in values)


def assign_pigments_by_elements(
    element_maps: Any,
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
    trace = _symbols(trace_elements, "trace_elements")
    nonspecific = _symbols(nonspecific_elements, "nonspecific_elements")
    ignore = _symbols(ignore_elements, "ignore_elements")

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

    # ---- 1. element evidence
    finite = np.isfinite(intensity) & np.isfinite(dl)
    inten = np.where(finite, intensity, 0.0)
    thr = np.where(finite, np.maximum(dl, 0.0), np.inf)
    counted = [j for j, el in enumerate(elements) if el not in ignore]
    strongest = inten[:, :, counted].max(axis=2) if counted else np.zeros((rows, cols))
    for j, el in enumerate(elements):
        if el not in trace:
            thr[:, :, j] = np.maximum(thr[:, :, j], minor_fraction * strongest)
            continue
        t = np.maximum(thr[:, :, j], trace_fraction * strongest)
        ref_pixels = inten[:, :, j][valid & finite[:, :, j]]
        if ref_pixels.size:
            t = np.maximum(t, map_fraction * float(np.quantile(ref_pixels, map_quantile)))
        thr[:, :, j] = t
    detected = (inten > thr) & (inten > 0) & valid[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(thr > 0, inten / thr, np.where(inten > 0, _SCORE_MAX, 0.0))
    ratio = np.clip(np.nan_to_num(ratio, nan=0.0), 0.0, _SCORE_MAX)
    ratio[~valid] = 0.0
    col_of = {el: j for j, el in enumerate(elements)}

    # ---- groups of the library
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
    unassessable = {
        g: tuple(e for e in group_keys[g] if e not in col_of)
        for g in classes
        if any(e not in col_of for e in group_keys[g])
    }

    references: dict[str, dict[str, float]] = {}
    for name, values in (reference_ratios or {}).items():
        group = name if name in classes else (lib[name].group if name in lib else None)
        if group not in classes:
            raise FitError(f"reference_ratios: {name!r} is neither a pigment group nor a visible pigment")
        if not isinstance(values, Mapping):
            raise FitError(f"reference_ratios[{name!r}] must map elements to intensities, got {values!r}")
        ref = {str(e): float(v) for e, v in values.items()}
        missing = [e for e in group_keys[group] if not (ref.get(e, 0.0) > 0 and np.isfinite(ref[e]))]
        if missing:
            raise FitError(
                f"reference_ratios[{name!r}] needs a positive intensity for each key element of {group!r}; "
                f"missing or invalid: {missing}"
            )
        references[group] = ref

    K = len(classes)
    score = np.zeros((rows, cols, K), dtype=np.float32)
    present = np.zeros((rows, cols, K), dtype=bool)
    keysets = {g: frozenset(group_keys[g]) for g in classes}
    # largest key-element sets first, so a group's explainers are decided before it
    order = sorted(range(K), key=lambda k: -len(keysets[classes[k]]))
    ratio_cache: dict[tuple[int, str, str], float] = {}

    def pure_ratio(kb: int, e: str, f: str) -> float:
        """Dominant I_e / I_f over pixels where group kb is indicated."""
        key = (kb, e, f)
        ref = references.get(classes[kb])
        if ref is not None:
            return ref[e] / ref[f]
        if key not in ratio_cache:
            where = present[:, :, kb]
            ie = inten[:, :, col_of[e]][where]
            jf = inten[:, :, col_of[f]][where]
            ok = jf > 0
            ratio_cache[key] = _dominant_ratio(ie[ok] / jf[ok], ratio_coverage) if ok.any() else np.inf
        return ratio_cache[key]

    for k in order:
        g = classes[k]
        if g in unassessable:
            continue
        keys = keysets[g]
        raw = np.min(np.stack([ratio[:, :, col_of[e]] for e in keys], axis=-1), axis=-1)
        candidate = raw > 1.0
        explainers = [
            kb
            for kb in range(K)
            if keysets[classes[kb]] > keys
            and classes[kb] not in unassessable
            and (keysets[classes[kb]] - keys) - nonspecific
        ]
        final = raw.copy()
        if explainers and candidate.any():
            explained = np.zeros((rows, cols), dtype=bool)
            claimed = {e: np.zeros((rows, cols)) for e in keys}
            for kb in explainers:
                here = present[:, :, kb]
                if not here.any():
                    continue
                explained |= here
                own = sorted((keysets[classes[kb]] - keys) - nonspecific)
                for e in keys:
                    claim = np.full((rows, cols), np.inf)
                    for f in own:
                        claim = np.minimum(claim, pure_ratio(kb, e, f) * inten[:, :, col_of[f]])
                    claimed[e] += np.where(here, claim, 0.0)
            if explained.any():
                excess_scores = []
                for e in keys:
                    j = col_of[e]
                    residual = inten[:, :, j] - claimed[e]
                    bar = np.maximum(thr[:, :, j], excess_fraction * inten[:, :, j])
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ex = np.where(bar > 0, residual / bar, np.where(residual > 0, _SCORE_MAX, 0.0))
                    excess_scores.append(np.nan_to_num(ex, nan=0.0, neginf=0.0, posinf=_SCORE_MAX))
                excess = np.clip(np.min(np.stack(excess_scores, axis=-1), axis=-1), 0.0, _SCORE_MAX)
                final = np.where(explained, np.minimum(raw, excess), raw)
        final32 = np.where(valid, final, 0.0).astype(np.float32)
        score[:, :, k] = final32
        present[:, :, k] = final32 > 1.0

    # ---- unexplained elements
    unexplained = detected.copy()
    for j, el in enumerate(elements):
        if el in ignore:
            unexplained[:, :, j] = False
            continue
        for k, g in enumerate(classes):
            if el in explains[g]:
                unexplained[:, :, j] &= ~present[:, :, k]

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

    params = {
        "trace_elements": tuple(sorted(trace)),
        "trace_fraction": trace_fraction,
        "minor_fraction": minor_fraction,
        "map_fraction": map_fraction,
        "map_quantile": map_quantile,
        "nonspecific_elements": tuple(sorted(nonspecific)),
        "ratio_coverage": ratio_coverage,
        "excess_fraction": excess_fraction,
        "ignore_elements": tuple(sorted(ignore)),
    }
    for a in (score, present, detected, unexplained):
        a.flags.writeable = False
    return BaselineAssignment(
        classes=classes,
        score=score,
        present=present,
        alternatives=MappingProxyType({g: group_members[g] for g in classes}),
        group_elements=MappingProxyType({g: tuple(group_keys[g]) for g in classes}),
        colors=colors,
        elements=elements,
        detected=detected,
        unexplained=unexplained,
        unassessable=MappingProxyType(unassessable),
        mixture_alternatives=MappingProxyType(mixtures),
        silent=silent,
        parameters=MappingProxyType(params),
    )
