"""The batched device pipeline (`spade_ad.core.device_maps`): the same search, maps, scores and verdicts as the
per-image CPU path, run here on CPU tensors through `Spade._device_pipeline = True` (the code a GPU runs); `-m cuda`
runs the same comparison with the model on a GPU (`benchmarks/gpu_check.sh`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spade_ad import Spade
from spade_ad.core import device_maps
from spade_ad.core import search_numpy as numpy_search
from spade_ad.core import search_torch as search
from spade_ad.data.images import list_images
from spade_ad.estimators.prediction import Prediction


@pytest.mark.parametrize(("kappa", "budget"), [(1, None), (3, None), (1, 4096 * 4), (5, 2**20)])
def test_batched_search_is_the_per_image_search(kappa: int, budget: int | None) -> None:
    """Small budgets make many tiles and one image per product: the running top-k across tiles and groups."""
    rng = np.random.default_rng(0)
    queries = torch.from_numpy(rng.normal(size=(5, 64, 12)).astype(np.float32))
    banks = torch.from_numpy(rng.normal(size=(5, 700, 12)).astype(np.float16)).float()
    got = device_maps.batched_topk_squared_distances(queries, banks, kappa, budget)
    assert got.shape == (5, 64, kappa)
    for image in range(5):
        torch_search = search.topk_squared_distances(queries[image], banks[image], kappa)[0]
        numpy_answer = numpy_search.topk_squared_distances(queries[image].numpy(), banks[image].numpy(), kappa)[0]
        np.testing.assert_allclose(got[image].numpy(), torch_search.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[image].numpy(), numpy_answer, rtol=1e-5, atol=1e-5)


def test_batched_search_refuses_an_empty_bank() -> None:
    with pytest.raises(ValueError, match="empty"):
        device_maps.batched_topk_squared_distances(torch.zeros(1, 3, 4), torch.zeros(1, 0, 4), 1)


@pytest.fixture
def on_device(fitted_model: Spade) -> Iterator[Spade]:
    """The session's fitted model with the device pipeline forced on (CPU tensors), put back afterwards."""
    fitted_model._device_pipeline = True
    try:
        yield fitted_model
    finally:
        del fitted_model._device_pipeline


def _predict(model: Spade, paths: list[Path], **kwargs: Any) -> list[Prediction]:
    return model.predict(paths, original_size=True, **kwargs)


def _assert_same(got: list[Prediction], want: list[Prediction], tolerance: float = 1e-5) -> None:
    """Maps (input and original size) within `tolerance` of the reference map's range; scores to 1e-5 relative;
    identical verdicts and region boxes."""
    assert [p.name for p in got] == [p.name for p in want]
    for mine, theirs in zip(got, want):
        span = float(np.ptp(theirs.anomaly_map)) or 1.0
        np.testing.assert_allclose(mine.anomaly_map, theirs.anomaly_map, rtol=0, atol=tolerance * span)
        assert mine.original_map is not None and theirs.original_map is not None
        assert mine.original_map.shape == theirs.original_map.shape
        np.testing.assert_allclose(mine.original_map, theirs.original_map, rtol=0, atol=tolerance * span,
                                   equal_nan=True)
        assert mine.score == pytest.approx(theirs.score, rel=1e-5, abs=1e-6)
        assert mine.is_anomalous == theirs.is_anomalous
        assert [r.box for r in mine.regions] == [r.box for r in theirs.regions]


def test_device_pipeline_gives_the_cpu_path_s_predictions(fitted_model: Spade, synthetic_root: Path) -> None:
    paths = list_images(synthetic_root / "test")
    want = _predict(fitted_model, paths)
    fitted_model._device_pipeline = True
    try:
        calls: list[int] = []
        original = device_maps.predict_batch

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(len(args[3]))
            return original(*args, **kwargs)

        device_maps.predict_batch = counted  # type: ignore[assignment]
        try:
            got = _predict(fitted_model, paths)
            parts = list(fitted_model._predict_parts(paths))  # what calibration reads: the ScoredImages
        finally:
            device_maps.predict_batch = original  # type: ignore[assignment]
    finally:
        del fitted_model._device_pipeline
    assert sum(calls) == 2 * len(paths) and max(calls) > 1  # whole batches went through the device pipeline
    _assert_same(got, want)
    assert any(p.is_anomalous for p in want) and not all(p.is_anomalous for p in want)
    for part, prediction in zip(parts, want):
        array = part.anomaly_map
        np.testing.assert_allclose(array, prediction.anomaly_map, rtol=0, atol=1e-5 * float(np.ptp(array)))
        assert part.knn_part == pytest.approx(np.mean([d for _, d in prediction.neighbours]), rel=1e-5)  # the kNN part


@pytest.mark.parametrize("image_score", ["map_max", "map_top"])
def test_device_pipeline_scores_every_image_score(on_device: Spade, synthetic_root: Path, image_score: str) -> None:
    paths = list_images(synthetic_root / "test")[:4]
    before = on_device.image_score
    on_device.image_score = image_score
    try:
        got = [part.map_part for part in on_device._predict_parts(paths)]
        on_device._device_pipeline = False
        want = [part.map_part for part in on_device._predict_parts(paths)]
    finally:
        on_device.image_score = before
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reduced_galleries_are_the_same_share_of_each_image(on_device: Spade, synthetic_root: Path) -> None:
    """With max_search_pairs below the exact search's pairs, both paths search the same coreset prefixes."""
    paths = list_images(synthetic_root / "test")[:4]
    before = on_device.max_search_pairs
    on_device.max_search_pairs = 50_000  # well below 5 images x the stride-8 level's pairs
    try:
        got = _predict(on_device, paths)
        on_device._device_pipeline = False
        want = _predict(on_device, paths)
        on_device.max_search_pairs = before
        exact = _predict(on_device, paths)
    finally:
        on_device.max_search_pairs = before
    _assert_same(got, want)
    assert not np.allclose(want[0].anomaly_map, exact[0].anomaly_map)  # the reduction did reduce


@pytest.mark.parametrize("change", [{"fusion": "concat"}, {"search_radius": 1}])
def test_batches_the_pipeline_cannot_take_go_image_by_image(on_device: Spade, synthetic_root: Path,
                                                            change: dict[str, Any]) -> None:
    paths = list_images(synthetic_root / "test")[:2]
    before = {name: getattr(on_device, name) for name in change}
    for name, value in change.items():
        setattr(on_device, name, value)
    try:
        pyramid = [torch.zeros(1, 1, 4, 4)] * 2
        assert not device_maps.supports(on_device.store_, torch.zeros(1, 2, dtype=torch.int64), pyramid,
                                        fusion=on_device.fusion, search_radius=on_device.search_radius)
        got = _predict(on_device, paths)
        on_device._device_pipeline = False
        want = _predict(on_device, paths)
    finally:
        for name, value in before.items():
            setattr(on_device, name, value)
    _assert_same(got, want, tolerance=0)


def test_galleries_of_several_map_sizes_are_not_stacked(fitted_model: Spade) -> None:
    store = fitted_model.store_
    pyramid = [torch.zeros(2, 1, 4, 4)] * len(store.levels)
    neighbours = torch.tensor([[0, 1], [2, 3]])
    assert device_maps.supports(store, neighbours, pyramid, fusion="mean", search_radius=None)
    shapes = store.shapes.copy()
    store.shapes[2, 0] = (1, 1)
    try:
        assert not device_maps.supports(store, neighbours, pyramid, fusion="mean", search_radius=None)
    finally:
        store.shapes[:] = shapes


@pytest.mark.cuda
def test_cuda_pipeline_gives_the_cpu_path_s_maps_and_verdicts(fitted_model: Spade, synthetic_root: Path,
                                                              tmp_path: Path) -> None:
    """The model on a GPU (its default path there is the device pipeline): maps within 1e-2 of the CPU path's
    range (cuDNN's TF32 convolutions), identical verdicts."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from spade_ad import load

    paths = list_images(synthetic_root / "test")
    want = _predict(fitted_model, paths)
    on_gpu = load(fitted_model.save(tmp_path / "model.safetensors"), device="cuda")
    assert on_gpu.device_.type == "cuda"
    got = _predict(on_gpu, paths)
    for mine, theirs in zip(got, want):
        span = float(np.ptp(theirs.anomaly_map)) or 1.0
        assert np.abs(mine.anomaly_map - theirs.anomaly_map).max() <= 1e-2 * span
        assert mine.is_anomalous == theirs.is_anomalous


def test_device_pipeline_gives_the_coarse_part_inside_a_region_of_interest(synthetic_root: Path) -> None:
    """The fused score's third part (the coarsest level's own map's top 1%) from the device pipeline: on the device
    without a region of interest, from its grid on the host with one; both as the per-image CPU path gives it."""
    train = list_images(synthetic_root / "train" / "good")[:6]
    roi = np.zeros((160, 224), dtype=bool)
    roi[20:130, 30:170] = True
    paths = list_images(synthetic_root / "test")[:6]
    for region in (None, roi):
        model = Spade(image_size=96, k_gallery=3, device="cpu", progress=False).fit(train, roi=region)
        want = list(model._predict_parts(paths))
        model._device_pipeline = True
        got = list(model._predict_parts(paths))
        assert [p.coarse_part for p in got] == pytest.approx([p.coarse_part for p in want], rel=1e-5)
        assert [p.coarse_part for p in want] != pytest.approx([p.map_part for p in want], rel=1e-3)  # its own part
        np.testing.assert_array_equal(np.stack([p.near for p in got]), np.stack([p.near for p in want]))
