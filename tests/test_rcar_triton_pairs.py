"""The Triton RCAR kernels on a pair list (op "rcar_pairs", backend "triton": kernels/rcar_backward.py's
pair kernel walking each owner's listed partners, rcar_fast/ops/rcar.py RcarPairsTriton), and the
all-pairs backward that runs a sparse output gradient as its nonzero pairs.

Under the interpreter (~1 ms per program step, ~0.2 s per pair forward and ~1 s per pair backward at
these sizes) every case keeps to a handful of pairs: 2-3 images, 3 captions of ragged lengths
(including 1) with NaN padding, d 32, sim_dim 16. Scores and gradients (img, cap, every head
parameter) are compared with the float64 reference over all pairs under the same counter-based
dropout masks (tests/test_rcar_triton.py reference_grads).
"""
import copy

import pytest
import torch

import rcar_fast
from rcar_fast import dispatch, losses
from rcar_fast.kernels import rcar_backward
from rcar_fast.ops import rcar as rcar_ops
from rcar_fast.pairs import score_pairs
from tests.conftest import requires_gpu, requires_interpreter
from tests.test_rcar_triton import _inputs, make_head, reference_grads
from tests.tolerances import assert_bit_equal, assert_close_to_reference

# A repeat ((1, 2) twice), no order, every image and caption.
IMG_IDX = torch.tensor([1, 0, 1, 0])
CAP_IDX = torch.tensor([2, 0, 2, 1])


def pair_op_grads(head, img, cap, lens, img_idx, cap_idx, grad, seed, training):
    """Scores and [d img, d cap, d params...] through rcar_fast::rcar_pairs_triton (the path
    torch.compile takes) with an explicit dropout seed."""
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in head.parameters()]
    config = (*rcar_ops.op_config(head)[:-1], training)
    out = rcar_ops.rcar_pairs_triton_op(img, cap, lens, img_idx, cap_idx, params,
                                        torch.tensor(seed, dtype=torch.int64), *config)
    grads = torch.autograd.grad(out, [img, cap, *params], grad)
    return out.detach(), list(grads)


def listed_grad_matrix(img_idx, cap_idx, grad, n_img, n_cap):
    """The all-pairs output gradient equal to `grad` on the listed pairs (repeats summed)."""
    matrix = torch.zeros(n_img, n_cap, dtype=torch.float64)
    return matrix.index_put_((img_idx, cap_idx), grad.double(), accumulate=True)


def check_pairs(head, img, cap, lens, what, training, seed=2**35 + 3):
    """The listed pairs' scores and gradients against the float64 reference (2x rule in float16)."""
    dtype = img.dtype
    grad = torch.randn(len(IMG_IDX))
    matrix = listed_grad_matrix(IMG_IDX, CAP_IDX, grad, img.shape[0], cap.shape[0])
    out, got = pair_op_grads(head, img, cap, lens, IMG_IDX, CAP_IDX, grad, seed, training)
    ref = reference_grads(head, img, cap, lens, matrix, seed, training)
    lowp = None if dtype == torch.float32 else reference_grads(head, img, cap, lens, matrix, seed,
                                                               training, dtype)
    assert out.shape == (len(IMG_IDX),) and out.dtype == torch.float32
    assert_close_to_reference(out, ref[0][IMG_IDX, CAP_IDX], dtype=dtype,
                              ref_lowp=None if lowp is None else lowp[0][IMG_IDX, CAP_IDX],
                              what=f"{what} scores")
    assert_bit_equal(out[2], out[0], what=f"{what}: a repeated pair's score")
    names = ["img", "cap"] + [n for n, _ in head.named_parameters()]
    want = [ref[1], ref[2], *ref[3]]
    want_lowp = None if lowp is None else [lowp[1], lowp[2], *lowp[3]]
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        assert g.dtype == dtype and g.shape == w.shape, f"{what} d {name}: {g.dtype} {tuple(g.shape)}"
        assert_close_to_reference(g, w, dtype=dtype, ref_lowp=None if want_lowp is None else want_lowp[i],
                                  what=f"{what} d {name}")
    real = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    assert bool((got[1][~real] == 0).all()), f"{what}: gradient in the caption padding"


# every regulator, both directions, eval and training (RAR's dropout)
PAIR_GRID = [("coop_rcar", 2, "t2i", True), ("only_rcr", 1, "i2t", False),
             ("only_rar", 2, "i2t", True)]


@requires_interpreter
@pytest.mark.parametrize("regulator,steps,direction,training", PAIR_GRID)
def test_pair_scores_and_gradients_match_float64_reference(regulator, steps, direction, training):
    img, cap, lens = _inputs()
    head = make_head(regulator, steps, direction)
    check_pairs(head, img, cap, lens, f"{regulator} {steps} {direction} training={training}", training)


@requires_interpreter
def test_pair_float16_within_twice_the_reference_error():
    img, cap, lens = _inputs(dtype=torch.float16)
    head = make_head("coop_rcar", 1, "t2i").half()
    check_pairs(head, img, cap, lens, "float16 coop_rcar 1 t2i", True)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_listed_dropout_scores_are_the_all_pairs_kernels_bits(direction):
    # Training mode, one seed: a listed pair's score is the all-pairs Triton forward's score of
    # that (image, caption) bit for bit (masks keyed by i * n_cap + j); another seed differs.
    img, cap, lens = _inputs()
    head = make_head("coop_rcar", 2, direction)
    weights = rcar_ops.pack_weights(head, torch.float32, True)
    options = rcar_ops._kernel_options(head)
    every = rcar_backward.run(img, cap, lens.tolist(), weights, seed=5, dropout_on=True, **options)
    listed = [rcar_backward.run(img, cap, lens.tolist(), weights, seed=seed, dropout_on=True,
                                pairs=(IMG_IDX, CAP_IDX), **options) for seed in (5, 6)]
    assert_bit_equal(listed[0], every[IMG_IDX, CAP_IDX], what=f"{direction} listed vs all pairs")
    assert (listed[0] - listed[1]).abs().max() > 1e-4, "the seed must change the masks"


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_sparse_all_pairs_gradient_runs_as_its_nonzero_pairs_bit_for_bit(direction, monkeypatch):
    # 1 of 4 pairs with a gradient: the all-pairs backward lists it and runs the pair list, the
    # full walk's gradients bit for bit; a NaN gradient counts as nonzero and reaches its image.
    img, cap, lens = _inputs(n_cap=2, lens=(7, 3))
    head = make_head("coop_rcar", 2, direction)
    weights = rcar_ops.pack_weights(head, torch.float32, True)
    options = dict(rcar_ops._kernel_options(head), seed=9, dropout_on=True)
    listed = []
    owner_lists = rcar_backward.owner_lists
    monkeypatch.setattr(rcar_backward, "owner_lists",
                        lambda owner, *rest: listed.append(owner.tolist()) or owner_lists(owner, *rest))
    grad = torch.zeros(2, 2)
    grad[1, 0] = 0.8
    routed = rcar_backward.run(img, cap, lens.tolist(), weights, grad=grad, **options)
    assert sorted(listed) == [[0], [1]], "the one nonzero pair (1, 0) runs as a pair list"
    monkeypatch.setattr(rcar_backward, "SPARSE_FRACTION", 0.0)   # never routed: the full walk
    full = rcar_backward.run(img, cap, lens.tolist(), weights, grad=grad, **options)
    assert len(listed) == 2
    for a, b in zip([*routed[:2], *routed[2].values()], [*full[:2], *full[2].values()]):
        assert_bit_equal(a, b, what=f"{direction} sparse vs full walk")
    assert bool((routed[0][0] == 0).all()), "an image without a nonzero pair gets no gradient"
    monkeypatch.setattr(rcar_backward, "SPARSE_FRACTION", 0.5)
    grad = torch.zeros(2, 2)
    grad[0, 1] = float("nan")
    d_img, d_cap, _ = rcar_backward.run(img, cap, lens.tolist(), weights, grad=grad, **options)
    assert len(listed) == 4, "a NaN gradient is listed"
    assert torch.isnan(d_img[0]).any(), "a NaN output gradient must reach its image"
    assert bool((d_img[1] == 0).all()) and bool((d_cap[0] == 0).all())


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_hardest_negative_loss_on_triton_equals_the_full_loss(direction):
    # B = 2: 4 distinct pairs recomputed (the positives and the two negatives); the loss and the
    # gradients of img, cap and every head parameter equal the float64 full B x B loss's.
    img, cap, lens = _inputs(n_img=2, n_cap=2, lens=(6, 1))
    head = make_head("coop_rcar", 2, direction)
    head64 = copy.deepcopy(head).double()
    results = []
    for model, dtype, run in ((head, torch.float32, "sparse"), (head64, torch.float64, "full")):
        i, c = img.to(dtype).requires_grad_(), cap.to(dtype).requires_grad_()
        if run == "sparse":
            loss = losses.hardest_negative_loss(i, c, lens, model=model, backend="triton",
                                                pair_backend="triton")
        else:
            loss = losses.full_hardest_negative_loss(i, c, lens, model=model, backend="reference")
        results.append([loss, *torch.autograd.grad(loss, [i, c, *model.parameters()], allow_unused=True)])
    names = ["loss", "img", "cap"] + [n for n, _ in head.named_parameters()]
    for name, got, want in zip(names, *results):
        want = torch.zeros_like(got, dtype=torch.float64) if want is None else want
        assert got is not None, f"{direction} d {name}: no gradient"
        assert_close_to_reference(got.detach(), torch.nan_to_num(want.detach()), dtype=torch.float32,
                                  what=f"{direction} {name}")


@requires_interpreter
def test_empty_pair_list_gives_no_scores_and_zero_gradients():
    img, cap, lens = _inputs()
    head = make_head("coop_rcar", 1, "t2i")
    none = torch.zeros(0, dtype=torch.int64)
    out, grads = pair_op_grads(head, img, cap, lens, none, none, torch.zeros(0), 3, True)
    assert out.shape == (0,)
    assert all(bool((g == 0).all()) for g in grads)


@requires_interpreter
def test_bad_indices_are_refused_before_any_kernel_runs(monkeypatch):
    img, cap, lens = _inputs()
    head = make_head("coop_rcar", 1, "t2i")

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on bad indices")

    monkeypatch.setattr(rcar_backward, "run", no_kernel)
    op = rcar_ops.rcar_pairs_triton
    two = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"rcar pairs \(triton\): cap_idx must lie in \[0, 3\), got values in \[0, 3\]"):
        op(head, img, cap, lens, two, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"img_idx must lie in \[0, 2\), got values in \[-1, 1\]"):
        op(head, img, cap, lens, torch.tensor([-1, 1]), two)
    with pytest.raises(ValueError, match=r"img_idx must be an int64 tensor on cpu of shape \(2,\)"):
        op(head, img, cap, lens, two.int(), two)
    with pytest.raises(ValueError, match=r"cap_idx must be an int64 tensor on cpu of shape \(2,\), got \(3,\)"):
        op(head, img, cap, lens, two, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"grad must be \(2,\), got \(3,\)"):
        rcar_ops._fused_pairs_backward(head, torch.zeros(3), img, cap, lens.tolist(), two, two, 0, False)
    # the public entry checks first, naming the argument
    with pytest.raises(ValueError, match="cap_idx"):
        score_pairs(img, cap, lens, two, torch.tensor([0, 3]), model=head, backend="triton")


def test_auto_takes_triton_for_cuda_pairs_and_never_the_interpreter():
    cuda = dispatch.Inputs(torch.device("cuda"), torch.float32, (2, 3, 8), (2, 4, 8), "t2i",
                           needs_grad=True, active_dropout=("rar_modules.0.rar_k_w.2",))
    assert dispatch.auto_order("rcar_pairs", "cuda")[0] == "triton"
    if dispatch.rejection("rcar_pairs", "triton", cuda) is None:   # triton installed
        assert dispatch.choose("rcar_pairs", "auto", cuda).backend == "triton"
    assert "triton" not in dispatch.auto_order("rcar_pairs", "cpu")
    cpu = dispatch.Inputs(torch.device("cpu"), torch.float32)
    assert dispatch.choose("rcar_pairs", "auto", cpu).backend != "triton"
    caps = rcar_fast.backends()["triton"]["capabilities"]["rcar_pairs"]
    assert caps["has_backward"] and caps["implements_dropout"] and "not_in_auto" not in caps


@requires_interpreter
def test_opcheck_rcar_pairs_triton():
    img, cap, lens = _inputs(n_img=2, n_cap=2, lens=(4, 2))
    cap = cap.detach().nan_to_num(1.0).requires_grad_()
    head = make_head("only_rcr", 1, "i2t").train()   # no dropout: opcheck reruns the op
    weights = [p.detach().clone().requires_grad_() for p in head.parameters()]
    index = (torch.tensor([1, 0]), torch.tensor([1, 1]))
    config = (torch.zeros((), dtype=torch.int64), *rcar_ops.op_config(head))
    torch.library.opcheck(rcar_ops.rcar_pairs_triton_op, (img, cap, lens, *index, weights, *config))


def test_bench_sparse_loss_rows_recompute_the_pairs_on_triton():
    # bench/gpu_parts.py's triton loss rows (bench.suite.loss_step): the selection and the pair
    # recompute both on triton, on a GPU (and under the interpreter)
    from types import SimpleNamespace

    from bench import suite

    img, cap, lens = _inputs()
    head = make_head("coop_rcar", 2, "t2i").train()
    devices = ["cuda"] + (["cpu"] if dispatch.triton_interpreter_on() else [])
    for device in devices:
        _, detail = suite.loss_step(SimpleNamespace(device=torch.device(device)), "sparse", head,
                                    "triton", img, cap, lens, head, {})
        assert detail == "selection: triton, pairs: triton", (device, detail)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_eval_pair_forward_on_the_tiles_of_each_context_set(direction):
    # Eval mode: kernels/rcar.py's tiles, each a context set's listed query items (3 images x 9
    # captions of up to 7 words, 16-row tiles: several tiles per set in t2i, several images per
    # tile in i2t), repeats, a poisoned output buffer; against the float64 reference.
    from rcar_fast.kernels import rcar as kernels
    from tests.test_rcar_triton import reference64

    img, cap, lens = _inputs(n_img=3, n_cap=9, lens=(3, 7, 1, 5, 2, 7, 4, 1, 6))
    head = make_head("coop_rcar", 2, direction)
    img_idx = torch.tensor([2, 0, 0, 0, 0, 0, 0, 2, 1, 0, 1, 0])
    cap_idx = torch.tensor([4, 0, 1, 2, 3, 5, 6, 4, 8, 7, 0, 1])
    out = torch.full((12,), float("nan"))
    kernels.rcar_pairs_forward(img, cap, lens.tolist(), rcar_ops.pack_weights(head, torch.float32, True),
                               img_idx, cap_idx, regulator="coop_rcar", steps=2, direction=direction,
                               smooth=head.smooth, out=out)
    assert_close_to_reference(out, reference64(head, img, cap, lens)[img_idx, cap_idx],
                              dtype=torch.float32, what=direction)
    assert_bit_equal(out[7], out[0], what="a repeated pair's score")
    if direction == "t2i":
        _, _, _, tile_set = kernels.listed_tiles(img_idx.tolist(), cap_idx.tolist(), lens.tolist(),
                                                 [0] * 9, 16, 16)
        assert int(torch.bincount(tile_set.long()).max()) >= 2, "image 0's captions fill several tiles"
    else:
        _, _, tile_items, _ = kernels.listed_tiles(cap_idx.tolist(), img_idx.tolist(), [5] * 3,
                                                   [0] * 3, 16, 16)
        assert int((tile_items >= 0).sum(1).max()) >= 2, "a tile holds several images"
    with torch.no_grad():   # the backend's eval forward is this path
        got = rcar_ops.rcar_pairs_triton(head, img, cap, lens, img_idx, cap_idx)
    assert_bit_equal(got, out, what="RcarPairsTriton eval forward")


# ---------------------------------------------------------------------------------------------
# GPU: the recipe's shape (d 1024, sim_dim 256, R 36)
# ---------------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_gpu_pairs_realistic_shape(direction, dtype):
    from tests.test_rcar_triton import gpu_inputs

    img, cap, lens = gpu_inputs(dtype, n_img=4, n_cap=5)
    head = make_head("coop_rcar", 2, direction, d=1024, sim_dim=256, device="cuda")
    img_idx = torch.tensor([3, 0, 1, 3, 2, 0, 3], device="cuda")
    cap_idx = torch.tensor([4, 0, 2, 4, 1, 3, 0], device="cuda")
    head64 = copy.deepcopy(head).double()
    leaves64 = [img.double().requires_grad_(), cap.double().requires_grad_()]
    want = head64.forward_loop(*leaves64, lens)[img_idx, cap_idx]
    ref_lowp = None
    if dtype != torch.float32:
        with torch.no_grad():
            ref_lowp = copy.deepcopy(head).to(dtype).forward_loop(img, cap, lens)[img_idx, cap_idx]
    head = head.to(dtype)
    leaves = [img.detach().clone().requires_grad_(), cap.detach().clone().requires_grad_()]
    got = score_pairs(*leaves, lens, img_idx, cap_idx, model=head, backend="triton")
    assert_close_to_reference(got.detach(), want.detach(), ref_lowp=ref_lowp, dtype=dtype,
                              what=f"{direction} {dtype} scores")
    if dtype == torch.float32:   # gradients (eval mode: the tiled forward, the listed backward)
        weights = torch.randn(len(img_idx), device="cuda", dtype=torch.float64)
        params, params64 = list(head.parameters()), list(head64.parameters())
        g = torch.autograd.grad((got * weights.float()).sum(), leaves + params)
        g64 = torch.autograd.grad((want * weights).sum(), leaves64 + params64)
        names = ["img", "cap"] + [n for n, _ in head.named_parameters()]
        for name, a, b in zip(names, g, g64):
            assert_close_to_reference(a, torch.nan_to_num(b), dtype=dtype, what=f"{direction} d {name}")
    # training mode: the listed dropout forward is the all-pairs one's bits
    weights = rcar_ops.pack_weights(head, torch.float32, False)
    options = dict(rcar_ops._kernel_options(head), seed=77, dropout_on=True)
    every = rcar_backward.run(img, cap, lens.tolist(), weights, **options)
    listed = rcar_backward.run(img, cap, lens.tolist(), weights, pairs=(img_idx, cap_idx), **options)
    assert_bit_equal(listed, every[img_idx, cap_idx], what=f"{direction} {dtype} listed dropout forward")
