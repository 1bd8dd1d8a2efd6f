"""SCAN on the C++ CPU backend (csrc/cpu/scan.cpp) against the float64 reference: every
direction, raw norm and aggregation, ragged lengths with NaN padding, sizes off the tile and
vector widths, float32 and float64, and the backward (reference gradients and gradcheck)."""
import re

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch, reference
from rcar_fast.contract import AGGREGATIONS, DIRECTIONS, RAW_NORMS, scan_published
from rcar_fast.ops.scan import native_settings
from tests.inputs import make_inputs
from tests.tolerances import (F64_CHUNKED, F64_CPU_KERNEL_PARTS, assert_bit_equal, assert_close,
                              assert_close_to_reference)

pytestmark = pytest.mark.skipif(
    dispatch.rejection("scan", "cpu", torch.device("cpu"), torch.float32) is not None,
    reason="the native extension is not built")


def options(direction, raw_norm="clipped_l2norm", agg="mean"):
    return scan_published(direction, "f30k", raw_norm=raw_norm, agg=agg)


# every direction x raw norm; the tests loop over the aggregations inside (one input batch each)
EVERY_DIRECTION_AND_NORM = pytest.mark.parametrize(
    "direction,raw_norm", [(direction, norm) for direction in DIRECTIONS for norm in RAW_NORMS])


def reference64(img, cap, lens, **kw):
    return reference.scan_similarity_loop(img.double(), cap.double(), lens, **kw)


@EVERY_DIRECTION_AND_NORM
def test_forward_every_norm_and_aggregation(direction, raw_norm):
    # R = 11, L up to 9: neither is a multiple of the 8 / 4 lane vectors
    img, cap, lens = make_inputs(5, 7, 11, 13, 9)
    for agg in AGGREGATIONS:
        kw = options(direction, raw_norm, agg)
        ref = reference64(img, cap, lens, **kw)
        for dtype in (torch.float64, torch.float32):
            out = rcar_fast.scan_similarity(img.to(dtype), cap.to(dtype), lens, backend="cpu", **kw)
            assert out.dtype == dtype
            assert_close_to_reference(out, ref, dtype=dtype, what=f"scan cpu {kw} {dtype}")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),      # n_img, n_cap, R, d, Lmax: the smallest problem
    (3, 4, 16, 8, 8),     # R and L whole vectors (no masked lane)
    (17, 90, 40, 9, 20),  # several image blocks (14 images of 40 regions) and caption blocks (> 768 words)
    (2, 3, 3, 70, 33),    # L longer than R
])
def test_forward_odd_sizes(direction, shape):
    n_img, n_cap, R, d, Lmax = shape
    img, cap, lens = make_inputs(n_img, n_cap, R, d, Lmax)
    kw = options(direction)
    ref = reference64(img, cap, lens, **kw)
    for dtype in (torch.float64, torch.float32):
        out = rcar_fast.scan_similarity(img.to(dtype), cap.to(dtype), lens, backend="cpu", **kw)
        assert_close_to_reference(out, ref, dtype=dtype, what=f"scan cpu {shape} {dtype}")


def test_forward_non_contiguous_inputs():
    base_img = torch.randn(4, 2 * 10, 12, dtype=torch.float64)
    img = base_img[:, ::2]                     # strided regions
    cap = torch.randn(6, 12, 7, dtype=torch.float64).transpose(1, 2)  # d not unit-stride
    lens = torch.tensor([7, 3, 1, 5, 7, 2])
    for direction in DIRECTIONS:
        kw = options(direction)
        ref = reference64(img, cap, lens, **kw)
        out = rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **kw)
        assert_close_to_reference(out, ref, dtype=torch.float64)


def test_padding_is_never_read():
    img, cap, lens = make_inputs(3, 5, 7, 6, 8)
    kw = options("i2t")
    out_nan = rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **kw)
    cap_inf = cap.clone()
    cap_inf[torch.isnan(cap_inf)] = 1e30
    out_big = rcar_fast.scan_similarity(img, cap_inf, lens, backend="cpu", **kw)
    assert_bit_equal(out_nan, out_big, what="NaN vs 1e30 padding")


def reference_gradients(img, cap, lens, grad, **kw):
    img = img.double().clone().requires_grad_()
    cap = cap.double().clone().requires_grad_()
    (reference64(img, cap, lens, **kw) * grad.double()).sum().backward()
    real = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    return img.grad, torch.where(real[..., None], cap.grad, torch.zeros((), dtype=cap.dtype))


def cpu_gradients(img, cap, lens, grad, **kw):
    img = img.clone().requires_grad_()
    cap = cap.clone().requires_grad_()
    (rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **kw) * grad.to(img.dtype)).sum().backward()
    return img.grad, cap.grad


@EVERY_DIRECTION_AND_NORM
def test_backward_matches_reference_gradients(direction, raw_norm):
    img, cap, lens = make_inputs(4, 6, 11, 10, 9)
    for agg in AGGREGATIONS:
        kw = options(direction, raw_norm, agg)
        grad = torch.randn(4, 6, dtype=torch.float64)
        grad[1, 2] = 0.0  # pairs with no gradient are skipped by the kernel
        ref_img, ref_cap = reference_gradients(img, cap, lens, grad, **kw)
        for dtype in (torch.float64, torch.float32):
            d_img, d_cap = cpu_gradients(img.to(dtype), cap.to(dtype), lens, grad, **kw)
            assert d_img.dtype == dtype and d_cap.dtype == dtype
            assert torch.all(d_cap[torch.isnan(cap)] == 0), "padding must get zero gradient"
            assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"d img {kw} {dtype}")
            assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"d cap {kw} {dtype}")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backward_across_tiles(direction):
    # several caption blocks and image blocks, so that the locked accumulation is exercised
    img, cap, lens = make_inputs(17, 90, 40, 9, 20)
    kw = options(direction, agg="lse")
    grad = torch.randn(17, 90, dtype=torch.float64)
    ref_img, ref_cap = reference_gradients(img, cap, lens, grad, **kw)
    d_img, d_cap = cpu_gradients(img, cap, lens, grad, **kw)
    assert_close_to_reference(d_img, ref_img, dtype=torch.float64, what="d img")
    assert_close_to_reference(d_cap, ref_cap, dtype=torch.float64, what="d cap")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("raw_norm,agg", [("clipped_l2norm", "mean"), ("l1norm", "lse"), ("softmax", "sum")])
def test_gradcheck(direction, raw_norm, agg):
    img = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    cap = torch.randn(3, 4, 6, dtype=torch.float64)
    lens = torch.tensor([4, 2, 1])
    cap = cap.requires_grad_()
    kw = options(direction, raw_norm, agg)
    assert torch.autograd.gradcheck(
        lambda i, c: rcar_fast.scan_similarity(i, c, lens, backend="cpu", **kw), (img, cap))


def test_backward_only_one_input_needs_grad():
    img, cap, lens = make_inputs(3, 4, 5, 6, 5)
    img.requires_grad_()
    rcar_fast.scan_similarity(img, cap, lens, backend="cpu").sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_rejects_low_precision_with_reason():
    reason = dispatch.rejection("scan", "cpu", torch.device("cpu"), torch.float16)
    assert reason is not None and "float32 or float64" in reason
    img, cap, lens = make_inputs(2, 2, 3, 4, 3, dtype=torch.float16)
    with pytest.raises(dispatch.BackendUnavailable, match="float32 or float64"):
        rcar_fast.scan_similarity(img, cap, lens, backend="cpu")


def test_auto_picks_cpu_for_cpu_float32():
    assert dispatch.choose("scan", "auto", torch.device("cpu"), torch.float32).backend == "cpu"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_baseline_simd_copy(direction, baseline_simd):
    img, cap, lens = make_inputs(4, 6, 11, 10, 9)
    grad = torch.randn(4, 6, dtype=torch.float64)
    for raw_norm, agg in (("clipped_l2norm", "mean"), ("softmax", "lse"), ("clipped_l1norm", "max")):
        kw = options(direction, raw_norm, agg)
        ref = reference64(img, cap, lens, **kw)
        ref_img, ref_cap = reference_gradients(img, cap, lens, grad, **kw)
        for dtype in (torch.float64, torch.float32):
            out = rcar_fast.scan_similarity(img.to(dtype), cap.to(dtype), lens, backend="cpu", **kw)
            assert_close_to_reference(out, ref, dtype=dtype, what=f"baseline {kw} {dtype}")
            d_img, d_cap = cpu_gradients(img.to(dtype), cap.to(dtype), lens, grad, **kw)
            assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"baseline d img {kw} {dtype}")
            assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"baseline d cap {kw} {dtype}")


# ---------------------------------------------------------------------------------------------
# Extreme temperatures, huge R, determinism (issue 12: F1, F2, F7, F10)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype,lse_lambda", [(torch.float32, 1e10), (torch.float32, 1e30),
                                              (torch.float64, 1e20), (torch.float64, 1e300)])
def test_lse_with_huge_lambda_stays_finite_and_right(direction, dtype, lse_lambda):
    # lambda r overflows (or its rounding error does, once contracted into an FMA) unless the
    # kernel shifts by r_max before scaling; the value tends to max_k r_k.
    img, cap, lens = make_inputs(3, 5, 7, 8, 6)
    kw = dict(options(direction, agg="lse"), lse_lambda=lse_lambda)
    ref = reference64(img, cap, lens, **kw)
    assert bool(torch.isfinite(ref).all())
    out = rcar_fast.scan_similarity(img.to(dtype), cap.to(dtype), lens, backend="cpu", **kw)
    assert_close_to_reference(out, ref, dtype=dtype, what=f"lse lambda={lse_lambda:g} {dtype}")
    grad = torch.randn(3, 5, dtype=torch.float64)
    ref_img, ref_cap = reference_gradients(img, cap, lens, grad, **kw)
    d_img, d_cap = cpu_gradients(img.to(dtype), cap.to(dtype), lens, grad, **kw)
    assert_close_to_reference(d_img, ref_img, dtype=dtype, what="d img")
    assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what="d cap")


def test_lse_with_tiny_lambda_matches_reference():
    img, cap, lens = make_inputs(2, 4, 5, 6, 5)
    kw = dict(options("t2i", agg="lse"), lse_lambda=1e-30)
    out = rcar_fast.scan_similarity(img.float(), cap.float(), lens, backend="cpu", **kw)
    assert_close_to_reference(out, reference64(img, cap, lens, **kw), dtype=torch.float32)
    with pytest.raises(ValueError, match="lse_lambda must be at least 1e-30"):
        rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **dict(kw, lse_lambda=1e-31))


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 1e3), (torch.float64, 1e6)])
def test_smooth_up_to_the_dtype_limit_is_right_and_above_it_refused(dtype, limit):
    img, cap, lens = make_inputs(3, 5, 7, 8, 6)
    for direction in DIRECTIONS:
        kw = dict(options(direction), smooth=limit)
        out = rcar_fast.scan_similarity(img.to(dtype), cap.to(dtype), lens, backend="cpu", **kw)
        assert_close_to_reference(out, reference64(img, cap, lens, **kw), dtype=dtype,
                                  what=f"smooth={limit:g} {direction} {dtype}")
    for backend in ("cpu", "reference"):
        for smooth in (limit * 1.01, 3.5e38, 1e39):  # 3.5e38: beyond float32's range
            with pytest.raises(ValueError, match=re.escape(f"smooth must be at most {limit:g} for ")):
                rcar_fast.scan_similarity(img.to(dtype), cap.to(dtype), lens, smooth=smooth, backend=backend)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kernel_keeps_a_temperature_beyond_float32_range_finite(direction):
    # Below the public limit nothing overflows; the kernel itself must still not turn such a
    # temperature into inf (inf * 0 = NaN at the top logit): it gives the hard attention that the
    # float64 reference gives. Captions of >= 2 words: one word normalises to exactly +-1 in
    # float32, a tie that float64 resolves.
    img, cap, lens = make_inputs(3, 4, 6, 8, lens=[5, 2, 3, 4], seed=3, pad=None)
    native = dispatch.native_module()
    ref = reference.scan_similarity_vectorized(img, cap, lens, direction=direction, smooth=1e39)
    settings = native_settings(direction, "clipped_l2norm", 1e39, "mean", 6.0)
    out = native.scan_forward_cpu(img.float(), cap.float(), lens, settings)
    assert_close_to_reference(out, ref, dtype=torch.float32, what="smooth=1e39 in float32")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backward_is_bit_reproducible_with_two_threads(direction):
    # Threads finish tiles in any order; the shared per-image sums are added in caption-block
    # order, so every run gives the same bits.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        img, cap, lens = make_inputs(40, 60, 36, 64, 20, dtype=torch.float32)
        grad = torch.linspace(-1, 1, 40 * 60).view(40, 60)
        first = cpu_gradients(img, cap, lens, grad, **options(direction))
        for _ in range(4):
            again = cpu_gradients(img, cap, lens, grad, **options(direction))
            assert_bit_equal(first[0], again[0], what="d img rerun")
            assert_bit_equal(first[1], again[1], what="d cap rerun")
    finally:
        torch.set_num_threads(previous)


def test_t2i_with_huge_R_is_refused_before_any_kernel(monkeypatch):
    img = torch.randn(1, 50_000, 4)
    cap = torch.randn(2, 3, 4)
    lens = torch.tensor([3, 2])

    class NoKernel:
        def __getattr__(self, name):
            raise AssertionError(f"the kernel {name} must not run")

    from rcar_fast.ops import scan as scan_ops

    monkeypatch.setattr(scan_ops, "native", lambda: NoKernel())   # the kernels' only way in
    with pytest.raises(dispatch.BackendUnavailable, match=r"R = 50000 needs 9537 MiB per image.*R <= 4096"):
        rcar_fast.scan_similarity(img, cap, lens, backend="cpu")
    monkeypatch.undo()
    # backend="auto" passes the cpu kernels over and computes with the reference
    out = rcar_fast.scan_similarity(img, cap, lens)
    kw = options("t2i")
    assert_close_to_reference(out, reference64(img, cap, lens, **kw), dtype=torch.float32)


def test_t2i_images_in_chunks_equal_one_call(monkeypatch):
    from rcar_fast.ops import scan as scan_ops

    img, cap, lens = make_inputs(7, 5, 9, 6, 5)
    grad = torch.randn(7, 5, dtype=torch.float64)
    kw = options("t2i")
    whole = rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **kw)
    whole_grads = cpu_gradients(img, cap, lens, grad, **kw)
    calls = []
    monkeypatch.setattr(scan_ops, "GRAM_CHUNK_BYTES", 3 * scan_ops._image_gram_bytes(img))
    monkeypatch.setattr(scan_ops, "_forward_chunk", _counting(scan_ops._forward_chunk, calls))
    chunked = rcar_fast.scan_similarity(img, cap, lens, backend="cpu", **kw)
    assert len(calls) == 3  # 3 + 3 + 1 images
    assert_close(chunked, whole, F64_CHUNKED)
    for got, want in zip(cpu_gradients(img, cap, lens, grad, **kw), whole_grads):
        assert_close(got, want, F64_CPU_KERNEL_PARTS)


def _counting(fn, calls):
    def counted(*args):
        calls.append(args[0].shape[0])
        return fn(*args)
    return counted


def test_i2t_with_huge_R_runs_in_memory_linear_in_R():
    # The pair scratch was sized max(R, L)^2 per thread (~8 GB at R = 20000); now queries x
    # context. Measured in a fresh process: its peak RSS is not shared with earlier tests.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import resource, torch, rcar_fast
        torch.set_num_threads(2)
        img, cap = torch.randn(1, 20000, 4), torch.randn(2, 5, 4)
        lens = torch.tensor([5, 3])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = rcar_fast.scan_similarity(img, cap, lens, direction="i2t", smooth=4.0, backend="cpu")
        assert bool(torch.isfinite(out).all())
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_mib = int(result.stdout.split()[-1])
    assert growth_mib < 200, f"peak memory grew by {growth_mib} MiB for R = 20000, d = 4"


@pytest.mark.skipif(dispatch.rejection("scan", "triton", torch.device("cpu"), torch.float32) is not None,
                    reason="triton (its CPU interpreter) is not available")
def test_lse_with_huge_lambda_agrees_with_the_triton_interpreter():
    img, cap, lens = make_inputs(2, 3, 5, 8, 4, dtype=torch.float32)
    for lse_lambda in (1e10, 1e30):
        kw = dict(options("t2i", agg="lse"), lse_lambda=lse_lambda)
        ref = reference64(img, cap, lens, **kw)
        for backend in ("cpu", "triton"):
            out = rcar_fast.scan_similarity(img, cap, lens, backend=backend, **kw)
            assert_close_to_reference(out, ref, dtype=torch.float32, what=f"{backend} lambda={lse_lambda:g}")
