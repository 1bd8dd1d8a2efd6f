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
parameters) where the backend has a backward. This module registers "reference" (the
reference's vectorised pair driver: pairs gathered into length-sorted blocks), "reference_loop"
(one pair at a time, sliced to its length like the public code) and, for SCAN, "cpu" (the
fused C++ all-pairs kernels, forward and backward, one call per distinct image against its
distinct captions).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from rcar_fast import dispatch, reference_math, validate
from rcar_fast.heads import RCARHead
from rcar_fast.ops import scan as _scan_op

__all__ = ["score_pairs", "all_pairs_scores"]

SCAN_DEFAULTS = dict(direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean",
                     lse_lambda=6.0)


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_scan_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    unknown = set(kwargs) - set(SCAN_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected SCAN keyword(s) {sorted(unknown)}; expected some of "
                        f"{sorted(SCAN_DEFAULTS)}")
    kw = {**SCAN_DEFAULTS, **kwargs}
    validate.choice(kw["direction"], "direction", _scan_op.DIRECTIONS)
    validate.choice(kw["raw_norm"], "raw_norm", _scan_op.RAW_NORMS)
    validate.choice(kw["agg"], "agg", _scan_op.AGGREGATIONS)
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
        impl = dispatch.choose("scan_pairs", backend, img.device, img.dtype,
                               _scan_op.shape_rejections(img, scan_kw["direction"]))
        return impl.fn(img, cap, lens, img_idx, cap_idx, **scan_kw)
    impl = dispatch.choose("rcar_pairs", backend, img.device, img.dtype)
    return impl.fn(model, img, cap, lens, img_idx, cap_idx)


def all_pairs_scores(img, cap, lens, *, model="scan", backend: str = "auto",
                     **scan_kwargs) -> torch.Tensor:
    """All (n_img, n_cap) scores of `model` ("scan" or an RCAR head) on `backend`."""
    lens, scan_kw = _checked_call(img, cap, lens, model, backend, scan_kwargs)
    if scan_kw is not None:
        rejections = _scan_op.shape_rejections(img, scan_kw["direction"])
        return dispatch.choose("scan", backend, img.device, img.dtype, rejections).fn(img, cap, lens, **scan_kw)
    # Through dispatch (not model.forward) so that a plain reference RCARHead works as well;
    # an RCARSimilarity in training mode keeps auto off the forward-only kernels.
    mode_rejections = model.mode_rejections() if hasattr(model, "mode_rejections") else None
    impl = dispatch.choose("rcar", backend, img.device, img.dtype, mode_rejections)
    return impl.fn(model, img, cap, lens)


# ---------------------------------------------------------------------------------------------
# Reference implementations of the pair ops: the reference's pair drivers on listed pairs
# ---------------------------------------------------------------------------------------------

def _listed_pairs(driver: Callable, img, cap, lens, img_idx, cap_idx, direction, pair_fn):
    scores = driver(img, cap, lens, direction, pair_fn, img_idx, cap_idx)
    return scores.to(_output_dtype(img.dtype))


def _scan_pairs_reference(driver: Callable) -> Callable:
    """The scan_pairs op on a reference pair driver (pairs_vectorized or pairs_loop)."""
    def scan_pairs(img, cap, lens, img_idx, cap_idx, *, direction, **kw):
        pair_fn = reference_math.scan_pair_fn(**kw)
        return _listed_pairs(driver, img, cap, lens, img_idx, cap_idx, direction, pair_fn)
    return scan_pairs


def _rcar_pairs_reference(driver: Callable) -> Callable:
    """The rcar_pairs op on a reference pair driver, with the head's pair function."""
    def rcar_pairs(head, img, cap, lens, img_idx, cap_idx):
        return _listed_pairs(driver, img, cap, lens, img_idx, cap_idx, head.direction,
                             head.pair_scores)
    return rcar_pairs


# ---------------------------------------------------------------------------------------------
# Fused pair scoring: the all-pairs kernels, one call per distinct image
# ---------------------------------------------------------------------------------------------

def _image_groups(img_idx, cap_idx, n_cap: int):
    """The distinct pairs grouped by image: [(image, its distinct captions)], and `inverse`
    mapping each requested pair to its row in the concatenation of the groups."""
    # Sorted keys group the pairs by image; `inverse` restores the requested order and repeats.
    keys, inverse = torch.unique(img_idx * n_cap + cap_idx, return_inverse=True)
    images, counts = torch.unique_consecutive(keys // n_cap, return_counts=True)
    return list(zip(images.tolist(), (keys % n_cap).split(counts.tolist()))), inverse


class _GroupedByImage(torch.autograd.Function):
    """Pair scores through an all-pairs implementation, one call per distinct image against
    its distinct captions: exactly the distinct requested pairs are computed, forward and
    backward by the backend itself.

    Why a Function: differentiating through per-group slices of img and cap directly would
    give every group a gradient the size of the whole batch (O(B^2 L d) zeros and adds); here
    each group's gradient is added into one buffer at its own rows."""

    @staticmethod
    def forward(ctx, img, cap, lens, img_idx, cap_idx, all_pairs, grad_enabled):
        groups, inverse = _image_groups(img_idx, cap_idx, cap.shape[0])
        # Under no_grad (re-ranking) keep no per-group graphs: nothing will call backward.
        need_img, need_cap = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        pieces, graphs = [], []
        for i, chosen in groups:
            chosen_lens = lens[chosen]
            with torch.enable_grad():   # each group's graph, kept for the backward
                img_part = img[i:i + 1].detach().requires_grad_(need_img)
                cap_part = cap[chosen, :int(chosen_lens.max())].detach().requires_grad_(need_cap)
                scores = all_pairs(img_part, cap_part, chosen_lens).reshape(-1)
            pieces.append(scores.detach())
            graphs.append((scores, img_part, cap_part))
        ctx.groups, ctx.graphs = groups, graphs
        ctx.save_for_backward(inverse)
        ctx.layouts = [(t.shape, t.dtype) for t in (img, cap)]
        return torch.cat(pieces)[inverse]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        n_rows = sum(len(chosen) for _, chosen in ctx.groups)
        grad_rows = grad_out.new_zeros(n_rows).index_add_(0, inverse, grad_out)
        need_img, need_cap = ctx.needs_input_grad[:2]
        (img_shape, img_dtype), (cap_shape, cap_dtype) = ctx.layouts
        grad_img = grad_out.new_zeros(img_shape, dtype=img_dtype) if need_img else None
        grad_cap = grad_out.new_zeros(cap_shape, dtype=cap_dtype) if need_cap else None
        start = 0
        for (i, chosen), (scores, img_part, cap_part) in zip(ctx.groups, ctx.graphs):
            g = grad_rows[start:start + len(chosen)].to(scores.dtype)
            start += len(chosen)
            wanted = [t for t, need in ((img_part, need_img), (cap_part, need_cap)) if need]
            grads = list(torch.autograd.grad(scores, wanted, g))
            if need_img:
                grad_img[i:i + 1] += grads.pop(0)
            if need_cap:  # captions within a group are distinct: no index is written twice
                grad_cap[chosen, :cap_part.shape[1]] += grads.pop(0)
        ctx.graphs = None
        return grad_img, grad_cap, None, None, None, None, None


def _grouped_by_image(all_pairs: Callable, img, cap, lens, img_idx, cap_idx):
    if img_idx.numel() == 0:
        return img.new_zeros((0,), dtype=_output_dtype(img.dtype))
    scores = _GroupedByImage.apply(img, cap, lens, img_idx, cap_idx, all_pairs, torch.is_grad_enabled())
    return scores.to(_output_dtype(img.dtype))


def _scan_pairs_fused(backend: str) -> Callable:
    def scan_pairs(img, cap, lens, img_idx, cap_idx, **kw):
        scan = dispatch.choose("scan", backend, img.device, img.dtype).fn
        return _grouped_by_image(lambda i, c, n: scan(i, c, n, **kw), img, cap, lens, img_idx, cap_idx)
    return scan_pairs


def _scan_supports(backend: str) -> dispatch.SupportsFn:
    return lambda device, dtype: dispatch.rejection("scan", backend, device, dtype)


dispatch.register("scan_pairs", "reference", _scan_pairs_reference(reference_math.pairs_vectorized))
# Only the C++ CPU kernels for now: a call per image costs microseconds there. On a GPU the
# per-image launches (and Triton's autotuning per distinct caption count) need measuring first,
# and the vectorised reference's <= 3B pairs are cheap next to the B x B selection pass.
dispatch.register("scan_pairs", "cpu", _scan_pairs_fused("cpu"), _scan_supports("cpu"))
dispatch.register("scan_pairs", "reference_loop", _scan_pairs_reference(reference_math.pairs_loop))
dispatch.register("rcar_pairs", "reference", _rcar_pairs_reference(reference_math.pairs_vectorized))
dispatch.register("rcar_pairs", "reference_loop", _rcar_pairs_reference(reference_math.pairs_loop))
