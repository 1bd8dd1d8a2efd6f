"""rcar_fast: fused all-pairs fine-grained image-text similarity (SCAN, RCAR).

Public names:
    scan_similarity(img, cap, lens, *, direction, raw_norm, smooth, agg, lse_lambda, backend)
    RCARSimilarity(embed_dim, sim_dim, regulator, steps, direction, smooth)  (nn.Module)
    gram(x, backend)            per-image Gram matrix (the plumbing op)
    backends()                  which backends run here, and why the others do not
"""
from rcar_fast.dispatch import BackendUnavailable, backends
from rcar_fast.ops.gram import gram
from rcar_fast.ops.scan import scan_similarity

__version__ = "0.1.0"

_LAZY = {
    "RCARSimilarity": ("rcar_fast.modules", "RCARSimilarity"),
    "recall_metrics": ("rcar_fast.metrics", "recall_metrics"),
    "data": ("rcar_fast.data", None),
}


def __getattr__(name):
    # Heavier submodules load on first use so `import rcar_fast` stays cheap.
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'rcar_fast' has no attribute {name!r}")


__all__ = ["scan_similarity", "RCARSimilarity", "gram", "backends", "BackendUnavailable",
           "recall_metrics", "data"]
