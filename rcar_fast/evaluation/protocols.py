"""The published evaluation protocols: which images a similarity matrix is scored over and
how (COCO 5K, COCO 1K folds, Flickr30K 1K, or every image of a split of any size).
"""
from __future__ import annotations

from typing import Optional

from rcar_fast import metrics as _metrics

# Test-set shapes: number of images (captions are 5 per image); "all": every image of a split
# of any size (what the public evalrank does with fold5=False).
PROTOCOLS = {"coco5k": 5000, "coco1k": 5000, "f30k": 1000, "all": None}


def evaluate_protocol(sims, protocol: str, captions_per_image: int = 5, strict: bool = True,
                      fold_size: Optional[int] = None, return_folds: bool = False):
    """Metrics of one published protocol: "coco5k" (all 5000 images), "coco1k" (5 folds of
    1000 averaged) or "f30k" (1000 images). With strict=True the matrix must have the
    protocol's size; strict=False evaluates any size (coco1k: folds of ``fold_size`` images,
    by default 1000, or a fifth of the images when they are not a multiple of 1000).
    ``return_folds`` (coco1k only): returns (mean, [metrics of each fold])."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    n_img = sims.shape[0]
    if protocol == "all":
        return _metrics.recall_metrics(sims, captions_per_image)
    if strict and n_img != PROTOCOLS[protocol]:
        raise ValueError(f"protocol {protocol!r} expects {PROTOCOLS[protocol]} images and "
                         f"{captions_per_image * PROTOCOLS[protocol]} captions, got a similarity "
                         f"matrix of shape {tuple(sims.shape)}")
    if protocol == "coco1k":
        if fold_size is None:
            fold_size = coco1k_fold_size(n_img, strict)
        return _metrics.coco1k_metrics(sims, captions_per_image, fold_size=fold_size,
                                       return_folds=return_folds)
    return _metrics.recall_metrics(sims, captions_per_image)


def coco1k_fold_size(n_img: int, strict: bool = True) -> int:
    """Images per fold of the 1K protocol: 1000, or (strict=False, a size that is not a
    multiple of 1000) a fifth of the images."""
    return 1000 if strict or n_img % 1000 == 0 or n_img % 5 else n_img // 5


def protocols_for_size(n_img: int) -> list:
    """The protocols a split of ``n_img`` images is evaluated with when none is named:
    COCO 5K test (5000 images): coco5k and its 1K folds (coco1k); 1000 images (Flickr30K
    test, COCO 1K): f30k; any other size: all images at once ("all")."""
    if n_img == PROTOCOLS["coco5k"]:
        return ["coco5k", "coco1k"]
    if n_img == PROTOCOLS["f30k"]:
        return ["f30k"]
    return ["all"]
