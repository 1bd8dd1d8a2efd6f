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


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", BACKWARD_MODES)
def test_backward_matches_reference(direction, regulator, steps, training):
    # d = 20, s = 12, R = 11, L <= 9, ragged with NaN padding; fresh inputs per case
    head = make_head(regulator, steps, direction, embed_dim=20, sim_dim=12).train(training)
    img, cap, lens = make_inputs(4, 6, 11, 20, 9)
    grads = check_grads(head, img, cap, lens, f"{direction} {regulator} {steps} training={training}")
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


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2)])
def test_gradcheck_float64(direction, regulator, steps):
    from rcar_fast.ops import rcar as rcar_ops

    head = make_head(regulator, steps, direction, embed_dim=5, sim_dim=4).train()
    img, cap, lens = make_inputs(2, 3, 3, 5, 3, pad=0.0)
    params = [p.detach().clone().requires_grad_() for p in head.parameters()]
    config = rcar_ops.op_config(head)
    seed = torch.tensor(11, dtype=torch.int64)

    def fn(img, cap, *weights):
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
