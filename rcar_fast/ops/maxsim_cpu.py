"""The S-only heads (HEADS.md) on the C++ CPU kernels (csrc/cpu/maxsim.cpp), forward and
backward, all pairs (op "maxsim") and listed pairs (op "maxsim_pairs").

All pairs: per tile of (caption block x image block) one GEMM gives every word-region score of
the tile (packed real words x packed real regions: padding never enters), and the per-pair
epilogue takes the maxima (t2i per word over the regions, i2t per region over the words) and
pools them, vectorised, with OpenMP over tiles; memory O(threads x tile). The backward
recomputes the tile and the first argmax of every max and scatters the pooled gradient along
those links (no dense score gradient, no further GEMM), deterministically: the same bits on
every run. Pair list: one small GEMM per pair; its backward accumulates each caption's and each
image's rows in one task, in pair order.

float32 and float64 CPU tensors; CHAN's VSA coding is on the reference backends only.
"""
from __future__ import annotations

from rcar_fast import contract
from rcar_fast.ops.backend import CpuKernelBackend, native
from rcar_fast.ops.library import define_maxsim_op


def native_settings(direction, pool, tau, leaky, both_scale):
    """The kernels' typed options (csrc/cpu/kernels.h MaxSimSettings) from the names."""
    return native().MaxSimSettings(
        direction=contract.HEAD_DIRECTION_CODES[direction], pool=contract.POOL_CODES[pool],
        tau=float(tau), leaky=bool(leaky), both_scale=float(both_scale))


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


class MaxSimCpu(CpuKernelBackend):
    op = "maxsim"

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale):
        return maxsim_cpu_op(img, cap, lens, img_lens, direction, pool, float(tau), bool(leaky),
                             float(both_scale))


class MaxSimPairsCpu(CpuKernelBackend):
    op = "maxsim_pairs"

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction, pool, tau, leaky, both_scale):
        return maxsim_pairs_cpu_op(img, cap, lens, img_lens, img_idx, cap_idx, direction, pool,
                                   float(tau), bool(leaky), float(both_scale))
