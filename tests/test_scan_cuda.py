"""SCAN on the CUDA C++ backend (csrc/cuda/scan.cu, rcar_fast/ops/scan.py).

On a machine without a GPU this file checks what can be checked there: the extension was built
with the CUDA kernels when nvcc exists, the dispatcher's reasons, the caption grouping and tile
choice, and the backward's math and gradient assembly (the per-pair quantities the kernel
writes are emulated in float64 with torch autograd, then fed through the same assembly code the
GPU path uses). The GPU tests run the kernels against the float64 reference.
"""
import os
import re

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch, reference
from rcar_fast.ops import scan as scan_ops
from rcar_fast.contract import AGGREGATIONS, DIRECTIONS, RAW_NORMS, SCAN_PUBLISHED
from tests.conftest import native_or_skip, requires_cuda_build, requires_gpu
from tests.inputs import make_inputs
from tests.tolerances import (CUDA_VS_TRITON, CUDA_VS_TRITON_FACTOR, CUDA_VS_TRITON_SCALE_FLOOR, F32_BLOCKED,
                              F64_GRADIENT_ASSEMBLY, F64_PAIR_BACKWARD, Tolerance, assert_bit_equal, assert_close,
                              assert_close_to_reference, assert_scaled_close)

SMOOTH = {direction: s["smooth"] for direction, s in SCAN_PUBLISHED["f30k"].items()}
LSE_LAMBDA = {direction: s["lse_lambda"] for direction, s in SCAN_PUBLISHED["f30k"].items()}


def _every_option(test):
    """Parametrizes `test` over the kernels' whole option grid: direction x raw_norm x agg."""
    for name, values in (("agg", AGGREGATIONS), ("raw_norm", RAW_NORMS), ("direction", DIRECTIONS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def _options(direction, raw_norm="clipped_l2norm", agg="mean"):
    return scan_ops.Options(direction, raw_norm, SMOOTH[direction], agg, LSE_LAMBDA[direction])


def _inputs(n_img, n_cap, R, d, lens, *, lmax=None, dtype=torch.float32, **kw):
    """make_inputs with features of roughly unit norm (x / sqrt(d)) and NaN in the caption padding."""
    return make_inputs(n_img, n_cap, R, d, lmax, lens=lens, scale=d ** -0.5, dtype=dtype, **kw)


# ----------------------------------------------------------------------------------------------
# Runs anywhere
# ----------------------------------------------------------------------------------------------

@requires_cuda_build
def test_extension_built_with_cuda_when_nvcc_exists():
    native = native_or_skip()
    assert native.built_with_cuda(), "nvcc exists but rcar_fast._C was built without CUDA kernels"
    for name in ("scan_forward_cuda", "scan_backward_cuda", "gram_ragged_cuda", "row_sqnorms_cuda"):
        assert hasattr(native, name), f"rcar_fast._C lacks {name}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a GPU-less machine")
def test_backends_say_no_gpu_is_visible():
    native = native_or_skip()
    if not native.built_with_cuda():
        pytest.skip("extension built without CUDA kernels")
    report = rcar_fast.backends()["cuda"]
    assert report["available"] is False
    assert report["reason"] == "CUDA kernels are built, but no CUDA GPU is visible"
    assert "scan" in report["ops"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a GPU-less machine")
def test_requesting_cuda_for_cpu_tensors_raises_with_the_reason():
    native = native_or_skip()
    img, cap, lens = _inputs(2, 3, 4, 8, [2, 3, 1])
    expected = "no CUDA GPU is visible" if native.built_with_cuda() else "built without CUDA"
    with pytest.raises(rcar_fast.BackendUnavailable, match=expected):
        rcar_fast.scan_similarity(img, cap, lens, backend="cuda")


@pytest.mark.parametrize("lens,capacity", [([1], 128), ([5, 9, 3, 12, 7, 1, 2], 16),
                                           ([16, 16, 1, 16], 16), (list(range(1, 40)), 64)])
def test_caption_groups_are_consecutive_and_fit(lens, capacity):
    first = scan_ops.caption_groups(lens, capacity)
    assert first[0] == 0 and first[-1] == len(lens)
    assert all(a < b for a, b in zip(first, first[1:])), "every group holds at least one caption"
    for a, b in zip(first, first[1:]):
        assert sum(lens[a:b]) <= capacity
        if b < len(lens):  # greedy: the next caption did not fit
            assert sum(lens[a:b + 1]) > capacity


def test_tile_choice_prefers_wide_groups_and_refuses_what_does_not_fit():
    rows = lambda c: (8 // c) * 160  # noqa: E731  (the kernel's rule, see make_tile in scan.cu)
    cols = lambda c: c * 16  # noqa: E731
    assert scan_ops.tile_col_frags(36, 128, rows, cols) == 8
    assert scan_ops.tile_col_frags(197, 40, rows, cols) == 4
    assert scan_ops.tile_col_frags(577, 30, rows, cols) == 2
    with pytest.raises(rcar_fast.BackendUnavailable, match="R=36 regions with a caption of 129"):
        scan_ops.tile_col_frags(36, 129, rows, cols)
    native = dispatch.native_module()
    if not isinstance(native, str) and native.built_with_cuda():
        assert [native.scan_tile_rows(c) for c in (8, 4, 2)] == [rows(c) for c in (8, 4, 2)]
        assert [native.scan_tile_cols(c) for c in (8, 4, 2)] == [cols(c) for c in (8, 4, 2)]


# The CUDA unit (csrc/cuda/<unit>) that defines and binds each problem struct.
PROBLEM_UNITS = {"ScanProblem": "scan.cu", "MaxSimProblem": "maxsim.cu", "RcarProblem": "rcar.cu"}


def _cuda_source(name: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "csrc", "cuda", name)) as f:
        return f.read()


def binding_fields(struct_name: str) -> set:
    """Keyword fields the binding of rcar_cuda::`struct_name` (the binding block of its .cu)
    requires: its own ("name", &Struct::name) entries, plus the shared tile's (tile_fields,
    csrc/cuda/bind.h)."""
    text = _cuda_source(PROBLEM_UNITS[struct_name])
    body = text[text.index(f"ProblemClass<{struct_name}>"):]
    body = body[:body.index(".finish()")]
    fields = set(re.findall(rf'"(\w+)", &{struct_name}::\1\b', body))
    if "tile_fields(" in body:
        helper = _cuda_source("bind.h")
        helper = helper[helper.index("tile_fields(ProblemClass<P>& cls)"):]
        fields |= set(re.findall(r'"(\w+)", &P::\1\b', helper[:helper.index(";\n}")]))
    return fields


def _struct_fields(body: str) -> set:
    body = re.sub(r"//[^\n]*", "", body[:body.index("};")])
    declarations = [line.strip().rstrip(";") for line in body.split("\n") if line.strip()]
    return {name.strip().split()[-1].lstrip("*") for decl in declarations for name in decl.split(",")}


def kernel_fields(struct_name: str) -> set:
    """Field names of rcar_cuda::`struct_name` in its .cu."""
    text = _cuda_source(PROBLEM_UNITS[struct_name])
    return _struct_fields(text[text.index(f"struct {struct_name} {{\n"):].split("\n", 1)[1])


@pytest.mark.parametrize("struct_name", sorted(PROBLEM_UNITS))
def test_the_binding_sets_every_field_of_the_kernel_struct(struct_name):
    fields = binding_fields(struct_name)
    assert len(fields) > 10 and fields == kernel_fields(struct_name)


def _problem_fields(direction="t2i"):
    img, cap, lens = _inputs(2, 3, 4, 8, [2, 3, 1])
    f32 = torch.zeros(8)
    i64 = torch.zeros(4, dtype=torch.int64)
    caps = scan_ops.Captions(cap=cap, lens=lens, lens_host=[2, 3, 1], word_off=i64, total_words=6,
                              max_len=3, col_frags=8, group_first=torch.zeros(2, dtype=torch.int32),
                              gram=f32, gram_off=i64, word_sq=f32)
    images = scan_ops.Images(img=img, gram=f32, region_sq=f32)
    return scan_ops.problem(images, caps, _options(direction))


def test_the_typed_problem_takes_every_field_and_names_a_bad_one():
    native = dispatch.native_module()
    if isinstance(native, str) or not native.built_with_cuda():
        pytest.skip("rcar_fast._C was built without the CUDA kernels")
    fields = _problem_fields("i2t")
    problem = native.ScanProblemCuda(**fields)
    assert {name: getattr(problem, name) for name in fields} == pytest.approx(fields)
    missing = {k: v for k, v in fields.items() if k != "query_sq"}
    for bad, message in [(missing, "'query_sq' is missing"), ({**fields, "alpha": 1}, "unknown field 'alpha'"),
                         ({**fields, "n_img": 2.5}, "'n_img' has the wrong type")]:
        with pytest.raises(RuntimeError, match=message):
            native.ScanProblemCuda(**bad)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_problem_dict_matches_what_the_binding_reads(direction):
    problem = _problem_fields(direction)
    assert set(problem) == binding_fields("ScanProblem")
    assert problem["raw_norm"] == 0 and problem["agg"] == 0 and problem["i2t"] == int(direction == "i2t")
    assert all(isinstance(v, (int, float)) for v in problem.values())


def _pair_autograd(query, context, options, upstream):
    """One pair through the Gram identity with autograd, treating S, G and |q| as independent:
    returns what the backward kernel writes for it (dL/dS (C, Q), alpha (Q, C),
    2 dL/d|ctx|^2 alpha (Q, C), dL/d|q| (Q,))."""
    scores = (context @ query.T).detach().requires_grad_()
    gram = context @ context.T
    q_norm = query.norm(dim=1).detach().requires_grad_()
    normalized = reference.normalize_raw_scores(scores, options.raw_norm)
    alpha = torch.softmax(options.smooth * normalized.T, dim=1)
    dot = (alpha * scores.T).sum(1)
    ctx_sq = torch.einsum("kc,ce,ke->k", alpha, gram, alpha)
    ctx_sq.retain_grad()
    r = dot / (q_norm * ctx_sq.sqrt()).clamp(min=reference.EPS)
    sim = reference.aggregate(r, options.agg, options.lse_lambda)
    (sim * upstream).backward()
    return scores.grad, alpha.detach(), 2 * ctx_sq.grad[:, None] * alpha.detach(), q_norm.grad


def _manual_pair_backward(scores, gram, q_sq, options, upstream):
    """The hand-derived backward of pair_backward in scan.cu, pass by pass, in torch."""
    eps, lam, raw = reference.EPS, options.smooth, options.raw_norm
    clipped = raw.startswith("clipped")
    f = torch.where(scores > 0, scores, 0.1 * scores) if clipped else scores
    ones = torch.ones_like(scores)
    slope = torch.where(scores > 0, ones, 0.1 * ones) if clipped else ones
    l2, l1 = raw.endswith("l2norm"), raw.endswith("l1norm")
    if raw == "softmax":
        a = torch.softmax(scores, dim=1)
    elif l2:
        a = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
    elif l1:
        a = f / (f.abs().sum(1, keepdim=True) + eps)
    else:
        a = f
    alpha = torch.softmax(lam * a.T, dim=1)                       # (Q, C)
    u = alpha @ gram
    dot, ctx_sq = (alpha * scores.T).sum(1), (alpha * u).sum(1)
    q_norm, ctx_norm = q_sq.sqrt(), ctx_sq.clamp(min=0).sqrt()
    product = q_norm * ctx_norm
    den = product.clamp(min=eps)
    r = dot / den
    Q = r.numel()
    if options.agg == "mean":
        weight = torch.full_like(r, 1.0 / Q)
    elif options.agg == "sum":
        weight = torch.ones_like(r)
    elif options.agg == "max":
        weight = (r == r.max()).to(r) / (r == r.max()).sum()
    else:
        weight = torch.softmax(options.lse_lambda * r, dim=0)
    dr = upstream * weight
    active = product >= eps
    d_den = -dr * dot / den ** 2
    d_qn = torch.where(active, d_den * ctx_norm, torch.zeros_like(r))
    d_sq = torch.where(active & (ctx_norm > 0), d_den * q_norm / (2 * ctx_norm), torch.zeros_like(r))
    d_dot = dr / den
    d_alpha = d_dot[:, None] * scores.T + 2 * d_sq[:, None] * u
    inner = (alpha * d_alpha).sum(1, keepdim=True)
    da = (lam * alpha * (d_alpha - inner)).T                      # (C, Q)
    if raw == "softmax":
        d_s = a * (da - (a * da).sum(1, keepdim=True))
    else:
        if l2 or l1:
            norm = f.pow(2).sum(1, keepdim=True).sqrt() if l2 else f.abs().sum(1, keepdim=True)
            inv = 1.0 / (norm + eps)
            inner_c = (da * f).sum(1, keepdim=True)
            direction = f / norm if l2 else torch.sign(f)
            da = inv * da - inv * inv * inner_c * direction
        d_s = da * slope
    d_s = d_s + d_dot[None, :] * alpha.T
    return d_s, alpha, 2 * d_sq[:, None] * alpha, d_qn


@_every_option
def test_hand_derived_pair_backward_matches_autograd(direction, raw_norm, agg):
    options = _options(direction, raw_norm, agg)
    C, Q, d = (7, 5, 12) if direction == "t2i" else (5, 7, 12)
    query, context = torch.randn(Q, d, dtype=torch.float64), torch.randn(C, d, dtype=torch.float64)
    upstream = torch.tensor(0.7, dtype=torch.float64)
    expected = _pair_autograd(query, context, options, upstream)
    got = _manual_pair_backward(context @ query.T, context @ context.T, query.pow(2).sum(1), options,
                                upstream)
    for name, e, g in zip(("dS", "alpha", "alpha_scaled", "d|q|"), expected, got):
        assert_close(g, e, F64_PAIR_BACKWARD, what=f"{name} ({direction}, {raw_norm}, {agg})")


def _emulated_pair_grads(img, cap, lens, options, grad_sims):
    """The buffers scan_backward_cuda writes, in float64 through _pair_autograd."""
    n_img, R, _ = img.shape
    lens_list = [int(v) for v in lens]
    word_off = [0]
    for n in lens_list:
        word_off.append(word_off[-1] + n)
    rows, words = n_img * R, word_off[-1]
    shape = (rows, words) if options.i2t else (words, rows)
    d_scores, attn, scaled = (torch.full(shape, float("nan"), dtype=torch.float64) for _ in range(3))
    d_qn = torch.full((rows, len(lens_list)) if options.i2t else (words, n_img), float("nan"),
                      dtype=torch.float64)
    for i in range(n_img):
        for j, n_words in enumerate(lens_list):
            words_j = cap[j, :n_words]
            query, context = (img[i], words_j) if options.i2t else (words_j, img[i])
            ds, a, s, dq = _pair_autograd(query, context, options, grad_sims[i, j])
            image_rows = slice(i * R, (i + 1) * R)
            word_cols = slice(word_off[j], word_off[j] + n_words)
            block = (image_rows, word_cols) if options.i2t else (word_cols, image_rows)
            d_scores[block], attn[block], scaled[block] = ds.T, a, s
            if options.i2t:
                d_qn[image_rows, j] = dq
            else:
                d_qn[word_cols, i] = dq
    return scan_ops.PairGrads(d_scores, attn, scaled, d_qn)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("raw_norm,agg", [("clipped_l2norm", "mean"), ("l1norm", "lse"),
                                          ("softmax", "max"), ("no_norm", "sum")])
def test_gradient_assembly_matches_reference_autograd(direction, raw_norm, agg):
    """Per-pair buffers (emulated) -> GradientAccumulator -> d img, d cap, over two image chunks,
    against autograd through the float64 loop reference."""
    options = _options(direction, raw_norm, agg)
    lens = [3, 1, 5, 2]
    img, cap, lens_t = _inputs(3, 4, 4, 6, lens, dtype=torch.float64, lmax=6)
    grad_sims = torch.randn(3, 4, dtype=torch.float64)
    acc = scan_ops.GradientAccumulator(cap, lens, options, torch.float64)
    d_img = torch.cat([acc.add_chunk(img[i0:i1], _emulated_pair_grads(img[i0:i1], cap, lens, options,
                                                                       grad_sims[i0:i1]))
                       for i0, i1 in ((0, 2), (2, 3))])
    d_cap = acc.caption_grad()

    img_ref, cap_ref = img.clone().requires_grad_(), cap.clone().requires_grad_()
    sims = reference.scan_similarity_loop(img_ref, cap_ref, lens_t, direction=direction,
                                          raw_norm=raw_norm, smooth=options.smooth, agg=agg,
                                          lse_lambda=options.lse_lambda)
    (sims * grad_sims).sum().backward()
    assert_close(d_img, img_ref.grad, F64_GRADIENT_ASSEMBLY, what="d img")
    assert_close(d_cap, cap_ref.grad, F64_GRADIENT_ASSEMBLY, what="d cap")
    padding = torch.arange(6)[None, :] >= lens_t[:, None]
    assert bool((d_cap[padding] == 0).all()), "caption padding must get zero gradient"


def test_backward_chunk_size_respects_budget():
    per_image = 4 * 36 * (3 * 1000 + 80)
    assert scan_ops.backward_image_chunk(100, 36, 1000, 80, 20, False, budget=10 * per_image) == 10
    assert scan_ops.backward_image_chunk(100, 36, 1000, 80, 20, False, budget=1) == 1
    assert scan_ops.backward_image_chunk(5, 36, 1000, 80, 20, False, budget=2**40) == 5
    assert (scan_ops.backward_image_chunk(100, 36, 1000, 80, 20, True, budget=10 * per_image)
            < scan_ops.backward_image_chunk(100, 36, 1000, 80, 20, False, budget=10 * per_image))


# ----------------------------------------------------------------------------------------------
# GPU: the kernels against the float64 reference
# ----------------------------------------------------------------------------------------------

def _ref64(img, cap, lens, **kw):
    return rcar_fast.scan_similarity(img.double(), cap.double(), lens, backend="reference", **kw)


def _kwargs(direction, raw_norm="clipped_l2norm", agg="mean"):
    return dict(direction=direction, raw_norm=raw_norm, smooth=SMOOTH[direction], agg=agg,
                lse_lambda=LSE_LAMBDA[direction])


def _random_lens(n_cap, max_len, min_len=1):
    return torch.randint(min_len, max_len + 1, (n_cap,)).tolist()


@requires_gpu
@_every_option
def test_forward_every_option_fp32(direction, raw_norm, agg):
    img, cap, lens = _inputs(5, 7, 11, 40, _random_lens(7, 9), device="cuda", lmax=10)
    kw = _kwargs(direction, raw_norm, agg)
    out = rcar_fast.scan_similarity(img, cap, lens, backend="cuda", **kw)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, _ref64(img, cap, lens, **kw), dtype=torch.float32,
                              what=f"scan cuda {direction} {raw_norm} {agg}")


# (n_img, n_cap, R, d, longest caption): scalar and 16-byte load paths (d % 8), several image
# blocks and caption groups, every tile shape.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 4, 36, 1024, 30),
    (9, 50, 36, 64, 30),
    (7, 30, 37, 33, 128),
    (2, 5, 161, 24, 20),
    (2, 3, 400, 16, 12),
    (17, 3, 5, 8, 3),
]


@requires_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_shapes_and_dtypes(shape, direction, dtype):
    n_img, n_cap, R, d, longest = shape
    lens = _random_lens(n_cap, longest)
    lens[0] = longest
    img, cap, lens = _inputs(n_img, n_cap, R, d, lens, dtype=dtype, device="cuda", lmax=longest + 2)
    kw = _kwargs(direction, agg="lse")
    out = rcar_fast.scan_similarity(img, cap, lens, backend="cuda", **kw)
    ref_lowp = None if dtype == torch.float32 else rcar_fast.scan_similarity(
        img, cap, lens, backend="reference", **kw)
    assert_close_to_reference(out, _ref64(img, cap, lens, **kw), dtype=dtype, ref_lowp=ref_lowp,
                              what=f"scan cuda {shape} {direction} {dtype}")


@requires_gpu
def test_forward_writes_every_entry_of_a_poisoned_output():
    img, cap, lens = _inputs(6, 40, 36, 64, _random_lens(40, 25), device="cuda", lmax=25)
    for direction in DIRECTIONS:
        out = torch.full((6, 40), float("nan"), device="cuda")
        scan_ops.scan_forward(img, cap, lens, _options(direction), out=out)
        assert_close_to_reference(out, _ref64(img, cap, lens, **_kwargs(direction)), dtype=torch.float32)


@requires_gpu
def test_forward_strided_inputs():
    img_base, cap_base, _ = _inputs(8, 10, 12, 48, [12] * 10, device="cuda")
    img, cap = img_base[::2, ::2, :40], cap_base[::2, :, :40]   # strides in every dimension but d
    lens = torch.tensor([3, 6, 1, 5, 4], device="cuda")
    for direction in DIRECTIONS:
        out = rcar_fast.scan_similarity(img, cap, lens, backend="cuda", **_kwargs(direction))
        assert_close_to_reference(out, _ref64(img, cap, lens, **_kwargs(direction)), dtype=torch.float32)


@requires_gpu
def test_forward_refuses_shapes_the_tile_cannot_hold():
    img, cap, lens = _inputs(1, 1, 200, 8, [100], device="cuda")
    with pytest.raises(rcar_fast.BackendUnavailable, match="tile cannot hold"):
        rcar_fast.scan_similarity(img, cap, lens, backend="cuda")


def _grads(backend, img, cap, lens, grad_sims, **kw):
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    sims = rcar_fast.scan_similarity(img, cap, lens, backend=backend, **kw)
    (sims * grad_sims).sum().backward()
    return img.grad, cap.grad


@requires_gpu
@_every_option
def test_backward_every_option_fp32(direction, raw_norm, agg):
    img, cap, lens = _inputs(4, 6, 9, 24, _random_lens(6, 7), device="cuda", lmax=8)
    grad_sims = torch.randn(4, 6, device="cuda")
    kw = _kwargs(direction, raw_norm, agg)
    d_img, d_cap = _grads("cuda", img, cap, lens, grad_sims, **kw)
    r_img, r_cap = _grads("reference", img.double(), cap.double(), lens, grad_sims.double(), **kw)
    assert d_img.dtype == img.dtype and d_cap.dtype == cap.dtype
    assert_close_to_reference(d_img, r_img, dtype=torch.float32, what="d img")
    padding = torch.arange(8, device="cuda")[None, :] >= lens[:, None]
    assert bool((d_cap[padding] == 0).all()), "caption padding must get zero gradient"
    assert_close_to_reference(d_cap, r_cap.nan_to_num(0.0), dtype=torch.float32, what="d cap")


@requires_gpu
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision(direction, dtype):
    # fp16: the reference's own fp16 gradient overflows at 1-word captions (inf: the 2x rule has
    # no bound; seen on CPU with these lengths), so fp16 draws 2..20 words; bf16 keeps 1..20.
    shortest = 2 if dtype == torch.float16 else 1
    img, cap, lens = _inputs(6, 8, 36, 256, _random_lens(8, 20, shortest), dtype=dtype, device="cuda", lmax=20)
    grad_sims = torch.randn(6, 8, device="cuda")
    kw = _kwargs(direction)
    d_img, d_cap = _grads("cuda", img, cap, lens, grad_sims, **kw)
    r_img, r_cap = _grads("reference", img.double(), cap.double(), lens, grad_sims.double(), **kw)
    l_img, l_cap = _grads("reference", img, cap, lens, grad_sims, **kw)
    assert_close_to_reference(d_img, r_img, dtype=dtype, ref_lowp=l_img, what="d img")
    assert_close_to_reference(d_cap, r_cap.nan_to_num(0.0), dtype=dtype, ref_lowp=l_cap.nan_to_num(0.0),
                              what="d cap")


@requires_gpu
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backward_chunked_equals_whole_and_is_deterministic(direction, monkeypatch):
    img, cap, lens = _inputs(7, 12, 36, 128, _random_lens(12, 15), device="cuda", lmax=15)
    grad_sims = torch.randn(7, 12, device="cuda")
    kw = _kwargs(direction, agg="lse")
    whole = _grads("cuda", img, cap, lens, grad_sims, **kw)
    again = _grads("cuda", img, cap, lens, grad_sims, **kw)
    for a, b in zip(whole, again):
        assert_bit_equal(a, b, what="backward must be deterministic")
    monkeypatch.setattr(scan_ops, "BACKWARD_BUFFER_BYTES", 1)  # one image per chunk
    chunked = _grads("cuda", img, cap, lens, grad_sims, **kw)
    for a, b in zip(whole, chunked):
        assert_close(a, b, F32_BLOCKED, what="chunked backward")


@requires_gpu
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_agrees_with_triton(direction, dtype):
    if dispatch.rejection("scan", "triton", torch.device("cuda"), dtype) is not None:
        pytest.skip(dispatch.rejection("scan", "triton", torch.device("cuda"), dtype))
    img, cap, lens = _inputs(20, 60, 36, 1024, _random_lens(60, 30, 6), dtype=dtype, device="cuda",
                             lmax=30)
    kw = _kwargs(direction)
    grad_sims = torch.randn(20, 60, device="cuda")
    out_cuda = rcar_fast.scan_similarity(img, cap, lens, backend="cuda", **kw)
    out_triton = rcar_fast.scan_similarity(img, cap, lens, backend="triton", **kw)
    tol = CUDA_VS_TRITON[dtype]
    assert_close(out_cuda, out_triton, tol, what="forward")
    for a, b, what in zip(_grads("cuda", img, cap, lens, grad_sims, **kw),
                          _grads("triton", img, cap, lens, grad_sims, **kw), ("d img", "d cap")):
        scale = max(b.float().abs().max().item(), CUDA_VS_TRITON_SCALE_FLOOR)
        assert_scaled_close(a.float(), b.float(), Tolerance(CUDA_VS_TRITON_FACTOR * tol.rtol, 0.0, tol.why),
                            scale=scale, what=what)
