"""The Triton S-only heads (kernels/maxsim.py, forward and backward; all pairs and listed pairs)
against the float64 reference (rcar_fast.reference_heads).

On CPU the kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1) on tiny grids
whose sizes are off every tile size. The shared cases (tests/maxsim_cases.py: ragged on both
sides with NaN padding, ties, L=1, R=1, all-negative S) run the whole settings grid (direction x
pool x leaky x normalize) through rcar_fast.max_similarity(backend="triton"), forward and
gradients; this file adds several caption buckets, poisoned outputs, fp64 gradcheck, fp16 by the
2x rule, ties taking no gradient, determinism, pair lists, rcar_fast.maxsim, torch.compile and
dispatch reasons. GPU tests (COCO-sized batches, fp32/fp16/bf16) run only with a GPU.
"""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch
from rcar_fast.losses import vse_hinge_loss
from rcar_fast.contract import HEAD_CODINGS, HEAD_DIRECTIONS, POOLS
from rcar_fast.ops.maxsim import (MaxSimPairsTriton, MaxSimTriton, maxsim_pairs_triton_op,
                                  maxsim_triton_op)
from rcar_fast.reference_heads import head_pairs_vectorized, head_similarity_vectorized
from tests.conftest import assert_interpreter_dispatch, requires_gpu, requires_interpreter, sweep
from tests.inputs import make_inputs, real_words
from tests.maxsim_cases import (CASES, assert_head_matches_reference, poisoned_allocations,
                                settings_grid, settings_id)
from tests.tolerances import (F32_BLOCKED, F64_GRADCHECK, assert_bit_equal, assert_close,
                              assert_close_to_reference)

LENS = (1, 7, 3, 5, 2)
IMG_LENS = (5, 2, 4)
NAN = float("nan")


def _options(direction="t2i", pool="mean", leaky=False, tau=0.1, both_scale=0.5):
    return dict(direction=direction, pool=pool, tau=tau, leaky=leaky, both_scale=both_scale)


# CHAN's VSA coding (i2t); its temperature is not a binary fraction (read in the accumulation
# dtype, like tau)
VSA_TAU = 0.3


def _vsa(pool, tau=0.5):
    """max_similarity keywords of CHAN's VSA coding."""
    return dict(direction="i2t", pool=pool, coding="vsa", vsa_tau=VSA_TAU, tau=tau)


def _vsa_options(pool, tau=0.5):
    """The backend functions' keywords of CHAN's VSA coding."""
    return dict(_options("i2t", pool, tau=tau), coding="vsa", vsa_tau=VSA_TAU)


def _inputs(n_img=3, lens=LENS, img_lens=IMG_LENS, regions=5, dim=20, dtype=torch.float32,
            pad=NAN, device="cpu", **kw):
    """Ragged images and captions with `pad` in every padding row of both."""
    img, cap, lens = make_inputs(n_img, len(lens), regions, dim, lens=lens, dtype=torch.float64,
                                 pad=pad, **kw)
    img_lens = torch.as_tensor(img_lens, dtype=torch.int64)
    img[~real_words(img_lens, regions)] = pad
    return (img.to(device=device, dtype=dtype), cap.to(device=device, dtype=dtype),
            lens.to(device), img_lens.to(device))


def _triton(img, cap, lens, img_lens, **opts):
    """The backend's function (what dispatch runs for backend="triton": inputs validated)."""
    return MaxSimTriton.fn(img, cap, lens, img_lens, **opts)


def _reference(img, cap, lens, img_lens, **opts):
    return head_similarity_vectorized(img.double(), cap.double(), lens, img_lens, **opts)


def _reference_gradients(img, cap, lens, img_lens, grad, dtype=torch.float64, **opts):
    a = img.detach().to(dtype).requires_grad_()
    c = cap.detach().to(dtype).requires_grad_()
    out = head_similarity_vectorized(a, c, lens, img_lens, **opts)
    return torch.autograd.grad(out, (a, c), grad.to(out.dtype))


def _triton_gradients(img, cap, lens, img_lens, grad, **opts):
    a, c = img.detach().requires_grad_(), cap.detach().requires_grad_()
    out = _triton(a, c, lens, img_lens, **opts)
    return torch.autograd.grad(out, (a, c), grad.to(out.dtype))


def _real_rows(x, lengths):
    return real_words(lengths.cpu(), x.shape[1]).to(x.device)


def _check_gradients(img, cap, lens, img_lens, *, dtype, what, **opts):
    """Triton gradients against the float64 reference's (the 2x rule for fp16/bf16); exactly
    0 at every padding row."""
    grad = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64, device=img.device)
    d_img, d_cap = _triton_gradients(img, cap, lens, img_lens, grad, **opts)
    r_img, r_cap = _reference_gradients(img, cap, lens, img_lens, grad, **opts)
    low = {}
    if dtype in (torch.float16, torch.bfloat16):
        l_img, l_cap = _reference_gradients(img, cap, lens, img_lens, grad, dtype=dtype, **opts)
        low = dict(img=l_img, cap=l_cap)
    for name, got, want, rows in (("img", d_img, r_img, _real_rows(img, img_lens)),
                                  ("cap", d_cap, r_cap, _real_rows(cap, lens))):
        assert got.dtype == img.dtype and got.shape == want.shape
        lowp = low[name][rows] if low else None
        assert_close_to_reference(got[rows], want[rows], dtype=dtype, ref_lowp=lowp,
                                  what=f"{what} d {name}")
        assert_bit_equal(got[~rows], torch.zeros_like(got[~rows]), what=f"{what} d {name} padding")


# ---------------------------------------------------------------------------------------------
# The shared cases (tests/maxsim_cases.py) through rcar_fast.max_similarity(backend="triton")
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("settings", settings_grid(exhaustive=False), ids=settings_id)
def test_grid_matches_float64_reference(settings):
    # direction x pool x leaky x normalize, pairwise (all with RCAR_FAST_FULL_TESTS=1): forward
    # and both gradients, fp32 rule
    assert_head_matches_reference(CASES["ragged"](dtype=torch.float32), settings,
                                  backend="triton", dtype=torch.float32)


EDGE_POOLS = ("mean", "max", "lse", "softmax")
# each edge case x direction x pool (leaky, no normalisation): pairwise, all with FULL_TESTS
EDGE_GRID = [(case, settings_grid(directions=(d,), pools=(p,), leaky=(True,), normalize=("none",))[0])
             for case, d, p in sweep(("ties", "L=1", "R=1", "all-negative"), HEAD_DIRECTIONS, EDGE_POOLS)]


@requires_interpreter
@pytest.mark.parametrize("case,settings", EDGE_GRID, ids=[f"{c}-{settings_id(s)}" for c, s in EDGE_GRID])
def test_edge_cases_match_float64_reference(case, settings):
    assert_head_matches_reference(CASES[case](dtype=torch.float64), settings, backend="triton",
                                  dtype=torch.float64)


@requires_interpreter
def test_every_output_is_written_under_poisoned_allocations():
    case = CASES["ragged"](dtype=torch.float32)
    with poisoned_allocations():
        for direction in HEAD_DIRECTIONS:
            settings = dict(direction=direction, pool="softmax", leaky=True)
            assert_head_matches_reference(case, settings, backend="triton", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("direction,pool", [("t2i", "lse"), ("i2t", "softmax"), ("both", "max")])
def test_forward_float64_agrees_to_rounding(direction, pool):
    # tau = 0.1 is not a binary fraction: the kernels read it in the accumulation dtype
    img, cap, lens, img_lens = _inputs(dtype=torch.float64)
    opts = _options(direction, pool, leaky=True, both_scale=1.0)
    out = _triton(img, cap, lens, img_lens, **opts)
    assert out.dtype == torch.float64
    assert_close_to_reference(out, _reference(img, cap, lens, img_lens, **opts),
                              dtype=torch.float64)


@requires_interpreter
def test_forward_writes_every_output_over_poison():
    from rcar_fast.kernels import maxsim as kernels

    img, cap, lens, img_lens = _inputs()
    for direction in HEAD_DIRECTIONS:
        opts = _options(direction, "softmax", leaky=True)
        problem = kernels.build_problem(img, cap, lens, img_lens, **opts)
        poisoned = torch.full((3, 5), NAN)
        out = kernels.maxsim_forward(problem, out=poisoned)
        assert out.data_ptr() == poisoned.data_ptr()
        assert_close_to_reference(out, _reference(img, cap, lens, img_lens, **opts),
                                  dtype=torch.float32, what=f"poisoned output {direction}")


@requires_interpreter
@pytest.mark.parametrize("direction", HEAD_DIRECTIONS)
def test_several_caption_buckets_and_odd_sizes(direction):
    # lengths 1..20 fall into the 8, 16 and 32 word buckets (three launches whose columns and
    # image gradients must be combined); 6 regions, d = 24: no tile size
    lens = (20, 1, 9, 16, 17, 4, 8, 3)
    img, cap, lens, img_lens = _inputs(n_img=4, lens=lens, img_lens=(6, 1, 3, 5), regions=6,
                                       dim=24)
    opts = _options(direction, "lse", leaky=True)
    assert_close_to_reference(_triton(img, cap, lens, img_lens, **opts),
                              _reference(img, cap, lens, img_lens, **opts), dtype=torch.float32)
    _check_gradients(img, cap, lens, img_lens, dtype=torch.float32, what=f"buckets {direction}",
                     **opts)


@requires_interpreter
def test_float16_two_x_rule():
    img, cap, lens, img_lens = _inputs(dtype=torch.float16, unit_norm=True)
    for direction, pool, leaky in (("t2i", "sum", False), ("both", "mean", True), ("i2t", "lse", False)):
        opts = _options(direction, pool, leaky)
        out = _triton(img, cap, lens, img_lens, **opts)
        assert out.dtype == torch.float32
        ref16 = head_similarity_vectorized(img, cap, lens, img_lens, **opts)
        assert_close_to_reference(out, _reference(img, cap, lens, img_lens, **opts),
                                  dtype=torch.float16, ref_lowp=ref16, what=f"fp16 {opts}")
    _check_gradients(img, cap, lens, img_lens, dtype=torch.float16, what="fp16",
                     **_options("both", "mean", True))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("direction,pool", [("t2i", "lse"), ("i2t", "softmax"), ("both", "mean")])
def test_gradcheck_float64(direction, pool):
    img, cap, lens, img_lens = _inputs(n_img=2, lens=(3, 1), img_lens=(3, 2), regions=3, dim=5,
                                       dtype=torch.float64, pad=0.5)
    opts = _options(direction, pool, leaky=True)

    def fn(a, c):
        return _triton(a, c, lens, img_lens, **opts)

    assert torch.autograd.gradcheck(fn, (img.requires_grad_(), cap.requires_grad_()),
                                   atol=F64_GRADCHECK.atol, rtol=F64_GRADCHECK.rtol)


@requires_interpreter
@pytest.mark.parametrize("direction", HEAD_DIRECTIONS)
def test_ties_give_the_whole_gradient_to_the_first_index(direction):
    # region 1 repeats region 0 and word 2 repeats word 1 (exact ties in every max), and the
    # second caption is the first one again (ties in pool="max" too)
    img, cap, lens, img_lens = _inputs(lens=(4, 4, 3), img_lens=(5, 4, 3), dtype=torch.float64)
    img[:, 1] = img[:, 0]
    cap[:, 2] = cap[:, 1]
    cap[:, 3] = torch.where(torch.arange(3)[:, None] < 2, cap[:, 0], cap[:, 3])
    for pool in ("max", "sum"):
        opts = _options(direction, pool)
        grad = torch.ones(3, 3, dtype=torch.float64)
        d_img, d_cap = _triton_gradients(img, cap, lens, img_lens, grad, **opts)
        r_img, r_cap = _reference_gradients(img, cap, lens, img_lens, grad, **opts)
        rows_i, rows_c = _real_rows(img, img_lens), _real_rows(cap, lens)
        assert_close_to_reference(d_img[rows_i], r_img[rows_i], dtype=torch.float64)
        assert_close_to_reference(d_cap[rows_c], r_cap[rows_c], dtype=torch.float64)
        if direction == "t2i":   # the repeated region never wins a word
            assert_bit_equal(d_img[:, 1], torch.zeros_like(d_img[:, 1]), what="tied region")
        if direction == "i2t":   # the repeated word never wins a region
            assert_bit_equal(d_cap[:, 2], torch.zeros_like(d_cap[:, 2]), what="tied word")


@requires_interpreter
@pytest.mark.parametrize("opts", [_options("both", "softmax", True), _vsa_options("softmax")],
                         ids=settings_id)
def test_backward_is_deterministic_and_one_sided(opts):
    img, cap, lens, img_lens = _inputs(lens=(20, 1, 9, 16, 3))
    grad = torch.randn(3, 5)
    first = _triton_gradients(img, cap, lens, img_lens, grad, **opts)
    second = _triton_gradients(img, cap, lens, img_lens, grad, **opts)
    for a, b in zip(first, second):
        assert_bit_equal(a, b, what="a rerun of the backward")
    for side, name in enumerate(("img", "cap")):
        inputs = [img, cap]
        inputs[side] = inputs[side].detach().requires_grad_()
        _triton(*inputs, lens, img_lens, **opts).backward(grad)
        assert_bit_equal(inputs[side].grad, first[side], what=f"d {name} alone")


@requires_interpreter
def test_custom_op_opcheck():
    img, cap, lens, img_lens = _inputs(n_img=2, lens=(3, 1), img_lens=(3, 2), regions=3, dim=5,
                                       dtype=torch.float64, pad=0.5)
    img, cap = img.requires_grad_(), cap.requires_grad_()
    torch.library.opcheck(maxsim_triton_op, (img, cap, lens, img_lens, "both", "lse", 0.1, True,
                                             0.5))
    pairs = (torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]))
    torch.library.opcheck(maxsim_pairs_triton_op, (img, cap, lens, img_lens, *pairs, "i2t",
                                                   "softmax", 0.1, False, 0.5))


# ---------------------------------------------------------------------------------------------
# Listed pairs (maxsim_pairs)
# ---------------------------------------------------------------------------------------------

# Repeated pairs, images and captions in several pairs, caption 2 in none (zero gradient), and
# captions of 1..20 words: two length buckets (16 and 32).
PAIRS = (torch.tensor([0, 2, 1, 0, 2, 2, 1, 0]), torch.tensor([1, 1, 3, 4, 0, 1, 4, 0]))
PAIR_LENS = (1, 20, 3, 17, 2)


PAIR_SETTINGS = [_options("t2i", "lse", True), _options("i2t", "softmax", False),
                 _options("both", "max", True), _options("both", "mean", False),
                 _vsa_options("mean"), _vsa_options("lse")]


@requires_interpreter
@pytest.mark.parametrize("opts", PAIR_SETTINGS, ids=settings_id)
def test_pairs_match_float64_reference(opts):
    img, cap, lens, img_lens = _inputs(lens=PAIR_LENS)
    img_idx, cap_idx = PAIRS
    grad = torch.randn(len(img_idx), dtype=torch.float64)
    a, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
    out = MaxSimPairsTriton.fn(a, c, lens, img_lens, img_idx, cap_idx, **opts)
    assert out.dtype == torch.float32 and out.shape == (len(img_idx),)
    d_img, d_cap = torch.autograd.grad(out, (a, c), grad.float())
    a64, c64 = img.double().requires_grad_(), cap.double().requires_grad_()
    want = head_pairs_vectorized(a64, c64, lens, img_lens, img_idx, cap_idx, **opts)
    r_img, r_cap = torch.autograd.grad(want, (a64, c64), grad)
    assert_close_to_reference(out, want, dtype=torch.float32, what=f"pairs {opts}")
    for name, got, ref, rows in (("img", d_img, r_img, _real_rows(img, img_lens)),
                                 ("cap", d_cap, r_cap, _real_rows(cap, lens))):
        assert_close_to_reference(got[rows], ref[rows], dtype=torch.float32, what=f"pairs d {name}")
        assert_bit_equal(got[~rows], torch.zeros_like(got[~rows]), what=f"pairs d {name} padding")
    assert_bit_equal(d_cap[2], torch.zeros_like(d_cap[2]), what="a caption in no pair")


@requires_interpreter
def test_late_interaction_on_triton_matches_reference():
    # rcar_fast.maxsim: all pairs, a shortlist and the top-k search (all pairs per document
    # block, then the chosen pairs again through the pair op for differentiable values)
    docs, queries, q_lens, d_lens = _inputs(lens=PAIR_LENS, img_lens=(5, 2, 4, 3), n_img=4,
                                            dtype=torch.float64)
    for form in (dict(), dict(pairs=(PAIRS[1], PAIRS[0])), dict(k=2, doc_block=3)):
        got, want = (rcar_fast.maxsim(queries.clone().requires_grad_(), docs, q_lens, d_lens,
                                      backend=backend, **form) for backend in ("triton", "reference"))
        for g, w in zip(got if "k" in form else (got,), want if "k" in form else (want,)):
            if g.dtype == torch.int64:
                assert torch.equal(g, w), (g, w)
            else:
                assert_close_to_reference(g, w, dtype=torch.float64, what=f"maxsim {form}")


# ---------------------------------------------------------------------------------------------
# CHAN's VSA coding (coding="vsa", i2t): the Gram-identity epilogue and its closed-form backward
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("pool", POOLS)
def test_vsa_matches_float64_reference(pool):
    # fp32 through rcar_fast.max_similarity, ragged on both sides with NaN padding (never read:
    # the kernels load real rows only), forward and both gradients; padding gradients exactly 0
    assert_head_matches_reference(CASES["ragged"](dtype=torch.float32), _vsa(pool),
                                  backend="triton", dtype=torch.float32)


@requires_interpreter
@pytest.mark.parametrize("case", ["ties", "L=1", "R=1", "all-negative"])
@pytest.mark.parametrize("pool", [p for p in POOLS if p != "sum"])   # sum: as mean, scaled
def test_vsa_edge_cases_match_float64_reference(case, pool):
    assert_head_matches_reference(CASES[case](dtype=torch.float64), _vsa(pool), backend="triton",
                                  dtype=torch.float64)


@requires_interpreter
def test_vsa_matches_chan_public_coding():
    # against the transcription of CHAN's VSACoding (its -1 sentinel agrees on unit-norm inputs)
    from rcar_fast.reference_heads import unit_normalize
    from tests.test_maxsim_reference import chan_vsa_public

    case = CASES["ragged"](dtype=torch.float64, seed=4)
    img, cap = unit_normalize(case.img, case.img_lens), unit_normalize(case.cap, case.lens)
    for pool in (p for p in POOLS if p != "softmax"):   # public softmax: NaN with padding
        want = chan_vsa_public(img, cap, case.lens, case.img_lens, pool)
        got = rcar_fast.max_similarity(img, cap, case.lens, img_lens=case.img_lens,
                                       direction="i2t", coding="vsa", pool=pool, tau=0.1,
                                       backend="triton")
        assert_close_to_reference(got, want, dtype=torch.float64, what=f"public VSA + {pool}")


@requires_interpreter
def test_vsa_several_caption_buckets_odd_sizes_and_poisoned_output():
    # lengths 1..20: the 8, 16 and 32 word buckets; 6 regions, d = 24; the output buffer
    # poisoned with NaN before the kernels run; NaN in every padding row of both inputs
    from rcar_fast.kernels import maxsim as kernels

    lens = (20, 1, 9, 16, 17, 4, 8, 3)
    img, cap, lens, img_lens = _inputs(n_img=4, lens=lens, img_lens=(6, 1, 3, 5), regions=6,
                                       dim=24)
    opts = _vsa_options("lse")
    want = _reference(img, cap, lens, img_lens, **opts)
    poisoned = torch.full((4, 8), NAN)
    out = kernels.maxsim_forward(kernels.build_problem(img, cap, lens, img_lens, **opts),
                                 out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    assert_close_to_reference(out, want, dtype=torch.float32, what="VSA buckets, poisoned output")
    _check_gradients(img, cap, lens, img_lens, dtype=torch.float32, what="VSA buckets", **opts)
    with poisoned_allocations():
        assert_close_to_reference(_triton(img, cap, lens, img_lens, **opts), want,
                                  dtype=torch.float32, what="VSA under poisoned allocations")


@requires_interpreter
def test_vsa_float16_two_x_rule():
    img, cap, lens, img_lens = _inputs(dtype=torch.float16, unit_norm=True)
    for pool in ("mean", "lse"):
        opts = _vsa_options(pool)
        ref16 = head_similarity_vectorized(img, cap, lens, img_lens, **opts)
        assert_close_to_reference(_triton(img, cap, lens, img_lens, **opts),
                                  _reference(img, cap, lens, img_lens, **opts),
                                  dtype=torch.float16, ref_lowp=ref16, what=f"VSA fp16 {pool}")
    _check_gradients(img, cap, lens, img_lens, dtype=torch.float16, what="VSA fp16",
                     **_vsa_options("softmax"))


@requires_interpreter
@pytest.mark.parametrize("pool", ["sum", "softmax"])
def test_vsa_gradcheck_float64(pool):
    img, cap, lens, img_lens = _inputs(n_img=2, lens=(3, 1), img_lens=(3, 2), regions=3, dim=5,
                                       dtype=torch.float64, pad=0.5)
    opts = _vsa_options(pool)

    def fn(a, c):
        return _triton(a, c, lens, img_lens, **opts)

    assert torch.autograd.gradcheck(fn, (img.requires_grad_(), cap.requires_grad_()),
                                   atol=F64_GRADCHECK.atol, rtol=F64_GRADCHECK.rtol)


@requires_interpreter
def test_vsa_dispatch_lists_the_coding_on_triton():
    assert "vsa" in MaxSimTriton.codings and "vsa" in MaxSimPairsTriton.codings
    img, cap, lens, img_lens = _inputs(dtype=torch.float64)
    kw = dict(img_lens=img_lens, direction="i2t", coding="vsa", pool="mean")
    assert_close_to_reference(rcar_fast.max_similarity(img, cap, lens, backend="triton", **kw),
                              rcar_fast.max_similarity(img, cap, lens, backend="reference", **kw),
                              dtype=torch.float64, what="VSA triton vs reference backend")


@requires_interpreter
def test_pairs_dispatch_reasons():
    cpu = torch.device("cpu")
    assert dispatch.implementation("maxsim_pairs", "triton") is MaxSimPairsTriton
    assert dispatch.rejection("maxsim_pairs", "triton", cpu, torch.float32) is None
    assert "interpreter" in dispatch.rejection("maxsim_pairs", "triton", cpu, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Through the public wrapper: presets, normalisation, torch.compile
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("preset", ["laps", "chan", "aladin"])
def test_public_wrapper_runs_the_presets_on_triton(preset):
    # the wrapper normalises (normalize="unit" for laps and aladin) in torch, differentiably,
    # then calls the backend: forward and gradients against the reference backend's
    img, cap, lens, img_lens = _inputs(dtype=torch.float64)
    grad = torch.randn(3, 5, dtype=torch.float64)
    results = {}
    for backend in ("triton", "reference"):
        a, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
        out = rcar_fast.max_similarity(a, c, lens, img_lens=img_lens, preset=preset,
                                       backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (a, c), grad))
    for got, want in zip(results["triton"], results["reference"]):
        assert_close_to_reference(got, want, dtype=torch.float64, what=f"preset {preset}")


@requires_interpreter
def test_training_step_compiles_fullgraph():
    img, cap, lens, img_lens = _inputs(n_img=3, lens=(5, 2, 3), img_lens=(4, 1, 3), regions=4,
                                       dim=6, dtype=torch.float64, pad=0.5)
    img, cap = img.requires_grad_(), cap.requires_grad_()

    def step(a, c):
        sims = rcar_fast.max_similarity(a, c, lens, img_lens=img_lens, preset="laps",
                                        backend="triton")
        return vse_hinge_loss(sims, margin=0.2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(img, cap)
    grads_c = torch.autograd.grad(loss_c, (img, cap))
    loss_e = step(img, cap)
    grads_e = torch.autograd.grad(loss_e, (img, cap))
    for got, want in zip((loss_c, *grads_c), (loss_e, *grads_e)):
        assert_close_to_reference(got, want, dtype=torch.float64, what="compiled step")


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

def test_triton_is_in_the_maxsim_table():
    assert dispatch.implementation("maxsim", "triton") is MaxSimTriton


@requires_interpreter
def test_dispatch_reasons():
    assert_interpreter_dispatch("maxsim")
    cpu = torch.device("cpu")
    big = dispatch.Inputs(cpu, torch.float32, (2, 1000, 8), (3, 40, 8), "t2i")
    reason = dispatch.rejection("maxsim", "triton", big)
    assert reason is not None and "R=1000" in reason, reason
    assert dispatch.rejection("maxsim", "triton",
                              dispatch.Inputs(cpu, torch.float32, (2, 36, 8), (3, 64, 8))) is None


# ---------------------------------------------------------------------------------------------
# Autotune config lists (the prunes only: runs anywhere, no kernel)
# ---------------------------------------------------------------------------------------------

# (R_PAD, L_PAD): 36 regions x COCO's caption buckets, the ColBERT document shape, R = 1
TUNE_BUCKETS = [(64, 8), (64, 16), (64, 32), (64, 64), (512, 32), (1, 8)]


def _kept(kernel, dtype, r_pad, l_pad, coding):
    from rcar_fast.kernels import maxsim as kernels

    tuner = {"fwd": kernels._fwd_tuned, "bwd_img": kernels._bwd_img_tuned,
             "bwd_cap": kernels._bwd_cap_tuned}[kernel]
    return tuner.early_config_prune(tuner.configs, dict(img_ptr=torch.empty(1, dtype=dtype)),
                                    R_PAD=r_pad, L_PAD=l_pad,
                                    CODING=HEAD_CODINGS.index(coding))


@pytest.mark.parametrize("coding", HEAD_CODINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", ["fwd", "bwd_img", "bwd_cap"])
def test_kept_configs_fit_the_measured_budget_and_quick_keeps_one(monkeypatch, kernel, dtype,
                                                                  coding):
    from rcar_fast.kernels import maxsim as kernels
    from rcar_fast.kernels import tile

    kind = "fp32" if dtype == torch.float32 else "low"
    limits = (kernels._VSA_LIMITS if coding == "vsa" else {}).get((kernel, kind),
                                                                  kernels._LIMITS[(kernel, kind)])
    for r_pad, l_pad in TUNE_BUCKETS:
        monkeypatch.delenv(tile.AUTOTUNE_VARIABLE, raising=False)
        full = _kept(kernel, dtype, r_pad, l_pad, coding)
        assert full, (r_pad, l_pad)
        for c in full:
            m, n = c.kwargs["BI"] * r_pad, c.kwargs["BJ"] * l_pad
            smallest = (c.kwargs["BI"], c.kwargs["BJ"]) == tile.smallest_shape(r_pad, l_pad)
            assert m * n <= limits["max_area"] or (smallest and len(full) == 1), (r_pad, l_pad, c)
            assert m >= tile.MIN_DOT and n >= tile.MIN_DOT
            assert c.kwargs["BK"] == (kernels._FP32_BK if kind == "fp32" else 64)
        monkeypatch.setenv(tile.AUTOTUNE_VARIABLE, "quick")
        quick = _kept(kernel, dtype, r_pad, l_pad, coding)
        assert len(quick) == 1 and str(quick[0]) in {str(c) for c in full}


# ---------------------------------------------------------------------------------------------
# GPU: COCO-sized batches, fp32 / fp16 / bf16, the 2x rule
# ---------------------------------------------------------------------------------------------

def _coco_batch(n_img, n_cap, dtype, seed=0):
    """Unit-norm 36 x 1024 regions (some images with fewer: 10..36), captions of 1..50 words."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(6, 31, (n_cap,), generator=gen)
    lens[0], lens[-1] = 1, 50
    img_lens = torch.randint(10, 37, (n_img,), generator=gen)
    img_lens[0] = 36
    return _inputs(n_img=n_img, lens=lens, img_lens=img_lens, regions=36, dim=1024, dtype=dtype,
                   unit_norm=True, device="cuda", seed=seed + 1)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_coco_batch_forward_and_gradients(dtype):
    img, cap, lens, img_lens = _coco_batch(48, 96, dtype)
    for direction, pool, leaky in (("t2i", "sum", False), ("both", "mean", True),
                                   ("t2i", "lse", False), ("i2t", "softmax", False)):
        opts = _options(direction, pool, leaky, both_scale=1.0)
        out = _triton(img, cap, lens, img_lens, **opts)
        lowp = None if dtype == torch.float32 else head_similarity_vectorized(
            img, cap, lens, img_lens, **opts)
        assert_close_to_reference(out, _reference(img, cap, lens, img_lens, **opts), dtype=dtype,
                                  ref_lowp=lowp, what=f"gpu {dtype} {opts}")
        _check_gradients(img, cap, lens, img_lens, dtype=dtype, what=f"gpu {dtype} {opts}", **opts)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_listed_pairs_forward_and_gradients(dtype):
    img, cap, lens, img_lens = _coco_batch(24, 40, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    img_idx = torch.randint(0, 24, (300,), generator=gen).cuda()
    cap_idx = torch.randint(0, 40, (300,), generator=gen).cuda()
    opts = _options("both", "mean", True, both_scale=1.0)
    grad = torch.randn(300, dtype=torch.float64, generator=gen).cuda()
    a, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
    out = MaxSimPairsTriton.fn(a, c, lens, img_lens, img_idx, cap_idx, **opts)
    got = (out, *torch.autograd.grad(out, (a, c), grad.float()))

    def reference(precision):
        a, c = img.to(precision).requires_grad_(), cap.to(precision).requires_grad_()
        want = head_pairs_vectorized(a, c, lens, img_lens, img_idx, cap_idx, **opts)
        return (want, *torch.autograd.grad(want, (a, c), grad.to(precision)))

    want = reference(torch.float64)
    low = reference(dtype) if dtype != torch.float32 else (None,) * 3
    rows = (None, _real_rows(img, img_lens), _real_rows(cap, lens))
    for what, g, w, lp, real in zip(("scores", "d img", "d cap"), got, want, low, rows):
        pick = (lambda t: t) if real is None else (lambda t, real=real: t[real])
        assert_close_to_reference(pick(g), pick(w), dtype=dtype,
                                  ref_lowp=None if lp is None else pick(lp), what=f"pairs {what}")


@requires_gpu
def test_gpu_colbert_shape_scores_and_top_k():
    # ColBERT: 32-token queries, 300-token documents (as regions), d = 128, bf16; all pairs
    # and the top-k search against the reference backend on the same inputs
    docs, queries, q_lens, d_lens = _inputs(n_img=200, lens=[32] * 6 + [9, 17],
                                            img_lens=[300] + [120 + i for i in range(199)],
                                            regions=300, dim=128, dtype=torch.bfloat16,
                                            unit_norm=True, device="cuda", seed=5)
    got = rcar_fast.maxsim(queries, docs, q_lens, d_lens, backend="triton")
    want = rcar_fast.maxsim(queries.double(), docs.double(), q_lens, d_lens, backend="reference")
    lowp = rcar_fast.maxsim(queries, docs, q_lens, d_lens, backend="reference")
    assert_close_to_reference(got, want, dtype=torch.bfloat16, ref_lowp=lowp, what="colbert")
    values, indices = rcar_fast.maxsim(queries, docs, q_lens, d_lens, k=5, doc_block=64,
                                       backend="triton")
    # blocks of documents pad to their own longest document: other tiles, other summation
    # order, so the block-wise values agree with the whole matrix to float32 rounding
    assert_close(values, got.gather(1, indices), F32_BLOCKED, what="top-k values")
    assert bool((values[:, :-1] >= values[:, 1:]).all())
