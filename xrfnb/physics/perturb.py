"""Atomic parameters perturbed within their uncertainty: physics unlike the training simulator's.

A network trained on one simulator can learn its particular atomic data (xraylib's fluorescence yields,
Coster-Kronig probabilities and radiative rates) rather than physics. Real spectra follow nature's values,
which differ from any compilation by roughly the spread between compilations. :class:`AtomicPerturbation`
draws one such "other physics": every emission line's production cross-section is multiplied by a factor

``f(z, line) = exp(s_shell * g(z, shell)) * exp(s_line * g(z, line))``,

``g`` independent standard normal numbers drawn from ``seed`` and the element, shell or line name, so a
factor is the same wherever the line is computed. The shell factor stands for the fluorescence yield and
(L, M) the Coster-Kronig yields and jump ratios of the vacancy's shell; the line factor for the radiative
rate, i.e. the line ratios within the shell (Kb/Ka, Lb/La, ...). Default spreads, one standard deviation:

- K shell 4 % (Z >= 20) and 10 % (Z < 20); K line ratios 3 %: the K fluorescence yields of the
  Krause (1979) and Hubbell et al. (1994) compilations differ by 1-5 % above calcium and by more below
  it, and measured Kb/Ka ratios scatter by a few per cent about Scofield's rates;
- L subshells 10 %, L line ratios 7 %: L-subshell yields and Coster-Kronig probabilities carry 10-30 %
  uncertainties (Campbell 2003);
- M shells 20 %, M line ratios 10 %.

The perturbation acts on :func:`xrfnb.physics.fp.build_tables` (hence on :func:`xrfnb.simulate`,
:func:`xrfnb.simulate_batch`, :func:`xrfnb.line_intensities` and the training data's simulator) while a
``with atomic_perturbation(p):`` block is active in the current thread or task (a
:class:`contextvars.ContextVar`); tables computed under it are cached under its key and never mix with
the unperturbed ones. It is meant for evaluation (``benchmarks/eval_perturbed.py``) and for training
with atomic-parameter randomisation (:func:`training_perturbation`).

Seeds: training draws its perturbations from seeds at and above :data:`TRAINING_SEED_BASE` (10^12), the
evaluation sets from seeds below :data:`EVALUATION_SEED_LIMIT` (``benchmarks/eval_perturbed.py``: 9100 +
draw; ``benchmarks/eval_physics_check.py --perturbed``: 9100), so no training spectrum is simulated with an
evaluation set's atomic parameters; :func:`training_perturbation` refuses anything else.

References
----------
M. O. Krause, "Atomic radiative and radiationless yields for K and L shells", J. Phys. Chem. Ref. Data 8
(1979) 307-327. J. H. Hubbell et al., "A review, bibliography, and tabulation of K, L, and higher atomic
shell X-ray fluorescence yields", J. Phys. Chem. Ref. Data 23 (1994) 339-364. J. L. Campbell, "Fluorescence
yields and Coster-Kronig probabilities for the atomic L subshells", At. Data Nucl. Data Tables 85 (2003)
291-315.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import math
import re
from collections.abc import Iterator

import numpy as np

from .._errors import SimulationError

__all__ = [
    "EVALUATION_SEED_LIMIT",
    "TRAINING_SEED_BASE",
    "AtomicPerturbation",
    "atomic_perturbation",
    "current_perturbation",
    "line_shell",
    "training_perturbation",
]

#: the first seed of the atomic draws used in training (:func:`training_perturbation`)
TRAINING_SEED_BASE = 10**12
#: evaluation sets draw their atomic parameters from seeds below this (9100 + draw in eval_perturbed.py)
EVALUATION_SEED_LIMIT = 10**9

_ACTIVE: contextvars.ContextVar[AtomicPerturbation | None] = contextvars.ContextVar(
    "xrfnb_atomic_perturbation", default=None
)

#: an IUPAC line name as xrfnb.physics.fp lists them: initial shell (K, L1-L3, M1-M5, N1-N7), final shell(s)
_IUPAC = re.compile(r"^(K|L[1-3]|M[1-5]|N[1-7])[K-Q][1-7]{0,2}$")


def line_shell(line_name: str) -> str:
    """The initial vacancy's shell of an IUPAC line name.

    ``"KL3"`` -> ``"K"``, ``"L3M5+L3M4"`` -> ``"L3"``, ``"L3O45"`` -> ``"L3"``.
    """
    m = _IUPAC.match(line_name.split("+")[0])
    if m is None:
        raise SimulationError(f"not an IUPAC line name: {line_name!r} (expected e.g. 'KL3', 'L3M5')")
    return m.group(1)


def _normal(seed: int, *key: object) -> float:
    """A standard normal number fixed by ``seed`` and ``key`` (independent of call order and process)."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return float(np.random.default_rng(int.from_bytes(digest, "little")).standard_normal())


@dataclasses.dataclass(frozen=True)
class AtomicPerturbation:
    """One draw of atomic parameters within their uncertainty (see the module docstring).

    Parameters
    ----------
    seed : int
        Fixes every factor.
    k_shell_rel, k_shell_light_rel : float
        Standard deviation of the log of the K-shell factor for Z >= 20 and Z < 20.
    k_line_rel, l_shell_rel, l_line_rel, m_shell_rel, m_line_rel : float
        Standard deviations of the log factors of K line ratios, L subshells, L line ratios, M shells and
        M line ratios.
    """

    seed: int
    k_shell_rel: float = 0.04
    k_shell_light_rel: float = 0.10
    k_line_rel: float = 0.03
    l_shell_rel: float = 0.10
    l_line_rel: float = 0.07
    m_shell_rel: float = 0.20
    m_line_rel: float = 0.10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise SimulationError(f"AtomicPerturbation.{f.name} must be in [0, 1], got {v!r}")

    @property
    def key(self) -> tuple[float, ...]:
        """Hashable identity (cache key)."""
        return (float(self.seed), *(float(getattr(self, f.name)) for f in dataclasses.fields(self)[1:]))

    def spreads(self, z: int, shell: str) -> tuple[float, float]:
        """(shell, line) standard deviations of the log factors for element ``z`` and a shell."""
        if shell == "K":
            return (self.k_shell_light_rel if z < 20 else self.k_shell_rel), self.k_line_rel
        if shell.startswith("L"):
            return self.l_shell_rel, self.l_line_rel
        return self.m_shell_rel, self.m_line_rel

    def factor(self, z: int, line_name: str) -> float:
        """The factor on the production of line ``line_name`` (IUPAC, merged lines joined by ``+``) of
        element ``z``; merged lines of one shell share it."""
        shell = line_shell(line_name)
        s_shell, s_line = self.spreads(int(z), shell)
        first = line_name.split("+")[0]
        g_shell, g_line = _normal(self.seed, int(z), shell), _normal(self.seed, int(z), first)
        return math.exp(s_shell * g_shell + s_line * g_line)

    def factors(self, z: int, line_names: tuple[str, ...]) -> np.ndarray:
        """Factors of several lines of element ``z``, shape (L,)."""
        return np.array([self.factor(z, n) for n in line_names], dtype=float)


def current_perturbation() -> AtomicPerturbation | None:
    """The perturbation active in this thread or task (None: xraylib's values)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def atomic_perturbation(perturbation: AtomicPerturbation | None) -> Iterator[AtomicPerturbation | None]:
    """Simulate with ``perturbation`` inside the ``with`` block (None: xraylib's own values).

    Examples
    --------
    >>> with atomic_perturbation(AtomicPerturbation(seed=3)):  # doctest: +SKIP
    ...     spectrum = xrfnb.simulate(stack, instrument)
    """
    if perturbation is not None and not isinstance(perturbation, AtomicPerturbation):
        raise SimulationError(
            f"atomic_perturbation takes an AtomicPerturbation or None, got {type(perturbation).__name__}")
    token = _ACTIVE.set(perturbation)
    try:
        yield perturbation
    finally:
        _ACTIVE.reset(token)


def training_perturbation(index: int, spread_scale: float = 1.0) -> AtomicPerturbation:
    """The ``index``-th atomic draw of training data: seed ``TRAINING_SEED_BASE + index``, spreads the
    defaults times ``spread_scale``.

    Seeds from :data:`TRAINING_SEED_BASE` up never meet the evaluation sets' (below
    :data:`EVALUATION_SEED_LIMIT`), so a model is never scored on atomic parameters it was trained on.

    Parameters
    ----------
    index : int
        0 <= index < TRAINING_SEED_BASE (in training: the instrument variant's index).
    spread_scale : float
        Factor on every default standard deviation (1: the compilations' spread; each stays <= 1).

    Returns
    -------
    AtomicPerturbation

    Examples
    --------
    >>> training_perturbation(3).seed - TRAINING_SEED_BASE
    3
    """
    index = int(index)
    if not 0 <= index < TRAINING_SEED_BASE:
        raise SimulationError(
            f"training_perturbation index must be in [0, {TRAINING_SEED_BASE}), got {index}"
        )
    if not (math.isfinite(spread_scale) and spread_scale >= 0):
        raise SimulationError(f"spread_scale must be a finite number >= 0, got {spread_scale!r}")
    spreads = {f.name: f.default * spread_scale for f in dataclasses.fields(AtomicPerturbation)[1:]}
    return AtomicPerturbation(seed=TRAINING_SEED_BASE + index, **spreads)
