"""The math of the float64-faithful reference: SCAN and RCAR similarity exactly as
SIMILARITY.md (at the repository root) defines them, following the public SCAN `model.py` and
RCAR `lib/encoders.py`. Pure functions: norms, cross attention, aggregation, the SCAN and RCAR
pair functions and the pair drivers (loop and vectorised, all pairs or listed pairs). The RCAR
parameter tree they read lives in rcar_fast.heads; rcar_fast.reference gathers the public names.

Every kernel in the project is checked against this module, so it favours plainness over speed.
Two forms of each similarity:

* ``*_loop``: one caption at a time, sliced to its length and broadcast against all images, in
  the order of operations of the public code. This is the baseline a user runs today.
* ``*_vectorized``: all (image, caption) pairs of an image chunk x caption chunk block at once,
  with batched matmuls (einsum) and bounded memory. Ragged lengths are handled by masking:
  padding words are first replaced by a finite filler (so NaN padding never enters any
  arithmetic), every reduction over the words axis masks them out (-inf before softmaxes, 0 in
  sums), and norms over a padding context word are taken of 1 instead of 0 (no sqrt(0), whose
  gradient is infinite). Forward values and gradients equal the loop form to rounding.

Both forms compute the attended context vectors explicitly (no Gram-matrix shortcut).

Works for float64/float32/float16/bfloat16 tensors on any device; computation happens in the
input dtype (so that a low-precision run measures the reference's own rounding error).
No input validation here beyond option names: public entry points validate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rcar_fast import dropout, validate
from rcar_fast.contract import AGGREGATIONS, DIRECTIONS, EPS, LEAKY_SLOPE, RAW_NORMS, REGULATORS  # noqa: F401

# A block of the vectorised forms keeps each (pairs, Q, d) intermediate below this many bytes.
BLOCK_BYTES = 256 * 2**20

# Value written over padding words before any arithmetic. Non-zero on purpose: a padding query
# word then has a non-zero norm, so its (discarded) cosine has finite gradients in every dtype.
_PAD_FILL = 1.0


# --------------------------------------------------------------------------------------------
# Helpers with the public code's eps placement
# --------------------------------------------------------------------------------------------

def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (sqrt(sum x^2) + eps): eps is added to the norm, not inside the sqrt."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def l1norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / (sum |x| + eps)."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + EPS)


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(a . b) / max(|a| |b|, eps) along dim; a and b broadcast."""
    dot = (a * b).sum(dim=dim)
    norms = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim)
    return dot / norms.clamp(min=EPS)


def leaky(x: torch.Tensor) -> torch.Tensor:
    """x if x > 0 else 0.1 x (LeakyReLU(0.1))."""
    return F.leaky_relu(x, LEAKY_SLOPE)


# --------------------------------------------------------------------------------------------
# Cross attention. Shapes: query (..., Q, d), context (..., C, d); the leading dims broadcast,
# so the same code serves the loop form (P, ...) and the block form (n_img, n_cap, ...).
# --------------------------------------------------------------------------------------------

def raw_scores(query: torch.Tensor, context: torch.Tensor, modulation=None) -> torch.Tensor:
    """s[..., c, k] = context_c . (query_k * m_k), shape (..., C, Q)."""
    if modulation is not None:
        query = query * modulation
    return torch.einsum("...cd,...qd->...cq", context, query)


def normalize_raw_scores(scores: torch.Tensor, raw_norm: str = "clipped_l2norm",
                         query_mask=None, context_mask=None) -> torch.Tensor:
    """Normalise s (..., C, Q) ACROSS the query axis (last) for each context item.

    query_mask (..., Q) / context_mask (..., C): True for real items. Padding queries are
    excluded from the norms; a padding context item's row is normalised by 1 (its values are
    dropped later by the context softmax), which keeps sqrt away from an exact 0.
    """
    validate.choice(raw_norm, "raw_norm", RAW_NORMS)
    query_real = None if query_mask is None else query_mask.unsqueeze(-2)
    if raw_norm == "softmax":
        if query_real is not None:
            scores = scores.masked_fill(~query_real, float("-inf"))
        return torch.softmax(scores, dim=-1)
    x = leaky(scores) if raw_norm.startswith("clipped") else scores
    if query_real is not None:
        x = torch.where(query_real, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if raw_norm in ("clipped", "no_norm"):
        return x
    if raw_norm.endswith("l2norm"):
        total = x.pow(2).sum(dim=-1, keepdim=True)
    else:
        total = x.abs().sum(dim=-1, keepdim=True)
    if context_mask is not None:
        total = torch.where(context_mask.unsqueeze(-1), total,
                            torch.ones((), dtype=total.dtype, device=total.device))
    if raw_norm.endswith("l2norm"):
        total = total.sqrt()
    return x / (total + EPS)


def _per_query_temperature(smooth, like: torch.Tensor):
    """A scalar smooth stays scalar; a per-query tensor (..., Q) becomes (..., Q, 1)."""
    if torch.is_tensor(smooth) and smooth.dim() > 0:
        return smooth.unsqueeze(-1)
    return smooth


def attention_weights(scores: torch.Tensor, smooth=9.0, raw_norm: str = "clipped_l2norm",
                      query_mask=None, context_mask=None) -> torch.Tensor:
    """alpha[..., k, c] = softmax_c(lambda_k * a[..., c, k]), shape (..., Q, C)."""
    normalized = normalize_raw_scores(scores, raw_norm, query_mask, context_mask)
    logits = normalized.transpose(-1, -2) * _per_query_temperature(smooth, normalized)
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask.unsqueeze(-2), float("-inf"))
    return torch.softmax(logits, dim=-1)


def attend(alpha: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """ctx[..., k, :] = sum_c alpha[..., k, c] context[..., c, :], shape (..., Q, d)."""
    return torch.einsum("...qc,...cd->...qd", alpha, context)


def cross_attention(query: torch.Tensor, context: torch.Tensor, smooth=9.0,
                    raw_norm: str = "clipped_l2norm", modulation=None,
                    query_mask=None, context_mask=None, observe=None) -> torch.Tensor:
    """Attended (unmodulated) context for every query: (..., Q, d), computed explicitly.

    query (..., Q, d), context (..., C, d), modulation m (..., Q, d) or None (all ones),
    smooth: scalar or per-query lambda (..., Q). Masks as in normalize_raw_scores.
    observe: None, or a function called with the attention weights alpha (..., Q, C) (how
    rcar_fast.attention reads the weights of a step without repeating the math).
    """
    scores = raw_scores(query, context, modulation)
    alpha = attention_weights(scores, smooth, raw_norm, query_mask, context_mask)
    if observe is not None:
        observe(alpha)
    return attend(alpha, context)


# --------------------------------------------------------------------------------------------
# Aggregation over the queries of a pair
# --------------------------------------------------------------------------------------------

def aggregate(r: torch.Tensor, agg: str = "mean", lse_lambda: float = 6.0, query_mask=None):
    """Reduce per-query scores r (..., Q) to (...), over real queries only.

    lse is log(sum exp(lse_lambda r)) / lse_lambda, evaluated with logsumexp (the public code
    exponentiates directly; the value is the same, but fp16 would overflow at lse_lambda=20).
    """
    validate.choice(agg, "agg", AGGREGATIONS)
    if agg in ("lse", "max"):
        if agg == "lse":
            r = r * lse_lambda
        if query_mask is not None:
            r = r.masked_fill(~query_mask, float("-inf"))
        if agg == "max":
            return r.amax(dim=-1)
        return torch.logsumexp(r, dim=-1) / lse_lambda
    if query_mask is not None:
        r = torch.where(query_mask, r, torch.zeros((), dtype=r.dtype, device=r.device))
    total = r.sum(dim=-1)
    if agg == "sum":
        return total
    count = r.shape[-1] if query_mask is None else query_mask.sum(dim=-1).to(r.dtype)
    return total / count


def masked_mean(x: torch.Tensor, query_mask=None) -> torch.Tensor:
    """Mean of x (..., Q, s) over the real queries -> (..., s)."""
    if query_mask is None:
        return x.mean(dim=-2)
    real = query_mask.unsqueeze(-1)
    total = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=-2)
    return total / real.sum(dim=-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The pair drivers shared by SCAN and RCAR, for all pairs (-> (n_img, n_cap)) or for listed
# pairs img_idx[p], cap_idx[p] (-> (P,)). A "pair function" gets (query, context, query_mask,
# context_mask) with broadcastable leading dims and returns the scores of those pairs.
# --------------------------------------------------------------------------------------------

def _as_ints(values) -> list:
    if torch.is_tensor(values):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _orient(direction: str, words, regions):
    """(query, context) for a direction: t2i queries words, i2t queries regions."""
    return (words, regions) if direction == "t2i" else (regions, words)


def _score_block(direction: str, pair_fn, regions, words, mask):
    """pair_fn over a block: words with padding filled, mask True at real words."""
    query, context = _orient(direction, words, regions)
    query_mask, context_mask = _orient(direction, mask, None)
    return pair_fn(query, context, query_mask, context_mask)


def _fill_padding(words: torch.Tensor, word_lens: torch.Tensor):
    """(words with positions >= word_lens replaced by _PAD_FILL, the mask of real words)."""
    mask = validate.word_mask(word_lens, words.shape[1])
    fill = torch.full((), _PAD_FILL, dtype=words.dtype, device=words.device)
    return torch.where(mask.unsqueeze(-1), words, fill), mask


def pairs_loop(img, cap, lens, direction, pair_fn, img_idx=None, cap_idx=None):
    """The public code's way, each caption sliced to its length. All pairs: one caption at a
    time against every image -> (n_img, n_cap); listed pairs: one pair at a time -> (P,)."""
    validate.choice(direction, "direction", DIRECTIONS)
    lens_list = _as_ints(lens)
    if img_idx is None:
        n_img = img.shape[0]
        columns = []
        for j, n_word in enumerate(lens_list):
            words = cap[j, :n_word].unsqueeze(0).expand(n_img, -1, -1)
            columns.append(pair_fn(*_orient(direction, words, img), None, None))
        return torch.stack(columns, dim=1) if columns else img.new_zeros((n_img, 0))
    scores = []
    for i, j in zip(_as_ints(img_idx), _as_ints(cap_idx)):
        query, context = _orient(direction, cap[j:j + 1, :lens_list[j]], img[i:i + 1])
        scores.append(pair_fn(query, context, None, None))
    return torch.cat(scores) if scores else img.new_zeros((0,))


def default_chunks(n_img: int, n_cap: int, longest: int, d: int, element_size: int,
                   img_chunk=None, cap_chunk=None):
    """Block sizes so that a (pairs, longest, d) tensor stays below BLOCK_BYTES."""
    for value, name in ((img_chunk, "img_chunk"), (cap_chunk, "cap_chunk")):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    per_pair = max(1, longest * d * element_size)
    max_pairs = max(1, BLOCK_BYTES // per_pair)
    if img_chunk is None and cap_chunk is None:
        cap_chunk = min(max(n_cap, 1), max(1, math.isqrt(max_pairs)))
        img_chunk = min(max(n_img, 1), max(1, max_pairs // cap_chunk))
        cap_chunk = min(max(n_cap, 1), max(1, max_pairs // img_chunk))
    elif cap_chunk is None:
        cap_chunk = min(max(n_cap, 1), max(1, max_pairs // img_chunk))
    elif img_chunk is None:
        img_chunk = min(max(n_img, 1), max(1, max_pairs // cap_chunk))
    return int(img_chunk), int(cap_chunk)


def _caption_blocks(cap, lens_list: list, cap_chunk: int):
    """Per caption chunk: (words (bc, Lb, d) with padding filled, mask (bc, Lb)).

    Lb is the chunk's longest caption, so short chunks do not pay for Lmax."""
    blocks = []
    for j0 in range(0, len(lens_list), cap_chunk):
        chunk_lens = lens_list[j0:j0 + cap_chunk]
        words = cap[j0:j0 + len(chunk_lens), :max(chunk_lens)]
        blocks.append(_fill_padding(words, torch.tensor(chunk_lens, device=cap.device)))
    return blocks


def _all_pairs_vectorized(img, cap, lens_list, direction, pair_fn, img_chunk, cap_chunk):
    """All pairs, image chunk x caption chunk blocks broadcast against each other."""
    n_img, n_regions, d = img.shape
    if not lens_list or n_img == 0:
        return img.new_zeros((n_img, len(lens_list)))
    longest = max(n_regions, max(lens_list))
    img_chunk, cap_chunk = default_chunks(n_img, len(lens_list), longest, d, img.element_size(),
                                          img_chunk, cap_chunk)
    blocks = _caption_blocks(cap, lens_list, cap_chunk)
    rows = []
    for i0 in range(0, n_img, img_chunk):
        regions = img[i0:i0 + img_chunk].unsqueeze(1)          # (bi, 1, R, d)
        # words (1, bc, Lb, d), mask (1, bc, Lb)
        row = [_score_block(direction, pair_fn, regions, words.unsqueeze(0), mask.unsqueeze(0))
               for words, mask in blocks]
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def _pair_blocks(lens_of_pairs: torch.Tensor, n_regions: int, d: int, element_size: int):
    """Pair order (by caption length, so a block pays only for its longest caption) and
    block bounds keeping each (pairs, longest, d) block below BLOCK_BYTES."""
    order = torch.argsort(lens_of_pairs, stable=True)
    longest = lens_of_pairs[order].clamp(min=n_regions).to(torch.float64).cpu()
    per_pair = longest * d * element_size
    bounds, start, total = [], 0, order.numel()
    while start < total:
        # Lengths grow along the order, so the cost of [start, stop) is increasing in stop:
        # the pairs that fit form a prefix.
        counts = torch.arange(1, total - start + 1, dtype=torch.float64)
        fits = int((counts * per_pair[start:] <= BLOCK_BYTES).sum())
        stop = start + max(1, fits)
        bounds.append((start, stop))
        start = stop
    return order, bounds


def _listed_pairs_vectorized(img, cap, lens, img_idx, cap_idx, direction, pair_fn):
    """Listed pairs, gathered into length-sorted blocks of (pairs, ., d)."""
    if img_idx.numel() == 0:
        return img.new_zeros((0,))
    pair_lens = torch.as_tensor(lens, device=cap.device)[cap_idx]
    order, bounds = _pair_blocks(pair_lens, img.shape[1], img.shape[2], img.element_size())
    pieces = []
    for start, stop in bounds:
        sel = order[start:stop]
        block_lens = pair_lens[sel]
        words, mask = _fill_padding(cap[cap_idx[sel], :int(block_lens.max())], block_lens)
        pieces.append(_score_block(direction, pair_fn, img[img_idx[sel]], words, mask))
    sorted_scores = torch.cat(pieces)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return sorted_scores[inverse]


def pairs_vectorized(img, cap, lens, direction, pair_fn, img_idx=None, cap_idx=None,
                     img_chunk=None, cap_chunk=None):
    """Many pairs per pair_fn call, ragged lengths masked. All pairs: (img_chunk x cap_chunk)
    blocks -> (n_img, n_cap); listed pairs (img_idx, cap_idx: int64 tensors (P,) on img's
    device): length-sorted blocks below BLOCK_BYTES -> (P,)."""
    validate.choice(direction, "direction", DIRECTIONS)
    if img_idx is None:
        return _all_pairs_vectorized(img, cap, _as_ints(lens), direction, pair_fn, img_chunk,
                                     cap_chunk)
    return _listed_pairs_vectorized(img, cap, lens, img_idx, cap_idx, direction, pair_fn)


# --------------------------------------------------------------------------------------------
# SCAN
# --------------------------------------------------------------------------------------------

def scan_pair_fn(raw_norm="clipped_l2norm", smooth=9.0, agg="mean", lse_lambda=6.0):
    """SCAN's pair function: cosine of each query with its attended context, aggregated."""
    validate.choice(raw_norm, "raw_norm", RAW_NORMS)
    validate.choice(agg, "agg", AGGREGATIONS)

    def pair_fn(query, context, query_mask, context_mask):
        ctx = cross_attention(query, context, smooth, raw_norm, None, query_mask, context_mask)
        return aggregate(cosine(query, ctx), agg, lse_lambda, query_mask)

    return pair_fn


def scan_similarity_loop(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm",
                         smooth=9.0, agg="mean", lse_lambda=6.0):
    """SCAN xattn_score_t2i / xattn_score_i2t, one caption at a time: (n_img, n_cap)."""
    pair_fn = scan_pair_fn(raw_norm, smooth, agg, lse_lambda)
    return pairs_loop(img, cap, lens, direction, pair_fn)


def scan_similarity_vectorized(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm",
                               smooth=9.0, agg="mean", lse_lambda=6.0, img_chunk=None,
                               cap_chunk=None):
    """SCAN over all pairs in (img_chunk x cap_chunk) blocks: (n_img, n_cap)."""
    pair_fn = scan_pair_fn(raw_norm, smooth, agg, lse_lambda)
    return pairs_vectorized(img, cap, lens, direction, pair_fn, img_chunk=img_chunk,
                            cap_chunk=cap_chunk)


# --------------------------------------------------------------------------------------------
# RCAR (official EncoderSimilarity.forward). `head` is the parameter tree of rcar_fast.heads
# (RCARHead): its alv / rcr / rar modules and sim_eval_w, regulator, steps and smooth.
# --------------------------------------------------------------------------------------------

def _rcar_unit_context(query, context, matrix, smooth, query_mask, context_mask, observe=None):
    ctx = cross_attention(query, context, smooth, "clipped_l2norm", matrix,
                          query_mask, context_mask, observe)
    return l2norm(ctx)


def _rcar_alignment(head, step, query, context, matrix, smooth, query_mask, context_mask,
                    observe=None):
    unit = _rcar_unit_context(query, context, matrix, smooth, query_mask, context_mask, observe)
    return head.alv_modules[step](query, unit)


def _rcar_final_score(head, hig):
    return head.sigmoid(head.sim_eval_w(hig)).squeeze(-1)


def _rar_masks(head, module, mid):
    """The counter-based dropout scales of RAR module `module` when a test set them
    (rcar_fast.dropout.counter_masks) and the head is in training mode; else None (nn.Dropout)."""
    return dropout.active_rar_masks(module, mid) if head.training else None


def rcar_pair_scores(head, query, context, query_mask=None, context_mask=None, observe=None):
    """RCAR's pair function: scores of the pairs described by query (..., Q, d) and context
    (..., C, d) -> (...), with the head's parameters. observe (None or a function) is called
    with each cross attention's weights (..., Q, C) in step order: the last call is the
    attention of RCAR's last step."""
    step_args = (query_mask, context_mask, observe)
    matrix, smooth = None, head.smooth
    if head.regulator == "only_rar":
        mid = _rcar_alignment(head, 0, query, context, matrix, smooth, *step_args)
        hig = masked_mean(mid, query_mask)
        for module, rar in enumerate(head.rar_modules):
            hig = rar(mid, hig, query_mask, _rar_masks(head, module, mid))
        return _rcar_final_score(head, hig)
    if head.regulator == "only_rcr":
        for step, rcr in enumerate(head.rcr_modules):
            mid = _rcar_alignment(head, step, query, context, matrix, smooth, *step_args)
            matrix, smooth = rcr(mid, matrix, smooth)
        unit = _rcar_unit_context(query, context, matrix, smooth, *step_args)
        return aggregate(cosine(query, unit), "mean", query_mask=query_mask)
    hig = None
    for step, rar in enumerate(head.rar_modules):
        mid = _rcar_alignment(head, step, query, context, matrix, smooth, *step_args)
        if step == 0:
            hig = masked_mean(mid, query_mask)
        if step < head.steps - 1:
            matrix, smooth = head.rcr_modules[step](mid, matrix, smooth)
        hig = rar(mid, hig, query_mask, _rar_masks(head, step, mid))
    return _rcar_final_score(head, hig)


def rcar_similarity_loop(head, img, cap, lens):
    """The head over all pairs, one caption at a time (the official forward): (n_img, n_cap)."""
    return head.forward_loop(img, cap, lens)


def rcar_similarity_vectorized(head, img, cap, lens, img_chunk=None, cap_chunk=None):
    """The head over all pairs in (img_chunk x cap_chunk) blocks: (n_img, n_cap)."""
    return head.forward_vectorized(img, cap, lens, img_chunk, cap_chunk)
