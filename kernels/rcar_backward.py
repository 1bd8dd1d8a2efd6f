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

The d-sized quantities (m_t, tanh(W_2 h_1), ctx_t, their gradients) live in the program's scratch
for ONE pair and are streamed in d chunks; the small ones (S, alpha: Q x C; v, z: Q x s; RCR
hidden layers) too. Nothing of size (pairs, Q, d) or (pairs, Q, s) exists for more than the
pairs in flight (one per program).

Input gradients without atomics: a pass whose owners are the query items accumulates d query
(each program writes only its owner's rows); a second pass whose owners are the context items
accumulates d context. Each pair is therefore recomputed twice (one pass per side); the weight
gradients are accumulated in one of the passes only, into a per-program partial (a flat buffer
in the packed weights' layout, `flat_layout`), read-modify-written by its program alone in a
fixed pair order; the host sums the partials over programs (a fixed-shape reduction). The
result is bit-reproducible run to run.

Dropout (training mode): the mask element (seed, module, which, pair, row, channel) of
rcar_fast/dropout.py (the C++ kernel's), hashed in the kernel: pair = i * n_cap + j, row the
query row within the pair; nothing is stored.

Numerics: fp32 everywhere (inputs of any dtype are loaded and widened; GEMMs in fp32, "ieee"
for fp32 inputs, tf32 allowed for low-precision inputs on a GPU).

GPU status (offline sm_90 compiles, scripts/sm90_rcar_backward.py, triton 3.8; no GPU run yet):
correct in the interpreter, but shaped for small heads. The s-sized GEMMs take whole (SP, SP),
(SP, HP) weight tiles and the RAR question / RCR hidden layers whole rows, so at d = 1024,
s = 64 (coop_rcar 2, t2i, fp32, 4 warps) every launch spills: forward 255 registers + 1.4 KB
stack, d query pass 128 + 5.9 KB, d context + weights pass 32 + 13.5 KB (56-84 KB shared);
s = 256 did not finish compiling in 40 minutes here. Next: tile the s-sized GEMMs over
columns through the scratch (as kernels/rcar.py does), bf16 operands, and more rows per item.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rcar_fast import contract

from .rcar import WEIGHT_LAYOUT, _sigmoid, _tanh
from .tile import MIN_DOT, pow2_at_least

MODES = contract.REGULATOR_CODES
_EPS = tl.constexpr(contract.EPS)
_SLOPE = tl.constexpr(contract.LEAKY_SLOPE)
_ONLY_RAR = tl.constexpr(MODES["only_rar"])
_ONLY_RCR = tl.constexpr(MODES["only_rcr"])
_HASH_MULTIPLIER = tl.constexpr(contract.DROPOUT_HASH_MULTIPLIER)   # rcar_fast/dropout.py's mixer
_KEEP_THRESHOLD = tl.constexpr(contract.RAR_DROPOUT_THRESHOLD)
_KEEP_SCALE = tl.constexpr(1.0 / (1.0 - contract.RAR_DROPOUT_P))

# The d chunk of every pass over d (packed weights are padded along d to a multiple of it).
D_CHUNK = 32


# ---------------------------------------------------------------------------------------------
# Layouts: the packed weights (and their gradients) as one flat buffer; the per-program scratch
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
    (the order _weight_blocks walks)."""
    na, nr, nn = slots["NA"], slots["NR"], slots["NN"]
    shapes = {"wa": (na, DP, SP), "ba": (na, SP), "w1": (nr, SP, HP), "b1": (nr, HP),
              "w2": (nr, HP, DP), "b2": (nr, DP), "ws1": (nr, SP, HSP), "bs1": (nr, HSP),
              "ws2": (nr, HSP), "bs2": (nr,), "wq": (nn, SP, SP), "bq": (nn, SP),
              "wk": (nn, SP, SP), "bk": (nn, SP), "wv": (nn, SP), "bv": (nn,), "we": (SP,),
              "be": (1,)}
    assert tuple(shapes) == tuple(WEIGHT_LAYOUT)
    return list(shapes.items())


@triton.jit
def _weight_blocks(base, NA: tl.constexpr, NR: tl.constexpr, NN: tl.constexpr,
                   DP: tl.constexpr, SP: tl.constexpr, HP: tl.constexpr, HSP: tl.constexpr):
    """Pointers to the blocks of a flat buffer in flat_layout order (weights or gradients)."""
    wa = base
    ba = wa + NA * DP * SP
    w1 = ba + NA * SP
    b1 = w1 + NR * SP * HP
    w2 = b1 + NR * HP
    b2 = w2 + NR * HP * DP
    ws1 = b2 + NR * DP
    bs1 = ws1 + NR * SP * HSP
    ws2 = bs1 + NR * HSP
    bs2 = ws2 + NR * HSP
    wq = bs2 + NR
    bq = wq + NN * SP * SP
    wk = bq + NN * SP
    bk = wk + NN * SP * SP
    wv = bk + NN * SP
    bv = wv + NN * SP
    we = bv + NN
    be = we + SP
    return wa, ba, w1, b1, w2, b2, ws1, bs1, ws2, bs2, wq, bq, wk, bk, wv, bv, we, be


def scratch_size(slots: dict, QP: int, CP: int, DP: int, SP: int, HP: int, HSP: int) -> int:
    """fp32 elements of one program's scratch (_scratch_blocks)."""
    att, na, nr, nn = slots["N_ATT"], slots["NA"], slots["NR"], slots["NN"]
    return (att * QP * DP * 2 + nr * QP * DP + 2 * QP * DP + att * QP * CP * 2 + att * QP * 2
            + na * QP * SP * 3 + nr * QP * (HP + HSP + 1) + (nn + 1) * SP)


@triton.jit
def _scratch_blocks(base, N_ATT: tl.constexpr, NA: tl.constexpr, NR: tl.constexpr,
                    NN: tl.constexpr, QP: tl.constexpr, CP: tl.constexpr, DP: tl.constexpr,
                    SP: tl.constexpr, HP: tl.constexpr, HSP: tl.constexpr):
    """One pair's recomputed forward and running gradients (scratch_size elements):
    m_t, ctx_t (per attention, QP x DP), tanh(W_2 h_1) (per RCR), dm and du (QP x DP), S_t and
    alpha_t (QP x CP), |ctx_t| and lambda_t (QP), z_t, v_t, dv_t (per alignment, QP x SP),
    RCR's hidden layers and pre-relu temperature, RAR's pair vectors h_0 .. h_n (SP)."""
    sm = base
    sctx = sm + N_ATT * QP * DP
    st2 = sctx + N_ATT * QP * DP
    sdm = st2 + NR * QP * DP
    sdu = sdm + QP * DP
    ss = sdu + QP * DP
    sal = ss + N_ATT * QP * CP
    snrm = sal + N_ATT * QP * CP
    slam = snrm + N_ATT * QP
    sz = slam + N_ATT * QP
    sv = sz + NA * QP * SP
    sdv = sv + NA * QP * SP
    sh1 = sdv + NA * QP * SP
    sg1 = sh1 + NR * QP * HP
    sr = sg1 + NR * QP * HSP
    shh = sr + NR * QP
    return sm, sctx, st2, sdm, sdu, ss, sal, snrm, slam, sz, sv, sdv, sh1, sg1, sr, shh


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _grid2(R: tl.constexpr, K: tl.constexpr, width, k0):
    """Offsets of an (R, K) block at column k0 of a row-major matrix `width` wide."""
    return tl.arange(0, R)[:, None] * width + (k0 + tl.arange(0, K))[None, :]


@triton.jit
def _load_items(base, stride, n_rows, d0, D, R: tl.constexpr, DC: tl.constexpr):
    """(R, DC) fp32 chunk of an item's feature rows; rows >= n_rows and columns >= D are never
    read (NaN padding stays out) and come back as 0."""
    r = tl.arange(0, R)
    c = d0 + tl.arange(0, DC)
    mask = (r[:, None] < n_rows) & (c[None, :] < D)
    return tl.load(base + r[:, None].to(tl.int64) * stride + c[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _accumulate(ptr, offs, value):
    """ptr[offs] += value, by this program alone (its own scratch or partial buffer)."""
    tl.store(ptr + offs, tl.load(ptr + offs) + value)


@triton.jit
def _accumulate_rows(base, stride, n_rows, d0, value, R: tl.constexpr, DC: tl.constexpr):
    """An owner's fp32 gradient rows [d0, d0 + DC) += value (rows < n_rows only)."""
    r = tl.arange(0, R)
    offs = r[:, None].to(tl.int64) * stride + (d0 + tl.arange(0, DC))[None, :]
    mask = (r[:, None] < n_rows) & (offs >= 0)
    tl.store(base + offs, tl.load(base + offs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _l2norm_rows_backward(x, dy):
    """d x of y = x / (|x| + eps) per row, given dy (rows with |x| = 0 get dy / eps)."""
    n = tl.sqrt(tl.sum(x * x, axis=1))
    safe = tl.where(n > 0, n, 1.0)
    coef = tl.sum(x * dy, axis=1) / (safe * (n + _EPS) * (n + _EPS))
    return dy / (n + _EPS)[:, None] - x * coef[:, None]


@triton.jit
def _l2norm_vector_backward(x, dy):
    n = tl.sqrt(tl.sum(x * x, axis=0))
    safe = tl.where(n > 0, n, 1.0)
    return dy / (n + _EPS) - x * (tl.sum(x * dy, axis=0) / (safe * (n + _EPS) * (n + _EPS)))


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
def _dropout_scales(keys, SP: tl.constexpr):
    """(len(keys), SP) fp32: 0 where dropped, 1 / (1 - p) where kept."""
    channel = tl.arange(0, SP).to(tl.uint32)
    bits = _hash32(keys[:, None] ^ channel[None, :])
    return tl.where(bits >= _KEEP_THRESHOLD, _KEEP_SCALE, 0.0)


@triton.jit
def _dropout_mask_kernel(out, seed_lo, seed_hi, module, which, pair, ROWS: tl.constexpr,
                         SP: tl.constexpr):
    rows = tl.arange(0, ROWS)
    scales = _dropout_scales(_dropout_row_keys(seed_lo, seed_hi, module, which, pair, rows), SP)
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
# Forward pieces (recomputation of one pair into the scratch)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attention_forward(qb, sq, nq, cb, sc, nc, D, m_blk, lam, s_blk, al_blk, ctx_blk, nrm_blk,
                       HAS_M: tl.constexpr, QP: tl.constexpr, CP: tl.constexpr,
                       DP: tl.constexpr, DC: tl.constexpr, PREC: tl.constexpr):
    """S = (q * m) C^T, alpha = softmax_c(lambda clipped_l2norm(S)), ctx = alpha C, |ctx|."""
    rows = tl.arange(0, QP)
    ctx_ok = tl.arange(0, CP) < nc
    scores = tl.zeros((QP, CP), tl.float32)
    for d0 in range(0, DP, DC):
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        if HAS_M:
            q = q * tl.load(m_blk + _grid2(QP, DC, DP, d0))
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        scores += tl.dot(q, tl.trans(c), input_precision=PREC)
    x = tl.where(scores > 0, scores, _SLOPE * scores)
    x = tl.where((rows < nq)[:, None], x, 0.0)
    a = x / (tl.sqrt(tl.sum(x * x, axis=0)) + _EPS)[None, :]
    logits = tl.where(ctx_ok[None, :], lam[:, None] * a, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    alpha = e / tl.sum(e, axis=1)[:, None]
    tl.store(s_blk + _grid2(QP, CP, CP, 0), scores)
    tl.store(al_blk + _grid2(QP, CP, CP, 0), alpha)
    sumsq = tl.zeros((QP,), tl.float32)
    for d0 in range(0, DP, DC):
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        ctx = tl.dot(alpha, c, input_precision=PREC)
        tl.store(ctx_blk + _grid2(QP, DC, DP, d0), ctx)
        sumsq += tl.sum(ctx * ctx, axis=1)
    tl.store(nrm_blk + rows, tl.sqrt(sumsq))
    tl.debug_barrier()


@triton.jit
def _alignment_forward(qb, sq, nq, D, ctx_blk, nrm_blk, wa, ba, z_blk, v_blk,
                       QP: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr,
                       DC: tl.constexpr, PREC: tl.constexpr):
    """z = W_a (q - ctx / (|ctx| + eps))^2 + b_a and v = l2norm(z), both to the scratch."""
    inv = 1.0 / (tl.load(nrm_blk + tl.arange(0, QP)) + _EPS)
    z = tl.zeros((QP, SP), tl.float32)
    for d0 in range(0, DP, DC):
        diff = (_load_items(qb, sq, nq, d0, D, QP, DC)
                - tl.load(ctx_blk + _grid2(QP, DC, DP, d0)) * inv[:, None])
        z += tl.dot(diff * diff, tl.load(wa + _grid2(DC, SP, SP, 0) + d0 * SP),
                    input_precision=PREC)
    z += tl.load(ba + tl.arange(0, SP))[None, :]
    v = z / (tl.sqrt(tl.sum(z * z, axis=1)) + _EPS)[:, None]
    tl.store(z_blk + _grid2(QP, SP, SP, 0), z)
    tl.store(v_blk + _grid2(QP, SP, SP, 0), v)
    tl.debug_barrier()


@triton.jit
def _rcr_forward(v_blk, lam, m_old, m_new, t2_blk, h1_blk, g1_blk, r_blk, w1, b1, w2, b2, ws1,
                 bs1, ws2, bs2, HAS_M: tl.constexpr, QP: tl.constexpr, SP: tl.constexpr,
                 HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr,
                 PREC: tl.constexpr):
    """m <- clamp(tanh(W_2 tanh(W_1 v + b_1) + b_2) + m, -1, 1), lambda <- relu(w_s2 .
    tanh(W_s1 v + b_s1) + b_s2 + lambda). Returns the new lambda."""
    v = tl.load(v_blk + _grid2(QP, SP, SP, 0))
    h1 = _tanh(tl.dot(v, tl.load(w1 + _grid2(SP, HP, HP, 0)), input_precision=PREC)
               + tl.load(b1 + tl.arange(0, HP))[None, :])
    g1 = _tanh(tl.dot(v, tl.load(ws1 + _grid2(SP, HSP, HSP, 0)), input_precision=PREC)
               + tl.load(bs1 + tl.arange(0, HSP))[None, :])
    r = tl.sum(g1 * tl.load(ws2 + tl.arange(0, HSP))[None, :], axis=1) + tl.load(bs2) + lam
    tl.store(h1_blk + _grid2(QP, HP, HP, 0), h1)
    tl.store(g1_blk + _grid2(QP, HSP, HSP, 0), g1)
    tl.store(r_blk + tl.arange(0, QP), r)
    for d0 in range(0, DP, DC):
        t2 = _tanh(tl.dot(h1, tl.load(w2 + _grid2(HP, DC, DP, d0)), input_precision=PREC)
                   + tl.load(b2 + d0 + tl.arange(0, DC))[None, :])
        offs = _grid2(QP, DC, DP, d0)
        old = tl.full((QP, DC), 1.0, tl.float32)
        if HAS_M:
            old = tl.load(m_old + offs)
        tl.store(t2_blk + offs, t2)
        tl.store(m_new + offs, tl.minimum(tl.maximum(t2 + old, -1.0), 1.0))
    tl.debug_barrier()
    return tl.maximum(r, 0.0)


@triton.jit
def _rar_parts(v_blk, h_in, nq, wq, bq, wk, bk, wv, bv, seed_lo, seed_hi, module, pair,
               DROPOUT: tl.constexpr, QP: tl.constexpr, SP: tl.constexpr, PREC: tl.constexpr):
    """RAR's forward values: v, tanh keys Tk, key scales, tanh question Tq, question scales,
    softmax weights w, pooled hs."""
    rows = tl.arange(0, QP)
    cols = tl.arange(0, SP)
    v = tl.load(v_blk + _grid2(QP, SP, SP, 0))
    tk = _tanh(tl.dot(v, tl.load(wk + _grid2(SP, SP, SP, 0)), input_precision=PREC)
               + tl.load(bk + cols)[None, :])
    tq = _tanh(tl.sum(h_in[:, None] * tl.load(wq + _grid2(SP, SP, SP, 0)), axis=0)
               + tl.load(bq + cols))
    key_scale = tl.full((QP, SP), 1.0, tl.float32)
    question_scale = tl.full((SP,), 1.0, tl.float32)
    if DROPOUT:
        key_scale = _dropout_scales(_dropout_row_keys(seed_lo, seed_hi, module, 0, pair, rows), SP)
        question_row = tl.arange(0, 2) * 0
        question_scale = tl.sum(_dropout_scales(
            _dropout_row_keys(seed_lo, seed_hi, module, 1, pair, question_row), SP), axis=0) * 0.5
    keys = tk * key_scale
    question = tq * question_scale
    wvv = tl.load(wv + cols)
    logits = tl.sum(keys * (question * wvv)[None, :], axis=1) + tl.load(bv)
    logits = tl.where(rows < nq, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0))
    w = e / tl.sum(e, axis=0)
    hs = tl.sum(w[:, None] * v, axis=0)
    return v, tk, key_scale, tq, question_scale, keys, question, wvv, w, hs


# ---------------------------------------------------------------------------------------------
# Backward pieces
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rar_backward(v_blk, dv_blk, h_in, dh_out, nq, wq, bq, wk, bk, wv, bv, gwq, gbq, gwk, gbk,
                  gwv, gbv, seed_lo, seed_hi, module, pair, WANT_W: tl.constexpr,
                  DROPOUT: tl.constexpr, QP: tl.constexpr, SP: tl.constexpr, PREC: tl.constexpr):
    """d v (added to the scratch) and d h_in of h_out = l2norm(sum_k w_k v_k); weight grads."""
    v, tk, key_scale, tq, question_scale, keys, question, wvv, w, hs = _rar_parts(
        v_blk, h_in, nq, wq, bq, wk, bk, wv, bv, seed_lo, seed_hi, module, pair, DROPOUT, QP, SP,
        PREC)
    rows = tl.arange(0, QP)
    cols = tl.arange(0, SP)
    dhs = _l2norm_vector_backward(hs, dh_out)
    dw = tl.sum(dhs[None, :] * v, axis=1)
    dlog = w * (dw - tl.sum(w * dw, axis=0))
    dlog = tl.where(rows < nq, dlog, 0.0)
    kd = tl.sum(dlog[:, None] * keys, axis=0)          # sum_k dlog_k keys_k
    dkeys = dlog[:, None] * (question * wvv)[None, :]
    dq_pre = kd * wvv * question_scale * (1.0 - tq * tq)
    dk_pre = dkeys * key_scale * (1.0 - tk * tk)
    wk_t = tl.load(wk + _grid2(SP, SP, SP, 0))
    wq_t = tl.load(wq + _grid2(SP, SP, SP, 0))
    dv = w[:, None] * dhs[None, :] + tl.dot(dk_pre, tl.trans(wk_t), input_precision=PREC)
    _accumulate(dv_blk, _grid2(QP, SP, SP, 0), dv)
    if WANT_W:
        _accumulate(gbv, 0, tl.sum(dlog, axis=0))
        _accumulate(gwv, cols, kd * question)
        _accumulate(gwk, _grid2(SP, SP, SP, 0),
                    tl.dot(tl.trans(v), dk_pre, input_precision=PREC))
        _accumulate(gbk, cols, tl.sum(dk_pre, axis=0))
        _accumulate(gwq, _grid2(SP, SP, SP, 0), h_in[:, None] * dq_pre[None, :])
        _accumulate(gbq, cols, dq_pre)
    tl.debug_barrier()
    return tl.sum(wq_t * dq_pre[None, :], axis=1)


@triton.jit
def _rcr_backward(v_blk, dv_blk, dlam, m_old, dm_blk, t2_blk, h1_blk, g1_blk, r_blk, nq,
                  w1, w2, ws1, ws2, gw1, gb1, gw2, gb2, gws1, gbs1, gws2, gbs2,
                  HAS_M: tl.constexpr, WANT_W: tl.constexpr, QP: tl.constexpr,
                  SP: tl.constexpr, HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr,
                  DC: tl.constexpr, PREC: tl.constexpr):
    """Given d m_new (the scratch dm) and d lambda_new: d v (added), d m_old (left in dm),
    d lambda_old (returned), weight grads."""
    rows_ok = tl.arange(0, QP) < nq
    v = tl.load(v_blk + _grid2(QP, SP, SP, 0))
    h1 = tl.load(h1_blk + _grid2(QP, HP, HP, 0))
    g1 = tl.load(g1_blk + _grid2(QP, HSP, HSP, 0))
    r = tl.load(r_blk + tl.arange(0, QP))
    dr = tl.where((r > 0) & rows_ok, dlam, 0.0)
    ws2v = tl.load(ws2 + tl.arange(0, HSP))
    dzs = dr[:, None] * ws2v[None, :] * (1.0 - g1 * g1)
    dh1 = tl.zeros((QP, HP), tl.float32)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        t2 = tl.load(t2_blk + offs)
        old = tl.full((QP, DC), 1.0, tl.float32)
        if HAS_M:
            old = tl.load(m_old + offs)
        pre = t2 + old
        dpre = tl.where((pre >= -1.0) & (pre <= 1.0) & rows_ok[:, None], tl.load(dm_blk + offs),
                        0.0)
        tl.store(dm_blk + offs, dpre)
        dz2 = dpre * (1.0 - t2 * t2)
        w2c = tl.load(w2 + _grid2(HP, DC, DP, d0))
        dh1 += tl.dot(dz2, tl.trans(w2c), input_precision=PREC)
        if WANT_W:
            _accumulate(gw2, _grid2(HP, DC, DP, d0), tl.dot(tl.trans(h1), dz2, input_precision=PREC))
            _accumulate(gb2, d0 + tl.arange(0, DC), tl.sum(dz2, axis=0))
    dz1 = dh1 * (1.0 - h1 * h1)
    w1_t = tl.load(w1 + _grid2(SP, HP, HP, 0))
    ws1_t = tl.load(ws1 + _grid2(SP, HSP, HSP, 0))
    dv = (tl.dot(dz1, tl.trans(w1_t), input_precision=PREC)
          + tl.dot(dzs, tl.trans(ws1_t), input_precision=PREC))
    _accumulate(dv_blk, _grid2(QP, SP, SP, 0), dv)
    if WANT_W:
        _accumulate(gw1, _grid2(SP, HP, HP, 0), tl.dot(tl.trans(v), dz1, input_precision=PREC))
        _accumulate(gb1, tl.arange(0, HP), tl.sum(dz1, axis=0))
        _accumulate(gws1, _grid2(SP, HSP, HSP, 0), tl.dot(tl.trans(v), dzs, input_precision=PREC))
        _accumulate(gbs1, tl.arange(0, HSP), tl.sum(dzs, axis=0))
        _accumulate(gws2, tl.arange(0, HSP), tl.sum(dr[:, None] * g1, axis=0))
        _accumulate(gbs2, 0, tl.sum(dr, axis=0))
    tl.debug_barrier()
    return dr


@triton.jit
def _attention_backward(qb, sq, nq, cb, sc, nc, D, dqb, dcb, gstride, m_blk, lam, s_blk, al_blk,
                        ctx_blk, nrm_blk, du_blk, du_ctx, dm_blk, HAS_M: tl.constexpr,
                        OWNER_IS_QUERY: tl.constexpr, QP: tl.constexpr, CP: tl.constexpr,
                        DP: tl.constexpr, DC: tl.constexpr, PREC: tl.constexpr):
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
        dalpha += tl.dot(dctx, tl.trans(c), input_precision=PREC)
        if not OWNER_IS_QUERY:
            _accumulate_rows(dcb, gstride, nc, d0,
                             tl.dot(tl.trans(alpha), dctx, input_precision=PREC), CP, DC)
    tl.debug_barrier()  # the first loop's d C rows are complete before the second adds
    dlogits = alpha * (dalpha - tl.sum(alpha * dalpha, axis=1)[:, None])
    dlogits = tl.where(ctx_ok[None, :], dlogits, 0.0)
    scores = tl.load(s_blk + _grid2(QP, CP, CP, 0))
    x = tl.where(scores > 0, scores, _SLOPE * scores)
    x = tl.where(row_ok[:, None], x, 0.0)
    n = tl.sqrt(tl.sum(x * x, axis=0))
    a = x / (n + _EPS)[None, :]
    dlam = tl.sum(dlogits * a, axis=1)
    da = dlogits * lam[:, None]
    n_safe = tl.where(n > 0, n, 1.0)
    dx = da / (n + _EPS)[None, :] - x * (tl.sum(da * x, axis=0) / (n_safe * (n + _EPS) * (n + _EPS)))[None, :]
    ds = tl.where(scores > 0, dx, _SLOPE * dx)
    ds = tl.where(row_ok[:, None] & ctx_ok[None, :], ds, 0.0)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        m = tl.full((QP, DC), 1.0, tl.float32)
        if HAS_M:
            m = tl.load(m_blk + offs)
        c = _load_items(cb, sc, nc, d0, D, CP, DC)
        dqm = tl.dot(ds, c, input_precision=PREC)
        if HAS_M:
            _accumulate(dm_blk, offs, dqm * q)
        if OWNER_IS_QUERY:
            _accumulate_rows(dqb, gstride, nq, d0, dqm * m, QP, DC)
        else:
            _accumulate_rows(dcb, gstride, nc, d0,
                             tl.dot(tl.trans(ds), q * m, input_precision=PREC), CP, DC)
    tl.debug_barrier()
    return tl.where(row_ok, dlam, 0.0)


@triton.jit
def _alignment_backward(qb, sq, nq, D, dqb, gstride, ctx_blk, nrm_blk, z_blk, dv_blk, du_blk,
                        wa, gwa, gba, WANT_W: tl.constexpr, OWNER_IS_QUERY: tl.constexpr,
                        QP: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr,
                        DC: tl.constexpr, PREC: tl.constexpr):
    """Backward of v = l2norm(W_a (q - u)^2 + b_a): d u to the scratch, the owner's d q, weight
    grads; returns sum_d du * ctx per row (for the attention backward)."""
    rows_ok = tl.arange(0, QP) < nq
    z = tl.load(z_blk + _grid2(QP, SP, SP, 0))
    dz = _l2norm_rows_backward(z, tl.load(dv_blk + _grid2(QP, SP, SP, 0)))
    dz = tl.where(rows_ok[:, None], dz, 0.0)
    inv = 1.0 / (tl.load(nrm_blk + tl.arange(0, QP)) + _EPS)
    du_ctx = tl.zeros((QP,), tl.float32)
    for d0 in range(0, DP, DC):
        offs = _grid2(QP, DC, DP, d0)
        q = _load_items(qb, sq, nq, d0, D, QP, DC)
        ctx = tl.load(ctx_blk + offs)
        diff = q - ctx * inv[:, None]
        wa_c = tl.load(wa + _grid2(DC, SP, SP, 0) + d0 * SP)
        ddiff = 2.0 * diff * tl.dot(dz, tl.trans(wa_c), input_precision=PREC)
        if OWNER_IS_QUERY:
            _accumulate_rows(dqb, gstride, nq, d0, ddiff, QP, DC)
        tl.store(du_blk + offs, -ddiff)
        du_ctx += tl.sum(-ddiff * ctx, axis=1)
        if WANT_W:
            _accumulate(gwa, _grid2(DC, SP, SP, 0) + d0 * SP,
                        tl.dot(tl.trans(diff * diff), dz, input_precision=PREC))
    if WANT_W:
        _accumulate(gba, tl.arange(0, SP), tl.sum(dz, axis=0))
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
        w_ptr, gw_ptr, gw_stride, scratch_ptr, scratch_stride,
        n_owner, n_partner, D, smooth, seed_lo, seed_hi,
        MODE: tl.constexpr, STEPS: tl.constexpr, N_ALV: tl.constexpr, N_RCR: tl.constexpr,
        N_RAR: tl.constexpr, N_ATT: tl.constexpr, NA: tl.constexpr, NR: tl.constexpr,
        NN: tl.constexpr, OWNER_IS_QUERY: tl.constexpr, WANT_W: tl.constexpr,
        FORWARD_ONLY: tl.constexpr, DROPOUT: tl.constexpr, QP: tl.constexpr, CP: tl.constexpr,
        SP: tl.constexpr, HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr,
        DC: tl.constexpr, PREC: tl.constexpr):
    """Programs walk owners pid, pid + grid, ...; each owner against every partner in order.
    FORWARD_ONLY: the scores (out). Else the owner's input gradient rows (dgrad, fp32,
    (n_owner, rows, DP)) and, with WANT_W, the program's weight-gradient partial."""
    pid = tl.program_id(0)
    (wa, ba, w1, b1, w2, b2, ws1, bs1, ws2, bs2, wq, bq, wk, bk, wv, bv, we,
     be) = _weight_blocks(w_ptr, NA, NR, NN, DP, SP, HP, HSP)
    (gwa, gba, gw1, gb1, gw2, gb2, gws1, gbs1, gws2, gbs2, gwq, gbq, gwk, gbk, gwv, gbv, gwe,
     gbe) = _weight_blocks(gw_ptr + pid.to(tl.int64) * gw_stride, NA, NR, NN, DP, SP, HP, HSP)
    (sm, sctx, st2, sdm, sdu, ss, sal, snrm, slam, sz, sv, sdv, sh1, sg1, sr,
     shh) = _scratch_blocks(scratch_ptr + pid.to(tl.int64) * scratch_stride, N_ATT, NA, NR, NN,
                            QP, CP, DP, SP, HP, HSP)
    rows = tl.arange(0, QP)
    QD: tl.constexpr = QP * DP
    for owner in range(pid, n_owner, tl.num_programs(0)):
        dgrad = dgrad_ptr + tl.cast(owner, tl.int64) * stride_di
        for partner in range(0, n_partner):
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
            g = tl.load(grad_ptr + tl.cast(qi, tl.int64) * stride_gq + tl.cast(ci, tl.int64) * stride_gc)
            # ---- forward recomputation --------------------------------------------------
            lam = tl.full((QP,), 1.0, tl.float32) * smooth
            for t in tl.static_range(N_ALV):
                tl.store(slam + t * QP + rows, lam)
                _attention_forward(qb, stride_qr, nq, cb, stride_cr, nc, D, sm + t * QD, lam,
                                   ss + t * QP * CP, sal + t * QP * CP, sctx + t * QD,
                                   snrm + t * QP, t > 0, QP, CP, DP, DC, PREC)
                _alignment_forward(qb, stride_qr, nq, D, sctx + t * QD, snrm + t * QP,
                                   wa + t * DP * SP, ba + t * SP, sz + t * QP * SP,
                                   sv + t * QP * SP, QP, SP, DP, DC, PREC)
                if t < N_RCR:
                    lam = _rcr_forward(sv + t * QP * SP, lam, sm + t * QD, sm + (t + 1) * QD,
                                       st2 + t * QD, sh1 + t * QP * HP, sg1 + t * QP * HSP,
                                       sr + t * QP, w1 + t * SP * HP, b1 + t * HP,
                                       w2 + t * HP * DP, b2 + t * DP, ws1 + t * SP * HSP,
                                       bs1 + t * HSP, ws2 + t * HSP, bs2 + t, t > 0, QP, SP, HP,
                                       HSP, DP, DC, PREC)
            if MODE == _ONLY_RCR:
                tl.store(slam + N_ALV * QP + rows, lam)
                _attention_forward(qb, stride_qr, nq, cb, stride_cr, nc, D, sm + N_ALV * QD, lam,
                                   ss + N_ALV * QP * CP, sal + N_ALV * QP * CP,
                                   sctx + N_ALV * QD, snrm + N_ALV * QP, N_ALV > 0, QP, CP,
                                   DP, DC, PREC)
                score, du_ctx = _cosine_backward(qb, stride_qr, nq, D, dgrad, stride_dr,
                                                 sctx + N_ALV * QD, snrm + N_ALV * QP, sdu,
                                                 g, OWNER_IS_QUERY, QP, DP, DC)
            else:
                v0 = tl.load(sv + _grid2(QP, SP, SP, 0))
                h = tl.sum(tl.where((rows < nq)[:, None], v0, 0.0), axis=0) / nq
                tl.store(shh + tl.arange(0, SP), h)
                for n in tl.static_range(N_RAR):
                    if MODE == _ONLY_RAR:
                        src = 0
                    else:
                        src = n
                    parts = _rar_parts(sv + src * QP * SP, h, nq, wq + n * SP * SP, bq + n * SP,
                                       wk + n * SP * SP, bk + n * SP, wv + n * SP, bv + n,
                                       seed_lo, seed_hi, n, pair, DROPOUT, QP, SP, PREC)
                    _v, _tk, _ks, _tq, _qs, _keys, _question, _wvv, _w, hs = parts
                    h = hs / (tl.sqrt(tl.sum(hs * hs, axis=0)) + _EPS)
                    tl.store(shh + (n + 1) * SP + tl.arange(0, SP), h)
                tl.debug_barrier()
                score = _sigmoid(tl.sum(h * tl.load(we + tl.arange(0, SP)), axis=0) + tl.load(be))
            if FORWARD_ONLY:
                tl.store(out_ptr + tl.cast(qi, tl.int64) * stride_gq + tl.cast(ci, tl.int64) * stride_gc,
                         score)
            else:
                # ---- backward -----------------------------------------------------------
                for t in tl.static_range(NA):
                    tl.store(sdv + t * QP * SP + _grid2(QP, SP, SP, 0),
                             tl.zeros((QP, SP), tl.float32))
                for d0 in range(0, DP, DC):
                    tl.store(sdm + _grid2(QP, DC, DP, d0), tl.zeros((QP, DC), tl.float32))
                tl.debug_barrier()
                if MODE == _ONLY_RCR:
                    dlam = _attention_backward(qb, stride_qr, nq, cb, stride_cr, nc, D, dgrad,
                                               dgrad, stride_dr, sm + N_ALV * QD, lam,
                                               ss + N_ALV * QP * CP, sal + N_ALV * QP * CP,
                                               sctx + N_ALV * QD, snrm + N_ALV * QP, sdu,
                                               du_ctx, sdm, N_ALV > 0, OWNER_IS_QUERY, QP, CP,
                                               DP, DC, PREC)
                else:
                    ds = g * score * (1.0 - score)
                    if WANT_W:
                        _accumulate(gwe, tl.arange(0, SP), ds * h)
                        _accumulate(gbe, 0, ds)
                    dh = ds * tl.load(we + tl.arange(0, SP))
                    for k in tl.static_range(N_RAR):
                        n = N_RAR - 1 - k
                        if MODE == _ONLY_RAR:
                            src = 0
                        else:
                            src = n
                        h_in = tl.load(shh + n * SP + tl.arange(0, SP))
                        dh = _rar_backward(sv + src * QP * SP, sdv + src * QP * SP, h_in, dh,
                                           nq, wq + n * SP * SP, bq + n * SP, wk + n * SP * SP,
                                           bk + n * SP, wv + n * SP, bv + n, gwq + n * SP * SP,
                                           gbq + n * SP, gwk + n * SP * SP, gbk + n * SP,
                                           gwv + n * SP, gbv + n, seed_lo, seed_hi, n, pair,
                                           WANT_W, DROPOUT, QP, SP, PREC)
                    # h_0 = mean of v_0 over the pair's real queries
                    _accumulate(sdv, _grid2(QP, SP, SP, 0),
                                tl.where((rows < nq)[:, None], dh[None, :] / nq, 0.0))
                    tl.debug_barrier()
                    dlam = tl.zeros((QP,), tl.float32)
                for k in tl.static_range(N_ALV):
                    t = N_ALV - 1 - k
                    if t < N_RCR:
                        dlam = _rcr_backward(sv + t * QP * SP, sdv + t * QP * SP, dlam,
                                             sm + t * QD, sdm, st2 + t * QD, sh1 + t * QP * HP,
                                             sg1 + t * QP * HSP, sr + t * QP, nq,
                                             w1 + t * SP * HP, w2 + t * HP * DP,
                                             ws1 + t * SP * HSP, ws2 + t * HSP,
                                             gw1 + t * SP * HP, gb1 + t * HP, gw2 + t * HP * DP,
                                             gb2 + t * DP, gws1 + t * SP * HSP, gbs1 + t * HSP,
                                             gws2 + t * HSP, gbs2 + t, t > 0, WANT_W, QP, SP,
                                             HP, HSP, DP, DC, PREC)
                    du_ctx = _alignment_backward(qb, stride_qr, nq, D, dgrad, stride_dr,
                                                 sctx + t * QD, snrm + t * QP, sz + t * QP * SP,
                                                 sdv + t * QP * SP, sdu, wa + t * DP * SP,
                                                 gwa + t * DP * SP, gba + t * SP, WANT_W,
                                                 OWNER_IS_QUERY, QP, SP, DP, DC, PREC)
                    lam_t = tl.load(slam + t * QP + rows)
                    dlam += _attention_backward(qb, stride_qr, nq, cb, stride_cr, nc, D, dgrad,
                                                dgrad, stride_dr, sm + t * QD, lam_t,
                                                ss + t * QP * CP, sal + t * QP * CP,
                                                sctx + t * QD, snrm + t * QP, sdu, du_ctx, sdm,
                                                t > 0, OWNER_IS_QUERY, QP, CP, DP, DC, PREC)
                    tl.debug_barrier()


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
    out, at = {}, 0
    for name, shape in flat_layout(slots, dims["DP"], dims["SP"], dims["HP"], dims["HSP"]):
        size = 1
        for n in shape:
            size *= n
        out[name] = flat[at:at + size].view(shape)
        at += size
    return out


def _programs(n_owner: int, device) -> int:
    if device.type == "cpu":
        return max(1, min(n_owner, 2))
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_owner, 2 * sm_count))


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


def run(img, cap, lens_list, weights: dict, *, regulator: str, steps: int, module_counts: dict,
        direction: str, smooth: float, grad=None, seed: int = 0, dropout_on: bool = False):
    """module_counts: rcar_fast.heads.module_counts(regulator, steps). grad None: the scores (n_img, n_cap) float32 (this kernel's forward, with dropout when
    dropout_on). Else (d img, d cap) float32 and the packed weight gradients (dict of fp32
    tensors shaped like `weights`, summed over programs in a fixed order)."""
    n_img, n_regions, d = img.shape
    n_cap = cap.shape[0]
    device = img.device
    slots = module_slots(regulator, module_counts)
    dims = dict(DP=weights["wa"].shape[1], SP=weights["wa"].shape[2], HP=weights["w1"].shape[2],
                HSP=weights["ws1"].shape[2])
    if dims["DP"] < d or dims["DP"] % D_CHUNK:
        raise ValueError(f"packed weights have DP={dims['DP']}: need >= d={d} and a multiple of {D_CHUNK}")
    flat = flatten_weights(weights, slots, dims)
    q, q_lens, c, c_lens, (pair_q, pair_c) = _sides(img, cap, lens_list, direction)
    q, c = q.contiguous(), c.contiguous()
    QP = pow2_at_least(int(q_lens.max()) if q.shape[0] else 1, MIN_DOT)
    CP = pow2_at_least(int(c_lens.max()) if c.shape[0] else 1, MIN_DOT)
    fp32 = img.dtype == torch.float32 or device.type == "cpu"
    constants = dict(MODE=MODES[regulator], STEPS=steps, N_ALV=slots["N_ALV"],
                     N_RCR=slots["N_RCR"], N_RAR=slots["N_RAR"], N_ATT=slots["N_ATT"],
                     NA=slots["NA"], NR=slots["NR"], NN=slots["NN"], DROPOUT=bool(dropout_on),
                     QP=QP, CP=CP, DC=D_CHUNK, PREC="ieee" if fp32 else "tf32", **dims,
                     num_warps=4)
    scratch_width = scratch_size(slots, QP, CP, dims["DP"], dims["SP"], dims["HP"], dims["HSP"])
    seed = int(seed)
    seed_words = (seed & 0xFFFFFFFF, seed >> 32)
    scores = torch.empty((n_img, n_cap), device=device, dtype=torch.float32)
    if direction == "t2i":   # (query index, context index) strides of an (n_img, n_cap) matrix
        gq, gc = scores.stride(1), scores.stride(0)
    else:
        gq, gc = scores.stride(0), scores.stride(1)

    def launch(owner_is_query, want_w, forward_only, grad_matrix, out_matrix, dgrad):
        owners, partners = (q, c) if owner_is_query else (c, q)
        n_prog = _programs(owners.shape[0], device)
        scratch = torch.empty((n_prog, scratch_width), device=device, dtype=torch.float32)
        partial = torch.zeros((n_prog if want_w else 1, flat.numel()), device=device,
                              dtype=torch.float32)
        _rcar_pair_kernel[(n_prog,)](
            q, q_lens, q.stride(0), q.stride(1), c, c_lens, c.stride(0), c.stride(1),
            grad_matrix, out_matrix, gq, gc, pair_q, pair_c,
            dgrad, dgrad.stride(0), dgrad.stride(1), flat, partial,
            partial.stride(0) if want_w else 0, scratch, scratch.stride(0),
            owners.shape[0], partners.shape[0], d, float(smooth), *seed_words,
            OWNER_IS_QUERY=owner_is_query, WANT_W=want_w, FORWARD_ONLY=forward_only,
            **constants)
        return partial

    if n_img == 0 or n_cap == 0:
        if grad is None:
            return scores
        zero = torch.zeros_like(flat)
        return (torch.zeros(img.shape, device=device), torch.zeros(cap.shape, device=device),
                unflatten(zero, slots, dims))
    if grad is None:
        dummy = torch.empty((1, 1, 1), device=device, dtype=torch.float32)
        launch(False, False, True, scores, scores, dummy)
        return scores
    grad = grad.to(device=device, dtype=torch.float32)
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
