"""The hypervolume of a front, against values computed by hand and by inclusion-exclusion."""

import itertools

import numpy as np
import pytest

from approxtune.hypervolume import hypervolume, study_hypervolume


def inclusion_exclusion(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact volume of the union of the boxes [p, reference]: the sum over subsets of (-1)^(k+1) x their
    intersection, a box from the subset's componentwise maximum (minimised objectives)."""
    total = 0.0
    for k in range(1, len(points) + 1):
        for subset in itertools.combinations(points, k):
            corner = np.max(subset, axis=0)
            total += (-1) ** (k + 1) * float(np.prod(np.clip(reference - corner, 0.0, None)))
    return total


def test_known_values():
    assert hypervolume([(0.0, 0.0, 0.0)], (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert hypervolume([(-0.5, -0.5, 0.5)], (0.0, 0.0, 1.0)) == pytest.approx(0.125)
    # The 2-d staircase of (1, 3), (2, 2), (3, 1) below (4, 4): 1 x 1 + 1 x 2 + 1 x 3.
    assert hypervolume([(3, 1), (1, 3), (2, 2)], (4, 4)) == pytest.approx(6.0)
    # Two boxes of 0.25 that overlap in 0.125: [0, 1] x [0.5, 1] x [0.5, 1] and [0.5, 1] x [0, 1] x [0.5, 1].
    assert hypervolume([(0, 0.5, 0.5), (0.5, 0, 0.5)], (1, 1, 1)) == pytest.approx(0.25 + 0.25 - 0.125)


def test_points_outside_the_box_and_dominated_or_repeated_points_add_nothing():
    ref = (1.0, 1.0, 1.0)
    base = [(0.2, 0.5, 0.4), (0.6, 0.1, 0.3)]
    value = hypervolume(base, ref)
    assert hypervolume([*base, (0.7, 0.6, 0.5), (0.2, 0.5, 0.4), (1.0, 0.0, 0.0), (0.5, 0.5, 1.5)], ref) == value
    assert hypervolume([], ref) == 0.0


@pytest.mark.parametrize("dims", [2, 3])
def test_random_sets_match_inclusion_exclusion(dims):
    rng = np.random.default_rng(dims)
    ref = np.ones(dims)
    for _ in range(60):
        points = rng.random((int(rng.integers(1, 9)), dims))
        points[rng.random(points.shape) < 0.2] = 0.5  # ties in every coordinate
        assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion(points, ref), abs=1e-12)


def test_study_hypervolume_scales_acr_by_the_base_and_size_by_fp32():
    # ACR at the base model's, accuracy 0.9, half the fp32 size: 1 x 0.9 x 0.5.
    assert study_hypervolume([(0.4, 0.9, 500)], base_acr=0.4, fp32_size=1000) == pytest.approx(0.45)
    assert study_hypervolume([(0.2, 0.9, 500), (0.4, 0.5, 1000)], 0.4, 1000) == pytest.approx(0.5 * 0.9 * 0.5)
    assert study_hypervolume([], 0.4, 1000) == 0.0


def test_four_objectives_are_refused():
    with pytest.raises(ValueError, match="2 or 3 objectives"):
        hypervolume([(0, 0, 0, 0)], (1, 1, 1, 1))
