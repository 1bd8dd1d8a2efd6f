"""The RCAR head (op "rcar": all pairs; op "rcar_pairs": a pair list): the ops' custom ops and
their autograd, and their backends. The public wrapper is rcar_fast.modules.RCARSimilarity (an
nn.Module, beside the head registry's entry RcarScorer). Every "rcar" backend is a class whose
`fn` has the signature

    fn(head, img, cap, lens) -> (n_img, n_cap)

and every "rcar_pairs" backend fn(head, img, cap, lens, img_idx, cap_idx) -> (P,), where `head`
is the RCAR head module (weights under the official names, plus regulator, steps, direction,
smooth) and `lens` (and the pair indices) arrive validated (int64 on cap's device). BACKENDS
(at the end) lists them per op; rcar_fast.dispatch.TABLE takes them from there.

    reference, reference_loop   the head module's own vectorised and loop forwards
    cpu                         the C++ CPU kernels (csrc/cpu/rcar.cpp), forward and backward
    triton                      the Triton kernels (kernels/rcar.py, kernels/rcar_backward.py):
                                fused forward and backward, dropout included
    cuda                        the CUDA kernel (csrc/cuda/rcar.cu), eval-mode forward only
    rcar_pairs                  the reference's pair drivers; the C++ kernel's pair-list entry;
                                the Triton kernels on the listed pairs (forward, fused backward)

The ops take the head's weights as inputs (head.parameters() order) and its configuration as
arguments, so torch.compile traces them as one node each.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from rcar_fast import contract, dropout, reference_math
from rcar_fast.heads import RCARHead, module_counts
from rcar_fast.ops.backend import Backend, CpuKernelBackend, Inputs, native, output_dtype
from rcar_fast.ops.library import (PAIR_INDICES_SCHEMA, define, define_given_values, input_grads,
                                   listed_pairs, pairs_output, scan_output, vjp)

__all__ = ["BACKENDS", "define_rcar_op"]


# ---------------------------------------------------------------------------------------------
# The custom ops: rcar_fast::rcar_<backend>, rcar_pairs_<backend> (and _backward)
# ---------------------------------------------------------------------------------------------

RCAR_CONFIG = ("str regulator, int steps, str direction, float smooth, int embed_dim, "
               "int sim_dim, bool training")


def rcar_schema(pairs: bool) -> str:
    """The inputs of an RCAR op (all pairs, or a pair list with pairs)."""
    return (f"Tensor img, Tensor cap, Tensor lens, {PAIR_INDICES_SCHEMA if pairs else ''}"
            f"Tensor[] weights, Tensor seed, {RCAR_CONFIG}")


def rcar_differentiable(pairs: bool) -> tuple:
    """The positions of img, cap and weights among an RCAR op's inputs."""
    return (0, 1, 5 if pairs else 3)


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

    return define(name, rcar_schema(pairs), fake, run_forward, backward and run_backward,
                  "(Tensor, Tensor, Tensor[])", fake_grads, rcar_differentiable(pairs))


# ---------------------------------------------------------------------------------------------
# reference, reference_loop: the head module's forwards
# ---------------------------------------------------------------------------------------------

# fn(head, img, cap, lens) -> (n_img, n_cap)
#
# where `head` is the RCAR head module (weights under the official names, plus regulator,
# steps, direction, smooth) and `lens` arrives validated (int64 on cap's device).
#
# Eager calls run the module's forward directly. Inside torch.compile the vectorised form runs
# as the custom op rcar_fast::rcar_reference, the head's weights passed as op inputs and applied
# to a weightless copy of the head (torch.func.functional_call), since its lens-dependent Python
# branches cannot be traced into one graph. Its backward op recomputes the forward under autograd;
# a seed drawn in the graph makes the recomputation draw the same dropout masks.

@functools.lru_cache(maxsize=None)
def _skeleton(regulator, steps, direction, smooth, embed_dim, sim_dim):
    """A head of this configuration whose parameters live on the meta device (no memory):
    only its structure is used, with the caller's weights."""
    with torch.device("meta"):
        head = RCARHead(embed_dim, sim_dim, regulator, steps, direction, smooth)
    return head, tuple(name for name, _ in head.named_parameters())


class _Bound(torch.nn.Module):
    """Holds a head so that torch.func.functional_call can run any function of it (not only
    its forward) with the caller's weights."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, fn, *args):
        return fn(self.head, *args)


def with_weights(config, weights, fn, *args):
    """fn(head, *args) on a head of this configuration (regulator, steps, direction, smooth,
    embed_dim, sim_dim, training) whose parameters are `weights` (head.parameters() order):
    how an RCAR op's implementation sees the head it was given as tensors."""
    *structure, training = config
    head, names = _skeleton(*structure)
    head.train(training)
    params = {f"head.{name}": w for name, w in zip(names, weights)}
    return torch.func.functional_call(_Bound(head), params, (fn, *args), strict=True)


def with_seeded_weights(config, weights, seed, fn, img, *args):
    """with_weights, and dropout (if the head has active dropout) draws its masks from `seed`
    (an int64 0-d tensor): a recomputation under the same seed draws the same masks."""
    def run(head, img, *args):
        if not head.active_dropout():
            return fn(head, img, *args)
        devices = [img.device] if img.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            return fn(head, img, *args)

    return with_weights(config, weights, run, img, *args)


def _all_pairs(head, img, cap, lens):
    return head(img, cap, lens).to(output_dtype(img.dtype))


def forward_on_weights(img, cap, lens, weights, seed, config):
    """The reference scores (n_img, n_cap) of the head given as weights and config (the RCAR
    ops' arguments), dropout masks drawn from `seed`."""
    return with_seeded_weights(config, weights, seed, _all_pairs, img, cap, lens)


def rcar_vjp(forward, grad, img, cap, lens, *index, weights, seed, config):
    """(d img, d cap, d weights) of forward(img, cap, lens, *index, weights, seed, config):
    the backward of an RCAR op that recomputes its forward under autograd."""
    d_img, d_cap, *d_weights = vjp(lambda i, c, *w: forward(i, c, lens, *index, list(w), seed, config),
                                   [img, cap, *weights], grad)
    return d_img, d_cap, d_weights


def _reference_backward(grad, img, cap, lens, weights, seed, config):
    return rcar_vjp(forward_on_weights, grad, img, cap, lens, weights=weights, seed=seed, config=config)


# rcar_fast::rcar_reference and rcar_fast::rcar_reference_backward
rcar_reference_op = define_rcar_op("rcar_reference", forward_on_weights, _reference_backward)


def op_config(head) -> tuple:
    """The RCAR ops' config arguments of a head: (regulator, steps, direction, smooth,
    embed_dim, sim_dim, training)."""
    return (head.regulator, head.steps, head.direction, float(head.smooth), head.embed_dim,
            head.sim_dim, bool(head.training))


def compiled_call(op, head, img, cap, lens, *index, detach: bool = False):
    """`op` (an RCAR custom op) on the head's weights and configuration (detached for a
    forward-only op, which has no autograd formula); index: img_idx, cap_idx of a pair op."""
    weights = [p.detach() if detach else p for p in head.parameters()]
    dropout = bool(head.active_dropout())
    seed = (torch.randint(0, 2**62, (), dtype=torch.int64) if dropout
            else torch.zeros((), dtype=torch.int64))
    return op(img, cap, lens, *index, weights, seed, *op_config(head))


class RcarReference(Backend):
    op, backend, kernel = "rcar", "reference", "the vectorised reference"

    @staticmethod
    def fn(head, img, cap, lens):
        if torch.compiler.is_compiling():
            return compiled_call(rcar_reference_op, head, img, cap, lens)
        return head.forward_vectorized(img, cap, lens).to(output_dtype(img.dtype))


class RcarReferenceLoop(Backend):
    op, backend, kernel = "rcar", "reference_loop", "the reference loop"

    @staticmethod
    def fn(head, img, cap, lens):
        return head.forward_loop(img, cap, lens).to(output_dtype(img.dtype))


# ---------------------------------------------------------------------------------------------
# cpu: the C++ CPU kernels (csrc/cpu/rcar.cpp), forward and fused backward
# ---------------------------------------------------------------------------------------------

# The backward recomputes the forward tile by tile (flash style: nothing of the forward is kept
# between the two calls, per-pair intermediates exist only for one tile per thread) and returns
# the gradients of img, cap and every head parameter; they are deterministic for a thread count.
# Pairs whose output gradient is zero are skipped: a sparse gradient (the full hardest-negative
# loss gives <= 3B of B^2 pairs one) runs through the pair-list kernel's tiles instead.
# In training mode RAR's dropout uses the counter-based masks of rcar_fast.dropout, drawn from a
# seed that the op takes as an input, so the backward recomputes the forward's masks.
# Because the backward needs only the inputs, a pair list whose scores are already known (the
# sparse loss' no-grad selection pass, no dropout) skips the pair forward:
# rcar_fast::rcar_pairs_cpu_given (RcarPairsCpu.given_values) returns them with this autograd.
#
# The kernels read the head's Linear weights in contract.RCAR_LINEARS order; the op takes them in
# head.parameters() order (as every RCAR op does) and reorders them here.

def flat_weights(head) -> list:
    """The head's Linear weights and biases in the order csrc/cpu/rcar.cpp documents."""
    return [t.detach() for _, layer, _ in contract.rcar_linears(head) for t in (layer.weight, layer.bias)]


def native_settings(direction: str, regulator: str, steps: int, smooth: float, training: bool = False,
                    seed: int = 0):
    """The kernel's typed head configuration (csrc/cpu/rcar.cpp RcarSettings)."""
    return native().RcarSettings(direction=contract.DIRECTION_CODES[direction],
                                 regulator=contract.REGULATOR_CODES[regulator], steps=int(steps),
                                 smooth=float(smooth), training=bool(training), seed=int(seed))


@functools.lru_cache(maxsize=None)
def kernel_order(regulator, steps, direction, smooth, embed_dim, sim_dim) -> tuple:
    """For each tensor of the kernels' flat list, its index in head.parameters() order."""
    head, _ = _skeleton(regulator, steps, direction, smooth, embed_dim, sim_dim)
    position = {id(p): i for i, p in enumerate(head.parameters())}
    return tuple(position[id(t)] for _, layer, _ in contract.rcar_linears(head)
                 for t in (layer.weight, layer.bias))


def _kernel_args(weights, seed, config):
    regulator, steps, direction, smooth, embed_dim, sim_dim, training = config
    order = kernel_order(regulator, steps, direction, smooth, embed_dim, sim_dim)
    settings = native_settings(direction, regulator, steps, smooth, training, int(seed))
    return order, settings, [weights[i] for i in order]


def _cpu_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    _, settings, flat = _kernel_args(weights, seed, config)
    return native().rcar_forward_cpu(img, cap, lens, settings, flat)


def _parameter_order(d_flat, order, weights) -> list:
    """The kernels' weight gradients (their flat order) in head.parameters() order."""
    d_weights = [None] * len(weights)
    for g, i in zip(d_flat, order):
        d_weights[i] = g.to(weights[i].dtype)
    return d_weights


def _cpu_backward(grad, img, cap, lens, weights, seed, config):
    order, settings, flat = _kernel_args(weights, seed, config)
    d_img, d_cap, *d_flat = native().rcar_backward_cpu(grad.to(img.dtype), img, cap, lens, settings, flat)
    return d_img, d_cap, _parameter_order(d_flat, order, weights)


def _cpu_pairs_forward(img, cap, lens, img_idx, cap_idx, weights, seed, config) -> torch.Tensor:
    _, settings, flat = _kernel_args(weights, seed, config)
    return native().rcar_pairs_forward_cpu(img, cap, lens, img_idx, cap_idx, settings, flat)


def _cpu_pairs_backward(grad, img, cap, lens, img_idx, cap_idx, weights, seed, config):
    order, settings, flat = _kernel_args(weights, seed, config)
    d_img, d_cap, *d_flat = native().rcar_pairs_backward_cpu(grad.to(img.dtype), img, cap, lens, img_idx,
                                                             cap_idx, settings, flat)
    return d_img, d_cap, _parameter_order(d_flat, order, weights)


# rcar_fast::rcar_cpu, rcar_fast::rcar_pairs_cpu (the pair-list entry) and their _backward
rcar_cpu_op = define_rcar_op("rcar_cpu", _cpu_forward, _cpu_backward)
rcar_pairs_cpu_op = define_rcar_op("rcar_pairs_cpu", _cpu_pairs_forward, _cpu_pairs_backward, pairs=True)
# rcar_fast::rcar_pairs_cpu_given: the pair scores given (a no-grad pass' values), the backward
# rcar_pairs_cpu_backward's (RcarPairsCpu.given_values)
rcar_pairs_cpu_given_op = define_given_values("rcar_pairs_cpu", rcar_schema(True), rcar_differentiable(True))


def call_kernel_op(op, head, img, cap, lens, *index):
    """`op` (rcar_cpu_op, or rcar_pairs_cpu_op with index = (img_idx, cap_idx)) on the head's
    weights; in training mode with a fresh dropout seed."""
    # The op's `training` argument says whether dropout acts: a training head whose
    # Dropout modules have p = 0 (rcar_fast.train's head_dropout=0) has none.
    dropout_on = _check_dropout(head)
    seed = (torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_on
            else torch.zeros((), dtype=torch.int64))
    config = (*op_config(head)[:-1], dropout_on)
    return op(img, cap, lens, *index, list(head.parameters()), seed, *config)


class RcarCpu(Backend):
    """Forward and fused backward, dropout included (counter-based masks)."""
    op, backend, kernel = "rcar", "cpu", "the C++ CPU RCAR kernel"
    dtypes = CpuKernelBackend.dtypes
    dtype_reason = CpuKernelBackend.dtype_reason   # the devices and dtypes of every C++ CPU kernel
    has_backward = True
    implements_dropout = True

    @staticmethod
    def fn(head, img, cap, lens):
        return call_kernel_op(rcar_cpu_op, head, img, cap, lens)


def _check_dropout(head, kernel: str = None) -> bool:
    """Whether RAR's dropout acts in this call; refuses a rate the kernel (default: the C++
    CPU kernel) does not implement."""
    active = head.active_dropout()
    for name, module in head.named_modules():
        if name in active and module.p != dropout.P:
            raise ValueError(f"{kernel or RcarCpu.kernel}: RAR dropout must have p = {dropout.P} (the official "
                             f"rate) or 0, got p = {module.p} for {name}; use backend='reference'")
    return bool(active)


# ---------------------------------------------------------------------------------------------
# triton: the Triton kernel (kernels/rcar.py)
# ---------------------------------------------------------------------------------------------

# Forward: one fused Triton kernel for the whole head over all pairs (kernels/rcar.py); nothing
# of size (pairs, Q, d) or (pairs, Q, s) is written. With RAR's dropout active (training mode)
# the forward is kernels/rcar_backward.py's per-pair kernel instead (kernels/rcar.py has no
# dropout): the same function with the counter-based masks of rcar_fast.dropout.
#
# Backward: the fused Triton backward of kernels/rcar_backward.py (flash style: the forward
# saves only its inputs; each pair is recomputed in a per-program scratch and differentiated by
# hand), gradients of img, cap and every head parameter, deterministic (no atomics: per-program
# partial weight gradients summed in a fixed order). An output gradient with fewer than half its
# pairs nonzero (the full B x B hardest-negative loss: <= 3B of B^2) runs as the list of those
# pairs (kernels/rcar_backward.py SPARSE_FRACTION), the full walk's gradients bit for bit.
# Training mode: the dropout seed is drawn per forward call and kept for the backward, so both
# see the same masks.


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
            return triton_op_call(rcar_triton_op, head, img, cap, lens)
        return rcar_triton(head, img, cap, lens)


def triton_op_call(op, head, img, cap, lens, *index):
    """A Triton RCAR custom op (index: img_idx, cap_idx of the pair op) on the head's weights.
    The op's `training` says whether dropout acts (a training head whose Dropout modules have
    p = 0 has none), as for the CPU op."""
    dropout_on = dropout_acts(head)
    seed = (torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_on
            else torch.zeros((), dtype=torch.int64))
    config = (*op_config(head)[:-1], dropout_on)
    return op(img, cap, lens, *index, list(head.parameters()), seed, *config)


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
    """Whether RAR's dropout acts in this call (the Triton kernel's rate check)."""
    return _check_dropout(head, RcarTriton.kernel)


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
                                 module_counts=module_counts(head.regulator, head.steps),
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
        regulator=head.regulator, steps=head.steps, module_counts=module_counts(head.regulator, head.steps),
        direction=head.direction, smooth=head.smooth, grad=grad.detach(), seed=seed, dropout_on=dropout_on)
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

def _triton_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    lens_list = [int(v) for v in lens.tolist()]
    return with_weights(config, weights, _triton_head_forward, img, cap, lens_list,
                                       int(seed))


def _triton_head_forward(head, img, cap, lens_list, seed):
    return _fused_forward(head, img, cap, lens_list, seed, dropout_acts(head))


def _triton_backward(grad, img, cap, lens, weights, seed, config):
    """The fused backward on the head rebuilt from the op's weights (zeros for a weight the
    score does not depend on, as the ops' vjp gives)."""
    lens_list = [int(v) for v in lens.tolist()]

    def run(head):
        d_img, d_cap, grads = _fused_backward(head, grad, img, cap, lens_list, int(seed),
                                              dropout_acts(head))
        return d_img, d_cap, [grads[id(p)] for p in head.parameters()]

    return with_weights(config, weights, run)


# rcar_fast::rcar_triton and rcar_fast::rcar_triton_backward (eager calls keep _FusedRCAR).
rcar_triton_op = define_rcar_op("rcar_triton", _triton_forward, _triton_backward)


# ---------------------------------------------------------------------------------------------
# cuda: the CUDA kernel (csrc/cuda/rcar.cu), eval-mode forward only
# ---------------------------------------------------------------------------------------------

# The kernel is plain SIMT (correctness first): a persistent grid of blocks, each scoring one
# (image, caption) pair at a time, its (Q, d) intermediates in a per-block workspace slot that is
# reused pair after pair (memory O(blocks x Q x d), never O(pairs x Q x d)). Features are cast to
# float32, weights are passed as float32 (in, out) matrices through a device table of pointers
# whose order is fixed in csrc/cuda/rcar.cu (`weight_tensors` below builds it).
#
# The result carries no gradient: dispatch refuses it for a training step and for active dropout.
#
# Not in backend="auto"'s order (RcarCuda.not_in_auto, shown by rcar_fast.backends() and in
# dispatch's errors): every FLOP is a CUDA-core FP32 FMA (the compiled kernel has no tensor-core
# instruction) and a block scores one pair at a time, an estimated ~5 minutes for COCO 5K t2i
# against 15-30 s for the Triton kernel (issue 15). backend="cuda" still runs it.

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKS_PER_SM = 2  # the kernel is built for two resident 256-thread blocks per SM


def _native():
    return native()


def _matrix(linear: torch.nn.Linear) -> torch.Tensor:
    """The Linear's weight as a float32 (in, out) matrix: a thread per output reads it coalesced."""
    return linear.weight.detach().to(torch.float32).t().contiguous()


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).reshape(-1).contiguous()


def weight_tensors(head) -> list[torch.Tensor]:
    """float32 weights in the order of the kernel's pointer table (csrc/cuda/rcar.cu)."""
    # A Linear with one output passes its weight as a vector, the others as (in, out) matrices.
    return [t for _, lin, to_one in contract.rcar_linears(head)
            for t in ((_vector(lin.weight) if to_one else _matrix(lin)), _vector(lin.bias))]


def _persistent_blocks(device: torch.device, pairs: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pairs, sms * BLOCKS_PER_SM))


def _features(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    return x if x.stride(2) == 1 else x.contiguous()


def problem_dict(head, img, cap, lens, max_len, table, workspace, blocks) -> dict:
    """The RcarProblem fields (csrc/cuda/rcar.cu) as a dict of ints and floats."""
    n_img, R, d = img.shape
    return dict(
        img=img.data_ptr(), cap=cap.data_ptr(), n_img=n_img, R=R, d=d, n_cap=cap.shape[0],
        img_stride_n=img.stride(0), img_stride_r=img.stride(1),
        cap_stride_n=cap.stride(0), cap_stride_w=cap.stride(1),
        lens=lens.data_ptr(), max_len=max_len, sim_dim=head.sim_dim,
        regulator=contract.REGULATOR_CODES[head.regulator], steps=head.steps,
        i2t=int(head.direction == "i2t"), smooth=float(head.smooth), weights=table.data_ptr(),
        workspace=workspace.data_ptr(), n_blocks=blocks,
    )


def rcar_cuda(head, img, cap, lens) -> torch.Tensor:
    """The registered implementation: inputs validated by RCARSimilarity.forward (lens int64 on
    cap's device). Returns (n_img, n_cap) float32."""
    if head.regulator not in contract.REGULATORS or head.direction not in contract.DIRECTIONS:
        raise ValueError(f"unknown regulator {head.regulator!r} or direction {head.direction!r}")
    native, device = _native(), img.device
    img, cap = _features(img), _features(cap)
    lens = lens.to(device=device, dtype=torch.int64).contiguous()
    max_len = int(lens.max())
    n_img, R, d = img.shape
    i2t = head.direction == "i2t"
    tensors = weight_tensors(head)
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
    blocks = _persistent_blocks(device, n_img * cap.shape[0])
    per_block = native.rcar_workspace_floats(R if i2t else max_len, d, head.sim_dim)
    workspace = torch.empty(blocks * per_block, dtype=torch.float32, device=device)
    sims = torch.empty((n_img, cap.shape[0]), dtype=torch.float32, device=device)
    problem = native.RcarProblemCuda(**problem_dict(head, img, cap, lens, max_len, table, workspace, blocks))
    native.rcar_forward_cuda(problem, sims.data_ptr(), torch.cuda.current_stream(device).cuda_stream)
    # `tensors`, `table` and `workspace` are released after the launch: the caching allocator
    # reuses their memory only for work queued later on this stream.
    return sims


def _cuda_forward(img, cap, lens, weights, seed, config) -> torch.Tensor:
    return with_weights(config, weights, rcar_cuda, img, cap, lens)


# rcar_fast::rcar_cuda, forward only (no autograd formula): what torch.compile sees.
rcar_cuda_op = define_rcar_op("rcar_cuda", _cuda_forward)


class RcarCuda(Backend):
    op, backend, kernel = "rcar", "cuda", "the CUDA RCAR kernel"
    dtypes = {"cuda": SUPPORTED_DTYPES}
    has_backward = False
    implements_dropout = False
    not_in_auto = ("plain FP32 FMA, no tensor cores, one pair per block: ~5 min estimated for "
                   "COCO 5K t2i, the Triton RCAR kernel is the faster GPU path")

    @staticmethod
    def fn(head, img, cap, lens):
        if torch.compiler.is_compiling():
            return compiled_call(rcar_cuda_op, head, img.detach(), cap.detach(), lens, detach=True)
        return rcar_cuda(head, img, cap, lens)


# ---------------------------------------------------------------------------------------------
# rcar_pairs: the reference's pair drivers on listed pairs; the C++ kernel's pair-list entry
# ---------------------------------------------------------------------------------------------

def _rcar_pairs_reference(driver: Callable) -> Callable:
    """The rcar_pairs op on a reference pair driver, with the head's pair function."""
    def rcar_pairs(head, img, cap, lens, img_idx, cap_idx):
        return listed_pairs(driver, img, cap, lens, img_idx, cap_idx, head.direction,
                             head.pair_scores)
    return rcar_pairs


def _rcar_pairs_cpu(head, img, cap, lens, img_idx, cap_idx):
    return call_kernel_op(rcar_pairs_cpu_op, head, img, cap, lens, img_idx, cap_idx)


_rcar_pairs_vectorized = _rcar_pairs_reference(reference_math.pairs_vectorized)


def _rcar_pairs_forward(img, cap, lens, img_idx, cap_idx, weights, seed, config):
    return with_seeded_weights(config, weights, seed, _rcar_pairs_vectorized,
                                              img, cap, lens, img_idx, cap_idx)


def _rcar_pairs_backward(grad, img, cap, lens, img_idx, cap_idx, weights, seed, config):
    return rcar_vjp(_rcar_pairs_forward, grad, img, cap, lens, img_idx, cap_idx,
                                   weights=weights, seed=seed, config=config)


# rcar_fast::rcar_pairs_reference and its _backward
rcar_pairs_reference_op = define_rcar_op("rcar_pairs_reference", _rcar_pairs_forward,
                                         _rcar_pairs_backward, pairs=True)


def _rcar_pairs_reference_or_op(head, img, cap, lens, img_idx, cap_idx):
    if torch.compiler.is_compiling():
        return compiled_call(rcar_pairs_reference_op, head, img, cap, lens, img_idx, cap_idx)
    return _rcar_pairs_vectorized(head, img, cap, lens, img_idx, cap_idx)


class RcarPairsReference(Backend):
    op, backend, kernel = "rcar_pairs", "reference", "the vectorised reference"
    fn = staticmethod(_rcar_pairs_reference_or_op)


class RcarPairsReferenceLoop(Backend):
    op, backend, kernel = "rcar_pairs", "reference_loop", "the reference loop"
    fn = staticmethod(_rcar_pairs_reference(reference_math.pairs_loop))


class RcarPairsCpu(Backend):
    """The C++ CPU RCAR kernel's pair-list entry (csrc/cpu/rcar.cpp, rcar_pairs_forward /
    rcar_pairs_backward): the whole list in one call, tiled by context owner, forward and fused
    backward, dropout with the all-pairs kernel's masks; what RcarCpu can do, it can. Measured
    (d 1024, sim_dim 256, 2 threads, idle, 2026-12-02, bench/results rows
    loss_rcar_coop_rcar2_t2i): the whole sparse step at B = 32 takes 284 ms against the
    reference's 688 ms on an Intel Xeon, and 363 ms against 753 ms on an AMD EPYC (run
    20261202T075931Z; there the sparse loss' pair scores come from its selection pass and only
    this backward runs, given_values), so auto takes it."""
    op, backend, kernel = "rcar_pairs", "cpu", RcarCpu.kernel
    dtypes, dtype_reason = RcarCpu.dtypes, RcarCpu.dtype_reason
    has_backward, implements_dropout = RcarCpu.has_backward, RcarCpu.implements_dropout

    @classmethod
    def not_supported_reasons(cls, inputs: Inputs) -> list:
        return RcarCpu.not_supported_reasons(inputs)

    fn = staticmethod(_rcar_pairs_cpu)

    @staticmethod
    def given_values(head, img, cap, lens, img_idx, cap_idx, values):
        """fn's scores when `values` already are them (a no-grad all-pairs pass over the same
        inputs, e.g. the sparse loss' selection): `values` back with fn's autograd, whose
        backward is fn's own (it recomputes from the inputs), so the gradients are fn's and its
        forward does not run. None when the head's dropout is active: then fn's forward draws
        a sample that no other pass has, and fn must run."""
        if _check_dropout(head):
            return None
        config = (*op_config(head)[:-1], False)
        return rcar_pairs_cpu_given_op(values.to(output_dtype(img.dtype)), img, cap, lens, img_idx, cap_idx,
                                       list(head.parameters()), torch.zeros((), dtype=torch.int64), *config)


# ---------------------------------------------------------------------------------------------
# rcar_pairs on triton: the Triton kernels on a pair list
# ---------------------------------------------------------------------------------------------

# The listed pairs run as the kernels' work items, packed on the host. Forward without dropout
# (eval mode): kernels/rcar.py's tiles, per context set the query items listed with it, each
# tile scored against its own set (listed_tiles; one launch). With RAR's dropout (training mode)
# and for the fused backward: kernels/rcar_backward.py's pair kernel in its LISTED mode, the
# pairs grouped by owner (owner_lists: per context item its listed query items for the forward
# and the d context pass, per query item its listed context items for the d query pass), one
# launch per pass, scores and output gradients gathered / scattered between the list order and
# the pairs' order. Repeats are listed (and recomputed) as often as they are given, so their
# gradients add up in a fixed order. Forward with RAR's dropout (training mode) and the fused
# backward as for all pairs, the masks keyed by the pair's id i * n_cap + j (the all-pairs
# kernel's bits for that image and caption). Indices are checked here, before any kernel runs,
# with the C++ pair-list entry's messages (csrc/cpu/tile_common.h check_pair_index).

PAIRS_TRITON = "rcar pairs (triton)"


def check_pair_index(idx, name: str, n_pairs: int, n: int, device) -> None:
    """A pair list's index tensor `name`: int64 (n_pairs,) on `device` with values in [0, n)."""
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.shape[0] == n_pairs
            and idx.dtype == torch.int64 and idx.device == torch.device(device)):
        got = (f"{tuple(idx.shape)} {idx.dtype} on {idx.device}" if isinstance(idx, torch.Tensor)
               else type(idx).__name__)
        raise ValueError(f"{PAIRS_TRITON}: {name} must be an int64 tensor on {device} of shape "
                         f"({n_pairs},), got {got}")
    if n_pairs and not (int(idx.min()) >= 0 and int(idx.max()) < n):
        raise ValueError(f"{PAIRS_TRITON}: {name} must lie in [0, {n}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


def _checked_pairs(img, cap, img_idx, cap_idx, grad=None) -> tuple:
    n_pairs = img_idx.numel() if isinstance(img_idx, torch.Tensor) else 0
    check_pair_index(img_idx, "img_idx", n_pairs, img.shape[0], img.device)
    check_pair_index(cap_idx, "cap_idx", n_pairs, cap.shape[0], img.device)
    if grad is not None and tuple(grad.shape) != (n_pairs,):
        raise ValueError(f"{PAIRS_TRITON}: grad must be ({n_pairs},), got {tuple(grad.shape)}")
    return img_idx, cap_idx


def _kernel_options(head) -> dict:
    return dict(regulator=head.regulator, steps=head.steps,
                module_counts=module_counts(head.regulator, head.steps),
                direction=head.direction, smooth=head.smooth)


def _fused_pairs_forward(head, img, cap, lens_list, img_idx, cap_idx, seed: int = 0,
                         dropout_on: bool = False) -> torch.Tensor:
    """As _fused_forward on the listed pairs: without dropout kernels/rcar.py's tiles (each
    tile a context set's listed query items), with it the pair kernel's listed walk."""
    from rcar_fast.kernels import rcar as kernels
    from rcar_fast.kernels import rcar_backward

    img_idx, cap_idx = _checked_pairs(img, cap, img_idx, cap_idx)
    interpreter = img.device.type == "cpu"
    img, cap = img.detach().contiguous(), cap.detach().contiguous()
    if dropout_on:
        return rcar_backward.run(img, cap, lens_list, pack_weights(head, torch.float32, interpreter),
                                 seed=seed, dropout_on=True, pairs=(img_idx, cap_idx),
                                 **_kernel_options(head))
    op_dtype = torch.float32 if img.dtype == torch.float32 else img.dtype
    return kernels.rcar_pairs_forward(img, cap, lens_list, pack_weights(head, op_dtype, interpreter),
                                      img_idx, cap_idx, regulator=head.regulator, steps=head.steps,
                                      direction=head.direction, smooth=head.smooth)


def _fused_pairs_backward(head, grad, img, cap, lens_list, img_idx, cap_idx, seed: int,
                          dropout_on: bool):
    """(d img, d cap, {id(parameter): gradient}) of the listed pairs' scores."""
    from rcar_fast.kernels import rcar_backward

    pairs = _checked_pairs(img, cap, img_idx, cap_idx, grad)
    weights = pack_weights(head, torch.float32, img.device.type == "cpu")
    d_img, d_cap, packed = rcar_backward.run(
        img.detach().contiguous(), cap.detach().contiguous(), lens_list, weights,
        grad=grad.detach(), seed=seed, dropout_on=dropout_on, pairs=pairs, **_kernel_options(head))
    return d_img.to(img.dtype), d_cap.to(cap.dtype), rcar_backward.unpack_gradients(head, packed)


class _FusedRCARPairs(torch.autograd.Function):
    """Inputs: head, seed, dropout_on, lens_list, img_idx, cap_idx, img, cap, *params."""

    @staticmethod
    def forward(ctx, head, seed, dropout_on, lens_list, img_idx, cap_idx, img, cap, *params):
        ctx.head, ctx.seed, ctx.dropout_on, ctx.lens_list = head, seed, dropout_on, lens_list
        ctx.save_for_backward(img, cap, img_idx, cap_idx)
        return _fused_pairs_forward(head, img, cap, lens_list, img_idx, cap_idx, seed, dropout_on)

    @staticmethod
    def backward(ctx, grad_out):
        img, cap, img_idx, cap_idx = ctx.saved_tensors
        head = ctx.head
        d_img, d_cap, grads = _fused_pairs_backward(head, grad_out, img, cap, ctx.lens_list,
                                                    img_idx, cap_idx, ctx.seed, ctx.dropout_on)
        unused = _unused_parameters(head)
        grad_params = [None if id(p) in unused or not ctx.needs_input_grad[8 + i] else grads[id(p)]
                       for i, p in enumerate(head.parameters())]
        return (None,) * 6 + (d_img if ctx.needs_input_grad[6] else None,
                              d_cap if ctx.needs_input_grad[7] else None, *grad_params)


def rcar_pairs_triton(head, img, cap, lens, img_idx, cap_idx) -> torch.Tensor:
    """(P,) float32 scores of the listed pairs; training mode: RAR's dropout, seed drawn here."""
    lens_list = [int(v) for v in lens.tolist()]
    dropout_on = dropout_acts(head)
    seed = draw_seed() if dropout_on else 0
    params = list(head.parameters())
    needs_grad = torch.is_grad_enabled() and (
        img.requires_grad or cap.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return _fused_pairs_forward(head, img, cap, lens_list, img_idx, cap_idx, seed, dropout_on)
    return _FusedRCARPairs.apply(head, seed, dropout_on, lens_list, img_idx, cap_idx, img, cap,
                                 *params)


def _triton_pairs_forward(img, cap, lens, img_idx, cap_idx, weights, seed, config):
    lens_list = [int(v) for v in lens.tolist()]
    return with_weights(config, weights, lambda head: _fused_pairs_forward(
        head, img, cap, lens_list, img_idx, cap_idx, int(seed), dropout_acts(head)))


def _triton_pairs_backward(grad, img, cap, lens, img_idx, cap_idx, weights, seed, config):
    lens_list = [int(v) for v in lens.tolist()]

    def run(head):
        d_img, d_cap, grads = _fused_pairs_backward(head, grad, img, cap, lens_list, img_idx,
                                                    cap_idx, int(seed), dropout_acts(head))
        return d_img, d_cap, [grads[id(p)] for p in head.parameters()]

    return with_weights(config, weights, run)


# rcar_fast::rcar_pairs_triton and its _backward (eager calls keep _FusedRCARPairs)
rcar_pairs_triton_op = define_rcar_op("rcar_pairs_triton", _triton_pairs_forward,
                                      _triton_pairs_backward, pairs=True)


class RcarPairsTriton(Backend):
    """The Triton RCAR kernels on a pair list: the eval forward on kernels/rcar.py's tiles of
    each context set's listed items, the training forward (dropout, the all-pairs kernel's masks)
    and the fused backward on kernels/rcar_backward.py's listed pair walk; every regulator, step
    count and direction; what RcarTriton can do, it can. auto's choice for CUDA tensors (on CPU
    triton is an interpreter, never chosen by auto). No GPU timing yet."""
    op, backend, kernel = "rcar_pairs", "triton", RcarTriton.kernel
    dtypes, dtype_reason = RcarTriton.dtypes, RcarTriton.dtype_reason
    has_backward, implements_dropout = RcarTriton.has_backward, RcarTriton.implements_dropout

    @staticmethod
    def fn(head, img, cap, lens, img_idx, cap_idx):
        if torch.compiler.is_compiling():
            return triton_op_call(rcar_pairs_triton_op, head, img, cap, lens, img_idx, cap_idx)
        return rcar_pairs_triton(head, img, cap, lens, img_idx, cap_idx)


# ---------------------------------------------------------------------------------------------
# The backends of the ops (rcar_fast.dispatch.TABLE takes them from here)
# ---------------------------------------------------------------------------------------------

BACKENDS = {
    "rcar": (RcarReference, RcarReferenceLoop, RcarTriton, RcarCuda, RcarCpu),
    "rcar_pairs": (RcarPairsReference, RcarPairsReferenceLoop, RcarPairsCpu, RcarPairsTriton),
}
