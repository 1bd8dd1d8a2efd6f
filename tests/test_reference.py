"""The float64 reference (rcar_fast/reference.py) against itself (loop vs vectorised form),
against closed forms and a naive scalar transcription of the spec, and against the invariances
every similarity must have. All float64 on CPU, tiny shapes."""
import itertools
import math

import pytest
import torch

from rcar_fast import reference as ref
from rcar_fast.contract import scan_published
from tests import inputs
from tests.tolerances import (BIT_EQUAL, F64_ATTENDED_CONTEXT, F64_IDENTITY, F64_PERMUTED, F64_RCAR_EQUALS_SCAN,
                              F64_SCALAR_CLOSED_FORM, F64_SCALAR_EXACT_FORM, F64_SCALAR_FEW_OPS,
                              F64_SCALAR_NAIVE_SPEC, F64_SCALAR_NORM, F64_SOFTMAX_SUMS_TO_ONE,
                              F64_VECTORIZED_VS_LOOP, MUST_DIFFER, REFERENCE_LOW_PRECISION_ABS, approx,
                              assert_close)

F64 = torch.float64
LENS = (1, 7, 3, 2, 5, 4, 7)          # ragged 1..7, including a full-length caption


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------

def make_inputs(n_img=5, lens=LENS, regions=5, d=16, seed=0, pad=float("nan")):
    """This file's float64 batch (tests.inputs.make_inputs): 7 ragged captions, `pad` in the padding."""
    return inputs.make_inputs(n_img, len(lens), regions, d, lens=lens, seed=seed, pad=pad)


def make_head(regulator, steps, direction, d=16, sim_dim=8, seed=0, smooth=None):
    """A float64 eval-mode head whose weights AND biases are random (the official init zeroes
    biases, which would leave parts of the function untested)."""
    if smooth is None:
        smooth = 10.0 if direction == "t2i" else 3.0
    head = ref.RCARHead(d, sim_dim, regulator, steps, direction, smooth).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=F64) * 0.5)
    return head


def valid_rcar_modes():
    for regulator, direction, steps in itertools.product(ref.REGULATORS, ref.DIRECTIONS, range(4)):
        if regulator == "coop_rcar" and steps == 0:
            continue
        yield regulator, direction, steps


def scan_kwargs(direction, raw_norm="clipped_l2norm", agg="mean"):
    return scan_published(direction, "f30k", raw_norm=raw_norm, agg=agg)


def input_grads(fn, img, cap, lens, seed=1):
    """Gradients of a random linear functional of fn(img, cap, lens) w.r.t. img and cap."""
    img = img.clone().requires_grad_(True)
    cap = cap.clone().requires_grad_(True)
    out = fn(img, cap, lens)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    img_grad, cap_grad = torch.autograd.grad((out * weights).sum(), (img, cap))
    return out.detach(), img_grad, cap_grad


# ------------------------------------------------------------------------------------------
# Helpers: eps placement
# ------------------------------------------------------------------------------------------

def test_l2norm_adds_eps_to_the_norm():
    out = ref.l2norm(torch.tensor([3.0, 4.0], dtype=F64))
    assert out.tolist() == [3.0 / (5.0 + 1e-8), 4.0 / (5.0 + 1e-8)]


def test_l1norm_adds_eps_to_the_sum():
    out = ref.l1norm(torch.tensor([1.0, -3.0], dtype=F64))
    assert out.tolist() == [1.0 / (4.0 + 1e-8), -3.0 / (4.0 + 1e-8)]


def test_cosine_clamps_the_norm_product_at_eps():
    tiny = torch.tensor([1e-5, 0.0], dtype=F64)
    # |a||b| = 1e-10 < eps, so the denominator is eps: 1e-10 / 1e-8.
    assert ref.cosine(tiny, tiny).item() == approx(1e-2, F64_SCALAR_CLOSED_FORM)
    assert ref.cosine(torch.zeros(2, dtype=F64), tiny).item() == 0.0
    a, b = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([-2.0, 0.5], dtype=F64)
    assert ref.cosine(a, b).item() == approx(-1.0 / (math.sqrt(5) * math.sqrt(4.25)), F64_SCALAR_EXACT_FORM)


def test_leaky_slope():
    assert ref.leaky(torch.tensor([-2.0, 3.0], dtype=F64)).tolist() == [-0.2, 3.0]


@pytest.mark.parametrize("raw_norm", ref.RAW_NORMS)
def test_raw_norm_runs_across_the_query_axis(raw_norm):
    scores = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)  # (C, Q)
    out = ref.normalize_raw_scores(scores, raw_norm)
    for c in range(3):
        row = scores[c].tolist()
        x = [v if v > 0 else 0.1 * v for v in row] if raw_norm.startswith("clipped") else row
        if raw_norm == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            want = [e / sum(exps) for e in exps]
        elif raw_norm.endswith("l2norm"):
            want = [v / (math.sqrt(sum(u * u for u in x)) + 1e-8) for v in x]
        elif raw_norm.endswith("l1norm"):
            want = [v / (sum(abs(u) for u in x) + 1e-8) for v in x]
        else:
            want = x
        assert out[c].tolist() == approx(want, F64_SCALAR_NORM)


# ------------------------------------------------------------------------------------------
# SCAN: independent checks
# ------------------------------------------------------------------------------------------

def naive_scan_pair(query, context, raw_norm, smooth, agg, lse_lambda):
    """The spec's SCAN for one pair, transcribed with Python floats and loops."""
    def dot(u, v):
        return sum(a * b for a, b in zip(u, v))

    def lk(x):
        return x if x > 0 else 0.1 * x

    n_q, n_c = len(query), len(context)
    s = [[dot(context[c], query[k]) for k in range(n_q)] for c in range(n_c)]
    a = []
    for c in range(n_c):
        row = s[c]
        if raw_norm == "softmax":
            exps = [math.exp(v) for v in row]
            a.append([e / sum(exps) for e in exps])
            continue
        x = [lk(v) for v in row] if raw_norm.startswith("clipped") else list(row)
        if raw_norm.endswith("l2norm"):
            x = [v / (math.sqrt(sum(u * u for u in x)) + 1e-8) for v in x]
        elif raw_norm.endswith("l1norm"):
            x = [v / (sum(abs(u) for u in x) + 1e-8) for v in x]
        a.append(x)
    r = []
    for k in range(n_q):
        logits = [smooth * a[c][k] for c in range(n_c)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        alpha = [e / sum(exps) for e in exps]
        ctx = [sum(alpha[c] * context[c][i] for c in range(n_c)) for i in range(len(query[k]))]
        norms = math.sqrt(dot(query[k], query[k])) * math.sqrt(dot(ctx, ctx))
        r.append(dot(query[k], ctx) / max(norms, 1e-8))
    if agg == "mean":
        return sum(r) / len(r)
    if agg == "sum":
        return sum(r)
    if agg == "max":
        return max(r)
    return math.log(sum(math.exp(lse_lambda * v) for v in r)) / lse_lambda


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
@pytest.mark.parametrize("raw_norm", ref.RAW_NORMS)
def test_scan_matches_naive_scalar_transcription(direction, raw_norm):
    lens = (3, 1, 2)
    img, cap, lens_t = make_inputs(n_img=2, lens=lens, regions=3, d=3, seed=3)
    for form in (ref.scan_similarity_loop, ref.scan_similarity_vectorized):
        for agg in ref.AGGREGATIONS:
            kw = scan_kwargs(direction, raw_norm, agg)
            out = form(img, cap, lens_t, **kw)
            for i, j in itertools.product(range(2), range(3)):
                words = cap[j, :lens[j]].tolist()
                regions = img[i].tolist()
                query, context = (words, regions) if direction == "t2i" else (regions, words)
                want = naive_scan_pair(query, context, raw_norm, kw["smooth"], agg, kw["lse_lambda"])
                assert out[i, j].item() == approx(want, F64_SCALAR_NAIVE_SPEC)


def _pooled_by_hand(r, agg, lse_lambda):
    """SIMILARITY.md's aggregation of the cosines r, written out (lse: SCAN's, times 1/lambda)."""
    return {"mean": r.mean(), "sum": r.sum(), "max": r.max(),
            "lse": torch.log(torch.exp(lse_lambda * r).sum()) / lse_lambda}[agg].item()


@pytest.mark.parametrize("agg", ref.AGGREGATIONS)
@pytest.mark.parametrize("raw_norm", ["clipped_l2norm", "softmax", "no_norm"])
def test_scan_t2i_with_one_region_is_aggregated_word_region_cosine(raw_norm, agg):
    # One region: every word attends to it with weight 1, whatever the norm or smooth.
    img, cap, lens = make_inputs(n_img=3, regions=1, d=4, seed=4)
    out = ref.scan_similarity_vectorized(img, cap, lens, **scan_kwargs("t2i", raw_norm, agg))
    for i, j in itertools.product(range(3), range(len(LENS))):
        x, words = img[i, 0], cap[j, :LENS[j]]
        r = (words @ x) / (words.norm(dim=1) * x.norm())
        assert out[i, j].item() == approx(_pooled_by_hand(r, agg, lse_lambda=6.0), F64_SCALAR_CLOSED_FORM)


@pytest.mark.parametrize("agg", ref.AGGREGATIONS)
def test_scan_i2t_with_one_word_is_aggregated_region_word_cosine(agg):
    img, cap, lens = make_inputs(n_img=3, lens=(1, 1), regions=4, d=4, seed=5)
    out = ref.scan_similarity_loop(img, cap, lens, **scan_kwargs("i2t", agg=agg))
    for i, j in itertools.product(range(3), range(2)):
        w, regions = cap[j, 0], img[i]
        r = (regions @ w) / (regions.norm(dim=1) * w.norm())
        assert out[i, j].item() == approx(_pooled_by_hand(r, agg, lse_lambda=5.0), F64_SCALAR_CLOSED_FORM)


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_scan_one_region_one_word_scalar_is_the_sign_of_the_product(direction):
    img = torch.tensor([[[2.0]], [[-0.5]]], dtype=F64)
    cap = torch.tensor([[[3.0]], [[-4.0]]], dtype=F64)
    out = ref.scan_similarity_vectorized(img, cap, [1, 1], **scan_kwargs(direction, agg="lse"))
    assert out.tolist() == [[1.0, -1.0], [-1.0, 1.0]]


def test_scan_t2i_two_regions_one_word_closed_form():
    # Word y = (1, 0); regions x1 = (2, 1) (score 2 > 0), x2 = (-1, 3) (score -1 < 0).
    # With one query the clipped l2 norm maps scores to +-1 (up to eps), so
    # alpha = softmax(lambda * (a1, a2)), ctx = alpha1 x1 + alpha2 x2, r = ctx_x / |ctx|.
    lam = 9.0
    a1 = 2.0 / (2.0 + 1e-8)
    a2 = -0.1 / (0.1 + 1e-8)
    alpha1 = 1.0 / (1.0 + math.exp(lam * (a2 - a1)))
    alpha2 = 1.0 - alpha1
    ctx = (2 * alpha1 - alpha2, alpha1 + 3 * alpha2)
    want = ctx[0] / math.hypot(*ctx)
    img = torch.tensor([[[2.0, 1.0], [-1.0, 3.0]]], dtype=F64)
    cap = torch.tensor([[[1.0, 0.0], [float("nan"), float("nan")]]], dtype=F64)
    for form in (ref.scan_similarity_loop, ref.scan_similarity_vectorized):
        out = form(img, cap, [1], direction="t2i", smooth=lam)
        assert out.item() == approx(want, F64_SCALAR_FEW_OPS)


# ------------------------------------------------------------------------------------------
# SCAN: loop form == vectorised form
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("agg", ref.AGGREGATIONS)
@pytest.mark.parametrize("raw_norm", ref.RAW_NORMS)
@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_scan_loop_equals_vectorized(direction, raw_norm, agg):
    img, cap, lens = make_inputs()
    kw = scan_kwargs(direction, raw_norm, agg)
    loop = ref.scan_similarity_loop(img, cap, lens, **kw)
    assert loop.shape == (5, 7) and loop.dtype == F64 and torch.isfinite(loop).all()
    for chunks in [(None, None), (2, 3), (1, 7), (5, 1), (4, 4)]:
        vec = ref.scan_similarity_vectorized(img, cap, lens, **kw, img_chunk=chunks[0],
                                             cap_chunk=chunks[1])
        assert_close(vec, loop, F64_VECTORIZED_VS_LOOP)


@pytest.mark.parametrize("raw_norm", ref.RAW_NORMS)
@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_scan_gradients_loop_equal_vectorized(direction, raw_norm):
    img, cap, lens = make_inputs(seed=6)
    for agg in ref.AGGREGATIONS:
        kw = scan_kwargs(direction, raw_norm, agg)
        loop = input_grads(lambda i, c, l, kw=kw: ref.scan_similarity_loop(i, c, l, **kw), img, cap, lens)
        vec = input_grads(lambda i, c, l, kw=kw: ref.scan_similarity_vectorized(
            i, c, l, **kw, img_chunk=2, cap_chunk=3), img, cap, lens)
        for got, want in zip(vec, loop):
            assert torch.isfinite(got).all()
            assert_close(got, want, F64_VECTORIZED_VS_LOOP)
        # Padding positions receive exactly zero gradient.
        mask = torch.arange(cap.shape[1]) < lens.unsqueeze(1)
        assert (vec[2][~mask] == 0).all()


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_scan_vectorized_gradcheck(direction):
    img, cap, lens = make_inputs(n_img=2, lens=(3, 1, 2), regions=3, d=3, seed=7, pad=0.7)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    # Two blockings: several blocks (ragged trimming per caption chunk) and a single block.
    for raw_norm, agg, chunks in [("clipped_l2norm", "lse", (1, 2)), ("softmax", "mean", (None, None))]:
        kw = scan_kwargs(direction, raw_norm, agg)
        assert torch.autograd.gradcheck(
            lambda i, c, kw=kw, chunks=chunks: ref.scan_similarity_vectorized(i, c, lens, **kw, img_chunk=chunks[0],
                                                        cap_chunk=chunks[1]),
            (img, cap))


# ------------------------------------------------------------------------------------------
# SCAN: padding and permutations
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ref.DIRECTIONS)
@pytest.mark.parametrize("form", ["loop", "vectorized"])
def test_scan_nan_padding_never_leaks(direction, form):
    fn = getattr(ref, f"scan_similarity_{form}")
    nan_inputs = make_inputs(seed=8)
    zero_inputs = make_inputs(seed=8, pad=0.0)
    for raw_norm, agg in [("clipped_l2norm", "mean"), ("l2norm", "lse"), ("softmax", "max")]:
        kw = scan_kwargs(direction, raw_norm, agg)
        with_nan = input_grads(lambda i, c, l, kw=kw: fn(i, c, l, **kw), *nan_inputs)
        with_zero = input_grads(lambda i, c, l, kw=kw: fn(i, c, l, **kw), *zero_inputs)
        for got, want in zip(with_nan, with_zero):
            assert torch.isfinite(got).all()
            assert_close(got, want, BIT_EQUAL)


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_scan_permuting_inputs_permutes_the_matrix(direction):
    img, cap, lens = make_inputs(seed=9)
    kw = scan_kwargs(direction, agg="lse")
    base = ref.scan_similarity_vectorized(img, cap, lens, **kw, img_chunk=2, cap_chunk=3)
    cap_perm = torch.randperm(len(LENS), generator=torch.Generator().manual_seed(1))
    img_perm = torch.randperm(img.shape[0], generator=torch.Generator().manual_seed(2))
    out = ref.scan_similarity_vectorized(img[img_perm], cap[cap_perm], lens[cap_perm], **kw,
                                         img_chunk=2, cap_chunk=3)
    assert_close(out, base[img_perm][:, cap_perm], F64_PERMUTED)


def test_longer_padding_changes_nothing():
    img, cap, lens = make_inputs(seed=10)
    longer = torch.cat([cap, torch.full((cap.shape[0], 3, cap.shape[2]), float("nan"), dtype=F64)], 1)
    for direction in ref.DIRECTIONS:
        kw = scan_kwargs(direction)
        assert_close(ref.scan_similarity_vectorized(img, longer, lens, **kw),
                                   ref.scan_similarity_loop(img, cap, lens, **kw), F64_VECTORIZED_VS_LOOP)


# ------------------------------------------------------------------------------------------
# Cross attention: the Gram identity the fused kernels rely on
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw_norm", ["clipped_l2norm", "softmax", "l1norm"])
def test_gram_identity(raw_norm):
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(4, 6, 8, generator=gen, dtype=F64)     # (P, Q, d)
    context = torch.randn(4, 5, 8, generator=gen, dtype=F64)   # (P, C, d)
    ctx = ref.cross_attention(query, context, 9.0, raw_norm)
    scores = ref.raw_scores(query, context)                    # (P, C, Q)
    alpha = ref.attention_weights(scores, 9.0, raw_norm)       # (P, Q, C)
    gram = context @ context.transpose(1, 2)
    dot = (query * ctx).sum(-1)
    assert_close(dot, (alpha * scores.transpose(1, 2)).sum(-1), F64_IDENTITY)
    squared_norm = (ctx * ctx).sum(-1)
    assert_close(squared_norm, torch.einsum("pqc,pcd,pqd->pq", alpha, gram, alpha),
                 F64_IDENTITY)
    # And the attended vectors are convex combinations of the context (rows of alpha sum to 1).
    assert_close(alpha.sum(-1), torch.ones(4, 6, dtype=F64), F64_SOFTMAX_SUMS_TO_ONE)


def test_cross_attention_modulation_and_per_query_temperature():
    gen = torch.Generator().manual_seed(12)
    query = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    context = torch.randn(2, 5, 4, generator=gen, dtype=F64)
    m = torch.rand(2, 3, 4, generator=gen, dtype=F64) * 2 - 1
    lam = torch.rand(2, 3, generator=gen, dtype=F64) * 10
    ctx = ref.cross_attention(query, context, lam, modulation=m)
    for p, k in itertools.product(range(2), range(3)):
        s = context[p] @ (query[p, k] * m[p, k])               # (C,)
        x = torch.where(s > 0, s, 0.1 * s)
        # The norm over the query axis needs every query's score for each context item.
        all_s = context[p] @ (query[p] * m[p]).T               # (C, Q)
        all_x = torch.where(all_s > 0, all_s, 0.1 * all_s)
        a = x / (all_x.pow(2).sum(1).sqrt() + 1e-8)
        alpha = torch.softmax(lam[p, k] * a, 0)
        assert_close(ctx[p, k], alpha @ context[p], F64_ATTENDED_CONTEXT)


# ------------------------------------------------------------------------------------------
# RCAR
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("regulator,direction,steps", list(valid_rcar_modes()))
def test_rcar_loop_equals_vectorized(regulator, direction, steps):
    head = make_head(regulator, steps, direction)
    img, cap, lens = make_inputs()
    with torch.no_grad():
        loop = head.forward_loop(img, cap, lens)
        assert loop.shape == (5, 7) and loop.dtype == F64 and torch.isfinite(loop).all()
        for chunks in [(None, None), (2, 3), (3, 2)]:
            vec = head.forward_vectorized(img, cap, lens, *chunks)
            assert_close(vec, loop, F64_VECTORIZED_VS_LOOP)
        assert_close(head(img, cap, lens), loop, F64_VECTORIZED_VS_LOOP)


@pytest.mark.parametrize("regulator,direction,steps",
                         [("coop_rcar", "t2i", 2), ("coop_rcar", "i2t", 2), ("only_rcr", "t2i", 2),
                          ("only_rcr", "i2t", 1), ("only_rar", "t2i", 2), ("only_rar", "i2t", 1)])
def test_rcar_gradients_loop_equal_vectorized(regulator, direction, steps):
    head = make_head(regulator, steps, direction, seed=3)
    img, cap, lens = make_inputs(seed=13)
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(4), dtype=F64)
    grads = []
    for form in (head.forward_loop, lambda i, c, l: head.forward_vectorized(i, c, l, 2, 3)):
        img_g, cap_g = img.clone().requires_grad_(True), cap.clone().requires_grad_(True)
        params = list(head.parameters())
        out = form(img_g, cap_g, lens)
        grads.append(torch.autograd.grad((out * weights).sum(), [img_g, cap_g] + params,
                                         allow_unused=True))
    for got, want in zip(*grads):
        if want is None:      # a parameter the mode never uses (e.g. sim_eval_w in only_rcr)
            assert got is None
            continue
        assert torch.isfinite(got).all()
        assert_close(got, want, F64_VECTORIZED_VS_LOOP)


@pytest.mark.parametrize("regulator,steps,direction,regions,head_seed,input_seed",
                         [("coop_rcar", 2, "t2i", 3, 5, 14), ("only_rcr", 1, "i2t", 2, 6, 15)])
def test_rcar_vectorized_gradcheck(regulator, steps, direction, regions, head_seed, input_seed):
    head = make_head(regulator, steps, direction, d=3, sim_dim=4, seed=head_seed)
    img, cap, lens = make_inputs(n_img=2, lens=(3, 1, 2), regions=regions, d=3, seed=input_seed,
                                 pad=0.3)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, c: head.forward_vectorized(i, c, lens, 2, 2), (img, cap))


@pytest.mark.parametrize("regulator,direction,steps",
                         [("coop_rcar", "t2i", 2), ("coop_rcar", "i2t", 3), ("only_rcr", "i2t", 2),
                          ("only_rar", "t2i", 1)])
def test_rcar_nan_padding_never_leaks(regulator, direction, steps):
    head = make_head(regulator, steps, direction, seed=7)
    nan_inputs = make_inputs(seed=16)
    zero_inputs = make_inputs(seed=16, pad=0.0)
    for form in (head.forward_loop, head.forward_vectorized):
        with_nan = input_grads(form, *nan_inputs)
        with_zero = input_grads(form, *zero_inputs)
        for got, want in zip(with_nan, with_zero):
            assert torch.isfinite(got).all()
            assert_close(got, want, BIT_EQUAL)


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_rcar_permuting_inputs_permutes_the_matrix(direction):
    head = make_head("coop_rcar", 2, direction, seed=8)
    img, cap, lens = make_inputs(seed=17)
    with torch.no_grad():
        base = head.forward_vectorized(img, cap, lens, 2, 3)
        cap_perm = torch.randperm(len(LENS), generator=torch.Generator().manual_seed(3))
        img_perm = torch.randperm(img.shape[0], generator=torch.Generator().manual_seed(4))
        out = head.forward_vectorized(img[img_perm], cap[cap_perm], lens[cap_perm], 2, 3)
    assert_close(out, base[img_perm][:, cap_perm], F64_PERMUTED)


def unit(x):
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


def test_rcar_coop_t2i_with_one_region_by_hand():
    # One region x: every word attends to it with weight 1 whatever m and lambda are, so every
    # step's normalised attended context is x / (|x| + eps), RCR has no effect, and the score is
    # a short formula of the weights.
    head = make_head("coop_rcar", 2, "t2i", seed=9)
    img, cap, lens = make_inputs(n_img=2, regions=1, seed=18)
    out = head.forward_loop(img, cap, lens).detach()
    w = {k: v.detach() for k, v in head.state_dict().items()}

    def linear(prefix, x):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    def rar(n, mid, hig):
        keys = torch.tanh(linear(f"rar_modules.{n}.rar_k_w.0", mid))
        question = torch.tanh(linear(f"rar_modules.{n}.rar_q_w.0", hig))
        weights = torch.softmax(linear(f"rar_modules.{n}.rar_v_w.0", keys * question)[:, 0], 0)
        return unit((weights[:, None] * mid).sum(0))

    for i, j in itertools.product(range(2), range(len(LENS))):
        words, x = cap[j, :LENS[j]], img[i, 0]
        mids = [unit(linear(f"alv_modules.{t}.sim_transform_w", (words - unit(x)) ** 2)) for t in range(2)]
        hig = rar(1, mids[1], rar(0, mids[0], mids[0].mean(0)))
        want = torch.sigmoid(linear("sim_eval_w", hig))
        assert out[i, j].item() == approx(want.item(), F64_SCALAR_CLOSED_FORM)


@pytest.mark.parametrize("direction", ref.DIRECTIONS)
def test_rcar_only_rcr_zero_steps_is_scan_mean(direction):
    # The plain baseline: mean cosine with the l2-normalised attended context, which equals SCAN
    # mean up to the eps in l2norm (cosine is scale invariant otherwise).
    head = make_head("only_rcr", 0, direction, smooth=6.0)
    img, cap, lens = make_inputs(seed=19)
    with torch.no_grad():
        rcar = head.forward_vectorized(img, cap, lens)
    scan = ref.scan_similarity_loop(img, cap, lens, direction=direction, smooth=6.0, agg="mean")
    assert_close(rcar, scan, F64_RCAR_EQUALS_SCAN)


def test_rcar_only_rar_zero_steps_is_sigmoid_of_mean_alignment():
    head = make_head("only_rar", 0, "i2t", seed=10)
    img, cap, lens = make_inputs(n_img=2, seed=20)
    with torch.no_grad():
        out = head.forward_vectorized(img, cap, lens)
        for i, j in itertools.product(range(2), range(len(LENS))):
            words = cap[j, :LENS[j]].unsqueeze(0)
            ctx = ref.cross_attention(img[i:i + 1], words, 3.0)
            mid = head.alv_modules[0](img[i:i + 1], unit(ctx))
            want = torch.sigmoid(head.sim_eval_w(mid.mean(1)))
            assert out[i, j].item() == approx(want.item(), F64_SCALAR_CLOSED_FORM)


def test_rcar_steps_change_the_result():
    # Guards against a mode silently ignoring its regulators.
    img, cap, lens = make_inputs(seed=21)
    with torch.no_grad():
        for regulator in ref.REGULATORS:
            one = make_head(regulator, 1, "t2i", seed=11).forward_vectorized(img, cap, lens)
            two = make_head(regulator, 2, "t2i", seed=11).forward_vectorized(img, cap, lens)
            assert (one - two).abs().max() > MUST_DIFFER


def test_rcar_dropout_only_in_training():
    head = make_head("coop_rcar", 2, "t2i", seed=12)
    img, cap, lens = make_inputs(seed=22)
    with torch.no_grad():
        assert_close(head.forward_vectorized(img, cap, lens),
                                   head.forward_vectorized(img, cap, lens), BIT_EQUAL)
        head.train()
        torch.manual_seed(0)
        first = head.forward_vectorized(img, cap, lens)
        second = head.forward_vectorized(img, cap, lens)
        assert (first - second).abs().max() > MUST_DIFFER
    dropouts = [m for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 4 and all(m.p == 0.4 for m in dropouts)


@pytest.mark.parametrize("regulator,steps,counts", [
    ("only_rar", 0, (1, 0, 0)), ("only_rar", 3, (1, 0, 3)), ("only_rcr", 0, (0, 0, 0)),
    ("only_rcr", 2, (2, 2, 0)), ("coop_rcar", 1, (1, 0, 1)), ("coop_rcar", 3, (3, 2, 3))])
def test_rcar_module_counts(regulator, steps, counts):
    head = ref.RCARHead(16, 8, regulator, steps)
    assert (len(head.alv_modules), len(head.rcr_modules), len(head.rar_modules)) == counts


@pytest.mark.parametrize("kwargs", [dict(regulator="coop_rcar", steps=0), dict(steps=-1),
                                    dict(steps=1.5), dict(regulator="rcar"), dict(direction="both")])
def test_rcar_rejects_invalid_configurations(kwargs):
    with pytest.raises(ValueError):
        ref.RCARHead(16, 8, **kwargs)


def test_rcar_official_init():
    head = ref.RCARHead(16, 8, "coop_rcar", 2)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + 2 * 3 + 1 * 4 + 2 * 1
    for layer in linears:
        bound = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
        assert (layer.bias == 0).all()
        assert layer.weight.abs().max() <= bound
        if layer.weight.numel() >= 32:   # uniform draws fill the interval
            assert layer.weight.abs().max() > 0.8 * bound


# ------------------------------------------------------------------------------------------
# Block sizes and low precision
# ------------------------------------------------------------------------------------------

def test_default_chunks_bound_the_block():
    for n_img, n_cap, longest, d, size in [(5000, 25000, 36, 1024, 4), (1000, 5000, 36, 1024, 8),
                                            (3, 2, 36, 1024, 8), (1, 1, 10**6, 1024, 8)]:
        img_chunk, cap_chunk = ref.default_chunks(n_img, n_cap, longest, d, size)
        assert 1 <= img_chunk <= n_img and 1 <= cap_chunk <= n_cap
        if img_chunk * cap_chunk > 1:
            assert img_chunk * cap_chunk * longest * d * size <= ref.BLOCK_BYTES
    assert ref.default_chunks(3, 2, 36, 1024, 8) == (3, 2)
    assert ref.default_chunks(100, 100, 36, 1024, 8, img_chunk=7)[0] == 7
    with pytest.raises(ValueError):
        ref.default_chunks(100, 100, 36, 1024, 8, cap_chunk=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_runs_and_stays_near_float64(dtype):
    img, cap, lens = make_inputs(seed=23)
    img, cap = ref.l2norm(img), ref.l2norm(cap)
    bound = REFERENCE_LOW_PRECISION_ABS[dtype]
    for direction in ref.DIRECTIONS:
        kw = scan_kwargs(direction, agg="lse")
        want = ref.scan_similarity_loop(img, cap, lens, **kw)
        got = ref.scan_similarity_vectorized(img.to(dtype), cap.to(dtype), lens, **kw)
        assert got.dtype == dtype
        assert_close(got.double(), want, bound, what=f"{direction} in {dtype}")
    head = make_head("coop_rcar", 2, "i2t", seed=13)
    with torch.no_grad():
        want = head.forward_vectorized(img, cap, lens)
        got = head.to(dtype).forward_vectorized(img.to(dtype), cap.to(dtype), lens)
    assert got.dtype == dtype
    assert_close(got.double(), want, bound, what=f"rcar in {dtype}")
