"""RCAR similarity head on the Triton backend: weight packing, autograd, registration.

Forward: one fused Triton kernel for the whole head over all pairs (kernels/rcar.py); nothing
of size (pairs, Q, d) or (pairs, Q, s) is written. With RAR's dropout active (training mode)
the forward is kernels/rcar_backward.py's per-pair kernel instead (kernels/rcar.py has no
dropout): the same function with the counter-based masks of rcar_fast.dropout.

Backward: the fused Triton backward of kernels/rcar_backward.py (flash style: the forward
saves only its inputs; each pair is recomputed in a per-program scratch and differentiated by
hand), gradients of img, cap and every head parameter, deterministic (no atomics: per-program
partial weight gradients summed in a fixed order). Training mode: the dropout seed is drawn
per forward call and kept for the backward, so both see the same masks.
"""
from __future__ import annotations

import torch

from rcar_fast import contract, dropout
from rcar_fast.ops import rcar_reference
from rcar_fast.ops.backend import Backend
from rcar_fast.ops.library import define_rcar_op

class RcarTriton(Backend):
    op, backend, kernel = "rcar", "triton", "the Triton RCAR kernel"
    dtypes = {"cuda": (torch.float32, torch.float16, torch.bfloat16),
              "cpu": (torch.float32, torch.float16)}
    implements_dropout = True

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
            # The op's `training` says whether dropout acts (a training head whose Dropout
            # modules have p = 0 has none), as for the CPU op.
            dropout_on = dropout_acts(head)
            seed = (torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_on
                    else torch.zeros((), dtype=torch.int64))
            config = (*rcar_reference.op_config(head)[:-1], dropout_on)
            return rcar_triton_op(img, cap, lens, list(head.parameters()), seed, *config)
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
# Forward and the fused backward
# ---------------------------------------------------------------------------------------------

def dropout_acts(head) -> bool:
    """Whether RAR's dropout acts in this call; refuses a rate the kernels do not implement."""
    active = head.active_dropout()
    for name, module in head.named_modules():
        if name in active and module.p != dropout.P:
            raise ValueError(f"{RcarTriton.kernel}: RAR dropout must have p = {dropout.P} (the "
                             f"official rate) or 0, got p = {module.p} for {name}; use "
                             "backend='reference'")
    return bool(active)


def draw_seed() -> int:
    """A fresh dropout seed (from torch's generator, so torch.manual_seed fixes it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _fused_forward(head, img, cap, lens_list, seed: int = 0, dropout_on: bool = False):
    from rcar_fast.kernels import rcar as kernels
    from rcar_fast.kernels import rcar_backward

    interpreter = img.device.type == "cpu"
    img, cap = img.detach().contiguous(), cap.detach().contiguous()
    options = dict(regulator=head.regulator, steps=head.steps, direction=head.direction,
                   smooth=head.smooth)
    if dropout_on:
        return rcar_backward.run(img, cap, lens_list, pack_weights(head, torch.float32, interpreter),
                                 seed=seed, dropout_on=True, **options)
    op_dtype = torch.float32 if img.dtype == torch.float32 else img.dtype
    return kernels.rcar_forward(img, cap, lens_list, pack_weights(head, op_dtype, interpreter),
                                **options)


def _fused_backward(head, grad, img, cap, lens_list, seed: int, dropout_on: bool):
    """(d img, d cap, {id(parameter): gradient}) from kernels/rcar_backward.py."""
    from rcar_fast.kernels import rcar_backward

    weights = pack_weights(head, torch.float32, img.device.type == "cpu")
    d_img, d_cap, packed = rcar_backward.run(
        img.detach().contiguous(), cap.detach().contiguous(), lens_list, weights,
        regulator=head.regulator, steps=head.steps, direction=head.direction,
        smooth=head.smooth, grad=grad.detach(), seed=seed, dropout_on=dropout_on)
    return d_img.to(img.dtype), d_cap.to(cap.dtype), rcar_backward.unpack_gradients(head, packed)


def _unused_parameters(head) -> set:
    """Parameters the score does not depend on (only_rcr's score is a cosine: no sim_eval_w):
    they get no gradient, as with the reference."""
    if head.regulator != "only_rcr":
        return set()
    return {id(p) for p in head.sim_eval_w.parameters()}


class _FusedRCAR(torch.autograd.Function):
    """Inputs: head (module), seed, dropout_on, lens_list, img, cap, *params (head.parameters())."""

    @staticmethod
    def forward(ctx, head, seed, dropout_on, lens_list, img, cap, *params):
        ctx.head, ctx.seed, ctx.dropout_on, ctx.lens_list = head, seed, dropout_on, lens_list
        ctx.save_for_backward(img, cap)
        return _fused_forward(head, img, cap, lens_list, seed, dropout_on)

    @staticmethod
    def backward(ctx, grad_out):
        img, cap = ctx.saved_tensors
        head = ctx.head
        d_img, d_cap, grads = _fused_backward(head, grad_out, img, cap, ctx.lens_list, ctx.seed,
                                              ctx.dropout_on)
        unused = _unused_parameters(head)
        grad_params = [None if id(p) in unused or not ctx.needs_input_grad[6 + i] else grads[id(p)]
                       for i, p in enumerate(head.parameters())]
        return (None, None, None, None, d_img if ctx.needs_input_grad[4] else None,
                d_cap if ctx.needs_input_grad[5] else None, *grad_params)


def rcar_triton(head, img, cap, lens) -> torch.Tensor:
    """(n_img, n_cap) float32; training mode: RAR's dropout with a seed drawn here."""
    lens_list = [int(v) for v in lens.tolist()]
    dropout_on = dropout_acts(head)
    seed = draw_seed() if dropout_on else 0
    params = list(head.parameters())
    needs_grad = torch.is_grad_enabled() and (
        img.requires_grad or cap.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return _fused_forward(head, img, cap, lens_list, seed, dropout_on)
    return _FusedRCAR.apply(head, seed, dropout_on, lens_list, img, cap, *params)


# ---------------------------------------------------------------------------------------------
# The custom op (what torch.compile sees): the same fused forward and backward
# ---------------------------------------------------------------------------------------------

def _op_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    lens_list = [int(v) for v in lens.tolist()]
    return rcar_reference.with_weights(config, weights, _op_head_forward, img, cap, lens_list,
                                       int(seed))


def _op_head_forward(head, img, cap, lens_list, seed):
    return _fused_forward(head, img, cap, lens_list, seed, dropout_acts(head))


def _op_backward(grad, img, cap, lens, weights, seed, config):
    """The fused backward on the head rebuilt from the op's weights (zeros for a weight the
    score does not depend on, as the ops' vjp gives)."""
    lens_list = [int(v) for v in lens.tolist()]

    def run(head):
        d_img, d_cap, grads = _fused_backward(head, grad, img, cap, lens_list, int(seed),
                                              dropout_acts(head))
        return d_img, d_cap, [grads[id(p)] for p in head.parameters()]

    return rcar_reference.with_weights(config, weights, run)


# rcar_fast::rcar_triton and rcar_fast::rcar_triton_backward (eager calls keep _FusedRCAR).
rcar_triton_op = define_rcar_op("rcar_triton", _op_forward, _op_backward)
