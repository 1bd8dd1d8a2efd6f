"""The S-only heads (HEADS.md) and late-interaction MaxSim (op "maxsim": all pairs; op
"maxsim_pairs": a pair list): the ops' custom ops and their autograd, their backends, the
public wrappers max_similarity and maxsim, and the head registry's entry MaxsimScorer.

The backends (BACKENDS, before the wrappers; rcar_fast.dispatch.TABLE takes them from there)
have the signatures

    maxsim:       fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale) -> (n_img, n_cap)
    maxsim_pairs: fn(img, cap, lens, img_lens, img_idx, cap_idx, *, same keywords) -> (P,)

img / cap arrive contiguous and already normalised (normalize="unit" is done by the wrappers,
in torch, differentiably, padding zeroed first), lens / img_lens int64 on their device, always
given. The result is float32 (float64 for float64 inputs), differentiable w.r.t. img and cap.
CHAN's VSA coding (coding="vsa") adds the keywords coding, vsa_tau and runs on the backends
whose class lists it in `codings` (all of them: the reference ones, the C++ CPU kernels, Triton and CUDA).

    reference, reference_loop   the float64-faithful reference (rcar_fast.reference_heads)
    cpu                         the C++ CPU kernels (csrc/cpu/maxsim.cpp)
    triton                      the Triton kernels (kernels/maxsim.py)
    cuda                        the CUDA kernels (csrc/cuda/maxsim.cu; pair lists in blocks)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from rcar_fast import contract, reference_heads, validate
from rcar_fast.contract import CHAN_TAU, HEAD_CODINGS, HEAD_PRESETS
from rcar_fast.ops import backend as op_backend
from rcar_fast.ops import scan as scan_ops
from rcar_fast.ops.backend import (COL_FRAGS, REQUESTABLE, Backend, BackendUnavailable,  # noqa: F401
                                   CpuKernelBackend, CudaTileBackend, Inputs, TritonBackend,
                                   caption_groups, choose, cuda_stream, find, native, output_dtype,
                                   rows_contiguous)
from rcar_fast.ops.backend import CUDA_DTYPE_CODES as DTYPE_CODES
from rcar_fast.ops.library import input_grads, vjp
from rcar_fast.ops.scorer import Scorer
from rcar_fast.reference_heads import max_similarity_reference, normalize_inputs

__all__ = ["max_similarity", "maxsim", "MaxsimScorer", "HEAD_PRESETS", "BACKENDS"]


# ---------------------------------------------------------------------------------------------
# The custom ops: rcar_fast::maxsim_<backend>, maxsim_pairs_<backend> (and _backward)
# ---------------------------------------------------------------------------------------------

# The options every maxsim op takes after its tensors, in this order.
MAXSIM_OPTION_NAMES = ("direction", "pool", "tau", "leaky", "both_scale")


def maxsim_output(img: Tensor, cap: Tensor, img_idx: Optional[Tensor] = None) -> Tensor:
    """The one shape function of the maxsim ops: an empty (n_img, n_cap) result, or (P,) for a
    pair list; float32 (float64 for float64 inputs), on img's device."""
    shape = (img.shape[0], cap.shape[0]) if img_idx is None else (img_idx.shape[0],)
    return img.new_empty(shape, dtype=output_dtype(img.dtype))


def _register_maxsim_autograd(op, op_backward, n_tensors: int):
    """Autograd of a maxsim op whose first n_tensors inputs are tensors (img, cap first)."""
    n_inputs = n_tensors + len(MAXSIM_OPTION_NAMES)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.options = inputs[n_tensors:]

    def backward_formula(ctx, grad):
        need_img, need_cap = ctx.needs_input_grad[:2]
        if not (need_img or need_cap):
            return (None,) * n_inputs
        d_img, d_cap = op_backward(grad.contiguous(), *ctx.saved_tensors, *ctx.options)
        return (d_img if need_img else None, d_cap if need_cap else None) + (None,) * (n_inputs - 2)

    op.register_autograd(backward_formula, setup_context=setup_context)


def define_maxsim_op(name: str, forward: Callable, backward: Callable, pairs: bool = False):
    """Registers rcar_fast::{name} and rcar_fast::{name}_backward and returns the forward op.

    All pairs (pairs=False):
        forward(img, cap, lens, img_lens, options) -> (n_img, n_cap)
        backward(grad, img, cap, lens, img_lens, options) -> (d img, d cap)
    Listed pairs (pairs=True), img_idx / cap_idx int64 (P,) after img_lens:
        forward(img, cap, lens, img_lens, img_idx, cap_idx, options) -> (P,)
        backward(grad, img, cap, lens, img_lens, img_idx, cap_idx, options) -> (d img, d cap)
    options: the tuple (direction, pool, tau, leaky, both_scale) (MAXSIM_OPTION_NAMES). The
    fake implementations come from maxsim_output (and input_grads)."""
    if pairs:
        @torch.library.custom_op(f"rcar_fast::{name}", mutates_args=())
        def op(img: Tensor, cap: Tensor, lens: Tensor, img_lens: Tensor, img_idx: Tensor,
               cap_idx: Tensor, direction: str, pool: str, tau: float, leaky: bool,
               both_scale: float) -> Tensor:
            return forward(img, cap, lens, img_lens, img_idx, cap_idx,
                           (direction, pool, tau, leaky, both_scale))

        @torch.library.custom_op(f"rcar_fast::{name}_backward", mutates_args=())
        def op_backward(grad: Tensor, img: Tensor, cap: Tensor, lens: Tensor, img_lens: Tensor,
                        img_idx: Tensor, cap_idx: Tensor, direction: str, pool: str, tau: float,
                        leaky: bool, both_scale: float) -> tuple[Tensor, Tensor]:
            return backward(grad, img, cap, lens, img_lens, img_idx, cap_idx,
                            (direction, pool, tau, leaky, both_scale))

        op.register_fake(lambda img, cap, lens, img_lens, img_idx, *rest: maxsim_output(img, cap, img_idx))
        op_backward.register_fake(lambda grad, img, cap, *rest: input_grads(img, cap))
        _register_maxsim_autograd(op, op_backward, n_tensors=6)
        return op

    @torch.library.custom_op(f"rcar_fast::{name}", mutates_args=())
    def op(img: Tensor, cap: Tensor, lens: Tensor, img_lens: Tensor, direction: str, pool: str,
           tau: float, leaky: bool, both_scale: float) -> Tensor:
        return forward(img, cap, lens, img_lens, (direction, pool, tau, leaky, both_scale))

    @torch.library.custom_op(f"rcar_fast::{name}_backward", mutates_args=())
    def op_backward(grad: Tensor, img: Tensor, cap: Tensor, lens: Tensor, img_lens: Tensor,
                    direction: str, pool: str, tau: float, leaky: bool,
                    both_scale: float) -> tuple[Tensor, Tensor]:
        return backward(grad, img, cap, lens, img_lens, (direction, pool, tau, leaky, both_scale))

    op.register_fake(lambda img, cap, *rest: maxsim_output(img, cap))
    op_backward.register_fake(lambda grad, img, cap, *rest: input_grads(img, cap))
    _register_maxsim_autograd(op, op_backward, n_tensors=4)
    return op


# ---------------------------------------------------------------------------------------------
# reference, reference_loop: the reference math (rcar_fast.reference_heads)
# ---------------------------------------------------------------------------------------------

# These backends take CHAN's VSA coding (coding="vsa"; `codings` below). Eager calls run the
# reference directly; inside torch.compile the vectorised form runs as the custom ops
# rcar_fast::maxsim_reference / maxsim_pairs_reference (their backward ops recompute the forward
# under autograd), since its length-dependent slicing cannot be traced into one graph.

def _options(options) -> dict:
    return dict(zip(MAXSIM_OPTION_NAMES, options))


def _all_pairs(form, img, cap, lens, img_lens, **kw) -> torch.Tensor:
    return form(img, cap, lens, img_lens, **kw).to(output_dtype(img.dtype))


def _listed_pairs(form, img, cap, lens, img_lens, img_idx, cap_idx, **kw) -> torch.Tensor:
    return form(img, cap, lens, img_lens, img_idx, cap_idx, **kw).to(output_dtype(img.dtype))


def _reference_forward(img, cap, lens, img_lens, options):
    return _all_pairs(reference_heads.head_similarity_vectorized, img, cap, lens, img_lens,
                      **_options(options))


def _reference_backward(grad, img, cap, lens, img_lens, options):
    return tuple(vjp(lambda i, c: _reference_forward(i, c, lens, img_lens, options), [img, cap], grad))


def _reference_pairs_forward(img, cap, lens, img_lens, img_idx, cap_idx, options):
    return _listed_pairs(reference_heads.head_pairs_vectorized, img, cap, lens, img_lens,
                         img_idx, cap_idx, **_options(options))


def _reference_pairs_backward(grad, img, cap, lens, img_lens, img_idx, cap_idx, options):
    return tuple(vjp(lambda i, c: _reference_pairs_forward(i, c, lens, img_lens, img_idx, cap_idx, options),
                     [img, cap], grad))


# rcar_fast::maxsim_reference(_reference_backward) and rcar_fast::maxsim_pairs_reference(_reference_backward)
maxsim_reference_op = define_maxsim_op("maxsim_reference", _reference_forward, _reference_backward)
maxsim_pairs_reference_op = define_maxsim_op("maxsim_pairs_reference", _reference_pairs_forward,
                                             _reference_pairs_backward, pairs=True)


def _compiled(coding: str) -> bool:
    # VSA is not an op option of these: a compiled VSA call runs eagerly (a graph break).
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


# ---------------------------------------------------------------------------------------------
# cpu: the C++ CPU kernels (csrc/cpu/maxsim.cpp)
# ---------------------------------------------------------------------------------------------

# All pairs: per tile of (caption block x image block) one GEMM gives every word-region score of
# the tile (the real words x the real regions, read in place or packed per tile: padding never
# enters), and the per-pair epilogue takes the maxima (t2i per word over the regions, i2t per
# region over the words) or the VSA codes and pools them, vectorised, with OpenMP over tiles;
# memory O(threads x tile) beyond the inputs and the result. The backward recomputes the tile:
# for the max coding the first argmax of every max, scattering the pooled gradient along those
# links (no dense score gradient, no further GEMM); for VSA the closed form of HEADS.md (two
# GEMMs per tile); deterministically: the same bits on every run. Pair list: one small GEMM per
# pair; its backward accumulates each caption's and each image's rows in one task, in pair order.
#
# float32 and float64 CPU tensors. coding="vsa" is not an option of the maxsim custom ops
# (MAXSIM_OPTION_NAMES): it runs through a torch.autograd.Function (_VsaCpu; under torch.compile
# a graph break, as the reference's VSA).

def native_settings(direction, pool, tau, leaky, both_scale, coding="max", vsa_tau=CHAN_TAU):
    """The kernels' typed options (csrc/cpu/maxsim.cpp MaxSimSettings) from the names."""
    return native().MaxSimSettings(
        direction=contract.HEAD_DIRECTION_CODES[direction], pool=contract.POOL_CODES[pool],
        tau=float(tau), leaky=bool(leaky), both_scale=float(both_scale), vsa=coding == "vsa",
        vsa_tau=float(vsa_tau))


def _cpu_forward(img, cap, lens, img_lens, options):
    return native().maxsim_forward_cpu(img, cap, lens, img_lens, native_settings(*options))


def _cpu_backward(grad, img, cap, lens, img_lens, options):
    return tuple(native().maxsim_backward_cpu(grad, img, cap, lens, img_lens, native_settings(*options)))


def _cpu_pairs_forward(img, cap, lens, img_lens, img_idx, cap_idx, options):
    return native().maxsim_pairs_forward_cpu(img, cap, lens, img_lens, img_idx, cap_idx,
                                             native_settings(*options))


def _cpu_pairs_backward(grad, img, cap, lens, img_lens, img_idx, cap_idx, options):
    return tuple(native().maxsim_pairs_backward_cpu(grad, img, cap, lens, img_lens, img_idx, cap_idx,
                                                    native_settings(*options)))


# rcar_fast::maxsim_cpu(_cpu_backward) and rcar_fast::maxsim_pairs_cpu(_cpu_backward)
maxsim_cpu_op = define_maxsim_op("maxsim_cpu", _cpu_forward, _cpu_backward)
maxsim_pairs_cpu_op = define_maxsim_op("maxsim_pairs_cpu", _cpu_pairs_forward, _cpu_pairs_backward, pairs=True)


class _VsaCpu(torch.autograd.Function):
    """The VSA coding on the kernels: all pairs (pairs = ()) or the pairs (img_idx, cap_idx)."""

    @staticmethod
    def forward(ctx, img, cap, lens, img_lens, pairs, settings):
        ctx.save_for_backward(img, cap, lens, img_lens, *pairs)
        ctx.settings = settings
        if pairs:
            return native().maxsim_pairs_forward_cpu(img, cap, lens, img_lens, *pairs, settings)
        return native().maxsim_forward_cpu(img, cap, lens, img_lens, settings)

    @staticmethod
    def backward(ctx, grad):
        img, cap, lens, img_lens, *pairs = ctx.saved_tensors
        kernel = native().maxsim_pairs_backward_cpu if pairs else native().maxsim_backward_cpu
        d_img, d_cap = kernel(grad.contiguous(), img, cap, lens, img_lens, *pairs, ctx.settings)
        return d_img, d_cap, None, None, None, None


def _cpu_vsa(img, cap, lens, img_lens, pairs, **kw):
    return _VsaCpu.apply(img, cap, lens, img_lens, pairs, native_settings(**kw))


class MaxSimCpu(CpuKernelBackend):
    op = "maxsim"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale, coding="max",
           vsa_tau=CHAN_TAU):
        if coding != "max":
            return _cpu_vsa(img, cap, lens, img_lens, (), direction=direction, pool=pool, tau=tau,
                            leaky=leaky, both_scale=both_scale, coding=coding, vsa_tau=vsa_tau)
        return maxsim_cpu_op(img, cap, lens, img_lens, direction, pool, float(tau), bool(leaky),
                             float(both_scale))


class MaxSimPairsCpu(CpuKernelBackend):
    op = "maxsim_pairs"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction, pool, tau, leaky, both_scale,
           coding="max", vsa_tau=CHAN_TAU):
        if coding != "max":
            return _cpu_vsa(img, cap, lens, img_lens, (img_idx, cap_idx), direction=direction, pool=pool,
                            tau=tau, leaky=leaky, both_scale=both_scale, coding=coding, vsa_tau=vsa_tau)
        return maxsim_pairs_cpu_op(img, cap, lens, img_lens, img_idx, cap_idx, direction, pool,
                                   float(tau), bool(leaky), float(both_scale))


# ---------------------------------------------------------------------------------------------
# triton: the Triton kernels (kernels/maxsim.py)
# ---------------------------------------------------------------------------------------------

# The kernels (rcar_fast.kernels.maxsim) score every (image, caption) pair from the shared
# region-word tile and, recomputing the tile and its argmaxes, give d img and d cap; nothing of
# size (pairs x words) is stored. CHAN's VSA coding (coding="vsa") runs eagerly (under
# torch.compile too: it is not an option of the custom ops, as on the reference backends).
# Dtypes: fp32/fp16/bf16 on CUDA (output float32); under triton's CPU interpreter (tests)
# fp32/fp16 and float64 (output float64, for gradcheck).

def _triton_kernels():
    # Imported on first use: importing triton (and compiling) only when this backend runs.
    from rcar_fast.kernels import maxsim as maxsim_kernels

    return maxsim_kernels


# The kernels' settings: the custom ops' options, then the coding (eager calls only).
_TRITON_SETTING_NAMES = MAXSIM_OPTION_NAMES + ("coding", "vsa_tau")


class _TritonEntry(NamedTuple):
    """One kernel entry of kernels/maxsim.py (all pairs, or pair lists): how to build its
    problem from the op's tensors and options, and its forward and backward (by name)."""
    build: str        # build_problem(img, cap, lens, img_lens, [img_idx, cap_idx,] **options)
    forward: str      # forward(problem) -> scores
    backward: str     # backward(problem, grad, need_img, need_cap) -> (d img, d cap)

    def problem(self, img, cap, *rest):
        *tensors, options = rest
        return getattr(_triton_kernels(), self.build)(img, cap, *tensors,
                                                      **dict(zip(_TRITON_SETTING_NAMES, options)))

    def run_forward(self, problem):
        return getattr(_triton_kernels(), self.forward)(problem)

    def run_backward(self, problem, grad, need_img=True, need_cap=True):
        return getattr(_triton_kernels(), self.backward)(problem, grad, need_img, need_cap)

    def op_forward(self, *inputs):
        """The custom op's forward: inputs (img, cap, lens, img_lens, [img_idx, cap_idx,] options)."""
        return self.run_forward(self.problem(*inputs))

    def op_backward(self, grad, *inputs):
        """The custom op's backward: the problem rebuilt (the eager Function keeps its own)."""
        return tuple(self.run_backward(self.problem(*inputs), grad))


_ALL_PAIRS = _TritonEntry("build_problem", "maxsim_forward", "maxsim_backward")
_PAIR_LIST = _TritonEntry("build_pairs_problem", "maxsim_pairs_forward", "maxsim_pairs_backward")


class MaxSimilarityTriton(torch.autograd.Function):
    """scores = head(img, cap, lens, img_lens[, img_idx, cap_idx]) through a kernel entry (all
    pairs, or pair lists); backward gives d img and d cap (zero at padding), none for the
    lengths, indices and options. The problem (length buckets, pair groupings) is kept for the
    backward. Not twice differentiable."""

    @staticmethod
    def forward(ctx, entry: _TritonEntry, img, cap, *rest):
        ctx.entry, ctx.problem, ctx.n_rest = entry, entry.problem(img, cap, *rest), len(rest)
        return entry.run_forward(ctx.problem)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        need_img, need_cap = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dimg, dcap = ctx.entry.run_backward(ctx.problem, grad, need_img, need_cap)
        return (None, dimg, dcap) + (None,) * ctx.n_rest


# rcar_fast::maxsim_triton(_backward) and rcar_fast::maxsim_pairs_triton(_backward): what
# torch.compile sees (their backward ops rebuild the problem that the eager Function keeps).
maxsim_triton_op = define_maxsim_op("maxsim_triton", _ALL_PAIRS.op_forward, _ALL_PAIRS.op_backward)
maxsim_pairs_triton_op = define_maxsim_op("maxsim_pairs_triton", _PAIR_LIST.op_forward,
                                          _PAIR_LIST.op_backward, pairs=True)


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
        why = _triton_kernels().max_tile_reason(inputs.img_shape[1], longest, cls.region_floor)
        return [why] if why else []


class MaxSimTriton(_TritonHeads):
    op = "maxsim"

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction="t2i", pool="mean", tau=0.1, leaky=False,
           both_scale=0.5, coding="max", vsa_tau=CHAN_TAU):
        """Inputs already validated and normalised by rcar_fast.max_similarity (lens, img_lens
        int64 on the inputs' device). Returns (n_img, n_cap) float32 (float64 for float64)."""
        options = (direction, pool, float(tau), bool(leaky), float(both_scale))
        if _compiled(coding):
            return maxsim_triton_op(img, cap, lens, img_lens, *options)
        return MaxSimilarityTriton.apply(_ALL_PAIRS, img, cap, lens, img_lens,
                                         options + (coding, float(vsa_tau)))


class MaxSimPairsTriton(_TritonHeads):
    op = "maxsim_pairs"
    region_floor = 16   # one pair per program: both tile sides at least tl.dot's 16

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction="t2i", pool="mean", tau=0.1,
           leaky=False, both_scale=0.5, coding="max", vsa_tau=CHAN_TAU):
        """Listed pairs (img_idx[p], cap_idx[p]), int64 (P,) validated by the wrapper: (P,)
        float32 (float64 for float64 inputs)."""
        options = (direction, pool, float(tau), bool(leaky), float(both_scale))
        if _compiled(coding):
            return maxsim_pairs_triton_op(img, cap, lens, img_lens, img_idx, cap_idx, *options)
        return MaxSimilarityTriton.apply(_PAIR_LIST, img, cap, lens, img_lens, img_idx, cap_idx,
                                         options + (coding, float(vsa_tau)))


# ---------------------------------------------------------------------------------------------
# cuda: the CUDA kernels (csrc/cuda/maxsim.cu)
# ---------------------------------------------------------------------------------------------

# Forward: the shared region-word tile (csrc/cuda/tile.cuh, the one SCAN's CUDA kernel uses) with
# the heads' per-pair epilogue: maxima with their first argmax, leaky, pools, padding never read.
#
# Backward (flash style: nothing is kept from the forward): the tile and every argmax are
# recomputed; per image chunk the kernel writes one coefficient and one argmax index per pooled
# maximum (t2i: (images, packed words), i2t: (image rows, captions)), and two contraction kernels
# turn them into d img (owned per image) and d cap (owned per caption, image chunks added in
# order). No atomics: gradients are bitwise deterministic. The chunk keeps those buffers below
# COEFFICIENT_BUFFER_BYTES. Gradients are computed in float32 and returned in the input dtype
# (as the custom op's fake says); padding gets exactly zero.
#
# Dtypes: float32 (fp32 FMA scores), float16 and bfloat16 (tensor-core scores, fp32 accumulation);
# output float32. Shape limits: the tile's (R <= 160 with captions up to 128 words, R <= 320 with
# up to 64, R <= 640 with up to 32); extra_reasons reports them before anything launches.
#
# CHAN's VSA coding (coding="vsa", i2t; the op rcar_fast::maxsim_vsa_cuda): the same tile, each
# region's code from the caption's word Gram (csrc/cuda/gram.cu); its backward kernel writes SCAN
# i2t's per-pair buffers (dL/dS, a, 2 dL/d|c|^2 a), contracted by ops/scan.py's
# GradientAccumulator (cuBLAS GEMMs, no atomics: deterministic run to run).

# Upper bound for one image chunk's coefficient and argmax buffers in the backward.
COEFFICIENT_BUFFER_BYTES = 512 * 2**20


class Options(NamedTuple):
    direction: str
    pool: str
    tau: float
    leaky: bool
    both_scale: float
    coding: str = "max"
    vsa_tau: float = contract.CHAN_TAU

    @property
    def vsa(self) -> bool:
        return self.coding == "vsa"

    @property
    def t2i(self) -> bool:
        return self.direction != "i2t"

    @property
    def i2t(self) -> bool:
        return self.direction != "t2i"


def tile_shape_rejection(R: int, max_len: int) -> Optional[str]:
    """Why no tile shape holds R regions and a caption of max_len words (None if one does)."""
    return op_backend.tile_shape_rejection(R, max_len, kernel="maxsim",
                                           instead="'triton', 'cpu' or 'reference'")


def tile_col_frags(R: int, max_len: int) -> int:
    """The widest tile shape whose rows hold R regions and whose columns the longest caption."""
    return op_backend.tile_col_frags(R, max_len, kernel="maxsim", instead="'triton', 'cpu' or 'reference'")


@dataclasses.dataclass
class Captions:
    """The packed-caption tables of one call (forward, or every backward chunk)."""
    cap: torch.Tensor           # (n_cap, Lmax, d), rows contiguous
    lens: torch.Tensor          # (n_cap,) int64 on the device
    word_off: torch.Tensor      # (n_cap + 1,) int64
    total_words: int
    max_len: int
    col_frags: int
    group_first: torch.Tensor   # (n_groups + 1,) int32
    lens_host: list
    gram: Optional[torch.Tensor] = None      # vsa: packed caption Grams (ops/scan.py caption_grams)
    gram_off: Optional[torch.Tensor] = None


def prepare_captions(cap: torch.Tensor, lens: torch.Tensor, R: int, vsa: bool = False) -> Captions:
    device = cap.device
    cap = rows_contiguous(cap)
    lens = lens.to(device=device, dtype=torch.int64).contiguous()
    lens_host = [int(v) for v in lens.cpu().tolist()]
    word_off = torch.zeros(len(lens_host) + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=word_off[1:])
    max_len = max(lens_host)
    col_frags = tile_col_frags(R, max_len)
    group_first = torch.tensor(caption_groups(lens_host, native().scan_tile_cols(col_frags)),
                               dtype=torch.int32, device=device)
    gram, gram_off = scan_ops.caption_grams(cap, lens, lens_host) if vsa else (None, None)
    return Captions(cap, lens, word_off, sum(lens_host), max_len, col_frags, group_first, lens_host,
                    gram, gram_off)


def native_problem(img: torch.Tensor, img_lens: torch.Tensor, caps: Captions, options: Options):
    """The typed MaxSimProblemCuda (csrc/cuda/maxsim.cu) of img (all of it, or a chunk) and caps."""
    n_img, R, d = img.shape
    cap = caps.cap
    return native().MaxSimProblemCuda(
        img=img.data_ptr(), cap=cap.data_ptr(), dtype=DTYPE_CODES[img.dtype],
        n_img=n_img, R=R, d=d, n_cap=cap.shape[0],
        img_stride_n=img.stride(0), img_stride_r=img.stride(1),
        cap_stride_n=cap.stride(0), cap_stride_w=cap.stride(1),
        img_lens=img_lens.data_ptr(), lens=caps.lens.data_ptr(), word_off=caps.word_off.data_ptr(),
        total_words=caps.total_words, max_len=caps.max_len,
        group_first=caps.group_first.data_ptr(), n_groups=caps.group_first.numel() - 1,
        col_frags=caps.col_frags, direction=contract.HEAD_DIRECTION_CODES[options.direction],
        pool=contract.POOL_CODES[options.pool], leaky=int(bool(options.leaky)),
        tau=float(options.tau), both_scale=float(options.both_scale), vsa=int(options.vsa),
        vsa_tau=float(options.vsa_tau), gram=0 if caps.gram is None else caps.gram.data_ptr(),
        gram_off=0 if caps.gram_off is None else caps.gram_off.data_ptr())


def shape_problem(inputs: Inputs, longest: int):
    """A MaxSimProblemCuda with the shapes of `inputs` and null pointers, for the launch check
    alone (it reads no memory): the same limits the launchers enforce, before any launch."""
    (n_img, R, d), (n_cap, Lmax, _) = inputs.img_shape, inputs.cap_shape
    return native().MaxSimProblemCuda(
        img=0, cap=0, dtype=DTYPE_CODES.get(inputs.dtype, -1), n_img=n_img, R=R, d=d, n_cap=n_cap,
        img_stride_n=R * d, img_stride_r=d, cap_stride_n=Lmax * d, cap_stride_w=d, img_lens=0, lens=0,
        word_off=0, total_words=n_cap * longest, max_len=longest, group_first=0, n_groups=max(n_cap, 1),
        col_frags=tile_col_frags(R, longest),
        direction=contract.HEAD_DIRECTION_CODES.get(inputs.direction or "t2i", 0),
        pool=contract.POOL_CODES["mean"], leaky=0, tau=1.0, both_scale=1.0, vsa=0, vsa_tau=1.0, gram=0,
        gram_off=0)


def _image_lens(img_lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return img_lens.to(device=device, dtype=torch.int64).contiguous()


def maxsim_forward(img, cap, lens, img_lens, options: Options,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sims (n_img, n_cap) float32; `out`, when given, is written in place (tests poison it)."""
    img = rows_contiguous(img)
    caps = prepare_captions(cap, lens, img.shape[1], options.vsa)
    img_lens = _image_lens(img_lens, img.device)
    if out is None:
        out = torch.empty((img.shape[0], cap.shape[0]), dtype=torch.float32, device=img.device)
    native().maxsim_forward_cuda(native_problem(img, img_lens, caps, options), out.data_ptr(),
                                 cuda_stream(img.device))
    return out


def backward_image_chunk(n_img: int, R: int, total_words: int, n_cap: int, options: Options,
                         budget: Optional[int] = None) -> int:
    """Images per backward chunk so that the coefficient buffers stay below the budget."""
    budget = COEFFICIENT_BUFFER_BYTES if budget is None else budget
    per_image = 8 * (total_words * options.t2i + R * n_cap * options.i2t)  # float32 + int32
    return max(1, min(n_img, budget // max(per_image, 1)))


def maxsim_backward(grad_sims, img, cap, lens, img_lens, options: Options):
    """(d img, d cap) in the input dtype; zero at padded regions and words."""
    grad_sims = grad_sims.to(torch.float32).contiguous()
    img = rows_contiguous(img)
    caps = prepare_captions(cap, lens, img.shape[1])
    img_lens = _image_lens(img_lens, img.device)
    n_img, R, d = img.shape
    n_cap, device = cap.shape[0], img.device
    d_img = torch.empty((n_img, R, d), dtype=torch.float32, device=device)
    d_cap_packed = torch.zeros((caps.total_words, d), dtype=torch.float32, device=device)
    chunk = backward_image_chunk(n_img, R, caps.total_words, n_cap, options)

    def buffers(shape, wanted):
        if not wanted:
            return None, None
        return (torch.empty(shape, dtype=torch.float32, device=device),
                torch.empty(shape, dtype=torch.int32, device=device))

    t2i_coef, t2i_arg = buffers((chunk, caps.total_words), options.t2i)
    i2t_coef, i2t_arg = buffers((chunk * R, n_cap), options.i2t)
    ptr = (lambda t: 0 if t is None else t.data_ptr())
    for i0 in range(0, n_img, chunk):
        img_chunk = img[i0:i0 + chunk]
        problem = native_problem(img_chunk, img_lens[i0:i0 + chunk], caps, options)
        native().maxsim_backward_cuda(problem, grad_sims[i0:i0 + chunk].data_ptr(), ptr(t2i_coef),
                                      ptr(t2i_arg), ptr(i2t_coef), ptr(i2t_arg),
                                      d_img[i0:i0 + chunk].data_ptr(), d_cap_packed.data_ptr(),
                                      cuda_stream(device))
    real = torch.arange(cap.shape[1], device=device)[None, :] < caps.lens[:, None]
    d_cap = torch.zeros(cap.shape, dtype=torch.float32, device=device)
    d_cap[real] = d_cap_packed  # packed order = row-major order of the real words
    return d_img.to(img.dtype), d_cap.to(cap.dtype)


def maxsim_vsa_backward(grad_sims, img, cap, lens, img_lens, options: Options):
    """(d img, d cap) of the VSA coding in the input dtype; zero at padded regions and words.
    The kernel's per-pair buffers (SCAN i2t's layout) go through ops/scan.py's
    GradientAccumulator image chunk by image chunk; padded regions are zeroed first (they meet
    zero rows there)."""
    grad_sims = grad_sims.to(torch.float32).contiguous()
    img_lens = _image_lens(img_lens, img.device)
    img = rows_contiguous(reference_heads.zero_padding(img, img_lens))
    caps = prepare_captions(cap, lens, img.shape[1], vsa=True)
    n_img, R, d = img.shape
    acc = scan_ops.GradientAccumulator(caps.cap, caps.lens_host, options, torch.float32)
    d_img = torch.empty((n_img, R, d), dtype=torch.float32, device=img.device)
    chunk = scan_ops.backward_image_chunk(n_img, R, caps.total_words, cap.shape[0], caps.max_len, True)
    no_query_norm = torch.zeros((chunk * R, 1), dtype=torch.float32, device=img.device)
    for i0 in range(0, n_img, chunk):
        img_chunk = img[i0:i0 + chunk]
        rows = img_chunk.shape[0] * R
        bufs = [torch.empty((rows, caps.total_words), dtype=torch.float32, device=img.device)
                for _ in range(3)]
        native().maxsim_vsa_backward_cuda(native_problem(img_chunk, img_lens[i0:i0 + chunk], caps, options),
                                          grad_sims[i0:i0 + chunk].data_ptr(),
                                          *(b.data_ptr() for b in bufs), cuda_stream(img.device))
        d_img[i0:i0 + chunk] = acc.add_chunk(img_chunk, scan_ops.PairGrads(*bufs, no_query_norm[:rows]))
    return d_img.to(img.dtype), acc.caption_grad().to(cap.dtype)


def _cuda_forward(img, cap, lens, img_lens, options):
    return maxsim_forward(img, cap, lens, img_lens, Options(*options))


def _cuda_backward(grad, img, cap, lens, img_lens, options):
    return maxsim_backward(grad, img, cap, lens, img_lens, Options(*options))


# rcar_fast::maxsim_cuda and rcar_fast::maxsim_cuda_backward
maxsim_cuda_op = define_maxsim_op("maxsim_cuda", _cuda_forward, _cuda_backward)


def _vsa_options(pool: str, tau: float, vsa_tau: float) -> Options:
    return Options("i2t", pool, tau, False, 1.0, "vsa", vsa_tau)


@torch.library.custom_op("rcar_fast::maxsim_vsa_cuda", mutates_args=())
def maxsim_vsa_cuda_op(img: Tensor, cap: Tensor, lens: Tensor, img_lens: Tensor, pool: str, tau: float,
                       vsa_tau: float) -> Tensor:
    """CHAN's VSA coding (i2t), all pairs: (n_img, n_cap) float32."""
    return maxsim_forward(img, cap, lens, img_lens, _vsa_options(pool, tau, vsa_tau))


@torch.library.custom_op("rcar_fast::maxsim_vsa_cuda_backward", mutates_args=())
def maxsim_vsa_cuda_backward_op(grad: Tensor, img: Tensor, cap: Tensor, lens: Tensor, img_lens: Tensor,
                                pool: str, tau: float, vsa_tau: float) -> tuple[Tensor, Tensor]:
    return maxsim_vsa_backward(grad, img, cap, lens, img_lens, _vsa_options(pool, tau, vsa_tau))


@maxsim_vsa_cuda_op.register_fake
def _(img, cap, lens, img_lens, pool, tau, vsa_tau):
    return img.new_empty((img.shape[0], cap.shape[0]), dtype=torch.float32)


@maxsim_vsa_cuda_backward_op.register_fake
def _(grad, img, cap, lens, img_lens, pool, tau, vsa_tau):
    return torch.empty_like(img), torch.empty_like(cap)


def _vsa_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _vsa_backward_formula(ctx, grad):
    need_img, need_cap = ctx.needs_input_grad[:2]
    if not (need_img or need_cap):
        return (None,) * 7
    d_img, d_cap = maxsim_vsa_cuda_backward_op(grad.contiguous(), *ctx.saved_tensors, *ctx.options)
    return (d_img if need_img else None, d_cap if need_cap else None) + (None,) * 5


maxsim_vsa_cuda_op.register_autograd(_vsa_backward_formula, setup_context=_vsa_setup_context)


class MaxSimCuda(CudaTileBackend):
    op, kernel = "maxsim", "the CUDA maxsim kernels"
    codings = HEAD_CODINGS

    @classmethod
    def tile_reason(cls, inputs: Inputs, regions: int, longest: int) -> Optional[str]:
        # This op's tile shapes first; the launch check (maxsim_problem_error, the kernels'
        # own limits) judges the rest.
        reason = tile_shape_rejection(regions, longest)
        if reason is None:
            reason = native().maxsim_problem_error(shape_problem(inputs, longest))
            reason = reason and f"the CUDA maxsim kernels: {reason}"
        return reason

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction="t2i", pool="mean", tau=contract.CHAN_TAU,
           leaky=False, both_scale=0.5, coding="max", vsa_tau=contract.CHAN_TAU) -> torch.Tensor:
        """Inputs already validated by rcar_fast.max_similarity (normalised, lens and img_lens
        int64 on the device). Returns (n_img, n_cap) float32."""
        if coding == "vsa":
            return maxsim_vsa_cuda_op(img, cap, lens, img_lens, pool, float(tau), float(vsa_tau))
        options = dict(direction=direction, pool=pool, tau=float(tau), leaky=bool(leaky),
                       both_scale=float(both_scale))
        return maxsim_cuda_op(img, cap, lens, img_lens, *(options[n] for n in MAXSIM_OPTION_NAMES))


# ---------------------------------------------------------------------------------------------
# Pair lists on the all-pairs kernel
# ---------------------------------------------------------------------------------------------

# Pairs per block of pairs_through_all_pairs: a block's matrix holds at most this squared
# entries, so at most PAIRS_PER_BLOCK times the listed pairs are scored.
PAIRS_PER_BLOCK = 512


def pairs_through_all_pairs(all_pairs, img, cap, lens, img_lens, img_idx, cap_idx, kw,
                            pairs_per_block: int = PAIRS_PER_BLOCK) -> torch.Tensor:
    """The listed pairs (P,) scored by an all-pairs function: the pairs, sorted by (image,
    caption), go in blocks; each block's distinct images and captions are gathered and scored
    as one small all-pairs matrix, and its listed entries are picked out. The values are the
    all-pairs kernel's own (same tile, same epilogue); gradients flow through the gathers and
    the all-pairs op (distinct rows per block: no two updates of one row inside a block).

    There is no CUDA pair kernel: this serves the sparse loss (<= 3B pairs of a B x B batch,
    whose block matrix is at most B x B) and re-ranking; the work is at most pairs_per_block
    times the listed pairs."""
    n_pairs = img_idx.numel()
    out = torch.empty(n_pairs, dtype=torch.float32 if img.dtype != torch.float64 else torch.float64,
                      device=img.device)
    if n_pairs == 0:
        return out
    order = torch.argsort(img_idx * cap.shape[0] + cap_idx, stable=True)
    pieces = []
    for start in range(0, n_pairs, pairs_per_block):
        chosen = order[start:start + pairs_per_block]
        images, img_at = torch.unique(img_idx[chosen], return_inverse=True)
        captions, cap_at = torch.unique(cap_idx[chosen], return_inverse=True)
        block_lens = lens.index_select(0, captions)
        words = int(block_lens.max())
        block = all_pairs(img.index_select(0, images), cap.index_select(0, captions)[:, :words].contiguous(),
                          block_lens, img_lens.index_select(0, images), **kw)
        pieces.append((chosen, block[img_at, cap_at]))
    if not any(values.requires_grad for _, values in pieces):
        for chosen, values in pieces:
            out[chosen] = values.to(out.dtype)
        return out
    # Differentiable: put the blocks back in the list's order without in-place writes.
    chosen = torch.cat([c for c, _ in pieces])
    values = torch.cat([v for _, v in pieces]).to(out.dtype)
    return values.index_select(0, torch.argsort(chosen))


class MaxSimPairsCuda(MaxSimCuda):
    op, backend, kernel = "maxsim_pairs", "cuda", "the CUDA maxsim kernels (pair lists in blocks)"

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction="t2i", pool="mean",
           tau=contract.CHAN_TAU, leaky=False, both_scale=0.5, coding="max",
           vsa_tau=contract.CHAN_TAU) -> torch.Tensor:
        kw = dict(direction=direction, pool=pool, tau=tau, leaky=leaky, both_scale=both_scale)
        if coding != "max":
            kw.update(coding=coding, vsa_tau=vsa_tau)
        return pairs_through_all_pairs(MaxSimCuda.fn, img, cap, lens, img_lens, img_idx, cap_idx, kw)


# ---------------------------------------------------------------------------------------------
# The backends of the ops (rcar_fast.dispatch.TABLE takes them from here)
# ---------------------------------------------------------------------------------------------

BACKENDS = {
    "maxsim": (MaxSimReference, MaxSimReferenceLoop, MaxSimTriton, MaxSimCuda, MaxSimCpu),
    "maxsim_pairs": (MaxSimPairsReference, MaxSimPairsReferenceLoop, MaxSimPairsTriton,
                     MaxSimPairsCuda, MaxSimPairsCpu),
}


# ---------------------------------------------------------------------------------------------
# The public wrappers
# ---------------------------------------------------------------------------------------------

# The signature's defaults (what an argument that is not passed means, when no preset sets it).
DEFAULTS = dict(direction="t2i", pool="mean", tau=CHAN_TAU, leaky=False, normalize="none",
                both_scale=0.5, coding="max", vsa_tau=CHAN_TAU)
_BACKEND_KEYWORDS = ("direction", "pool", "tau", "leaky", "both_scale")

# maxsim(k=...) without doc_block scores about this many (query, document) pairs per block.
TOPK_BLOCK_PAIRS = 2**22


class _NotPassed:
    """A signature default that tells "not passed" from "passed the default value" (so that a
    preset can fill it, and a contradicting explicit value is an error). Prints as its value."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


def _passed(**arguments) -> dict:
    return {key: value for key, value in arguments.items() if not isinstance(value, _NotPassed)}


def _takes(op: str, backend: str, coding: str) -> bool:
    return coding in getattr(find(BACKENDS[op], backend), "codings", ("max",))


def _backend_for(op: str, backend: str, inputs: Inputs, coding: str):
    """The choice among BACKENDS[op], with the coding: only backends whose class lists it in
    `codings` (backend="auto": the first of AUTO_ORDER that lists it and takes the inputs)."""
    if coding == "max":
        return choose(op, BACKENDS[op], backend, inputs)
    if backend == "auto":
        backend = next((be for be in op_backend.AUTO_ORDER.get(inputs.device.type, ())
                        if _takes(op, be, coding) and not op_backend.not_in_auto(find(BACKENDS[op], be))
                        and not op_backend.reasons(op, BACKENDS[op], be, inputs)), "reference")
    if find(BACKENDS[op], backend) is not None and not _takes(op, backend, coding):
        takers = ", ".join(repr(cls.backend) for cls in BACKENDS[op] if _takes(op, cls.backend, coding))
        raise BackendUnavailable(f"backend {backend!r} cannot run {op} with coding={coding!r}: "
                                 f"CHAN's VSA coding runs on the backends {takers}")
    return choose(op, BACKENDS[op], backend, inputs)


def _backend_keywords(settings: dict) -> dict:
    kw = {key: settings[key] for key in _BACKEND_KEYWORDS}
    if settings["coding"] != "max":
        kw.update(coding=settings["coding"], vsa_tau=settings["vsa_tau"])
    return kw


def _prepared(img, cap, lens, img_lens, settings):
    img, cap = normalize_inputs(img, cap, lens, img_lens, settings["normalize"])
    return img.contiguous(), cap.contiguous()


_UNSET = {key: _NotPassed(value) for key, value in DEFAULTS.items()}


def max_similarity(img, cap, lens, *, direction=_UNSET["direction"], pool=_UNSET["pool"],
                   tau=_UNSET["tau"], leaky=_UNSET["leaky"], normalize=_UNSET["normalize"],
                   both_scale=_UNSET["both_scale"], img_lens=None, preset=None,
                   coding=_UNSET["coding"], vsa_tau=_UNSET["vsa_tau"], backend="auto") -> torch.Tensor:
    """An S-only head (HEADS.md) on every (image, caption) pair: (n_img, n_cap).

    img (n_img, R, d) with regions >= img_lens[i] ignored (img_lens (n_img,) in [1, R], default
    R), cap (n_cap, Lmax, d) with words >= lens[j] ignored (lens (n_cap,) in [1, Lmax]); padding
    may hold NaN. Pair (i, j) is scored from S[r, w] = v_r . e_w on its real block:
    direction "t2i" pools m_w = max_r S[r, w] over the words, "i2t" pools n_r = max_w S[r, w]
    over the regions, "both" is both_scale * (t2i + i2t); pool "mean" | "sum" | "max" |
    "lse" (log sum exp(x / tau), not times tau) | "softmax" (sum softmax(x / tau) x); leaky
    applies x if x > 0 else 0.1 x to the maxima; normalize "unit" divides every vector by
    max(|x|, 1e-12) first. Ties: the first argmax takes the whole gradient.
    preset "chan" | "laps" | "aladin" | "teran" | "colbert" | "dvsa" fills the settings of that
    model (contract.HEAD_PRESETS); an argument contradicting it is a ValueError.
    coding="vsa": CHAN's VSACoding (direction "i2t", temperature vsa_tau), on the backends that
    list it (reference, reference_loop, cpu, triton, cuda). Returns float32 (float64 for float64 inputs), differentiable w.r.t. img and cap.
    """
    settings = validate.head_settings(preset, _passed(
        direction=direction, pool=pool, tau=tau, leaky=leaky, normalize=normalize,
        both_scale=both_scale, coding=coding, vsa_tau=vsa_tau), DEFAULTS)
    validate.choice(backend, "backend", REQUESTABLE)
    lens, img_lens = validate.head_inputs(img, cap, lens, img_lens)
    impl = _backend_for("maxsim", backend, Inputs.of_scan(img, cap, settings["direction"], lens),
                        settings["coding"])
    img, cap = _prepared(img, cap, lens, img_lens, settings)
    return impl.fn(img, cap, lens, img_lens, **_backend_keywords(settings))


# ---------------------------------------------------------------------------------------------
# Late interaction (ColBERT MaxSim): caption = query, image = document, t2i + sum
# ---------------------------------------------------------------------------------------------

_COLBERT = validate.head_settings("colbert", {}, DEFAULTS)


def _pair_list(pairs, n_q: int, n_d: int, device) -> tuple:
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise TypeError("pairs must be a pair (q_idx, d_idx) of 1-D integer tensors of one length P, "
                        f"got {type(pairs).__name__}")
    return validate.named_pair_indices(pairs[0], pairs[1], n_q, n_d, device, ("q_idx", "d_idx"),
                                       ("n_q", "n_d"))


def _merge_top_k(best, block_values, start: int, k: int):
    """The k best of (best values, best indices) and a new block of documents [start, ...),
    ordered by value, ties by the lower document index: the running best holds only indices
    below `start`, in that order already, so a stable descending sort keeps every tie in
    index order."""
    n_q, width = block_values.shape
    block_idx = torch.arange(start, start + width, device=block_values.device).expand(n_q, width)
    values, indices = block_values, block_idx
    if best is not None:
        values, indices = torch.cat([best[0], values], dim=1), torch.cat([best[1], indices], dim=1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def _top_k(impl_all, pairs_backend, q, d, q_lens, d_lens, k: int, doc_block: int, kw: dict):
    """(values, indices) (n_q, k): documents scored block by block, never the whole matrix."""
    best = None
    with torch.no_grad():
        for start in range(0, d.shape[0], doc_block):
            stop = min(d.shape[0], start + doc_block)
            block_lens = d_lens[start:stop]
            docs = d[start:stop, :int(block_lens.max())].contiguous()
            block = impl_all.fn(docs, q, q_lens, block_lens, **kw).transpose(0, 1)
            best = _merge_top_k(best, block, start, k)
    values, indices = best
    if torch.is_grad_enabled() and (q.requires_grad or d.requires_grad):
        # Differentiable values: the chosen pairs again, through the pair op (k per query).
        q_idx = torch.arange(q.shape[0], device=q.device).repeat_interleave(k)
        impl_pairs = pairs_backend()
        values = impl_pairs.fn(d, q, q_lens, d_lens, indices.reshape(-1), q_idx, **kw).reshape(q.shape[0], k)
    return values, indices


def maxsim(q, d, q_lens=None, d_lens=None, *, pairs=None, k=None, doc_block=None,
           backend="auto"):
    """ColBERT late interaction: score(q_a, d_b) = sum over the real query tokens t of
    max over the real document tokens u of q_a[t] . d_b[u] (no normalisation: ColBERT's
    encoders normalise). q (n_q, Lq, dim), d (n_d, Ld, dim); q_lens (n_q,) / d_lens (n_d,)
    the real lengths (default: all tokens); padding may hold NaN.

    - default: all pairs -> (n_q, n_d);
    - pairs=(q_idx, d_idx): the listed pairs -> (P,) (re-ranking a shortlist);
    - k=int: the k best documents per query -> (values (n_q, k), indices (n_q, k) int64), in
      decreasing score, ties by the lower document index, scored over blocks of doc_block
      documents (default: about TOPK_BLOCK_PAIRS pairs per block) so that memory stays
      O(n_q x (k + doc_block)). Differentiable values are recomputed for the chosen pairs.
    Scores are float32 (float64 for float64 inputs), differentiable w.r.t. q and d.
    """
    validate.choice(backend, "backend", REQUESTABLE)
    if pairs is not None and k is not None:
        raise ValueError("pass pairs (score a shortlist) or k (top-k search), not both")
    if doc_block is not None and k is None:
        raise ValueError("doc_block applies to the top-k search: pass k as well, or drop doc_block")
    q_lens, d_lens = validate.head_inputs(d, q, q_lens, d_lens, validate.MAXSIM_ARGUMENTS)
    n_q, n_d = q.shape[0], d.shape[0]
    kw = _backend_keywords(_COLBERT)
    inputs = Inputs.of_scan(d, q, "t2i", q_lens)
    d, q = d.contiguous(), q.contiguous()
    if pairs is not None:
        q_idx, d_idx = _pair_list(pairs, n_q, n_d, q.device)
        return choose("maxsim_pairs", BACKENDS["maxsim_pairs"], backend, inputs).fn(d, q, q_lens, d_lens, d_idx, q_idx, **kw)
    impl = choose("maxsim", BACKENDS["maxsim"], backend, inputs)
    if k is None:
        return impl.fn(d, q, q_lens, d_lens, **kw).transpose(0, 1).contiguous()
    k = validate.positive_int(k, "k", n_d, "n_d")
    doc_block = (max(1, min(n_d, TOPK_BLOCK_PAIRS // n_q)) if doc_block is None
                 else validate.positive_int(doc_block, "doc_block"))
    return _top_k(impl, lambda: choose("maxsim_pairs", BACKENDS["maxsim_pairs"], backend, inputs), q, d, q_lens, d_lens, k, doc_block, kw)



# ---------------------------------------------------------------------------------------------
# The head registry's entry (rcar_fast.scorers): model="maxsim" or a preset name
# ---------------------------------------------------------------------------------------------

class MaxsimScorer(Scorer):
    """The S-only heads as a head of the registry: a keyword head (no weights) named "maxsim"
    (the keywords of max_similarity) or by a preset ("chan", "laps", ...: model="chan" is
    model="maxsim", preset="chan"), the ops "maxsim" and "maxsim_pairs". Every region of an
    image is real here (img_lens = R): the consumers pass (img, cap, lens)."""
    name, title = "maxsim", "MaxSim"
    all_pairs_op, pairs_op = "maxsim", "maxsim_pairs"
    backends = BACKENDS
    defaults = dict(DEFAULTS, preset=None)
    aliases = {preset: {"preset": preset} for preset in HEAD_PRESETS}

    @classmethod
    def settings(cls, model, kwargs, img, check: bool = True) -> dict:
        unknown = set(kwargs) - set(cls.defaults)
        if unknown:
            raise TypeError(f"unexpected {cls.title} keyword(s) {sorted(unknown)}; expected some "
                            f"of {sorted(cls.defaults)}")
        given = dict(kwargs)
        preset = given.pop("preset", None)
        named = cls.aliases.get(model, {}).get("preset")
        if named is not None and preset not in (None, named):
            raise ValueError(f"model={model!r} is preset={named!r}, but preset={preset!r} was passed")
        preset = preset or named
        settings = validate.head_settings(preset, given, DEFAULTS)
        return dict(settings, preset=preset)

    @classmethod
    def choose(cls, op, backend, inputs, model, settings):
        return _backend_for(op, backend, inputs, settings["coding"])

    @classmethod
    def inputs(cls, model, settings, img, cap, lens) -> Inputs:
        return Inputs.of_scan(img, cap, settings["direction"], lens)

    @staticmethod
    def _all_regions(img):
        return torch.full((img.shape[0],), img.shape[1], dtype=torch.int64, device=img.device)

    @classmethod
    def call_all_pairs(cls, impl, model, settings, img, cap, lens):
        img_lens = cls._all_regions(img)
        img, cap = _prepared(img, cap, lens, img_lens, settings)
        return impl.fn(img, cap, lens, img_lens, **_backend_keywords(settings))

    @classmethod
    def call_pairs(cls, impl, model, settings, img, cap, lens, img_idx, cap_idx):
        img_lens = cls._all_regions(img)
        img, cap = _prepared(img, cap, lens, img_lens, settings)
        return impl.fn(img, cap, lens, img_lens, img_idx, cap_idx, **_backend_keywords(settings))

    @staticmethod
    def _pair_flops(L: int, R: int, d: int, settings: dict) -> float:
        # The tile 2 R L d, then per direction a max over the tile (R L) and the pool (~4 per
        # pooled value: exp, add, scale, compare); "both" reads the one tile twice.
        directions = 2 if settings["direction"] == "both" else 1
        pooled = {"t2i": L, "i2t": R, "both": L + R}[settings["direction"]]
        return 2.0 * R * L * d + directions * R * L + 4.0 * pooled

    @classmethod
    def forward_flops(cls, model, settings, n_img, lens, regions, d) -> float:
        lens = [int(v) for v in lens]
        norms = 3.0 * d * (n_img * regions + sum(lens)) if settings["normalize"] == "unit" else 0.0
        return n_img * sum(cls._pair_flops(L, regions, d, settings) for L in lens) + norms

    @classmethod
    def pair_flops(cls, model, settings, pair_lens, regions, d) -> float:
        # Normalisation counted per pair (its R + L vectors, 3 d each).
        unit = 3.0 * d if settings["normalize"] == "unit" else 0.0
        return sum(cls._pair_flops(int(L), regions, d, settings) + unit * (regions + int(L))
                   for L in pair_lens)

    @classmethod
    def build(cls, name, embed_dim, options):
        """This head (no weights) with the options named like max_similarity's keywords."""
        settings = {k: v for k, v in options.items() if k in cls.defaults and v is not None}
        return name, settings

    @classmethod
    def vectorized_reference(cls, model, settings):
        kw = dict(_backend_keywords(settings), normalize=settings["normalize"])
        return lambda img, cap, lens: max_similarity_reference(img, cap, lens, **kw)

    @classmethod
    def label(cls, model, settings) -> str:
        name = settings["preset"].upper() if settings.get("preset") else cls.title
        return f"{name} {settings['direction']}"

    @classmethod
    def describe(cls, model, settings) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "preset")
        return f"{cls.label(model, settings)}({shown})"
