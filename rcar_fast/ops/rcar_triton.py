"""RCAR similarity head on the Triton backend: weight packing, autograd, registration.

Forward: one fused Triton kernel for the whole head over all pairs (kernels/rcar.py); nothing
of size (pairs, Q, d) or (pairs, Q, s) is written.

Backward (what is and is not fused): the gradient w.r.t. img, cap and every head parameter is
computed by RECOMPUTATION, not from stored activations: the forward saves only its inputs, and
the backward re-runs the head on bounded blocks of (image, caption) pairs with the vectorised
reference math (RCARHead.forward_vectorized) under torch autograd, then discards each block's
graph. Memory is bounded by BACKWARD_BLOCK_BYTES; the backward itself is NOT a fused kernel (it
costs about one reference forward + backward).

Training mode: RAR's dropout (p = 0.4) is not implemented by the fused kernel, so a head with
RAR modules in training mode is refused before any compute (call .eval(), or use
backend="reference" to train with dropout). only_rcr has no dropout and runs in either mode.
"""
from __future__ import annotations

import math

import torch

from rcar_fast import contract
from rcar_fast.ops import rcar_reference
from rcar_fast.ops.backend import Backend
from rcar_fast.ops.library import define_rcar_op, vjp

# Bytes of saved (pairs, Q, d)-sized activations one backward block may hold.
BACKWARD_BLOCK_BYTES = 1 << 30
# Rough count of (pairs, Q, d) activations autograd keeps per alignment step of the reference.
_SAVED_PER_STEP = 12


class RcarTriton(Backend):
    op, backend, kernel = "rcar", "triton", "the Triton RCAR kernel"
    dtypes = {"cuda": (torch.float32, torch.float16, torch.bfloat16),
              "cpu": (torch.float32, torch.float16)}
    implements_dropout = False

    @classmethod
    def dtype_reason(cls, device_type, dtype):
        if dtype == torch.float64:
            return ("the Triton RCAR kernel computes in float32 (bf16/fp16 GEMM operands on GPU); "
                    "use backend='reference' for float64")
        if device_type == "cpu" and dtype == torch.bfloat16:
            return ("the Triton CPU interpreter computes bfloat16 tl.dot wrongly; use float32 or "
                    "float16 on CPU, or a GPU")
        return super().dtype_reason(device_type, dtype)

    @staticmethod
    def fn(head, img, cap, lens):
        if torch.compiler.is_compiling():
            return rcar_reference.compiled_call(rcar_triton_op, head, img, cap, lens)
        return rcar_triton(head, img, cap, lens)


# ---------------------------------------------------------------------------------------------
# Weight packing (kernels/rcar.py WEIGHT_LAYOUT): transposed, zero-padded, stacked per step
# ---------------------------------------------------------------------------------------------

def _stack(tensors, shape, dtype, device):
    """Zero (max(1, n), *shape) tensor with tensors[i] in the leading corner of slot i."""
    out = torch.zeros((max(1, len(tensors)),) + tuple(shape), dtype=dtype, device=device)
    for i, t in enumerate(tensors):
        out[(i,) + tuple(slice(0, n) for n in t.shape)] = t
    return out


@torch.no_grad()
def pack_weights(head, op_dtype: torch.dtype, interpreter: bool) -> dict:
    from rcar_fast.kernels import rcar as kernels

    dims = kernels.padded_dims(head.embed_dim, head.sim_dim, interpreter)
    DP, SP, HP, HSP = dims["DP"], dims["SP"], dims["HP"], dims["HSP"]
    dev = head.sim_eval_w.weight.device
    f32 = torch.float32
    linears = {}  # short name -> the Linears of that role, in module order (the contract's walk)
    for short, lin, _ in contract.rcar_linears(head):
        linears.setdefault(short, []).append(lin)

    def op(short, shape):  # operand-dtype weights, (in, out)
        return _stack([lin.weight.t() for lin in linears.get(short, [])], shape, op_dtype, dev)

    def fp(short, shape, part="bias"):  # float32 biases, or the weight row of a one-output Linear
        rows = [lin.bias if part == "bias" else lin.weight[0] for lin in linears.get(short, [])]
        rows = [r[0] for r in rows] if shape == () else rows
        return _stack(rows, shape, f32, dev)

    return {
        "wa": op("wa", (DP, SP)), "ba": fp("wa", (SP,)),
        "w1": op("w1", (SP, HP)), "b1": fp("w1", (HP,)),
        "w2": op("w2", (HP, DP)), "b2": fp("w2", (DP,)),
        "ws1": op("ws1", (SP, HSP)), "bs1": fp("ws1", (HSP,)),
        "ws2": fp("ws2", (HSP,), "weight"), "bs2": fp("ws2", ()),
        "wq": op("wq", (SP, SP)), "bq": fp("wq", (SP,)),
        "wk": op("wk", (SP, SP)), "bk": fp("wk", (SP,)),
        "wv": fp("wv", (SP,), "weight"), "bv": fp("wv", ()),
        "we": fp("we", (SP,), "weight")[0],
        "be": head.sim_eval_w.bias.detach().to(f32).reshape(1).clone(),
    }


# ---------------------------------------------------------------------------------------------
# Forward and the recomputing backward
# ---------------------------------------------------------------------------------------------

def _fused_forward(head, img, cap, lens_list) -> torch.Tensor:
    from rcar_fast.kernels import rcar as kernels

    interpreter = img.device.type == "cpu"
    op_dtype = torch.float32 if img.dtype == torch.float32 else img.dtype
    weights = pack_weights(head, op_dtype, interpreter)
    return kernels.rcar_forward(img.detach().contiguous(), cap.detach().contiguous(), lens_list,
                                weights, regulator=head.regulator, steps=head.steps,
                                direction=head.direction, smooth=head.smooth)


def backward_blocks(n_img: int, n_cap: int, longest: int, d: int, element_size: int,
                    steps: int, budget: int = None):
    """(image block, caption block) sizes whose recomputed graph stays within the budget."""
    budget = BACKWARD_BLOCK_BYTES if budget is None else budget
    per_pair = max(1, longest * d * element_size * _SAVED_PER_STEP * (steps + 1))
    max_pairs = max(1, budget // per_pair)
    cap_block = min(n_cap, max(1, math.isqrt(max_pairs)))
    img_block = min(n_img, max(1, max_pairs // cap_block))
    return img_block, cap_block


class _FusedRCAR(torch.autograd.Function):
    """Inputs: head (module), lens (int64), lens_list, img, cap, *params (head.parameters())."""

    @staticmethod
    def forward(ctx, head, lens, lens_list, img, cap, *params):
        ctx.head, ctx.lens_list = head, lens_list
        ctx.save_for_backward(img, cap, lens)
        return _fused_forward(head, img, cap, lens_list)

    @staticmethod
    def backward(ctx, grad_out):
        img, cap, lens = ctx.saved_tensors
        head = ctx.head
        params = list(head.parameters())
        want_img, want_cap = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        want_params = [i for i, p in enumerate(params) if ctx.needs_input_grad[5 + i]]
        compute_dtype = params[0].dtype
        grad_img = torch.zeros_like(img) if want_img else None
        grad_cap = torch.zeros_like(cap) if want_cap else None
        # Filled lazily: a parameter the output does not depend on (e.g. sim_eval_w in
        # only_rcr) keeps a None gradient, as with the reference.
        grad_params = [None] * len(params)
        n_img, n_regions, d = img.shape
        n_cap = cap.shape[0]
        longest = max(n_regions, max(ctx.lens_list))
        size = torch.empty((), dtype=compute_dtype).element_size()
        img_block, cap_block = backward_blocks(n_img, n_cap, longest, d, size, head.steps)
        for i0 in range(0, n_img, img_block):
            for j0 in range(0, n_cap, cap_block):
                _accumulate_block_grads(head, img, cap, lens, grad_out, i0, i0 + img_block,
                                        j0, j0 + cap_block, compute_dtype, params, want_params,
                                        grad_img, grad_cap, grad_params)
        return (None, None, None, grad_img, grad_cap, *grad_params)


def _accumulate_block_grads(head, img, cap, lens, grad_out, i0, i1, j0, j1, dtype, params,
                            want_params, grad_img, grad_cap, grad_params):
    """Recompute the block's scores with the reference math and add its gradients."""
    with torch.enable_grad():
        img_b = img[i0:i1].detach().to(dtype).requires_grad_(grad_img is not None)
        cap_b = cap[j0:j1].detach().to(dtype).requires_grad_(grad_cap is not None)
        scores = head.forward_vectorized(img_b, cap_b, lens[j0:j1],
                                         img_chunk=img_b.shape[0], cap_chunk=cap_b.shape[0])
        inputs = ([img_b] if grad_img is not None else []) + \
                 ([cap_b] if grad_cap is not None else []) + [params[i] for i in want_params]
        if not inputs:
            return
        grads = torch.autograd.grad(scores, inputs, grad_out[i0:i1, j0:j1].to(scores.dtype),
                                    allow_unused=True)
    grads = list(grads)
    if grad_img is not None:
        grad_img[i0:i1] += grads.pop(0).to(grad_img.dtype)
    if grad_cap is not None:
        g = grads.pop(0)
        if g is not None:
            grad_cap[j0:j1] += g.to(grad_cap.dtype)
    for i, g in zip(want_params, grads):
        if g is not None:
            g = g.to(params[i].dtype)
            grad_params[i] = g if grad_params[i] is None else grad_params[i] + g


def rcar_triton(head, img, cap, lens) -> torch.Tensor:
    """(n_img, n_cap) float32; dispatch refused a head with active dropout before this."""
    lens_list = [int(v) for v in lens.tolist()]
    params = list(head.parameters())
    needs_grad = torch.is_grad_enabled() and (
        img.requires_grad or cap.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return _fused_forward(head, img, cap, lens_list)
    return _FusedRCAR.apply(head, lens, lens_list, img, cap, *params)


# ---------------------------------------------------------------------------------------------
# The custom op (what torch.compile sees): the same fused forward, the same recomputing backward
# ---------------------------------------------------------------------------------------------

def _op_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    lens_list = [int(v) for v in lens.tolist()]
    return rcar_reference.with_weights(config, weights, _fused_forward, img, cap, lens_list)


def _op_backward(grad, img, cap, lens, weights, seed, config):
    """As _FusedRCAR.backward: the reference math recomputed on bounded blocks of pairs, in
    the weights' dtype, under autograd (dispatch refused active dropout: seed is unused)."""
    n_img, n_regions, d = img.shape
    n_cap = cap.shape[0]
    dtype = weights[0].dtype
    longest = max(n_regions, int(lens.max()))
    img_block, cap_block = backward_blocks(n_img, n_cap, longest, d, dtype.itemsize, config[1])
    d_img, d_cap = torch.zeros_like(img), torch.zeros_like(cap)
    d_weights = [torch.zeros_like(w) for w in weights]

    def block_scores(lens_block):
        return lambda i, c, *w: rcar_reference.forward_on_weights(
            i.to(dtype), c.to(dtype), lens_block, list(w), seed, config)

    for i0 in range(0, n_img, img_block):
        for j0 in range(0, n_cap, cap_block):
            g_img, g_cap, *g_weights = vjp(
                block_scores(lens[j0:j0 + cap_block]),
                [img[i0:i0 + img_block], cap[j0:j0 + cap_block], *weights],
                grad[i0:i0 + img_block, j0:j0 + cap_block])
            d_img[i0:i0 + img_block] += g_img
            d_cap[j0:j0 + cap_block] += g_cap
            for total, g in zip(d_weights, g_weights):
                total += g
    return d_img, d_cap, d_weights


# rcar_fast::rcar_triton and rcar_fast::rcar_triton_backward (eager calls keep _FusedRCAR).
rcar_triton_op = define_rcar_op("rcar_triton", _op_forward, _op_backward)
