"""SCAN all-pairs similarity: the public wrapper (validate, then dispatch).

The backends live beside this module (scan_reference.py, scan_cpu.py, scan_triton.py,
scan_cuda.py), each a class whose `fn` has the signature

    fn(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda) -> (n_img, n_cap)

`lens` arrives validated (int64, on cap's device); the result is float32, or float64 for
float64 inputs, and differentiable w.r.t. img and cap.
"""
import torch

from rcar_fast import dispatch, validate
from rcar_fast.ops.backend import Inputs
from rcar_fast.reference_math import AGGREGATIONS, DIRECTIONS, RAW_NORMS

__all__ = ["scan_similarity", "DIRECTIONS", "RAW_NORMS", "AGGREGATIONS"]


def scan_similarity(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm", smooth=9.0,
                    agg="mean", lse_lambda=6.0, backend="auto") -> torch.Tensor:
    """SCAN similarity of every (image, caption) pair.

    img (n_img, R, d), cap (n_cap, Lmax, d) with word positions >= lens[j] ignored, lens (n_cap,)
    integers in [1, Lmax]. Returns (n_img, n_cap) float32 (float64 for float64 inputs).
    direction "t2i" attends words to regions, "i2t" regions to words; see SIMILARITY.md.
    smooth (the attention's softmax temperature): positive, at most 1e3 for float32 / float16 /
    bfloat16 inputs and 1e6 for float64 ones (validate.SMOOTH_LIMITS: beyond them the result
    depends on rounding); lse_lambda: any finite value >= 1e-30. Numbers may be Python or NumPy
    scalars or 0-d tensors.
    """
    validate.choice(direction, "direction", DIRECTIONS)
    validate.choice(raw_norm, "raw_norm", RAW_NORMS)
    validate.choice(agg, "agg", AGGREGATIONS)
    validate.positive_number(smooth, "smooth")
    lse_lambda = validate.lse_lambda_value(lse_lambda)
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    lens = validate.similarity_inputs(img, cap, lens)
    smooth = validate.smooth_for(smooth, img.dtype)
    impl = dispatch.choose("scan", backend, Inputs.of_scan(img, cap, direction, lens))
    return impl.fn(img, cap, lens, direction=direction, raw_norm=raw_norm, smooth=smooth,
                   agg=agg, lse_lambda=lse_lambda)
