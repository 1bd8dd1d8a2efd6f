"""The S-only heads (max_similarity, HEADS.md) on the Triton backend: autograd wiring and the
backend classes (all pairs, op "maxsim"; listed pairs, op "maxsim_pairs").

The kernels (rcar_fast.kernels.maxsim) score every (image, caption) pair from the shared
region-word tile and, recomputing the tile and its argmaxes, give d img and d cap; nothing of
size (pairs x words) is stored. CHAN's VSA coding (coding="vsa") runs eagerly (under
torch.compile too: it is not an option of the custom ops, as on the reference backends). Dtypes: fp32/fp16/bf16 on CUDA (output float32); under
triton's CPU interpreter (tests) fp32/fp16 and float64 (output float64, for gradcheck).
"""
from __future__ import annotations

import torch

from rcar_fast.contract import CHAN_TAU, HEAD_CODINGS
from rcar_fast.ops.backend import Inputs, TritonBackend
from rcar_fast.ops.library import MAXSIM_OPTION_NAMES, define_maxsim_op

# The kernels' settings: the custom ops' options, then the coding (eager calls only).
_SETTING_NAMES = MAXSIM_OPTION_NAMES + ("coding", "vsa_tau")


def _kernels():
    # Imported on first use: importing triton (and compiling) only when this backend runs.
    from rcar_fast.kernels import maxsim as maxsim_kernels

    return maxsim_kernels


def _problem(img, cap, lens, img_lens, options):
    return _kernels().build_problem(img, cap, lens, img_lens, **dict(zip(_SETTING_NAMES, options)))


class MaxSimilarityTriton(torch.autograd.Function):
    """sims = head(img, cap, lens, img_lens); backward gives d img and d cap (zero at padding),
    none for the lengths and the options. Not twice differentiable."""

    @staticmethod
    def forward(ctx, img, cap, lens, img_lens, options):
        problem = _problem(img, cap, lens, img_lens, options)
        ctx.problem = problem   # the length buckets, reused by the backward
        return _kernels().maxsim_forward(problem)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dsims):
        need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dimg, dcap = _kernels().maxsim_backward(ctx.problem, dsims, need_img, need_cap)
        return dimg, dcap, None, None, None


def _op_forward(img, cap, lens, img_lens, options):
    return _kernels().maxsim_forward(_problem(img, cap, lens, img_lens, options))


def _op_backward(grad, img, cap, lens, img_lens, options):
    return tuple(_kernels().maxsim_backward(_problem(img, cap, lens, img_lens, options), grad,
                                            True, True))


# rcar_fast::maxsim_triton and rcar_fast::maxsim_triton_backward: what torch.compile sees (its
# backward op rebuilds the length buckets that the eager Function keeps from its forward).
maxsim_triton_op = define_maxsim_op("maxsim_triton", _op_forward, _op_backward)


class _TritonHeads(TritonBackend):
    """What both Triton head backends share: the tile-size limit."""
    kernel = "the Triton S-only head kernels"
    region_floor = 1   # the regions' padding floor of the op's kernels
    codings = HEAD_CODINGS

    @classmethod
    def extra_reasons(cls, inputs: Inputs) -> list[str]:
        if inputs.img_shape is None or inputs.cap_shape is None:
            return []
        longest = inputs.longest_caption() or inputs.cap_shape[1]
        why = _kernels().max_tile_reason(inputs.img_shape[1], longest, cls.region_floor)
        return [why] if why else []


class MaxSimTriton(_TritonHeads):
    op = "maxsim"

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction="t2i", pool="mean", tau=0.1, leaky=False,
           both_scale=0.5, coding="max", vsa_tau=CHAN_TAU):
        """Inputs already validated and normalised by rcar_fast.max_similarity (lens, img_lens
        int64 on the inputs' device). Returns (n_img, n_cap) float32 (float64 for float64)."""
        options = (direction, pool, float(tau), bool(leaky), float(both_scale))
        if coding == "max" and torch.compiler.is_compiling():
            return maxsim_triton_op(img, cap, lens, img_lens, *options)
        return MaxSimilarityTriton.apply(img, cap, lens, img_lens,
                                         options + (coding, float(vsa_tau)))


# ---------------------------------------------------------------------------------------------
# Listed pairs
# ---------------------------------------------------------------------------------------------

def _pairs_problem(img, cap, lens, img_lens, img_idx, cap_idx, options):
    return _kernels().build_pairs_problem(img, cap, lens, img_lens, img_idx, cap_idx,
                                          **dict(zip(_SETTING_NAMES, options)))


class MaxSimilarityPairsTriton(torch.autograd.Function):
    """scores[p] = head(img[img_idx[p]], cap[cap_idx[p]]); backward gives d img and d cap."""

    @staticmethod
    def forward(ctx, img, cap, lens, img_lens, img_idx, cap_idx, options):
        problem = _pairs_problem(img, cap, lens, img_lens, img_idx, cap_idx, options)
        ctx.problem = problem   # the buckets and groupings, reused by the backward
        return _kernels().maxsim_pairs_forward(problem)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dscores):
        need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dimg, dcap = _kernels().maxsim_pairs_backward(ctx.problem, dscores, need_img, need_cap)
        return dimg, dcap, None, None, None, None, None


def _pairs_op_forward(img, cap, lens, img_lens, img_idx, cap_idx, options):
    return _kernels().maxsim_pairs_forward(_pairs_problem(img, cap, lens, img_lens, img_idx,
                                                          cap_idx, options))


def _pairs_op_backward(grad, img, cap, lens, img_lens, img_idx, cap_idx, options):
    problem = _pairs_problem(img, cap, lens, img_lens, img_idx, cap_idx, options)
    return tuple(_kernels().maxsim_pairs_backward(problem, grad, True, True))


maxsim_pairs_triton_op = define_maxsim_op("maxsim_pairs_triton", _pairs_op_forward,
                                          _pairs_op_backward, pairs=True)


class MaxSimPairsTriton(_TritonHeads):
    op = "maxsim_pairs"
    region_floor = 16   # one pair per program: both tile sides at least tl.dot's 16

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction="t2i", pool="mean", tau=0.1,
           leaky=False, both_scale=0.5, coding="max", vsa_tau=CHAN_TAU):
        """Listed pairs (img_idx[p], cap_idx[p]), int64 (P,) validated by the wrapper: (P,)
        float32 (float64 for float64 inputs)."""
        options = (direction, pool, float(tau), bool(leaky), float(both_scale))
        if coding == "max" and torch.compiler.is_compiling():
            return maxsim_pairs_triton_op(img, cap, lens, img_lens, img_idx, cap_idx, *options)
        return MaxSimilarityPairsTriton.apply(img, cap, lens, img_lens, img_idx, cap_idx,
                                              options + (coding, float(vsa_tau)))
