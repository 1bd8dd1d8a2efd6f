"""SCAN all-pairs similarity on the C++ CPU kernels (csrc/cpu/scan.cpp), forward and backward.

The kernels use the Gram identity: per tile of (caption block x image block), one GEMM gives
every word-region score, and the per-pair reductions (normalisation over the queries, softmax
over the context, alpha . s, alpha^T G alpha, cosine, aggregation) run on that tile in
vectorised C++ with OpenMP over tiles. The backward recomputes the tile scores and turns the
per-pair score gradients into two more GEMMs per tile. Memory is O(threads x tile), plus the
context Grams: t2i one (R x R) matrix per image, i2t one (L x L) per caption. The t2i Grams are
bounded here: images go to the kernels in chunks whose Grams fit GRAM_CHUNK_BYTES, and an image
whose own Gram exceeds GRAM_IMAGE_BYTES is refused (backend="auto" then uses the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from rcar_fast import contract, dispatch

_DTYPES = (torch.float32, torch.float64)

# Bytes of the per-image Grams one kernel call may hold (its backward holds as much again for
# their gradients), and the most one image's Gram may take.
GRAM_CHUNK_BYTES = 256 * 2**20
GRAM_IMAGE_BYTES = 64 * 2**20
_VECTOR_BYTES = 32  # the kernels pad Gram rows to whole 256-bit vectors


def supports(device: torch.device, dtype: torch.dtype):
    if device.type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, got {device.type} tensors"
    if dtype not in _DTYPES:
        return (f"the C++ CPU kernels compute in float32 or float64, got {dtype} "
                "(cast the inputs, or use backend='reference')")
    return None


def _image_gram_bytes(img: torch.Tensor) -> int:
    R, per_vector = img.shape[1], _VECTOR_BYTES // img.element_size()
    return R * (-(-R // per_vector) * per_vector) * img.element_size()


def shape_rejection(img: torch.Tensor, direction: str) -> Optional[str]:
    """Why the kernels will not take these images (None if they will): a t2i image's (R x R)
    Gram over GRAM_IMAGE_BYTES."""
    if direction != "t2i" or _image_gram_bytes(img) <= GRAM_IMAGE_BYTES:
        return None
    return (f"SCAN t2i on the C++ CPU kernels keeps an (R x R) Gram matrix per image: R = {img.shape[1]} "
            f"needs {_image_gram_bytes(img) / 2**20:.0f} MiB per image, over the limit of "
            f"{GRAM_IMAGE_BYTES / 2**20:.0f} MiB (R <= {_largest_region_count(img.element_size())} for "
            f"{str(img.dtype).replace('torch.', '')}); use backend='reference' or fewer regions")


def _largest_region_count(element_size: int) -> int:
    per_vector = _VECTOR_BYTES // element_size
    R = int((GRAM_IMAGE_BYTES / element_size) ** 0.5)
    while R * (-(-R // per_vector) * per_vector) * element_size > GRAM_IMAGE_BYTES:
        R -= 1
    return R


def native_settings(direction, raw_norm, smooth, agg, lse_lambda):
    """The kernels' typed problem description (csrc/cpu/kernels.h ScanSettings) from the names."""
    return dispatch.native_module().ScanSettings(
        direction=contract.DIRECTION_CODES[direction], raw_norm=contract.RAW_NORM_CODES[raw_norm],
        agg=contract.AGG_CODES[agg], smooth=float(smooth), lse_lambda=float(lse_lambda))


class _ScanCpu(torch.autograd.Function):
    """sims = SCAN(img, cap, lens); gradients w.r.t. img and cap (zero at caption padding)."""

    @staticmethod
    def forward(ctx, img, cap, lens, options):
        ctx.save_for_backward(img, cap, lens)
        ctx.options = options
        return dispatch.native_module().scan_forward_cpu(img.detach(), cap.detach(), lens, options)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        img, cap, lens = ctx.saved_tensors
        d_img, d_cap = dispatch.native_module().scan_backward_cpu(grad, img, cap, lens, ctx.options)
        return (d_img if ctx.needs_input_grad[0] else None,
                d_cap if ctx.needs_input_grad[1] else None, None, None)


def scan_cpu(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda):
    reason = shape_rejection(img, direction)
    if reason is not None:
        raise dispatch.BackendUnavailable(f"backend 'cpu' cannot run scan on these inputs: {reason}")
    options = native_settings(direction, raw_norm, smooth, agg, lse_lambda)
    per_call = img.shape[0] if direction != "t2i" else max(1, GRAM_CHUNK_BYTES // _image_gram_bytes(img))
    if per_call >= img.shape[0]:
        return _ScanCpu.apply(img, cap, lens, options)
    return torch.cat([_ScanCpu.apply(img[i:i + per_call], cap, lens, options)
                      for i in range(0, img.shape[0], per_call)])


dispatch.register("scan", "cpu", scan_cpu, supports)
