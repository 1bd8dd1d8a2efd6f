"""RCAR similarity head over all pairs on the C++ CPU kernels (csrc/cpu/rcar.cpp), forward only.

The kernel runs the head in eval mode (RAR dropout off). It has no backward: dispatch refuses
it for a training step (a head in training mode with autograd on), and an eval-mode result
that autograd would need to differentiate carries a node whose backward raises, so training
code fails loudly instead of silently getting no gradient.
"""
import torch

from rcar_fast import contract
from rcar_fast.ops.backend import Backend, native
from rcar_fast.ops.library import scan_output
from rcar_fast.ops.scan_cpu import ScanCpu


def flat_weights(head) -> list:
    """The head's Linear weights and biases in the order csrc/cpu/kernels.h documents."""
    return [t.detach() for _, layer, _ in contract.rcar_linears(head) for t in (layer.weight, layer.bias)]


def native_settings(direction: str, regulator: str, steps: int, smooth: float):
    """The kernel's typed head configuration (csrc/cpu/kernels.h RcarSettings)."""
    return native().RcarSettings(direction=contract.DIRECTION_CODES[direction],
                                 regulator=contract.REGULATOR_CODES[regulator], steps=int(steps),
                                 smooth=float(smooth))


class _NoBackward(torch.autograd.Function):
    """Passes the scores through; differentiating them raises with the reason."""

    @staticmethod
    def forward(ctx, scores, *differentiable_inputs):
        return scores.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the RCAR head's 'cpu' backend has no backward pass; "
                           "train with backend='reference' (or run the cpu backend under torch.no_grad())")


@torch.library.custom_op("rcar_fast::rcar_cpu", mutates_args=())
def rcar_cpu_op(img: torch.Tensor, cap: torch.Tensor, lens: torch.Tensor, weights: list[torch.Tensor],
                direction: str, regulator: str, steps: int, smooth: float) -> torch.Tensor:
    """Forward only (no autograd formula is registered)."""
    return native().rcar_forward_cpu(img, cap, lens, native_settings(direction, regulator, steps, smooth), weights)


@rcar_cpu_op.register_fake
def _(img, cap, lens, weights, direction, regulator, steps, smooth):
    return scan_output(img, cap)


class RcarCpu(Backend):
    """Eval-mode forward: refused for a training step (no backward) and for active dropout."""
    op, backend, kernel = "rcar", "cpu", "the C++ CPU RCAR kernel"
    dtypes = ScanCpu.dtypes
    dtype_reason = ScanCpu.dtype_reason   # same devices and dtypes as the SCAN kernels
    has_backward = False
    implements_dropout = False

    @staticmethod
    def fn(head, img, cap, lens):
        scores = rcar_cpu_op(img.detach(), cap.detach(), lens, flat_weights(head), head.direction,
                             head.regulator, head.steps, float(head.smooth))
        tracked = [t for t in (img, cap, *head.parameters()) if t.requires_grad]
        if torch.is_grad_enabled() and tracked and not torch.compiler.is_compiling():
            return _NoBackward.apply(scores, *tracked)
        return scores
