"""Similarity callables: what ``all_pairs`` calls on every tile.

Every similarity becomes ``fn(img (bi, R, d), cap (bc, L, d), lens (bc,)) -> (bi, bc)``:
SCAN through the scan op on any backend, an RCAR head (fused ``RCARSimilarity`` or the
reference ``RCARHead``), or a callable given as is.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from rcar_fast.ops.scan import scan_similarity

SimilarityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def scan_fn(backend: str = "auto", **scan_kwargs) -> SimilarityFn:
    """fn(img, cap, lens) -> SCAN similarities through ``rcar_fast.scan_similarity``."""

    def fn(img, cap, lens):
        with torch.no_grad():
            return scan_similarity(img, cap, lens, backend=backend, **scan_kwargs)

    fn.description = f"SCAN({', '.join(f'{k}={v}' for k, v in scan_kwargs.items())}) [{backend}]"
    return fn


def rcar_fn(head: torch.nn.Module, backend: str = "auto") -> SimilarityFn:
    """fn(img, cap, lens) -> RCAR head similarities. ``RCARSimilarity`` heads run on
    ``backend``; a plain reference ``RCARHead`` runs its vectorised form ("reference" /
    "auto") or its per-caption loop ("reference_loop")."""
    takes_backend = hasattr(head, "forward") and "backend" in _parameters(head.forward)

    def fn(img, cap, lens):
        if head.training:
            raise ValueError("the RCAR head is in training mode (RAR dropout would make the "
                             "scores random); call head.eval() before evaluating")
        with torch.no_grad():
            if takes_backend:
                return head(img, cap, lens, backend=backend)
            if backend == "reference_loop":
                return head.forward_loop(img, cap, lens)
            if backend not in ("auto", "reference"):
                raise ValueError(f"a plain RCARHead runs on 'reference' or 'reference_loop', "
                                 f"not {backend!r}; use rcar_fast.RCARSimilarity for fused backends")
            return head.forward_vectorized(img, cap, lens)

    fn.description = f"RCAR({getattr(head, 'regulator', '?')}, {getattr(head, 'direction', '?')}) [{backend}]"
    return fn


def _parameters(fn) -> tuple:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def as_similarity_fn(similarity, backend: str = "auto") -> SimilarityFn:
    """"scan" (default SCAN t2i settings), an RCAR head module, or a callable."""
    if isinstance(similarity, str):
        if similarity != "scan":
            raise ValueError(f"similarity must be 'scan', an RCAR head or a callable, got {similarity!r}")
        return scan_fn(backend)
    if isinstance(similarity, torch.nn.Module) and hasattr(similarity, "sim_eval_w"):
        return rcar_fn(similarity, backend)
    if callable(similarity):
        return similarity
    raise TypeError(f"similarity must be 'scan', an RCAR head or a callable "
                    f"fn(img, cap, lens) -> (n_img, n_cap), got {type(similarity).__name__}")
