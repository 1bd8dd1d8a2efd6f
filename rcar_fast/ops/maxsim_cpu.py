"""The S-only heads (HEADS.md) on the C++ CPU kernels (csrc/cpu/maxsim.cpp), forward and
backward, all pairs (op "maxsim") and listed pairs (op "maxsim_pairs"), with CHAN's VSA coding.

All pairs: per tile of (caption block x image block) one GEMM gives every word-region score of
the tile (the real words x the real regions, read in place or packed per tile: padding never
enters), and the per-pair epilogue takes the maxima (t2i per word over the regions, i2t per
region over the words) or the VSA codes and pools them, vectorised, with OpenMP over tiles;
memory O(threads x tile) beyond the inputs and the result. The backward recomputes the tile:
for the max coding the first argmax of every max, scattering the pooled gradient along those
links (no dense score gradient, no further GEMM); for VSA the closed form of HEADS.md (two
GEMMs per tile); deterministically: the same bits on every run. Pair list: one small GEMM per
pair; its backward accumulates each caption's and each image's rows in one task, in pair order.

float32 and float64 CPU tensors. coding="vsa" is not an option of the maxsim custom ops
(library.MAXSIM_OPTION_NAMES): it runs through a torch.autograd.Function here (under
torch.compile a graph break, as the reference's VSA).
"""
from __future__ import annotations

import torch

from rcar_fast import contract
from rcar_fast.contract import CHAN_TAU, HEAD_CODINGS
from rcar_fast.ops.backend import CpuKernelBackend, native
from rcar_fast.ops.library import define_maxsim_op


def native_settings(direction, pool, tau, leaky, both_scale, coding="max", vsa_tau=CHAN_TAU):
    """The kernels' typed options (csrc/cpu/kernels.h MaxSimSettings) from the names."""
    return native().MaxSimSettings(
        direction=contract.HEAD_DIRECTION_CODES[direction], pool=contract.POOL_CODES[pool],
        tau=float(tau), leaky=bool(leaky), both_scale=float(both_scale), vsa=coding == "vsa",
        vsa_tau=float(vsa_tau))


def _forward(img, cap, lens, img_lens, options):
    return native().maxsim_forward_cpu(img, cap, lens, img_lens, native_settings(*options))


def _backward(grad, img, cap, lens, img_lens, options):
    return tuple(native().maxsim_backward_cpu(grad, img, cap, lens, img_lens, native_settings(*options)))


def _pairs_forward(img, cap, lens, img_lens, img_idx, cap_idx, options):
    return native().maxsim_pairs_forward_cpu(img, cap, lens, img_lens, img_idx, cap_idx,
                                             native_settings(*options))


def _pairs_backward(grad, img, cap, lens, img_lens, img_idx, cap_idx, options):
    return tuple(native().maxsim_pairs_backward_cpu(grad, img, cap, lens, img_lens, img_idx, cap_idx,
                                                    native_settings(*options)))


# rcar_fast::maxsim_cpu(_backward) and rcar_fast::maxsim_pairs_cpu(_backward)
maxsim_cpu_op = define_maxsim_op("maxsim_cpu", _forward, _backward)
maxsim_pairs_cpu_op = define_maxsim_op("maxsim_pairs_cpu", _pairs_forward, _pairs_backward, pairs=True)


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


def _vsa(img, cap, lens, img_lens, pairs, **kw):
    return _VsaCpu.apply(img, cap, lens, img_lens, pairs, native_settings(**kw))


class MaxSimCpu(CpuKernelBackend):
    op = "maxsim"
    codings = HEAD_CODINGS

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale, coding="max",
           vsa_tau=CHAN_TAU):
        if coding != "max":
            return _vsa(img, cap, lens, img_lens, (), direction=direction, pool=pool, tau=tau,
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
            return _vsa(img, cap, lens, img_lens, (img_idx, cap_idx), direction=direction, pool=pool,
                        tau=tau, leaky=leaky, both_scale=both_scale, coding=coding, vsa_tau=vsa_tau)
        return maxsim_pairs_cpu_op(img, cap, lens, img_lens, img_idx, cap_idx, direction, pool,
                                   float(tau), bool(leaky), float(both_scale))
