"""The generic machinery of the ops as torch.library custom ops: an op, its backward op,
their fakes (meta implementations, from one shape function per op) and the autograd formula
registered in one call (`define`), so torch.compile traces a call as one node (no graph break
at the pybind call, no data-dependent branch inside) and torch.library.opcheck can test each
one (tests/test_custom_ops.py); `vjp` for backward ops that recompute a reference under
autograd; `grouped_by_image` for pair lists scored through an all-pairs implementation.

Each op module defines its own ops on top of it (the schemas and the argument order are the
op's): rcar_fast/ops/scan.py define_scan_op (rcar_fast::scan_<backend>, scan_pairs_<backend>),
rcar_fast/ops/rcar.py define_rcar_op (rcar_fast::rcar_<backend>, rcar_pairs_<backend>),
rcar_fast/ops/maxsim.py define_maxsim_op (rcar_fast::maxsim_<backend>, maxsim_pairs_<backend>).
`define_given_values` adds an op's "given values" twin (its backward without its forward: the
sparse hardest-negative loss reuses its selection pass' scores, rcar_fast/losses.py).
A backend defines its forward and backward with plain arguments and calls its op module's
define_*_op; its backend class calls the op inside torch.compile (some call it in eager mode
too). The public wrappers validate eagerly: inside a compiled region the checks that read the
data (lens and pair indices in range, NaN/Inf) are skipped, the compiled step trusting inputs
its caller validated (tests/test_compile_training.py checks that eager calls still refuse).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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
    implementation returns them: define makes sure)."""
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

# The pair indices of a pair-list op, between its tensors and its options.
PAIR_INDICES_SCHEMA = "Tensor img_idx, Tensor cap_idx, "


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


def define(name: str, inputs_schema: str, fake: Callable, forward: Callable,
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
    op.register_autograd(_backward_formula(op_backward, differentiable, 0),
                         setup_context=lambda ctx, inputs, output: _save_inputs(ctx, inputs))
    return op


def _backward_formula(op_backward, differentiable: tuple, leading: int):
    """The autograd formula of an op whose saved inputs follow `leading` arguments that get no
    gradient: op_backward(grad, *inputs) gives the gradients at the positions `differentiable`
    of the inputs."""
    def backward_formula(ctx, grad):
        inputs = _saved_inputs(ctx)
        wanted = [ctx.needs_input_grad[leading + i] for i in differentiable]
        grads = [None] * len(inputs)
        if any(wanted):
            for i, want, g in zip(differentiable, wanted, op_backward(grad.contiguous(), *inputs)):
                grads[i] = g if want else None
        return (None,) * leading + tuple(grads)

    return backward_formula


def define_given_values(name: str, inputs_schema: str, differentiable: tuple):
    """rcar_fast::{name}_given(values, inputs) -> Tensor, for an op `name` made by `define`
    with a backward: returns a copy of `values`, which the caller vouches are rcar_fast::{name}'s
    output at these inputs (e.g. the entries of a no-grad all-pairs pass over the same inputs),
    with {name}'s autograd. Its backward is rcar_fast::{name}_backward on the inputs alone, the
    same call and the same gradients as after {name}'s own forward (every backward op of this
    module recomputes from the inputs): the forward is not run twice. Only sound when the op's
    output is a function of its inputs, i.e. no dropout draws a sample in the forward."""
    op_backward = getattr(torch.ops.rcar_fast, f"{name}_backward").default
    def given(values, *inputs):
        return values.clone(memory_format=torch.contiguous_format)  # an op's output aliases no input

    op = torch.library.custom_op(f"rcar_fast::{name}_given", given, mutates_args=(),
                                 schema=f"(Tensor values, {inputs_schema}) -> Tensor")
    op.register_fake(lambda values, *inputs: torch.empty_like(values, memory_format=torch.contiguous_format))
    op.register_autograd(_backward_formula(op_backward, differentiable, 1),
                         setup_context=lambda ctx, inputs, output: _save_inputs(ctx, inputs[1:]))
    return op


# ---------------------------------------------------------------------------------------------
# Pair lists: a reference pair driver on listed pairs; an all-pairs backend, one call per image
# ---------------------------------------------------------------------------------------------

def listed_pairs(driver: Callable, img, cap, lens, img_idx, cap_idx, direction, pair_fn):
    """The listed pairs' scores (P,) by a reference pair driver (reference_math.pairs_vectorized
    or pairs_loop) with the head's pair function."""
    scores = driver(img, cap, lens, direction, pair_fn, img_idx, cap_idx)
    return scores.to(output_dtype(img.dtype))




def _image_groups(img_idx, cap_idx, n_cap: int):
    """The distinct pairs grouped by image: [(image, its distinct captions)], and `inverse`
    mapping each requested pair to its row in the concatenation of the groups."""
    # Sorted keys group the pairs by image; `inverse` restores the requested order and repeats.
    keys, inverse = torch.unique(img_idx * n_cap + cap_idx, return_inverse=True)
    images, counts = torch.unique_consecutive(keys // n_cap, return_counts=True)
    return list(zip(images.tolist(), (keys % n_cap).split(counts.tolist()))), inverse


class _GroupedByImage(torch.autograd.Function):
    """Pair scores through an all-pairs implementation, one call per distinct image against
    its distinct captions: exactly the distinct requested pairs are computed, forward and
    backward by the backend itself. `params`: the tensors all_pairs also reads (an RCAR
    head's weights), whose gradients are the sum over the groups.

    Why a Function: differentiating through per-group slices of img and cap directly would
    give every group a gradient the size of the whole batch (O(B^2 L d) zeros and adds); here
    each group's gradient is added into one buffer at its own rows."""

    @staticmethod
    def forward(ctx, img, cap, lens, img_idx, cap_idx, all_pairs, grad_enabled, *params):
        groups, inverse = _image_groups(img_idx, cap_idx, cap.shape[0])
        # Under no_grad (re-ranking) keep no per-group graphs: nothing will call backward.
        need_img, need_cap = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        ctx.wanted_params = [p for p, need in zip(params, ctx.needs_input_grad[_N_FIXED:])
                             if grad_enabled and need]
        pieces, graphs = [], []
        for i, chosen in groups:
            chosen_lens = lens[chosen]
            with torch.enable_grad():   # each group's graph, kept for the backward
                img_part = img[i:i + 1].detach().requires_grad_(need_img)
                cap_part = cap[chosen, :int(chosen_lens.max())].detach().requires_grad_(need_cap)
                scores = all_pairs(img_part, cap_part, chosen_lens).reshape(-1)
            pieces.append(scores.detach())
            graphs.append((scores, img_part, cap_part))
        ctx.groups, ctx.graphs = groups, graphs
        ctx.save_for_backward(inverse)
        ctx.layouts = [(t.shape, t.dtype) for t in (img, cap)]
        return torch.cat(pieces)[inverse]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        n_rows = sum(len(chosen) for _, chosen in ctx.groups)
        grad_rows = grad_out.new_zeros(n_rows).index_add_(0, inverse, grad_out)
        need_img, need_cap = ctx.needs_input_grad[:2]
        (img_shape, img_dtype), (cap_shape, cap_dtype) = ctx.layouts
        grad_img = grad_out.new_zeros(img_shape, dtype=img_dtype) if need_img else None
        grad_cap = grad_out.new_zeros(cap_shape, dtype=cap_dtype) if need_cap else None
        grad_params = [None] * len(ctx.wanted_params)
        start = 0
        for (i, chosen), (scores, img_part, cap_part) in zip(ctx.groups, ctx.graphs):
            g = grad_rows[start:start + len(chosen)].to(scores.dtype)
            start += len(chosen)
            wanted = [t for t, need in ((img_part, need_img), (cap_part, need_cap)) if need]
            grads = list(torch.autograd.grad(scores, wanted + ctx.wanted_params, g,
                                             allow_unused=bool(ctx.wanted_params)))
            if need_img:
                grad_img[i:i + 1] += grads.pop(0)
            if need_cap:  # captions within a group are distinct: no index is written twice
                grad_cap[chosen, :cap_part.shape[1]] += grads.pop(0)
            # Groups in a fixed order: the weight gradients' sum is deterministic.
            for k, grad in enumerate(grads):
                if grad is not None:
                    grad_params[k] = grad if grad_params[k] is None else grad_params[k] + grad
        ctx.graphs = None
        # A weight the scores do not depend on (only_rcr's sim_eval_w) keeps a None gradient.
        by_param = iter(grad_params)
        needs = ctx.needs_input_grad[_N_FIXED:]
        ctx.wanted_params = None
        return (grad_img, grad_cap, None, None, None, None, None,
                *(next(by_param) if need else None for need in needs))


# _GroupedByImage.forward's arguments before *params
_N_FIXED = 7


def grouped_by_image(all_pairs: Callable, img, cap, lens, img_idx, cap_idx, params=()):
    """The listed pairs' scores (P,) through all_pairs(img, cap, lens), one call per distinct
    image against its distinct captions (_GroupedByImage); params: the tensors all_pairs also
    reads (a head's weights), differentiated too."""
    if img_idx.numel() == 0:
        return img.new_zeros((0,), dtype=output_dtype(img.dtype))
    scores = _GroupedByImage.apply(img, cap, lens, img_idx, cap_idx, all_pairs,
                                   torch.is_grad_enabled(), *params)
    return scores.to(output_dtype(img.dtype))
