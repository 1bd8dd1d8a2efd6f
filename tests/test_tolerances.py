"""The comparator of tests/tolerances.py: silent when results agree, and on a mismatch a message
with the facts a reader needs (how many elements, where the worst is and its two values, the
errors against the bound, where one side is finite and the other is not)."""
import math

import pytest
import torch

from tests import tolerances
from tests.tolerances import (BIT_EQUAL, F32_SAME_MATH, Tolerance, assert_close, assert_close_to_reference,
                              error_and_bound, mismatch_report)


def _crafted():
    want = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 7
    got = want.clone()
    got[1, 2, 3] += 0.5                      # the worst mismatch
    got[0, 1, 1] += 0.01                     # a second one
    got[0, 0, 2] = float("nan")              # finite reference, NaN result
    want_nonfinite = want.clone()
    want_nonfinite[1, 0, 0] = float("inf")   # infinite reference, finite result
    return got, want_nonfinite


def test_agreeing_inputs_pass():
    want = torch.randn(3, 5, dtype=torch.float64)
    assert mismatch_report(want.clone(), want, 0.0) is None
    assert_close(want + 1e-7 * want, want, F32_SAME_MATH)
    assert_close(torch.tensor([float("inf"), 1.0]), torch.tensor([float("inf"), 1.0]), BIT_EQUAL)
    assert_close_to_reference(want.float(), want, dtype=torch.float32)


def test_mismatch_message_has_count_worst_index_errors_and_nan_map():
    got, want = _crafted()
    with pytest.raises(AssertionError) as caught:
        assert_close(got, want, Tolerance(0.0, 1e-3, "crafted"), what="crafted")
    message = str(caught.value)
    assert "crafted: 4 / 24 elements differ" in message
    assert "worst at index (1, 2, 3)" in message
    assert f"got {got[1, 2, 3].item()!r}, want {want[1, 2, 3].item()!r}" in message
    assert "max abs error 5.000e-01" in message
    assert f"max relative error {0.5 / want[1, 2, 3].item():.3e}" in message
    assert "bound atol 0.001 + rtol 0 x |want| (crafted)" in message
    assert "NaN/Inf disagreement (one side finite, the other not): 2 positions, first [(0, 0, 2), (1, 0, 0)]" \
        in message


def test_reference_rule_message_names_the_rule_and_nonfinite_results():
    want = torch.linspace(-1, 1, 10, dtype=torch.float64)
    got = want.float().clone()
    got[3] = float("nan")
    got[7] += 0.25
    with pytest.raises(AssertionError) as caught:
        assert_close_to_reference(got, want, dtype=torch.float32, what="kernel")
    message = str(caught.value)
    assert "kernel: 2 / 10 elements differ" in message and "worst at index (7,)" in message
    assert "rtol 0.0001 x |ref|max 1.000e+00" in message
    assert "1 positions, first [(3,)]" in message and "non-finite values in the result: 1" in message


def test_error_and_bound_keeps_its_rule():
    # scripts/gpu_correctness.py calls it positionally with keywords dtype / ref_lowp.
    want = torch.ones(4, dtype=torch.float64)
    err, bound = error_and_bound(want.float() + 2.0 ** -10, want, dtype=torch.float32)
    fp32, fp16 = tolerances.TOLERANCES[torch.float32], tolerances.TOLERANCES[torch.float16]
    assert err == 2.0 ** -10 and bound == fp32.rtol * 1.0 + fp32.atol
    lowp = want.half() + 2.0 ** -6
    err, bound = error_and_bound(lowp, want, dtype=torch.float16, ref_lowp=lowp)
    assert err == 2.0 ** -6 and bound == 2 * err + fp16.atol
    assert error_and_bound(torch.full((4,), math.nan), want, dtype=torch.float32)[0] == math.inf


def test_dtype_and_nan_are_checked_like_torch_testing():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(x, x.double(), BIT_EQUAL)
    assert_close(x, x.double(), BIT_EQUAL, check_dtype=False)
    nan = torch.tensor([math.nan])
    with pytest.raises(AssertionError, match="1 / 1 elements differ"):
        assert_close(nan, nan, BIT_EQUAL)
    assert_close(nan, nan, BIT_EQUAL, equal_nan=True)


def test_every_table_entry_says_why():
    named = [v for v in vars(tolerances).values() if isinstance(v, Tolerance)]
    named += [v for d in vars(tolerances).values() if isinstance(d, dict) for v in d.values()
              if isinstance(v, Tolerance)]
    assert len(named) > 30
    assert all(t.why and t.rtol >= 0 and t.atol >= 0 for t in named)
