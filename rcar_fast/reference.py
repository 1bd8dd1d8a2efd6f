"""The float64-faithful reference, in one namespace: SCAN and RCAR similarity exactly as
SIMILARITY.md (at the repository root) defines them. Tests, benchmarks and scripts check every
kernel against these names; the package itself imports the part it needs directly:

* rcar_fast.reference_math: the math (norms, attention, aggregation, the SCAN and RCAR pair
  functions, the loop and vectorised pair drivers) and the contract's option tuples;
* rcar_fast.heads: the RCAR head's parameter tree (official names), RCARHead;
* rcar_fast.checkpoint_keys: the official checkpoint's key layout.
"""
from rcar_fast.checkpoint_keys import count_official_modules, extract_sim_enc_state
from rcar_fast.heads import (AggregationRegulator, AlignmentVector, CorrespondenceRegulator,
                             RCARHead, module_counts)
from rcar_fast.reference_math import (AGGREGATIONS, BLOCK_BYTES, DIRECTIONS, EPS, RAW_NORMS,
                                      REGULATORS, aggregate, attend, attention_weights, cosine,
                                      cross_attention, default_chunks, l1norm, l2norm, leaky,
                                      masked_mean, normalize_raw_scores, pairs_loop,
                                      pairs_vectorized, raw_scores, rcar_pair_scores,
                                      rcar_similarity_loop, rcar_similarity_vectorized,
                                      scan_pair_fn, scan_similarity_loop,
                                      scan_similarity_vectorized)

__all__ = ["EPS", "RAW_NORMS", "AGGREGATIONS", "DIRECTIONS", "REGULATORS", "BLOCK_BYTES",
           "l2norm", "l1norm", "cosine", "leaky", "raw_scores", "normalize_raw_scores",
           "attention_weights", "attend", "cross_attention", "aggregate", "masked_mean",
           "default_chunks", "pairs_loop", "pairs_vectorized", "scan_pair_fn",
           "scan_similarity_loop", "scan_similarity_vectorized", "rcar_pair_scores",
           "rcar_similarity_loop", "rcar_similarity_vectorized", "module_counts",
           "AggregationRegulator", "CorrespondenceRegulator", "AlignmentVector", "RCARHead",
           "extract_sim_enc_state", "count_official_modules"]
