"""SCAN on the reference math (rcar_fast.reference): the vectorised form and the public code's
loop, both differentiable by torch autograd (and twice differentiable).

Eager calls run the reference directly (autograd keeps its activations: the oracle's memory
and speed, and double backward, as ever). Inside torch.compile the vectorised form runs as the
custom op rcar_fast::scan_reference (its backward op recomputes the forward under autograd), since
its lens-dependent Python branches cannot be traced into one graph."""
import torch

from rcar_fast import reference_math
from rcar_fast.ops.backend import Backend, output_dtype
from rcar_fast.ops.library import SCAN_OPTION_NAMES, define_scan_op, vjp



def _vectorized(img, cap, lens, **kw) -> torch.Tensor:
    return reference_math.scan_similarity_vectorized(img, cap, lens, **kw).to(output_dtype(img.dtype))


def _forward(img, cap, lens, options) -> torch.Tensor:
    return _vectorized(img, cap, lens, **dict(zip(SCAN_OPTION_NAMES, options)))


def _backward(grad, img, cap, lens, options) -> tuple:
    return tuple(vjp(lambda i, c: _forward(i, c, lens, options), [img, cap], grad))


# rcar_fast::scan_reference and rcar_fast::scan_reference_backward
scan_reference_op = define_scan_op("scan_reference", _forward, _backward)


class ScanReference(Backend):
    op, backend, kernel = "scan", "reference", "the vectorised reference"

    @staticmethod
    def fn(img, cap, lens, **kw) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return scan_reference_op(img, cap, lens, *(kw[name] for name in SCAN_OPTION_NAMES))
        return _vectorized(img, cap, lens, **kw)


class ScanReferenceLoop(Backend):
    op, backend, kernel = "scan", "reference_loop", "the reference loop"

    @staticmethod
    def fn(img, cap, lens, **kw) -> torch.Tensor:
        return reference_math.scan_similarity_loop(img, cap, lens, **kw).to(output_dtype(img.dtype))
