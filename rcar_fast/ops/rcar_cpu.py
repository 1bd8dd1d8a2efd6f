"""RCAR similarity head over all pairs on the C++ CPU kernels (csrc/cpu/rcar.cpp), forward only.

The kernel runs the head in eval mode (RAR dropout off). It has no backward: a result that
autograd would need to differentiate carries a node whose backward raises, so training code
fails loudly instead of silently getting no gradient.
"""
import torch

from rcar_fast import contract, dispatch
from rcar_fast.ops.scan_cpu import supports  # same device and dtypes as the SCAN kernels


def flat_weights(head) -> list:
    """The head's Linear weights and biases in the order csrc/cpu/kernels.h documents."""
    return [t.detach() for _, layer, _ in contract.rcar_linears(head) for t in (layer.weight, layer.bias)]


def native_settings(head):
    """The kernel's typed head configuration (csrc/cpu/kernels.h RcarSettings)."""
    return dispatch.native_module().RcarSettings(
        direction=contract.DIRECTION_CODES[head.direction], regulator=contract.REGULATOR_CODES[head.regulator],
        steps=int(head.steps), smooth=float(head.smooth))


class _NoBackward(torch.autograd.Function):
    """Passes the scores through; differentiating them raises with the reason."""

    @staticmethod
    def forward(ctx, scores, *differentiable_inputs):
        return scores.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the RCAR head's 'cpu' backend has no backward pass; "
                           "train with backend='reference' (or run the cpu backend under torch.no_grad())")


def rcar_cpu(head, img, cap, lens):
    if head.active_dropout():
        raise dispatch.BackendUnavailable(
            "backend 'cpu' runs the RCAR head in eval mode only, and this head is in training mode "
            "with RAR dropout active; call head.eval() for scoring, or use backend='reference' to train")
    scores = dispatch.native_module().rcar_forward_cpu(
        img.detach(), cap.detach(), lens, native_settings(head), flat_weights(head))
    tracked = [t for t in (img, cap, *head.parameters()) if t.requires_grad]
    if torch.is_grad_enabled() and tracked:
        return _NoBackward.apply(scores, *tracked)
    return scores


dispatch.register("rcar", "cpu", rcar_cpu, supports)
