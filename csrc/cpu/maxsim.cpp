// The S-only similarity heads (HEADS.md: CHAN, LAPS, TERAN / ALADIN, ColBERT, DVSA) and CHAN's
// VSA coding on the CPU, forward and backward, over all pairs and over a pair list.
//
// All pairs: per tile of (caption block x image block) one GEMM (tile.h score_tile) gives every
// score S = word . region of the tile: rows the real words of the block's captions, columns the
// real regions of its images. The inputs are read in place (a sequence's real rows are adjacent
// in a contiguous (n, slots, d) batch); a block whose sequences are not all full is copied into a
// per-thread tile buffer, so padding never enters a GEMM or a reduction (it may hold NaN). Pair
// (i, j) is the (L_j x R_i) sub-block; its epilogue takes per word the max over the regions (t2i)
// and / or per region the max over the words (i2t), or CHAN's VSA code per region, then pools
// them. Memory is O(threads x tile) beyond the inputs and the result.
//
// Backward, flash style: recompute the tile. Max coding: the FIRST argmax of every max; each
// argmax link (one per word (t2i) or region (i2t) and pair) carries c = G[i, j] g (g the pooling's
// gradient, times leaky'(S) and both_scale) and adds c v_r into d e_w and c e_w into d v_r. No
// dense dS and no second GEMM: the tile's links are bucketed by word row and by region row, and
// each gradient row is one register-blocked gather-sum over its bucket. VSA coding: the closed
// form of HEADS.md as a dense coefficient tile C (two GEMMs: C regions, C^T words) plus a per
// caption L x L matrix M for the |c_r| term (M words, once per caption block).
// Deterministic: caption rows belong to the one thread that handles their caption block; each
// image block's rows are added from per-tile partials in caption-block order (OrderedTurns).
// The pair list scores one small GEMM per pair; its backward accumulates each caption's and each
// image's rows in one task, in pair order.
#include "cpu/bind.h"
#include "cpu/tile.h"

#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <type_traits>

// Every function passing a 32-byte vector is always_inline: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rcar_cpu {

// An S-only head's options (HEADS.md), as the codes of rcar_fast.contract; built from the names
// by rcar_fast.ops.maxsim_cpu.native_settings.
struct MaxSimSettings {
  int direction;      // rcar_contract::HeadDirection: t2i, i2t, both
  int pool;           // rcar_contract::Pool: mean, sum, max, lse, softmax
  double tau;         // lse / softmax pooling temperature, > 0
  bool leaky;         // leaky(x) (slope kLeakySlope) on the maxima before pooling
  double both_scale;  // "both": both_scale * (t2i + i2t)
  bool vsa = false;     // CHAN's VSA coding instead of the max (direction i2t, no leaky)
  double vsa_tau = 1;   // its softmax temperature, > 0 (when vsa)
};

}  // namespace rcar_cpu

namespace rcar_cpu {
namespace {
using namespace detail;
using rcar_contract::kHeadBoth;
using rcar_contract::kHeadDirectionCount;
using rcar_contract::kHeadI2T;
using rcar_contract::kHeadT2I;
using rcar_contract::kPoolCount;
using rcar_contract::kPoolLse;
using rcar_contract::kPoolMax;
using rcar_contract::kPoolMean;
using rcar_contract::kPoolSum;

template <typename T>
using V = simd::Vec<T>;
template <typename T>
using Mask = simd::Mask<T>;

// The head's options, checked, in the compute type.
struct HeadOptions {
  bool t2i = true, i2t = false, leaky = false, vsa = false;
  int pool = kPoolMean;
  double tau = 1.0;      // always set from MaxSimSettings
  double vsa_tau = 1.0;  // likewise, when vsa
  double scale = 1.0;    // each term's factor: 1 for one direction, both_scale for "both"
};

HeadOptions parse_options(const MaxSimSettings& s) {
  TORCH_CHECK(s.direction == kHeadT2I || s.direction == kHeadI2T || s.direction == kHeadBoth,
              "maxsim (cpu): direction must be a HeadDirection code in [0, ", kHeadDirectionCount,
              "), got ", s.direction);
  TORCH_CHECK(s.pool >= 0 && s.pool < kPoolCount, "maxsim (cpu): pool must be a Pool code in [0, ",
              kPoolCount, "), got ", s.pool);
  TORCH_CHECK(s.tau > 0 && std::isfinite(s.tau), "maxsim (cpu): tau must be positive and finite, got ", s.tau);
  TORCH_CHECK(std::isfinite(s.both_scale), "maxsim (cpu): both_scale must be finite, got ", s.both_scale);
  if (s.vsa) {
    TORCH_CHECK(s.direction == kHeadI2T && !s.leaky,
                "maxsim (cpu): the VSA coding codes regions: it needs direction i2t and no leaky");
    TORCH_CHECK(s.vsa_tau > 0 && std::isfinite(s.vsa_tau), "maxsim (cpu): vsa_tau must be positive and finite, got ",
                s.vsa_tau);
  }
  HeadOptions o;
  o.t2i = s.direction != kHeadI2T;
  o.i2t = s.direction != kHeadT2I;
  o.leaky = s.leaky;
  o.vsa = s.vsa;
  o.pool = s.pool;
  o.tau = s.tau;
  o.vsa_tau = s.vsa ? s.vsa_tau : 1.0;
  o.scale = s.direction == kHeadBoth ? s.both_scale : 1.0;
  return o;
}

template <typename T>
struct Opt {
  bool t2i, i2t, leaky, vsa;
  int pool;
  T tau, vsa_tau, scale, slope;
  explicit Opt(const HeadOptions& h)
      : t2i(h.t2i), i2t(h.i2t), leaky(h.leaky), vsa(h.vsa), pool(h.pool), tau(temperature_in<T>(h.tau)),
        vsa_tau(temperature_in<T>(h.vsa_tau)), scale(T(h.scale)), slope(T(kLeakySlope)) {}
  T leak(T x) const { return leaky && !(x > T(0)) ? slope * x : x; }
  // d leaky / dx at x (1 without leaky).
  T leak_grad(T x) const { return leaky && !(x > T(0)) ? slope : T(1); }
};

// ---------------------------------------------------------------------------------------------
// Pooling of x[0..K) (HEADS.md table)
// ---------------------------------------------------------------------------------------------

template <typename T>
RCAR_INLINE int64_t first_argmax(const T* x, int64_t K) {
  int64_t best = 0;
  for (int64_t k = 1; k < K; ++k)
    if (x[k] > x[best]) best = k;
  return best;
}

// Sum of exp((x_k - top) / tau) into e[k] (each <= 1: shifted before scaling, see scan.cpp's
// lse_weight), returned.
template <typename T>
RCAR_INLINE T shifted_exps(const T* x, int64_t K, T top, T tau, T* e) {
  T total = 0;
  for (int64_t k = 0; k < K; ++k) {
    e[k] = std::exp((x[k] - top) / tau);
    total += e[k];
  }
  return total;
}

// P(x); e: K scratch values.
template <typename T>
RCAR_INLINE T pool_value(const T* x, int64_t K, const Opt<T>& o, T* e) {
  switch (o.pool) {
    case kPoolMean:
    case kPoolSum: {
      T total = 0;
      for (int64_t k = 0; k < K; ++k) total += x[k];
      return o.pool == kPoolSum ? total : total / T(K);
    }
    case kPoolMax:
      return x[first_argmax(x, K)];
    case kPoolLse: {  // log sum exp(x / tau) = top / tau + log sum exp((x - top) / tau)
      const T top = x[first_argmax(x, K)];
      return top / o.tau + std::log(shifted_exps(x, K, top, o.tau, e));
    }
    default: {  // softmax: sum p_k x_k = top + sum p_k (x_k - top)
      const T top = x[first_argmax(x, K)];
      const T total = shifted_exps(x, K, top, o.tau, e);
      T weighted = 0;
      for (int64_t k = 0; k < K; ++k) weighted += e[k] * (x[k] - top);
      return top + weighted / total;
    }
  }
}

// g[k] = dP / dx_k.
template <typename T>
RCAR_INLINE void pool_gradient(const T* x, int64_t K, const Opt<T>& o, T* g) {
  switch (o.pool) {
    case kPoolMean:
    case kPoolSum: {
      const T each = o.pool == kPoolSum ? T(1) : T(1) / T(K);
      for (int64_t k = 0; k < K; ++k) g[k] = each;
      return;
    }
    case kPoolMax: {
      const int64_t best = first_argmax(x, K);
      for (int64_t k = 0; k < K; ++k) g[k] = k == best ? T(1) : T(0);
      return;
    }
    case kPoolLse: {  // p_k / tau
      const T top = x[first_argmax(x, K)];
      const T total = shifted_exps(x, K, top, o.tau, g);
      for (int64_t k = 0; k < K; ++k) g[k] = g[k] / total / o.tau;
      return;
    }
    default: {  // p_k (1 + (x_k - P) / tau)
      const T top = x[first_argmax(x, K)];
      const T total = shifted_exps(x, K, top, o.tau, g);
      T weighted = 0;
      for (int64_t k = 0; k < K; ++k) weighted += g[k] * (x[k] - top);
      const T value = top + weighted / total;
      for (int64_t k = 0; k < K; ++k) g[k] = g[k] / total * (T(1) + (x[k] - value) / o.tau);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One pair: its (L x R) block of scores, the maxima, the argmax links
// ---------------------------------------------------------------------------------------------

// S[w, r] at s[w * ld + r]: rows the caption's L real words, columns the image's R real regions.
// A vector load may run up to one vector past a row's R values (the buffers have that slack);
// those lanes are never used.
template <typename T>
struct PairBlock {
  const T* s;
  int64_t L, R, ld;
};

// The VSA coding's per-pair buffers: per word and region lane (L x padded(R)) the softmax
// weights a, (G a) (then e_w . q) and the |c| term's factors; per region the numerator
// sum_w a S, |c_r|, the code x_r and the pooled gradient h_r.
template <typename T>
struct VsaBuffers {
  std::vector<T> a, ga, beta, num, norm, code, h;
  VsaBuffers(int64_t L_max, int64_t R_max)
      : a(L_max * simd::padded<T>(R_max)), ga(a.size()), beta(a.size()), num(simd::padded<T>(R_max)),
        norm(num.size()), code(num.size()), h(num.size()) {}
};

// Per-thread scratch of the pair epilogues, sized for the longest caption and image.
template <typename T>
struct PairScratch {
  std::vector<T> word_max, word_coef, region_max, region_coef, pooled;
  std::vector<int64_t> word_arg, region_arg;
  VsaBuffers<T> vsa;
  PairScratch(int64_t L_max, int64_t R_max)
      : word_max(L_max), word_coef(L_max), region_max(simd::padded<T>(R_max) + simd::kWidth<T>),
        region_coef(R_max), pooled(std::max(L_max, R_max)), word_arg(L_max), region_arg(R_max),
        vsa(L_max, R_max) {}
};

// max over row[0..R).
template <typename T>
RCAR_INLINE T row_max(const T* row, int64_t R) {
  constexpr int64_t W = simd::kWidth<T>;
  const V<T> minus_inf = simd::splat<T>(-std::numeric_limits<T>::infinity());
  V<T> best = minus_inf;
  int64_t r = 0;
  for (; r + W <= R; r += W) best = simd::vmax<T>(best, simd::load(row + r));
  if (r < R) {
    const Mask<T> real = simd::lanes_below<T>(R - r);
    best = simd::vmax<T>(best, real ? simd::load(row + r) : minus_inf);
  }
  return simd::hmax<T>(best);
}

template <typename T>
RCAR_INLINE int64_t first_index_of(const T* row, int64_t R, T value) {
  for (int64_t r = 0; r < R; ++r)
    if (row[r] == value) return r;
  return 0;
}

// out[r] = max_w S[w, r] for r < R (whole vectors: out has room for padded(R) values).
template <typename T>
RCAR_INLINE void column_maxima(const PairBlock<T>& b, T* out) {
  constexpr int64_t W = simd::kWidth<T>;
  for (int64_t r = 0; r < b.R; r += W) {
    V<T> best = simd::load(b.s + r);
    for (int64_t w = 1; w < b.L; ++w) best = simd::vmax<T>(best, simd::load(b.s + w * b.ld + r));
    simd::store(out + r, best);
  }
}

// column_maxima and the first word reaching each maximum (a strictly greater value replaces it).
template <typename T>
RCAR_INLINE void column_argmaxima(const PairBlock<T>& b, T* out, int64_t* arg) {
  constexpr int64_t W = simd::kWidth<T>;
  using Lane = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  for (int64_t r = 0; r < b.R; r += W) {
    V<T> best = simd::load(b.s + r);
    Mask<T> at = Mask<T>{};
    for (int64_t w = 1; w < b.L; ++w) {
      const V<T> x = simd::load(b.s + w * b.ld + r);
      const Mask<T> greater = x > best;
      best = greater ? x : best;
      at = greater ? (Mask<T>{} + Lane(w)) : at;
    }
    simd::store(out + r, best);
    for (int64_t k = 0; k < W && r + k < b.R; ++k) arg[r + k] = at[k];
  }
}

// The pair's score.
template <typename T>
RCAR_INLINE T pair_score(const PairBlock<T>& b, const Opt<T>& o, PairScratch<T>& w) {
  T total = 0;
  if (o.t2i) {
    T* m = w.word_max.data();
    for (int64_t k = 0; k < b.L; ++k) m[k] = o.leak(row_max(b.s + k * b.ld, b.R));
    total += pool_value(m, b.L, o, w.pooled.data());
  }
  if (o.i2t) {
    T* n = w.region_max.data();
    column_maxima(b, n);
    for (int64_t r = 0; r < b.R; ++r) n[r] = o.leak(n[r]);
    total += pool_value(n, b.R, o, w.pooled.data());
  }
  return o.t2i && o.i2t ? o.scale * total : total;
}

// The pair's argmax links and their coefficients d(g x score) / dS along them: t2i word k ->
// region word_arg[k] with word_coef[k]; i2t region r -> word region_arg[r] with region_coef[r].
template <typename T>
RCAR_INLINE void pair_links(const PairBlock<T>& b, const Opt<T>& o, T g, PairScratch<T>& w) {
  const T gs = o.t2i && o.i2t ? g * o.scale : g;
  T* pooled = w.pooled.data();
  if (o.t2i) {
    T* m = w.word_max.data();
    for (int64_t k = 0; k < b.L; ++k) {
      const T* row = b.s + k * b.ld;
      const T top = row_max(row, b.R);
      w.word_arg[k] = first_index_of(row, b.R, top);
      m[k] = o.leak(top);
      w.word_coef[k] = o.leak_grad(top);
    }
    pool_gradient(m, b.L, o, pooled);
    for (int64_t k = 0; k < b.L; ++k) w.word_coef[k] *= gs * pooled[k];
  }
  if (o.i2t) {
    T* n = w.region_max.data();
    column_argmaxima(b, n, w.region_arg.data());
    for (int64_t r = 0; r < b.R; ++r) {
      w.region_coef[r] = o.leak_grad(n[r]);
      n[r] = o.leak(n[r]);
    }
    pool_gradient(n, b.R, o, pooled);
    for (int64_t r = 0; r < b.R; ++r) w.region_coef[r] *= gs * pooled[r];
  }
}

// ---------------------------------------------------------------------------------------------
// CHAN's VSA coding (HEADS.md "VSA"): per region r, x_r = sum_w a_rw S[w, r] / (|c_r| + eps),
// a_r = softmax_w(S[., r] / tau), |c_r| = sqrt(a_r^T G a_r), G the caption's L x L word Gram
// ---------------------------------------------------------------------------------------------

// v[0..n) into p[0..n) (n <= one vector): the lanes past n belong to the next pair.
template <typename T>
RCAR_INLINE void store_first(T* p, V<T> v, int64_t n) {
  if (n >= simd::kWidth<T>) {
    simd::store(p, v);
    return;
  }
  for (int64_t k = 0; k < n; ++k) p[k] = v[k];
}

// The pair's codes into v.code, vectorised over region lanes, with what the gradient reuses:
// v.a[w * Rp + r] = a_rw (0 in the lanes >= R), v.ga = (G a_r)_w, v.num = sum_w a_rw S[w, r],
// v.norm = |c_r|. gram: (L x L) row-major. Every lane past R is replaced by a select, never
// multiplied by 0, so whatever a vector load reads there cannot reach the results.
template <typename T>
RCAR_INLINE void vsa_codes(const PairBlock<T>& b, const T* gram, T tau, VsaBuffers<T>& v) {
  constexpr int64_t W = simd::kWidth<T>;
  const int64_t L = b.L, Rp = simd::padded<T>(b.R);
  const V<T> zero = simd::splat<T>(T(0)), one = simd::splat<T>(T(1)), tau_v = simd::splat<T>(tau);
  T* a = v.a.data();
  T* ga = v.ga.data();
  for (int64_t r = 0; r < b.R; r += W) {
    const Mask<T> real = simd::lanes_below<T>(b.R - r);
    V<T> top = simd::load(b.s + r);
    for (int64_t w = 1; w < L; ++w) top = simd::vmax<T>(top, simd::load(b.s + w * b.ld + r));
    V<T> total = zero, weighted = zero;
    for (int64_t w = 0; w < L; ++w) {
      const V<T> x = simd::load(b.s + w * b.ld + r);
      const V<T> e = real ? simd::vexp((x - top) / tau_v) : zero;
      simd::store(a + w * Rp + r, e);
      total += e;
      weighted += e * x;
    }
    const V<T> inv = one / (real ? total : one);
    for (int64_t w = 0; w < L; ++w) simd::store(a + w * Rp + r, simd::load(a + w * Rp + r) * inv);
    V<T> quad = zero;
    for (int64_t w = 0; w < L; ++w) {
      V<T> t = zero;
      for (int64_t u = 0; u < L; ++u) t += gram[w * L + u] * simd::load(a + u * Rp + r);
      simd::store(ga + w * Rp + r, t);
      quad += simd::load(a + w * Rp + r) * t;
    }
    V<T> norm = zero;
    for (int64_t k = 0; k < W; ++k) norm[k] = std::sqrt(std::max(quad[k], T(0)));  // G is PSD: only rounding < 0
    const V<T> num = weighted * inv;
    simd::store(v.num.data() + r, num);
    simd::store(v.norm.data() + r, norm);
    simd::store(v.code.data() + r, num / (norm + T(kEps)));
  }
}

template <typename T>
RCAR_INLINE T vsa_pair_score(const PairBlock<T>& b, const T* gram, const Opt<T>& o, PairScratch<T>& w) {
  vsa_codes(b, gram, o.vsa_tau, w.vsa);
  return pool_value(w.vsa.code.data(), b.R, o, w.pooled.data());
}

// The pair's score, for either coding (gram: the caption's word Gram, read by VSA only).
template <typename T>
RCAR_INLINE T pair_value(const PairBlock<T>& b, const T* gram, const Opt<T>& o, PairScratch<T>& w) {
  return o.vsa ? vsa_pair_score(b, gram, o, w) : pair_score(b, o, w);
}

// d(g x score) of a VSA pair (HEADS.md's closed form, per region times g h_r, h = dP / dx) as
//   d v_r += sum_w C[w, r] e_w,  d e_w += sum_r C[w, r] v_r + sum_w' m[w, w'] e_w',
// C[w, r] = g h_r (a_rw / den_r + dS[r, w]) written over the pair's block `coef` (the block of
// S that b reads: each lane group is read before it is written), m (L x L) accumulated: the
// |c_r| term -g h_r num_r / (|c_r| den_r^2) a_rw a_rw', with den = |c| + eps; and e_w . q =
// S[w, r] / den - num (G a)_w / (|c| den^2) needs no d-vector. |c_r| = 0 gives that term 0
// (torch's norm has gradient 0 at 0).
template <typename T>
RCAR_INLINE void vsa_pair_gradient(const PairBlock<T>& b, T* coef, const T* gram, T g, const Opt<T>& o,
                                   PairScratch<T>& w, T* m) {
  constexpr int64_t W = simd::kWidth<T>;
  VsaBuffers<T>& v = w.vsa;
  const int64_t L = b.L, Rp = simd::padded<T>(b.R);
  vsa_codes(b, gram, o.vsa_tau, v);
  T* h = v.h.data();
  pool_gradient(v.code.data(), b.R, o, h);
  for (int64_t r = 0; r < Rp; ++r) h[r] = r < b.R ? g * h[r] : T(0);
  const V<T> zero = simd::splat<T>(T(0)), one = simd::splat<T>(T(1)), tau_v = simd::splat<T>(o.vsa_tau);
  const T* a = v.a.data();
  T* eq = v.ga.data();  // (G a)_w, replaced by e_w . q
  T* beta = v.beta.data();
  for (int64_t r = 0; r < b.R; r += W) {
    const V<T> norm = simd::load(v.norm.data() + r), den = norm + T(kEps);
    const V<T> inv_norm = norm > zero ? one / norm : zero;
    const V<T> k = simd::load(v.num.data() + r) * inv_norm / (den * den);
    const V<T> hv = simd::load(h + r);
    V<T> mean_eq = zero;
    for (int64_t u = 0; u < L; ++u) {
      const V<T> e_q = simd::load(b.s + u * b.ld + r) / den - k * simd::load(eq + u * Rp + r);
      simd::store(eq + u * Rp + r, e_q);
      mean_eq += simd::load(a + u * Rp + r) * e_q;
    }
    for (int64_t u = 0; u < L; ++u) {
      const V<T> au = simd::load(a + u * Rp + r);
      const V<T> ds = au * (simd::load(eq + u * Rp + r) - mean_eq) / tau_v;
      store_first(coef + u * b.ld + r, hv * (au / den + ds), b.R - r);
      simd::store(beta + u * Rp + r, -(hv * k) * au);
    }
  }
  for (int64_t u = 0; u < L; ++u)
    for (int64_t u2 = 0; u2 < L; ++u2) {
      V<T> acc = zero;
      for (int64_t r = 0; r < Rp; r += W) acc += simd::load(beta + u * Rp + r) * simd::load(a + u2 * Rp + r);
      m[u * L + u2] += simd::hsum<T>(acc);
    }
}

// A pair without upstream gradient: its block of coefficients is 0.
template <typename T>
RCAR_INLINE void zero_block(T* coef, int64_t L, int64_t R, int64_t ld) {
  for (int64_t u = 0; u < L; ++u) std::fill(coef + u * ld, coef + u * ld + R, T(0));
}

// y[0..d) += a x[0..d)
template <typename T>
RCAR_INLINE void axpy(T* y, T a, const T* x, int64_t d) {
  constexpr int64_t W = simd::kWidth<T>;
  const V<T> av = simd::splat<T>(a);
  int64_t k = 0;
  for (; k + 2 * W <= d; k += 2 * W) {
    simd::store(y + k, simd::load(y + k) + av * simd::load(x + k));
    simd::store(y + k + W, simd::load(y + k + W) + av * simd::load(x + k + W));
  }
  for (; k + W <= d; k += W) simd::store(y + k, simd::load(y + k) + av * simd::load(x + k));
  for (; k < d; ++k) y[k] += a * x[k];
}

// Where a pair's rows live for the scatter: its words' and regions' features, and the gradient
// rows that receive them (null: that side is not accumulated in this pass).
template <typename T>
struct PairRows {
  const T* words;    // (L, d)
  const T* regions;  // (R, d)
  T* d_words;        // (L, d) or null
  T* d_regions;      // (R, d) or null
};

// One argmax link: coefficient c between the pair's word k and region r.
template <typename T>
RCAR_INLINE void scatter_link(const PairRows<T>& rows, T c, int64_t k, int64_t r, int64_t d) {
  if (rows.d_words) axpy(rows.d_words + k * d, c, rows.regions + r * d, d);
  if (rows.d_regions) axpy(rows.d_regions + r * d, c, rows.words + k * d, d);
}

// Adds the pair's links (pair_links) into its gradient rows, in a fixed order.
template <typename T>
RCAR_INLINE void scatter_links(const PairBlock<T>& b, const Opt<T>& o, const PairScratch<T>& w,
                               const PairRows<T>& rows, int64_t d) {
  if (o.t2i)
    for (int64_t k = 0; k < b.L; ++k)
      if (w.word_coef[k] != T(0)) scatter_link(rows, w.word_coef[k], k, w.word_arg[k], d);
  if (o.i2t)
    for (int64_t r = 0; r < b.R; ++r)
      if (w.region_coef[r] != T(0)) scatter_link(rows, w.region_coef[r], w.region_arg[r], r, d);
}

// ---------------------------------------------------------------------------------------------
// The problem: the ragged inputs in place, the block partition
// ---------------------------------------------------------------------------------------------

// Rows of the tiles. Forward: about 0.5 M scores per tile (1.8 MB in float32, in L2) and GEMMs
// large enough for the BLAS to run at its full rate. Backward: smaller image blocks, so that the
// per-tile partial of the image gradient (regions x d) stays cache-sized.
constexpr int64_t kTileWords = 768;
constexpr int64_t kTileRegions = 576;
constexpr int64_t kBackwardTileRegions = 288;

// A contiguous ragged (n, slots, d) batch, read in place: sequence s's real rows are its first
// len(s) rows, adjacent. offsets: running real-row counts (sequence s is real rows [offsets[s],
// offsets[s + 1]) of the batch), by which tiles and pairs are placed.
template <typename T>
struct RaggedRows {
  const T* base = nullptr;
  int64_t n = 0, slots = 0, d = 0, max_len = 0;
  std::vector<int64_t> offsets;
  const T* seq(int64_t s) const { return base + s * slots * d; }
  int64_t len(int64_t s) const { return offsets[s + 1] - offsets[s]; }
};

template <typename T>
RaggedRows<T> ragged_rows(const at::Tensor& x, const at::Tensor& lens) {
  RaggedRows<T> rows;
  rows.base = x.data_ptr<T>();
  rows.n = x.size(0);
  rows.slots = x.size(1);
  rows.d = x.size(2);
  const at::Tensor lens64 = lens.to(at::kLong).contiguous();
  const int64_t* lp = lens64.data_ptr<int64_t>();
  rows.offsets.resize(rows.n + 1, 0);
  for (int64_t s = 0; s < rows.n; ++s) {
    rows.offsets[s + 1] = rows.offsets[s] + lp[s];
    rows.max_len = std::max(rows.max_len, lp[s]);
  }
  return rows;
}

// The real rows of sequences [s0, s1), adjacent: in place when every sequence but the last is
// full (their real rows already follow each other), else copied into buf (one tile's worth).
template <typename T>
const T* block_rows(const RaggedRows<T>& x, int64_t s0, int64_t s1, std::vector<T>& buf) {
  bool adjacent = true;
  for (int64_t s = s0; s + 1 < s1 && adjacent; ++s) adjacent = x.len(s) == x.slots;
  if (adjacent) return x.seq(s0);
  buf.resize((x.offsets[s1] - x.offsets[s0]) * x.d);
  for (int64_t s = s0; s < s1; ++s)
    std::memcpy(buf.data() + (x.offsets[s] - x.offsets[s0]) * x.d, x.seq(s), sizeof(T) * x.len(s) * x.d);
  return buf.data();
}

template <typename T>
struct MaxSimProblem {
  HeadOptions opt;
  at::Tensor img, cap;  // contiguous: the rows below point into them
  int64_t n_img = 0, n_cap = 0, d = 0;
  RaggedRows<T> words, regions;
  std::vector<int64_t> cap_bounds, img_bounds;
  int64_t max_block_words = 0, max_block_regions = 0, max_block_gram = 0;

  int64_t len(int64_t j) const { return words.len(j); }
  int64_t img_len(int64_t i) const { return regions.len(i); }
  int64_t n_cap_blocks() const { return static_cast<int64_t>(cap_bounds.size()) - 1; }
  int64_t n_img_blocks() const { return static_cast<int64_t>(img_bounds.size()) - 1; }
};

int64_t largest_block(const std::vector<int64_t>& prefix, const std::vector<int64_t>& bounds) {
  int64_t largest = 0;
  for (size_t b = 0; b + 1 < bounds.size(); ++b) largest = std::max(largest, prefix[bounds[b + 1]] - prefix[bounds[b]]);
  return largest;
}

// The rows only, for the pair list.
template <typename T>
MaxSimProblem<T> make_rows(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                           const at::Tensor& img_lens, const HeadOptions& opt) {
  MaxSimProblem<T> P;
  P.opt = opt;
  P.img = img.contiguous();
  P.cap = cap.contiguous();
  P.n_img = img.size(0);
  P.n_cap = cap.size(0);
  P.d = img.size(2);
  P.words = ragged_rows<T>(P.cap, lens);
  P.regions = ragged_rows<T>(P.img, img_lens);
  return P;
}

// min_cap_blocks: the backward parallelises over caption blocks and needs a few per thread.
template <typename T>
MaxSimProblem<T> make_problem(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                              const at::Tensor& img_lens, const HeadOptions& opt, int64_t min_cap_blocks,
                              int64_t tile_regions) {
  MaxSimProblem<T> P = make_rows<T>(img, cap, lens, img_lens, opt);
  const int64_t total_words = P.words.offsets[P.n_cap];
  int64_t target = kTileWords;
  if (min_cap_blocks > 1) target = std::min(target, (total_words + min_cap_blocks - 1) / min_cap_blocks);
  P.cap_bounds = weighted_blocks(P.words.offsets, std::max<int64_t>(target, 1));
  P.img_bounds = weighted_blocks(P.regions.offsets, tile_regions);
  P.max_block_words = largest_block(P.words.offsets, P.cap_bounds);
  P.max_block_regions = largest_block(P.regions.offsets, P.img_bounds);
  if (opt.vsa) {
    std::vector<int64_t> gram_prefix(P.n_cap + 1, 0);
    for (int64_t j = 0; j < P.n_cap; ++j) gram_prefix[j + 1] = gram_prefix[j] + P.len(j) * P.len(j);
    P.max_block_gram = largest_block(gram_prefix, P.cap_bounds);
  }
  return P;
}

// One tile: captions [j0, j1) (real words w0 .. w0 + rows) x images [i0, i1) (real regions
// c0 .. c0 + cols).
struct Tile {
  int64_t j0, j1, w0, rows, i0, i1, c0, cols;
};

template <typename T>
Tile tile_of(const MaxSimProblem<T>& P, int64_t cb, int64_t ib) {
  Tile t;
  t.j0 = P.cap_bounds[cb];
  t.j1 = P.cap_bounds[cb + 1];
  t.w0 = P.words.offsets[t.j0];
  t.rows = P.words.offsets[t.j1] - t.w0;
  t.i0 = P.img_bounds[ib];
  t.i1 = P.img_bounds[ib + 1];
  t.c0 = P.regions.offsets[t.i0];
  t.cols = P.regions.offsets[t.i1] - t.c0;
  return t;
}

template <typename T>
RCAR_INLINE PairBlock<T> pair_in_tile(const MaxSimProblem<T>& P, const Tile& t, const T* scores, int64_t i,
                                      int64_t j) {
  return PairBlock<T>{scores + (P.words.offsets[j] - t.w0) * t.cols + (P.regions.offsets[i] - t.c0), P.len(j),
                      P.img_len(i), t.cols};
}

// One argmax link of a tile: coefficient c between tile word row `word` and tile region row `region`.
template <typename T>
struct Link {
  T c;
  int32_t word, region;
};

// One term c x of a gather-sum.
template <typename T>
struct Term {
  T c;
  const T* x;
};

// Per-thread buffers: the tile's scores (one vector of slack, see PairBlock), the current
// caption and image blocks' rows (in place, or copied into word_rows / region_rows), the VSA
// Grams of the caption block (L_j x L_j each, from gram_start), the pair scratch; backward: the
// caption block's word gradient (rows x d) and VSA |c| matrices (laid out like the Grams), the
// tile's links, bucketed by word row and by region row (terms + bucket starts), and the image
// gradient's per-tile partial.
template <typename T>
struct TileScratch {
  std::vector<T> scores, word_rows, region_rows, grams, d_words, d_regions, vsa_m;
  const T* words = nullptr;
  const T* regions = nullptr;
  int64_t words_of = -1, regions_of = -1;  // the blocks `words` / `regions` hold
  std::vector<int64_t> gram_start;
  PairScratch<T> pair;
  std::vector<Link<T>> links;
  std::vector<Term<T>> word_terms, region_terms;
  std::vector<int64_t> word_start, region_start;
  TileScratch(const MaxSimProblem<T>& P, bool backward)
      : scores(P.max_block_words * P.max_block_regions + simd::kWidth<T>, T(0)), grams(P.max_block_gram),
        pair(P.words.max_len, P.regions.max_len) {
    if (backward) {
      d_words.resize(P.max_block_words * P.d);
      d_regions.resize(P.max_block_regions * P.d);
      vsa_m.resize(P.max_block_gram);
      word_start.resize(P.max_block_words + 1);
      region_start.resize(P.max_block_regions + 1);
    }
  }
  const T* gram_of(const Tile& t, int64_t j) const { return grams.data() + gram_start[j - t.j0]; }
};

// The rows of tile t's caption block cb and image block ib into ts (kept while they stay the
// same), with the caption block's word Grams for VSA.
template <typename T>
void select_blocks(const MaxSimProblem<T>& P, const Tile& t, int64_t cb, int64_t ib, TileScratch<T>& ts) {
  if (ts.words_of != cb) {
    ts.words = block_rows(P.words, t.j0, t.j1, ts.word_rows);
    if (P.opt.vsa) {
      ts.gram_start.assign(1, 0);
      for (int64_t j = t.j0; j < t.j1; ++j) {
        const int64_t L = P.len(j);
        score_tile(P.words.seq(j), L, P.words.seq(j), L, P.d, ts.grams.data() + ts.gram_start.back(), L);
        ts.gram_start.push_back(ts.gram_start.back() + L * L);
      }
    }
    ts.words_of = cb;
  }
  if (ts.regions_of != ib) {
    ts.regions = block_rows(P.regions, t.i0, t.i1, ts.region_rows);
    ts.regions_of = ib;
  }
}

// scores (rows x cols) = tile words @ tile regions^T
template <typename T>
void tile_scores(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts) {
  score_tile(ts.words, t.rows, ts.regions, t.cols, P.d, ts.scores.data(), t.cols);
}

// ---------------------------------------------------------------------------------------------
// All pairs: forward
// ---------------------------------------------------------------------------------------------

template <typename T>
RCAR_INLINE void forward_tile_body(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts, T* out) {
  const Opt<T> o(P.opt);
  for (int64_t j = t.j0; j < t.j1; ++j) {
    const T* gram = o.vsa ? ts.gram_of(t, j) : nullptr;
    for (int64_t i = t.i0; i < t.i1; ++i)
      out[i * P.n_cap + j] = pair_value(pair_in_tile(P, t, ts.scores.data(), i, j), gram, o, ts.pair);
  }
}

template <typename T>
void maxsim_forward_impl(const MaxSimProblem<T>& P, T* out) {
  const bool avx2 = use_avx2_path();
  for_each_tile<TileScratch<T>>(
      P.n_cap_blocks(), P.n_img_blocks(), [&] { return std::make_unique<TileScratch<T>>(P, false); },
      [&](int64_t cb, int64_t ib, TileScratch<T>& ts) {
        const Tile t = tile_of(P, cb, ib);
        select_blocks(P, t, cb, ib, ts);
        tile_scores(P, t, ts);
        in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA { forward_tile_body(P, t, ts, out); });
      });
}

// ---------------------------------------------------------------------------------------------
// All pairs: backward
// ---------------------------------------------------------------------------------------------

template <typename T>
struct MaxSimGrads {
  at::Tensor d_img;  // (n_img, R, d): image blocks' rows added in caption-block order
  at::Tensor d_cap;  // (n_cap, Lmax, d): each caption block's rows written once, by its thread
  OrderedTurns img_turns;
  explicit MaxSimGrads(const MaxSimProblem<T>& P)
      : d_img(at::zeros_like(P.img)), d_cap(at::zeros_like(P.cap)), img_turns(P.n_img_blocks()) {}
};

template <typename T>
bool tile_has_gradient(const MaxSimProblem<T>& P, const Tile& t, const T* g) {
  return block_has_nonzero(g, P.n_cap, t.i0, t.i1, t.j0, t.j1);
}

// y = [y +] sum_t c_t x_t over d, the terms in their order (the same bits on every run), with
// U vectors of y held in registers across all terms: y is read and written once.
template <typename T>
RCAR_INLINE void gather_sum(T* y, const Term<T>* terms, int64_t n, int64_t d, bool accumulate) {
  constexpr int64_t W = simd::kWidth<T>;
  constexpr int U = 4;
  int64_t k = 0;
  for (; k + U * W <= d; k += U * W) {
    V<T> acc[U];
    for (int u = 0; u < U; ++u) acc[u] = accumulate ? simd::load(y + k + u * W) : simd::splat<T>(T(0));
    for (int64_t t = 0; t < n; ++t) {
      const V<T> c = simd::splat<T>(terms[t].c);
      const T* x = terms[t].x + k;
      for (int u = 0; u < U; ++u) acc[u] += c * simd::load(x + u * W);
    }
    for (int u = 0; u < U; ++u) simd::store(y + k + u * W, acc[u]);
  }
  for (; k + W <= d; k += W) {
    V<T> acc = accumulate ? simd::load(y + k) : simd::splat<T>(T(0));
    for (int64_t t = 0; t < n; ++t) acc += simd::splat<T>(terms[t].c) * simd::load(terms[t].x + k);
    simd::store(y + k, acc);
  }
  for (; k < d; ++k) {
    T acc = accumulate ? y[k] : T(0);
    for (int64_t t = 0; t < n; ++t) acc += terms[t].c * terms[t].x[k];
    y[k] = acc;
  }
}

// Every link of every pair of the tile with a gradient, in (caption, image, word / region) order.
template <typename T>
RCAR_INLINE void collect_tile_links(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts, const T* g) {
  const Opt<T> o(P.opt);
  ts.links.clear();
  for (int64_t j = t.j0; j < t.j1; ++j) {
    const int32_t w0 = static_cast<int32_t>(P.words.offsets[j] - t.w0);
    for (int64_t i = t.i0; i < t.i1; ++i) {
      const T gij = g[i * P.n_cap + j];
      if (gij == T(0)) continue;
      const PairBlock<T> b = pair_in_tile(P, t, ts.scores.data(), i, j);
      pair_links(b, o, gij, ts.pair);
      const int32_t r0 = static_cast<int32_t>(P.regions.offsets[i] - t.c0);
      if (o.t2i)
        for (int64_t k = 0; k < b.L; ++k)
          if (ts.pair.word_coef[k] != T(0))
            ts.links.push_back({ts.pair.word_coef[k], w0 + int32_t(k), r0 + int32_t(ts.pair.word_arg[k])});
      if (o.i2t)
        for (int64_t r = 0; r < b.R; ++r)
          if (ts.pair.region_coef[r] != T(0))
            ts.links.push_back({ts.pair.region_coef[r], w0 + int32_t(ts.pair.region_arg[r]), r0 + int32_t(r)});
    }
  }
}

// The links bucketed (stably: link order kept inside a bucket) by word row or by region row, as
// terms c x with x the other side's feature row; start (n_rows + 1) the bucket bounds.
template <typename T>
RCAR_INLINE void bucket_links(const std::vector<Link<T>>& links, bool by_word, int64_t n_rows, const T* other_rows,
                              int64_t d, std::vector<Term<T>>& terms, int64_t* start) {
  std::fill(start, start + n_rows + 1, int64_t(0));
  for (const Link<T>& l : links) ++start[(by_word ? l.word : l.region) + 1];
  for (int64_t r = 0; r < n_rows; ++r) start[r + 1] += start[r];
  terms.resize(links.size());
  std::vector<int64_t> next(start, start + n_rows);
  for (const Link<T>& l : links) {
    const int32_t row = by_word ? l.word : l.region, other = by_word ? l.region : l.word;
    terms[next[row]++] = Term<T>{l.c, other_rows + int64_t(other) * d};
  }
}

// Max coding: the tile's links added into the caption block's word gradient ts.d_words, region
// rows written into the per-tile partial ts.d_regions (rows without a link are left stale: the
// flush skips them).
template <typename T>
RCAR_INLINE void max_backward_tile(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts, const T* g) {
  const int64_t d = P.d;
  collect_tile_links(P, t, ts, g);
  const int64_t* ws = ts.word_start.data();
  const int64_t* rs = ts.region_start.data();
  bucket_links(ts.links, true, t.rows, ts.regions, d, ts.word_terms, ts.word_start.data());
  for (int64_t w = 0; w < t.rows; ++w)
    if (ws[w + 1] > ws[w]) gather_sum(ts.d_words.data() + w * d, ts.word_terms.data() + ws[w], ws[w + 1] - ws[w], d, true);
  bucket_links(ts.links, false, t.cols, ts.words, d, ts.region_terms, ts.region_start.data());
  for (int64_t r = 0; r < t.cols; ++r)
    if (rs[r + 1] > rs[r])
      gather_sum(ts.d_regions.data() + r * d, ts.region_terms.data() + rs[r], rs[r + 1] - rs[r], d, false);
}

// VSA coding: every pair's coefficients over its block of the scores (vsa_pair_gradient), the
// |c| matrices into ts.vsa_m.
template <typename T>
RCAR_INLINE void vsa_backward_tile(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts, const T* g) {
  const Opt<T> o(P.opt);
  T* scores = ts.scores.data();
  for (int64_t j = t.j0; j < t.j1; ++j) {
    const T* gram = ts.gram_of(t, j);
    T* m = ts.vsa_m.data() + ts.gram_start[j - t.j0];
    for (int64_t i = t.i0; i < t.i1; ++i) {
      const PairBlock<T> b = pair_in_tile(P, t, scores, i, j);
      T* coef = scores + (b.s - scores);
      const T gij = g[i * P.n_cap + j];
      if (gij == T(0)) zero_block(coef, b.L, b.R, b.ld);
      else vsa_pair_gradient(b, coef, gram, gij, o, ts.pair, m);
    }
  }
}

template <typename T>
RCAR_INLINE void backward_tile_body(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts, const T* g) {
  if (P.opt.vsa) vsa_backward_tile(P, t, ts, g);
  else max_backward_tile(P, t, ts, g);
}

// VSA: the coefficient tile C (over the scores) into the word gradient (+= C regions) and the
// image partial (= C^T words).
template <typename T>
void vsa_tile_products(const MaxSimProblem<T>& P, const Tile& t, TileScratch<T>& ts) {
  const at::Tensor coef = view2d(ts.scores.data(), t.rows, t.cols, t.cols);
  matmul_into(view2d(ts.d_words.data(), t.rows, P.d, P.d), coef, view2d(ts.regions, t.cols, P.d, P.d), true);
  matmul_into(view2d(ts.d_regions.data(), t.cols, P.d, P.d), coef.t(), view2d(ts.words, t.rows, P.d, P.d), false);
}

// The tile's image partial into d_img, row by row (max coding: the rows with a link only).
template <typename T>
void flush_image_partial(const MaxSimProblem<T>& P, const Tile& t, const TileScratch<T>& ts, T* d_img) {
  const int64_t d = P.d;
  const int64_t* rs = ts.region_start.data();
  for (int64_t i = t.i0; i < t.i1; ++i) {
    const int64_t first = P.regions.offsets[i] - t.c0;
    for (int64_t r = 0; r < P.img_len(i); ++r) {
      const int64_t row = first + r;
      if (!P.opt.vsa && rs[row + 1] == rs[row]) continue;  // no link: the partial row holds nothing of this tile
      T* dst = d_img + (i * P.regions.slots + r) * d;
      const T* src = ts.d_regions.data() + row * d;
      for (int64_t e = 0; e < d; ++e) dst[e] += src[e];
    }
  }
}

// The caption block's word gradient into d_cap, after the VSA |c| term (+= m_j words_j).
template <typename T>
void finish_caption_block(const MaxSimProblem<T>& P, int64_t cb, TileScratch<T>& ts, T* d_cap) {
  const int64_t j0 = P.cap_bounds[cb], j1 = P.cap_bounds[cb + 1], w0 = P.words.offsets[j0], d = P.d;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t L = P.len(j);
    T* rows = ts.d_words.data() + (P.words.offsets[j] - w0) * d;
    if (P.opt.vsa)
      matmul_into(view2d(rows, L, d, d), view2d(ts.vsa_m.data() + ts.gram_start[j - j0], L, L, L),
                  view2d(P.words.seq(j), L, d, d), true);
    std::memcpy(d_cap + j * P.words.slots * d, rows, sizeof(T) * L * d);
  }
}

// One caption block against every image block, in image-block order (see scan.cpp's backward:
// the threads run staggered by about one tile and rarely wait).
template <typename T>
void backward_caption_block(const MaxSimProblem<T>& P, int64_t cb, TileScratch<T>& ts, const T* g,
                            MaxSimGrads<T>& G, bool avx2) {
  T* d_img = G.d_img.template data_ptr<T>();
  const Tile first = tile_of(P, cb, 0);
  select_blocks(P, first, cb, 0, ts);
  std::fill(ts.d_words.begin(), ts.d_words.begin() + first.rows * P.d, T(0));
  std::fill(ts.vsa_m.begin(), ts.vsa_m.end(), T(0));
  for (int64_t ib = 0; ib < P.n_img_blocks(); ++ib) {
    const Tile t = tile_of(P, cb, ib);
    std::unique_lock<std::mutex> turn;
    if (!tile_has_gradient(P, t, g)) {
      if (!G.img_turns.wait(ib, cb, turn)) return;
      G.img_turns.pass(ib, turn);
      continue;
    }
    select_blocks(P, t, cb, ib, ts);
    tile_scores(P, t, ts);
    in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA { backward_tile_body(P, t, ts, g); });
    if (P.opt.vsa) vsa_tile_products(P, t, ts);
    if (!G.img_turns.wait(ib, cb, turn)) return;
    flush_image_partial(P, t, ts, d_img);
    G.img_turns.pass(ib, turn);
  }
  finish_caption_block(P, cb, ts, G.d_cap.template data_ptr<T>());
}

template <typename T>
std::vector<at::Tensor> maxsim_backward_impl(const MaxSimProblem<T>& P, const T* g) {
  MaxSimGrads<T> G(P);
  const bool avx2 = use_avx2_path();
  for_caption_blocks_in_order<TileScratch<T>>(
      P.n_cap_blocks(), G.img_turns, [&] { return std::make_unique<TileScratch<T>>(P, true); },
      [&](int64_t cb, TileScratch<T>& scratch) { backward_caption_block(P, cb, scratch, g, G, avx2); });
  return {G.d_img, G.d_cap};
}

// ---------------------------------------------------------------------------------------------
// Pair list
// ---------------------------------------------------------------------------------------------

// Per-thread scratch of the pair list: one pair's scores (L x R, with the vector of slack), the
// caption's Gram and |c| matrix (VSA).
template <typename T>
struct ListScratch {
  std::vector<T> scores, gram, m;
  PairScratch<T> pair;
  explicit ListScratch(const MaxSimProblem<T>& P)
      : scores(P.words.max_len * P.regions.max_len + simd::kWidth<T>, T(0)),
        gram(P.opt.vsa ? P.words.max_len * P.words.max_len : 0), m(gram.size()),
        pair(P.words.max_len, P.regions.max_len) {}
};

// Pair (i, j)'s scores into ls.scores, words as rows (and the caption's Gram for VSA).
template <typename T>
PairBlock<T> list_pair_scores(const MaxSimProblem<T>& P, int64_t i, int64_t j, ListScratch<T>& ls) {
  const int64_t L = P.len(j), R = P.img_len(i);
  score_tile(P.words.seq(j), L, P.regions.seq(i), R, P.d, ls.scores.data(), R);
  if (P.opt.vsa) score_tile(P.words.seq(j), L, P.words.seq(j), L, P.d, ls.gram.data(), L);
  return PairBlock<T>{ls.scores.data(), L, R, R};
}

constexpr int64_t kPairsPerTask = 32;

template <typename T>
RCAR_INLINE void list_forward_body(const MaxSimProblem<T>& P, const int64_t* ii, const int64_t* jj, int64_t p0,
                                   int64_t p1, ListScratch<T>& ls, T* out) {
  const Opt<T> o(P.opt);
  for (int64_t p = p0; p < p1; ++p)
    out[p] = pair_value(list_pair_scores(P, ii[p], jj[p], ls), ls.gram.data(), o, ls.pair);
}

template <typename T>
void maxsim_pairs_forward_impl(const MaxSimProblem<T>& P, const int64_t* ii, const int64_t* jj, int64_t n_pairs,
                               T* out) {
  const int64_t n_tasks = (n_pairs + kPairsPerTask - 1) / kPairsPerTask;
  std::vector<std::unique_ptr<ListScratch<T>>> scratch(team_size(n_tasks));
  const bool avx2 = use_avx2_path();
  run_tasks(n_tasks, [&](int64_t task, int thread) {
    if (!scratch[thread]) scratch[thread] = std::make_unique<ListScratch<T>>(P);
    const int64_t p0 = task * kPairsPerTask, p1 = std::min(n_pairs, p0 + kPairsPerTask);
    in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA { list_forward_body(P, ii, jj, p0, p1, *scratch[thread], out); });
  });
}

// A VSA pair's gradient on one side: the caption's rows (+= C regions + m words) or the image's
// (+= C^T words), d_rows that side's rows of the pair.
template <typename T>
void list_vsa_pair_backward(const MaxSimProblem<T>& P, const PairBlock<T>& b, int64_t i, int64_t j, T g,
                            bool caption_side, ListScratch<T>& ls, T* d_rows) {
  const Opt<T> o(P.opt);
  const int64_t L = b.L, R = b.R, d = P.d;
  std::fill(ls.m.begin(), ls.m.begin() + L * L, T(0));
  vsa_pair_gradient(b, ls.scores.data(), ls.gram.data(), g, o, ls.pair, ls.m.data());
  const at::Tensor coef = view2d(ls.scores.data(), L, R, R);
  const at::Tensor words = view2d(P.words.seq(j), L, d, d);
  if (caption_side) {
    const at::Tensor rows = view2d(d_rows, L, d, d);
    matmul_into(rows, coef, view2d(P.regions.seq(i), R, d, d), true);
    matmul_into(rows, view2d(ls.m.data(), L, L, L), words, true);
  } else {
    matmul_into(view2d(d_rows, R, d, d), coef.t(), words, true);
  }
}

// The pairs of one owner (one caption or one image), in pair order: its gradient rows are
// accumulated by this task alone, so the sums are the same bits on every run. d_out: that
// side's (n, slots, d) gradient.
template <typename T>
RCAR_INLINE void list_backward_body(const MaxSimProblem<T>& P, const int64_t* ii, const int64_t* jj, const T* g,
                                    const int64_t* order, int64_t q0, int64_t q1, bool caption_side,
                                    ListScratch<T>& ls, T* d_out) {
  const Opt<T> o(P.opt);
  const int64_t d = P.d;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t p = order[q], i = ii[p], j = jj[p];
    if (g[p] == T(0)) continue;
    const PairBlock<T> b = list_pair_scores(P, i, j, ls);
    T* d_rows = caption_side ? d_out + j * P.words.slots * d : d_out + i * P.regions.slots * d;
    if (o.vsa) {
      list_vsa_pair_backward(P, b, i, j, g[p], caption_side, ls, d_rows);
      continue;
    }
    pair_links(b, o, g[p], ls.pair);
    const PairRows<T> rows{P.words.seq(j), P.regions.seq(i), caption_side ? d_rows : nullptr,
                           caption_side ? nullptr : d_rows};
    scatter_links(b, o, ls.pair, rows, d);
  }
}

// One side's gradient (captions: owner = cap index, else images): pairs ordered by owner (stably),
// then runs of whole owners handed out as tasks of about kPairsPerTask pairs.
template <typename T>
void list_backward_side(const MaxSimProblem<T>& P, const int64_t* ii, const int64_t* jj, const T* g,
                        int64_t n_pairs, bool caption_side, std::vector<std::unique_ptr<ListScratch<T>>>& scratch,
                        T* d_rows) {
  const int64_t* owner = caption_side ? jj : ii;
  std::vector<int64_t> order(n_pairs);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return owner[a] < owner[b]; });
  std::vector<int64_t> bounds{0};
  for (int64_t q = 1; q <= n_pairs; ++q) {
    const bool owner_ends = q == n_pairs || owner[order[q]] != owner[order[q - 1]];
    if (owner_ends && (q == n_pairs || q - bounds.back() >= kPairsPerTask)) bounds.push_back(q);
  }
  const bool avx2 = use_avx2_path();
  run_tasks(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t task, int thread) {
    if (!scratch[thread]) scratch[thread] = std::make_unique<ListScratch<T>>(P);
    in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA {
      list_backward_body(P, ii, jj, g, order.data(), bounds[task], bounds[task + 1], caption_side, *scratch[thread],
                         d_rows);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

// lengths (n,) int64 CPU in [1, slots]: read before any kernel, so that none reads out of bounds.
void check_lengths(const char* name, const at::Tensor& lengths, int64_t n, int64_t slots) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == n && lengths.device().is_cpu(), "maxsim (cpu): ", name,
              " must be a CPU tensor of shape (", n, ",), got ", lengths.sizes(), " on ", lengths.device());
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()), "maxsim (cpu): ", name, " must hold integers, got ",
              lengths.scalar_type());
  if (n == 0) return;
  const at::Tensor l = lengths.to(at::kLong);
  const int64_t lo = l.min().item<int64_t>(), hi = l.max().item<int64_t>();
  TORCH_CHECK(lo >= 1 && hi <= slots, "maxsim (cpu): ", name, " must lie in [1, ", slots, "], got values in [", lo,
              ", ", hi, "]");
}

void check_inputs(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens, const at::Tensor& img_lens) {
  check_pair_inputs("maxsim (cpu)", img, cap, lens);
  check_lengths("lens", lens, cap.size(0), cap.size(1));
  check_lengths("img_lens", img_lens, img.size(0), img.size(1));
}

// ---------------------------------------------------------------------------------------------
// The wrappers' finite check of the real rows
// ---------------------------------------------------------------------------------------------

// x[0..n) all finite. x - x is exactly 0 for a finite x and NaN for an infinite or NaN one (no
// -ffast-math here, so the compiler keeps it), and a NaN stays NaN through the sums: an exact
// test, vectorised, reading each value once.
template <typename T>
RCAR_INLINE bool span_is_finite(const T* x, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  V<T> acc0 = simd::splat<T>(T(0)), acc1 = acc0;
  int64_t k = 0;
  for (; k + 2 * W <= n; k += 2 * W) {
    const V<T> a = simd::load(x + k), b = simd::load(x + k + W);
    acc0 += a - a;
    acc1 += b - b;
  }
  for (; k + W <= n; k += W) {
    const V<T> a = simd::load(x + k);
    acc0 += a - a;
  }
  T tail = 0;
  for (; k < n; ++k) tail += x[k] - x[k];
  return simd::hsum<T>(acc0 + acc1) + tail == T(0);
}

// Sequences [s0, s1): rows < len of each, rows `row_stride` apart (d values each, contiguous).
template <typename T>
RCAR_INLINE bool sequences_finite_body(const T* x, const int64_t* len, int64_t s0, int64_t s1, int64_t seq_stride,
                                       int64_t row_stride, int64_t d) {
  for (int64_t s = s0; s < s1; ++s) {
    const T* seq = x + s * seq_stride;
    if (row_stride == d) {
      if (!span_is_finite(seq, len[s] * d)) return false;
      continue;
    }
    for (int64_t r = 0; r < len[s]; ++r)
      if (!span_is_finite(seq + r * row_stride, d)) return false;
  }
  return true;
}

// Values per task of the check: large enough that a task costs more than handing it out.
constexpr int64_t kFiniteCheckGrain = 1 << 16;

template <typename T>
bool real_rows_finite_impl(const at::Tensor& x, const int64_t* len) {
  const int64_t n = x.size(0), slots = x.size(1), d = x.size(2);
  const T* base = x.data_ptr<T>();
  const bool avx2 = use_avx2_path();
  std::atomic<bool> finite{true};
  const int64_t grain = std::max<int64_t>(1, kFiniteCheckGrain / std::max<int64_t>(1, slots * d));
  at::parallel_for(0, n, grain, [&](int64_t s0, int64_t s1) {
    if (!finite.load(std::memory_order_relaxed)) return;
    bool ok = true;
    in_simd_copy(avx2, [&]() RCAR_INLINE_LAMBDA {
      ok = sequences_finite_body(base, len, s0, s1, x.stride(0), x.stride(1), d);
    });
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

at::Tensor maxsim_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                          const at::Tensor& img_lens, const MaxSimSettings& settings, std::optional<at::Tensor> out) {
  check_inputs(img, cap, lens, img_lens);
  const HeadOptions opt = parse_options(settings);
  at::Tensor result;
  if (out.has_value()) {
    result = *out;
    TORCH_CHECK(result.sizes() == at::IntArrayRef({img.size(0), cap.size(0)}) &&
                    result.scalar_type() == img.scalar_type() && result.is_contiguous() && result.device().is_cpu(),
                "maxsim (cpu): out must be a contiguous CPU (n_img, n_cap) = (", img.size(0), ", ", cap.size(0),
                ") tensor of ", img.scalar_type(), ", got ", result.sizes(), " ", result.scalar_type());
  } else {
    result = at::empty({img.size(0), cap.size(0)}, img.options());
  }
  if (result.numel() == 0) return result;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::maxsim_forward", [&] {
    const auto P = make_problem<scalar_t>(img, cap, lens, img_lens, opt, 1, kTileRegions);
    maxsim_forward_impl(P, result.data_ptr<scalar_t>());
  });
  return result;
}

std::vector<at::Tensor> maxsim_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                        const at::Tensor& lens, const at::Tensor& img_lens,
                                        const MaxSimSettings& settings) {
  check_inputs(img, cap, lens, img_lens);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == img.size(0) && grad.size(1) == cap.size(0),
              "maxsim (cpu) backward: grad must be (n_img, n_cap) = (", img.size(0), ", ", cap.size(0), "), got ",
              grad.sizes());
  const HeadOptions opt = parse_options(settings);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::maxsim_backward", [&] {
    const auto P = make_problem<scalar_t>(img, cap, lens, img_lens, opt, 4 * at::get_num_threads(),
                                          kBackwardTileRegions);
    const at::Tensor g = grad.to(img.scalar_type()).contiguous();
    grads = maxsim_backward_impl(P, g.data_ptr<scalar_t>());
  });
  return grads;
}

at::Tensor maxsim_pairs_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                                const at::Tensor& img_lens, const at::Tensor& img_idx, const at::Tensor& cap_idx,
                                const MaxSimSettings& settings) {
  check_inputs(img, cap, lens, img_lens);
  const int64_t n_pairs = img_idx.numel();
  check_pair_index("maxsim pairs (cpu)", img_idx, "img_idx", n_pairs, img.size(0));
  check_pair_index("maxsim pairs (cpu)", cap_idx, "cap_idx", n_pairs, cap.size(0));
  const HeadOptions opt = parse_options(settings);
  at::Tensor out = at::empty({n_pairs}, img.options());
  if (n_pairs == 0) return out;
  const at::Tensor ii = img_idx.contiguous(), jj = cap_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::maxsim_pairs_forward", [&] {
    const auto P = make_rows<scalar_t>(img, cap, lens, img_lens, opt);
    maxsim_pairs_forward_impl(P, ii.data_ptr<int64_t>(), jj.data_ptr<int64_t>(), n_pairs,
                              out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> maxsim_pairs_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                              const at::Tensor& lens, const at::Tensor& img_lens,
                                              const at::Tensor& img_idx, const at::Tensor& cap_idx,
                                              const MaxSimSettings& settings) {
  check_inputs(img, cap, lens, img_lens);
  const int64_t n_pairs = img_idx.numel();
  check_pair_index("maxsim pairs (cpu)", img_idx, "img_idx", n_pairs, img.size(0));
  check_pair_index("maxsim pairs (cpu)", cap_idx, "cap_idx", n_pairs, cap.size(0));
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n_pairs, "maxsim pairs (cpu) backward: grad must be (", n_pairs,
              ",), got ", grad.sizes());
  const HeadOptions opt = parse_options(settings);
  std::vector<at::Tensor> grads;
  const at::Tensor ii = img_idx.contiguous(), jj = cap_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::maxsim_pairs_backward", [&] {
    using T = scalar_t;
    const auto P = make_rows<T>(img, cap, lens, img_lens, opt);
    const at::Tensor g = grad.to(img.scalar_type()).contiguous();
    at::Tensor d_cap = at::zeros_like(P.cap), d_img = at::zeros_like(P.img);
    std::vector<std::unique_ptr<ListScratch<T>>> scratch(std::max(1, at::get_num_threads()));
    for (const bool caption_side : {true, false})
      list_backward_side(P, ii.data_ptr<int64_t>(), jj.data_ptr<int64_t>(), g.data_ptr<T>(), n_pairs, caption_side,
                         scratch, (caption_side ? d_cap : d_img).data_ptr<T>());
    grads = {d_img, d_cap};
  });
  return grads;
}

bool real_rows_finite(const at::Tensor& x, const at::Tensor& lens) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "real_rows_finite (cpu): x must be a float32 or float64 CPU tensor (n, slots, d), got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == x.size(0) && lens.device().is_cpu() &&
                  !at::isFloatingType(lens.scalar_type()),
              "real_rows_finite (cpu): lens must be an integer CPU tensor of shape (", x.size(0), ",), got ",
              lens.sizes(), " ", lens.scalar_type());
  if (x.numel() == 0) return true;
  const at::Tensor len = lens.to(at::kLong).contiguous();
  const int64_t lo = len.min().item<int64_t>(), hi = len.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi <= x.size(1), "real_rows_finite (cpu): lens must lie in [0, ", x.size(1),
              "], got values in [", lo, ", ", hi, "]");
  const at::Tensor rows = x.stride(2) == 1 ? x : x.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "rcar_cpu::real_rows_finite", [&] {
    return real_rows_finite_impl<scalar_t>(rows, len.data_ptr<int64_t>());
  });
}

}  // namespace rcar_cpu

// ---------------------------------------------------------------------------------------------
// Python bindings (rcar_fast._C), registered through csrc/bindings.h.
//   maxsim_forward_cpu: img (n_img, R, d), cap (n_cap, Lmax, d), lens (n_cap,) in [1, Lmax],
//     img_lens (n_img,) in [1, R]; padding (words >= lens[j], regions >= img_lens[i]) is never
//     read. float32 or float64 in, same dtype out (n_img, n_cap), written into `out` when given
//     (contiguous, that shape and dtype).
//   maxsim_backward_cpu: gradients of sum(grad * maxsim_forward(...)): [d img, d cap], zero at
//     the padding; the same bits on every run.
//   maxsim_pairs_forward_cpu / _backward_cpu: the same head for the pairs (img_idx[p],
//     cap_idx[p]) (int64, in range): (P,), and its backward.
RCAR_FAST_BINDINGS(cpu_maxsim, m) {
  namespace py = pybind11;
  using rcar_cpu::MaxSimSettings;
  rcar_cpu::bind::settings_class<MaxSimSettings, &MaxSimSettings::direction, &MaxSimSettings::pool, &MaxSimSettings::tau,
                                 &MaxSimSettings::leaky, &MaxSimSettings::both_scale, &MaxSimSettings::vsa,
                                 &MaxSimSettings::vsa_tau>(
      m, "MaxSimSettings", "an S-only head's options as contract codes", py::arg("direction"), py::arg("pool"),
      py::arg("tau"), py::arg("leaky"), py::arg("both_scale"), py::arg("vsa") = false, py::arg("vsa_tau") = 1.0);
  m.def("real_rows_finite_cpu", &rcar_cpu::real_rows_finite,
        "True if the rows < lens[s] of every sequence of x (n, slots, d) float32/float64 CPU are finite",
        py::arg("x"), py::arg("lens"), py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_forward_cpu", &rcar_cpu::maxsim_forward,
        "S-only head of all pairs (n_img, n_cap), fused per tile; into `out` when given", py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("img_lens"), py::arg("settings"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_backward_cpu", &rcar_cpu::maxsim_backward,
        "gradients [d img, d cap] of sum(grad * S-only head)", py::arg("grad"), py::arg("img"), py::arg("cap"),
        py::arg("lens"), py::arg("img_lens"), py::arg("settings"), py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_pairs_forward_cpu", &rcar_cpu::maxsim_pairs_forward,
        "S-only head of the pairs (img_idx[p], cap_idx[p]): (P,)", py::arg("img"), py::arg("cap"), py::arg("lens"),
        py::arg("img_lens"), py::arg("img_idx"), py::arg("cap_idx"), py::arg("settings"),
        py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_pairs_backward_cpu", &rcar_cpu::maxsim_pairs_backward,
        "gradients [d img, d cap] of sum(grad * S-only head of the pairs)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("img_lens"), py::arg("img_idx"), py::arg("cap_idx"),
        py::arg("settings"), py::call_guard<py::gil_scoped_release>());
}
