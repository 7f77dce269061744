"""``xrfnb.model.nn.rebin_counts``'s prefix-sum path for unsigned counts (issue 21, mapping speed) gives the
same float32 bytes as the reduceat formula it replaces, for every unsigned dtype, calibrations inside,
across and outside the model grid, and counts up to the limit where it falls back to that formula."""

from __future__ import annotations

import numpy as np
import pytest

from xrfnb.core.calibration import EnergyCalibration
from xrfnb.model import nn


def _reference(counts: np.ndarray, calibration: EnergyCalibration, edges_keV: np.ndarray) -> np.ndarray:
    """The reduceat formula of rebin_counts (its only path before the prefix sums)."""
    n_ch = counts.shape[1]
    pos = np.clip(np.asarray(calibration.channel(edges_keV), dtype=np.float64) + 0.5, 0.0, float(n_ch))
    idx = np.minimum(np.floor(pos).astype(np.intp), n_ch - 1)
    frac = (pos - idx).astype(np.float32)
    dtype = np.float64 if counts.dtype == np.float64 else np.float32
    whole = np.add.reduceat(counts, idx, axis=1, dtype=dtype)[:, :-1]
    empty = idx[:-1] >= idx[1:]
    if empty.any():
        whole[:, empty] = 0
    cut = counts[:, idx] * frac
    return (whole + cut[:, 1:] - cut[:, :-1]).astype(np.float32, copy=False)


CALIBRATIONS = [
    EnergyCalibration(0.0, 0.01),  # the benchmarks' 4096 x 10 eV
    EnergyCalibration(-0.96, 0.0148),  # a Bruker M6 header
    EnergyCalibration(0.5, 0.02, 1e-7),  # quadratic
    EnergyCalibration(5.0, 0.001),  # 1 eV channels: wide bins in channels, part of the grid only
    EnergyCalibration(-2.0, 0.08),  # coarse: several bins inside one channel
]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("cal", CALIBRATIONS, ids=str)
@pytest.mark.parametrize("n_ch", [512, 4096])
def test_prefix_sums_equal_the_reduceat_formula(dtype, cal, n_ch):
    rng = np.random.default_rng(n_ch + np.dtype(dtype).itemsize)
    counts = rng.poisson(rng.uniform(0.1, 30.0, (64, 1)), (64, n_ch))
    counts[3, 100:140] = np.iinfo(dtype).max if np.dtype(dtype).itemsize == 1 else 60000  # hot channels
    counts[5] = 0
    counts = counts.astype(dtype)
    edges = nn.energy_grid_edges_keV()
    got = nn.rebin_counts(counts, cal, edges)
    want = _reference(counts, cal, edges)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


def test_large_counts_fall_back_to_the_reduceat_formula():
    """Counts whose bin sums could reach 2**24 (inexact in float32) take the old path: same bytes."""
    counts = np.full((4, 4096), 3_000_000, np.uint32)
    edges = nn.energy_grid_edges_keV()
    idx = np.minimum(np.floor(np.clip(EnergyCalibration(0.0, 0.01).channel(edges) + 0.5, 0, 4096)), 4095)
    assert not nn._sums_exact_in_float32(counts, idx.astype(np.intp))
    got = nn.rebin_counts(counts, EnergyCalibration(0.0, 0.01), edges)
    assert got.tobytes() == _reference(counts, EnergyCalibration(0.0, 0.01), edges).tobytes()


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_signed_and_float_counts_keep_the_reduceat_formula(dtype):
    counts = np.random.default_rng(1).poisson(5.0, (16, 2048)).astype(dtype)
    cal, edges = EnergyCalibration(0.0, 0.02), nn.energy_grid_edges_keV()
    assert nn.rebin_counts(counts, cal, edges).tobytes() == _reference(counts, cal, edges).tobytes()
