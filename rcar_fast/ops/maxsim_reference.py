"""The S-only heads on the float64-faithful reference (rcar_fast.reference_heads): the
vectorised form and the per-pair loop, all pairs (op "maxsim") and listed pairs (op
"maxsim_pairs"), differentiable by torch autograd (and twice differentiable).

    maxsim:       fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale,
                     coding="max", vsa_tau=0.1) -> (n_img, n_cap)
    maxsim_pairs: fn(img, cap, lens, img_lens, img_idx, cap_idx, *, same keywords) -> (P,)

Only these backends take CHAN's VSA coding (coding="vsa"; `codings` below). Eager calls run the
reference directly; inside torch.compile the vectorised form runs as the custom ops
rcar_fast::maxsim_reference / maxsim_pairs_reference (their backward ops recompute the forward
under autograd), since its length-dependent slicing cannot be traced into one graph.
"""
import torch

from rcar_fast import reference_heads
from rcar_fast.contract import CHAN_TAU, HEAD_CODINGS
from rcar_fast.ops.backend import Backend, output_dtype
from rcar_fast.ops.library import MAXSIM_OPTION_NAMES, define_maxsim_op, vjp


def _options(options) -> dict:
    return dict(zip(MAXSIM_OPTION_NAMES, options))


def _all_pairs(form, img, cap, lens, img_lens, **kw) -> torch.Tensor:
    return form(img, cap, lens, img_lens, **kw).to(output_dtype(img.dtype))


def _listed_pairs(form, img, cap, lens, img_lens, img_idx, cap_idx, **kw) -> torch.Tensor:
    return form(img, cap, lens, img_lens, img_idx, cap_idx, **kw).to(output_dtype(img.dtype))


def _forward(img, cap, lens, img_lens, options):
    return _all_pairs(reference_heads.head_similarity_vectorized, img, cap, lens, img_lens,
                      **_options(options))


def _backward(grad, img, cap, lens, img_lens, options):
    return tuple(vjp(lambda i, c: _forward(i, c, lens, img_lens, options), [img, cap], grad))


def _pairs_forward(img, cap, lens, img_lens, img_idx, cap_idx, options):
    return _listed_pairs(reference_heads.head_pairs_vectorized, img, cap, lens, img_lens,
                         img_idx, cap_idx, **_options(options))


def _pairs_backward(grad, img, cap, lens, img_lens, img_idx, cap_idx, options):
    return tuple(vjp(lambda i, c: _pairs_forward(i, c, lens, img_lens, img_idx, cap_idx, options),
                     [img, cap], grad))


# rcar_fast::maxsim_reference(_backward) and rcar_fast::maxsim_pairs_reference(_backward)
maxsim_reference_op = define_maxsim_op("maxsim_reference", _forward, _backward)
maxsim_pairs_reference_op = define_maxsim_op("maxsim_pairs_reference", _pairs_forward,
                                             _pairs_backward, pairs=True)


def _compiled(coding: str) -> bool:
    # VSA is not an op option: a compiled VSA call runs the reference eagerly (a graph break).
    return coding == "max" and torch.compiler.is_compiling()


class MaxSimReference(Backend):
    op, backend, kernel = "maxsim", "reference", "the vectorised reference"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, *, coding="max", vsa_tau=CHAN_TAU, **kw) -> torch.Tensor:
        if _compiled(coding):
            return maxsim_reference_op(img, cap, lens, img_lens, *(kw[n] for n in MAXSIM_OPTION_NAMES))
        return _all_pairs(reference_heads.head_similarity_vectorized, img, cap, lens, img_lens,
                          coding=coding, vsa_tau=vsa_tau, **kw)


class MaxSimReferenceLoop(Backend):
    op, backend, kernel = "maxsim", "reference_loop", "the reference loop"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, **kw) -> torch.Tensor:
        return _all_pairs(reference_heads.head_similarity_loop, img, cap, lens, img_lens, **kw)


class MaxSimPairsReference(Backend):
    op, backend, kernel = "maxsim_pairs", "reference", "the vectorised reference"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, coding="max", vsa_tau=CHAN_TAU,
           **kw) -> torch.Tensor:
        if _compiled(coding):
            return maxsim_pairs_reference_op(img, cap, lens, img_lens, img_idx, cap_idx,
                                             *(kw[n] for n in MAXSIM_OPTION_NAMES))
        return _listed_pairs(reference_heads.head_pairs_vectorized, img, cap, lens, img_lens,
                             img_idx, cap_idx, coding=coding, vsa_tau=vsa_tau, **kw)


class MaxSimPairsReferenceLoop(Backend):
    op, backend, kernel = "maxsim_pairs", "reference_loop", "the reference loop"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, **kw) -> torch.Tensor:
        return _listed_pairs(reference_heads.head_pairs_loop, img, cap, lens, img_lens, img_idx,
                             cap_idx, **kw)
