"""Streamed all-pairs similarity for retrieval evaluation (the public names only).

``all_pairs`` scores every (image, caption) pair of a test split in image-block x
caption-block tiles through a similarity callable (SCAN on any backend, an RCAR head, or
any ``fn(img (bi, R, d), cap (bc, L, d), lens (bc,)) -> (bi, bc)``), and writes the tiles
into one ``(n_img, n_cap)`` matrix: a tensor in memory or a ``.npy`` file written through a
memory map (to a temporary name first, renamed only when complete, so a failure never
leaves a half-written file behind). ``all_pairs_topk`` keeps only the best k captions per
image and the best k images per caption (exact; ties go to the lower index).

Distributed: when ``torch.distributed`` is initialised with more than one process
(``torchrun``; gloo on CPU, NCCL on GPUs), the image rows are split into one contiguous
shard per rank, every rank scores its shard against all captions, and the results are
gathered (top-k: merged) on rank 0, which returns them; the other ranks return None.

Modules, one job each (lower ones never import higher ones):
    adapters      similarity callables: head_fn (any head of rcar_fast.scorers), scan_fn,
                  rcar_fn, as_similarity_fn
    inputs        argument checks before any work (lens: rcar_fast.validate), the device
    distributed   rank / world, shard_rows, gathering to rank 0
    streaming     the tile loop: device blocks, image cache, length-sorted caption blocks,
                  progress bar, the non-finite check, run timing (IMAGE_CACHE_BYTES)
    matrix        all_pairs: the full matrix in memory, in ``out`` or in a .npy file
    topk          all_pairs_topk, TopK, recall_from_topk
    protocols     PROTOCOLS, evaluate_protocol, protocols_for_size, coco1k_fold_size
    results       save_results / load_results (RESULT_FORMATS)
"""
from rcar_fast.evaluation.adapters import (SimilarityFn, as_similarity_fn, head_fn, rcar_fn,
                                           scan_fn)
from rcar_fast.evaluation.distributed import shard_rows
from rcar_fast.evaluation.inputs import ArrayLike, resolve_device
from rcar_fast.evaluation.matrix import all_pairs
from rcar_fast.evaluation.protocols import (PROTOCOLS, coco1k_fold_size, evaluate_protocol,
                                            protocols_for_size)
from rcar_fast.evaluation.results import RESULT_FORMATS, load_results, save_results
from rcar_fast.evaluation.topk import TopK, all_pairs_topk, recall_from_topk

__all__ = [
    "PROTOCOLS",
    "TopK",
    "all_pairs",
    "all_pairs_topk",
    "head_fn",
    "scan_fn",
    "rcar_fn",
    "as_similarity_fn",
    "evaluate_protocol",
    "protocols_for_size",
    "coco1k_fold_size",
    "load_results",
    "save_results",
    "RESULT_FORMATS",
    "recall_from_topk",
    "shard_rows",
    "resolve_device",
    "SimilarityFn",
    "ArrayLike",
]
