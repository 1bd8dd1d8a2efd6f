"""The ops as torch.library custom ops: one shape function per op gives every fake (meta)
implementation, and the autograd formula is registered with the op, so torch.compile traces a
call as one node (no graph break at the pybind call, no data-dependent branch inside) and
torch.library.opcheck can test each one.

    rcar_fast::scan_<backend>(img, cap, lens, direction, raw_norm, smooth, agg, lse_lambda)
        -> (n_img, n_cap)                            and its _backward -> (d img, d cap)
    rcar_fast::rcar_reference(img, cap, lens, weights, seed, regulator, steps, direction,
        smooth, embed_dim, sim_dim, training) -> (n_img, n_cap)
                                                    and its _backward -> (d img, d cap, d weights)
    rcar_fast::maxsim_<backend>(img, cap, lens, img_lens, direction, pool, tau, leaky, both_scale)
        -> (n_img, n_cap)     (the pair form adds img_idx, cap_idx -> (P,)), and its _backward

A backend module defines its forward and backward with plain arguments and calls
`define_scan_op`; the public wrappers validate eagerly (outside any compiled region they
check lens and finiteness) and pass already-validated tensors here.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from rcar_fast.ops.backend import output_dtype


# ---------------------------------------------------------------------------------------------
# The shape functions (one per op)
# ---------------------------------------------------------------------------------------------

def scan_output(img: Tensor, cap: Tensor) -> Tensor:
    """An empty tensor shaped and typed like an all-pairs result: (n_img, n_cap), float32
    (float64 for float64 inputs), on img's device."""
    return img.new_empty((img.shape[0], cap.shape[0]), dtype=output_dtype(img.dtype))


def input_grads(*tensors: Tensor) -> tuple:
    """Empty gradients shaped and typed like the inputs they belong to."""
    return tuple(torch.empty_like(t) for t in tensors)


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd recording inside a custom op's implementation. The dispatcher runs an
    implementation below the autograd keys (they are excluded); the reference backends'
    backward ops differentiate the reference math there, so those keys are let back in for
    that block. (torch.func.vjp would do without private API, but its wrapped tensors break
    opcheck's schema and fake-tensor checks.)"""
    keys = torch._C.DispatchKey
    autograd = torch._C.DispatchKeySet(keys.ADInplaceOrView)
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "AutogradCPU",
                 "AutogradCUDA", "AutogradMeta"):
        if hasattr(keys, name):
            autograd = autograd | torch._C.DispatchKeySet(getattr(keys, name))
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - autograd), torch.enable_grad():
        yield


def vjp(fn: Callable, inputs: list, grad: Tensor) -> list:
    """Gradients of fn(*inputs) for the cotangent grad, w.r.t. every input (zeros for an
    input the result does not depend on), computed with autograd inside a custom op."""
    with autograd_inside_op():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


# ---------------------------------------------------------------------------------------------
# SCAN: forward and backward as a pair of custom ops
# ---------------------------------------------------------------------------------------------

ScanForward = Callable[..., Tensor]      # (img, cap, lens, options) -> sims
ScanBackward = Callable[..., tuple]      # (grad, img, cap, lens, options) -> (d img, d cap)


def define_scan_op(name: str, forward: ScanForward, backward: ScanBackward):
    """Registers rcar_fast::{name} and rcar_fast::{name}_backward (options = the 5-tuple
    direction, raw_norm, smooth, agg, lse_lambda) and returns the forward op."""

    @torch.library.custom_op(f"rcar_fast::{name}", mutates_args=())
    def op(img: Tensor, cap: Tensor, lens: Tensor, direction: str, raw_norm: str, smooth: float,
           agg: str, lse_lambda: float) -> Tensor:
        return forward(img, cap, lens, (direction, raw_norm, smooth, agg, lse_lambda))

    @torch.library.custom_op(f"rcar_fast::{name}_backward", mutates_args=())
    def op_backward(grad: Tensor, img: Tensor, cap: Tensor, lens: Tensor, direction: str,
                    raw_norm: str, smooth: float, agg: str, lse_lambda: float) -> tuple[Tensor, Tensor]:
        return backward(grad, img, cap, lens, (direction, raw_norm, smooth, agg, lse_lambda))

    @op.register_fake
    def _(img, cap, lens, direction, raw_norm, smooth, agg, lse_lambda):
        return scan_output(img, cap)

    @op_backward.register_fake
    def _(grad, img, cap, lens, direction, raw_norm, smooth, agg, lse_lambda):
        return input_grads(img, cap)

    def setup_context(ctx, inputs, output):
        img, cap, lens, *options = inputs
        ctx.save_for_backward(img, cap, lens)
        ctx.options = options

    def backward_formula(ctx, grad):
        img, cap, lens = ctx.saved_tensors
        need_img, need_cap = ctx.needs_input_grad[:2]
        if not (need_img or need_cap):
            return (None,) * 8
        d_img, d_cap = op_backward(grad.contiguous(), img, cap, lens, *ctx.options)
        return (d_img if need_img else None, d_cap if need_cap else None) + (None,) * 6

    op.register_autograd(backward_formula, setup_context=setup_context)
    return op


# ---------------------------------------------------------------------------------------------
# RCAR on the reference math, the head's weights as op inputs
# ---------------------------------------------------------------------------------------------

def define_rcar_op(name: str, forward: Callable, backward: Callable):
    """Registers rcar_fast::{name} and its _backward; `forward(img, cap, lens, weights, seed,
    config)` and `backward(grad, img, cap, lens, weights, seed, config)` with config the
    tuple (regulator, steps, direction, smooth, embed_dim, sim_dim, training)."""

    @torch.library.custom_op(f"rcar_fast::{name}", mutates_args=())
    def op(img: Tensor, cap: Tensor, lens: Tensor, weights: list[Tensor], seed: Tensor,
           regulator: str, steps: int, direction: str, smooth: float, embed_dim: int,
           sim_dim: int, training: bool) -> Tensor:
        return forward(img, cap, lens, weights, seed,
                       (regulator, steps, direction, smooth, embed_dim, sim_dim, training))

    @torch.library.custom_op(f"rcar_fast::{name}_backward", mutates_args=())
    def op_backward(grad: Tensor, img: Tensor, cap: Tensor, lens: Tensor, weights: list[Tensor],
                    seed: Tensor, regulator: str, steps: int, direction: str, smooth: float,
                    embed_dim: int, sim_dim: int, training: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
        return backward(grad, img, cap, lens, weights, seed,
                        (regulator, steps, direction, smooth, embed_dim, sim_dim, training))

    @op.register_fake
    def _(img, cap, lens, weights, seed, *config):
        return scan_output(img, cap)

    @op_backward.register_fake
    def _(grad, img, cap, lens, weights, seed, *config):
        d_img, d_cap = input_grads(img, cap)
        return d_img, d_cap, list(input_grads(*weights))

    def setup_context(ctx, inputs, output):
        img, cap, lens, weights, seed, *config = inputs
        ctx.save_for_backward(img, cap, lens, seed, *weights)
        ctx.config = config

    def backward_formula(ctx, grad):
        img, cap, lens, seed, *weights = ctx.saved_tensors
        d_img, d_cap, d_weights = op_backward(grad.contiguous(), img, cap, lens, weights, seed,
                                              *ctx.config)
        need_img, need_cap, _, need_weights = ctx.needs_input_grad[:4]
        return ((d_img if need_img else None, d_cap if need_cap else None, None,
                 d_weights if need_weights else None, None) + (None,) * 7)

    op.register_autograd(backward_formula, setup_context=setup_context)
    return op


# ---------------------------------------------------------------------------------------------
# The S-only heads (max_similarity): all pairs and listed pairs, forward and backward
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
