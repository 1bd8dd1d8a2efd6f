"""Similarity callables: what ``all_pairs`` calls on every tile.

Every similarity becomes ``fn(img (bi, R, d), cap (bc, L, d), lens (bc,)) -> (bi, bc)``:
a head of the registry (rcar_fast.scorers: a head name such as "scan" or a preset with its
keywords, or a head module such as an RCAR head, fused ``RCARSimilarity`` or the reference
``RCARHead``) through rcar_fast.pairs.all_pairs_scores on any backend, or a callable given
as is.
"""
from __future__ import annotations

from typing import Callable

import torch

from rcar_fast import pairs, scorers

SimilarityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def head_fn(model, backend: str = "auto", **head_kwargs) -> SimilarityFn:
    """fn(img, cap, lens) -> the head's similarities (no autograd) on ``backend``. model and
    keywords as in rcar_fast.score_pairs; checked here, before any tile is scored. A head
    module in training mode is refused when called (dropout would make the scores random)."""
    head = scorers.scoring(model, head_kwargs)

    def fn(img, cap, lens):
        if head.module is not None and head.module.training:
            raise ValueError(f"the {head.scorer.title} head is in training mode (its dropout "
                             "would make the scores random); call head.eval() before evaluating")
        with torch.no_grad():
            return pairs.all_pairs_scores(img, cap, lens, model=model, backend=backend,
                                          **head_kwargs)

    fn.description = f"{head.describe()} [{backend}]"
    return fn


def scan_fn(backend: str = "auto", **scan_kwargs) -> SimilarityFn:
    """fn(img, cap, lens) -> SCAN similarities (the keywords of rcar_fast.scan_similarity)."""
    return head_fn("scan", backend, **scan_kwargs)


def rcar_fn(head: torch.nn.Module, backend: str = "auto") -> SimilarityFn:
    """fn(img, cap, lens) -> the similarities of a head module (an RCAR head: fused
    ``RCARSimilarity`` or a plain reference ``RCARHead``, any backend of the "rcar" op)."""
    return head_fn(head, backend)


def as_similarity_fn(similarity, backend: str = "auto") -> SimilarityFn:
    """A head name ("scan": the default SCAN t2i settings; a preset), a head module, or a
    callable fn(img, cap, lens) -> (n_img, n_cap)."""
    expected = (f"similarity must be 'scan', another head name of {scorers.names(keyword_only=True)}, "
                "a head module or a callable fn(img, cap, lens) -> (n_img, n_cap), got ")
    if isinstance(similarity, str):
        if similarity not in scorers.names(keyword_only=True):
            raise ValueError(expected + repr(similarity))
        return head_fn(similarity, backend)
    if isinstance(similarity, torch.nn.Module) and scorers.of_module(similarity) is not None:
        return head_fn(similarity, backend)
    if callable(similarity):
        return similarity
    raise TypeError(expected + type(similarity).__name__)
