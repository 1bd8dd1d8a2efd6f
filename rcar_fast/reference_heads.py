"""The float64-faithful reference of the S-only heads (HEADS.md): each pair (i, j) is scored
from its region-word tile S[r, w] = img[i, r] . cap[j, w] on the real R_i x L_j block alone.

    t2i: m_w = max_{r < R_i} S[r, w], pooled over the L_j words
    i2t: n_r = max_{w < L_j} S[r, w], pooled over the R_i regions
    both: both_scale * (t2i + i2t)

with optional leaky (x if x > 0 else 0.1 x, on the maxima: the same value as elementwise before
the max) and the pools mean | sum | max | lse(tau) | softmax(tau) of HEADS.md (lse is NOT
multiplied back by tau). Ties: the FIRST argmax takes the whole gradient (torch.max(dim)'s
indices, then a gather), for the tile's max and for pool="max" alike. CHAN's VSA coding
(coding="vsa", i2t) replaces n_r by x_r = (v_r . c_r) / (|c_r| + 1e-8), c_r = sum_w a_rw e_w,
a_r = softmax_w(S[r, .] / vsa_tau) over the real words.

Two forms, both differentiable by torch autograd:

* ``*_loop``: one pair at a time, sliced to its real block (no masks): the plain transcription.
* ``*_vectorized``: blocks of pairs with batched einsum and bounded memory (each block's
  tile-sized temporaries stay below reference_math.BLOCK_BYTES); padding is replaced by 0
  before any arithmetic (so NaN padding never enters it and gets gradient exactly 0), and masked
  out of every max (-inf), sum (0) and softmax (-inf).

Computation happens in the input dtype (a low-precision run measures the reference's own
rounding). Input normalisation (normalize="unit") is `unit_normalize`, applied by the caller
before the tile (the public wrapper does it in torch, so the backends never normalise). No
validation beyond option names: rcar_fast.ops.maxsim validates.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from rcar_fast import validate
from rcar_fast.contract import (CHAN_TAU, EPS, HEAD_CODINGS, HEAD_DIRECTIONS, HEAD_NORMALIZATIONS,
                                POOLS, UNIT_NORM_EPS)
from rcar_fast.reference_math import BLOCK_BYTES, leaky as leaky_relu

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Padding and input normalisation
# --------------------------------------------------------------------------------------------

def real_rows(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) bool, True at rows < lengths[k] (the real regions / words)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (n, M, d) with rows >= lengths replaced by 0. A `where`, not a product: NaN padding
    gets gradient exactly 0 and never reaches the arithmetic."""
    real = real_rows(lengths.to(x.device), x.shape[1]).unsqueeze(-1)
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def unit_normalize(x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x / max(|x|, 1e-12) per vector (torch F.normalize's clamp, not l2norm's + eps), with the
    padding rows (>= lengths, when given) zeroed first: they stay 0 with gradient 0."""
    if lengths is not None:
        x = zero_padding(x, lengths)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp(min=UNIT_NORM_EPS)


def normalize_inputs(img, cap, lens, img_lens, normalize: str):
    """(img, cap) as the tile sees them: unchanged for "none", unit_normalize'd for "unit"."""
    validate.choice(normalize, "normalize", HEAD_NORMALIZATIONS)
    if normalize == "none":
        return img, cap
    return unit_normalize(img, img_lens), unit_normalize(cap, lens)


# --------------------------------------------------------------------------------------------
# The reductions: max with the first argmax, and the pools of HEADS.md
# --------------------------------------------------------------------------------------------

def _zeros_like_where(x: torch.Tensor, real: Optional[torch.Tensor]) -> torch.Tensor:
    if real is None:
        return x
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def first_max(x: torch.Tensor, dim: int, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max of x along dim over the real entries (real broadcasts to x; None: all), its value
    gathered at the FIRST maximal index, which thereby takes the whole gradient."""
    masked = x if real is None else x.masked_fill(~real, _NEG_INF)
    index = masked.max(dim=dim, keepdim=True).indices
    return x.gather(dim, index).squeeze(dim)


def pool_values(x: torch.Tensor, pool: str, tau: float, real: Optional[torch.Tensor] = None):
    """Pool x (..., K) over its last axis, over the entries where real (..., K) is True."""
    validate.choice(pool, "pool", POOLS)
    if pool == "max":
        return first_max(x, -1, real)
    safe = _zeros_like_where(x, real)
    if pool == "sum":
        return safe.sum(dim=-1)
    if pool == "mean":
        count = x.shape[-1] if real is None else real.sum(dim=-1).to(x.dtype)
        return safe.sum(dim=-1) / count
    logits = safe / tau if real is None else (safe / tau).masked_fill(~real, _NEG_INF)
    if pool == "lse":
        return torch.logsumexp(logits, dim=-1)
    return (torch.softmax(logits, dim=-1) * safe).sum(dim=-1)


def _max_then_pool(tile, maxed_real, pooled_real, pool, tau, leaky):
    """tile (..., M, K): the max over M (real rows maxed_real (..., M)), pooled over the K
    columns (real ones pooled_real (..., K)). Masks may be None (a sliced, unpadded tile)."""
    row_real = None if maxed_real is None else maxed_real.unsqueeze(-1)
    maxima = first_max(tile, -2, row_real)
    if leaky:
        maxima = leaky_relu(maxima)
    return pool_values(maxima, pool, tau, pooled_real)


def _vsa_codes(tile, words, regions, region_real, word_real, vsa_tau):
    """CHAN's VSACoding per region: x_r = (v_r . c_r) / (|c_r| + eps), c_r the softmax(S / tau)
    average of the real words. tile (..., R, L), words (..., L, d), regions (..., R, d)."""
    logits = tile / vsa_tau
    if word_real is not None:
        logits = logits.masked_fill(~word_real.unsqueeze(-2), _NEG_INF)
    weights = torch.softmax(logits, dim=-1)
    context = torch.einsum("...rw,...wd->...rd", weights, words)
    dots = (regions * context).sum(dim=-1)
    return dots / (torch.linalg.vector_norm(context, dim=-1) + EPS)


def tile_scores(tile, region_real, word_real, *, direction, pool, tau, leaky, both_scale,
                coding="max", vsa_tau=CHAN_TAU, regions=None, words=None):
    """Scores (...) of pairs from their tiles (..., R, L) and real masks (..., R), (..., L)
    (None: every row real). coding="vsa" also needs the pairs' regions and words."""
    validate.choice(direction, "direction", HEAD_DIRECTIONS)
    validate.choice(coding, "coding", HEAD_CODINGS)
    if coding == "vsa":
        codes = _vsa_codes(tile, words, regions, region_real, word_real, vsa_tau)
        return pool_values(leaky_relu(codes) if leaky else codes, pool, tau, region_real)
    if direction == "t2i":
        return _max_then_pool(tile, region_real, word_real, pool, tau, leaky)
    i2t = _max_then_pool(tile.transpose(-1, -2), word_real, region_real, pool, tau, leaky)
    if direction == "i2t":
        return i2t
    t2i = _max_then_pool(tile, region_real, word_real, pool, tau, leaky)
    return both_scale * (t2i + i2t)


def _options(direction="t2i", pool="mean", tau=CHAN_TAU, leaky=False, both_scale=0.5,
             coding="max", vsa_tau=CHAN_TAU) -> dict:
    return dict(direction=direction, pool=pool, tau=tau, leaky=leaky, both_scale=both_scale,
                coding=coding, vsa_tau=vsa_tau)


def _all_rows(x: torch.Tensor, lengths) -> torch.Tensor:
    if lengths is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
    return torch.as_tensor(lengths, dtype=torch.int64, device=x.device)


# --------------------------------------------------------------------------------------------
# The loop form: one pair at a time, sliced to its real block
# --------------------------------------------------------------------------------------------

def _pair_loop_score(img, cap, i: int, j: int, n_region: int, n_word: int, kw: dict):
    regions, words = img[i, :n_region], cap[j, :n_word]
    tile = regions @ words.T                                    # (R_i, L_j)
    return tile_scores(tile, None, None, regions=regions, words=words, **kw)


def head_similarity_loop(img, cap, lens, img_lens=None, **options) -> torch.Tensor:
    """All pairs, one at a time on its sliced R_i x L_j tile: (n_img, n_cap)."""
    kw = _options(**options)
    region_counts = _all_rows(img, img_lens).tolist()
    word_counts = _all_rows(cap, lens).tolist()
    rows = [torch.stack([_pair_loop_score(img, cap, i, j, r, w, kw)
                         for j, w in enumerate(word_counts)])
            for i, r in enumerate(region_counts)]
    return torch.stack(rows) if rows and word_counts else img.new_zeros((img.shape[0], cap.shape[0]))


def head_pairs_loop(img, cap, lens, img_lens, img_idx, cap_idx, **options) -> torch.Tensor:
    """Listed pairs (img_idx[p], cap_idx[p]), one at a time: (P,)."""
    kw = _options(**options)
    region_counts = _all_rows(img, img_lens).tolist()
    word_counts = _all_rows(cap, lens).tolist()
    scores = [_pair_loop_score(img, cap, i, j, region_counts[i], word_counts[j], kw)
              for i, j in zip(torch.as_tensor(img_idx).tolist(), torch.as_tensor(cap_idx).tolist())]
    return torch.stack(scores) if scores else img.new_zeros((0,))


# --------------------------------------------------------------------------------------------
# The vectorised form: blocks of pairs, padding zeroed and masked
# --------------------------------------------------------------------------------------------

# Tile-sized temporaries a block holds at once (tile, masked copy, maxima, both directions).
_TILE_COPIES = 4


def _pair_bytes(n_region: int, n_word: int, d: int, element_size: int, coding: str) -> int:
    per_pair = _TILE_COPIES * n_region * n_word
    if coding == "vsa":                      # the (R, d) context vectors and their product
        per_pair += 2 * n_region * d
    return max(1, per_pair * element_size)


def block_sizes(n_img: int, n_cap: int, n_region: int, n_word: int, d: int, element_size: int,
                coding: str = "max") -> tuple:
    """(image chunk, caption chunk) with the block's temporaries below BLOCK_BYTES."""
    max_pairs = max(1, BLOCK_BYTES // _pair_bytes(n_region, n_word, d, element_size, coding))
    cap_chunk = min(max(n_cap, 1), max(1, math.isqrt(max_pairs)))
    img_chunk = min(max(n_img, 1), max(1, max_pairs // cap_chunk))
    cap_chunk = min(max(n_cap, 1), max(1, max_pairs // img_chunk))
    return img_chunk, cap_chunk


def _block(img_f, cap_f, img_lens, lens, i0, i1, j0, j1, kw):
    """Scores of images [i0, i1) x captions [j0, j1): (bi, bj), each sliced to the block's
    longest image and caption."""
    block_img_lens, block_lens = img_lens[i0:i1], lens[j0:j1]
    n_region, n_word = int(block_img_lens.max()), int(block_lens.max())
    regions = img_f[i0:i1, :n_region].unsqueeze(1)                  # (bi, 1, Rb, d)
    words = cap_f[j0:j1, :n_word].unsqueeze(0)                      # (1, bj, Lb, d)
    tile = torch.einsum("ird,jwd->ijrw", regions[:, 0], words[0])   # (bi, bj, Rb, Lb)
    region_real = real_rows(block_img_lens, n_region).unsqueeze(1)  # (bi, 1, Rb)
    word_real = real_rows(block_lens, n_word).unsqueeze(0)          # (1, bj, Lb)
    return tile_scores(tile, region_real, word_real, regions=regions, words=words, **kw)


def head_similarity_vectorized(img, cap, lens, img_lens=None, *, img_chunk=None, cap_chunk=None,
                               **options) -> torch.Tensor:
    """All pairs in (img_chunk x cap_chunk) blocks: (n_img, n_cap)."""
    kw = _options(**options)
    lens, img_lens = _all_rows(cap, lens), _all_rows(img, img_lens)
    n_img, n_cap = img.shape[0], cap.shape[0]
    if n_img == 0 or n_cap == 0:
        return img.new_zeros((n_img, n_cap))
    auto_img, auto_cap = block_sizes(n_img, n_cap, img.shape[1], cap.shape[1], img.shape[2],
                                     img.element_size(), kw["coding"])
    img_chunk, cap_chunk = img_chunk or auto_img, cap_chunk or auto_cap
    img_f, cap_f = zero_padding(img, img_lens), zero_padding(cap, lens)
    rows = []
    for i0 in range(0, n_img, img_chunk):
        i1 = min(n_img, i0 + img_chunk)
        rows.append(torch.cat([_block(img_f, cap_f, img_lens, lens, i0, i1, j0,
                                      min(n_cap, j0 + cap_chunk), kw)
                               for j0 in range(0, n_cap, cap_chunk)], dim=1))
    return torch.cat(rows, dim=0)


def head_pairs_vectorized(img, cap, lens, img_lens, img_idx, cap_idx, **options) -> torch.Tensor:
    """Listed pairs (img_idx[p], cap_idx[p]) in gathered blocks of bounded memory: (P,)."""
    kw = _options(**options)
    lens, img_lens = _all_rows(cap, lens), _all_rows(img, img_lens)
    img_idx = torch.as_tensor(img_idx, dtype=torch.int64, device=img.device)
    cap_idx = torch.as_tensor(cap_idx, dtype=torch.int64, device=img.device)
    n_pairs = img_idx.numel()
    if n_pairs == 0:
        return img.new_zeros((0,))
    step = max(1, BLOCK_BYTES // _pair_bytes(img.shape[1], cap.shape[1], img.shape[2],
                                             img.element_size(), kw["coding"]))
    img_f, cap_f = zero_padding(img, img_lens), zero_padding(cap, lens)
    pieces = []
    for p0 in range(0, n_pairs, step):
        rows, cols = img_idx[p0:p0 + step], cap_idx[p0:p0 + step]
        regions, words = img_f[rows], cap_f[cols]                   # (p, R, d), (p, L, d)
        tile = torch.einsum("prd,pwd->prw", regions, words)
        region_real = real_rows(img_lens[rows], img.shape[1])
        word_real = real_rows(lens[cols], cap.shape[1])
        pieces.append(tile_scores(tile, region_real, word_real, regions=regions, words=words, **kw))
    return torch.cat(pieces)


def max_similarity_reference(img, cap, lens, img_lens=None, *, normalize="none", loop=False,
                             **options) -> torch.Tensor:
    """The whole head in one call (normalisation included), for tests and scripts: the
    vectorised form, or the loop form with loop=True. (n_img, n_cap), in the inputs' dtype."""
    lens_t, img_lens_t = _all_rows(cap, lens), _all_rows(img, img_lens)
    img_n, cap_n = normalize_inputs(img, cap, lens_t, img_lens_t, normalize)
    form = head_similarity_loop if loop else head_similarity_vectorized
    return form(img_n, cap_n, lens_t, img_lens_t, **options)
