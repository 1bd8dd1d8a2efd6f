"""The RCAR head on the C++ CPU backend (csrc/cpu/rcar.cpp) against the float64 reference:
every regulator and step count, both directions, ragged lengths with NaN padding, sizes off the
tile and vector widths, float32 and float64; eval-mode and no-backward guards."""
import pytest
import torch

from rcar_fast import dispatch
from rcar_fast.modules import RCARSimilarity
from tests.inputs import make_inputs
from tests.tolerances import assert_bit_equal, assert_close_to_reference

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


def test_training_mode_with_dropout_is_rejected():
    head = make_head("coop_rcar", 2, "t2i", embed_dim=8, sim_dim=6).train()
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    with pytest.raises(dispatch.BackendUnavailable, match="eval mode"):
        head(img, cap, lens, backend="cpu")


def test_training_mode_without_dropout_runs():
    # only_rcr has no RAR module, hence no dropout: training mode changes nothing
    head = make_head("only_rcr", 2, "t2i", embed_dim=8, sim_dim=6).train()
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    with torch.no_grad():
        assert_close_to_reference(head(img, cap, lens, backend="cpu"), head.forward_loop(img, cap, lens),
                                  dtype=torch.float64)


def test_backward_raises_a_clear_error():
    head = make_head("coop_rcar", 2, "t2i", embed_dim=8, sim_dim=6)
    img, cap, lens = make_inputs(2, 3, 5, 8, 4)
    out = head(img, cap, lens, backend="cpu")  # parameters require grad
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert not head(img, cap, lens, backend="cpu").requires_grad


def test_rejects_low_precision_with_reason():
    reason = dispatch.rejection("rcar", "cpu", torch.device("cpu"), torch.bfloat16)
    assert reason is not None and "float32 or float64" in reason


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_baseline_simd_copy(direction):
    native = dispatch.native_module()
    assert native.set_cpu_simd_path("baseline") == "baseline"
    try:
        for regulator, steps in (("coop_rcar", 2), ("only_rcr", 1)):
            head = make_head(regulator, steps, direction, embed_dim=20, sim_dim=12)
            img, cap, lens = make_inputs(4, 6, 11, 20, 9)
            check_against_reference(head, img, cap, lens, f"baseline {direction} {regulator}")
    finally:
        native.set_cpu_simd_path("auto")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_kernel_keeps_a_temperature_beyond_float32_range_finite(direction):
    # The public limit keeps smooth far below float32's range (rcar_fast.validate.SMOOTH_LIMITS);
    # the kernel itself must not turn a larger one into inf (inf * 0 = NaN): its hard attention
    # equals the float64 reference's at the same temperature.
    from rcar_fast.ops.rcar_cpu import flat_weights, native_settings

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
