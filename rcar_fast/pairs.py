"""Scoring a list of (image, caption) pairs, and all pairs of a model ("scan" or an RCAR head).

Why a pair list: the VSE++ hardest-negative loss over a B x B batch gives a nonzero gradient
to at most 3B pairs, so a training step scores all pairs without autograd and recomputes only
those with ``score_pairs`` (rcar_fast.losses.hardest_negative_loss). The same pair-list op
serves re-ranking a shortlist at evaluation time.

Dispatch: ``score_pairs`` runs the op "scan_pairs" (SCAN) or "rcar_pairs" (an RCAR head)
through rcar_fast.dispatch. Implementations register with the signatures

    scan_pairs: fn(img, cap, lens, img_idx, cap_idx, *, direction, raw_norm, smooth, agg,
                   lse_lambda) -> (P,)
    rcar_pairs: fn(head, img, cap, lens, img_idx, cap_idx) -> (P,)

where lens, img_idx and cap_idx arrive validated (int64 on img's device), and the result is
float32 (float64 for float64 inputs), differentiable w.r.t. img, cap (and the head's
parameters) where the backend has a backward. The backends are in
rcar_fast/ops/pair_backends.py.
"""
from __future__ import annotations

import torch

from rcar_fast import dispatch, validate
from rcar_fast.heads import RCARHead
from rcar_fast.ops.backend import Inputs
from rcar_fast.reference_math import AGGREGATIONS, DIRECTIONS, RAW_NORMS

__all__ = ["score_pairs", "all_pairs_scores"]

SCAN_DEFAULTS = dict(direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean",
                     lse_lambda=6.0)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

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
    if not isinstance(model, RCARHead):
        raise TypeError("model must be 'scan' or an RCAR head (rcar_fast.RCARSimilarity / "
                        f"reference.RCARHead), got {type(model).__name__}")
    if scan_kwargs:
        raise TypeError(f"SCAN keywords {sorted(scan_kwargs)} do not apply to an RCAR head "
                        "(its settings are the module's attributes)")
    validate.head_fits(model, img)
    return None


def _checked_call(img, cap, lens, model, backend: str, scan_kwargs: dict):
    """(lens as validated, the SCAN kwargs or None for a head) of a scoring call."""
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    return lens, _check_model(model, img, scan_kwargs)


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
    lens, scan_kw = _checked_call(img, cap, lens, model, backend, scan_kwargs)
    img_idx, cap_idx = validate.pair_indices(img_idx, cap_idx, img.shape[0], cap.shape[0],
                                             img.device)
    if scan_kw is not None:
        impl = dispatch.choose("scan_pairs", backend,
                               Inputs.of_scan(img, cap, scan_kw["direction"], lens))
        return impl.fn(img, cap, lens, img_idx, cap_idx, **scan_kw)
    impl = dispatch.choose("rcar_pairs", backend, Inputs.of_head(model, img, cap, lens))
    return impl.fn(model, img, cap, lens, img_idx, cap_idx)


def all_pairs_scores(img, cap, lens, *, model="scan", backend: str = "auto",
                     **scan_kwargs) -> torch.Tensor:
    """All (n_img, n_cap) scores of `model` ("scan" or an RCAR head) on `backend`."""
    lens, scan_kw = _checked_call(img, cap, lens, model, backend, scan_kwargs)
    if scan_kw is not None:
        impl = dispatch.choose("scan", backend, Inputs.of_scan(img, cap, scan_kw["direction"], lens))
        return impl.fn(img, cap, lens, **scan_kw)
    # Through dispatch (not model.forward) so that a plain reference RCARHead works as well;
    # a head in training mode keeps auto off the forward-only kernels (Inputs.of_head).
    impl = dispatch.choose("rcar", backend, Inputs.of_head(model, img, cap, lens))
    return impl.fn(model, img, cap, lens)
