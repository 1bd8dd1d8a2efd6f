"""The S-only similarity heads (HEADS.md: CHAN, LAPS, TERAN / ALADIN, ColBERT MaxSim, DVSA) in
Triton, forward and backward, as epilogues of the shared region-word tile (kernels/tile.py).

Tiles. A program takes BI images x BJ captions; every image's R regions are padded to R_PAD
(a power of two, the whole R in one tile), every caption's words to L_PAD (captions are sorted
by length and launched in buckets of equal L_PAD). The score tile S (BI*R_PAD, BJ*L_PAD) is
one GEMM over d (tile.score_tile, fp32 accumulation, fp64 for fp64 inputs) viewed as
(BI, R_PAD, BJ, L_PAD); the head then reduces it per pair in registers:
  t2i: m_w = max over the real regions of S[r, w] (axis 1), pooled over the real words;
  i2t: n_r = max over the real words of S[r, w] (axis 3), pooled over the real regions;
  both: both_scale * (t2i + i2t).
Optional leaky (slope contract.LEAKY_SLOPE) on the maxima before pooling; pools mean, sum, max,
lse(tau) = log sum exp(x / tau), softmax(tau) = sum softmax(x / tau) x. Padding (never loaded,
so NaN there is never read) is excluded from every max and pool with tl.where on the masks,
never by multiplication. Ties: the first index (lowest region / word / pooled position) wins.

CHAN's VSA coding (CODING = vsa, direction i2t) replaces each region's max by
  x_r = sum_w a_rw S[r, w] / (sqrt(a_r^T G a_r) + eps),  a_r = softmax_w(S[r, .] / vsa_tau),
G the caption's word Gram (precomputed once per call, (n_cap, Lmax, Lmax) in the accumulation
dtype; a tile reads its captions' blocks as one block-diagonal matrix, tile.load_gram), so the
attended vectors c_r = sum_w a_rw e_w are never formed: one (BI*R_PAD, BJ*L_PAD) x
(BJ*L_PAD)^2 product per tile, BJ*L_PAD / d of the score GEMM. Then pooled over the regions.

Backward (flash style: nothing per pair is stored; the tile and its argmaxes are recomputed).
dL/dS is zero except at each maximum's first argmax, where it is G * pool weight * leaky'
(HEADS.md, "Backward"); for VSA it is dense (through the softmax), and the captions also get
the Gram term d cap += 2 dG @ cap, dG = sum over the pairs' regions of dL/d|c_r|^2 a_r a_r^T.
One kernel, _maxsim_bwd_kernel, in two roles, each program owning its output rows (no atomics,
deterministic):
  OWN_IS_IMG: one program per BI images, looping over the caption blocks of a bucket:
      d img += dS @ cap, in d-chunks of BD;
  else: one program per BJ captions, looping over all image blocks: d cap += dS^T @ img (and
      VSA's dG summed over them, applied once at the end).
A program stores its rows on its first iteration and read-modify-writes afterwards, with a CTA
barrier between iterations (as kernels/scan.py does).

Listed pairs (maxsim_pairs, re-ranking): one pair per program, the same tile and epilogue with
BI = BJ = 1; the backward groups each caption bucket's pairs by image (and by caption), one
program per distinct image (caption) walking its pairs, so every row still has one owner.

Precision: fp32 inputs use IEEE fp32 dots; fp16/bf16 inputs the native tensor-core GEMM for
the scores and tf32 for the gradient GEMMs (dS is fp32); float64 under the interpreter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from rcar_fast import contract

from .tile import (MIN_DOT, OWNER_SHAPES, OwnerGroup, add_gram_rows, add_rows, autotune_mode,
                   caption_groups, config_area, context_gram, halves_dot, interpreter_on,
                   load_gram, named, pow2_at_least, precision_kind, quick, score_tile,
                   smallest_shape, tile_owners, tile_rows, tile_shapes, tile_start)

_SLOPE = tl.constexpr(contract.LEAKY_SLOPE)
_EPS = tl.constexpr(contract.EPS)
_MAX_CODING, _VSA_CODING = (contract.HEAD_CODINGS.index(c) for c in ("max", "vsa"))
_VSA = tl.constexpr(_VSA_CODING)
_T2I = tl.constexpr(contract.HEAD_DIRECTION_CODES["t2i"])
_I2T = tl.constexpr(contract.HEAD_DIRECTION_CODES["i2t"])
_BOTH = tl.constexpr(contract.HEAD_DIRECTION_CODES["both"])
_MEAN = tl.constexpr(contract.POOL_CODES["mean"])
_SUM = tl.constexpr(contract.POOL_CODES["sum"])
_MAX = tl.constexpr(contract.POOL_CODES["max"])
_LSE = tl.constexpr(contract.POOL_CODES["lse"])
_SOFTMAX = tl.constexpr(contract.POOL_CODES["softmax"])
# An index larger than any tile axis: the "no candidate" value of the first-argmax search.
_NO_INDEX = tl.constexpr(1 << 30)

# fp32 inputs: the IEEE fp32 (FMA) dot keeps the 1e-4 contract against the float64 reference.
FP32_DOT_PRECISION = "ieee"
# The longest caption bucket and the most regions a tile holds whole: R_PAD x max(L_PAD, 16)
# scores (the smallest tile of a bucket) at most this many (a 128 x 128 or 512 x 32 tile).
MAX_TILE_SCORES = 128 * 128


def max_tile_reason(n_regions: int, longest_caption: int, region_floor: int = 1) -> Optional[str]:
    """Why the Triton heads cannot take these sizes (None: they can); region_floor: the
    regions' padding floor of the kernels asked about (16 for the pair kernels)."""
    r_pad, l_pad = pow2_at_least(n_regions, region_floor), pow2_at_least(longest_caption, 8)
    if r_pad * max(l_pad, MIN_DOT) > MAX_TILE_SCORES:
        return (f"the Triton heads hold an image's regions and a caption's words whole in one "
                f"tile: R={n_regions} (padded {r_pad}) x Lmax={longest_caption} (padded "
                f"{l_pad}) exceeds {MAX_TILE_SCORES} scores per pair")
    return None


# =============================================================================================
# Device helpers: the heads' epilogue
# =============================================================================================

@triton.jit
def _max_first(S4, real, index, AXIS: tl.constexpr):
    """The max over the real entries of axis AXIS and the first index attaining it."""
    z = tl.where(real, S4, float("-inf"))
    top = tl.max(z, axis=AXIS)
    hit = z == tl.expand_dims(top, AXIS)
    first = tl.min(tl.where(hit, index, _NO_INDEX), axis=AXIS)
    return top, first


@triton.jit
def _leaky(x, LEAKY: tl.constexpr):
    if LEAKY:
        x = tl.where(x > 0, x, _SLOPE * x)
    return x


@triton.jit
def _leaky_slope(x, LEAKY: tl.constexpr):
    """d leaky(x) / dx at the selected score x: 1 if x > 0, else the slope (1 without leaky)."""
    one = tl.full(x.shape, 1.0, x.dtype)   # in x's dtype: the slope stays exact in fp64
    if LEAKY:
        one = tl.where(x > 0, one, _SLOPE * one)
    return one


@triton.jit
def _pool(x, real, count, tau, AXIS: tl.constexpr, POOL: tl.constexpr):
    """Pool x over its real entries along AXIS; count (broadcastable to the result) is how
    many are real (for the mean)."""
    if POOL == _MEAN:
        out = tl.sum(tl.where(real, x, 0.0), axis=AXIS) / count.to(x.dtype)
    elif POOL == _SUM:
        out = tl.sum(tl.where(real, x, 0.0), axis=AXIS)
    elif POOL == _MAX:
        out = tl.max(tl.where(real, x, float("-inf")), axis=AXIS)
    else:
        z = tl.where(real, x / tau, float("-inf"))
        top = tl.max(z, axis=AXIS)
        e = tl.exp(z - tl.expand_dims(top, AXIS))
        total = tl.sum(e, axis=AXIS)
        if POOL == _LSE:
            out = top + tl.log(total)
        else:
            out = tl.sum(e * tl.where(real, x, 0.0), axis=AXIS) / total
    return out


@triton.jit
def _pool_weights(x, real, index, count, tau, AXIS: tl.constexpr, POOL: tl.constexpr):
    """dP/dx_k for every entry of x (HEADS.md's pooling table), 0 at padding."""
    if POOL == _MEAN:
        g = tl.where(real, 1.0 / tl.expand_dims(count, AXIS).to(x.dtype), 0.0)
    elif POOL == _SUM:
        g = tl.where(real, 1.0, 0.0)
    elif POOL == _MAX:
        z = tl.where(real, x, float("-inf"))
        top = tl.expand_dims(tl.max(z, axis=AXIS), AXIS)
        first = tl.min(tl.where(z == top, index, _NO_INDEX), axis=AXIS)
        g = tl.where(index == tl.expand_dims(first, AXIS), 1.0, 0.0)
    else:
        z = tl.where(real, x / tau, float("-inf"))
        top = tl.max(z, axis=AXIS)
        e = tl.exp(z - tl.expand_dims(top, AXIS))
        p = e / tl.expand_dims(tl.sum(e, axis=AXIS), AXIS)
        if POOL == _LSE:
            g = p / tau
        else:
            pooled = tl.sum(p * tl.where(real, x, 0.0), axis=AXIS)
            g = p * (1.0 + (tl.where(real, x, 0.0) - tl.expand_dims(pooled, AXIS)) / tau)
    return tl.where(real, g, 0.0)


@triton.jit
def _tile_geometry(r_len, w_len, R_PAD: tl.constexpr, L_PAD: tl.constexpr):
    """Indices and real-masks of the (BI, R_PAD, BJ, L_PAD) view and of the two pooled views
    (t2i: (BI, BJ, L_PAD), i2t: (BI, R_PAD, BJ))."""
    r = tl.arange(0, R_PAD)
    w = tl.arange(0, L_PAD)
    region_real = r[None, :] < r_len[:, None]        # (BI, R_PAD)
    word_real = w[None, :] < w_len[:, None]          # (BJ, L_PAD)
    return (r[None, :, None, None], w[None, None, None, :], region_real[:, :, None, None],
            word_real[None, None, :, :], r[None, :, None], w[None, None, :],
            region_real[:, :, None], word_real[None, :, :])


@triton.jit
def _params(params_ptr):
    """The launch's run-time settings: (tau, both_scale, vsa_tau), in the accumulation dtype."""
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2)


@triton.jit
def _caption_gram(g_ptr, gs0, gs1, ids_ptr, lens_ptr, start, count, CODING: tl.constexpr,
                  OWNERS: tl.constexpr, PAD: tl.constexpr):
    """VSA's block-diagonal word Gram matrix of OWNERS captions from `start` (tile.load_gram);
    the other codings read none (a placeholder, never used)."""
    if CODING == _VSA:
        G2 = load_gram(g_ptr, gs0, gs1, ids_ptr, lens_ptr, start, count, OWNERS, PAD)
    else:
        G2 = tl.zeros((1, 1), dtype=tl.float32)
    return G2


@triton.jit
def _vsa_codes(S4, G2, wv4, vsa_tau, BI: tl.constexpr, R_PAD: tl.constexpr, BJ: tl.constexpr,
               L_PAD: tl.constexpr, EPI_PREC: tl.constexpr):
    """CHAN's VSA coding of every region of the tile (HEADS.md): a_r = softmax over the real
    words of S[r, .] / vsa_tau, c_r = sum_w a_rw e_w, x_r = (v_r . c_r) / (|c_r| + eps) by the
    Gram identity: v_r . c_r = sum_w a_rw S[r, w], |c_r|^2 = a_r^T G a_r (G2: the tile's
    block-diagonal word Gram), so the attended vectors are never formed. Returns x
    (BI, R_PAD, BJ) and what the backward needs: a, a G (BI, R_PAD, BJ, L_PAD), |c|, |c| + eps."""
    z = tl.where(wv4, S4 / vsa_tau, float("-inf"))
    e = tl.exp(z - tl.expand_dims(tl.max(z, axis=3), 3))
    a4 = e / tl.expand_dims(tl.sum(e, axis=3), 3)
    AG2 = halves_dot(tl.reshape(a4, (BI * R_PAD, BJ * L_PAD)), G2, BI * R_PAD, BJ * L_PAD,
                     BJ * L_PAD, EPI_PREC)
    AG4 = tl.reshape(AG2, (BI, R_PAD, BJ, L_PAD))
    norm = tl.sqrt(tl.maximum(tl.sum(AG4 * a4, axis=3), 0.0))  # rounding can go below an exact 0
    den = norm + _EPS
    return tl.sum(a4 * S4, axis=3) / den, a4, AG4, norm, den


@triton.jit
def _vsa_grad(coef, S4, a4, AG4, x, norm, den, vsa_tau):
    """The VSA coding's backward for coef = dL/dx_r (BI, R_PAD, BJ): dL/dS (through the
    numerator and the softmax) and the Gram term's weights W = a_r dL/d|c_r|^2, whose
    sum_r W_r^T a_r is dL/dG (HEADS.md's closed form, written through G)."""
    d_num = coef / den
    # d x / d|c|^2 = -x / (2 |c| (|c| + eps)); 0 at |c| = 0, as torch's norm gives
    d_sq = tl.where(norm > 0, -coef * x / (2.0 * tl.where(norm > 0, norm, 1.0) * den), 0.0)
    da = (tl.expand_dims(d_num, 3) * S4 + 2.0 * tl.expand_dims(d_sq, 3) * AG4)
    dS4 = a4 * (tl.expand_dims(d_num, 3)
                + (da - tl.expand_dims(tl.sum(a4 * da, axis=3), 3)) / vsa_tau)
    return dS4, a4 * tl.expand_dims(d_sq, 3)


@triton.jit
def _head(S, G2, r_len, w_len, tau, both_scale, vsa_tau, DIRECTION: tl.constexpr,
          POOL: tl.constexpr, LEAKY: tl.constexpr, CODING: tl.constexpr, BI: tl.constexpr,
          R_PAD: tl.constexpr, BJ: tl.constexpr, L_PAD: tl.constexpr, EPI_PREC: tl.constexpr):
    """The similarity (BI, BJ) of every pair of the tile from its scores S (and, for VSA, the
    captions' Gram G2)."""
    S4 = tl.reshape(S, (BI, R_PAD, BJ, L_PAD))
    ri4, wi4, rv4, wv4, ri3, wi3, rv3, wv3 = _tile_geometry(r_len, w_len, R_PAD, L_PAD)
    sim = tl.zeros((BI, BJ), dtype=S.dtype)
    if CODING == _VSA:   # regions coded (i2t), pooled over the real regions
        x = _leaky(_vsa_codes(S4, G2, wv4, vsa_tau, BI, R_PAD, BJ, L_PAD, EPI_PREC)[0], LEAKY)
        sim += _pool(x, rv3, r_len[:, None], tau, 1, POOL)
    else:
        if DIRECTION != _I2T:
            m = _leaky(_max_first(S4, rv4, ri4, 1)[0], LEAKY)                # (BI, BJ, L_PAD)
            sim += _pool(m, wv3, w_len[None, :], tau, 2, POOL)
        if DIRECTION != _T2I:
            n = _leaky(_max_first(S4, wv4, wi4, 3)[0], LEAKY)                # (BI, R_PAD, BJ)
            sim += _pool(n, rv3, r_len[:, None], tau, 1, POOL)
        if DIRECTION == _BOTH:
            sim = both_scale * sim
    return sim


@triton.jit
def _head_grad(S, G2, g, r_len, w_len, tau, both_scale, vsa_tau, DIRECTION: tl.constexpr,
               POOL: tl.constexpr, LEAKY: tl.constexpr, CODING: tl.constexpr, BI: tl.constexpr,
               R_PAD: tl.constexpr, BJ: tl.constexpr, L_PAD: tl.constexpr,
               EPI_PREC: tl.constexpr):
    """dL/dS (BI*R_PAD, BJ*L_PAD) for the upstream g = dL/dsim (BI, BJ), 0 at padding and for
    pairs whose g is 0: each maximum's first argmax gets G x pool weight x leaky'. For VSA
    also the Gram term's factors (W, a), (BI*R_PAD, BJ*L_PAD) each (zeros otherwise): the
    captions' dG = W^T a, within each caption's block."""
    S4 = tl.reshape(S, (BI, R_PAD, BJ, L_PAD))
    ri4, wi4, rv4, wv4, ri3, wi3, rv3, wv3 = _tile_geometry(r_len, w_len, R_PAD, L_PAD)
    if DIRECTION == _BOTH:
        g = both_scale * g
    dS4 = tl.zeros((BI, R_PAD, BJ, L_PAD), dtype=S.dtype)
    W4 = tl.zeros((BI, R_PAD, BJ, L_PAD), dtype=S.dtype)
    a4 = tl.zeros((BI, R_PAD, BJ, L_PAD), dtype=S.dtype)
    if CODING == _VSA:
        x, a4, AG4, norm, den = _vsa_codes(S4, G2, wv4, vsa_tau, BI, R_PAD, BJ, L_PAD, EPI_PREC)
        weight = _pool_weights(_leaky(x, LEAKY), rv3, ri3, r_len[:, None], tau, 1, POOL)
        coef = g[:, None, :] * weight * _leaky_slope(x, LEAKY)           # (BI, R_PAD, BJ)
        dS4, W4 = _vsa_grad(coef, S4, a4, AG4, x, norm, den, vsa_tau)
    else:
        if DIRECTION != _I2T:
            top, first = _max_first(S4, rv4, ri4, 1)                     # (BI, BJ, L_PAD)
            weight = _pool_weights(_leaky(top, LEAKY), wv3, wi3, w_len[None, :], tau, 2, POOL)
            coef = g[:, :, None] * weight * _leaky_slope(top, LEAKY)
            dS4 += tl.where(ri4 == first[:, None, :, :], coef[:, None, :, :], 0.0)
        if DIRECTION != _T2I:
            top, first = _max_first(S4, wv4, wi4, 3)                     # (BI, R_PAD, BJ)
            weight = _pool_weights(_leaky(top, LEAKY), rv3, ri3, r_len[:, None], tau, 1, POOL)
            coef = g[:, None, :] * weight * _leaky_slope(top, LEAKY)
            dS4 += tl.where(wi4 == first[:, :, :, None], coef[:, :, :, None], 0.0)
    dS4 = tl.where(rv4 & wv4, dS4, 0.0)
    return (tl.reshape(dS4, (BI * R_PAD, BJ * L_PAD)), tl.reshape(W4, (BI * R_PAD, BJ * L_PAD)),
            tl.reshape(a4, (BI * R_PAD, BJ * L_PAD)))


@triton.jit
def _side(ids_ptr, lens_ptr, start, count, s0, s1, OWNERS: tl.constexpr, PAD: tl.constexpr):
    """One side of a tile: its OWNERS owners from `start` (ids, lengths, which are real) and
    their OWNERS*PAD rows (offsets with strides s0, s1, and which are real items)."""
    ids, lens, real = tile_owners(ids_ptr, lens_ptr, start, count, OWNERS)
    rows, ok = tile_rows(ids_ptr, lens_ptr, start, count, s0, s1, OWNERS, PAD)
    return ids, lens, real, rows, ok


@triton.jit
def _tile_grad(img_ptr, i_rows, i_ok, si2, i_ids, i_real, r_len,
               cap_ptr, j_rows, j_ok, sc2, j_ids, j_real, w_len, G2,
               dsim_ptr, ds_i, ds_j, D, tau, both_scale, vsa_tau,
               DIRECTION: tl.constexpr, POOL: tl.constexpr, LEAKY: tl.constexpr,
               CODING: tl.constexpr, R_PAD: tl.constexpr, L_PAD: tl.constexpr,
               ACC: tl.constexpr, MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr,
               BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """dS (and VSA's Gram factors) of one (BI images x BJ captions) tile: its scores
    recomputed, then the head's backward from the tile's upstream gradients (0 for pairs
    outside the launch)."""
    S = score_tile(img_ptr, i_rows, i_ok, si2, cap_ptr, j_rows, j_ok, sc2, D,
                   BI * R_PAD, BJ * L_PAD, BK, ACC, MAIN_PREC)
    g = tl.load(dsim_ptr + i_ids[:, None] * ds_i + j_ids[None, :] * ds_j,
                mask=i_real[:, None] & j_real[None, :], other=0.0).to(ACC)
    return _head_grad(S, G2, g, r_len, w_len, tau, both_scale, vsa_tau, DIRECTION, POOL, LEAKY,
                      CODING, BI, R_PAD, BJ, L_PAD, EPI_PREC)


# =============================================================================================
# Kernels
# =============================================================================================

@triton.jit
def _maxsim_fwd_kernel(img_ptr, si0, si1, si2, img_ids_ptr, img_lens_ptr, n_img,
                       cap_ptr, sc0, sc1, sc2, cap_ids_ptr, cap_lens_ptr, n_cap,
                       out_ptr, os_i, os_j, D, params_ptr, g_ptr, gs0, gs1,
                       DIRECTION: tl.constexpr, POOL: tl.constexpr, LEAKY: tl.constexpr,
                       CODING: tl.constexpr, R_PAD: tl.constexpr, L_PAD: tl.constexpr,
                       ACC: tl.constexpr, MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr,
                       BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                       GROUP: tl.constexpr):
    tau, both_scale, vsa_tau = _params(params_ptr)
    i_start, j_start = tile_start(tl.program_id(0), n_img, n_cap, BI, BJ, GROUP)
    i_ids, r_len, i_real, i_rows, i_ok = _side(img_ids_ptr, img_lens_ptr, i_start, n_img,
                                               si0, si1, BI, R_PAD)
    j_ids, w_len, j_real, j_rows, j_ok = _side(cap_ids_ptr, cap_lens_ptr, j_start, n_cap,
                                               sc0, sc1, BJ, L_PAD)
    S = score_tile(img_ptr, i_rows, i_ok, si2, cap_ptr, j_rows, j_ok, sc2, D,
                   BI * R_PAD, BJ * L_PAD, BK, ACC, MAIN_PREC)
    G2 = _caption_gram(g_ptr, gs0, gs1, cap_ids_ptr, cap_lens_ptr, j_start, n_cap, CODING, BJ,
                       L_PAD)
    sim = _head(S, G2, r_len, w_len, tau, both_scale, vsa_tau, DIRECTION, POOL, LEAKY, CODING,
                BI, R_PAD, BJ, L_PAD, EPI_PREC)
    tl.store(out_ptr + i_ids[:, None] * os_i + j_ids[None, :] * os_j, sim,
             mask=i_real[:, None] & j_real[None, :])


@triton.jit
def _maxsim_bwd_kernel(img_ptr, si0, si1, si2, img_ids_ptr, img_lens_ptr, n_img,
                       cap_ptr, sc0, sc1, sc2, cap_ids_ptr, cap_lens_ptr, n_cap,
                       dsim_ptr, ds_i, ds_j, dst_ptr, dst0, dst1, D, params_ptr, g_ptr, gs0,
                       gs1, OWN_IS_IMG: tl.constexpr, DIRECTION: tl.constexpr,
                       POOL: tl.constexpr, LEAKY: tl.constexpr, CODING: tl.constexpr,
                       R_PAD: tl.constexpr, L_PAD: tl.constexpr, ACC: tl.constexpr,
                       MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr,
                       BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                       BD: tl.constexpr):
    """d img for BI images (OWN_IS_IMG), summed over every caption of the launch's bucket, or
    d cap for BJ captions of the bucket, summed over every image: the program's own side is
    fixed, the other side's blocks are walked."""
    tau, both_scale, vsa_tau = _params(params_ptr)
    if OWN_IS_IMG:
        i_start = tl.program_id(0) * BI
        i_ids, r_len, i_real, i_rows, i_ok = _side(img_ids_ptr, img_lens_ptr, i_start, n_img,
                                                   si0, si1, BI, R_PAD)
        d_rows, _ = tile_rows(img_ids_ptr, img_lens_ptr, i_start, n_img, dst0, dst1, BI, R_PAD)
        n_other = n_cap
    else:
        j_start = tl.program_id(0) * BJ
        j_ids, w_len, j_real, j_rows, j_ok = _side(cap_ids_ptr, cap_lens_ptr, j_start, n_cap,
                                                   sc0, sc1, BJ, L_PAD)
        d_rows, _ = tile_rows(cap_ids_ptr, cap_lens_ptr, j_start, n_cap, dst0, dst1, BJ, L_PAD)
        n_other = n_img
        G2 = _caption_gram(g_ptr, gs0, gs1, cap_ids_ptr, cap_lens_ptr, j_start, n_cap, CODING,
                           BJ, L_PAD)
        dgram = tl.zeros((BJ * L_PAD, BJ * L_PAD), dtype=ACC)   # VSA: sum over images of dG
    for other in range(0, n_other, BJ if OWN_IS_IMG else BI):
        if OWN_IS_IMG:
            j_start = other
            j_ids, w_len, j_real, j_rows, j_ok = _side(cap_ids_ptr, cap_lens_ptr, j_start,
                                                       n_cap, sc0, sc1, BJ, L_PAD)
            G2 = _caption_gram(g_ptr, gs0, gs1, cap_ids_ptr, cap_lens_ptr, j_start, n_cap,
                               CODING, BJ, L_PAD)
        else:
            i_start = other
            i_ids, r_len, i_real, i_rows, i_ok = _side(img_ids_ptr, img_lens_ptr, i_start,
                                                       n_img, si0, si1, BI, R_PAD)
        dS, W2, A2 = _tile_grad(img_ptr, i_rows, i_ok, si2, i_ids, i_real, r_len,
                                cap_ptr, j_rows, j_ok, sc2, j_ids, j_real, w_len, G2,
                                dsim_ptr, ds_i, ds_j, D, tau, both_scale, vsa_tau, DIRECTION,
                                POOL, LEAKY, CODING, R_PAD, L_PAD, ACC, MAIN_PREC, EPI_PREC,
                                BI, BJ, BK)
        if OWN_IS_IMG:   # d img += dS @ cap, in d-chunks (stored first, then added)
            add_rows(dst_ptr, d_rows, i_ok, cap_ptr, j_rows, j_ok, sc2, dS, D, other > 0,
                     BD, EPI_PREC, ACC)
        else:            # d cap += dS^T @ img
            add_rows(dst_ptr, d_rows, j_ok, img_ptr, i_rows, i_ok, si2, tl.trans(dS), D,
                     other > 0, BD, EPI_PREC, ACC)
            if CODING == _VSA:
                dgram += halves_dot(tl.trans(W2), A2, BJ * L_PAD, BI * R_PAD, BJ * L_PAD,
                                    EPI_PREC)
        tl.debug_barrier()  # the next iteration's threads read what this one wrote
    if not OWN_IS_IMG:
        if CODING == _VSA:   # d cap += 2 dG @ cap, within each caption's block
            add_gram_rows(dst_ptr, d_rows, cap_ptr, j_rows, j_ok, sc2, dgram, D, BD, EPI_PREC,
                          ACC, BJ * L_PAD, L_PAD)


# ---------------------------------------------------------------------------------------------
# Listed pairs (maxsim_pairs: re-ranking a shortlist): one pair per program, the same epilogue
# ---------------------------------------------------------------------------------------------
# A launch covers one caption bucket's pairs; per pair p: its image and caption row ids and
# lengths (pair-order arrays built on the host), and where its score goes (pos). The backward
# groups the bucket's pairs by image (and, separately, by caption): one program per distinct
# image walks that image's pairs (offsets into the grouped order) and read-modify-writes the
# image's rows, so every row has one owner per launch (deterministic, no atomics).

@triton.jit
def _pair_tile(img_ptr, si0, si1, si2, i_ids_ptr, i_lens_ptr, i_at, n_i,
               cap_ptr, sc0, sc1, sc2, j_ids_ptr, j_lens_ptr, j_at, n_j, D, g_ptr, gs0, gs1,
               CODING: tl.constexpr, R_PAD: tl.constexpr, L_PAD: tl.constexpr,
               BK: tl.constexpr, ACC: tl.constexpr, MAIN_PREC: tl.constexpr):
    """The (R_PAD, L_PAD) tile of one pair: image entry i_at of (i_ids, i_lens) and caption
    entry j_at of (j_ids, j_lens); also the caption's Gram (VSA), their lengths (1,) and the
    rows' offsets and masks."""
    _, r_len, _, i_rows, i_ok = _side(i_ids_ptr, i_lens_ptr, i_at, n_i, si0, si1, 1, R_PAD)
    _, w_len, _, j_rows, j_ok = _side(j_ids_ptr, j_lens_ptr, j_at, n_j, sc0, sc1, 1, L_PAD)
    S = score_tile(img_ptr, i_rows, i_ok, si2, cap_ptr, j_rows, j_ok, sc2, D,
                   R_PAD, L_PAD, BK, ACC, MAIN_PREC)
    G2 = _caption_gram(g_ptr, gs0, gs1, j_ids_ptr, j_lens_ptr, j_at, n_j, CODING, 1, L_PAD)
    return S, G2, r_len, w_len, i_rows, i_ok, j_rows, j_ok


@triton.jit
def _maxsim_pairs_fwd_kernel(img_ptr, si0, si1, si2, p_img_ptr, p_img_lens_ptr,
                             cap_ptr, sc0, sc1, sc2, p_cap_ptr, p_cap_lens_ptr, n_pairs,
                             pos_ptr, out_ptr, D, params_ptr, g_ptr, gs0, gs1,
                             DIRECTION: tl.constexpr, POOL: tl.constexpr, LEAKY: tl.constexpr,
                             CODING: tl.constexpr, R_PAD: tl.constexpr, L_PAD: tl.constexpr,
                             ACC: tl.constexpr, MAIN_PREC: tl.constexpr,
                             EPI_PREC: tl.constexpr, BK: tl.constexpr):
    tau, both_scale, vsa_tau = _params(params_ptr)
    p = tl.program_id(0)
    S, G2, r_len, w_len, _, _, _, _ = _pair_tile(
        img_ptr, si0, si1, si2, p_img_ptr, p_img_lens_ptr, p, n_pairs,
        cap_ptr, sc0, sc1, sc2, p_cap_ptr, p_cap_lens_ptr, p, n_pairs, D, g_ptr, gs0, gs1,
        CODING, R_PAD, L_PAD, BK, ACC, MAIN_PREC)
    sim = _head(S, G2, r_len, w_len, tau, both_scale, vsa_tau, DIRECTION, POOL, LEAKY, CODING,
                1, R_PAD, 1, L_PAD, EPI_PREC)
    pos = tl.load(pos_ptr + p + tl.arange(0, 1)).to(tl.int64)
    tl.store(out_ptr + pos[:, None], sim)


@triton.jit
def _maxsim_pairs_bwd_kernel(own_ptr, so0, so1, so2, own_ids_ptr, own_lens_ptr, n_own,
                             other_ptr, st0, st1, st2, other_ids_ptr, other_lens_ptr, n_listed,
                             offsets_ptr, pos_ptr, dsim_ptr, dst_ptr, ds0, ds1, D, params_ptr,
                             g_ptr, gs0, gs1, OWN_IS_IMG: tl.constexpr,
                             DIRECTION: tl.constexpr, POOL: tl.constexpr, LEAKY: tl.constexpr,
                             CODING: tl.constexpr, R_PAD: tl.constexpr, L_PAD: tl.constexpr,
                             ACC: tl.constexpr, MAIN_PREC: tl.constexpr,
                             EPI_PREC: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """d(own side) for one distinct owner u (an image if OWN_IS_IMG, else a caption): the sum
    over its pairs k in [offsets[u], offsets[u+1]) of the grouped order, whose other sides are
    (other_ids[k], other_lens[k]) and whose upstream gradient is dsim[pos[k]]."""
    tau, both_scale, vsa_tau = _params(params_ptr)
    u = tl.program_id(0)
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
    if not OWN_IS_IMG:
        dgram = tl.zeros((L_PAD, L_PAD), dtype=ACC)   # VSA: the caption's dG over its pairs
    for k in range(start, end):
        g = tl.load(dsim_ptr + tl.load(pos_ptr + k + tl.arange(0, 1)).to(tl.int64)).to(ACC)
        if OWN_IS_IMG:
            S, G2, r_len, w_len, i_rows, i_ok, j_rows, j_ok = _pair_tile(
                own_ptr, so0, so1, so2, own_ids_ptr, own_lens_ptr, u, n_own,
                other_ptr, st0, st1, st2, other_ids_ptr, other_lens_ptr, k, n_listed, D,
                g_ptr, gs0, gs1, CODING, R_PAD, L_PAD, BK, ACC, MAIN_PREC)
        else:
            S, G2, r_len, w_len, i_rows, i_ok, j_rows, j_ok = _pair_tile(
                other_ptr, st0, st1, st2, other_ids_ptr, other_lens_ptr, k, n_listed,
                own_ptr, so0, so1, so2, own_ids_ptr, own_lens_ptr, u, n_own, D,
                g_ptr, gs0, gs1, CODING, R_PAD, L_PAD, BK, ACC, MAIN_PREC)
        dS, W2, A2 = _head_grad(S, G2, g[:, None], r_len, w_len, tau, both_scale, vsa_tau,
                                DIRECTION, POOL, LEAKY, CODING, 1, R_PAD, 1, L_PAD, EPI_PREC)
        if OWN_IS_IMG:
            d_rows, _ = tile_rows(own_ids_ptr, own_lens_ptr, u, n_own, ds0, ds1, 1, R_PAD)
            add_rows(dst_ptr, d_rows, i_ok, other_ptr, j_rows, j_ok, st2, dS, D, True,
                     BD, EPI_PREC, ACC)
        else:
            d_rows, _ = tile_rows(own_ids_ptr, own_lens_ptr, u, n_own, ds0, ds1, 1, L_PAD)
            add_rows(dst_ptr, d_rows, j_ok, other_ptr, i_rows, i_ok, st2, tl.trans(dS), D,
                     True, BD, EPI_PREC, ACC)
            if CODING == _VSA:
                dgram += halves_dot(tl.trans(W2), A2, L_PAD, R_PAD, L_PAD, EPI_PREC)
        tl.debug_barrier()  # the next pair's threads read what this one wrote
    if not OWN_IS_IMG:
        if CODING == _VSA:   # d cap += 2 dG @ cap
            own_rows, own_ok = tile_rows(own_ids_ptr, own_lens_ptr, u, n_own, so0, so1, 1,
                                         L_PAD)
            d_rows, _ = tile_rows(own_ids_ptr, own_lens_ptr, u, n_own, ds0, ds1, 1, L_PAD)
            add_gram_rows(dst_ptr, d_rows, own_ptr, own_rows, own_ok, so2, dgram, D, BD,
                          EPI_PREC, ACC, L_PAD, L_PAD)


# =============================================================================================
# Tile shapes: fixed small tiles under the interpreter, autotuned on GPUs
# =============================================================================================

# Tile budgets (M = BI*R_PAD image rows x N = BJ*L_PAD word columns), from compiling for sm_90
# with triton 3.6 and 3.8 (tests/test_sm90_compile.py, registers per thread at 8 warps, 0 B
# of stack in every kept config). The epilogue keeps only the tile, its masked copy and the
# per-word / per-region maxima live, far less than SCAN's:
# * fp16/bf16 forward: 64x64 .. 128x128, 44-160 registers;
# * fp16/bf16 d img: 64x32 .. 64x128 / 128x64, 76-167; d cap holds the transposed dS and
#   reached 238-255 registers at 64x128 / 128x64 with 3.6 (no spill, no margin): up to 64x64,
#   78-190;
# * fp32 (IEEE FMA dots, d-chunks of 16): forward up to 64x64, 42-80; backward up to 64x32,
#   59-109; the 64x64 fallback of the 64-word bucket runs its gradient GEMM in d-chunks of 16
#   (of 32: 16 B of stack in d cap with 3.6; of 16: 80-110 registers, none).
_LIMITS = {
    ("fwd", "low"): dict(max_m=128, max_n=128, max_area=128 * 128, min_area=64 * 64),
    ("bwd_img", "low"): dict(max_m=128, max_n=128, max_area=64 * 128, min_area=64 * 32),
    ("bwd_cap", "low"): dict(max_m=128, max_n=128, max_area=64 * 64, min_area=64 * 32),
    ("fwd", "fp32"): dict(max_m=128, max_n=128, max_area=64 * 64, min_area=32 * 16),
    ("bwd_img", "fp32"): dict(max_m=64, max_n=64, max_area=64 * 32, min_area=16 * 16),
    ("bwd_cap", "fp32"): dict(max_m=64, max_n=64, max_area=64 * 32, min_area=16 * 16),
}
# CHAN's VSA keeps more tile-sized tensors live (the softmax weights, a G, and in the backward
# the Gram term's factors and the caption's dG): its own budgets where they differ (sm_90,
# triton 3.6 and 3.8, 0 B of stack in every kept config, R=36, captions of 12 and 50 words).
# fp16/bf16: forward up to 64x128 / 128x64, 75-191 registers (128x128: 80-96 B of stack); d img
# up to N = 64 columns, 98-213 (64x128: 184-432 B); d cap up to 128x32, 103-225 (64x64: only
# the 64-word bucket's fallback, _fallback: 246-255). fp32: forward 55-122, d img 60-230,
# d cap up to 64x16, 80-230 (64x32: 8 B).
_VSA_LIMITS = {
    ("fwd", "low"): dict(max_m=128, max_n=128, max_area=64 * 128, min_area=64 * 64),
    ("bwd_img", "low"): dict(max_m=128, max_n=64, max_area=128 * 64, min_area=64 * 32),
    ("bwd_cap", "low"): dict(max_m=128, max_n=32, max_area=128 * 32, min_area=64 * 16),
    ("bwd_cap", "fp32"): dict(max_m=64, max_n=64, max_area=64 * 16, min_area=16 * 16),
}
# The d-chunk of the fp32 GEMM: FMA dots keep (rows, BK) operands per thread.
_FP32_BK = 16


def _limits(kernel: str, kind: str, coding: int) -> dict:
    if coding == _VSA_CODING:
        return _VSA_LIMITS.get((kernel, kind), _LIMITS[(kernel, kind)])
    return _LIMITS[(kernel, kind)]


def _fallback(kernel: str, kind: str, coding: int, bi: int, bj: int, bk: int) -> triton.Config:
    """The smallest-tile config, for paddings beyond the budget (see _LIMITS, _VSA_LIMITS):
    backward d-chunks of 16 (fp32) or 64 (fp16/bf16). VSA's d cap at 64 x 64 keeps 0 B of
    stack (triton 3.6) only with, fp16/bf16, d-chunks of 32 in one stage (2 stages: 16 B) and,
    fp32, 16 warps (86-116 registers; 8 warps: 16-32 B with mean pooling)."""
    if kernel == "fwd":
        return triton.Config(dict(BI=bi, BJ=bj, BK=bk, GROUP=8), num_warps=8, num_stages=2)
    vsa = coding == _VSA_CODING
    if kind == "fp32":
        return triton.Config(dict(BI=bi, BJ=bj, BK=bk, BD=16), num_warps=16 if vsa else 8,
                             num_stages=2)
    return triton.Config(dict(BI=bi, BJ=bj, BK=bk, BD=32 if vsa else 64), num_warps=8,
                         num_stages=1 if vsa else 2)


def _prune(kernel: str):
    """The early_config_prune of one kernel ("fwd", "bwd_img", "bwd_cap"): the configs whose
    tile fits its budget and dtype's d-chunk; the smallest tile when none does."""
    def prune(configs, named_args, **kwargs):
        a = named(named_args, kwargs)
        r_pad, l_pad, kind = a["R_PAD"], a["L_PAD"], precision_kind(a["img_ptr"])
        coding = a.get("CODING", _MAX_CODING)
        keep = tile_shapes(r_pad, l_pad, **_limits(kernel, kind, coding))
        bk = _FP32_BK if kind == "fp32" else 64
        out = [c for c in configs if (c.kwargs["BI"], c.kwargs["BJ"]) in keep
               and c.kwargs["BK"] == bk]
        if not out:  # paddings beyond the budget: the smallest tile
            out = [_fallback(kernel, kind, coding, *smallest_shape(r_pad, l_pad), bk)]
        return quick(out, config_area(r_pad, l_pad))
    return prune


_FWD_CONFIGS = ([triton.Config(dict(BI=bi, BJ=bj, BK=64, GROUP=8), num_warps=8, num_stages=3)
                 for bi, bj in OWNER_SHAPES]
                + [triton.Config(dict(BI=bi, BJ=bj, BK=_FP32_BK, GROUP=8), num_warps=8,
                                 num_stages=2) for bi, bj in OWNER_SHAPES])
_BWD_CONFIGS = ([triton.Config(dict(BI=bi, BJ=bj, BK=64, BD=64), num_warps=8, num_stages=2)
                 for bi, bj in OWNER_SHAPES]
                + [triton.Config(dict(BI=bi, BJ=bj, BK=_FP32_BK, BD=32), num_warps=8,
                                 num_stages=2) for bi, bj in OWNER_SHAPES])
_KEY = ["R_PAD", "L_PAD", "D", "DIRECTION", "POOL", "LEAKY", "CODING"]

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune("fwd")})(_maxsim_fwd_kernel)
_bwd_img_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune("bwd_img")})(_maxsim_bwd_kernel)
_bwd_cap_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune("bwd_cap")})(_maxsim_bwd_kernel)


def _interpreter_shape(r_pad: int, l_pad: int):
    # The smallest legal tile, with >= 2 captions per tile so that multi-owner tiles and partial
    # last blocks are exercised by the CPU tests.
    return max(1, MIN_DOT // r_pad), max(2, MIN_DOT // l_pad)


# =============================================================================================
# Launch helpers
# =============================================================================================

@dataclasses.dataclass
class MaxSimProblem:
    img: torch.Tensor
    cap: torch.Tensor
    images: OwnerGroup          # every image, its real region counts
    captions: list              # OwnerGroups: caption length buckets
    direction: int
    pool: int
    leaky: bool
    coding: int
    params: torch.Tensor        # (tau, both_scale, vsa_tau) in the accumulation dtype
    gram: torch.Tensor          # VSA: the captions' word Gram (n_cap, Lmax, Lmax); else (1, 1, 1)
    acc: object                 # tl.float32 / tl.float64
    out_dtype: torch.dtype
    main_prec: str
    epi_prec: str


def build_problem(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale,
                  coding="max", vsa_tau=contract.CHAN_TAU) -> MaxSimProblem:
    """Everything the kernels need for one call. lens, img_lens: int64 on any device.
    coding="vsa" (CHAN's VSA, direction "i2t") also computes the captions' Gram matrices
    (n_cap x Lmax^2 in the accumulation dtype: the one buffer beyond inputs and outputs)."""
    autotune_mode()  # a bad RCAR_FAST_AUTOTUNE fails here, before any kernel runs
    n_img, n_regions, _ = img.shape
    acc_torch = torch.float64 if img.dtype == torch.float64 else torch.float32
    vsa = coding == "vsa"
    gram = (context_gram(cap) if vsa and cap.shape[0] else
            torch.zeros((1, 1, 1), dtype=acc_torch, device=img.device))
    images = OwnerGroup(torch.arange(n_img, device=img.device, dtype=torch.int32),
                        img_lens.to(device=img.device, dtype=torch.int32),
                        pow2_at_least(n_regions, 1), n_img)
    fp32_like = img.dtype in (torch.float32, torch.float64)
    return MaxSimProblem(
        img=img, cap=cap, images=images,
        captions=caption_groups(lens.detach().to("cpu", torch.int64), cap.device, 8),
        direction=contract.HEAD_DIRECTION_CODES[direction], pool=contract.POOL_CODES[pool],
        leaky=bool(leaky), coding=contract.HEAD_CODINGS.index(coding),
        params=torch.tensor([float(tau), float(both_scale), float(vsa_tau)], dtype=acc_torch,
                            device=img.device),
        gram=gram,
        acc=tl.float64 if acc_torch == torch.float64 else tl.float32, out_dtype=acc_torch,
        main_prec=FP32_DOT_PRECISION if fp32_like else "tf32",
        epi_prec="ieee" if (fp32_like or interpreter_on()) else "tf32")


def _operands(p: MaxSimProblem, cg: OwnerGroup):
    im, cp, ig = p.img, p.cap, p.images
    return (im, im.stride(0), im.stride(1), im.stride(2), ig.ids, ig.lens, ig.count,
            cp, cp.stride(0), cp.stride(1), cp.stride(2), cg.ids, cg.lens, cg.count)


def _settings(p: MaxSimProblem):
    """The kernels' run-time settings and VSA's Gram: (params, gram and its row strides)."""
    return p.params, p.gram, p.gram.stride(0), p.gram.stride(1)


def _constexprs(p: MaxSimProblem, cg: OwnerGroup) -> dict:
    return dict(DIRECTION=p.direction, POOL=p.pool, LEAKY=p.leaky, CODING=p.coding,
                R_PAD=p.images.pad, L_PAD=cg.pad, ACC=p.acc, MAIN_PREC=p.main_prec,
                EPI_PREC=p.epi_prec)


def maxsim_forward(p: MaxSimProblem, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n_img, n_cap) similarities. `out`, if given, is written in full (tests poison it)."""
    if out is None:
        out = torch.empty((p.images.count, p.cap.shape[0]), device=p.img.device,
                          dtype=p.out_dtype)
    d = p.img.shape[2]
    for cg in p.captions if p.images.count else ():   # (an empty grid is not launched)
        args = (*_operands(p, cg), out, out.stride(0), out.stride(1), d, *_settings(p))
        if interpreter_on():
            bi, bj = _interpreter_shape(p.images.pad, cg.pad)
            grid = (triton.cdiv(p.images.count, bi) * triton.cdiv(cg.count, bj),)
            _maxsim_fwd_kernel[grid](*args, **_constexprs(p, cg), BI=bi, BJ=bj, BK=MIN_DOT,
                                     GROUP=2)
        else:
            grid = lambda meta, cg=cg: (  # noqa: E731
                triton.cdiv(p.images.count, meta["BI"]) * triton.cdiv(cg.count, meta["BJ"]),)
            _fwd_tuned[grid](*args, **_constexprs(p, cg))
    return out


def _launch_backward(p: MaxSimProblem, cg: OwnerGroup, dsim, target, of_img: bool):
    tuned = _bwd_img_tuned if of_img else _bwd_cap_tuned
    args = (*_operands(p, cg), dsim, dsim.stride(0), dsim.stride(1), target, target.stride(0),
            target.stride(1), p.img.shape[2], *_settings(p))
    cexpr = dict(_constexprs(p, cg), OWN_IS_IMG=of_img)
    count = p.images.count if of_img else cg.count
    if p.images.count == 0:   # nothing to sum: the gradient stays zero (no empty grid)
        return
    if interpreter_on():
        bi, bj = _interpreter_shape(p.images.pad, cg.pad)
        grid = (triton.cdiv(count, bi if of_img else bj),)
        _maxsim_bwd_kernel[grid](*args, **cexpr, BI=bi, BJ=bj, BK=MIN_DOT, BD=MIN_DOT)
    else:
        block = "BI" if of_img else "BJ"
        tuned[lambda meta: (triton.cdiv(count, meta[block]),)](*args, **cexpr)


def maxsim_backward(p: MaxSimProblem, dsim: torch.Tensor, need_img: bool, need_cap: bool):
    """(d img, d cap) in the inputs' dtypes (None where not needed), zero at padding.

    d img: every caption bucket's launch covers all images, so the buckets' results are summed
    (the first writes the gradient, the others a scratch buffer added to it). d cap: each
    bucket's launch writes its own captions' rows of one buffer."""
    dsim = dsim.to(p.out_dtype).contiguous()
    dimg = dcap = None
    if need_img:
        dimg = torch.zeros(p.img.shape, device=p.img.device, dtype=p.out_dtype)
        scratch = torch.zeros_like(dimg) if len(p.captions) > 1 else None
        for k, cg in enumerate(p.captions):
            _launch_backward(p, cg, dsim, dimg if k == 0 else scratch, of_img=True)
            if k > 0:
                dimg += scratch
        dimg = dimg.to(p.img.dtype)
    if need_cap:
        dcap = torch.zeros(p.cap.shape, device=p.cap.device, dtype=p.out_dtype)
        for cg in p.captions:
            _launch_backward(p, cg, dsim, dcap, of_img=False)
        dcap = dcap.to(p.cap.dtype)
    return dimg, dcap


# ---------------------------------------------------------------------------------------------
# Listed pairs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PairGrouping:
    """A bucket's pairs grouped by one side: the distinct owners (ids, lens), offsets (U + 1,)
    into the grouped order, and per grouped pair the other side's ids and lens and the pair's
    output position."""
    owners: OwnerGroup
    offsets: torch.Tensor
    other_ids: torch.Tensor
    other_lens: torch.Tensor
    pos: torch.Tensor


@dataclasses.dataclass
class PairBucket:
    """The listed pairs whose captions share one padding L_PAD, in list order."""
    img_ids: torch.Tensor
    img_lens: torch.Tensor
    cap_ids: torch.Tensor
    cap_lens: torch.Tensor
    pos: torch.Tensor
    l_pad: int
    by_img: PairGrouping
    by_cap: PairGrouping


@dataclasses.dataclass
class MaxSimPairsProblem:
    heads: MaxSimProblem        # features, settings, precisions (its owner groups unused)
    buckets: list
    n_pairs: int
    r_pad: int


# Pair programs hold one pair: both paddings at least tl.dot's minimum.
_PAIR_FLOOR = MIN_DOT


def _grouping(key_ids, key_lens, other_ids, other_lens, pos, device) -> PairGrouping:
    order = torch.argsort(key_ids, stable=True)
    owners, counts = torch.unique_consecutive(key_ids[order], return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    offsets = torch.cat([first, counts.sum().reshape(1)])
    i32 = dict(device=device, dtype=torch.int32)
    return PairGrouping(OwnerGroup(owners.to(**i32), key_lens[order][first].to(**i32),
                                   0, int(owners.numel())),
                        offsets.to(**i32), other_ids[order].to(**i32),
                        other_lens[order].to(**i32), pos[order].to(**i32))


def build_pairs_problem(img, cap, lens, img_lens, img_idx, cap_idx, **settings) -> MaxSimPairsProblem:
    """Everything the pair kernels need. img_idx, cap_idx: int64 (P,) on any device."""
    heads = build_problem(img, cap, lens[:0], img_lens, **settings)
    cpu = dict(device="cpu", dtype=torch.int64)
    img_idx, cap_idx = img_idx.detach().to(**cpu), cap_idx.detach().to(**cpu)
    lens_cpu, img_lens_cpu = lens.detach().to(**cpu), img_lens.detach().to(**cpu)
    pair_lens, pair_img_lens = lens_cpu[cap_idx], img_lens_cpu[img_idx]
    pads = torch.tensor([pow2_at_least(v, _PAIR_FLOOR) for v in pair_lens.tolist()],
                        dtype=torch.int64)
    i32 = dict(device=img.device, dtype=torch.int32)
    buckets = []
    for l_pad in torch.unique(pads).tolist():
        pos = torch.nonzero(pads == l_pad).flatten()
        ii, il, cj, cl = img_idx[pos], pair_img_lens[pos], cap_idx[pos], pair_lens[pos]
        buckets.append(PairBucket(ii.to(**i32), il.to(**i32), cj.to(**i32), cl.to(**i32),
                                  pos.to(**i32), int(l_pad),
                                  _grouping(ii, il, cj, cl, pos, img.device),
                                  _grouping(cj, cl, ii, il, pos, img.device)))
    return MaxSimPairsProblem(heads, buckets, int(img_idx.numel()),
                              pow2_at_least(img.shape[1], _PAIR_FLOOR))


def _pair_launch_options(p: MaxSimPairsProblem, backward: bool) -> dict:
    """One fixed config (pair programs are small: one (R_PAD, L_PAD) tile each). The backward
    keeps the tile, dS and a d-chunk live: 8 warps (4 reach 254 registers at 64 x 64, sm_90),
    d-chunks BD of 64 (fp16/bf16) or 32 (fp32). VSA (more live tensors, and the caption's dG
    in the d cap programs): 8 warps forward too, and backward half the d-chunk, fp16/bf16 in
    one stage (d cap at 64 x 64, bf16, triton 3.6: 16 B of stack with BD 64 or 32 in 2
    stages, 0 B in one). Known spill: fp32 VSA with mean or sum pooling at 64 x 64 (the
    64-word bucket) keeps 8 B (3.8, d cap; 3.6 d img) to 120-136 B (3.6, d cap) of stack in
    every variant tried (BD 16/32, 1-2 stages, 8/16 warps); max, lse and softmax: 0 B."""
    if interpreter_on():
        return dict(BK=MIN_DOT, BD=MIN_DOT) if backward else dict(BK=MIN_DOT)
    low = p.heads.img.dtype in (torch.float16, torch.bfloat16)
    vsa = p.heads.coding == _VSA_CODING
    options = dict(BK=64 if low else _FP32_BK, num_warps=8 if backward or vsa else 4,
                   num_stages=1 if backward and vsa and low else 2)
    if backward:
        options["BD"] = (64 if low else 32) // (2 if vsa else 1)
    return options


def _pair_constexprs(p: MaxSimPairsProblem, b: PairBucket) -> dict:
    h = p.heads
    return dict(DIRECTION=h.direction, POOL=h.pool, LEAKY=h.leaky, CODING=h.coding,
                R_PAD=p.r_pad, L_PAD=b.l_pad, ACC=h.acc, MAIN_PREC=h.main_prec,
                EPI_PREC=h.epi_prec)


def maxsim_pairs_forward(p: MaxSimPairsProblem, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(P,) scores of the listed pairs. `out`, if given, is written in full."""
    h = p.heads
    if out is None:
        out = torch.empty((p.n_pairs,), device=h.img.device, dtype=h.out_dtype)
    im, cp = h.img, h.cap
    for b in p.buckets:
        _maxsim_pairs_fwd_kernel[(b.pos.numel(),)](
            im, im.stride(0), im.stride(1), im.stride(2), b.img_ids, b.img_lens,
            cp, cp.stride(0), cp.stride(1), cp.stride(2), b.cap_ids, b.cap_lens, b.pos.numel(),
            b.pos, out, im.shape[2], *_settings(h), **_pair_constexprs(p, b),
            **_pair_launch_options(p, backward=False))
    return out


def _pairs_side_gradient(p: MaxSimPairsProblem, dsim, of_img: bool) -> torch.Tensor:
    h = p.heads
    own, other = (h.img, h.cap) if of_img else (h.cap, h.img)
    grad = torch.zeros(own.shape, device=own.device, dtype=h.out_dtype)
    options = _pair_launch_options(p, backward=True)
    for b in p.buckets:
        g = b.by_img if of_img else b.by_cap
        _maxsim_pairs_bwd_kernel[(g.owners.count,)](
            own, own.stride(0), own.stride(1), own.stride(2), g.owners.ids, g.owners.lens,
            g.owners.count, other, other.stride(0), other.stride(1), other.stride(2),
            g.other_ids, g.other_lens, g.pos.numel(), g.offsets, g.pos, dsim, grad,
            grad.stride(0), grad.stride(1), own.shape[2], *_settings(h), OWN_IS_IMG=of_img,
            **_pair_constexprs(p, b), **options)
    return grad.to(own.dtype)


def maxsim_pairs_backward(p: MaxSimPairsProblem, dsim: torch.Tensor, need_img: bool,
                          need_cap: bool):
    """(d img, d cap) of the listed pairs' scores (None where not needed), zero at padding and
    at rows no pair uses. Each launch read-modify-writes its owners' rows (zero first)."""
    dsim = dsim.to(p.heads.out_dtype).contiguous()
    return (_pairs_side_gradient(p, dsim, True) if need_img else None,
            _pairs_side_gradient(p, dsim, False) if need_cap else None)
