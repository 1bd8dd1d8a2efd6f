"""The ops as torch.library custom ops: one shape function per op gives every fake (meta)
implementation, and the autograd formula is registered with the op, so torch.compile traces a
call as one node (no graph break at the pybind call, no data-dependent branch inside) and
torch.library.opcheck can test each one (tests/test_custom_ops.py).

    rcar_fast::scan_<backend>(img, cap, lens, direction, raw_norm, smooth, agg, lse_lambda)
        -> (n_img, n_cap)                    backends reference, cpu, triton, cuda
    rcar_fast::scan_pairs_<backend>(img, cap, lens, img_idx, cap_idx, <the options>) -> (P,)
                                             backends reference, cpu
        each with its _backward(grad, <the inputs>) -> (d img, d cap)
    rcar_fast::rcar_<backend>(img, cap, lens, weights, seed, regulator, steps, direction,
        smooth, embed_dim, sim_dim, training) -> (n_img, n_cap)
                                             reference, triton; cuda forward only
    rcar_fast::rcar_pairs_reference(img, cap, lens, img_idx, cap_idx, weights, seed, ...) -> (P,)
        with _backward -> (d img, d cap, d weights) where not forward only
    rcar_fast::rcar_cpu(img, cap, lens, weights, direction, regulator, steps, smooth): forward only
        (rcar_cpu.py; the kernel's own flat weight order)
    rcar_fast::maxsim_<backend>(img, cap, lens, img_lens, direction, pool, tau, leaky, both_scale)
        -> (n_img, n_cap)     (the pair form adds img_idx, cap_idx -> (P,)), and its _backward

A backend module defines its forward and backward with plain arguments and calls
`define_scan_op` / `define_rcar_op`; its backend class calls the op inside torch.compile (some
call it in eager mode too). The public wrappers validate eagerly: inside a compiled region
the checks that read the data (lens and pair indices in range, NaN/Inf) are skipped, the
compiled step trusting inputs its caller validated (tests/test_compile_training.py checks that
eager calls still refuse).
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


def pairs_output(img: Tensor, img_idx: Tensor) -> Tensor:
    """An empty tensor shaped and typed like a pair-list result: (P,)."""
    return img.new_empty((img_idx.shape[0],), dtype=output_dtype(img.dtype))


def input_grads(*tensors: Tensor) -> tuple:
    """Empty gradients shaped and typed like the inputs they belong to (contiguous, as every
    implementation returns them: _define makes sure)."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors)


def _contiguous(result):
    """The implementation's outputs in the fakes' layout (contiguous), so that a compiled graph
    that trusts the fake strides reads them right."""
    if isinstance(result, Tensor):
        return result.contiguous()
    return type(result)(_contiguous(x) for x in result)


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd recording inside a custom op's implementation. The dispatcher runs an
    implementation below the autograd keys (they are excluded); the backward ops that
    recompute the reference math differentiate it there, so those keys are let back in for
    that block. (torch.func.vjp would do without private API, but its wrapped tensors break
    opcheck's schema and fake-tensor checks.)

    torch._C._ForceDispatchKeyGuard and the dispatch TLS getters are private API: checked on
    torch 2.13 (CI) and 2.11 (the GPU image) by the backward ops' opchecks and the compiled
    training steps; a torch that drops them fails those tests, not silently."""
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
# Registration: an op, its backward op, their fakes and the autograd formula
# ---------------------------------------------------------------------------------------------

SCAN_OPTIONS = "str direction, str raw_norm, float smooth, str agg, float lse_lambda"
SCAN_OPTION_NAMES = ("direction", "raw_norm", "smooth", "agg", "lse_lambda")
RCAR_CONFIG = ("str regulator, int steps, str direction, float smooth, int embed_dim, "
               "int sim_dim, bool training")
_PAIR_INDICES = "Tensor img_idx, Tensor cap_idx, "


def _save_inputs(ctx, inputs) -> None:
    """Keeps a call's inputs for the backward: tensors and tensor lists through
    save_for_backward, the other arguments (options) as they are."""
    tensors, layout = [], []
    for x in inputs:
        if isinstance(x, Tensor):
            layout.append(("tensor", None))
            tensors.append(x)
        elif isinstance(x, (list, tuple)) and all(isinstance(t, Tensor) for t in x):
            layout.append(("tensors", len(x)))
            tensors.extend(x)
        else:
            layout.append(("value", x))
    ctx.save_for_backward(*tensors)
    ctx.layout = layout


def _saved_inputs(ctx) -> list:
    saved, inputs = iter(ctx.saved_tensors), []
    for kind, value in ctx.layout:
        inputs.append(next(saved) if kind == "tensor" else
                      [next(saved) for _ in range(value)] if kind == "tensors" else value)
    return inputs


def _define(name: str, inputs_schema: str, fake: Callable, forward: Callable,
            backward: Optional[Callable], grad_schema: str, fake_grads: Callable,
            differentiable: tuple):
    """rcar_fast::{name}(inputs) -> Tensor and, when `backward` is given,
    rcar_fast::{name}_backward(grad, inputs) -> grad_schema with the autograd formula that
    calls it: its outputs are the gradients of the inputs at the positions `differentiable`.
    Without a backward the op is forward-only (no autograd registration)."""
    op = torch.library.custom_op(f"rcar_fast::{name}", lambda *args: _contiguous(forward(*args)),
                                 mutates_args=(), schema=f"({inputs_schema}) -> Tensor")
    op.register_fake(fake)
    if backward is None:
        return op
    op_backward = torch.library.custom_op(f"rcar_fast::{name}_backward",
                                          lambda *args: _contiguous(backward(*args)), mutates_args=(),
                                          schema=f"(Tensor grad, {inputs_schema}) -> {grad_schema}")
    op_backward.register_fake(lambda grad, *inputs: fake_grads(*inputs))

    def backward_formula(ctx, grad):
        inputs = _saved_inputs(ctx)
        wanted = [ctx.needs_input_grad[i] for i in differentiable]
        grads = [None] * len(inputs)
        if any(wanted):
            for i, want, g in zip(differentiable, wanted, op_backward(grad.contiguous(), *inputs)):
                grads[i] = g if want else None
        return tuple(grads)

    op.register_autograd(backward_formula, setup_context=lambda ctx, inputs, output: _save_inputs(ctx, inputs))
    return op


# ---------------------------------------------------------------------------------------------
# SCAN: all pairs, or a pair list
# ---------------------------------------------------------------------------------------------

ScanForward = Callable[..., Tensor]      # (img, cap, lens, [img_idx, cap_idx,] options) -> scores
ScanBackward = Callable[..., tuple]      # (grad, img, cap, lens, [img_idx, cap_idx,] options) -> (d img, d cap)


def define_scan_op(name: str, forward: ScanForward, backward: Optional[ScanBackward] = None,
                   pairs: bool = False):
    """Registers rcar_fast::{name} (and rcar_fast::{name}_backward when a backward is given)
    and returns the forward op. options = the 5-tuple (direction, raw_norm, smooth, agg,
    lse_lambda). All pairs: op(img, cap, lens, *options) -> (n_img, n_cap); pairs=True:
    op(img, cap, lens, img_idx, cap_idx, *options) -> (P,)."""
    n_index = 2 if pairs else 0

    def run_forward(img, cap, lens, *rest):
        return forward(img, cap, lens, *rest[:n_index], tuple(rest[n_index:]))

    def run_backward(grad, img, cap, lens, *rest):
        return tuple(backward(grad, img, cap, lens, *rest[:n_index], tuple(rest[n_index:])))

    def fake(img, cap, lens, *rest):
        return pairs_output(img, rest[0]) if pairs else scan_output(img, cap)

    schema = f"Tensor img, Tensor cap, Tensor lens, {_PAIR_INDICES if pairs else ''}{SCAN_OPTIONS}"
    return _define(name, schema, fake, run_forward, backward and run_backward, "(Tensor, Tensor)",
                   lambda img, cap, *rest: input_grads(img, cap), (0, 1))


# ---------------------------------------------------------------------------------------------
# RCAR: the head's weights as op inputs
# ---------------------------------------------------------------------------------------------

def define_rcar_op(name: str, forward: Callable, backward: Optional[Callable] = None,
                   pairs: bool = False):
    """Registers rcar_fast::{name} (and its _backward when a backward is given). The op takes
    (img, cap, lens, [img_idx, cap_idx,] weights, seed, *config) with weights the head's
    parameters in head.parameters() order, seed an int64 0-d tensor (the dropout masks'),
    config (regulator, steps, direction, smooth, embed_dim, sim_dim, training);
    `forward(img, cap, lens, [img_idx, cap_idx,] weights, seed, config)` and
    `backward(grad, <the same>) -> (d img, d cap, d weights)`."""
    n_index = 2 if pairs else 0

    def split(rest):
        index, (weights, seed, *config) = rest[:n_index], rest[n_index:]
        return (*index, weights, seed, tuple(config))

    def run_forward(img, cap, lens, *rest):
        return forward(img, cap, lens, *split(rest))

    def run_backward(grad, img, cap, lens, *rest):
        d_img, d_cap, d_weights = backward(grad, img, cap, lens, *split(rest))
        return d_img, d_cap, list(d_weights)

    def fake(img, cap, lens, *rest):
        return pairs_output(img, rest[0]) if pairs else scan_output(img, cap)

    def fake_grads(img, cap, lens, *rest):
        d_img, d_cap = input_grads(img, cap)
        return d_img, d_cap, list(input_grads(*rest[n_index]))

    schema = (f"Tensor img, Tensor cap, Tensor lens, {_PAIR_INDICES if pairs else ''}"
              f"Tensor[] weights, Tensor seed, {RCAR_CONFIG}")
    return _define(name, schema, fake, run_forward, backward and run_backward,
                   "(Tensor, Tensor, Tensor[])", fake_grads, (0, 1, 3 + n_index))


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
