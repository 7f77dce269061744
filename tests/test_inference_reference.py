"""The model's inference path (issue 21, mapping speed) against a straightforward reference.

``PigmentModel._infer_binned`` computes the out-of-distribution terms on the analysis bins only (the
unexplained-peak background from the first ~280 of 512 bins), the 3-bin sums from shifted slices instead of
an average pool, the network input without a stacking copy, the three-way softmax with the classes
vectorised, and skips the count cap where no spectrum reaches it. The reference below is the code as it
was before (pools over the whole grid, ``features_from_binned``, softmax over the last dimension): the OOD
terms must come out bit for bit, the probabilities within float32 rounding; on simulated paint spectra at
several calibrations (1,024 / 2,048 / 4,096 channels, offsets), sum spectra above the count cap and empty
ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xrfnb
from xrfnb import EnergyCalibration
from xrfnb.model.model import PigmentModel, load_model
from xrfnb.model.nn import features_from_binned, rebin_counts


@torch.inference_mode()
def _reference_infer(model: PigmentModel, binned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``_infer_binned`` as it was written before the speed work (float32 network)."""
    if math.isfinite(model.max_counts):
        total = binned.sum(dim=1, keepdim=True)
        binned = binned * torch.clamp(model.max_counts / total.clamp_min(1.0), max=1.0)
    x, logc = features_from_binned(binned)
    logits, feats = model.net(x, logc)
    p3 = torch.softmax(logits / model.temperature, dim=2)
    prob = (p3[..., 1] + p3[..., 2]).clamp_(0.0, 1.0)
    buried = torch.minimum(p3[..., 2].clamp(0.0, 1.0), prob)
    possible = (prob >= model._explain_p).float()
    s3, bg3 = _reference_background3(binned)
    z = (s3 - bg3) / torch.sqrt(bg3 + 1.0)
    net = torch.relu(binned - bg3 / 3.0)
    area = net * ((z > 3.0) & model._analysis_mask)
    explained = ((possible @ model._class_masks) > 0) | model._always_mask
    total = area.sum(dim=1)
    unexpl = (area * ~explained).sum(dim=1)
    unexplained = torch.where(total > 10.0, unexpl / total.clamp_min(1e-6), torch.zeros_like(total))
    zf = (feats - model._feature_mean) @ model._feature_whitening
    dist = torch.sqrt((zf * zf).mean(dim=1))
    total = binned.sum(dim=1, keepdim=True).clamp_min(1.0)
    u = torch.sqrt(binned / total) - model._pca_mean
    e = u - (u @ model._pca_basis.T) @ model._pca_basis
    recon = 4.0 * total.squeeze(1) * (e * e).sum(dim=1) / (binned > 0).sum(dim=1).clamp_min(1)
    score = torch.maximum(unexplained / model._u_ref, dist / model._d_ref)
    score = torch.maximum(score, recon / model._r_ref)
    return prob, buried, score, unexplained, dist, recon


def _reference_background3(binned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = binned.unsqueeze(1)
    s3 = F.avg_pool1d(y, 3, stride=1, padding=1, count_include_pad=False) * 3.0
    m = -F.max_pool1d(-s3, 16, stride=8, padding=8)
    m = F.avg_pool1d(m, 3, stride=1, padding=1, count_include_pad=False)
    bg3 = F.interpolate(m, size=binned.shape[1], mode="linear", align_corners=False)
    return s3.squeeze(1), bg3.squeeze(1)


@pytest.fixture(scope="module")
def model() -> PigmentModel:
    return load_model("default", precision="float32")


@pytest.fixture(scope="module")
def spectra() -> np.ndarray:
    """Simulated paint spectra (the demo scene, 4096 channels of the M6 preset), a few times 40 (above the
    model's count cap) and a few empty."""
    scan, _ = xrfnb.render_scan(
        xrfnb.scenes()[0],
        xrfnb.Instrument.preset("bruker-m6"),
        counts_per_pixel=2000,
        rng=np.random.default_rng(5),
    )
    counts = np.asarray(scan.counts).reshape(-1, scan.shape[2])[:1500].astype(np.uint32)
    counts[:8] *= 40
    counts[8:11] = 0
    return counts, scan.calibration


def _calibrations(cal: EnergyCalibration):
    """The scan's own axis and the same spectra summed to 2,048 and 1,024 channels, and shifted."""
    yield "4096", cal, 1
    yield "2048", EnergyCalibration(cal.energy_keV(0.5), 2 * cal.gain_keV), 2
    yield "1024", EnergyCalibration(cal.energy_keV(1.5), 4 * cal.gain_keV), 4
    yield "1024+offset", EnergyCalibration(cal.energy_keV(1.5) + 0.137, 4 * cal.gain_keV), 4


def _check_against_reference(model: PigmentModel, binned: torch.Tensor, where: str) -> None:
    with torch.inference_mode():
        got = model._infer_binned(binned)
        want = _reference_infer(model, binned)
    names = ("prob", "buried", "score", "unexplained", "dist", "recon")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, (where, name)
        if name in ("prob", "buried"):  # the softmax's exponentials: float32 rounding
            assert float((a - b).abs().max()) <= 1e-6, (where, name)
        else:  # the OOD terms: the same numbers
            assert torch.equal(a, b), (where, name, float((a - b).abs().max()))
    # the unexplained-peak term is not trivially zero on these spectra
    assert float(got[3].max()) > 0.01, where


@pytest.mark.parametrize("which", ["4096", "2048", "1024", "1024+offset"])
def test_inference_equals_the_reference_at_several_calibrations(model, spectra, which):
    counts, cal0 = spectra
    name, cal, k = next(c for c in _calibrations(cal0) if c[0] == which)
    summed = counts.reshape(counts.shape[0], -1, k).sum(axis=2, dtype=np.uint32)
    binned = torch.from_numpy(rebin_counts(summed, cal, model.energy_edges_keV))
    assert float(binned.sum(dim=1).max()) > model.max_counts  # the cap is exercised
    _check_against_reference(model, binned, name)
    # identify_batch end to end: the same OOD scores and counts, probabilities to rounding
    res = model.identify_batch(summed, cal)
    prob, _, score, unexpl, _, _ = _reference_infer(model, binned)
    np.testing.assert_array_equal(res.ood_score, score.numpy())
    np.testing.assert_array_equal(res.unexplained_fraction, unexpl.numpy())
    np.testing.assert_array_equal(res.total_counts, binned.sum(dim=1).numpy())
    assert float(np.abs(res.probability - prob.numpy()).max()) <= 1e-6


def test_batches_without_a_spectrum_above_the_count_cap(model, spectra):
    """The cap's scaling is skipped where no spectrum reaches it: the same numbers as scaling by 1."""
    counts, cal = spectra
    binned = torch.from_numpy(rebin_counts(counts[20:400], cal, model.energy_edges_keV))
    assert float(binned.sum(dim=1).max()) < model.max_counts
    _check_against_reference(model, binned, "below the cap")


@pytest.mark.parametrize("n_bins", [40, 64, 200, 512, 1000])
def test_background_of_the_first_bins_equals_the_whole_grid_one(n_bins):
    """``_background3(binned, n_keep)`` is bit for bit the first ``n_keep`` bins of the whole-grid result
    for every ``n_keep`` (it reads only the bins that fix them)."""
    rng = np.random.default_rng(n_bins)
    shape = rng.uniform(1, 50, n_bins) * (1 + 30 * (rng.random(n_bins) < 0.05))
    binned = torch.from_numpy(rng.poisson(shape, (16, n_bins)).astype(np.float32))
    s3_all, bg3_all = _reference_background3(binned)
    new_all = PigmentModel._background3(binned)
    assert torch.equal(new_all[0], s3_all) and torch.equal(new_all[1], bg3_all)
    for n_keep in range(1, n_bins + 1):
        s3, bg3 = PigmentModel._background3(binned, n_keep)
        assert s3.shape == (16, n_keep) and bg3.shape == (16, n_keep)
        assert torch.equal(s3, s3_all[:, :n_keep]), n_keep
        assert torch.equal(bg3, bg3_all[:, :n_keep]), n_keep


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.float32])
def test_rebinning_in_pieces_on_threads_equals_one_call(model, spectra, dtype):
    """``_rebin_parallel`` (rows split over threads, each rebinning 256 rows at a time) gives the bytes of
    one ``rebin_counts`` call over all rows, also where some pieces hold counts too large for the exact
    prefix sums (those pieces take the other path; both give the same bytes)."""
    counts, cal = spectra
    x = np.concatenate([counts, counts[:700]]).astype(dtype)
    if dtype == np.uint32:
        x[300:310] = 3_000_000  # bin sums beyond 2**24 in one piece only
    got = model._rebin_parallel(x, cal)
    want = rebin_counts(x, cal, model.energy_edges_keV)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
