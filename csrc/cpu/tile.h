// The region-word score tile, the one primitive every similarity head on the CPU starts from:
// one GEMM gives the raw scores s = query . context of a block of query rows against a block
// of context vectors, and the contract's raw-score normalisation reduces them over the query
// axis of each pair. The heads (scan.cpp, rcar.cpp) are epilogues on this tile.
//
// Every function is always_inline (the SIMD ones run inside each head's AVX2 / baseline clone).
#pragma once
#include "cpu/tile_common.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cmath>

// Vectors never cross a call boundary here either (see simd.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rcar_cpu::detail {

// out (rows x ld, row-major) = queries (rows x d) @ context (C x d)^T, columns [C, ld) zero
// (ld > C pads rows to whole SIMD vectors). Single-threaded inside the tile team.
template <typename T>
RCAR_INLINE void score_tile(const T* queries, int64_t rows, const T* context, int64_t C, int64_t d, T* out,
                            int64_t ld) {
  matmul_into(view2d(out, rows, C, ld), view2d(queries, rows, d, d), view2d(context, C, d, d).t(), false);
  if (ld > C)
    for (int64_t r = 0; r < rows; ++r) std::fill(out + r * ld + C, out + (r + 1) * ld, T(0));
}

// The l2 (L2) or l1 norm over rows [r0, r1) of leaky(s) (slope 1: the identity) for each of
// the first n columns (default: all ld) of a (rows x ld) score tile: out[c] = the norm of column
// c over the pair's query rows. Whole vectors, then a scalar tail for n not a multiple of them.
template <typename T, bool L2>
RCAR_INLINE void query_axis_norms(const T* s, int64_t r0, int64_t r1, int64_t ld, T slope, T* out,
                                  int64_t n = -1) {
  constexpr int64_t W = simd::kWidth<T>;
  if (n < 0) n = ld;
  int64_t v = 0;
  for (; v + W <= n; v += W) {
    simd::Vec<T> acc = simd::splat<T>(T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const simd::Vec<T> x = simd::leak<T>(simd::load(s + r * ld + v), slope);
      acc += L2 ? x * x : simd::vmax<T>(x, -x);
    }
    simd::store(out + v, acc);
  }
  for (; v < n; ++v) {
    T acc = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const T x = s[r * ld + v] > 0 ? s[r * ld + v] : s[r * ld + v] * slope;
      acc += L2 ? x * x : std::abs(x);
    }
    out[v] = acc;
  }
  if (L2)
    for (int64_t c = 0; c < n; ++c) out[c] = std::sqrt(out[c]);
}

// inv[c] = 1 / (norm[c] + eps): the contract's l2norm / l1norm divisor, inverted once per column.
template <typename T>
RCAR_INLINE void inverse_norms(const T* norm, int64_t n, T* inv) {
  for (int64_t c = 0; c < n; ++c) inv[c] = T(1) / (norm[c] + T(kEps));
}

}  // namespace rcar_cpu::detail

#pragma GCC diagnostic pop
