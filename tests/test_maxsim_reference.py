"""The S-only heads' reference (rcar_fast.reference_heads, backends "reference" and
"reference_loop") and the Python layer (max_similarity, maxsim).

The reference is checked against INDEPENDENT float64 transcriptions of the public functions as
HEADS.md describes them (written here from the spec, with the public code's padded-block
masking: CHAN's -1 sentinel, LAPS's -1000 shift and R_i + 1e-8, ALADIN/TERAN's 0 fill,
ColBERT's -9999 and zeroed query padding), on inputs where HEADS.md says the public function
equals the spec; and where it says they differ, that they do. Then: gradcheck, NaN padding,
ties, loop == vectorised, validation messages, presets, the pair and top-k forms of maxsim,
and opcheck of the reference custom ops.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import rcar_fast
from rcar_fast import dispatch, reference_heads
from rcar_fast.contract import HEAD_PRESETS, LEAKY_SLOPE, POOLS
from rcar_fast.ops import maxsim as maxsim_module

from rcar_fast.ops.backend import Backend, BackendUnavailable
from tests.inputs import real_words
from tests.maxsim_cases import (CASES, F64, HeadCase, assert_head_matches_reference, poisoned_allocations,
                                ragged_case, reference_scores, resolved, settings_grid, settings_id,
                                tie_case)
from tests.tolerances import (BIT_EQUAL, F64_GRADCHECK, F64_SCALAR_NAIVE_SPEC, F64_VECTORIZED_VS_LOOP,
                              LAPS_REGION_COUNT_EPS, MUST_DIFFER, assert_bit_equal, assert_close,
                              assert_scaled_close)

GRID = settings_grid()


def _heads(case: HeadCase, backend="reference", **settings):
    return rcar_fast.max_similarity(case.img, case.cap, case.lens, img_lens=case.img_lens,
                                    backend=backend, **settings)


def _unit(case: HeadCase) -> HeadCase:
    """The case with l2-normalised features (finite padding): every real S lies in (-1, 1)."""
    finite = case.with_padding(0.5)
    return HeadCase(case.name, F.normalize(finite.img, dim=-1), F.normalize(finite.cap, dim=-1),
                    case.lens, case.img_lens)


# ---------------------------------------------------------------------------------------------
# Independent transcriptions of the public functions (HEADS.md "Heads"), float64
# ---------------------------------------------------------------------------------------------

def _padded_tiles(img, cap):
    """The public code's tile: every image x every caption over the padded block, (I, J, R, L)."""
    return torch.einsum("ird,jwd->ijrw", img, cap)


def _block_mask(img_lens, lens, R, L):
    return real_words(img_lens, R)[:, None, :, None] & real_words(lens, L)[None, :, None, :]


def chan_public(img, cap, lens, img_lens, coding, pooling, belta=0.1):
    """CHAN's SimsEncoder: VHA (max over regions) or THA (max over words) coding of the -1
    masked tile, then a pooling that finds padding by value (== -1)."""
    tiles = _padded_tiles(img, cap).masked_fill(~_block_mask(img_lens, lens, img.shape[1], cap.shape[1]), -1.0)
    coded = tiles.max(dim=2).values if coding == "vha" else tiles.max(dim=3).values
    pad = coded == -1
    if pooling == "max":
        return coded.max(dim=-1).values
    if pooling == "mean":
        return coded.masked_fill(pad, 0).sum(-1) / (~pad).sum(-1)
    if pooling == "sum":
        return coded.masked_fill(pad, 0).sum(-1)
    if pooling == "lse":
        return torch.logsumexp(coded.masked_fill(pad, -math.inf) / belta, dim=-1)
    weights = torch.softmax(coded.masked_fill(pad, -math.inf) / belta, dim=-1)
    return (weights * coded).sum(-1)         # softmax: NaN with padding on the pooled axis


def chan_vsa_public(img, cap, lens, img_lens, pooling, alpha=0.1, belta=0.1):
    """CHAN's VSACoding, one pair at a time on the padded block: per region, softmax over the
    real words of S / alpha, attended word c_r, x_r = v_r . c_r / (|c_r| + 1e-8); padded
    regions get the -1 sentinel, then the pooling over regions."""
    n_img, n_cap = img.shape[0], cap.shape[0]
    out = torch.zeros(n_img, n_cap, dtype=F64)
    for i in range(n_img):
        for j in range(n_cap):
            tile = img[i] @ cap[j].T
            tile = tile.masked_fill(~real_words(lens[j:j + 1], cap.shape[1]), -math.inf)
            attended = torch.softmax(tile / alpha, dim=-1) @ cap[j]
            codes = (img[i] * attended).sum(-1) / (attended.norm(dim=-1) + 1e-8)
            codes[img_lens[i]:] = -1.0
            out[i, j] = chan_pool_vector(codes, pooling, belta)
    return out


def chan_pool_vector(x, pooling, belta):
    pad = x == -1
    if pooling == "max":
        return x.max()
    if pooling == "mean":
        return x[~pad].mean()
    if pooling == "sum":
        return x[~pad].sum()
    if pooling == "lse":
        return torch.logsumexp(x[~pad] / belta, dim=0)
    weights = torch.softmax(x / belta, dim=0)
    return (weights * x).sum()


def laps_one_text(img, cap, lens, img_lens, c=1.0, leaky_slope=LEAKY_SLOPE):
    """LAPS's mask_xattn_one_text (c = 1) / matching_max_mean (c = 1/2), one caption at a time
    against every image: F.normalize, leaky, t2i max with -1000 on padded regions, i2t mean
    dividing by R_i + 1e-8."""
    img_mask = real_words(img_lens, img.shape[1]).to(F64)                  # (I, R)
    columns = []
    for j in range(cap.shape[0]):
        words = F.normalize(cap[j, :lens[j]], dim=-1)                      # (L, d)
        tiles = F.leaky_relu(torch.einsum("ird,wd->irw", F.normalize(img, dim=-1), words), leaky_slope)
        t2i = (tiles + (-1000.0) * (1 - img_mask)[:, :, None]).max(dim=1).values.mean(-1)
        i2t = (tiles.max(dim=2).values * img_mask).sum(-1) / (img_mask.sum(-1) + 1e-8)
        columns.append(c * (t2i + i2t))
    return torch.stack(columns, dim=1)


def alignment_public(img, cap, lens, img_lens, mode):
    """ALADIN / TERAN AlignmentContrastiveLoss alignment modes on stripped inputs: normalised
    features, padding written as 0 before the max, then the aggregation."""
    tiles = _padded_tiles(F.normalize(img, dim=-1), F.normalize(cap, dim=-1))
    tiles = tiles.masked_fill(~_block_mask(img_lens, lens, img.shape[1], cap.shape[1]), 0.0)
    mr = tiles.max(dim=2).values                                            # (I, J, L)
    mw = tiles.max(dim=3).values                                            # (I, J, R)
    if mode == "MrSw":
        return mr.sum(-1)
    if mode == "MrAVGw":
        return mr.sum(-1) / lens[None, :].to(F64)
    if mode == "MwSr":
        return mw.sum(-1)
    return mr.sum(-1) + mw.sum(-1)                                          # symm


def colbert_score(q, d, q_lens, d_lens):
    """colbert_score / colbert_score_reduce: Q zeroed at padding (Q * mask), padded document
    tokens -9999 before the max over document tokens, then the sum over query tokens."""
    q = q * real_words(q_lens, q.shape[1])[:, :, None]
    scores = torch.einsum("bud,atd->abut", d, q)                            # (n_q, n_d, Ld, Lq)
    scores = scores.masked_fill(~real_words(d_lens, d.shape[1])[None, :, :, None], -9999.0)
    return scores.max(dim=2).values.sum(-1)


def dvsa_equation(img, cap, lens, img_lens):
    """Karpathy and Fei-Fei eq. 8 as scalar loops: sum_w max_r v_r . e_w."""
    out = torch.zeros(img.shape[0], cap.shape[0], dtype=F64)
    for i in range(img.shape[0]):
        for j in range(cap.shape[0]):
            out[i, j] = sum(max(float(img[i, r] @ cap[j, w]) for r in range(int(img_lens[i])))
                            for w in range(int(lens[j])))
    return out


# ---------------------------------------------------------------------------------------------
# The reference against the public functions
# ---------------------------------------------------------------------------------------------

BACKENDS = ("reference", "reference_loop")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("coding,direction", [("vha", "t2i"), ("tha", "i2t")])
def test_chan_coding_and_pooling(coding, direction, pool, backend):
    case = _unit(ragged_case(seed=1))
    if pool == "softmax":   # the public softmax pooling is NaN with padding on the pooled axis
        full = case.lens.clone().fill_(case.cap.shape[1]) if direction == "t2i" else case.lens
        full_img = case.img_lens.clone().fill_(case.img.shape[1]) if direction == "i2t" else case.img_lens
        case = HeadCase(case.name, case.img, case.cap, full, full_img)
    want = chan_public(case.img, case.cap, case.lens, case.img_lens, coding, pool)
    got = _heads(case, backend, direction=direction, pool=pool, tau=0.1, normalize="none")
    assert_close(got, want, F64_SCALAR_NAIVE_SPEC, what=f"CHAN {coding} + {pool}")


def test_chan_preset_is_vha_lse_of_the_released_bigru_models():
    case = _unit(ragged_case(seed=2))
    want = chan_public(case.img, case.cap, case.lens, case.img_lens, "vha", "lse", belta=0.1)
    assert_close(_heads(case, preset="chan"), want, F64_SCALAR_NAIVE_SPEC, what="preset chan")


def test_chan_public_floor_at_minus_one_differs_where_heads_md_says():
    # All-negative raw S (some below -1): the public VHA max next to padding is floored at -1
    # and its mean drops values equal to -1; the spec has no floor.
    case = CASES["all-negative"](seed=3).with_padding(0.0)
    ours = _heads(case, direction="t2i", pool="max")
    public = chan_public(case.img, case.cap, case.lens, case.img_lens, "vha", "max")
    padded = (case.img_lens < case.img.shape[1])[:, None] | (case.lens < case.cap.shape[1])[None, :]
    assert bool((public[padded] >= -1).all()) and bool((ours[padded] < -1).all())
    assert_close(ours[~padded], public[~padded], F64_SCALAR_NAIVE_SPEC, what="unpadded pairs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [p for p in POOLS if p != "softmax"])   # public softmax: NaN with padding
def test_chan_vsa_coding(pool, backend):
    case = _unit(ragged_case(seed=4))
    want = chan_vsa_public(case.img, case.cap, case.lens, case.img_lens, pool)
    got = _heads(case, backend, direction="i2t", coding="vsa", pool=pool, tau=0.1)
    assert_close(got, want, F64_SCALAR_NAIVE_SPEC, what=f"CHAN VSA + {pool}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,settings", [(1.0, dict(preset="laps")),
                                        (0.5, dict(direction="both", pool="mean", leaky=True,
                                                   normalize="unit"))],
                         ids=["mask_xattn_one_text", "matching_max_mean"])
def test_laps_max_mean(c, settings, backend):
    case = ragged_case(seed=5).with_padding(0.3)     # LAPS needs finite image padding
    want = laps_one_text(case.img, case.cap, case.lens, case.img_lens, c=c)
    assert_close(_heads(case, backend, **settings), want, LAPS_REGION_COUNT_EPS, what="LAPS")
    # and its gradients (the public one's padding gradient is 0 as well)
    ours = case.requiring_grad()
    public = case.requiring_grad()
    upstream = torch.randn(3, 4, dtype=F64)
    g_ours = torch.autograd.grad(_heads(ours, backend, **settings), [ours.img, ours.cap], upstream)
    g_public = torch.autograd.grad(laps_one_text(public.img, public.cap, public.lens, public.img_lens, c=c),
                                   [public.img, public.cap], upstream)
    for got, want in zip(g_ours, g_public):
        assert_scaled_close(got, want, LAPS_REGION_COUNT_EPS, what="LAPS gradient")


@pytest.mark.parametrize("mode,settings", [
    ("MrSw", dict(preset="aladin")), ("MrSw", dict(preset="teran")),
    ("MrAVGw", dict(direction="t2i", pool="mean", normalize="unit")),
    ("MwSr", dict(direction="i2t", pool="sum", normalize="unit")),
    ("symm", dict(direction="both", pool="sum", normalize="unit", both_scale=1.0))])
def test_aladin_teran_alignment_modes(mode, settings):
    # Equal to the spec when the batch does not pad the maxed axis (HEADS.md): full images for
    # Mr*, full captions for Mw*, both for symm; the summed axis stays ragged.
    case = ragged_case(seed=6).with_padding(0.7)
    full_img = torch.full_like(case.img_lens, case.img.shape[1])
    full_cap = torch.full_like(case.lens, case.cap.shape[1])
    img_lens = case.img_lens if mode == "MwSr" else full_img
    lens = case.lens if mode.startswith("Mr") else full_cap
    case = HeadCase(case.name, case.img, case.cap, lens, img_lens)
    want = alignment_public(case.img, case.cap, case.lens, case.img_lens, mode)
    assert_close(_heads(case, **settings), want, F64_SCALAR_NAIVE_SPEC, what=mode)
    ours, public = case.requiring_grad(), case.requiring_grad()
    g_ours = torch.autograd.grad(_heads(ours, **settings).sum(), [ours.img, ours.cap])
    g_public = torch.autograd.grad(alignment_public(public.img, public.cap, case.lens, case.img_lens, mode).sum(),
                                   [public.img, public.cap])
    for got, want in zip(g_ours, g_public):
        assert_close(got, want, F64_SCALAR_NAIVE_SPEC, what=f"{mode} gradient")


def test_alignment_floor_at_zero_differs_where_heads_md_says():
    # Ragged images and all-negative S: the public Mr* max over a padded region axis is 0.
    case = CASES["all-negative"](seed=7).with_padding(0.0)
    ours = _heads(case, preset="aladin")
    public = alignment_public(case.img, case.cap, case.lens, case.img_lens, "MrSw")
    short = case.img_lens < case.img.shape[1]
    assert bool(short.any())
    assert bool(((public[short] - ours[short]).abs() > MUST_DIFFER).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_colbert_score_is_maxsim(backend):
    case = ragged_case(seed=8).with_padding(0.0)
    q = F.normalize(case.cap, dim=-1)          # ColBERT's query() / doc() normalise
    d = F.normalize(case.img, dim=-1)
    want = colbert_score(q, d, case.lens, case.img_lens)
    assert_close(rcar_fast.maxsim(q, d, case.lens, case.img_lens, backend=backend), want,
                 F64_SCALAR_NAIVE_SPEC, what="colbert_score")
    assert_close(_heads(HeadCase("", d, q, case.lens, case.img_lens), backend, preset="colbert"), want.T,
                 F64_SCALAR_NAIVE_SPEC, what="preset colbert")


@pytest.mark.parametrize("case_name", ["ragged", "all-negative", "R=1", "L=1"])
def test_dvsa_equation(case_name):
    case = CASES[case_name](seed=9)
    finite = case.with_padding(0.0)
    want = dvsa_equation(finite.img, finite.cap, case.lens, case.img_lens)
    assert_close(_heads(case, preset="dvsa"), want, F64_SCALAR_NAIVE_SPEC, what="DVSA")


# ---------------------------------------------------------------------------------------------
# Edge cases of HEADS.md
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", POOLS)
def test_one_word_pools_its_one_maximum(pool):
    case = CASES["L=1"](seed=10)
    tau = 0.5
    m0 = reference_scores(case, dict(direction="t2i", pool="max"))
    got = reference_scores(case, dict(direction="t2i", pool=pool, tau=tau))
    assert_close(got, m0 / tau if pool == "lse" else m0, F64_SCALAR_NAIVE_SPEC, what=f"L=1 {pool}")
    # i2t: n_r = S[r, 0]
    n = torch.einsum("ird,jd->ijr", case.with_padding(0.0).img, case.cap[:, 0])
    mask = real_words(case.img_lens, case.img.shape[1])[:, None, :]
    assert_close(reference_scores(case, dict(direction="i2t", pool="sum")),
                 (n * mask).sum(-1), F64_SCALAR_NAIVE_SPEC, what="L=1 i2t")


def test_all_negative_scores_stay_negative():
    case = CASES["all-negative"](seed=11)
    for settings in settings_grid(leaky=(False,), normalize=("none",)):
        if settings["pool"] == "lse":
            continue   # log sum exp(x / tau) of K values may exceed max x / tau by log K
        assert bool((reference_scores(case, settings) < 0).all()), settings_id(settings)


# ---------------------------------------------------------------------------------------------
# The reference's own properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", GRID + [dict(direction="i2t", pool=p, coding="vsa", tau=0.5)
                                             for p in POOLS], ids=settings_id)
def test_loop_equals_vectorised_forward_and_backward(settings):
    case = ragged_case(seed=12)
    upstream = torch.randn(3, 4, dtype=F64)
    results = []
    for backend in BACKENDS:
        c = case.requiring_grad()
        scores = _heads(c, backend, **settings)
        results.append((scores, *torch.autograd.grad(scores, [c.img, c.cap], upstream)))
    for what, loop, vectorised in zip(("scores", "d img", "d cap"), results[1], results[0]):
        assert_close(vectorised, loop, F64_VECTORIZED_VS_LOOP, what=what)


@pytest.mark.parametrize("settings", GRID[::7] + [dict(direction="i2t", pool="lse", coding="vsa")],
                         ids=settings_id)
def test_chunked_blocks_equal_one_block(settings):
    case = ragged_case(n_img=5, n_cap=7, seed=13)
    finite = case.with_padding(0.0)
    whole = reference_heads.head_similarity_vectorized(finite.img, finite.cap, case.lens, case.img_lens,
                                                       **settings_no_norm(settings))
    chunked = reference_heads.head_similarity_vectorized(case.img, case.cap, case.lens, case.img_lens,
                                                         img_chunk=2, cap_chunk=3, **settings_no_norm(settings))
    assert_close(chunked, whole, F64_VECTORIZED_VS_LOOP, what="chunked")


def settings_no_norm(settings):
    return {k: v for k, v in settings.items() if k != "normalize"}


@pytest.mark.parametrize("settings", GRID + [dict(direction="i2t", pool=p, coding="vsa", tau=0.5)
                                             for p in POOLS], ids=settings_id)
def test_gradcheck(settings):
    case = ragged_case(n_img=2, n_cap=3, R=3, L=4, d=3, seed=14).requiring_grad()

    def scores(img, cap):
        return rcar_fast.max_similarity(img, cap, case.lens, img_lens=case.img_lens, **settings)

    assert torch.autograd.gradcheck(scores, (case.img, case.cap), eps=1e-6,
                                    atol=F64_GRADCHECK.atol, rtol=F64_GRADCHECK.rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", GRID, ids=settings_id)
def test_nan_padding_is_ignored_and_gets_gradient_zero(settings, backend):
    case = ragged_case(seed=15)
    finite = case.with_padding(3.0)
    nan_scores = _heads(case, backend, **settings)
    assert_bit_equal(nan_scores, _heads(finite, backend, **settings), what="NaN vs finite padding")
    c = case.requiring_grad()
    g_img, g_cap = torch.autograd.grad(_heads(c, backend, **settings).sum(), [c.img, c.cap])
    for g, lengths, what in ((g_img, case.img_lens, "img"), (g_cap, case.lens, "cap")):
        real = real_words(lengths, g.shape[1])
        assert bool(torch.isfinite(g).all()), what
        assert bool((g[~real] == 0).all()), f"{what} padding gradient"
        assert bool((g[real] != 0).any()), f"{what} real gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_written_whole_under_poisoned_allocations(backend):
    case = ragged_case(seed=16)
    settings = dict(direction="both", pool="softmax", leaky=True, normalize="unit", tau=0.5)
    clean = _heads(case, backend, **settings)
    with poisoned_allocations():
        assert bool(torch.isnan(torch.empty(3)).all())          # the poison is active
        poisoned = _heads(case, backend, **settings)
        pairs = rcar_fast.maxsim(case.cap, case.img, case.lens, case.img_lens,
                                 pairs=([0, 3, 3], [2, 0, 1]), backend=backend)
    assert_bit_equal(poisoned, clean, what="scores under poisoned allocations")
    assert bool(torch.isfinite(pairs).all())


def test_output_dtypes():
    case = ragged_case(seed=17)
    for dtype, out in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        assert _heads(case.to(dtype)).dtype == out
        assert rcar_fast.maxsim(case.cap.to(dtype), case.img.to(dtype), case.lens, case.img_lens).dtype == out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("settings", GRID[::5], ids=settings_id)
def test_the_shared_checker_passes_the_reference_in_low_precision(settings, dtype):
    # The helper backend tests use (tests/maxsim_cases.py): the reference in dtype against itself
    # in float64 must pass (it is within 1x of its own error).
    assert_head_matches_reference(ragged_case(seed=18, scale=0.5), settings, backend="reference", dtype=dtype)


@pytest.mark.parametrize("preset", sorted(HEAD_PRESETS))
def test_the_shared_checker_takes_presets(preset):
    assert_head_matches_reference(ragged_case(seed=31), dict(preset=preset), backend="reference_loop",
                                  dtype=torch.float64)


def test_a_passed_setting_is_checked_before_the_preset_compares_it():
    with pytest.raises(TypeError, match="tau must be a real number"):
        _heads(ragged_case(seed=32), preset="chan", tau="0.1")


def test_the_shared_checker_catches_a_wrong_backend(monkeypatch):
    def off_by_a_bit(img, cap, lens, img_lens, **kw):
        return maxsim_module.MaxSimReference.fn(img, cap, lens, img_lens, **kw) * (1 + 1e-3)

    monkeypatch.setattr(maxsim_module.MaxSimReferenceLoop, "fn", staticmethod(off_by_a_bit))
    with pytest.raises(AssertionError, match="scores"):
        assert_head_matches_reference(ragged_case(seed=19), GRID[0], backend="reference_loop",
                                      dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Ties: the first argmax takes the whole gradient
# ---------------------------------------------------------------------------------------------

def _gradients(img, cap, lens, img_lens, backend, **settings):
    img, cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
    out = rcar_fast.max_similarity(img, cap, lens, img_lens=img_lens, backend=backend, **settings)
    return torch.autograd.grad(out.sum(), [img, cap])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tie_over_regions_gives_the_first_region_everything(backend):
    v, e = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64)
    img, cap = torch.stack([v, v])[None], e[None, None]             # regions 0 and 1 equal
    g_img, _ = _gradients(img, cap, [1], None, backend, direction="t2i", pool="sum")
    assert torch.equal(g_img[0, 1], torch.zeros(2, dtype=F64))
    assert torch.equal(g_img[0, 0], e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tie_over_words_gives_the_first_word_everything(backend):
    v, e = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64)
    img, cap = v[None, None], torch.stack([e, e])[None]              # words 0 and 1 equal
    _, g_cap = _gradients(img, cap, [2], None, backend, direction="i2t", pool="mean")
    assert torch.equal(g_cap[0, 1], torch.zeros(2, dtype=F64))
    assert torch.equal(g_cap[0, 0], v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_a_tie_in_max_pooling_gives_the_first_maximum_everything(backend, direction):
    # t2i: m_0 = m_1 = 1 for distinct words; i2t: n_0 = n_1 = 1 for distinct regions.
    one = torch.tensor([[1.0, 0.0]], dtype=F64)
    two = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    img, cap = (one[None], two[None]) if direction == "t2i" else (two[None], one[None])
    g_img, g_cap = _gradients(img, cap, [cap.shape[1]], None, backend, direction=direction, pool="max")
    pooled = g_cap if direction == "t2i" else g_img
    other = g_img if direction == "t2i" else g_cap
    assert torch.equal(pooled[0, 1], torch.zeros(2, dtype=F64))
    assert torch.equal(pooled[0, 0], one[0])
    assert torch.equal(other[0, 0], two[0])


@pytest.mark.parametrize("settings", settings_grid(pools=("sum", "max")), ids=settings_id)
def test_tie_case_gradients_follow_the_first_index_rule(settings):
    # On the shared tie case the reference's gradient of a repeated row is 0 wherever the
    # repeat only ties (never strictly wins): region 1 repeats region 0, word 1 word 0.
    case = tie_case(seed=20)
    c = case.requiring_grad()
    kw = {k: v for k, v in settings.items() if k != "normalize"}
    g_img, g_cap = torch.autograd.grad(_heads(c, **kw).sum(), [c.img, c.cap])
    if kw["direction"] == "t2i":
        assert torch.equal(g_img[:, 1], torch.zeros_like(g_img[:, 1]))
    if kw["direction"] == "i2t":
        assert torch.equal(g_cap[:, 1], torch.zeros_like(g_cap[:, 1]))


@pytest.mark.parametrize("d", [3, 4, 8])
def test_tie_case_scores_are_exact_in_any_summation_order(d):
    # The tie case's ties must not depend on the GEMM: unit normalised, its entries are 0, +-1/2
    # or +-1 (norms are powers of 2), so every score is a multiple of 1/4 and one whole GEMM, a
    # batched one per pair and the reversed coordinate order agree bit for bit, in float32 too.
    case = tie_case(d=d, seed=5)
    for dtype in (F64, torch.float32):
        img, cap = (x.nan_to_num(0.0) for x in reference_heads.normalize_inputs(
            case.img.to(dtype), case.cap.to(dtype), case.lens, case.img_lens, "unit"))
        assert set(torch.cat([img.flatten(), cap.flatten()]).abs().unique().tolist()) <= {0.0, 0.5, 1.0}
        per_pair = torch.einsum("ird,jwd->ijrw", img, cap)
        whole = (img.flatten(0, 1) @ cap.flatten(0, 1).T).view(img.shape[:2] + cap.shape[:2])
        reversed_order = torch.einsum("ird,jwd->ijrw", img.flip(-1), cap.flip(-1))
        assert_bit_equal(whole.permute(0, 2, 1, 3), per_pair)
        assert_bit_equal(reversed_order, per_pair)
        assert torch.equal(per_pair * 4, (per_pair * 4).round())


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

def test_unit_normalisation_is_the_clamped_f_normalize():
    x = torch.randn(3, 4, 5, dtype=F64)
    x[1, 2] = 0.0                                     # a zero vector stays zero (clamp, no NaN)
    lengths = torch.tensor([4, 3, 1])
    got = reference_heads.unit_normalize(x, lengths)
    want = F.normalize(x, dim=-1) * real_words(lengths, 4)[..., None]
    assert_close(got, want, BIT_EQUAL, what="unit_normalize")
    nan_padded = x.clone()
    nan_padded[~real_words(lengths, 4)] = math.nan
    assert_bit_equal(reference_heads.unit_normalize(nan_padded, lengths), got)


# ---------------------------------------------------------------------------------------------
# Validation: one clear error naming the argument, before any kernel
# ---------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (dict(direction="up"), ValueError, r"direction must be one of \('t2i', 'i2t', 'both'\), got 'up'"),
    (dict(pool="avg"), ValueError, r"pool must be one of \('mean', 'sum', 'max', 'lse', 'softmax'\)"),
    (dict(normalize="l2"), ValueError, r"normalize must be one of \('none', 'unit'\), got 'l2'"),
    (dict(coding="tha"), ValueError, r"coding must be one of \('max', 'vsa'\)"),
    (dict(tau=0.0), ValueError, "tau must be a positive finite number, got 0.0"),
    (dict(tau=-1), ValueError, "tau must be a positive finite number"),
    (dict(tau=math.inf), ValueError, "tau must be a positive finite number"),
    (dict(tau=1e-31), ValueError, "tau must be at least 1e-30"),
    (dict(tau="0.1"), TypeError, "tau must be a real number"),
    (dict(vsa_tau=0), ValueError, "vsa_tau must be a positive finite number"),
    (dict(both_scale=math.nan), ValueError, "both_scale must be a finite number, got nan"),
    (dict(both_scale=None), TypeError, "both_scale must be a real number"),
    (dict(leaky=1), TypeError, "leaky must be True or False, got int 1"),
    (dict(leaky="yes"), TypeError, "leaky must be True or False"),
    (dict(preset="scan"), ValueError, r"preset must be one of \('chan', 'laps', 'aladin', 'teran', "
                                      r"'colbert', 'dvsa'\), got 'scan'"),
    (dict(coding="vsa"), ValueError, "coding='vsa' .* needs direction='i2t', got direction='t2i'"),
    (dict(coding="vsa", direction="i2t", leaky=True), ValueError, "coding='vsa' takes leaky=False"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_SETTINGS, ids=[str(b[0]) for b in BAD_SETTINGS])
def test_bad_settings_raise_naming_the_argument(kwargs, error, message, monkeypatch):
    _no_backend_may_run(monkeypatch)
    case = ragged_case(seed=21)
    with pytest.raises(error, match=message):
        _heads(case, **{"backend": "reference", **kwargs})


def _no_backend_may_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backend ran before validation finished")
    for cls in dispatch.TABLE["maxsim"] + dispatch.TABLE["maxsim_pairs"]:
        monkeypatch.setattr(cls, "fn", staticmethod(refuse))


def _tensor_cases():
    case = ragged_case(seed=22)
    img, cap, lens = case.img, case.cap, case.lens
    nan_img = img.clone()
    nan_img[0, 0, 0] = math.nan                       # image 0 is full: a real region
    nan_cap = cap.clone()
    nan_cap[0, 0, 0] = math.inf
    return [
        ((img.float(), cap, lens), {}, TypeError, "img and cap must have the same dtype"),
        ((img[..., :4], cap, lens), {}, ValueError, "img and cap must share the feature size d"),
        ((img[0], cap, lens), {}, ValueError, r"img must have shape \(n_img, R, d\)"),
        ((img, cap, lens), dict(img_lens=[5, 6, 1]), ValueError,
         r"img_lens must lie in \[1, R=5\] \(R = img.shape\[1\]\), got min 1, max 6"),
        ((img, cap, lens), dict(img_lens=[0, 1, 1]), ValueError, r"img_lens must lie in \[1, R=5\]"),
        ((img, cap, lens), dict(img_lens=[5, 1]), ValueError, r"img_lens must have shape \(n_img,\) = \(3,\)"),
        ((img, cap, lens), dict(img_lens=torch.tensor([5.0, 1.0, 1.0])), TypeError,
         "img_lens must be an integer tensor"),
        ((img, cap, lens), dict(img_lens="5"), TypeError, "img_lens must be a sequence"),
        ((img, cap, lens + 10), {}, ValueError, r"lens must lie in \[1, Lmax=6\]"),
        ((nan_img, cap, lens), {}, ValueError, r"img holds NaN or Inf at real positions \(rows < img_lens\)"),
        ((img, nan_cap, lens), {}, ValueError, r"cap holds NaN or Inf at real positions \(rows < lens\)"),
    ]


@pytest.mark.parametrize("args,kwargs,error,message", _tensor_cases(),
                         ids=[c[3][:40] for c in _tensor_cases()])
def test_bad_tensors_raise_naming_the_argument(args, kwargs, error, message, monkeypatch):
    _no_backend_may_run(monkeypatch)
    kwargs = {"img_lens": ragged_case(seed=22).img_lens, **kwargs}
    with pytest.raises(error, match=message):
        rcar_fast.max_similarity(*args, **kwargs)


def test_nan_in_image_padding_is_allowed_but_only_there():
    case = ragged_case(seed=23)
    assert bool(torch.isnan(case.img).any())
    assert bool(torch.isfinite(_heads(case)).all())
    with pytest.raises(ValueError, match="img holds NaN or Inf"):
        rcar_fast.max_similarity(case.img, case.cap, case.lens)            # img_lens=None: all real


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(HEAD_PRESETS))
def test_a_preset_equals_its_settings_spelled_out(preset):
    case = ragged_case(seed=24)
    assert_bit_equal(_heads(case, preset=preset), _heads(case, **HEAD_PRESETS[preset]))
    # passing a value equal to the preset's is no conflict
    key, value = next(iter(HEAD_PRESETS[preset].items()))
    assert_bit_equal(_heads(case, preset=preset, **{key: value}), _heads(case, preset=preset))


@pytest.mark.parametrize("preset,key,value", [
    (p, key, other) for p, kw in sorted(HEAD_PRESETS.items()) for key, other in
    (("direction", "i2t"), ("pool", "max"), ("normalize", "unit"), ("leaky", True), ("tau", 0.3),
     ("both_scale", 0.25)) if key in kw and kw[key] != other])
def test_an_argument_contradicting_the_preset_is_an_error_naming_both(preset, key, value, monkeypatch):
    _no_backend_may_run(monkeypatch)
    case = ragged_case(seed=25)
    message = f"preset='{preset}' sets {key}=.*, but {key}={value!r} was passed"
    with pytest.raises(ValueError, match=message):
        _heads(case, preset=preset, **{key: value})


def test_settings_a_preset_leaves_open_stay_free():
    case = ragged_case(seed=26)
    # aladin leaves tau and both_scale open: they do not matter to t2i sum, and pass freely
    assert_bit_equal(_heads(case, preset="aladin", tau=0.7, both_scale=3.0), _heads(case, preset="aladin"))


def test_vsa_runs_only_on_backends_that_list_it(monkeypatch):
    class NoVsa(Backend):
        op, backend, kernel = "maxsim", "cpu", "a kernel without VSA"
        fn = staticmethod(maxsim_module.MaxSimReference.fn)

    # max_similarity chooses among its own module's BACKENDS
    monkeypatch.setitem(maxsim_module.BACKENDS, "maxsim", tuple(
        NoVsa if cls.backend == "cpu" else cls for cls in maxsim_module.BACKENDS["maxsim"]))
    case = ragged_case(seed=27)
    with pytest.raises(BackendUnavailable, match="CHAN's VSA coding runs on the backends"):
        _heads(case, "cpu", direction="i2t", coding="vsa")
    assert torch.isfinite(_heads(case, "auto", direction="i2t", coding="vsa")).all()   # auto: the reference


# ---------------------------------------------------------------------------------------------
# maxsim: all pairs, pair lists, top-k
# ---------------------------------------------------------------------------------------------

def _colbert_inputs(n_q=5, n_d=9, seed=28, integer=False):
    """(q, d, q_lens, d_lens), ragged, NaN padding. integer=True: small-integer features, so
    that every score is exact whatever the summation order (blocks of any shape agree bit for
    bit) and many scores tie."""
    maker = tie_case if integer else ragged_case
    docs = maker(n_img=n_d, n_cap=n_q, R=6, L=4, d=8 if not integer else 3, seed=seed)
    return docs.cap, docs.img, docs.lens, docs.img_lens          # q, d, q_lens, d_lens


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_pairs_equal_the_full_matrix(backend):
    q, d, q_lens, d_lens = _colbert_inputs()
    full = rcar_fast.maxsim(q, d, q_lens, d_lens, backend=backend)
    assert full.shape == (5, 9)
    q_idx, d_idx = torch.tensor([0, 4, 4, 2, 0]), torch.tensor([8, 0, 0, 3, 8])   # repeats too
    pairs = rcar_fast.maxsim(q, d, q_lens, d_lens, pairs=(q_idx, d_idx), backend=backend)
    assert_close(pairs, full[q_idx, d_idx], F64_VECTORIZED_VS_LOOP, what="pairs")
    empty = rcar_fast.maxsim(q, d, q_lens, d_lens, pairs=([], []), backend=backend)
    assert empty.shape == (0,)


def test_maxsim_is_max_similarity_transposed_and_defaults_to_full_lengths():
    q, d, q_lens, d_lens = _colbert_inputs()
    want = rcar_fast.max_similarity(d, q, q_lens, img_lens=d_lens, direction="t2i", pool="sum").T
    assert_bit_equal(rcar_fast.maxsim(q, d, q_lens, d_lens), want)
    qf, df = q.nan_to_num(0.25), d.nan_to_num(0.25)
    assert_bit_equal(rcar_fast.maxsim(qf, df),
                     rcar_fast.maxsim(qf, df, torch.full((5,), q.shape[1]), torch.full((9,), d.shape[1])))


def _stable_top_k(full, k):
    order = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
    return full.gather(1, order), order


@pytest.mark.parametrize("doc_block", [None, 1, 2, 4, 9, 20])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_maxsim_top_k_equals_the_top_k_of_the_full_matrix(k, doc_block):
    q, d, q_lens, d_lens = _colbert_inputs(integer=True)
    full = rcar_fast.maxsim(q, d, q_lens, d_lens)
    values, indices = rcar_fast.maxsim(q, d, q_lens, d_lens, k=k, doc_block=doc_block)
    assert indices.dtype == torch.int64 and values.shape == indices.shape == (5, k)
    want_values, want_indices = _stable_top_k(full, k)
    assert_bit_equal(values, want_values)
    assert torch.equal(indices, want_indices)
    assert torch.equal(values, torch.topk(full, k, dim=1).values)
    assert len(set(full[0].tolist())) < full.shape[1]        # the integer scores do tie


def test_maxsim_top_k_of_real_valued_scores():
    q, d, q_lens, d_lens = _colbert_inputs()
    full = rcar_fast.maxsim(q, d, q_lens, d_lens)
    values, indices = rcar_fast.maxsim(q, d, q_lens, d_lens, k=4, doc_block=3)
    want_values, want_indices = _stable_top_k(full, 4)
    assert torch.equal(indices, want_indices)      # no near-ties in these random scores
    assert_close(values, want_values, F64_VECTORIZED_VS_LOOP, what="top-k values")   # blocks round apart


def test_maxsim_top_k_breaks_ties_by_the_lower_document_index():
    q, d, q_lens, d_lens = _colbert_inputs(integer=True)
    d, d_lens = torch.cat([d[:3], d[:3], d[:3]]), torch.cat([d_lens[:3]] * 3)     # docs 0-2 thrice
    values, indices = rcar_fast.maxsim(q, d, q_lens, d_lens, k=6, doc_block=2)
    full = rcar_fast.maxsim(q, d, q_lens, d_lens)
    assert torch.equal(indices, _stable_top_k(full, 6)[1])
    tied = values[:, 1:] == values[:, :-1]
    assert bool(tied.all(dim=1).logical_not().any() | tied.any())              # ties occur
    assert bool((indices[:, 1:] > indices[:, :-1])[tied].all())                # ... in index order
    assert bool(tied.sum() >= 2 * q.shape[0])                                  # each value thrice


def test_maxsim_top_k_streams_blocks_of_doc_block_documents(monkeypatch):
    q, d, q_lens, d_lens = _colbert_inputs(n_d=9)
    seen = []
    original = maxsim_module.MaxSimReference.fn

    def spy(img, cap, lens, img_lens, **kw):
        seen.append(img.shape[0])
        return original(img, cap, lens, img_lens, **kw)

    monkeypatch.setattr(maxsim_module.MaxSimReference, "fn", staticmethod(spy))
    rcar_fast.maxsim(q, d, q_lens, d_lens, k=2, doc_block=4, backend="reference")
    assert seen == [4, 4, 1]                                  # never the whole (n_q, n_d) matrix
    seen.clear()
    monkeypatch.setattr(maxsim_module, "TOPK_BLOCK_PAIRS", 10)  # default block: 10 // n_q = 2 docs
    rcar_fast.maxsim(q, d, q_lens, d_lens, k=2, backend="reference")
    assert seen == [2, 2, 2, 2, 1]


def test_maxsim_top_k_values_are_differentiable():
    q, d, q_lens, d_lens = _colbert_inputs()
    q, d = q.requires_grad_(), d.requires_grad_()
    upstream = torch.randn(5, 3, dtype=F64)
    values, indices = rcar_fast.maxsim(q, d, q_lens, d_lens, k=3, doc_block=2)
    grads = torch.autograd.grad(values, [q, d], upstream)
    full = rcar_fast.maxsim(q, d, q_lens, d_lens)
    want = torch.autograd.grad(full.gather(1, indices), [q, d], upstream)
    for got, w in zip(grads, want):
        assert_close(got, w, F64_VECTORIZED_VS_LOOP, what="top-k gradient")


MAXSIM_ERRORS = [
    (dict(k=0), ValueError, r"k must be at least 1 and at most n_d=9, got 0"),
    (dict(k=10), ValueError, r"k must be at least 1 and at most n_d=9, got 10"),
    (dict(k=2.0), TypeError, "k must be a positive integer"),
    (dict(k=2, doc_block=0), ValueError, "doc_block must be at least 1"),
    (dict(doc_block=4), ValueError, "doc_block applies to the top-k search"),
    (dict(k=2, pairs=([0], [0])), ValueError, "pass pairs .* or k .*, not both"),
    (dict(pairs=[0, 1, 2]), TypeError, r"pairs must be a pair \(q_idx, d_idx\)"),
    (dict(pairs=([0, 5], [0, 0])), ValueError, r"q_idx values must lie in \[0, n_q=5\)"),
    (dict(pairs=([0], [9])), ValueError, r"d_idx values must lie in \[0, n_d=9\)"),
    (dict(pairs=([0, 1], [0])), ValueError, "q_idx and d_idx must have the same length P"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,error,message", MAXSIM_ERRORS, ids=[str(e[0]) for e in MAXSIM_ERRORS])
def test_maxsim_bad_arguments(kwargs, error, message, monkeypatch):
    _no_backend_may_run(monkeypatch)
    q, d, q_lens, d_lens = _colbert_inputs()
    with pytest.raises(error, match=message):
        rcar_fast.maxsim(q, d, q_lens, d_lens, **kwargs)


def test_maxsim_tensor_errors_name_q_and_d(monkeypatch):
    _no_backend_may_run(monkeypatch)
    q, d, q_lens, d_lens = _colbert_inputs()
    cases = [((q, d[..., :3], q_lens, d_lens), ValueError, "d and q must share the feature size dim"),
             ((q, d, q_lens + 9, d_lens), ValueError, r"q_lens must lie in \[1, Lq=4\] \(Lq = q.shape\[1\]\)"),
             ((q, d, q_lens, d_lens[:3]), ValueError, r"d_lens must have shape \(n_d,\) = \(9,\)"),
             ((q, d, None, d_lens), ValueError, r"q holds NaN or Inf at real positions \(rows < q_lens\)"),
             ((q[0], d, q_lens, d_lens), ValueError, r"q must have shape \(n_q, Lq, dim\)")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            rcar_fast.maxsim(*args)


# ---------------------------------------------------------------------------------------------
# The reference custom ops (torch.compile) and the dispatch entries
# ---------------------------------------------------------------------------------------------

def _op_inputs(grad=True):
    case = ragged_case(n_img=3, n_cap=4, R=4, L=5, d=4, seed=29).with_padding(1.0)   # opcheck compares all
    return case.img.requires_grad_(grad), case.cap.requires_grad_(grad), case.lens, case.img_lens


@pytest.mark.parametrize("direction,pool,leaky", [("t2i", "lse", False), ("i2t", "max", True),
                                                  ("both", "softmax", True), ("both", "mean", False)])
def test_opcheck_maxsim_reference_ops(direction, pool, leaky):
    img, cap, lens, img_lens = _op_inputs()
    options = (direction, pool, 0.5, leaky, 0.5)
    torch.library.opcheck(maxsim_module.maxsim_reference_op, (img, cap, lens, img_lens, *options))
    pairs = (torch.tensor([0, 2, 2, 1]), torch.tensor([3, 0, 0, 1]))
    torch.library.opcheck(maxsim_module.maxsim_pairs_reference_op, (img, cap, lens, img_lens, *pairs, *options))


def test_opcheck_maxsim_reference_backward_ops():
    img, cap, lens, img_lens = _op_inputs(grad=False)
    options = ("both", "sum", 0.5, True, 0.5)
    grad = torch.randn(3, 4, dtype=F64)
    torch.library.opcheck(torch.ops.rcar_fast.maxsim_reference_backward.default,
                          (grad, img, cap, lens, img_lens, *options))
    pairs = (torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1]))
    torch.library.opcheck(torch.ops.rcar_fast.maxsim_pairs_reference_backward.default,
                          (torch.randn(3, dtype=F64), img, cap, lens, img_lens, *pairs, *options))


def test_a_training_step_compiles_fullgraph_through_the_reference_op():
    from rcar_fast.losses import vse_hinge_loss
    case = ragged_case(n_img=4, n_cap=4, seed=30).with_padding(0.0)
    img, cap = case.img.requires_grad_(), case.cap.requires_grad_()
    torch._dynamo.reset()

    def loss_fn(img, cap):
        sims = rcar_fast.max_similarity(img, cap, case.lens, img_lens=case.img_lens, preset="laps",
                                        backend="reference")
        return vse_hinge_loss(sims, 0.2, max_violation=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss_fn):
        loss = fn(img, cap)
        results.append((loss.detach(), *torch.autograd.grad(loss, [img, cap])))
    for got, want in zip(*results):
        assert_close(got, want, F64_VECTORIZED_VS_LOOP, what="compiled step")


def test_dispatch_lists_the_reference_backends_of_both_ops():
    assert {cls.backend for cls in dispatch.TABLE["maxsim"]} >= {"reference", "reference_loop"}
    assert {cls.backend for cls in dispatch.TABLE["maxsim_pairs"]} >= {"reference", "reference_loop"}
    report = rcar_fast.backends()["reference"]
    assert {"maxsim", "maxsim_pairs"} <= set(report["ops"])
    assert dispatch.choose("maxsim", "auto", torch.device("cpu"), torch.float32).backend in (
        "cpu", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", GRID[::3] + [dict(direction="i2t", pool="softmax", coding="vsa", tau=0.5)],
                         ids=settings_id)
def test_the_pair_backends_equal_the_all_pairs_matrix(settings, backend):
    case = ragged_case(seed=33)
    kw = {k: v for k, v in resolved(settings).items() if k not in ("normalize",)}
    if kw["coding"] == "max":
        kw = {k: v for k, v in kw.items() if k not in ("coding", "vsa_tau")}
    all_pairs = dispatch.implementation("maxsim", backend)
    listed = dispatch.implementation("maxsim_pairs", backend)
    img_idx, cap_idx = torch.tensor([2, 0, 0, 1, 2]), torch.tensor([3, 0, 0, 2, 1])
    full = all_pairs.fn(case.img, case.cap, case.lens, case.img_lens, **kw)
    pairs = listed.fn(case.img, case.cap, case.lens, case.img_lens, img_idx, cap_idx, **kw)
    assert_close(pairs, full[img_idx, cap_idx], F64_VECTORIZED_VS_LOOP, what="pairs")
    none = listed.fn(case.img, case.cap, case.lens, case.img_lens, img_idx[:0], cap_idx[:0], **kw)
    assert none.shape == (0,) and none.dtype == F64
