"""The pigment-identification network and its fixed input representation.

Every spectrum, whatever its calibration and channel count, is first rebinned (counts-conserving) onto the
model's own energy grid. The grid's bin width grows with energy like the detector resolution,

    FWHM(E) = sqrt(noise^2 + 8 ln2 * fano * epsilon * E),   epsilon = 3.65e-3 keV (Si pair energy),

so that a peak spans about the same number of bins (about three per FWHM) everywhere: a low-energy peak is
not blurred and a high-energy peak is not spread over many almost empty bins. With ``u(E) = sqrt(noise^2 +
c E)`` the bin edges are equidistant in ``u`` (``dE / FWHM(E)`` integrates to ``2 u / c``).

The network is deliberately small and GEMM-shaped (one strided convolution, then fully connected layers),
because whole-scan mapping needs tens of thousands of spectra per second on two CPU cores. Its output per
pigment class is a three-way softmax: absent / present in the surface layer / present only below the
surface layer (within the probed depth).

The first fully connected layer holds most of the arithmetic (2,049 inputs to 512 outputs: 85 % of the
multiply-adds). With ``rank`` it is factored into a projection onto ``rank`` directions followed by the
layer from them (:func:`factor_first_layer` makes the factors from a trained full layer, keeping the
directions that carry the layer's output on real inputs), which at rank 128 cuts the network's work to
about 40 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .._errors import ModelError
from ..core.calibration import EnergyCalibration

__all__ = [
    "PigmentNet",
    "energy_grid_edges_keV",
    "factor_first_layer",
    "features_from_binned",
    "rebin_counts",
]

#: Fano factor and Si electron-hole pair energy (keV) that shape the model's grid (not a detector model).
_FANO = 0.115
_PAIR_keV = 3.65e-3


def energy_grid_edges_keV(
    n_bins: int = 512, e_min_keV: float = 1.0, e_max_keV: float = 41.0, noise_keV: float = 0.08
) -> np.ndarray:
    """Bin edges of the model's energy grid, equidistant in the square root of the detector variance.

    Parameters
    ----------
    n_bins : int
        Number of bins.
    e_min_keV, e_max_keV : float
        Energy range in keV.
    noise_keV : float
        Electronic-noise FWHM in keV of the reference detector that shapes the bin widths.

    Returns
    -------
    numpy.ndarray
        Edges in keV, shape (n_bins + 1,), increasing.
    """
    if n_bins < 8 or not 0 < e_min_keV < e_max_keV:
        raise ModelError(f"invalid energy grid: {n_bins} bins from {e_min_keV} to {e_max_keV} keV")
    c = 8.0 * math.log(2.0) * _FANO * _PAIR_keV
    u_lo, u_hi = math.sqrt(noise_keV**2 + c * e_min_keV), math.sqrt(noise_keV**2 + c * e_max_keV)
    u = np.linspace(u_lo, u_hi, n_bins + 1)
    return (u**2 - noise_keV**2) / c


def _edge_positions(calibration: EnergyCalibration, n_channels: int, edges_keV: np.ndarray) -> np.ndarray:
    """Positions of the grid edges on the cumulative-counts axis of the input channels, shape (n_edges,).

    Channel ``i`` covers the energies between channels ``i - 1/2`` and ``i + 1/2``; the cumulative sum
    ``C[j] = counts[:j].sum()`` is linear inside each channel, so position ``p`` (in channels, from the
    low edge of channel 0) reads ``C`` at ``floor(p)`` plus a fraction of channel ``floor(p)``.
    """
    pos = np.asarray(calibration.channel(edges_keV), dtype=np.float64) + 0.5
    return np.clip(pos, 0.0, float(n_channels))


def rebin_counts(counts: np.ndarray, calibration: EnergyCalibration, edges_keV: np.ndarray) -> np.ndarray:
    """Counts-conserving rebinning of spectra onto other bin edges.

    Counts are assumed uniformly spread over each input channel; grid bins outside the input's energy range
    receive zero counts.

    Parameters
    ----------
    counts : numpy.ndarray
        Counts, shape (n, channels), any numeric dtype.
    calibration : EnergyCalibration
        Calibration of the input channels.
    edges_keV : numpy.ndarray
        Target bin edges in keV, shape (n_bins + 1,).

    Returns
    -------
    numpy.ndarray
        Counts per target bin, shape (n, n_bins), float32.
    """
    counts = np.asarray(counts)
    n_ch = counts.shape[1]
    pos = _edge_positions(calibration, n_ch, edges_keV)
    idx = np.minimum(np.floor(pos).astype(np.intp), n_ch - 1)
    frac = (pos - idx).astype(np.float32)
    if _sums_exact_in_float32(counts, idx):
        # unsigned counts: the same numbers from differences of 32-bit prefix sums (exact integers, as the
        # float32 sums below are while they stay under 2**24), 1.4 (uint16) to 2 (uint32) times faster
        prefix = np.empty((counts.shape[0], n_ch + 1), np.uint32)
        prefix[:, 0] = 0
        np.cumsum(counts, axis=1, dtype=np.uint32, out=prefix[:, 1:])
        at = prefix.take(np.concatenate([idx, idx + 1]), axis=1)
        lo, hi = at[:, : idx.size], at[:, idx.size :]
        whole32 = (lo[:, 1:] - lo[:, :-1]).astype(np.float32)
        cut = (hi - lo).astype(counts.dtype) * frac  # counts[:, idx] * frac, in the same dtypes
        return (whole32 + cut[:, 1:] - cut[:, :-1]).astype(np.float32, copy=False)
    # whole channels idx[i] .. idx[i+1]-1 (np.add.reduceat, one pass over the data), then the fractions of
    # the channels cut by the edges: C(pos) = sum(counts[:idx]) + frac * counts[idx]
    dtype = np.float64 if counts.dtype == np.float64 else np.float32
    whole = np.add.reduceat(counts, idx, axis=1, dtype=dtype)[:, :-1]
    empty = idx[:-1] >= idx[1:]
    if empty.any():
        whole[:, empty] = 0
    cut = counts[:, idx] * frac
    return (whole + cut[:, 1:] - cut[:, :-1]).astype(np.float32, copy=False)


def _sums_exact_in_float32(counts: np.ndarray, idx: np.ndarray) -> bool:
    """Whether :func:`rebin_counts` may take its prefix-sum path: unsigned counts whose sums over any bin
    stay below 2**24 (so float32 holds every partial sum exactly) and bin edges in order."""
    if counts.dtype.kind != "u" or counts.size == 0 or idx.size < 2:
        return False
    width = np.diff(idx)
    if width.min() < 0:
        return False
    top = np.iinfo(counts.dtype).max if counts.dtype.itemsize <= 2 else int(counts.max())
    return int(top) * max(1, int(width.max())) < 1 << 24


def features_from_binned(binned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input from counts on the model grid.

    Parameters
    ----------
    binned : torch.Tensor
        Counts per grid bin, shape (n, n_bins), float32.

    Returns
    -------
    x : torch.Tensor
        Shape (n, 2, n_bins): ``sqrt(f)`` and ``log1p(f)`` with ``f = counts / total * n_bins`` (a flat
        spectrum gives 1 everywhere), so spectra of 100 and 100,000 counts look alike but for noise.
    log_counts : torch.Tensor
        Shape (n, 1): ``log10(total counts on the grid + 1)``; the network needs it to judge how
        significant a weak peak is.
    """
    total = binned.sum(dim=1, keepdim=True)
    f = binned * (binned.shape[1] / total.clamp_min(1.0))
    x = torch.stack((torch.sqrt(f), torch.log1p(f)), dim=1)
    return x, torch.log10(total + 1.0)


class PigmentNet(nn.Module):
    """Small 1-D CNN + MLP: spectrum on the model grid -> per-class (absent, surface, buried) logits.

    Parameters
    ----------
    n_bins : int
        Bins of the model grid (even).
    n_classes : int
        Number of pigment classes K.
    conv_channels : int
        Filters of the strided input convolution (0: no convolution, a plain MLP).
    kernel : int
        Width of the convolution in bins (odd).
    hidden : sequence of int
        Widths of the fully connected layers; the last is the feature vector used for the
        out-of-distribution distance.
    dropout : float
        Dropout after each hidden layer (training only).
    rank : int
        0: the first fully connected layer is a full matrix. Otherwise it is factored: a projection
        (``project``, no bias) onto ``rank`` directions, then ``mlp[0]`` from those to ``hidden[0]``.
    """

    def __init__(
        self,
        n_bins: int,
        n_classes: int,
        *,
        conv_channels: int = 8,
        kernel: int = 7,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.n_bins = int(n_bins)
        self.n_classes = int(n_classes)
        self.conv_channels = int(conv_channels)
        self.kernel = int(kernel)
        self.hidden = tuple(int(h) for h in hidden)
        self.rank = int(rank)
        if not self.hidden:
            raise ModelError("PigmentNet needs at least one hidden layer")
        if self.rank < 0:
            raise ModelError(f"PigmentNet rank must be >= 0 (0: a full first layer), got {self.rank}")
        if self.conv_channels > 0:
            self.conv = nn.Conv1d(2, self.conv_channels, self.kernel, stride=2, padding=self.kernel // 2)
            n_in = self.conv_channels * ((self.n_bins + 2 * (self.kernel // 2) - self.kernel) // 2 + 1)
        else:
            self.conv = None
            n_in = 2 * self.n_bins
        n_in += 1  # log10 of the counts joins the flattened convolution
        self.project = nn.Linear(n_in, self.rank, bias=False) if self.rank else None
        n_in = self.rank or n_in
        layers: list[nn.Module] = []
        for h in self.hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
            n_in = h
        self.mlp = nn.ModuleList(layers)
        self.head = nn.Linear(n_in, 3 * self.n_classes)

    def forward(self, x: torch.Tensor, log_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and features.

        Parameters
        ----------
        x : torch.Tensor
            Shape (n, 2, n_bins) from :func:`features_from_binned`.
        log_counts : torch.Tensor
            Shape (n, 1).

        Returns
        -------
        logits : torch.Tensor
            Shape (n, K, 3): absent, present in the surface layer, present only below it.
        features : torch.Tensor
            Shape (n, hidden[-1]), the last hidden layer (after ReLU).
        """
        h = self.first_layer_inputs(x, log_counts)
        if self.project is not None:
            h = self.project(h)
        for layer in self.mlp:
            h = layer(h)
        return self.head(h).view(-1, self.n_classes, 3), h

    def arch(self) -> dict:
        """Constructor arguments (for model.json)."""
        return {
            "n_bins": self.n_bins,
            "n_classes": self.n_classes,
            "conv_channels": self.conv_channels,
            "kernel": self.kernel,
            "hidden": list(self.hidden),
            "rank": self.rank,
        }

    def first_layer_inputs(self, x: torch.Tensor, log_counts: torch.Tensor) -> torch.Tensor:
        """What the first fully connected layer (or the projection) receives, shape (n, inputs)."""
        if self.conv is None:
            return torch.cat((x.flatten(1), log_counts), dim=1)
        # the convolution as a 2-D one over a height of 1: the same sums, two to three times faster on
        # CPUs than torch's 1-D path for these few channels
        h = torch.nn.functional.conv2d(
            x.unsqueeze(2), self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, 2),
            padding=(0, self.kernel // 2),
        ).flatten(1)
        if torch.is_grad_enabled():
            return torch.cat((torch.relu(h), log_counts), dim=1)
        # inference: the ReLU writes straight into the layer's input (no copy for the concatenation)
        out = torch.empty((h.shape[0], h.shape[1] + 1), dtype=h.dtype)
        torch.clamp(h, min=0.0, out=out[:, :-1])
        out[:, -1:] = log_counts
        return out


def factor_first_layer(net: PigmentNet, binned: np.ndarray, rank: int) -> PigmentNet:
    """A copy of a network whose full first layer is factored to ``rank``, fitted to real inputs.

    The factors minimise the mean squared change of the layer's output over the inputs of ``binned``
    (not of its weights): with ``C`` the second-moment matrix of the layer's inputs and ``W`` its weights,
    the kept directions are the leading left singular vectors ``U_r`` of ``W C^(1/2)``, and the layer
    becomes ``U_r (U_r^T W) x + b`` (projection ``U_r^T W``, then ``U_r``). Directions of the input that
    the spectra never take cost no rank, which a plain SVD of ``W`` would spend rank on.

    Parameters
    ----------
    net : PigmentNet
        A trained network with a full first layer (``rank == 0``); left unchanged.
    binned : numpy.ndarray
        Spectra on the model grid, shape (n, n_bins), of the distribution the network is used on (e.g.
        the validation set of its training run).
    rank : int
        Directions kept, 1 to the layer's output width.

    Returns
    -------
    PigmentNet
        The factored network (``rank`` set), in evaluation mode.
    """
    if net.rank:
        raise ModelError(f"the network's first layer is already factored (rank {net.rank})")
    first = net.mlp[0]
    if not 1 <= int(rank) <= first.out_features:
        raise ModelError(f"rank must be 1-{first.out_features} for this network, got {rank}")
    with torch.inference_mode():
        moment = torch.zeros((first.in_features, first.in_features), dtype=torch.float64)
        for i in range(0, binned.shape[0], 4096):
            x, lc = features_from_binned(torch.from_numpy(np.asarray(binned[i : i + 4096], np.float32)))
            h = net.first_layer_inputs(x, lc).double()  # no dropout before the first layer
            moment += h.T @ h
        moment /= max(binned.shape[0], 1)
        w = first.weight.detach().double()
        evals, evecs = torch.linalg.eigh(moment)
        root = (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T
        u = torch.linalg.svd(w @ root, full_matrices=False)[0][:, : int(rank)]
    out = PigmentNet(net.n_bins, net.n_classes, conv_channels=net.conv_channels, kernel=net.kernel,
                     hidden=net.hidden, dropout=float(net.mlp[2].p), rank=int(rank))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["project.weight"] = (u.T @ w).float().contiguous()
    state["mlp.0.weight"] = u.float().contiguous()
    out.load_state_dict(state, strict=True)
    return out.eval()
