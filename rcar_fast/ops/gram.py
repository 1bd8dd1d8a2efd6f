"""The per-image Gram matrix op G = X X^T (n, R, d) -> (n, R, R), forward only, on every
backend: its backend classes (BACKENDS, which rcar_fast.dispatch.TABLE takes) and the public
wrapper. It is the plumbing check of the project: one trivial but real kernel per kind."""
import torch

from rcar_fast import validate
from rcar_fast.ops.backend import (CUDA_DTYPE_CODES, Backend, Inputs, choose, cuda_stream, native,
                                   rows_contiguous)

_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def _gram_reference(x: torch.Tensor) -> torch.Tensor:
    out = torch.bmm(x, x.transpose(1, 2))
    return out if x.dtype == torch.float64 else out.float()


class GramReference(Backend):
    op, backend, kernel = "gram", "reference", "torch.bmm"
    fn = staticmethod(_gram_reference)


class GramReferenceLoop(GramReference):
    backend = "reference_loop"


class GramTriton(Backend):
    op, backend, kernel = "gram", "triton", "the Triton Gram kernel"
    dtypes = {"cuda": _LOW_PRECISION, "cpu": _LOW_PRECISION}
    has_backward = False

    @staticmethod
    def fn(x):
        from rcar_fast.kernels import gram as gram_kernels  # triton imported only when used

        return gram_kernels.gram(x)


class GramCpu(Backend):
    op, backend, kernel = "gram", "cpu", "the C++ Gram kernel"
    dtypes = {"cpu": (torch.float32, torch.float64)}
    has_backward = False

    @staticmethod
    def fn(x):
        return native().gram_cpu(x)


class GramCuda(Backend):
    op, backend, kernel = "gram", "cuda", "the CUDA Gram kernel"
    dtypes = {"cuda": _LOW_PRECISION}
    has_backward = False

    @staticmethod
    def fn(x):
        n, R, d = x.shape
        x = rows_contiguous(x)
        out = torch.empty((n, R, R), device=x.device, dtype=torch.float32)
        native().gram_cuda(x.data_ptr(), out.data_ptr(), n, R, d, x.stride(0), x.stride(1),
                           CUDA_DTYPE_CODES[x.dtype], cuda_stream(x.device))
        return out


BACKENDS = {"gram": (GramReference, GramReferenceLoop, GramTriton, GramCuda, GramCpu)}


def gram(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-image Gram matrix: x (n, R, d) -> (n, R, R), float32 (float64 for float64 input;
    the Triton and CUDA kernels output float32)."""
    validate.features(x, "x", "(n, R, d)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf values")
    return choose("gram", BACKENDS["gram"], backend, Inputs.of_tensor(x)).fn(x)
