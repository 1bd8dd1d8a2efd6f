"""Shared inputs and checks of the S-only head tests (rcar_fast.max_similarity / maxsim, HEADS.md).

Every backend test of the heads draws its inputs here, so that "ragged on both sides, NaN in
the padding of img and cap, exact ties, L = 1, R = 1, all-negative S" and the settings grid
(direction x pool x leaky x normalize) are written once:

    CASES[name](dtype=..., device=..., seed=...) -> HeadCase   (img, cap, lens, img_lens)
    settings_grid() -> [dict of max_similarity keywords], settings_id(settings) -> a test id
        (exhaustive=False: a pairwise-covering subset unless RCAR_FAST_FULL_TESTS=1, conftest.py)
    reference_scores(case, settings) -> the float64 reference (or in another dtype)
    assert_head_matches_reference(case, settings, backend=..., dtype=...): forward and both
        gradients of a backend against the float64 reference, by the project's rule
    poisoned_allocations(): torch.empty / empty_like / new_empty return NaN-filled tensors, so
        an output entry a kernel forgets to write shows up.

A backend test typically reads

    @pytest.mark.parametrize("settings", settings_grid(), ids=settings_id)
    def test_cpu_matches_the_reference(settings):
        assert_head_matches_reference(CASES["ragged"](dtype=torch.float32), settings, backend="cpu",
                                      dtype=torch.float32)
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools

import torch

import rcar_fast
from rcar_fast import validate
from rcar_fast.contract import HEAD_DIRECTIONS, HEAD_NORMALIZATIONS, POOLS
from rcar_fast.ops.maxsim import DEFAULTS
from rcar_fast.reference_heads import max_similarity_reference
from tests.conftest import sweep
from tests.inputs import NAN, ragged_lengths, real_words
from tests.tolerances import assert_close_to_reference

F64 = torch.float64

# The grid's temperature: large enough that float32 lse / softmax stay within the 1e-4 rule
# on O(1) scores, small enough that the softmax is far from uniform.
GRID_TAU = 0.5
GRID_BOTH_SCALE = 0.5


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def settings_grid(directions=HEAD_DIRECTIONS, pools=POOLS, leaky=(False, True),
                  normalize=HEAD_NORMALIZATIONS, tau=GRID_TAU, both_scale=GRID_BOTH_SCALE,
                  exhaustive=True) -> list:
    """max_similarity keyword dicts over direction x pool x leaky x normalize: every combination,
    or with exhaustive=False (the slow backends' tests: the Triton interpreter) a
    pairwise-covering subset unless RCAR_FAST_FULL_TESTS=1 (each direction x pool, pool x
    leaky, ... pair at least once: every code path of a setting, and every interaction of two,
    at a quarter of the cost of the full grid)."""
    axes = (directions, pools, leaky, normalize)
    rows = itertools.product(*axes) if exhaustive else sweep(*axes)
    return [dict(direction=d, pool=p, leaky=lk, normalize=n, tau=tau, both_scale=both_scale)
            for d, p, lk, n in rows]


def settings_id(settings: dict) -> str:
    parts = [settings.get("direction", "t2i"), settings.get("pool", "mean")]
    if settings.get("leaky"):
        parts.append("leaky")
    if settings.get("normalize", "none") != "none":
        parts.append(settings["normalize"])
    if settings.get("coding", "max") != "max":
        parts.append(settings["coding"])
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class HeadCase:
    """img (n_img, R, d), cap (n_cap, L, d), lens (n_cap,), img_lens (n_img,) int64; the padding
    (regions >= img_lens, words >= lens) holds `pad`."""
    name: str
    img: torch.Tensor
    cap: torch.Tensor
    lens: torch.Tensor
    img_lens: torch.Tensor

    def to(self, dtype=None, device=None) -> "HeadCase":
        move = dict(dtype=dtype or self.img.dtype, device=device or self.img.device)
        return HeadCase(self.name, self.img.to(**move), self.cap.to(**move),
                        self.lens.to(move["device"]), self.img_lens.to(move["device"]))

    def with_padding(self, value) -> "HeadCase":
        """A copy with `value` in every padding position of img and cap."""
        return HeadCase(self.name, _pad(self.img, self.img_lens, value), _pad(self.cap, self.lens, value),
                        self.lens, self.img_lens)

    def requiring_grad(self) -> "HeadCase":
        return HeadCase(self.name, self.img.detach().clone().requires_grad_(),
                        self.cap.detach().clone().requires_grad_(), self.lens, self.img_lens)

    def args(self):
        """(img, cap, lens) and {"img_lens": ...}: max_similarity(*case.args()[0], **case.args()[1])."""
        return (self.img, self.cap, self.lens), {"img_lens": self.img_lens}


def _pad(x: torch.Tensor, lengths: torch.Tensor, value) -> torch.Tensor:
    x = x.detach().clone()
    x[~real_words(lengths.to(x.device), x.shape[1])] = value
    return x


def _finish(name, img, cap, lens, img_lens, dtype, device, pad) -> HeadCase:
    case = HeadCase(name, img, cap, lens, img_lens)
    if pad is not None:
        case = case.with_padding(pad)
    return case.to(dtype, device)


def ragged_case(n_img=3, n_cap=4, R=5, L=6, d=8, *, dtype=F64, device="cpu", seed=0, pad=NAN,
                scale=1.0) -> HeadCase:
    """Random features, ragged on both sides (the first image and caption full, the last of
    length 1), NaN padding by default."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, R, d, generator=gen, dtype=F64) * scale
    cap = torch.randn(n_cap, L, d, generator=gen, dtype=F64) * scale
    lens = ragged_lengths(n_cap, L, generator=gen)
    img_lens = ragged_lengths(n_img, R, generator=gen)
    return _finish("ragged", img, cap, lens, img_lens, dtype, device, pad)


def _power_of_two_norm_vectors(n: int, M: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(n, M, d) small-integer vectors whose norms are powers of 2: m (1 or 2) times a random
    sign on k (1, or 4 when d >= 4) random coordinates, norm m sqrt(k) in {1, 2, 4}. Unit
    normalised, their entries are 0, +-1/2 or +-1, so every product and sum of them is exact in
    any dtype: a dot product that is 0 (or equal to another) in exact arithmetic is exactly 0
    (equal) whatever the GEMM's blocking, summation order or FMA use. Arbitrary integer vectors
    lose this to the division: with norm sqrt(13), 2/sqrt(13) * 1/sqrt(2) - 2/sqrt(13) *
    1/sqrt(2) came out as 0 from one BLAS kernel and 1.3e-17 from another (an S tied at 0, on
    the two sides of leaky's kink)."""
    support = torch.where(torch.rand(n, M, 1, generator=gen) < 0.5, 1, 4 if d >= 4 else 1)
    ranks = torch.rand(n, M, d, generator=gen).argsort(dim=-1).argsort(dim=-1)
    signs = torch.randint(0, 2, (n, M, d), generator=gen) * 2 - 1
    magnitude = torch.randint(1, 3, (n, M, 1), generator=gen)
    return ((ranks < support) * signs * magnitude).to(F64)


def tie_case(n_img=3, n_cap=4, R=5, L=6, d=4, *, dtype=F64, device="cpu", seed=0, pad=NAN) -> HeadCase:
    """Small-integer features with repeated regions and words: exact ties in the max over
    regions (t2i), over words (i2t) and among the pooled maxima (pool="max"), in every dtype and
    with either normalisation (products and sums of small integers are exact in bfloat16 too;
    the vectors' norms are powers of 2, so normalize="unit" keeps them exact:
    _power_of_two_norm_vectors)."""
    gen = torch.Generator().manual_seed(seed)
    img = _power_of_two_norm_vectors(n_img, R, d, gen)
    cap = _power_of_two_norm_vectors(n_cap, L, d, gen)
    img[:, 1] = img[:, 0]                 # region 1 repeats region 0
    cap[:, 1] = cap[:, 0]                 # word 1 repeats word 0
    if L > 3:
        cap[:, 3] = cap[:, 2]
    lens = ragged_lengths(n_cap, L, min_len=2, generator=gen)
    img_lens = ragged_lengths(n_img, R, min_len=2, generator=gen)
    return _finish("ties", img, cap, lens, img_lens, dtype, device, pad)


def single_word_case(n_img=3, n_cap=4, R=5, d=8, **kw) -> HeadCase:
    """Every caption one word long (L = 1)."""
    case = ragged_case(n_img, n_cap, R, 1, d, **kw)
    case.name = "L=1"
    return case


def single_region_case(n_img=3, n_cap=4, L=6, d=8, **kw) -> HeadCase:
    """Every image one region (R = 1)."""
    case = ragged_case(n_img, n_cap, 1, L, d, **kw)
    case.name = "R=1"
    return case


def all_negative_case(n_img=3, n_cap=4, R=5, L=6, d=8, *, dtype=F64, device="cpu", seed=0,
                      pad=NAN) -> HeadCase:
    """Positive regions and negative words: every S[r, w] < 0 (no floor at 0 or -1 may appear),
    some below -1 (CHAN's sentinel)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.rand(n_img, R, d, generator=gen, dtype=F64) + 0.1
    cap = -(torch.rand(n_cap, L, d, generator=gen, dtype=F64) + 0.1)
    lens = ragged_lengths(n_cap, L, generator=gen)
    img_lens = ragged_lengths(n_img, R, generator=gen)
    return _finish("all-negative", img, cap, lens, img_lens, dtype, device, pad)


CASES = {"ragged": ragged_case, "ties": tie_case, "L=1": single_word_case, "R=1": single_region_case,
         "all-negative": all_negative_case}


# ---------------------------------------------------------------------------------------------
# Reference and comparison
# ---------------------------------------------------------------------------------------------

def resolved(settings: dict) -> dict:
    """Every setting of a max_similarity call spelled out (a preset filled in), as the reference
    functions take them."""
    given = dict(settings)
    return validate.head_settings(given.pop("preset", None), given, DEFAULTS)


def reference_scores(case: HeadCase, settings: dict, dtype=F64) -> torch.Tensor:
    """The vectorised reference of the case's head in `dtype` (float64 by default), on the CPU."""
    kw = resolved(settings)
    img, cap = (x.detach().to("cpu", dtype) for x in (case.img, case.cap))
    return max_similarity_reference(img, cap, case.lens.cpu(), case.img_lens.cpu(), **kw)


def _scores_and_grads(fn, case: HeadCase, upstream: torch.Tensor):
    case = case.requiring_grad()
    scores = fn(case)
    img_grad, cap_grad = torch.autograd.grad(scores, [case.img, case.cap], upstream.to(scores))
    return scores.detach(), img_grad, cap_grad


def assert_head_matches_reference(case: HeadCase, settings: dict, *, backend: str, dtype: torch.dtype,
                                  device="cpu", grad: bool = True, seed: int = 0) -> None:
    """max_similarity(..., backend=backend) on the case in (dtype, device) against the float64
    reference: forward, and with grad the gradients w.r.t. img and cap for a random upstream
    gradient, by the project's rule (low precision: 2x the reference's own error in dtype plus
    atol). Padding gradients must be exactly 0."""
    run_case = case.to(dtype, device)
    ref_case = case.to(F64, "cpu")
    n_img, n_cap = case.img.shape[0], case.cap.shape[0]
    upstream = torch.randn(n_img, n_cap, generator=torch.Generator().manual_seed(seed), dtype=F64)

    def ours(c):
        return rcar_fast.max_similarity(c.img, c.cap, c.lens, img_lens=c.img_lens, backend=backend,
                                        **settings)

    def reference_in(precision):
        return lambda c: max_similarity_reference(c.img.to(precision), c.cap.to(precision), c.lens,
                                                  c.img_lens, **resolved(settings))

    low = dtype in (torch.float16, torch.bfloat16)
    if not grad:
        with torch.no_grad():
            got = ours(run_case)
            want = reference_in(F64)(ref_case)
            lowp = reference_in(dtype)(case.to(dtype, "cpu")) if low else None
        assert_close_to_reference(got.cpu(), want, dtype=dtype, ref_lowp=lowp, what="scores")
        return
    got = _scores_and_grads(ours, run_case, upstream.to(device))
    want = _scores_and_grads(reference_in(F64), ref_case, upstream)
    lowp = _scores_and_grads(reference_in(dtype), case.to(dtype, "cpu"), upstream) if low else (None,) * 3
    for what, g, w, lp in zip(("scores", "d img", "d cap"), got, want, lowp):
        assert_close_to_reference(g.cpu().to(F64), w, dtype=dtype,
                                  ref_lowp=None if lp is None else lp.to(F64), what=what)
    for what, g, lengths in (("d img", got[1], case.img_lens), ("d cap", got[2], case.lens)):
        padding = ~real_words(lengths.to(g.device), g.shape[1])
        assert bool((g[padding] == 0).all()), f"{what}: padding gradient not exactly 0"


# ---------------------------------------------------------------------------------------------
# Poisoned allocations
# ---------------------------------------------------------------------------------------------

def _nan_filled(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return tensor.fill_(NAN)
    return tensor.fill_(-7)              # integer buffers: a value no index or count takes


@contextlib.contextmanager
def poisoned_allocations():
    """Inside: torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled tensors
    (integers: -7), so a result with an entry the kernel never wrote is non-finite. Catches
    Python-side allocations (wrappers, the reference); a C++ kernel's own outputs need its
    out= argument poisoned instead."""
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return _nan_filled(originals[0](*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _nan_filled(originals[1](*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _nan_filled(originals[2](self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals
