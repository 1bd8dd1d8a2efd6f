"""The pair ops' backends: scoring a list of (image, caption) pairs.

    scan_pairs: fn(img, cap, lens, img_idx, cap_idx, *, direction, raw_norm, smooth, agg,
                   lse_lambda) -> (P,)
    rcar_pairs: fn(head, img, cap, lens, img_idx, cap_idx) -> (P,)

lens, img_idx and cap_idx arrive validated (int64 on img's device, see rcar_fast.pairs); the
result is float32 (float64 for float64 inputs), differentiable w.r.t. img, cap (and the
head's parameters). "reference" and "reference_loop" are the reference's pair drivers
(rcar_fast.reference_math.pairs_vectorized: length-sorted blocks; pairs_loop: one pair at a
time, sliced to its length like the public code) on the listed pairs; "cpu" runs SCAN's fused
C++ all-pairs kernels one call per distinct image against its distinct captions, and RCAR's
pair-list kernel entry (one call for the whole list, forward and fused backward).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from rcar_fast import reference_math
from rcar_fast.ops import rcar_reference
from rcar_fast.ops.rcar_cpu import RcarCpu, call_kernel_op, rcar_pairs_cpu_op
from rcar_fast.ops.backend import Backend, Inputs, output_dtype
from rcar_fast.ops.library import SCAN_OPTION_NAMES, define_rcar_op, define_scan_op, vjp
from rcar_fast.ops.scan_cpu import ScanCpu

_output_dtype = output_dtype


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
    backward by the backend itself. `params`: the tensors all_pairs also reads (an RCAR
    head's weights), whose gradients are the sum over the groups.

    Why a Function: differentiating through per-group slices of img and cap directly would
    give every group a gradient the size of the whole batch (O(B^2 L d) zeros and adds); here
    each group's gradient is added into one buffer at its own rows."""

    @staticmethod
    def forward(ctx, img, cap, lens, img_idx, cap_idx, all_pairs, grad_enabled, *params):
        groups, inverse = _image_groups(img_idx, cap_idx, cap.shape[0])
        # Under no_grad (re-ranking) keep no per-group graphs: nothing will call backward.
        need_img, need_cap = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        ctx.wanted_params = [p for p, need in zip(params, ctx.needs_input_grad[_N_FIXED:])
                             if grad_enabled and need]
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
        grad_params = [None] * len(ctx.wanted_params)
        start = 0
        for (i, chosen), (scores, img_part, cap_part) in zip(ctx.groups, ctx.graphs):
            g = grad_rows[start:start + len(chosen)].to(scores.dtype)
            start += len(chosen)
            wanted = [t for t, need in ((img_part, need_img), (cap_part, need_cap)) if need]
            grads = list(torch.autograd.grad(scores, wanted + ctx.wanted_params, g,
                                             allow_unused=bool(ctx.wanted_params)))
            if need_img:
                grad_img[i:i + 1] += grads.pop(0)
            if need_cap:  # captions within a group are distinct: no index is written twice
                grad_cap[chosen, :cap_part.shape[1]] += grads.pop(0)
            # Groups in a fixed order: the weight gradients' sum is deterministic.
            for k, grad in enumerate(grads):
                if grad is not None:
                    grad_params[k] = grad if grad_params[k] is None else grad_params[k] + grad
        ctx.graphs = None
        # A weight the scores do not depend on (only_rcr's sim_eval_w) keeps a None gradient.
        by_param = iter(grad_params)
        needs = ctx.needs_input_grad[_N_FIXED:]
        ctx.wanted_params = None
        return (grad_img, grad_cap, None, None, None, None, None,
                *(next(by_param) if need else None for need in needs))


# _GroupedByImage.forward's arguments before *params
_N_FIXED = 7


def _grouped_by_image(all_pairs: Callable, img, cap, lens, img_idx, cap_idx, params=()):
    if img_idx.numel() == 0:
        return img.new_zeros((0,), dtype=_output_dtype(img.dtype))
    scores = _GroupedByImage.apply(img, cap, lens, img_idx, cap_idx, all_pairs,
                                   torch.is_grad_enabled(), *params)
    return scores.to(_output_dtype(img.dtype))


# ---------------------------------------------------------------------------------------------
# The pair ops as custom ops (what torch.compile sees): the eager implementation as forward, its
# recomputation under autograd as backward (the pair drivers and the per-image grouping branch on
# the data, so torch.compile cannot trace them)
# ---------------------------------------------------------------------------------------------

def define_scan_pairs_op(name: str, scan_pairs: Callable):
    """rcar_fast::{name}(img, cap, lens, img_idx, cap_idx, *options) -> (P,) on an eager
    scan_pairs function (the signature of the scan_pairs op), and its backward op."""
    def forward(img, cap, lens, img_idx, cap_idx, options):
        return scan_pairs(img, cap, lens, img_idx, cap_idx, **dict(zip(SCAN_OPTION_NAMES, options)))

    def backward(grad, img, cap, lens, img_idx, cap_idx, options):
        return tuple(vjp(lambda i, c: forward(i, c, lens, img_idx, cap_idx, options), [img, cap], grad))

    return define_scan_op(name, forward, backward, pairs=True)


def _compiled_scan_pairs(op: Callable, eager: Callable) -> Callable:
    def scan_pairs(img, cap, lens, img_idx, cap_idx, **kw):
        if torch.compiler.is_compiling():
            return op(img, cap, lens, img_idx, cap_idx, *(kw[name] for name in SCAN_OPTION_NAMES))
        return eager(img, cap, lens, img_idx, cap_idx, **kw)
    return scan_pairs


def _scan_pairs_cpu(img, cap, lens, img_idx, cap_idx, **kw):
    return _grouped_by_image(lambda i, c, n: ScanCpu.fn(i, c, n, **kw), img, cap, lens, img_idx, cap_idx)


def _rcar_pairs_cpu(head, img, cap, lens, img_idx, cap_idx):
    return call_kernel_op(rcar_pairs_cpu_op, head, img, cap, lens, img_idx, cap_idx)


_scan_pairs_vectorized = _scan_pairs_reference(reference_math.pairs_vectorized)
_rcar_pairs_vectorized = _rcar_pairs_reference(reference_math.pairs_vectorized)
# rcar_fast::scan_pairs_reference, rcar_fast::scan_pairs_cpu (and their _backward)
scan_pairs_reference_op = define_scan_pairs_op("scan_pairs_reference", _scan_pairs_vectorized)
scan_pairs_cpu_op = define_scan_pairs_op("scan_pairs_cpu", _scan_pairs_cpu)


def _rcar_pairs_forward(img, cap, lens, img_idx, cap_idx, weights, seed, config):
    return rcar_reference.with_seeded_weights(config, weights, seed, _rcar_pairs_vectorized,
                                              img, cap, lens, img_idx, cap_idx)


def _rcar_pairs_backward(grad, img, cap, lens, img_idx, cap_idx, weights, seed, config):
    return rcar_reference.rcar_vjp(_rcar_pairs_forward, grad, img, cap, lens, img_idx, cap_idx,
                                   weights=weights, seed=seed, config=config)


# rcar_fast::rcar_pairs_reference and its _backward
rcar_pairs_reference_op = define_rcar_op("rcar_pairs_reference", _rcar_pairs_forward,
                                         _rcar_pairs_backward, pairs=True)


def _rcar_pairs_reference_or_op(head, img, cap, lens, img_idx, cap_idx):
    if torch.compiler.is_compiling():
        return rcar_reference.compiled_call(rcar_pairs_reference_op, head, img, cap, lens, img_idx, cap_idx)
    return _rcar_pairs_vectorized(head, img, cap, lens, img_idx, cap_idx)


# ---------------------------------------------------------------------------------------------
# The backend classes
# ---------------------------------------------------------------------------------------------

class ScanPairsReference(Backend):
    op, backend, kernel = "scan_pairs", "reference", "the vectorised reference"
    fn = staticmethod(_compiled_scan_pairs(scan_pairs_reference_op, _scan_pairs_vectorized))


class ScanPairsReferenceLoop(Backend):
    op, backend, kernel = "scan_pairs", "reference_loop", "the reference loop"
    fn = staticmethod(_scan_pairs_reference(reference_math.pairs_loop))


class ScanPairsCpu(Backend):
    """The C++ CPU all-pairs kernels per distinct image: it takes what ScanCpu takes. Only the
    CPU kernels for now: a call per image costs microseconds there. On a GPU the per-image
    launches (and Triton's autotuning per distinct caption count) need measuring first, and
    the vectorised reference's <= 3B pairs are cheap next to the B x B selection pass."""
    op, backend, kernel = "scan_pairs", "cpu", ScanCpu.kernel

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list:
        return ScanCpu.not_supported_reasons(inputs)

    @classmethod
    def capabilities(cls) -> dict:
        return ScanCpu.capabilities()

    fn = staticmethod(_compiled_scan_pairs(scan_pairs_cpu_op, _scan_pairs_cpu))


class RcarPairsReference(Backend):
    op, backend, kernel = "rcar_pairs", "reference", "the vectorised reference"
    fn = staticmethod(_rcar_pairs_reference_or_op)


class RcarPairsReferenceLoop(Backend):
    op, backend, kernel = "rcar_pairs", "reference_loop", "the reference loop"
    fn = staticmethod(_rcar_pairs_reference(reference_math.pairs_loop))


class RcarPairsCpu(Backend):
    """The C++ CPU RCAR kernel's pair-list entry (csrc/cpu/rcar.cpp, rcar_pairs_forward /
    rcar_pairs_backward): the whole list in one call, tiled by context owner, forward and fused
    backward, dropout with the all-pairs kernel's masks; what RcarCpu can do, it can.
    Measured (d 1024, sim_dim 256, 2 threads, the sparse loss' ~87 pairs at B = 32): see
    bench/results (rows loss_rcar_coop_rcar2_t2i, "pairs: cpu")."""
    op, backend, kernel = "rcar_pairs", "cpu", RcarCpu.kernel
    dtypes, dtype_reason = RcarCpu.dtypes, RcarCpu.dtype_reason
    has_backward, implements_dropout = RcarCpu.has_backward, RcarCpu.implements_dropout

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list:
        return RcarCpu.not_supported_reasons(inputs)

    fn = staticmethod(_rcar_pairs_cpu)
