"""FLOP models: the work an op needs, the same number for every backend.

Each head's scorer (rcar_fast.ops.scorer.Scorer.forward_flops / pair_flops) reads its model
from here, or keeps it beside its op (a new head's entry); bench/flops.py re-exports these
names for the benchmarks.

TFLOP/s in the results is model FLOPs / measured time, so backends are compared on the same
work (like FlashAttention's 4 N^2 d for attention), not on what each happens to execute.
A multiply-add counts 2. Lengths are ragged: sums run over the real words of each caption.

SCAN, one pair with Q queries and C context items (t2i: Q = L words, C = R regions; i2t:
Q = R, C = L), in the Gram form a fused kernel uses (SIMILARITY.md):
    raw scores s = context . query          2 Q C d
    normalisation + softmax (elementwise)  10 Q C      (leaky, square, sum, rsqrt, scale, exp, sum, div)
    q . ctx  = sum_c alpha s                2 Q C
    |ctx|^2  = alpha^T G alpha              2 Q C^2 + 2 Q C
    cosine, aggregation                     6 Q
  plus, once per context item (not per pair), its C x C Gram matrix 2 C^2 d, and once per
  query item its norms 2 Q d. The reference computes the attended vectors explicitly
  (another 2 Q C d), which the model does not credit: it is work a better algorithm avoids.

RCAR head, one pair (d = embed_dim, s = sim_dim), per alignment step:
    raw scores (with the modulation m)      2 Q C d (+ Q d for q * m after the first RCR)
    normalisation + softmax                10 Q C
    attended context ctx = alpha @ context  2 Q C d   (needed: (q - ctx)^2 is d-dimensional)
    l2norm(ctx), (q - ctx)^2               5 Q d
    alignment vector W: Linear(d, s)        2 Q d s, l2norm 3 Q s
  per RCR update: rcr_matrix_w  2 Q s (2s) + 2 Q (2s) d, tanh + add + clamp 3 Q d;
                  rcr_smooth_w  2 Q s (s/2) + 2 Q (s/2), relu 2 Q
  per RAR update: rar_k_w 2 Q s^2, rar_q_w 2 s^2, product + rar_v_w 3 Q s, softmax 3 Q,
                  weighted sum 2 Q s, l2norm 3 s
  initial mean 2 Q s (only_rar, coop_rcar); final sim_eval_w 2 s;
  only_rcr's final cross attention + cosine: 2 Q C d + 10 Q C + 2 Q C d + 6 Q d.
At the published setting (coop_rcar, 2 steps, d = 1024, s = 256, R = 36, L = 12) this gives
about 36 MFLOP per pair (tests/test_bench_quick.py checks the formula against that).

Backward is counted as 2x the forward and a training step (forward + backward) as 3x, the
usual convention for matmul-dominated ops.

GEMM FLOPs (``gemm_only=True``): only the matrix products of each query row contracted over
d or s, the work a matrix unit does (bench/cpu_quick.py reports its rate against the
machine's GEMM rate). SCAN: the raw scores 2 Q C d, nothing else (its Gram matrices are per
context item, not per row). RCAR: per alignment step the raw scores, the attended context and
W (2 Q C d + 2 Q C d + 2 Q d s), per RCR update rcr_matrix_w and rcr_smooth_w, per RAR update
rar_k_w (2 Q s^2); only_rcr's final cross attention 2 Q C d + 2 Q C d.
"""
from __future__ import annotations

from typing import Iterable

MODE_FACTOR = {"forward": 1.0, "backward": 2.0, "train_step": 3.0}


def _scan_pair(Q: int, C: int, d: int, gemm_only: bool = False) -> float:
    gemm = 2.0 * Q * C * d
    if gemm_only:
        return gemm
    return gemm + 10.0 * Q * C + 2.0 * Q * C + 2.0 * Q * C * C + 2.0 * Q * C + 6.0 * Q


def scan_forward(n_img: int, lens: Iterable[int], R: int, d: int, direction: str,
                 gemm_only: bool = False) -> float:
    """Model FLOPs of SCAN over all n_img x len(lens) pairs (GEMM FLOPs with gemm_only)."""
    lens = [int(v) for v in lens]
    if direction == "t2i":
        per_pairs = n_img * sum(_scan_pair(L, R, d, gemm_only) for L in lens)
        gram = n_img * 2.0 * R * R * d                # one R x R Gram per image
        norms = sum(2.0 * L * d for L in lens)        # word norms once per caption
    else:
        per_pairs = n_img * sum(_scan_pair(R, L, d, gemm_only) for L in lens)
        gram = sum(2.0 * L * L * d for L in lens)     # one L x L Gram per caption
        norms = n_img * 2.0 * R * d
    return per_pairs if gemm_only else per_pairs + gram + norms


def scan_pairs_forward(pair_lens: Iterable[int], R: int, d: int, direction: str) -> float:
    """Model FLOPs of SCAN over an explicit pair list (Gram and norms counted per pair)."""
    total = 0.0
    for L in pair_lens:
        Q, C = (int(L), R) if direction == "t2i" else (R, int(L))
        total += _scan_pair(Q, C, d) + 2.0 * C * C * d + 2.0 * Q * d
    return total


# Each term below is its GEMM FLOPs plus the rest; with gemm_only the rest is left out. The
# terms are whole numbers far below 2**53, so the sums are exact in any grouping.

def _alignment_step(Q, C, d, s, modulated: bool, gemm_only: bool = False) -> float:
    gemm = 2.0 * Q * C * d + 2.0 * Q * C * d + 2.0 * Q * d * s
    if gemm_only:
        return gemm
    return gemm + 10.0 * Q * C + 5.0 * Q * d + 3.0 * Q * s + (Q * d if modulated else 0.0)


def _rcr(Q, d, s, gemm_only: bool = False) -> float:
    gemm = 2.0 * Q * s * 2 * s + 2.0 * Q * 2 * s * d + 2.0 * Q * s * (s // 2) + 2.0 * Q * (s // 2)
    return gemm if gemm_only else gemm + 3.0 * Q * d + 2.0 * Q


def _rar(Q, s, gemm_only: bool = False) -> float:
    gemm = 2.0 * Q * s * s
    return gemm if gemm_only else gemm + 2.0 * s * s + 3.0 * Q * s + 3.0 * Q + 2.0 * Q * s + 3.0 * s


def rcar_pair(Q: int, C: int, d: int, s: int, regulator: str, steps: int,
              gemm_only: bool = False) -> float:
    """Model FLOPs of the RCAR head for one pair (Q queries, C context items); GEMM FLOPs
    with gemm_only."""
    g = gemm_only
    other = 0.0 if g else 1.0         # scales the terms that are not matrix products
    if regulator == "only_rar":
        return (_alignment_step(Q, C, d, s, False, g) + other * 2.0 * Q * s
                + steps * _rar(Q, s, g) + other * 2.0 * s)
    if regulator == "only_rcr":
        flops = sum(_alignment_step(Q, C, d, s, t > 0, g) + _rcr(Q, d, s, g) for t in range(steps))
        final_gemm = 2.0 * Q * C * d + 2.0 * Q * C * d
        return flops + final_gemm + other * (10.0 * Q * C + 6.0 * Q * d + (Q * d if steps else 0))
    if regulator == "coop_rcar":
        flops = other * (2.0 * Q * s + 2.0 * s)
        for t in range(steps):
            flops += _alignment_step(Q, C, d, s, t > 0, g) + _rar(Q, s, g)
            if t < steps - 1:
                flops += _rcr(Q, d, s, g)
        return flops
    raise ValueError(f"unknown regulator {regulator!r}")


def rcar_forward(n_img: int, lens: Iterable[int], R: int, d: int, s: int, regulator: str,
                 steps: int, direction: str, gemm_only: bool = False) -> float:
    """Model FLOPs of the RCAR head over all n_img x len(lens) pairs (GEMM FLOPs with
    gemm_only)."""
    lens = [int(v) for v in lens]
    if direction == "t2i":
        return n_img * sum(rcar_pair(L, R, d, s, regulator, steps, gemm_only) for L in lens)
    return n_img * sum(rcar_pair(R, L, d, s, regulator, steps, gemm_only) for L in lens)


def rcar_pairs_forward(pair_lens: Iterable[int], R: int, d: int, s: int, regulator: str,
                       steps: int, direction: str) -> float:
    return sum(rcar_pair(int(L), R, d, s, regulator, steps) if direction == "t2i"
               else rcar_pair(R, int(L), d, s, regulator, steps) for L in pair_lens)
