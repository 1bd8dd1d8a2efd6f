"""rcar_fast: fused all-pairs fine-grained image-text similarity (SCAN, RCAR).

Public names:
    scan_similarity(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda, backend)
    max_similarity(img, cap, lens, *, direction, pool, tau, leaky, normalize, both_scale,
                   img_lens, preset, coding, backend)   the S-only heads (CHAN, LAPS, ALADIN, ...)
    maxsim(q, d, q_lens, d_lens, *, pairs, k, doc_block, backend)   ColBERT late interaction
    RCARSimilarity(embed_dim, sim_dim, regulator, steps, direction, smooth)  (nn.Module)
    score_pairs / hardest_negative_loss   chosen (image, caption) pairs; the sparse VSE++ loss
    all_pairs(img, cap, lens, similarity)  blocked, multi-GPU all-pairs scoring for evaluation
    recall_metrics / coco1k_metrics / ensemble   retrieval metrics (R@1/5/10, rsum)
    load_rcar_checkpoint(path)             an official RCAR checkpoint as a model
    vse_hinge_loss / info_nce_loss         losses on a (B, B) similarity matrix
    gram(x, backend)            per-image Gram matrix (the plumbing op)
    backends()                  which backends run here, and why the others do not
"""
from rcar_fast.dispatch import BackendUnavailable, backends
from rcar_fast.ops.gram import gram
from rcar_fast.ops.maxsim import max_similarity, maxsim
from rcar_fast.ops.scan import scan_similarity
from rcar_fast.losses import hardest_negative_loss
from rcar_fast.pairs import score_pairs

__version__ = "0.1.0"

_LAZY = {
    "RCARSimilarity": ("rcar_fast.modules", "RCARSimilarity"),
    "recall_metrics": ("rcar_fast.metrics", "recall_metrics"),
    "coco1k_metrics": ("rcar_fast.metrics", "coco1k_metrics"),
    "ensemble": ("rcar_fast.metrics", "ensemble"),
    "all_pairs": ("rcar_fast.evaluation", "all_pairs"),
    "load_rcar_checkpoint": ("rcar_fast.checkpoint", "load_rcar_checkpoint"),
    "attention_maps": ("rcar_fast.attention", "attention_maps"),
    "vse_hinge_loss": ("rcar_fast.losses", "vse_hinge_loss"),
    "info_nce_loss": ("rcar_fast.losses", "info_nce_loss"),
    "data": ("rcar_fast.data", None),
    "evaluation": ("rcar_fast.evaluation", None),
    "metrics": ("rcar_fast.metrics", None),
    "losses": ("rcar_fast.losses", None),
}


def __getattr__(name):
    # Heavier submodules load on first use so `import rcar_fast` stays cheap.
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'rcar_fast' has no attribute {name!r}")


__all__ = ["scan_similarity", "max_similarity", "maxsim", "RCARSimilarity", "gram", "backends", "BackendUnavailable",
           "score_pairs", "hardest_negative_loss", "all_pairs", "recall_metrics", "coco1k_metrics",
           "ensemble", "load_rcar_checkpoint", "vse_hinge_loss", "info_nce_loss", "data",
           "evaluation", "metrics", "losses", "attention_maps"]
