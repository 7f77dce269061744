"""Trained pigment-identification models: loading, saving and inference.

A model is a folder with three files:

``model.safetensors``
    the network weights and the out-of-distribution statistics (never a pickle: loading refuses pickled
    weights with :class:`~xrfnb.ModelError`);
``model.json``
    classes, display colours, pigments and elements of each class, the energy grid, the default input
    calibration, the instrument envelope it was trained on, temperature, per-class thresholds, the
    out-of-distribution threshold, the training configuration, the code version and the metrics;
``README.md``
    the model card.

The shipped default model lives in the package (``xrfnb/data/models/xrfnb-pigments-v1/``) so that it works
from an installed wheel; ``models/xrfnb-pigments-v1/`` in the source tree holds a byte-identical copy next to
the training outputs (a test checks that they agree).

Probabilities. The network gives, per class, a three-way softmax over (absent, present in the surface layer,
present only below the surface layer), divided by a temperature fitted on validation data. ``probability``
is P(surface) + P(buried) (present within the probed depth) and ``buried_probability`` is P(buried); both
are clamped to [0, 1] (float32 rounding of the sum can exceed 1 by one unit in the last place), so
``0 <= buried_probability <= probability <= 1`` holds exactly.

Out-of-distribution score, from three terms:

* ``u`` is the fraction of the significant net peak area between ``e_min`` and ``ood.analysis_max_keV``
  (15 keV, below the tubes' Rayleigh and Compton peaks) that lies outside the line windows of the
  elements of the possible classes and of the always-explained elements (air argon, impurities Si, K,
  Ca, Fe, tube anodes Rh and Mo): peaks that the pigments the model considers cannot explain;
* ``d`` is the Mahalanobis distance of the network's last hidden features from the training
  distribution (mean and covariance from validation spectra), divided by sqrt(feature dimension);
* ``r`` is the reconstruction residual of the spectrum's shape outside the 64 principal components of
  training spectra, in units of the Poisson noise (:meth:`PigmentModel._reconstruction`);
* ``u_ref``, ``d_ref`` and ``r_ref`` are their 99th percentiles on validation spectra.

The overall score is ``max(u / u_ref, d / d_ref, r / r_ref)``; classes with a probability of at least
``explain_probability`` (0.1) count as explaining their elements' lines. Spectra with more counts than the
training maximum (sum spectra) are scaled down to it first.

A spectrum is flagged (``ood``) when ``ood_score > ood_threshold`` (the 99th percentile of the score on
validation spectra, so about 1 % of in-distribution spectra are flagged).

Precision. Rebinning, the input features and the three OOD terms' spectrum analysis always run in float32.
The network itself runs in ``"float32"`` or ``"bfloat16"`` (weights and activations in bfloat16, products
accumulated in float32 by oneDNN). ``"auto"`` (the default) picks bfloat16 where the CPU multiplies it
natively (AVX512-BF16 or AMX, as reported by oneDNN), where it makes the network about five times faster,
and float32 elsewhere; the environment variable ``XRFNB_PRECISION`` (``float32`` or ``bfloat16``) overrides
``"auto"``. On the held-out evaluation spectra bfloat16 moves probabilities by at most about 0.02 and
flips fewer than 3 in 10,000 present/absent decisions (``tests/test_model.py`` checks the agreement); use
``precision="float32"`` when results must be bit-reproducible across machines.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import CalibrationError, DataError, InstrumentError, ModelError, PigmentError, SimulationError
from ..core.calibration import EnergyCalibration
from ..core.calls import is_buried, is_present
from ..core.lines import element_lines
from ..core.spectrum import Spectrum, check_counts
from ..physics.detector import si_ka_keV
from ..physics.instrument import Instrument, resolve_instrument
from . import folders as _folders
from .nn import PigmentNet, energy_grid_edges_keV, rebin_counts
from .physics_check import DEFAULT_MARGIN, Explanation, PhysicsCheck, check_calls

__all__ = [
    "BatchIdentification",
    "Identification",
    "PigmentModel",
    "available_models",
    "load_model",
]

DEFAULT_MODEL = "xrfnb-pigments-v1"
FORMAT = "xrfnb-pigment-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = _folders.META_FILE
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")

#: elements whose lines never count as unexplained: argon in air, ground/dirt impurities, tube anodes
ALWAYS_EXPLAINED = ("Ar", "Si", "K", "Ca", "Fe", "Rh", "Mo")
_LINES_FOR_MASK = ("Ka", "Kb", "La", "Lb", "Lb2", "Lg", "Ma")
_INFER_CHUNK = 2048  # spectra per inference chunk: (2048, 512) float32 arrays stay in cache


#: precisions of the network's arithmetic (see the module docstring)
PRECISIONS = ("auto", "float32", "bfloat16")
_PRECISION_ENV = "XRFNB_PRECISION"

_MAX_REBIN_THREADS = 8
_MIN_REBIN_ROWS = 256  # rows per rebinning thread, fewer are not worth a thread
_REBIN_PIECE = 256  # rows rebinned at a time: 1-2 us of CPU per spectrum less than 1,024 at a time
_POOL: list[ThreadPoolExecutor] = []


def _rebin_pool() -> ThreadPoolExecutor:
    """A process-wide pool for rebinning chunks in parallel (created on first use)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_MAX_REBIN_THREADS, thread_name_prefix="xrfnb-rebin"))
    return _POOL[0]


if hasattr(os, "register_at_fork"):  # a forked child has none of the pool's threads: start a new pool there
    os.register_at_fork(after_in_child=_POOL.clear)


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolve_precision(precision: str = "auto") -> str:
    """The network precision a request stands for: ``"float32"`` or ``"bfloat16"``.

    Parameters
    ----------
    precision : {"auto", "float32", "bfloat16"}
        ``"auto"``: ``$XRFNB_PRECISION`` if set, else bfloat16 where the CPU computes it natively
        (:func:`native_bfloat16`), else float32.

    Raises
    ------
    ModelError
        An unknown precision (argument or environment variable).
    """
    text = str(precision).strip().lower()
    where = "precision"
    if text == "auto" and os.environ.get(_PRECISION_ENV, "").strip():
        text, where = os.environ[_PRECISION_ENV].strip().lower(), f"${_PRECISION_ENV}"
    if text not in PRECISIONS:
        value = precision if where == "precision" else text
        raise ModelError(f"{where} {value!r} is not one of {', '.join(PRECISIONS[1:])} or auto")
    if text == "auto":
        return "bfloat16" if native_bfloat16() else "float32"
    return text


# ---------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class BatchIdentification:
    """Pigment identification of many spectra.

    Attributes
    ----------
    classes : tuple of str
        Pigment classes (ambiguity groups of the library), K of them.
    probability : numpy.ndarray
        Calibrated probability that each class is present within the probed depth, shape (n, K), float32.
    buried_probability : numpy.ndarray
        Probability that each class is present only below the surface layer, shape (n, K), float32
        (always <= ``probability``).
    ood_score : numpy.ndarray
        Out-of-distribution score, shape (n,), float32 (see :mod:`xrfnb.model.model`).
    thresholds : numpy.ndarray
        Per-class decision thresholds on ``probability``, shape (K,).
    ood_threshold : float
        Spectra with ``ood_score`` above it are flagged.
    unexplained_fraction : numpy.ndarray
        Fraction of significant peak area no predicted class explains, shape (n,), float32.
    total_counts : numpy.ndarray or None
        Counts of each spectrum on the model's energy grid, shape (n,), float32 (the count level of a
        map's call patterns, :class:`xrfnb.model.physics_check.CallPatterns`).
    """

    classes: tuple[str, ...]
    probability: np.ndarray
    buried_probability: np.ndarray
    ood_score: np.ndarray
    thresholds: np.ndarray
    ood_threshold: float
    unexplained_fraction: np.ndarray
    total_counts: np.ndarray | None = None

    @property
    def present(self) -> np.ndarray:
        """Decisions: ``probability >= thresholds`` (:func:`xrfnb.core.calls.is_present`), shape (n, K),
        bool."""
        return is_present(self.probability, self.thresholds)

    @property
    def buried(self) -> np.ndarray:
        """Present classes judged to lie only below the surface layer (:func:`xrfnb.core.calls.is_buried`),
        shape (n, K), bool."""
        return self.present & is_buried(self.probability, self.buried_probability)

    @property
    def ood(self) -> np.ndarray:
        """Out-of-distribution flags, shape (n,), bool."""
        return self.ood_score > self.ood_threshold

    def __len__(self) -> int:
        return int(self.probability.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Identification:
    """Pigment identification of one spectrum.

    Attributes
    ----------
    classes : tuple of str
        All classes of the model, K of them.
    probability : numpy.ndarray
        Calibrated probability of presence within the probed depth per class, shape (K,), float32.
    buried_probability : numpy.ndarray
        Probability of presence only below the surface layer per class, shape (K,), float32.
    thresholds : numpy.ndarray
        Per-class decision thresholds, shape (K,).
    present : tuple of str
        Classes called present, most probable first.
    layer : dict of str to str
        For each present class, ``"surface"`` or ``"buried"`` (only below the surface layer).
    evidence : dict of str to tuple of str
        For each present class, its key elements whose lines are significant in the spectrum (may be empty
        when the call rests on weak or overlapped lines: treat such calls with care).
    element_significance : dict of str to float
        Net peak significance (in standard deviations of the background) of the main line of every element
        the model knows about.
    ood_score : float
        Out-of-distribution score.
    ood_threshold : float
        Threshold above which the spectrum is flagged.
    unexplained_fraction : float
        Fraction of the significant peak area that no called class (nor argon, impurities or the tube)
        explains.
    class_pigments : dict of str to tuple of str
        The library pigments each class stands for.
    network_present : tuple of str
        The network's own calls (``probability >= thresholds``), most probable first; ``present`` differs
        from them only where the physics check found a better explanation.
    alternatives : tuple of Explanation
        The explanations of the spectrum within the physics check's margin, best first (the first is what
        ``present`` follows): each with its classes, BIC difference and a readable ``evidence`` line
        (:mod:`xrfnb.model.physics_check`). Empty when the check was off or could not run.
    physics_check : PhysicsCheck or None
        The whole check (every explanation fitted, the margin, a note when it could not run); None when
        ``identify(..., check_physics=False)``.
    """

    classes: tuple[str, ...]
    probability: np.ndarray
    buried_probability: np.ndarray
    thresholds: np.ndarray
    present: tuple[str, ...]
    layer: dict[str, str]
    evidence: dict[str, tuple[str, ...]]
    element_significance: dict[str, float]
    ood_score: float
    ood_threshold: float
    unexplained_fraction: float
    class_pigments: dict[str, tuple[str, ...]]
    network_present: tuple[str, ...] = ()
    alternatives: tuple[Explanation, ...] = ()
    physics_check: PhysicsCheck | None = None

    @property
    def ood(self) -> bool:
        """True when the spectrum is unlike the training data: do not trust the pigment calls."""
        return self.ood_score > self.ood_threshold

    def probabilities(self) -> dict[str, float]:
        """Class -> probability of presence, most probable first."""
        order = np.argsort(-self.probability)
        return {self.classes[i]: float(self.probability[i]) for i in order}

    def summary(self) -> str:
        """A few lines of text for people."""
        lines = []
        if self.ood:
            lines.append(
                f"OUT OF DISTRIBUTION (score {self.ood_score:.2f} > {self.ood_threshold:.2f}; "
                f"{100 * self.unexplained_fraction:.0f} % of the peak area unexplained): "
                "this spectrum is unlike the paintings the model was trained on; "
                "do not trust the calls below."
            )
        if not self.present:
            lines.append("no pigment class called present")
        for name in self.present:
            i = self.classes.index(name)
            ev = ", ".join(self.evidence.get(name, ())) or "no significant line of its own"
            lines.append(
                f"{name}: p={self.probability[i]:.2f} ({self.layer[name]}, "
                f"p_buried={self.buried_probability[i]:.2f}); elements: {ev}"
            )
        if self.physics_check is not None:
            lines.append("physics check: " + self.physics_check.summary())
        return "\n".join(lines)

    def __repr__(self) -> str:
        calls = ", ".join(f"{c} ({self.layer[c]})" for c in self.present) or "nothing"
        flag = ", OOD" if self.ood else ""
        return f"Identification({calls}{flag}, ood_score={self.ood_score:.2f})"


# ---------------------------------------------------------------------------------------------------------
# line windows on the model grid
# ---------------------------------------------------------------------------------------------------------
def _grid_fwhm_keV(energy_keV: np.ndarray, noise_keV: float) -> np.ndarray:
    return np.sqrt(noise_keV**2 + 8 * math.log(2) * 0.115 * 3.65e-3 * np.asarray(energy_keV))


def element_line_energies_keV(element: str, e_min_keV: float, e_max_keV: float) -> list[float]:
    """Energies of an element's main line groups (K, L, M) inside ``[e_min_keV, e_max_keV]``."""
    return [m.energy_keV for m in element_lines(element, e_min_keV, e_max_keV, _LINES_FOR_MASK)]


def element_mask(element: str, centers_keV: np.ndarray, noise_keV: float, e_max_keV: float) -> np.ndarray:
    """Bins of the model grid within one FWHM (x1.2, for wider detectors) of the element's lines and their Si
    escape peaks, shape (n_bins,), bool."""
    mask = np.zeros(centers_keV.size, dtype=bool)
    energies = element_line_energies_keV(element, float(centers_keV[0]) - 0.2, e_max_keV)
    strong = energies[:2]
    escape_keV = si_ka_keV()
    for e in [*energies, *(x - escape_keV for x in strong if x - escape_keV > 1.0)]:
        half = 1.2 * float(_grid_fwhm_keV(e, noise_keV))
        mask |= np.abs(centers_keV - e) <= half
    return mask


def _three_bin_sums(binned: torch.Tensor, n_out: int) -> torch.Tensor:
    """``avg_pool1d(binned, 3, stride=1, padding=1, count_include_pad=False) * 3`` of the first ``n_out``
    bins, bit for bit (the pool adds a window's bins left to right and divides by their number, 2 at the
    grid's ends), from three shifted slices: about seven times faster than the pool. Shape (n, n_out)."""
    n_bins = binned.shape[1]
    s = binned.new_empty((binned.shape[0], n_out))
    hi = min(n_out, n_bins - 1)  # bins 1 .. hi - 1 have both neighbours
    inner = s[:, 1:hi]
    torch.add(binned[:, : hi - 1], binned[:, 1:hi], out=inner)
    inner.add_(binned[:, 2 : hi + 1]).div_(3.0)
    s[:, 0] = (binned[:, 0] + binned[:, 1]) / 2.0
    if n_out == n_bins:
        s[:, -1] = (binned[:, -2] + binned[:, -1]) / 2.0
    return s.mul_(3.0)


def _peak_bins_needed(n_bins: int, n_keep: int) -> int | None:
    """Bins of the grid that fix the background (:meth:`PigmentModel._background3`) of its first
    ``n_keep`` bins; None when that takes the whole grid.

    The background of bin ``i`` interpolates the smoothed coarse minima at ``(i + 1/2) c / n_bins - 1/2``
    (``c = n_bins // 8 + 1`` coarse points); coarse point ``j`` is smoothed with ``j - 1`` and ``j + 1``
    and is the minimum of the 3-bin sums ``8 j - 8 .. 8 j + 7``; a 3-bin sum needs the next bin. With one
    coarse point of margin.
    """
    n_coarse = n_bins // 8 + 1
    src = max((n_keep - 0.5) * n_coarse / n_bins - 0.5, 0.0)
    j = math.floor(src) + 3  # the upper interpolation point, its smoothing neighbour, one of margin
    need = max(8 * j + 9, n_keep + 16)
    return need if need < n_bins else None


def _features(binned: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~xrfnb.model.nn.features_from_binned` given ``total = binned.sum(dim=1, keepdim=True)``:
    the same numbers, written straight into the network's input (no stacking copy)."""
    f = binned * (binned.shape[1] / total.clamp_min(1.0))
    x = binned.new_empty((binned.shape[0], 2, binned.shape[1]))
    torch.sqrt(f, out=x[:, 0])
    torch.log1p(f, out=x[:, 1])
    return x, torch.log10(total + 1.0)


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------
class PigmentModel:
    """A trained pigment-identification model.

    Build one with :func:`load_model` or :meth:`from_dir`; :mod:`xrfnb.model.train` creates new ones.

    Parameters
    ----------
    net : PigmentNet
        The network (weights loaded).
    meta : mapping
        The content of ``model.json``.
    ood_tensors : mapping of str to torch.Tensor
        ``feature_mean`` (D,) and ``feature_whitening`` (D, D) of the out-of-distribution distance.
    precision : {"auto", "float32", "bfloat16"}
        Arithmetic of the network (see :func:`resolve_precision`); the resolved value is
        :attr:`precision`.
    """

    def __init__(
        self,
        net: PigmentNet,
        meta: Mapping[str, Any],
        ood_tensors: Mapping[str, torch.Tensor],
        *,
        precision: str = "auto",
    ):
        self.net = net.eval()
        self._precision = resolve_precision(precision)
        # a bfloat16 copy of the network, made here, for inference; self.net stays float32 (training, saving)
        self._net_bf16 = (
            copy.deepcopy(self.net).to(torch.bfloat16).eval() if self._precision == "bfloat16" else None
        )
        self.meta = dict(meta)
        try:
            self.classes: tuple[str, ...] = tuple(meta["classes"])
            self.colors: tuple[str, ...] = tuple(meta["colors"])
            self.class_pigments: dict[str, tuple[str, ...]] = {
                k: tuple(v) for k, v in meta["class_pigments"].items()
            }
            self.class_elements: dict[str, tuple[str, ...]] = {
                k: tuple(v) for k, v in meta["class_elements"].items()
            }
            grid = meta["energy_grid"]
            self.energy_edges_keV = energy_grid_edges_keV(
                int(grid["n_bins"]),
                float(grid["e_min_keV"]),
                float(grid["e_max_keV"]),
                float(grid["noise_keV"]),
            )
            self._noise_keV = float(grid["noise_keV"])
            self.temperature = float(meta.get("temperature", 1.0))
            self.thresholds = np.asarray(meta.get("thresholds", [0.5] * len(self.classes)), dtype=np.float32)
            ood = meta.get("ood", {})
            self.ood_threshold = float(ood.get("threshold", math.inf))
            self._u_ref = float(ood.get("unexplained_ref", 1.0))
            self._d_ref = float(ood.get("mahalanobis_ref", math.inf))
            self._analysis_max_keV = float(ood.get("analysis_max_keV", 15.0))
            self._r_ref = float(ood.get("reconstruction_ref", math.inf))
            self._explain_p = float(ood.get("explain_probability", 0.1))
            self._always = tuple(ood.get("always_explained", ALWAYS_EXPLAINED))
            self.max_counts = float(meta.get("max_counts", math.inf))
            default_input = meta.get("default_input")
            self.default_calibration = (
                EnergyCalibration.from_dict(default_input["calibration"]) if default_input else None
            )
            self.default_n_channels = int(default_input["n_channels"]) if default_input else None
        except (KeyError, TypeError, ValueError, CalibrationError) as exc:
            raise ModelError(f"model.json is incomplete or invalid: {exc!r}") from None
        k = len(self.classes)
        if net.n_classes != k or len(self.colors) != k or self.thresholds.shape != (k,):
            raise ModelError(
                f"model.json lists {k} classes, {len(self.colors)} colours and "
                f"{self.thresholds.size} thresholds "
                f"but the network has {net.n_classes} outputs"
            )
        if net.n_bins != self.energy_edges_keV.size - 1:
            raise ModelError(f"network expects {net.n_bins} bins but the energy grid has {self.n_bins}")
        self._feature_mean = ood_tensors.get("feature_mean")
        self._feature_whitening = ood_tensors.get("feature_whitening")
        self._pca_mean = ood_tensors.get("pca_mean")
        self._pca_basis = ood_tensors.get("pca_basis")
        self._build_masks()

    # -- basic properties --------------------------------------------------------------------------------
    @property
    def n_bins(self) -> int:
        """Bins of the model's energy grid."""
        return int(self.energy_edges_keV.size - 1)

    @property
    def energy_grid_keV(self) -> np.ndarray:
        """Bin centres of the model's own energy grid in keV, shape (n_bins,)."""
        e = self.energy_edges_keV
        return 0.5 * (e[1:] + e[:-1])

    @property
    def precision(self) -> str:
        """Arithmetic of the network at inference, ``"float32"`` or ``"bfloat16"``."""
        return self._precision

    @property
    def name(self) -> str:
        """Model name."""
        return str(self.meta.get("name", "unnamed"))

    @property
    def metrics(self) -> dict:
        """Validation and evaluation metrics recorded at training time."""
        return dict(self.meta.get("metrics", {}))

    @property
    def network_config(self) -> dict:
        """The ``[model]`` table of a training config that rebuilds this network as it is: the training
        record's, with the first layer's rank the weights have (a model factored after training,
        :func:`xrfnb.model.train.factor_model`, keeps the record of the full layer it was trained with).
        Fine-tuning from this model (``optim.init_from``) needs it."""
        record = self.meta.get("training", {}).get("model", {})
        table = {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}  # as model.json has it
        table["rank"] = int(self.net.rank)
        return table

    def __repr__(self) -> str:
        return (
            f"PigmentModel({self.name!r}, {len(self.classes)} classes, grid {self.n_bins} bins "
            f"{self.energy_edges_keV[0]:.1f}-{self.energy_edges_keV[-1]:.1f} keV)"
        )

    def _build_masks(self) -> None:
        centers = self.energy_grid_keV
        emax = self._analysis_max_keV
        elements = sorted({e for els in self.class_elements.values() for e in els} | set(self._always))
        self._element_masks = {el: element_mask(el, centers, self._noise_keV, emax) for el in elements}
        class_masks = np.zeros((len(self.classes), centers.size), dtype=bool)
        for i, c in enumerate(self.classes):
            for el in self.class_elements.get(c, ()):
                class_masks[i] |= self._element_masks[el]
        always = np.zeros(centers.size, dtype=bool)
        for el in self._always:
            always |= self._element_masks[el]
        self._class_masks = torch.from_numpy(class_masks.astype(np.float32))
        self._always_mask = torch.from_numpy(always)
        self._analysis_mask = torch.from_numpy(centers <= emax)
        # the analysis bins are the grid's first ones (centres rise): the unexplained-peak term needs the
        # background of those only
        self._n_analysis = int(np.count_nonzero(centers <= emax))

    # -- loading and saving -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, precision: str = "auto") -> PigmentModel:
        """Load a model folder (``model.safetensors`` + ``model.json``).

        Parameters
        ----------
        path : path-like
            The folder.
        precision : {"auto", "float32", "bfloat16"}
            Arithmetic of the network at inference (see :func:`resolve_precision`).

        Raises
        ------
        ModelError
            Missing files, pickled weights (refused: a pickle can run arbitrary code), an incompatible
            format version or inconsistent files.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist")
        weights = folder / WEIGHTS_FILE
        meta_path = folder / META_FILE
        if not weights.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise ModelError(
                    f"{folder} holds pickled weights ({', '.join(pickles)}) but no {WEIGHTS_FILE}: "
                    "xrfnb refuses to load pickles because they can run arbitrary code; "
                    "convert them to safetensors"
                )
            raise ModelError(f"{folder} has no {WEIGHTS_FILE}")
        with open(weights, "rb") as fh:
            head = fh.read(8)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise ModelError(
                f"{weights} is a pickle (torch.save) file, not safetensors: refused because "
                "unpickling can run arbitrary code; convert the weights with safetensors.torch.save_file"
            )
        if not meta_path.is_file():
            raise ModelError(f"{folder} has no {META_FILE}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{meta_path} is not valid JSON: {exc}") from None
        if meta.get("format") != FORMAT or int(meta.get("format_version", -1)) > FORMAT_VERSION:
            raise ModelError(
                f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not a "
                f"{FORMAT} version <= {FORMAT_VERSION}; upgrade xrfnb"
            )
        try:
            tensors = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{weights} is not a valid safetensors file: {exc}") from None
        try:
            arch = meta["architecture"]
            net = PigmentNet(
                int(arch["n_bins"]),
                int(arch["n_classes"]),
                conv_channels=int(arch["conv_channels"]),
                kernel=int(arch["kernel"]),
                hidden=tuple(arch["hidden"]),
                rank=int(arch.get("rank", 0)),
            )
            state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
            net.load_state_dict(state, strict=True)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ModelError(
                f"{folder}: weights do not match the architecture in {META_FILE}: {exc}"
            ) from None
        ood = {k[4:]: v for k, v in tensors.items() if k.startswith("ood.")}
        model = cls(net, meta, ood, precision=precision)
        model.path = folder
        return model

    def _ood_tensors(self) -> dict[str, torch.Tensor]:
        """The out-of-distribution statistics that are set, by their names in ``model.safetensors``."""
        names = ("feature_mean", "feature_whitening", "pca_mean", "pca_basis")
        return {k: getattr(self, f"_{k}") for k in names if getattr(self, f"_{k}") is not None}

    def adapt(
        self,
        instrument_fit: Any,
        out_dir: str | os.PathLike,
        *,
        minutes: float = 15.0,
        resume: bool = False,
        progress: bool = True,
        **kwargs: Any,
    ) -> PigmentModel:
        """This model fine-tuned to one instrument (see :func:`xrfnb.model.adapt.adapt_model`).

        Parameters
        ----------
        instrument_fit : InstrumentFit
            From :func:`xrfnb.fit_instrument` on the user's own scan or spectrum.
        out_dir : path
            Folder of the adapted model (weights, ``model.json``, card, checkpoints).
        minutes : float
            Optimisation budget (default 15 minutes); calibration and validation add one to three.
        resume : bool
            Continue an interrupted adaptation in ``out_dir``.
        progress : bool
            Progress bars on stderr.
        **kwargs
            Passed to :func:`xrfnb.model.adapt.adapt_model` (``name``, ``seed``, ``n_val``,
            ``validation_n_per_cell``).

        Returns
        -------
        PigmentModel
            The adapted model, saved in ``out_dir``.
        """
        # deferred: adapt imports this module (and the training loop)
        from .adapt import adapt_model

        return adapt_model(self, instrument_fit, out_dir, minutes=minutes, resume=resume, progress=progress,
                           **kwargs)

    def _with_precision(self, precision: str) -> PigmentModel:
        """The same model (shared float32 network, metadata and folder) at another network precision."""
        other = PigmentModel(self.net, self.meta, self._ood_tensors(), precision=precision)
        if hasattr(self, "path"):
            other.path = self.path
        return other

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``model.json`` into a folder (created if needed).

        Files are written under temporary names and renamed, so an interrupted save leaves the old files.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        tensors.update({f"ood.{k}": v.contiguous() for k, v in self._ood_tensors().items()})
        meta = dict(self.meta)
        meta.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            architecture=self.net.arch(),
            classes=list(self.classes),
            colors=list(self.colors),
            temperature=self.temperature,
            thresholds=[float(t) for t in self.thresholds],
        )
        meta.setdefault("ood", {})
        meta["ood"] = {
            **meta["ood"],
            "threshold": self.ood_threshold,
            "unexplained_ref": self._u_ref,
            "mahalanobis_ref": self._d_ref,
            "reconstruction_ref": self._r_ref,
            "explain_probability": self._explain_p,
            "analysis_max_keV": self._analysis_max_keV,
            "always_explained": list(self._always),
        }
        if math.isfinite(self.max_counts):
            meta["max_counts"] = self.max_counts
        self.meta = meta
        tmp_w = folder / (WEIGHTS_FILE + ".tmp")
        tmp_m = folder / (META_FILE + ".tmp")
        save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
        tmp_m.write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp_w, folder / WEIGHTS_FILE)
        os.replace(tmp_m, folder / META_FILE)
        return folder

    # -- inference ---------------------------------------------------------------------------------------
    def _resolve_calibration(
        self, n_channels: int, calibration: EnergyCalibration | None
    ) -> EnergyCalibration:
        if calibration is None:
            if self.default_calibration is None or n_channels != self.default_n_channels:
                raise ModelError(
                    f"spectra have {n_channels} channels but no calibration was given; this model's default "
                    f"input is {self.default_n_channels} channels ({self.default_calibration}). Pass the "
                    "spectra's EnergyCalibration so they can be resampled to the model's energy grid"
                )
            return self.default_calibration
        if not isinstance(calibration, EnergyCalibration):
            raise ModelError(f"calibration must be an EnergyCalibration, got {type(calibration).__name__}")
        calibration.check_monotonic(n_channels)
        lo, hi = calibration.energy_keV(np.array([0, n_channels - 1]))
        if not 1e-4 <= (hi - lo) / max(n_channels - 1, 1) <= 0.2:
            raise ModelError(
                f"calibration {calibration} gives {(hi - lo) / max(n_channels - 1, 1):.3g} keV per channel: "
                "this spectrum looks uncalibrated. Fit a calibration to peaks you recognise "
                "(xrfnb.calibrate; xrfnb identify --calibrate \"Fe Ka=640,Pb La=1050\") or give one "
                "(load(..., calibration=); --calibration OFFSET_KEV,GAIN_KEV)"
            )
        if hi < self.energy_edges_keV[0] or lo > self.energy_edges_keV[-1]:
            raise ModelError(
                f"the spectra cover {lo:.2f}-{hi:.2f} keV, outside the model's "
                f"{self.energy_edges_keV[0]:.1f}-{self.energy_edges_keV[-1]:.1f} keV grid: "
                "check the calibration (keV, not eV?)"
            )
        return calibration

    def binned(self, counts: np.ndarray, calibration: EnergyCalibration | None = None) -> np.ndarray:
        """Spectra rebinned onto the model grid, shape (n, n_bins), float32."""
        counts = np.asarray(counts)
        if counts.ndim == 1:
            counts = counts[None]
        if counts.ndim != 2:
            raise DataError(f"counts must have shape (n, channels), got {counts.shape}")
        cal = self._resolve_calibration(counts.shape[1], calibration)
        return rebin_counts(counts, cal, self.energy_edges_keV)

    def _rebin_parallel(self, counts: np.ndarray, calibration: EnergyCalibration) -> np.ndarray:
        """:func:`~xrfnb.model.nn.rebin_counts` of a chunk, its rows split over ``torch.get_num_threads()``
        threads (numpy releases the GIL), each rebinning its rows :data:`_REBIN_PIECE` at a time (their
        prefix sums stay in cache and in memory the allocator reuses); bit-identical to the one-thread
        result, shape (n, n_bins), float32."""
        n = counts.shape[0]
        n_threads = min(torch.get_num_threads(), _MAX_REBIN_THREADS, n // _MIN_REBIN_ROWS)
        out = np.empty((n, self.n_bins), np.float32)
        bounds = np.linspace(0, n, max(n_threads, 1) + 1).astype(int)

        def work(i: int) -> None:
            for a in range(bounds[i], bounds[i + 1], _REBIN_PIECE):
                b = min(bounds[i + 1], a + _REBIN_PIECE)
                out[a:b] = rebin_counts(counts[a:b], calibration, self.energy_edges_keV)

        if n_threads < 2:
            work(0)
        else:
            list(_rebin_pool().map(work, range(n_threads)))
        return out

    @torch.inference_mode()
    def _infer_binned(
        self, binned: torch.Tensor, total: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Probabilities, buried probabilities, OOD score and its three terms of spectra on the grid.

        Parameters
        ----------
        binned : torch.Tensor
            Counts on the model grid, (n, n_bins), float32.
        total : torch.Tensor, optional
            ``binned.sum(dim=1, keepdim=True)`` when the caller has it already (the same numbers).

        Returns
        -------
        tuple of torch.Tensor
            ``prob`` (n, K), ``buried`` (n, K), ``score``, ``unexplained``, ``dist``, ``recon`` (n,).
        """
        if total is None:
            total = binned.sum(dim=1, keepdim=True)
        if math.isfinite(self.max_counts):
            # more counts than any training spectrum (a sum spectrum): scale down to the training maximum;
            # a factor of exactly 1 changes nothing, so only a batch with such a spectrum pays for it
            factor = torch.clamp(self.max_counts / total.clamp_min(1.0), max=1.0)
            if bool((factor < 1.0).any()):
                binned = binned * factor
                total = binned.sum(dim=1, keepdim=True)
        x, logc = _features(binned, total)
        if self._net_bf16 is not None:
            logits, feats = self._net_bf16(x.to(torch.bfloat16), logc.to(torch.bfloat16))
            logits, feats = logits.float(), feats.float()
        else:
            logits, feats = self.net(x, logc)
        del x
        # the three-way softmax over (absent, surface, buried) with the three as planes (n, 3, K): softmax
        # over a middle dimension runs vectorised over the classes (over the last one of length 3 it is
        # about six times slower); the same probabilities to float32 rounding
        p3 = torch.softmax((logits / self.temperature).transpose(1, 2).contiguous(), dim=1)
        # P(surface) + P(buried) rounds to just above 1 in float32 (1.0000001) where P(absent) is tiny:
        # clamp here, the one place probabilities are made, so that 0 <= buried <= probability <= 1 holds
        # exactly on every path (identify, identify_batch, map_pigments, the HDF5 output)
        prob = (p3[:, 1] + p3[:, 2]).clamp_(0.0, 1.0)
        buried = torch.minimum(p3[:, 2].clamp(0.0, 1.0), prob)
        possible = (prob >= self._explain_p).float()
        unexplained = self._unexplained_fraction(binned, possible)
        if self._feature_mean is not None:
            z = (feats - self._feature_mean) @ self._feature_whitening
            dist = torch.sqrt((z * z).mean(dim=1))
        else:
            dist = torch.zeros_like(unexplained)
        recon = self._reconstruction(binned, total)
        score = torch.maximum(unexplained / self._u_ref, dist / self._d_ref)
        score = torch.maximum(score, recon / self._r_ref)
        return prob, buried, score, unexplained, dist, recon

    def _reconstruction(self, binned: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
        """Residual of the spectrum's shape outside the principal subspace of training spectra, in units
        of Poisson noise: ``4 N |e|^2 / (bins with counts)``, ``e`` the part of ``sqrt(counts / N)`` (minus
        the training mean) not in the span of the principal components; ~1 for a spectrum the subspace
        explains up to counting noise (Anscombe: sqrt(counts) has variance 1/4). ``total``:
        ``binned.sum(dim=1, keepdim=True)`` when the caller has it."""
        if self._pca_basis is None:
            return torch.zeros(binned.shape[0])
        if total is None:
            total = binned.sum(dim=1, keepdim=True)
        total = total.clamp_min(1.0)
        u = torch.div(binned, total).sqrt_().sub_(self._pca_mean)
        proj = (u @ self._pca_basis.T) @ self._pca_basis
        e = torch.sub(u, proj, out=proj)  # e = u - (u B^T) B, in place of the projection
        del u
        nonzero = torch.count_nonzero(binned, dim=1).clamp_min(1)
        return 4.0 * total.squeeze(1) * e.mul_(e).sum(dim=1) / nonzero

    @staticmethod
    def _background3(binned: torch.Tensor, n_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """3-bin sums and their background: a rolling minimum over ~16 bins (about 5 FWHM), computed on
        a coarse grid (stride 8), smoothed and interpolated back. Returns ``s3`` and ``bg3``, (n, n_bins).

        With ``n_keep``, both are of the first ``n_keep`` bins only (n, n_keep), computed from the bins
        that fix them (:func:`_peak_bins_needed`): bit for bit the first values of the whole-grid result.
        """
        n_bins = binned.shape[1]
        need = None if n_keep is None else _peak_bins_needed(n_bins, int(n_keep))
        s3 = _three_bin_sums(binned, n_bins if need is None else need - 1)
        m = -F.max_pool1d(-s3.unsqueeze(1), 16, stride=8, padding=8)
        m = F.avg_pool1d(m, 3, stride=1, padding=1, count_include_pad=False)
        if need is None:
            bg3 = F.interpolate(m, size=n_bins, mode="linear", align_corners=False)
        else:
            # the whole grid's coarse-to-fine scale: the same source positions and weights as the
            # whole-grid interpolation for every bin kept
            scale = n_bins / (n_bins // 8 + 1)
            bg3 = F.interpolate(m, scale_factor=scale, mode="linear", align_corners=False)
        if n_keep is not None:
            s3, bg3 = s3[:, :n_keep], bg3[..., :n_keep]
        return s3, bg3.squeeze(1)

    def _unexplained_fraction(self, binned: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        # only the analysis bins count, the grid's first ones: their background alone (the same numbers
        # as over the whole grid); the other bins of area stay zero, so that the sums below add the same
        # numbers in the same order as over the whole grid
        a = self._n_analysis
        s3, bg3 = self._background3(binned, a)
        z = (s3 - bg3) / torch.sqrt(bg3 + 1.0)
        area = binned.new_zeros(binned.shape)
        torch.mul(torch.relu(binned[:, :a] - bg3 / 3.0), z > 3.0, out=area[:, :a])
        total = area.sum(dim=1)
        explained = ((present @ self._class_masks[:, :a]) > 0) | self._always_mask[:a]
        torch.mul(area[:, :a], ~explained, out=area[:, :a])  # area is now the unexplained area
        unexpl = area.sum(dim=1)
        return torch.where(total > 10.0, unexpl / total.clamp_min(1e-6), torch.zeros_like(total))

    def identify_batch(
        self,
        counts: np.ndarray,
        calibration: EnergyCalibration | None = None,
        live_time_s: float | np.ndarray | None = None,
    ) -> BatchIdentification:
        """Identify pigments in many spectra at once.

        Parameters
        ----------
        counts : numpy.ndarray
            Counts, shape (n, channels) (a 1-D array is one spectrum), any numeric dtype, non-negative.
        calibration : EnergyCalibration, optional
            Calibration of the channels. Without it the spectra must have the model's default channel count
            (its training instrument's calibration is then assumed).
        live_time_s : float or numpy.ndarray, optional
            Live time per spectrum (scalar or shape (n,)); checked and kept for the caller, the model itself
            works on count-normalised spectra.

        Returns
        -------
        BatchIdentification
            Probabilities (n, K), buried probabilities (n, K) and OOD scores (n,).

        Raises
        ------
        ModelError
            Wrong channel count without a calibration, or a calibration outside the model's energy range.
        DataError
            Counts that are negative, NaN or of the wrong shape.
        """
        counts = np.asarray(counts)
        if counts.ndim == 1:
            counts = counts[None]
        if counts.ndim != 2:
            raise DataError(f"identify_batch needs counts of shape (n, channels), got {counts.shape}")
        check_counts(counts, "identify_batch")
        if live_time_s is not None:
            lt = np.asarray(live_time_s, dtype=float)
            if lt.ndim not in (0, 1) or (lt.ndim == 1 and lt.size != counts.shape[0]):
                raise DataError(f"live_time_s must be a scalar or shape ({counts.shape[0]},), got {lt.shape}")
        cal = self._resolve_calibration(counts.shape[1], calibration)
        n = counts.shape[0]
        k = len(self.classes)
        prob = np.empty((n, k), np.float32)
        buried = np.empty((n, k), np.float32)
        score = np.empty(n, np.float32)
        unexpl = np.empty(n, np.float32)
        total = np.empty(n, np.float32)
        for i0 in range(0, n, _INFER_CHUNK):
            sl = slice(i0, min(n, i0 + _INFER_CHUNK))
            b = torch.from_numpy(self._rebin_parallel(counts[sl], cal))
            grid_total = b.sum(dim=1, keepdim=True)
            total[sl] = grid_total.numpy()[:, 0]
            p, pb, s, u, _, _ = self._infer_binned(b, grid_total)
            prob[sl], buried[sl], score[sl], unexpl[sl] = p.numpy(), pb.numpy(), s.numpy(), u.numpy()
        return BatchIdentification(
            self.classes, prob, buried, score, self.thresholds.copy(), self.ood_threshold, unexpl, total
        )

    def identify(
        self,
        spectrum: Spectrum | np.ndarray,
        calibration: EnergyCalibration | None = None,
        *,
        check_physics: bool = True,
        instrument: Instrument | str | None = None,
        margin: float = DEFAULT_MARGIN,
    ) -> Identification:
        """Identify the pigments in one spectrum.

        Parameters
        ----------
        spectrum : Spectrum or numpy.ndarray
            A :class:`~xrfnb.Spectrum` (its calibration is used), or counts of shape (channels,).
        calibration : EnergyCalibration, optional
            Overrides the spectrum's calibration; needed for a bare array whose length differs from the
            model's default input.
        check_physics : bool
            Check the network's called set against its merge, split, drop and swap alternatives by paint
            stack fits (:func:`xrfnb.model.physics_check.check_calls`, BIC): ``present`` then follows the
            best explanation and ``alternatives`` lists those within ``margin``. Costs about a second per
            spectrum (the network alone: milliseconds); off, ``present`` is the network's call. Not checked
            (``physics_check.note`` says why) when the spectrum is out of distribution.
        instrument : Instrument or str, optional
            The instrument of the stack fits (default: the spectrum's ``metadata["instrument"]``, else
            :data:`xrfnb.physics.instrument.DEFAULT_INSTRUMENT`), with the spectrum's calibration and
            channel count.
        margin : float
            BIC difference within which alternatives are listed.

        Returns
        -------
        Identification
            Probabilities, calls with surface/buried, supporting elements, the OOD flag and, with
            ``check_physics``, the physics-checked alternatives.
        """
        if isinstance(spectrum, Spectrum):
            counts = spectrum.counts
            cal = calibration or spectrum.calibration
            lt = spectrum.live_time_s
            meta = spectrum.metadata
        else:
            counts = np.asarray(spectrum)
            if counts.ndim != 1:
                raise DataError(f"identify takes one spectrum of shape (channels,), got {counts.shape}")
            cal, lt, meta = calibration, None, {}
        batch = self.identify_batch(counts[None], cal, lt)
        prob, buried = batch.probability[0], batch.buried_probability[0]
        present_mask = batch.present[0]
        order = [int(i) for i in np.argsort(-prob) if present_mask[i]]
        network_present = tuple(self.classes[i] for i in order)
        layer = {
            self.classes[i]: ("buried" if is_buried(prob[i], buried[i]) else "surface") for i in order
        }
        counts2 = np.asarray(counts)[None]
        cal2 = self._resolve_calibration(counts2.shape[1], cal)
        check: PhysicsCheck | None = None
        present = network_present
        if check_physics:
            if bool(batch.ood[0]):
                check = PhysicsCheck(network_present, (), margin, note="out of distribution: not checked")
            else:
                try:
                    inst = resolve_instrument(instrument, meta).with_(
                        calibration=cal2, n_channels=int(counts2.shape[1])
                    )
                    check = check_calls(
                        counts2[0], inst, network_present, layer, self.class_elements, margin=margin
                    )
                except (DataError, InstrumentError, PigmentError, SimulationError) as exc:
                    check = PhysicsCheck(network_present, (), margin, note=f"the stack fit failed: {exc}")
            if check.checked and check.changed:
                best = check.explanations[0]
                index = {c: i for i, c in enumerate(self.classes)}
                present = tuple(sorted(best.classes, key=lambda c: -float(prob[index[c]])))
                layer = {c: best.layer[c] for c in present}
        b = torch.from_numpy(rebin_counts(counts2, cal2, self.energy_edges_keV))
        sig = self.element_significance(b)[0]
        evidence = {
            c: tuple(el for el in self.class_elements.get(c, ()) if sig.get(el, 0.0) >= 3.0) for c in present
        }
        return Identification(
            classes=self.classes,
            probability=prob,
            buried_probability=buried,
            thresholds=self.thresholds.copy(),
            present=present,
            layer=layer,
            evidence=evidence,
            element_significance=sig,
            ood_score=float(batch.ood_score[0]),
            ood_threshold=self.ood_threshold,
            unexplained_fraction=float(batch.unexplained_fraction[0]),
            class_pigments=dict(self.class_pigments),
            network_present=network_present,
            alternatives=check.alternatives if check is not None else (),
            physics_check=check,
        )

    @torch.inference_mode()
    def element_significance(self, binned: torch.Tensor) -> list[dict[str, float]]:
        """Per spectrum, element -> significance (sigma) of its strongest line window on the model grid.

        The significance of an element is the largest ``(S - B) / sqrt(B + 1)`` of its line windows, with
        ``S`` the counts in the window and ``B`` the rolling-minimum background under it (whole spectrum,
        escape peaks excluded).
        """
        _, bg3 = self._background3(binned)
        bg = bg3 / 3.0
        centers = self.energy_grid_keV
        out: list[dict[str, float]] = [{} for _ in range(binned.shape[0])]
        for el in self._element_masks:
            best = torch.full((binned.shape[0],), -math.inf)
            for e in element_line_energies_keV(el, float(centers[0]), float(centers[-1])):
                win = torch.from_numpy(np.abs(centers - e) <= 0.6 * float(_grid_fwhm_keV(e, self._noise_keV)))
                if not bool(win.any()):
                    continue
                s = binned[:, win].sum(dim=1)
                b = bg[:, win].sum(dim=1)
                best = torch.maximum(best, (s - b) / torch.sqrt(b + 1.0))
            for i in range(binned.shape[0]):
                out[i][el] = float(best[i]) if math.isfinite(float(best[i])) else 0.0
        return out


# ---------------------------------------------------------------------------------------------------------
# finding models
# ---------------------------------------------------------------------------------------------------------
def _package_models() -> Path:
    return _folders.package_models_folder()


def available_models() -> tuple[str, ...]:
    """Names of the models shipped with the package (:func:`xrfnb.model.folders.model_names` lists every
    name :func:`load_model` finds, those of ``$XRFNB_MODELS`` and the user's models folder included)."""
    return tuple(_folders.listed_models(_package_models()))


def load_model(name: str | os.PathLike = "default", *, precision: str = "auto") -> PigmentModel:
    """Load a pigment-identification model.

    Parameters
    ----------
    name : str or path-like
        ``"default"`` (the shipped ``xrfnb-pigments-v1``), a model's name, or a path to a model folder. A
        name is looked for (:mod:`xrfnb.model.folders`) among the shipped models, then in each folder of
        ``$XRFNB_MODELS`` (``os.pathsep``-separated), then in the user's models folder
        (``$XDG_DATA_HOME/xrfnb/models``, ``~/Library/Application Support/xrfnb/models`` on macOS,
        ``%LOCALAPPDATA%\\xrfnb\\models`` on Windows: where the dashboard writes the models it adapts),
        and last as a folder of that name in the working directory.
    precision : {"auto", "float32", "bfloat16"}
        Arithmetic of the network at inference: ``"auto"`` is bfloat16 where the CPU computes it natively
        (about five times faster, probabilities within about 0.02 of float32), else float32;
        ``$XRFNB_PRECISION`` overrides ``"auto"``. Use ``"float32"`` for results that are bit-reproducible
        across machines.

    Returns
    -------
    PigmentModel

    Raises
    ------
    ModelError
        Unknown name (the message lists the folders searched and the models found there) or an
        invalid/unsafe model folder.
    """
    resolved = resolve_precision(precision)
    if isinstance(name, PigmentModel):
        if precision == "auto" or name.precision == resolved:
            return name
        return name._with_precision(resolved)
    text = str(name)
    if text == "default":
        text = DEFAULT_MODEL
    candidates: list[Path] = []
    if isinstance(name, os.PathLike) or _is_path(text):
        candidates.append(Path(text).expanduser())
    else:
        found = _folders.find_model(text)
        if found is not None:
            candidates.append(found)
        candidates.append(Path(text))  # a folder of that name in the working directory
    for c in candidates:
        if c.is_dir():
            return _load_cached(str(c.resolve()), resolved)
    raise ModelError(_unknown_model_text(str(name), text))


def _is_path(text: str) -> bool:
    """Whether a model given as text is a path (a separator or a leading dot), not a name."""
    return os.sep in text or "/" in text or text.startswith(".")


def _unknown_model_text(name: str, text: str) -> str:
    """What :func:`load_model` says of a name it did not find: the folders it searched, the names it found
    there, and a folder of that name without a ``model.json``, if any."""
    if _is_path(text):
        return (
            f"unknown model {name!r}: no such folder; give the path of a folder with model.safetensors and "
            f"model.json, or a model's name ({', '.join(_folders.model_names()) or 'none found'})"
        )
    roots = [r for r in os.environ.get("XRFNB_MODELS", "").split(os.pathsep) if r]
    env = ", ".join(str(Path(r).expanduser()) for r in roots) if roots else "not set"
    searched = (
        f"the shipped models ({_package_models()}), $XRFNB_MODELS ({env}), the user's models folder "
        f"({_folders.user_models_folder()}) and the working directory"
    )
    empty = [str(folder / text) for folder in _folders.search_folders() if (folder / text).is_dir()]
    hint = f" ({', '.join(empty)} has no {META_FILE})" if empty else ""
    return (
        f"unknown model {name!r}: no folder of that name with a {META_FILE} in {searched}{hint}; models "
        f"found there: {', '.join(_folders.model_names()) or 'none'}. Give one of these names, or the path "
        "of a folder with model.safetensors and model.json"
    )


_CACHE: dict[tuple[str, float, str], PigmentModel] = {}


def _load_cached(folder: str, precision: str) -> PigmentModel:
    try:
        mtime = os.path.getmtime(os.path.join(folder, WEIGHTS_FILE))
    except OSError:
        mtime = -1.0
    key = (folder, mtime, precision)
    if key not in _CACHE:
        _CACHE[key] = PigmentModel.from_dir(folder, precision=precision)
    return _CACHE[key]
