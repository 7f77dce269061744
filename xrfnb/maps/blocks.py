"""Identification of one block of pixels, shared by the streaming and the dask paths of
:func:`xrfnb.map_pigments`: the mask reason of each pixel, then the model on the valid ones in batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._errors import ModelError
from ..core.calibration import EnergyCalibration
from .pigmentmaps import MASK_DEAD, MASK_INVALID, MASK_OK, MASK_SATURATED

if TYPE_CHECKING:  # pragma: no cover
    from ..model.model import PigmentModel

__all__ = ["classify_pixels", "default_saturation", "process_block"]

#: blocks with at most this share of dead or saturated pixels pass them to the model with the others
_MAX_MASKED_SHARE = 0.02


def classify_pixels(counts: np.ndarray, saturation_counts: float | None) -> np.ndarray:
    """Mask reason per spectrum: 0 valid, 1 dead, 2 saturated, 3 invalid.

    Parameters
    ----------
    counts : numpy.ndarray, shape (n, channels)
        Raw counts in any numeric dtype.
    saturation_counts : float or None
        A channel at or above this value marks the pixel saturated (None: never).

    Returns
    -------
    numpy.ndarray, shape (n,), uint8
    """
    kind = counts.dtype.kind
    reason = np.zeros(counts.shape[0], dtype=np.uint8)
    if counts.shape[0] == 0:
        return reason
    mx = counts.max(axis=1)
    if kind == "u":
        invalid = np.zeros(counts.shape[0], dtype=bool)
    else:
        mn = counts.min(axis=1)
        with np.errstate(invalid="ignore"):
            invalid = (mn < 0) if kind in "iu" else ~(np.isfinite(mx) & np.isfinite(mn)) | (mn < 0)
    with np.errstate(invalid="ignore"):
        dead = mx == 0
        if saturation_counts is not None:
            reason[mx >= saturation_counts] = MASK_SATURATED
    reason[dead] = MASK_DEAD
    reason[invalid] = MASK_INVALID
    return reason


def default_saturation(dtype: np.dtype) -> float | None:
    """Counts at which a pixel is saturated by default: the maximum of an integer ``dtype`` (a clipped
    counter), None (never) for float data."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).max)
    return None


def process_block(
    block: np.ndarray,
    model: PigmentModel,
    calibration: EnergyCalibration,
    live_time_s: float | np.ndarray | None,
    saturation_counts: float | None,
    batch_pixels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Identify one block of pixels.

    Parameters
    ----------
    block : numpy.ndarray, shape (r, c, channels)
        Raw counts in the scan's dtype (the model rebins any numeric dtype).
    model : PigmentModel
        Anything with ``classes`` and ``identify_batch(counts, calibration, live_time_s=...)``.
    calibration : EnergyCalibration
        Energy calibration of the counts' channels.
    live_time_s : float, numpy.ndarray of shape (r, c), or None
        Live time per pixel in seconds.
    saturation_counts : float or None
        A channel at or above this value marks the pixel saturated (None: never).
    batch_pixels : int
        Spectra passed to the model at once.

    Returns
    -------
    probability, buried_probability : numpy.ndarray, shape (r, c, K), float32
        NaN at masked pixels. A block with few dead or saturated pixels (at most 2 %) and no invalid one
        passes them to the model with the others (``model.identify_batch`` then sees every pixel of the
        block, in order) and drops their results.
    ood_score : numpy.ndarray, shape (r, c), float32
        NaN at masked pixels.
    reason : numpy.ndarray, shape (r, c), uint8
        Mask reasons (:data:`xrfnb.maps.pigmentmaps.MASK_REASONS`; 0 valid).
    """
    r, c, ch = block.shape
    k = len(model.classes)
    flat = block.reshape(r * c, ch)
    reason = classify_pixels(flat, saturation_counts)
    prob = np.full((r * c, k), np.nan, dtype=np.float32)
    bur = np.full((r * c, k), np.nan, dtype=np.float32)
    ood = np.full(r * c, np.nan, dtype=np.float32)
    valid = reason == MASK_OK
    valid_idx = np.flatnonzero(valid)
    # a few dead or saturated pixels (and no invalid one) go through the model with the others and their
    # results are dropped: batches are then slices of the block, where a selection of the valid pixels
    # would copy every batch that holds one of them
    n_masked = r * c - valid_idx.size
    whole = n_masked <= _MAX_MASKED_SHARE * r * c and not (reason == MASK_INVALID).any()
    n_model = r * c if whole else valid_idx.size
    lt_flat = (
        None if live_time_s is None or np.ndim(live_time_s) == 0 else np.asarray(live_time_s).reshape(-1)
    )
    for s in range(0, n_model, batch_pixels):
        if whole:
            sel: slice | np.ndarray = slice(s, min(s + batch_pixels, r * c))
        else:
            sel = valid_idx[s : s + batch_pixels]
        x = flat[sel]  # raw dtype: the model rebins any numeric dtype (no float copy of the block)
        lt = live_time_s if lt_flat is None else lt_flat[sel]
        res = model.identify_batch(x, calibration, live_time_s=lt)
        n = x.shape[0]
        p = np.asarray(res.probability, dtype=np.float32)
        b = np.asarray(res.buried_probability, dtype=np.float32)
        o = np.asarray(res.ood_score, dtype=np.float32).reshape(-1)
        if p.shape != (n, k) or b.shape != (n, k) or o.shape != (n,):
            raise ModelError(
                f"model returned probability {p.shape}, buried {b.shape}, ood {o.shape} for {n} spectra "
                f"and {k} classes"
            )
        prob[sel], bur[sel], ood[sel] = p, b, o
    if whole and n_masked:
        prob[~valid] = np.nan
        bur[~valid] = np.nan
        ood[~valid] = np.nan
    return prob.reshape(r, c, k), bur.reshape(r, c, k), ood.reshape(r, c), reason.reshape(r, c)
