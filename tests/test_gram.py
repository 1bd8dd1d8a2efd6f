"""The Gram op on every backend that can run here, against float64."""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from tests.conftest import requires_gpu
from tests.tolerances import assert_close_to_reference

SHAPES = [(1, 1, 1), (3, 5, 7), (2, 36, 70), (2, 17, 33)]  # R, d off the tile sizes


def _usable(backend, device, dtype):
    return dispatch.rejection("gram", backend, torch.device(device), dtype) is None


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_cpu_backends_match_float64(backend, shape):
    x = torch.randn(*shape)
    ref = torch.bmm(x.double(), x.double().transpose(1, 2))
    out = rcar_fast.gram(x, backend=backend)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, ref, dtype=torch.float32, what=f"gram[{backend}]")


def test_gram_cpu_float64_exact():
    x = torch.randn(2, 9, 11, dtype=torch.float64)
    out = rcar_fast.gram(x, backend="cpu")
    assert out.dtype == torch.float64
    assert_close_to_reference(out, x @ x.transpose(1, 2), dtype=torch.float64)


def test_gram_cpu_strided_input():
    # a non-contiguous view along d must be handled, not silently misread
    base = torch.randn(2, 6, 16)
    x = base[:, :, ::2]
    ref = torch.bmm(x.double(), x.double().transpose(1, 2))
    for backend in ("cpu", "triton"):
        assert_close_to_reference(rcar_fast.gram(x, backend=backend), ref, dtype=torch.float32)


def test_gram_triton_fp16_interpreter():
    x = torch.randn(2, 10, 24).half()
    ref64 = torch.bmm(x.double(), x.double().transpose(1, 2))
    ref16 = torch.bmm(x.float(), x.float().transpose(1, 2)).half()
    out = rcar_fast.gram(x, backend="triton")
    assert_close_to_reference(out, ref64, dtype=torch.float16, ref_lowp=ref16)


def test_gram_rejects_nan_and_bad_rank():
    with pytest.raises(ValueError, match="x must have shape"):
        rcar_fast.gram(torch.randn(3, 4))
    x = torch.randn(1, 2, 3)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rcar_fast.gram(x)


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gram_gpu(backend, dtype):
    x = torch.randn(4, 36, 1000, device="cuda").to(dtype)
    ref64 = torch.bmm(x.double(), x.double().transpose(1, 2))
    ref_lowp = torch.bmm(x, x.transpose(1, 2))
    out = rcar_fast.gram(x, backend=backend)
    assert_close_to_reference(out, ref64, dtype=dtype, ref_lowp=ref_lowp)
