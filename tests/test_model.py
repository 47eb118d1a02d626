"""The estimator: scikit-learn contract, shapes, ranges, determinism and a quality floor on generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_ad import NotFittedError, Spade
from spade_ad.apps.evaluation.metrics import image_auroc, pixel_auroc
from spade_ad.core.maps_numpy import smooth, upsample
from spade_ad.data.images import list_images


def _test_set(root: Path) -> tuple[list[Path], np.ndarray, list[np.ndarray]]:
    paths = list_images(root / "test")
    labels = np.array([p.parent.name != "good" for p in paths])
    masks = []
    for path in paths:
        mask_path = root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        masks.append(np.asarray(Image.open(mask_path)) > 0 if mask_path.exists() else None)
    return paths, labels, masks


def test_unfitted_model_raises_clear_error() -> None:
    model = Spade()
    for call in (model.predict, model.score):
        with pytest.raises(NotFittedError, match="not fitted"):
            call(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(NotFittedError):
        model.save("x.safetensors")


def test_init_only_stores_settings_and_params_round_trip() -> None:
    model = Spade("efficientnet_lite1", k_gallery=7, fusion="concat")
    params = model.get_params()
    assert params["backbone"] == "efficientnet_lite1" and params["k_gallery"] == 7
    assert not [name for name in vars(model) if name.endswith("_")]
    assert Spade(**params).get_params() == params
    assert "k_gallery=7" in repr(model)
    with pytest.raises(ValueError, match="unknown setting"):
        model.set_params(k=3)


@pytest.mark.parametrize("bad", [
    {"fusion": "max"}, {"kappa": 0}, {"sigma": -1}, {"resize": "crop"}, {"layers": ()}, {"patch_size": 2},
    {"search_radius": -1},
])
def test_invalid_settings_fail_at_fit(bad: dict, synthetic_root: Path) -> None:
    with pytest.raises(ValueError):
        Spade(**bad).fit(synthetic_root / "train" / "good")


def test_fit_sets_fitted_attributes(fitted_model: Spade) -> None:
    # 12 good images: all are stored, and each is scored without itself to calibrate the thresholds.
    assert fitted_model.store_.n_images == 12
    assert len(fitted_model.train_names_) == 12 and fitted_model.skipped_ == []
    assert len(fitted_model.calibration_scores_) == 12
    assert fitted_model.backbone_.name == "efficientnet_lite0"


def test_thresholds_come_from_normal_images_and_give_verdicts(fitted_model: Spade, synthetic_root: Path) -> None:
    good = fitted_model.calibration_scores_  # 12 images: too few for 1%, the threshold is the fitted tail's point
    assert np.median(good) < fitted_model.image_threshold_ <= max(good)
    assert fitted_model.pixel_threshold_ > 0
    paths, labels, _ = _test_set(synthetic_root)
    predictions = fitted_model.predict(paths, original_size=True)
    verdicts = np.array([p.is_anomalous for p in predictions])
    assert verdicts.dtype == bool
    assert verdicts[labels].mean() >= 0.5  # most defects flagged from normal data alone
    mask = predictions[int(np.argmax(labels))].defect_mask
    assert mask.shape == (160, 224) and mask.dtype == bool


def test_calibration_can_be_disabled_or_use_a_validation_folder(synthetic_root: Path) -> None:
    train = synthetic_root / "train" / "good"
    plain = Spade(k_gallery=3, calibration="none", image_score="map_top", progress=False).fit(train)
    assert plain.image_threshold_ is None and plain.store_.n_images == 12
    assert plain.predict(list_images(synthetic_root / "test" / "good")[:1])[0].is_anomalous is None
    with_validation = Spade(k_gallery=3, progress=False).fit(train, validation=synthetic_root / "test" / "good")
    assert with_validation.store_.n_images == 12 and len(with_validation.calibration_scores_) == 4


def test_predict_shapes_ranges_and_quality(fitted_model: Spade, synthetic_root: Path) -> None:
    paths, labels, masks = _test_set(synthetic_root)
    predictions = fitted_model.predict(paths, original_size=True)
    parts = {part.item.name: part for part in fitted_model._predict_parts(paths, full=True)}
    train_parts = np.asarray(fitted_model.calibration_.train_parts)
    assert train_parts.shape == (fitted_model.store_.n_images, 3) and (train_parts > 0).all()
    assert [p.name for p in predictions] == [str(p) for p in paths]
    for prediction in predictions:
        assert prediction.anomaly_map.dtype == np.float32
        assert prediction.anomaly_map.shape == prediction.geometry.input_size
        assert prediction.original_map.shape == (160, 224)
        assert np.isfinite(prediction.original_map).all() and prediction.original_map.min() >= 0
        top = np.sort(prediction.anomaly_map.ravel())[-int(prediction.anomaly_map.size * 0.01):]
        knn = np.mean([distance for _, distance in prediction.neighbours])  # the k_image nearest global features
        part = parts[prediction.name]
        assert part.map_part == pytest.approx(float(top.mean()), rel=1e-6) and part.knn_part == pytest.approx(knn)
        # image_score="fused": the top 1% of the map, the coarsest level's own top 1% and the kNN score, each
        # divided by the mean leave-one-out value of that part over the image's 3 nearest training images (by
        # global feature: the first is the kNN's neighbour), scaled by its spread on good images, weighted 1:1:1,
        # with a quarter of the score the largest of the three (max_share)
        assert fitted_model.train_names_[int(part.near[0])] == prediction.neighbours[0][0] and len(part.near) == 3
        density = train_parts[np.asarray(part.near)].mean(0)
        values = np.array([part.map_part, part.coarse_part, knn]) / density
        (m1, s1), (m2, s2), (m3, s3) = (fitted_model.score_scale_[k] for k in ("map", "coarse", "knn"))
        assert fitted_model.map_weight == fitted_model.coarse_weight == pytest.approx(1 / 3)
        scaled = np.array([(values[0] - m1) / s1, (values[1] - m2) / s2, (values[2] - m3) / s3])
        assert fitted_model.max_share == 0.25
        assert prediction.score == pytest.approx(0.75 * scaled.mean() + 0.25 * scaled.max(), rel=1e-5)
    scores = [p.score for p in predictions]
    maps = [p.original_map for p in predictions]
    full_masks = [m if m is not None else np.zeros((160, 224), bool) for m in masks]
    assert image_auroc(scores, labels) >= 0.9
    assert pixel_auroc(maps, full_masks) >= 0.9


def test_same_data_and_settings_give_same_scores(fitted_model: Spade, synthetic_root: Path) -> None:
    paths = list_images(synthetic_root / "test")[:3]
    again = Spade(**fitted_model.get_params()).fit(synthetic_root / "train" / "good")
    first = fitted_model.predict(paths)
    second = again.predict(paths)
    for a, b in zip(first, second):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_score_fast_path_matches_predict_with_knn(synthetic_root: Path) -> None:
    model = Spade(image_score="knn", k_image=2, k_gallery=3, progress=False).fit(synthetic_root / "train" / "good")
    paths = list_images(synthetic_root / "test")
    fast = model.score(paths)
    slow = np.array([p.score for p in model.predict(paths)])
    np.testing.assert_allclose(fast, slow, rtol=1e-6)
    assert fast.shape == (len(paths),) and (fast >= 0).all()


def test_accepts_arrays_tensors_and_pil_images(fitted_model: Spade, synthetic_root: Path) -> None:
    paths = list_images(synthetic_root / "test")[:2]
    pil = [Image.open(p).convert("RGB") for p in paths]
    array = np.stack([np.asarray(im) for im in pil])
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
    from_paths = fitted_model.score(paths)
    np.testing.assert_allclose(fitted_model.score(pil), from_paths, rtol=1e-5)
    np.testing.assert_allclose(fitted_model.score(array), from_paths, rtol=1e-5)
    np.testing.assert_allclose(fitted_model.score(tensor), from_paths, rtol=1e-3)


def test_mixed_sizes_and_grayscale_in_one_call(fitted_model: Spade) -> None:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (100, 300), dtype=np.uint8)),  # grayscale, wide
        Image.fromarray(rng.integers(0, 255, (300, 100, 3), dtype=np.uint8)),  # tall
        Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA"),
    ]
    predictions = fitted_model.predict(images, original_size=True)
    assert [p.original_map.shape for p in predictions] == [(100, 300), (300, 100), (64, 64)]


@pytest.mark.parametrize("settings", [
    {"fusion": "concat"}, {"kappa": 3, "distance": "squared"}, {"resize": "paper_crop"}, {"sigma": 0},
    {"layers": (1, 2, 3)}, {"patch_size": 3}, {"search_radius": 2}, {"search_radius": 1, "fusion": "concat"},
])
def test_setting_variants_run_end_to_end(settings: dict, synthetic_root: Path) -> None:
    model = Spade(k_gallery=3, progress=False, **settings).fit(synthetic_root / "train" / "good")
    prediction = model.predict(list_images(synthetic_root / "test")[:1], original_size=True)[0]
    assert prediction.original_map.shape == (160, 224)
    if settings.get("resize") == "paper_crop":
        assert np.isnan(prediction.original_map[0, 0]) and np.isfinite(prediction.original_map[80, 112])
    else:
        assert np.isfinite(prediction.original_map).all()


def test_search_radius_covering_the_map_gives_the_whole_search(fitted_model: Spade, synthetic_root: Path) -> None:
    paths = list_images(synthetic_root / "test")[:2]
    windowed = Spade(**{**fitted_model.get_params(), "search_radius": 100}).fit(synthetic_root / "train" / "good")
    for whole, window in zip(fitted_model.predict(paths), windowed.predict(paths)):
        np.testing.assert_allclose(window.anomaly_map, whole.anomaly_map, rtol=1e-5, atol=1e-5)


def test_search_radius_refuses_images_of_several_sizes() -> None:
    rng = np.random.default_rng(0)
    model = Spade(k_gallery=2, search_radius=1, progress=False, calibration_fraction=0).fit(
        [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    )
    with pytest.raises(ValueError, match=r"one size: the test feature map is 28x\d+, training maps are 28x28"):
        model.predict(Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_gives_the_cpu_maps(fitted_model: Spade, synthetic_root: Path) -> None:
    """Same maps on CUDA as on CPU: to float rounding with full-precision convolutions, and within 1% of the map's
    range with cuDNN's TF32 convolutions (PyTorch's default on Ampere and later GPUs, kept for speed)."""
    paths = list_images(synthetic_root / "test")[:3]
    cpu_maps = [p.anomaly_map for p in fitted_model.predict(paths)]
    settings = {**fitted_model.get_params(), "device": "cuda"}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        exact_maps = [p.anomaly_map for p in Spade(**settings).fit(synthetic_root / "train" / "good").predict(paths)]
    default_maps = [p.anomaly_map for p in Spade(**settings).fit(synthetic_root / "train" / "good").predict(paths)]
    for cpu_map, exact_map, default_map in zip(cpu_maps, exact_maps, default_maps):
        span = float(np.ptp(cpu_map)) or 1.0
        assert np.abs(cpu_map - exact_map).max() <= 1e-4 * span
        assert np.abs(cpu_map - default_map).max() <= 1e-2 * span


def test_fit_on_images_of_different_sizes_and_fewer_than_k(synthetic_root: Path) -> None:
    paths = list_images(synthetic_root / "train" / "good")[:4]
    images = [Image.open(p).convert("RGB") for p in paths]
    images[1] = images[1].resize((300, 120))  # another aspect ratio in the training set
    images[2] = images[2].convert("L")
    model = Spade(progress=False).fit(images)  # K=50 > 4 images: the gallery is every training image
    assert model.store_.n_images == 4 and model.image_threshold_ == max(model.calibration_scores_)
    assert "1/5" in model.calibration_.note  # four good images cannot guarantee a 1% false-alarm rate
    prediction = model.predict(list_images(synthetic_root / "test")[:1], original_size=True)[0]
    assert prediction.original_map.shape == (160, 224) and np.isfinite(prediction.score)


def test_fit_records_every_skipped_image_training_or_calibration(synthetic_root: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "good"
    shutil.copytree(synthetic_root / "train" / "good", folder)
    for name in ("000.png", "005.png"):
        (folder / name).write_text("not an image")
    seen: list[str] = []
    model = Spade(k_gallery=3, progress=False).fit(
        folder, skip_bad=True, on_skip=lambda item, error: seen.append(item.name)
    )
    assert sorted(name for name, _ in model.skipped_) == ["000.png", "005.png"] == sorted(seen)
    assert model.store_.n_images == len(model.calibration_scores_) == 10


@pytest.mark.parametrize("shape", [(224, 224), (120, 300), (10, 40), (3, 3), (1, 8)])
def test_smooth_map_equals_the_2d_gaussian_blur(shape: tuple[int, int]) -> None:
    """The separable blur gives torchvision's 2-D Gaussian blur (same radius rule, reflected borders)."""
    from torchvision.transforms.functional import gaussian_blur

    anomaly_map = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    radius = min(int(4 * 4.0 + 0.5), min(shape) - 1)
    expected = gaussian_blur(anomaly_map[None, None], [2 * radius + 1] * 2, [4.0, 4.0])[0, 0]
    smoothed = smooth(anomaly_map.numpy(), 4.0)
    assert smoothed.shape == anomaly_map.shape and smoothed.dtype == np.float32
    np.testing.assert_allclose(smoothed, expected.numpy(), rtol=0, atol=1e-5)
    assert np.array_equal(smooth(anomaly_map.numpy(), 0.0), anomaly_map.numpy())


@pytest.mark.parametrize(("source", "target"), [((7, 9), (56, 72)), ((28, 448), (224, 3584)), ((5, 5), (5, 5)),
                                                 ((10, 3), (4, 17)), ((1, 1), (3, 2))])
def test_upsample_equals_torch_bilinear(source: tuple[int, int], target: tuple[int, int]) -> None:
    """The shared numpy resize gives torch's bilinear interpolate (half-pixel centres, clamped borders)."""
    grid = torch.rand(*source, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.interpolate(grid[None, None], size=target, mode="bilinear",
                                               align_corners=False)[0, 0]
    np.testing.assert_allclose(upsample(grid.numpy(), target), expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("global_view", ["square", "input"])
def test_global_feature_comes_from_the_global_view(synthetic_root: Path, global_view: str) -> None:
    """The stored global feature of a non-square training image is the backbone's pooled feature of the image
    squashed to image_size x image_size (global_view="square"), or of the network input itself ("input")."""
    from spade_ad.core.geometry import image_to_array, plan_geometry

    train = list_images(synthetic_root / "train" / "good")[:3]
    model = Spade(k_gallery=2, device="cpu", progress=False, global_view=global_view).fit(train)
    image = Image.open(train[1]).convert("RGB")
    views = {mode: torch.from_numpy(image_to_array(image, plan_geometry((image.height, image.width), 224, mode)))
             for mode in ("squash", "keep_aspect")}
    assert views["squash"].shape[1:] == (224, 224) and views["keep_aspect"].shape[1:] != (224, 224)
    with torch.no_grad():
        expected = {mode: model.backbone_(view[None])[1][0] for mode, view in views.items()}
    stored = model.store_.global_features[model.train_names_.index(str(train[1]))]
    same, other = ("squash", "keep_aspect") if global_view == "square" else ("keep_aspect", "squash")
    assert torch.allclose(stored, expected[same], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stored, expected[other], rtol=1e-2, atol=1e-2)


def test_the_coarse_part_is_the_coarsest_level_s_map_made_as_the_map_is(synthetic_root: Path) -> None:
    """With one pyramid level the coarsest level's own map is the fused map: the third part equals the map part,
    at predict and in the training images' leave-one-out parts (a real check that it is upsampled and smoothed
    like the fused map)."""
    train = list_images(synthetic_root / "train" / "good")[:6]
    model = Spade(layers=(3,), k_gallery=3, device="cpu", progress=False).fit(train)
    parts = list(model._predict_parts(list_images(synthetic_root / "test")[:4]))
    assert [p.coarse_part for p in parts] == pytest.approx([p.map_part for p in parts], rel=1e-6)
    train_parts = np.asarray(model.calibration_.train_parts)
    np.testing.assert_allclose(train_parts[:, 1], train_parts[:, 0], rtol=1e-6)
