"""The RCAR head on the C++ CPU backend (csrc/cpu/rcar.cpp) against the float64 reference:
every regulator and step count, both directions, ragged lengths with NaN padding, sizes off the
tile and vector widths, float32 and float64; the fused backward (img, cap and every head
parameter) in eval and training mode, RAR's counter-based dropout against the reference given
the same masks (rcar_fast.dropout.counter_masks), gradcheck, determinism."""
import pytest
import torch

from rcar_fast import dispatch
from rcar_fast.modules import RCARSimilarity
from tests.inputs import make_inputs, pad_captions, real_words
from tests.tolerances import MUST_DIFFER, assert_bit_equal, assert_close_to_reference

pytestmark = pytest.mark.skipif(
    dispatch.rejection("rcar", "cpu", torch.device("cpu"), torch.float32) is not None,
    reason="the native extension is not built")

MODES = [("only_rar", 1), ("only_rar", 2), ("only_rcr", 0), ("only_rcr", 1), ("only_rcr", 2),
         ("coop_rcar", 1), ("coop_rcar", 2), ("coop_rcar", 3)]


def make_head(regulator, steps, direction, embed_dim, sim_dim):
    head = RCARSimilarity(embed_dim=embed_dim, sim_dim=sim_dim, regulator=regulator, steps=steps,
                          direction=direction, smooth=10.0 if direction == "t2i" else 3.0)
    with torch.no_grad():
        for p in head.parameters():  # the official init zeroes biases; make them count
            if p.dim() == 1:
                p.normal_(0.0, 0.3)
    return head.double().eval()


def check_against_reference(head, img, cap, lens, what):
    with torch.no_grad():
        ref = head.forward_loop(img, cap, lens)
        for dtype in (torch.float64, torch.float32):
            out = head.to(dtype)(img.to(dtype), cap.to(dtype), lens, backend="cpu")
            assert out.dtype == dtype
            assert_close_to_reference(out, ref, dtype=dtype, what=f"{what} {dtype}")
    head.double()


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", MODES)
def test_every_mode_matches_reference(direction, regulator, steps):
    # d = 20, s = 12 (RCR smooth hidden 6), R = 11, L <= 9: none a multiple of the vector width
    head = make_head(regulator, steps, direction, embed_dim=20, sim_dim=12)
    img, cap, lens = make_inputs(4, 6, 11, 20, 9)
    check_against_reference(head, img, cap, lens, f"{direction} {regulator} {steps}")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_several_tiles_and_odd_sim_dim(direction):
    # t2i: > 512 words (two caption blocks); i2t: 14 images of 40 regions (two image blocks);
    # sim_dim 10 gives an RCR smooth hidden width of 5.
    head = make_head("coop_rcar", 2, direction, embed_dim=9, sim_dim=10)
    img, cap, lens = make_inputs(14, 60, 40, 9, 20)
    check_against_reference(head, img, cap, lens, f"{direction} tiles")


def test_smallest_problem():
    head = make_head("coop_rcar", 2, "t2i", embed_dim=3, sim_dim=4)
    img, cap, lens = make_inputs(1, 1, 1, 3, 1)
    for direction in ("t2i", "i2t"):
        head.direction = direction
        check_against_reference(head, img, cap, lens, direction)


def test_padding_is_never_read():
    head = make_head("coop_rcar", 2, "i2t", embed_dim=8, sim_dim=6)
    img, cap, lens = make_inputs(3, 5, 7, 8, 6)
    with torch.no_grad():
        out_nan = head(img, cap, lens, backend="cpu")
        cap[torch.isnan(cap)] = 1e30
        assert_bit_equal(out_nan, head(img, cap, lens, backend="cpu"), what="NaN vs 1e30 padding")


def test_rejects_low_precision_with_reason():
    reason = dispatch.rejection("rcar", "cpu", torch.device("cpu"), torch.bfloat16)
    assert reason is not None and "float32 or float64" in reason


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_baseline_simd_copy(direction, baseline_simd):
    for regulator, steps in (("coop_rcar", 2), ("only_rcr", 1)):
        head = make_head(regulator, steps, direction, embed_dim=20, sim_dim=12)
        img, cap, lens = make_inputs(4, 6, 11, 20, 9)
        check_against_reference(head, img, cap, lens, f"baseline {direction} {regulator}")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_kernel_keeps_a_temperature_beyond_float32_range_finite(direction):
    # The public limit keeps smooth far below float32's range (rcar_fast.validate.SMOOTH_LIMITS);
    # the kernel itself must not turn a larger one into inf (inf * 0 = NaN): its hard attention
    # equals the float64 reference's at the same temperature.
    from rcar_fast.ops.rcar import flat_weights, native_settings

    torch.manual_seed(5)
    # >= 2 words: one word normalises to exactly 1 in float32
    img, cap, lens = make_inputs(3, 4, 6, 12, lens=[5, 2, 3, 4], pad=None)
    cap[1, 2:] = float("nan")
    head = make_head("coop_rcar", 2, direction, 12, 8)
    head.smooth = 1e39
    with torch.no_grad():
        ref = head.forward_vectorized(img, cap, lens)
        head.float()
        out = dispatch.native_module().rcar_forward_cpu(
            img.float(), cap.float(), lens, native_settings(direction, head.regulator, head.steps, 1e39), flat_weights(head))
    assert_close_to_reference(out, ref, dtype=torch.float32, what="smooth=1e39 in float32")


# ---------------------------------------------------------------------------------------------
# The fused backward
# ---------------------------------------------------------------------------------------------

BACKWARD_MODES = [("only_rar", 1), ("only_rar", 2), ("only_rcr", 0), ("only_rcr", 1), ("only_rcr", 2),
                  ("coop_rcar", 1), ("coop_rcar", 2)]


def pair_ids(n_img, n_cap):
    return torch.arange(n_img)[:, None] * n_cap + torch.arange(n_cap)[None, :]


def reference_grads(head, img, cap, lens, grad, seed):
    """(scores, [d img, d cap, d params...]) of the float64 reference, all pairs in one block,
    RAR's dropout (training mode) from the counter-based masks of `seed`."""
    from rcar_fast import dropout

    img, cap = img.detach().requires_grad_(), cap.detach().requires_grad_()
    params = list(head.parameters())
    with dropout.counter_masks(seed, pair_ids(img.shape[0], cap.shape[0])):
        out = head.forward_vectorized(img, cap, lens, img_chunk=img.shape[0], cap_chunk=cap.shape[0])
    inputs = [img, cap, *params]
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)  # only_rcr: no sim_eval_w
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def kernel_grads(head, img, cap, lens, grad, seed, dtype):
    """The same through the rcar_fast::rcar_cpu op and its autograd formula, in dtype."""
    from rcar_fast.ops import rcar as rcar_ops

    head = head.to(dtype)
    img = img.to(dtype).requires_grad_()
    cap = cap.to(dtype).requires_grad_()
    params = list(head.parameters())
    out = rcar_ops.rcar_cpu_op(img, cap, lens, params, torch.tensor(seed, dtype=torch.int64),
                               *rcar_ops.op_config(head))
    grads = torch.autograd.grad(out, [img, cap, *params], grad.to(dtype))
    head.double()
    return out.detach(), list(grads)


def check_grads(head, img, cap, lens, what, seed=7, dtypes=(torch.float64, torch.float32)):
    grad = torch.randn(img.shape[0], cap.shape[0], dtype=torch.float64)
    ref_out, ref = reference_grads(head, img, cap, lens, grad, seed)
    names = ["img", "cap"] + [name for name, _ in head.named_parameters()]
    for dtype in dtypes:
        out, got = kernel_grads(head, img, cap, lens, grad, seed, dtype)
        assert_close_to_reference(out, ref_out, dtype=dtype, what=f"{what} {dtype} scores")
        for name, g, r in zip(names, got, ref):
            assert g.dtype == dtype and g.shape == r.shape, f"{what}: d {name} is {g.dtype} {tuple(g.shape)}"
            assert_close_to_reference(g, r, dtype=dtype, what=f"{what} {dtype} d {name}")
    return got


@pytest.mark.parametrize("pair_list", [False, True], ids=["all_pairs", "pair_list"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", BACKWARD_MODES)
def test_backward_matches_reference(direction, regulator, steps, training, pair_list):
    # d = 20, s = 12, R = 11, L <= 9, ragged with NaN padding; fresh inputs per case; all pairs
    # or the pair list PAIR_IMG x PAIR_CAP (repeats, every image and caption)
    head = make_head(regulator, steps, direction, embed_dim=20, sim_dim=12).train(training)
    img, cap, lens = make_inputs(4, 6, 11, 20, 9)
    what = f"{'pairs ' if pair_list else ''}{direction} {regulator} {steps} training={training}"
    grads = (check_pair_grads(head, img, cap, lens, PAIR_IMG, PAIR_CAP, what) if pair_list
             else check_grads(head, img, cap, lens, what))
    d_cap = grads[1]
    padding = ~real_words(lens, cap.shape[1])
    assert torch.all(d_cap[padding] == 0), "d cap must be exactly 0 at the padding"


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_backward_several_tiles(direction):
    # t2i: > 512 words (several caption blocks of the backward); i2t: > 512 regions (several
    # image blocks); the parts of the deterministic reduction then hold several tasks each
    head = make_head("coop_rcar", 2, direction, embed_dim=9, sim_dim=10).train()
    img, cap, lens = make_inputs(20, 80, 30, 9, 16, lens=torch.randint(7, 17, (80,)))
    check_grads(head, img, cap, lens, f"{direction} tiles", dtypes=(torch.float64,))


@pytest.mark.parametrize("pair_list", [False, True], ids=["all_pairs", "pair_list"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2)])
def test_gradcheck_float64(direction, regulator, steps, pair_list):
    # all pairs (rcar_cpu_op), or a pair list with a repeat (rcar_pairs_cpu_op)
    from rcar_fast.ops import rcar as rcar_ops

    head = make_head(regulator, steps, direction, embed_dim=5, sim_dim=4).train()
    img, cap, lens = make_inputs(2, 3, 3, 5, 3, pad=0.0)
    params = [p.detach().clone().requires_grad_() for p in head.parameters()]
    config = rcar_ops.op_config(head)
    seed = torch.tensor(11, dtype=torch.int64)
    img_idx, cap_idx = torch.tensor([1, 0, 1, 1]), torch.tensor([2, 0, 2, 1])

    def fn(img, cap, *weights):
        if pair_list:
            return rcar_ops.rcar_pairs_cpu_op(img, cap, lens, img_idx, cap_idx, list(weights), seed, *config)
        return rcar_ops.rcar_cpu_op(img, cap, lens, list(weights), seed, *config)

    assert torch.autograd.gradcheck(fn, (img.requires_grad_(), cap.requires_grad_(), *params))


def test_backward_is_deterministic_and_ignores_poison():
    native = dispatch.native_module()
    from rcar_fast.ops import rcar as rcar_ops

    head = make_head("coop_rcar", 2, "t2i", embed_dim=16, sim_dim=8).float().train()
    img, cap, lens = make_inputs(5, 7, 6, 16, 8, dtype=torch.float32)
    settings = rcar_ops.native_settings("t2i", "coop_rcar", 2, 10.0, True, 3)
    grad = torch.randn(5, 7)
    first = native.rcar_backward_cpu(grad, img, cap, lens, settings, rcar_ops.flat_weights(head))
    cap_poisoned = pad_captions(cap, lens, 1e30)
    again = native.rcar_backward_cpu(grad, img, cap_poisoned, lens, settings, rcar_ops.flat_weights(head))
    for a, b in zip(first, again):
        assert_bit_equal(a, b, what="rerun with other padding")
    assert all(torch.isfinite(g).all() for g in first)


def test_dropout_masks_equal_the_reference_definition():
    from rcar_fast import dropout

    native = dispatch.native_module()
    pairs = torch.tensor([0, 1, 5, 77, 2**33 + 3])
    for seed, module, which in ((0, 0, 0), (123456789012, 1, 1), (2**62 - 1, 3, 0)):
        want = dropout.rar_scales(seed, module, which, pairs, 9, 37)
        got = native.rcar_dropout_scales_cpu(seed, module, which, pairs, 9, 37)
        assert_bit_equal(got, want, what=f"masks seed={seed} module={module} which={which}")
    kept = (dropout.rar_scales(5, 0, 0, torch.arange(200), 10, 64) > 0).double().mean().item()
    assert abs(kept - (1 - dropout.P)) < 0.01, f"kept fraction {kept}"


def test_training_mode_head_runs_on_cpu_and_draws_masks():
    head = make_head("coop_rcar", 2, "t2i", embed_dim=8, sim_dim=6).train()
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    assert dispatch.rejection("rcar", "cpu", torch.device("cpu"), torch.float64) is None
    out_a = head(img, cap, lens, backend="cpu")
    out_b = head(img, cap, lens, backend="cpu")
    assert out_a.requires_grad
    assert (out_a - out_b).abs().max() > MUST_DIFFER, "two training steps drew the same dropout masks"
    with torch.no_grad():
        eval_out = head.eval()(img, cap, lens, backend="cpu")
    assert_close_to_reference(eval_out, head.forward_loop(img, cap, lens), dtype=torch.float64)
    out_a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_training_head_without_dropout_rate_equals_eval_and_other_rates_are_refused():
    head = make_head("coop_rcar", 2, "i2t", embed_dim=8, sim_dim=6)
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    with torch.no_grad():
        eval_out = head(img, cap, lens, backend="cpu")
        for module in head.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        assert_bit_equal(head.train()(img, cap, lens, backend="cpu"), eval_out, what="training, p = 0")
        for module in head.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.2
        with pytest.raises(ValueError, match="p = 0.4"):
            head(img, cap, lens, backend="cpu")


@pytest.mark.parametrize("regulator,steps", [("coop_rcar", 2), ("only_rcr", 1), ("only_rar", 2)])
def test_poisoned_buffers_are_written_before_read(regulator, steps):
    # NaN in every tile buffer and in the forward's output before the kernel writes them: a
    # read of a stale or unwritten entry would turn a score or a gradient into NaN. Two
    # blocks of different sizes, so buffers are reused across tiles.
    native = dispatch.native_module()
    head = make_head(regulator, steps, "t2i", embed_dim=9, sim_dim=10).train()
    img, cap, lens = make_inputs(3, 70, 5, 9, 16, lens=torch.randint(7, 17, (70,)))
    previous = native.set_cpu_poison_buffers(True)
    try:
        check_grads(head, img, cap, lens, f"poisoned {regulator}", dtypes=(torch.float64,))
    finally:
        native.set_cpu_poison_buffers(previous)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_sparse_output_gradient_skips_tiles_exactly(direction):
    # A sparse loss's gradient: only a few pairs non-zero, so most tiles are skipped; the
    # gradients still equal the reference's.
    head = make_head("coop_rcar", 2, direction, embed_dim=12, sim_dim=8).train()
    img, cap, lens = make_inputs(5, 4, 6, 12, 7)
    grad = torch.zeros(5, 4, dtype=torch.float64)
    grad[1, 2], grad[4, 0] = 0.7, -1.3
    _, ref = reference_grads(head, img, cap, lens, grad, 5)
    _, got = kernel_grads(head, img, cap, lens, grad, 5, torch.float64)
    for g, r in zip(got, ref):
        assert_close_to_reference(g, r, dtype=torch.float64, what=f"{direction} sparse gradient")
    assert torch.all(got[0][[0, 2, 3]] == 0), "images without a non-zero pair get no gradient"


def test_sparse_output_gradient_runs_as_the_listed_pairs():
    # Fewer than half the pairs with a nonzero gradient: the all-pairs backward lists them (row
    # major) and runs the pair-list backward, bit for bit; a NaN gradient is listed, not skipped.
    from rcar_fast.ops import rcar as rcar_ops

    native = dispatch.native_module()
    head = make_head("coop_rcar", 2, "t2i", embed_dim=16, sim_dim=8).float()
    img, cap, lens = make_inputs(6, 7, 5, 16, 8, dtype=torch.float32)
    settings = rcar_ops.native_settings("t2i", "coop_rcar", 2, 10.0)
    flat = rcar_ops.flat_weights(head)
    img_idx, cap_idx = torch.tensor([0, 2, 2, 3, 5]), torch.tensor([0, 1, 6, 3, 2])
    grad = torch.zeros(6, 7)
    grad[img_idx, cap_idx] = torch.randn(5)
    routed = native.rcar_backward_cpu(grad, img, cap, lens, settings, flat)
    listed = native.rcar_pairs_backward_cpu(grad[img_idx, cap_idx], img, cap, lens, img_idx, cap_idx, settings, flat)
    for a, b in zip(routed, listed):
        assert_bit_equal(a, b, what="sparse all-pairs gradient vs its listed pairs")
    assert torch.all(routed[0][[1, 4]] == 0), "images without a nonzero pair get no gradient"
    grad[4, 4] = float("nan")
    with_nan = native.rcar_backward_cpu(grad, img, cap, lens, settings, flat)
    assert torch.isnan(with_nan[0][4]).any(), "a NaN output gradient must reach its image"
    assert torch.isfinite(with_nan[0][0]).all()


# ---------------------------------------------------------------------------------------------
# The pair-list entry (rcar_pairs_forward / rcar_pairs_backward): one call for a list of pairs
# ---------------------------------------------------------------------------------------------

def pair_kernel(head, img, cap, lens, img_idx, cap_idx, grad, seed, dtype):
    """(pair scores, [d img, d cap, d params...]) through the rcar_fast::rcar_pairs_cpu op."""
    from rcar_fast.ops import rcar as rcar_ops

    head = head.to(dtype)
    img = img.to(dtype).requires_grad_()
    cap = cap.to(dtype).requires_grad_()
    params = list(head.parameters())
    out = rcar_ops.rcar_pairs_cpu_op(img, cap, lens, img_idx, cap_idx, params,
                                     torch.tensor(seed, dtype=torch.int64), *rcar_ops.op_config(head))
    grads = torch.autograd.grad(out, [img, cap, *params], grad.to(dtype))
    head.double()
    return out.detach(), list(grads)


def listed_grad_matrix(img_idx, cap_idx, grad, n_img, n_cap):
    """The all-pairs output gradient equivalent to `grad` on the listed pairs (repeats summed)."""
    matrix = torch.zeros(n_img, n_cap, dtype=torch.float64)
    return matrix.index_put_((img_idx, cap_idx), grad, accumulate=True)


def check_pair_grads(head, img, cap, lens, img_idx, cap_idx, what, seed=7, dtypes=(torch.float64, torch.float32)):
    """Pair scores and gradients against the float64 reference over all pairs (the same
    counter-based dropout masks): scores gathered, gradients of the listed pairs' weighted sum."""
    n_img, n_cap = img.shape[0], cap.shape[0]
    grad = torch.randn(len(img_idx), dtype=torch.float64)
    ref_out, ref = reference_grads(head, img, cap, lens, listed_grad_matrix(img_idx, cap_idx, grad, n_img, n_cap),
                                   seed)
    names = ["img", "cap"] + [name for name, _ in head.named_parameters()]
    for dtype in dtypes:
        out, got = pair_kernel(head, img, cap, lens, img_idx, cap_idx, grad, seed, dtype)
        assert out.shape == (len(img_idx),) and out.dtype == dtype
        assert_close_to_reference(out, ref_out[img_idx, cap_idx], dtype=dtype, what=f"{what} {dtype} scores")
        for name, g, r in zip(names, got, ref):
            assert g.dtype == dtype and g.shape == r.shape, f"{what}: d {name} is {g.dtype} {tuple(g.shape)}"
            assert_close_to_reference(g, r, dtype=dtype, what=f"{what} {dtype} d {name}")
    return got


# repeats (2, 2) twice, every image and caption, in no order
PAIR_IMG = torch.tensor([0, 3, 2, 2, 1, 3, 0, 1, 2])
PAIR_CAP = torch.tensor([5, 0, 2, 2, 1, 3, 4, 2, 0])


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_pair_list_several_tiles_and_context_groups(direction):
    # ~300 pairs of 7..16 words / 30 regions: several tiles, each spanning several context
    # owners (i2t: captions of different lengths, so the attention buffers' widths differ)
    torch.manual_seed(3)
    head = make_head("coop_rcar", 2, direction, embed_dim=9, sim_dim=10).train()
    img, cap, lens = make_inputs(12, 40, 30, 9, 16, lens=torch.randint(7, 17, (40,)))
    img_idx, cap_idx = torch.randint(0, 12, (300,)), torch.randint(0, 40, (300,))
    check_pair_grads(head, img, cap, lens, img_idx, cap_idx, f"pairs {direction} tiles", dtypes=(torch.float64,))


def test_pair_list_repeats_add_their_gradients():
    head = make_head("coop_rcar", 2, "i2t", embed_dim=12, sim_dim=8).train()
    img, cap, lens = make_inputs(3, 4, 5, 12, 6)
    once, thrice = (torch.tensor([2]), torch.tensor([1])), (torch.tensor([2, 2, 2]), torch.tensor([1, 1, 1]))
    g3 = torch.tensor([0.5, -2.0, 0.25], dtype=torch.float64)
    out1, grads1 = pair_kernel(head, img, cap, lens, *once, g3.sum().reshape(1), 9, torch.float64)
    out3, grads3 = pair_kernel(head, img, cap, lens, *thrice, g3, 9, torch.float64)
    assert_bit_equal(out3, out1.expand(3), what="a repeated pair's scores")
    for a, b in zip(grads3, grads1):
        assert_close_to_reference(a, b, dtype=torch.float64, what="three repeats vs their summed gradient")


def test_pair_list_empty():
    from rcar_fast.ops import rcar as rcar_ops

    native = dispatch.native_module()
    head = make_head("coop_rcar", 2, "t2i", embed_dim=8, sim_dim=6)
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    settings = rcar_ops.native_settings("t2i", "coop_rcar", 2, 10.0)
    none = torch.zeros(0, dtype=torch.int64)
    flat = rcar_ops.flat_weights(head)
    assert native.rcar_pairs_forward_cpu(img, cap, lens, none, none, settings, flat).shape == (0,)
    grads = native.rcar_pairs_backward_cpu(torch.zeros(0, dtype=torch.float64), img, cap, lens, none, none,
                                           settings, flat)
    assert [g.shape for g in grads] == [img.shape, cap.shape] + [w.shape for w in flat]
    assert all(torch.all(g == 0) for g in grads)


def test_pair_list_rejects_bad_indices():
    from rcar_fast.ops import rcar as rcar_ops

    native = dispatch.native_module()
    head = make_head("coop_rcar", 2, "t2i", embed_dim=8, sim_dim=6)
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    settings = rcar_ops.native_settings("t2i", "coop_rcar", 2, 10.0)
    flat = rcar_ops.flat_weights(head)
    with pytest.raises(RuntimeError, match="cap_idx must lie in \\[0, 3\\)"):
        native.rcar_pairs_forward_cpu(img, cap, lens, torch.tensor([0, 1]), torch.tensor([0, 3]), settings, flat)
    with pytest.raises(RuntimeError, match="img_idx must be an int64 CPU tensor of shape \\(2,\\)"):
        native.rcar_pairs_forward_cpu(img, cap, lens, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1]),
                                      settings, flat)
    with pytest.raises(RuntimeError, match="grad must be \\(2,\\)"):
        native.rcar_pairs_backward_cpu(torch.zeros(3, dtype=torch.float64), img, cap, lens, torch.tensor([0, 1]),
                                       torch.tensor([0, 1]), settings, flat)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_pair_list_dropout_masks_are_the_all_pairs_kernels(direction):
    # Training mode, the same seed: each listed pair's score is the all-pairs kernel's score of
    # that (image, caption) (masks keyed by i * n_cap + j), and another seed changes them.
    from rcar_fast.ops import rcar as rcar_ops

    native = dispatch.native_module()
    head = make_head("coop_rcar", 3, direction, embed_dim=16, sim_dim=8)
    img, cap, lens = make_inputs(4, 6, 7, 16, 8)
    flat = rcar_ops.flat_weights(head)
    img_idx, cap_idx = torch.tensor([3, 0, 2, 3, 1]), torch.tensor([5, 4, 0, 5, 2])
    outs = {}
    for seed in (21, 22):
        settings = rcar_ops.native_settings(direction, "coop_rcar", 3, head.smooth, True, seed)
        all_pairs = native.rcar_forward_cpu(img, cap, lens, settings, flat)[img_idx, cap_idx]
        outs[seed] = native.rcar_pairs_forward_cpu(img, cap, lens, img_idx, cap_idx, settings, flat)
        assert_close_to_reference(outs[seed], all_pairs, dtype=torch.float64, what=f"seed {seed}")
    assert (outs[21] - outs[22]).abs().max() > MUST_DIFFER, "the seed must change the masks"


def test_pair_list_is_deterministic_and_ignores_poison():
    from rcar_fast.ops import rcar as rcar_ops

    native = dispatch.native_module()
    head = make_head("coop_rcar", 2, "t2i", embed_dim=16, sim_dim=8).float()
    img, cap, lens = make_inputs(6, 9, 6, 16, 8, dtype=torch.float32)
    img_idx, cap_idx = torch.randint(0, 6, (70,)), torch.randint(0, 9, (70,))
    settings = rcar_ops.native_settings("t2i", "coop_rcar", 2, 10.0, True, 3)
    flat = rcar_ops.flat_weights(head)
    grad = torch.randn(70)
    first = [native.rcar_pairs_forward_cpu(img, cap, lens, img_idx, cap_idx, settings, flat),
             *native.rcar_pairs_backward_cpu(grad, img, cap, lens, img_idx, cap_idx, settings, flat)]
    previous = native.set_cpu_poison_buffers(True)
    try:
        cap_poisoned = pad_captions(cap, lens, float("nan"))
        again = [native.rcar_pairs_forward_cpu(img, cap_poisoned, lens, img_idx, cap_idx, settings, flat),
                 *native.rcar_pairs_backward_cpu(grad, img, cap_poisoned, lens, img_idx, cap_idx, settings, flat)]
    finally:
        native.set_cpu_poison_buffers(previous)
    for a, b in zip(first, again):
        assert_bit_equal(a, b, what="rerun with poisoned buffers and padding")
    assert all(torch.isfinite(g).all() for g in first)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_backward_baseline_simd_copy(direction, baseline_simd):
    # the backward's element loops (BackwardTile::vectorised) in their baseline copy, training
    # mode (dropout masks on), all pairs and a pair list
    head = make_head("coop_rcar", 2, direction, embed_dim=20, sim_dim=12).train()
    img, cap, lens = make_inputs(4, 6, 11, 20, 9)
    check_grads(head, img, cap, lens, f"baseline {direction}")
    check_pair_grads(head, img, cap, lens, PAIR_IMG, PAIR_CAP, f"baseline pairs {direction}",
                     dtypes=(torch.float32,))


# ---------------------------------------------------------------------------------------------
# The pair scores given (rcar_pairs_cpu_given): the sparse loss reuses its selection's scores
# ---------------------------------------------------------------------------------------------

def counting_pair_forwards(monkeypatch):
    """Counts the C++ pair-list forward calls (the op's forward) from now on."""
    from rcar_fast.ops import rcar as rcar_ops

    real = rcar_ops.native()
    calls = []

    class Counting:
        def __getattr__(self, name):
            if name == "rcar_pairs_forward_cpu":
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(rcar_ops, "native", lambda: Counting())
    return calls


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_sparse_loss_takes_the_selection_scores_and_the_same_gradients(direction, monkeypatch):
    # Eval mode: hardest_negative_loss scores its pairs with the selection pass' values and runs
    # only the pair backward. Against the same loss scoring the pairs again (score_fn = the same
    # selection, which makes it call the pair forward): the same loss within rounding and bit
    # for bit the same gradients; against the float64 full loss on the reference: close.
    from rcar_fast.losses import full_hardest_negative_loss, hardest_negative_loss

    head = make_head("coop_rcar", 2, direction, embed_dim=20, sim_dim=12)
    img, cap, lens = make_inputs(6, 6, 11, 20, 9)
    params = list(head.parameters())
    with torch.no_grad():
        selection = head(img, cap, lens, backend="cpu")
    calls = counting_pair_forwards(monkeypatch)
    runs = {}
    for name, score_fn in (("given", None), ("rescored", lambda *_: selection)):
        leaves = [img.clone().requires_grad_(), cap.clone().requires_grad_()]
        before = len(calls)
        loss = hardest_negative_loss(*leaves, lens, model=head, backend="cpu", pair_backend="cpu",
                                     score_fn=score_fn)
        runs[name] = (loss.detach(), torch.autograd.grad(loss, leaves + params), len(calls) - before)
    assert runs["given"][2] == 0, "the given scores must not run the pair forward"
    assert runs["rescored"][2] == 1
    assert_close_to_reference(runs["given"][0], runs["rescored"][0], dtype=torch.float64, what="loss")
    for k, (a, b) in enumerate(zip(runs["given"][1], runs["rescored"][1])):
        assert_bit_equal(a, b, what=f"gradient {k}: given scores vs rescored pairs")
    ref_leaves = [img.clone().requires_grad_(), cap.clone().requires_grad_()]
    want = full_hardest_negative_loss(*ref_leaves, lens, model=head, backend="reference")
    want_grads = torch.autograd.grad(want, ref_leaves + params, allow_unused=True)
    assert_close_to_reference(runs["given"][0], want.detach(), dtype=torch.float64, what="loss vs reference")
    for k, (g, w) in enumerate(zip(runs["given"][1], want_grads)):
        assert_close_to_reference(g, torch.zeros_like(g) if w is None else w, dtype=torch.float64,
                                  what=f"gradient {k} vs reference")


def test_sparse_loss_with_dropout_runs_the_pair_forward(monkeypatch):
    # Dropout active: the eval-mode selection's scores are not the training forward's sample,
    # so the pair forward runs (with its masks) and given_values declines.
    from rcar_fast.losses import hardest_negative_loss
    from rcar_fast.ops import rcar as rcar_ops

    head = make_head("coop_rcar", 2, "t2i", embed_dim=16, sim_dim=8).train()
    img, cap, lens = make_inputs(5, 5, 7, 16, 8)
    ii = jj = torch.arange(5)
    assert rcar_ops.RcarPairsCpu.given_values(head, img, cap, lens, ii, jj, torch.zeros(5)) is None
    calls = counting_pair_forwards(monkeypatch)
    loss = hardest_negative_loss(img.clone().requires_grad_(), cap, lens, model=head, backend="cpu",
                                 pair_backend="cpu")
    assert len(calls) == 1 and torch.isfinite(loss)


def test_given_scores_op_gradcheck_and_opcheck():
    # rcar_pairs_cpu_given in float64: gradcheck (its values recomputed at each probe, as the
    # selection pass would) and torch.library.opcheck (schema, fake, autograd registration)
    from rcar_fast.ops import rcar as rcar_ops

    head = make_head("coop_rcar", 2, "i2t", embed_dim=5, sim_dim=4)
    img, cap, lens = make_inputs(2, 3, 3, 5, 3, pad=0.0)
    params = [p.detach().clone().requires_grad_() for p in head.parameters()]
    config = rcar_ops.op_config(head)
    seed = torch.zeros((), dtype=torch.int64)
    img_idx, cap_idx = torch.tensor([1, 0, 1, 1]), torch.tensor([2, 0, 2, 1])

    def fn(img, cap, *weights):
        with torch.no_grad():
            values = rcar_ops.rcar_pairs_cpu_op(img, cap, lens, img_idx, cap_idx, list(weights), seed, *config)
        return rcar_ops.rcar_pairs_cpu_given_op(values, img, cap, lens, img_idx, cap_idx, list(weights), seed,
                                                *config)

    inputs = (img.requires_grad_(), cap.requires_grad_(), *params)
    assert torch.autograd.gradcheck(fn, inputs)
    with torch.no_grad():
        values = rcar_ops.rcar_pairs_cpu_op(img, cap, lens, img_idx, cap_idx, params, seed, *config)
    torch.library.opcheck(rcar_ops.rcar_pairs_cpu_given_op,
                          (values, img, cap, lens, img_idx, cap_idx, params, seed, *config))
