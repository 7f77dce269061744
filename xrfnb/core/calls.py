"""The rules that turn the model's probabilities into calls: present, and buried rather than at the surface.

One home for the decision that the model, training evaluation, whole-scan maps, reports and the dashboard
all make, so that a pixel is called the same way wherever it is shown.

A class is *present* where its probability reaches its detection threshold. A present class is *buried*
(it lies only below another paint layer) where the model finds that more likely than a surface layer:
``P(buried) > P(surface)``, that is ``buried_probability > probability / 2`` since
``probability = P(surface) + P(buried)``. A tie counts as surface, the layer a conservator sees.
"""

from __future__ import annotations

from typing import overload

import numpy as np

__all__ = ["is_buried", "is_present"]


def is_present(probability: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Presence calls: ``probability >= thresholds``.

    Parameters
    ----------
    probability : numpy.ndarray
        P(present) per class, shape (..., K).
    thresholds : numpy.ndarray or float
        Detection thresholds, broadcastable to ``probability`` (shape (K,) per class).

    Returns
    -------
    numpy.ndarray
        bool, the shape of ``probability``.

    Examples
    --------
    >>> is_present(np.array([0.2, 0.5, 0.9]), 0.5)
    array([False,  True,  True])
    """
    return np.asarray(probability) >= thresholds


@overload
def is_buried(probability: float, buried_probability: float) -> bool: ...
@overload
def is_buried(probability: np.ndarray, buried_probability: np.ndarray) -> np.ndarray: ...
def is_buried(probability, buried_probability):  # type: ignore[no-untyped-def]
    """Whether a class lies only below the surface layer: ``buried_probability > probability / 2``.

    Apply it to present classes (see :func:`is_present`); for an absent class it says nothing.

    Parameters
    ----------
    probability : numpy.ndarray or float
        P(present) = P(surface) + P(buried), shape (..., K).
    buried_probability : numpy.ndarray or float
        P(buried), the same shape.

    Returns
    -------
    numpy.ndarray of bool, or bool for scalars

    Examples
    --------
    >>> is_buried(np.array([0.9, 0.9, 0.8]), np.array([0.6, 0.3, 0.4]))
    array([ True, False, False])
    >>> is_buried(0.8, 0.41)
    True
    """
    out = np.asarray(buried_probability) > 0.5 * np.asarray(probability)
    return bool(out) if out.ndim == 0 else out
