"""X-ray emission line names and energies, from xraylib.

Line *groups* ("Ka", "Kb", "La", "Lb", "Lg", "Ma") are what spectroscopists name on a spectrum; their
energies are the radiative-rate weighted means of the member lines of one subshell, which is where an
SDD with ~130-150 eV resolution shows the peak. Individual lines use IUPAC (``"KL3"``) or Siegbahn
(``"Ka1"``) names.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import xraylib

from .._errors import XRFNBError

__all__ = [
    "DEFAULT_LINES",
    "FAMILY_LINES",
    "LINE_GROUPS",
    "M_LINE_MIN_KEV",
    "NAMED_LINES",
    "LineMarker",
    "atomic_number",
    "element_lines",
    "element_symbol",
    "families_shown",
    "line_energy_keV",
    "line_group",
    "line_table_family",
    "parse_line",
]

#: Member lines (IUPAC) of each named group; all members of a group share one initial vacancy subshell.
LINE_GROUPS: dict[str, tuple[str, ...]] = {
    "Ka": ("KL3", "KL2"),
    "Kb": ("KM3", "KM2", "KN3", "KN2"),
    "La": ("L3M5", "L3M4"),
    "Lb": ("L2M4",),
    "Lb2": ("L3N5", "L3N4"),
    "Lg": ("L2N4",),
    "Ll": ("L3M1",),
    "Ma": ("M5N7", "M5N6"),
    "Mb": ("M4N6",),
}

_SIEGBAHN = {
    "Ka1": "KL3", "Ka2": "KL2", "Kb1": "KM3", "Kb3": "KM2", "Kb2": "KN3",
    "La1": "L3M5", "La2": "L3M4", "Lb1": "L2M4", "Lb3": "L1M3", "Lb4": "L1M2", "Lg1": "L2N4",
    "Lg3": "L1N3", "Ln": "L2M1", "Ma1": "M5N7", "Ma2": "M5N6",
}


# ---------------------------------------------------------------------------------------------------------
# IUPAC line -> Siegbahn group: the one rule
# ---------------------------------------------------------------------------------------------------------
def line_group(iupac: str) -> str:
    """Siegbahn line group of an IUPAC line: the peak a spectroscopist names it by.

    K lines are ``"Ka"`` (to L) or ``"Kb"`` (to M, N, O ...). L3 lines are ``"La"`` (to M4, M5), ``"Ll"``
    (to M1) or ``"Lb"`` (the rest: Lb2,15, Lb5, Lb6 ...); L2 lines ``"Ln"`` (to M1), ``"Lb"`` (to M) or
    ``"Lg"`` (to N, O ...); L1 lines ``"Lb"`` (to M) or ``"Lg"``. M5 lines are ``"Ma"`` (to N6, N7) or
    ``"Mz"``, M4 lines ``"Mb"`` (to N6) or ``"Mz"``, M1-M3 lines ``"Mg"``. Every line gets a group, so
    lines without a Siegbahn name of their own join the group nearest in origin (the element fit frees
    line ratios per group); :func:`line_table_family` is the stricter view a line table shows.

    Parameters
    ----------
    iupac : str
        IUPAC line name (``"KL3"``, ``"L2M4"``, ``"M5N7"``); merged lines (``"M5N7+M5N6"``) take the
        group of their first member.

    Returns
    -------
    str
        ``"Ka"``, ``"Kb"``, ``"La"``, ``"Lb"``, ``"Lg"``, ``"Ll"``, ``"Ln"``, ``"Ma"``, ``"Mb"``, ``"Mg"``
        or ``"Mz"``.

    Examples
    --------
    >>> [line_group(n) for n in ("KL3", "KM3", "L3M5", "L2M4", "L2N4", "M5N7")]
    ['Ka', 'Kb', 'La', 'Lb', 'Lg', 'Ma']
    """
    first = iupac.split("+")[0]
    init, final = (first[0], first[1:]) if first[0] == "K" else (first[:2], first[2:])
    if init == "K":
        return "Ka" if final.startswith("L") else "Kb"
    if init == "L3":
        if final in ("M4", "M5"):
            return "La"
        return "Ll" if final == "M1" else "Lb"
    if init == "L2":
        if final == "M1":
            return "Ln"
        return "Lb" if final.startswith("M") else "Lg"
    if init == "L1":
        return "Lb" if final.startswith("M") else "Lg"
    if init == "M5":
        return "Ma" if final in ("N6", "N7") else "Mz"
    if init == "M4":
        return "Mb" if final == "N6" else "Mz"
    return "Mg"


#: L and M lines (IUPAC) with a Siegbahn name of their own (La1, Lb2, Lb5, Lg6, Ll, Ln, Ma1, Mb, Mg, Mz ...):
#: a line table labels them with their :func:`line_group`. Every K line is a Ka or a Kb.
NAMED_LINES: frozenset[str] = frozenset({
    "L3M5", "L3M4", "L3M1", "L2M1",
    "L2M4", "L3N5", "L3N4", "L1M3", "L1M2", "L3O45", "L3O4", "L3O5", "L3N1", "L1M4", "L1M5", "L2M3",
    "L2N4", "L1N2", "L1N3", "L2O4", "L1O2", "L1O3", "L2N1", "L1O23",
    "M5N7", "M5N6", "M4N6", "M3N5", "M3N4", "M4N2", "M5N3",
})


def line_table_family(iupac: str) -> str:
    """Siegbahn family a line table (:class:`xrfnb.LineTable`) gives an IUPAC line.

    K lines and the named L and M lines (:data:`NAMED_LINES`) get their :func:`line_group`; other (minor)
    L and M lines keep their initial shell's letter (``"L3O1"`` -> ``"L"``, ``"M4N3"`` -> ``"M"``), so that
    ``table.total("Pb", "Lb")`` sums named Lb lines only while ``table.total("Pb", "L")`` sums them all.

    Parameters
    ----------
    iupac : str
        IUPAC line name; merged lines (``"KM3+KM2"``) take the family of their first member.

    Returns
    -------
    str
        A line group (``"Ka"``, ``"Lb"``, ``"Ma"`` ...) or a shell letter (``"L"``, ``"M"``).

    Examples
    --------
    >>> line_table_family("KM3+KM2"), line_table_family("L3N5"), line_table_family("L3O1")
    ('Kb', 'Lb', 'L')
    """
    first = iupac.split("+")[0]
    if first.startswith("K") or first in NAMED_LINES:
        return line_group(first)
    return first[0]


@functools.lru_cache(maxsize=256)
def atomic_number(element: str | int) -> int:
    """Atomic number of an element symbol (``"Fe"`` -> 26); integers pass through after a range check."""
    if isinstance(element, int):
        z = element
    else:
        try:
            z = xraylib.SymbolToAtomicNumber(str(element).strip())
        except ValueError:
            z = 0
    if not 1 <= z <= 98:
        raise XRFNBError(f"unknown element {element!r}: use a chemical symbol such as 'Fe' or 'Pb'")
    return z


def element_symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z``."""
    return xraylib.AtomicNumberToSymbol(atomic_number(int(z)))


def _line_macro(iupac: str) -> int:
    try:
        return getattr(xraylib, f"{iupac}_LINE")
    except AttributeError:
        raise XRFNBError(f"unknown X-ray line {iupac!r}") from None


def parse_line(name: str) -> tuple[str, tuple[str, ...]]:
    """Split ``"Fe Ka"`` / ``"Fe-Ka"`` / ``"FeKa"`` into ``("Fe", ("KL3", "KL2"))``."""
    m = re.fullmatch(r"\s*([A-Z][a-z]?)[\s_\-]*([KLMN][A-Za-z0-9]*)\s*", name)
    if not m:
        raise XRFNBError(f"cannot read line name {name!r}: write it as 'Fe Ka', 'Pb La' or 'Cu KL3'")
    element, line = m.groups()
    atomic_number(element)
    return element, line_members(line)


def line_members(line: str) -> tuple[str, ...]:
    """IUPAC member lines of a group name, Siegbahn name or IUPAC name."""
    if line in LINE_GROUPS:
        return LINE_GROUPS[line]
    if line in _SIEGBAHN:
        return (_SIEGBAHN[line],)
    _line_macro(line)
    return (line,)


@functools.lru_cache(maxsize=4096)
def line_energy_keV(element: str | int, line: str) -> float:
    """Energy of an emission line or line group in keV.

    Parameters
    ----------
    element : str or int
        Chemical symbol or atomic number.
    line : str
        Group (``"Ka"``, ``"Kb"``, ``"La"``, ``"Lb"``, ``"Lg"``, ``"Ma"``), Siegbahn (``"Ka1"``) or
        IUPAC (``"KL3"``) name.

    Returns
    -------
    float
        Energy in keV; for a group, the mean of its members weighted by radiative rate.

    Raises
    ------
    XRFNBError
        If the element does not emit that line.
    """
    z = atomic_number(element)
    members = line_members(line)
    total_w = 0.0
    total_e = 0.0
    for iupac in members:
        macro = _line_macro(iupac)
        try:
            e = xraylib.LineEnergy(z, macro)
            w = xraylib.RadRate(z, macro) if len(members) > 1 else 1.0
        except ValueError:
            continue
        if e > 0 and w > 0:
            total_w += w
            total_e += w * e
    if total_w <= 0:
        raise XRFNBError(f"{element_symbol(z)} has no {line} line in xraylib")
    return total_e / total_w


# ---------------------------------------------------------------------------------------------------------
# which lines of an element are drawn or looked for
# ---------------------------------------------------------------------------------------------------------
#: line groups drawn on a spectrum by default
DEFAULT_LINES = ("Ka", "Kb", "La", "Lb", "Lg", "Ma")
#: the line groups of each family that a spectroscopist names on a spectrum
FAMILY_LINES: dict[str, tuple[str, ...]] = {"K": ("Ka", "Kb"), "L": ("La", "Lb", "Lg"), "M": ("Ma",)}
#: M lines below this energy (keV) belong to light elements, whose M shells do not fluoresce in practice:
#: they are never drawn nor looked for
M_LINE_MIN_KEV = 1.5


class LineMarker(NamedTuple):
    """One emission line group of an element, to mark on a spectrum or to look for.

    Attributes
    ----------
    element : str
        Chemical symbol.
    line : str
        Line group (``"Ka"``, ``"Lb"``, ...).
    family : str
        ``"K"``, ``"L"`` or ``"M"``.
    energy_keV : float
        Energy of the group (:func:`line_energy_keV`), keV.
    """

    element: str
    line: str
    family: str
    energy_keV: float

    @property
    def label(self) -> str:
        """``"Fe Ka"``."""
        return f"{self.element} {self.line}"


def element_lines(
    element: str,
    e_min_keV: float = 0.0,
    e_max_keV: float = math.inf,
    lines: Sequence[str] = DEFAULT_LINES,
) -> list[LineMarker]:
    """The line groups of one element inside ``[e_min_keV, e_max_keV]``, in the order of ``lines``.

    Groups the element does not emit (xraylib has no such line) and M lines below
    :data:`M_LINE_MIN_KEV` are left out.

    Parameters
    ----------
    element : str
        Chemical symbol.
    e_min_keV, e_max_keV : float
        Energy range, keV (inclusive).
    lines : sequence of str
        Line groups to consider, from :data:`LINE_GROUPS`.

    Returns
    -------
    list of LineMarker

    Raises
    ------
    XRFNBError
        Unknown element symbol or line group.

    Examples
    --------
    >>> [m.label for m in element_lines("Pb", 1.0, 15.0)]
    ['Pb La', 'Pb Lb', 'Pb Lg', 'Pb Ma']
    >>> round(element_lines("Fe", lines=("Ka",))[0].energy_keV, 3)
    6.4
    """
    symbol = str(element).strip()
    atomic_number(symbol)
    out: list[LineMarker] = []
    for line in lines:
        if line not in LINE_GROUPS:
            raise XRFNBError(f"unknown line group {line!r}; use one of {', '.join(LINE_GROUPS)}")
        try:
            e = line_energy_keV(symbol, line)
        except XRFNBError:
            continue
        if line.startswith("M") and e < M_LINE_MIN_KEV:
            continue
        if e_min_keV <= e <= e_max_keV:
            out.append(LineMarker(symbol, line, line[0], float(e)))
    return out


def families_shown(element: str) -> tuple[str, ...]:
    """The line families an SDD spectrum of a painting shows for an element: K always, L from Rh (Z 45)
    up, M from Hf (Z 72) up.

    Examples
    --------
    >>> families_shown("Fe"), families_shown("Cd"), families_shown("Pb")
    (('K',), ('K', 'L'), ('K', 'L', 'M'))
    """
    z = atomic_number(element)
    return ("K",) + (("L",) if z >= 45 else ()) + (("M",) if z >= 72 else ())
