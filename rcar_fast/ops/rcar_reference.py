"""The RCAR head on the reference math: the head module's own vectorised and loop forwards
(dropout and autograd included). Every "rcar" backend has the signature

    fn(head, img, cap, lens) -> (n_img, n_cap)

where `head` is the RCAR head module (weights under the official names, plus regulator,
steps, direction, smooth) and `lens` arrives validated (int64 on cap's device).

Eager calls run the module's forward directly. Inside torch.compile the vectorised form runs
as the custom op rcar_fast::rcar_reference, the head's weights passed as op inputs and applied
to a weightless copy of the head (torch.func.functional_call), since its lens-dependent Python
branches cannot be traced into one graph. Its backward op recomputes the forward under autograd;
a seed drawn in the graph makes the recomputation draw the same dropout masks."""
from __future__ import annotations

import functools

import torch

from rcar_fast.ops.backend import Backend, output_dtype
from rcar_fast.ops.library import define_rcar_op, vjp
from rcar_fast.heads import RCARHead


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


def _backward(grad, img, cap, lens, weights, seed, config):
    return rcar_vjp(forward_on_weights, grad, img, cap, lens, weights=weights, seed=seed, config=config)


# rcar_fast::rcar_reference and rcar_fast::rcar_reference_backward
rcar_reference_op = define_rcar_op("rcar_reference", forward_on_weights, _backward)


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
