"""Minimum-norm attacks as the field reads them: each example's distance to its nearest adversarial image,
the median, the robust-accuracy curve those distances imply, and the source-target grid."""

from __future__ import annotations

import math

import pytest

from advmnist.measures import distance_profile, robust_at


def _examples(clean_pred, success, l2):
    n = len(success)
    return {"clean_pred": clean_pred, "success": success, "l2": l2, "linf": [0.0] * n, "l1": [0.0] * n,
            "l0": [0] * n}


def test_profile_counts_wrong_images_as_zero_and_never_fooled_as_infinitely_far():
    y = [0, 1, 2, 3, 4]
    ex = _examples(clean_pred=[0, 1, 2, 3, 9], success=[True, True, False, True, True], l2=[1.5, 0.5, 0.0, 2.5, 0.0])
    prof = distance_profile(ex, y, "l2")
    assert prof["sorted"] == [0.0, 0.5, 1.5, 2.5] and prof["never_fooled"] == 1 and prof["n"] == 5
    assert prof["median"] == 1.5  # 0, 0.5, [1.5], 2.5, inf
    assert robust_at(prof, 0.0) == pytest.approx(80.0)  # only the misclassified image is lost at eps 0
    assert robust_at(prof, 1.0) == pytest.approx(60.0)
    assert robust_at(prof, 2.5) == pytest.approx(20.0)  # distance 2.5 is within eps 2.5
    assert robust_at(prof, 100.0) == pytest.approx(20.0)  # the never-fooled image stays


def test_median_is_none_when_more_than_half_are_never_fooled():
    ex = _examples(clean_pred=[0, 1, 2, 3], success=[True, False, False, True], l2=[1.0, 0.0, 0.0, 2.0])
    assert distance_profile(ex, [0, 1, 2, 3], "l2")["median"] == 2.0  # the lower middle of 1, 2, inf, inf
    ex = _examples(clean_pred=[0, 1, 2, 3], success=[True, False, False, False], l2=[1.0, 0.0, 0.0, 0.0])
    prof = distance_profile(ex, [0, 1, 2, 3], "l2")
    assert prof["median"] is None and prof["never_fooled"] == 3
    assert not math.isnan(robust_at(prof, 1.0))


def test_targeted_profile_measures_the_distance_to_the_target():
    ex = _examples(clean_pred=[5, 1], success=[True, False], l2=[0.7, 0.0])
    prof = distance_profile(ex, [0, 1], "l2", targeted=True)  # the first is misclassified but reached its target
    assert prof["sorted"] == [0.7] and prof["never_fooled"] == 1


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError):
        distance_profile(_examples([0], [True], [1.0]), [0], "l3")
