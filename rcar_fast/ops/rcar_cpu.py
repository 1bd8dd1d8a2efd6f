"""RCAR similarity head over all pairs, and over a pair list (rcar_pairs_cpu_op), on the C++ CPU
kernels (csrc/cpu/rcar.cpp): forward and fused backward, eval and training mode.

The backward recomputes the forward tile by tile (flash style: nothing of the forward is kept
between the two calls, per-pair intermediates exist only for one tile per thread) and returns
the gradients of img, cap and every head parameter; they are deterministic for a thread count.
In training mode RAR's dropout uses the counter-based masks of rcar_fast.dropout, drawn from a
seed that the op takes as an input, so the backward recomputes the forward's masks.

The kernels read the head's Linear weights in contract.RCAR_LINEARS order; the op takes them in
head.parameters() order (as every RCAR op does) and reorders them here.
"""
from __future__ import annotations

import functools

import torch

from rcar_fast import contract, dropout
from rcar_fast.ops import rcar_reference
from rcar_fast.ops.backend import Backend, native
from rcar_fast.ops.library import define_rcar_op
from rcar_fast.ops.scan_cpu import ScanCpu


def flat_weights(head) -> list:
    """The head's Linear weights and biases in the order csrc/cpu/kernels.h documents."""
    return [t.detach() for _, layer, _ in contract.rcar_linears(head) for t in (layer.weight, layer.bias)]


def native_settings(direction: str, regulator: str, steps: int, smooth: float, training: bool = False,
                    seed: int = 0):
    """The kernel's typed head configuration (csrc/cpu/kernels.h RcarSettings)."""
    return native().RcarSettings(direction=contract.DIRECTION_CODES[direction],
                                 regulator=contract.REGULATOR_CODES[regulator], steps=int(steps),
                                 smooth=float(smooth), training=bool(training), seed=int(seed))


@functools.lru_cache(maxsize=None)
def kernel_order(regulator, steps, direction, smooth, embed_dim, sim_dim) -> tuple:
    """For each tensor of the kernels' flat list, its index in head.parameters() order."""
    head, _ = rcar_reference._skeleton(regulator, steps, direction, smooth, embed_dim, sim_dim)
    position = {id(p): i for i, p in enumerate(head.parameters())}
    return tuple(position[id(t)] for _, layer, _ in contract.rcar_linears(head)
                 for t in (layer.weight, layer.bias))


def _kernel_args(weights, seed, config):
    regulator, steps, direction, smooth, embed_dim, sim_dim, training = config
    order = kernel_order(regulator, steps, direction, smooth, embed_dim, sim_dim)
    settings = native_settings(direction, regulator, steps, smooth, training, int(seed))
    return order, settings, [weights[i] for i in order]


def _op_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    _, settings, flat = _kernel_args(weights, seed, config)
    return native().rcar_forward_cpu(img, cap, lens, settings, flat)


def _parameter_order(d_flat, order, weights) -> list:
    """The kernels' weight gradients (their flat order) in head.parameters() order."""
    d_weights = [None] * len(weights)
    for g, i in zip(d_flat, order):
        d_weights[i] = g.to(weights[i].dtype)
    return d_weights


def _op_backward(grad, img, cap, lens, weights, seed, config):
    order, settings, flat = _kernel_args(weights, seed, config)
    d_img, d_cap, *d_flat = native().rcar_backward_cpu(grad.to(img.dtype), img, cap, lens, settings, flat)
    return d_img, d_cap, _parameter_order(d_flat, order, weights)


def _pairs_forward(img, cap, lens, img_idx, cap_idx, weights, seed, config) -> torch.Tensor:
    _, settings, flat = _kernel_args(weights, seed, config)
    return native().rcar_pairs_forward_cpu(img, cap, lens, img_idx, cap_idx, settings, flat)


def _pairs_backward(grad, img, cap, lens, img_idx, cap_idx, weights, seed, config):
    order, settings, flat = _kernel_args(weights, seed, config)
    d_img, d_cap, *d_flat = native().rcar_pairs_backward_cpu(grad.to(img.dtype), img, cap, lens, img_idx,
                                                             cap_idx, settings, flat)
    return d_img, d_cap, _parameter_order(d_flat, order, weights)


# rcar_fast::rcar_cpu, rcar_fast::rcar_pairs_cpu and their _backward
rcar_cpu_op = define_rcar_op("rcar_cpu", _op_forward, _op_backward)
rcar_pairs_cpu_op = define_rcar_op("rcar_pairs_cpu", _pairs_forward, _pairs_backward, pairs=True)


def call_kernel_op(op, head, img, cap, lens, *index):
    """`op` (rcar_cpu_op, or rcar_pairs_cpu_op with index = (img_idx, cap_idx)) on the head's
    weights; in training mode with a fresh dropout seed."""
    # The op's `training` argument says whether dropout acts: a training head whose
    # Dropout modules have p = 0 (rcar_fast.train's head_dropout=0) has none.
    dropout_on = _check_dropout(head)
    seed = (torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_on
            else torch.zeros((), dtype=torch.int64))
    config = (*rcar_reference.op_config(head)[:-1], dropout_on)
    return op(img, cap, lens, *index, list(head.parameters()), seed, *config)


class RcarCpu(Backend):
    """Forward and fused backward, dropout included (counter-based masks)."""
    op, backend, kernel = "rcar", "cpu", "the C++ CPU RCAR kernel"
    dtypes = ScanCpu.dtypes
    dtype_reason = ScanCpu.dtype_reason   # same devices and dtypes as the SCAN kernels
    has_backward = True
    implements_dropout = True

    @staticmethod
    def fn(head, img, cap, lens):
        return call_kernel_op(rcar_cpu_op, head, img, cap, lens)


def _check_dropout(head) -> bool:
    """Whether RAR's dropout acts in this call; refuses a rate the kernel does not implement."""
    active = head.active_dropout()
    for name, module in head.named_modules():
        if name in active and module.p != dropout.P:
            raise ValueError(f"{RcarCpu.kernel}: RAR dropout must have p = {dropout.P} (the official "
                             f"rate) or 0, got p = {module.p} for {name}; use backend='reference'")
    return bool(active)
