"""Paint layers and layered stacks (the samples the simulator computes).

A :class:`Layer` is a homogeneous mixture of pigments (names from the pigment library), elements
(``"Fe"``) or chemical formulas (``"Fe2O3"``, xraylib ``CompoundParser`` syntax) and, optionally, a
binder. A :class:`Stack` is a list of layers from the surface down, an optional ground and an
optional, infinitely thick substrate.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import xraylib

from .._errors import PigmentError, SimulationError, XRFNBError
from .pigments import PigmentLibrary, pigments

__all__ = ["DEFAULT_GROUND_THICKNESS_UM", "Layer", "Stack", "resolve_component"]

#: Thickness given to a ground named by a string (a typical chalk or gypsum ground, um).
DEFAULT_GROUND_THICKNESS_UM = 300.0

#: Tolerance on "weight fractions sum to 1".
FRACTION_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Component:
    """A resolved layer ingredient: name, composition (element -> weight fraction) and density."""

    name: str
    composition: Mapping[str, float]
    density_g_cm3: float | None
    kind: str  # "pigment", "binder", "element", "formula"


def _library() -> PigmentLibrary:
    """The default pigment library."""
    return pigments()


def _formula_composition(formula: str) -> dict[str, float] | None:
    try:
        parsed = xraylib.CompoundParser(formula)
    except (ValueError, TypeError):
        return None
    return {
        xraylib.AtomicNumberToSymbol(int(z)): float(w)
        for z, w in zip(parsed["Elements"], parsed["massFractions"], strict=True)
    }


@functools.lru_cache(maxsize=1024)
def resolve_component(name: str, *, binder: bool = False) -> Component:
    """Resolve a pigment name, binder name, element symbol or chemical formula.

    Order: the pigment library (names and aliases, case-insensitive; binders for ``binder=True``),
    then an element symbol, then an xraylib chemical formula.

    Raises
    ------
    PigmentError
        If the name is none of these; the message lists close pigment names.
    """
    if not isinstance(name, str) or not name.strip():
        raise PigmentError(f"a layer component must be a non-empty name, got {name!r}")
    key = name.strip()
    lib = _library()
    lib_error: XRFNBError | None = None
    if lib is not None:
        try:
            if binder:
                b = lib.binder(key)
                return Component(b.name, dict(b.composition), float(b.density_g_cm3), "binder")
            p = lib[key]
            return Component(p.name, dict(p.composition), float(p.density_g_cm3), "pigment")
        except XRFNBError as exc:
            lib_error = exc
        except KeyError as exc:  # pragma: no cover - library should raise PigmentError
            lib_error = PigmentError(str(exc))
    try:
        z = xraylib.SymbolToAtomicNumber(key)
    except ValueError:
        z = 0
    if 1 <= z <= 98:
        density = xraylib.ElementDensity(z)
        return Component(key, {key: 1.0}, float(density) if density > 0 else None, "element")
    comp = _formula_composition(key)
    if comp is not None:
        return Component(key, comp, None, "formula")
    if lib_error is not None:
        raise PigmentError(
            f"unknown {'binder' if binder else 'pigment'} {name!r}: not in the pigment library, not an "
            f"element symbol and not a chemical formula ({lib_error})") from None
    hint = ""
    if lib is not None:
        close = difflib.get_close_matches(key.lower(), [n.lower() for n in lib.names], n=3)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
    raise PigmentError(
        f"unknown {'binder' if binder else 'pigment'} {name!r}: not a library pigment, element symbol or "
        f"chemical formula{hint}")


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """One homogeneous layer of a painting (paint, ground, substrate) or any other material.

    Parameters
    ----------
    pigments : mapping of str to float
        Ingredient -> weight fraction *of the whole layer* (pigments plus binder). An ingredient is a
        pigment of the library (``"lead white"``), an element symbol (``"Fe"``) or a chemical formula
        (``"HgS"``), so a steel or a glass can be given by its elemental composition.
    binder : str or None
        Binder name (``"linseed oil"``, ``"egg tempera"``, ``"gum arabic"`` ... from the library), or
        ``None`` for a layer without binder.
    thickness_um : float
        Thickness in micrometres, > 0 (ignored for a substrate, which is infinitely thick).
    density_g_cm3 : float, optional
        Layer density. When not given it is the volume-additive mixture
        ``1 / rho = sum_i w_i / rho_i`` of the ingredient densities (pigment library densities, element
        densities from xraylib; a formula has no known density, so give one).
    binder_fraction : float, optional
        Weight fraction of the binder. When not given, the binder is the remainder
        ``1 - sum(pigments)``. Without a binder, or with an explicit ``binder_fraction``, all fractions
        must sum to 1.
    name : str, optional
        Free label.

    Attributes
    ----------
    composition : dict
        Element symbol -> weight fraction of the layer (sums to 1).

    Raises
    ------
    PigmentError
        Unknown pigment or binder.
    SimulationError
        Negative or non-finite fractions, fractions that do not sum to 1 (the message says by how
        much), non-positive thickness or density, or a missing density.
    """

    pigments: Mapping[str, float]
    binder: str | None = "linseed oil"
    thickness_um: float = 20.0
    density_g_cm3: float | None = None
    binder_fraction: float | None = None
    name: str = ""
    composition: Mapping[str, float] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        label = f"layer {self.name!r}" if self.name else "layer"
        if isinstance(self.pigments, str):
            object.__setattr__(self, "pigments", {self.pigments: 1.0})
        if not isinstance(self.pigments, Mapping) or not self.pigments:
            raise SimulationError(f"{label}: pigments must be a non-empty mapping name -> weight fraction")
        fractions: dict[str, float] = {}
        for key, value in self.pigments.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise SimulationError(
                    f"{label}: weight fraction of {key!r} must be a number, got {value!r}") from None
            if not math.isfinite(v) or v < 0:
                raise SimulationError(f"{label}: weight fraction of {key!r} must be finite and >= 0, got {v}")
            fractions[str(key)] = v
        object.__setattr__(self, "pigments", fractions)
        total = sum(fractions.values())
        bf = self.binder_fraction
        if self.binder is not None and bf is None:
            bf = 1.0 - total
            if bf < -FRACTION_TOLERANCE:
                raise SimulationError(
                    f"{label}: pigment weight fractions sum to {total:.4g}, exceeding 1 by {total - 1:.4g} "
                    f"(they are fractions of the whole layer, the binder {self.binder!r} fills the rest)")
            bf = max(bf, 0.0)
        elif self.binder is not None:
            bf = float(bf)
            if not math.isfinite(bf) or bf < 0:
                raise SimulationError(f"{label}: binder_fraction must be finite and >= 0, got {bf}")
            if abs(total + bf - 1) > FRACTION_TOLERANCE:
                raise SimulationError(
                    f"{label}: pigment ({total:.4g}) and binder ({bf:.4g}) weight fractions sum to "
                    f"{total + bf:.4g}, off 1 by {total + bf - 1:+.4g}")
        else:
            if bf not in (None, 0, 0.0):
                raise SimulationError(f"{label}: binder_fraction={bf} given without a binder")
            bf = 0.0
            if abs(total - 1) > FRACTION_TOLERANCE:
                raise SimulationError(
                    f"{label}: weight fractions sum to {total:.4g}, off 1 by {total - 1:+.4g} (without a "
                    "binder they must sum to 1)")
        object.__setattr__(self, "binder_fraction", float(bf))
        try:
            t = float(self.thickness_um)
        except (TypeError, ValueError):
            raise SimulationError(
                f"{label}: thickness_um must be a number, got {self.thickness_um!r}") from None
        if not (t > 0) or math.isnan(t):
            raise SimulationError(f"{label}: thickness must be > 0 um, got {t}")
        object.__setattr__(self, "thickness_um", t)

        parts: list[tuple[Component, float]] = [(resolve_component(k), v) for k, v in fractions.items()]
        if self.binder is not None and bf > 0:
            parts.append((resolve_component(self.binder, binder=True), bf))
        norm = sum(w for _, w in parts)
        comp: dict[str, float] = {}
        for c, w in parts:
            for el, f in c.composition.items():
                comp[el] = comp.get(el, 0.0) + w / norm * f
        object.__setattr__(self, "composition", {k: v for k, v in comp.items() if v > 0})

        if self.density_g_cm3 is None:
            missing = [c.name for c, w in parts if w > 0 and not c.density_g_cm3]
            if missing:
                raise SimulationError(
                    f"{label}: no density known for {', '.join(map(repr, missing))}; pass density_g_cm3")
            inv = sum(w / norm / c.density_g_cm3 for c, w in parts if w > 0)
            density = 1.0 / inv
        else:
            try:
                density = float(self.density_g_cm3)
            except (TypeError, ValueError):
                raise SimulationError(f"{label}: density_g_cm3 must be a number") from None
        if not (density > 0) or not math.isfinite(density):
            raise SimulationError(f"{label}: density must be finite and > 0 g/cm3, got {density}")
        object.__setattr__(self, "density_g_cm3", density)

    @property
    def mass_thickness_g_cm2(self) -> float:
        """Areal density ``rho * t`` in g/cm^2."""
        return self.density_g_cm3 * self.thickness_um * 1e-4

    @property
    def elements(self) -> tuple[str, ...]:
        """Element symbols present, heaviest first."""
        return tuple(sorted(self.composition, key=lambda s: -xraylib.SymbolToAtomicNumber(s)))

    def with_thickness(self, thickness_um: float) -> Layer:
        """The same layer (same composition and density) with another thickness."""
        return dataclasses.replace(self, thickness_um=thickness_um)

    def __repr__(self) -> str:
        pig = ", ".join(f"{k}: {v:g}" for k, v in self.pigments.items())
        b = f", binder={self.binder!r} ({self.binder_fraction:.3g})" if self.binder else ""
        return f"Layer({{{pig}}}{b}, {self.thickness_um:g} um, {self.density_g_cm3:.3g} g/cm3)"


def _as_layer(value: Layer | str | Mapping[str, float], thickness_um: float, what: str) -> Layer:
    if isinstance(value, Layer):
        return value
    if isinstance(value, str):
        return Layer({value: 1.0}, binder=None, thickness_um=thickness_um, name=what)
    if isinstance(value, Mapping):
        return Layer(dict(value), binder=None, thickness_um=thickness_um, name=what)
    raise SimulationError(
        f"{what} must be a Layer, a pigment/material name or a composition, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class Stack:
    """A layered sample: paint layers from the surface down, a ground and a substrate.

    Parameters
    ----------
    layers : sequence of Layer
        Paint layers, top (facing the instrument) first.
    ground : Layer or str, optional
        Preparation layer below the paint: a :class:`Layer`, or a pigment name (``"chalk"``,
        ``"gypsum"``, ``"lead white"``) used pure at :data:`DEFAULT_GROUND_THICKNESS_UM`.
    substrate : Layer or str or mapping, optional
        Support below everything, treated as infinitely thick (its thickness is ignored). ``None``:
        nothing below (radiation that passes the last layer is lost).

    Attributes
    ----------
    all_layers : tuple of Layer
        ``layers``, then the ground, then the substrate: the layer index used in results.
    """

    layers: Sequence[Layer]
    ground: Layer | str | None = None
    substrate: Layer | str | Mapping[str, float] | None = None
    all_layers: tuple[Layer, ...] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.layers, Layer):
            object.__setattr__(self, "layers", (self.layers,))
        layers = tuple(self.layers)
        if not all(isinstance(x, Layer) for x in layers):
            raise SimulationError("Stack layers must be Layer objects (top first)")
        ground = None if self.ground is None else _as_layer(
            self.ground, DEFAULT_GROUND_THICKNESS_UM, "ground")
        substrate = None if self.substrate is None else _as_layer(self.substrate, 1e4, "substrate")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "ground", ground)
        object.__setattr__(self, "substrate", substrate)
        all_layers = layers + tuple(x for x in (ground, substrate) if x is not None)
        if not all_layers:
            raise SimulationError("a Stack needs at least one layer, a ground or a substrate")
        object.__setattr__(self, "all_layers", all_layers)

    @property
    def mass_thickness_g_cm2(self) -> np.ndarray:
        """Areal density of every layer of :attr:`all_layers`, g/cm^2 (``inf`` for the substrate)."""
        mt = np.array([x.mass_thickness_g_cm2 for x in self.all_layers])
        if self.substrate is not None:
            mt[-1] = np.inf
        return mt

    @property
    def elements(self) -> tuple[str, ...]:
        """All element symbols present in any layer, heaviest first."""
        els = {el for layer in self.all_layers for el in layer.composition}
        return tuple(sorted(els, key=lambda s: -xraylib.SymbolToAtomicNumber(s)))

    def layer_label(self, index: int) -> str:
        """A readable label of layer ``index`` of :attr:`all_layers`."""
        n = len(self.layers)
        if index < n:
            return f"layer {index}" + (f" ({self.layers[index].name})" if self.layers[index].name else "")
        if self.ground is not None and index == n:
            return "ground"
        return "substrate"

    def __len__(self) -> int:
        return len(self.all_layers)
