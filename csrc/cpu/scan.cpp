// SCAN all-pairs similarity on the CPU, forward and backward, with the Gram identity
// (SIMILARITY.md): per tile of (caption block x image block) one GEMM gives every raw score
// s = word . region of the tile; the per-pair reductions (normalisation over the query axis,
// softmax over the context, alpha.s, alpha^T G alpha, cosine, aggregation) then run on that
// tile. No d-dimensional attended vector is ever formed; memory is O(threads x tile).
//
// Layout of a tile: rows = the real words of a caption block (packed, no padding), columns =
// the regions of an image block. Pair (i, j) is the (lens[j] x R) sub-block. Each pair is
// copied into a small scratch with the queries as rows (t2i: as is; i2t: transposed) and the
// context padded to whole SIMD vectors, so that one vectorised pair kernel serves both
// directions.
#include "cpu/bind.h"
#include "cpu/tile.h"

#include <limits>

// Every function passing a 32-byte vector is always_inline: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rcar_cpu {

// A SCAN problem's options, as the codes of rcar_fast.contract (csrc/contract.h); built from the
// option names by rcar_fast.ops.scan_cpu.native_settings.
struct ScanSettings {
  int direction;    // rcar_contract::Direction
  int raw_norm;     // rcar_contract::RawNorm
  int agg;          // rcar_contract::Aggregation
  double smooth;    // the attention softmax temperature, > 0
  double lse_lambda;  // lse aggregation temperature, > 0
};

}  // namespace rcar_cpu

namespace rcar_cpu {
namespace {
using namespace detail;

enum NormKind : int { kNormL2 = 0, kNormL1 = 1, kNormNone = 2, kNormSoftmax = 3 };

struct ScanOptions {
  bool t2i = true;
  int norm = kNormL2;
  double slope = kLeakySlope;  // leaky slope for the clipped_* norms; 1 (identity) for the others
  double smooth = 9.0;
  int agg = rcar_contract::kMean;  // rcar_contract::Aggregation
  double lse_lambda = 6.0;
};

// The kernel's options from the contract's codes: the raw norm splits into the leaky slope
// (the clipped_* norms) and the norm it then applies.
ScanOptions parse_options(const ScanSettings& s) {
  using namespace rcar_contract;
  TORCH_CHECK(s.direction == kT2I || s.direction == kI2T, "scan (cpu): direction must be a Direction code in [0, ",
              kDirectionCount, "), got ", s.direction);
  TORCH_CHECK(s.raw_norm >= 0 && s.raw_norm < kRawNormCount, "scan (cpu): raw_norm must be a RawNorm code in [0, ",
              kRawNormCount, "), got ", s.raw_norm);
  TORCH_CHECK(s.agg >= 0 && s.agg < kAggregationCount, "scan (cpu): agg must be an Aggregation code in [0, ",
              kAggregationCount, "), got ", s.agg);
  TORCH_CHECK(s.smooth > 0, "scan (cpu): smooth must be positive, got ", s.smooth);
  TORCH_CHECK(s.lse_lambda > 0, "scan (cpu): lse_lambda must be positive, got ", s.lse_lambda);
  ScanOptions o;
  o.t2i = s.direction == kT2I;
  const bool clipped = s.raw_norm == kClippedL2 || s.raw_norm == kClippedL1 || s.raw_norm == kClipped;
  o.slope = clipped ? kLeakySlope : 1.0;
  switch (s.raw_norm) {
    case kClippedL2: case kL2: o.norm = kNormL2; break;
    case kClippedL1: case kL1: o.norm = kNormL1; break;
    case kClipped: case kNoNorm: o.norm = kNormNone; break;
    default: o.norm = kNormSoftmax; break;
  }
  o.agg = s.agg;
  o.smooth = s.smooth;
  o.lse_lambda = s.lse_lambda;
  return o;
}

// The options in the compute type.
template <typename T>
struct Opt {
  int norm, agg;
  T slope, smooth, lse_lambda;
  explicit Opt(const ScanOptions& s)
      : norm(s.norm), agg(s.agg), slope(T(s.slope)), smooth(temperature_in<T>(s.smooth)),
        lse_lambda(temperature_in<T>(s.lse_lambda)) {}
};

// One (image, caption) pair, queries as rows, in a padded layout: raw scores s (Q x Cp, Cp = C
// rounded up to whole vectors, zeros in the padding columns), the context's Gram matrix
// (C x Cp, zero padded) and the queries' norms (Q). Padding columns are masked out of every
// max and softmax; zeros elsewhere keep them out of the sums.
template <typename T>
struct Pair {
  const T* s;
  int64_t Q, C, Cp;
  const T* gram;
  const T* qnorm;
};

// Per-thread scratch of the pair reductions, sized for the largest pair.
template <typename T>
struct PairScratch {
  std::vector<T> alpha, u, da, inv, aux, colsum, r, dr, dot, nctx;
  PairScratch(int64_t q_max, int64_t c_max)
      : alpha(q_max * simd::padded<T>(c_max)), u(alpha.size()), da(alpha.size()),
        inv(simd::padded<T>(c_max)), aux(inv.size()), colsum(inv.size()), r(q_max), dr(q_max),
        dot(q_max), nctx(q_max) {}
};

template <typename T>
using V = simd::Vec<T>;

// Statistics over the query axis for each context item c (the raw-score normalisation):
// l2 / l1: aux[c] = the norm, inv[c] = 1 / (norm + eps); none: inv = 1;
// softmax over the queries: aux[c] = the max, inv[c] = 1 / sum exp(s - max).
template <typename T>
RCAR_INLINE void query_axis_stats(const Pair<T>& p, const Opt<T>& o, T* inv, T* aux) {
  constexpr int64_t W = simd::kWidth<T>;
  const int64_t Q = p.Q, Cp = p.Cp;
  if (o.norm == kNormNone) {
    for (int64_t c = 0; c < Cp; ++c) inv[c] = T(1);
    return;
  }
  if (o.norm == kNormSoftmax) {
    for (int64_t v = 0; v < Cp; v += W) {
      V<T> best = simd::load(p.s + v);
      for (int64_t k = 1; k < Q; ++k) best = simd::vmax<T>(best, simd::load(p.s + k * Cp + v));
      V<T> total = simd::splat<T>(T(0));
      for (int64_t k = 0; k < Q; ++k) total += simd::vexp(simd::load(p.s + k * Cp + v) - best);
      simd::store(aux + v, best);
      simd::store(inv + v, T(1) / total);
    }
    return;
  }
  if (o.norm == kNormL2) query_axis_norms<T, true>(p.s, 0, Q, Cp, o.slope, aux);
  else query_axis_norms<T, false>(p.s, 0, Q, Cp, o.slope, aux);
  inverse_norms(aux, Cp, inv);
}

// One vector of the normalised scores a[k, v .. v+W).
template <typename T>
RCAR_INLINE V<T> normalized(const T* sk, int64_t v, const Opt<T>& o, const T* inv, const T* aux) {
  const V<T> s = simd::load(sk + v);
  if (o.norm == kNormSoftmax) return simd::vexp(s - simd::load(aux + v)) * simd::load(inv + v);
  return simd::leak<T>(s, o.slope) * simd::load(inv + v);
}

// u[k, :] = G alpha[k, :] for every query (G symmetric). NV (the vectors per padded row) is a
// compile-time constant here so that two rows' accumulators stay in registers: each broadcast of
// alpha serves NV FMAs and each loaded vector of G two.
template <typename T, int NV>
RCAR_INLINE void gram_products_fixed(const T* alpha, const T* G, int64_t Q, int64_t C, int64_t Cp, T* u) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t k = 0;
  for (; k + 2 <= Q; k += 2) {
    const T* a0 = alpha + k * Cp;
    const T* a1 = a0 + Cp;
    V<T> acc0[NV], acc1[NV];
    for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = simd::splat<T>(T(0));
    for (int64_t c2 = 0; c2 < C; ++c2) {
      const T b0 = a0[c2], b1 = a1[c2];
      const T* g = G + c2 * Cp;
      for (int v = 0; v < NV; ++v) {
        const V<T> gv = simd::load(g + v * W);
        acc0[v] += b0 * gv;
        acc1[v] += b1 * gv;
      }
    }
    for (int v = 0; v < NV; ++v) {
      simd::store(u + k * Cp + v * W, acc0[v]);
      simd::store(u + (k + 1) * Cp + v * W, acc1[v]);
    }
  }
  for (; k < Q; ++k) {
    const T* ak = alpha + k * Cp;
    V<T> acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = simd::splat<T>(T(0));
    for (int64_t c2 = 0; c2 < C; ++c2)
      for (int v = 0; v < NV; ++v) acc[v] += ak[c2] * simd::load(G + c2 * Cp + v * W);
    for (int v = 0; v < NV; ++v) simd::store(u + k * Cp + v * W, acc[v]);
  }
}

template <typename T>
RCAR_INLINE void gram_products_any(const T* alpha, const T* G, int64_t Q, int64_t C, int64_t Cp, T* u) {
  constexpr int64_t W = simd::kWidth<T>;
  for (int64_t k = 0; k < Q; ++k) {
    const T* ak = alpha + k * Cp;
    for (int64_t v = 0; v < Cp; v += W) {
      V<T> acc = simd::splat<T>(T(0));
      for (int64_t c2 = 0; c2 < C; ++c2) acc += ak[c2] * simd::load(G + c2 * Cp + v);
      simd::store(u + k * Cp + v, acc);
    }
  }
}

template <typename T>
RCAR_INLINE void gram_products(const T* alpha, const T* G, int64_t Q, int64_t C, int64_t Cp, T* u) {
  switch (Cp / simd::kWidth<T>) {
    case 1: return gram_products_fixed<T, 1>(alpha, G, Q, C, Cp, u);
    case 2: return gram_products_fixed<T, 2>(alpha, G, Q, C, Cp, u);
    case 3: return gram_products_fixed<T, 3>(alpha, G, Q, C, Cp, u);
    case 4: return gram_products_fixed<T, 4>(alpha, G, Q, C, Cp, u);
    case 5: return gram_products_fixed<T, 5>(alpha, G, Q, C, Cp, u);
    case 6: return gram_products_fixed<T, 6>(alpha, G, Q, C, Cp, u);
    default: return gram_products_any(alpha, G, Q, C, Cp, u);
  }
}

template <typename T>
RCAR_INLINE T max_of(const T* r, int64_t Q) {
  T best = r[0];
  for (int64_t k = 1; k < Q; ++k) best = std::max(best, r[k]);
  return best;
}

// exp(lambda (r - r_max)) <= 1. The shift is taken before the scaling: lambda r itself may
// overflow, and exp(fma(lambda, r, -lambda r_max)) (what a contracted lambda r - best compiles
// to) is exp of lambda r's rounding error, which is inf or 0 once lambda r is large.
template <typename T>
RCAR_INLINE T lse_weight(T r, T r_max, T lambda) {
  return std::exp(lambda * (r - r_max));
}

template <typename T>
RCAR_INLINE T aggregate(const T* r, int64_t Q, const Opt<T>& o) {
  switch (o.agg) {
    case rcar_contract::kMean:
    case rcar_contract::kSum: {
      T total = 0;
      for (int64_t k = 0; k < Q; ++k) total += r[k];
      return o.agg == rcar_contract::kSum ? total : total / T(Q);
    }
    case rcar_contract::kMax:
      return max_of(r, Q);
    default: {  // lse: log(sum exp(lambda r)) / lambda = r_max + log(sum exp(lambda (r - r_max))) / lambda
      const T best = max_of(r, Q);
      T total = 0;
      for (int64_t k = 0; k < Q; ++k) total += lse_weight(r[k], best, o.lse_lambda);
      return best + std::log(total) / o.lse_lambda;
    }
  }
}

// d out / d r_k times g. max splits the gradient evenly among tied maxima, like torch.amax.
template <typename T>
RCAR_INLINE void aggregate_backward(const T* r, int64_t Q, const Opt<T>& o, T g, T* dr) {
  switch (o.agg) {
    case rcar_contract::kMean:
      for (int64_t k = 0; k < Q; ++k) dr[k] = g / T(Q);
      return;
    case rcar_contract::kSum:
      for (int64_t k = 0; k < Q; ++k) dr[k] = g;
      return;
    case rcar_contract::kMax: {
      const T best = max_of(r, Q);
      int64_t ties = 0;
      for (int64_t k = 0; k < Q; ++k) ties += r[k] == best;
      for (int64_t k = 0; k < Q; ++k) dr[k] = r[k] == best ? g / T(ties) : T(0);
      return;
    }
    default: {
      const T best = max_of(r, Q);
      T total = 0;
      for (int64_t k = 0; k < Q; ++k) {
        dr[k] = lse_weight(r[k], best, o.lse_lambda);
        total += dr[k];
      }
      for (int64_t k = 0; k < Q; ++k) dr[k] *= g / total;
    }
  }
}

// SCAN score of one pair. Leaves alpha (Q x Cp, zero padded), u = alpha G, dot, nctx, r, inv
// and aux in w.
template <typename T>
RCAR_INLINE T pair_forward(const Pair<T>& p, const Opt<T>& o, PairScratch<T>& w) {
  constexpr int64_t W = simd::kWidth<T>;
  const int64_t Q = p.Q, C = p.C, Cp = p.Cp, last = Cp - W;
  T* inv = w.inv.data();
  T* aux = w.aux.data();
  T* alpha = w.alpha.data();
  const simd::Mask<T> tail = simd::lanes_below<T>(C - last);
  const V<T> minus_inf = simd::splat<T>(-std::numeric_limits<T>::infinity());
  const V<T> zero = simd::splat<T>(T(0));
  query_axis_stats(p, o, inv, aux);
  for (int64_t k = 0; k < Q; ++k) {
    const T* sk = p.s + k * Cp;
    T* ak = alpha + k * Cp;
    // normalised scores and their max over the real context items
    V<T> best = minus_inf;
    for (int64_t v = 0; v < last; v += W) {
      const V<T> a = normalized(sk, v, o, inv, aux);
      simd::store(ak + v, a);
      best = simd::vmax<T>(best, a);
    }
    const V<T> a_last = normalized(sk, last, o, inv, aux);
    simd::store(ak + last, a_last);
    best = simd::vmax<T>(best, tail ? a_last : minus_inf);
    const T top = simd::hmax<T>(best);
    // softmax over the context of lambda * a
    V<T> total = zero;
    for (int64_t v = 0; v <= last; v += W) {
      V<T> e = simd::vexp((simd::load(ak + v) - top) * o.smooth);
      if (v == last) e = tail ? e : zero;
      simd::store(ak + v, e);
      total += e;
    }
    const T scale = T(1) / simd::hsum<T>(total);
    V<T> dot = zero;
    for (int64_t v = 0; v <= last; v += W) {
      const V<T> a = simd::load(ak + v) * scale;
      simd::store(ak + v, a);
      dot += a * simd::load(sk + v);
    }
    w.dot[k] = simd::hsum<T>(dot);
  }
  T* u = w.u.data();
  gram_products(alpha, p.gram, Q, C, Cp, u);
  for (int64_t k = 0; k < Q; ++k) {
    V<T> sq = zero;
    for (int64_t v = 0; v <= last; v += W) sq += simd::load(alpha + k * Cp + v) * simd::load(u + k * Cp + v);
    w.nctx[k] = std::sqrt(std::max(simd::hsum<T>(sq), T(0)));
    w.r[k] = w.dot[k] / std::max(p.qnorm[k] * w.nctx[k], T(kEps));
  }
  return aggregate(w.r.data(), Q, o);
}

// Gradient of one pair's score (scaled by g) w.r.t. its raw scores, written to ds (Q x Cp);
// accumulates dL/dG into dgram (C x Cp) and (dL/d|q_k|) / |q_k| into cq (Q).
template <typename T>
RCAR_INLINE void pair_backward(const Pair<T>& p, const Opt<T>& o, PairScratch<T>& w, T g, T* ds, T* dgram,
                               T* cq) {
  constexpr int64_t W = simd::kWidth<T>;
  const int64_t Q = p.Q, C = p.C, Cp = p.Cp;
  pair_forward(p, o, w);
  const T* alpha = w.alpha.data();
  const T* u = w.u.data();
  T* da = w.da.data();
  T* dr = w.dr.data();
  aggregate_backward(w.r.data(), Q, o, g, dr);
  const T eps = T(kEps), smooth = o.smooth;
  const V<T> zero = simd::splat<T>(T(0));
  for (int64_t k = 0; k < Q; ++k) {
    const T* ak = alpha + k * Cp;
    const T* uk = u + k * Cp;
    const T* sk = p.s + k * Cp;
    // r = dot / max(|q| |ctx|, eps), |ctx| = sqrt(alpha^T G alpha)
    const T qn = p.qnorm[k], nc = w.nctx[k], prod = qn * nc;
    T ddot, dsq = 0;
    if (prod >= eps) {
      ddot = dr[k] / prod;
      const T dden = -dr[k] * w.dot[k] / (prod * prod);
      if (qn > T(0)) cq[k] += dden * nc / qn;
      if (nc > T(0)) dsq = dden * qn / (T(2) * nc);
    } else {
      ddot = dr[k] / eps;
    }
    // dalpha = ddot s + 2 dsq u, then back through the context softmax of lambda * a.
    T* dak = da + k * Cp;
    T* dsk = ds + k * Cp;
    V<T> sum_ad = zero;
    for (int64_t v = 0; v < Cp; v += W) {
      const V<T> dal = ddot * simd::load(sk + v) + (T(2) * dsq) * simd::load(uk + v);
      simd::store(dak + v, dal);
      sum_ad += simd::load(ak + v) * dal;
    }
    const T mean_ad = simd::hsum<T>(sum_ad);
    for (int64_t v = 0; v < Cp; v += W) {
      const V<T> a = simd::load(ak + v);
      simd::store(dak + v, smooth * a * (simd::load(dak + v) - mean_ad));
      simd::store(dsk + v, ddot * a);
    }
    if (dsq != T(0)) {
      for (int64_t v = 0; v < Cp; v += W) {
        const V<T> a = simd::load(ak + v);
        for (int64_t c1 = 0; c1 < C; ++c1) {
          T* row = dgram + c1 * Cp + v;
          simd::store(row, simd::load(row) + (dsq * ak[c1]) * a);
        }
      }
    }
  }
  // Back through the normalisation over the query axis (column-wise).
  const T* inv = w.inv.data();
  const T* aux = w.aux.data();
  T* colsum = w.colsum.data();
  const T slope = o.slope;
  if (o.norm == kNormNone) {
    for (int64_t k = 0; k < Q; ++k)
      for (int64_t v = 0; v < Cp; v += W) {
        const V<T> grad = simd::load(da + k * Cp + v) * simd::leak_grad<T>(simd::load(p.s + k * Cp + v), slope);
        simd::store(ds + k * Cp + v, simd::load(ds + k * Cp + v) + grad);
      }
    return;
  }
  for (int64_t v = 0; v < Cp; v += W) {
    // softmax over the queries: ds = a (da - sum_k a_k da_k); l2 / l1: see below
    V<T> acc = zero;
    for (int64_t k = 0; k < Q; ++k) {
      const V<T> x = o.norm == kNormSoftmax ? normalized(p.s + k * Cp, v, o, inv, aux)
                                            : simd::leak<T>(simd::load(p.s + k * Cp + v), slope);
      acc += simd::load(da + k * Cp + v) * x;
    }
    simd::store(colsum + v, acc);
  }
  if (o.norm == kNormSoftmax) {
    for (int64_t k = 0; k < Q; ++k)
      for (int64_t v = 0; v < Cp; v += W) {
        const V<T> a = normalized(p.s + k * Cp, v, o, inv, aux);
        const V<T> grad = a * (simd::load(da + k * Cp + v) - simd::load(colsum + v));
        simd::store(ds + k * Cp + v, simd::load(ds + k * Cp + v) + grad);
      }
    return;
  }
  // a = x / (n + eps): dx = da / (n + eps) - (sum_k da_k x_k) / (n + eps)^2 * dn/dx,
  // dn/dx = x / n (l2) or sign(x) (l1). colsum becomes the per-column coefficient.
  const bool l2 = o.norm == kNormL2;
  for (int64_t c = 0; c < Cp; ++c) {
    const T coef = colsum[c] * inv[c] * inv[c];
    colsum[c] = l2 ? (aux[c] > T(0) ? coef / aux[c] : T(0)) : coef;
  }
  for (int64_t k = 0; k < Q; ++k)
    for (int64_t v = 0; v < Cp; v += W) {
      const V<T> s = simd::load(p.s + k * Cp + v);
      const V<T> x = simd::leak<T>(s, slope);
      const V<T> dn = l2 ? x : simd::sign<T>(x);
      const V<T> dx = simd::load(da + k * Cp + v) * simd::load(inv + v) - simd::load(colsum + v) * dn;
      simd::store(ds + k * Cp + v, simd::load(ds + k * Cp + v) + dx * simd::leak_grad<T>(s, slope));
    }
}

// ---------------------------------------------------------------------------------------------
// The problem: packed words, Grams, query norms, block partition
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTileWords = 768;    // rows of a tile (real words of a caption block)
constexpr int64_t kTileRegions = 576;  // columns of a tile (regions of an image block)

template <typename T>
struct ScanProblem {
  ScanOptions opt;
  at::Tensor img;  // (n_img, R, d) contiguous
  int64_t n_img = 0, R = 0, d = 0, n_cap = 0, max_len = 0;
  int64_t cap_slots = 0;  // cap.size(1): Lmax of the padded input
  PackedWords<T> words;
  // Context Grams, rows padded to whole vectors: t2i (n_img, R, Rp); i2t caption j's (L x Lp)
  // matrix at gram_off[j].
  at::Tensor gram;
  std::vector<int64_t> gram_off;
  at::Tensor qnorm;  // t2i: per packed word; i2t: per region (n_img * R)
  std::vector<int64_t> cap_bounds;
  int64_t img_block = 1, n_img_blocks = 0, max_block_words = 0;

  const T* img_ptr() const { return img.data_ptr<T>(); }
  const T* words_ptr() const { return words.words.template data_ptr<T>(); }
  const T* qnorm_ptr() const { return qnorm.data_ptr<T>(); }
  int64_t n_cap_blocks() const { return static_cast<int64_t>(cap_bounds.size()) - 1; }
  int64_t len(int64_t j) const { return words.offsets[j + 1] - words.offsets[j]; }
  // The largest pair as queries x context: t2i words x regions, i2t regions x words.
  int64_t pair_queries_max() const { return opt.t2i ? max_len : R; }
  int64_t pair_context_max() const { return opt.t2i ? R : max_len; }
  // Offset of the Gram of pair (i, j)'s context in `gram` (and in its gradient).
  int64_t gram_offset(int64_t i, int64_t j) const {
    return opt.t2i ? i * R * simd::padded<T>(R) : gram_off[j];
  }
};

// t2i: per-image Grams V_i V_i^T, rows zero-padded to Rp.
template <typename T>
void image_grams(ScanProblem<T>& P) {
  const int64_t Rp = simd::padded<T>(P.R);
  P.gram = at::zeros({P.n_img, P.R, Rp}, P.img.options());
  P.gram.narrow(2, 0, P.R).copy_(at::bmm(P.img, P.img.transpose(1, 2)));
}

// i2t: per-caption Grams W_j W_j^T, rows zero-padded to Lp, packed.
template <typename T>
void caption_grams(ScanProblem<T>& P) {
  P.gram_off.assign(P.n_cap + 1, 0);
  for (int64_t j = 0; j < P.n_cap; ++j) P.gram_off[j + 1] = P.gram_off[j] + P.len(j) * simd::padded<T>(P.len(j));
  P.gram = at::zeros({P.gram_off[P.n_cap]}, P.img.options());
  const T* words = P.words_ptr();
  T* gram = P.gram.template data_ptr<T>();
  run_tasks(P.n_cap, [&](int64_t j, int) {
    const int64_t L = P.len(j);
    const at::Tensor w = view2d(words + P.words.offsets[j] * P.d, L, P.d, P.d);
    matmul_into(view2d(gram + P.gram_off[j], L, L, simd::padded<T>(L)), w, w.t(), false);
  });
}

// min_cap_blocks: the backward parallelises over caption blocks and needs a few per thread.
template <typename T>
ScanProblem<T> make_problem(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                            const ScanOptions& opt, int64_t min_cap_blocks) {
  ScanProblem<T> P;
  P.opt = opt;
  P.img = img.contiguous();
  P.n_img = img.size(0);
  P.R = img.size(1);
  P.d = img.size(2);
  P.n_cap = cap.size(0);
  P.cap_slots = cap.size(1);
  P.words = pack_words<T>(cap.stride(2) == 1 ? cap : cap.contiguous(), lens);
  P.max_len = P.words.max_len;
  if (opt.t2i) {
    image_grams(P);
    P.qnorm = at::linalg_vector_norm(P.words.words, 2, {1}).contiguous();
  } else {
    caption_grams(P);
    P.qnorm = at::linalg_vector_norm(P.img.view({P.n_img * P.R, P.d}), 2, {1}).contiguous();
  }
  const int64_t total_words = P.words.offsets[P.n_cap];
  int64_t target = kTileWords;
  if (min_cap_blocks > 1) target = std::min(target, (total_words + min_cap_blocks - 1) / min_cap_blocks);
  P.cap_bounds = weighted_blocks(P.words.offsets, std::max<int64_t>(target, 1));
  for (int64_t b = 0; b < P.n_cap_blocks(); ++b)
    P.max_block_words = std::max(P.max_block_words,
                                 P.words.offsets[P.cap_bounds[b + 1]] - P.words.offsets[P.cap_bounds[b]]);
  P.img_block = std::max<int64_t>(1, std::min(P.n_img, kTileRegions / P.R));
  P.n_img_blocks = (P.n_img + P.img_block - 1) / P.img_block;
  return P;
}

// One tile's geometry: captions [j0, j1) (words w0 .. w0 + rows of the packed words) x images
// [i0, i1) (cols = their regions).
struct Tile {
  int64_t j0, j1, w0, rows, i0, i1, cols;
};

template <typename T>
Tile tile_of(const ScanProblem<T>& P, int64_t cb, int64_t ib) {
  Tile t;
  t.j0 = P.cap_bounds[cb];
  t.j1 = P.cap_bounds[cb + 1];
  t.w0 = P.words.offsets[t.j0];
  t.rows = P.words.offsets[t.j1] - t.w0;
  t.i0 = ib * P.img_block;
  t.i1 = std::min(P.n_img, t.i0 + P.img_block);
  t.cols = (t.i1 - t.i0) * P.R;
  return t;
}

// scores (rows x cols) = tile words @ tile regions^T
template <typename T>
void tile_scores(const ScanProblem<T>& P, const Tile& t, T* scores) {
  score_tile(P.words_ptr() + t.w0 * P.d, t.rows, P.img_ptr() + t.i0 * P.R * P.d, t.cols, P.d, scores, t.cols);
}

// Per-thread buffers of a tile.
template <typename T>
struct TileScratch {
  std::vector<T> scores, dscores, pair_s, pair_ds, dgram_tile, cq_tile;
  PairScratch<T> pair;
  TileScratch(const ScanProblem<T>& P, bool backward)
      : scores(P.max_block_words * P.img_block * P.R),
        pair_s(P.pair_queries_max() * simd::padded<T>(P.pair_context_max()), T(0)),
        pair(P.pair_queries_max(), P.pair_context_max()) {
    if (backward) {
      dscores.resize(scores.size());
      pair_ds.resize(pair_s.size());
      dgram_tile.resize(P.opt.t2i ? P.img_block * P.R * simd::padded<T>(P.R) : 0);
      cq_tile.resize(P.opt.t2i ? 0 : P.img_block * P.R);
    }
  }
};

// Pair (i, j) of a tile as queries x context, copied into the padded layout of Pair (t2i: its
// (L x R) block; i2t: the block transposed).
template <typename T>
RCAR_INLINE Pair<T> pair_view(const ScanProblem<T>& P, const Tile& t, const T* scores, int64_t i, int64_t j,
                              T* padded_s) {
  const int64_t L = P.len(j), R = P.R;
  const T* block = scores + (P.words.offsets[j] - t.w0) * t.cols + (i - t.i0) * R;
  const T* gram = P.gram.template data_ptr<T>() + P.gram_offset(i, j);
  if (P.opt.t2i) {
    const int64_t Rp = simd::padded<T>(R);
    for (int64_t k = 0; k < L; ++k) {
      std::memcpy(padded_s + k * Rp, block + k * t.cols, sizeof(T) * R);
      std::fill(padded_s + k * Rp + R, padded_s + (k + 1) * Rp, T(0));
    }
    return Pair<T>{padded_s, L, R, Rp, gram, P.qnorm_ptr() + P.words.offsets[j]};
  }
  const int64_t Lp = simd::padded<T>(L);
  for (int64_t k = 0; k < R; ++k) {
    for (int64_t c = 0; c < L; ++c) padded_s[k * Lp + c] = block[c * t.cols + k];
    std::fill(padded_s + k * Lp + L, padded_s + (k + 1) * Lp, T(0));
  }
  return Pair<T>{padded_s, R, L, Lp, gram, P.qnorm_ptr() + i * R};
}

// The pair's d scores (padded layout) back into its block of the tile's d scores.
template <typename T>
RCAR_INLINE void store_pair_gradient(const ScanProblem<T>& P, const Tile& t, const Pair<T>& p, const T* ds,
                                     int64_t i, int64_t j, T* dscores) {
  T* block = dscores + (P.words.offsets[j] - t.w0) * t.cols + (i - t.i0) * P.R;
  if (P.opt.t2i) {
    for (int64_t k = 0; k < p.Q; ++k) std::memcpy(block + k * t.cols, ds + k * p.Cp, sizeof(T) * p.C);
    return;
  }
  for (int64_t c = 0; c < p.C; ++c)
    for (int64_t k = 0; k < p.Q; ++k) block[c * t.cols + k] = ds[k * p.Cp + c];
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
RCAR_INLINE void forward_tile_pairs_body(const ScanProblem<T>& P, const Tile& t, TileScratch<T>& ts, T* out) {
  const Opt<T> o(P.opt);
  for (int64_t j = t.j0; j < t.j1; ++j)
    for (int64_t i = t.i0; i < t.i1; ++i) {
      const Pair<T> p = pair_view(P, t, ts.scores.data(), i, j, ts.pair_s.data());
      out[i * P.n_cap + j] = pair_forward(p, o, ts.pair);
    }
}

template <typename T>
void scan_forward_impl(const ScanProblem<T>& P, at::Tensor& out) {
  T* out_ptr = out.data_ptr<T>();
  const bool avx2 = use_avx2_path();
  for_each_tile<TileScratch<T>>(
      P.n_cap_blocks(), P.n_img_blocks, [&] { return std::make_unique<TileScratch<T>>(P, false); },
      [&](int64_t cb, int64_t ib, TileScratch<T>& ts) {
        const Tile t = tile_of(P, cb, ib);
        tile_scores(P, t, ts.scores.data());
        in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA { forward_tile_pairs_body(P, t, ts, out_ptr); });
      });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Gradient accumulators. Rows of the packed words (and, for i2t, caption Grams) belong to one
// caption block, hence to the one thread that handles it; per-image accumulators are shared and
// updated in caption-block order (OrderedTurns).
template <typename T>
struct ScanGrads {
  at::Tensor dwords;  // (total_words, d)
  at::Tensor dimg;    // (n_img * R, d)
  at::Tensor dgram;   // same layout as ScanProblem::gram
  at::Tensor cq;      // (dL/d|q|) / |q|: t2i per word, i2t per region
  OrderedTurns img_turns;
  explicit ScanGrads(const ScanProblem<T>& P) : img_turns(P.n_img_blocks) {
    dwords = at::zeros_like(P.words.words);
    dimg = at::zeros({P.n_img * P.R, P.d}, P.img.options());
    dgram = at::zeros_like(P.gram);
    cq = at::zeros_like(P.qnorm);
  }
};

template <typename T>
bool tile_has_gradient(const ScanProblem<T>& P, const Tile& t, const T* g) {
  return block_has_nonzero(g, P.n_cap, t.i0, t.i1, t.j0, t.j1);
}

// d scores of every pair of the tile into ts.dscores; Gram and norm gradients accumulated
// (t2i: per-image ones into the tile's buffers, flushed under the lock by the caller).
template <typename T>
RCAR_INLINE void backward_tile_pairs_body(const ScanProblem<T>& P, const Tile& t, TileScratch<T>& ts,
                                          const T* g, ScanGrads<T>& G) {
  const Opt<T> o(P.opt);
  const int64_t R = P.R;
  T* dscores = ts.dscores.data();
  T* cq = G.cq.template data_ptr<T>();
  T* dgram = G.dgram.template data_ptr<T>();
  for (int64_t j = t.j0; j < t.j1; ++j) {
    const int64_t L = P.len(j);
    for (int64_t i = t.i0; i < t.i1; ++i) {
      const T gij = g[i * P.n_cap + j];
      if (gij == T(0)) {
        T* block = dscores + (P.words.offsets[j] - t.w0) * t.cols + (i - t.i0) * R;
        for (int64_t c = 0; c < L; ++c) std::fill(block + c * t.cols, block + c * t.cols + R, T(0));
        continue;
      }
      const Pair<T> p = pair_view(P, t, ts.scores.data(), i, j, ts.pair_s.data());
      if (P.opt.t2i) {
        pair_backward(p, o, ts.pair, gij, ts.pair_ds.data(),
                      ts.dgram_tile.data() + (i - t.i0) * R * simd::padded<T>(R), cq + P.words.offsets[j]);
      } else {
        pair_backward(p, o, ts.pair, gij, ts.pair_ds.data(), dgram + P.gram_off[j],
                      ts.cq_tile.data() + (i - t.i0) * R);
      }
      store_pair_gradient(P, t, p, ts.pair_ds.data(), i, j, dscores);
    }
  }
}

// One caption block against every image block, in image-block order: caption block cb adds
// into image block ib right after caption block cb - 1 did, so the threads run staggered by
// about one addition and rarely wait.
template <typename T>
void backward_caption_block(const ScanProblem<T>& P, int64_t cb, TileScratch<T>& ts, const T* g,
                            ScanGrads<T>& G, bool avx2) {
  for (int64_t ib = 0; ib < P.n_img_blocks; ++ib) {
    const Tile t = tile_of(P, cb, ib);
    std::unique_lock<std::mutex> turn;
    if (!tile_has_gradient(P, t, g)) {
      if (!G.img_turns.wait(ib, cb, turn)) return;
      G.img_turns.pass(ib, turn);
      continue;
    }
    tile_scores(P, t, ts.scores.data());
    std::fill(ts.dgram_tile.begin(), ts.dgram_tile.end(), T(0));
    std::fill(ts.cq_tile.begin(), ts.cq_tile.end(), T(0));
    in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA { backward_tile_pairs_body(P, t, ts, g, G); });
    // scores = W V^T  =>  dW += dS V (rows owned by this caption block), dV += dS^T W (shared).
    const at::Tensor ds = view2d(ts.dscores.data(), t.rows, t.cols, t.cols);
    const at::Tensor w = view2d(P.words_ptr() + t.w0 * P.d, t.rows, P.d, P.d);
    const at::Tensor v = view2d(P.img_ptr() + t.i0 * P.R * P.d, t.cols, P.d, P.d);
    T* dwords = G.dwords.template data_ptr<T>();
    T* dimg = G.dimg.template data_ptr<T>();
    matmul_into(view2d(dwords + t.w0 * P.d, t.rows, P.d, P.d), ds, v, true);
    if (!G.img_turns.wait(ib, cb, turn)) return;
    matmul_into(view2d(dimg + t.i0 * P.R * P.d, t.cols, P.d, P.d), ds.t(), w, true);
    if (P.opt.t2i) {
      const int64_t per_image = P.R * simd::padded<T>(P.R);
      T* dgram = G.dgram.template data_ptr<T>() + t.i0 * per_image;
      for (int64_t e = 0; e < (t.i1 - t.i0) * per_image; ++e) dgram[e] += ts.dgram_tile[e];
    } else {
      T* cq = G.cq.template data_ptr<T>() + t.i0 * P.R;
      for (int64_t e = 0; e < t.cols; ++e) cq[e] += ts.cq_tile[e];
    }
    G.img_turns.pass(ib, turn);
  }
}

// The Gram and query-norm terms, then the words back to the padded caption layout.
template <typename T>
std::vector<at::Tensor> finish_gradients(const ScanProblem<T>& P, ScanGrads<T>& G) {
  if (P.opt.t2i) {
    // G_i = V_i V_i^T  =>  dV_i += (dG + dG^T) V_i = 2 dG V_i (dG is symmetric)
    G.dimg.view({P.n_img, P.R, P.d}).baddbmm_(G.dgram.narrow(2, 0, P.R), P.img, 1, 2);
    G.dwords.addcmul_(G.cq.unsqueeze(1), P.words.words);
  } else {
    const T* words = P.words_ptr();
    T* dwords = G.dwords.template data_ptr<T>();
    const T* dgram = G.dgram.template data_ptr<T>();
    run_tasks(P.n_cap, [&](int64_t j, int) {
      const int64_t L = P.len(j), w0 = P.words.offsets[j];
      at::Tensor dw = view2d(dwords + w0 * P.d, L, P.d, P.d);
      dw.addmm_(view2d(dgram + P.gram_off[j], L, L, simd::padded<T>(L)), view2d(words + w0 * P.d, L, P.d, P.d), 1, 2);
    });
    G.dimg.addcmul_(G.cq.unsqueeze(1), P.img.view({P.n_img * P.R, P.d}));
  }
  at::Tensor dcap = unpack_words<T>(G.dwords, P.words.offsets, P.n_cap, P.cap_slots);
  return {G.dimg.view({P.n_img, P.R, P.d}), dcap};
}

template <typename T>
std::vector<at::Tensor> scan_backward_impl(const ScanProblem<T>& P, const at::Tensor& grad) {
  ScanGrads<T> G(P);
  const at::Tensor g = grad.contiguous();
  const T* gp = g.data_ptr<T>();
  const bool avx2 = use_avx2_path();
  for_caption_blocks_in_order<TileScratch<T>>(
      P.n_cap_blocks(), G.img_turns, [&] { return std::make_unique<TileScratch<T>>(P, true); },
      [&](int64_t cb, TileScratch<T>& scratch) { backward_caption_block(P, cb, scratch, gp, G, avx2); });
  return finish_gradients(P, G);
}


}  // namespace

at::Tensor scan_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const ScanSettings& settings) {
  check_pair_inputs("scan (cpu)", img, cap, lens);
  const ScanOptions opt = parse_options(settings);
  at::Tensor out = at::empty({img.size(0), cap.size(0)}, img.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::scan_forward", [&] {
    const ScanProblem<scalar_t> P = make_problem<scalar_t>(img, cap, lens, opt, 1);
    scan_forward_impl(P, out);
  });
  return out;
}

std::vector<at::Tensor> scan_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                      const at::Tensor& lens, const ScanSettings& settings) {
  check_pair_inputs("scan (cpu)", img, cap, lens);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == img.size(0) && grad.size(1) == cap.size(0),
              "scan (cpu) backward: grad must be (n_img, n_cap), got ", grad.sizes());
  const ScanOptions opt = parse_options(settings);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::scan_backward", [&] {
    const ScanProblem<scalar_t> P = make_problem<scalar_t>(img, cap, lens, opt, 4 * at::get_num_threads());
    grads = scan_backward_impl(P, grad.to(img.scalar_type()));
  });
  return grads;
}

}  // namespace rcar_cpu

// ---------------------------------------------------------------------------------------------
// Python bindings (rcar_fast._C), registered through csrc/bindings.h.
//   scan_forward_cpu: img (n_img, R, d), cap (n_cap, Lmax, d) with positions >= lens[j] never
//     read, lens (n_cap,) int64 in [1, Lmax]; float32 or float64 in, same dtype out,
//     (n_img, n_cap). Options as in SIMILARITY.md.
//   scan_backward_cpu: gradients of sum(grad * scan_forward(...)) w.r.t. img and cap:
//     [d img, d cap]; d cap is zero at the padding.
RCAR_FAST_BINDINGS(cpu_scan, m) {
  namespace py = pybind11;
  using rcar_cpu::ScanSettings;
  rcar_cpu::bind::settings_class<ScanSettings, &ScanSettings::direction, &ScanSettings::raw_norm, &ScanSettings::agg,
                                 &ScanSettings::smooth, &ScanSettings::lse_lambda>(
      m, "ScanSettings", "a SCAN problem's options as contract codes", py::arg("direction"), py::arg("raw_norm"),
      py::arg("agg"), py::arg("smooth"), py::arg("lse_lambda"));
  m.def("scan_forward_cpu", &rcar_cpu::scan_forward,
        "SCAN similarity of all pairs (n_img, n_cap), fused per tile", py::arg("img"), py::arg("cap"),
        py::arg("lens"), py::arg("settings"), py::call_guard<py::gil_scoped_release>());
  m.def("scan_backward_cpu", &rcar_cpu::scan_backward,
        "gradients [d img, d cap] of sum(grad * SCAN similarity)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("settings"), py::call_guard<py::gil_scoped_release>());
}
