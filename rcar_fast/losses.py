"""Training losses on an image-caption similarity matrix.

Convention (both losses): `sims` is (B, B) with sims[i, j] the similarity of image i and
caption j (the layout rcar_fast.scan_similarity returns), and caption i is the positive of
image i, so the positives lie on the diagonal and every off-diagonal entry is a negative.
(SCAN/VSE++ training batches repeat an image for each of its captions in the batch; any
off-diagonal pair is treated as a negative, as the public code does.)

* `vse_hinge_loss`: the VSE++ / SCAN `ContrastiveLoss`: hinge with margin 0.2 in both
  directions, caption retrieval (each image against the negative captions of its row) and
  image retrieval (each caption against the negative images of its column). With
  `max_violation=True` (the default, VSE++'s "hardest negative") only the hardest negative
  of each row and column counts; otherwise all negatives are summed. Reduction "sum" (the
  public code's) or "mean" (divided by B).
* `info_nce_loss`: symmetric InfoNCE: the mean of the cross-entropies of the rows
  (image -> caption) and the columns (caption -> image) of sims / temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")


def _check_square(sims) -> torch.Tensor:
    if not isinstance(sims, torch.Tensor):
        raise TypeError(f"sims must be a torch.Tensor of shape (B, B), got {type(sims).__name__}")
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1] or sims.shape[0] == 0:
        raise ValueError("sims must be a non-empty square (B, B) matrix (image i x caption j, "
                         f"positives on the diagonal), got shape {tuple(sims.shape)}")
    if not sims.dtype.is_floating_point:
        raise TypeError(f"sims must be floating point, got {sims.dtype}")
    return sims


def _reduce(total: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return total if reduction == "sum" else total / batch


def vse_hinge_loss(sims: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                   reduction: str = "sum") -> torch.Tensor:
    """VSE++ hinge triplet loss on a (B, B) similarity matrix, both directions.

    caption retrieval, image i:  [margin + sims[i, j] - sims[i, i]]_+  over captions j != i
    image retrieval, caption j:  [margin + sims[i, j] - sims[j, j]]_+  over images i != j
    max_violation=True keeps the largest term of each row / column (hardest negative), else
    all terms are summed. Returns a scalar: the sum over both directions (or its mean over B).
    With B = 1 there is no negative and the loss is 0.
    """
    sims = _check_square(sims)
    batch = sims.shape[0]
    positives = sims.diagonal()
    is_positive = torch.eye(batch, dtype=torch.bool, device=sims.device)
    zero = torch.zeros((), dtype=sims.dtype, device=sims.device)
    cost_caption = torch.where(is_positive, zero, (margin + sims - positives[:, None]).clamp(min=0))
    cost_image = torch.where(is_positive, zero, (margin + sims - positives[None, :]).clamp(min=0))
    if max_violation:
        cost_caption = cost_caption.max(dim=1).values
        cost_image = cost_image.max(dim=0).values
    return _reduce(cost_caption.sum() + cost_image.sum(), batch, reduction)


def info_nce_loss(sims: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE on a (B, B) similarity matrix: (CE(rows) + CE(columns)) / 2 of
    sims / temperature with the diagonal as targets (mean over the batch).

    SCAN similarities are cosine-like, in [-1, 1], so a small temperature (CLIP's learned
    value is about 0.01-0.07) gives the logits a useful range."""
    sims = _check_square(sims)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    logits = sims / temperature
    targets = torch.arange(sims.shape[0], device=sims.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
