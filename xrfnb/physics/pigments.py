"""The pigment library: historical pigments and binders with compositions, densities and XRF signatures.

The table itself is data (``xrfnb/data/pigments.toml``); this module reads and validates it. Every
composition is derived from the pigment's chemical formula by xraylib's ``CompoundParser``, so weight
fractions always sum to one and agree with xraylib's atomic weights.

Ambiguity groups
----------------
Element maps cannot tell apart pigments whose key XRF-detectable elements are the same (lead white, red
lead and massicot are all "Pb"). Such pigments share one *ambiguity group*. Groups are a function of the
key-element sets; the data file names them (so names are stable and readable) and the library checks that
the names agree with the partition computed from the elements. User pigments without a ``group`` join the
group of their key-element set, or form a new one named after the pigment.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any

import xraylib

from .._errors import PigmentError

__all__ = [
    "Binder",
    "CompositionVariants",
    "Pigment",
    "PigmentLibrary",
    "VariantComponent",
    "composition_from_formula",
    "pigments",
]

#: Group name of pigments XRF cannot see at all (no key elements).
SILENT_GROUP = "XRF-silent"

_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
_PIGMENT_REQUIRED = ("name", "density_g_cm3")
_PIGMENT_FIELDS = frozenset(
    {
        "name",
        "aliases",
        "formula",
        "composition",
        "density_g_cm3",
        "elements",
        "associated",
        "period",
        "color",
        "notes",
        "xrf_silent",
        "group",
        "variant",
        "variant_balance",
    }
)
_BINDER_FIELDS = frozenset({"name", "aliases", "formula", "composition", "density_g_cm3", "notes"})
_DEFAULT_COLOR = "#808080"


@dataclass(frozen=True)
class Pigment:
    """One pigment of the library.

    Attributes
    ----------
    name : str
        Canonical name, lower case (``"lead white"``).
    aliases : tuple of str
        Other names, lower case; lookups accept them.
    formula : str
        Chemical formula in xraylib ``CompoundParser`` syntax. Pigments defined by a composition are given
        an equivalent formula with fractional subscripts.
    composition : Mapping[str, float]
        Element symbol -> weight fraction (sums to 1), from xraylib.
    density_g_cm3 : float
        Particle density in g/cm3.
    elements : tuple of str
        Key XRF-detectable elements (Z >= 11) that an expert requires to indicate the pigment; empty for
        XRF-silent pigments.
    period : str
        Period of use.
    color : str
        Display colour ``"#rrggbb"``.
    notes : str
        Free text: composition assumptions, density range, overlaps.
    xrf_silent : bool
        True where XRF sees nothing characteristic (organic lakes, carbon black).
    group : str
        Ambiguity group: pigments XRF cannot tell apart on elements share one group name.
    associated : tuple of str
        Elements often found with the pigment (impurities, substrates); not required for identification.
    source : str
        Where the row came from (``"xrfnb"`` or a user file path).
    variants : CompositionVariants or None
        The range of real compositions (natural earths, stoichiometries, impurities), each range with its
        source; None: the formula only. Training data may draw from it
        (:class:`xrfnb.model.trainingdata.DataConfig` ``composition_variant_prob``).
    """

    name: str
    aliases: tuple[str, ...]
    formula: str
    composition: Mapping[str, float]
    density_g_cm3: float
    elements: tuple[str, ...]
    period: str
    color: str
    notes: str
    xrf_silent: bool
    group: str
    associated: tuple[str, ...] = ()
    source: str = field(default="xrfnb", compare=False)
    variants: CompositionVariants | None = None

    def __hash__(self) -> int:
        return hash((self.name, self.formula, self.elements, self.group))

    def weight_fraction(self, element: str) -> float:
        """Weight fraction of ``element`` in the pigment (0.0 if absent)."""
        return float(self.composition.get(element, 0.0))


@dataclass(frozen=True)
class VariantComponent:
    """One constituent of a pigment's composition variants, with its range and where the range comes from.

    Attributes
    ----------
    formula : str
        Chemical formula (xraylib ``CompoundParser`` syntax), e.g. ``"K2O"`` or ``"PbCO3"``.
    composition : Mapping[str, float]
        Element symbol -> weight fraction of the constituent (sums to 1).
    wt_range : (float, float)
        Range of the constituent's weight fraction in the pigment, drawn uniformly.
    source : str
        The data sheet or publication the range comes from.
    """

    formula: str
    composition: Mapping[str, float]
    wt_range: tuple[float, float]
    source: str


@dataclass(frozen=True)
class CompositionVariants:
    """The compositions a pigment takes in real paints: constituents in ranges, the balance the rest.

    A variant is ``sum_i w_i * c_i + (1 - sum_i w_i) * c_balance`` with every ``w_i`` uniform in its
    component's ``wt_range`` (drawn again while ``sum_i w_i > 1``), so its weight fractions sum to one and
    every constituent stays within its stated range. The pigment's formula is its nominal composition;
    variants replace it only where training asks for them.

    Attributes
    ----------
    balance : str
        Formula of the constituent that makes up the rest (e.g. kaolinite in an ochre, cerussite's partner
        hydrocerussite in lead white).
    balance_composition : Mapping[str, float]
        Its weight fractions.
    components : tuple of VariantComponent
    """

    balance: str
    balance_composition: Mapping[str, float]
    components: tuple[VariantComponent, ...]

    #: redraws before the lower ends are taken (a table whose lower ends sum to <= 1 always has a draw)
    MAX_TRIES = 100

    @property
    def elements(self) -> tuple[str, ...]:
        """Every element of the balance and the components, in increasing atomic number."""
        found = set(self.balance_composition)
        for c in self.components:
            found |= set(c.composition)
        return tuple(sorted(found, key=_atomic_number))

    def draw_weights(self, rng: Any) -> tuple[float, ...]:
        """Weight fractions of the components (the balance is 1 minus their sum), drawn from ``rng``.

        Parameters
        ----------
        rng : numpy.random.Generator

        Returns
        -------
        tuple of float
            One weight per component, each within its ``wt_range``, summing to at most 1.
        """
        lo = [c.wt_range[0] for c in self.components]
        hi = [c.wt_range[1] for c in self.components]
        for _ in range(self.MAX_TRIES):
            w = tuple(float(x) for x in rng.uniform(lo, hi))
            if math.fsum(w) <= 1.0:
                return w
        return tuple(lo)

    def composition(self, weights: Sequence[float]) -> dict[str, float]:
        """Element weight fractions of the variant with component weights ``weights`` (sums to 1)."""
        if len(weights) != len(self.components):
            raise PigmentError(f"expected {len(self.components)} component weights, got {len(weights)}")
        rest = 1.0 - math.fsum(weights)
        if rest < -1e-12:
            raise PigmentError(f"component weights sum to {1 - rest:.4f} > 1")
        out: dict[str, float] = {}
        for el, f in self.balance_composition.items():
            out[el] = out.get(el, 0.0) + max(rest, 0.0) * f
        for c, w in zip(self.components, weights, strict=True):
            for el, f in c.composition.items():
                out[el] = out.get(el, 0.0) + w * f
        return out

    def element_range(self, element: str) -> tuple[float, float]:
        """Least and most weight fraction of ``element`` over all variants (bounds of the linear map over
        the box of component ranges, the balance taking the rest)."""
        b = float(self.balance_composition.get(element, 0.0))
        lo = hi = b
        for c in self.components:
            d = float(c.composition.get(element, 0.0)) - b  # per unit weight moved from the balance to c
            lo += min(d * c.wt_range[0], d * c.wt_range[1])
            hi += max(d * c.wt_range[0], d * c.wt_range[1])
        return max(lo, 0.0), min(hi, 1.0)


@dataclass(frozen=True)
class Binder:
    """A paint binding medium.

    Attributes
    ----------
    name : str
        Canonical name, lower case (``"linseed oil"``).
    aliases : tuple of str
        Other names.
    formula : str
        Representative formula in xraylib ``CompoundParser`` syntax.
    composition : Mapping[str, float]
        Element symbol -> weight fraction (sums to 1).
    density_g_cm3 : float
        Density in g/cm3.
    notes : str
        Free text.
    """

    name: str
    aliases: tuple[str, ...]
    formula: str
    composition: Mapping[str, float]
    density_g_cm3: float
    notes: str = ""

    def __hash__(self) -> int:
        return hash((self.name, self.formula))


def composition_from_formula(formula: str) -> dict[str, float]:
    """Weight fractions of a chemical formula, from xraylib.

    Parameters
    ----------
    formula : str
        Formula in xraylib ``CompoundParser`` syntax (``"(PbCO3)2Pb(OH)2"``, ``"CdS0.5Se0.5"``).

    Returns
    -------
    dict of str to float
        Element symbol -> weight fraction, in increasing atomic number; sums to 1.

    Raises
    ------
    PigmentError
        If xraylib cannot parse the formula.
    """
    if not isinstance(formula, str) or not formula.strip():
        raise PigmentError("empty chemical formula")
    try:
        parsed = xraylib.CompoundParser(formula.strip())
    except ValueError as exc:
        raise PigmentError(f"cannot parse formula {formula!r}: {exc}") from None
    total = float(sum(parsed["massFractions"]))
    return {
        xraylib.AtomicNumberToSymbol(int(z)): float(w) / total
        for z, w in zip(parsed["Elements"], parsed["massFractions"], strict=True)
    }


def _formula_from_composition(composition: Mapping[str, float]) -> str:
    """A CompoundParser formula whose weight fractions equal ``composition`` (atoms = w / A)."""
    parts = []
    for symbol, fraction in composition.items():
        atoms = fraction / xraylib.AtomicWeight(xraylib.SymbolToAtomicNumber(symbol))
        parts.append(f"{symbol}{atoms * 1000:.8g}")
    return "".join(parts)


def _atomic_number(symbol: str) -> int:
    try:
        z = xraylib.SymbolToAtomicNumber(symbol)
    except ValueError:
        return 0
    return int(z)


class _Row:
    """Error context for one table row: file and row number."""

    def __init__(self, source: str, index: int, kind: str, raw: Mapping[str, Any]):
        self.source = source
        self.index = index
        self.kind = kind
        name = raw.get("name")
        self.label = f"{source}, {kind} row {index}" + (f" ({name!r})" if name else "")

    def error(self, message: str) -> PigmentError:
        return PigmentError(f"{self.label}: {message}")


def _as_str_tuple(value: Any, row: _Row, key: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items = [v.strip() for v in re.split(r"[;,]", value)]
    elif isinstance(value, Sequence):
        items = [str(v).strip() if isinstance(v, str) else v for v in value]
    else:
        raise row.error(f"field {key!r} must be a list of strings, got {value!r}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise row.error(f"field {key!r} must contain strings, got {item!r}")
        if item:
            out.append(item)
    return tuple(out)


def _element_tuple(value: Any, row: _Row, key: str) -> tuple[str, ...]:
    symbols = _as_str_tuple(value, row, key)
    out = []
    for s in symbols:
        sym = s[:1].upper() + s[1:].lower()
        if _atomic_number(sym) == 0:
            raise row.error(f"unknown element {s!r} in {key!r}: use chemical symbols such as 'Pb', 'Fe'")
        if sym in out:
            raise row.error(f"element {sym!r} listed twice in {key!r}")
        out.append(sym)
    return tuple(out)


def _as_float(value: Any, row: _Row, key: str) -> float:
    if isinstance(value, bool):
        raise row.error(f"field {key!r} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise row.error(f"field {key!r} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise row.error(f"field {key!r} must be finite, got {value!r}")
    return x


def _as_bool(value: Any, row: _Row, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "yes", "1", "y"):
            return True
        if v in ("false", "no", "0", "n", ""):
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise row.error(f"field {key!r} must be true or false, got {value!r}")


def _parse_composition(value: Any, row: _Row) -> dict[str, float]:
    """Composition given explicitly: TOML table or CSV text ``"Fe:0.7;O:0.3"``; must sum to 1 (+-1 %)."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for part in re.split(r"[;,]", value):
            part = part.strip()
            if not part:
                continue
            if ":" not in part and "=" not in part:
                raise row.error(f"cannot read composition item {part!r}: write 'Fe:0.7;O:0.3'")
            sym, frac = re.split(r"[:=]", part, maxsplit=1)
            pairs[sym.strip()] = frac.strip()
        value = pairs
    if not isinstance(value, Mapping) or not value:
        raise row.error(f"field 'composition' must map element symbols to weight fractions, got {value!r}")
    comp: dict[str, float] = {}
    for sym, frac in value.items():
        symbol = str(sym).strip()
        symbol = symbol[:1].upper() + symbol[1:].lower()
        if _atomic_number(symbol) == 0:
            raise row.error(f"unknown element {sym!r} in composition")
        w = _as_float(frac, row, f"composition[{sym}]")
        if not 0.0 < w <= 1.0:
            raise row.error(f"weight fraction of {symbol} must be in (0, 1], got {w}")
        comp[symbol] = comp.get(symbol, 0.0) + w
    total = sum(comp.values())
    if abs(total - 1.0) > 0.01:
        raise row.error(f"composition weight fractions sum to {total:.4f}, not 1 (tolerance 0.01)")
    return {k: v / total for k, v in comp.items()}


def _formula_and_composition(raw: Mapping[str, Any], row: _Row) -> tuple[str, dict[str, float]]:
    formula = raw.get("formula")
    composition = raw.get("composition")
    if formula not in (None, ""):
        if not isinstance(formula, str):
            raise row.error(f"field 'formula' must be a string, got {formula!r}")
        try:
            comp = composition_from_formula(formula)
        except PigmentError as exc:
            raise row.error(str(exc)) from None
        if composition not in (None, ""):
            given = _parse_composition(composition, row)
            for el in set(given) | set(comp):
                if abs(given.get(el, 0.0) - comp.get(el, 0.0)) > 0.01:
                    raise row.error(
                        f"composition disagrees with formula {formula!r} for {el}: "
                        f"{given.get(el, 0.0):.4f} given, {comp.get(el, 0.0):.4f} from the formula"
                    )
        return formula.strip(), comp
    if composition not in (None, ""):
        comp = _parse_composition(composition, row)
        formula_text = _formula_from_composition(comp)
        return formula_text, composition_from_formula(formula_text)
    raise row.error("missing field 'formula' (or 'composition')")


def _check_unknown_fields(raw: Mapping[str, Any], allowed: frozenset[str], row: _Row) -> None:
    unknown = sorted(k for k in raw if k not in allowed and raw[k] not in (None, ""))
    if unknown:
        raise row.error(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _parse_variants(
    raw: Mapping[str, Any], row: _Row, elements: tuple[str, ...]
) -> CompositionVariants | None:
    """The ``variant_balance`` and ``[[pigment.variant]]`` tables of a row (None: the row has none)."""
    items = raw.get("variant")
    balance = raw.get("variant_balance")
    if items in (None, "", []) and balance in (None, ""):
        return None
    if not isinstance(items, list) or not items or not all(isinstance(i, Mapping) for i in items):
        raise row.error("'variant' must be a list of [[pigment.variant]] tables (TOML only)")
    if not isinstance(balance, str) or not balance.strip():
        raise row.error("composition variants need 'variant_balance', the formula that makes up the rest")
    try:
        balance_comp = composition_from_formula(balance)
    except PigmentError as exc:
        raise row.error(f"variant_balance: {exc}") from None
    components = []
    for i, item in enumerate(items, start=1):
        where = f"variant {i}"
        unknown = sorted(set(item) - {"formula", "wt", "source"})
        if unknown:
            raise row.error(f"{where}: unknown field(s) {unknown}; allowed: formula, wt, source")
        formula = item.get("formula")
        if not isinstance(formula, str) or not formula.strip():
            raise row.error(f"{where}: missing 'formula'")
        try:
            comp = composition_from_formula(formula)
        except PigmentError as exc:
            raise row.error(f"{where}: {exc}") from None
        wt = item.get("wt")
        if not isinstance(wt, Sequence) or isinstance(wt, str) or len(wt) != 2:
            raise row.error(f"{where} ({formula}): 'wt' must be [low, high] weight fractions, got {wt!r}")
        lo, hi = (_as_float(v, row, f"{where} wt") for v in wt)
        if not 0.0 <= lo <= hi <= 1.0:
            raise row.error(f"{where} ({formula}): 'wt' must satisfy 0 <= low <= high <= 1, got {list(wt)}")
        source = item.get("source")
        if not isinstance(source, str) or not source.strip():
            raise row.error(f"{where} ({formula}): every range needs a 'source' (data sheet or publication)")
        components.append(VariantComponent(formula.strip(), MappingProxyType(comp), (lo, hi), source.strip()))
    variants = CompositionVariants(balance.strip(), MappingProxyType(balance_comp), tuple(components))
    if math.fsum(c.wt_range[0] for c in components) > 1.0:
        raise row.error("the variants' lower weight fractions sum to more than 1")
    for el in elements:
        if variants.element_range(el)[0] <= 0.0:
            raise row.error(f"a composition variant can lose the key element {el!r}")
    return variants


def _pigment_from_row(raw: Mapping[str, Any], row: _Row, *, strict: bool) -> Pigment:
    _check_unknown_fields(raw, _PIGMENT_FIELDS, row)
    required = _PIGMENT_REQUIRED
    if strict:
        required = (*required, "formula", "elements", "period", "color", "notes", "xrf_silent", "group")
    for key in required:
        if key not in raw or raw[key] is None or (isinstance(raw[key], str) and not raw[key].strip()):
            if key == "elements" and key in raw and raw.get("xrf_silent") in (True, "true", "True"):
                continue
            raise row.error(f"missing field {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise row.error(f"field 'name' must be a non-empty string, got {name!r}")
    name = " ".join(name.strip().lower().split())
    formula, composition = _formula_and_composition(raw, row)
    density = _as_float(raw["density_g_cm3"], row, "density_g_cm3")
    if not 0.1 <= density <= 25.0:
        raise row.error(f"density_g_cm3 = {density} is not a plausible pigment density (0.1-25 g/cm3)")
    xrf_silent = _as_bool(raw.get("xrf_silent", False), row, "xrf_silent")
    if "elements" not in raw and not xrf_silent:
        raise row.error("missing field 'elements' (key XRF-detectable elements; or set xrf_silent = true)")
    elements = _element_tuple(raw.get("elements"), row, "elements")
    for el in elements:
        if _atomic_number(el) < 11:
            raise row.error(
                f"key element {el!r} has Z < 11 and is not XRF-detectable; list it in 'associated'"
            )
        if el not in composition:
            raise row.error(f"key element {el!r} is not in the formula/composition {formula!r}")
    if xrf_silent and elements:
        raise row.error(f"xrf_silent pigment lists key elements {list(elements)}; leave 'elements' empty")
    if not xrf_silent and not elements:
        raise row.error("no key elements: list the XRF-detectable elements or set xrf_silent = true")
    associated = _element_tuple(raw.get("associated"), row, "associated")
    color = raw.get("color") or _DEFAULT_COLOR
    if not isinstance(color, str) or not _COLOR_RE.match(color.strip()):
        raise row.error(f"field 'color' must be '#rrggbb', got {color!r}")
    aliases = tuple(" ".join(a.lower().split()) for a in _as_str_tuple(raw.get("aliases"), row, "aliases"))
    group = raw.get("group")
    if group is not None and not isinstance(group, str):
        raise row.error(f"field 'group' must be a string, got {group!r}")
    return Pigment(
        name=name,
        aliases=aliases,
        formula=formula,
        composition=MappingProxyType(composition),
        density_g_cm3=density,
        elements=elements,
        period=str(raw.get("period") or "unknown"),
        color=color.strip().lower(),
        notes=str(raw.get("notes") or ""),
        xrf_silent=xrf_silent,
        group=(group or "").strip(),
        associated=associated,
        source=row.source,
        variants=_parse_variants(raw, row, elements),
    )


def _binder_from_row(raw: Mapping[str, Any], row: _Row) -> Binder:
    _check_unknown_fields(raw, _BINDER_FIELDS, row)
    for key in ("name", "density_g_cm3"):
        if raw.get(key) in (None, ""):
            raise row.error(f"missing field {key!r}")
    name = " ".join(str(raw["name"]).strip().lower().split())
    formula, composition = _formula_and_composition(raw, row)
    density = _as_float(raw["density_g_cm3"], row, "density_g_cm3")
    if not 0.1 <= density <= 25.0:
        raise row.error(f"density_g_cm3 = {density} is not a plausible density (0.1-25 g/cm3)")
    aliases = tuple(" ".join(a.lower().split()) for a in _as_str_tuple(raw.get("aliases"), row, "aliases"))
    return Binder(
        name=name,
        aliases=aliases,
        formula=formula,
        composition=MappingProxyType(composition),
        density_g_cm3=density,
        notes=str(raw.get("notes") or ""),
    )


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pigment rows and binder rows of a TOML or CSV file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PigmentError(f"cannot read pigment file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PigmentError(f"{path}: not a UTF-8 text file (expected TOML or CSV)") from None
    suffix = path.suffix.lower()
    is_toml = suffix == ".toml" or (suffix != ".csv" and re.search(r"^\s*\[\[?pigment", text, re.M))
    if is_toml:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PigmentError(f"{path}: invalid TOML: {exc}") from None
        pig = doc.get("pigment", [])
        bind = doc.get("binder", [])
        if not isinstance(pig, list) or not isinstance(bind, list):
            raise PigmentError(
                f"{path}: write pigments as [[pigment]] tables and binders as [[binder]] tables"
            )
        for kind, rows in (("pigment", pig), ("binder", bind)):
            for i, r in enumerate(rows, start=1):
                if not isinstance(r, dict):
                    raise PigmentError(f"{path}, {kind} row {i}: expected a table, got {r!r}")
        extra = sorted(k for k in doc if k not in ("pigment", "binder"))
        if extra:
            raise PigmentError(f"{path}: unknown top-level key(s) {extra}; use [[pigment]] and [[binder]]")
        if not pig and not bind:
            raise PigmentError(f"{path}: no [[pigment]] or [[binder]] tables found")
        return list(pig), list(bind)
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
    except csv.Error as exc:
        raise PigmentError(f"{path}: invalid CSV: {exc}") from None
    if not reader.fieldnames:
        raise PigmentError(f"{path}: empty CSV file (expected a header line with name, formula, ...)")
    header = [h.strip() for h in reader.fieldnames]
    if "name" not in header:
        raise PigmentError(f"{path}: CSV header {header} has no 'name' column")
    out = []
    for i, r in enumerate(rows, start=1):
        if None in r:
            raise PigmentError(f"{path}, pigment row {i}: more values than header columns")
        clean = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()}
        if not any(clean.values()):
            continue
        if "elements" in clean and clean["elements"] == "" and not _truthy(clean.get("xrf_silent")):
            del clean["elements"]
        out.append(clean)
    if not out:
        raise PigmentError(f"{path}: CSV file has a header but no pigment rows")
    return out, []


def _truthy(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "y")


class PigmentLibrary:
    """A validated, immutable set of pigments and binders.

    Parameters
    ----------
    pigments : iterable of Pigment
        Pigments; names and aliases must be unique (case-insensitive) and groups consistent with the
        key-element sets.
    binders : iterable of Binder
        Binding media.

    Examples
    --------
    >>> import xrfnb
    >>> lib = xrfnb.pigments()
    >>> lib["Flake White"].name
    'lead white'
    >>> lib["vermilion"].elements
    ('Hg',)
    >>> "red lead" in lib.groups()[lib["lead white"].group]
    True
    """

    def __init__(self, pigments: Iterable[Pigment], binders: Iterable[Binder] = ()):
        self._pigments: tuple[Pigment, ...] = _assign_groups(tuple(pigments))
        self._binders: tuple[Binder, ...] = tuple(binders)
        self._index = _build_index(self._pigments, "pigment")
        self._binder_index = _build_index(self._binders, "binder")

    # -- container protocol
    def __len__(self) -> int:
        return len(self._pigments)

    def __iter__(self) -> Iterator[Pigment]:
        return iter(self._pigments)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._index

    def __getitem__(self, name: str) -> Pigment:
        if isinstance(name, Pigment):
            name = name.name
        if not isinstance(name, str):
            raise PigmentError(f"pigment names are strings, got {name!r}")
        found = self._index.get(_key(name))
        if found is None:
            raise PigmentError(_unknown_message("pigment", name, self._index))
        return found

    def __repr__(self) -> str:
        n_groups = len(self.groups())
        return f"PigmentLibrary({len(self)} pigments, {n_groups} groups, {len(self._binders)} binders)"

    # -- queries
    @property
    def names(self) -> tuple[str, ...]:
        """Canonical pigment names, in table order."""
        return tuple(p.name for p in self._pigments)

    @property
    def binders(self) -> tuple[Binder, ...]:
        """All binders."""
        return self._binders

    def get(self, name: str, default: Any = None) -> Pigment | Any:
        """The pigment called ``name`` (or an alias), else ``default``."""
        return self._index.get(_key(name), default) if isinstance(name, str) else default

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Ambiguity groups: group name -> pigment names, in table order (XRF-silent group included)."""
        out: dict[str, list[str]] = {}
        for p in self._pigments:
            out.setdefault(p.group, []).append(p.name)
        return {g: tuple(v) for g, v in out.items()}

    def representative(self, class_name: str) -> str | None:
        """The pigment that stands for a model class (an ambiguity group, or a pigment's own name).

        XRF cannot tell a group's members apart, so the first member of the group (table order) stands
        for it, e.g. in the paint stack fitted to a spectrum's calls.

        Parameters
        ----------
        class_name : str
            A group name, or a pigment name or alias.

        Returns
        -------
        str or None
            The pigment's canonical name; None when the name is neither a group nor a pigment.

        Examples
        --------
        >>> import xrfnb
        >>> lib = xrfnb.pigments()
        >>> lib.representative("lead pigments (Pb)")
        'lead white'
        >>> lib.representative("Flake White")
        'lead white'
        >>> lib.representative("no such pigment") is None
        True
        """
        members = self.groups().get(class_name)
        if members:
            return members[0]
        pigment = self.get(class_name)
        return pigment.name if pigment is not None else None

    def group_elements(self) -> dict[str, tuple[str, ...]]:
        """Key elements of each ambiguity group (shared by all its members)."""
        out: dict[str, tuple[str, ...]] = {}
        for p in self._pigments:
            out.setdefault(p.group, p.elements)
        return out

    def group_colors(self) -> dict[str, str]:
        """Display colour of each ambiguity group (that of its first pigment), ``"#rrggbb"``."""
        out: dict[str, str] = {}
        for p in self._pigments:
            out.setdefault(p.group, p.color)
        return out

    def with_element(self, element: str) -> tuple[Pigment, ...]:
        """Pigments whose key elements include ``element``."""
        return tuple(p for p in self._pigments if element in p.elements)

    def binder(self, name: str) -> Binder:
        """The binder called ``name`` (case-insensitive, aliases too)."""
        if not isinstance(name, str):
            raise PigmentError(f"binder names are strings, got {name!r}")
        found = self._binder_index.get(_key(name))
        if found is None:
            raise PigmentError(_unknown_message("binder", name, self._binder_index))
        return found

    def with_file(self, path: str | PathLike[str]) -> PigmentLibrary:
        """A new library with the pigments (and binders) of a user TOML or CSV file added.

        Parameters
        ----------
        path : str or path-like
            TOML file with ``[[pigment]]`` (and optionally ``[[binder]]``) tables, or a CSV file with a
            header row. Fields as in ``xrfnb/data/pigments.toml``; required: ``name``, ``formula`` (or
            ``composition``), ``density_g_cm3`` and ``elements`` (or ``xrf_silent = true``). In CSV, list
            fields are separated by ``;`` and a composition is written ``Fe:0.7;O:0.3``.

        Returns
        -------
        PigmentLibrary
            This library plus the new rows; a user row whose name equals a library pigment replaces it.

        Raises
        ------
        PigmentError
            Naming the file and row, for an unknown element, unparseable formula, composition not summing
            to 1, missing field, duplicate name or a group inconsistent with the key elements.
        """
        path = Path(path)
        pig_rows, bind_rows = _read_rows(path)
        new_pigments = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(pig_rows, start=1):
            row = _Row(str(path), i, "pigment", raw)
            p = _pigment_from_row(raw, row, strict=False)
            for k in (p.name, *p.aliases):
                if k in seen:
                    raise row.error(f"name or alias {k!r} already used in row {seen[k]} of the same file")
                seen[k] = i
            new_pigments.append((p, row))
        new_binders = [
            _binder_from_row(raw, _Row(str(path), i, "binder", raw)) for i, raw in enumerate(bind_rows, 1)
        ]
        replaced = {p.name for p, _ in new_pigments}
        base = [p for p in self._pigments if p.name not in replaced]
        merged: list[Pigment] = list(base)
        for p, row in new_pigments:
            try:
                merged = list(_assign_groups((*merged, p)))
                _build_index(merged, "pigment")
            except PigmentError as exc:
                raise row.error(str(exc)) from None
        binder_names = {b.name for b in new_binders}
        binders = [b for b in self._binders if b.name not in binder_names] + new_binders
        return PigmentLibrary(merged, binders)


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


def _build_index(items: Sequence[Any], kind: str) -> dict[str, Any]:
    index: dict[str, Any] = {}
    for item in items:
        for k in (item.name, *item.aliases):
            kk = _key(k)
            other = index.get(kk)
            if other is not None and other is not item:
                raise PigmentError(
                    f"{kind} name or alias {k!r} of {item.name!r} is already used by {other.name!r}"
                )
            index[kk] = item
    return index


def _unknown_message(kind: str, name: str, index: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(_key(name), list(index), n=4, cutoff=0.6)
    names = sorted({index[c].name for c in close})
    hint = f"; did you mean {', '.join(repr(n) for n in names)}?" if names else ""
    return f"unknown {kind} {name!r}{hint}"


def _assign_groups(pigments: tuple[Pigment, ...]) -> tuple[Pigment, ...]:
    """Check explicit groups against the key-element partition and fill in missing ones.

    Pigments with the same key-element set must share one group name, and one group name must not cover two
    different key-element sets. A pigment without a group joins the group of its key-element set, or (a new
    set) gets a group named after itself; XRF-silent pigments go to :data:`SILENT_GROUP`.
    """
    by_set: dict[frozenset[str], str] = {}
    by_name: dict[str, frozenset[str]] = {}
    for p in pigments:
        if not p.group:
            continue
        s = frozenset(p.elements)
        if s in by_set and by_set[s] != p.group:
            raise PigmentError(
                f"pigment {p.name!r} is in group {p.group!r} but its key elements {sorted(s)} are those of "
                f"group {by_set[s]!r}: XRF cannot tell them apart, so they must share a group"
            )
        if p.group in by_name and by_name[p.group] != s:
            raise PigmentError(
                f"group {p.group!r} mixes key-element sets {sorted(by_name[p.group])} and {sorted(s)} "
                f"(pigment {p.name!r}); give {p.name!r} its own group"
            )
        by_set[s] = p.group
        by_name[p.group] = s
    out = []
    for p in pigments:
        if not p.group:
            s = frozenset(p.elements)
            group = by_set.get(s) or (SILENT_GROUP if not s else p.name)
            if group in by_name and by_name[group] != s:
                raise PigmentError(f"cannot name a new group {group!r}: that name is used for another group")
            by_set[s] = group
            by_name[group] = s
            p = replace(p, group=group)
        out.append(p)
    return tuple(out)


def _load_default() -> PigmentLibrary:
    ref = resources.files("xrfnb") / "data" / "pigments.toml"
    source = "xrfnb/data/pigments.toml"
    try:
        doc = tomllib.loads(ref.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:  # pragma: no cover - broken installation
        raise PigmentError(f"the packaged pigment table {source} is unreadable: {exc}") from None
    pig = [
        _pigment_from_row(r, _Row(source, i, "pigment", r), strict=True)
        for i, r in enumerate(doc["pigment"], 1)
    ]
    bind = [_binder_from_row(r, _Row(source, i, "binder", r)) for i, r in enumerate(doc["binder"], 1)]
    return PigmentLibrary(pig, bind)


@functools.lru_cache(maxsize=1)
def _default_library() -> PigmentLibrary:
    return _load_default()


def pigments(extra: str | PathLike[str] | Sequence[str | PathLike[str]] | None = None) -> PigmentLibrary:
    """The pigment library shipped with xrfnb, optionally extended by user files.

    Parameters
    ----------
    extra : path or sequence of paths, optional
        User TOML or CSV pigment files added in order (see :meth:`PigmentLibrary.with_file`).

    Returns
    -------
    PigmentLibrary
        The (cached) default library, or a new library with the user rows added.

    Examples
    --------
    >>> import xrfnb
    >>> len(xrfnb.pigments()) >= 35
    True
    """
    lib = _default_library()
    if extra is None:
        return lib
    paths = [extra] if isinstance(extra, str | PathLike) else list(extra)
    for p in paths:
        lib = lib.with_file(p)
    return lib
