"""Fused RCAR head on the Triton backend (kernels/rcar.py, rcar_fast/ops/rcar.py).

On CPU the kernel runs in triton's interpreter on small shapes (d=32, sim_dim=16, R=5, Lmax=7,
ragged lengths including 1, NaN in the caption padding); on a GPU the realistic shape
(d=1024, sim_dim=256, R=36) is checked in fp32 and bf16 (2x rule). Every comparison is against
the float64 reference (RCARHead.forward_loop, the public code's order of operations).
"""
import copy

import pytest
import torch

from rcar_fast import dispatch
from rcar_fast.contract import REGULATORS
from rcar_fast.modules import RCARSimilarity
from tests.conftest import requires_gpu
from tests.inputs import make_inputs, pad_captions
from tests.tolerances import F32_BLOCKED, assert_bit_equal, assert_close, assert_close_to_reference
from tests.conftest import requires_interpreter

# (regulator, steps) pairs: every mode at 0..3 steps where the mode allows it (lean grid:
# each step count of each mode appears in at least one direction, the published ones in both).
FORWARD_GRID = [
    ("only_rar", 0, "t2i"), ("only_rar", 1, "i2t"), ("only_rar", 2, "t2i"), ("only_rar", 3, "i2t"),
    ("only_rcr", 0, "t2i"), ("only_rcr", 0, "i2t"), ("only_rcr", 1, "t2i"), ("only_rcr", 2, "i2t"),
    ("only_rcr", 3, "t2i"),
    ("coop_rcar", 1, "i2t"), ("coop_rcar", 2, "t2i"), ("coop_rcar", 2, "i2t"),
    ("coop_rcar", 3, "t2i"),
]


def _inputs(n_img=2, n_cap=3, n_regions=5, d=32, lens=(7, 1, 4), dtype=torch.float32, device="cpu", **kw):
    """This file's default batch (make_inputs, NaN padding, float32); lens stay on the CPU."""
    return make_inputs(n_img, n_cap, n_regions, d, lens=lens, dtype=dtype, device=device, lens_device="cpu", **kw)


def make_head(regulator, steps, direction, d=32, sim_dim=16, device="cpu"):
    head = RCARSimilarity(embed_dim=d, sim_dim=sim_dim, regulator=regulator, steps=steps,
                          direction=direction, smooth=10.0 if direction == "t2i" else 3.0)
    # The official init zeroes every bias; random biases make the test see them.
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return head.eval().to(device)


def reference64(head, img, cap, lens):
    head64 = copy.deepcopy(head).double()
    return head64.forward_loop(img.double(), cap.double(), lens)


def triton_scores(head, img, cap, lens):
    with torch.no_grad():
        return head(img, cap, lens, backend="triton")


# ---------------------------------------------------------------------------------------------
# Forward (interpreter)
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("regulator,steps,direction", FORWARD_GRID)
def test_forward_matches_float64_reference(regulator, steps, direction):
    img, cap, lens = _inputs()
    head = make_head(regulator, steps, direction)
    out = triton_scores(head, img, cap, lens)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, reference64(head, img, cap, lens), dtype=torch.float32,
                              what=f"{regulator} steps={steps} {direction}")


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_forward_many_tiles_partial_chunks_padded_sim_dim(direction):
    # d=40: a partial second d chunk; sim_dim=24: s, 2s and s/2 all padded to powers of two;
    # 5 x 9 pairs: several tiles per context set and several work items per program.
    img, cap, lens = _inputs(n_img=5, n_cap=9, n_regions=7, d=40, lens=(3, 7, 1, 5, 2, 7, 4, 1, 6))
    head = make_head("coop_rcar", 2, direction, d=40, sim_dim=24)
    out = triton_scores(head, img, cap, lens)
    assert_close_to_reference(out, reference64(head, img, cap, lens), dtype=torch.float32)


@requires_interpreter
@pytest.mark.parametrize("regulator", REGULATORS)
def test_forward_alignment_in_two_column_halves(regulator):
    # sim_dim=32: the alignment GEMM runs as two passes over d, one per half of its columns,
    # the first half waiting in the scratch (kernels/rcar.py, S_SPLIT) -- the GPU's path.
    from rcar_fast.kernels import rcar

    assert rcar.alignment_split(32) == 2
    assert rcar.alignment_split(16) == 1
    img, cap, lens = _inputs(n_img=3, n_cap=4, lens=(7, 1, 4, 6))
    head = make_head(regulator, 2, "t2i", sim_dim=32)
    out = triton_scores(head, img, cap, lens)
    assert_close_to_reference(out, reference64(head, img, cap, lens), dtype=torch.float32,
                              what=f"{regulator} sim_dim=32")


@requires_interpreter
@pytest.mark.parametrize("sim_dim", [16, 32])  # 32: the alignment in two column halves
def test_forward_float16_within_twice_the_reference_error(sim_dim):
    img, cap, lens = _inputs(dtype=torch.float16)
    head = make_head("coop_rcar", 2, "t2i", sim_dim=sim_dim)
    ref64 = reference64(head, img, cap, lens)
    ref16 = copy.deepcopy(head).half().forward_loop(img, cap, lens)
    out = triton_scores(head.half(), img, cap, lens)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, ref64, ref_lowp=ref16, dtype=torch.float16)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padding_values_never_read(direction):
    head = make_head("coop_rcar", 2, direction)
    torch.manual_seed(3)
    # Lmax = 20 beyond the longest caption (7) and the context block (16): padding columns too.
    img, cap_nan, lens = _inputs(max_len=20, pad=float("nan"))
    cap_big = pad_captions(cap_nan, lens, 1e30)
    out_nan = triton_scores(head, img, cap_nan, lens)
    out_big = triton_scores(head, img, cap_big, lens)
    assert torch.isfinite(out_nan).all()
    assert_bit_equal(out_nan, out_big, what="NaN vs 1e30 padding")
    assert_close_to_reference(out_nan, reference64(head, img, cap_nan, lens), dtype=torch.float32)


@requires_interpreter
def test_kernel_writes_every_entry_of_a_poisoned_buffer():
    from rcar_fast.kernels import rcar as kernels
    from rcar_fast.ops.rcar import pack_weights

    img, cap, lens = _inputs(n_img=3, n_cap=4, lens=(2, 7, 1, 5))
    for direction in ("t2i", "i2t"):
        head = make_head("only_rcr", 1, direction)
        out = torch.full((3, 4), float("nan"))
        kernels.rcar_forward(img, cap, lens.tolist(), pack_weights(head, torch.float32, True),
                             regulator="only_rcr", steps=1, direction=direction,
                             smooth=head.smooth, out=out)
        assert torch.isfinite(out).all(), direction
        assert_close_to_reference(out, reference64(head, img, cap, lens), dtype=torch.float32)


# Tiling edge cases. In the interpreter a tile has pow2(longest query set) rows (at least 16)
# and at most 16 segments; t2i packs captions (5 words: 3 per 16-row tile), i2t images (R=5:
# 3 per tile). Per case: query sets, context sets, segments of each tile (largest first).
TILING_CASES = {
    # one image, one caption: one tile holding one segment
    "single_pair": (1, 1, [1]),
    # fewer query sets than a tile holds (2 < 3): one partly filled tile
    "fewer_sets_than_a_tile": (2, 2, [2]),
    # 7 query sets, 3 per tile: tiles of 3, 3 and 1 (a count that is not a multiple)
    "partial_last_tile": (7, 7, [3, 3, 1]),
}


def _segments_per_tile(direction, n_img, n_regions, lens):
    """How rcar_forward tiles the query sets of this batch: segments per tile, largest first."""
    from rcar_fast.kernels import rcar

    cfg = rcar.tile_config(direction, n_regions, lens, interpreter=True)
    seg_lengths = lens if direction == "t2i" else [n_regions] * n_img
    _, _, tile_items = rcar.pack_segments(seg_lengths, [0] * len(seg_lengths), cfg["ROWS"],
                                          cfg["BSEG"])
    return sorted(((tile_items >= 0).sum(dim=1)).tolist(), reverse=True)


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("case", list(TILING_CASES))
def test_forward_tiling_edge_cases(case, direction):
    n_sets, n_other, expected_tiles = TILING_CASES[case]
    # the query sets are captions in t2i, images in i2t
    n_cap, n_img = (n_sets, n_other) if direction == "t2i" else (n_other, n_sets)
    lens = [5] * n_cap
    assert _segments_per_tile(direction, n_img, 5, lens) == expected_tiles
    img, cap, lens = _inputs(n_img=n_img, n_cap=n_cap, lens=lens)
    head = make_head("coop_rcar", 2, direction)
    out = triton_scores(head, img, cap, lens)
    assert out.shape == (n_img, n_cap)
    assert_close_to_reference(out, reference64(head, img, cap, lens), dtype=torch.float32,
                              what=f"{case} {direction}")


@pytest.mark.parametrize("op_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_gpu_tile_gives_a_launch_config_and_a_bad_index_is_refused(op_dtype):
    from rcar_fast.kernels import rcar

    dims = rcar.padded_dims(1024, 256, interpreter=False)
    tiles = rcar.gpu_tiles(op_dtype)
    for i, tile in enumerate(tiles):
        cfg = rcar.launch_config("t2i", 36, [12, 5], "coop_rcar", 2, dims, op_dtype,
                                 interpreter=False, tile=i)
        assert cfg["DC"] == tile["DC"] and dims["DP"] % cfg["DC"] == 0
        assert cfg["num_warps"] == tile["num_warps"] and cfg["ROWS"] == rcar.GPU_ROWS
    for bad in (-1, len(tiles)):
        with pytest.raises(ValueError, match="tile must be an index"):
            rcar.launch_config("t2i", 36, [12, 5], "coop_rcar", 2, dims, op_dtype,
                               interpreter=False, tile=bad)


def test_pack_segments_keeps_items_whole_and_within_limits():
    from rcar_fast.kernels.rcar import pack_segments

    lengths = [5, 1, 16, 3, 3, 9, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    bases = [100 * b for b in range(len(lengths))]
    tile_rows, tile_seg, tile_items = pack_segments(lengths, bases, rows=16, max_segs=4)
    seen = []
    for t in range(tile_rows.shape[0]):
        items = [int(b) for b in tile_items[t] if b >= 0]
        assert 1 <= len(items) <= 4
        assert sum(lengths[b] for b in items) <= 16
        for slot, b in enumerate(items):
            rows = tile_rows[t][tile_seg[t] == slot].tolist()
            assert rows == list(range(bases[b], bases[b] + lengths[b]))
        assert bool(((tile_rows[t] >= 0) == (tile_seg[t] >= 0)).all())
        seen += items
    assert sorted(seen) == list(range(len(lengths)))
    with pytest.raises(ValueError, match="does not fit"):
        pack_segments([17], [0], rows=16, max_segs=4)


# ---------------------------------------------------------------------------------------------
# Gradients (recomputing backward)
# ---------------------------------------------------------------------------------------------

def gradients(head, img, cap, lens, weights, backend):
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    if backend == "reference64":
        out = head.forward_loop(img, cap, lens)
    else:
        out = head(img, cap, lens, backend=backend)
    (out * weights.to(out.dtype)).sum().backward()
    return img.grad, cap.grad, {n: p.grad for n, p in head.named_parameters()}


@pytest.mark.parametrize("regulator,steps,direction",
                         [("coop_rcar", 2, "t2i"), ("only_rcr", 1, "i2t"), ("only_rar", 1, "i2t")])
@requires_interpreter
def test_gradients_match_float64_reference(regulator, steps, direction):
    img, cap, lens = _inputs()
    head = make_head(regulator, steps, direction)
    weights = torch.randn(img.shape[0], cap.shape[0])
    head64 = copy.deepcopy(head).double()
    g_img64, g_cap64, g_par64 = gradients(head64, img.double(), cap.double(), lens, weights,
                                          "reference64")
    g_img, g_cap, g_par = gradients(head, img, cap, lens, weights, "triton")
    assert_close_to_reference(g_img, g_img64, dtype=torch.float32, what="grad img")
    # The reference's caption gradient is 0 at padding (sliced away); NaN there would leak.
    g_cap64 = torch.nan_to_num(g_cap64, nan=0.0)
    assert_close_to_reference(g_cap, g_cap64, dtype=torch.float32, what="grad cap")
    real = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    assert bool((g_cap[~real] == 0).all())
    for name, g64 in g_par64.items():
        if g64 is None:
            assert g_par[name] is None, f"{name} should get no gradient"
            continue
        assert_close_to_reference(g_par[name], g64, dtype=torch.float32, what=f"grad {name}")


@requires_interpreter
def test_backward_in_several_blocks_matches_one_block(monkeypatch):
    from rcar_fast.ops import rcar as rcar_ops

    img, cap, lens = _inputs(n_img=3, n_cap=3)
    head = make_head("coop_rcar", 2, "i2t")
    weights = torch.randn(3, 3)
    whole = gradients(head, img, cap, lens, weights, "triton")
    blocks = []
    original = rcar_ops.backward_blocks
    monkeypatch.setattr(rcar_ops, "backward_blocks",
                        lambda *a, **k: blocks.append(original(*a, budget=1, **k)) or blocks[-1])
    blocked = gradients(head, img, cap, lens, weights, "triton")
    assert blocks == [(1, 1)]
    assert_close(blocked[0], whole[0], F32_BLOCKED)
    assert_close(blocked[1], whole[1], F32_BLOCKED)
    for name, g in whole[2].items():
        assert_close(blocked[2][name], g, F32_BLOCKED)


# ---------------------------------------------------------------------------------------------
# Training mode, dispatch
# ---------------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("regulator,steps", [("coop_rcar", 2), ("only_rar", 1)])
def test_training_mode_with_rar_dropout_is_refused_before_compute(regulator, steps):
    img, cap, lens = _inputs()
    head = make_head(regulator, steps, "t2i").train()
    with pytest.raises(RuntimeError, match="dropout.*eval\\(\\)"):
        head(img, cap, lens, backend="triton")
    assert triton_scores(head.eval(), img, cap, lens).shape == (2, 3)


@requires_interpreter
def test_training_mode_without_dropout_runs():
    # only_rcr has no dropout: training mode is the same function as eval mode.
    img, cap, lens = _inputs()
    head = make_head("only_rcr", 1, "t2i").train()
    out = triton_scores(head, img, cap, lens)
    assert_close_to_reference(out, reference64(head, img, cap, lens), dtype=torch.float32)


@requires_interpreter
def test_dispatch_reasons():
    cpu = torch.device("cpu")
    assert "float64" in dispatch.rejection("rcar", "triton", cpu, torch.float64)
    assert "bfloat16" in dispatch.rejection("rcar", "triton", cpu, torch.bfloat16)
    assert dispatch.rejection("rcar", "triton", cpu, torch.float32) is None
    assert dispatch.choose("rcar", "triton", cpu, torch.float32).backend == "triton"


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes
# ---------------------------------------------------------------------------------------------

GPU_GRID = [("coop_rcar", 2, "t2i"), ("coop_rcar", 2, "i2t"), ("only_rcr", 2, "t2i"),
            ("only_rar", 2, "i2t"), ("only_rcr", 0, "i2t")]


def gpu_inputs(dtype, n_img=6, n_cap=11):
    torch.manual_seed(1)
    lens = torch.randint(1, 25, (n_cap,))
    lens[0] = 1
    # unit_norm: the encoders l2-normalise features
    return _inputs(n_img=n_img, n_cap=n_cap, n_regions=36, d=1024, lens=lens.tolist(), dtype=dtype,
                   device="cuda", unit_norm=True)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("regulator,steps,direction", GPU_GRID)
def test_gpu_forward_realistic_shape(regulator, steps, direction, dtype):
    img, cap, lens = gpu_inputs(dtype)
    head = make_head(regulator, steps, direction, d=1024, sim_dim=256, device="cuda")
    ref64 = reference64(head, img, cap, lens)
    ref_lowp = None
    if dtype != torch.float32:
        ref_lowp = copy.deepcopy(head).to(dtype).forward_loop(img, cap, lens)
    out = triton_scores(head.to(dtype), img, cap, lens)
    assert_close_to_reference(out, ref64, ref_lowp=ref_lowp, dtype=dtype,
                              what=f"{regulator} {steps} {direction} {dtype}")


@requires_gpu
def test_gpu_gradients_float32():
    img, cap, lens = gpu_inputs(torch.float32, n_img=3, n_cap=4)
    head = make_head("coop_rcar", 2, "t2i", d=1024, sim_dim=256, device="cuda")
    weights = torch.randn(3, 4, device="cuda")
    head64 = copy.deepcopy(head).double()
    g64 = gradients(head64, img.double(), cap.double(), lens, weights, "reference64")
    g = gradients(head, img, cap, lens, weights, "triton")
    assert_close_to_reference(g[0], g64[0], dtype=torch.float32, what="grad img")
    assert_close_to_reference(g[1], torch.nan_to_num(g64[1], nan=0.0), dtype=torch.float32,
                              what="grad cap")
    for name, g_ref in g64[2].items():
        assert_close_to_reference(g[2][name], g_ref, dtype=torch.float32, what=f"grad {name}")
