"""Tiled mode (issue 29): the tile plan, the gallery windows, and small defects on a large generated image found where
they are by tiles at the image's own resolution (the comparison with the default 224 resize on 2048 x 2048 images is
benchmarks/bench_tiles.py's: docs/tiles.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad import Spade, load
from spade_ad.core.gallery import image_map, image_offsets
from spade_ad.core.tiles import GRID, check_tiling, plan_tiles, tiled_geometry, window_rows
from spade_ad.data.modelfile import read_model_file, write_safetensors
from spade_ad.data.synthetic import make_large_dataset
from spade_ad.errors import SettingError


@pytest.mark.parametrize("size", [(512, 512), (320, 928), (96, 96)])
def test_cores_partition_the_input_on_the_grid_inside_their_tiles(size: tuple[int, int]) -> None:
    tiles = plan_tiles(size, 128, 32)
    owner = np.zeros(size, dtype=np.int32)
    for tile in tiles:
        top, left, bottom, right = tile.core
        assert all(v % GRID == 0 for v in tile.core) and all(v % GRID == 0 for v in (tile.top, tile.left))
        assert tile.top <= top < bottom <= tile.top + tile.size[0] <= size[0]
        assert tile.left <= left < right <= tile.left + tile.size[1] <= size[1]
        owner[top:bottom, left:right] += 1
    assert (owner == 1).all()


def test_tiled_geometry_rounds_to_the_grid_and_settings_are_checked() -> None:
    assert tiled_geometry((900, 900)).input_size == (896, 896)
    assert tiled_geometry((10, 2000)).input_size == (32, 1984)
    with pytest.raises(SettingError, match="tile_overlap must be smaller"):
        check_tiling(128, 128)
    with pytest.raises(SettingError, match="tile_size must be a multiple of 32"):
        Spade(tile_size=100).set_params(tile_size=100)


def test_window_rows_reads_the_same_region_of_each_image() -> None:
    rng = np.random.default_rng(0)
    shapes = np.array([[[8, 10]], [[8, 10]], [[16, 20]]], dtype=np.int64)
    offsets = image_offsets(shapes)
    rows = rng.standard_normal((int(offsets[-1, 0]), 3)).astype(np.float32)
    got = window_rows(rows, offsets, shapes, 0, [1, 2], (2, 3, 5, 7), (8, 10))
    first = image_map(rows, offsets, shapes, 0, 1)[:, 2:5, 3:7].reshape(3, -1).T
    second = image_map(rows, offsets, shapes, 0, 2)[:, 4:10, 6:14].reshape(3, -1).T  # twice the size: scaled
    assert np.array_equal(got, np.concatenate([first, second]))
    clipped = window_rows(rows, offsets, shapes, 0, [0], (-3, -3, 2, 2), (8, 10))
    assert clipped.shape == (4, 3)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_large_dataset(tmp_path_factory.mktemp("large") / "plate", n_train=5, n_test_good=2, n_test_defect=4,
                              size=(384, 384), defect_size=(2, 4), seed=1)


def _peak_distance(prediction: object, mask_path: Path) -> float:
    """Pixels from the map's peak (at the original size) to the nearest defect pixel."""
    mask = np.asarray(Image.open(mask_path)) > 0
    values = prediction.original_map  # type: ignore[attr-defined]
    peak = np.array(np.unravel_index(int(np.nanargmax(values)), values.shape))
    return float(np.min(np.linalg.norm(np.argwhere(mask) - peak, axis=1)))


def test_tiles_find_small_defects_where_they_are(large: Path, tmp_path: Path) -> None:
    tiled = Spade(tile_size=128, tile_overlap=32, tile_margin=16, k_gallery=4, device="cpu", progress=False,
                  image_score="map_max").fit(large / "train" / "good")
    assert tiled.store_.shapes[0, 0].tolist() == [384 // 8, 384 // 8]  # stored at the image's own resolution
    goods = sorted((large / "test" / "good").glob("*.png"))
    defects = sorted((large / "test").glob("[ps]*/*.png"))
    masks = [large / "ground_truth" / f.parent.name / f"{f.stem}_mask.png" for f in defects]
    found = tiled.predict([*goods, *defects], original_size=True)
    assert all(p.anomaly_map.shape == (384, 384) and p.original_map.shape == (384, 384) for p in found)
    # every defect of 2-4 px is where the tiled map peaks, and every defect outscores every good part
    assert all(_peak_distance(p, m) <= 4 for p, m in zip(found[len(goods):], masks))
    assert min(p.score for p in found[len(goods):]) > max(p.score for p in found[:len(goods)])
    # saved and loaded: the same scores
    tiled.save(tmp_path / "tiled.safetensors")
    again = load(tmp_path / "tiled.safetensors", device="cpu")
    assert again.tile_size == 128 and np.allclose(again.score(defects[:1]), [found[len(goods)].score], rtol=1e-5)


def test_a_tiled_model_has_the_three_part_density_normalised_score(large: Path, tmp_path: Path) -> None:
    """The default fused score in tiled mode: the stitched coarsest level's own map as its third part and every
    part divided by its local density, calibrated leave-one-out, as for whole images. A tiled file written before
    (its calibration without a coarse scale or training parts) still scores as it did: those settings read as off."""
    settings = dict(tile_size=128, tile_overlap=32, tile_margin=16, k_gallery=4, device="cpu", progress=False)
    tiled = Spade(**settings).fit(large / "train" / "good")
    assert "coarse" in tiled.score_scale_ and np.shape(tiled.calibration_.train_parts) == (5, 3)
    assert all(row[1] > 0 for row in tiled.calibration_.train_parts)  # a coarse part for every training image
    goods = sorted((large / "test" / "good").glob("*.png"))
    defects = sorted((large / "test").glob("[ps]*/*.png"))
    found = tiled.predict([*goods, *defects])
    assert all(np.isfinite(p.score) and p.anomaly_map.shape == (384, 384) for p in found)
    assert min(p.score for p in found[len(goods):]) > max(p.score for p in found[:len(goods)])
    again = load(tiled.save(tmp_path / "tiled.safetensors"), device="cpu")
    assert np.allclose(again.score(defects[:2]), [p.score for p in found[len(goods):len(goods) + 2]], rtol=1e-5)

    two_parts = Spade(**settings, coarse_weight=0.0, density_k=0).fit(large / "train" / "good")
    assert "coarse" not in two_parts.score_scale_ and not two_parts.calibration_.train_parts
    written = two_parts.save(tmp_path / "two.safetensors")
    header, arrays = read_model_file(written)  # as the earlier version wrote it: today's defaults in its header
    header["settings"].update(coarse_weight=1 / 3, density_k=3)
    old = tmp_path / "old.safetensors"
    write_safetensors(old, {k: np.asarray(v) for k, v in arrays.items()}, json.dumps(header))
    loaded = load(old, device="cpu")
    assert loaded.coarse_weight == 0 and loaded.density_k == 0
    assert np.allclose(loaded.score(defects[:2]), two_parts.score(defects[:2]), rtol=1e-5)


def test_a_tiled_map_score_is_the_top_share_of_one_tile_not_of_the_whole_image() -> None:
    from spade_ad.core.maps_numpy import map_score
    from spade_ad.core.tiles import tile_top_count

    large = np.zeros((2048, 2048), dtype=np.float32)
    large[100:110, 200:210] = 10.0  # a 10-pixel defect: 100 of 4 million pixels
    assert map_score(large, "map_top") < 0.03  # averaged away over the top 1% of the whole image
    assert map_score(large, "map_top", top_count=tile_top_count(128)) == pytest.approx(10 * 100 / 163)
    assert tile_top_count(256) == 655
