"""Scoring a list of (image, caption) pairs, and all pairs of a model (a head of the
registry rcar_fast.scorers: "scan", an RCAR head module, ...).

Why a pair list: the VSE++ hardest-negative loss over a B x B batch gives a nonzero gradient
to at most 3B pairs, so a training step scores all pairs without autograd and recomputes only
those with ``score_pairs`` (rcar_fast.losses.hardest_negative_loss). The same pair-list op
serves re-ranking a shortlist at evaluation time.

Dispatch: the head's scorer names its ops (SCAN: "scan" and "scan_pairs"; an RCAR head:
"rcar" and "rcar_pairs"), builds the backend Inputs and calls the chosen backend's fn
(rcar_fast.ops.scorer). The pair ops' fn take (..., img_idx, cap_idx) with lens, img_idx
and cap_idx validated (int64 on img's device); the result is float32 (float64 for float64
inputs), differentiable w.r.t. img, cap (and the head's parameters) where the backend has a
backward. The pair backends are in their op's module (rcar_fast/ops/scan.py, rcar.py, maxsim.py).
"""
from __future__ import annotations

import torch

from rcar_fast import dispatch, scorers, validate

__all__ = ["score_pairs", "all_pairs_scores", "checked_scoring"]


def checked_scoring(img, cap, lens, model, backend: str, kwargs: dict):
    """(lens as validated, the call's Scoring) of a scoring call: one clear error for a bad
    backend, features, lengths, model or keyword, before any kernel runs."""
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    return lens, scorers.scoring(model, kwargs, img)


# ---------------------------------------------------------------------------------------------
# Public: pair-list scoring
# ---------------------------------------------------------------------------------------------

def score_pairs(img, cap, lens, img_idx, cap_idx, *, model="scan", backend: str = "auto",
                **head_kwargs) -> torch.Tensor:
    """Similarity of the pairs (img[img_idx[p]], cap[cap_idx[p]]), p = 0..P-1.

    img (n_img, R, d), cap (n_cap, Lmax, d) with positions >= lens[j] ignored, lens (n_cap,),
    img_idx / cap_idx (P,) integers (repeats allowed). model: a head of rcar_fast.scorers:
    "scan" (then head_kwargs: direction, raw_norm, smooth, agg, lse_lambda as in
    scan_similarity), another keyword head or preset with its keywords, or a head module (an
    RCAR head). Returns (P,) float32 (float64 for float64 inputs), with autograd to img, cap
    and the head's parameters. Equals scan_similarity(...)[img_idx, cap_idx] (resp. head(...)).
    """
    lens, head = checked_scoring(img, cap, lens, model, backend, head_kwargs)
    img_idx, cap_idx = validate.pair_indices(img_idx, cap_idx, img.shape[0], cap.shape[0],
                                             img.device)
    return head.pairs(img, cap, lens, img_idx, cap_idx, backend)


def all_pairs_scores(img, cap, lens, *, model="scan", backend: str = "auto",
                     **head_kwargs) -> torch.Tensor:
    """All (n_img, n_cap) scores of `model` (as in score_pairs) on `backend`."""
    lens, head = checked_scoring(img, cap, lens, model, backend, head_kwargs)
    # Through dispatch (not model.forward) so that a plain reference RCARHead works as well;
    # a head in training mode keeps auto off the forward-only kernels (Inputs.of_head).
    return head.all_pairs(img, cap, lens, backend)
