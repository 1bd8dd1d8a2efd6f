"""The one tolerance table of the test suite, and the comparison rule every kernel test uses.

Rule (flash-attention's): compare a result against the reference computed in float64.
* float64 results: agree to float64 rounding.
* float32 results: relative error (max abs error / max abs of the reference) under 1e-4.
* float16 / bfloat16 inputs: the kernel's max abs error may be at most 2x that of the
  reference run in the same low precision, plus a small atol.
"""
import torch

# dtype -> (rtol, atol) for the direct comparison; low precisions use the 2x rule on top.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=0.0, atol=1e-3),
    torch.bfloat16: dict(rtol=0.0, atol=8e-3),
}
LOW_PRECISION_FACTOR = 2.0


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
        return err, tol["rtol"] * ref64.abs().max().item() + tol["atol"]
    assert ref_lowp is not None, "low-precision checks need the reference run in the same dtype"
    return err, LOW_PRECISION_FACTOR * max_abs_error(ref_lowp, ref64) + tol["atol"]


def assert_close_to_reference(out, ref64, *, dtype, ref_lowp=None, what="result"):
    """out: the kernel's result; ref64: reference in float64; ref_lowp: the reference run in
    `dtype` (needed for float16/bfloat16). Non-finite values anywhere fail."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite values in the result"
    err, bound = error_and_bound(out, ref64, dtype=dtype, ref_lowp=ref_lowp)
    if dtype in (torch.float64, torch.float32):
        scale = ref64.abs().max().item()
        assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e} ({dtype}, |ref|max {scale:.3e})"
        return
    ref_err = max_abs_error(ref_lowp, ref64)
    assert err <= bound, (f"{what}: max abs error {err:.3e} > 2 x reference's own {dtype} error "
                          f"{ref_err:.3e} + atol {TOLERANCES[dtype]['atol']:.0e}")
