"""SCAN all-pairs similarity on the Triton backend: autograd wiring and dispatch registration.

The kernels (rcar_fast.kernels.scan) compute the forward and, recomputing per tile, the
gradients with respect to img and cap; nothing of size (pairs x words) is ever stored, so a
training step on B images x B captions needs memory for the inputs, their gradients, the
(B, B) similarities and the small per-owner Gram matrices only.

Dtypes: fp32/fp16/bf16 on CUDA (output float32); under triton's CPU interpreter (tests)
fp32/fp16, and float64 (output float64), which makes torch.autograd.gradcheck possible.
"""
from __future__ import annotations

import torch

from rcar_fast.ops.backend import TritonBackend
from rcar_fast.ops.library import SCAN_OPTION_NAMES, define_scan_op


def _kernels():
    # Imported on first use: importing triton (and compiling) only when this backend runs.
    from rcar_fast.kernels import scan as scan_kernels

    return scan_kernels


class ScanSimilarityTriton(torch.autograd.Function):
    """sims = SCAN(img, cap, lens); backward gives d img and d cap (zero at caption padding),
    none for lens and the options. Not twice differentiable."""

    @staticmethod
    def forward(ctx, img, cap, lens, direction, raw_norm, smooth, agg, lse_lambda):
        kernels = _kernels()
        problem = kernels.build_problem(img, cap, lens, direction=direction, raw_norm=raw_norm,
                                        smooth=smooth, agg=agg, lse_lambda=lse_lambda)
        sims = kernels.scan_forward(problem)
        # The problem holds img, cap and the small per-owner tables (Gram matrices, query
        # norms, length buckets) that the backward reuses instead of recomputing.
        ctx.problem = problem
        return sims

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dsims):
        need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dimg, dcap = _kernels().scan_backward(ctx.problem, dsims, need_img, need_cap)
        return dimg, dcap, None, None, None, None, None, None




def _op_forward(img, cap, lens, options):
    return _kernels().scan_forward(_kernels().build_problem(img, cap, lens, **dict(zip(SCAN_OPTION_NAMES, options))))


def _op_backward(grad, img, cap, lens, options):
    kernels = _kernels()
    problem = kernels.build_problem(img, cap, lens, **dict(zip(SCAN_OPTION_NAMES, options)))
    return tuple(kernels.scan_backward(problem, grad, True, True))


# rcar_fast::scan_triton and rcar_fast::scan_triton_backward: what torch.compile sees. Its
# backward op rebuilds the small per-owner tables that the eager Function keeps from its
# forward (so eager calls keep the Function).
scan_triton_op = define_scan_op("scan_triton", _op_forward, _op_backward)


class ScanTriton(TritonBackend):
    op, kernel = "scan", "the Triton SCAN kernels"

    @staticmethod
    def fn(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm", smooth=9.0,
           agg="mean", lse_lambda=6.0):
        """Inputs already validated by rcar_fast.scan_similarity (lens int64 on cap's device).
        Returns (n_img, n_cap) float32 (float64 for float64)."""
        if torch.compiler.is_compiling():
            return scan_triton_op(img, cap, lens, direction, raw_norm, float(smooth), agg,
                                  float(lse_lambda))
        return ScanSimilarityTriton.apply(img, cap, lens, direction, raw_norm, smooth, agg,
                                          lse_lambda)
