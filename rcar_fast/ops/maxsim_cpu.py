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

import torch

from rcar_fast import contract
from rcar_fast.ops.backend import Backend, native
from rcar_fast.ops.library import define_maxsim_op

_DTYPES = (torch.float32, torch.float64)


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


def _dtype_reason(device_type, dtype):
    if device_type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, got {device_type} tensors"
    if dtype not in _DTYPES:
        return (f"the C++ CPU kernels compute in float32 or float64, got {dtype} "
                "(cast the inputs, or use backend='reference')")
    return None


class MaxSimCpu(Backend):
    op, backend, kernel = "maxsim", "cpu", "the C++ CPU kernels"
    dtypes = {"cpu": _DTYPES}

    @classmethod
    def dtype_reason(cls, device_type, dtype):
        return _dtype_reason(device_type, dtype)

    @staticmethod
    def fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale):
        return maxsim_cpu_op(img, cap, lens, img_lens, direction, pool, float(tau), bool(leaky),
                             float(both_scale))


class MaxSimPairsCpu(Backend):
    op, backend, kernel = "maxsim_pairs", "cpu", "the C++ CPU kernels"
    dtypes = {"cpu": _DTYPES}

    @classmethod
    def dtype_reason(cls, device_type, dtype):
        return _dtype_reason(device_type, dtype)

    @staticmethod
    def fn(img, cap, lens, img_lens, img_idx, cap_idx, *, direction, pool, tau, leaky, both_scale):
        return maxsim_pairs_cpu_op(img, cap, lens, img_lens, img_idx, cap_idx, direction, pool,
                                   float(tau), bool(leaky), float(both_scale))
