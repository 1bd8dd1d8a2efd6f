"""Exact top-k retrieval lists without keeping the full matrix: ``all_pairs_topk`` keeps the
best k captions per image and the best k images per caption while the tiles stream by
(ties go to the lower index), and ``recall_from_topk`` reads R@K from them. Distributed:
image rows are gathered, the per-caption lists of every rank merged, on rank 0.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from rcar_fast import metrics as _metrics
from rcar_fast.evaluation import distributed as _dist
from rcar_fast.evaluation.adapters import as_similarity_fn
from rcar_fast.evaluation.inputs import (ArrayLike, check_blocks, check_inputs, check_k,
                                         resolve_device, result_dtype)
from rcar_fast.evaluation.streaming import RunTimer, score_blocks


class TopK(NamedTuple):
    """Best k of each row / column of the similarity matrix, best first (ties: lower index).

    i2t_scores / i2t_indices: (n_img, min(k, n_cap)), caption indices per image.
    t2i_scores / t2i_indices: (n_cap, min(k, n_img)), image indices per caption."""

    i2t_scores: torch.Tensor
    i2t_indices: torch.Tensor
    t2i_scores: torch.Tensor
    t2i_indices: torch.Tensor


def all_pairs_topk(img: ArrayLike, cap: ArrayLike, lens, similarity="scan", k: int = 10, *,
                   backend: str = "auto", img_block: Optional[int] = None,
                   cap_block: Optional[int] = None, device=None,
                   compute_dtype: Optional[torch.dtype] = None, sort_captions: bool = True,
                   progress: bool = True, distributed: Optional[bool] = None,
                   stats: Optional[dict] = None, desc: str = "similarity (top-k)") -> Optional[TopK]:
    """Exact top-k retrieval lists without keeping the full matrix: the best k captions per
    image and the best k images per caption, best first, ties broken towards the lower
    index (the order of a stable descending sort of the full matrix). Same arguments as
    ``all_pairs``; returns a TopK on rank 0 (CPU tensors), None on other ranks."""
    lens = check_inputs(img, cap, lens)
    k = check_k(k)
    fn = as_similarity_fn(similarity, backend)
    device = resolve_device(device)
    img_block, cap_block = check_blocks(img_block, cap_block, device)
    rank, world = _dist.rank_and_world(distributed)
    n_img, n_cap = img.shape[0], cap.shape[0]
    dtype = result_dtype(img)
    shards = [_dist.shard_rows(n_img, r, world, img_block) for r in range(world)]
    rows = shards[rank]
    k_i2t, k_t2i = min(k, n_cap), min(k, n_img)

    i2t = _Running(rows[1] - rows[0], k_i2t, dtype, device)
    t2i = _Running(n_cap, k_t2i, dtype, device)

    def sink(r0, r1, cols, scores):
        cols_t = torch.as_tensor(cols, device=device)
        rows_t = torch.arange(r0, r1, device=device)
        i2t.merge(slice(r0 - rows[0], r1 - rows[0]), scores.to(dtype), cols_t)
        t2i.merge(cols_t, scores.to(dtype).T, rows_t)

    timer = RunTimer(device)
    score_blocks(img, cap, lens, fn, rows, img_block, cap_block, device, compute_dtype,
                 sort_captions, progress and rank == 0, desc, sink)
    i2t_scores, i2t_idx = i2t.scores.cpu(), i2t.indices.cpu()
    t2i_scores, t2i_idx = t2i.scores.cpu(), t2i.indices.cpu()
    if world > 1:
        i2t_scores, i2t_idx = _gather_topk_rows(i2t_scores, i2t_idx, shards)
        t2i_scores, t2i_idx = _merge_topk_ranks(t2i_scores, t2i_idx, k_t2i, world)
    timer.finish(stats, (rows[1] - rows[0]) * n_cap, n_img * n_cap, rank, world)
    if rank != 0:
        return None
    return TopK(i2t_scores, i2t_idx, t2i_scores, t2i_idx)


class _Running:
    """Running best-k (scores, indices) per row; merging keeps (score desc, index asc)."""

    def __init__(self, n, k, dtype, device):
        self.k = k
        self.scores = torch.full((n, k), -torch.inf, dtype=dtype, device=device)
        # Empty slots carry an index larger than any real one, so they lose every tie.
        self.indices = torch.full((n, k), torch.iinfo(torch.int64).max, dtype=torch.int64,
                                  device=device)

    def merge(self, where, scores, candidate_indices):
        """Merges scores (m, c) whose columns are candidate_indices (c,) into rows ``where``."""
        m = scores.shape[0]
        cand_scores = torch.cat([self.scores[where], scores], dim=1)
        cand_indices = torch.cat([self.indices[where], candidate_indices.expand(m, -1)], dim=1)
        best_scores, best_indices = _best_k(cand_scores, cand_indices, self.k)
        self.scores[where] = best_scores
        self.indices[where] = best_indices


def _best_k(scores, indices, k):
    """Best k per row ordered by (score desc, index asc): a lexicographic sort in two stable
    passes (index first, then score)."""
    by_index = torch.sort(indices, dim=1, stable=True).indices
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _gather_topk_rows(scores, indices, shards):
    """Every rank's per-image lists (its shard of rows), stacked on rank 0."""
    n_img = shards[-1][1]
    got_scores = torch.empty((n_img, scores.shape[1]), dtype=scores.dtype)
    got_indices = torch.empty((n_img, scores.shape[1]), dtype=torch.int64)

    def write_scores(a, b, c0, c1, blk):
        got_scores[a:b, c0:c1] = blk

    def write_indices(a, b, c0, c1, blk):
        got_indices[a:b, c0:c1] = blk

    _dist.gather_rows(scores, shards, write_scores)
    _dist.gather_rows(indices, shards, write_indices)
    return (got_scores, got_indices) if _dist.is_rank_zero() else (None, None)


def _merge_topk_ranks(scores, indices, k, world):
    """The per-caption lists of every rank (each over its own images), merged on rank 0."""
    all_scores, all_indices = _dist.gather_all(scores, world), _dist.gather_all(indices, world)
    if all_scores is None:
        return None, None
    return _best_k(torch.cat(all_scores, dim=1), torch.cat(all_indices, dim=1), k)


def recall_from_topk(topk: TopK, captions_per_image: int = 5) -> dict:
    """R@K (K <= k) in both directions from top-k lists, plus rsum when k >= 10. Equals
    recall_metrics except where a tie straddles the ground truth (top-k lists order ties by
    index; recall_metrics counts ties against the ground truth)."""
    n_img, n_cap = topk.i2t_indices.shape[0], topk.t2i_indices.shape[0]
    if n_cap != captions_per_image * n_img:
        raise ValueError(f"top-k lists for {n_img} images and {n_cap} captions do not match "
                         f"{captions_per_image} captions per image")
    own_image_of_caption = topk.i2t_indices // captions_per_image
    i2t_hit = own_image_of_caption == torch.arange(n_img)[:, None]
    t2i_hit = topk.t2i_indices == (torch.arange(n_cap) // captions_per_image)[:, None]
    out = {}
    for name, hit in (("i2t", i2t_hit), ("t2i", t2i_hit)):
        for K in _metrics.RECALL_KS:
            if K <= hit.shape[1]:
                out[f"{name}_r{K}"] = 100.0 * int(hit[:, :K].any(1).sum()) / hit.shape[0]
    if all(f"{d}_r{K}" in out for d in ("i2t", "t2i") for K in _metrics.RECALL_KS):
        out["rsum"] = sum(out[f"{d}_r{K}"] for d in ("i2t", "t2i") for K in _metrics.RECALL_KS)
    return out
