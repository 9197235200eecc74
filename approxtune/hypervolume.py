"""The hypervolume of a study's front: the measure of what its trials dominate.

The three objectives are put on one scale, ``(ACR / base ACR, clean accuracy, size / fp32 size)``, the first two
maximised and the last minimised, with the reference point ``(0, 0, 1)``: the hypervolume of a set of trials is the
volume of the region of that box which at least one trial dominates (a number in [0, 1]; the fp32 base model alone
scores its accuracy).  Optuna computes hypervolumes only in a private module (``optuna._hypervolume``), so the exact
computation is written out here (:func:`hypervolume`): 3-d sweep over the third coordinate with a 2-d staircase for
each slab, ``O(m^2 log m)`` for ``m`` points, tested against inclusion-exclusion.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["hypervolume", "study_hypervolume", "to_loss"]


def _staircase(points: np.ndarray, reference: np.ndarray) -> float:
    """Area that the 2-d points (minimised) dominate below ``reference``."""
    area, best_y = 0.0, reference[1]
    xs = np.append(points[:, 0], reference[0])
    for j in range(len(points)):  # points sorted by x
        best_y = min(best_y, points[j, 1])
        area += (xs[j + 1] - xs[j]) * (reference[1] - best_y)
    return area


def hypervolume(points: Iterable[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by ``points`` (every objective minimised) inside the box below ``reference``; 2 or 3 objectives.

    Points that do not lie strictly below the reference in every objective add nothing.
    """
    ref = np.asarray(reference, dtype=np.float64)
    pts = np.asarray(list(points), dtype=np.float64).reshape(-1, len(ref))
    if len(ref) not in (2, 3):
        raise ValueError(f"hypervolume is implemented for 2 or 3 objectives, got {len(ref)}")
    pts = pts[np.all(pts < ref, axis=1)]
    if not len(pts):
        return 0.0
    if len(ref) == 2:
        return _staircase(pts[np.argsort(pts[:, 0], kind="stable")], ref)
    pts = pts[np.argsort(pts[:, 2], kind="stable")]
    zs = np.append(pts[:, 2], ref[2])
    volume = 0.0
    for k in range(len(pts)):  # the slab z in [z_k, z_k+1) is dominated by the first k + 1 points' 2-d staircase
        if zs[k + 1] > zs[k]:
            head = pts[: k + 1]
            volume += (zs[k + 1] - zs[k]) * _staircase(head[np.argsort(head[:, 0], kind="stable")], ref[:2])
    return float(volume)


def to_loss(values: Iterable[Sequence[float]], base_acr: float, fp32_size: int) -> np.ndarray:
    """``(ACR, accuracy, size)`` rows as minimised coordinates ``(-ACR / base ACR, -accuracy, size / fp32 size)``."""
    v = np.asarray(list(values), dtype=np.float64).reshape(-1, 3)
    return np.column_stack([-v[:, 0] / base_acr, -v[:, 1], v[:, 2] / fp32_size])


STUDY_REFERENCE = (0.0, 0.0, 1.0)
"""Reference point of :func:`study_hypervolume` in the minimised coordinates of :func:`to_loss`."""


def study_hypervolume(values: Iterable[Sequence[float]], base_acr: float, fp32_size: int) -> float:
    """Hypervolume of ``(ACR, accuracy, size)`` rows in ``(ACR / base ACR, accuracy, size / fp32)``, ref (0, 0, 1)."""
    return hypervolume(to_loss(values, base_acr, fp32_size), STUDY_REFERENCE)
