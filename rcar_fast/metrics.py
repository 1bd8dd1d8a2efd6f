"""Image-text retrieval metrics, as the public SCAN / RCAR evaluation code computes them.

``sims[i, j]`` is the similarity of image ``i`` and caption ``j``; caption
``k*i .. k*i + k-1`` belong to image ``i`` (``k = captions_per_image``, 5 for COCO and
Flickr30K).

* i2t (image annotation): for each image, the rank of the best-ranked of its k captions
  among all captions.
* t2i (image search): for each caption, the rank of its image among all images.
* Ranks are 0-based; R@K is the percentage of queries with rank < K; ``medr`` is
  ``floor(median(ranks)) + 1``; ``meanr`` is ``mean(ranks) + 1``; ``rsum`` is the sum of
  the six recalls.

Ties (documented choice; the public code sorts with ``np.argsort(...)[::-1]``, whose tie
order is an artefact of the sort algorithm): **a tie counts against the ground truth**.
The rank of a ground-truth item is the number of *other* candidates whose score is greater
than *or equal to* its score:

* i2t rank of image i = #{captions j not of image i : sims[i, j] >= max of image i's
  caption scores}. Ties among an image's own captions do not matter (only the best one
  counts, as in the public code).
* t2i rank of caption j = #{images i' != image(j) : sims[i', j] >= sims[image(j), j]}.

So a constant similarity matrix gets the worst ranks, not perfect ones, and the result
never depends on the order of the items. Without ties this equals the public code exactly.
NaN and +-Inf similarities are rejected (NaN makes every comparison false; an infinite
score is an overflow, not a similarity, and ties every other infinite one).

Everything is vectorised (row blocks of the matrix at a time, no per-query Python loop),
so memory stays bounded for (5000, 25000) matrices, torch tensors on any device, NumPy
arrays and ``np.memmap`` files alike.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "METRIC_KEYS",
    "retrieval_ranks",
    "metrics_from_ranks",
    "recall_metrics",
    "coco1k_metrics",
    "ensemble",
    "format_metrics_table",
    "public_report",
]

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)
RECALL_KS = (1, 5, 10)
# Elements of the similarity matrix compared at once (bounded temporary memory).
_BLOCK_ELEMENTS = 1 << 24

Matrix = Union[torch.Tensor, np.ndarray]


def _check_matrix(sims, name: str = "sims") -> Tuple[int, int]:
    if not isinstance(sims, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array of shape (n_img, n_cap), "
                        f"got {type(sims).__name__}")
    if sims.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_img, n_cap), got shape {tuple(sims.shape)}")
    if isinstance(sims, torch.Tensor):
        is_real = not sims.dtype.is_complex and sims.dtype != torch.bool
    else:
        is_real = np.issubdtype(sims.dtype, np.floating) or np.issubdtype(sims.dtype, np.integer)
    if not is_real:
        raise TypeError(f"{name} must hold real numbers, got dtype {sims.dtype}")
    return int(sims.shape[0]), int(sims.shape[1])


def _check_protocol_shape(n_img: int, n_cap: int, captions_per_image: int, name="sims"):
    if not isinstance(captions_per_image, (int, np.integer)) or captions_per_image < 1:
        raise ValueError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
    if n_img < 1 or n_cap != captions_per_image * n_img:
        raise ValueError(
            f"{name} has shape ({n_img}, {n_cap}) but the protocol needs (n_img, "
            f"{captions_per_image} * n_img) with n_img >= 1: caption {captions_per_image}*i .. "
            f"{captions_per_image}*i+{captions_per_image - 1} must belong to image i")


def _rows(sims: Matrix, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 as a torch tensor (no copy for in-memory inputs; a read for memmaps)."""
    block = sims[r0:r1]
    if isinstance(block, np.ndarray):
        block = np.ascontiguousarray(block)
        # Read-only arrays (np.load(mmap_mode="r")) are copied: torch wants writable memory.
        block = torch.from_numpy(block if block.flags.writeable else block.copy())
    if block.dtype in (torch.float16, torch.bfloat16):
        block = block.float()  # exact widening; comparisons are unchanged
    return block


def _ground_truth_scores(sims: Matrix, captions_per_image: int) -> torch.Tensor:
    """sims[image(j), j] for every caption j, as a tensor on sims' device."""
    n_cap = sims.shape[1]
    cols = np.arange(n_cap)
    if isinstance(sims, np.ndarray):
        scores = torch.from_numpy(np.array(sims[cols // captions_per_image, cols]))
    else:
        cols_t = torch.as_tensor(cols, device=sims.device)
        scores = sims[cols_t // captions_per_image, cols_t]
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def retrieval_ranks(sims: Matrix, captions_per_image: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """0-based ranks (ties against the ground truth, see the module docstring).

    Returns (i2t_ranks (n_img,), t2i_ranks (n_cap,)) as int64 NumPy arrays."""
    n_img, n_cap = _check_matrix(sims)
    _check_protocol_shape(n_img, n_cap, captions_per_image)
    k = captions_per_image
    caption_gt = _ground_truth_scores(sims, k)
    t2i_at_least = torch.zeros(n_cap, dtype=torch.int64, device=caption_gt.device)
    i2t = torch.empty(n_img, dtype=torch.int64, device=caption_gt.device)
    step = max(1, _BLOCK_ELEMENTS // n_cap)
    for r0 in range(0, n_img, step):
        r1 = min(n_img, r0 + step)
        block = _rows(sims, r0, r1).to(caption_gt.device)
        if block.dtype.is_floating_point and not bool(torch.isfinite(block).all()):
            bad_row, bad_col = (int(i) for i in torch.nonzero(~torch.isfinite(block))[0])
            raise ValueError(f"sims contains NaN or +-Inf (first at [{bad_row + r0}, {bad_col}]: "
                             f"{float(block[bad_row, bad_col])}); ranks are undefined")
        own = block.view(r1 - r0, n_img, k)[torch.arange(r1 - r0), torch.arange(r0, r1)]
        best_own = own.max(dim=1).values
        i2t[r0:r1] = ((block >= best_own[:, None]).sum(1)
                      - (own >= best_own[:, None]).sum(1))
        t2i_at_least += (block >= caption_gt[None, :]).sum(0)
    # Each caption's own image satisfies sims >= itself: take it out of the count.
    return i2t.cpu().numpy(), (t2i_at_least - 1).cpu().numpy()


def _summarise(ranks: np.ndarray, prefix: str) -> Dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.count_nonzero(ranks < k)) / len(ranks)
           for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> Dict[str, float]:
    """The metric dict (keys METRIC_KEYS) from 0-based i2t and t2i ranks."""
    out = {**_summarise(np.asarray(i2t_ranks), "i2t"), **_summarise(np.asarray(t2i_ranks), "t2i")}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def recall_metrics(sims: Matrix, captions_per_image: int = 5) -> Dict[str, float]:
    """Recall@{1,5,10}, median and mean rank in both directions, and rsum.

    Args:
        sims: (n_img, captions_per_image * n_img) similarities; torch tensor (any device,
            any real dtype), NumPy array or np.memmap.
        captions_per_image: captions per image (5 for COCO / Flickr30K).
    Returns:
        dict with keys i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, t2i_r5,
        t2i_r10, t2i_medr, t2i_meanr, rsum (recalls in percent), as Python floats.
    Raises:
        TypeError / ValueError for a non-matrix, a shape that is not (n, k*n), or NaN.
    """
    return metrics_from_ranks(*retrieval_ranks(sims, captions_per_image))


def coco1k_metrics(sims: Matrix, captions_per_image: int = 5, fold_size: int = 1000,
                   return_folds: bool = False):
    """COCO "1K" protocol: metrics on each diagonal fold of ``fold_size`` images (and their
    ``captions_per_image * fold_size`` captions), averaged over the folds (every key,
    medr and meanr included, as the public code averages its result rows).

    The COCO 5K test matrix (5000, 25000) gives the usual 5 folds of (1000, 5000).
    With ``return_folds=True`` returns (mean_metrics, [metrics of each fold])."""
    n_img, n_cap = _check_matrix(sims)
    _check_protocol_shape(n_img, n_cap, captions_per_image)
    if not isinstance(fold_size, (int, np.integer)) or fold_size < 1 or n_img % fold_size:
        raise ValueError(f"the 1K protocol needs n_img to be a multiple of fold_size="
                         f"{fold_size}, got sims of shape ({n_img}, {n_cap})")
    k = captions_per_image
    folds = [recall_metrics(sims[f * fold_size:(f + 1) * fold_size,
                                 f * fold_size * k:(f + 1) * fold_size * k], k)
             for f in range(n_img // fold_size)]
    mean = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
    return (mean, folds) if return_folds else mean


def ensemble(sims_a: Matrix, *more: Matrix, dtype: Optional[torch.dtype] = None) -> Matrix:
    """The "ALL" ensemble: the average of several models' similarity matrices (usually the
    t2i and the i2t model), as the public ``eval_ensemble`` averages its results files.
    Computed in float64 by row blocks (summed in argument order, then divided: what
    ``np.mean(axis=0)`` of the stacked float64 matrices computes), returned in ``dtype``
    (default: the promoted dtype of the inputs, at least float32; float64 keeps exactly what
    the public code ranks), as a tensor if ``sims_a`` is one, else a NumPy array."""
    matrices = (sims_a,) + more
    if len(matrices) < 2:
        raise ValueError("an ensemble needs at least two similarity matrices")
    shapes = [_check_matrix(m, f"matrix {i}") for i, m in enumerate(matrices)]
    if len(set(shapes)) != 1:
        raise ValueError(f"the ensemble's matrices must have the same shape, got {shapes}")
    shape = shapes[0]
    as_tensor = isinstance(sims_a, torch.Tensor)
    if dtype is None:
        dtype = torch.float32
        for m in matrices:
            dtype = torch.promote_types(dtype, _torch_dtype(m))
    device = sims_a.device if as_tensor else torch.device("cpu")
    out = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, _BLOCK_ELEMENTS // max(shape[1], 1))
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        total = _rows(matrices[0], r0, r1).to(device, torch.float64)
        for m in matrices[1:]:
            total = total + _rows(m, r0, r1).to(device, torch.float64)
        out[r0:r1] = (total / len(matrices)).to(dtype)
    return out if as_tensor else out.numpy()


def _torch_dtype(sims: Matrix) -> torch.dtype:
    if isinstance(sims, torch.Tensor):
        return sims.dtype
    return torch.from_numpy(np.zeros(0, dtype=sims.dtype)).dtype


def format_metrics_table(rows: Dict[str, Dict[str, float]]) -> str:
    """A fixed-width table, one line per named result (e.g. {"t2i model": metrics, ...})."""
    headers = ["", "i2t R@1", "R@5", "R@10", "medr", "meanr",
               "t2i R@1", "R@5", "R@10", "medr", "meanr", "rsum"]
    name_width = max([len(h) for h in rows] + [4])
    lines = ["  ".join([" " * name_width] + [f"{h:>7}" for h in headers[1:]])]
    for name, m in rows.items():
        cells = [f"{m[key]:7.1f}" for key in METRIC_KEYS]
        lines.append("  ".join([f"{name:<{name_width}}"] + cells))
    return "\n".join(lines)


def public_report(m: Dict[str, float]) -> str:
    """The lines the public RCAR/SCAN ``evalrank`` / ``eval_ensemble`` print for one result
    (the 5-fold mean included: rsum, the average recalls, then R@1 R@5 R@10 medr meanr)."""
    r = tuple(m[f"i2t_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr"))
    ri = tuple(m[f"t2i_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr"))
    return "\n".join([
        "rsum: %.1f" % m["rsum"],
        "Average i2t Recall: %.1f" % (sum(r[:3]) / 3),
        "Image to text: %.1f %.1f %.1f %.1f %.1f" % r,
        "Average t2i Recall: %.1f" % (sum(ri[:3]) / 3),
        "Text to image: %.1f %.1f %.1f %.1f %.1f" % ri,
    ])
