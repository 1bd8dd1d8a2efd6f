"""Pair-list scoring (score_pairs) and the sparse hardest-negative loss.

* score_pairs equals the all-pairs reference gathered at the pairs, forward and backward,
  for SCAN and every RCAR regulator, on every backend registered for the pair ops;
* hardest_negative_loss equals the full B x B VSE++ max_violation loss in value and in the
  gradients w.r.t. img, cap and the head's weights (float64, no ties in random data), while
  computing autograd for at most 3B pairs.
"""
import pytest
import torch

import rcar_fast
from rcar_fast import dispatch, reference, reference_math
from rcar_fast.losses import full_hardest_negative_loss, hardest_negative_loss, vse_hinge_loss
from rcar_fast.pairs import score_pairs
import rcar_fast.pairs as pairs_module
from rcar_fast.modules import RCARSimilarity
from tests.inputs import make_inputs
from tests.tolerances import (F32_PAIRS_ABS, F32_PAIRS_VS_F64, F64_PAIRS, F64_SCALAR_CLOSED_FORM,
                              F64_SCALAR_EXACT_FORM, F64_SPARSE_VS_FULL_LOSS, approx, assert_close,
                              assert_scaled_close)

F64 = torch.float64
D, SIM_DIM = 12, 6


def _inputs(n_img=5, n_cap=6, R=4, lens=(7, 3, 1, 5, 2, 6), d=D, seed=0, dtype=F64):
    """This file's batch: make_inputs with NaN padding (it must never be read)."""
    return make_inputs(n_img, n_cap, R, d, lens=lens, seed=seed, dtype=dtype)


def _head(regulator="coop_rcar", steps=2, direction="t2i", seed=0):
    torch.manual_seed(seed)
    return reference.RCARHead(embed_dim=D, sim_dim=SIM_DIM, regulator=regulator, steps=steps,
                              direction=direction, smooth=10.0 if direction == "t2i" else 3.0).double().eval()


SCAN_SETTINGS = [
    dict(direction="t2i"),
    dict(direction="i2t", smooth=4.0),
    dict(direction="t2i", agg="lse", lse_lambda=6.0),
    dict(direction="i2t", raw_norm="clipped_l1norm", agg="max", smooth=5.0),
    dict(direction="t2i", raw_norm="softmax"),
]
RCAR_SETTINGS = [("coop_rcar", 2, "t2i"), ("coop_rcar", 3, "i2t"), ("only_rar", 2, "t2i"),
                 ("only_rcr", 1, "i2t"), ("only_rcr", 0, "t2i")]
# Repeats, arbitrary order, every image and caption.
IMG_IDX = torch.tensor([0, 4, 2, 2, 1, 3, 0, 4, 3])
CAP_IDX = torch.tensor([5, 0, 2, 2, 1, 3, 4, 2, 0])


def _pair_backends(op):
    usable = [be for be in dispatch.BACKENDS if dispatch.rejection(op, be, torch.device("cpu"), F64) is None]
    assert {"reference", "reference_loop"} <= set(usable)
    return usable


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(out, weights, tensors):
    grads = torch.autograd.grad((out * weights).sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def _assert_close(got, want, what):
    assert_scaled_close(got, want, F64_PAIRS, what=what, scale=want.abs().max().item() or 1.0)


@pytest.mark.parametrize("backend", _pair_backends("scan_pairs"))
@pytest.mark.parametrize("setting", SCAN_SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_scan_pairs_equal_gathered_all_pairs(setting, backend):
    img, cap, lens = _inputs()
    img_a, cap_a, img_b, cap_b = _leaf(img), _leaf(cap), _leaf(img), _leaf(cap)
    got = score_pairs(img_a, cap_a, lens, IMG_IDX, CAP_IDX, backend=backend, **setting)
    want = reference.scan_similarity_loop(img_b, cap_b, lens, **setting)[IMG_IDX, CAP_IDX]
    assert got.shape == (len(IMG_IDX),) and got.dtype == F64
    _assert_close(got, want, "scores")
    weights = torch.randn(len(IMG_IDX), dtype=F64)
    for name, g, w in zip(("d img", "d cap"), _grads(got, weights, [img_a, cap_a]),
                          _grads(want, weights, [img_b, cap_b])):
        assert torch.isfinite(g).all(), f"{name}: non-finite (padding leaked?)"
        _assert_close(g, w, name)


@pytest.mark.parametrize("backend", _pair_backends("rcar_pairs"))
@pytest.mark.parametrize("regulator,steps,direction", RCAR_SETTINGS)
def test_rcar_pairs_equal_gathered_all_pairs(regulator, steps, direction, backend):
    img, cap, lens = _inputs()
    head = _head(regulator, steps, direction)
    params = list(head.parameters())
    img_a, cap_a, img_b, cap_b = _leaf(img), _leaf(cap), _leaf(img), _leaf(cap)
    got = score_pairs(img_a, cap_a, lens, IMG_IDX, CAP_IDX, model=head, backend=backend)
    want = head.forward_loop(img_b, cap_b, lens)[IMG_IDX, CAP_IDX]
    _assert_close(got, want, "scores")
    weights = torch.randn(len(IMG_IDX), dtype=F64)
    if not dispatch.implementation("rcar_pairs", backend).has_backward:
        # A forward-only kernel (the C++ CPU one, until its backward lands) says so when
        # differentiated instead of handing back no gradient.
        with pytest.raises(RuntimeError, match="no backward"):
            _grads(got, weights, [img_a])
        return
    got_grads = _grads(got, weights, [img_a, cap_a] + params)
    want_grads = _grads(want, weights, [img_b, cap_b] + params)
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        _assert_close(g, w, f"gradient {k}")


@pytest.mark.parametrize("regulator,steps,direction", RCAR_SETTINGS)
def test_grouped_pairs_sum_the_head_weight_gradients(regulator, steps, direction):
    """The per-image grouping that runs a fused all-pairs RCAR kernel on a pair list (the
    "cpu" pair backend): scores and the gradients of img, cap and every head weight equal the
    reference's, the groups' weight gradients summed. The all-pairs function here is the
    vectorised reference, so the grouping itself is tested whatever the kernel's backward."""
    from rcar_fast.ops import library

    img, cap, lens = _inputs()
    head = _head(regulator, steps, direction)
    params = list(head.parameters())
    img_a, cap_a, img_b, cap_b = _leaf(img), _leaf(cap), _leaf(img), _leaf(cap)
    got = library.grouped_by_image(lambda i, c, n: head.forward_vectorized(i, c, n),
                                          img_a, cap_a, lens, IMG_IDX, CAP_IDX, params)
    want = head.forward_loop(img_b, cap_b, lens)[IMG_IDX, CAP_IDX]
    _assert_close(got, want, "scores")
    weights = torch.randn(len(IMG_IDX), dtype=F64)
    got_grads = torch.autograd.grad((got * weights).sum(), [img_a, cap_a] + params, allow_unused=True)
    want_grads = torch.autograd.grad((want * weights).sum(), [img_b, cap_b] + params, allow_unused=True)
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert (g is None) == (w is None), f"gradient {k}: None on one side only"
        if w is not None:
            _assert_close(g, w, f"gradient {k}")


def _training_head():
    torch.manual_seed(0)
    return RCARSimilarity(embed_dim=D, sim_dim=SIM_DIM).double().train()   # coop_rcar: RAR dropout


def test_rcar_pairs_of_a_training_head_never_fall_back_silently():
    """The sparse loss' pair recompute: auto takes the first backend of its order with a
    backward and dropout for a training-mode head; a requested backend that cannot take the
    call is one error with every reason."""
    from rcar_fast import scorers

    img, cap, lens = _inputs()
    head = _training_head()
    scoring = scorers.scoring(head, {}, img)
    chosen = scoring.choose("rcar_pairs", "auto", img, cap, lens)
    assert chosen.has_backward and chosen.implements_dropout
    first = next(be for be in dispatch.auto_order("rcar_pairs", "cpu")
                 if dispatch.rejection("rcar_pairs", be, scoring.inputs(img, cap, lens)) is None)
    assert chosen.backend == first
    cpu = dispatch.implementation("rcar_pairs", "cpu")
    if cpu.environment("cpu") is not None:
        pytest.skip(f"no C++ CPU kernels here: {cpu.environment('cpu')}")
    with pytest.raises(dispatch.BackendUnavailable, match="rcar_pairs on cpu torch.float16.*float32 or float64"):
        score_pairs(_leaf(img).half(), cap.half(), lens, IMG_IDX, CAP_IDX, model=head.half(), backend="cpu")
    if cpu.has_backward:
        # It trains (test_train_convergence), but auto leaves it out, with the measured reason.
        assert "per distinct image" in dispatch.not_in_auto("rcar_pairs", "cpu")
        assert chosen.backend == "reference"
        assert "not_in_auto" in rcar_fast.backends()["cpu"]["capabilities"]["rcar_pairs"]
        return
    # A forward-only pair kernel: refused for training, and auto leaves it out even for an
    # eval-mode head (whose pair scores a loss may still differentiate), saying why.
    head = _training_head()
    with pytest.raises(dispatch.BackendUnavailable, match="backward pass is needed.*dropout is active"):
        score_pairs(_leaf(img), cap, lens, IMG_IDX, CAP_IDX, model=head, backend="cpu")
    with pytest.raises(dispatch.BackendUnavailable, match="rcar_pairs.*backward pass is needed"):
        hardest_negative_loss(_leaf(img), cap[:5], lens[:5], model=head, pair_backend="cpu")
    assert scoring.choose("rcar_pairs", "auto", img, cap, lens).backend == "reference"
    assert "forward only" in dispatch.not_in_auto("rcar_pairs", "cpu")
    assert "not_in_auto" in rcar_fast.backends()["cpu"]["capabilities"]["rcar_pairs"]


def test_rcar_cpu_kernel_refuses_a_dropout_rate_it_does_not_draw():
    """The C++ kernel's counter-based masks have p = 0.4: a training head with another rate
    is one error; with p = 0 it computes the eval-mode function (no masks)."""
    from rcar_fast.ops.rcar import RcarCpu

    if RcarCpu.environment("cpu") is not None or not RcarCpu.implements_dropout:
        pytest.skip("no C++ CPU RCAR kernel with dropout here")
    img, cap, lens = _inputs()
    head = _training_head()
    for module in head.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.25
    with pytest.raises(ValueError, match="p = 0.4.*got p = 0.25"):
        score_pairs(img, cap, lens, IMG_IDX, CAP_IDX, model=head, backend="cpu")
    for module in head.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    img_a, img_b = _leaf(img), _leaf(img)
    got = score_pairs(img_a, cap, lens, IMG_IDX, CAP_IDX, model=head, backend="cpu")
    want = head.forward_loop(img_b, cap, lens)[IMG_IDX, CAP_IDX]
    _assert_close(got, want, "scores, p = 0 in training mode")
    _assert_close(torch.autograd.grad(got.sum(), img_a)[0], torch.autograd.grad(want.sum(), img_b)[0],
                  "d img, p = 0 in training mode")


def test_sparse_rcar_loss_selects_on_the_fused_kernel_and_matches_the_reference():
    """hardest_negative_loss of an eval-mode RCAR head: the B x B selection pass on every
    usable all-pairs backend (forward only, no graph) gives the reference's loss and
    gradients (the pairs recomputed by auto's pair backend, one with a backward)."""
    img, cap, lens = _inputs(n_img=6, n_cap=6)
    head = _head()
    params = list(head.parameters())
    want_img, want_cap = _leaf(img), _leaf(cap)
    want = full_hardest_negative_loss(want_img, want_cap, lens, model=head, backend="reference")
    want_grads = torch.autograd.grad(want, [want_img, want_cap] + params, allow_unused=True)
    usable = [be for be in dispatch.BACKENDS
              if dispatch.rejection("rcar", be, torch.device("cpu"), F64) is None]
    assert "reference" in usable
    for backend in usable:
        got_img, got_cap = _leaf(img), _leaf(cap)
        got = hardest_negative_loss(got_img, got_cap, lens, model=head, backend=backend)
        got_grads = torch.autograd.grad(got, [got_img, got_cap] + params, allow_unused=True)
        assert_close(got, want, F64_SPARSE_VS_FULL_LOSS)
        for k, (g, w) in enumerate(zip(got_grads, want_grads)):
            if w is not None:
                _assert_close(g, w, f"{backend}: gradient {k}")


def test_score_pairs_float32_and_empty_list():
    img, cap, lens = _inputs(dtype=torch.float32)
    out = score_pairs(img, cap, lens, IMG_IDX, CAP_IDX)
    assert out.dtype == torch.float32
    want = reference.scan_similarity_loop(img.double(), cap.double(), lens)[IMG_IDX, CAP_IDX]
    assert_close(out.double(), want, F32_PAIRS_ABS)
    empty = score_pairs(img, cap, lens, torch.tensor([], dtype=torch.int64), [])
    assert empty.shape == (0,)


def test_score_pairs_blocks_bounded_memory(monkeypatch):
    # A tiny block budget forces one pair per block: results must not depend on blocking.
    img, cap, lens = _inputs()
    whole = score_pairs(img, cap, lens, IMG_IDX, CAP_IDX)
    monkeypatch.setattr(reference_math, "BLOCK_BYTES", 1)
    _assert_close(score_pairs(img, cap, lens, IMG_IDX, CAP_IDX), whole, "blocked scores")


@pytest.mark.parametrize("bad,kwargs,error,match", [
    (dict(img_idx=torch.tensor([0.0, 1.0])), {}, TypeError, "img_idx"),
    (dict(cap_idx=torch.tensor([[0, 1]])), {}, ValueError, "cap_idx"),
    (dict(img_idx=torch.tensor([0, 5])), {}, ValueError, "n_img=5"),
    (dict(cap_idx=torch.tensor([0, -1])), {}, ValueError, "cap_idx"),
    (dict(cap_idx=torch.tensor([0, 1, 2])), {}, ValueError, "same length"),
    ({}, dict(model="vse"), ValueError, "model"),
    ({}, dict(temperature=3.0), TypeError, "temperature"),
    ({}, dict(direction="x2y"), ValueError, "direction"),
    ({}, dict(backend="fast"), ValueError, "backend"),
])
def test_score_pairs_rejects_bad_arguments(bad, kwargs, error, match):
    img, cap, lens = _inputs()
    args = dict(img_idx=torch.tensor([0, 1]), cap_idx=torch.tensor([0, 1]))
    args.update(bad)
    with pytest.raises(error, match=match):
        score_pairs(img, cap, lens, args["img_idx"], args["cap_idx"], **kwargs)


def test_score_pairs_rejects_scan_options_for_a_head_and_wrong_d():
    img, cap, lens = _inputs()
    with pytest.raises(TypeError, match="do not apply"):
        score_pairs(img, cap, lens, [0], [0], model=_head(), smooth=3.0)
    small_img, small_cap, lens = _inputs(d=4)
    with pytest.raises(ValueError, match="embed_dim"):
        score_pairs(small_img, small_cap, lens, [0], [0], model=_head())


# ---------------------------------------------------------------------------------------------
# Hardest-negative loss
# ---------------------------------------------------------------------------------------------

def independent_full_loss(scores, margin):
    """VSE++ max_violation written out (as SCAN's ContrastiveLoss computes it), independent of
    rcar_fast.pairs."""
    diagonal = scores.diag().view(-1, 1)
    cost_caption = (margin + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_image = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0)
    mask = torch.eye(scores.shape[0]) > 0.5
    cost_caption = cost_caption.masked_fill(mask, 0)
    cost_image = cost_image.masked_fill(mask, 0)
    return cost_caption.max(1)[0].sum() + cost_image.max(0)[0].sum()


def _batch(B=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 8, (B,), generator=gen)
    return _inputs(n_img=B, n_cap=B, R=5, lens=tuple(lens.tolist()), seed=seed)


MODELS = {"scan_t2i": dict(direction="t2i"), "scan_i2t": dict(direction="i2t", smooth=4.0),
          "rcar_coop_rcar2_t2i": ("coop_rcar", 2, "t2i"), "rcar_only_rar2_i2t": ("only_rar", 2, "i2t")}


def _model(name):
    """(model, scan kwargs) for a MODELS entry."""
    if name.startswith("scan"):
        return "scan", MODELS[name]
    return _head(*MODELS[name]), {}


def _reference_all_pairs(model, kwargs, img, cap, lens):
    if model == "scan":
        return reference.scan_similarity_loop(img, cap, lens, **kwargs)
    return model.forward_loop(img, cap, lens)


@pytest.mark.parametrize("margin", [0.2, 0.02])
@pytest.mark.parametrize("name", MODELS)
def test_hardest_negative_loss_equals_full_loss(name, margin):
    model, kwargs = _model(name)
    img, cap, lens = _batch()
    params = [] if model == "scan" else list(model.parameters())
    img_a, cap_a, img_b, cap_b = _leaf(img), _leaf(cap), _leaf(img), _leaf(cap)
    sparse, details = hardest_negative_loss(img_a, cap_a, lens, model=model, margin=margin,
                                            return_details=True, **kwargs)
    full = independent_full_loss(_reference_all_pairs(model, kwargs, img_b, cap_b, lens), margin)
    B = img.shape[0]
    assert details["n_pairs"] <= 3 * B
    assert sparse.item() == approx(full.item(), F64_SPARSE_VS_FULL_LOSS)
    assert full.item() > 0, "the test needs active hinges"
    got = torch.autograd.grad(sparse, [img_a, cap_a] + params, allow_unused=True)
    want = torch.autograd.grad(full, [img_b, cap_b] + params, allow_unused=True)
    for k, (g, w) in enumerate(zip(got, want)):
        g = torch.zeros(1, dtype=F64) if g is None else g
        w = torch.zeros(1, dtype=F64) if w is None else w
        assert torch.isfinite(g).all()
        _assert_close(g, w, f"gradient {k}")


def test_library_full_losses_match_the_independent_one():
    img, cap, lens = _batch()
    scores = reference.scan_similarity_loop(img, cap, lens)
    expected = independent_full_loss(scores, 0.2).item()
    assert vse_hinge_loss(scores, 0.2).item() == approx(expected, F64_SCALAR_EXACT_FORM)
    assert full_hardest_negative_loss(img, cap, lens, backend="reference_loop").item() == \
        approx(expected, F64_SCALAR_CLOSED_FORM)
    mean = hardest_negative_loss(img, cap, lens, reduction="mean").item()
    assert mean == approx(expected / img.shape[0], F64_SCALAR_CLOSED_FORM)


def test_only_selected_pairs_get_autograd(monkeypatch):
    # The recompute sees at most 3B pairs; the all-pairs pass runs without autograd.
    seen = []
    real_score_pairs = pairs_module.score_pairs

    def spy(img, cap, lens, img_idx, cap_idx, **kw):
        seen.append(len(img_idx))
        return real_score_pairs(img, cap, lens, img_idx, cap_idx, **kw)

    real_all_pairs = pairs_module.all_pairs_scores

    def all_pairs_spy(img, cap, lens, **kw):
        assert not torch.is_grad_enabled() and not img.requires_grad and not cap.requires_grad
        return real_all_pairs(img, cap, lens, **kw)

    monkeypatch.setattr(pairs_module, "score_pairs", spy)
    monkeypatch.setattr(pairs_module, "all_pairs_scores", all_pairs_spy)
    img, cap, lens = _batch(B=10)
    loss, details = hardest_negative_loss(_leaf(img), _leaf(cap), lens, return_details=True)
    assert seen == [details["n_pairs"]] and 10 < seen[0] <= 30
    assert details["hardest_caption"].shape == (10,)
    assert (details["hardest_caption"] != torch.arange(10)).all()
    assert (details["hardest_image"] != torch.arange(10)).all()


def test_score_fn_replaces_the_selection_pass():
    img, cap, lens = _batch()
    calls = []

    def score_fn(i, c, l):
        calls.append(1)
        return reference.scan_similarity_vectorized(i, c, l)

    a = hardest_negative_loss(img, cap, lens, score_fn=score_fn)
    b = hardest_negative_loss(img, cap, lens)
    assert calls == [1] and a.item() == approx(b.item(), F64_SCALAR_CLOSED_FORM)
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        hardest_negative_loss(img, cap, lens, score_fn=lambda i, c, l: torch.zeros(3, 3))


def test_loss_rejects_unpaired_batches():
    img, cap, lens = _inputs()        # 5 images, 6 captions
    with pytest.raises(ValueError, match="img.shape\\[0\\]"):
        hardest_negative_loss(img, cap, lens)
    img, cap, lens = _inputs(n_img=1, n_cap=1, lens=(3,))
    with pytest.raises(ValueError, match="B >= 2"):
        hardest_negative_loss(img, cap, lens)
    img, cap, lens = _batch()
    with pytest.raises(ValueError, match="margin"):
        hardest_negative_loss(img, cap, lens, margin=-1.0)


def test_full_loss_of_a_training_head_gets_a_backward_under_auto():
    """auto must not send a training-mode head to a forward-only kernel (the C++ CPU one)."""
    head = RCARSimilarity(embed_dim=D, sim_dim=4, regulator="only_rcr", steps=1).double().train()
    img, cap, lens = _batch()
    img, cap = _leaf(img), _leaf(cap)
    loss = full_hardest_negative_loss(img, cap, lens, model=head)
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_score_fn_returning_non_finite_scores_is_refused():
    img, cap, lens = _batch()
    B = img.shape[0]
    for bad in (float("nan"), float("inf"), float("-inf")):
        def score_fn(i, c, l, bad=bad):
            scores = reference.scan_similarity_vectorized(i, c, l)
            scores[0, 1] = bad
            return scores
        with pytest.raises(ValueError, match="score_fn returned NaN or Inf scores off the diagonal"):
            hardest_negative_loss(img, cap, lens, score_fn=score_fn)

    def nan_diagonal(i, c, l):  # the diagonal is never read by the selection
        return reference.scan_similarity_vectorized(i, c, l).fill_diagonal_(float("nan"))

    assert torch.isfinite(hardest_negative_loss(img, cap, lens, score_fn=nan_diagonal))
    with pytest.raises(TypeError, match="score_fn must return a torch.Tensor"):
        hardest_negative_loss(img, cap, lens, score_fn=lambda i, c, l: [[0.0] * B] * B)
    with pytest.raises(TypeError, match="score_fn must be a callable"):
        hardest_negative_loss(img, cap, lens, score_fn="scan")


@pytest.mark.parametrize("margin,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                        ("0.2", TypeError), (True, TypeError)])
def test_loss_rejects_non_finite_or_non_numeric_margin(margin, exc):
    img, cap, lens = _batch()
    with pytest.raises(exc, match="margin must be a"):
        hardest_negative_loss(img, cap, lens, margin=margin)
    with pytest.raises(exc, match="margin must be a"):
        full_hardest_negative_loss(img, cap, lens, margin=margin)


def test_auto_passes_the_cpu_kernels_over_for_a_huge_t2i_R():
    # the C++ kernels refuse an (R x R) Gram of 9.5 GiB; auto scores with the reference instead
    img, cap, lens = torch.randn(2, 50_000, 3), torch.randn(2, 2, 3), torch.tensor([2, 1])
    got = score_pairs(img, cap, lens, [0, 1], [1, 0])
    want = reference.scan_similarity_vectorized(img.double(), cap.double(), lens)[[0, 1], [1, 0]]
    assert_close(got.double(), want, F32_PAIRS_VS_F64)
    loss = hardest_negative_loss(img, cap, lens)
    assert torch.isfinite(loss)
