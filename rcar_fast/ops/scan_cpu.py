"""SCAN all-pairs similarity on the C++ CPU kernels (csrc/cpu/scan.cpp), forward and backward.

The kernels use the Gram identity: per tile of (caption block x image block), one GEMM gives
every word-region score, and the per-pair reductions (normalisation over the queries, softmax
over the context, alpha . s, alpha^T G alpha, cosine, aggregation) run on that tile in
vectorised C++ with OpenMP over tiles. The backward recomputes the tile scores and turns the
per-pair score gradients into two more GEMMs per tile. Memory is O(threads x tile).
"""
import torch
from torch.autograd.function import once_differentiable

from rcar_fast import dispatch

_DTYPES = (torch.float32, torch.float64)


def supports(device: torch.device, dtype: torch.dtype):
    if device.type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, got {device.type} tensors"
    if dtype not in _DTYPES:
        return (f"the C++ CPU kernels compute in float32 or float64, got {dtype} "
                "(cast the inputs, or use backend='reference')")
    return None


class _ScanCpu(torch.autograd.Function):
    """sims = SCAN(img, cap, lens); gradients w.r.t. img and cap (zero at caption padding)."""

    @staticmethod
    def forward(ctx, img, cap, lens, options):
        ctx.save_for_backward(img, cap, lens)
        ctx.options = options
        return dispatch.native_module().scan_forward_cpu(img.detach(), cap.detach(), lens, *options)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        img, cap, lens = ctx.saved_tensors
        d_img, d_cap = dispatch.native_module().scan_backward_cpu(grad, img, cap, lens, *ctx.options)
        return (d_img if ctx.needs_input_grad[0] else None,
                d_cap if ctx.needs_input_grad[1] else None, None, None)


def scan_cpu(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda):
    options = (direction, raw_norm, float(smooth), agg, float(lse_lambda))
    return _ScanCpu.apply(img, cap, lens, options)


dispatch.register("scan", "cpu", scan_cpu, supports)
