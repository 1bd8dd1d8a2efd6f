"""The S-only heads on the C++ CPU kernels (csrc/cpu/maxsim.cpp) against the float64 reference
(rcar_fast.reference_heads): every direction x pool x leaky, ragged captions AND images with NaN
padding, sizes off the tile and the vector widths, L = 1, R = 1, exact ties, outputs poisoned
before the kernel writes them, float32 and float64, the backward (reference gradients and
gradcheck), determinism, the pair list, opcheck of the custom ops."""
import itertools

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch, reference_heads, validate
from rcar_fast.contract import HEAD_DIRECTIONS, POOLS
from rcar_fast.ops.maxsim import maxsim_cpu_op, maxsim_pairs_cpu_op, native_settings
from tests.inputs import NAN, make_inputs
from tests.maxsim_cases import CASES, assert_head_matches_reference, settings_grid, settings_id
from tests.tolerances import assert_bit_equal, assert_close_to_reference

pytestmark = pytest.mark.skipif(
    dispatch.rejection("maxsim", "cpu", torch.device("cpu"), torch.float32) is not None,
    reason="the native extension is not built")

EVERY_SETTING = [dict(direction=direction, pool=pool, leaky=leaky, tau=0.1 if pool == "lse" else 0.7,
                      both_scale=0.5 if leaky else 1.0)
                 for direction, pool, leaky in itertools.product(HEAD_DIRECTIONS, POOLS, (False, True))]
DTYPES = (torch.float64, torch.float32)
# CHAN's VSA coding (HEADS.md "VSA"): i2t, x_r = sum_w a_rw S / (|c_r| + eps), pooled
VSA_SETTINGS = [dict(direction="i2t", coding="vsa", pool=pool, tau=0.5, vsa_tau=vsa_tau)
                for pool in POOLS for vsa_tau in (0.1, 0.7)]


def vsa_id(kw):
    return f"{kw['pool']}-vsa_tau{kw['vsa_tau']}"


def setting_id(kw):
    coding = kw.get("coding", "leaky" if kw.get("leaky") else "plain")
    return f"{kw['direction']}-{kw['pool']}-{coding}"


def ragged_inputs(n_img, n_cap, R, d, max_len, *, seed=0, pad=NAN, scale=0.5):
    """make_inputs plus ragged image lengths (first R, last 1) with `pad` in the image padding."""
    img, cap, lens = make_inputs(n_img, n_cap, R, d, max_len, seed=seed, pad=pad, scale=scale)
    gen = torch.Generator().manual_seed(seed + 1)
    img_lens = torch.randint(1, R + 1, (n_img,), generator=gen)
    img_lens[0], img_lens[-1] = R, 1
    if pad is not None:
        img = img.clone()
        img[torch.arange(R)[None, :] >= img_lens[:, None]] = pad
    return img, cap, lens, img_lens


def reference64(img, cap, lens, img_lens, **kw):
    return reference_heads.head_similarity_vectorized(img.double(), cap.double(), lens, img_lens, **kw)


def cpu_scores(img, cap, lens, img_lens, **kw):
    return rcar_fast.max_similarity(img, cap, lens, img_lens=img_lens, backend="cpu", **kw)


def gradients(score_fn, img, cap, grad):
    img = img.clone().requires_grad_()
    cap = cap.clone().requires_grad_()
    (score_fn(img, cap) * grad.to(score_fn(img, cap).dtype)).sum().backward()
    return img.grad, cap.grad


def reference_gradients(img, cap, lens, img_lens, grad, **kw):
    return gradients(lambda i, c: reference64(i, c, lens, img_lens, **kw), img.double(), cap.double(), grad)


def cpu_gradients(img, cap, lens, img_lens, grad, **kw):
    return gradients(lambda i, c: cpu_scores(i, c, lens, img_lens, **kw), img, cap, grad)


# ---------------------------------------------------------------------------------------------
# The shared cases (tests/maxsim_cases.py): every case x direction x pool x leaky x normalize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", settings_grid(), ids=settings_id)
def test_shared_cases_forward_and_gradients(settings):
    for case in CASES.values():
        for dtype in DTYPES:
            assert_head_matches_reference(case(seed=3), settings, backend="cpu", dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", EVERY_SETTING, ids=setting_id)
def test_forward_every_setting(kw):
    # R = 11, L up to 9, d = 13: no size is a multiple of the 8 / 4 lane vectors
    img, cap, lens, img_lens = ragged_inputs(5, 7, 11, 13, 9, seed=1)
    ref = reference64(img, cap, lens, img_lens, **kw)
    for dtype in DTYPES:
        out = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)
        assert out.dtype == dtype and out.shape == (5, 7)
        assert_close_to_reference(out, ref, dtype=dtype, what=f"maxsim cpu {kw} {dtype}")


@pytest.mark.parametrize("direction", HEAD_DIRECTIONS)
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),        # n_img, n_cap, R, d, Lmax: the smallest problem
    (3, 4, 16, 8, 8),       # R and L whole vectors
    (40, 130, 20, 9, 12),   # several image blocks (> 576 regions) and caption blocks (> 768 words)
    (2, 3, 3, 70, 33),      # L longer than R, d beyond two vectors
    (4, 5, 1, 6, 1),        # R = 1 and L = 1
])
def test_forward_odd_sizes(direction, shape):
    n_img, n_cap, R, d, Lmax = shape
    img, cap, lens, img_lens = ragged_inputs(n_img, n_cap, R, d, Lmax, seed=2)
    for pool in ("mean", "softmax"):
        kw = dict(direction=direction, pool=pool)
        ref = reference64(img, cap, lens, img_lens, **kw)
        for dtype in DTYPES:
            out = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)
            assert_close_to_reference(out, ref, dtype=dtype, what=f"{shape} {kw} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_length_one(dtype):
    # L = 1 everywhere: t2i pools one value (lse = m / tau); R = 1: i2t maxima are S[0, w]
    img, cap, lens, img_lens = ragged_inputs(3, 4, 5, 7, 1, seed=3)
    for kw in EVERY_SETTING:
        out = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)
        assert_close_to_reference(out, reference64(img, cap, lens, img_lens, **kw), dtype=dtype, what=f"L=1 {kw}")
    img_lens = torch.ones(3, dtype=torch.int64)
    for kw in EVERY_SETTING:
        out = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)
        assert_close_to_reference(out, reference64(img, cap, lens, img_lens, **kw), dtype=dtype, what=f"R=1 {kw}")


def test_padding_is_never_read():
    img, cap, lens, img_lens = ragged_inputs(4, 6, 9, 10, 7, seed=4)
    for kw in EVERY_SETTING[::3]:
        with_nan = cpu_scores(img, cap, lens, img_lens, **kw)
        huge = cpu_scores(img.nan_to_num(1e30), cap.nan_to_num(1e30), lens, img_lens, **kw)
        assert_bit_equal(with_nan, huge, what=f"NaN vs 1e30 padding {kw}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_output_is_written(dtype):
    # The kernel writes into a NaN-poisoned result: every entry must be overwritten.
    img, cap, lens, img_lens = ragged_inputs(30, 70, 20, 9, 12, seed=5)
    for kw in EVERY_SETTING[::4]:
        poisoned = torch.full((30, 70), NAN, dtype=dtype)
        got = dispatch.native_module().maxsim_forward_cpu(img.to(dtype), cap.to(dtype), lens, img_lens,
                                                          native_settings(**kw), out=poisoned)
        assert got.data_ptr() == poisoned.data_ptr()
        assert_close_to_reference(poisoned, reference64(img, cap, lens, img_lens, **kw), dtype=dtype,
                                  what=f"poisoned out {kw}")


def test_all_negative_scores_stay_negative():
    img, cap, lens, img_lens = ragged_inputs(3, 4, 6, 5, 5, seed=6, pad=None)
    img = img.abs()
    cap = -cap.abs()
    for kw in EVERY_SETTING:
        out = cpu_scores(img, cap, lens, img_lens, **kw)
        assert_close_to_reference(out, reference64(img, cap, lens, img_lens, **kw), dtype=torch.float64)
        if kw["pool"] != "lse":
            assert bool((out < 0).all()), f"all-negative S must give negative scores for {kw}"


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", EVERY_SETTING, ids=setting_id)
def test_backward_matches_reference_gradients(kw):
    img, cap, lens, img_lens = ragged_inputs(4, 6, 11, 10, 9, seed=7)
    grad = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grad[1, 2] = 0.0  # pairs with no gradient are skipped by the kernel
    ref_img, ref_cap = reference_gradients(img, cap, lens, img_lens, grad, **kw)
    for dtype in DTYPES:
        d_img, d_cap = cpu_gradients(img.to(dtype), cap.to(dtype), lens, img_lens, grad, **kw)
        assert d_img.dtype == dtype and d_cap.dtype == dtype
        assert bool((d_img[torch.isnan(img)] == 0).all() and (d_cap[torch.isnan(cap)] == 0).all()), \
            "padding must get a zero gradient"
        assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"d img {kw} {dtype}")
        assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"d cap {kw} {dtype}")


@pytest.mark.parametrize("direction", HEAD_DIRECTIONS)
def test_backward_across_tiles(direction):
    # several caption blocks and image blocks: the per-image partials added in turn
    img, cap, lens, img_lens = ragged_inputs(40, 130, 20, 9, 12, seed=8)
    grad = torch.randn(40, 130, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for pool in ("sum", "lse"):
        kw = dict(direction=direction, pool=pool, leaky=True)
        ref_img, ref_cap = reference_gradients(img, cap, lens, img_lens, grad, **kw)
        d_img, d_cap = cpu_gradients(img, cap, lens, img_lens, grad, **kw)
        assert_close_to_reference(d_img, ref_img, dtype=torch.float64, what=f"d img {kw}")
        assert_close_to_reference(d_cap, ref_cap, dtype=torch.float64, what=f"d cap {kw}")


def tied_inputs(dtype):
    """Integer features (exact in float32 and float64) with repeated regions and words, so
    that maxima tie exactly, inside the tile and in pool="max"."""
    gen = torch.Generator().manual_seed(9)
    img = torch.randint(-2, 3, (3, 6, 4), generator=gen).to(dtype)
    cap = torch.randint(-2, 3, (4, 5, 4), generator=gen).to(dtype)
    img[:, 3] = img[:, 1]          # region 3 repeats region 1
    img[2, 5] = img[2, 0]
    cap[:, 2] = cap[:, 0]          # word 2 repeats word 0
    cap[1, 4] = cap[1, 3]
    lens = torch.tensor([5, 5, 3, 4])
    img_lens = torch.tensor([6, 4, 6])
    return img, cap, lens, img_lens


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_give_the_first_argmax_the_whole_gradient(dtype):
    img, cap, lens, img_lens = tied_inputs(dtype)
    grad = torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4)
    for kw in EVERY_SETTING:
        ref = reference64(img, cap, lens, img_lens, **kw)
        assert_close_to_reference(cpu_scores(img, cap, lens, img_lens, **kw), ref, dtype=dtype)
        ref_img, ref_cap = reference_gradients(img, cap, lens, img_lens, grad, **kw)
        d_img, d_cap = cpu_gradients(img, cap, lens, img_lens, grad, **kw)
        assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"tied d img {kw}")
        assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"tied d cap {kw}")
        # the repeated region / word (the later index) gets nothing from the tied maxima
        if kw["direction"] == "t2i":
            assert bool((d_img[:, 3] == 0).all()), f"region 3 ties region 1 and must get no gradient: {kw}"
        if kw["direction"] == "i2t":
            assert bool((d_cap[:, 2] == 0).all()), f"word 2 ties word 0 and must get no gradient: {kw}"


@pytest.mark.parametrize("kw", [dict(direction="t2i", pool="mean"), dict(direction="i2t", pool="lse", leaky=True),
                                dict(direction="both", pool="softmax", tau=0.5),
                                dict(direction="both", pool="max", leaky=True)], ids=setting_id)
def test_gradcheck(kw):
    gen = torch.Generator().manual_seed(10)
    img = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    cap = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    lens, img_lens = torch.tensor([4, 2, 1]), torch.tensor([5, 3])
    assert torch.autograd.gradcheck(lambda i, c: cpu_scores(i, c, lens, img_lens, **kw), (img, cap))


def test_backward_only_one_input_needs_grad():
    img, cap, lens, img_lens = ragged_inputs(3, 4, 5, 6, 5, seed=11)
    img.requires_grad_()
    cpu_scores(img, cap, lens, img_lens, direction="both").sum().backward()
    assert img.grad is not None and bool(torch.isfinite(img.grad).all())


@pytest.mark.parametrize("kw", [dict(direction=direction, pool="softmax", leaky=True) for direction in HEAD_DIRECTIONS]
                         + [dict(direction="i2t", coding="vsa", pool="lse", tau=0.5, vsa_tau=0.1)],
                         ids=lambda kw: f"{kw['direction']}-{kw.get('coding', 'max')}")
def test_forward_and_backward_are_bit_reproducible_with_two_threads(kw):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        img, cap, lens, img_lens = ragged_inputs(40, 90, 36, 64, 16, seed=12)
        img, cap = img.float(), cap.float()
        grad = torch.linspace(-1, 1, 40 * 90).view(40, 90)
        first = cpu_scores(img, cap, lens, img_lens, **kw)
        first_grads = cpu_gradients(img, cap, lens, img_lens, grad, **kw)
        for _ in range(3):
            assert_bit_equal(cpu_scores(img, cap, lens, img_lens, **kw), first, what="forward rerun")
            again = cpu_gradients(img, cap, lens, img_lens, grad, **kw)
            assert_bit_equal(again[0], first_grads[0], what="d img rerun")
            assert_bit_equal(again[1], first_grads[1], what="d cap rerun")
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# The pair list
# ---------------------------------------------------------------------------------------------

def listed_pairs(n_img, n_cap, n_pairs, seed):
    gen = torch.Generator().manual_seed(seed)
    img_idx = torch.randint(0, n_img, (n_pairs,), generator=gen)
    cap_idx = torch.randint(0, n_cap, (n_pairs,), generator=gen)
    img_idx[:3], cap_idx[:3] = 0, 1       # a repeated pair
    return img_idx, cap_idx


@pytest.mark.parametrize("kw", EVERY_SETTING[::2] + VSA_SETTINGS[::3], ids=setting_id)
def test_pairs_forward_and_backward(kw):
    img, cap, lens, img_lens = ragged_inputs(5, 7, 11, 10, 9, seed=13)
    img_idx, cap_idx = listed_pairs(5, 7, 70, seed=13)
    pair_fn = dispatch.choose("maxsim_pairs", "cpu", torch.device("cpu"), torch.float32).fn

    def reference_pairs(i, c):
        return reference_heads.head_pairs_vectorized(i, c, lens, img_lens, img_idx, cap_idx, **kw)

    def options(**extra):
        return dict(dict(tau=0.1, leaky=False, both_scale=0.5), **kw, **extra)

    grad = torch.randn(70, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    ref = reference_pairs(img, cap)
    ref_img, ref_cap = gradients(reference_pairs, img, cap, grad)
    for dtype in DTYPES:
        def cpu_pairs(i, c):
            return pair_fn(i, c, lens, img_lens, img_idx, cap_idx, **options())
        out = cpu_pairs(img.to(dtype), cap.to(dtype))
        assert out.shape == (70,) and out.dtype == dtype
        assert_close_to_reference(out, ref, dtype=dtype, what=f"pairs {kw} {dtype}")
        all_pairs = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)[img_idx, cap_idx]
        assert_close_to_reference(out, all_pairs.double(), dtype=dtype, what="pairs vs all pairs")
        d_img, d_cap = gradients(cpu_pairs, img.to(dtype), cap.to(dtype), grad)
        assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"pairs d img {kw} {dtype}")
        assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"pairs d cap {kw} {dtype}")
        again = gradients(cpu_pairs, img.to(dtype), cap.to(dtype), grad)
        assert_bit_equal(again[0], d_img, what="pairs d img rerun")
        assert_bit_equal(again[1], d_cap, what="pairs d cap rerun")


def test_pairs_backward_is_bit_reproducible():
    img, cap, lens, img_lens = ragged_inputs(20, 30, 12, 16, 8, seed=15)
    img_idx, cap_idx = listed_pairs(20, 30, 500, seed=15)
    native = dispatch.native_module()
    settings = native_settings("both", "lse", 0.1, True, 0.5)
    grad = torch.randn(500, dtype=torch.float64)
    first = native.maxsim_pairs_backward_cpu(grad, img, cap, lens, img_lens, img_idx, cap_idx, settings)
    again = native.maxsim_pairs_backward_cpu(grad, img, cap, lens, img_lens, img_idx, cap_idx, settings)
    for a, b in zip(first, again):
        assert_bit_equal(a, b, what="pair backward rerun")


def test_maxsim_late_interaction_on_cpu():
    # queries = captions (6 of up to 8 tokens), documents = images (9 of up to 20 tokens)
    docs, q, q_lens, d_lens = ragged_inputs(9, 6, 20, 16, 8, seed=16)
    ref = reference64(docs, q, q_lens, d_lens, direction="t2i", pool="sum").transpose(0, 1)
    out = rcar_fast.maxsim(q, docs, q_lens, d_lens, backend="cpu")
    assert_close_to_reference(out, ref, dtype=torch.float64, what="maxsim all pairs")
    pairs = (torch.tensor([0, 5, 2, 2]), torch.tensor([8, 0, 3, 3]))
    listed = rcar_fast.maxsim(q, docs, q_lens, d_lens, pairs=pairs, backend="cpu")
    assert_close_to_reference(listed, ref[pairs], dtype=torch.float64, what="maxsim pairs")


# ---------------------------------------------------------------------------------------------
# The custom ops, dispatch, the public wrapper, the baseline copy of the vector loops
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", HEAD_DIRECTIONS)
def test_opcheck(direction):
    img, cap, lens, img_lens = ragged_inputs(3, 4, 5, 6, 5, seed=18, pad=1.0)   # opcheck compares every element
    img, cap = img.requires_grad_(), cap.requires_grad_()
    options = (direction, "softmax", 0.3, True, 0.5)
    torch.library.opcheck(maxsim_cpu_op, (img, cap, lens, img_lens, *options))
    img_idx, cap_idx = listed_pairs(3, 4, 10, seed=18)
    torch.library.opcheck(maxsim_pairs_cpu_op, (img, cap, lens, img_lens, img_idx, cap_idx, *options))


def test_auto_picks_cpu_and_low_precision_is_refused_with_reason():
    for op in ("maxsim", "maxsim_pairs"):
        assert dispatch.choose(op, "auto", torch.device("cpu"), torch.float32).backend == "cpu"
        reason = dispatch.rejection(op, "cpu", torch.device("cpu"), torch.float16)
        assert reason is not None and "float32 or float64" in reason
    img, cap, lens, img_lens = ragged_inputs(2, 2, 3, 4, 3, seed=19)
    with pytest.raises(dispatch.BackendUnavailable, match="float32 or float64"):
        cpu_scores(img.half(), cap.half(), lens, img_lens)


@pytest.mark.parametrize("preset", ["chan", "laps", "aladin", "colbert"])
def test_presets_through_the_public_wrapper(preset):
    img, cap, lens, img_lens = ragged_inputs(4, 5, 9, 8, 7, seed=20)
    ref = reference_heads.max_similarity_reference(img, cap, lens, img_lens, **_preset_options(preset))
    grad = torch.randn(4, 5, dtype=torch.float64)
    for dtype in DTYPES:
        out = rcar_fast.max_similarity(img.to(dtype), cap.to(dtype), lens, img_lens=img_lens, preset=preset,
                                       backend="cpu")
        assert_close_to_reference(out, ref, dtype=dtype, what=f"preset {preset} {dtype}")
    ref_grads = gradients(lambda i, c: reference_heads.max_similarity_reference(
        i, c, lens, img_lens, **_preset_options(preset)), img.nan_to_num(0.0), cap.nan_to_num(0.0), grad)
    got = gradients(lambda i, c: rcar_fast.max_similarity(i, c, lens, img_lens=img_lens, preset=preset,
                                                          backend="cpu"), img, cap, grad)
    for g, r in zip(got, ref_grads):
        assert_close_to_reference(g, r, dtype=torch.float64, what=f"preset {preset} gradient")


def _preset_options(preset):
    from rcar_fast.contract import HEAD_PRESETS
    return dict(HEAD_PRESETS[preset])


def test_baseline_simd_copy(baseline_simd):
    img, cap, lens, img_lens = ragged_inputs(4, 6, 11, 10, 9, seed=21)
    grad = torch.randn(4, 6, dtype=torch.float64)
    for kw in EVERY_SETTING[::3]:
        ref = reference64(img, cap, lens, img_lens, **kw)
        ref_img, ref_cap = reference_gradients(img, cap, lens, img_lens, grad, **kw)
        for dtype in DTYPES:
            out = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)
            assert_close_to_reference(out, ref, dtype=dtype, what=f"baseline {kw} {dtype}")
            d_img, d_cap = cpu_gradients(img.to(dtype), cap.to(dtype), lens, img_lens, grad, **kw)
            assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"baseline d img {kw}")
            assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"baseline d cap {kw}")


def test_bad_lengths_are_refused_by_the_kernel_itself():
    img, cap, lens, img_lens = ragged_inputs(2, 3, 4, 5, 4, seed=22)
    native = dispatch.native_module()
    settings = native_settings("t2i", "mean", 0.1, False, 0.5)
    with pytest.raises(RuntimeError, match=r"img_lens must lie in \[1, 4\]"):
        native.maxsim_forward_cpu(img, cap, lens, torch.tensor([5, 1]), settings)
    with pytest.raises(RuntimeError, match=r"lens must lie in \[1, 4\]"):
        native.maxsim_forward_cpu(img, cap, torch.tensor([0, 1, 2]), img_lens, settings)
    with pytest.raises(RuntimeError, match=r"cap_idx must lie in \[0, 3\)"):
        native.maxsim_pairs_forward_cpu(img, cap, lens, img_lens, torch.tensor([0]), torch.tensor([3]), settings)


# ---------------------------------------------------------------------------------------------
# CHAN's VSA coding (VSA_SETTINGS; the pair list and reruns: in the tests above)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", VSA_SETTINGS, ids=vsa_id)
def test_vsa_shared_cases_forward_and_gradients(kw):
    # ragged both sides with NaN padding, exact ties, L = 1, R = 1, all-negative S; both normalisations
    for case in CASES.values():
        for normalize in ("none", "unit"):
            settings = dict(kw, normalize=normalize)
            for dtype in DTYPES:
                assert_head_matches_reference(case(seed=31), settings, backend="cpu", dtype=dtype)


@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),        # n_img, n_cap, R, d, Lmax
    (40, 130, 20, 9, 12),   # several image and caption blocks, forward and backward
    (2, 3, 3, 70, 33),      # L longer than R, d beyond two vectors
    (3, 4, 16, 8, 8),       # R and L whole vectors
])
def test_vsa_across_tiles_and_odd_sizes(shape):
    n_img, n_cap, R, d, Lmax = shape
    img, cap, lens, img_lens = ragged_inputs(n_img, n_cap, R, d, Lmax, seed=32)
    grad = torch.randn(n_img, n_cap, dtype=torch.float64, generator=torch.Generator().manual_seed(32))
    for kw in (VSA_SETTINGS[0], VSA_SETTINGS[7]):
        ref = reference64(img, cap, lens, img_lens, **kw)
        ref_img, ref_cap = reference_gradients(img, cap, lens, img_lens, grad, **kw)
        for dtype in DTYPES:
            out = cpu_scores(img.to(dtype), cap.to(dtype), lens, img_lens, **kw)
            assert out.dtype == dtype and out.shape == (n_img, n_cap)
            assert_close_to_reference(out, ref, dtype=dtype, what=f"vsa {shape} {kw} {dtype}")
            if d == 1 and dtype == torch.float32:
                # d = 1: c_r = a e, so x_r = v e / (|e| + eps) and d x / d e is an eps-sized
                # difference of two O(v / |e|) terms, which float32 (the reference's own too) cannot resolve
                continue
            d_img, d_cap = cpu_gradients(img.to(dtype), cap.to(dtype), lens, img_lens, grad, **kw)
            assert_close_to_reference(d_img, ref_img, dtype=dtype, what=f"vsa d img {shape} {kw} {dtype}")
            assert_close_to_reference(d_cap, ref_cap, dtype=dtype, what=f"vsa d cap {shape} {kw} {dtype}")


@pytest.mark.parametrize("pool", POOLS)
def test_vsa_gradcheck(pool):
    gen = torch.Generator().manual_seed(33)
    img = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    cap = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    lens, img_lens = torch.tensor([4, 2, 1]), torch.tensor([5, 3])
    kw = dict(direction="i2t", coding="vsa", pool=pool, tau=0.5, vsa_tau=0.3)
    assert torch.autograd.gradcheck(lambda i, c: cpu_scores(i, c, lens, img_lens, **kw), (img, cap))
    img_idx, cap_idx = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 2])
    pair_fn = dispatch.choose("maxsim_pairs", "cpu", torch.device("cpu"), torch.float64).fn
    listed = dict(kw, leaky=False, both_scale=0.5)
    assert torch.autograd.gradcheck(
        lambda i, c: pair_fn(i, c, lens, img_lens, img_idx, cap_idx, **listed), (img, cap))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vsa_every_output_is_written_and_padding_never_read(dtype):
    img, cap, lens, img_lens = ragged_inputs(30, 70, 20, 9, 12, seed=34)
    for kw in VSA_SETTINGS[::3]:
        poisoned = torch.full((30, 70), NAN, dtype=dtype)
        dispatch.native_module().maxsim_forward_cpu(img.to(dtype), cap.to(dtype), lens, img_lens,
                                                    native_settings(leaky=False, both_scale=0.5, **kw), out=poisoned)
        assert_close_to_reference(poisoned, reference64(img, cap, lens, img_lens, **kw), dtype=dtype,
                                  what=f"vsa poisoned out {kw}")
        huge = cpu_scores(img.nan_to_num(1e30).to(dtype), cap.nan_to_num(1e30).to(dtype), lens, img_lens, **kw)
        assert_bit_equal(poisoned, huge, what=f"vsa NaN vs 1e30 padding {kw}")


def test_vsa_auto_picks_the_cpu_kernels_and_the_kernel_checks_its_options():
    img, cap, lens, img_lens = ragged_inputs(3, 4, 5, 6, 5, seed=38)
    kw = dict(direction="i2t", coding="vsa", pool="mean")
    auto = rcar_fast.max_similarity(img, cap, lens, img_lens=img_lens, **kw)
    assert_bit_equal(auto, cpu_scores(img, cap, lens, img_lens, **kw), what="auto = cpu for VSA")
    native = dispatch.native_module()
    with pytest.raises(RuntimeError, match="needs direction i2t and no leaky"):
        native.maxsim_forward_cpu(img, cap, lens, img_lens, native_settings("t2i", "mean", 0.1, False, 0.5,
                                                                            coding="vsa"))
    with pytest.raises(RuntimeError, match="vsa_tau must be positive"):
        native.maxsim_forward_cpu(img, cap, lens, img_lens, native_settings("i2t", "mean", 0.1, False, 0.5,
                                                                            coding="vsa", vsa_tau=0.0))


# ---------------------------------------------------------------------------------------------
# The wrappers' finite check (csrc/cpu/maxsim.cpp real_rows_finite)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_native_finite_check_reads_exactly_the_real_rows(dtype):
    check = dispatch.native_module().real_rows_finite_cpu
    gen = torch.Generator().manual_seed(39)
    x = torch.randn(9, 7, 37, generator=gen).to(dtype)      # d = 37: vectors and a scalar tail
    lens = torch.tensor([7, 1, 3, 7, 2, 5, 6, 4, 7])
    padded = x.clone()
    padded[torch.arange(7)[None, :] >= lens[:, None]] = NAN
    assert check(padded, lens) and check(x, lens)
    for bad in (NAN, float("inf"), float("-inf")):
        for s, r, e in ((0, 0, 0), (3, 6, 36), (5, 4, 17), (8, 6, 32)):
            poisoned = padded.clone()
            poisoned[s, r, e] = bad
            assert not check(poisoned, lens), (bad, s, r, e)
            assert check(poisoned, lens) == validate.all_finite(poisoned, validate.word_mask(lens, 7))
    wide = torch.randn(3, 7, 40, generator=gen).to(dtype)[:, :, :37]   # rows not adjacent
    wide_lens = torch.tensor([7, 2, 5])
    assert check(wide, wide_lens)
    wide[1, 1, 36] = NAN
    assert not check(wide, wide_lens)
    wide_lens[1] = 1
    assert check(wide, wide_lens)


def test_the_wrapper_names_the_argument_with_a_non_finite_real_row():
    img, cap, lens, img_lens = ragged_inputs(3, 4, 5, 6, 5, seed=40)
    bad_cap = cap.clone()
    bad_cap[2, int(lens[2]) - 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"cap holds NaN or Inf at real positions \(rows < lens\)"):
        cpu_scores(img, bad_cap, lens, img_lens)
    bad_img = img.clone()
    bad_img[1, int(img_lens[1]) - 1, 0] = NAN
    with pytest.raises(ValueError, match=r"img holds NaN or Inf at real positions \(rows < img_lens\)"):
        cpu_scores(bad_img, cap, lens, img_lens)
