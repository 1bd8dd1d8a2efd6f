"""Fused RCAR head on the Triton backend (kernels/rcar.py, kernels/rcar_backward.py,
rcar_fast/ops/rcar.py): the forward, and the fused backward with RAR's dropout.

On CPU the kernel runs in triton's interpreter on small shapes (d=32, sim_dim=16, R=5, Lmax=7,
ragged lengths including 1, NaN in the caption padding); on a GPU the realistic shape
(d=1024, sim_dim=256, R=36) is checked in fp32 and bf16 (2x rule). Every comparison is against
the float64 reference (RCARHead.forward_loop, the public code's order of operations).
"""
import copy

import pytest
import torch

from rcar_fast import dispatch, dropout
from rcar_fast.contract import REGULATORS
from rcar_fast.modules import RCARSimilarity
from rcar_fast.ops import rcar as rcar_ops
from tests.conftest import requires_gpu
from tests.inputs import make_inputs, pad_captions
from tests.tolerances import assert_bit_equal, assert_close_to_reference
from tests.conftest import requires_interpreter, sweep

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
    # sim_dim=32: the alignment GEMM runs as two passes over d, one per 16-column group (the
    # interpreter tile's SW), each group waiting in the scratch for the row norm
    # (kernels/rcar.py, S_SPLIT) -- the GPU's path (4 groups of 64 at sim_dim 256).
    from rcar_fast.kernels import rcar

    assert rcar.alignment_split(32, rcar.INTERPRETER_TILE["SW"]) == 2
    assert rcar.alignment_split(16, rcar.INTERPRETER_TILE["SW"]) == 1
    assert rcar.alignment_split(256, 64) == 4 and rcar.alignment_split(64, 64) == 1
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


# The GPU's work item of 128 query rows (kernels/rcar.py GPU_ROWS["low"]), run in the
# interpreter: t2i packs ragged captions (1..23 words, several per tile, up to the 16-segment
# cap, a caption never split over two tiles), i2t 3 images of 36 regions per tile (108 of 128
# rows, a last tile of 1 image). sim_dim 32: the alignment in 2 column groups.
WIDE_TILE_CASES = [("coop_rcar", "t2i", torch.float32), ("coop_rcar", "i2t", torch.float32),
                   ("only_rcr", "t2i", torch.float32), ("only_rar", "i2t", torch.float32),
                   ("coop_rcar", "t2i", torch.float16)]


@requires_interpreter
@pytest.mark.parametrize("regulator,direction,dtype", WIDE_TILE_CASES,
                         ids=[f"{r}-{d}-{str(t)[6:]}" for r, d, t in WIDE_TILE_CASES])
def test_forward_128_row_tiles_of_ragged_query_sets(regulator, direction, dtype, monkeypatch):
    from rcar_fast.kernels import rcar

    monkeypatch.setattr(rcar, "INTERPRETER_ROWS", 128)
    torch.manual_seed(11)
    if direction == "t2i":
        lens = torch.randint(1, 24, (30,))
        lens[:18] = torch.randint(1, 4, (18,))   # short ones: some tile hits 16 segments
        n_img, n_cap, n_regions = 2, 30, 7
    else:
        lens = torch.randint(1, 24, (2,))
        n_img, n_cap, n_regions = 7, 2, 36
    lens = lens.tolist()
    cfg = rcar.tile_config(direction, n_regions, lens, interpreter=True)
    assert cfg["ROWS"] == 128
    per_tile = _segments_per_tile(direction, n_img, n_regions, lens)
    if direction == "t2i":
        assert len(per_tile) >= 2 and per_tile[0] == cfg["BSEG"] and min(per_tile) >= 2, per_tile
    else:
        assert per_tile == [3, 3, 1]
    img, cap, lens = _inputs(n_img=n_img, n_cap=n_cap, n_regions=n_regions, lens=lens,
                             dtype=dtype)
    head = make_head(regulator, 2, direction, sim_dim=32)
    ref64 = reference64(head, img, cap, lens)
    if dtype == torch.float32:
        out = triton_scores(head, img, cap, lens)
        assert_close_to_reference(out, ref64, dtype=dtype, what=f"{regulator} {direction}")
    else:
        ref_lowp = copy.deepcopy(head).to(dtype).forward_loop(img, cap, lens)
        out = triton_scores(head.to(dtype), img, cap, lens)
        assert_close_to_reference(out, ref64, ref_lowp=ref_lowp, dtype=dtype,
                                  what=f"{regulator} {direction} {dtype}")


@pytest.mark.parametrize("op_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_gpu_tile_gives_a_launch_config_and_a_bad_index_is_refused(op_dtype):
    from rcar_fast.kernels import rcar

    dims = rcar.padded_dims(1024, 256, interpreter=False)
    tiles = rcar.gpu_tiles(op_dtype)
    for i, tile in enumerate(tiles):
        cfg = rcar.launch_config("t2i", 36, [12, 5], "coop_rcar", 2, dims, op_dtype,
                                 interpreter=False, tile=i)
        assert cfg["DC"] == tile["DC"] and dims["DP"] % cfg["DC"] == 0
        assert cfg["num_warps"] == tile["num_warps"] and cfg["ROWS"] == tile["ROWS"]
        assert cfg["S_SPLIT"] * min(tile["SW"], dims["SP"]) == dims["SP"]
    kind = "fp32" if op_dtype == torch.float32 else "low"
    assert rcar.GPU_ROWS[kind] == tiles[0]["ROWS"]   # a launch that names no tile: the default
    long_caption = rcar.launch_config("t2i", 36, [12, 200], "coop_rcar", 2, dims, op_dtype,
                                      interpreter=False, tile=len(tiles) - 1)
    assert long_caption["ROWS"] == 256              # a query item is never split over two tiles
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
# Gradients (the fused backward, kernels/rcar_backward.py)
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


def pair_ids(n_img, n_cap):
    return torch.arange(n_img)[:, None] * n_cap + torch.arange(n_cap)[None, :]


def reference_grads(head, img, cap, lens, grad, seed, training, dtype=torch.float64):
    """The vectorised reference in `dtype` (one block of all pairs, so that RAR's dropout uses
    the counter-based masks of `seed`): scores, d img, d cap, d parameters (zeros where the
    score does not depend on a parameter, as the op returns)."""
    ref = copy.deepcopy(head).to(dtype).train(training)
    img = img.detach().to(dtype).requires_grad_()
    cap = cap.detach().to(dtype).requires_grad_()
    with dropout.counter_masks(seed, pair_ids(img.shape[0], cap.shape[0])):
        out = ref.forward_vectorized(img, cap, lens, img_chunk=img.shape[0], cap_chunk=cap.shape[0])
    (out * grad.to(dtype)).sum().backward()
    params = [torch.zeros_like(p) if p.grad is None else p.grad for p in ref.parameters()]
    return out, img.grad, cap.grad, params


def triton_grads(head, img, cap, lens, grad, seed, training):
    """The Triton op (the path torch.compile takes) with an explicit dropout seed."""
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in head.parameters()]
    config = (*rcar_ops.op_config(head)[:-1], training)
    out = rcar_ops.rcar_triton_op(img, cap, lens, params, torch.tensor(seed, dtype=torch.int64),
                                     *config)
    (out * grad).sum().backward()
    return out, img.grad, cap.grad, [p.grad for p in params]


def check_against_reference(head, img, cap, lens, training, what, seed=2**40 + 7):
    """Scores and every gradient of the Triton op against the float64 reference (the 2x rule
    against the reference in the inputs' dtype for float16)."""
    dtype = img.dtype
    grad = torch.randn(img.shape[0], cap.shape[0])
    got = triton_grads(head, img, cap, lens, grad, seed, training)
    want = reference_grads(head, img, cap, lens, grad, seed, training)
    lowp = None if dtype == torch.float32 else reference_grads(head, img, cap, lens, grad, seed,
                                                               training, dtype)
    names = ["scores", "grad img", "grad cap"] + [f"grad {n}" for n, _ in head.named_parameters()]
    flat = lambda r: [r[0], r[1], r[2], *r[3]]  # noqa: E731
    for i, (name, g, w) in enumerate(zip(names, flat(got), flat(want))):
        assert g.dtype == (torch.float32 if i == 0 else dtype), f"{what} {name}: dtype {g.dtype}"
        assert_close_to_reference(g, w, dtype=dtype, ref_lowp=None if lowp is None else flat(lowp)[i],
                                  what=f"{what} {name}")
    real = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    assert bool((got[2][~real] == 0).all()), f"{what}: gradient in the caption padding"
    return got


# regulator x steps (1, 2) x direction x eval/training, pairwise (all with
# RCAR_FAST_FULL_TESTS=1); d = 40 (two d chunks, a partial one) at 2 steps, sim_dim 24 (s, 2s,
# s/2 padded) in i2t
GRAD_GRID = sweep(REGULATORS, (1, 2), ("t2i", "i2t"), (False, True))


@requires_interpreter
@pytest.mark.parametrize("regulator,steps,direction,training", GRAD_GRID)
def test_fused_backward_matches_float64_reference(regulator, steps, direction, training):
    d = 40 if steps == 2 else 32
    sim_dim = 24 if direction == "i2t" else 16
    img, cap, lens = _inputs(d=d)
    head = make_head(regulator, steps, direction, d=d, sim_dim=sim_dim)
    check_against_reference(head, img, cap, lens, training,
                            f"{regulator} {steps} {direction} training={training}")


@requires_interpreter
@pytest.mark.parametrize("regulator,steps,direction,training",
                         [("coop_rcar", 2, "t2i", True), ("only_rcr", 1, "i2t", False),
                          ("only_rar", 2, "i2t", True)])
def test_fused_backward_float16_within_twice_the_reference_error(regulator, steps, direction,
                                                                 training):
    img, cap, lens = _inputs(dtype=torch.float16)
    head = make_head(regulator, steps, direction).half()
    check_against_reference(head, img, cap, lens, training, f"float16 {regulator} {steps} {direction}")


@requires_interpreter
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_fused_backward_more_items_than_programs(direction):
    # 5 images x 7 captions: each interpreter program (2) owns several items and the weight
    # gradients are the sum of two programs' partials.
    img, cap, lens = _inputs(n_img=5, n_cap=7, n_regions=6, lens=(3, 7, 1, 5, 2, 7, 4))
    head = make_head("coop_rcar", 2, direction)
    check_against_reference(head, img, cap, lens, True, f"5 x 7 {direction}")


@requires_interpreter
def test_fused_backward_is_deterministic_and_never_reads_padding():
    head = make_head("coop_rcar", 2, "i2t")
    img, cap_nan, lens = _inputs(max_len=9, pad=float("nan"))
    cap_big = pad_captions(cap_nan, lens, 1e30)
    grad = torch.randn(2, 3)
    first = triton_grads(head, img, cap_nan, lens, grad, 11, True)
    again = triton_grads(head, img, cap_nan, lens, grad, 11, True)
    big = triton_grads(head, img, cap_big, lens, grad, 11, True)
    for a, b, c in zip([*first[:3], *first[3]], [*again[:3], *again[3]], [*big[:3], *big[3]]):
        assert torch.isfinite(a).all()
        assert_bit_equal(a, b, what="rerun")
        assert_bit_equal(a, c, what="NaN vs 1e30 padding")


@requires_interpreter
@pytest.mark.parametrize("regulator", ["coop_rcar", "only_rcr"])
def test_eager_path_matches_the_op_and_leaves_unused_parameters_without_gradient(regulator,
                                                                                monkeypatch):
    img, cap, lens = _inputs()
    head = make_head(regulator, 1, "t2i").train()
    monkeypatch.setattr(rcar_ops, "draw_seed", lambda: 2**33 + 5)
    grad = torch.randn(2, 3)
    g_img, g_cap, g_par = gradients(head, img, cap, lens, grad, "triton")
    op = triton_grads(head, img, cap, lens, grad, 2**33 + 5, regulator != "only_rcr")
    assert_bit_equal(g_img, op[1], what="grad img")
    assert_bit_equal(g_cap, op[2], what="grad cap")
    for (name, g), g_op in zip(g_par.items(), op[3]):
        if regulator == "only_rcr" and name.startswith("sim_eval_w"):
            assert g is None, f"{name}: the score does not depend on it"
        else:
            assert_bit_equal(g, g_op, what=f"grad {name}")


@requires_interpreter
def test_dropout_masks_are_the_bits_of_rcar_fast_dropout():
    from rcar_fast.kernels import rcar_backward

    for seed, module, which, pair in ((0, 0, 0, 0), (123456789012, 1, 1, 7), (2**62 - 1, 3, 0, 2**33 + 3)):
        out = rcar_backward.dropout_scales(seed, module, which, pair, 16, 32)
        want = dropout.rar_scales(seed, module, which, torch.tensor([pair]), 16, 32)[0].float()
        assert_bit_equal(out, want, what=f"seed={seed} module={module} which={which} pair={pair}")


@requires_interpreter
def test_dropout_rate_other_than_the_official_is_refused():
    img, cap, lens = _inputs()
    head = make_head("only_rar", 1, "t2i").train()
    head.rar_modules[0].rar_k_w[2].p = 0.2
    with pytest.raises(ValueError, match="p = 0.4"):
        head(img, cap, lens, backend="triton")


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
