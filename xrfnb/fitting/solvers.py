"""Linear algebra of the element fit: Poisson-weighted NNLS of one spectrum, the weighted least-squares
projector shared by all pixels of a scan, batched non-negativity and the variance of sums of terms.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.optimize

from .design import Design

__all__ = ["Projector", "fit_one", "nnls_batch", "sum_variance"]


def _moving_average(y: np.ndarray, k: int) -> np.ndarray:
    """Moving average of ``y`` (shape (n,)) over ``k`` channels, edges padded with the edge value."""
    if k <= 1:
        return y
    pad = k // 2
    yp = np.pad(y, (pad, k - 1 - pad), mode="edge")
    return np.convolve(yp, np.ones(k) / k, mode="valid")


def _nnls_weighted(A: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Non-negative ``c`` (k,) minimising ``sum w (y - A c)^2`` (A: (n, k)); columns scaled first."""
    sw = np.sqrt(w)
    scale = np.sqrt((A**2 * w[:, None]).sum(axis=0))
    scale[scale <= 0] = 1.0
    coef, _ = scipy.optimize.nnls(A * (sw / 1.0)[:, None] / scale[None, :], y * sw, maxiter=50 * A.shape[1])
    return coef / scale


def fit_one(design: Design, y: np.ndarray, passes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson-weighted NNLS of one spectrum's fitted range ``y`` (n_range,), counts.

    The weights start from the smoothed data and are then the inverse model, ``passes`` times.

    Returns
    -------
    coef : numpy.ndarray
        Counts of each term, shape (k,), >= 0.
    model : numpy.ndarray
        ``design.A @ coef``, shape (n_range,).
    weights : numpy.ndarray
        Channel weights (inverse variances) of the last pass, shape (n_range,).
    """
    w = 1.0 / np.maximum(_moving_average(y, 5), 1.0)
    coef = np.zeros(design.k)
    model = np.zeros_like(y)
    for _ in range(passes):
        coef = _nnls_weighted(design.A, y, w)
        model = design.A @ coef
        w = 1.0 / np.maximum(model, max(1e-6 * float(model.max(initial=0.0)), 1e-3))
    return coef, model, w


@dataclasses.dataclass(frozen=True, eq=False)
class Projector:
    """Weighted least-squares solution shared by all pixels: ``C = Y @ Aw @ Ninv`` (unconstrained).

    Attributes
    ----------
    Aw : numpy.ndarray
        ``A * weights``, shape (n_range, k), float32.
    N : numpy.ndarray
        Normal matrix ``A^T W A``, shape (k, k).
    Ninv : numpy.ndarray
        Its pseudo-inverse, shape (k, k).
    G : numpy.ndarray
        Shape (k, k): ``var(C_j) = sum_a C_a G[a, j]`` (Poisson, model variance).
    P : numpy.ndarray
        The unconstrained estimator ``C = P y``, shape (k, n_range).
    """

    Aw: np.ndarray
    N: np.ndarray
    Ninv: np.ndarray
    G: np.ndarray
    P: np.ndarray

    @classmethod
    def build(cls, A: np.ndarray, w: np.ndarray) -> Projector:
        """Projector of the weighted least-squares problem with design ``A`` (n_range, k), weights ``w``."""
        Aw = A * w[:, None]
        AwT = np.ascontiguousarray(Aw.T)  # (k, n_range); C-contiguous products are much faster
        N = AwT @ A
        N = 0.5 * (N + N.T)
        d = np.sqrt(np.clip(np.diag(N), 1e-300, None))
        Ns = N / np.outer(d, d)
        Ninv = np.linalg.pinv(Ns, rcond=1e-10, hermitian=True) / np.outer(d, d)
        P = Ninv @ AwT  # (k, n_range)
        G = ((P * P) @ A).T  # G[a, j] = sum_c A[c, a] P[j, c]^2
        return cls(Aw.astype(np.float32), N, Ninv, G, P)

    def report(self, A: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Variance matrices of reported sums ``C @ R.T`` (R: (n_el, k) 0/1 membership).

        Returns ``(GR, GR_own)``, both (k, n_el): ``var = C @ GR`` and, with the element's own terms
        removed (a blank at that pixel), ``var_blank = var - C @ GR_own``.
        """
        PR = R @ self.P  # (n_el, n_range)
        GR = ((PR * PR) @ A).T
        return GR, GR * R.T


def sum_variance(A: np.ndarray, w: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Variance of sums ``R @ c`` (R: (m, k)) of weighted least-squares coefficients: ``r N^-1 r``.

    ``A`` (n, k) design, ``w`` (n,) channel weights (inverse variances); ``N = A^T W A``, solved with
    a tiny ridge on its unit-diagonal form (columns no channel constrains get no variance from it).
    """
    N = (A * w[:, None]).T @ A
    d = np.sqrt(np.clip(np.diag(N), 1e-300, None))
    Ns = N / np.outer(d, d) + 1e-9 * np.eye(N.shape[0])
    Rs = R / d[None, :]
    X = np.linalg.solve(Ns, Rs.T)
    return np.einsum("mk,km->m", Rs, X)


def nnls_batch(
    C: np.ndarray, b: np.ndarray, N: np.ndarray, chunk: int = 2048, sweeps: int = 4
) -> np.ndarray:
    """Make per-pixel solutions non-negative: refit with negative terms removed, then polish.

    ``C`` (n, k) unconstrained least-squares solutions of ``N c = b``; pixels with a negative term are
    refitted with that term fixed at zero (batched, until none is negative), then a few
    coordinate-descent sweeps of the exact NNLS problem release terms fixed too eagerly.
    """
    rows = np.nonzero((C < 0).any(axis=1))[0]
    if rows.size == 0:
        return C
    k = N.shape[0]
    d = np.sqrt(np.clip(np.diag(N), 1e-300, None))
    Ns = N / np.outer(d, d)
    eye = np.eye(k)
    for start in range(0, rows.size, chunk):
        r = rows[start : start + chunk]
        c = C[r] * d  # scaled variables: Ns c' = b / d
        bb = b[r] / d
        clamped = c < 0
        for _ in range(k):
            free = ~clamped
            M = Ns[None] * (free[:, :, None] & free[:, None, :]) + eye[None] * clamped[:, :, None]
            M += 1e-10 * eye[None]
            c = np.linalg.solve(M, np.where(free, bb, 0.0)[..., None])[..., 0]
            newneg = (c < 0) & free
            if not newneg.any():
                break
            clamped |= newneg
        c = np.maximum(c, 0.0)
        for _ in range(sweeps):
            for j in range(k):
                c[:, j] = np.maximum(0.0, c[:, j] + (bb[:, j] - c @ Ns[:, j]))
        C[r] = c / d
    return C
