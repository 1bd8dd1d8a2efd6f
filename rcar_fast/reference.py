"""The float64-faithful reference: SCAN and RCAR similarity exactly as /work/shared/spec/SIMILARITY.md
defines them (which follows the public SCAN `model.py` and RCAR `lib/encoders.py`).

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
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcar_fast import validate
from rcar_fast.contract import AGGREGATIONS, DIRECTIONS, EPS, LEAKY_SLOPE, RAW_NORMS, REGULATORS

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


def _check_choice(value, name: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


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
    _check_choice(raw_norm, "raw_norm", RAW_NORMS)
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
                    query_mask=None, context_mask=None) -> torch.Tensor:
    """Attended (unmodulated) context for every query: (..., Q, d), computed explicitly.

    query (..., Q, d), context (..., C, d), modulation m (..., Q, d) or None (all ones),
    smooth: scalar or per-query lambda (..., Q). Masks as in normalize_raw_scores.
    """
    scores = raw_scores(query, context, modulation)
    alpha = attention_weights(scores, smooth, raw_norm, query_mask, context_mask)
    return attend(alpha, context)


# --------------------------------------------------------------------------------------------
# Aggregation over the queries of a pair
# --------------------------------------------------------------------------------------------

def aggregate(r: torch.Tensor, agg: str = "mean", lse_lambda: float = 6.0, query_mask=None):
    """Reduce per-query scores r (..., Q) to (...), over real queries only.

    lse is log(sum exp(lse_lambda r)) / lse_lambda, evaluated with logsumexp (the public code
    exponentiates directly; the value is the same, but fp16 would overflow at lse_lambda=20).
    """
    _check_choice(agg, "agg", AGGREGATIONS)
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
# Pair iteration shared by SCAN and RCAR. A "pair function" gets (query, context, query_mask,
# context_mask) with broadcastable leading dims and returns the scores of those pairs.
# --------------------------------------------------------------------------------------------

def _lens_list(lens) -> list:
    if torch.is_tensor(lens):
        return [int(v) for v in lens.reshape(-1).tolist()]
    return [int(v) for v in lens]


def _orient(direction: str, words, regions):
    """(query, context) for a direction: t2i queries words, i2t queries regions."""
    return (words, regions) if direction == "t2i" else (regions, words)


def _pairs_loop(img, cap, lens, direction, pair_fn):
    """One caption at a time, sliced to its length (like the public code): (n_img, n_cap)."""
    _check_choice(direction, "direction", DIRECTIONS)
    n_img = img.shape[0]
    columns = []
    for j, n_word in enumerate(_lens_list(lens)):
        words = cap[j, :n_word].unsqueeze(0).expand(n_img, -1, -1)
        query, context = _orient(direction, words, img)
        columns.append(pair_fn(query, context, None, None))
    if not columns:
        return img.new_zeros((n_img, 0))
    return torch.stack(columns, dim=1)


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


def _caption_blocks(cap, lens, cap_chunk):
    """Per caption chunk: (start, words (bc, Lb, d) with padding filled, mask (bc, Lb)).

    Lb is the chunk's longest caption, so short chunks do not pay for Lmax."""
    lens_list = _lens_list(lens)
    blocks = []
    for j0 in range(0, len(lens_list), cap_chunk):
        chunk_lens = lens_list[j0:j0 + cap_chunk]
        longest = max(chunk_lens)
        words = cap[j0:j0 + len(chunk_lens), :longest]
        lens_t = torch.tensor(chunk_lens, device=cap.device)
        mask = torch.arange(longest, device=cap.device) < lens_t.unsqueeze(1)
        fill = torch.full((), _PAD_FILL, dtype=words.dtype, device=words.device)
        blocks.append((j0, torch.where(mask.unsqueeze(-1), words, fill), mask))
    return blocks


def _pairs_vectorized(img, cap, lens, direction, pair_fn, img_chunk, cap_chunk):
    """All pairs, image chunk x caption chunk blocks: (n_img, n_cap)."""
    _check_choice(direction, "direction", DIRECTIONS)
    n_img, n_regions, d = img.shape
    lens_list = _lens_list(lens)
    if not lens_list or n_img == 0:
        return img.new_zeros((n_img, len(lens_list)))
    longest = max(n_regions, max(lens_list))
    img_chunk, cap_chunk = default_chunks(n_img, len(lens_list), longest, d, img.element_size(),
                                          img_chunk, cap_chunk)
    blocks = _caption_blocks(cap, lens_list, cap_chunk)
    rows = []
    for i0 in range(0, n_img, img_chunk):
        regions = img[i0:i0 + img_chunk].unsqueeze(1)          # (bi, 1, R, d)
        row = []
        for _, words, mask in blocks:
            words, mask = words.unsqueeze(0), mask.unsqueeze(0)  # (1, bc, Lb, d), (1, bc, Lb)
            query, context = _orient(direction, words, regions)
            query_mask, context_mask = _orient(direction, mask, None)
            row.append(pair_fn(query, context, query_mask, context_mask))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


# --------------------------------------------------------------------------------------------
# SCAN
# --------------------------------------------------------------------------------------------

def _scan_pair_fn(raw_norm, smooth, agg, lse_lambda):
    _check_choice(raw_norm, "raw_norm", RAW_NORMS)
    _check_choice(agg, "agg", AGGREGATIONS)

    def pair_fn(query, context, query_mask, context_mask):
        ctx = cross_attention(query, context, smooth, raw_norm, None, query_mask, context_mask)
        return aggregate(cosine(query, ctx), agg, lse_lambda, query_mask)

    return pair_fn


def scan_similarity_loop(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm",
                         smooth=9.0, agg="mean", lse_lambda=6.0):
    """SCAN xattn_score_t2i / xattn_score_i2t, one caption at a time: (n_img, n_cap)."""
    pair_fn = _scan_pair_fn(raw_norm, smooth, agg, lse_lambda)
    return _pairs_loop(img, cap, lens, direction, pair_fn)


def scan_similarity_vectorized(img, cap, lens, *, direction="t2i", raw_norm="clipped_l2norm",
                               smooth=9.0, agg="mean", lse_lambda=6.0, img_chunk=None,
                               cap_chunk=None):
    """SCAN over all pairs in (img_chunk x cap_chunk) blocks: (n_img, n_cap)."""
    pair_fn = _scan_pair_fn(raw_norm, smooth, agg, lse_lambda)
    return _pairs_vectorized(img, cap, lens, direction, pair_fn, img_chunk, cap_chunk)


# --------------------------------------------------------------------------------------------
# RCAR (official EncoderSimilarity). Submodule and parameter names, registration order and
# initialisation follow Paranioar/RCAR lib/encoders.py, so official `sim_enc` state dicts load
# strictly and a seeded init draws the same numbers.
# --------------------------------------------------------------------------------------------

def module_counts(regulator: str, steps: int) -> dict:
    """Numbers of alignment (alv), RCR and RAR modules the official code builds.

    only_rar n: 1, 0, n.  only_rcr n: n, n, 0 (n = 0 is the plain baseline).
    coop_rcar n: n, n-1, n (needs n >= 1: with no step there is no alignment to score).
    """
    _check_choice(regulator, "regulator", REGULATORS)
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(f"steps must be an integer, got {steps!r}")
    steps = int(steps)
    minimum = 1 if regulator == "coop_rcar" else 0
    if steps < minimum:
        raise ValueError(f"steps must be >= {minimum} for regulator={regulator!r}, got {steps}")
    if regulator == "only_rar":
        return {"alv": 1, "rcr": 0, "rar": steps}
    if regulator == "only_rcr":
        return {"alv": steps, "rcr": steps, "rar": 0}
    return {"alv": steps, "rcr": steps - 1, "rar": steps}


class AggregationRegulator(nn.Module):
    """RAR (official `Aggregation_regulator`): attention-pool the alignment vectors into h."""

    def __init__(self, sim_dim: int, embed_dim: int):
        super().__init__()
        self.rar_q_w = nn.Sequential(nn.Linear(sim_dim, sim_dim), nn.Tanh(), nn.Dropout(0.4))
        self.rar_k_w = nn.Sequential(nn.Linear(sim_dim, sim_dim), nn.Tanh(), nn.Dropout(0.4))
        self.rar_v_w = nn.Sequential(nn.Linear(sim_dim, 1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, mid, hig, query_mask=None):
        """mid (..., Q, s), hig (..., s) -> new hig (..., s)."""
        keys = self.rar_k_w(mid)
        question = self.rar_q_w(hig).unsqueeze(-2)
        logits = self.rar_v_w(keys * question).squeeze(-1)
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask, float("-inf"))
        weights = self.softmax(logits)
        return l2norm((weights.unsqueeze(-1) * mid).sum(dim=-2))


class CorrespondenceRegulator(nn.Module):
    """RCR (official `Correpondence_regulator`): per-query modulation m and temperature lambda."""

    def __init__(self, sim_dim: int, embed_dim: int):
        super().__init__()
        self.rcr_smooth_w = nn.Sequential(nn.Linear(sim_dim, sim_dim // 2), nn.Tanh(),
                                          nn.Linear(sim_dim // 2, 1))
        self.rcr_matrix_w = nn.Sequential(nn.Linear(sim_dim, sim_dim * 2), nn.Tanh(),
                                          nn.Linear(sim_dim * 2, embed_dim))
        self.tanh = nn.Tanh()
        self.relu = nn.ReLU()

    def forward(self, mid, matrix, smooth):
        """mid (..., Q, s); matrix None (all ones) or (..., Q, d); smooth scalar or (..., Q)."""
        ones = 1.0 if matrix is None else matrix
        matrix = (self.tanh(self.rcr_matrix_w(mid)) + ones).clamp(min=-1, max=1)
        smooth = self.relu(self.rcr_smooth_w(mid).squeeze(-1) + smooth)
        return matrix, smooth


class AlignmentVector(nn.Module):
    """Official `Alignment_vector`: v_k = l2norm(W((q_k - ctx_k)^2)), ctx already l2-normalised."""

    def __init__(self, sim_dim: int, embed_dim: int):
        super().__init__()
        self.sim_transform_w = nn.Linear(embed_dim, sim_dim)

    def forward(self, query, unit_context):
        return l2norm(self.sim_transform_w((query - unit_context).pow(2)))


class RCARHead(nn.Module):
    """RCAR similarity head with the official `EncoderSimilarity` state-dict layout.

    regulator: "only_rar" | "only_rcr" | "coop_rcar"; steps: the official rar_step / rcr_step /
    rcar_step; direction "t2i" (queries are words) or "i2t" (queries are regions); smooth: the
    official t2i_smooth / i2t_smooth. forward() is the vectorised form.
    """

    def __init__(self, embed_dim: int = 1024, sim_dim: int = 256, regulator: str = "coop_rcar",
                 steps: int = 2, direction: str = "t2i", smooth: float = 10.0):
        super().__init__()
        _check_choice(direction, "direction", DIRECTIONS)
        counts = module_counts(regulator, steps)
        self.embed_dim, self.sim_dim = int(embed_dim), int(sim_dim)
        self.regulator, self.steps = regulator, int(steps)
        self.direction, self.smooth = direction, smooth
        # Registration order as in the official class (it fixes the order init draws numbers).
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        self.sigmoid = nn.Sigmoid()
        self.rar_modules = nn.ModuleList(
            [AggregationRegulator(sim_dim, embed_dim) for _ in range(counts["rar"])])
        self.rcr_modules = nn.ModuleList(
            [CorrespondenceRegulator(sim_dim, embed_dim) for _ in range(counts["rcr"])])
        self.alv_modules = nn.ModuleList(
            [AlignmentVector(sim_dim, embed_dim) for _ in range(counts["alv"])])
        self.init_weights()

    @property
    def smooth(self) -> float:
        """The softmax temperature lambda of the first attention (official t2i_smooth /
        i2t_smooth): a positive finite number, checked wherever it is set."""
        return self._smooth

    @smooth.setter
    def smooth(self, value) -> None:
        self._smooth = validate.positive_number(value, "smooth")

    def active_dropout(self) -> list:
        """Names of the Dropout modules that act now (training mode, p > 0): RAR's, if any.
        The fused kernels have no dropout and refuse (or are skipped) while this is non-empty."""
        if not self.training:
            return []
        return [name for name, m in self.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]

    def extra_repr(self) -> str:
        return (f"regulator={self.regulator!r}, steps={self.steps}, direction={self.direction!r}, "
                f"smooth={self.smooth}")

    def init_weights(self) -> None:
        """Official init: every Linear weight ~ U(-r, r), r = sqrt(6 / (in + out)); bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = math.sqrt(6.0) / math.sqrt(module.in_features + module.out_features)
                with torch.no_grad():
                    module.weight.uniform_(-bound, bound)
                    if module.bias is not None:
                        module.bias.zero_()

    # ---- one set of pairs (leading dims broadcast) -----------------------------------------

    def _unit_context(self, query, context, matrix, smooth, query_mask, context_mask):
        ctx = cross_attention(query, context, smooth, "clipped_l2norm", matrix,
                              query_mask, context_mask)
        return l2norm(ctx)

    def _alignment(self, step, query, context, matrix, smooth, query_mask, context_mask):
        unit = self._unit_context(query, context, matrix, smooth, query_mask, context_mask)
        return self.alv_modules[step](query, unit)

    def _final_score(self, hig):
        return self.sigmoid(self.sim_eval_w(hig)).squeeze(-1)

    def pair_scores(self, query, context, query_mask=None, context_mask=None):
        """Scores of the pairs described by query (..., Q, d) and context (..., C, d) -> (...)."""
        masks = (query_mask, context_mask)
        matrix, smooth = None, self.smooth
        if self.regulator == "only_rar":
            mid = self._alignment(0, query, context, matrix, smooth, *masks)
            hig = masked_mean(mid, query_mask)
            for rar in self.rar_modules:
                hig = rar(mid, hig, query_mask)
            return self._final_score(hig)
        if self.regulator == "only_rcr":
            for step, rcr in enumerate(self.rcr_modules):
                mid = self._alignment(step, query, context, matrix, smooth, *masks)
                matrix, smooth = rcr(mid, matrix, smooth)
            unit = self._unit_context(query, context, matrix, smooth, *masks)
            return aggregate(cosine(query, unit), "mean", query_mask=query_mask)
        hig = None
        for step, rar in enumerate(self.rar_modules):
            mid = self._alignment(step, query, context, matrix, smooth, *masks)
            if step == 0:
                hig = masked_mean(mid, query_mask)
            if step < self.steps - 1:
                matrix, smooth = self.rcr_modules[step](mid, matrix, smooth)
            hig = rar(mid, hig, query_mask)
        return self._final_score(hig)

    # ---- all pairs ---------------------------------------------------------------------------

    def forward_loop(self, img, cap, lens):
        """One caption at a time, like the official forward: (n_img, n_cap)."""
        return _pairs_loop(img, cap, lens, self.direction, self.pair_scores)

    def forward_vectorized(self, img, cap, lens, img_chunk=None, cap_chunk=None):
        """All pairs in (img_chunk x cap_chunk) blocks with masking: (n_img, n_cap)."""
        return _pairs_vectorized(img, cap, lens, self.direction, self.pair_scores,
                                 img_chunk, cap_chunk)

    def forward(self, img, cap, lens):
        return self.forward_vectorized(img, cap, lens)

    # ---- official checkpoints ----------------------------------------------------------------

    def load_official_state_dict(self, state):
        """Load an official sim_enc state dict strictly.

        Accepts a whole checkpoint ({"model": ...}), a model state dict (keys
        "module.sim_enc.*" or "sim_enc.*"; other encoders' keys are ignored) or a bare
        sim_enc state dict. Raises ValueError listing missing/unexpected/mis-shaped keys.
        """
        state = extract_sim_enc_state(state)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs head {tuple(own[k].shape)}"
                            for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or mis_shaped:
            found = count_official_modules(state)
            raise ValueError(
                f"state dict does not fit RCARHead(regulator={self.regulator!r}, steps={self.steps}, "
                f"embed_dim={self.embed_dim}, sim_dim={self.sim_dim}): the head holds "
                f"{module_counts(self.regulator, self.steps)} modules, the state dict {found}.\n"
                f"missing keys: {missing}\nunexpected keys: {unexpected}\nshape mismatches: {mis_shaped}")
        return self.load_state_dict(state, strict=True)


_SIM_ENC_PREFIXES = ("module.sim_enc.", "sim_enc.")


def extract_sim_enc_state(state) -> dict:
    """The bare sim_enc state dict inside a checkpoint / model state dict / bare state dict."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state dict (a mapping), got {type(state).__name__}")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    for prefix in _SIM_ENC_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def count_official_modules(state) -> dict:
    """How many alv / rcr / rar modules a bare sim_enc state dict holds."""
    counts = {}
    for kind in ("alv", "rcr", "rar"):
        prefix = f"{kind}_modules."
        indices = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
        counts[kind] = len(indices)
    return counts


def rcar_similarity_loop(head: RCARHead, img, cap, lens):
    return head.forward_loop(img, cap, lens)


def rcar_similarity_vectorized(head: RCARHead, img, cap, lens, img_chunk=None, cap_chunk=None):
    return head.forward_vectorized(img, cap, lens, img_chunk, cap_chunk)
