"""Thresholds with a stated false-alarm rate: the conformal rule, leave-one-out scores, user thresholds, regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spade_ad import SettingError, Spade
from spade_ad.core.calibration import (
    PIXEL_RATES,
    Calibration,
    compare_good_scores,
    conformal_threshold,
    normalized_scores,
    p_values,
    pixel_quantiles,
    pixel_threshold_at,
    suspects,
    suspects_warning,
)
from spade_ad.core.labelled_defects import recall_threshold
from spade_ad.core.score_parts import robust_scale
from spade_ad.core.shift import check_shift
from spade_ad.data.images import list_images


@pytest.mark.parametrize(("n", "alpha"), [(59, 0.1), (99, 0.05), (499, 0.01), (30, 0.2)])
def test_conformal_threshold_keeps_the_false_alarm_rate(n: int, alpha: float) -> None:
    """Over many draws of calibration and test scores from one distribution, the share of good test scores above
    the threshold is at most alpha and close to it (the conformal guarantee is exact in expectation), wherever
    alpha (n + 1) is at least TAIL_MULTIPLE (5)."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        calibration = rng.gamma(2.0, size=n)
        threshold, note = conformal_threshold(calibration, alpha)
        assert note == ""
        rates.append(float((rng.gamma(2.0, size=500) > threshold).mean()))
    expected = np.floor(alpha * (n + 1)) / (n + 1)
    assert np.mean(rates) <= alpha + 0.005
    assert abs(np.mean(rates) - expected) < 0.006


@pytest.mark.parametrize(("n", "alpha"), [(199, 0.01), (39, 0.1), (299, 0.01)])
def test_a_few_unusual_scores_no_longer_set_the_threshold(n: int, alpha: float) -> None:
    """Within a few multiples of 1/(n + 1) the conformal quantile is one of the largest scores. Two good images far
    out (a rare pose, a defect in the training folder) made the rate far lower than asked (none at all for
    n = 199: the threshold was the second outlier); the fitted tail brings it nearer alpha, and the guarantee it
    states is at most 2 alpha. On clean scores the rate stays near alpha too (an estimate: at most 1.3 alpha)."""
    rng = np.random.default_rng(1)
    clean, odd, conformal_odd = [], [], []
    for _ in range(300):
        calibration = rng.gamma(2.0, size=n)
        threshold, _ = conformal_threshold(calibration, alpha)
        clean.append(float((rng.gamma(2.0, size=2000) > threshold).mean()))
        calibration[:2] = [40.0, 30.0]
        threshold, note = conformal_threshold(calibration, alpha)
        test = rng.gamma(2.0, size=2000)
        odd.append(float((test > threshold).mean()))
        conformal_odd.append(float((test > np.sort(calibration)[n - int(np.floor(alpha * (n + 1) + 1e-9))]).mean()))
        above = int((calibration > threshold).sum())
        assert (1 + above) / (n + 1) <= 2 * alpha + 1e-9
        if note:
            assert "estimate" in note and f"guaranteed: {1 + above}/{n + 1}" in note
    assert np.mean(clean) < 1.3 * alpha
    assert abs(np.mean(odd) - alpha) < abs(np.mean(conformal_odd) - alpha) and 0.4 * alpha < np.mean(odd) < 1.3 * alpha


def test_suspects_are_the_scores_beyond_the_tail() -> None:
    """Two training images scoring like defects are named, largest first; clean draws of 200 good scores name
    none in almost every draw; the warning names them with the score where the others end."""
    rng = np.random.default_rng(2)
    scores = rng.gamma(2.0, size=200)
    scores[[17, 120]] = [25.0, 40.0]
    assert suspects(scores) == [120, 17]
    assert sum(bool(suspects(rng.gamma(2.0, size=200))) for _ in range(200)) <= 4
    assert suspects(scores[:7]) == []  # too few to fit a tail
    cal = Calibration("leave_one_out", sorted(scores.tolist()), 0.01, 5.0, 0.001, 1.0, suspects=["b.png", "a.png"],
                      suspect_scores=[40.0, 25.0])
    line = suspects_warning(cal)
    assert "these 2 training images score like defects" in line and "b.png (40)" in line and "--exclude NAME" in line
    assert f"{np.sort(scores)[-3]:.3g}" in line


def test_choose_weights_moves_only_on_clear_evidence() -> None:
    """Defects that stand out on the kNN part only: every share is tried and the kNN alone catches all ten above
    the good scores' 1% threshold, so the weights move there; defects that stand out on every part are caught
    already, and one defect more is no reason to move; without the coarse part its weight stays 0."""
    from spade_ad.core.labelled_defects import WEIGHT_MARGIN, choose_weights

    rng = np.random.default_rng(0)
    good = rng.normal(size=(200, 3))
    on_knn = rng.normal(size=(10, 3)) + [0.0, 0.0, 5.0]
    current = (1 / 3, 1 / 3, 1 / 3)
    weights, figures = choose_weights(good, on_knn, current, rate=0.01)
    assert weights == (0.0, 0.0, 1.0) and figures["caught"] == 10
    assert figures["caught_before"] <= 10 - WEIGHT_MARGIN and figures["weights_before"] == list(current)
    everywhere = rng.normal(size=(10, 3)) + 5.0
    assert choose_weights(good, everywhere, current, rate=0.01)[0] == current
    one_more = np.vstack([everywhere[:9], on_knn[:1] - [0.0, 0.0, 2.5]])
    assert choose_weights(good, one_more, current, rate=0.01)[0] == current
    two_parts = (2 / 3, 0.0, 1 / 3)
    assert choose_weights(good, on_knn, two_parts, rate=0.01, coarse=False)[0] == (0.0, 0.0, 1.0)
    on_coarse = on_knn[:, [0, 2, 1]]  # the signal on the coarse part, which this model does not have
    assert choose_weights(good, on_coarse, two_parts, rate=0.01, coarse=False)[0][1] == 0


def test_check_shift_warns_when_new_good_parts_score_higher() -> None:
    """The first inspections of a line against the calibration: the same distribution says nothing; good parts
    from a second session (scores moved up) are reported with the false-alarm rate the move implies."""
    rng = np.random.default_rng(4)
    reference = np.sort(rng.gamma(2.0, size=200))
    threshold, _ = conformal_threshold(reference, 0.01)
    cal = Calibration("leave_one_out", reference.tolist(), 0.01, threshold, 0.001, 1.0)
    assert check_shift(cal, rng.gamma(2.0, size=60)) is None
    assert check_shift(cal, rng.gamma(2.0, size=10) + 2.0) is None  # too few to tell
    warning = check_shift(cal, rng.gamma(2.0, size=60) + 2.0)
    assert warning is not None and "Mann-Whitney" in warning and "against 1% asked" in warning
    assert check_shift(Calibration("none", [], 0.01, None, 0.001, None), rng.gamma(2.0, size=60)) is None


def test_too_few_images_for_the_rate_asked_says_so_and_uses_the_maximum() -> None:
    scores = np.arange(14, dtype=float)
    threshold, note = conformal_threshold(scores, 0.01)
    assert threshold == 13.0 and "1/15" in note and "0.01" in note
    threshold, note = conformal_threshold(scores, 0.2)  # floor(0.2 * 15) - 1 = 2 scores may lie above: 11.0
    assert 8.0 <= threshold <= 11.0 and "estimate" in note  # 0.2 x 15 = 3 < 5: the tail, at most twice the rate
    threshold, note = conformal_threshold(scores, 0.4)  # 0.4 x 15 = 6: the conformal quantile alone
    assert threshold == 8.0 and note == ""


def test_too_few_images_extrapolate_the_tail_to_the_rate_asked() -> None:
    """With 40 good scores (too few to guarantee 1%) the threshold is the fitted upper tail's 1% point, never above
    the largest score: over many draws new good scores exceed it about as often as the largest score's 1/41 (2.4%;
    measured 2.95%), and one unusual good image far out (what a rare pose does to leave-one-out scores) no longer
    sets the threshold: about 1% of new good scores lie above it, not none."""
    rng = np.random.default_rng(3)
    rates, odd_rates = [], []
    for _ in range(400):
        calibration = rng.gamma(2.0, size=40)
        threshold, note = conformal_threshold(calibration, 0.01)
        assert threshold <= calibration.max() and "1/41" in note
        rates.append(float((rng.gamma(2.0, size=2000) > threshold).mean()))
        calibration[-1] = 40.0  # one good image unlike the others
        threshold, note = conformal_threshold(calibration, 0.01)
        assert threshold < 40.0 and "extrapolated" in note
        odd_rates.append(float((rng.gamma(2.0, size=2000) > threshold).mean()))
    assert np.mean(rates) <= 1 / 41 + 0.008
    assert 0.004 < np.mean(odd_rates) < 0.02
    few = rng.gamma(2.0, size=7)
    assert conformal_threshold(few, 0.01)[0] == few.max()  # fewer than 8 scores: no tail fit, the largest


def test_p_values_and_normalised_scores() -> None:
    calibration = [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_allclose(p_values([0.5, 2.0, 2.5, 9.0], calibration), [5 / 5, 4 / 5, 3 / 5, 1 / 5])
    np.testing.assert_allclose(normalized_scores([2.5, 4.0, 5.5], median=2.5, threshold=4.0), [0.0, 1.0, 2.0])


def test_pixel_threshold_is_the_quantile_at_the_rate() -> None:
    values = np.random.default_rng(1).uniform(size=2_000_000)
    quantiles = pixel_quantiles(values)
    assert len(quantiles) == len(PIXEL_RATES)
    for rate in (0.3, 0.01, 0.001):
        assert pixel_threshold_at(quantiles, rate) == pytest.approx(1 - rate, abs=2e-3)
    median, spread = robust_scale(np.random.default_rng(2).normal(5.0, 2.0, size=20_000))
    assert median == pytest.approx(5.0, abs=0.05) and spread == pytest.approx(2.0, abs=0.05)


def test_leave_one_out_calibration_uses_every_good_image(fitted_model: Spade) -> None:
    cal = fitted_model.calibration_
    assert cal.source == "leave_one_out" and cal.n == fitted_model.store_.n_images == 12
    assert fitted_model.image_threshold_ == cal.image_threshold and fitted_model.pixel_threshold_ is not None
    assert "1/13" in cal.note  # 12 good images cannot guarantee 1%: the model says so
    above = sum(s > cal.image_threshold for s in cal.scores)  # the tail's 1% point may lie below the largest
    assert cal.guaranteed_rate == pytest.approx((1 + above) / 13)


def test_leave_one_out_score_is_the_score_without_the_image(synthetic_root: Path) -> None:
    """The leave-one-out score of a training image equals that image's score from a model fitted without it."""
    train = list_images(synthetic_root / "train" / "good")
    settings = dict(k_gallery=4, device="cpu", progress=False, feature_dtype="float32")
    full = Spade(**settings, image_score="fused").fit(train)
    parts = list(full._leave_one_out_scores())
    for index in (0, 5):
        without = Spade(**settings, calibration="none", image_score="map_top").fit(
            [p for i, p in enumerate(train) if i != index])
        [fresh] = list(without._predict_parts([train[index]]))
        assert parts[index][0] == pytest.approx(fresh[0], rel=1e-3)  # the map part (fused: the top 1%)
        assert parts[index][1] == pytest.approx(fresh[1], rel=1e-3)  # kNN score


def test_verdicts_follow_the_thresholds_and_scores_are_readable(fitted_model: Spade, synthetic_root: Path) -> None:
    paths = list_images(synthetic_root / "test")
    predictions = fitted_model.predict(paths, original_size=True)
    for p in predictions:
        assert p.is_anomalous == (p.score > fitted_model.image_threshold_)
        assert p.normalized_score is not None and (p.normalized_score > 1) == p.is_anomalous
        assert 0 < p.p_value <= 1 and len(p.neighbours) == fitted_model.k_image
        assert p.neighbours[0][0] in fitted_model.train_names_
    model = fitted_model
    saved = (model.image_threshold_, model.pixel_threshold_)
    try:
        model.set_thresholds(image=-1e9)
        assert all(p.is_anomalous for p in model.predict(paths[:2]))
        model.set_thresholds(false_alarm_rate=0.5)
        assert model.calibration_.note == "" and model.image_threshold_ <= saved[0]
        model.set_thresholds(pixel_false_alarm_rate=0.2)
        assert model.pixel_threshold_ < saved[1]
        with pytest.raises(SettingError, match="false_alarm_rate"):
            model.set_thresholds(false_alarm_rate=2.0)
    finally:
        model.set_thresholds(false_alarm_rate=model.false_alarm_rate,
                             pixel_false_alarm_rate=model.pixel_false_alarm_rate)
    assert (model.image_threshold_, model.pixel_threshold_) == saved


def test_regions_of_an_anomalous_image(fitted_model: Spade, synthetic_root: Path) -> None:
    defective = [p for p in list_images(synthetic_root / "test") if p.parent.name != "good"]
    found = 0
    for p in fitted_model.predict(defective, original_size=True):
        if not p.is_anomalous:
            assert p.regions == []
            continue
        assert p.regions, p.name
        height, width = p.original_map.shape
        for region in p.regions:
            left, top, right, bottom = region.box
            assert 0 <= left < right <= width and 0 <= top < bottom <= height and region.area > 0
            assert region.peak >= region.mean > p.pixel_threshold
        assert p.regions[0].peak == pytest.approx(float(np.nanmax(p.original_map)))
        found += 1
    assert found


def test_holdout_and_validation_calibration(synthetic_root: Path) -> None:
    train = list_images(synthetic_root / "train" / "good")
    holdout = Spade(k_gallery=4, device="cpu", progress=False, calibration="holdout", calibration_fraction=0.25).fit(
        train)
    assert holdout.calibration_.source == "holdout" and holdout.calibration_.n == 3 and holdout.store_.n_images == 9
    validation = Spade(k_gallery=4, device="cpu", progress=False).fit(train[:8], validation=train[8:])
    assert validation.calibration_.source == "validation" and validation.calibration_.n == 4
    none = Spade(k_gallery=4, device="cpu", progress=False, calibration="none", image_score="map_top").fit(train)
    assert none.image_threshold_ is None and none.predict(train[:1])[0].is_anomalous is None
    with pytest.raises(SettingError, match="image_score"):
        Spade(calibration="none", image_score="fused", device="cpu").fit(train)


def test_adding_a_flagged_image_as_good(synthetic_root: Path) -> None:
    """After `add`, an image that was flagged is no longer flagged; other images' maps change only where the added
    image became one of their nearest normals."""
    train = list_images(synthetic_root / "train" / "good")
    test = list_images(synthetic_root / "test")
    model = Spade(k_gallery=4, k_image=4, device="cpu", progress=False).fit(train)
    before = {p.name: p for p in model.predict(test)}
    flagged = next(p for p in test if before[str(p)].is_anomalous)
    n_before = model.store_.n_images
    assert model.add([flagged]) is model
    assert model.store_.n_images == n_before + 1 and model.train_names_[-1] == str(flagged)
    assert model.calibration_.n == n_before + 1  # leave-one-out refreshed over every image
    after = {p.name: p for p in model.predict(test)}
    assert not after[str(flagged)].is_anomalous
    unchanged = 0
    for path in test:
        if path == flagged or str(flagged) in [name for name, _ in after[str(path)].neighbours]:
            continue
        np.testing.assert_array_equal(after[str(path)].anomaly_map, before[str(path)].anomaly_map)
        unchanged += 1
    assert unchanged > 0


def test_fused_score_without_calibration_scores_is_refused_in_one_line(synthetic_root: Path) -> None:
    """image_score="fused" (the default) scales its parts by their spread on good calibration scores: a fit that
    would have none (one training image, or holdout with too few to hold any out) is refused before any feature
    is extracted, naming the setting; a fused model whose calibration was taken away fails the same way."""
    train = list_images(synthetic_root / "train" / "good")
    cases = (({}, train[:1]), ({"calibration": "holdout"}, train[:5]), ({"calibration": "none"}, train))
    for settings, images in cases:
        with pytest.raises(SettingError, match="image_score") as caught:
            Spade(k_gallery=2, device="cpu", progress=False, **settings).fit(images)
        assert "\n" not in str(caught.value)
    assert Spade(k_gallery=2, device="cpu", progress=False, image_score="map_top").fit(train[:1]).predict(
        train[:1])[0].is_anomalous is None  # the other image scores fit on one image, without thresholds
    model = Spade(k_gallery=2, device="cpu", progress=False).fit(train[:3])
    model.score_scale_ = {}
    with pytest.raises(SettingError, match="calibrate"):
        model.predict(train[:1])


def test_recall_threshold_flags_the_share_asked() -> None:
    good, defects = [0.0, 1.0, 2.0, 3.0], [2.5, 4.0, 5.0, 6.0]
    for recall, flagged in ((1.0, 4), (0.75, 3), (0.5, 2), (0.1, 1)):
        threshold = recall_threshold(good, defects, recall)
        assert sum(d > threshold for d in defects) == flagged
    assert recall_threshold(good, defects, 1.0) == pytest.approx(2.25)  # midway to the next lower score (2.0)


def test_good_scores_above_the_reference_are_reported_in_words() -> None:
    rng = np.random.default_rng(4)
    reference = rng.normal(0, 1, 60)
    threshold, _ = conformal_threshold(reference, 0.01)
    same = compare_good_scores(reference, rng.normal(0, 1, 20), threshold=threshold, rate=0.01,
                               reference_name="training scores", new_name="new images", advice="recalibrate")
    assert not same["shifted"] and same["warning"] == ""
    shifted = compare_good_scores(reference, rng.normal(2.5, 1, 20), threshold=threshold, rate=0.01,
                                  reference_name="training scores", new_name="new images", advice="recalibrate")
    assert shifted["shifted"] and shifted["p_value"] < 1e-4 and shifted["flagged"] > 0.3
    assert shifted["warning"].startswith("the new images score above the training scores")
    assert "against 1% asked; recalibrate" in shifted["warning"]


def _brightened(paths: list[Path], folder: Path, gain: float) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        pixels = np.asarray(Image.open(path), dtype=np.float32) * gain
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / path.name)
    return folder


def test_holdout_good_images_that_score_higher_are_warned_about(synthetic_root: Path, tmp_path: Path) -> None:
    """fit(validation=...) calibrates on the held-out good images and checks them against the training images'
    leave-one-out scores: line images under brighter light are reported (the threshold would not have held),
    good images like the training ones are not."""
    train = synthetic_root / "train" / "good"
    good = list_images(synthetic_root / "test" / "good")
    settings = dict(k_gallery=4, device="cpu", progress=False)
    like = Spade(**settings).fit(train, validation=good)
    assert like.calibration_.source == "validation" and like.calibration_.warning == ""
    assert like.calibration_.check["n_reference"] == 12 and like.calibration_.check["n_new"] == 4
    brighter = _brightened(good, tmp_path / "brighter", 1.45)
    shifted = Spade(**settings).fit(train, validation=brighter)
    assert shifted.calibration_.check["shifted"], shifted.calibration_.check
    assert "held-out good images score above the training images' leave-one-out scores" in \
        shifted.calibration_.warning
    saved = shifted.save(tmp_path / "m.safetensors")
    from spade_ad import load

    assert load(saved).calibration_.warning == shifted.calibration_.warning  # kept in the model file


def test_calibrate_for_a_recall_on_labelled_defects(fitted_model: Spade, synthetic_root: Path) -> None:
    from sklearn.base import clone

    model = clone(fitted_model).fit(synthetic_root / "train" / "good")
    defects = [p for d in ("scratch", "spot") for p in list_images(synthetic_root / "test" / d)]
    model.calibrate(synthetic_root / "test" / "good", defect=defects, recall=1.0)
    cal = model.calibration_
    assert cal.threshold_source == "recall" and cal.check["recall"] == 1.0 and "recall of 1" in cal.note
    assert all(p.is_anomalous for p in model.predict(defects))
    with pytest.raises(SettingError, match="recall"):
        model.calibrate(synthetic_root / "test" / "good", recall=0.9)  # no defects to take the share of


def test_model_files_from_before_map_weight_keep_equal_weights(
        fitted_model: Spade, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written before `map_weight` existed scores as it did (weights 1/2), not with today's default."""
    from spade_ad import load
    from spade_ad.data import modelfile

    stored = modelfile.settings_table.stored
    monkeypatch.setattr(modelfile.settings_table, "stored",
                        lambda params: {k: v for k, v in stored(params).items() if k != "map_weight"})
    old = fitted_model.save(tmp_path / "old.safetensors")
    monkeypatch.undo()
    assert load(old).map_weight == 0.5
    assert load(fitted_model.save(tmp_path / "new.safetensors")).map_weight == pytest.approx(1 / 3)


def test_fit_names_the_defective_parts_in_its_training_folder(tmp_path: Path) -> None:
    """Two defective parts (a stain, a washer) slipped among 22 good ones: fit names exactly those two, the model
    file keeps them, and the threshold is not set by them (it lies below both)."""
    from spade_ad import load
    from spade_ad.data.synthetic import make_synthetic_dataset, read_variants

    root = make_synthetic_dataset(tmp_path / "data", n_train=24, n_test_good=0, n_test_defect=0, size=(160, 224),
                                  seed=3, train_defects=2)
    slipped = {Path(name).name for name, kind in read_variants(root)["train"].items() if kind.startswith("defect")}
    model = Spade(k_gallery=5, device="cpu", progress=False).fit(root / "train" / "good")
    cal = model.calibration_
    assert set(cal.suspects) == slipped and len(cal.suspects) == 2
    assert cal.image_threshold < min(cal.suspect_scores)
    # sought before the density normalisation, and shown there: both parts of the line on one scale
    assert len(cal.suspect_raw_scores) == 2 and cal.suspect_raw_end < min(cal.suspect_raw_scores)
    line = suspects_warning(cal)
    assert "these 2 training images score like defects (leave-one-out score before the density normalisation; " \
        f"the other good images end at {cal.suspect_raw_end:.3g})" in line
    loaded = load(model.save(tmp_path / "m.safetensors")).calibration_
    assert (loaded.suspects, loaded.suspect_scores) == (cal.suspects, cal.suspect_scores)
    assert (loaded.suspect_raw_scores, loaded.suspect_raw_end) == (cal.suspect_raw_scores, cal.suspect_raw_end)


def test_fit_exclude_leaves_the_named_training_images_out(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`fit --exclude` with the two names fit gave: the model is fitted without them (and names no suspect then); a
    pattern that matches no training image is one line and exit code 2, before anything is fitted."""
    from spade_ad import load
    from spade_ad.apps.cli import main
    from spade_ad.data.synthetic import make_synthetic_dataset, read_variants

    root = make_synthetic_dataset(tmp_path / "data", n_train=24, n_test_good=0, n_test_defect=0, size=(160, 224),
                                  seed=3, train_defects=2)
    slipped = sorted(Path(name).name for name, kind in read_variants(root)["train"].items()
                     if kind.startswith("defect"))
    common = ["--k-gallery", "5", "--device", "cpu"]
    main(["fit", str(root / "train" / "good"), "-o", str(tmp_path / "m.safetensors"), *common,
          *[arg for name in slipped for arg in ("--exclude", name)]])
    out, err = capsys.readouterr()
    assert f"left out 2 training images: {', '.join(slipped)}" in out and "like defects" not in err
    model = load(tmp_path / "m.safetensors")
    assert len(model.train_names_) == 22 and not set(slipped) & {Path(n).name for n in model.train_names_}
    with pytest.raises(SystemExit) as exited:
        main(["fit", str(root / "train" / "good"), "-o", str(tmp_path / "n.safetensors"), *common,
              "--exclude", "nothing-*.png"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "'nothing-*.png' matches none of the 24" in err
    assert not (tmp_path / "n.safetensors").exists()


def test_density_normalisation_measures_a_rare_part_against_its_own_kind() -> None:
    """LOF at the image level: each part over the mean leave-one-out part of the image's nearest training images.
    A rare good part among the rare training parts it resembles comes out as usual; a defect on a usual part
    stands out by the same measure; duplicates (leave-one-out parts 0) do not divide by zero."""
    from spade_ad.core.score_parts import density_floor, density_normalised

    train = np.array([[1.0, 2.0, 0.5]] * 8 + [[5.0, 8.0, 3.0]] * 2)  # 8 usual parts, 2 rare ones
    rare_good = density_normalised(np.array([[5.0, 8.0, 3.0]]), np.array([[8, 9, 0]]), train, 2)
    usual_defect = density_normalised(np.array([[5.0, 8.0, 3.0]]), np.array([[0, 1, 2]]), train, 3)
    np.testing.assert_allclose(rare_good, [[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(usual_defect, [[5.0, 4.0, 6.0]])
    assert (density_normalised(np.ones((2, 3)), np.zeros((2, 3), int), train, 0) == 1).all()  # K = 0: off
    zeros = np.zeros((4, 3))
    zeros[3] = [2.0, 4.0, 1.0]
    out = density_normalised(np.ones((1, 3)), np.array([[0, 1, 2]]), zeros, 3)
    np.testing.assert_allclose(out, 1 / density_floor(zeros)[None]) and np.isfinite(out).all()


def test_map_and_coarse_weights_add_up_to_at_most_one() -> None:
    from spade_ad import settings as table

    assert table.validate({})["map_weight"] + table.validate({})["coarse_weight"] == pytest.approx(2 / 3)
    with pytest.raises(SettingError, match="coarse_weight and map_weight"):
        table.validate({"map_weight": 0.8})
    assert table.validate({"map_weight": 0.8, "coarse_weight": 0.0})["map_weight"] == 0.8


def test_the_strongest_part_takes_its_share_of_the_fused_score() -> None:
    """max_share of the score is the strongest scaled part (each times its weight over the largest weight), the rest
    the weighted mean; a part without weight never counts, and share 0 is the weighted mean itself."""
    from spade_ad.core.score_parts import combine_scores, with_strongest

    scaled = [np.array([3.0, -1.0]), np.array([0.0, -2.0]), np.array([0.0, -4.0])]
    weighted = sum(part / 3 for part in scaled)
    assert with_strongest(weighted, scaled, (1 / 3,) * 3, 0.0) is weighted
    assert with_strongest(weighted, scaled, (1 / 3,) * 3, 0.25) == pytest.approx(0.75 * weighted + 0.25 * np.array(
        [3.0, -1.0]))
    # weights (1/2, 0, 1/2): the coarse part (0 here, above the others' -1 and -4) is not in the maximum
    assert with_strongest(np.zeros(2), scaled, (0.5, 0.0, 0.5), 1.0) == pytest.approx([3.0, -1.0])
    # weights (1/2, 1/6, 1/3): the kNN part counts two thirds, the coarse part a third
    assert with_strongest(np.zeros(1), [np.array([0.0]), np.array([6.0]), np.array([4.0])], (0.5, 1 / 6, 1 / 3),
                          1.0) == pytest.approx([8 / 3])
    scale = {"map": (1.0, 2.0), "coarse": (0.0, 1.0), "knn": (0.5, 0.5)}
    fused = combine_scores("fused", scale, np.array([7.0]), np.array([0.5]), 1 / 3, np.array([0.0]), 1 / 3, 0.5)
    assert fused == pytest.approx(0.5 * (3.0 + 0.0 + 0.0) / 3 + 0.5 * 3.0)


def test_model_files_from_before_max_share_score_with_the_weighted_mean(
        fitted_model: Spade, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written before `max_share` existed loads with it 0 and scores as it did; a new file keeps its own."""
    from sklearn.base import clone

    from spade_ad import load
    from spade_ad.data import modelfile

    model = clone(fitted_model).set_params(max_share=0.0).fit(synthetic_root / "train" / "good")
    stored = modelfile.settings_table.stored
    monkeypatch.setattr(modelfile.settings_table, "stored",
                        lambda params: {k: v for k, v in stored(params).items() if k != "max_share"})
    old = load(model.save(tmp_path / "old.safetensors"))
    monkeypatch.undo()
    images = list_images(synthetic_root / "test")
    assert old.max_share == 0.0 and old.score(images).tolist() == model.score(images).tolist()
    assert load(fitted_model.save(tmp_path / "new.safetensors")).max_share == fitted_model.max_share == 0.25
    assert fitted_model.score(images).tolist() != model.score(images).tolist()


def test_model_files_from_before_the_coarse_part_score_exactly_as_before(
        fitted_model: Spade, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file written before `coarse_weight` and `density_k` existed (here: without them in its header) loads with
    both off and scores with the two-part formula of that time, to the bit: its image scores, its calibration
    scores and its threshold."""
    from sklearn.base import clone

    from spade_ad import load
    from spade_ad.data import modelfile

    model = clone(fitted_model).set_params(map_weight=2 / 3, coarse_weight=0.0, density_k=0, max_share=0.0)
    model.fit(synthetic_root / "train" / "good")
    stored = modelfile.settings_table.stored
    monkeypatch.setattr(modelfile.settings_table, "stored", lambda params: {
        k: v for k, v in stored(params).items() if k not in ("coarse_weight", "density_k", "max_share")})
    old = load(model.save(tmp_path / "old.safetensors"))
    monkeypatch.undo()
    assert (old.coarse_weight, old.density_k, old.map_weight, old.max_share) == (0.0, 0, 2 / 3, 0.0)
    assert old.calibration_.train_parts == [] and set(old.score_scale_) == {"map", "knn"}

    def two_parts(parts: list) -> np.ndarray:  # the fused score as the files of that time compute it
        (m1, s1), (m2, s2) = old.score_scale_["map"], old.score_scale_["knn"]
        return np.array([2 / 3 * (p.map_part - m1) / s1 + (1.0 - 2 / 3) * (p.knn_part - m2) / s2 for p in parts])

    images = list_images(synthetic_root / "test")
    assert [p.score for p in old.predict(images)] == two_parts(list(old._predict_parts(images))).tolist()
    loo = two_parts(list(old._leave_one_out_scores()))
    assert old.calibration_.scores == sorted(loo.tolist())
    assert old.image_threshold_ == conformal_threshold(loo, old.false_alarm_rate)[0]


def test_held_out_calibration_and_add_keep_every_training_image_s_parts(synthetic_root: Path) -> None:
    """With held-out good images the density normalisation still divides by the training images' leave-one-out
    parts (computed once, also for the held-out check); `add` extends them to the added images."""
    train = list_images(synthetic_root / "train" / "good")
    model = Spade(k_gallery=4, device="cpu", progress=False).fit(train[:8], validation=synthetic_root / "test" / "good")
    assert model.calibration_.source == "validation" and np.shape(model.calibration_.train_parts) == (8, 3)
    assert model.calibration_.check["n_reference"] == 8  # the held-out scores compared with the leave-one-out ones
    before = model.score(synthetic_root / "test" / "good")
    assert np.isfinite(before).all() and model.calibration_.image_threshold is not None
    model.add(train[8:10])
    assert np.shape(model.calibration_.train_parts) == (10, 3) and model.store_.n_images == 10
    assert np.isfinite(model.score(synthetic_root / "test" / "good")).all()


def test_the_other_image_scores_keep_two_parts_without_normalisation() -> None:
    """map_top / knn have no parts to weigh: there the coarse part and the density normalisation do not apply,
    whatever the settings say; a tiled model has them as any fused model does."""
    from spade_ad.settings import SearchSettings, density_k, uses_coarse

    for model in (Spade(), Spade(tile_size=256)):
        assert uses_coarse(model) and density_k(model) == 3 and SearchSettings.of(model).coarse
    for model in (Spade(image_score="map_top"), Spade(image_score="knn")):
        assert not uses_coarse(model) and density_k(model) == 0 and not SearchSettings.of(model).coarse
    assert not uses_coarse(Spade(coarse_weight=0.0)) and density_k(Spade(density_k=0)) == 0
