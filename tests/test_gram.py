"""The Gram op on every backend that can run here, against float64."""
import os
import subprocess
import sys

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from tests.conftest import requires_gpu
from tests.tolerances import assert_close_to_reference
from tests.conftest import HAS_GPU, TRITON_INTERPRETED

SHAPES = [(1, 1, 1), (3, 5, 7), (2, 36, 70), (2, 17, 33)]  # R, d off the tile sizes
def _device(backend):
    """Triton takes CPU tensors only under its interpreter; on a GPU session the same small
    cases run compiled, on GPU tensors."""
    if backend != "triton" or TRITON_INTERPRETED:
        return "cpu"
    if not HAS_GPU:
        pytest.skip("triton can run here neither interpreted (TRITON_INTERPRET unset) nor on a GPU")
    return "cuda"


def _usable(backend, device, dtype):
    return dispatch.rejection("gram", backend, torch.device(device), dtype) is None


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_small_shapes_match_float64(backend, shape):
    x = torch.randn(*shape, device=_device(backend))
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
    for backend in ("cpu", "triton"):
        base = torch.randn(2, 6, 16, device=_device(backend))
        x = base[:, :, ::2]
        ref = torch.bmm(x.double(), x.double().transpose(1, 2))
        assert_close_to_reference(rcar_fast.gram(x, backend=backend), ref, dtype=torch.float32)


def test_gram_triton_fp16():
    x = torch.randn(2, 10, 24, device=_device("triton")).half()
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


# The kernel under the interpreter, in a child process (the interpreter is fixed per process,
# and a wrapped int32 offset is a read outside the tensor: a crash, not a failed assert). One
# stride of 2^30 + 64 elements, each int32, puts image 2 at 2^31 + 128 elements: int32 offset
# arithmetic wraps there. int8 features keep the tensor at 2 GiB of address space, of which only
# the pages holding the three images are touched.
_GRAM_INT64_SCRIPT = r"""
import torch
from rcar_fast.kernels import gram as kernels

R, D, stride_n = 3, 5, 2**30 + 64
try:
    storage = torch.empty(2 * stride_n + R * D, dtype=torch.int8)
except RuntimeError as err:  # strict overcommit: no 2 GiB of address space
    raise SystemExit(f"NOMEM {err}")
x = storage.as_strided((3, R, D), (stride_n, D, 1))
x.copy_(torch.randint(-5, 6, (3, R, D), dtype=torch.int8))
out = torch.full((3, R, R), float("nan"))
kernels._gram_kernel[(3, 1, 1)](x, out, R, D, *x.stride(), BLOCK_R=16, BLOCK_D=16)
expected = torch.bmm(x.double(), x.double().transpose(1, 2))
print("MATCH" if torch.equal(out.double(), expected) else f"MISMATCH {out} {expected}")
"""


def test_gram_kernel_offsets_do_not_overflow_int32():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _GRAM_INT64_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    if run.stderr.startswith("NOMEM"):
        pytest.skip(f"cannot reserve 2 GiB of address space here: {run.stderr[:200]}")
    assert run.returncode == 0 and run.stdout.strip() == "MATCH", (
        f"image 2 at offset 2^31 + 128 elements: exit {run.returncode} (-11: a read outside the "
        f"tensor, int32 offsets wrapped), stdout {run.stdout[-500:]!r}, stderr {run.stderr[-1500:]}")


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gram_gpu(backend, dtype):
    x = torch.randn(4, 36, 1000, device="cuda").to(dtype)
    ref64 = torch.bmm(x.double(), x.double().transpose(1, 2))
    ref_lowp = torch.bmm(x, x.transpose(1, 2))
    out = rcar_fast.gram(x, backend=backend)
    assert_close_to_reference(out, ref64, dtype=dtype, ref_lowp=ref_lowp)
