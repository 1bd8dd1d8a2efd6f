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

from rcar_fast import contract
from rcar_fast.ops.backend import CpuKernelBackend, native
from rcar_fast.ops.library import define_scan_op

# Bytes of the per-image Grams one kernel call may hold (its backward holds as much again for
# their gradients), and the most one image's Gram may take.
GRAM_CHUNK_BYTES = 256 * 2**20
GRAM_IMAGE_BYTES = 64 * 2**20
_VECTOR_BYTES = 32  # the kernels pad Gram rows to whole 256-bit vectors


def _gram_bytes(R: int, element_size: int) -> int:
    per_vector = _VECTOR_BYTES // element_size
    return R * (-(-R // per_vector) * per_vector) * element_size


def _image_gram_bytes(img: torch.Tensor) -> int:
    return _gram_bytes(img.shape[1], img.element_size())


def shape_rejection(img_shape: tuple, dtype: torch.dtype, direction: str) -> Optional[str]:
    """Why the kernels will not take these images (None if they will): a t2i image's (R x R)
    Gram over GRAM_IMAGE_BYTES."""
    R, element_size = img_shape[1], dtype.itemsize
    if direction != "t2i" or _gram_bytes(R, element_size) <= GRAM_IMAGE_BYTES:
        return None
    return (f"SCAN t2i on the C++ CPU kernels keeps an (R x R) Gram matrix per image: R = {R} "
            f"needs {_gram_bytes(R, element_size) / 2**20:.0f} MiB per image, over the limit of "
            f"{GRAM_IMAGE_BYTES / 2**20:.0f} MiB (R <= {_largest_region_count(element_size)} for "
            f"{str(dtype).replace('torch.', '')}); use backend='reference' or fewer regions")


def _largest_region_count(element_size: int) -> int:
    per_vector = _VECTOR_BYTES // element_size
    R = int((GRAM_IMAGE_BYTES / element_size) ** 0.5)
    while R * (-(-R // per_vector) * per_vector) * element_size > GRAM_IMAGE_BYTES:
        R -= 1
    return R


def _images_per_call(img: torch.Tensor, direction: str) -> int:
    if direction != "t2i":
        return img.shape[0]
    return max(1, GRAM_CHUNK_BYTES // _image_gram_bytes(img))


def native_settings(direction, raw_norm, smooth, agg, lse_lambda):
    """The kernels' typed problem description (csrc/cpu/kernels.h ScanSettings) from the names."""
    return native().ScanSettings(
        direction=contract.DIRECTION_CODES[direction], raw_norm=contract.RAW_NORM_CODES[raw_norm],
        agg=contract.AGG_CODES[agg], smooth=float(smooth), lse_lambda=float(lse_lambda))


def _forward_chunk(img, cap, lens, options) -> torch.Tensor:
    return native().scan_forward_cpu(img, cap, lens, native_settings(*options))


def _forward(img, cap, lens, options) -> torch.Tensor:
    """sims (n_img, n_cap); t2i images in chunks whose Grams fit GRAM_CHUNK_BYTES."""
    per_call = _images_per_call(img, options[0])
    if per_call >= img.shape[0]:
        return _forward_chunk(img, cap, lens, options)
    return torch.cat([_forward_chunk(img[i:i + per_call], cap, lens, options)
                      for i in range(0, img.shape[0], per_call)])


def _backward(grad, img, cap, lens, options) -> tuple:
    """(d img, d cap), zero at caption padding; the same image chunks as the forward."""
    per_call = _images_per_call(img, options[0])
    if per_call >= img.shape[0]:
        return tuple(native().scan_backward_cpu(grad, img, cap, lens, native_settings(*options)))
    d_img, d_cap = [], None
    for i in range(0, img.shape[0], per_call):
        d_img_i, d_cap_i = native().scan_backward_cpu(grad[i:i + per_call].contiguous(),
                                                      img[i:i + per_call], cap, lens, native_settings(*options))
        d_img.append(d_img_i)
        d_cap = d_cap_i if d_cap is None else d_cap + d_cap_i
    return torch.cat(d_img), d_cap


# rcar_fast::scan_cpu and rcar_fast::scan_cpu_backward
scan_cpu_op = define_scan_op("scan_cpu", _forward, _backward)


class ScanCpu(CpuKernelBackend):
    op = "scan"

    @classmethod
    def extra_reasons(cls, inputs):
        if inputs.img_shape is None:
            return []
        reason = shape_rejection(inputs.img_shape, inputs.dtype, inputs.direction)
        return [reason] if reason else []

    @staticmethod
    def fn(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda):
        return scan_cpu_op(img, cap, lens, direction, raw_norm, float(smooth), agg, float(lse_lambda))
