"""Tests of spade_ad.apps.evaluation.metrics on generated data, against hand-computed values and slow reference code."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from spade_ad.apps.evaluation.metrics import (
    au_pro,
    best_f1,
    f1_at_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    recall_at_false_alarm_rate,
    verdict_metrics,
)

# --- slow, obviously correct reference for the PRO curve ------------------------------------------------


def _regions_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask by flood fill, as lists of (row, col)."""
    seen = np.zeros(mask.shape, dtype=bool)
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, component = [start], []
        while stack:
            r, c = stack.pop()
            component.append((r, c))
            for rr in range(r - 1, r + 2):
                for cc in range(c - 1, c + 2):
                    inside = 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1]
                    if inside and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        components.append(component)
    return components


def _reference_pro_curve(maps, masks):
    """Full PRO curve by looping over thresholds; None when there is no good pixel or no region."""
    ok, regions = [], []
    for score_map, mask in zip(maps, masks):
        defect = np.asarray(mask) > 0
        ok.extend(score_map[~defect & ~np.isnan(score_map)])
        for component in _regions_8(defect):
            region = np.array([score_map[p] for p in component])
            if (~np.isnan(region)).any():
                regions.append(region[~np.isnan(region)])
    if not ok or not regions:
        return None
    ok = np.array(ok)
    fpr, pro = [0.0], [0.0]
    for t in sorted(set(np.concatenate([ok, *regions]).tolist()), reverse=True):
        fpr.append(np.mean(ok >= t))
        pro.append(np.mean([np.mean(region >= t) for region in regions]))
    return np.array(fpr + [1.0]), np.array(pro + [1.0])


def _reference_area(fpr, pro, limit):
    """Trapezoid area for FPR in [0, limit], cutting the crossing segment at the limit, divided by limit."""
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr[:-1], fpr[1:], pro[:-1], pro[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@st.composite
def maps_and_masks(draw):
    """A few small maps of random sizes: rounded scores (ties), random masks, optional NaN and signal."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    levels = draw(st.sampled_from([1, 3, 10, 10**6]))
    defect_share = draw(st.sampled_from([0.05, 0.3, 0.7]))
    signal = draw(st.sampled_from([0.0, 0.5, 2.0]))
    nan_share = draw(st.sampled_from([0.0, 0.0, 0.3]))
    maps, masks = [], []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(rng.integers(1, 9, size=2))
        mask = rng.random(shape) < defect_share
        score_map = np.round((rng.random(shape) + signal * mask) * levels) / levels
        score_map[rng.random(shape) < nan_share] = np.nan
        maps.append(score_map)
        masks.append(mask.astype(np.uint8) * 255)
    return maps, masks


@settings(max_examples=50, deadline=None)
@given(data=maps_and_masks(), limit=st.sampled_from([0.3, 0.05, 0.5, 1.0]))
def test_pro_matches_reference(data, limit):
    maps, masks = data
    reference = _reference_pro_curve(maps, masks)
    if reference is None:
        with pytest.raises(ValueError, match="PRO needs"):
            au_pro(maps, masks, limit)
        return
    ref_fpr, ref_pro = reference
    fpr, pro = pro_curve(maps, masks, limit=1.0)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, rtol=0, atol=1e-12)

    fpr, pro = pro_curve(maps, masks, limit)
    inside = ref_fpr <= limit
    assert fpr[-1] == limit
    if ref_fpr[inside][-1] == limit:
        np.testing.assert_allclose(pro, ref_pro[inside], rtol=0, atol=1e-12)
    else:
        np.testing.assert_allclose(fpr[:-1], ref_fpr[inside], rtol=0, atol=1e-12)
        np.testing.assert_allclose(pro[:-1], ref_pro[inside], rtol=0, atol=1e-12)
        i = np.flatnonzero(~inside)[0]
        x0, x1, y0, y1 = ref_fpr[i - 1], ref_fpr[i], ref_pro[i - 1], ref_pro[i]
        assert pro[-1] == pytest.approx(y0 + (y1 - y0) * (limit - x0) / (x1 - x0), abs=1e-12)
    assert au_pro(maps, masks, limit) == pytest.approx(_reference_area(ref_fpr, ref_pro, limit), abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(data=maps_and_masks())
def test_pixel_auroc_equals_sklearn_on_concatenation(data):
    maps, masks = data
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([np.ravel(k) > 0 for k in masks])[~np.isnan(scores)]
    scores = scores[~np.isnan(scores)]
    if labels.all() or not labels.any():
        with pytest.raises(ValueError, match="both defect and good"):
            pixel_auroc(maps, masks)
        return
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)


# --- AU-PRO: known values ------------------------------------------------------------------------------


def _square_masks(n, shape, side, rng):
    masks = np.zeros((n, *shape), dtype=bool)
    for mask, (r, c) in zip(masks, rng.integers(0, np.array(shape) - side, size=(n, 2))):
        mask[r : r + side, c : c + side] = True
    return list(masks)


def test_perfect_maps_give_one():
    rng = np.random.default_rng(0)
    masks = _square_masks(3, (40, 30), 5, rng) + [np.zeros((20, 50), dtype=bool)]  # last image is good
    maps = [m.astype(np.float32) for m in masks]
    assert au_pro(maps, masks) == 1.0
    assert pixel_auroc(maps, masks) == 1.0


def test_random_maps_give_about_half_the_limit():
    rng = np.random.default_rng(0)
    masks = _square_masks(200, (500, 300), 10, rng)
    maps = list(rng.random((200, 500, 300), dtype=np.float32))
    assert au_pro(maps, masks) == pytest.approx(0.15, abs=0.02)


def test_ramp_on_the_diagonal_gives_half_the_limit():
    # Row 0 good, row 1 one defect region; both rows hold the same ramp, so every threshold finds the
    # same share of good and defect pixels: FPR == PRO all along and the area up to 1/3 is (1/3)^2 / 2.
    ramp = np.tile(np.linspace(0.0, 1.0, 999), (2, 1))
    mask = np.zeros(ramp.shape, dtype=bool)
    mask[1] = True
    fpr, pro = pro_curve([ramp], [mask], limit=1.0)
    np.testing.assert_allclose(fpr, pro, atol=1e-12)
    assert au_pro([ramp], [mask], limit=1 / 3) == pytest.approx(1 / 6, abs=1e-3)


def test_invariant_under_strictly_increasing_transforms():
    rng = np.random.default_rng(1)
    masks = _square_masks(4, (30, 30), 6, rng)
    maps = [np.round(rng.random((30, 30)) + 0.3 * m, 2) for m in masks]  # rounding makes ties
    expected = au_pro(maps, masks)
    for transform in (np.exp, lambda x: 3 * x + 1, lambda x: x**3):
        transformed = [transform(m) for m in maps]
        assert au_pro(transformed, masks) == expected
        assert pixel_auroc(transformed, masks) == pixel_auroc(maps, masks)


def test_diagonal_neighbours_form_one_region():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # touching at a corner: one region of 2 pixels
    mask[4, 4] = True  # a second region
    score_map = np.zeros(mask.shape)
    score_map[0, 0] = 1.0
    fpr, pro = pro_curve([score_map], [mask], limit=1.0)
    assert (fpr[1], pro[1]) == (0.0, 0.25)  # (1/2 + 0) / 2 regions, not (1 + 0 + 0) / 3


@pytest.mark.parametrize(("blob_at", "expected_pro"), [(2, 0.2), (3, 0.5)])
def test_separated_blobs_are_separate_regions(blob_at, expected_pro):
    mask = np.zeros((6, 6), dtype=bool)
    mask[0:2, 0:2] = True
    mask[blob_at, blob_at] = True  # at (2, 2) it touches the square's corner, at (3, 3) it does not
    score_map = np.zeros(mask.shape)
    score_map[blob_at, blob_at] = 1.0
    fpr, pro = pro_curve([score_map], [mask], limit=1.0)
    assert fpr[1] == 0.0
    assert pro[1] == pytest.approx(expected_pro)


def test_small_region_weighs_as_much_as_a_big_one():
    mask = np.zeros((12, 12), dtype=bool)
    mask[0, 0] = True
    mask[5:10, 5:10] = True
    small_found, big_found = np.zeros(mask.shape), np.zeros(mask.shape)
    small_found[0, 0] = 1.0
    big_found[5:10, 5:10] = 1.0
    assert pro_curve([small_found], [mask], limit=1.0)[1][1] == pytest.approx(0.5, abs=1e-12)
    assert pro_curve([big_found], [mask], limit=1.0)[1][1] == pytest.approx(0.5, abs=1e-12)
    assert au_pro([small_found], [mask]) == pytest.approx(au_pro([big_found], [mask]), abs=1e-12)


def test_regions_of_different_images_are_counted_separately():
    masks = [np.ones((1, 3), dtype=bool), np.zeros((2, 2), dtype=bool), np.ones((1, 1), dtype=bool)]
    masks[0][0, 2] = False  # image 0: region of 2 pixels + 1 good pixel; image 2: region of 1 pixel
    maps = [np.array([[1.0, 1.0, 0.0]]), np.zeros((2, 2)), np.zeros((1, 1))]
    fpr, pro = pro_curve(maps, masks, limit=1.0)
    assert (fpr[1], pro[1]) == (0.0, 0.5)


def test_constant_map_is_one_tie_from_origin_to_one():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    fpr, pro = pro_curve([np.zeros((10, 10))], [mask], limit=1.0)
    np.testing.assert_array_equal(fpr, [0, 1, 1])
    np.testing.assert_array_equal(pro, [0, 1, 1])
    assert au_pro([np.zeros((10, 10))], [mask]) == pytest.approx(0.15, abs=1e-12)  # diagonal: 0.3^2/2/0.3


def test_partial_tie_is_not_broken_optimistically():
    # The 4 defect pixels tie with 4 of the 8 good pixels: the curve goes straight from (0, 0) to (0.5, 1),
    # so the area up to 0.3 is 0.3 * 0.6 / 2 and AU-PRO is 0.3 (breaking the tie for the defect would give 1).
    mask = np.zeros((3, 4), dtype=bool)
    mask[0] = True
    score_map = np.zeros((3, 4))
    score_map[:2] = 1.0
    fpr, pro = pro_curve([score_map], [mask], limit=1.0)
    np.testing.assert_array_equal(fpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(pro, [0, 1, 1, 1])
    assert au_pro([score_map], [mask]) == pytest.approx(0.3, abs=1e-12)


def test_nan_pixels_are_left_out():
    rng = np.random.default_rng(2)
    masks = _square_masks(3, (20, 20), 4, rng)
    maps = [rng.random((20, 20)) + 0.2 * m for m in masks]
    padded_maps = [np.pad(m, 3, constant_values=np.nan) for m in maps]
    padded_masks = [np.pad(k, 3) for k in masks]
    padded_masks[0][0, 0] = True  # a region wholly outside the scored area does not count
    padded_masks[1][-1, :] = True  # nor do defect pixels in the NaN border
    assert au_pro(padded_maps, padded_masks) == pytest.approx(au_pro(maps, masks), abs=1e-12)
    assert pixel_auroc(padded_maps, padded_masks) == pixel_auroc(maps, masks)


def test_partly_unscored_region_counts_its_scored_pixels_only():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :] = True
    score_map = np.zeros((4, 4))
    score_map[0, 0] = 1.0
    score_map[0, 1:3] = np.nan
    fpr, pro = pro_curve([score_map], [mask], limit=1.0)
    assert (fpr[1], pro[1]) == (0.0, 0.5)  # 1 of the 2 scored pixels of the region


def test_pro_errors():
    good = [np.zeros((4, 4), dtype=bool)]
    with pytest.raises(ValueError, match="defect region"):
        au_pro([np.zeros((4, 4))], good)
    with pytest.raises(ValueError, match="good"):
        au_pro([np.zeros((4, 4))], [np.ones((4, 4))])
    with pytest.raises(ValueError, match="image 1"):
        au_pro([np.zeros((4, 4)), np.zeros((4, 5))], [np.ones((4, 4)), np.ones((4, 4))])
    with pytest.raises(ValueError, match="image 1"):
        pixel_auroc([np.zeros((4, 4)), np.zeros((4, 5))], [np.ones((4, 4)), np.ones((4, 4))])
    with pytest.raises(ValueError, match="2 score maps but 1 masks"):
        au_pro([np.zeros((4, 4))] * 2, good)
    for limit in (0.0, 1.5):
        with pytest.raises(ValueError, match="limit"):
            au_pro([np.zeros((4, 4))], [np.eye(4)], limit)


def test_pixel_auroc_with_float32_ties_and_sizes():
    rng = np.random.default_rng(3)
    shapes = [(50, 60), (30, 30), (64, 10)]
    masks = [rng.random(s) < 0.1 for s in shapes]
    maps = [np.round(rng.random(s) + 0.5 * k, 1).astype(np.float32) for s, k in zip(shapes, masks)]
    expected = roc_auc_score(
        np.concatenate([k.ravel() for k in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(maps, masks) == pytest.approx(expected, rel=1e-12)


# --- image-level metrics -------------------------------------------------------------------------------


def test_image_auroc():
    scores = [0.1, 0.2, 0.9, 0.8]
    assert image_auroc(scores, [0, 0, 1, 1]) == 1.0
    assert image_auroc(scores, [True, True, False, False]) == 0.0
    assert image_auroc(np.full(4, 0.5), [0, 1, 0, 1]) == 0.5
    assert image_auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="both good and defective"):
        image_auroc(scores, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        image_auroc(scores, [0, 2, 1, 1])
    with pytest.raises(ValueError, match="equal length"):
        image_auroc(scores, [0, 1])


def test_f1_by_hand():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    best = best_f1(scores, labels)
    assert best == pytest.approx({"threshold": 0.35, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert f1_at_threshold(scores, labels, 0.8) == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3}
    )
    assert f1_at_threshold(scores, labels, 0.9) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="defective"):
        best_f1(scores, [0, 0, 0, 0])


@settings(max_examples=50, deadline=None)
@given(
    scores=st.lists(st.integers(0, 5).map(float), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_best_f1_is_the_best_threshold(scores, seed):
    labels = np.random.default_rng(seed).random(len(scores)) < 0.5
    labels[0] = True
    best = best_f1(scores, labels)
    assert f1_at_threshold(scores, labels, best["threshold"]) == pytest.approx(
        {k: v for k, v in best.items() if k != "threshold"}
    )
    assert all(f1_at_threshold(scores, labels, t)["f1"] <= best["f1"] + 1e-12 for t in scores)


def test_recall_at_a_false_alarm_rate_by_hand():
    """20 good images: at 5% one of them may lie above the threshold, at 1% none."""
    good = np.arange(20, dtype=float)  # 0..19
    defects = np.array([18.5, 19.5, 25.0, 30.0])
    scores, labels = np.r_[good, defects], np.r_[np.zeros(20, bool), np.ones(4, bool)]
    assert recall_at_false_alarm_rate(scores, labels, 0.01) == 0.75  # above 19: 19.5, 25, 30
    assert recall_at_false_alarm_rate(scores, labels, 0.05) == 1.0  # above 18 (19 flagged): all four
    assert recall_at_false_alarm_rate(scores, labels, 1.0) == 1.0
    with pytest.raises(ValueError, match="good and defective"):
        recall_at_false_alarm_rate(good, np.zeros(20, bool), 0.05)


def test_verdict_metrics_by_hand():
    """The same 20 good images and 4 defects: a threshold at 18.7 flags one good image (5%) and three defects;
    the best threshold with one false alarm (above 18) catches all four. One at 22 flags none and two defects, where
    the best with none (above 19) catches three."""
    good = np.arange(20, dtype=float)
    defects = np.array([18.5, 19.5, 25.0, 30.0])
    scores, labels = np.r_[good, defects], np.r_[np.zeros(20, bool), np.ones(4, bool)]
    figures = verdict_metrics(scores, labels, 18.7)
    assert figures["image_auroc"] == image_auroc(scores, labels)
    assert figures["best_f1"] == best_f1(scores, labels)
    assert (figures["recall_at_1_percent"], figures["recall_at_5_percent"]) == (0.75, 1.0)
    assert (figures["good_flagged"], figures["n_good"], figures["false_alarm_rate_measured"]) == (1, 20, 0.05)
    assert figures["at_threshold"] == f1_at_threshold(scores, labels, np.nextafter(18.7, np.inf))
    assert figures["at_threshold"]["recall"] == 0.75
    assert figures["recall_best_at_measured_rate"] == 1.0
    strict = verdict_metrics(scores, labels, 22.0)
    assert (strict["good_flagged"], strict["at_threshold"]["recall"], strict["recall_best_at_measured_rate"]) == (
        0, 0.5, 0.75)
    # a score equal to the threshold is not flagged (score > threshold, as Spade's verdicts)
    assert verdict_metrics(scores, labels, 19.0)["good_flagged"] == 0
    without = verdict_metrics(scores, labels, None)
    assert without["recall_at_1_percent"] == 0.75
    assert all(without[key] is None for key in (
        "at_threshold", "good_flagged", "false_alarm_rate_measured", "recall_best_at_measured_rate"))

