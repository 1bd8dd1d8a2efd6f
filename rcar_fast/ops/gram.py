"""The public per-image Gram op: validate, then dispatch (backends: ops/gram_backends.py)."""
import torch

from rcar_fast import dispatch, validate
from rcar_fast.ops.backend import Inputs


def gram(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-image Gram matrix: x (n, R, d) -> (n, R, R), float32 (float64 for float64 input;
    the Triton and CUDA kernels output float32)."""
    validate.features(x, "x", "(n, R, d)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf values")
    return dispatch.choose("gram", backend, Inputs.of_tensor(x)).fn(x)
