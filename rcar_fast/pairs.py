"""Scoring a list of (image, caption) pairs, and the hardest-negative loss built on it.

Why: the VSE++ hardest-negative (``max_violation``) loss over a B x B batch gives a nonzero
gradient to at most 3B pairs: the B positives (the diagonal), the hardest negative caption of
each image (one per row) and the hardest negative image of each caption (one per column).
So a training step need not keep the autograd graph of all B^2 pairs:

1. score all B x B pairs under ``torch.no_grad()`` (any fast backend, forward only);
2. pick the positives and the hardest negatives from that matrix;
3. recompute only those <= 3B pairs with autograd (``score_pairs``).

Loss and gradients equal the full B x B version (ties aside). The same pair-list op serves
re-ranking a shortlist at evaluation time.

Dispatch: ``score_pairs`` runs the op "scan_pairs" (SCAN) or "rcar_pairs" (an RCAR head)
through rcar_fast.dispatch; the backends (signatures, the reference pair loop, the fused
per-image CPU path) are in rcar_fast/ops/pair_backends.py.
"""
from __future__ import annotations

import torch

from rcar_fast import dispatch, reference, validate
from rcar_fast.losses import REDUCTIONS, vse_hinge_loss
from rcar_fast.ops.backend import Inputs
from rcar_fast.reference import AGGREGATIONS, DIRECTIONS, RAW_NORMS

__all__ = ["score_pairs", "hardest_negative_loss", "full_hardest_negative_loss",
           "all_pairs_scores"]

SCAN_DEFAULTS = dict(direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean",
                     lse_lambda=6.0)

def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _pair_indices(idx, name: str, bound: int, bound_name: str, device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        try:
            idx = torch.as_tensor(idx, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D integer tensor (P,), got {type(idx).__name__}") from err
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape (P,), got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must have shape (P,), got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
        raise ValueError(f"{name} values must lie in [0, {bound_name}={bound}), got min "
                         f"{int(idx.min())}, max {int(idx.max())}")
    return idx.to(device=device, dtype=torch.int64)


def _check_scan_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    unknown = set(kwargs) - set(SCAN_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected SCAN keyword(s) {sorted(unknown)}; expected some of "
                        f"{sorted(SCAN_DEFAULTS)}")
    kw = {**SCAN_DEFAULTS, **kwargs}
    validate.choice(kw["direction"], "direction", DIRECTIONS)
    validate.choice(kw["raw_norm"], "raw_norm", RAW_NORMS)
    validate.choice(kw["agg"], "agg", AGGREGATIONS)
    kw["smooth"] = validate.smooth_for(kw["smooth"], dtype)
    kw["lse_lambda"] = validate.lse_lambda_value(kw["lse_lambda"])
    return kw


def _check_model(model, img: torch.Tensor, scan_kwargs: dict):
    """'scan' (-> validated SCAN kwargs) or an RCAR head (-> None); raises otherwise."""
    if isinstance(model, str):
        if model != "scan":
            raise ValueError(f"model must be 'scan' or an RCAR head module, got {model!r}")
        return _check_scan_kwargs(scan_kwargs, img.dtype)
    if not isinstance(model, reference.RCARHead):
        raise TypeError("model must be 'scan' or an RCAR head (rcar_fast.RCARSimilarity / "
                        f"reference.RCARHead), got {type(model).__name__}")
    if scan_kwargs:
        raise TypeError(f"SCAN keywords {sorted(scan_kwargs)} do not apply to an RCAR head "
                        "(its settings are the module's attributes)")
    if img.shape[2] != model.embed_dim:
        raise ValueError(f"img and cap must have d = the head's embed_dim = {model.embed_dim}, "
                         f"got d = {img.shape[2]}")
    validate.smooth_for(model.smooth, img.dtype, "the head's smooth")
    param = next(model.parameters())
    if param.device != img.device:
        raise ValueError(f"img/cap are on {img.device} but the head's parameters are on "
                         f"{param.device}; move one of them")
    return None


# ---------------------------------------------------------------------------------------------
# Public: pair-list scoring
# ---------------------------------------------------------------------------------------------

def score_pairs(img, cap, lens, img_idx, cap_idx, *, model="scan", backend: str = "auto",
                **scan_kwargs) -> torch.Tensor:
    """Similarity of the pairs (img[img_idx[p]], cap[cap_idx[p]]), p = 0..P-1.

    img (n_img, R, d), cap (n_cap, Lmax, d) with positions >= lens[j] ignored, lens (n_cap,),
    img_idx / cap_idx (P,) integers (repeats allowed). model: "scan" (then scan_kwargs:
    direction, raw_norm, smooth, agg, lse_lambda as in scan_similarity) or an RCAR head module.
    Returns (P,) float32 (float64 for float64 inputs), with autograd to img, cap and the
    head's parameters. Equals scan_similarity(...)[img_idx, cap_idx] (resp. head(...)).
    """
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    scan_kw = _check_model(model, img, scan_kwargs)
    img_idx = _pair_indices(img_idx, "img_idx", img.shape[0], "n_img", img.device)
    cap_idx = _pair_indices(cap_idx, "cap_idx", cap.shape[0], "n_cap", img.device)
    if img_idx.shape != cap_idx.shape:
        raise ValueError(f"img_idx and cap_idx must have the same length P, got {img_idx.numel()} "
                         f"and {cap_idx.numel()}")
    if scan_kw is not None:
        impl = dispatch.choose("scan_pairs", backend,
                               Inputs.of_scan(img, cap, scan_kw["direction"], lens))
        return impl.fn(img, cap, lens, img_idx, cap_idx, **scan_kw)
    impl = dispatch.choose("rcar_pairs", backend, Inputs.of_head(model, img, cap, lens))
    return impl.fn(model, img, cap, lens, img_idx, cap_idx)


def all_pairs_scores(img, cap, lens, *, model="scan", backend: str = "auto",
                     **scan_kwargs) -> torch.Tensor:
    """All (n_img, n_cap) scores of `model` ("scan" or an RCAR head) on `backend`."""
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    scan_kw = _check_model(model, img, scan_kwargs)
    if scan_kw is not None:
        impl = dispatch.choose("scan", backend, Inputs.of_scan(img, cap, scan_kw["direction"], lens))
        return impl.fn(img, cap, lens, **scan_kw)
    # Through dispatch (not model.forward) so that a plain reference RCARHead works as well;
    # a head in training mode keeps auto off the forward-only kernels (Inputs.of_head).
    impl = dispatch.choose("rcar", backend, Inputs.of_head(model, img, cap, lens))
    return impl.fn(model, img, cap, lens)



# ---------------------------------------------------------------------------------------------
# Hardest-negative loss
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
    """The B x B version: all pairs scored with autograd, then rcar_fast.losses.vse_hinge_loss
    (max_violation). Its cost (time and autograd memory) grows with B^2;
    hardest_negative_loss is the same loss at a cost growing with B."""
    _check_batch(img, cap, margin, reduction)
    scores = all_pairs_scores(img, cap, lens, model=model, backend=backend, **scan_kwargs)
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
        return all_pairs_scores(img, cap, lens, model=model, backend=backend, **scan_kwargs)
    finally:
        if was_training:
            model.train()


def hardest_negative_loss(img, cap, lens, *, model="scan", score_fn=None, margin: float = 0.2,
                          backend: str = "auto", pair_backend: str = "auto",
                          reduction: str = "sum", return_details: bool = False, **scan_kwargs):
    """VSE++ max_violation loss of a batch of B pairs (image i with caption i), computing
    autograd for at most 3B pairs instead of B^2 (= rcar_fast.losses.vse_hinge_loss of the
    full (B, B) matrix).

    model: "scan" (scan_kwargs as in scan_similarity) or an RCAR head module.
    score_fn: optional fn(img, cap, lens) -> (B, B) used for the no-grad selection pass
        instead of all_pairs_scores(model, backend) (e.g. another backend or a cache).
    backend: backend of the no-grad all-pairs pass; pair_backend: backend of the pair recompute.
    reduction: "sum" (SCAN / VSE++: summed over both directions) or "mean" (divided by B),
    as rcar_fast.losses.vse_hinge_loss.
    Returns the loss (a scalar), or
    (loss, details) with details = dict(img_idx, cap_idx of the recomputed pairs, n_pairs,
    hardest_caption (B,), hardest_image (B,)) when return_details.

    Equal to full_hardest_negative_loss in value and gradient, ties aside, whenever the head
    has no active dropout (eval mode, or dropout p = 0). With dropout active (an RCAR head in
    training mode) the selection pass runs in eval mode and the recompute draws its own
    dropout masks, so the loss is a different (equally valid) sample than the full version's.
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
        # Row- and column-hardest negatives can coincide: score each distinct pair once.
        keys, inverse = torch.unique(img_idx * B + cap_idx, return_inverse=True)
    pair_scores = score_pairs(img, cap, lens, keys // B, keys % B, model=model,
                              backend=pair_backend, **scan_kwargs)[inverse]
    positives, hard_caption, hard_image = pair_scores.split(B)
    loss = ((margin + hard_caption - positives).clamp(min=0).sum()
            + (margin + hard_image - positives).clamp(min=0).sum())
    if reduction == "mean":
        loss = loss / B
    if not return_details:
        return loss
    return loss, dict(img_idx=keys // B, cap_idx=keys % B, n_pairs=int(keys.numel()),
                      hardest_caption=cap_idx[B:2 * B], hardest_image=img_idx[2 * B:])
