"""Exact nearest-neighbour search over feature banks (the stored features themselves live in
`spade_ad.core.feature_store`).

Search is exact: squared Euclidean distances by matrix product in tiles sized to a memory budget, a running top-k
per tile, and the chosen neighbours' distances recomputed directly (no cancellation error from the expansion
|q|^2 - 2 q.b + |b|^2). Neighbours are ranked by |b|^2 - 2 q.b, one plain matrix product of the extended queries
[-2 q, 1] by the bank's rows [b, |b|^2] (`ranking_bank`): no separate pass to add the norms. No `pairwise_distance`
on 4-D tensors anywhere. The optional windowed search (`window_topk_squared_distances`) changes answers on purpose:
each position only sees nearby gallery positions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Default working memory for one tile of distances (bytes): small enough to stay in cache, which matters more
#: than tile count here (measured on a 2-core CPU: 16 MiB tiles run about 3x faster than 256 MiB ones, 4 MiB tiles
#: about 15% faster than 16 MiB ones).
DEFAULT_MEMORY_BUDGET = 4 * 2**20

#: The same on a GPU, where the opposite holds: each tile costs kernel launches, so few large tiles are fastest
#: (measured on an H200: 4 MiB tiles made the paper-settings search 17x slower than one cdist over the gallery).
DEFAULT_CUDA_MEMORY_BUDGET = 2**30

#: Fewest bank vectors per tile (queries are split into blocks to keep this within the budget): thinner tiles make
#: many small, inefficient matrix products (measured: 334-column tiles run 3x slower than 1,337-column ones).
MIN_TILE_COLUMNS = 1024


def topk_squared_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    memory_budget: int | None = None,
    ranking: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest squared Euclidean distances from each query (Q, D) to the bank (M, D), ascending.

    `ranking`, the bank's `ranking_bank`, may be passed when the same bank is searched many times.

    Returns (distances (Q, k), indices (Q, k)). The bank is visited in tiles of at most `memory_budget` bytes of
    distances (None: `default_memory_budget` of the queries' device); ranking uses |b|^2 - 2 q.b (one matrix product
    per tile), and the distances returned are recomputed directly for the chosen neighbours, so they carry no
    cancellation error.
    """
    if bank.shape[0] == 0:
        raise ValueError("cannot search an empty feature bank")
    k = min(k, bank.shape[0])
    if memory_budget is None:
        memory_budget = default_memory_budget(queries.device)
    queries = queries.float()
    bank = bank.to(device=queries.device)
    if ranking is None:
        ranking = ranking_bank(bank)
    extended = torch.cat([-2.0 * queries, queries.new_ones(queries.shape[0], 1)], 1)  # [-2 q, 1].[b, |b|^2]
    # On CPU, `amin` plus a second pass beats `min` with indices; on a GPU, a plain running top-k avoids the second
    # pass's host synchronisation.
    find = _nearest_indices if k == 1 and queries.device.type == "cpu" else _topk_indices
    # Tiles of at least MIN_TILE_COLUMNS bank vectors keep each matrix product efficient; many queries are taken in
    # blocks so that a block's tile of distances still fits the memory budget.
    block = max(1, memory_budget // (4 * MIN_TILE_COLUMNS))
    indices = []
    for first in range(0, queries.shape[0], block):
        rows = extended[first:first + block]
        tile = max(k, min(bank.shape[0], memory_budget // (4 * rows.shape[0])))
        indices.append(find(rows, ranking, k, tile))
    indices = torch.cat(indices, 0)
    exact = (queries[:, None, :] - bank[indices].float()).square().sum(-1)
    exact, order = exact.sort(dim=1)
    return exact, indices.gather(1, order)


def ranking_bank(bank: torch.Tensor) -> torch.Tensor:
    """The bank's rows as [b, |b|^2] (M, D + 1), float32: with queries extended to [-2 q, 1], one matrix product ranks
    neighbours by |b|^2 - 2 q.b (the squared distance minus |q|^2). Folding the norms into the product saves the pass
    that adds them to every tile of distances (measured: about 1.3x faster search at strides 4 and 8)."""
    bank = bank.float()
    ranking = bank.new_empty(bank.shape[0], bank.shape[1] + 1)
    ranking[:, :-1] = bank
    torch.linalg.vector_norm(bank, dim=1, out=ranking[:, -1])
    ranking[:, -1].square_()
    return ranking


def default_memory_budget(device: torch.device) -> int:
    """Bytes of distances per tile when none is given: cache-sized on CPU, large on a GPU."""
    return DEFAULT_CUDA_MEMORY_BUDGET if device.type == "cuda" else DEFAULT_MEMORY_BUDGET


def window_topk_squared_distances(
    query_map: torch.Tensor, gallery_maps: torch.Tensor, k: int, radius: int, block: int = 4
) -> torch.Tensor:
    """The k smallest squared distances from each position of `query_map` (C, h, w) to the gallery vectors of
    `gallery_maps` (K, C, h, w) within `radius` cells of the same position (Chebyshev), ascending: (h * w, k).

    A spatially restricted search (the setting `search_radius`): less work than the whole gallery on fine levels
    with small radii (measured at stride 8, 28 x 28, K = 50: radius 1 about 3x faster, radius 3 about the same), and
    it changes answers wherever the nearest normal feature lies further away (misaligned or rotated objects).
    Positions are taken in `block` x `block` blocks, each against the union of its queries' windows in one batched
    matrix product; vectors outside a query's own window are masked. Distances are recomputed directly for the
    chosen neighbours, as in `topk_squared_distances`.
    """
    channels, height, width = query_map.shape
    n_gallery = gallery_maps.shape[0]
    if gallery_maps.shape[1:] != query_map.shape:
        raise ValueError(
            f"search_radius needs training and test feature maps of one size, got {tuple(gallery_maps.shape[2:])} "
            f"and {(height, width)}: give all images one size, or use search_radius=None"
        )
    radius = min(radius, max(height, width) - 1)  # a larger window holds nothing more
    size = block + 2 * radius  # side of a block's window
    rows, cols = -(-height // block), -(-width // block)
    pad_h, pad_w = rows * block - height, cols * block - width
    queries = F.pad(query_map.float()[None], (0, pad_w, 0, pad_h))
    queries = F.unfold(queries, block, stride=block)[0].T.reshape(rows, cols, channels, block * block)
    # Channel-last and padded once; each block's window is then a strided view, copied once into the product.
    gallery = F.pad(gallery_maps.float().permute(0, 2, 3, 1), (0, 0, radius, radius + pad_w, radius, radius + pad_h))
    allowed = _window_mask(height, width, block, radius, query_map.device)  # (rows, cols, block^2, size^2)
    k = min(k, n_gallery * (min(radius, height - 1) + 1) * (min(radius, width - 1) + 1))  # corner windows are smallest
    strips = []
    for row in range(rows):  # one row of blocks at a time: memory stays bounded by a strip of windows
        windows = gallery[:, row * block:row * block + size].unfold(2, size, block)  # (K, size, cols, C, size)
        strip = windows.permute(2, 0, 1, 4, 3).reshape(cols, n_gallery * size * size, channels)  # (cols, K*size^2, C)
        row_queries = queries[row].transpose(1, 2)  # (cols, block^2, C)
        ranking = torch.baddbmm(strip.square().sum(-1)[:, None, :], row_queries, strip.transpose(1, 2), alpha=-2.0)
        ranking = ranking.view(cols, block * block, n_gallery, size * size)
        ranking = ranking.masked_fill(~allowed[row][:, :, None, :], float("inf")).flatten(2)
        chosen = ranking.topk(k, dim=2, largest=False).indices  # (cols, block^2, k)
        neighbours = torch.gather(strip, 1, chosen.flatten(1)[..., None].expand(-1, -1, channels))
        exact = row_queries[:, :, None, :] - neighbours.view(cols, block * block, k, channels)
        strips.append(exact.square().sum(-1).sort(dim=2).values)  # (cols, block^2, k)
    # Back from blocks to the (h, w) grid, dropping the padding positions.
    grid = torch.stack(strips).view(rows, cols, block, block, k).permute(0, 2, 1, 3, 4)
    return grid.reshape(rows * block, cols * block, k)[:height, :width].reshape(height * width, k)


def _window_mask(height: int, width: int, block: int, radius: int, device: torch.device) -> torch.Tensor:
    """Which cells of each block's window (in padded gallery coordinates) lie within `radius` of each query cell of
    the block and inside the image: (block rows, block columns, block^2, size^2) booleans."""
    size = block + 2 * radius
    rows, cols = -(-height // block), -(-width // block)
    offset = torch.arange(size, device=device)[None, :] - radius - torch.arange(block, device=device)[:, None]
    near = offset.abs() <= radius  # (block, size): window cell near query cell, along one axis
    origin_y = (torch.arange(rows, device=device) * block)[:, None] - radius + torch.arange(size, device=device)
    origin_x = (torch.arange(cols, device=device) * block)[:, None] - radius + torch.arange(size, device=device)
    inside_y = (origin_y >= 0) & (origin_y < height)  # (rows, size)
    inside_x = (origin_x >= 0) & (origin_x < width)  # (cols, size)
    along_y = near[None] & inside_y[:, None, :]  # (rows, block, size)
    along_x = near[None] & inside_x[:, None, :]  # (cols, block, size)
    mask = along_y[:, None, :, None, :, None] & along_x[None, :, None, :, None, :]  # (rows, cols, b, b, size, size)
    return mask.reshape(rows, cols, block * block, size * size)


def _nearest_indices(extended: torch.Tensor, ranking: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """Index of the nearest bank vector per query (Q, 1), from the extended queries [-2 q, 1] and the `ranking_bank`.
    A value-only pass (`amin`, much faster than `min` with indices on CPU) finds each query's best tile; a second
    pass takes the argmin inside that tile only, for the queries grouped by tile."""
    starts = range(0, ranking.shape[0], tile)
    tile_minima = torch.stack([(extended @ ranking[s:s + tile].T).amin(1) for s in starts], 1)
    best_tile = tile_minima.argmin(1)
    by_tile = best_tile.argsort()
    indices = torch.empty(extended.shape[0], dtype=torch.int64, device=extended.device)
    first = 0
    for t, count in enumerate(torch.bincount(best_tile, minlength=len(starts)).tolist()):
        if count:
            rows = by_tile[first:first + count]
            start = t * tile
            indices[rows] = (extended[rows] @ ranking[start:start + tile].T).argmin(1) + start
            first += count
    return indices[:, None]


def _topk_indices(extended: torch.Tensor, ranking: torch.Tensor, k: int, tile: int) -> torch.Tensor:
    """Indices of the k nearest bank vectors per query (Q, k), by a running top-k over tiles."""
    best_d = best_i = None
    for start in range(0, ranking.shape[0], tile):
        d, i = (extended @ ranking[start:start + tile].T).topk(
            min(k, tile, ranking.shape[0] - start), dim=1, largest=False
        )
        i += start
        if best_d is not None:
            d, order = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False)
            i = torch.cat([best_i, i], 1).gather(1, order)
        best_d, best_i = d, i
    return best_i


#: Share of each training image's vectors put in greedy k-centre order at fit time (the rest follow in a seeded
#: random order): a reduced gallery (see `spade_ad.core.scoring`) takes a prefix of this order from every gallery image.
#: 10% covers the reduction that long images need (the 4096 x 256 fabric keeps 4.5% at stride 8) at a fit cost of
#: ~0.1 s per such image.
CORESET_PREFIX = 0.1


def coreset_order(vectors: torch.Tensor, prefix: float = CORESET_PREFIX) -> torch.Tensor:
    """A permutation of the rows of `vectors` (n, d) whose first ceil(prefix * n) rows are a greedy k-centre coreset
    (farthest-point order, PatchCore's coreset, starting from the vector nearest the mean): any prefix of it covers
    the image's features as evenly as that many vectors can. The remaining rows follow in a random order with a fixed
    seed (a prefix reaching into them is an unbiased sample, not the top rows of the image). Deterministic."""
    n = vectors.shape[0]
    count = min(n, max(1, int(np.ceil(prefix * n))))
    x = vectors.float()
    chosen = torch.empty(count, dtype=torch.int64, device=x.device)
    chosen[0] = (x - x.mean(0)).square().sum(1).argmin()
    nearest = (x - x[chosen[0]]).square().sum(1)
    for i in range(1, count):
        chosen[i] = nearest.argmax()
        nearest = torch.minimum(nearest, (x - x[chosen[i]]).square().sum(1))
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[chosen] = False
    remaining = torch.nonzero(rest).flatten()
    shuffle = torch.from_numpy(np.random.default_rng(0).permutation(len(remaining))).to(x.device)
    return torch.cat([chosen, remaining[shuffle]])
