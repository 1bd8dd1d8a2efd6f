"""SCAN all-pairs similarity: the public wrapper and the reference implementations.

Fused implementations live beside this module, one per backend (scan_triton.py,
scan_cpu.py, scan_cuda.py), and register themselves under the op name "scan" with the same signature:

    fn(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda) -> (n_img, n_cap)

`lens` arrives validated (int64, on cap's device); the result is float32, or float64 for
float64 inputs, and differentiable w.r.t. img and cap where the backend has a backward.
"""
import torch

from rcar_fast import dispatch, reference, validate
from rcar_fast.contract import AGGREGATIONS, DIRECTIONS, RAW_NORMS  # noqa: F401 (re-exported)
from rcar_fast.ops import scan_cpu


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_vectorized(img, cap, lens, **kw):
    return reference.scan_similarity_vectorized(img, cap, lens, **kw).to(_output_dtype(img.dtype))


def _reference_loop(img, cap, lens, **kw):
    return reference.scan_similarity_loop(img, cap, lens, **kw).to(_output_dtype(img.dtype))


dispatch.register("scan", "reference", _reference_vectorized)
dispatch.register("scan", "reference_loop", _reference_loop)


def shape_rejections(img, direction) -> dict:
    """Backends that refuse these shapes, with the reason (backend="auto" passes them over)."""
    reason = scan_cpu.shape_rejection(img, direction)
    return {"cpu": reason} if reason else {}


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
    impl = dispatch.choose("scan", backend, img.device, img.dtype, shape_rejections(img, direction))
    return impl.fn(img, cap, lens, direction=direction, raw_norm=raw_norm, smooth=smooth,
                   agg=agg, lse_lambda=lse_lambda)
