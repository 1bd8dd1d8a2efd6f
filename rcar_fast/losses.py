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

On a batch of B (image, caption) features instead of a matrix (scored by rcar_fast.pairs,
for any head of the registry rcar_fast.scorers: model="scan" and its keywords, another
keyword head or preset, or a head module):

* `full_hardest_negative_loss`: all B x B pairs scored with autograd, then `vse_hinge_loss`.
* `hardest_negative_loss`: the same VSE++ max_violation loss with autograd for at most 3B
  pairs. The loss gives a nonzero gradient to the B positives (the diagonal), the hardest
  negative caption of each image (one per row) and the hardest negative image of each caption
  (one per column) only, so it scores all B x B pairs under ``torch.no_grad()`` (any fast
  backend, forward only), picks those pairs from that matrix and recomputes only them with
  ``rcar_fast.pairs.score_pairs``. Loss and gradients equal the full version (ties aside).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rcar_fast import dispatch, pairs, validate

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
    validate.choice(reduction, "reduction", REDUCTIONS)
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
    validate.positive_number(temperature, "temperature")
    logits = sims / temperature
    targets = torch.arange(sims.shape[0], device=sims.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


# ---------------------------------------------------------------------------------------------
# The hardest-negative loss of a batch of features
# ---------------------------------------------------------------------------------------------


def _check_batch(img, cap, margin, reduction):
    if img.shape[0] != cap.shape[0]:
        raise ValueError("the hardest-negative loss needs a batch of B (image, caption) pairs: "
                         f"img.shape[0] ({img.shape[0]}) must equal cap.shape[0] ({cap.shape[0]})")
    if img.shape[0] < 2:
        raise ValueError(f"the hardest-negative loss needs B >= 2 pairs (negatives), got B = {img.shape[0]}")
    validate.non_negative_number(margin, "margin")
    validate.choice(reduction, "reduction", REDUCTIONS)


def full_hardest_negative_loss(img, cap, lens, *, model="scan", margin: float = 0.2,
                               backend: str = "auto", reduction: str = "sum",
                               **scan_kwargs) -> torch.Tensor:
    """The B x B version: all pairs scored with autograd, then vse_hinge_loss
    (max_violation). Its cost (time and autograd memory) grows with B^2;
    hardest_negative_loss is the same loss at a cost growing with B."""
    _check_batch(img, cap, margin, reduction)
    scores = pairs.all_pairs_scores(img, cap, lens, model=model, backend=backend, **scan_kwargs)
    return vse_hinge_loss(scores, margin, max_violation=True, reduction=reduction)


def _checked_selection_scores(scores, B: int) -> torch.Tensor:
    """score_fn's (B, B) matrix. A NaN would make argmax pick an arbitrary "hardest" negative
    and the loss a silently wrong (finite) number, so non-finite values off the diagonal (the
    diagonal is never read) are refused."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"score_fn must return a torch.Tensor (B, B), got {type(scores).__name__}")
    if tuple(scores.shape) != (B, B):
        raise ValueError(f"score_fn must return a (B, B) = ({B}, {B}) matrix, got {tuple(scores.shape)}")
    if not (scores.dtype.is_floating_point or scores.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"score_fn must return real scores, got dtype {scores.dtype}")
    if torch.compiler.is_compiling():  # the finiteness check reads the data: eager only
        return scores
    off_diagonal = ~torch.eye(B, dtype=torch.bool, device=scores.device)
    if not bool(torch.isfinite(scores[off_diagonal]).all()):
        raise ValueError("score_fn returned NaN or Inf scores off the diagonal; the hardest negatives "
                         "cannot be chosen from them")
    return scores


def _hardest_pairs(scores: torch.Tensor):
    """(img_idx, cap_idx) of positives, row-hardest and column-hardest negatives (3B pairs)."""
    B = scores.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=scores.device)
    negatives = scores.masked_fill(eye, float("-inf"))
    hardest_caption = negatives.argmax(dim=1)     # per image i: its hardest negative caption
    hardest_image = negatives.argmax(dim=0)       # per caption j: its hardest negative image
    diag = torch.arange(B, device=scores.device)
    img_idx = torch.cat([diag, diag, hardest_image])
    cap_idx = torch.cat([diag, hardest_caption, diag])
    return img_idx, cap_idx


def _selection_scores(img, cap, lens, model, backend, scan_kwargs):
    """The no-grad all-pairs pass. A head in training mode is scored in eval mode (dropout
    off): the hardest negatives are picked on the deterministic scores, and forward-only
    kernels that refuse training mode can do the selection."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        return pairs.all_pairs_scores(img, cap, lens, model=model, backend=backend, **scan_kwargs)
    finally:
        if was_training:
            model.train()


def _scores_given(img, cap, lens, img_idx, cap_idx, values, model, pair_backend, scan_kwargs):
    """The pairs' scores as `values` (the no-grad selection pass' entries at these pairs) with
    the pair backend's autograd, or None: the backend chosen for the pairs cannot take given
    values (Backend.given_values), the model is not a head module, or its dropout is active
    (the backend then returns None: its forward draws a sample the eval-mode selection lacks).

    Why it is sound: without dropout a head's score is a function of its inputs, and the
    selection pass scored these very inputs (detached); the pair backends that take values
    have backward ops that recompute their forward from the inputs alone (flash style), so
    their gradients are bit for bit what score_pairs' call would give for the same upstream
    gradient. The values come from the all-pairs kernel instead of the pair kernel: the same
    function, within float rounding (what full_hardest_negative_loss uses too). Saves the pair
    forward."""
    lens, head = pairs.checked_scoring(img, cap, lens, model, pair_backend, scan_kwargs)
    given = getattr(head.choose(head.scorer.pairs_op, pair_backend, img, cap, lens), "given_values", None)
    if given is None or head.module is None:
        return None
    return given(head.module, img, cap, lens, img_idx, cap_idx, values)


def hardest_negative_loss(img, cap, lens, *, model="scan", score_fn=None, margin: float = 0.2,
                          backend: str = "auto", pair_backend: str = "auto",
                          reduction: str = "sum", return_details: bool = False, **scan_kwargs):
    """VSE++ max_violation loss of a batch of B pairs (image i with caption i), computing
    autograd for at most 3B pairs instead of B^2 (= vse_hinge_loss of the
    full (B, B) matrix).

    model: a head of rcar_fast.scorers, as in rcar_fast.score_pairs: "scan" (scan_kwargs as
        in scan_similarity), another keyword head or preset with its keywords, or a head
        module (an RCAR head).
    score_fn: optional fn(img, cap, lens) -> (B, B) used for the no-grad selection pass
        instead of all_pairs_scores(model, backend) (e.g. another backend or a cache).
    backend: backend of the no-grad all-pairs pass; pair_backend: backend of the pair recompute.
    reduction: "sum" (SCAN / VSE++: summed over both directions) or "mean" (divided by B),
    as vse_hinge_loss.
    Returns the loss (a scalar), or
    (loss, details) with details = dict(img_idx, cap_idx of the recomputed pairs, n_pairs,
    hardest_caption (B,), hardest_image (B,)) when return_details.

    Equal to full_hardest_negative_loss in value and gradient, ties aside, whenever the head
    has no active dropout (eval mode, or dropout p = 0). Then, when the pair backend can take
    them (Backend.given_values: the C++ CPU RCAR pair kernel), the recomputed pairs' values are
    the selection pass' own entries and only the pair backward runs: it recomputes from the
    inputs, so the gradients are exactly those of scoring the pairs again (_scores_given).
    With dropout active (an RCAR head in training mode) the selection pass runs in eval mode
    and the recompute draws its own dropout masks, so the loss is a different (equally valid)
    sample than the full version's.
    """
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    validate.choice(pair_backend, "pair_backend", dispatch.REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    _check_batch(img, cap, margin, reduction)
    margin = validate.non_negative_number(margin, "margin")
    if score_fn is not None and not callable(score_fn):
        raise TypeError(f"score_fn must be a callable fn(img, cap, lens) -> (B, B), got {type(score_fn).__name__}")
    B = img.shape[0]
    with torch.no_grad():
        if score_fn is None:
            scores = _selection_scores(img.detach(), cap.detach(), lens, model, backend, scan_kwargs)
        else:
            scores = _checked_selection_scores(score_fn(img.detach(), cap.detach(), lens), B)
        img_idx, cap_idx = _hardest_pairs(scores)
        # Row- and column-hardest negatives can coincide: score each distinct pair once (eager;
        # a compiled graph keeps its shapes static and scores the 3B pairs, repeats included:
        # the same loss and gradients).
        keys = img_idx * B + cap_idx
        if torch.compiler.is_compiling():
            inverse = torch.arange(keys.numel(), device=keys.device)
        else:
            keys, inverse = torch.unique(keys, return_inverse=True)
    pair_img, pair_cap = keys // B, keys % B
    pair_scores = None
    if score_fn is None:
        pair_scores = _scores_given(img, cap, lens, pair_img, pair_cap, scores[pair_img, pair_cap], model,
                                    pair_backend, scan_kwargs)
    if pair_scores is None:
        pair_scores = pairs.score_pairs(img, cap, lens, pair_img, pair_cap, model=model,
                                        backend=pair_backend, **scan_kwargs)
    pair_scores = pair_scores[inverse]
    positives, hard_caption, hard_image = pair_scores.split(B)
    loss = ((margin + hard_caption - positives).clamp(min=0).sum()
            + (margin + hard_image - positives).clamp(min=0).sum())
    loss = _reduce(loss, B, reduction)
    if not return_details:
        return loss
    return loss, dict(img_idx=keys // B, cap_idx=keys % B, n_pairs=int(keys.numel()),
                      hardest_caption=cap_idx[B:2 * B], hardest_image=img_idx[2 * B:])
