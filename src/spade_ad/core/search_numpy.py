"""Exact nearest-neighbour search in numpy (BLAS matrix products in tiles): the runtime's search, with the same
method and the same answers as the torch search in `spade_ad.core.search_torch` (see there for why it is built this
way): neighbours ranked by |b|^2 - 2 q.b in cache-sized tiles, the chosen neighbours' distances recomputed directly.

Parallel work: blocks of queries go to a pool of threads (one per core), each running single-threaded BLAS
(`threadpoolctl`). The tiles are small matrix products; letting BLAS split each of them over its own threads, next
to the network's and the image loaders' threads, oversubscribes the cores (measured on 2 cores, bottle: the
runtime's predict took 1.26x the torch path's time with BLAS threads, 1.0x with one BLAS thread).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

_BLAS = ThreadpoolController()
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """The search's worker threads (one per core), made on first use and kept (numpy releases the GIL in BLAS)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="spade-ad-search")
    return _POOL

#: Bytes of distances per tile (the torch search's CPU default; see `spade_ad.core.search_torch.DEFAULT_MEMORY_BUDGET`).
DEFAULT_MEMORY_BUDGET = 4 * 2**20
MIN_TILE_COLUMNS = 1024


def ranking_bank(bank: np.ndarray) -> np.ndarray:
    """The bank's rows (float16 or float32) as [b, |b|^2] (M, D + 1), float32: widened in the same copy."""
    ranking = np.empty((bank.shape[0], bank.shape[1] + 1), dtype=np.float32)
    ranking[:, :-1] = bank
    widened = ranking[:, :-1]
    ranking[:, -1] = np.einsum("ij,ij->i", widened, widened)
    return ranking


def topk_squared_distances(queries: np.ndarray, bank: np.ndarray, k: int, memory_budget: int | None = None,
                           ranking: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest squared Euclidean distances from each query (Q, D) to the bank (M, D), ascending:
    (distances (Q, k) float32, indices (Q, k) int64). The bank may be float16 (as stored): it is widened once, in
    the ranking bank."""
    if bank.shape[0] == 0:
        raise ValueError("cannot search an empty feature bank")
    k = min(k, bank.shape[0])
    memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
    queries = np.asarray(queries, dtype=np.float32)
    if ranking is None:
        ranking = ranking_bank(bank)
    extended = np.concatenate([-2.0 * queries, np.ones((queries.shape[0], 1), np.float32)], 1)
    workers = os.cpu_count() or 1
    # Blocks of queries within the memory budget, and at least one per worker when there are enough queries.
    block = max(1, min(memory_budget // (4 * MIN_TILE_COLUMNS), -(-queries.shape[0] // workers)))
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    find = _nearest_indices if k == 1 else _topk_indices

    def search_block(first: int) -> None:
        rows = extended[first:first + block]
        tile = max(k, min(bank.shape[0], memory_budget // (4 * rows.shape[0])))
        indices[first:first + block] = find(rows, ranking, k, tile)

    firsts = range(0, queries.shape[0], block)
    with _BLAS.limit(limits=1, user_api="blas"):
        if len(firsts) > 1:
            list(_pool().map(search_block, firsts))
        else:
            search_block(0)
    exact = np.square(queries[:, None, :] - ranking[indices, :-1]).sum(-1, dtype=np.float32)
    order = np.argsort(exact, axis=1, kind="stable")
    return np.take_along_axis(exact, order, 1), np.take_along_axis(indices, order, 1)


def _nearest_indices(extended: np.ndarray, ranking: np.ndarray, k: int, tile: int) -> np.ndarray:
    """Index of the best-ranked bank vector per query (Q, 1), as the torch search does it: a value-only pass (`min`,
    about twice as fast as `argmin`) finds each query's best tile, then `argmin` runs inside that tile only."""
    starts = range(0, ranking.shape[0], tile)
    best_tile = np.stack([(extended @ ranking[s:s + tile].T).min(1) for s in starts], 1).argmin(1)
    indices = np.empty(extended.shape[0], dtype=np.int64)
    for t in np.unique(best_tile):
        rows = np.flatnonzero(best_tile == t)
        start = int(t) * tile
        indices[rows] = (extended[rows] @ ranking[start:start + tile].T).argmin(1) + start
    return indices[:, None]


def _topk_indices(extended: np.ndarray, ranking: np.ndarray, k: int, tile: int) -> np.ndarray:
    """Indices of the k best-ranked bank vectors per query (Q, k), by a running selection over tiles."""
    best_d = best_i = None
    for start in range(0, ranking.shape[0], tile):
        scores = extended @ ranking[start:start + tile].T
        if k == 1:
            i = scores.argmin(1)[:, None]
        else:
            take = min(k, scores.shape[1])
            i = np.argpartition(scores, take - 1, axis=1)[:, :take] if take < scores.shape[1] else \
                np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        d = np.take_along_axis(scores, i, 1)
        i = i + start
        if best_d is not None:
            d, i = np.concatenate([best_d, d], 1), np.concatenate([best_i, i], 1)
            if d.shape[1] > k:
                keep = np.argpartition(d, k - 1, axis=1)[:, :k]
                d, i = np.take_along_axis(d, keep, 1), np.take_along_axis(i, keep, 1)
        best_d, best_i = d, i
    return best_i
