"""Fused RCAR backward (and a dropout-capable forward) in Triton: SIMILARITY.md "RCAR similarity
head", every regulator, any step count, t2i and i2t, RAR's counter-based dropout.

Flash-attention style: nothing of the forward is kept. One program owns one ITEM (a query item or
a context item: a caption or an image) at a time and walks all its partners; for each pair it
recomputes the pair's forward (into a per-program scratch, reused pair after pair), then runs the
pair's backward by hand:

    score <- sigmoid(w_e h + b_e)          (only_rcr: mean_k cos(q_k, l2norm(ctx_k)))
    h <- RAR_n(v, h) ... h_0 = mean_k v_0  (key / question MLPs, dropout masks, softmax over k)
    (m, lambda) <- RCR_t(v_t, m, lambda)   (s -> 2s -> d modulation, s -> s/2 -> 1 temperature)
    v_t = l2norm(W_a (q - l2norm(alpha_t C))^2 + b_a),  alpha_t = softmax_c(lambda a(S_t)),
    S_t = (q * m_t) C^T, a = clipped_l2norm over the pair's queries.

Shaped so that code size and registers do not grow with d or sim_dim: every GEMM is a loop over
fixed column chunks (DC = D_CHUNK along d, SC <= S_CHUNK along s, 2s, s/2) whose operands stream
from global memory (weights) or from the program's scratch (the pair's per-row intermediates:
m_t, ctx_t, (q - u)^2, tanh(W_2 h_1) and its gradient, dm, du: Q x d; z, v, dv, RCR's hidden
layers, RAR's tanh keys and their gradient: Q x s; S, alpha: Q x C; RAR's vectors: s), so a
block in registers is at most (QP, max(CP, DC, SC)). The steps are run-time loops (one copy of
each step's code whatever the step count), m_0 = 1 lives in the scratch (written once per
program), and block offsets come from the host (flat_layout, scratch_layout) as constexpr
tuples. Nothing of size (pairs, Q, d) or (pairs, Q, s) exists for more than the pairs in flight
(one per program).

Input gradients without atomics: a pass whose owners are the query items accumulates d query
(each program writes only its owner's rows); a second pass whose owners are the context items
accumulates d context. Each pair is therefore recomputed twice (one pass per side); the weight
gradients are accumulated in one of the passes only, into a per-program partial (a flat buffer
in the packed weights' layout, `flat_layout`), read-modify-written by its program alone in a
fixed pair order; the host sums the partials over programs (a fixed-shape reduction). The
result is bit-reproducible run to run.

Pair lists (LISTED, rcar_fast's rcar_pairs op): each owner walks only its listed partners
(owner_lists, built on the host: a CSR over owners, repeats kept), the pair's score and output
gradient being its entry in that list; the pairs, ids and masks are those of the all-pairs walk.
The all-pairs backward runs a sparse output gradient (fewer than SPARSE_FRACTION of the pairs
nonzero, NaN counting as nonzero) as the list of its nonzero pairs: same owners, programs and
order, zero-gradient pairs skipped, so the gradients are the full walk's bit for bit (where the
forward is finite: a zero gradient times an Inf is a NaN the full walk would add).

Dropout (training mode): the mask element (seed, module, which, pair, row, channel) of
rcar_fast/dropout.py (the C++ kernel's), hashed in the kernel: pair = i * n_cap + j, row the
query row within the pair; nothing is stored.

Numerics: elementwise math and every accumulation in fp32. GEMM operands: the recomputed
forward's in the "operand dtype" as kernels/rcar.py (fp32 for fp32 inputs, else the inputs'
bf16 / fp16), the backward's in bf16 for bf16 inputs and fp32 otherwise (fp16 would underflow
small gradients; tf32 on a GPU). fp32 GEMMs are "ieee" for fp32 inputs and in the interpreter.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from rcar_fast import contract

from .rcar import WEIGHT_LAYOUT, _sigmoid, _tanh
from .tile import MIN_DOT, interpreter_on, pow2_at_least

MODES = contract.REGULATOR_CODES
_EPS = tl.constexpr(contract.EPS)
_SLOPE = tl.constexpr(contract.LEAKY_SLOPE)
_ONLY_RAR = tl.constexpr(MODES["only_rar"])
_ONLY_RCR = tl.constexpr(MODES["only_rcr"])
_HASH_MULTIPLIER = tl.constexpr(contract.DROPOUT_HASH_MULTIPLIER)   # rcar_fast/dropout.py's mixer
_KEEP_THRESHOLD = tl.constexpr(contract.RAR_DROPOUT_THRESHOLD)
_KEEP_SCALE = tl.constexpr(1.0 / (1.0 - contract.RAR_DROPOUT_P))
# The interpreter runs no inline assembly (_columns); its mode is fixed at import (tests/conftest.py).
_OPAQUE_COLUMNS = tl.constexpr(not interpreter_on())

# The d chunk of every pass over d (packed weights are padded along d to a multiple of it).
D_CHUNK = 32
# The widest column / K chunk of the s-sized GEMMs (sim_dim, 2 sim_dim, sim_dim / 2: powers of
# two, so min(S_CHUNK, HSP) divides all three).
S_CHUNK = 32


# ---------------------------------------------------------------------------------------------
# Layouts: the packed weights (and their gradients) as one flat buffer; the per-program scratch.
# The kernel receives each layout's block offsets as a constexpr tuple (`offsets`), in order.
# ---------------------------------------------------------------------------------------------

def module_slots(regulator: str, counts: dict) -> dict:
    """Slots of each packed module group (at least 1: an absent group has a zero dummy) and the
    number of cross attentions the head runs, from the head's module counts
    (rcar_fast.heads.module_counts, which the caller passes: kernels sit below the models)."""
    attentions = counts["alv"] + (1 if regulator == "only_rcr" else 0)
    return dict(NA=max(1, counts["alv"]), NR=max(1, counts["rcr"]), NN=max(1, counts["rar"]),
                N_ALV=counts["alv"], N_RCR=counts["rcr"], N_RAR=counts["rar"], N_ATT=attentions)


def flat_layout(slots: dict, DP: int, SP: int, HP: int, HSP: int) -> list:
    """(name, shape) of the flat weight buffer's blocks, in kernels/rcar.py WEIGHT_LAYOUT order
    (the order _weight_blocks unpacks)."""
    na, nr, nn = slots["NA"], slots["NR"], slots["NN"]
    shapes = {"wa": (na, DP, SP), "ba": (na, SP), "w1": (nr, SP, HP), "b1": (nr, HP),
              "w2": (nr, HP, DP), "b2": (nr, DP), "ws1": (nr, SP, HSP), "bs1": (nr, HSP),
              "ws2": (nr, HSP), "bs2": (nr,), "wq": (nn, SP, SP), "bq": (nn, SP),
              "wk": (nn, SP, SP), "bk": (nn, SP), "wv": (nn, SP), "bv": (nn,), "we": (SP,),
              "be": (1,)}
    assert tuple(shapes) == tuple(WEIGHT_LAYOUT)
    return list(shapes.items())


def scratch_layout(slots: dict, QP: int, CP: int, DP: int, SP: int, HP: int, HSP: int) -> list:
    """(name, fp32 elements) of one program's scratch blocks, in the order _scratch_blocks
    unpacks: m_t (m_0 = 1), ctx_t (per attention, QP x DP); tanh(W_2 h_1) then its
    pre-activation gradient (per RCR); dm; du (in the forward: (q - u)^2); S_t, alpha_t
    (QP x CP); |ctx_t|, lambda_t (QP); z_t then dz_t, v_t, dv_t (per alignment, QP x SP);
    RCR's hidden layers (QP x HP, QP x HSP, then their gradients) and pre-relu temperature;
    RAR's pair vectors h_0 .. h_n (SP), tanh keys (QP x SP), tanh question, pooled sum (SP),
    softmax weights (QP); the RAR backward's key gradient (QP x SP) and vectors (4 x SP)."""
    att, na, nr, nn = slots["N_ATT"], slots["NA"], slots["NR"], slots["NN"]
    qd, qs = QP * DP, QP * SP
    return [("m", att * qd), ("ctx", att * qd), ("t2", nr * qd), ("dm", qd), ("du", qd),
            ("s", att * QP * CP), ("alpha", att * QP * CP), ("norm", att * QP),
            ("lam", att * QP), ("z", na * qs), ("v", na * qs), ("dv", na * qs),
            ("h1", nr * QP * HP), ("g1", nr * QP * HSP), ("r", nr * QP), ("h", (nn + 1) * SP),
            ("tk", nn * qs), ("tq", nn * SP), ("hs", nn * SP), ("w", nn * QP), ("dk", qs),
            ("vec", 4 * SP)]


def offsets(sizes) -> tuple:
    """Start of each block of a buffer made of blocks of `sizes` elements, back to back."""
    return tuple(itertools.accumulate([0] + list(sizes)[:-1]))


def _numel(shape) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


@triton.jit
def _weight_blocks(base, OFFS: tl.constexpr):
    """Pointers to the blocks of a flat buffer in flat_layout order (weights or gradients)."""
    return (base + OFFS[0], base + OFFS[1], base + OFFS[2], base + OFFS[3], base + OFFS[4],
            base + OFFS[5], base + OFFS[6], base + OFFS[7], base + OFFS[8], base + OFFS[9],
            base + OFFS[10], base + OFFS[11], base + OFFS[12], base + OFFS[13], base + OFFS[14],
            base + OFFS[15], base + OFFS[16], base + OFFS[17])


@triton.jit
def _scratch_blocks(base, OFFS: tl.constexpr):
    """Pointers to a program's scratch blocks in scratch_layout order."""
    return (base + OFFS[0], base + OFFS[1], base + OFFS[2], base + OFFS[3], base + OFFS[4],
            base + OFFS[5], base + OFFS[6], base + OFFS[7], base + OFFS[8], base + OFFS[9],
            base + OFFS[10], base + OFFS[11], base + OFFS[12], base + OFFS[13], base + OFFS[14],
            base + OFFS[15], base + OFFS[16], base + OFFS[17], base + OFFS[18], base + OFFS[19],
            base + OFFS[20], base + OFFS[21])


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _columns(k0, K: tl.constexpr):
    """k0 + arange(K) (k0 a multiple of K), opaque to the compiler on a GPU: otherwise triton
    reassociates each block's offsets into a loop-invariant (rows, K) block plus k0 and hoists
    it out of the persistent loop, where dozens of them stay live (and spill) for the whole
    kernel. The hints keep the loads vectorised."""
    cols = k0 + tl.arange(0, K)
    if _OPAQUE_COLUMNS:
        cols = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [cols], dtype=tl.int32,
                                         is_pure=False, pack=1)
        cols = tl.max_contiguous(tl.multiple_of(cols, K), K)
    return cols


@triton.jit
def _grid2(R: tl.constexpr, K: tl.constexpr, width, k0):
    """Offsets of an (R, K) block at column k0 of a row-major matrix `width` wide."""
    return tl.arange(0, R)[:, None] * width + _columns(k0, K)[None, :]


@triton.jit
def _load_items(base, stride, n_rows, d0, D, R: tl.constexpr, DC: tl.constexpr):
    """(R, DC) fp32 chunk of an item's feature rows; rows >= n_rows and columns >= D are never
    read (NaN padding stays out) and come back as 0. Offsets within the item in int32 (base is
    the item's 64-bit start): loop-invariant int64 offset blocks would be hoisted out of the
    persistent loop and pin (or spill) two registers per element."""
    r = tl.arange(0, R)
    c = _columns(d0, DC)
    mask = (r[:, None] < n_rows) & (c[None, :] < D)
    return tl.load(base + (r[:, None] * stride + c[None, :]), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _accumulate(ptr, offs, value):
    """ptr[offs] += value, by this program alone (its own scratch or partial buffer)."""
    tl.store(ptr + offs, tl.load(ptr + offs) + value)


@triton.jit
def _accumulate_rows(base, stride, n_rows, d0, value, R: tl.constexpr, DC: tl.constexpr):
    """An owner's fp32 gradient rows [d0, d0 + DC) += value (rows < n_rows only)."""
    r = tl.arange(0, R)
    offs = r[:, None] * stride + _columns(d0, DC)[None, :]   # int32: see _load_items
    mask = (r[:, None] < n_rows) & (offs >= 0)
    tl.store(base + offs, tl.load(base + offs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _rows_times(a_ptr, lda, w_ptr, ldw, n0, K: tl.constexpr, ROWS: tl.constexpr,
                KC: tl.constexpr, NC: tl.constexpr, W_TRANSPOSED: tl.constexpr,
                OPD: tl.constexpr, PREC: tl.constexpr):
    """(ROWS, NC) fp32 = A[:, :K] @ W[:K, n0:n0+NC] (W_TRANSPOSED: A[:, :K] @ W[n0:n0+NC, :K]^T)
    with A a row-major fp32 scratch block (leading dimension lda) and W row-major (ldw), in K
    chunks of KC, operands cast to OPD."""
    rows = tl.arange(0, ROWS)
    ns = _columns(n0, NC)
    acc = tl.zeros((ROWS, NC), tl.float32)
    for k0 in range(0, K, KC):
        ks = _columns(k0, KC)
        a = tl.load(a_ptr + rows[:, None] * lda + ks[None, :])
        if W_TRANSPOSED:
            b = tl.load(w_ptr + ns[None, :] * ldw + ks[:, None])
        else:
            b = tl.load(w_ptr + ks[:, None] * ldw + ns[None, :])
        acc += tl.dot(a.to(OPD), b.to(OPD), input_precision=PREC)
    return acc


@triton.jit
def _accumulate_product(g_ptr, ldg, m0, n0, a, b, OPD: tl.constexpr, PREC: tl.constexpr):
    """G[m0:m0+M, n0:n0+N] += a^T b (a (ROWS, M), b (ROWS, N)): a weight gradient block."""
    offs = ((m0 + tl.arange(0, a.shape[1]))[:, None] * ldg
            + (n0 + tl.arange(0, b.shape[1]))[None, :])
    _accumulate(g_ptr, offs, tl.dot(tl.trans(a.to(OPD)), b.to(OPD), input_precision=PREC))


@triton.jit
def _fill(ptr, value, ROWS: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """A (ROWS, WIDTH) row-major scratch block := value, CHUNK columns at a time."""
    for c0 in range(0, WIDTH, CHUNK):
        tl.store(ptr + _grid2(ROWS, CHUNK, WIDTH, c0), tl.full((ROWS, CHUNK), value, tl.float32))


# ---------------------------------------------------------------------------------------------
# RAR dropout masks (rcar_fast/dropout.py, the same bits)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _hash32(x):
    x = ((x >> 16) ^ x) * _HASH_MULTIPLIER
    x = ((x >> 16) ^ x) * _HASH_MULTIPLIER
    return (x >> 16) ^ x


@triton.jit
def _mix_in(h, lo, hi):
    """Folds the 64-bit counter (hi, lo) (uint32 words) into the hash state h."""
    return _hash32(_hash32(h ^ lo) ^ hi)


@triton.jit
def _dropout_row_keys(seed_lo, seed_hi, module, which, pair, rows):
    """The hash state of (seed, module, which, pair, row) for a tensor of rows (uint32)."""
    wide = rows.to(tl.int64) * 0
    zero = wide.to(tl.uint32)
    h = _mix_in(zero, (wide + seed_lo).to(tl.uint32), (wide + seed_hi).to(tl.uint32))
    h = _mix_in(h, zero + (2 * module + which), zero)
    pair64 = pair.to(tl.int64)
    h = _mix_in(h, zero + (pair64 & 0xFFFFFFFF).to(tl.uint32), zero + (pair64 >> 32).to(tl.uint32))
    return _mix_in(h, rows.to(tl.uint32), zero)


@triton.jit
def _dropout_scales(keys, c0, SC: tl.constexpr):
    """(len(keys), SC) fp32 for channels c0 .. c0+SC: 0 where dropped, 1 / (1 - p) where kept."""
    channel = (c0 + tl.arange(0, SC)).to(tl.uint32)
    bits = _hash32(keys[:, None] ^ channel[None, :])
    return tl.where(bits >= _KEEP_THRESHOLD, _KEEP_SCALE, 0.0)


@triton.jit
def _rar_dropout(seed_lo, seed_hi, module, pair, c0, DROPOUT: tl.constexpr, QP: tl.constexpr,
                 SC: tl.constexpr):
    """RAR `module`'s dropout scales of channels c0 .. c0+SC: keys (QP, SC), question (SC,)."""
    key_scale = tl.full((QP, SC), 1.0, tl.float32)
    question_scale = tl.full((SC,), 1.0, tl.float32)
    if DROPOUT:
        rows = tl.arange(0, QP)
        key_scale = _dropout_scales(_dropout_row_keys(seed_lo, seed_hi, module, 0, pair, rows),
                                    c0, SC)
        question_row = tl.arange(0, 2) * 0   # the question's one row, twice (shape >= 2)
        question_scale = tl.sum(_dropout_scales(
            _dropout_row_keys(seed_lo, seed_hi, module, 1, pair, question_row), c0, SC),
            axis=0) * 0.5
    return key_scale, question_scale


@triton.jit
def _dropout_mask_kernel(out, seed_lo, seed_hi, module, which, pair, ROWS: tl.constexpr,
                         SP: tl.constexpr):
    rows = tl.arange(0, ROWS)
    scales = _dropout_scales(_dropout_row_keys(seed_lo, seed_hi, module, which, pair, rows), 0,
                             SP)
    tl.store(out + rows[:, None] * SP + tl.arange(0, SP)[None, :], scales)


def dropout_scales(seed: int, module: int, which: int, pair: int, rows: int, channels: int,
                   device="cpu") -> torch.Tensor:
    """The kernel's dropout scales of one pair, (rows, channels) fp32 (rows and channels powers
    of two): what tests compare with rcar_fast.dropout.rar_scales bit for bit."""
    out = torch.empty((rows, channels), device=device, dtype=torch.float32)
    _dropout_mask_kernel[(1,)](out, seed & 0xFFFFFFFF, seed >> 32, module, which, pair,
                               ROWS=rows, SP=channels)
    return out


# ---------------------------------------------------------------------------------------------
# Forward pieces (recomputation of one pair into the scratch). Each ends with a barrier: what
# it wrote is complete before any thread of the program reads it.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attention_forward(qb, sq, nq, cb, sc, nc, D, m_blk, lam, s_blk, al_blk, ctx_blk, nrm_blk,
                       QP: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr,
                       OPD: tl.constexpr, PREC: tl.constexpr):
    """S = (q * m) C^T, alpha = softmax_c(lambda clipped_l2norm(S)), ctx = alpha C, |ctx|."""
    rows = tl.arange(0, QP)
    ctx_ok = tl.arange(0, CP) < nc
    scores = tl.zeros((QP, CP), tl.float32)
    for d0 in range(0, DP, DC):
        q = _load_items(qb, sq, nq, d0, D, QP, DC) * tl.load(m_blk + _grid2(QP, DC, DP, d0))
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        scores += tl.dot(q.to(OPD), tl.trans(c.to(OPD)), input_precision=PREC)
    x = tl.where(scores > 0, scores, _SLOPE * scores)
    x = tl.where((rows < nq)[:, None], x, 0.0)
    a = x / (tl.sqrt(tl.sum(x * x, axis=0)) + _EPS)[None, :]
    logits = tl.where(ctx_ok[None, :], lam[:, None] * a, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    alpha = e / tl.sum(e, axis=1)[:, None]
    tl.store(s_blk + _grid2(QP, CP, CP, 0), scores)
    tl.store(al_blk + _grid2(QP, CP, CP, 0), alpha)
    alpha_op = alpha.to(OPD)
    sumsq = tl.zeros((QP,), tl.float32)
    for d0 in range(0, DP, DC):
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        ctx = tl.dot(alpha_op, c.to(OPD), input_precision=PREC)
        tl.store(ctx_blk + _grid2(QP, DC, DP, d0), ctx)
        sumsq += tl.sum(ctx * ctx, axis=1)
    tl.store(nrm_blk + rows, tl.sqrt(sumsq))
    tl.debug_barrier()


@triton.jit
def _alignment_forward(qb, sq, nq, D, ctx_blk, nrm_blk, diff2_blk, wa, ba, z_blk, v_blk,
                       QP: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr,
                       SC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr):
    """z = W_a (q - ctx / (|ctx| + eps))^2 + b_a and v = l2norm(z), both to the scratch; the
    squared difference is staged in the scratch (diff2_blk) and streamed as the GEMM's A."""
    inv = 1.0 / (tl.load(nrm_blk + tl.arange(0, QP)) + _EPS)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        diff = _load_items(qb, sq, nq, d0, D, QP, DC) - tl.load(ctx_blk + offs) * inv[:, None]
        tl.store(diff2_blk + offs, diff * diff)
    tl.debug_barrier()
    sumsq = tl.zeros((QP,), tl.float32)
    for s0 in range(0, SP, SC):
        z = (_rows_times(diff2_blk, DP, wa, SP, s0, DP, QP, DC, SC, False, OPD, PREC)
             + tl.load(ba + s0 + tl.arange(0, SC))[None, :])
        tl.store(z_blk + _grid2(QP, SC, SP, s0), z)
        sumsq += tl.sum(z * z, axis=1)
    tl.debug_barrier()
    inv_norm = 1.0 / (tl.sqrt(sumsq) + _EPS)
    for s0 in range(0, SP, SC):
        offs = _grid2(QP, SC, SP, s0)
        tl.store(v_blk + offs, tl.load(z_blk + offs) * inv_norm[:, None])
    tl.debug_barrier()


@triton.jit
def _rcr_forward(v_blk, lam, m_old, m_new, t2_blk, h1_blk, g1_blk, r_blk, w1, b1, w2, b2, ws1,
                 bs1, ws2, bs2, QP: tl.constexpr, SP: tl.constexpr, HP: tl.constexpr,
                 HSP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, SC: tl.constexpr,
                 OPD: tl.constexpr, PREC: tl.constexpr):
    """m <- clamp(tanh(W_2 tanh(W_1 v + b_1) + b_2) + m, -1, 1), lambda <- relu(w_s2 .
    tanh(W_s1 v + b_s1) + b_s2 + lambda). Returns the new lambda."""
    for h0 in range(0, HP, SC):
        h1 = _tanh(_rows_times(v_blk, SP, w1, HP, h0, SP, QP, SC, SC, False, OPD, PREC)
                   + tl.load(b1 + h0 + tl.arange(0, SC))[None, :])
        tl.store(h1_blk + _grid2(QP, SC, HP, h0), h1)
    r = tl.zeros((QP,), tl.float32)
    for g0 in range(0, HSP, SC):
        gs = g0 + tl.arange(0, SC)
        g1 = _tanh(_rows_times(v_blk, SP, ws1, HSP, g0, SP, QP, SC, SC, False, OPD, PREC)
                   + tl.load(bs1 + gs)[None, :])
        tl.store(g1_blk + _grid2(QP, SC, HSP, g0), g1)
        r += tl.sum(g1 * tl.load(ws2 + gs)[None, :], axis=1)
    r += tl.load(bs2) + lam
    tl.store(r_blk + tl.arange(0, QP), r)
    tl.debug_barrier()
    for d0 in range(0, DP, DC):
        t2 = _tanh(_rows_times(h1_blk, HP, w2, DP, d0, HP, QP, SC, DC, False, OPD, PREC)
                   + tl.load(b2 + d0 + tl.arange(0, DC))[None, :])
        offs = _grid2(QP, DC, DP, d0)
        tl.store(t2_blk + offs, t2)
        tl.store(m_new + offs, tl.minimum(tl.maximum(t2 + tl.load(m_old + offs), -1.0), 1.0))
    tl.debug_barrier()
    return tl.maximum(r, 0.0)


@triton.jit
def _rar_forward(v_blk, h_in, h_out, tk_blk, tq_blk, hs_blk, w_blk, nq, wq, bq, wk, bk, wv, bv,
                 seed_lo, seed_hi, module, pair, DROPOUT: tl.constexpr, QP: tl.constexpr,
                 SP: tl.constexpr, SC: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr):
    """h_out = l2norm(sum_k w_k v_k), w = softmax_k(w_v . (drop(tanh(W_k v_k + b_k)) *
    drop(tanh(W_q h_in + b_q))) + b_v); the tanh keys and question, the pooled sum and w stay
    in the scratch for the backward."""
    rows = tl.arange(0, QP)
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        acc = tl.zeros((SC,), tl.float32)
        for k0 in range(0, SP, SC):
            ks = k0 + tl.arange(0, SC)
            acc += tl.sum(tl.load(h_in + ks)[:, None] * tl.load(wq + ks[:, None] * SP + cs[None, :]),
                          axis=0)
        tl.store(tq_blk + cs, _tanh(acc + tl.load(bq + cs)))
    tl.debug_barrier()
    logits = tl.zeros((QP,), tl.float32)
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        tk = _tanh(_rows_times(v_blk, SP, wk, SP, c0, SP, QP, SC, SC, False, OPD, PREC)
                   + tl.load(bk + cs)[None, :])
        tl.store(tk_blk + _grid2(QP, SC, SP, c0), tk)
        key_scale, question_scale = _rar_dropout(seed_lo, seed_hi, module, pair, c0, DROPOUT,
                                                 QP, SC)
        question = tl.load(tq_blk + cs) * question_scale * tl.load(wv + cs)
        logits += tl.sum(tk * key_scale * question[None, :], axis=1)
    logits = tl.where(rows < nq, logits + tl.load(bv), float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0))
    w = e / tl.sum(e, axis=0)
    tl.store(w_blk + rows, w)
    sumsq = tl.zeros((SC,), tl.float32)
    for c0 in range(0, SP, SC):
        hs = tl.sum(w[:, None] * tl.load(v_blk + _grid2(QP, SC, SP, c0)), axis=0)
        tl.store(hs_blk + c0 + tl.arange(0, SC), hs)
        sumsq += hs * hs
    tl.debug_barrier()
    inv = 1.0 / (tl.sqrt(tl.sum(sumsq, axis=0)) + _EPS)
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        tl.store(h_out + cs, tl.load(hs_blk + cs) * inv)
    tl.debug_barrier()


@triton.jit
def _mean_rows(v_blk, h_out, nq, QP: tl.constexpr, SP: tl.constexpr, SC: tl.constexpr):
    """h_0 = mean of v over the pair's real queries."""
    row_ok = tl.arange(0, QP) < nq
    for c0 in range(0, SP, SC):
        v = tl.load(v_blk + _grid2(QP, SC, SP, c0))
        tl.store(h_out + c0 + tl.arange(0, SC), tl.sum(tl.where(row_ok[:, None], v, 0.0), axis=0) / nq)
    tl.debug_barrier()


@triton.jit
def _vector_dot(x, y, SP: tl.constexpr, SC: tl.constexpr):
    """x . y of two SP-vectors in memory."""
    acc = tl.zeros((SC,), tl.float32)
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        acc += tl.load(x + cs) * tl.load(y + cs)
    return tl.sum(acc, axis=0)


# ---------------------------------------------------------------------------------------------
# Backward pieces (each ends with a barrier, as the forward ones)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _score_backward(h, we, ds, dh, gwe, gbe, WANT_W: tl.constexpr, SP: tl.constexpr,
                    SC: tl.constexpr):
    """score = sigmoid(w_e . h + b_e), ds its pre-sigmoid gradient: d h and w_e, b_e's grads."""
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        if WANT_W:
            _accumulate(gwe, cs, ds * tl.load(h + cs))
        tl.store(dh + cs, ds * tl.load(we + cs))
    if WANT_W:
        _accumulate(gbe, 0, ds)
    tl.debug_barrier()


@triton.jit
def _rar_backward(v_blk, dv_blk, h_in, tk_blk, tq_blk, hs_blk, w_blk, dh_out, dh_in, vec, dk_blk,
                  nq, wq, wk, wv, gwq, gbq, gwk, gbk, gwv, gbv, seed_lo, seed_hi, module, pair,
                  WANT_W: tl.constexpr, DROPOUT: tl.constexpr, QP: tl.constexpr,
                  SP: tl.constexpr, SC: tl.constexpr, GPD: tl.constexpr, PREC: tl.constexpr):
    """Given d h_out (SP, scratch): d v (added to the scratch dv), d h_in (to the scratch),
    weight grads. vec: two SP-vectors of scratch (d hs, d question pre-activation)."""
    rows = tl.arange(0, QP)
    row_ok = rows < nq
    dhs_blk = vec
    dq_blk = vec + SP
    # d hs of h_out = hs / (|hs| + eps)
    n = tl.sqrt(_vector_dot(hs_blk, hs_blk, SP, SC))
    coef = _vector_dot(hs_blk, dh_out, SP, SC) / (tl.where(n > 0, n, 1.0) * (n + _EPS) * (n + _EPS))
    w = tl.load(w_blk + rows)
    dw = tl.zeros((QP,), tl.float32)
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        dhs = tl.load(dh_out + cs) / (n + _EPS) - tl.load(hs_blk + cs) * coef
        tl.store(dhs_blk + cs, dhs)
        dw += tl.sum(dhs[None, :] * tl.load(v_blk + _grid2(QP, SC, SP, c0)), axis=1)
    dlog = tl.where(row_ok, w * (dw - tl.sum(w * dw, axis=0)), 0.0)
    for c0 in range(0, SP, SC):
        cs = c0 + tl.arange(0, SC)
        tk = tl.load(tk_blk + _grid2(QP, SC, SP, c0))
        key_scale, question_scale = _rar_dropout(seed_lo, seed_hi, module, pair, c0, DROPOUT,
                                                 QP, SC)
        tq = tl.load(tq_blk + cs)
        wvv = tl.load(wv + cs)
        question = tq * question_scale
        kd = tl.sum(dlog[:, None] * tk * key_scale, axis=0)       # sum_k dlog_k keys_k
        dq_pre = kd * wvv * question_scale * (1.0 - tq * tq)
        dk_pre = dlog[:, None] * (question * wvv)[None, :] * key_scale * (1.0 - tk * tk)
        tl.store(dq_blk + cs, dq_pre)
        tl.store(dk_blk + _grid2(QP, SC, SP, c0), dk_pre)
        if WANT_W:
            _accumulate(gwv, cs, kd * question)
            _accumulate(gbk, cs, tl.sum(dk_pre, axis=0))
            _accumulate(gbq, cs, dq_pre)
    if WANT_W:
        _accumulate(gbv, 0, tl.sum(dlog, axis=0))
    tl.debug_barrier()
    for j0 in range(0, SP, SC):
        js = j0 + tl.arange(0, SC)
        offs = _grid2(QP, SC, SP, j0)
        dv = (w[:, None] * tl.load(dhs_blk + js)[None, :]
              + _rows_times(dk_blk, SP, wk, SP, j0, SP, QP, SC, SC, True, GPD, PREC))
        _accumulate(dv_blk, offs, dv)
        acc = tl.zeros((SC,), tl.float32)
        for c0 in range(0, SP, SC):
            cs = c0 + tl.arange(0, SC)
            acc += tl.sum(tl.load(wq + js[:, None] * SP + cs[None, :])
                          * tl.load(dq_blk + cs)[None, :], axis=1)
        tl.store(dh_in + js, acc)
        if WANT_W:
            v = tl.load(v_blk + offs)
            h = tl.load(h_in + js)
            for c0 in range(0, SP, SC):
                cs = c0 + tl.arange(0, SC)
                _accumulate_product(gwk, SP, j0, c0, v, tl.load(dk_blk + _grid2(QP, SC, SP, c0)),
                                    GPD, PREC)
                _accumulate(gwq, js[:, None] * SP + cs[None, :],
                            h[:, None] * tl.load(dq_blk + cs)[None, :])
    tl.debug_barrier()


@triton.jit
def _mean_rows_backward(dh, dv_blk, nq, QP: tl.constexpr, SP: tl.constexpr, SC: tl.constexpr):
    """h_0 = mean of v_0 over the pair's real queries: d v_0 += d h_0 / nq on those rows."""
    row_ok = tl.arange(0, QP) < nq
    for c0 in range(0, SP, SC):
        d = tl.load(dh + c0 + tl.arange(0, SC))
        _accumulate(dv_blk, _grid2(QP, SC, SP, c0), tl.where(row_ok[:, None], d[None, :] / nq, 0.0))
    tl.debug_barrier()


@triton.jit
def _rcr_backward(v_blk, dv_blk, dlam, m_old, dm_blk, t2_blk, h1_blk, g1_blk, r_blk, nq,
                  w1, w2, ws1, ws2, gw1, gb1, gw2, gb2, gws1, gbs1, gws2, gbs2,
                  WANT_W: tl.constexpr, QP: tl.constexpr, SP: tl.constexpr, HP: tl.constexpr,
                  HSP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, SC: tl.constexpr,
                  GPD: tl.constexpr, PREC: tl.constexpr):
    """Given d m_new (the scratch dm) and d lambda_new: d v (added), d m_old (left in dm),
    d lambda_old (returned), weight grads. The hidden layers' scratch is overwritten by their
    pre-activation gradients (t2 by dz2, h1 by dz1, g1 by dzs)."""
    rows_ok = tl.arange(0, QP) < nq
    r = tl.load(r_blk + tl.arange(0, QP))
    dr = tl.where((r > 0) & rows_ok, dlam, 0.0)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        t2 = tl.load(t2_blk + offs)
        pre = t2 + tl.load(m_old + offs)
        dpre = tl.where((pre >= -1.0) & (pre <= 1.0) & rows_ok[:, None], tl.load(dm_blk + offs),
                        0.0)
        tl.store(dm_blk + offs, dpre)
        dz2 = dpre * (1.0 - t2 * t2)
        tl.store(t2_blk + offs, dz2)
        if WANT_W:
            _accumulate(gb2, d0 + tl.arange(0, DC), tl.sum(dz2, axis=0))
    tl.debug_barrier()
    for h0 in range(0, HP, SC):
        offs = _grid2(QP, SC, HP, h0)
        h1 = tl.load(h1_blk + offs)
        dz1 = (_rows_times(t2_blk, DP, w2, DP, h0, DP, QP, DC, SC, True, GPD, PREC)
               * (1.0 - h1 * h1))
        if WANT_W:
            for d0 in range(0, DP, DC):
                _accumulate_product(gw2, DP, h0, d0, h1, tl.load(t2_blk + _grid2(QP, DC, DP, d0)),
                                    GPD, PREC)
            _accumulate(gb1, h0 + tl.arange(0, SC), tl.sum(dz1, axis=0))
        tl.debug_barrier()   # every thread has read h1 before it is overwritten
        tl.store(h1_blk + offs, dz1)
    for g0 in range(0, HSP, SC):
        gs = g0 + tl.arange(0, SC)
        offs = _grid2(QP, SC, HSP, g0)
        g1 = tl.load(g1_blk + offs)
        dzs = dr[:, None] * tl.load(ws2 + gs)[None, :] * (1.0 - g1 * g1)
        tl.store(g1_blk + offs, dzs)
        if WANT_W:
            _accumulate(gws2, gs, tl.sum(dr[:, None] * g1, axis=0))
            _accumulate(gbs1, gs, tl.sum(dzs, axis=0))
    if WANT_W:
        _accumulate(gbs2, 0, tl.sum(dr, axis=0))
    tl.debug_barrier()
    for j0 in range(0, SP, SC):
        offs = _grid2(QP, SC, SP, j0)
        dv = (_rows_times(h1_blk, HP, w1, HP, j0, HP, QP, SC, SC, True, GPD, PREC)
              + _rows_times(g1_blk, HSP, ws1, HSP, j0, HSP, QP, SC, SC, True, GPD, PREC))
        _accumulate(dv_blk, offs, dv)
        if WANT_W:
            v = tl.load(v_blk + offs)
            for h0 in range(0, HP, SC):
                _accumulate_product(gw1, HP, j0, h0, v, tl.load(h1_blk + _grid2(QP, SC, HP, h0)),
                                    GPD, PREC)
            for g0 in range(0, HSP, SC):
                _accumulate_product(gws1, HSP, j0, g0, v,
                                    tl.load(g1_blk + _grid2(QP, SC, HSP, g0)), GPD, PREC)
    tl.debug_barrier()
    return dr


@triton.jit
def _attention_backward(qb, sq, nq, cb, sc, nc, D, dqb, dcb, gstride, m_blk, lam, s_blk, al_blk,
                        ctx_blk, nrm_blk, du_blk, du_ctx, dm_blk,
                        OWNER_IS_QUERY: tl.constexpr, QP: tl.constexpr, CP: tl.constexpr,
                        DP: tl.constexpr, DC: tl.constexpr, GPD: tl.constexpr,
                        PREC: tl.constexpr):
    """Backward of u = l2norm(ctx), ctx = alpha C, alpha(S(q * m, C), lambda) given d u (in the
    scratch du) and du_ctx = sum_d du * ctx per row: adds d m (scratch), the owner's d q or d C
    (global), returns d lambda."""
    rows = tl.arange(0, QP)
    row_ok = rows < nq
    ctx_ok = tl.arange(0, CP) < nc
    nrm = tl.load(nrm_blk + rows)
    safe = tl.where(nrm > 0, nrm, 1.0)
    inv = 1.0 / (nrm + _EPS)
    coef = du_ctx / (safe * (nrm + _EPS) * (nrm + _EPS))
    alpha = tl.load(al_blk + _grid2(QP, CP, CP, 0))
    dalpha = tl.zeros((QP, CP), tl.float32)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        dctx = tl.load(du_blk + offs) * inv[:, None] - tl.load(ctx_blk + offs) * coef[:, None]
        dctx = tl.where(row_ok[:, None], dctx, 0.0)
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        dalpha += tl.dot(dctx.to(GPD), tl.trans(c.to(GPD)), input_precision=PREC)
        if not OWNER_IS_QUERY:
            _accumulate_rows(dcb, gstride, nc, d0,
                             tl.dot(tl.trans(alpha.to(GPD)), dctx.to(GPD), input_precision=PREC),
                             CP, DC)
    tl.debug_barrier()  # the first loop's d C rows are complete before the second adds
    dlogits = alpha * (dalpha - tl.sum(alpha * dalpha, axis=1)[:, None])
    dlogits = tl.where(ctx_ok[None, :], dlogits, 0.0)
    scores = tl.load(s_blk + _grid2(QP, CP, CP, 0))
    x = tl.where(scores > 0, scores, _SLOPE * scores)
    x = tl.where(row_ok[:, None], x, 0.0)
    n = tl.sqrt(tl.sum(x * x, axis=0))
    dlam = tl.sum(dlogits * (x / (n + _EPS)[None, :]), axis=1)
    da = dlogits * lam[:, None]
    n_safe = tl.where(n > 0, n, 1.0)
    dx = da / (n + _EPS)[None, :] - x * (tl.sum(da * x, axis=0) / (n_safe * (n + _EPS) * (n + _EPS)))[None, :]
    ds = tl.where(scores > 0, dx, _SLOPE * dx)
    ds = tl.where(row_ok[:, None] & ctx_ok[None, :], ds, 0.0).to(GPD)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        m = tl.load(m_blk + offs)
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        dqm = tl.dot(ds, c.to(GPD), input_precision=PREC)
        _accumulate(dm_blk, offs, dqm * q)
        if OWNER_IS_QUERY:
            _accumulate_rows(dqb, gstride, nq, d0, dqm * m, QP, DC)
        else:
            _accumulate_rows(dcb, gstride, nc, d0,
                             tl.dot(tl.trans(ds), (q * m).to(GPD), input_precision=PREC), CP, DC)
    tl.debug_barrier()
    return tl.where(row_ok, dlam, 0.0)


@triton.jit
def _alignment_backward(qb, sq, nq, D, dqb, gstride, ctx_blk, nrm_blk, z_blk, dv_blk, du_blk,
                        wa, gwa, gba, WANT_W: tl.constexpr, OWNER_IS_QUERY: tl.constexpr,
                        QP: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr,
                        DC: tl.constexpr, SC: tl.constexpr, GPD: tl.constexpr,
                        PREC: tl.constexpr):
    """Backward of v = l2norm(W_a (q - u)^2 + b_a): d u to the scratch, the owner's d q, weight
    grads (z is overwritten by dz); returns sum_d du * ctx per row (for the attention
    backward)."""
    rows_ok = tl.arange(0, QP) < nq
    zz = tl.zeros((QP,), tl.float32)
    zd = tl.zeros((QP,), tl.float32)
    for s0 in range(0, SP, SC):
        offs = _grid2(QP, SC, SP, s0)
        z = tl.load(z_blk + offs)
        zz += tl.sum(z * z, axis=1)
        zd += tl.sum(z * tl.load(dv_blk + offs), axis=1)
    tl.debug_barrier()   # z is read by all before it is overwritten by dz
    # d z of v = z / (|z| + eps) per row (rows with |z| = 0 get dv / eps)
    n = tl.sqrt(zz)
    coef = zd / (tl.where(n > 0, n, 1.0) * (n + _EPS) * (n + _EPS))
    for s0 in range(0, SP, SC):
        offs = _grid2(QP, SC, SP, s0)
        dz = tl.load(dv_blk + offs) / (n + _EPS)[:, None] - tl.load(z_blk + offs) * coef[:, None]
        dz = tl.where(rows_ok[:, None], dz, 0.0)
        tl.store(z_blk + offs, dz)
        if WANT_W:
            _accumulate(gba, s0 + tl.arange(0, SC), tl.sum(dz, axis=0))
    tl.debug_barrier()
    inv = 1.0 / (tl.load(nrm_blk + tl.arange(0, QP)) + _EPS)
    du_ctx = tl.zeros((QP,), tl.float32)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        ctx = tl.load(ctx_blk + offs)
        diff = q - ctx * inv[:, None]
        ddiff = 2.0 * diff * _rows_times(z_blk, SP, wa, SP, d0, SP, QP, SC, DC, True, GPD, PREC)
        if OWNER_IS_QUERY:
            _accumulate_rows(dqb, gstride, nq, d0, ddiff, QP, DC)
        tl.store(du_blk + offs, -ddiff)
        du_ctx += tl.sum(-ddiff * ctx, axis=1)
        if WANT_W:
            diff2 = diff * diff
            for s0 in range(0, SP, SC):
                _accumulate_product(gwa, SP, d0, s0, diff2, tl.load(z_blk + _grid2(QP, SC, SP, s0)),
                                    GPD, PREC)
    tl.debug_barrier()
    return du_ctx


@triton.jit
def _cosine_backward(qb, sq, nq, D, dqb, gstride, ctx_blk, nrm_blk, du_blk, g,
                     OWNER_IS_QUERY: tl.constexpr, QP: tl.constexpr, DP: tl.constexpr,
                     DC: tl.constexpr):
    """only_rcr: score = mean_k cos(q_k, u_k), u = ctx / (|ctx| + eps). Returns the score; with
    g (the score's gradient) != 0 also writes d u to the scratch (and the owner's d q) and
    returns sum_d du * ctx per row."""
    rows = tl.arange(0, QP)
    row_ok = rows < nq
    nrm = tl.load(nrm_blk + rows)
    inv = 1.0 / (nrm + _EPS)
    q_ctx = tl.zeros((QP,), tl.float32)
    q_sq = tl.zeros((QP,), tl.float32)
    for d0 in range(0, DP, DC):
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        q_ctx += tl.sum(q * tl.load(ctx_blk + _grid2(QP, DC, DP, d0)), axis=1)
        q_sq += tl.sum(q * q, axis=1)
    dot = q_ctx * inv
    q_norm = tl.sqrt(q_sq)
    u_norm = nrm * inv
    den = tl.maximum(q_norm * u_norm, _EPS)
    cos = tl.where(row_ok, dot / den, 0.0)
    score = tl.sum(cos, axis=0) / nq
    dr = tl.where(row_ok, g / nq, 0.0)
    ddot = dr / den
    dden = tl.where(q_norm * u_norm >= _EPS, -dr * dot / (den * den), 0.0)
    dq_scale = dden * u_norm / tl.where(q_norm > 0, q_norm, 1.0)
    du_scale = dden * q_norm / tl.where(u_norm > 0, u_norm, 1.0)
    du_ctx = tl.zeros((QP,), tl.float32)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        ctx = tl.load(ctx_blk + offs)
        u = ctx * inv[:, None]
        du = ddot[:, None] * q + du_scale[:, None] * u
        tl.store(du_blk + offs, du)
        du_ctx += tl.sum(du * ctx, axis=1)
        if OWNER_IS_QUERY:
            _accumulate_rows(dqb, gstride, nq, d0, ddot[:, None] * u + dq_scale[:, None] * q,
                             QP, DC)
    tl.debug_barrier()
    return score, du_ctx


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rcar_pair_kernel(
        q_ptr, q_lens, stride_qi, stride_qr, c_ptr, c_lens, stride_ci, stride_cr,
        grad_ptr, out_ptr, stride_gq, stride_gc, pair_q, pair_c,
        dgrad_ptr, stride_di, stride_dr,
        w_ptr, wf_ptr, wb_ptr, gw_ptr, gw_stride, scratch_ptr, scratch_stride,
        n_owner, n_partner, D, smooth, seed_lo, seed_hi, list_start, list_partner,
        MODE: tl.constexpr, N_ALV: tl.constexpr, N_RCR: tl.constexpr, N_RAR: tl.constexpr,
        OWNER_IS_QUERY: tl.constexpr, WANT_W: tl.constexpr, FORWARD_ONLY: tl.constexpr,
        LISTED: tl.constexpr,
        DROPOUT: tl.constexpr, QP: tl.constexpr, CP: tl.constexpr, SP: tl.constexpr,
        HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr,
        SC: tl.constexpr, W_OFFS: tl.constexpr, S_OFFS: tl.constexpr, PREC: tl.constexpr):
    """Programs walk owners pid, pid + grid, ...; each owner against every partner in order
    (LISTED: against its listed partners list_partner[list_start[owner] : list_start[owner + 1]],
    and the pair's score and output gradient are entry k of out / grad, k its list position).
    FORWARD_ONLY: the scores (out). Else the owner's input gradient rows (dgrad, fp32,
    (n_owner, rows, DP)) and, with WANT_W, the program's weight-gradient partial.
    w_ptr: the fp32 flat weights (biases, vectors); wf_ptr / wb_ptr: the same in the forward's /
    the backward's GEMM operand dtype (its matrices are read from there)."""
    pid = tl.program_id(0)
    OPD: tl.constexpr = wf_ptr.dtype.element_ty
    GPD: tl.constexpr = wb_ptr.dtype.element_ty
    (_wa, ba, _w1, b1, _w2, b2, _ws1, bs1, ws2, bs2, wq, bq, _wk, bk, wv, bv, we,
     be) = _weight_blocks(w_ptr, W_OFFS)
    (fwa, _ba, fw1, _b1, fw2, _b2, fws1, _bs1, _ws2, _bs2, _wq, _bq, fwk, _bk, _wv, _bv, _we,
     _be) = _weight_blocks(wf_ptr, W_OFFS)
    (bwa, _ba, bw1, _b1, bw2, _b2, bws1, _bs1, _ws2, _bs2, _wq, _bq, bwk, _bk, _wv, _bv, _we,
     _be) = _weight_blocks(wb_ptr, W_OFFS)
    (gwa, gba, gw1, gb1, gw2, gb2, gws1, gbs1, gws2, gbs2, gwq, gbq, gwk, gbk, gwv, gbv, gwe,
     gbe) = _weight_blocks(gw_ptr + pid.to(tl.int64) * gw_stride, W_OFFS)
    (sm, sctx, st2, sdm, sdu, ss, sal, snrm, slam, sz, sv, sdv, sh1, sg1, sr, shh, stk, stq,
     shs, sw, sdk, svec) = _scratch_blocks(scratch_ptr + pid.to(tl.int64) * scratch_stride,
                                          S_OFFS)
    rows = tl.arange(0, QP)
    QD: tl.constexpr = QP * DP
    QS: tl.constexpr = QP * SP
    QC: tl.constexpr = QP * CP
    _fill(sm, 1.0, QP, DP, DC)   # m_0 = 1: slot 0 of m is never written again
    for owner in range(pid, n_owner, tl.num_programs(0)):
        dgrad = dgrad_ptr + tl.cast(owner, tl.int64) * stride_di
        if LISTED:
            first = tl.load(list_start + owner)
            last = tl.load(list_start + owner + 1)
        else:
            first = 0
            last = n_partner
        for k in range(first, last):
            tl.debug_barrier()   # the previous pair is done with the scratch
            if LISTED:
                partner = tl.load(list_partner + k)
            else:
                partner = k
            if OWNER_IS_QUERY:
                qi = owner
                ci = partner
            else:
                qi = partner
                ci = owner
            qb = q_ptr + tl.cast(qi, tl.int64) * stride_qi
            cb = c_ptr + tl.cast(ci, tl.int64) * stride_ci
            nq = tl.load(q_lens + qi)
            nc = tl.load(c_lens + ci)
            pair = tl.cast(qi, tl.int64) * pair_q + tl.cast(ci, tl.int64) * pair_c
            if LISTED:
                at = tl.cast(k, tl.int64)
            else:
                at = tl.cast(qi, tl.int64) * stride_gq + tl.cast(ci, tl.int64) * stride_gc
            g = tl.load(grad_ptr + at)
            # ---- forward recomputation --------------------------------------------------
            lam = tl.full((QP,), 1.0, tl.float32) * smooth
            for t in range(N_ALV):
                tl.store(slam + t * QP + rows, lam)
                _attention_forward(qb, stride_qr, nq, cb, stride_cr, nc, D, sm + t * QD, lam,
                                   ss + t * QC, sal + t * QC, sctx + t * QD, snrm + t * QP,
                                   QP, CP, DP, DC, OPD, PREC)
                _alignment_forward(qb, stride_qr, nq, D, sctx + t * QD, snrm + t * QP, sdu,
                                   fwa + t * DP * SP, ba + t * SP, sz + t * QS, sv + t * QS,
                                   QP, SP, DP, DC, SC, OPD, PREC)
                if t < N_RCR:
                    lam = _rcr_forward(sv + t * QS, lam, sm + t * QD, sm + (t + 1) * QD,
                                       st2 + t * QD, sh1 + t * QP * HP, sg1 + t * QP * HSP,
                                       sr + t * QP, fw1 + t * SP * HP, b1 + t * HP,
                                       fw2 + t * HP * DP, b2 + t * DP, fws1 + t * SP * HSP,
                                       bs1 + t * HSP, ws2 + t * HSP, bs2 + t, QP, SP, HP, HSP,
                                       DP, DC, SC, OPD, PREC)
            if MODE == _ONLY_RCR:
                tl.store(slam + N_ALV * QP + rows, lam)
                _attention_forward(qb, stride_qr, nq, cb, stride_cr, nc, D, sm + N_ALV * QD, lam,
                                   ss + N_ALV * QC, sal + N_ALV * QC, sctx + N_ALV * QD,
                                   snrm + N_ALV * QP, QP, CP, DP, DC, OPD, PREC)
                score, du_ctx = _cosine_backward(qb, stride_qr, nq, D, dgrad, stride_dr,
                                                 sctx + N_ALV * QD, snrm + N_ALV * QP, sdu,
                                                 g, OWNER_IS_QUERY, QP, DP, DC)
            else:
                _mean_rows(sv, shh, nq, QP, SP, SC)
                for n in range(N_RAR):
                    if MODE == _ONLY_RAR:
                        src = 0
                    else:
                        src = n
                    _rar_forward(sv + src * QS, shh + n * SP, shh + (n + 1) * SP, stk + n * QS,
                                 stq + n * SP, shs + n * SP, sw + n * QP, nq, wq + n * SP * SP,
                                 bq + n * SP, fwk + n * SP * SP, bk + n * SP, wv + n * SP,
                                 bv + n, seed_lo, seed_hi, n, pair, DROPOUT, QP, SP, SC, OPD,
                                 PREC)
                score = _sigmoid(_vector_dot(shh + N_RAR * SP, we, SP, SC) + tl.load(be))
            if FORWARD_ONLY:
                tl.store(out_ptr + at, score)
            else:
                # ---- backward -----------------------------------------------------------
                for t in range(N_ALV):   # d v of every alignment
                    _fill(sdv + t * QS, 0.0, QP, SP, SC)
                _fill(sdm, 0.0, QP, DP, DC)
                tl.debug_barrier()
                if MODE == _ONLY_RCR:
                    dlam = _attention_backward(qb, stride_qr, nq, cb, stride_cr, nc, D, dgrad,
                                               dgrad, stride_dr, sm + N_ALV * QD, lam,
                                               ss + N_ALV * QC, sal + N_ALV * QC,
                                               sctx + N_ALV * QD, snrm + N_ALV * QP, sdu,
                                               du_ctx, sdm, OWNER_IS_QUERY, QP, CP, DP, DC,
                                               GPD, PREC)
                else:
                    # d h ping-pongs between two SP-vectors of svec (the other two: the RAR
                    # backward's own)
                    _score_backward(shh + N_RAR * SP, we, g * score * (1.0 - score), svec, gwe,
                                    gbe, WANT_W, SP, SC)
                    for k in range(N_RAR):
                        n = N_RAR - 1 - k
                        if MODE == _ONLY_RAR:
                            src = 0
                        else:
                            src = n
                        _rar_backward(sv + src * QS, sdv + src * QS, shh + n * SP, stk + n * QS,
                                      stq + n * SP, shs + n * SP, sw + n * QP,
                                      svec + (k % 2) * SP, svec + ((k + 1) % 2) * SP,
                                      svec + 2 * SP, sdk, nq, wq + n * SP * SP,
                                      bwk + n * SP * SP, wv + n * SP, gwq + n * SP * SP,
                                      gbq + n * SP, gwk + n * SP * SP, gbk + n * SP,
                                      gwv + n * SP, gbv + n, seed_lo, seed_hi, n, pair, WANT_W,
                                      DROPOUT, QP, SP, SC, GPD, PREC)
                    _mean_rows_backward(svec + (N_RAR % 2) * SP, sdv, nq, QP, SP, SC)
                    dlam = tl.zeros((QP,), tl.float32)
                for k in range(N_ALV):
                    t = N_ALV - 1 - k
                    if t < N_RCR:
                        dlam = _rcr_backward(sv + t * QS, sdv + t * QS, dlam, sm + t * QD, sdm,
                                             st2 + t * QD, sh1 + t * QP * HP,
                                             sg1 + t * QP * HSP, sr + t * QP, nq,
                                             bw1 + t * SP * HP, bw2 + t * HP * DP,
                                             bws1 + t * SP * HSP, ws2 + t * HSP,
                                             gw1 + t * SP * HP, gb1 + t * HP, gw2 + t * HP * DP,
                                             gb2 + t * DP, gws1 + t * SP * HSP, gbs1 + t * HSP,
                                             gws2 + t * HSP, gbs2 + t, WANT_W, QP, SP, HP, HSP,
                                             DP, DC, SC, GPD, PREC)
                    du_ctx = _alignment_backward(qb, stride_qr, nq, D, dgrad, stride_dr,
                                                 sctx + t * QD, snrm + t * QP, sz + t * QS,
                                                 sdv + t * QS, sdu, bwa + t * DP * SP,
                                                 gwa + t * DP * SP, gba + t * SP, WANT_W,
                                                 OWNER_IS_QUERY, QP, SP, DP, DC, SC, GPD, PREC)
                    lam_t = tl.load(slam + t * QP + rows)
                    dlam += _attention_backward(qb, stride_qr, nq, cb, stride_cr, nc, D, dgrad,
                                                dgrad, stride_dr, sm + t * QD, lam_t,
                                                ss + t * QC, sal + t * QC, sctx + t * QD,
                                                snrm + t * QP, sdu, du_ctx, sdm,
                                                OWNER_IS_QUERY, QP, CP, DP, DC, GPD, PREC)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------

def flatten_weights(weights: dict, slots: dict, dims: dict) -> torch.Tensor:
    """The packed weights (kernels/rcar.py WEIGHT_LAYOUT) as one fp32 buffer in flat_layout."""
    blocks = flat_layout(slots, dims["DP"], dims["SP"], dims["HP"], dims["HSP"])
    for name, shape in blocks:
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"packed weight {name}: expected {shape}, got {tuple(weights[name].shape)}")
    return torch.cat([weights[name].reshape(-1).float() for name, _ in blocks])


def unflatten(flat: torch.Tensor, slots: dict, dims: dict) -> dict:
    """A flat_layout buffer as named views."""
    blocks = flat_layout(slots, dims["DP"], dims["SP"], dims["HP"], dims["HSP"])
    starts = offsets(_numel(shape) for _, shape in blocks)
    return {name: flat[at:at + _numel(shape)].view(shape)
            for (name, shape), at in zip(blocks, starts)}


def operand_dtypes(dtype: torch.dtype, device) -> tuple:
    """(forward GEMM operand dtype, backward GEMM operand dtype, fp32 input_precision) for
    inputs of `dtype`: the forward's as kernels/rcar.py (the inputs' low precision, fp32 for
    fp32); the backward's bf16 for bf16 and fp32 otherwise (fp16's range would flush small
    gradients); fp32 GEMMs exact ("ieee") for fp32 inputs and in the interpreter, else tf32."""
    low = dtype in (torch.float16, torch.bfloat16)
    forward = dtype if low else torch.float32
    backward = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    exact = not low or device.type == "cpu"
    return forward, backward, "ieee" if exact else "tf32"


# Warps and software-pipelining stages (interpreter launches ignore both). Compiled for sm_90
# (coop_rcar(2) t2i bf16, d = 1024, s = 256, 64 x 64 pair tiles; bytes of stack per thread,
# triton 3.8). Before the column chunks (stop 19): 1.1-3.6 KB at s = 64, no finished compile
# at s = 128 in 7 minutes. A 4 x 5 batch (weights with the d context pass), d query / d
# context + weights launches: 4 warps, 3 stages 504 / 1040; 4 warps, 1 stage 312 / 616; 8
# warps, 1 stage 232 / 520; with int32 offsets within an item (_load_items) 72 / 448. The
# recipe's square batch (tests/test_sm90_compile.py; training forward / d query + weights / d
# context): then 0 / 384 / 112 (3.6: 0 / 472 / 296); with opaque column offsets (_columns:
# nvdisasm line info had put the rest in offset blocks hoisted out of the persistent loop)
# 0 / 0 / 8 (3.6: 0 / 96 / 0), 236-255 registers, 48 KB of shared memory. Chunk widths
# barely matter (S_CHUNK 16 / 64, D_CHUNK 16: stack within 15%). Other bf16 shapes
# (RCAR_FAST_SM90_FULL=1: i2t, only_rar, only_rcr, a 4 x 5 batch): 0-40 B (3.6: 0-152 B);
# fp32 inputs (the exact FMA GEMMs, fp32 operands) 850-970 B. Each launch compiles in 15-120 s
# (2 loaded CPUs).
GPU_LAUNCH = dict(num_warps=8, num_stages=1)


def launch_constants(regulator: str, module_counts: dict, dims: dict, QP: int, CP: int,
                     dropout_on: bool, precision: str) -> tuple:
    """(the constexprs of _rcar_pair_kernel its launches share, plus num_warps; fp32 elements
    of one program's scratch)."""
    slots = module_slots(regulator, module_counts)
    blocks = flat_layout(slots, dims["DP"], dims["SP"], dims["HP"], dims["HSP"])
    scratch = [size for _, size in scratch_layout(slots, QP, CP, dims["DP"], dims["SP"],
                                                  dims["HP"], dims["HSP"])]
    constants = dict(MODE=MODES[regulator], N_ALV=slots["N_ALV"], N_RCR=slots["N_RCR"],
                     N_RAR=slots["N_RAR"], DROPOUT=bool(dropout_on), QP=QP, CP=CP, DC=D_CHUNK,
                     SC=min(S_CHUNK, dims["HSP"]), W_OFFS=offsets(_numel(s) for _, s in blocks),
                     S_OFFS=offsets(scratch), PREC=precision, **dims, **GPU_LAUNCH)
    return constants, sum(scratch)


def _programs(n_owner: int, device) -> int:
    if device.type == "cpu":
        return max(1, min(n_owner, 2))
    # One program per SM: at GPU_LAUNCH's 8 warps the compiled launches use 236-255 registers
    # per thread (sm_90, tests/test_sm90_compile.py), so a second one would not fit the SM's 64K
    # registers and would run as a second wave, holding a second scratch (~2.6 MB each).
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_owner, sm_count))


def _sides(img, cap, lens_list, direction):
    """(query items, query lengths, context items, context lengths) and the pair id strides
    (pair = i * n_cap + j) per (query index, context index)."""
    n_img, n_regions, _ = img.shape
    n_cap = cap.shape[0]
    device = img.device
    img_lens = torch.full((n_img,), n_regions, dtype=torch.int32, device=device)
    cap_lens = torch.tensor(list(lens_list), dtype=torch.int32, device=device)
    if direction == "t2i":
        return cap, cap_lens, img, img_lens, (1, n_cap)
    return img, img_lens, cap, cap_lens, (n_cap, 1)


def owner_lists(owner, partner, n_owner: int, n_partner: int) -> tuple:
    """A pair list grouped by owner, as the LISTED kernel walks it: (start (n_owner + 1,)
    int32, partners (P,) int32, order (P,) int64) with the pairs of owner o at list positions
    start[o] .. start[o + 1], partners ascending (repeats kept, in their given order), and
    order[k] the given position of list entry k. Built on the pairs' device (a stable sort)."""
    key = owner.to(torch.int64) * n_partner + partner.to(torch.int64)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(owner, minlength=n_owner)
    start = torch.zeros(n_owner + 1, dtype=torch.int32, device=owner.device)
    start[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return start, partner[order].to(torch.int32).contiguous(), order


# The all-pairs backward lists its nonzero output gradients and runs them as a pair list when
# fewer than this fraction of the pairs has one (the hardest-negative loss: <= 3B of B^2). The
# listed run walks the same owners with the same programs in the same order, skipping only
# pairs whose gradient is exactly zero (with a finite forward they add exact zeros), so it is the
# full run bit for bit.
SPARSE_FRACTION = 0.5


def run(img, cap, lens_list, weights: dict, *, regulator: str, steps: int, module_counts: dict,
        direction: str, smooth: float, grad=None, seed: int = 0, dropout_on: bool = False,
        pairs=None):
    """module_counts: rcar_fast.heads.module_counts(regulator, steps). grad None: the scores
    (n_img, n_cap) float32 (this kernel's forward, with dropout when dropout_on). Else (d img,
    d cap) float32 and the packed weight gradients (dict of fp32 tensors shaped like `weights`,
    summed over programs in a fixed order) for the output gradient grad (n_img, n_cap); when
    fewer than SPARSE_FRACTION of its entries are nonzero (NaN counts as nonzero), those pairs
    run as a pair list.

    pairs: (img_idx, cap_idx), int64 (P,) on img's device with values in range (the caller
    checks them), repeats allowed, any order: then the scores are (P,) float32 and grad is
    (P,). Dropout masks are keyed by the pair's id i * n_cap + j, as for all pairs."""
    n_img, n_regions, d = img.shape
    n_cap = cap.shape[0]
    device = img.device
    slots = module_slots(regulator, module_counts)
    dims = dict(DP=weights["wa"].shape[1], SP=weights["wa"].shape[2], HP=weights["w1"].shape[2],
                HSP=weights["ws1"].shape[2])
    if dims["DP"] < d or dims["DP"] % D_CHUNK:
        raise ValueError(f"packed weights have DP={dims['DP']}: need >= d={d} and a multiple of {D_CHUNK}")
    if grad is not None and pairs is None and n_img and n_cap:
        listed = _sparse_pairs(grad)
        if listed is not None:
            grad, pairs = grad[listed], listed
    flat = flatten_weights(weights, slots, dims)
    q, q_lens, c, c_lens, (pair_q, pair_c) = _sides(img, cap, lens_list, direction)
    q, c = q.contiguous(), c.contiguous()
    QP = pow2_at_least(int(q_lens.max()) if q.shape[0] else 1, MIN_DOT)
    CP = pow2_at_least(int(c_lens.max()) if c.shape[0] else 1, MIN_DOT)
    forward_dtype, backward_dtype, precision = operand_dtypes(img.dtype, device)
    constants, width = launch_constants(regulator, module_counts, dims, QP, CP, dropout_on,
                                        precision)
    flat_forward = flat.to(forward_dtype)
    flat_backward = flat.to(backward_dtype)
    seed = int(seed)
    seed_words = (seed & 0xFFFFFFFF, seed >> 32)
    n_pairs = n_img * n_cap if pairs is None else pairs[0].numel()
    scores = torch.empty((n_img, n_cap) if pairs is None else (n_pairs,), device=device,
                         dtype=torch.float32)
    if pairs is not None:   # unused: a listed pair's score and gradient are its list entry
        gq = gc = 0
    elif direction == "t2i":   # (query index, context index) strides of an (n_img, n_cap) matrix
        gq, gc = scores.stride(1), scores.stride(0)
    else:
        gq, gc = scores.stride(0), scores.stride(1)
    lists = {}
    if pairs is not None:
        img_idx, cap_idx = pairs
        q_idx, c_idx = (cap_idx, img_idx) if direction == "t2i" else (img_idx, cap_idx)
        lists = {True: owner_lists(q_idx, c_idx, q.shape[0], c.shape[0]),
                 False: owner_lists(c_idx, q_idx, c.shape[0], q.shape[0])}
    no_list = torch.zeros(1, dtype=torch.int32, device=device)

    def launch(owner_is_query, want_w, forward_only, grad_values, out, dgrad):
        owners, partners = (q, c) if owner_is_query else (c, q)
        start, listed_partners, order = lists.get(owner_is_query, (no_list, no_list, None))
        if order is not None:   # the pairs in this pass's list order (entry k: order[k])
            grad_values = grad_values[order].contiguous()
            out = torch.empty_like(scores)
        n_prog = _programs(owners.shape[0], device)
        scratch = torch.empty((n_prog, width), device=device, dtype=torch.float32)
        partial = torch.zeros((n_prog if want_w else 1, flat.numel()), device=device,
                              dtype=torch.float32)
        _rcar_pair_kernel[(n_prog,)](
            q, q_lens, q.stride(0), q.stride(1), c, c_lens, c.stride(0), c.stride(1),
            grad_values, out, gq, gc, pair_q, pair_c,
            dgrad, dgrad.stride(0), dgrad.stride(1), flat, flat_forward, flat_backward, partial,
            partial.stride(0) if want_w else 0, scratch, scratch.stride(0),
            owners.shape[0], partners.shape[0], d, float(smooth), *seed_words, start,
            listed_partners, OWNER_IS_QUERY=owner_is_query, WANT_W=want_w,
            FORWARD_ONLY=forward_only, LISTED=order is not None, **constants)
        if forward_only and order is not None:
            scores[order] = out
        return partial

    if n_pairs == 0:
        if grad is None:
            return scores
        zero = torch.zeros_like(flat)
        return (torch.zeros(img.shape, device=device), torch.zeros(cap.shape, device=device),
                unflatten(zero, slots, dims))
    if grad is None:
        dummy = torch.empty((1, 1, 1), device=device, dtype=torch.float32)
        launch(False, False, True, scores, scores, dummy)
        return scores
    grad = grad.to(device=device, dtype=torch.float32).contiguous()
    dq = torch.zeros((q.shape[0], q.shape[1], dims["DP"]), device=device, dtype=torch.float32)
    dc = torch.zeros((c.shape[0], c.shape[1], dims["DP"]), device=device, dtype=torch.float32)
    # The weight gradients ride with the pass that has fewer owners (fewer partials).
    weights_with_query = q.shape[0] <= c.shape[0]
    partial_q = launch(True, weights_with_query, False, grad, scores, dq)
    partial_c = launch(False, not weights_with_query, False, grad, scores, dc)
    partial = partial_q if weights_with_query else partial_c
    d_weights = unflatten(partial.sum(dim=0), slots, dims)
    dq, dc = dq[..., :d], dc[..., :d]
    d_img, d_cap = (dc, dq) if direction == "t2i" else (dq, dc)
    return d_img, d_cap, d_weights


def _sparse_pairs(grad):
    """(i, j) of grad's nonzero entries (NaN included), row major, when they are fewer than
    SPARSE_FRACTION of the pairs; else None (one host read of the count)."""
    nonzero = grad != 0
    if int(nonzero.sum()) >= SPARSE_FRACTION * nonzero.numel():
        return None
    return nonzero.nonzero(as_tuple=True)


_BIAS_OF = {"wa": "ba", "w1": "b1", "w2": "b2", "ws1": "bs1", "ws2": "bs2", "wq": "bq",
            "wk": "bk", "wv": "bv", "we": "be"}


def unpack_gradients(head, packed: dict) -> dict:
    """The packed weight gradients (run's third result) as {id(parameter): gradient} for the
    head's Linears (contract.rcar_linears: the slots pack_weights filled), in the parameters'
    shapes and dtypes."""
    grads, slot = {}, {}
    for short, lin, is_vector in contract.rcar_linears(head):
        i = slot.get(short, 0)
        slot[short] = i + 1
        n_out, n_in = lin.weight.shape
        block, bias = packed[short], packed[_BIAS_OF[short]]
        if short == "we":
            weight_grad, bias_grad = block[:n_in][None], bias[:1]
        elif is_vector:
            weight_grad, bias_grad = block[i, :n_in][None], bias[i:i + 1]
        else:
            weight_grad, bias_grad = block[i, :n_in, :n_out].t(), bias[i, :n_out]
        # own memory (views of one buffer would alias each other as custom-op outputs)
        grads[id(lin.weight)] = weight_grad.to(lin.weight.dtype).clone(memory_format=torch.contiguous_format)
        grads[id(lin.bias)] = bias_grad.to(lin.bias.dtype).clone(memory_format=torch.contiguous_format)
    return grads
