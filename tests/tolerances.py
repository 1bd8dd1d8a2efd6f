"""The one tolerance table of the test suite, the comparison rule every kernel test uses, and
the comparator that says where and how two results disagree.

Rule (flash-attention's): compare a result against the reference computed in float64.
* float64 results: agree to float64 rounding.
* float32 results: relative error (max abs error / max abs of the reference) under 1e-4.
* float16 / bfloat16 inputs: the kernel's max abs error may be at most 2x that of the
  reference run in the same low precision, plus a small atol.

Every other tolerance a test uses is a named `Tolerance` below, with the reason for its size.
Tests read them from here (never an inline number), so a reader sees in one place how tight each
kind of comparison is, and a change of one bound is one edit.
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound |got - want| <= atol + rtol * |want| (torch.testing's form)."""
    rtol: float
    atol: float
    why: str


# ------------------------------------------------------------------------------------------
# The reference rule, per dtype (used by error_and_bound / assert_close_to_reference)
# ------------------------------------------------------------------------------------------
TOLERANCES = {
    torch.float64: Tolerance(1e-9, 1e-10, "float64 kernels against the float64 reference: rounding only"),
    torch.float32: Tolerance(1e-4, 1e-6, "float32 kernels: the project's relative 1e-4 rule"),
    torch.float16: Tolerance(0.0, 1e-3, "float16: atol on top of 2x the reference's own float16 error"),
    torch.bfloat16: Tolerance(0.0, 8e-3, "bfloat16: atol on top of 2x the reference's own bfloat16 error"),
}
LOW_PRECISION_FACTOR = 2.0

# ------------------------------------------------------------------------------------------
# Exact agreement
# ------------------------------------------------------------------------------------------
BIT_EQUAL = Tolerance(0.0, 0.0, "the same arithmetic in the same order (a copy, a padding value that "
                                "must be ignored, a determinism rerun): any difference is a bug")

# ------------------------------------------------------------------------------------------
# float64 against float64: only the summation order differs
# ------------------------------------------------------------------------------------------
F64_VECTORIZED_VS_LOOP = Tolerance(0.0, 1e-10, "the vectorised and per-pair loop references sum the same "
                                               "float64 terms in different orders")
F64_PERMUTED = Tolerance(0.0, 1e-13, "permuting images/captions only changes BLAS blocking in float64")
F64_IDENTITY = Tolerance(1e-12, 1e-12, "an algebraic identity (two float64 formulas of one quantity)")
F64_SOFTMAX_SUMS_TO_ONE = Tolerance(0.0, 1e-14, "float64 softmax rows sum to one up to a few ulps")
F64_ATTENDED_CONTEXT = Tolerance(1e-13, 1e-14, "a closed-form attended context against the reference's, "
                                               "float64, a handful of terms")
F64_CHUNKED = Tolerance(0.0, 1e-15, "float64 chunked and whole runs of the CPU kernel: same per-pair sums")
F64_CPU_KERNEL_PARTS = Tolerance(0.0, 1e-13, "float64 CPU kernel parts recombined: a few ulps of order")
F64_BACKEND_AGREE = Tolerance(1e-10, 1e-12, "two float64 implementations of one op (dispatch paths)")
F64_EVALUATION = Tolerance(1e-12, 1e-12, "float64 evaluation streaming against the whole-matrix result")
F64_CHECKPOINT_SCORES = Tolerance(1e-10, 1e-12, "float64 scores of a loaded checkpoint against the "
                                                "public model's formula")
F64_PAIR_BACKWARD = Tolerance(1e-9, 1e-12, "the hand-derived float64 pair backward (the CUDA kernel's "
                                           "formulas) against autograd")
F64_GRADIENT_ASSEMBLY = Tolerance(1e-8, 1e-10, "float64 gradients assembled from per-pair buffers over image "
                                               "chunks against autograd through the loop reference")
F64_RCAR_EQUALS_SCAN = Tolerance(1e-7, 1e-9, "RCAR with its refinement switched off is SCAN; the "
                                             "float64 paths differ by eps placements")
LAPS_REGION_COUNT_EPS = Tolerance(1e-7, 1e-12, "LAPS's i2t mean divides by R_i + 1e-8, the spec by R_i: "
                                              "a relative 1e-8 / R_i, plus float64 rounding")
F64_PAIRS = Tolerance(1e-11, 1e-14, "float64 pair scoring against the all-pairs matrix: same terms, "
                                    "different order")
# Scalars (pytest.approx / math.isclose); an atol of 1e-12 is pytest.approx's default absolute part.
F64_SCALAR_CLOSED_FORM = Tolerance(1e-12, 1e-12, "a float64 scalar against its closed form")
F64_SCALAR_RELATIVE = Tolerance(1e-12, 0.0, "a float64 scalar against its closed form, relative only")
F64_SCALAR_EXACT_FORM = Tolerance(1e-14, 1e-12, "a float64 scalar computed by the same few operations")
F64_SCALAR_FEW_OPS = Tolerance(1e-13, 1e-12, "a float64 score of a hand example of a few operations")
F64_SCALAR_NAIVE_SPEC = Tolerance(1e-11, 1e-13, "a float64 score against the naive scalar transcription "
                                                "of the spec (long sums in another order)")
F64_SCALAR_NORM = Tolerance(1e-13, 1e-15, "a float64 norm against its scalar transcription")
F64_SPARSE_VS_FULL_LOSS = Tolerance(1e-12, 1e-14, "float64 sparse and full hinge losses: same terms")
METRICS = Tolerance(1e-7, 0.0, "recall / rank metrics against a direct count (numpy's default rtol)")
F64_CONVERGENCE_CURVE = Tolerance(1e-9, 0.0, "float64 training curves of two loss paths with the same "
                                             "gradients")
F64_REGRESSION = Tolerance(1e-9, 0.0, "the recorded float64 regression values: BLAS rounding between "
                                      "machines is ~1e-15, a real change is far larger")
F64_REGRESSION_INPUTS = Tolerance(1e-12, 1e-12, "the regression inputs' checksum: seeded float64 draws")
ENSEMBLE_MEAN = Tolerance(1e-7, 0.0, "an ensemble mean against numpy's (numpy's default rtol)")

# ------------------------------------------------------------------------------------------
# float32 results against each other or against float64
# ------------------------------------------------------------------------------------------
F32_SAME_MATH = Tolerance(1e-5, 1e-6, "two float32 computations of one result whose operations differ "
                                      "only in order (loop vs batched, file vs memory)")
F32_REFERENCE_VS_F64 = Tolerance(1e-5, 1e-6, "the float32 reference against the float64 reference on "
                                             "unit-norm data (blocked evaluation)")
F32_BLOCKED = Tolerance(1e-5, 1e-7, "float32 results computed in blocks against the whole-batch run")
F32_STRIDED_VIEW = Tolerance(1e-6, 1e-7, "a strided view against a contiguous copy in float32")
F32_SCAN_ENCODERS_VS_PUBLIC = Tolerance(1e-6, 1e-7, "float32 SCAN encoders of a loaded checkpoint against "
                                                    "the public model's formula")
F32_LEGACY_ENCODERS_VS_PUBLIC = Tolerance(1e-6, 0.0, "float32 encoders of a legacy-format checkpoint against "
                                                     "the public formula (constant input)")
F32_RCAR_CHECKPOINT_VS_PUBLIC = Tolerance(1e-5, 1e-6, "a loaded RCAR checkpoint's float32 encoders and head "
                                                      "against the official formulas")
F32_EXACT_FILE = Tolerance(1e-6, 0.0, "a float32 matrix written and read back, or rescaled exactly")
F32_VS_F64 = Tolerance(1e-4, 1e-5, "float32 results against a float64 computation of the same sums")
F32_PAIRS_VS_F64 = Tolerance(1e-4, 1e-6, "float32 pair scores against the float64 matrix")
F32_PAIRS_ABS = Tolerance(0.0, 1e-5, "float32 pair scores of O(1) size against float64")
F32_ABS = Tolerance(0.0, 1e-4, "a float32 max abs difference of O(1) scores (the CLI's --check)")
F32_CONVERGENCE_CURVE = Tolerance(1e-3, 1e-5, "float32 training curves of a backend against the "
                                              "reference's: rounding grows over the steps")
F64_GRADCHECK = Tolerance(1e-5, 1e-7, "torch.autograd.gradcheck of a float64 kernel against finite differences")
# Triton RCAR uses the Gram identity (sum_k alpha_k x_k . y = alpha (X y)) while CPU and CUDA build
# the attended context first: in float32 the two round differently, more than the 1e-4 rule.
GRAM_IDENTITY_VS_ATTENDED_CONTEXT = Tolerance(2e-4, 2e-5, "float32 Triton RCAR (Gram identity) against "
                                                          "CUDA/CPU RCAR (attended context)")
# SCAN CUDA against Triton: two kernels, each within the reference rule, compared with each other.
CUDA_VS_TRITON = {torch.float32: Tolerance(1e-4, 1e-4, "float32 SCAN CUDA vs Triton"),
                  torch.float16: Tolerance(2e-3, 2e-3, "float16 SCAN CUDA vs Triton")}
CUDA_VS_TRITON_SCALE_FLOOR = 1e-6       # a |value| below which the relative bound uses this scale
CUDA_VS_TRITON_FACTOR = 10.0            # gradients: 10x the forward rtol, relative to max |gradient|

# The reference itself run in a lower precision: max abs error of unit-norm scores against float64.
REFERENCE_LOW_PRECISION_ABS = {
    dtype: Tolerance(0.0, atol, f"the float64 reference's formulas evaluated in {dtype}, unit-norm inputs")
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 5e-2))}

# ------------------------------------------------------------------------------------------
# Inputs and benchmark bookkeeping (an atol of 1e-12 is pytest.approx's default absolute part)
# ------------------------------------------------------------------------------------------
UNIT_NORM_F32 = Tolerance(1.3e-6, 1e-5, "the norm of an l2-normalised float32 vector (torch.testing's "
                                        "float32 default)")
SAME_CALL_OTHER_ARGUMENT_FORM = Tolerance(1.3e-6, 1e-5, "one float32 call with an argument in another form "
                                                        "(list / array / tensor lens, numpy scalar): "
                                                        "torch.testing's float32 default")
HALF_STORAGE = Tolerance(0.0, 1e-3, "unit-norm float32 features stored in float16")
UNIT_NORM_BF16 = Tolerance(1e-5, 1e-2, "the norm of a unit vector rounded to bfloat16")
CSV_DERIVED = Tolerance(1e-4, 1e-12, "a CSV column derived from others, all written to 6 significant digits")
CSV_EXACT_COUNT = Tolerance(1e-5, 1e-12, "an exact count (FLOPs) written as a float")
CSV_EXTRAPOLATED = Tolerance(1e-3, 1e-12, "an extrapolation factor and time written to 4 digits (.4g)")
FLOPS_GEMM_SHARE = Tolerance(0.1, 0.0, "SCAN's FLOP model over many pairs is the region-word GEMM's "
                                        "within 10% (the softmax and norms are the rest)")
BENCH_FP32_ERROR = 1e-4                 # err_vs_reference of a float32 benchmark row (the 1e-4 rule)
BENCH_SPARSE_LOSS_ERROR = 1e-5          # sparse vs full loss of a benchmark row (float32 sums)
BENCH_LOW_PRECISION_ERROR = 5e-2        # err_vs_reference of a bfloat16 baseline row (relative)

# ------------------------------------------------------------------------------------------
# Thresholds that a difference must EXCEED (an effect the test shows is real)
# ------------------------------------------------------------------------------------------
MUST_DIFFER = 1e-6                      # dropout / random masks really changed the scores


# ------------------------------------------------------------------------------------------
# The comparator
# ------------------------------------------------------------------------------------------
_FIRST = 5                              # how many NaN/Inf disagreement indices a report lists


def _as_tensor(x):
    return torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def _index(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat_index), tuple(shape))) if shape else ()


def mismatch_report(got, want, allowed, *, what="result", bound="", equal_nan=False, finite_only=False):
    """None when every element of `got` agrees with `want` (|got - want| <= allowed, where
    `allowed` is a number or a tensor broadcast to the shape), else a message with: how many
    elements differ out of how many, the worst index and its two values, the max abs and relative
    error against the bound, and where one side is finite and the other is not.
    Non-finite values agree only when equal (inf == inf; NaN == NaN if equal_nan); with
    finite_only any non-finite value in `got` is a mismatch."""
    got64, want64 = _as_tensor(got).detach().cpu().double(), _as_tensor(want).detach().cpu().double()
    assert got64.shape == want64.shape, f"{what}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
    allowed = torch.as_tensor(allowed, dtype=torch.float64).expand(got64.shape)
    fin_got, fin_want = torch.isfinite(got64), torch.isfinite(want64)
    both = fin_got & fin_want
    diff = torch.where(both, (got64 - want64).abs(), torch.zeros_like(got64))
    nonfinite_same = ~fin_got & ~fin_want & ((got64 == want64) | (got64.isnan() & want64.isnan() & equal_nan))
    bad = (both & ~(diff <= allowed)) | (fin_got != fin_want) | (~fin_got & ~fin_want & ~nonfinite_same)
    if finite_only:
        bad |= ~fin_got
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None
    shape = got64.shape
    worst = int(torch.where(bad, diff, torch.full_like(diff, -1.0)).flatten().argmax())
    if not bool(both.flatten()[worst]) or float(diff.flatten()[worst]) == 0.0:
        worst = int(bad.flatten().nonzero()[0])          # a non-finite mismatch: its first position
    scale = float(want64[fin_want].abs().max()) if bool(fin_want.any()) else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = diff / want64.abs()
    max_rel = float(rel[both & (diff > 0)].max()) if bool((both & (diff > 0)).any()) else 0.0
    disagree = (fin_got != fin_want).flatten().nonzero().flatten()
    lines = [
        f"{what}: {n_bad} / {got64.numel()} elements differ",
        f"  worst at index {_index(worst, shape)}: got {got64.flatten()[worst].item()!r}, "
        f"want {want64.flatten()[worst].item()!r}",
        f"  max abs error {max_abs:.3e}, max relative error {max_rel:.3e} "
        f"(max abs / max|want| {max_abs / scale if scale else float('inf'):.3e}); bound {bound}",
        f"  NaN/Inf disagreement (one side finite, the other not): {disagree.numel()} positions"
        + (f", first {[_index(i, shape) for i in disagree[:_FIRST].tolist()]}" if disagree.numel() else ""),
    ]
    if finite_only and not bool(fin_got.all()):
        lines.append(f"  non-finite values in the result: {int((~fin_got).sum())}")
    return "\n".join(lines)


def assert_close(got, want, tol: Tolerance, *, what="result", check_dtype=True, equal_nan=False):
    """torch.testing.assert_close(got, want, rtol=tol.rtol, atol=tol.atol) (same shape, dtype,
    device and elementwise bound, NaN never equal unless equal_nan) with mismatch_report's message.
    check_dtype=False (dtype and device free) replaces np.testing.assert_allclose."""
    got_t, want_t = _as_tensor(got), _as_tensor(want)
    assert got_t.shape == want_t.shape, f"{what}: shape {tuple(got_t.shape)} != {tuple(want_t.shape)}"
    if check_dtype:
        assert got_t.dtype == want_t.dtype, f"{what}: dtype {got_t.dtype} != {want_t.dtype}"
        assert got_t.device == want_t.device, f"{what}: device {got_t.device} != {want_t.device}"
    allowed = tol.atol + tol.rtol * want_t.detach().cpu().double().abs()
    report = mismatch_report(got_t, want_t, allowed, what=what, equal_nan=equal_nan,
                             bound=f"atol {tol.atol:g} + rtol {tol.rtol:g} x |want| ({tol.why})")
    assert report is None, report


def assert_scaled_close(got, want, tol: Tolerance, *, what="result", scale=None):
    """max |got - want| <= tol.rtol * scale + tol.atol, scale = max |want| by default (the
    reference rule's form: relative to the result's size, not to each element)."""
    scale = _as_tensor(want).detach().abs().max().item() if scale is None else scale
    bound = tol.rtol * scale + tol.atol
    report = mismatch_report(got, want, bound, what=what, finite_only=True,
                             bound=f"{bound:.3e} = rtol {tol.rtol:g} x scale {scale:.3e} + atol {tol.atol:g} "
                                   f"({tol.why})")
    assert report is None, report


def assert_bit_equal(got, want, *, what="result"):
    assert_close(got, want, BIT_EQUAL, what=what)


def approx(expected, tol: Tolerance):
    """pytest.approx with a table tolerance (for scalars and lists of scalars)."""
    import pytest
    return pytest.approx(expected, rel=tol.rtol, abs=tol.atol)


# ------------------------------------------------------------------------------------------
# The reference rule
# ------------------------------------------------------------------------------------------

def max_abs_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return (out.double() - ref64.double()).abs().max().item()


def error_and_bound(out, ref64, *, dtype, ref_lowp=None):
    """(max abs error of `out` against the float64 reference, the bound the rule allows).
    Non-finite values in `out` give an infinite error. The one place the rule is written:
    assert_close_to_reference and scripts/gpu_correctness.py both use it."""
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    err = max_abs_error(out, ref64) if bool(torch.isfinite(out).all()) else float("inf")
    tol = TOLERANCES[dtype]
    if dtype in (torch.float64, torch.float32):
        return err, tol.rtol * ref64.abs().max().item() + tol.atol
    assert ref_lowp is not None, "low-precision checks need the reference run in the same dtype"
    return err, LOW_PRECISION_FACTOR * max_abs_error(ref_lowp, ref64) + tol.atol


def _rule_text(ref64, *, dtype, ref_lowp):
    tol = TOLERANCES[dtype]
    if dtype in (torch.float64, torch.float32):
        return f"rtol {tol.rtol:g} x |ref|max {ref64.abs().max().item():.3e} + atol {tol.atol:g} ({dtype})"
    return (f"2 x reference's own {dtype} error {max_abs_error(ref_lowp, ref64):.3e} "
            f"+ atol {tol.atol:g}")


def assert_close_to_reference(out, ref64, *, dtype, ref_lowp=None, what="result"):
    """out: the kernel's result; ref64: reference in float64; ref_lowp: the reference run in
    `dtype` (needed for float16/bfloat16). Non-finite values anywhere fail. On failure the
    message names the mismatch count, the worst index and the NaN/Inf disagreement."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    err, bound = error_and_bound(out, ref64, dtype=dtype, ref_lowp=ref_lowp)
    if err <= bound:
        return
    report = mismatch_report(out, ref64, bound, what=what, finite_only=True,
                             bound=f"{bound:.3e} = {_rule_text(ref64, dtype=dtype, ref_lowp=ref_lowp)}")
    raise AssertionError(report or f"{what}: max abs error {err:.3e} > {bound:.3e}")
