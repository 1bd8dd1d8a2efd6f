"""Fused all-pairs SCAN similarity in Triton: forward and backward kernels, and their launchers.

Roles. Both directions run the same kernels; only the roles of the two inputs change:
  t2i: context X = image regions (n_img, R, d), query Y = caption words (n_cap, Lmax, d)
  i2t: context X = caption words,               query Y = image regions
For a pair, s[c, k] = x_c . y_k; the raw-score norm runs across the queries k of each context
item c, the attention softmax across the context items c of each query k.

Tiles. A program takes BI context owners (images for t2i) x BJ query owners (captions for t2i).
Each owner's items are padded to a power of two (C_PAD context items, Q_PAD queries; padding is
masked at load time, so NaN in caption padding is never read), which makes the score tile
(BI*C_PAD, BJ*Q_PAD) one tl.dot GEMM over d (fp32 accumulation) that reshapes to
(BI, C_PAD, BJ, Q_PAD): axis 1 are a pair's context items, axis 3 its queries. Every per-pair
step then is a reduction over axis 1 or 3, in registers. Captions are sorted by length and
launched in buckets of equal Q_PAD / C_PAD (a few launches), so short captions do not pay
for the longest.

Gram identity. Only q_k . ctx_k and |ctx_k| are needed:
  q_k . ctx_k = sum_c alpha[c, k] s[c, k],  |ctx_k|^2 = alpha_k^T G alpha_k,
with G the per-owner context Gram matrix (precomputed once, (n_x, C, C) fp32; a tile uses its
owners' blocks as one block-diagonal matrix in a 2D dot), so the attended d-vectors are never
formed: memory beyond inputs and outputs is G, the query norms and O(tile).

Backward (flash-attention style: recompute, never store per-pair tensors). One kernel,
_scan_bwd_kernel, in two roles:
  OWN_IS_X: one program per BI context owners, looping over all query blocks:
      dX += dS @ Y  and the Gram term dX += 2 (sum alpha dn2 alpha^T) X;
  else: one program per BJ query owners, looping over all context blocks:
      dY += dS^T @ X  and the query-norm term dY += (dqn / |y|) y.
Each program owns its output rows (deterministic, no atomics): it stores them on the first loop
iteration and read-modify-writes afterwards, with a CTA barrier between iterations. Both kernels
are idempotent (safe to autotune and to re-run).

Precision: fp32 inputs use IEEE fp32 dots throughout; fp16/bf16 inputs use their native
tensor-core GEMM for the scores (fp32 accumulation) and tf32 for the small fp32 epilogue dots
(Gram form, gradient GEMMs). float64 works under the interpreter (tests, gradcheck).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import triton
import triton.language as tl

from rcar_fast import contract
from rcar_fast.contract import AGG_CODES, RAW_NORM_CODES  # noqa: F401 (the codes the launch passes)

# The shared region-word tile (kernels/tile.py): the score GEMM, its owners and rows, the tile
# order, and the host-side owner groups, tile shapes and autotune mode.
from .tile import (AUTOTUNE_MODES, AUTOTUNE_VARIABLE, MIN_DOT, OwnerGroup,  # noqa: F401
                   autotune_mode, caption_groups, interpreter_on)
from .tile import OWNER_SHAPES as _OWNER_SHAPES
from .tile import add_gram_rows as _add_gram_rows
from .tile import add_rows as _add_rows
from .tile import config_area as _config_area
from .tile import context_gram  # build_problem calls it here (the sm_90 compile test patches it)
from .tile import halves_dot as _halves_dot
from .tile import load_gram as _load_gram
from .tile import named as _named
from .tile import pow2_at_least as _pow2_at_least
from .tile import precision_kind as _precision_kind
from .tile import quick as _quick
from .tile import score_tile as _scores
from .tile import smallest_shape as _smallest_shape
from .tile import tile_owners as _owners
from .tile import tile_rows as _rows
from .tile import tile_shapes as _tile_shapes
from .tile import tile_start as _tile_start

# The contract's codes and constants as constexpr globals (all a jitted function can read).
_EPS = tl.constexpr(contract.EPS)
_SLOPE = tl.constexpr(contract.LEAKY_SLOPE)
_CLIPPED_L2 = tl.constexpr(RAW_NORM_CODES["clipped_l2norm"])
_L2 = tl.constexpr(RAW_NORM_CODES["l2norm"])
_CLIPPED_L1 = tl.constexpr(RAW_NORM_CODES["clipped_l1norm"])
_L1 = tl.constexpr(RAW_NORM_CODES["l1norm"])
_CLIPPED = tl.constexpr(RAW_NORM_CODES["clipped"])
_SOFTMAX_NORM = tl.constexpr(RAW_NORM_CODES["softmax"])
_MEAN = tl.constexpr(AGG_CODES["mean"])
_MAX = tl.constexpr(AGG_CODES["max"])
_SUM = tl.constexpr(AGG_CODES["sum"])

# fp32 inputs: "ieee" keeps the 1e-4 contract vs the float64 reference; "tf32x3" is a faster
# option on GPUs if that contract is relaxed.
FP32_DOT_PRECISION = "ieee"


# =============================================================================================
# Device helpers (inlined into the kernels)
# =============================================================================================

@triton.jit
def _load_query_norms(qn_ptr, qs0, y_ids, y_len, Q_PAD: tl.constexpr):
    """(BJ, Q_PAD) |y_k|; 1 at padding (finite, never used)."""
    k = tl.arange(0, Q_PAD)
    real = k[None, :] < y_len[:, None]
    return tl.load(qn_ptr + y_ids[:, None] * qs0 + k[None, :], mask=real, other=1.0)


@triton.jit
def _forward_tile(S, cv4, qv4, qv3, G2, qn3, y_len, lam, lse_lam, live,
                  RAW_NORM: tl.constexpr, AGG: tl.constexpr, BI: tl.constexpr,
                  C_PAD: tl.constexpr, BJ: tl.constexpr, Q_PAD: tl.constexpr,
                  EPI_PREC: tl.constexpr):
    """Every pair of a tile, from the raw scores to the aggregated similarity.

    S (BI*C_PAD, BJ*Q_PAD); G2 the block-diagonal context Gram matrix; masks cv4 (BI, C_PAD, 1, 1) real context items, qv4 (1, 1, BJ,
    Q_PAD) / qv3 (1, BJ, Q_PAD) real queries; live: any condition true at run time (D > 0;
    see step 3). Returns the similarity (BI, BJ) and the intermediates the backward needs."""
    S4 = tl.reshape(S, (BI, C_PAD, BJ, Q_PAD))
    # 1. Raw-score normalisation across the queries (axis 3) of each context item. Normalisers
    #    are inverted once per row and multiplied in (one division per row, not per element).
    if RAW_NORM == _SOFTMAX_NORM:
        z = tl.where(qv4, S4, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=3)[:, :, :, None])
        nrm = tl.sum(e, axis=3)
        a4 = e * (1.0 / nrm)[:, :, :, None]
        u4 = a4
    else:
        if RAW_NORM == _CLIPPED_L2 or RAW_NORM == _CLIPPED_L1 or RAW_NORM == _CLIPPED:
            u4 = tl.where(S4 > 0, S4, _SLOPE * S4)
        else:
            u4 = S4
        u4 = tl.where(qv4, u4, 0.0)
        if RAW_NORM == _CLIPPED_L2 or RAW_NORM == _L2:
            nrm = tl.sqrt(tl.sum(u4 * u4, axis=3))
            a4 = u4 * (1.0 / (nrm + _EPS))[:, :, :, None]
        elif RAW_NORM == _CLIPPED_L1 or RAW_NORM == _L1:
            nrm = tl.sum(tl.abs(u4), axis=3)
            a4 = u4 * (1.0 / (nrm + _EPS))[:, :, :, None]
        else:
            nrm = tl.sum(u4, axis=3)  # unused
            a4 = u4
    # 2. Attention over the real context items (axis 1) of each query, temperature lam.
    z = tl.where(cv4, a4 * lam, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None, :, :])
    alpha4 = e * (1.0 / tl.sum(e, axis=1))[:, None, :, :]
    # 3. Gram identity: q_k . ctx_k and |ctx_k|^2 without the attended vectors.
    dot3 = tl.sum(alpha4 * S4, axis=1)
    alpha2 = tl.reshape(alpha4, (BI * C_PAD, BJ * Q_PAD))
    # In a branch (`live` is always true): on sm_90 triton puts all warps of a dot along M when
    # the dot's result reaches another dot (as in the backward: G alpha -> dS -> dS @ Y), and at
    # 64 rows and 8 warps that replicates the whole epilogue across warp pairs (255 registers,
    # spills); its analysis stops at the branch's yield, so the dot keeps a 4 x 2 arrangement.
    if live:
        GA2 = _halves_dot(G2, alpha2, BI * C_PAD, BI * C_PAD, BJ * Q_PAD, EPI_PREC)
    else:
        GA2 = tl.zeros((BI * C_PAD, BJ * Q_PAD), dtype=alpha2.dtype)
    GA4 = tl.reshape(GA2, (BI, C_PAD, BJ, Q_PAD))
    n2 = tl.sum(GA4 * alpha4, axis=1)
    nc3 = tl.sqrt(tl.maximum(n2, 0.0))  # rounding can push an exact 0 slightly negative
    prod = qn3 * nc3
    den = tl.maximum(prod, _EPS)
    r3 = dot3 / den
    # 4. Aggregation over the real queries (axis 2).
    rm = tl.where(qv3, r3, float("-inf"))
    rmax = tl.max(rm, axis=2)
    if AGG == _MEAN or AGG == _SUM:
        total = tl.sum(tl.where(qv3, r3, 0.0), axis=2)
        wsum = total  # unused
        if AGG == _MEAN:
            sim = total / y_len.to(total.dtype)[None, :]
        else:
            sim = total
    else:
        wsum = tl.sum(tl.exp((rm - rmax[:, :, None]) * lse_lam), axis=2)
        if AGG == _MAX:
            sim = rmax
        else:
            sim = rmax + tl.log(wsum) / lse_lam
    return sim, S4, u4, nrm, a4, alpha4, GA4, dot3, nc3, prod, den, r3, rm, rmax, wsum


@triton.jit
def _backward_tile(g, pair_real, S4, u4, nrm, a4, alpha4, GA4, nc3, qn3, prod, den, r3, rm,
                   rmax, wsum, cv4, qv4, qv3, y_len, lam, lse_lam,
                   RAW_NORM: tl.constexpr, AGG: tl.constexpr):
    """Given g = dL/dsim (BI, BJ): dL/dS (BI, C_PAD, BJ, Q_PAD), dL/d|ctx_k|^2 and dL/d|q_k|
    (BI, BJ, Q_PAD), all zero outside real (pair, context item, query) positions."""
    g3 = g[:, :, None]
    # Aggregation -> per-query r_k.
    if AGG == _MEAN:
        dr = g3 / y_len.to(g.dtype)[None, :, None] + 0.0 * r3
    elif AGG == _SUM:
        dr = g3 + 0.0 * r3
    elif AGG == _MAX:
        # torch.amax shares the gradient evenly between tied maxima
        is_max = rm == rmax[:, :, None]
        n_max = tl.sum(is_max.to(g.dtype), axis=2)
        dr = tl.where(is_max, (g / n_max)[:, :, None], 0.0)
    else:
        dr = g3 * tl.exp((rm - rmax[:, :, None]) * lse_lam) / wsum[:, :, None]
    dr = tl.where(qv3 & pair_real[:, :, None], dr, 0.0)
    # r = dot / max(|q| |ctx|, eps): clamp passes the gradient where |q| |ctx| >= eps.
    ddot = dr / den
    dprod = tl.where(prod >= _EPS, -dr * r3 / den, 0.0)
    dqn = dprod * nc3
    dn2 = tl.where(nc3 > 0, dprod * qn3 / (2.0 * tl.where(nc3 > 0, nc3, 1.0)), 0.0)
    # dot = sum_c alpha S; |ctx|^2 = alpha^T G alpha.
    dalpha = ddot[:, None, :, :] * S4 + 2.0 * dn2[:, None, :, :] * GA4
    dS4 = ddot[:, None, :, :] * alpha4
    # Softmax over the context items, then the temperature.
    da = lam * alpha4 * (dalpha - tl.sum(alpha4 * dalpha, axis=1)[:, None, :, :])
    # Raw-score normalisation across the queries.
    if RAW_NORM == _SOFTMAX_NORM:
        dS4 += a4 * (da - tl.sum(a4 * da, axis=3)[:, :, :, None])
    else:
        if RAW_NORM == _CLIPPED_L2 or RAW_NORM == _L2:
            q = nrm + _EPS
            inner = tl.sum(da * u4, axis=3)
            # d sqrt(n2) at n2 = 0 (an all-zero row: padding) is taken as 0, not inf * 0
            dn = tl.where(nrm > 0, -inner / (q * q * tl.where(nrm > 0, nrm, 1.0)), 0.0)
            du = da / q[:, :, :, None] + dn[:, :, :, None] * u4
        elif RAW_NORM == _CLIPPED_L1 or RAW_NORM == _L1:
            q = nrm + _EPS
            inner = tl.sum(da * u4, axis=3)
            sign = tl.where(u4 > 0, 1.0, tl.where(u4 < 0, -1.0, 0.0))
            du = da / q[:, :, :, None] - (inner / (q * q))[:, :, :, None] * sign
        else:
            du = da
        if RAW_NORM == _CLIPPED_L2 or RAW_NORM == _CLIPPED_L1 or RAW_NORM == _CLIPPED:
            du = tl.where(S4 > 0, du, _SLOPE * du)
        dS4 += du
    dS4 = tl.where(cv4 & qv4 & pair_real[:, None, :, None], dS4, 0.0)
    return dS4, dn2, dqn


@triton.jit
def _masks(x_len, y_len, C_PAD: tl.constexpr, Q_PAD: tl.constexpr):
    cv2 = tl.arange(0, C_PAD)[None, :] < x_len[:, None]
    qv2 = tl.arange(0, Q_PAD)[None, :] < y_len[:, None]
    return cv2[:, :, None, None], qv2[None, None, :, :], qv2[None, :, :]


@triton.jit
def _tile_backward(x_ptr, x_rows, x_ok, sx2, x_ids, x_len, x_real,
                   y_ptr, y_rows, y_ok, sy2, y_ids, y_len, y_real,
                   G2, qn3, dsim_ptr, ds_x, ds_y, D, lam, lse_lam,
                   RAW_NORM: tl.constexpr, AGG: tl.constexpr,
                   C_PAD: tl.constexpr, Q_PAD: tl.constexpr, ACC: tl.constexpr,
                   MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """One (BI x BJ owners) tile of both backward kernels: scores and epilogue recomputed,
    then the epilogue's backward from the tile's upstream gradients. Returns dS4 (the score
    gradient), dn2 (of the attended-vector squared norms), dqn (of the query norms) and the
    attention alpha4 (the Gram term needs it)."""
    S = _scores(x_ptr, x_rows, x_ok, sx2, y_ptr, y_rows, y_ok, sy2, D,
                BI * C_PAD, BJ * Q_PAD, BK, ACC, MAIN_PREC)
    cv4, qv4, qv3 = _masks(x_len, y_len, C_PAD, Q_PAD)
    (sim, S4, u4, nrm, a4, alpha4, GA4, dot3, nc3, prod, den, r3, rm, rmax,
     wsum) = _forward_tile(S, cv4, qv4, qv3, G2, qn3, y_len, lam, lse_lam, D > 0,
                           RAW_NORM, AGG, BI, C_PAD, BJ, Q_PAD, EPI_PREC)
    pair_real = x_real[:, None] & y_real[None, :]
    g = tl.load(dsim_ptr + x_ids[:, None] * ds_x + y_ids[None, :] * ds_y,
                mask=pair_real, other=0.0).to(ACC)
    dS4, dn2, dqn = _backward_tile(g, pair_real, S4, u4, nrm, a4, alpha4, GA4, nc3, qn3,
                                   prod, den, r3, rm, rmax, wsum, cv4, qv4, qv3, y_len,
                                   lam, lse_lam, RAW_NORM, AGG)
    return dS4, dn2, dqn, alpha4


# =============================================================================================
# Kernels
# =============================================================================================

@triton.jit
def _scan_fwd_kernel(x_ptr, sx0, sx1, sx2, x_ids_ptr, x_lens_ptr, n_x,
                     y_ptr, sy0, sy1, sy2, y_ids_ptr, y_lens_ptr, n_y,
                     g_ptr, gs0, gs1, qn_ptr, qs0, out_ptr, os_x, os_y, D, lam, lse_lam,
                     RAW_NORM: tl.constexpr, AGG: tl.constexpr,
                     C_PAD: tl.constexpr, Q_PAD: tl.constexpr, ACC: tl.constexpr,
                     MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr,
                     BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    x_start, y_start = _tile_start(tl.program_id(0), n_x, n_y, BI, BJ, GROUP)
    x_ids, x_len, x_real = _owners(x_ids_ptr, x_lens_ptr, x_start, n_x, BI)
    y_ids, y_len, y_real = _owners(y_ids_ptr, y_lens_ptr, y_start, n_y, BJ)
    x_rows, x_ok = _rows(x_ids_ptr, x_lens_ptr, x_start, n_x, sx0, sx1, BI, C_PAD)
    y_rows, y_ok = _rows(y_ids_ptr, y_lens_ptr, y_start, n_y, sy0, sy1, BJ, Q_PAD)
    S = _scores(x_ptr, x_rows, x_ok, sx2, y_ptr, y_rows, y_ok, sy2, D,
                BI * C_PAD, BJ * Q_PAD, BK, ACC, MAIN_PREC)
    cv4, qv4, qv3 = _masks(x_len, y_len, C_PAD, Q_PAD)
    G2 = _load_gram(g_ptr, gs0, gs1, x_ids_ptr, x_lens_ptr, x_start, n_x, BI, C_PAD)
    qn3 = _load_query_norms(qn_ptr, qs0, y_ids, y_len, Q_PAD)[None, :, :]
    sim = _forward_tile(S, cv4, qv4, qv3, G2, qn3, y_len, lam, lse_lam, D > 0,
                        RAW_NORM, AGG, BI, C_PAD, BJ, Q_PAD, EPI_PREC)[0]
    tl.store(out_ptr + x_ids[:, None] * os_x + y_ids[None, :] * os_y, sim,
             mask=x_real[:, None] & y_real[None, :])


@triton.jit
def _scan_bwd_kernel(x_ptr, sx0, sx1, sx2, x_ids_ptr, x_lens_ptr, n_x,
                     y_ptr, sy0, sy1, sy2, y_ids_ptr, y_lens_ptr, n_y,
                     g_ptr, gs0, gs1, qn_ptr, qs0, dsim_ptr, ds_x, ds_y,
                     dst_ptr, dst0, dst1, D, lam, lse_lam, OWN_IS_X: tl.constexpr,
                     RAW_NORM: tl.constexpr, AGG: tl.constexpr,
                     C_PAD: tl.constexpr, Q_PAD: tl.constexpr, ACC: tl.constexpr,
                     MAIN_PREC: tl.constexpr, EPI_PREC: tl.constexpr,
                     BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """dX for BI context owners, summed over every query owner of the launch (OWN_IS_X), or
    dY for BJ query owners, summed over every context owner: the program's own side is
    fixed, the other side's blocks are walked."""
    if OWN_IS_X:
        x_start = tl.program_id(0) * BI
        x_ids, x_len, x_real = _owners(x_ids_ptr, x_lens_ptr, x_start, n_x, BI)
        x_rows, x_ok = _rows(x_ids_ptr, x_lens_ptr, x_start, n_x, sx0, sx1, BI, C_PAD)
        d_rows, _ = _rows(x_ids_ptr, x_lens_ptr, x_start, n_x, dst0, dst1, BI, C_PAD)
        G2 = _load_gram(g_ptr, gs0, gs1, x_ids_ptr, x_lens_ptr, x_start, n_x, BI, C_PAD)
        # sum over pairs and queries of dn2_k alpha_k alpha_k^T; only its diagonal blocks (one
        # per context owner) are used, the rest mixes owners and is masked at the end
        dgram = tl.zeros((BI * C_PAD, BI * C_PAD), dtype=ACC)
        n_other = n_y
    else:
        y_start = tl.program_id(0) * BJ
        y_ids, y_len, y_real = _owners(y_ids_ptr, y_lens_ptr, y_start, n_y, BJ)
        y_rows, y_ok = _rows(y_ids_ptr, y_lens_ptr, y_start, n_y, sy0, sy1, BJ, Q_PAD)
        d_rows, _ = _rows(y_ids_ptr, y_lens_ptr, y_start, n_y, dst0, dst1, BJ, Q_PAD)
        qn2 = _load_query_norms(qn_ptr, qs0, y_ids, y_len, Q_PAD)
        qn3 = qn2[None, :, :]
        dqn_total = tl.zeros((BJ, Q_PAD), dtype=ACC)
        n_other = n_x
    for other in range(0, n_other, BJ if OWN_IS_X else BI):
        if OWN_IS_X:
            y_start = other
            y_ids, y_len, y_real = _owners(y_ids_ptr, y_lens_ptr, y_start, n_y, BJ)
            y_rows, y_ok = _rows(y_ids_ptr, y_lens_ptr, y_start, n_y, sy0, sy1, BJ, Q_PAD)
            qn3 = _load_query_norms(qn_ptr, qs0, y_ids, y_len, Q_PAD)[None, :, :]
        else:
            x_start = other
            x_ids, x_len, x_real = _owners(x_ids_ptr, x_lens_ptr, x_start, n_x, BI)
            x_rows, x_ok = _rows(x_ids_ptr, x_lens_ptr, x_start, n_x, sx0, sx1, BI, C_PAD)
            G2 = _load_gram(g_ptr, gs0, gs1, x_ids_ptr, x_lens_ptr, x_start, n_x, BI, C_PAD)
        dS4, dn2, dqn, alpha4 = _tile_backward(
            x_ptr, x_rows, x_ok, sx2, x_ids, x_len, x_real, y_ptr, y_rows, y_ok, sy2, y_ids,
            y_len, y_real, G2, qn3, dsim_ptr, ds_x, ds_y, D, lam, lse_lam, RAW_NORM, AGG,
            C_PAD, Q_PAD, ACC, MAIN_PREC, EPI_PREC, BI, BJ, BK)
        if OWN_IS_X:
            # Gram term, summed over the queries of every pair: dG = sum_k dn2_k alpha_k alpha_k^T
            alpha2 = tl.reshape(alpha4, (BI * C_PAD, BJ * Q_PAD))
            weighted = tl.reshape(alpha4 * dn2[:, None, :, :], (BI * C_PAD, BJ * Q_PAD))
            dgram += tl.dot(weighted, tl.trans(alpha2), input_precision=EPI_PREC)
            # dX += dS @ Y, in d-chunks; this program owns its rows (store first, then add).
            _add_rows(dst_ptr, d_rows, x_ok, y_ptr, y_rows, y_ok, sy2,
                      tl.reshape(dS4, (BI * C_PAD, BJ * Q_PAD)), D, other > 0, BD, EPI_PREC,
                      ACC)
        else:
            dqn_total += tl.sum(dqn, axis=0)
            # dY += dS^T @ X, in d-chunks; this program owns its rows (store first, then add).
            _add_rows(dst_ptr, d_rows, y_ok, x_ptr, x_rows, x_ok, sx2,
                      tl.trans(tl.reshape(dS4, (BI * C_PAD, BJ * Q_PAD))), D, other > 0, BD,
                      EPI_PREC, ACC)
        tl.debug_barrier()  # the next iteration's threads read what this one wrote
    if OWN_IS_X:
        # dX_c += 2 sum_c' dG[c, c'] x_c'  (dG is symmetric), within each owner's block
        _add_gram_rows(dst_ptr, d_rows, x_ptr, x_rows, x_ok, sx2, dgram, D, BD, EPI_PREC, ACC,
                       BI * C_PAD, C_PAD)
    else:
        # Query norms: d|y_k| / dy_k = y_k / |y_k|.
        scale = tl.reshape(tl.where(qn2 > 0, dqn_total / tl.where(qn2 > 0, qn2, 1.0), 0.0),
                           (BJ * Q_PAD,))
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            din = dd < D
            out_mask = y_ok[:, None] & din[None, :]
            yc = tl.load(y_ptr + y_rows[:, None] + dd[None, :] * sy2, mask=out_mask,
                         other=0.0).to(ACC)
            ptrs = dst_ptr + d_rows[:, None] + dd[None, :]
            prev = tl.load(ptrs, mask=out_mask, other=0.0)
            tl.store(ptrs, prev + scale[:, None] * yc, mask=out_mask)


# =============================================================================================
# Tile shapes: fixed small tiles under the interpreter, autotuned on GPUs
# =============================================================================================

# Tile budgets, from compiling for sm_90 with triton 3.6 (the GPU image's) and 3.8 (CI's) and
# reading registers and stack per thread from the cubins (tests/test_sm90_compile.py). The
# epilogue keeps many tile-sized fp32 tensors live, so the budget is the tile area:
# * fp16/bf16 forward (tensor-core scores): 64x64 at 8 warps (~75-80 registers/thread),
#   64x128 or 128x64 at 8 warps (~130-205) or 16 warps (~70-110); 128x128 spills at 16 warps
#   (capped at 128 registers/thread) with 3.6 and is not kept.
# * fp16/bf16 backward (also holds dS, the Gram accumulator and a d-chunk): 64x16 and 64x32
#   at 8 warps (~120-220 registers); 64x64 is the only tile for 64 context items x 64
#   queries (the Lmax bucket): see _SMALLEST_BWD. With 64 queries per owner (i2t: 36 regions,
#   and that bucket) both backward kernels spilled 8-170 B in every config until the Gram dot
#   of _forward_tile ran in a branch (no warp replication): now 0 B, 106-255 registers.
#   (128x16 and 64x64 spilled in the dY role before that; not re-measured since.)
# * fp32 (IEEE FMA dots, whose operands hold whole K rows in registers; the Gram product
#   runs in K halves, tile.halves_dot): forward up to 64x64 at 8 warps (~60-195 registers); 128x32
#   spills ~380 B. (Before the K halves, 64x32 already spilled 110-220 B at any warp count.)
# Shared memory (3 stages) stays within an H100's 227 KB for all of these.
_LIMITS = {
    ("fwd", "low"): dict(max_m=128, max_n=128, max_area=64 * 128, min_area=64 * 64),
    ("bwd", "low"): dict(max_m=64, max_n=64, max_area=64 * 32, min_area=32 * 32),
    ("fwd", "fp32"): dict(max_m=64, max_n=256, max_area=64 * 64, min_area=64 * 16),
    ("bwd", "fp32"): dict(max_m=64, max_n=64, max_area=64 * 16, min_area=16 * 16),
}
# The d-chunk of the fp32 forward GEMM (BK): FMA dots keep (rows, BK) operands per thread.
_FP32_BK = 16


def _fwd_warp_options(area: int):
    # A program is one CTA per SM either way: 8 warps at up to ~205 registers/thread use
    # 256 x 205 = 52K of an SM's 64K registers, 16 warps at ~70-110 use 36-56K, which leaves
    # no room for a second 512-thread CTA. 16 warps give the epilogue more threads for the
    # same tile (latency hiding); let the autotuner choose where both fit without spills.
    if area <= 64 * 64:
        return (8,)
    return (8, 16)


def _interpreter_shape(c_pad: int, q_pad: int):
    # Small, but with several owners per tile on both sides so that multi-owner tiles and
    # partial last blocks are exercised by the CPU tests.
    return max(1, 32 // c_pad), max(2, MIN_DOT // q_pad)


def _prune_fwd(configs, named_args, **kwargs):
    a = _named(named_args, kwargs)
    c_pad, q_pad = a["C_PAD"], a["Q_PAD"]
    kind = _precision_kind(a["x_ptr"])
    keep = _tile_shapes(c_pad, q_pad, **_LIMITS[("fwd", kind)])
    bk = _FP32_BK if kind == "fp32" else 64
    area = _config_area(c_pad, q_pad)
    out = [c for c in configs if (c.kwargs["BI"], c.kwargs["BJ"]) in keep and c.kwargs["BK"] == bk
           and (kind == "fp32" or c.num_warps in _fwd_warp_options(area(c)))]
    if not out:  # paddings beyond the budget: the smallest tile
        bi, bj = _smallest_shape(c_pad, q_pad)
        out = [triton.Config(dict(BI=bi, BJ=bj, BK=bk if kind == "fp32" else 32, GROUP=8),
                             num_warps=8, num_stages=2)]
    return _quick(out, area)


# The smallest backward tile, for buckets whose 64 x 64 minimum exceeds the budget: of the
# configs tried at 64 x 64 (BK 32/64, BD 16/32/64, 1-2 stages, 8/16 warps), BK=64, BD=32 in one
# stage spilled least before the Gram dot's branch (bf16, triton 3.6: 8 B / 40 B in
# _scan_bwd_kernel's dX / dY roles; 16 warps: 600-1000 B); with it: 0 B, ~150-240
# registers with triton 3.6 and 3.8.
_SMALLEST_BWD = dict(BK=64, BD=32, num_warps=8, num_stages=1)


def _prune_bwd(configs, named_args, **kwargs):
    a = _named(named_args, kwargs)
    c_pad, q_pad = a["C_PAD"], a["Q_PAD"]
    keep = _tile_shapes(c_pad, q_pad, **_LIMITS[("bwd", _precision_kind(a["x_ptr"]))])
    area = _config_area(c_pad, q_pad)
    out = [c for c in configs if (c.kwargs["BI"], c.kwargs["BJ"]) in keep]
    if not out:
        bi, bj = _smallest_shape(c_pad, q_pad)
        small = dict(_SMALLEST_BWD)
        out = [triton.Config(dict(BI=bi, BJ=bj, BK=small.pop("BK"), BD=small.pop("BD")), **small)]
    return _quick(out, area)


# A small list per problem after pruning: up to ~6 tile shapes (8 configs) forward, ~3-5
# shapes x 2 d-chunks backward. fp32 forward configs have the small d-chunk.
_FWD_CONFIGS = ([triton.Config(dict(BI=bi, BJ=bj, BK=64, GROUP=8), num_warps=w, num_stages=3)
                 for bi, bj in _OWNER_SHAPES for w in (8, 16)]
                + [triton.Config(dict(BI=bi, BJ=bj, BK=_FP32_BK, GROUP=8), num_warps=8,
                                 num_stages=2) for bi, bj in _OWNER_SHAPES])
_BWD_CONFIGS = [triton.Config(dict(BI=bi, BJ=bj, BK=64, BD=bd), num_warps=8, num_stages=2)
                for bi, bj in _OWNER_SHAPES for bd in (32, 64)]
_KEY = ["C_PAD", "Q_PAD", "D", "RAW_NORM", "AGG"]

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_fwd})(_scan_fwd_kernel)
_bwd_x_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})(_scan_bwd_kernel)
_bwd_y_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_bwd})(_scan_bwd_kernel)


# =============================================================================================
# Launch helpers
# =============================================================================================

@dataclasses.dataclass
class Side:
    """One input in its role (context or query): its features and its owner groups."""
    feats: torch.Tensor
    groups: List[OwnerGroup]


@dataclasses.dataclass
class ScanProblem:
    x: Side                # context: images (t2i) or captions (i2t)
    y: Side                # query: captions (t2i) or images (i2t)
    gram: torch.Tensor     # (n_x, Cmax, Cmax) context Gram matrices, ACC dtype
    qnorm: torch.Tensor    # (n_y, Qmax) query norms, ACC dtype
    transpose_out: bool    # i2t: the output's rows are the query side (images)
    n_img: int
    n_cap: int
    raw_norm: int
    agg: int
    smooth: float
    lse_lambda: float
    acc: object            # tl.float32 / tl.float64
    out_dtype: torch.dtype
    main_prec: str
    epi_prec: str


def image_group(n_img: int, n_regions: int, device, floor: int) -> List[OwnerGroup]:
    return [OwnerGroup(torch.arange(n_img, device=device, dtype=torch.int32),
                       torch.full((n_img,), n_regions, device=device, dtype=torch.int32),
                       _pow2_at_least(n_regions, floor), n_img)]


def row_norms(x: torch.Tensor, dtype: torch.dtype, chunk: int = 1024) -> torch.Tensor:
    """|x[n, r]| for every row, computed in `dtype`, a chunk of owners at a time (bounded
    temporary memory for low-precision inputs)."""
    out = torch.empty(x.shape[:2], device=x.device, dtype=dtype)
    for n0 in range(0, x.shape[0], chunk):
        out[n0:n0 + chunk] = torch.linalg.vector_norm(x[n0:n0 + chunk].to(dtype), dim=-1)
    return out


def build_problem(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda) -> ScanProblem:
    """Everything the kernels need for one call. lens: int64 (n_cap,) on any device."""
    autotune_mode()  # a bad RCAR_FAST_AUTOTUNE fails here, before any kernel runs
    n_img, n_regions, _ = img.shape
    acc_torch = torch.float64 if img.dtype == torch.float64 else torch.float32
    lens_cpu = lens.detach().to("cpu", torch.int64)
    t2i = direction == "t2i"
    # Context items need >= 16 (the K of the Gram dot); queries may pad to 8 (tiles hold >= 2
    # query owners then).
    cap_side = Side(cap, caption_groups(lens_cpu, cap.device, MIN_DOT if not t2i else 8))
    img_side = Side(img, image_group(n_img, n_regions, img.device, MIN_DOT if t2i else 1))
    x, y = (img_side, cap_side) if t2i else (cap_side, img_side)
    fp32_like = img.dtype in (torch.float32, torch.float64)
    return ScanProblem(
        x=x, y=y, gram=context_gram(x.feats), qnorm=row_norms(y.feats, acc_torch),
        transpose_out=not t2i, n_img=n_img, n_cap=cap.shape[0],
        raw_norm=RAW_NORM_CODES[raw_norm], agg=AGG_CODES[agg], smooth=float(smooth),
        lse_lambda=float(lse_lambda), acc=tl.float64 if acc_torch == torch.float64 else tl.float32,
        out_dtype=acc_torch, main_prec=FP32_DOT_PRECISION if fp32_like else "tf32",
        epi_prec="ieee" if (fp32_like or interpreter_on()) else "tf32")


def _side_args(side: Side, group: OwnerGroup):
    f = side.feats
    return (f, f.stride(0), f.stride(1), f.stride(2), group.ids, group.lens, group.count)


def _common_args(p: ScanProblem, xg: OwnerGroup, yg: OwnerGroup):
    return (*_side_args(p.x, xg), *_side_args(p.y, yg), p.gram, p.gram.stride(0),
            p.gram.stride(1), p.qnorm, p.qnorm.stride(0))


def _constexprs(p: ScanProblem, xg: OwnerGroup, yg: OwnerGroup):
    return dict(RAW_NORM=p.raw_norm, AGG=p.agg, C_PAD=xg.pad, Q_PAD=yg.pad, ACC=p.acc,
                MAIN_PREC=p.main_prec, EPI_PREC=p.epi_prec)


def _xy_strides(p: ScanProblem, t: torch.Tensor):
    """Strides of an (n_img, n_cap) matrix indexed by (x owner, y owner)."""
    return (t.stride(1), t.stride(0)) if p.transpose_out else (t.stride(0), t.stride(1))


def scan_forward(p: ScanProblem, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n_img, n_cap) similarities. `out`, if given, is written in full (tests poison it)."""
    if out is None:
        out = torch.empty((p.n_img, p.n_cap), device=p.x.feats.device, dtype=p.out_dtype)
    os_x, os_y = _xy_strides(p, out)
    d = p.x.feats.shape[2]
    for xg in p.x.groups:
        for yg in p.y.groups:
            args = (*_common_args(p, xg, yg), out, os_x, os_y, d, p.smooth, p.lse_lambda)
            cexpr = _constexprs(p, xg, yg)
            if interpreter_on():
                bi, bj = _interpreter_shape(xg.pad, yg.pad)
                grid = (triton.cdiv(xg.count, bi) * triton.cdiv(yg.count, bj),)
                _scan_fwd_kernel[grid](*args, **cexpr, BI=bi, BJ=bj, BK=MIN_DOT, GROUP=2)
            else:
                grid = lambda meta, xg=xg, yg=yg: (  # noqa: E731
                    triton.cdiv(xg.count, meta["BI"]) * triton.cdiv(yg.count, meta["BJ"]),)
                _fwd_tuned[grid](*args, **cexpr)
    return out


def _launch_backward(kernel, tuned, p, xg, yg, dsim, target, parallel_over_x):
    ds_x, ds_y = _xy_strides(p, dsim)
    d = p.x.feats.shape[2]
    args = (*_common_args(p, xg, yg), dsim, ds_x, ds_y, target, target.stride(0),
            target.stride(1), d, p.smooth, p.lse_lambda)
    cexpr = dict(_constexprs(p, xg, yg), OWN_IS_X=parallel_over_x)
    count = xg.count if parallel_over_x else yg.count
    if interpreter_on():
        bi, bj = _interpreter_shape(xg.pad, yg.pad)
        grid = (triton.cdiv(count, bi if parallel_over_x else bj),)
        kernel[grid](*args, **cexpr, BI=bi, BJ=bj, BK=MIN_DOT, BD=MIN_DOT)
    else:
        block = "BI" if parallel_over_x else "BJ"
        tuned[lambda meta: (triton.cdiv(count, meta[block]),)](*args, **cexpr)


def _side_gradient(p: ScanProblem, dsim: torch.Tensor, of_x: bool) -> torch.Tensor:
    """dL/d(features) of one side, float32 (float64 for float64 inputs), zero at padding.

    The kernel runs parallel over this side's owners and loops over the other side's owners of
    one group. When the other side has several groups (caption length buckets), every launch
    covers all of this side's rows, so their results are summed; otherwise the launches write
    disjoint rows of one buffer."""
    own, other = (p.x, p.y) if of_x else (p.y, p.x)
    kernel, tuned = _scan_bwd_kernel, (_bwd_x_tuned if of_x else _bwd_y_tuned)
    grad = torch.zeros(own.feats.shape, device=own.feats.device, dtype=p.out_dtype)
    scratch = torch.zeros_like(grad) if len(other.groups) > 1 else None
    for i, og in enumerate(other.groups):
        target = grad if i == 0 else scratch
        for mg in own.groups:
            xg, yg = (mg, og) if of_x else (og, mg)
            _launch_backward(kernel, tuned, p, xg, yg, dsim, target, parallel_over_x=of_x)
        if i > 0:
            grad += scratch
    return grad


def scan_backward(p: ScanProblem, dsim: torch.Tensor, need_img: bool, need_cap: bool):
    """(dimg, dcap) in the inputs' dtypes (None where not needed)."""
    if dsim.dtype != p.out_dtype:
        dsim = dsim.to(p.out_dtype)
    img_is_x = not p.transpose_out
    dimg = dcap = None
    if need_img:
        dimg = _side_gradient(p, dsim, of_x=img_is_x)
    if need_cap:
        dcap = _side_gradient(p, dsim, of_x=not img_is_x)
    img_dtype = (p.x if img_is_x else p.y).feats.dtype
    cap_dtype = (p.y if img_is_x else p.x).feats.dtype
    return (None if dimg is None else dimg.to(img_dtype),
            None if dcap is None else dcap.to(cap_dtype))
