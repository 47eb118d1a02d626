"""Exact search and the pixel stage against brute-force numpy references on small random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ad.core import search_numpy as numpy_search
from spade_ad.core.feature_store import FeatureStoreWriter
from spade_ad.core.scoring import pixel_anomaly_map
from spade_ad.core.search_torch import ranking_bank, topk_squared_distances, window_topk_squared_distances
from spade_ad.settings import SearchSettings

RTOL = 1e-5


def _brute_force_sq(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    return ((queries[:, None, :].astype(np.float64) - bank[None, :, :].astype(np.float64)) ** 2).sum(-1)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("budget", [64, 4096, 2**24])  # tiny budgets force many tiles and a remainder tile
def test_topk_matches_brute_force(k: int, budget: int) -> None:
    rng = np.random.default_rng(k)
    queries = rng.normal(size=(37, 11)).astype(np.float32) * 3 + 5
    bank = rng.normal(size=(203, 11)).astype(np.float32) * 3 + 5
    distances, indices = topk_squared_distances(torch.from_numpy(queries), torch.from_numpy(bank), k, budget)
    reference = _brute_force_sq(queries, bank)
    expected = np.sort(reference, axis=1)[:, :k]
    np.testing.assert_allclose(distances.numpy(), expected, rtol=RTOL)
    chosen = np.take_along_axis(reference, indices.numpy(), axis=1)
    np.testing.assert_allclose(chosen, expected, rtol=RTOL)
    assert np.all(np.diff(distances.numpy(), axis=1) >= 0)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("budget", [64, 4096, 2**24])
@pytest.mark.parametrize("bank_dtype", [np.float32, np.float16])
def test_numpy_search_matches_brute_force_and_the_torch_search(k: int, budget: int, bank_dtype: type) -> None:
    # The CPU search of both scoring paths (the torch path's and the runtime's): the same neighbours and distances
    # as a float64 brute force and as the torch search, with query blocks spread over worker threads.
    rng = np.random.default_rng(10 + k)
    queries = (rng.normal(size=(301, 11)) * 3 + 5).astype(np.float32)
    bank = (rng.normal(size=(203, 11)) * 3 + 5).astype(bank_dtype)
    distances, indices = numpy_search.topk_squared_distances(queries, bank, k, budget)
    reference = _brute_force_sq(queries, bank)
    expected = np.sort(reference, axis=1)[:, :k]
    np.testing.assert_allclose(distances, expected, rtol=RTOL)
    np.testing.assert_allclose(np.take_along_axis(reference, indices, axis=1), expected, rtol=RTOL)
    torch_distances, torch_indices = topk_squared_distances(
        torch.from_numpy(queries), torch.from_numpy(bank.astype(np.float32)), k, budget)
    np.testing.assert_allclose(distances, torch_distances.numpy(), rtol=RTOL)
    assert np.array_equal(indices, torch_indices.numpy())  # random data: no ties
    assert distances.dtype == np.float32 and indices.dtype == np.int64


def test_ranking_bank_ranks_by_squared_distance_and_can_be_reused() -> None:
    rng = np.random.default_rng(3)
    queries, bank = (torch.from_numpy(rng.normal(size=(n, 9)).astype(np.float32)) for n in (13, 57))
    ranking = ranking_bank(bank)
    extended = torch.cat([-2 * queries, torch.ones(13, 1)], 1)
    shifted = (extended @ ranking.T + queries.square().sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(shifted, _brute_force_sq(queries.numpy(), bank.numpy()), rtol=1e-4, atol=1e-4)
    for k in (1, 4):  # a ranking bank made once (as the store caches it) gives the same answer as one made per call
        reused = topk_squared_distances(queries, bank, k, ranking=ranking)
        fresh = topk_squared_distances(queries, bank, k)
        assert all(torch.equal(a, b) for a, b in zip(reused, fresh))


def test_topk_handles_k_larger_than_bank_and_exact_duplicates() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    distances, indices = topk_squared_distances(torch.tensor([[0.0, 0.0]]), bank, k=5)
    assert distances.tolist() == [[0.0, 1.0]] and indices.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="empty"):
        topk_squared_distances(torch.zeros(1, 2), torch.zeros(0, 2), 1)


def test_distances_do_not_suffer_from_cancellation() -> None:
    # Far from the origin, |q|^2 - 2 q.b + |b|^2 loses all precision in float32; the recomputed value does not.
    base = np.full((1, 8), 1000.0, dtype=np.float32)
    bank = base + np.array([[0.01] * 8, [0.5] * 8], dtype=np.float32)
    distances, indices = topk_squared_distances(torch.from_numpy(base), torch.from_numpy(bank), 1)
    assert indices.item() == 0
    np.testing.assert_allclose(distances.item(), _brute_force_sq(base, bank)[0, 0], rtol=1e-3)


def _window_reference(query: np.ndarray, gallery: np.ndarray, k: int, radius: int) -> np.ndarray:
    """Brute force: each position against the gallery vectors within `radius` cells (Chebyshev) of it."""
    channels, height, width = query.shape
    out = np.full((height * width, k), np.nan)
    for i in range(height):
        for j in range(width):
            window = gallery[:, :, max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1]
            candidates = window.transpose(0, 2, 3, 1).reshape(-1, channels)
            squared = np.sort(_brute_force_sq(query[:, i, j][None], candidates)[0])[:k]
            out[i * width + j, :len(squared)] = squared
    return out


@pytest.mark.parametrize(("size", "radius", "k", "n_maps"), [
    ((7, 9), 1, 1, 3), ((8, 8), 2, 3, 2), ((5, 13), 0, 1, 4), ((9, 7), 3, 2, 1), ((1, 6), 1, 1, 2),
])
def test_window_search_matches_brute_force(size: tuple[int, int], radius: int, k: int, n_maps: int) -> None:
    rng = np.random.default_rng(radius + k)
    query = rng.normal(size=(5, *size)).astype(np.float32) + 3
    gallery = rng.normal(size=(n_maps, 5, *size)).astype(np.float32) + 3
    got = window_topk_squared_distances(torch.from_numpy(query), torch.from_numpy(gallery), k, radius).numpy()
    expected = _window_reference(query, gallery, k, radius)[:, :got.shape[1]]
    assert got.shape[0] == size[0] * size[1] and not np.isnan(expected).any()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)


def test_window_covering_the_image_is_the_whole_search() -> None:
    rng = np.random.default_rng(5)
    query = torch.from_numpy(rng.normal(size=(6, 6, 10)).astype(np.float32))
    gallery = torch.from_numpy(rng.normal(size=(3, 6, 6, 10)).astype(np.float32))
    windowed = window_topk_squared_distances(query, gallery, 2, radius=10)
    whole, _ = topk_squared_distances(query.flatten(1).T, gallery.permute(0, 2, 3, 1).reshape(-1, 6), 2)
    torch.testing.assert_close(windowed, whole)


def test_window_search_refuses_maps_of_another_size() -> None:
    with pytest.raises(ValueError, match="one size"):
        window_topk_squared_distances(torch.zeros(4, 6, 6), torch.zeros(2, 4, 6, 8), 1, 1)


def _random_store(rng: np.random.Generator, channels: tuple[int, ...], sizes: list[tuple[int, int]],
                  directory, dtype: str = "float32"):
    builder = FeatureStoreWriter(directory, dtype)
    maps_per_image = []
    for h, w in sizes:
        pyramid = [torch.from_numpy(rng.normal(size=(1, c, h // 2**i, w // 2**i)).astype(np.float32))
                   for i, c in enumerate(channels)]
        builder.add(pyramid, torch.from_numpy(rng.normal(size=(1, 6)).astype(np.float32)))
        maps_per_image.append([m[0].numpy() for m in pyramid])
    return builder.build(), maps_per_image


def test_store_keeps_images_of_different_sizes_apart(tmp_path) -> None:
    rng = np.random.default_rng(0)
    store, maps = _random_store(rng, (3, 5), [(8, 8), (8, 16), (16, 8)], tmp_path)
    assert store.n_images == 3
    for index in range(3):
        for level in range(2):
            np.testing.assert_array_equal(store.image_map(level, index).numpy(), maps[index][level])
    gallery = store.gallery(1, torch.tensor([2, 0]))
    expected = np.concatenate([maps[2][1].reshape(5, -1).T, maps[0][1].reshape(5, -1).T])
    np.testing.assert_array_equal(gallery.numpy(), expected)
    assert isinstance(store.levels[0], np.memmap)  # on disk, not in memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("cache_fraction", [0.25, 0.0])  # kept on the GPU, and too large to be kept there
def test_gallery_on_cuda_matches_the_memory_map(tmp_path, monkeypatch, cache_fraction: float) -> None:
    from spade_ad.core import search_torch as search

    monkeypatch.setattr(search, "DEVICE_CACHE_FRACTION", cache_fraction)
    rng = np.random.default_rng(2)
    store, _ = _random_store(rng, (3, 5), [(8, 8), (8, 16), (16, 8), (4, 4)], tmp_path, "float16")
    for neighbours in (torch.tensor([2, 0]), torch.tensor([3, 1, 2, 0]), torch.tensor([1])):
        for level in range(2):
            on_gpu = store.gallery(level, neighbours, "cuda" if level == 0 else "cuda:0")
            assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
            torch.testing.assert_close(on_gpu.cpu(), store.gallery(level, neighbours), rtol=0, atol=0)
    (cached,) = store._levels_on_device.values()  # one cache for the one GPU, however it was named
    assert (cached is None) == (cache_fraction == 0.0)


def test_float16_store_halves_the_bytes_and_stays_close(tmp_path) -> None:
    rng = np.random.default_rng(1)
    half, maps = _random_store(rng, (4,), [(8, 8)] * 3, tmp_path / "half", "float16")
    assert half.dtype == np.float16
    assert (tmp_path / "half" / "level_0.bin").stat().st_size == 3 * 64 * 4 * 2
    np.testing.assert_allclose(half.image_map(0, 2).numpy(), maps[2][0], rtol=1e-3, atol=1e-3)


def _numpy_upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), written out in numpy."""
    h, w = grid.shape
    out_h, out_w = size

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    y0, y1, fy = coords(out_h, h)
    x0, x1, fx = coords(out_w, w)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def _reference_map(test_maps, train_maps, neighbours, input_size, kappa, fusion, distance) -> np.ndarray:
    def nearest(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        squared = np.sort(_brute_force_sq(queries, gallery), axis=1)[:, :kappa]
        return (np.sqrt(squared) if distance == "euclidean" else squared).mean(1)

    if fusion == "mean":
        levels = []
        for level, fmap in enumerate(test_maps):
            gallery = np.concatenate([train_maps[n][level].reshape(fmap.shape[0], -1).T for n in neighbours])
            scores = nearest(fmap.reshape(fmap.shape[0], -1).T, gallery).reshape(fmap.shape[1:])
            levels.append(_numpy_upsample(scores, input_size))
        return np.mean(levels, axis=0)
    size = test_maps[0].shape[1:]

    def stacked(maps):
        return np.concatenate([np.stack([_numpy_upsample(c, size) for c in m]) for m in maps])

    query = stacked(test_maps)
    gallery = np.concatenate([stacked(train_maps[n]).reshape(query.shape[0], -1).T for n in neighbours])
    return _numpy_upsample(nearest(query.reshape(query.shape[0], -1).T, gallery).reshape(size), input_size)


@pytest.mark.parametrize("fusion", ["mean", "concat"])
@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_pixel_map_matches_numpy_reference(fusion: str, kappa: int, distance: str, tmp_path) -> None:
    rng = np.random.default_rng(7)
    store, train_maps = _random_store(rng, (4, 6, 8), [(16, 24)] * 5 + [(24, 16)], tmp_path)
    test_maps = [rng.normal(size=(c, 16 // 2**i, 24 // 2**i)).astype(np.float32) for i, c in enumerate((4, 6, 8))]
    neighbours = torch.tensor([4, 1, 5])
    got = pixel_anomaly_map(
        [torch.from_numpy(m) for m in test_maps], store, neighbours, (32, 48),
        SearchSettings(kappa=kappa, fusion=fusion, distance=distance, memory_budget=512),
    )
    expected = _reference_map(test_maps, train_maps, neighbours.tolist(), (32, 48), kappa, fusion, distance)
    assert got.shape == (32, 48)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6 * np.abs(expected).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("k", [1, 3])
def test_topk_on_cuda_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    bank = rng.normal(size=(400, 16)).astype(np.float32)
    distances, _ = topk_squared_distances(torch.from_numpy(queries).cuda(), torch.from_numpy(bank).cuda(), k, 4096)
    expected = np.sort(_brute_force_sq(queries, bank), axis=1)[:, :k]
    np.testing.assert_allclose(distances.cpu().numpy(), expected, rtol=RTOL)


def test_coreset_order_is_a_permutation_with_a_covering_prefix() -> None:
    from spade_ad.core.search_torch import coreset_order

    rng = np.random.default_rng(0)
    clusters = rng.normal(size=(5, 8)) * 10
    vectors = torch.from_numpy((clusters[rng.integers(0, 5, 500)] + rng.normal(size=(500, 8)) * 0.1).astype("f4"))
    order = coreset_order(vectors, prefix=0.1)
    assert sorted(order.tolist()) == list(range(500))
    assert torch.equal(order, coreset_order(vectors, prefix=0.1))  # deterministic
    first = vectors[order[:5]]  # farthest-point order: the first five centres fall in five different clusters
    nearest_cluster = torch.cdist(first, torch.from_numpy(clusters.astype("f4"))).argmin(1)
    assert len(set(nearest_cluster.tolist())) == 5


def test_reduced_gallery_keeps_the_map_and_within_budget(fitted_model) -> None:
    """A pair budget below the level's work searches a prefix of each image's coreset order: fewer vectors, a map
    close to the exact one; no budget (None) or a budget above the work is exact."""
    from spade_ad.core.scoring import pixel_anomaly_map

    store = fitted_model.store_
    neighbours = torch.arange(4)
    maps = [store.image_map(level, 5) for level in range(len(store.levels))]
    size = (store.shapes[5, 0, 0] * 8, store.shapes[5, 0, 1] * 8)
    exact = pixel_anomaly_map(maps, store, neighbours, size)
    assert np.array_equal(exact, pixel_anomaly_map(maps, store, neighbours, size, SearchSettings(max_pairs=10**12)))
    gallery = store.gallery(0, neighbours, "cpu", 0.3)
    per_image = int(store.shapes[0, 0, 0] * store.shapes[0, 0, 1])
    assert gallery.shape[0] == 4 * int(np.ceil(0.3 * per_image))
    queries = int(store.shapes[5, 0, 0] * store.shapes[5, 0, 1])
    reduced = pixel_anomaly_map(maps, store, neighbours, size, SearchSettings(max_pairs=queries * per_image))
    assert (reduced >= exact - 1e-4).all()  # fewer gallery vectors can only be farther
    assert np.corrcoef(reduced.ravel(), exact.ravel())[0, 1] > 0.9


def test_map_score_max_and_top_share() -> None:
    from spade_ad.core.maps_numpy import TOP_SHARE, map_score

    values = np.random.default_rng(3).random((40, 50)).astype(np.float32)
    assert map_score(values, "map_max") == pytest.approx(values.max())
    top = np.sort(values.ravel())[-int(values.size * TOP_SHARE):]
    assert map_score(values, "map_top") == pytest.approx(top.mean())
    assert map_score(np.ones((3, 3), np.float32), "map_top") == 1.0  # fewer than 100 pixels: the maximum
