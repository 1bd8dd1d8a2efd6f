"""Property-based tests of the public entry points (hypothesis).

Random shapes, ragged lengths, strides (non-contiguous inputs), float32/float64, option values
including hostile ones (zero, negative, NaN, huge and tiny smooth / lse_lambda / margin) and
NaN/Inf placed in caption padding (allowed) or in real words / regions (refused). Every outcome
must be one of two, decided by an independent predicate on the drawn case:

* the case is invalid -> a ValueError / TypeError naming the offending argument, and nothing
  else (no other exception, no result);
* the case is valid -> agreement with the float64 reference within tests/tolerances.py.

CI-friendly: derandomized (the same examples every run), no deadline, no example database;
RCAR_FAST_PROPERTY_EXAMPLES sets the examples per test (default 150: about 10 s for the file
on two cores). Only the C++ CPU and reference backends run: Triton's interpreter is too slow
for many examples.
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

import rcar_fast
from rcar_fast import contract, dispatch, reference, validate
from rcar_fast.losses import vse_hinge_loss
from tests.tolerances import assert_close_to_reference

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("RCAR_FAST_PROPERTY_EXAMPLES", "150")),
    derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NATIVE = dispatch.rejection("scan", "cpu", torch.device("cpu"), torch.float32) is None
BACKENDS = ("cpu", "reference") if NATIVE else ("reference",)
DTYPES = (torch.float32, torch.float64)

# Hostile values sit beside ordinary ones; validate's limits decide which are valid.
TEMPERATURES = st.one_of(
    st.floats(0.5, 30.0),
    st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-300, 1e-3, 1e3, 1.01e3,
                     1e6, 1.01e6, 3.5e38, 1e39]))
LSE_LAMBDAS = st.one_of(
    st.floats(0.5, 30.0),
    st.sampled_from([0.0, -2.0, float("nan"), float("inf"), 1e-31, 1e-30, 1e-3, 1e10, 1e20, 1e300]))
PLACEMENTS = ("none", "nan_padding", "inf_padding", "nan_real_word", "inf_region")


def _smooth_errors(value, dtype, name="smooth") -> list:
    """The messages validate may give for a softmax temperature (empty: it is valid)."""
    if not (value > 0 and math.isfinite(value)):
        return [f"{name} must be a positive finite number"]
    if value > validate.SMOOTH_LIMITS.get(dtype, validate.SMOOTH_LIMITS[torch.float32]):
        return [f"{name} must be at most"]
    return []


def _lse_errors(value) -> list:
    if not (value > 0 and math.isfinite(value)):
        return ["lse_lambda must be a positive finite number"]
    return ["lse_lambda must be at least"] if value < validate.LSE_LAMBDA_MIN else []


@st.composite
def feature_case(draw, same_count=False, min_d=1):
    """(img, cap, lens, placement) as float64 tensors, laid out contiguously or not."""
    n_img = draw(st.integers(1, 4))
    n_cap = n_img if same_count else draw(st.integers(1, 5))
    R, d, Lmax = draw(st.integers(1, 9)), draw(st.integers(min_d, 10)), draw(st.integers(1, 8))
    lens = draw(st.lists(st.integers(1, Lmax), min_size=n_cap, max_size=n_cap))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    placement = draw(st.sampled_from(PLACEMENTS))
    g = torch.Generator().manual_seed(seed)
    img = _laid_out(torch.randn(n_img, R, d, dtype=torch.float64, generator=g), layout)
    cap = _laid_out(torch.randn(n_cap, Lmax, d, dtype=torch.float64, generator=g), layout)
    lens_t = torch.tensor(lens)
    padding = torch.arange(Lmax)[None, :] >= lens_t[:, None]
    if placement in ("nan_padding", "inf_padding") and bool(padding.any()):
        cap[padding] = float("nan") if placement == "nan_padding" else float("inf")
    elif placement == "nan_real_word":
        j = draw(st.integers(0, n_cap - 1))
        cap[j, draw(st.integers(0, lens[j] - 1)), draw(st.integers(0, d - 1))] = float("nan")
    elif placement == "inf_region":
        img[draw(st.integers(0, n_img - 1)), draw(st.integers(0, R - 1)), 0] = -float("inf")
    else:
        placement = "none" if placement in ("nan_padding", "inf_padding") else placement
    return img, cap, lens, placement


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x, stored contiguously, with the two leading axes swapped in memory,
    or every other element of a wider buffer."""
    if layout == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 7.0, dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def _input_errors(placement) -> list:
    return {"nan_real_word": ["cap holds NaN or Inf at real word"],
            "inf_region": ["img holds NaN or Inf"]}.get(placement, [])


def _cast(x: torch.Tensor, dtype) -> torch.Tensor:
    """x in dtype, keeping its strides (a cast of a non-contiguous tensor stays non-contiguous)."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=dtype)
    out.copy_(x)
    return out


def _refuses_or_returns(call, errors: list):
    """call()'s result if `errors` is empty; else asserts that it raises ValueError / TypeError
    with one of the messages in `errors` (any of them: which check runs first is not the point)."""
    if not errors:
        hypothesis.event("valid: compared with the float64 reference")
        return call()
    hypothesis.event("invalid: refused")
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    assert any(re.search(pattern, str(caught.value)) for pattern in errors), (
        f"expected an error matching one of {errors}, got {caught.value!r}")
    return None


# ---------------------------------------------------------------------------------------------
# scan_similarity
# ---------------------------------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(case=feature_case(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       direction=st.sampled_from(contract.DIRECTIONS),
       raw_norm=st.sampled_from(contract.RAW_NORMS),
       agg=st.sampled_from(contract.AGGREGATIONS), smooth=TEMPERATURES, lse_lambda=LSE_LAMBDAS)
def test_scan_similarity_refuses_or_agrees(case, dtype, backend, direction, raw_norm, agg, smooth, lse_lambda):
    img, cap, lens, placement = case
    kw = dict(direction=direction, raw_norm=raw_norm, agg=agg, smooth=smooth, lse_lambda=lse_lambda)

    def call():
        return rcar_fast.scan_similarity(_cast(img, dtype), _cast(cap, dtype), lens, backend=backend, **kw)

    out = _refuses_or_returns(call, _lse_errors(lse_lambda) + _smooth_errors(smooth, dtype)
                              + _input_errors(placement))
    if out is None:
        return
    assert out.shape == (img.shape[0], cap.shape[0]) and out.dtype == dtype
    ref = reference.scan_similarity_vectorized(img, cap, torch.tensor(lens), **kw)
    assert_close_to_reference(out, ref, dtype=dtype, what=f"scan {backend} {kw} {dtype}")


@PROPERTY_SETTINGS
@given(case=feature_case(min_d=2), dtype=st.sampled_from(DTYPES), direction=st.sampled_from(contract.DIRECTIONS),
       agg=st.sampled_from(contract.AGGREGATIONS),
       smooth=st.one_of(st.floats(0.5, 30.0), st.just(1e-3)),
       lse_lambda=st.one_of(st.floats(0.5, 30.0), st.sampled_from([1e-30, 1e10, 1e20])))
def test_scan_cpu_gradients_agree(case, dtype, direction, agg, smooth, lse_lambda):
    # d >= 2: with d = 1 every cosine is +-1, its gradient is exactly zero in float64 and float32
    # rounding of the cancelling terms (~1e-6) would be measured against a zero scale.
    if not NATIVE:
        pytest.skip("the native extension is not built")
    img, cap, lens, placement = case
    if _input_errors(placement) or (agg == "lse" and lse_lambda > 1e12 and dtype == torch.float32):
        return  # refusals are covered above; fp32 gradients at lambda 1e20 are exact ties
    kw = dict(direction=direction, agg=agg, smooth=smooth, lse_lambda=lse_lambda)
    lens_t = torch.tensor(lens)
    weights = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64,
                          generator=torch.Generator().manual_seed(len(lens)))
    got = [_cast(img, dtype).requires_grad_(), _cast(cap, dtype).requires_grad_()]
    (rcar_fast.scan_similarity(*got, lens, backend="cpu", **kw) * weights.to(dtype)).sum().backward()
    want = [img.clone().requires_grad_(), cap.clone().requires_grad_()]
    (reference.scan_similarity_vectorized(*want, lens_t, **kw) * weights).sum().backward()
    real = (torch.arange(cap.shape[1])[None, :] < lens_t[:, None])[..., None]
    assert bool((got[1].grad[~real.expand_as(cap)] == 0).all()), "padding must get zero gradient"
    assert_close_to_reference(got[0].grad, want[0].grad, dtype=dtype, what=f"d img {kw}")
    assert_close_to_reference(got[1].grad, torch.where(real, want[1].grad, 0.0), dtype=dtype, what=f"d cap {kw}")


# ---------------------------------------------------------------------------------------------
# RCARSimilarity, score_pairs, hardest_negative_loss, gram
# ---------------------------------------------------------------------------------------------

@st.composite
def rcar_head(draw, d):
    regulator = draw(st.sampled_from(contract.REGULATORS))
    steps = draw(st.integers(0 if regulator == "only_rcr" else 1, 2))
    return dict(embed_dim=d, sim_dim=draw(st.integers(2, 6)), regulator=regulator, steps=steps,
                direction=draw(st.sampled_from(contract.DIRECTIONS)), smooth=draw(TEMPERATURES))


@PROPERTY_SETTINGS
@given(data=st.data(), case=feature_case(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS))
def test_rcar_similarity_refuses_or_agrees(data, case, dtype, backend):
    img, cap, lens, placement = case
    options = data.draw(rcar_head(img.shape[2]))
    if not (options["smooth"] > 0 and math.isfinite(options["smooth"])):
        _refuses_or_returns(lambda: rcar_fast.RCARSimilarity(**options), ["smooth must be a positive finite"])
        return
    torch.manual_seed(len(lens))
    head = rcar_fast.RCARSimilarity(**options).eval()
    with torch.no_grad():
        for p in head.parameters():  # the official init zeroes the biases: make them count
            if p.dim() == 1:
                p.normal_(0.0, 0.3)

    def call():
        with torch.no_grad():
            return head.to(dtype)(_cast(img, dtype), _cast(cap, dtype), lens, backend=backend)

    out = _refuses_or_returns(call, _input_errors(placement) + _smooth_errors(options["smooth"], dtype,
                                                                                "the head's smooth"))
    if out is None:
        return
    with torch.no_grad():
        ref = head.double().forward_vectorized(img, cap, torch.tensor(lens))
    assert_close_to_reference(out, ref, dtype=dtype, what=f"rcar {backend} {options} {dtype}")


@PROPERTY_SETTINGS
@given(data=st.data(), case=feature_case(), dtype=st.sampled_from(DTYPES),
       backend=st.sampled_from(BACKENDS + ("reference_loop",)), smooth=TEMPERATURES)
def test_score_pairs_refuses_or_agrees(data, case, dtype, backend, smooth):
    img, cap, lens, placement = case
    n_pairs = data.draw(st.integers(0, 8))
    img_idx = data.draw(st.lists(st.integers(0, img.shape[0] - 1), min_size=n_pairs, max_size=n_pairs))
    cap_idx = data.draw(st.lists(st.integers(0, cap.shape[0] - 1), min_size=n_pairs, max_size=n_pairs))

    def call():
        return rcar_fast.score_pairs(_cast(img, dtype), _cast(cap, dtype), lens, img_idx, cap_idx,
                                     backend=backend, smooth=smooth)

    out = _refuses_or_returns(call, _input_errors(placement) + _smooth_errors(smooth, dtype))
    if out is None:
        return
    assert out.shape == (n_pairs,)
    if n_pairs:
        ref = reference.scan_similarity_vectorized(img, cap, torch.tensor(lens), smooth=smooth)
        assert_close_to_reference(out, ref[img_idx, cap_idx], dtype=dtype, what=f"pairs {backend}")


@PROPERTY_SETTINGS
@given(case=feature_case(same_count=True), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       margin=st.one_of(st.floats(0.0, 1.0), st.sampled_from([-0.1, float("nan"), float("inf")])),
       score_fault=st.sampled_from(["none", "nan_off_diagonal", "inf_off_diagonal", "nan_diagonal"]),
       reduction=st.sampled_from(["sum", "mean"]))
def test_hardest_negative_loss_refuses_or_agrees(case, dtype, backend, margin, score_fault, reduction):
    img, cap, lens, placement = case
    B = img.shape[0]

    def score_fn(i, c, n):
        scores = reference.scan_similarity_vectorized(i, c, n)
        if score_fault == "nan_diagonal":
            scores.fill_diagonal_(float("nan"))
        elif score_fault != "none":
            scores[0, B - 1] = float("nan") if score_fault == "nan_off_diagonal" else float("inf")
        return scores

    def call():
        return rcar_fast.hardest_negative_loss(_cast(img, dtype), _cast(cap, dtype), lens, margin=margin,
                                               score_fn=score_fn, pair_backend=backend, reduction=reduction)

    errors = _input_errors(placement)
    errors += ["B >= 2"] if B < 2 else []
    errors += [] if margin >= 0 and math.isfinite(margin) else ["margin must be a finite number >= 0"]
    errors += ["score_fn returned NaN or Inf"] if score_fault in ("nan_off_diagonal", "inf_off_diagonal") else []
    out = _refuses_or_returns(call, errors)
    if out is None:
        return
    ref = vse_hinge_loss(reference.scan_similarity_vectorized(img, cap, torch.tensor(lens)), margin,
                         max_violation=True, reduction=reduction)
    assert_close_to_reference(out[None], ref[None], dtype=dtype, what=f"loss {backend} margin={margin}")


@PROPERTY_SETTINGS
@given(n=st.integers(1, 4), R=st.integers(1, 12), d=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]), poison=st.booleans())
def test_gram_refuses_or_agrees(n, R, d, seed, dtype, backend, layout, poison):
    x = _laid_out(torch.randn(n, R, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)), layout)
    if poison:
        x[n - 1, R - 1, d - 1] = float("nan")
    out = _refuses_or_returns(lambda: rcar_fast.gram(_cast(x, dtype), backend=backend),
                              ["x holds NaN or Inf"] if poison else [])
    if out is None:
        return
    assert_close_to_reference(out, x @ x.transpose(1, 2), dtype=dtype, what=f"gram {backend}")
