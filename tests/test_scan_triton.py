"""The Triton SCAN kernels (forward and backward) against the float64 reference.

On CPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1), on small
grids whose sizes are off every tile size: R=5 regions, d=20, Lmax=7 with ragged lengths
including 1 and Lmax, NaN in every caption padding position. GPU tests run at realistic
sizes in fp32/fp16/bf16 with the 2x rule.
"""
import math

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast import reference as ref
from rcar_fast.contract import AGGREGATIONS as AGGS
from rcar_fast.contract import RAW_NORMS, scan_published
from tests.conftest import requires_gpu
from tests.inputs import make_inputs, real_words
from tests.tolerances import (F32_STRIDED_VIEW, F64_GRADCHECK, assert_bit_equal, assert_close,
                              assert_close_to_reference)
from tests.conftest import assert_interpreter_dispatch, requires_interpreter

LENS = (1, 7, 3, 5, 2)


def _inputs(n_img=3, lens=LENS, regions=5, dim=20, dtype=torch.float32, **kw):
    """This file's default batch: make_inputs with NaN padding, float32, 5 ragged captions."""
    return make_inputs(n_img, len(lens), regions, dim, kw.pop("max_len", None), lens=lens, dtype=dtype, **kw)


def _options(direction, raw_norm="clipped_l2norm", agg="mean"):
    # MS-COCO's published settings: its i2t lse_lambda (20) is the largest published one.
    return scan_published(direction, "coco", raw_norm=raw_norm, agg=agg)


def _reference(img, cap, lens, **opts):
    return ref.scan_similarity_vectorized(img.double(), cap.double(), lens, **opts)


def _triton(img, cap, lens, **opts):
    return rcar_fast.scan_similarity(img, cap, lens, backend="triton", **opts)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = sorted({(n, "mean") for n in RAW_NORMS} | {("clipped_l2norm", a) for a in AGGS})


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("raw_norm,agg", FORWARD_CASES)
def test_forward_matches_float64_reference(direction, raw_norm, agg):
    img, cap, lens = _inputs()
    opts = _options(direction, raw_norm, agg)
    out = _triton(img, cap, lens, **opts)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32,
                              what=f"scan triton {direction} {raw_norm} {agg}")


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_several_length_buckets(direction):
    # lengths 1..20 fall into three power-of-two buckets: three launches whose results must
    # land in the right columns
    lens = (20, 1, 9, 16, 17, 4, 8, 3)
    img, cap, lens = _inputs(n_img=4, lens=lens, regions=6, dim=24)
    opts = _options(direction)
    out = _triton(img, cap, lens, **opts)
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_single_region_and_single_feature(direction):
    # R = 1 (i2t pads the queries to 1: 16 images per tile), d = 1
    img, cap, lens = _inputs(n_img=3, regions=1, dim=1)
    for raw_norm in ("clipped_l2norm", "softmax"):
        opts = _options(direction, raw_norm)
        out = _triton(img, cap, lens, **opts)
        assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padding_is_never_read(direction):
    # NaN, large values or zeros in the padding: bit-identical results
    results = []
    for padding in (float("nan"), 123.0, 0.0):
        torch.manual_seed(0)
        img, cap, lens = _inputs(pad=padding)
        results.append(_triton(img, cap, lens, **_options(direction, agg="lse")))
    assert torch.isfinite(results[0]).all()
    assert_bit_equal(results[1], results[0], what="padding 123 vs NaN")
    assert_bit_equal(results[2], results[0], what="padding 0 vs NaN")


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_writes_every_output_element(direction):
    from rcar_fast.kernels import scan as kernels

    img, cap, lens = _inputs()
    opts = _options(direction)
    problem = kernels.build_problem(img, cap, lens, **opts)
    poisoned = torch.full((3, 5), float("nan"))
    out = kernels.scan_forward(problem, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float32)


@requires_interpreter
def test_non_contiguous_inputs():
    img, cap, lens = _inputs(dim=40)
    # every stride differs from the contiguous layout: d every other element, owners
    # interleaved through a transposed base
    img_view = img.transpose(0, 1).contiguous().transpose(0, 1)[:, :, ::2]
    cap_view = cap.permute(1, 0, 2).contiguous().permute(1, 0, 2)[:, :, 1::2]
    assert not img_view.is_contiguous() and not cap_view.is_contiguous()
    for direction in ("t2i", "i2t"):
        opts = _options(direction)
        out = _triton(img_view, cap_view, lens, **opts)
        expected = _triton(img_view.contiguous(), cap_view.contiguous(), lens, **opts)
        assert_close(out, expected, F32_STRIDED_VIEW)
        assert_close_to_reference(out, _reference(img_view, cap_view, lens, **opts),
                                  dtype=torch.float32)


@requires_interpreter
def test_float16_interpreter_two_x_rule():
    img, cap, lens = _inputs(dtype=torch.float16)
    for direction in ("t2i", "i2t"):
        opts = _options(direction)
        out = _triton(img, cap, lens, **opts)
        assert out.dtype == torch.float32
        ref16 = ref.scan_similarity_vectorized(img, cap, lens, **opts)
        assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float16,
                                  ref_lowp=ref16)


@requires_interpreter
def test_float64_output_is_float64():
    img, cap, lens = _inputs(dtype=torch.float64)
    opts = _options("t2i")
    out = _triton(img, cap, lens, **opts)
    assert out.dtype == torch.float64
    assert_close_to_reference(out, _reference(img, cap, lens, **opts), dtype=torch.float64)


@requires_interpreter
def test_dispatch_reasons():
    assert_interpreter_dispatch("scan")
    with pytest.raises(dispatch.BackendUnavailable, match="bfloat16"):
        img, cap, lens = _inputs(dtype=torch.bfloat16)
        _triton(img, cap, lens)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

def _gradients(fn, img, cap, lens, weights, **opts):
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    out = fn(img, cap, lens, **opts)
    (out * weights).sum().backward()
    return out.detach(), img.grad, cap.grad


def _check_gradients(img, cap, lens, *, dtype, **opts):
    """Kernel gradients vs autograd through the float64 reference (same weights)."""
    weights = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64).to(img.device)
    out_dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    out, dimg, dcap = _gradients(_triton, img, cap, lens, weights.to(out_dtype), **opts)
    ref_out, rimg, rcap = _gradients(_reference, img.double(), cap.double(), lens, weights, **opts)
    real = real_words(lens, cap.shape[1])
    assert dimg.dtype == img.dtype and dcap.dtype == cap.dtype
    assert_close_to_reference(out, ref_out, dtype=dtype, what="forward")
    assert_close_to_reference(dimg, rimg, dtype=dtype, what="d img")
    assert_close_to_reference(dcap[real], rcap[real], dtype=dtype, what="d cap (real words)")
    assert_bit_equal(dcap[~real], torch.zeros_like(dcap[~real]), what="gradient in caption padding")


BACKWARD_CASES = [("clipped_l2norm", "mean"), ("clipped_l2norm", "lse"), ("l1norm", "max"),
                  ("softmax", "sum")]


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("raw_norm,agg", BACKWARD_CASES)
def test_backward_float64_matches_reference(direction, raw_norm, agg):
    img, cap, lens = _inputs(dtype=torch.float64)
    _check_gradients(img, cap, lens, dtype=torch.float64, **_options(direction, raw_norm, agg))


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_backward_float32_several_buckets(direction):
    # several caption buckets: the gradient of the side that loops over them is summed over
    # launches, the other side's launches write disjoint rows
    img, cap, lens = _inputs(n_img=3, lens=(12, 1, 9, 3, 17), regions=5, dim=20)
    _check_gradients(img, cap, lens, dtype=torch.float32, **_options(direction))


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_and_backward_with_64_context_items(direction):
    # more than 32 context items per owner (C_PAD 64: the Gram product runs in K halves, as on
    # GPUs in fp32); t2i: 36 regions; i2t: captions of up to 40 words
    lens = (40, 3, 33) if direction == "i2t" else (7, 2, 5)
    img, cap, lens = _inputs(n_img=2, lens=lens, regions=36 if direction == "t2i" else 5, dim=20)
    _check_gradients(img, cap, lens, dtype=torch.float32, **_options(direction))


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gradcheck_float64(direction):
    img, cap, lens = _inputs(n_img=2, lens=(3, 1), regions=3, dim=5, max_len=4,
                             dtype=torch.float64)
    img, cap = img.requires_grad_(), cap.requires_grad_()
    opts = _options(direction, agg="lse")

    def fn(a, c):
        return _triton(a, c, lens, **opts)

    assert torch.autograd.gradcheck(fn, (img, cap), fast_mode=True, atol=F64_GRADCHECK.atol,
                                   rtol=F64_GRADCHECK.rtol)


@requires_interpreter
def test_gradient_of_one_input_only():
    img, cap, lens = _inputs(dtype=torch.float64)
    img.requires_grad_()
    out = _triton(img, cap, lens, **_options("t2i"))
    out.sum().backward()
    assert img.grad is not None and cap.grad is None
    img2 = img.detach().clone().requires_grad_()
    _reference(img2, cap, lens, **_options("t2i")).sum().backward()
    assert_close_to_reference(img.grad, img2.grad, dtype=torch.float64)


@requires_interpreter
@pytest.mark.parametrize("of_x", [True, False])
def test_backward_kernels_overwrite_poisoned_targets(of_x):
    # the backward kernels store their rows on the first iteration (no read of the target):
    # a NaN-filled target gives the same real rows as a zeroed one, twice in a row (the
    # kernels are idempotent, which makes them safe to autotune)
    from rcar_fast.kernels import scan as kernels

    img, cap, lens = _inputs()
    problem = kernels.build_problem(img, cap, lens, **_options("t2i"))
    dsim = torch.randn(3, 5)
    (xg,), (yg,) = problem.x.groups, problem.y.groups
    kernel = kernels._scan_bwd_kernel   # both roles (OWN_IS_X = of_x)
    feats = problem.x.feats if of_x else problem.y.feats
    clean = torch.zeros(feats.shape)
    kernels._launch_backward(kernel, None, problem, xg, yg, dsim, clean, parallel_over_x=of_x)
    poisoned = torch.full(feats.shape, float("nan"))
    for _ in range(2):
        kernels._launch_backward(kernel, None, problem, xg, yg, dsim, poisoned, parallel_over_x=of_x)
        rows = torch.ones(feats.shape[:2], dtype=torch.bool) if of_x else real_words(lens, 7)
        assert_bit_equal(poisoned[rows], clean[rows], what="rows written over NaN poison")


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes, fp32/fp16/bf16, the 2x rule
# ---------------------------------------------------------------------------------------------

def _realistic(n_img, per_image, dtype, seed=0, shortest=1):
    """COCO-like batch on the GPU: unit-norm 36 x 1024 regions, 6..30 words and one caption of
    `shortest` words."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(6, 31, (n_img * per_image,), generator=gen)
    lens[0], lens[-1] = shortest, 30
    return make_inputs(n_img, len(lens), 36, 1024, lens=lens, unit_norm=True, dtype=dtype, device="cuda",
                       seed=seed + 1)


def _reference_lowp(img, cap, lens, **opts):
    # the reference's own low-precision error; NaN padding is masked inside the reference
    return ref.scan_similarity_vectorized(img, cap, lens, **opts)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gpu_forward_realistic(direction, dtype):
    img, cap, lens = _realistic(40, 5, dtype)
    for raw_norm, agg in (("clipped_l2norm", "mean"), ("clipped_l2norm", "lse"), ("softmax", "max")):
        opts = _options(direction, raw_norm, agg)
        out = _triton(img, cap, lens, **opts)
        ref64 = _reference(img, cap, lens, **opts)
        lowp = None if dtype == torch.float32 else _reference_lowp(img, cap, lens, **opts)
        assert_close_to_reference(out, ref64, dtype=dtype, ref_lowp=lowp,
                                  what=f"{direction} {raw_norm} {agg} {dtype}")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gpu_backward_realistic(direction, dtype):
    # fp16: the reference's own fp16 gradient overflows at a 1-word caption (inf, so the 2x rule
    # has no bound; seen on CPU), so the shortest caption has 2 words there; fp32 and bf16 keep 1.
    img, cap, lens = _realistic(12, 2, dtype, shortest=2 if dtype == torch.float16 else 1)
    opts = _options(direction)
    weights = torch.randn(12, 24, device="cuda", dtype=torch.float64)
    out, dimg, dcap = _gradients(_triton, img, cap, lens, weights.float(), **opts)
    _, rimg, rcap = _gradients(_reference, img.double(), cap.double(), lens, weights, **opts)
    real = real_words(lens, 30)
    if dtype == torch.float32:
        assert_close_to_reference(dimg, rimg, dtype=dtype, what="d img")
        assert_close_to_reference(dcap[real], rcap[real], dtype=dtype, what="d cap")
    else:
        _, limg, lcap = _gradients(_reference_lowp, img, cap, lens, weights.to(dtype), **opts)
        assert_close_to_reference(dimg, rimg, dtype=dtype, ref_lowp=limg, what="d img")
        assert_close_to_reference(dcap[real], rcap[real], dtype=dtype, ref_lowp=lcap[real],
                                  what="d cap")
    assert_bit_equal(dcap[~real], torch.zeros_like(dcap[~real]), what="gradient in caption padding")


@requires_gpu
def test_gpu_training_batch_memory():
    # a 128 x 128 training step never holds (B, B, L, d) or (B, B, R, L) tensors: the peak
    # beyond inputs + gradients is far below one (B, B, R, L) fp32 tensor
    img, cap, lens = _realistic(128, 1, torch.bfloat16)
    img.requires_grad_()
    cap.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _triton(img, cap, lens, **_options("t2i")).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    pairs_tensor = 128 * 128 * 36 * 30 * 4
    inputs = img.numel() * 4 + cap.numel() * 4  # fp32 gradient buffers
    assert extra < inputs * 3 + pairs_tensor / 8, f"peak extra memory {extra / 2**20:.1f} MiB"
    assert math.isfinite(img.grad.float().sum().item())
