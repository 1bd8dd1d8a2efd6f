"""SCAN all-pairs similarity: the public wrapper (validate, then dispatch).

The backends live beside this module (scan_reference.py, scan_cpu.py, scan_triton.py,
scan_cuda.py), each a class whose `fn` has the signature

    fn(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda) -> (n_img, n_cap)

`lens` arrives validated (int64, on cap's device); the result is float32, or float64 for
float64 inputs, and differentiable w.r.t. img and cap.

ScanScorer (below) is SCAN's entry in the head registry (rcar_fast.scorers): model="scan"
with these keywords in score_pairs, the losses, all_pairs, the CLI and the trainer.
"""
import torch

from rcar_fast import contract, dispatch, flops, reference_math, validate
from rcar_fast.ops.backend import Inputs
from rcar_fast.ops.scorer import Scorer
from rcar_fast.reference_math import AGGREGATIONS, DIRECTIONS, RAW_NORMS

__all__ = ["scan_similarity", "ScanScorer", "DIRECTIONS", "RAW_NORMS", "AGGREGATIONS"]


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


class ScanScorer(Scorer):
    """SCAN as a head of the registry: a keyword head (no weights), the ops "scan" and
    "scan_pairs", the keywords of scan_similarity."""
    name, title = "scan", "SCAN"
    all_pairs_op, pairs_op = "scan", "scan_pairs"
    defaults = dict(direction="t2i", raw_norm="clipped_l2norm", smooth=9.0, agg="mean",
                    lse_lambda=6.0)

    @classmethod
    def validate(cls, kwargs: dict, dtype: torch.dtype) -> dict:
        validate.choice(kwargs["direction"], "direction", DIRECTIONS)
        validate.choice(kwargs["raw_norm"], "raw_norm", RAW_NORMS)
        validate.choice(kwargs["agg"], "agg", AGGREGATIONS)
        kwargs["smooth"] = validate.smooth_for(kwargs["smooth"], dtype)
        kwargs["lse_lambda"] = validate.lse_lambda_value(kwargs["lse_lambda"])
        return kwargs

    @classmethod
    def inputs(cls, model, settings, img, cap, lens) -> Inputs:
        return Inputs.of_scan(img, cap, settings["direction"], lens)

    @classmethod
    def call_all_pairs(cls, impl, model, settings, img, cap, lens):
        return impl.fn(img, cap, lens, **settings)

    @classmethod
    def call_pairs(cls, impl, model, settings, img, cap, lens, img_idx, cap_idx):
        return impl.fn(img, cap, lens, img_idx, cap_idx, **settings)

    @classmethod
    def forward_flops(cls, model, settings, n_img, lens, regions, d) -> float:
        return flops.scan_forward(n_img, lens, regions, d, settings["direction"])

    @classmethod
    def pair_flops(cls, model, settings, pair_lens, regions, d) -> float:
        return flops.scan_pairs_forward(pair_lens, regions, d, settings["direction"])

    @classmethod
    def build(cls, name, embed_dim, options):
        """SCAN at the published smooth of its direction (t2i 9, i2t 4) unless given; the
        options named like SCAN's keywords are its settings."""
        settings = {k: v for k, v in options.items() if k in cls.defaults and v is not None}
        settings.setdefault("direction", cls.defaults["direction"])
        settings.setdefault("smooth", contract.SCAN_PUBLISHED["f30k"][settings["direction"]]["smooth"])
        return name, settings

    @classmethod
    def vectorized_reference(cls, model, settings):
        return lambda img, cap, lens: reference_math.scan_similarity_vectorized(img, cap, lens,
                                                                                **settings)
