"""The per-image Gram matrix op G = X X^T (n, R, d) -> (n, R, R), forward only, on every
backend. It is the plumbing check of the project: one trivial but real kernel per kind."""
import torch

from rcar_fast import contract, dispatch, validate


def _gram_reference(x: torch.Tensor) -> torch.Tensor:
    out = torch.bmm(x, x.transpose(1, 2))
    return out if x.dtype == torch.float64 else out.float()


def _gram_triton(x: torch.Tensor) -> torch.Tensor:
    from rcar_fast.kernels import gram as gram_kernels  # triton imported only when used

    return gram_kernels.gram(x)


def _gram_cpu(x: torch.Tensor) -> torch.Tensor:
    return dispatch.native_module().gram_cpu(x)


_CUDA_DTYPE_CODES = {getattr(torch, name): code for name, code in contract.CUDA_DTYPE_CODES.items()}


def _gram_cuda(x: torch.Tensor) -> torch.Tensor:
    n, R, d = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty((n, R, R), device=x.device, dtype=torch.float32)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    dispatch.native_module().gram_cuda(x.data_ptr(), out.data_ptr(), n, R, d, x.stride(0),
                                       x.stride(1), _CUDA_DTYPE_CODES[x.dtype], stream)
    return out


def _only(*dtypes):
    def supports(device, dtype):
        return None if dtype in dtypes else f"dtype {dtype} not supported (expects one of {dtypes})"
    return supports


dispatch.register("gram", "reference", _gram_reference)
dispatch.register("gram", "reference_loop", _gram_reference)
dispatch.register("gram", "triton", _gram_triton, _only(torch.float16, torch.bfloat16, torch.float32))
dispatch.register("gram", "cpu", _gram_cpu, _only(torch.float32, torch.float64))
dispatch.register("gram", "cuda", _gram_cuda, _only(torch.float16, torch.bfloat16, torch.float32))


def gram(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-image Gram matrix: x (n, R, d) -> (n, R, R), float32 (float64 for float64 input;
    the Triton and CUDA kernels output float32)."""
    validate.features(x, "x", "(n, R, d)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf values")
    return dispatch.choose("gram", backend, x.device, x.dtype).fn(x)
