"""The pipeline of `spade-ad export --single-graph` as a torch module (`SingleGraph`) that `torch.onnx.export`
traces into one graph: the network, the global kNN search and the choice of the K nearest training images, the
pixel search in their stored features, the fusion of the levels as fixed upsampling matrices, the Gaussian smoothing
as fixed matrices, the map's score, the image score (as `score_parts.combine_scores`) and the verdict. The export
around it (the contract, the refusals, the probe check) is `spade_ad.export.single_graph`'s.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core import score_parts
from ..core.geometry import plan_geometry
from ..core.maps_numpy import TOP_SHARE, _linear_taps, roi_grid
from ..estimators.spade import Spade
from ..settings import density_k, uses_coarse
from .bundle import _ExportedBackbone


def upsample_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) matrix of `spade_ad.core.maps_numpy.upsample` along one axis (two taps per row)."""
    first, second, w1, w2 = _linear_taps(source, target)
    matrix = np.zeros((target, source), dtype=np.float32)
    rows = np.arange(target)
    np.add.at(matrix, (rows, first), w1)
    np.add.at(matrix, (rows, second), w2)
    return matrix


def smoothing_matrix(size: int, sigma: float, radius: int) -> np.ndarray:
    """(size, size) matrix of `spade_ad.core.maps_numpy.smooth`'s 1-D pass: a Gaussian of `radius` with mirrored borders
    (d c b | a b c d, scipy's "mirror")."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((size, size), dtype=np.float64)
    period = 2 * (size - 1)
    for i in range(size):
        for tap, weight in zip(offsets.astype(int), kernel):
            j = (i + tap) % period if size > 1 else 0
            matrix[i, j if j < size else period - j] += weight
    return matrix.astype(np.float32)


class SingleGraph(nn.Module):
    """The pipeline as a torch module that `torch.onnx.export` traces into one graph (the contract of its inputs and
    outputs: `spade_ad.export.single_graph`)."""

    def __init__(self, model: Spade, input_size: tuple[int, int], level_shapes: list[tuple[int, int]],
                 needs_global_image: bool) -> None:
        super().__init__()
        store = model.store_
        self.backbone = _ExportedBackbone(model)
        self.needs_global_image = needs_global_image
        n_train = store.n_images
        train_parts = np.asarray(model.calibration_.train_parts, dtype=np.float64).reshape(-1, 3)
        self.density_k = density_k(model) if len(train_parts) else 0
        self.k = min(max(model.k_gallery, model.k_image, self.density_k), n_train)
        self.coarse_weight = float(model.coarse_weight) if uses_coarse(model) else 0.0
        if self.density_k:  # the training images' leave-one-out parts and the smallest divisor of each part
            self.register_buffer("train_parts", torch.from_numpy(train_parts))
            self.register_buffer("density_floor", torch.from_numpy(score_parts.density_floor(train_parts)))
        self.k_gallery, self.k_image = min(model.k_gallery, self.k), min(model.k_image, self.k)
        self.kappa, self.euclidean = int(model.kappa), model.distance == "euclidean"
        height, width = input_size
        self.register_buffer("global_bank", store.global_features.detach().float().cpu().clone())
        self.banks, self.norms, self.level_shapes = nn.ParameterList(), nn.ParameterList(), level_shapes
        self.rows_up, self.cols_up = nn.ParameterList(), nn.ParameterList()
        sizes = store.shapes[..., 0] * store.shapes[..., 1]
        for level, (h, w) in enumerate(level_shapes):
            rows, channels = int(sizes[:, level].max()), store.levels[level].shape[1]
            # Every image's rows padded to the largest image's count; a padded row is never nearest (norm +inf).
            bank = np.zeros((n_train, rows, channels), dtype=store.levels[level].dtype)
            norms = np.full((n_train, rows), np.inf, dtype=np.float32)
            for i in range(n_train):
                start, stop = int(store._offsets[i, level]), int(store._offsets[i + 1, level])
                bank[i, :stop - start] = store.levels[level][start:stop]
                widened = bank[i, :stop - start].astype(np.float32)
                norms[i, :stop - start] = np.einsum("ij,ij->i", widened, widened)  # as numpy_search.ranking_bank
            self.banks.append(nn.Parameter(torch.from_numpy(bank), requires_grad=False))
            self.norms.append(nn.Parameter(torch.from_numpy(norms), requires_grad=False))
            self.rows_up.append(nn.Parameter(torch.from_numpy(upsample_matrix(h, height)), requires_grad=False))
            self.cols_up.append(nn.Parameter(torch.from_numpy(upsample_matrix(w, width).T.copy()),
                                             requires_grad=False))
        radius = min(int(4 * model.sigma + 0.5), min(height, width) - 1) if model.sigma > 0 else 0
        self.smooths = radius >= 1
        if self.smooths:
            self.register_buffer("rows_smooth", torch.from_numpy(smoothing_matrix(height, model.sigma, radius)))
            self.register_buffer("cols_smooth",
                                 torch.from_numpy(smoothing_matrix(width, model.sigma, radius).T.copy()))
        inside = roi_inside(model, input_size)
        self.masked = inside is not None
        scored = height * width if inside is None else int(inside.sum())
        if self.masked:
            self.register_buffer("inside", torch.from_numpy(inside))
        self.scored = scored
        self.top = None if model.image_score == "map_max" else max(1, int(scored * TOP_SHARE))
        self.image_score, self.map_weight, self.max_share = model.image_score, float(model.map_weight), \
            float(model.max_share)
        scale = model.score_scale_
        self.scale = {k: (float(v[0]), float(v[1])) for k, v in scale.items()}
        cal = model.calibration_
        self.threshold = cal.image_threshold
        self.median = cal.median

    def forward(self, image: torch.Tensor, global_image: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        *pyramid, global_features = self.backbone(x)
        if global_image is not None:
            global_features = self.backbone(global_image.permute(0, 3, 1, 2).to(torch.float32) / 255.0)[-1]
        batch = x.shape[0]
        # Global kNN: exact squared distances to every training image, the k nearest ascending.
        difference = global_features[:, None, :] - self.global_bank[None]
        distances, neighbours = torch.topk((difference * difference).sum(-1), self.k, dim=1, largest=False)
        knn = distances[:, :self.k_image].mean(1)
        gallery = neighbours[:, :self.k_gallery]
        maps: list[torch.Tensor] = []
        for level, fmap in enumerate(pyramid):
            channels = fmap.shape[1]
            queries = fmap.flatten(2).transpose(1, 2)  # (N, Q, C)
            bank = self.banks[level][gallery].reshape(batch, -1, channels).to(torch.float32)  # (N, M, C)
            norms = self.norms[level][gallery].reshape(batch, -1, 1)  # (N, M, 1)
            # One product ranks every pair: [-2q, 1] . [b, |b|^2] = |b|^2 - 2 q.b, as `numpy_search` ranks them
            # (no pass over the (Q, M) matrix but the product and the arg-min).
            extended = torch.cat([-2.0 * queries, torch.ones_like(queries[:, :, :1])], 2)  # (N, Q, C + 1)
            ranking = torch.matmul(extended, torch.cat([bank, norms], 2).transpose(1, 2))  # (N, Q, M)
            if self.kappa == 1:  # as numpy_search's nearest: a value-only pass finds each query's best gallery
                # image (a min is many times faster than an arg-min over the whole row), the arg-min runs in it
                per_image = ranking.reshape(batch, queries.shape[1], -1, self.banks[level].shape[1])
                best = torch.argmin(per_image.min(3).values, dim=2, keepdim=True)  # (N, Q, 1)
                inside = torch.gather(per_image, 2, best[..., None].expand(-1, -1, -1, per_image.shape[3]))
                chosen = best * per_image.shape[3] + torch.argmin(inside[:, :, 0], dim=2, keepdim=True)
            else:
                chosen = torch.topk(ranking, min(self.kappa, ranking.shape[2]), dim=2, largest=False).indices
            kappa = chosen.shape[2]
            rows = torch.gather(bank, 1, chosen.reshape(batch, -1, 1).expand(-1, -1, channels))
            gap = queries[:, :, None, :] - rows.reshape(batch, -1, kappa, channels)
            squared = (gap * gap).sum(-1)  # (N, Q, kappa), recomputed directly as the numpy search does
            values = torch.sqrt(torch.clamp(squared, min=0.0)) if self.euclidean else squared
            h, w = self.level_shapes[level]
            grid = values.mean(2).reshape(batch, h, w)
            maps.append(torch.matmul(torch.matmul(self.rows_up[level], grid), self.cols_up[level]))
        anomaly_map, flat = self._scored(torch.stack(maps, 0).mean(0))
        if self.scored == 0:  # nothing to score in the region: `maps.map_score` says 0
            map_part = torch.zeros_like(flat[:, 0])
        elif self.top is None:
            map_part = flat.max(1).values
        else:
            map_part = torch.topk(flat, self.top, dim=1).values.mean(1)
        coarse_part = torch.zeros_like(map_part)
        if self.coarse_weight > 0 and self.scored > 0:  # the coarsest level's own map, as `maps.coarse_map`
            _, coarse_flat = self._scored(maps[-1])
            coarse_part = torch.topk(coarse_flat, max(1, int(self.scored * TOP_SHARE)), dim=1).values.mean(1)
        parts = torch.stack([map_part.to(torch.float64), coarse_part.to(torch.float64), knn.to(torch.float64)], 1)
        if self.density_k:  # `score_parts.density_normalised` over the image's density_k nearest training images
            near = neighbours[:, :self.density_k]
            density = self.train_parts[near.reshape(-1)].reshape(batch, -1, 3).mean(1)
            parts = parts / torch.maximum(density, self.density_floor)
        score = self._combine(parts[:, 0], parts[:, 2], parts[:, 1])
        if self.threshold is None:
            verdict = torch.zeros_like(score, dtype=torch.bool)
            normalized = torch.full_like(score, float("nan"))
        else:
            verdict = score > self.threshold
            normalized = self._normalized(score)
        return score, verdict, normalized, anomaly_map, map_part, knn, coarse_part

    def _scored(self, upsampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A map at the input size (N, H, W) smoothed, with NaN outside the region of interest (`maps.apply_roi`),
        and its scored values flattened (N, H * W; -inf outside the region, never among the top values)."""
        anomaly_map = upsampled
        if self.smooths:
            anomaly_map = torch.matmul(torch.matmul(self.rows_smooth, anomaly_map), self.cols_smooth)
        batch = anomaly_map.shape[0]
        if self.masked:  # the region of interest: NaN (not scored) outside, as `maps.apply_roi`
            flat = torch.where(self.inside, anomaly_map, float("-inf")).reshape(batch, -1)
            return torch.where(self.inside, anomaly_map, float("nan")), flat
        return anomaly_map, anomaly_map.reshape(batch, -1)

    def _combine(self, map_part: torch.Tensor, knn: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """`score_parts.combine_scores`, same operations in the same order, in float64."""
        if self.image_score in ("map_max", "map_top"):
            return map_part
        if self.image_score == "knn":
            return knn
        (m1, s1), (m2, s2) = self.scale["map"], self.scale["knn"]
        w, c = self.map_weight, self.coarse_weight
        if c <= 0:
            weighted = w * (map_part - m1) / s1 + (1.0 - w) * (knn - m2) / s2
            scaled, weights = [(map_part - m1) / s1, (knn - m2) / s2], (w, 1.0 - w)
        else:
            (m3, s3) = self.scale["coarse"]
            weighted = w * (map_part - m1) / s1 + c * (coarse - m3) / s3 + (1.0 - w - c) * (knn - m2) / s2
            scaled, weights = [(map_part - m1) / s1, (coarse - m3) / s3, (knn - m2) / s2], (w, c, 1.0 - w - c)
        if self.max_share <= 0:  # `score_parts.with_strongest`: a share of the largest scaled part with a weight
            return weighted
        strongest = torch.stack([(v / max(weights)) * part for part, v in zip(scaled, weights) if v > 0]).amax(0)
        return (1.0 - self.max_share) * weighted + self.max_share * strongest

    def _normalized(self, score: torch.Tensor) -> torch.Tensor:
        """`calibration.normalized_scores` at the model's threshold and median."""
        threshold, median = float(self.threshold), self.median
        if median is None:
            return torch.full_like(score, float("nan"))
        spread = threshold - median
        if spread > 0:
            return (score - median) / spread
        return 1.0 + (score - threshold) / (abs(median) or 1.0)


def roi_inside(model: Spade, input_size: tuple[int, int]) -> np.ndarray | None:
    """The model's region of interest on the graph's map (bool (H, W), True = scored), as `maps.apply_roi` puts it
    on the map of an image of the ROI's own size (a fixtured camera's images); None without a region."""
    roi = getattr(model, "roi_", None)
    if roi is None:
        return None
    height, width = roi.shape
    if model.resize == "paper_crop":
        geometry = plan_geometry((height, width), model.image_size, model.resize)
        box = geometry.crop_box
    else:
        box = (0.0, 0.0, float(width), float(height))
    return np.ascontiguousarray(roi_grid(roi, box, (height, width), input_size))
