"""SCAN on the reference math (rcar_fast.reference): the vectorised form and the public code's
loop, both differentiable by torch autograd (and twice differentiable)."""
import torch

from rcar_fast import reference
from rcar_fast.ops.backend import Backend, output_dtype


class ScanReference(Backend):
    op, backend, kernel = "scan", "reference", "the vectorised reference"

    @staticmethod
    def fn(img, cap, lens, **kw) -> torch.Tensor:
        return reference.scan_similarity_vectorized(img, cap, lens, **kw).to(output_dtype(img.dtype))


class ScanReferenceLoop(Backend):
    op, backend, kernel = "scan", "reference_loop", "the reference loop"

    @staticmethod
    def fn(img, cap, lens, **kw) -> torch.Tensor:
        return reference.scan_similarity_loop(img, cap, lens, **kw).to(output_dtype(img.dtype))
