"""Exact sampling of photon channels from fixed discrete distributions (detector response rows).

:class:`GuideSampler` draws the channel of each detected photon from its row of a response matrix; the
batch simulator (:func:`xrfnb.physics.simulate.simulate_batch`) and the scene generator
(:mod:`xrfnb.physics.scenes`) use it for low-count spectra, where drawing photons is cheaper than
Poisson counts per channel.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GuideSampler"]


class GuideSampler:
    """Exact sampling of channels from fixed discrete distributions (rows) by guide-table inversion.

    For every row a guide table of ``K`` entries (``k_factor * channels`` rounded up to a power of 2)
    gives, for ``u`` in ``[q/K, (q+1)/K)``, the first channel whose cumulative probability exceeds
    ``q/K``; when that channel is not yet the inverse-CDF channel of ``u``, a vectorised bisection up to
    the next guide entry finds it (Chen and Asau, 1974). Exact; about 30-50 ns per photon.

    Parameters
    ----------
    rows : numpy.ndarray
        (R, C) non-negative weights: row ``r`` is the distribution over C channels (normalised here).
    k_factor : int, optional
        Guide entries per channel (rounded up to a power of 2 in total).

    Attributes
    ----------
    shape : tuple of int
        (R, C), the shape of ``rows``.
    """

    def __init__(self, rows: np.ndarray, k_factor: int = 1) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        r, c = rows.shape
        sums = rows.sum(axis=1, keepdims=True)
        cdf = np.cumsum(rows / np.where(sums > 0, sums, 1.0), axis=1).astype(np.float32)
        # every u < 1 stops at the last channel of non-zero probability at the latest (float32 sums
        # may end just below 1)
        last = c - 1 - np.argmax(rows[:, ::-1] > 0, axis=1)
        cdf[np.arange(c)[None, :] >= last[:, None]] = 2.0
        self.k = 1 << int(np.ceil(np.log2(k_factor * c)))  # a power of 2: u * k is exact in float32
        grid = (np.arange(self.k) / self.k).astype(np.float32)
        guide = np.empty((r, self.k), dtype=np.int32)
        for i in range(r):
            guide[i] = np.searchsorted(cdf[i], grid, side="right")
        np.minimum(guide, c - 1, out=guide)
        guide += (np.arange(r, dtype=np.int32) * c)[:, None]  # flat index into cdf
        self.guide = guide.ravel()
        self.flat_cdf = cdf.ravel()
        self.c = c
        self.shape = rows.shape

    def sample(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw one channel per photon from the distribution of its row.

        Parameters
        ----------
        row : numpy.ndarray
            Row index of each photon, int32, shape (n,).
        rng : numpy.random.Generator
            Source of the uniform draws (one float32 per photon).

        Returns
        -------
        numpy.ndarray
            Channels, int32, shape (n,).
        """
        u = rng.random(row.size, dtype=np.float32)
        q = (u * np.float32(self.k)).astype(np.int32)
        np.minimum(q, self.k - 1, out=q)
        q += row * np.int32(self.k)
        flat = self.guide[q]
        todo = np.nonzero(self.flat_cdf[flat] <= u)[0]
        if todo.size:
            # the answer lies in (flat, guide[q + 1]]: vectorised bisection on the few that need it
            lo = flat[todo]
            qn = q[todo] + 1
            last_cell = (qn % self.k) == 0
            hi = np.where(last_cell, (row[todo] + 1) * self.c - 1, self.guide[np.where(last_cell, 0, qn)])
            ut = u[todo]
            while True:
                gap = hi - lo > 1
                if not gap.any():
                    break
                mid = (lo + hi) // 2
                below = gap & (self.flat_cdf[mid] <= ut)
                lo = np.where(below, mid, lo)
                hi = np.where(gap & ~below, mid, hi)
            flat[todo] = hi
        flat -= row * np.int32(self.c)
        return flat
