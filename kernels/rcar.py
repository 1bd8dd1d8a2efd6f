"""Fused all-pairs RCAR similarity head (SIMILARITY.md, "RCAR similarity head") in Triton.

One persistent kernel computes the whole head -- every alignment step, RCR and RAR, and the
final score -- for tiles of pairs that share one CONTEXT SET:

* t2i: the context set is one image's R regions; the tile's rows are the words of up to BSEG
  captions packed back to back (each caption whole, so norms over a pair's queries stay inside
  the tile; captions packed longest first).
* i2t: the context set is one caption's L words; the rows are the regions of up to BSEG images.

Every GEMM of a tile therefore has a shared operand: the context set (raw scores, attended
context) or a head weight (alignment d->s, RCR, RAR), and the rows are many queries. Per tile
and step:

  pass 1 over d chunks: modulation m chunk (RCR's s->2s->d MLP: its second layer evaluated per
      d chunk from the hidden layers kept in the program's scratch), raw scores S = (q*m) C^T;
  on chip: clipped_l2norm of S over each pair's queries (segment sums as one-hot matmuls),
      softmax over the context with the per-row temperature lambda, |ctx|^2 = alpha G alpha^T
      with the context set's Gram matrix G (precomputed per set: so l2norm(ctx) is known
      before ctx is formed);
  passes 2.. over d chunks, one per group of SW alignment columns: ctx chunk = alpha C_chunk,
      (q - ctx/|ctx|)^2 multiplied straight into the alignment GEMM (accumulated over d
      chunks): no (rows, d) tensor leaves the chip; the group's pre-norm z -> scratch;
  then v = l2norm(z) (rows, s) -> scratch; RCR (hidden layer -> scratch, lambda update); RAR
      (segment softmax over each pair's queries, h update); the score sigmoid(w_e . h + b_e)
      (only_rcr: mean cosine with the final m, lambda).

Pair lists (rcar_pairs_forward): the work items are (context set, tile of the query items
listed with that set), packed on the host (listed_tiles) and read from a table (LISTED: the
kernel's work item w is tile w against set tile_set[w]); each score lands at its pair's position.
Compiled for sm_90 (bf16 coop_rcar(2) t2i, the first GPU tile, triton 3.8): 250 registers, 0 B
of stack (all pairs: 254, 0).

Memory traffic besides inputs, weights and one score per pair: a per-PROGRAM scratch (the grid
is a fixed number of programs walking all (context set, tile) work items; layout at
`scratch_elements`) holding the tile's v (ROWS x s) and RCR hidden layers (ROWS x 2s per RCR
step) in the operand dtype, and in fp32 z (ROWS x s), the segments' h (BSEG x s) and lambda
(ROWS), re-read from L1/L2 by the same program: whatever a work item carries from one stage to
the next, so that registers hold only the current stage's blocks. Nothing of size
(pairs, Q, d) or (pairs, Q, s) is written to memory. Host-side
preparation: the query rows packed per tile (about the size of the query features), the context
Gram matrices (n_sets x CP x CP fp32), padded weights.

Numerics: elementwise math in fp32. GEMM operands are the "operand dtype" (the dtype of the
packed weights): fp32 with input_precision="ieee" (exact FMA path) for fp32 inputs and in the
interpreter, bf16/fp16 on tensor cores for low-precision inputs; accumulation always fp32.

Packed weights (built by pack_weights in rcar_fast/ops/rcar.py, zero-padded so padded lanes
contribute nothing): see `WEIGHT_LAYOUT`.

Work item, tensor-core M and traffic (issue 15 item 3; bf16, d=1024, s=256, coop_rcar(2), COCO
captions of ~12 words, R=36). A MODEL, from the code's loop structure; nothing here is a GPU
measurement. A work item is (context set, tile of GPU_ROWS["low"] = 128 query rows): t2i ~10
captions (~94% of the rows real), i2t 3 images (108 of 128 rows; 36 of 64 before). Per GEMM
(M x N x K), default tile (SW 128):
  scores (q m) C^T         128 x 64(CP) x 1024   ctx = alpha C, per group  128 x 32(DC) x 64(CP)
  alignment W_a, 2 groups  128 x 128(SW) x 1024  RCR W_2 (per d chunk)     128 x 32 x 512
  RCR W_1 / smooth W_s1    128 x 32 x 256        RAR W_k                   128 x 32 x 256
  RAR W_q (h of each pair)  16(BSEG) x 32 x 256  segment sums / pooling: M = 16 (BSEG)
Padded work ~44 MFLOP per pair against 36 useful (CP = 64 for 36 regions; ctx recomputed by
each column group; tile 1, SW 64: 4 groups, ~51 MFLOP).
L2 bytes per t2i item (read + written): weights 2.8 MiB (W_a 1.0, W_2 1.0, W_q + W_k 0.5, W_1
0.25, W_s1 0.06), the image 0.42 (6 passes over d), the packed query tile 1.5 (6 passes), v in
the scratch 2.6 (64 KiB, re-read per 32-column chunk of W_1, W_s1, W_k and per pooling), z
0.5, and the RCR hidden layer re-read once per d chunk 4.0 (32 x 128 KiB): 11.8 MiB if nothing
is an L1 hit, 5.2 MiB if v and the hidden layer are (L1 has ~160 KiB beside the 64 KiB of
shared memory: the hidden layer alone is 128 KiB), i.e. 0.52-1.2 MiB per pair (64 rows:
0.92-1.3). Per pair the weights' share halves (0.53 -> 0.28 MiB) and the context's (0.08 ->
0.04), while the query, v and hidden-layer bytes scale with the rows.
HBM: the packed queries (~590 MiB for COCO 5K, more than L2) are fetched once per item (~24 KiB
per pair); images and weights stay in L2; the scratch is 336 KiB per program for coop_rcar(2)
(hidden slot 128, v 64, fp32 area 144), 44 MiB for 132 programs, close to the 50 MB L2, so part
of the scratch traffic may reach HBM: one reason to measure 64 against 128 rows on the GPU.
Projection (NOT a measurement; H200 bf16 ~990 TFLOP/s dense, 4.8 TB/s HBM, L2 assumed ~8-10
TB/s) for COCO 5K coop_rcar(2) t2i, 1.25e8 pairs: tensor work 5.6 s at peak, L2 68-155 TB ->
7-19 s: still L2-bound in this model, against the issue's 4.6 s floor and 8 s target; the
previous 64-row kernel's model gave 12-21 s. The registers, spills and shared memory behind
the choice of 128 rows (compiled for sm_90, both tritons): the table at GPU_ROWS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rcar_fast import contract

# The shared tile's padding rule (kernels/tile.py). RCAR's score GEMM is not the shared
# tile.score_tile: its query rows are packed per tile on the host and modulated (q * m, RCR)
# chunk by chunk inside the d loop, so only the padding rule is shared.
from .tile import MIN_DOT, interpreter_on, pow2_at_least

MODES = contract.REGULATOR_CODES
# The contract's constants as constexpr globals (all a jitted function can read).
_EPS = tl.constexpr(contract.EPS)
_SLOPE = tl.constexpr(contract.LEAKY_SLOPE)
_ONLY_RAR = tl.constexpr(MODES["only_rar"])
_ONLY_RCR = tl.constexpr(MODES["only_rcr"])
# The interpreter runs no inline assembly (_columns); its mode is fixed at import (tests/conftest.py).
_OPAQUE_COLUMNS = tl.constexpr(not interpreter_on())

# name -> (shape, dtype kind). n_alv / n_rcr / n_rar are the module counts (at least 1 slot: an
# absent module list gets a zero dummy). DP = d rounded up to the d chunk, SP = pow2 >= max(s, 16),
# HP = pow2 >= max(2s, 16), HSP = pow2 >= max(s // 2, 16). "op" = operand dtype, "f32" = float32.
WEIGHT_LAYOUT = {
    "wa": ("(n_alv, DP, SP)", "op"),   # alv_modules[t].sim_transform_w.weight^T
    "ba": ("(n_alv, SP)", "f32"),
    "w1": ("(n_rcr, SP, HP)", "op"),   # rcr_modules[t].rcr_matrix_w[0].weight^T
    "b1": ("(n_rcr, HP)", "f32"),
    "w2": ("(n_rcr, HP, DP)", "op"),   # rcr_modules[t].rcr_matrix_w[2].weight^T
    "b2": ("(n_rcr, DP)", "f32"),
    "ws1": ("(n_rcr, SP, HSP)", "op"),  # rcr_modules[t].rcr_smooth_w[0].weight^T
    "bs1": ("(n_rcr, HSP)", "f32"),
    "ws2": ("(n_rcr, HSP)", "f32"),    # rcr_modules[t].rcr_smooth_w[2].weight[0]
    "bs2": ("(n_rcr,)", "f32"),
    "wq": ("(n_rar, SP, SP)", "op"),   # rar_modules[n].rar_q_w[0].weight^T
    "bq": ("(n_rar, SP)", "f32"),
    "wk": ("(n_rar, SP, SP)", "op"),   # rar_modules[n].rar_k_w[0].weight^T
    "bk": ("(n_rar, SP)", "f32"),
    "wv": ("(n_rar, SP)", "f32"),      # rar_modules[n].rar_v_w[0].weight[0]
    "bv": ("(n_rar,)", "f32"),
    "we": ("(SP,)", "f32"),            # sim_eval_w.weight[0]
    "be": ("(1,)", "f32"),
}


# ---------------------------------------------------------------------------------------------
# Small elementwise helpers (exp-based: portable across triton versions and the interpreter)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1: no overflow for any x.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _l2norm_rows(x):
    # x / (sqrt(sum x^2) + eps), eps added to the norm as in the public code.
    return x / (tl.sqrt(tl.sum(x * x, axis=1)) + _EPS)[:, None]


@triton.jit
def _columns(k0, K: tl.constexpr):
    """k0 + arange(K) (k0 a multiple of K), opaque to the compiler on a GPU: otherwise triton
    reassociates each block's offsets into a loop-invariant (rows, K) block plus k0 and hoists
    it out of the persistent loop, where dozens of them stay live (and spill) for the whole
    kernel (kernels/rcar_backward.py has the same helper). The hints keep loads vectorised."""
    cols = k0 + tl.arange(0, K)
    if _OPAQUE_COLUMNS:
        cols = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [cols], dtype=tl.int32,
                                         is_pure=False, pack=1)
        cols = tl.max_contiguous(tl.multiple_of(cols, K), K)
    return cols


@triton.jit
def _dot_in_branch(a, b, live, PREC: tl.constexpr):
    """tl.dot(a, b) in fp32, computed in a branch taken whenever `live` (true at run time).
    On sm_90 triton gives a dot whose result reaches another dot all warps along M; with 64
    rows and 8 warps (two warp groups) that replicates its result, and everything computed
    from it, across warp pairs (255 registers and spills). The analysis stops at the branch's
    yield, so the dot keeps a 4 x 2 arrangement."""
    out = tl.zeros((a.shape[0], b.shape[1]), tl.float32)
    if live:
        out = tl.dot(a, b, input_precision=PREC)
    return out


# ---------------------------------------------------------------------------------------------
# The per-program scratch and the tile's segments
# ---------------------------------------------------------------------------------------------

# One program's scratch, in elements of the operand dtype: N_SLOTS RCR hidden layers (ROWS, HP)
# and the step's v (ROWS, SP), both GEMM operands; then an fp32 area (`_f32_area`) with the
# alignment's pre-norm z (ROWS, SP), the segments' RAR vectors h (BSEG, SP) and lambda (ROWS).
# Everything a work item carries from one stage to the next lives there, not in registers:
# each stage loads what it needs (from L1/L2) in column chunks, so what is live in registers is
# the stage's own blocks (at most ROWS x max(CP, SW, DC, NC) fp32 accumulators) whatever the
# step count, sim_dim or the rows of a tile.

def scratch_elements(rows: int, bseg: int, n_slots: int, sp: int, hp: int,
                     op_dtype: torch.dtype) -> int:
    """Elements (of op_dtype) of one program's scratch (see the layout above)."""
    f32_words = rows * sp + bseg * sp + rows
    return n_slots * rows * hp + rows * sp + f32_words * (4 // op_dtype.itemsize)


@triton.jit
def _f32_area(scr, N_SLOTS: tl.constexpr, ROWS: tl.constexpr, SP: tl.constexpr,
              HP: tl.constexpr, BSEG: tl.constexpr):
    """Pointers (fp32) to z (ROWS, SP), h (BSEG, SP) and lambda (ROWS) in a program's scratch."""
    zscr = (scr + N_SLOTS * ROWS * HP + ROWS * SP).to(tl.pointer_type(tl.float32))
    return zscr, zscr + ROWS * SP, zscr + ROWS * SP + BSEG * SP


@triton.jit
def _segments(seg_ptr, ROWS: tl.constexpr, BSEG: tl.constexpr):
    """Which rows are real and the (ROWS, BSEG) one-hot matrix of each row's segment, loaded
    where needed (a few hundred bytes from L1) rather than kept live across the work item."""
    seg = tl.load(seg_ptr + _columns(0, ROWS))
    return seg >= 0, (seg[:, None] == _columns(0, BSEG)[None, :]).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# Loads
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_query_chunk(q_tile, d0, DP, ROWS: tl.constexpr, DC: tl.constexpr):
    """(ROWS, DC) chunk of the tile's packed query rows (unused rows are zeros), in the
    stored dtype: a load feeding a dot directly lets triton pipeline it (async copies)."""
    offs = _columns(0, ROWS)[:, None] * DP + _columns(d0, DC)[None, :]
    return tl.load(q_tile + offs)


@triton.jit
def _load_context_chunk(c_base, ctx_ok, d0, DP, CP: tl.constexpr, DC: tl.constexpr):
    """(CP, DC) chunk of the context set in the stored dtype; padding items are never read
    (NaN-safe) and come back as 0."""
    offs = _columns(0, CP)[:, None] * DP + _columns(d0, DC)[None, :]
    return tl.load(c_base + offs, mask=ctx_ok[:, None], other=0.0)


@triton.jit
def _rows_times_weight(a_ptr, lda, w_ptr, ldw, n0, K: tl.constexpr, ROWS: tl.constexpr,
                       KC: tl.constexpr, NC: tl.constexpr, OPD: tl.constexpr,
                       PREC: tl.constexpr):
    """(ROWS, NC) fp32 = A[:, :K] @ W[:K, n0:n0+NC]: A a row-major scratch block (leading
    dimension lda: v, a hidden layer, h), W row-major (ldw), K in chunks of KC."""
    rows = _columns(0, ROWS)
    ns = _columns(n0, NC)
    acc = tl.zeros((ROWS, NC), tl.float32)
    for k0 in range(0, K, KC):
        ks = _columns(k0, KC)
        a = tl.load(a_ptr + rows[:, None] * lda + ks[None, :])
        b = tl.load(w_ptr + ks[:, None] * ldw + ns[None, :])
        acc += tl.dot(a.to(OPD), b, input_precision=PREC)
    return acc


# ---------------------------------------------------------------------------------------------
# Pieces of one alignment step
# ---------------------------------------------------------------------------------------------

@triton.jit
def _modulation_chunk(scr, w2_ptr, b2_ptr, d0, DP, N_MOD, ROWS: tl.constexpr,
                      HP: tl.constexpr, HC: tl.constexpr, DC: tl.constexpr, OPD: tl.constexpr,
                      PREC: tl.constexpr):
    """m[:, d0:d0+DC] after N_MOD RCR updates (a run-time count; 0: m = 1):
    m <- clamp(tanh(H1_u W2_u + b2_u) + m, -1, 1), with the hidden layers H1_u (ROWS, HP)
    read back from this program's scratch."""
    ds = _columns(d0, DC)
    m = tl.full((ROWS, DC), 1.0, tl.float32)
    for u in range(N_MOD):
        z = _rows_times_weight(scr + u * ROWS * HP, HP, w2_ptr + u * HP * DP, DP, d0, HP, ROWS,
                               HC, DC, OPD, PREC)
        z += tl.load(b2_ptr + u * DP + ds)[None, :]
        m = tl.minimum(tl.maximum(_tanh(z) + m, -1.0), 1.0)
    return m


@triton.jit
def _attention(q_tile, seg_ptr, c_base, ctx_ok, lscr, scr, w2_ptr, b2_ptr, DP, N_MOD,
               ROWS: tl.constexpr, BSEG: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr,
               HC: tl.constexpr, DC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr,
               SEG_PREC: tl.constexpr):
    """alpha (ROWS, CP) = softmax_c(lambda * clipped_l2norm(S)), S = (q * m) C^T."""
    scores = tl.zeros((ROWS, CP), tl.float32)
    for d0 in range(0, DP, DC):
        q = _load_query_chunk(q_tile, d0, DP, ROWS, DC)
        c = _load_context_chunk(c_base, ctx_ok, d0, DP, CP, DC).to(OPD)
        m = _modulation_chunk(scr, w2_ptr, b2_ptr, d0, DP, N_MOD, ROWS, HP, HC, DC, OPD, PREC)
        scores += tl.dot((q.to(tl.float32) * m).to(OPD), tl.trans(c), input_precision=PREC)
    # clipped_l2norm over each pair's queries, per context item: segment sums of squares via
    # the (ROWS, BSEG) one-hot matrix, broadcast back to the rows by the transposed product.
    row_ok, onehot = _segments(seg_ptr, ROWS, BSEG)
    x = tl.where(scores > 0, scores, _SLOPE * scores)
    x = tl.where(row_ok[:, None], x, 0.0)
    per_seg = tl.dot(tl.trans(onehot), x * x, input_precision=SEG_PREC)
    per_row = _dot_in_branch(onehot, per_seg, DP > 0, SEG_PREC)
    a = x / (tl.sqrt(per_row) + _EPS)
    lam = tl.load(lscr + _columns(0, ROWS))
    logits = tl.where(ctx_ok[None, :], lam[:, None] * a, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _alignment_columns(q_tile, c_base, ctx_ok, alpha_op, inv_norm, wa, ba, s0, DP,
                       ROWS: tl.constexpr, CP: tl.constexpr, SP: tl.constexpr,
                       SW: tl.constexpr, DC: tl.constexpr, OPD: tl.constexpr,
                       PREC: tl.constexpr):
    """Columns s0 .. s0+SW of W_a (q - l2norm(ctx))^2 + b_a, (ROWS, SW) fp32: one pass over d
    (ctx = alpha C chunk by chunk, consumed at once)."""
    ss = _columns(s0, SW)
    acc = tl.zeros((ROWS, SW), tl.float32)
    for d0 in range(0, DP, DC):
        ds = _columns(d0, DC)
        q = _load_query_chunk(q_tile, d0, DP, ROWS, DC).to(tl.float32)
        c = _load_context_chunk(c_base, ctx_ok, d0, DP, CP, DC).to(OPD)
        ctx = _dot_in_branch(alpha_op, c, DP > 0, PREC)
        diff = q - ctx * inv_norm[:, None]
        w = tl.load(wa + ds[:, None] * SP + ss[None, :])
        acc += tl.dot((diff * diff).to(OPD), w, input_precision=PREC)
    return acc + tl.load(ba + ss)[None, :]


@triton.jit
def _alignment(scr, q_tile, seg_ptr, c_base, g_base, ctx_ok, w2_ptr, b2_ptr, wa_ptr, ba_ptr,
               DP, STEP, N_MOD, N_SLOTS: tl.constexpr, ROWS: tl.constexpr, BSEG: tl.constexpr,
               CP: tl.constexpr, SP: tl.constexpr, HP: tl.constexpr, HC: tl.constexpr,
               NC: tl.constexpr, DC: tl.constexpr, S_SPLIT: tl.constexpr, OPD: tl.constexpr,
               PREC: tl.constexpr, SEG_PREC: tl.constexpr):
    """v (ROWS, SP) = l2norm(W_a (q - l2norm(ctx))^2 + b_a) of alignment step STEP, written to
    the scratch (v block)."""
    vscr = scr + N_SLOTS * ROWS * HP
    zscr, _, lscr = _f32_area(scr, N_SLOTS, ROWS, SP, HP, BSEG)
    alpha = _attention(q_tile, seg_ptr, c_base, ctx_ok, lscr, scr, w2_ptr, b2_ptr, DP, N_MOD,
                       ROWS, BSEG, CP, HP, HC, DC, OPD, PREC, SEG_PREC)
    # |ctx_k|^2 = alpha_k G alpha_k^T with the context set's Gram matrix G (precomputed):
    # l2norm(ctx) is known before ctx is formed, so ctx can be consumed chunk by chunk.
    cs = _columns(0, CP)
    gram = tl.load(g_base + cs[:, None] * CP + _columns(0, CP)[None, :])
    sq = tl.sum(_dot_in_branch(alpha, gram, DP > 0, SEG_PREC) * alpha, axis=1)
    inv_norm = 1.0 / (tl.sqrt(tl.maximum(sq, 0.0)) + _EPS)
    alpha_op = alpha.to(OPD)
    wa = wa_ptr + STEP * DP * SP
    ba = ba_ptr + STEP * SP
    # The (ROWS, SP) pre-norm z in S_SPLIT column groups, one pass over d each (ctx recomputed
    # per pass: a CP / SW share of the group's FLOPs more), so that only a (ROWS, SW)
    # accumulator is live; each group waits in the scratch (fp32) for the row norm.
    SW: tl.constexpr = SP // S_SPLIT
    rows = _columns(0, ROWS)
    sumsq = tl.zeros((ROWS,), tl.float32)
    for s0 in range(0, SP, SW):
        z = _alignment_columns(q_tile, c_base, ctx_ok, alpha_op, inv_norm, wa, ba, s0, DP,
                               ROWS, CP, SP, SW, DC, OPD, PREC)
        sumsq += tl.sum(z * z, axis=1)
        tl.store(zscr + rows[:, None] * SP + _columns(s0, SW)[None, :], z)
    inv = 1.0 / (tl.sqrt(sumsq) + _EPS)
    # z is complete, and every thread is done reading the previous step's v, before v is
    # written; v is complete before any thread of this program reads it.
    tl.debug_barrier()
    for n0 in range(0, SP, NC):
        offs = rows[:, None] * SP + _columns(n0, NC)[None, :]
        tl.store(vscr + offs, (tl.load(zscr + offs) * inv[:, None]).to(OPD))
    tl.debug_barrier()


@triton.jit
def _mean_cosine(q_tile, seg_ptr, c_base, ctx_ok, lscr, scr, w2_ptr, b2_ptr, DP, N_MOD,
                 ROWS: tl.constexpr, BSEG: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr,
                 HC: tl.constexpr, DC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr,
                 SEG_PREC: tl.constexpr):
    """only_rcr's score per segment: mean_k cos(q_k, l2norm(ctx_k)) with the final (m, lambda)."""
    alpha = _attention(q_tile, seg_ptr, c_base, ctx_ok, lscr, scr, w2_ptr, b2_ptr, DP, N_MOD,
                       ROWS, BSEG, CP, HP, HC, DC, OPD, PREC, SEG_PREC)
    alpha_op = alpha.to(OPD)
    q_ctx = tl.zeros((ROWS,), tl.float32)
    ctx_sq = tl.zeros((ROWS,), tl.float32)
    q_sq = tl.zeros((ROWS,), tl.float32)
    for d0 in range(0, DP, DC):
        q = _load_query_chunk(q_tile, d0, DP, ROWS, DC).to(tl.float32)
        c = _load_context_chunk(c_base, ctx_ok, d0, DP, CP, DC).to(OPD)
        ctx = tl.dot(alpha_op, c, input_precision=PREC)
        q_ctx += tl.sum(q * ctx, axis=1)
        ctx_sq += tl.sum(ctx * ctx, axis=1)
        q_sq += tl.sum(q * q, axis=1)
    n = tl.sqrt(ctx_sq)
    # cos(q, u) with u = ctx / (|ctx| + eps): (q . u) / max(|q| |u|, eps).
    cos = (q_ctx / (n + _EPS)) / tl.maximum(tl.sqrt(q_sq) * (n / (n + _EPS)), _EPS)
    row_ok, onehot = _segments(seg_ptr, ROWS, BSEG)
    cos = tl.where(row_ok, cos, 0.0)
    seg_len = tl.sum(onehot, axis=0)
    return tl.sum(onehot * cos[:, None], axis=0) / tl.maximum(seg_len, 1.0)


# ---------------------------------------------------------------------------------------------
# Regulators and aggregation
# ---------------------------------------------------------------------------------------------

# The alignment vectors v (ROWS, SP) of the current step live in the scratch (written once per
# step, re-read from L1/L2): the s-wide GEMMs below stream v in K chunks like a weight, so
# neither v nor a whole (ROWS, SP) operand has to sit in registers / shared memory.

@triton.jit
def _pool_rows(vscr, hscr, seg_ptr, weight, ROWS: tl.constexpr, BSEG: tl.constexpr,
               SP: tl.constexpr, NC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr,
               NORMALIZE: tl.constexpr):
    """h (BSEG, SP) = sum over each segment's rows of weight_k v_k, NC columns at a time, to
    the scratch hscr; NORMALIZE: divided by its row norm (l2norm). The (BSEG, ROWS) operand
    (the one-hot matrix times the weights) is rebuilt per chunk: only `weight` stays live."""
    rows = _columns(0, ROWS)
    segs = _columns(0, BSEG)
    sumsq = tl.zeros((BSEG,), tl.float32)
    tl.debug_barrier()   # every thread is done reading the previous h
    for n0 in range(0, SP, NC):
        cols = _columns(n0, NC)
        _, onehot = _segments(seg_ptr, ROWS, BSEG)
        share = tl.trans(onehot * weight[:, None]).to(OPD)
        pooled = tl.dot(share, tl.load(vscr + rows[:, None] * SP + cols[None, :]),
                        input_precision=PREC)
        sumsq += tl.sum(pooled * pooled, axis=1)
        tl.store(hscr + segs[:, None] * SP + cols[None, :], pooled)
    if NORMALIZE:
        inv = 1.0 / (tl.sqrt(sumsq) + _EPS)
        tl.debug_barrier()
        for n0 in range(0, SP, NC):
            offs = segs[:, None] * SP + _columns(n0, NC)[None, :]
            tl.store(hscr + offs, tl.load(hscr + offs) * inv[:, None])
    tl.debug_barrier()   # h is complete before any thread reads it


@triton.jit
def _segment_mean(vscr, hscr, seg_ptr, ROWS: tl.constexpr, BSEG: tl.constexpr,
                  SP: tl.constexpr, NC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr):
    """h (BSEG, SP) := mean of v over each segment's rows (h at step 0)."""
    _, onehot = _segments(seg_ptr, ROWS, BSEG)
    seg_len = tl.sum(onehot, axis=0)
    weight = tl.sum(onehot / tl.maximum(seg_len, 1.0)[None, :], axis=1)   # 1 / own length
    _pool_rows(vscr, hscr, seg_ptr, weight, ROWS, BSEG, SP, NC, OPD, PREC, False)


@triton.jit
def _rcr(scr, w1_ptr, b1_ptr, ws1_ptr, bs1_ptr, ws2_ptr, bs2_ptr, STEP,
         N_SLOTS: tl.constexpr, ROWS: tl.constexpr, BSEG: tl.constexpr, SP: tl.constexpr,
         HP: tl.constexpr, HSP: tl.constexpr, HC: tl.constexpr, NC: tl.constexpr,
         KC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr):
    """RCR STEP: writes the hidden layer tanh(v W1 + b1) (ROWS, HP) to scratch slot STEP (the
    d-wide second layer is applied per d chunk by the next steps) and lambda <- relu(w_s2 .
    tanh(W_s1 v + b_s1) + b_s2 + lambda) (in the scratch)."""
    vscr = scr + N_SLOTS * ROWS * HP
    _, _, lscr = _f32_area(scr, N_SLOTS, ROWS, SP, HP, BSEG)
    rows = _columns(0, ROWS)
    for h0 in range(0, HP, HC):
        hs = _columns(h0, HC)
        z = _rows_times_weight(vscr, SP, w1_ptr + STEP * SP * HP, HP, h0, SP, ROWS, KC, HC, OPD,
                               PREC)
        z += tl.load(b1_ptr + STEP * HP + hs)[None, :]
        tl.store(scr + STEP * ROWS * HP + rows[:, None] * HP + hs[None, :], _tanh(z).to(OPD))
    GC: tl.constexpr = NC if NC < HSP else HSP   # the smooth layer's column chunk
    delta = tl.zeros((ROWS,), tl.float32)
    for g0 in range(0, HSP, GC):
        gs = _columns(g0, GC)
        hid = _rows_times_weight(vscr, SP, ws1_ptr + STEP * SP * HSP, HSP, g0, SP, ROWS, KC, GC,
                                 OPD, PREC)
        hid = _tanh(hid + tl.load(bs1_ptr + STEP * HSP + gs)[None, :])
        delta += tl.sum(hid * tl.load(ws2_ptr + STEP * HSP + gs)[None, :], axis=1)
    lam = tl.maximum(delta + tl.load(bs2_ptr + STEP) + tl.load(lscr + rows), 0.0)
    # Every thread is done reading the old lambda before it is overwritten; the hidden layer
    # and lambda are complete before other threads of this program read them.
    tl.debug_barrier()
    tl.store(lscr + rows, lam)
    tl.debug_barrier()


@triton.jit
def _rar(scr, seg_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, STEP,
         N_SLOTS: tl.constexpr, ROWS: tl.constexpr, BSEG: tl.constexpr, SP: tl.constexpr,
         HP: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, OPD: tl.constexpr,
         PREC: tl.constexpr):
    """RAR STEP (eval mode: dropout off), h in the scratch: h <- l2norm(sum_k softmax_k(logit_k)
    v_k) per segment, logit_k = w_v . (tanh(W_k v_k + b_k) * tanh(W_q h + b_q)) + b_v."""
    vscr = scr + N_SLOTS * ROWS * HP
    _, hscr, _ = _f32_area(scr, N_SLOTS, ROWS, SP, HP, BSEG)
    # Every row against every segment's question, (ROWS, BSEG); each row then keeps its own
    # segment's column. Built NC features at a time so that neither the keys (ROWS, SP) nor the
    # questions (BSEG, SP) are ever whole in registers.
    all_logits = tl.zeros((ROWS, BSEG), tl.float32)
    for n0 in range(0, SP, NC):
        ns = _columns(n0, NC)
        question = _rows_times_weight(hscr, SP, wq_ptr + STEP * SP * SP, SP, n0, SP, BSEG, KC,
                                      NC, OPD, PREC)
        question = _tanh(question + tl.load(bq_ptr + STEP * SP + ns)[None, :])    # (BSEG, NC)
        keys = _rows_times_weight(vscr, SP, wk_ptr + STEP * SP * SP, SP, n0, SP, ROWS, KC, NC,
                                  OPD, PREC)
        keys = _tanh(keys + tl.load(bk_ptr + STEP * SP + ns)[None, :])           # (ROWS, NC)
        keys = keys * tl.load(wv_ptr + STEP * SP + ns)[None, :]
        all_logits += tl.dot(keys.to(OPD), tl.trans(question.to(OPD)), input_precision=PREC)
    row_ok, onehot = _segments(seg_ptr, ROWS, BSEG)
    logit = tl.sum(all_logits * onehot, axis=1) + tl.load(bv_ptr + STEP)
    # Softmax over each segment's rows.
    member = onehot > 0
    seg_max = tl.max(tl.where(member, logit[:, None], float("-inf")), axis=0)
    row_max = tl.max(tl.where(member, seg_max[None, :], float("-inf")), axis=1)
    e = tl.where(row_ok, tl.exp(logit - tl.where(row_ok, row_max, 0.0)), 0.0)
    seg_sum = tl.sum(onehot * e[:, None], axis=0)
    row_sum = tl.sum(onehot * seg_sum[None, :], axis=1)
    weight = e / tl.where(row_ok, row_sum, 1.0)
    # sum_k w_k v_k per segment: the weights folded into the one-hot matrix.
    _pool_rows(vscr, hscr, seg_ptr, weight, ROWS, BSEG, SP, NC, OPD, PREC, True)


@triton.jit
def _eval_score(hscr, we_ptr, be_ptr, BSEG: tl.constexpr, SP: tl.constexpr, NC: tl.constexpr):
    segs = tl.arange(0, BSEG)
    acc = tl.zeros((BSEG,), tl.float32)
    for n0 in range(0, SP, NC):
        cols = n0 + tl.arange(0, NC)
        acc += tl.sum(tl.load(hscr + segs[:, None] * SP + cols[None, :])
                      * tl.load(we_ptr + cols)[None, :], axis=1)
    return _sigmoid(acc + tl.load(be_ptr))


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rcar_kernel(q_ptr, c_ptr, gram_ptr, c_count_ptr, tile_seg_ptr, tile_items_ptr, tile_set_ptr,
                 out_ptr, stride_out_set, stride_out_item,
                 wa_ptr, ba_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws1_ptr, bs1_ptr, ws2_ptr,
                 bs2_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, we_ptr, be_ptr,
                 scratch_ptr, n_tiles, n_work, DP, stride_c_set, smooth,
                 MODE: tl.constexpr, STEPS: tl.constexpr, N_SLOTS: tl.constexpr,
                 ROWS: tl.constexpr, BSEG: tl.constexpr, CP: tl.constexpr, SP: tl.constexpr,
                 HP: tl.constexpr, HSP: tl.constexpr, HC: tl.constexpr, NC: tl.constexpr,
                 KC: tl.constexpr, DC: tl.constexpr, S_SPLIT: tl.constexpr,
                 PREC: tl.constexpr, SEG_PREC: tl.constexpr, SCRATCH: tl.constexpr,
                 LISTED: tl.constexpr):
    # Persistent: program pid handles work items pid, pid + nprog, ...; work = set * n_tiles +
    # tile, so neighbouring programs share a context set (L2 reuse). The steps are run-time
    # loops: one copy of each stage's code whatever the step count.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    OPD: tl.constexpr = wa_ptr.dtype.element_ty
    scr = scratch_ptr + pid.to(tl.int64) * SCRATCH
    vscr = scr + N_SLOTS * ROWS * HP
    _, hscr, lscr = _f32_area(scr, N_SLOTS, ROWS, SP, HP, BSEG)
    for work in range(pid, n_work, nprog):
        if LISTED:   # a pair list (rcar_pairs_forward): tile `work` against its own context set
            set_id = tl.load(tile_set_ptr + work).to(tl.int64)
            tile = tl.cast(work, tl.int64)
        else:
            set_id = (work // n_tiles).to(tl.int64)
            tile = (work % n_tiles).to(tl.int64)
        seg_ptr = tile_seg_ptr + tile * ROWS
        q_tile = q_ptr + tile * ROWS * DP
        ctx_ok = _columns(0, CP) < tl.load(c_count_ptr + set_id)
        c_base = c_ptr + set_id * stride_c_set
        g_base = gram_ptr + set_id * (CP * CP)
        # The previous work item's last reads of the scratch finish before this one writes it.
        tl.debug_barrier()
        tl.store(lscr + _columns(0, ROWS), tl.full((ROWS,), 1.0, tl.float32) * smooth)
        tl.debug_barrier()
        if MODE == _ONLY_RAR:
            # only_rar: one alignment step, h = mean, STEPS RAR updates.
            _alignment(scr, q_tile, seg_ptr, c_base, g_base, ctx_ok, w2_ptr, b2_ptr, wa_ptr,
                       ba_ptr, DP, 0, 0, N_SLOTS, ROWS, BSEG, CP, SP, HP, HC, NC, DC, S_SPLIT,
                       OPD, PREC, SEG_PREC)
            _segment_mean(vscr, hscr, seg_ptr, ROWS, BSEG, SP, NC, OPD, PREC)
            for n in range(STEPS):
                _rar(scr, seg_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, n, N_SLOTS,
                     ROWS, BSEG, SP, HP, NC, KC, OPD, PREC)
            score = _eval_score(hscr, we_ptr, be_ptr, BSEG, SP, NC)
        elif MODE == _ONLY_RCR:
            # only_rcr: STEPS (alignment, RCR) rounds, then mean cosine with the final (m, lambda).
            for t in range(STEPS):
                _alignment(scr, q_tile, seg_ptr, c_base, g_base, ctx_ok, w2_ptr, b2_ptr, wa_ptr,
                           ba_ptr, DP, t, t, N_SLOTS, ROWS, BSEG, CP, SP, HP, HC, NC, DC,
                           S_SPLIT, OPD, PREC, SEG_PREC)
                _rcr(scr, w1_ptr, b1_ptr, ws1_ptr, bs1_ptr, ws2_ptr, bs2_ptr, t, N_SLOTS, ROWS,
                     BSEG, SP, HP, HSP, HC, NC, KC, OPD, PREC)
            score = _mean_cosine(q_tile, seg_ptr, c_base, ctx_ok, lscr, scr, w2_ptr, b2_ptr, DP,
                                 STEPS, ROWS, BSEG, CP, HP, HC, DC, OPD, PREC, SEG_PREC)
        else:
            # coop_rcar: alignment t, (h = mean at t = 0), RCR t if t < STEPS - 1, RAR t.
            for t in range(STEPS):
                _alignment(scr, q_tile, seg_ptr, c_base, g_base, ctx_ok, w2_ptr, b2_ptr, wa_ptr,
                           ba_ptr, DP, t, t, N_SLOTS, ROWS, BSEG, CP, SP, HP, HC, NC, DC,
                           S_SPLIT, OPD, PREC, SEG_PREC)
                if t == 0:
                    _segment_mean(vscr, hscr, seg_ptr, ROWS, BSEG, SP, NC, OPD, PREC)
                if t < STEPS - 1:
                    _rcr(scr, w1_ptr, b1_ptr, ws1_ptr, bs1_ptr, ws2_ptr, bs2_ptr, t, N_SLOTS,
                         ROWS, BSEG, SP, HP, HSP, HC, NC, KC, OPD, PREC)
                _rar(scr, seg_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, t, N_SLOTS,
                     ROWS, BSEG, SP, HP, NC, KC, OPD, PREC)
            score = _eval_score(hscr, we_ptr, be_ptr, BSEG, SP, NC)
        items = tl.load(tile_items_ptr + tile * BSEG + tl.arange(0, BSEG))
        item_off = tl.where(items >= 0, items, 0).to(tl.int64) * stride_out_item
        out = out_ptr + set_id * stride_out_set + item_off
        tl.store(out, score, mask=items >= 0)


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------

def _pow2_at_least(n: int, floor: int = MIN_DOT) -> int:
    return pow2_at_least(n, floor)


def pack_segments(seg_lengths, seg_row_base, rows: int, max_segs: int):
    """Pack query segments (one per item: a caption's words or an image's regions) into tiles of
    `rows` rows and at most `max_segs` segments, each segment whole.

    seg_lengths[b]: rows of item b; seg_row_base[b]: its first row in the flattened query matrix.
    Items are packed longest first (next-fit), which keeps tiles full for ragged captions.
    Returns int32 tensors tile_rows (n_tiles, rows) [query row or -1], tile_seg (n_tiles, rows)
    [segment slot or -1] and tile_items (n_tiles, max_segs) [item index or -1].
    """
    order = sorted(range(len(seg_lengths)), key=lambda b: -seg_lengths[b])
    tiles, current, used = [], [], 0
    for b in order:
        n = seg_lengths[b]
        if n > rows:
            raise ValueError(f"a query set of {n} rows does not fit a tile of {rows} rows")
        if current and (used + n > rows or len(current) == max_segs):
            tiles.append(current)
            current, used = [], 0
        current.append(b)
        used += n
    if current:
        tiles.append(current)
    tile_rows = torch.full((len(tiles), rows), -1, dtype=torch.int32)
    tile_seg = torch.full((len(tiles), rows), -1, dtype=torch.int32)
    tile_items = torch.full((len(tiles), max_segs), -1, dtype=torch.int32)
    for t, members in enumerate(tiles):
        r = 0
        for slot, b in enumerate(members):
            n = seg_lengths[b]
            first = seg_row_base[b]
            tile_rows[t, r:r + n] = torch.arange(first, first + n, dtype=torch.int32)
            tile_seg[t, r:r + n] = slot
            tile_items[t, slot] = b
            r += n
    return tile_rows, tile_seg, tile_items


# Tunables for the GPU (to be measured on an H100): query rows per work item (the M of every
# GEMM), the d chunk of the passes over d (DC), the RCR hidden chunk (HC), the RAR / RCR
# feature and K chunks (NC, KC), the alignment's column group (SW), warps, pipelining stages.
# float32 inputs take the exact "ieee" FMA path (GPU_TILES["fp32"]).
#
# Rows per work item, chosen by the offline sm_90 compile (tests/test_sm90_compile.py; 8 warps,
# one stage, d 1024, R 36 / Lmax 50 so CP 64): registers / bytes of stack (register spills)
# per thread, triton 3.8 | 3.6 (the GPU image's), issue 15 stop 20; "low" tiles, SW the
# alignment's column group (fp16 as bf16 to within 4 registers, except where noted):
#                                     128 rows, SW 128        128 rows, SW 64         64 rows, SW 64
#   bf16 coop_rcar(2) sim_dim 256   255 / 8   | 255 / 0     255 / 8 | 255 / 0     255 / 0 | 255 / 0
#   fp16 coop_rcar(2) sim_dim 256   255 / 16  | 255 / 0     255 / 8 | 255 / 0
#   bf16 coop_rcar(2) sim_dim 64    (one group: as SW 64)   225 / 0 | 235 / 0     218 / 0 | 240 / 0
#   bf16 only_rar(2)  sim_dim 256   255 / 24  | 255 / 0     255 / 0 | 255 / 0     255 / 0 | 255 / 0
#   bf16 only_rcr(2)  sim_dim 256   243 / 0   | 252 / 0     240 / 0 | 226 / 0     238 / 0 | 246 / 0
#   fp32 coop_rcar(2) sim_dim 256   (fp32 tile: DC 16, SW 32) 128 rows 255 / 592 | 255 / 576,
#                                   64 rows 254 / 0 | 255 / 0
# Before this kernel's layout (tile state in the scratch, run-time step loops, opaque offsets,
# 32-wide chunks; stop 19's kernel with its tiles): bf16 coop_rcar(2) at 128 rows 432 B | 528 B,
# sim_dim 64 184 | 368 (and 160 | 160 at 64 rows), only_rar 24 | 80, only_rcr 344 | 488; fp32
# at 64 rows 4592 B (3.8). The 8-24 B left with triton 3.8 at 128 rows are 1-6 stores per work
# item (tile pointers or column offsets, at the item's start or before the final score)
# reloaded in the segment loads, the pooling and the final score (nvdisasm line info), nearly
# all outside the GEMM loops; the variants tried to remove them (16- or 64-wide d chunks,
# 32-wide alignment groups, 64-wide NC / HC / KC, the pooling operand kept live, the context
# mask or the item's set and tile recomputed where used) move them between the two tritons or
# make them 16-72 B. So: 128 rows for bf16 / fp16 (M = 128 for every weight GEMM but the BSEG
# ones), 64 for fp32 (its FMA path spills ~580 B at 128). The default "low" tile has SW 128
# (half the alignment passes of SW 64: ~44 against ~51 MFLOP per pair); SW 64 is tile 1.
# Tile 2 keeps the 64-row work item (SW 64), which the model above cannot rule out: its scratch
# is half as large (~22 MiB for 132 programs, well inside L2) for twice the weight traffic per
# pair; the GPU check's rcar-forward part (bench/gpu_parts.py) times the three on one launch.
# The GPU tile space per precision kind. Every entry compiles for sm_90 within the stack bounds
# of tests/test_sm90_compile.py (RCAR_STACK) with triton 3.6 and 3.8 in the hot cases; the first
# is the default, the others what a GPU benchmark chooses among (rcar_forward(..., tile=i)).
# Not a triton.autotune: the kernel is persistent over the whole launch (one COCO launch runs
# for seconds), so timing each config on the real launch would cost more than it saves.
# ROWS is the least rows of a work item (more when one query item is longer: tile_config).
GPU_TILES = {
    "low": (dict(ROWS=128, DC=32, HC=32, NC=32, KC=32, SW=128, num_warps=8, num_stages=1),
            dict(ROWS=128, DC=32, HC=32, NC=32, KC=32, SW=64, num_warps=8, num_stages=1),
            dict(ROWS=64, DC=32, HC=32, NC=32, KC=32, SW=64, num_warps=8, num_stages=1)),
    "fp32": (dict(ROWS=64, DC=16, HC=32, NC=32, KC=32, SW=32, num_warps=8, num_stages=1),),
}
# The default tile's rows per precision kind (the rows of every launch that names no tile).
GPU_ROWS = {kind: tiles[0]["ROWS"] for kind, tiles in GPU_TILES.items()}
# The persistent grid is (programs that fit one SM at once) x SMs, derived from the compiled
# kernel's registers and shared memory (`occupancy`). Without them (a triton lacking the
# internals used), this: compiled for sm_90 (tests/test_sm90_compile.py) the kernels take
# 218-255 registers x 256 threads, i.e. (at 8 registers per thread) all 64K registers of an SM
# in every precision, and the fallback must fit every configuration.
GPU_PROGRAMS_PER_SM = 1
# sm_90 limits per SM, for devices whose properties do not say
_SM_REGISTERS = 65536
_SM_SHARED_BYTES = 233472      # 228 KB, of which 1 KB per CTA is reserved by the driver
_SM_THREADS = 2048


def occupancy(regs_per_thread: int, shared_bytes: int, num_warps: int, props=None) -> int:
    """CTAs of a kernel that one SM holds at once, limited by registers (allocated per warp in
    units of 256), shared memory and threads; `props`: torch.cuda device properties, if any."""
    regs_per_sm = getattr(props, "regs_per_multiprocessor", None) or _SM_REGISTERS
    shared_per_sm = getattr(props, "shared_memory_per_multiprocessor", None) or _SM_SHARED_BYTES
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", None) or _SM_THREADS
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_shared = shared_per_sm // (shared_bytes + 1024)
    by_threads = threads_per_sm // (32 * num_warps)
    return max(1, min(by_regs, by_shared, by_threads))


def _programs_per_sm(args, cfg: dict, device) -> int:
    """occupancy() of _rcar_kernel as it will be launched with `args` and `cfg` (compiled now;
    the launch that follows reuses the compiled kernel)."""
    try:
        compiled = _rcar_kernel.warmup(*args, grid=(1,), **cfg)
        compiled._init_handles()
        regs, shared = compiled.n_regs, compiled.metadata.shared
    except AttributeError:  # a triton without these internals
        return GPU_PROGRAMS_PER_SM
    return occupancy(regs, shared, cfg["num_warps"], torch.cuda.get_device_properties(device))


# Packed weights and contexts are padded along d to a multiple of this (every d chunk divides it).
D_PAD = {"gpu": 64, "interpreter": 32}


# The interpreter's one tile (tl.dot's minimum of 16 everywhere; D_PAD["interpreter"] = 32) and
# its fewest rows per work item (tests raise it to run the GPU's 128-row tiles).
INTERPRETER_TILE = dict(DC=32, HC=64, NC=64, KC=64, SW=16, num_warps=4, num_stages=1)
INTERPRETER_ROWS = MIN_DOT


def tile_config(direction: str, n_regions: int, lens_list, interpreter: bool,
                op_dtype: torch.dtype = torch.bfloat16, tile: int = 0) -> dict:
    """Rows per tile, segments per tile, context block. On GPU: the ROWS of gpu_tiles(op_dtype)
    [tile] (or more) query rows: by default t2i ~10 COCO captions per 128 rows, i2t 3 images of
    36 regions (108 of 128 rows). In the interpreter: the smallest legal blocks (tl.dot needs
    every dim >= 16)."""
    longest_query = max(lens_list) if direction == "t2i" else n_regions
    n_context = n_regions if direction == "t2i" else max(lens_list)
    floor = INTERPRETER_ROWS if interpreter else gpu_tiles(op_dtype)[tile]["ROWS"]
    return dict(ROWS=_pow2_at_least(longest_query, floor), BSEG=16, CP=_pow2_at_least(n_context))


def alignment_split(sp: int, width: int) -> int:
    """Passes over d of the alignment GEMM (_alignment), each for `width` (the tile's SW) of its
    SP columns: only a (ROWS, width) accumulator is live in registers; ctx is recomputed per
    pass (a CP / width share of the pass's FLOPs more). 1 where SP <= width."""
    return max(1, sp // width)


def _precision_kind(op_dtype: torch.dtype) -> str:
    return "fp32" if op_dtype == torch.float32 else "low"


def gpu_tiles(op_dtype: torch.dtype) -> tuple:
    """The GPU tile space (GPU_TILES) for GEMM operands of op_dtype."""
    return GPU_TILES[_precision_kind(op_dtype)]


def launch_config(direction: str, n_regions: int, lens_list, regulator: str, steps: int,
                  dims: dict, op_dtype: torch.dtype, interpreter: bool, tile: int = 0) -> dict:
    """Every constexpr of _rcar_kernel plus num_warps / num_stages. dims: padded_dims().
    tile: index into gpu_tiles(op_dtype) (ignored by the interpreter, which has one tile)."""
    fp32 = op_dtype == torch.float32
    tiles = gpu_tiles(op_dtype)
    if not interpreter and not 0 <= tile < len(tiles):
        raise ValueError(f"tile must be an index into the {len(tiles)} GPU tiles for "
                         f"{op_dtype} operands (kernels/rcar.py GPU_TILES), got {tile}")
    cfg = tile_config(direction, n_regions, lens_list, interpreter, op_dtype, 0 if interpreter else tile)
    chunks = INTERPRETER_TILE if interpreter else tiles[tile]
    if dims["DP"] % chunks["DC"]:
        raise ValueError(f"padded d {dims['DP']} is not a multiple of the d chunk {chunks['DC']}")
    sp, hp = dims["SP"], dims["HP"]
    # RCR hidden-layer slots: one per RCR step (coop_rcar's last step has none; at least 1)
    n_slots = max(1, {"only_rar": 0, "only_rcr": steps}.get(regulator, steps - 1))
    return dict(
        MODE=MODES[regulator], STEPS=steps, N_SLOTS=n_slots, ROWS=cfg["ROWS"],
        BSEG=cfg["BSEG"], CP=cfg["CP"], SP=sp, HP=hp, HSP=dims["HSP"], HC=min(hp, chunks["HC"]),
        NC=min(sp, chunks["NC"]), KC=min(sp, chunks["KC"]), DC=chunks["DC"],
        S_SPLIT=alignment_split(sp, chunks["SW"]),
        PREC="ieee" if fp32 else "tf32", SEG_PREC="ieee" if fp32 else "tf32",
        LISTED=False,   # all pairs; rcar_pairs_forward sets it
        num_warps=chunks["num_warps"], num_stages=chunks["num_stages"],
        SCRATCH=scratch_elements(cfg["ROWS"], cfg["BSEG"], n_slots, sp, hp, op_dtype),
    )


def rcar_forward(img, cap, lens_list, weights: dict, *, regulator: str, steps: int,
                 direction: str, smooth: float, out=None, tile: int = 0) -> torch.Tensor:
    """All-pairs RCAR scores (n_img, n_cap) float32 from contiguous img (n_img, R, d) and cap
    (n_cap, Lmax, d) and packed weights (WEIGHT_LAYOUT; their operand dtype picks the GEMM
    precision). Padding words are never read. `out`: optional (n_img, n_cap) float32 buffer;
    every entry is written. `tile`: which of gpu_tiles() a GPU launch uses (benchmarks)."""
    n_img, n_regions, d = img.shape
    n_cap, max_len, _ = cap.shape
    if out is None:
        out = torch.empty((n_img, n_cap), device=img.device, dtype=torch.float32)
    elif out.shape != (n_img, n_cap) or out.dtype != torch.float32 or out.device != img.device:
        raise ValueError(f"out must be a float32 ({n_img}, {n_cap}) tensor on {img.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if n_img == 0 or n_cap == 0:
        return out
    interpreter = img.device.type == "cpu"
    op_dtype = weights["wa"].dtype
    dims = dict(DP=weights["wa"].shape[1], SP=weights["wa"].shape[2], HP=weights["w1"].shape[2],
                HSP=weights["ws1"].shape[2])
    DP = dims["DP"]
    if DP < d:
        raise ValueError(f"packed weights have DP={DP} < d={d}")
    cfg = launch_config(direction, n_regions, lens_list, regulator, steps, dims, op_dtype,
                        interpreter, tile)
    if direction == "t2i":
        # Query rows: caption words (row j * Lmax + k); context sets: images.
        queries, contexts = cap, img
        seg_lengths, seg_base = list(lens_list), [j * max_len for j in range(n_cap)]
        counts = torch.full((n_img,), n_regions, dtype=torch.int32)
        stride_set, stride_item = out.stride(0), out.stride(1)
    else:
        queries, contexts = img, cap
        seg_lengths, seg_base = [n_regions] * n_img, [i * n_regions for i in range(n_img)]
        counts = torch.tensor(list(lens_list), dtype=torch.int32)
        stride_set, stride_item = out.stride(1), out.stride(0)
    tile_rows, tile_seg, tile_items = pack_segments(seg_lengths, seg_base, cfg["ROWS"], cfg["BSEG"])
    n_tiles = tile_rows.shape[0]
    _launch(queries, contexts, counts, (tile_rows, tile_seg, tile_items, tile_seg), n_tiles,
            contexts.shape[0] * n_tiles, out, (stride_set, stride_item), weights, cfg, smooth)
    return out


def _launch(queries, contexts, counts, tables, n_tiles: int, n_work: int, out, out_strides,
            weights: dict, cfg: dict, smooth: float) -> None:
    """One _rcar_kernel launch over n_work work items. tables = (tile_rows, tile_seg,
    tile_items, tile_set) int32 host tensors (tile_set: read only when cfg["LISTED"]); a work
    item's scores land at out + set * out_strides[0] + item * out_strides[1]."""
    tile_rows, tile_seg, tile_items, tile_set = tables
    device, d = queries.device, queries.shape[-1]
    rows, DP = cfg["ROWS"], weights["wa"].shape[1]
    op_dtype = weights["wa"].dtype
    tile_seg, tile_items, tile_set, counts = (t.to(device) for t in (tile_seg, tile_items, tile_set, counts))
    # Query rows gathered tile by tile into a zero-padded (n_tiles * ROWS, DP) matrix: the kernel
    # then reads plain 2-D blocks (no per-row gather, no row or d masks), and padding words are
    # never copied. About the size of the query features themselves.
    source = tile_rows.reshape(-1).to(device=device, dtype=torch.int64)
    real = source >= 0
    packed_queries = torch.zeros((tile_rows.shape[0] * rows, DP), device=device, dtype=queries.dtype)
    packed_queries[real, :d] = queries.reshape(-1, d)[source[real]]
    if DP != d:  # contexts padded along d only (d = 1024 is already a multiple)
        padded = torch.zeros(contexts.shape[:2] + (DP,), device=device, dtype=contexts.dtype)
        padded[..., :d] = contexts
        contexts = padded
    contexts = contexts.contiguous()
    gram = context_grams(contexts, counts, cfg["CP"])
    w = weights

    def args(scratch):
        return (packed_queries, contexts, gram, counts, tile_seg, tile_items, tile_set,
                out, *out_strides,
                w["wa"], w["ba"], w["w1"], w["b1"], w["w2"], w["b2"], w["ws1"], w["bs1"],
                w["ws2"], w["bs2"], w["wq"], w["bq"], w["wk"], w["bk"], w["wv"], w["bv"],
                w["we"], w["be"], scratch, n_tiles, n_work, DP, contexts.stride(0), float(smooth))

    if device.type == "cpu":   # the interpreter
        n_prog = min(n_work, 4)
    else:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        # compiled with a one-program scratch: only its dtype and alignment matter there
        probe = torch.empty((1, cfg["SCRATCH"]), device=device, dtype=op_dtype)
        n_prog = min(n_work, _programs_per_sm(args(probe), cfg, device) * sm_count)
    scratch = torch.empty((n_prog, cfg["SCRATCH"]), device=device, dtype=op_dtype)   # per program
    _rcar_kernel[(n_prog,)](*args(scratch), **cfg)


def listed_tiles(set_idx, query_idx, query_lengths, query_base, rows: int, max_segs: int):
    """A pair list as work items: per context set, its listed query items (pair p: query item
    query_idx[p] against set set_idx[p], repeats kept) packed into tiles by pack_segments.
    Returns int32 tile_rows / tile_seg (n_tiles, rows), tile_items (n_tiles, max_segs) [pair
    position or -1] and tile_set (n_tiles,) [the tile's context set]."""
    order = sorted(range(len(set_idx)), key=lambda p: set_idx[p])
    parts, sets, first = [], [], 0
    while first < len(order):
        last = first
        while last < len(order) and set_idx[order[last]] == set_idx[order[first]]:
            last += 1
        listed = order[first:last]
        rows_of, seg_of, items_of = pack_segments([query_lengths[query_idx[p]] for p in listed],
                                                  [query_base[query_idx[p]] for p in listed],
                                                  rows, max_segs)
        positions = torch.tensor(listed + [-1], dtype=torch.int32)   # local item -> pair
        parts.append((rows_of, seg_of, positions[items_of.long()]))
        sets += [set_idx[order[first]]] * rows_of.shape[0]
        first = last
    if not parts:
        empty = torch.zeros((0, rows), dtype=torch.int32)
        return empty, empty, torch.zeros((0, max_segs), dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    tile_rows, tile_seg, tile_items = (torch.cat(t) for t in zip(*parts))
    return tile_rows, tile_seg, tile_items, torch.tensor(sets, dtype=torch.int32)


def rcar_pairs_forward(img, cap, lens_list, weights: dict, img_idx, cap_idx, *, regulator: str,
                       steps: int, direction: str, smooth: float, out=None) -> torch.Tensor:
    """The scores (P,) float32 of the pairs (img[img_idx[p]], cap[cap_idx[p]]) by the all-pairs
    kernel's function (rcar_forward's inputs and weights; img_idx / cap_idx (P,) integer tensors
    in range, checked by the caller; repeats allowed, any order): one launch over the work items
    (context set, tile of that set's listed query items) of listed_tiles, each tile scored
    against its own set (LISTED). `out`: optional (P,) float32 buffer, every entry written."""
    n_img, n_regions, d = img.shape
    n_cap, max_len, _ = cap.shape
    n_pairs = int(img_idx.numel())
    if out is None:
        out = torch.empty((n_pairs,), device=img.device, dtype=torch.float32)
    elif out.shape != (n_pairs,) or out.dtype != torch.float32 or out.device != img.device:
        raise ValueError(f"out must be a float32 ({n_pairs},) tensor on {img.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if n_pairs == 0:
        return out
    interpreter = img.device.type == "cpu"
    op_dtype = weights["wa"].dtype
    dims = dict(DP=weights["wa"].shape[1], SP=weights["wa"].shape[2], HP=weights["w1"].shape[2],
                HSP=weights["ws1"].shape[2])
    DP = dims["DP"]
    if DP < d:
        raise ValueError(f"packed weights have DP={DP} < d={d}")
    cfg = dict(launch_config(direction, n_regions, lens_list, regulator, steps, dims, op_dtype,
                             interpreter), LISTED=True)
    img_list, cap_list = img_idx.tolist(), cap_idx.tolist()
    if direction == "t2i":   # query items: captions (row j * Lmax + k); context sets: images
        queries, contexts, set_idx, query_idx = cap, img, img_list, cap_list
        query_lengths, query_base = list(lens_list), [j * max_len for j in range(n_cap)]
        counts = torch.full((n_img,), n_regions, dtype=torch.int32)
    else:
        queries, contexts, set_idx, query_idx = img, cap, cap_list, img_list
        query_lengths, query_base = [n_regions] * n_img, [i * n_regions for i in range(n_img)]
        counts = torch.tensor(list(lens_list), dtype=torch.int32)
    tables = listed_tiles(set_idx, query_idx, query_lengths, query_base, cfg["ROWS"], cfg["BSEG"])
    n_work = tables[0].shape[0]
    # tile `work` against its own set; the pair's score lands at out[tile_items] (set stride 0)
    _launch(queries, contexts, counts, tables, n_work, n_work, out, (0, 1), weights, cfg, smooth)
    return out


def context_grams(contexts, counts, cp: int, sets_per_chunk: int = 512) -> torch.Tensor:
    """(n_sets, cp, cp) float32 Gram matrices of the context sets (zero outside the real items).
    Computed in float64 (immune to TF32 matmul settings; tiny next to the kernel) in chunks of
    sets so that the upcast copy stays small."""
    n_sets = contexts.shape[0]
    c_max = min(contexts.shape[1], cp)  # items past the longest real count are all padding
    gram = torch.zeros((n_sets, cp, cp), device=contexts.device, dtype=torch.float32)
    real = torch.arange(c_max, device=contexts.device)[None, :] < counts[:, None]
    for s0 in range(0, n_sets, sets_per_chunk):
        block = contexts[s0:s0 + sets_per_chunk, :c_max].double()
        block = torch.where(real[s0:s0 + sets_per_chunk, :, None], block, 0.0)  # NaN padding out
        gram[s0:s0 + sets_per_chunk, :c_max, :c_max] = (block @ block.transpose(1, 2)).float()
    return gram


def padded_dims(d: int, sim_dim: int, interpreter: bool) -> dict:
    """The padded sizes the packed weights must have (see WEIGHT_LAYOUT)."""
    pad = D_PAD["interpreter" if interpreter else "gpu"]
    return dict(DP=triton.cdiv(d, pad) * pad, SP=_pow2_at_least(sim_dim),
                HP=_pow2_at_least(2 * sim_dim), HSP=_pow2_at_least(sim_dim // 2))
