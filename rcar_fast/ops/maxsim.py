"""The S-only heads (HEADS.md) and late-interaction MaxSim: the public wrappers (validate,
normalise, dispatch).

The backends (ops "maxsim" and "maxsim_pairs" in rcar_fast.dispatch.TABLE; maxsim_reference.py
and the kernels' modules beside it) have the signatures

    maxsim:       fn(img, cap, lens, img_lens, *, direction, pool, tau, leaky, both_scale) -> (n_img, n_cap)
    maxsim_pairs: fn(img, cap, lens, img_lens, img_idx, cap_idx, *, same keywords) -> (P,)

img / cap arrive contiguous and already normalised (normalize="unit" is done here, in torch,
differentiably, padding zeroed first), lens / img_lens int64 on their device, always given. The
result is float32 (float64 for float64 inputs), differentiable w.r.t. img and cap. CHAN's VSA
coding (coding="vsa") adds the keywords coding, vsa_tau and runs on the backends whose class
lists it in `codings` (the reference ones and the C++ CPU kernels).
"""
from __future__ import annotations

import torch

from rcar_fast import dispatch, validate
from rcar_fast.contract import CHAN_TAU, HEAD_PRESETS
from rcar_fast.ops.backend import BackendUnavailable, Inputs
from rcar_fast.ops.scorer import Scorer
from rcar_fast.reference_heads import max_similarity_reference, normalize_inputs

__all__ = ["max_similarity", "maxsim", "MaxsimScorer", "HEAD_PRESETS"]

# The signature's defaults (what an argument that is not passed means, when no preset sets it).
DEFAULTS = dict(direction="t2i", pool="mean", tau=CHAN_TAU, leaky=False, normalize="none",
                both_scale=0.5, coding="max", vsa_tau=CHAN_TAU)
_BACKEND_KEYWORDS = ("direction", "pool", "tau", "leaky", "both_scale")

# maxsim(k=...) without doc_block scores about this many (query, document) pairs per block.
TOPK_BLOCK_PAIRS = 2**22


class _NotPassed:
    """A signature default that tells "not passed" from "passed the default value" (so that a
    preset can fill it, and a contradicting explicit value is an error). Prints as its value."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


def _passed(**arguments) -> dict:
    return {key: value for key, value in arguments.items() if not isinstance(value, _NotPassed)}


def _takes(op: str, backend: str, coding: str) -> bool:
    return coding in getattr(dispatch.implementation(op, backend), "codings", ("max",))


def _backend_for(op: str, backend: str, inputs: Inputs, coding: str):
    """dispatch.choose, with the coding: only backends whose class lists it in `codings`
    (backend="auto": the first of dispatch.auto_order that lists it and takes the inputs)."""
    if coding == "max":
        return dispatch.choose(op, backend, inputs)
    if backend == "auto":
        backend = next((be for be in dispatch.auto_order(op, inputs.device.type)
                        if _takes(op, be, coding) and dispatch.rejection(op, be, inputs) is None),
                       "reference")
    if dispatch.implementation(op, backend) is not None and not _takes(op, backend, coding):
        takers = ", ".join(repr(be) for be in dispatch.BACKENDS if _takes(op, be, coding))
        raise BackendUnavailable(f"backend {backend!r} cannot run {op} with coding={coding!r}: "
                                 f"CHAN's VSA coding runs on the backends {takers}")
    return dispatch.choose(op, backend, inputs)


def _backend_keywords(settings: dict) -> dict:
    kw = {key: settings[key] for key in _BACKEND_KEYWORDS}
    if settings["coding"] != "max":
        kw.update(coding=settings["coding"], vsa_tau=settings["vsa_tau"])
    return kw


def _prepared(img, cap, lens, img_lens, settings):
    img, cap = normalize_inputs(img, cap, lens, img_lens, settings["normalize"])
    return img.contiguous(), cap.contiguous()


_UNSET = {key: _NotPassed(value) for key, value in DEFAULTS.items()}


def max_similarity(img, cap, lens, *, direction=_UNSET["direction"], pool=_UNSET["pool"],
                   tau=_UNSET["tau"], leaky=_UNSET["leaky"], normalize=_UNSET["normalize"],
                   both_scale=_UNSET["both_scale"], img_lens=None, preset=None,
                   coding=_UNSET["coding"], vsa_tau=_UNSET["vsa_tau"], backend="auto") -> torch.Tensor:
    """An S-only head (HEADS.md) on every (image, caption) pair: (n_img, n_cap).

    img (n_img, R, d) with regions >= img_lens[i] ignored (img_lens (n_img,) in [1, R], default
    R), cap (n_cap, Lmax, d) with words >= lens[j] ignored (lens (n_cap,) in [1, Lmax]); padding
    may hold NaN. Pair (i, j) is scored from S[r, w] = v_r . e_w on its real block:
    direction "t2i" pools m_w = max_r S[r, w] over the words, "i2t" pools n_r = max_w S[r, w]
    over the regions, "both" is both_scale * (t2i + i2t); pool "mean" | "sum" | "max" |
    "lse" (log sum exp(x / tau), not times tau) | "softmax" (sum softmax(x / tau) x); leaky
    applies x if x > 0 else 0.1 x to the maxima; normalize "unit" divides every vector by
    max(|x|, 1e-12) first. Ties: the first argmax takes the whole gradient.
    preset "chan" | "laps" | "aladin" | "teran" | "colbert" | "dvsa" fills the settings of that
    model (contract.HEAD_PRESETS); an argument contradicting it is a ValueError.
    coding="vsa": CHAN's VSACoding (direction "i2t", temperature vsa_tau), on the backends that
    list it (reference, reference_loop, cpu). Returns float32 (float64 for float64 inputs), differentiable w.r.t. img and cap.
    """
    settings = validate.head_settings(preset, _passed(
        direction=direction, pool=pool, tau=tau, leaky=leaky, normalize=normalize,
        both_scale=both_scale, coding=coding, vsa_tau=vsa_tau), DEFAULTS)
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    lens, img_lens = validate.head_inputs(img, cap, lens, img_lens)
    impl = _backend_for("maxsim", backend, Inputs.of_scan(img, cap, settings["direction"], lens),
                        settings["coding"])
    img, cap = _prepared(img, cap, lens, img_lens, settings)
    return impl.fn(img, cap, lens, img_lens, **_backend_keywords(settings))


# ---------------------------------------------------------------------------------------------
# Late interaction (ColBERT MaxSim): caption = query, image = document, t2i + sum
# ---------------------------------------------------------------------------------------------

_COLBERT = validate.head_settings("colbert", {}, DEFAULTS)


def _pair_list(pairs, n_q: int, n_d: int, device) -> tuple:
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise TypeError("pairs must be a pair (q_idx, d_idx) of 1-D integer tensors of one length P, "
                        f"got {type(pairs).__name__}")
    return validate.named_pair_indices(pairs[0], pairs[1], n_q, n_d, device, ("q_idx", "d_idx"),
                                       ("n_q", "n_d"))


def _merge_top_k(best, block_values, start: int, k: int):
    """The k best of (best values, best indices) and a new block of documents [start, ...),
    ordered by value, ties by the lower document index: the running best holds only indices
    below `start`, in that order already, so a stable descending sort keeps every tie in
    index order."""
    n_q, width = block_values.shape
    block_idx = torch.arange(start, start + width, device=block_values.device).expand(n_q, width)
    values, indices = block_values, block_idx
    if best is not None:
        values, indices = torch.cat([best[0], values], dim=1), torch.cat([best[1], indices], dim=1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def _top_k(impl_all, pairs_backend, q, d, q_lens, d_lens, k: int, doc_block: int, kw: dict):
    """(values, indices) (n_q, k): documents scored block by block, never the whole matrix."""
    best = None
    with torch.no_grad():
        for start in range(0, d.shape[0], doc_block):
            stop = min(d.shape[0], start + doc_block)
            block_lens = d_lens[start:stop]
            docs = d[start:stop, :int(block_lens.max())].contiguous()
            block = impl_all.fn(docs, q, q_lens, block_lens, **kw).transpose(0, 1)
            best = _merge_top_k(best, block, start, k)
    values, indices = best
    if torch.is_grad_enabled() and (q.requires_grad or d.requires_grad):
        # Differentiable values: the chosen pairs again, through the pair op (k per query).
        q_idx = torch.arange(q.shape[0], device=q.device).repeat_interleave(k)
        impl_pairs = pairs_backend()
        values = impl_pairs.fn(d, q, q_lens, d_lens, indices.reshape(-1), q_idx, **kw).reshape(q.shape[0], k)
    return values, indices


def maxsim(q, d, q_lens=None, d_lens=None, *, pairs=None, k=None, doc_block=None,
           backend="auto"):
    """ColBERT late interaction: score(q_a, d_b) = sum over the real query tokens t of
    max over the real document tokens u of q_a[t] . d_b[u] (no normalisation: ColBERT's
    encoders normalise). q (n_q, Lq, dim), d (n_d, Ld, dim); q_lens (n_q,) / d_lens (n_d,)
    the real lengths (default: all tokens); padding may hold NaN.

    - default: all pairs -> (n_q, n_d);
    - pairs=(q_idx, d_idx): the listed pairs -> (P,) (re-ranking a shortlist);
    - k=int: the k best documents per query -> (values (n_q, k), indices (n_q, k) int64), in
      decreasing score, ties by the lower document index, scored over blocks of doc_block
      documents (default: about TOPK_BLOCK_PAIRS pairs per block) so that memory stays
      O(n_q x (k + doc_block)). Differentiable values are recomputed for the chosen pairs.
    Scores are float32 (float64 for float64 inputs), differentiable w.r.t. q and d.
    """
    validate.choice(backend, "backend", dispatch.REQUESTABLE)
    if pairs is not None and k is not None:
        raise ValueError("pass pairs (score a shortlist) or k (top-k search), not both")
    if doc_block is not None and k is None:
        raise ValueError("doc_block applies to the top-k search: pass k as well, or drop doc_block")
    q_lens, d_lens = validate.head_inputs(d, q, q_lens, d_lens, validate.MAXSIM_ARGUMENTS)
    n_q, n_d = q.shape[0], d.shape[0]
    kw = _backend_keywords(_COLBERT)
    inputs = Inputs.of_scan(d, q, "t2i", q_lens)
    d, q = d.contiguous(), q.contiguous()
    if pairs is not None:
        q_idx, d_idx = _pair_list(pairs, n_q, n_d, q.device)
        return dispatch.choose("maxsim_pairs", backend, inputs).fn(d, q, q_lens, d_lens, d_idx, q_idx, **kw)
    impl = dispatch.choose("maxsim", backend, inputs)
    if k is None:
        return impl.fn(d, q, q_lens, d_lens, **kw).transpose(0, 1).contiguous()
    k = validate.positive_int(k, "k", n_d, "n_d")
    doc_block = (max(1, min(n_d, TOPK_BLOCK_PAIRS // n_q)) if doc_block is None
                 else validate.positive_int(doc_block, "doc_block"))
    return _top_k(impl, lambda: dispatch.choose("maxsim_pairs", backend, inputs), q, d, q_lens, d_lens, k, doc_block, kw)



# ---------------------------------------------------------------------------------------------
# The head registry's entry (rcar_fast.scorers): model="maxsim" or a preset name
# ---------------------------------------------------------------------------------------------

class MaxsimScorer(Scorer):
    """The S-only heads as a head of the registry: a keyword head (no weights) named "maxsim"
    (the keywords of max_similarity) or by a preset ("chan", "laps", ...: model="chan" is
    model="maxsim", preset="chan"), the ops "maxsim" and "maxsim_pairs". Every region of an
    image is real here (img_lens = R): the consumers pass (img, cap, lens)."""
    name, title = "maxsim", "MaxSim"
    all_pairs_op, pairs_op = "maxsim", "maxsim_pairs"
    defaults = dict(DEFAULTS, preset=None)
    aliases = {preset: {"preset": preset} for preset in HEAD_PRESETS}

    @classmethod
    def settings(cls, model, kwargs, img, check: bool = True) -> dict:
        unknown = set(kwargs) - set(cls.defaults)
        if unknown:
            raise TypeError(f"unexpected {cls.title} keyword(s) {sorted(unknown)}; expected some "
                            f"of {sorted(cls.defaults)}")
        given = dict(kwargs)
        preset = given.pop("preset", None)
        named = cls.aliases.get(model, {}).get("preset")
        if named is not None and preset not in (None, named):
            raise ValueError(f"model={model!r} is preset={named!r}, but preset={preset!r} was passed")
        preset = preset or named
        settings = validate.head_settings(preset, given, DEFAULTS)
        return dict(settings, preset=preset)

    @classmethod
    def choose(cls, op, backend, inputs, model, settings):
        return _backend_for(op, backend, inputs, settings["coding"])

    @classmethod
    def inputs(cls, model, settings, img, cap, lens) -> Inputs:
        return Inputs.of_scan(img, cap, settings["direction"], lens)

    @staticmethod
    def _all_regions(img):
        return torch.full((img.shape[0],), img.shape[1], dtype=torch.int64, device=img.device)

    @classmethod
    def call_all_pairs(cls, impl, model, settings, img, cap, lens):
        img_lens = cls._all_regions(img)
        img, cap = _prepared(img, cap, lens, img_lens, settings)
        return impl.fn(img, cap, lens, img_lens, **_backend_keywords(settings))

    @classmethod
    def call_pairs(cls, impl, model, settings, img, cap, lens, img_idx, cap_idx):
        img_lens = cls._all_regions(img)
        img, cap = _prepared(img, cap, lens, img_lens, settings)
        return impl.fn(img, cap, lens, img_lens, img_idx, cap_idx, **_backend_keywords(settings))

    @staticmethod
    def _pair_flops(L: int, R: int, d: int, settings: dict) -> float:
        # The tile 2 R L d, then per direction a max over the tile (R L) and the pool (~4 per
        # pooled value: exp, add, scale, compare); "both" reads the one tile twice.
        directions = 2 if settings["direction"] == "both" else 1
        pooled = {"t2i": L, "i2t": R, "both": L + R}[settings["direction"]]
        return 2.0 * R * L * d + directions * R * L + 4.0 * pooled

    @classmethod
    def forward_flops(cls, model, settings, n_img, lens, regions, d) -> float:
        lens = [int(v) for v in lens]
        norms = 3.0 * d * (n_img * regions + sum(lens)) if settings["normalize"] == "unit" else 0.0
        return n_img * sum(cls._pair_flops(L, regions, d, settings) for L in lens) + norms

    @classmethod
    def pair_flops(cls, model, settings, pair_lens, regions, d) -> float:
        # Normalisation counted per pair (its R + L vectors, 3 d each).
        unit = 3.0 * d if settings["normalize"] == "unit" else 0.0
        return sum(cls._pair_flops(int(L), regions, d, settings) + unit * (regions + int(L))
                   for L in pair_lens)

    @classmethod
    def build(cls, name, embed_dim, options):
        """This head (no weights) with the options named like max_similarity's keywords."""
        settings = {k: v for k, v in options.items() if k in cls.defaults and v is not None}
        return name, settings

    @classmethod
    def vectorized_reference(cls, model, settings):
        kw = dict(_backend_keywords(settings), normalize=settings["normalize"])
        return lambda img, cap, lens: max_similarity_reference(img, cap, lens, **kw)

    @classmethod
    def label(cls, model, settings) -> str:
        name = settings["preset"].upper() if settings.get("preset") else cls.title
        return f"{name} {settings['direction']}"

    @classmethod
    def describe(cls, model, settings) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "preset")
        return f"{cls.label(model, settings)}({shown})"
