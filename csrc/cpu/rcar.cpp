// RCAR similarity head (official EncoderSimilarity) over all pairs on the CPU: the forward,
// RAR's counter-based dropout (training mode) and the fused backward (below, "Backward").
//
// A tile is one context owner against a block of query rows: t2i, one image's regions as the
// context and the real words of a caption block as queries; i2t, one caption's words as the
// context and the regions of an image block as queries. Every pair of the tile shares the
// context, so each stage is one GEMM over all the tile's query rows:
//   raw scores  S = (Q o M) C^T          rows x C
//   attended    D = alpha C              rows x d   (alpha: per-pair normalised, per-row softmax)
//   alignment   V = l2norm(W (q - l2norm(D))^2 + b)             rows x s
//   RCR         M, lambda from V (two MLPs)                    rows x d, rows
//   RAR         h per pair from V (attention pooling)           pairs x s
// The per-pair and per-row reductions in between are vectorised loops. Buffers are O(tile)
// per thread; no (pairs, Q, d) tensor exists. See SIMILARITY.md for the exact functions.
#include "cpu/bind.h"
#include "cpu/tile.h"

#include <limits>
#include <cstring>
#include <memory>
#include <numeric>
#include <mutex>
#include <tuple>
#include <utility>

// Every function passing a 32-byte vector is always_inline: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rcar_cpu {

// An RCAR head's configuration (rcar_fast.ops.rcar_cpu.native_settings).
struct RcarSettings {
  int direction;    // rcar_contract::Direction
  int regulator;    // rcar_contract::Regulator
  int64_t steps;    // the official rar_step / rcr_step / rcar_step
  double smooth;    // the first attention's softmax temperature, > 0
  bool training = false;  // training mode: RAR's dropout (p = 0.4) acts, masks from `seed`
  int64_t seed = 0;       // the dropout masks' seed (>= 0), see rcar_fast/dropout.py
};

}  // namespace rcar_cpu

namespace rcar_cpu {
namespace {
using namespace detail;
template <typename T>
using V = simd::Vec<T>;

using rcar_contract::Regulator;
using rcar_contract::kOnlyRar;
using rcar_contract::kOnlyRcr;
using rcar_contract::kCoopRcar;

struct ModuleCounts {
  int64_t alv, rcr, rar;
};

// As rcar_fast.reference.module_counts.
ModuleCounts module_counts(Regulator reg, int64_t steps) {
  TORCH_CHECK(steps >= (reg == kCoopRcar ? 1 : 0), "rcar (cpu): steps must be >= ", reg == kCoopRcar ? 1 : 0,
              " for this regulator, got ", steps);
  if (reg == kOnlyRar) return {1, 0, steps};
  if (reg == kOnlyRcr) return {steps, steps, 0};
  return {steps, steps - 1, steps};
}

// The head's weights in the compute dtype, contiguous; Linear weights are (out, in).
struct Linear {
  at::Tensor w, b;
  int64_t in() const { return w.size(1); }
  int64_t out() const { return w.size(0); }
};

struct RcrWeights {
  Linear matrix1, matrix2, smooth1, smooth2;  // rcr_matrix_w.{0,2}, rcr_smooth_w.{0,2}
};
struct RarWeights {
  Linear q, k, v;  // rar_q_w.0, rar_k_w.0, rar_v_w.0
};

struct HeadWeights {
  std::vector<Linear> alv;
  std::vector<RcrWeights> rcr;
  std::vector<RarWeights> rar;
  Linear eval;
  int64_t d = 0, s = 0, hidden = 0;  // embed dim, sim dim, widest RCR/RAR hidden layer
};

// Flat weight list from Python, in this order: per alv module (W, b); per RCR module
// (matrix.0 W, b, matrix.2 W, b, smooth.0 W, b, smooth.2 W, b); per RAR module (q W, b,
// k W, b, v W, b); then sim_eval_w (W, b).
HeadWeights unpack_weights(const std::vector<at::Tensor>& flat, const ModuleCounts& counts, at::ScalarType dtype,
                           int64_t d) {
  const size_t expected = 2 * counts.alv + 8 * counts.rcr + 6 * counts.rar + 2;
  TORCH_CHECK(flat.size() == expected, "rcar (cpu): expected ", expected, " weight tensors for ", counts.alv,
              " alignment, ", counts.rcr, " RCR and ", counts.rar, " RAR modules, got ", flat.size());
  size_t next = 0;
  auto linear = [&](int64_t in, int64_t out, const char* what) {
    Linear l{flat[next].to(dtype).contiguous(), flat[next + 1].to(dtype).contiguous()};
    next += 2;
    TORCH_CHECK(l.w.dim() == 2 && l.b.dim() == 1 && l.b.size(0) == l.w.size(0),
                "rcar (cpu): ", what, " must be a Linear weight (out, in) and bias (out,)");
    TORCH_CHECK((in < 0 || l.w.size(1) == in) && (out < 0 || l.w.size(0) == out), "rcar (cpu): ", what,
                " has shape ", l.w.sizes(), ", expected (", out, ", ", in, ") (-1: any)");
    return l;
  };
  HeadWeights h;
  h.d = d;
  for (int64_t m = 0; m < counts.alv; ++m) h.alv.push_back(linear(d, -1, "alv_modules[m].sim_transform_w"));
  TORCH_CHECK(counts.alv > 0 || counts.rar == 0, "rcar (cpu): RAR modules need an alignment module");
  h.s = counts.alv > 0 ? h.alv[0].out() : flat[flat.size() - 2].size(-1);  // else sim_eval_w's input
  for (const Linear& a : h.alv) TORCH_CHECK(a.out() == h.s, "rcar (cpu): alignment modules disagree on sim_dim");
  for (int64_t m = 0; m < counts.rcr; ++m) {
    RcrWeights r;
    r.matrix1 = linear(h.s, -1, "rcr_matrix_w.0");
    r.matrix2 = linear(r.matrix1.out(), d, "rcr_matrix_w.2");
    r.smooth1 = linear(h.s, -1, "rcr_smooth_w.0");
    r.smooth2 = linear(r.smooth1.out(), 1, "rcr_smooth_w.2");
    h.hidden = std::max({h.hidden, r.matrix1.out(), r.smooth1.out()});
    h.rcr.push_back(r);
  }
  for (int64_t m = 0; m < counts.rar; ++m) {
    RarWeights r;
    r.q = linear(h.s, h.s, "rar_q_w.0");
    r.k = linear(h.s, h.s, "rar_k_w.0");
    r.v = linear(h.s, 1, "rar_v_w.0");
    h.rar.push_back(r);
  }
  h.eval = linear(h.s, 1, "sim_eval_w");
  return h;
}

// ---------------------------------------------------------------------------------------------
// Row-wise vector loops (d and s need not be multiples of the vector width: scalar tails)
// ---------------------------------------------------------------------------------------------

template <typename T>
RCAR_INLINE T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  V<T> acc0 = simd::splat<T>(T(0)), acc1 = acc0;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 += simd::load(a + i) * simd::load(b + i);
    acc1 += simd::load(a + i + W) * simd::load(b + i + W);
  }
  for (; i + W <= n; i += W) acc0 += simd::load(a + i) * simd::load(b + i);
  T total = simd::hsum<T>(acc0 + acc1);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

template <typename T>
RCAR_INLINE void scale(T* x, T factor, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) simd::store(x + i, simd::load(x + i) * factor);
  for (; i < n; ++i) x[i] *= factor;
}

// x <- x / (|x| + eps) for each of `rows` rows of length n.
template <typename T>
RCAR_INLINE void l2normalize_rows(T* x, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = x + r * n;
    scale(row, T(1) / (std::sqrt(dot(row, row, n)) + T(kEps)), n);
  }
}

// out = q o m (the modulated queries).
template <typename T>
RCAR_INLINE void modulate(const T* q, const T* m, T* out, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) simd::store(out + i, simd::load(q + i) * simd::load(m + i));
  for (; i < n; ++i) out[i] = q[i] * m[i];
}

// Per row: D <- (q - D / (|D| + eps))^2, the alignment vector's input.
template <typename T>
RCAR_INLINE void squared_unit_difference(const T* q, T* D, int64_t rows, int64_t d) {
  constexpr int64_t W = simd::kWidth<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + r * d;
    T* dr = D + r * d;
    const T inv = T(1) / (std::sqrt(dot(dr, dr, d)) + T(kEps));
    int64_t i = 0;
    for (; i + W <= d; i += W) {
      const V<T> diff = simd::load(qr + i) - simd::load(dr + i) * inv;
      simd::store(dr + i, diff * diff);
    }
    for (; i < d; ++i) {
      const T diff = qr[i] - dr[i] * inv;
      dr[i] = diff * diff;
    }
  }
}

// M <- clamp(t + M, -1, 1) (first: M is all ones before).
template <typename T>
RCAR_INLINE void update_modulation(const T* t, T* M, int64_t n, bool first) {
  constexpr int64_t W = simd::kWidth<T>;
  const V<T> lo = simd::splat<T>(T(-1)), hi = simd::splat<T>(T(1));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> prev = first ? hi : simd::load(M + i);
    simd::store(M + i, simd::vmin<T>(simd::vmax<T>(simd::load(t + i) + prev, lo), hi));
  }
  for (; i < n; ++i) M[i] = std::min(std::max(t[i] + (first ? T(1) : M[i]), T(-1)), T(1));
}

// ---------------------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------------------

// A tile: `rows` query rows (contiguous, rows x d) split into pairs by seg (seg[p] .. seg[p+1]),
// a context of C vectors (C x d). Pair p's score goes to out[p * out_stride].
template <typename T>
struct RcarTile {
  const T* query;
  int64_t rows;
  const T* context;
  int64_t C;
  const int64_t* seg;
  int64_t pairs;
  T* out;
  int64_t out_stride;
  int64_t pair_base, pair_step;  // pair p's global id (i * n_cap + j): pair_base + p * pair_step
  const int64_t* pair_ids = nullptr;  // else (a pair list's tile): pair p's global id pair_ids[p]

  int64_t pair_id(int64_t p) const { return pair_ids ? pair_ids[p] : pair_base + p * pair_step; }
};

template <typename T>
struct RcarScratch {
  std::vector<T> S, lam, D, M, Vm, H, K, h, hq, inv, rowval, key_scale, question_scale;
  RcarScratch(int64_t max_rows, int64_t max_ctx, int64_t max_pairs, const HeadWeights& hw, bool with_m,
              bool dropout)
      : S(max_rows * simd::padded<T>(max_ctx)), lam(max_rows), D(max_rows * hw.d),
        M(with_m ? max_rows * hw.d : 0), Vm(max_rows * hw.s), H(max_rows * std::max(hw.hidden, hw.s)),
        K(max_rows * hw.s), h(max_pairs * hw.s), hq(max_pairs * hw.s), inv(simd::padded<T>(max_ctx)),
        rowval(max_rows), key_scale(dropout ? max_rows * hw.s : 0), question_scale(dropout ? max_pairs * hw.s : 0) {}
};

struct HeadConfig {
  Regulator reg;
  int64_t steps;
  double smooth;
  bool dropout;    // training mode: RAR's dropout masks (rar_dropout_row_key) are applied
  uint64_t seed;   // the masks' seed
};

// ---------------------------------------------------------------------------------------------
// RAR dropout: a counter-based mask, the same function as rcar_fast/dropout.py. An element
// (seed, module, which, pair, row, channel) is kept, scaled by 1/(1-p), iff its 32-bit hash is
// >= p * 2^32. which 0: rar_k_w's output (row = the query row of the pair); which 1: rar_q_w's
// (row 0). pair = i * n_cap + j. No state: a backward recomputes the forward's masks.
// ---------------------------------------------------------------------------------------------

constexpr double kDropoutP = rcar_contract::kRarDropoutP;
constexpr uint32_t kDropoutThreshold = rcar_contract::kRarDropoutThreshold;  // floor(p * 2^32)

inline uint32_t hash32(uint32_t x) {
  x = ((x >> 16) ^ x) * rcar_contract::kDropoutHashMultiplier;
  x = ((x >> 16) ^ x) * rcar_contract::kDropoutHashMultiplier;
  return (x >> 16) ^ x;
}

// Folds a 64-bit counter into the hash state, low word then high word.
inline uint32_t mix_in(uint32_t h, uint64_t v) {
  h = hash32(h ^ static_cast<uint32_t>(v & 0xffffffffu));
  return hash32(h ^ static_cast<uint32_t>(v >> 32));
}

inline uint32_t rar_dropout_row_key(uint64_t seed, int64_t module, int which, int64_t pair, int64_t row) {
  uint32_t h = mix_in(0u, seed);
  h = mix_in(h, static_cast<uint64_t>(2 * module + which));
  h = mix_in(h, static_cast<uint64_t>(pair));
  return mix_in(h, static_cast<uint64_t>(row));
}

// out[e] = 0 (dropped) or 1/(1-p) (kept) for channels e < n of a row.
template <typename T>
inline void rar_dropout_scales(uint32_t row_key, T* out, int64_t n) {
  const T keep = T(1.0 / (1.0 - kDropoutP));
  for (int64_t e = 0; e < n; ++e)
    out[e] = hash32(row_key ^ static_cast<uint32_t>(e)) >= kDropoutThreshold ? keep : T(0);
}

// The dropout scales of one RAR module for a tile: keys (rows x s) and questions (pairs x s).
template <typename T>
void rar_dropout_tile(const RcarTile<T>& t, uint64_t seed, int64_t module, int64_t s, T* key_scale,
                      T* question_scale) {
  for (int64_t p = 0; p < t.pairs; ++p) {
    const int64_t pair = t.pair_id(p);
    for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r)
      rar_dropout_scales(rar_dropout_row_key(seed, module, 0, pair, r - t.seg[p]), key_scale + r * s, s);
    rar_dropout_scales(rar_dropout_row_key(seed, module, 1, pair, 0), question_scale + p * s, s);
  }
}

// S (rows x Cp) = (Q [o M]) C^T, padding columns zeroed.
template <typename T>
RCAR_INLINE void raw_scores(const RcarTile<T>& t, RcarScratch<T>& w, int64_t d, int64_t Cp, bool modulated) {
  const T* q = t.query;
  if (modulated) {
    modulate(t.query, w.M.data(), w.D.data(), t.rows * d);
    q = w.D.data();
  }
  score_tile(q, t.rows, t.context, t.C, d, w.S.data(), Cp);
}

// alpha in place of S: clipped_l2norm over each pair's query rows per context item, then a
// softmax over the context of lambda_row * a for each row.
template <typename T>
RCAR_INLINE void attention_weights(const RcarTile<T>& t, RcarScratch<T>& w, int64_t Cp) {
  constexpr int64_t W = simd::kWidth<T>;
  const T slope = T(kLeakySlope);
  const int64_t last = Cp - W;
  const simd::Mask<T> tail = simd::lanes_below<T>(t.C - last);
  const V<T> zero = simd::splat<T>(T(0));
  const V<T> minus_inf = simd::splat<T>(-std::numeric_limits<T>::infinity());
  T* S = w.S.data();
  T* inv = w.inv.data();
  for (int64_t p = 0; p < t.pairs; ++p) {
    const int64_t r0 = t.seg[p], r1 = t.seg[p + 1];
    query_axis_norms<T, true>(S, r0, r1, Cp, slope, inv);  // clipped_l2norm's divisor
    inverse_norms(inv, Cp, inv);
    for (int64_t r = r0; r < r1; ++r) {
      T* sr = S + r * Cp;
      const T lam = w.lam[r];
      V<T> best = minus_inf;
      for (int64_t v = 0; v <= last; v += W) {
        V<T> a = simd::leak<T>(simd::load(sr + v), slope) * simd::load(inv + v);
        simd::store(sr + v, a);
        if (v == last) a = tail ? a : minus_inf;
        best = simd::vmax<T>(best, a);
      }
      const T top = simd::hmax<T>(best);
      V<T> total = zero;
      for (int64_t v = 0; v <= last; v += W) {
        // lambda (a - top) <= 0: shifted before scaling, so a huge lambda cannot overflow
        V<T> e = simd::vexp((simd::load(sr + v) - top) * lam);
        if (v == last) e = tail ? e : zero;
        simd::store(sr + v, e);
        total += e;
      }
      const T factor = T(1) / simd::hsum<T>(total);
      for (int64_t v = 0; v <= last; v += W) simd::store(sr + v, simd::load(sr + v) * factor);
    }
  }
}

// D = the attended context alpha C (rows x d), not yet normalised.
template <typename T>
RCAR_INLINE void attend(const RcarTile<T>& t, RcarScratch<T>& w, int64_t d, int64_t Cp) {
  matmul_into(view2d(w.D.data(), t.rows, d, d), view2d(w.S.data(), t.rows, t.C, Cp),
              view2d(t.context, t.C, d, d), false);
}

// Vm = l2norm(alv((q - l2norm(ctx))^2)) for the current (M, lambda).
template <typename T>
RCAR_INLINE void alignment(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw, int64_t step,
                           int64_t Cp, bool modulated) {
  const int64_t d = hw.d, s = hw.s;
  raw_scores(t, w, d, Cp, modulated);
  attention_weights(t, w, Cp);
  attend(t, w, d, Cp);
  squared_unit_difference(t.query, w.D.data(), t.rows, d);
  const Linear& alv = hw.alv[step];
  linear_into(view2d(w.Vm.data(), t.rows, s, s), view2d(w.D.data(), t.rows, d, d), alv.w, alv.b);
  l2normalize_rows(w.Vm.data(), t.rows, s);
}

// RCR: M <- clamp(tanh(matrix(V)) + M, -1, 1), lambda <- relu(smooth(V) + lambda).
template <typename T>
RCAR_INLINE void correspondence_update(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw,
                                       const RcrWeights& rcr, bool first) {
  const int64_t d = hw.d, s = hw.s, rows = t.rows;
  const at::Tensor vm = view2d(w.Vm.data(), rows, s, s);
  const int64_t h1 = rcr.matrix1.out();
  at::Tensor hidden = view2d(w.H.data(), rows, h1, h1);
  linear_into(hidden, vm, rcr.matrix1.w, rcr.matrix1.b);
  hidden.tanh_();
  at::Tensor update = view2d(w.D.data(), rows, d, d);
  linear_into(update, hidden, rcr.matrix2.w, rcr.matrix2.b);
  update.tanh_();
  update_modulation(w.D.data(), w.M.data(), rows * d, first);
  const int64_t h2 = rcr.smooth1.out();
  at::Tensor hs = view2d(w.H.data(), rows, h2, h2);
  linear_into(hs, vm, rcr.smooth1.w, rcr.smooth1.b);
  hs.tanh_();
  const T* ws2 = rcr.smooth2.w.data_ptr<T>();
  const T bs2 = rcr.smooth2.b.data_ptr<T>()[0];
  for (int64_t r = 0; r < rows; ++r) {
    // relu(...), kept finite like the initial temperature (temperature_in)
    const T updated = std::max(dot(w.H.data() + r * h2, ws2, h2) + bs2 + w.lam[r], T(0));
    w.lam[r] = std::min(updated, std::numeric_limits<T>::max());
  }
}

// h_p = mean of the pair's alignment vectors.
template <typename T>
RCAR_INLINE void mean_alignment(const RcarTile<T>& t, RcarScratch<T>& w, int64_t s) {
  for (int64_t p = 0; p < t.pairs; ++p) {
    T* hp = w.h.data() + p * s;
    std::fill(hp, hp + s, T(0));
    for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
      const T* vr = w.Vm.data() + r * s;
      for (int64_t e = 0; e < s; ++e) hp[e] += vr[e];
    }
    scale(hp, T(1) / T(t.seg[p + 1] - t.seg[p]), s);
  }
}

// RAR: h_p <- l2norm(sum_r softmax_r(v . (tanh(k V_r) o tanh(q h_p))) V_r).
template <typename T>
RCAR_INLINE void aggregation_update(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw,
                                    const RarWeights& rar, const HeadConfig& cfg, int64_t module) {
  const int64_t s = hw.s, rows = t.rows;
  at::Tensor keys = view2d(w.K.data(), rows, s, s);
  linear_into(keys, view2d(w.Vm.data(), rows, s, s), rar.k.w, rar.k.b);
  keys.tanh_();
  at::Tensor question = view2d(w.hq.data(), t.pairs, s, s);
  linear_into(question, view2d(w.h.data(), t.pairs, s, s), rar.q.w, rar.q.b);
  question.tanh_();
  if (cfg.dropout) {
    rar_dropout_tile(t, cfg.seed, module, s, w.key_scale.data(), w.question_scale.data());
    keys.mul_(view2d(w.key_scale.data(), rows, s, s));
    question.mul_(view2d(w.question_scale.data(), t.pairs, s, s));
  }
  const T* wv = rar.v.w.data_ptr<T>();
  const T bv = rar.v.b.data_ptr<T>()[0];
  T* logits = w.rowval.data();
  for (int64_t p = 0; p < t.pairs; ++p) {
    T* qp = w.hq.data() + p * s;
    for (int64_t e = 0; e < s; ++e) qp[e] *= wv[e];  // v . (k o q) = k . (q o v)
    const int64_t r0 = t.seg[p], r1 = t.seg[p + 1];
    T top = -std::numeric_limits<T>::infinity();
    for (int64_t r = r0; r < r1; ++r) {
      logits[r] = dot(w.K.data() + r * s, qp, s) + bv;
      top = std::max(top, logits[r]);
    }
    T total = 0;
    for (int64_t r = r0; r < r1; ++r) {
      logits[r] = std::exp(logits[r] - top);
      total += logits[r];
    }
    T* hp = w.h.data() + p * s;
    std::fill(hp, hp + s, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T weight = logits[r] / total;
      const T* vr = w.Vm.data() + r * s;
      for (int64_t e = 0; e < s; ++e) hp[e] += weight * vr[e];
    }
    l2normalize_rows(hp, 1, s);
  }
}

// sigmoid(sim_eval_w(h_p)) for every pair.
template <typename T>
RCAR_INLINE void final_scores(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw) {
  const T* we = hw.eval.w.data_ptr<T>();
  const T be = hw.eval.b.data_ptr<T>()[0];
  for (int64_t p = 0; p < t.pairs; ++p) {
    const T logit = dot(w.h.data() + p * hw.s, we, hw.s) + be;
    t.out[p * t.out_stride] = T(1) / (T(1) + std::exp(-logit));
  }
}

// only_rcr's score: mean over the pair's queries of cos(q, l2norm(ctx)).
template <typename T>
RCAR_INLINE void cosine_scores(const RcarTile<T>& t, RcarScratch<T>& w, int64_t d, int64_t Cp, bool modulated) {
  raw_scores(t, w, d, Cp, modulated);
  attention_weights(t, w, Cp);
  attend(t, w, d, Cp);
  for (int64_t p = 0; p < t.pairs; ++p) {
    T total = 0;
    for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
      const T* q = t.query + r * d;
      const T* c = w.D.data() + r * d;
      const T cn = std::sqrt(dot(c, c, d));
      const T inv = T(1) / (cn + T(kEps));  // unit = c * inv
      const T qn = std::sqrt(dot(q, q, d));
      total += dot(q, c, d) * inv / std::max(qn * (cn * inv), T(kEps));
    }
    t.out[p * t.out_stride] = total / T(t.seg[p + 1] - t.seg[p]);
  }
}

template <typename T>
RCAR_INLINE void rcar_tile_body(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw,
                                const HeadConfig& cfg) {
  const int64_t Cp = simd::padded<T>(t.C);
  std::fill(w.lam.begin(), w.lam.begin() + t.rows, temperature_in<T>(cfg.smooth));
  bool modulated = false;
  if (cfg.reg == kOnlyRar) {
    alignment(t, w, hw, 0, Cp, false);
    mean_alignment(t, w, hw.s);
    for (int64_t m = 0; m < static_cast<int64_t>(hw.rar.size()); ++m)
      aggregation_update(t, w, hw, hw.rar[m], cfg, m);
    final_scores(t, w, hw);
    return;
  }
  if (cfg.reg == kOnlyRcr) {
    for (int64_t step = 0; step < cfg.steps; ++step) {
      alignment(t, w, hw, step, Cp, modulated);
      correspondence_update(t, w, hw, hw.rcr[step], !modulated);
      modulated = true;
    }
    cosine_scores(t, w, hw.d, Cp, modulated);
    return;
  }
  for (int64_t step = 0; step < cfg.steps; ++step) {
    alignment(t, w, hw, step, Cp, modulated);
    if (step == 0) mean_alignment(t, w, hw.s);
    if (step < cfg.steps - 1) {
      correspondence_update(t, w, hw, hw.rcr[step], !modulated);
      modulated = true;
    }
    aggregation_update(t, w, hw, hw.rar[step], cfg, step);
  }
  final_scores(t, w, hw);
}

template <typename T>
RCAR_TARGET_AVX2 void rcar_tile_avx2(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw,
                                     const HeadConfig& cfg) {
  rcar_tile_body(t, w, hw, cfg);
}

template <typename T>
void rcar_tile_base(const RcarTile<T>& t, RcarScratch<T>& w, const HeadWeights& hw, const HeadConfig& cfg) {
  rcar_tile_body(t, w, hw, cfg);
}

constexpr int64_t kTileRows = 512;  // query rows per tile

// ---------------------------------------------------------------------------------------------
// Tile layout, shared by the forward and the backward
// ---------------------------------------------------------------------------------------------

// Query blocks (t2i caption blocks, i2t image blocks) x context owners; task = block * owners
// + owner (owners vary fastest: consecutive tasks reuse the query block).
template <typename T>
struct TileLayout {
  bool t2i;
  int64_t n_img, R, d, n_cap;
  const T* img;
  const T* words;
  const std::vector<int64_t>* off;
  std::vector<int64_t> bounds, image_seg;
  int64_t max_rows = 0, max_pairs = 0, max_ctx = 0, n_blocks = 0, n_owners = 0;

  TileLayout(bool t2i_, const at::Tensor& img_c, const PackedWords<T>& w, int64_t n_cap_, int64_t tile_rows)
      : t2i(t2i_), n_img(img_c.size(0)), R(img_c.size(1)), d(img_c.size(2)), n_cap(n_cap_),
        img(img_c.data_ptr<T>()), words(w.words.template data_ptr<T>()), off(&w.offsets) {
    if (t2i) {
      bounds = weighted_blocks(*off, tile_rows);
    } else {
      const int64_t per_block = std::max<int64_t>(1, tile_rows / R);
      for (int64_t i = 0; i < n_img; i += per_block) bounds.push_back(i);
      bounds.push_back(n_img);
      for (int64_t p = 0; p <= per_block; ++p) image_seg.push_back(p * R);
    }
    n_blocks = static_cast<int64_t>(bounds.size()) - 1;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t pairs = bounds[b + 1] - bounds[b];
      max_pairs = std::max(max_pairs, pairs);
      max_rows = std::max(max_rows, t2i ? (*off)[bounds[b + 1]] - (*off)[bounds[b]] : pairs * R);
    }
    n_owners = t2i ? n_img : n_cap;
    max_ctx = t2i ? R : w.max_len;
  }
  int64_t tasks() const { return n_owners * n_blocks; }

  // The tile of a task; seg holds its segments. out: the (n_img, n_cap) scores (may be null).
  RcarTile<T> tile(int64_t task, std::vector<int64_t>& seg, T* out) const {
    const int64_t b = task / n_owners, owner = task % n_owners;
    const auto& o = *off;
    if (t2i) {
      const int64_t j0 = bounds[b], j1 = bounds[b + 1];
      seg.clear();
      for (int64_t j = j0; j <= j1; ++j) seg.push_back(o[j] - o[j0]);
      return RcarTile<T>{words + o[j0] * d, o[j1] - o[j0], img + owner * R * d, R, seg.data(), j1 - j0,
                         out ? out + owner * n_cap + j0 : nullptr, 1, owner * n_cap + j0, 1};
    }
    const int64_t i0 = bounds[b], i1 = bounds[b + 1];
    return RcarTile<T>{img + i0 * R * d, (i1 - i0) * R, words + o[owner] * d, o[owner + 1] - o[owner],
                       image_seg.data(), i1 - i0, out ? out + i0 * n_cap + owner : nullptr, n_cap,
                       i0 * n_cap + owner, n_cap};
  }
  // Row offsets of a task's query rows and context rows in the packed img / words arrays.
  int64_t query_row(int64_t task) const {
    const int64_t b = task / n_owners;
    return t2i ? (*off)[bounds[b]] : bounds[b] * R;
  }
  int64_t context_row(int64_t task) const {
    const int64_t owner = task % n_owners;
    return t2i ? owner * R : (*off)[owner];
  }
};

template <typename T>
void rcar_forward_impl(const at::Tensor& img_in, const at::Tensor& cap, const at::Tensor& lens, bool t2i,
                       const HeadWeights& hw, const HeadConfig& cfg, at::Tensor& out) {
  const at::Tensor img = img_in.contiguous();
  const PackedWords<T> words = pack_words<T>(cap.stride(2) == 1 ? cap : cap.contiguous(), lens);
  const TileLayout<T> layout(t2i, img, words, cap.size(0), kTileRows);
  const int64_t n_tasks = layout.tasks();
  const bool with_m = !hw.rcr.empty();
  std::vector<std::unique_ptr<RcarScratch<T>>> scratch(team_size(n_tasks));
  const bool avx2 = use_avx2_path();
  T* out_ptr = out.data_ptr<T>();
  run_tasks(n_tasks, [&](int64_t task, int thread) {
    if (!scratch[thread])
      scratch[thread] = std::make_unique<RcarScratch<T>>(layout.max_rows, layout.max_ctx, layout.max_pairs, hw,
                                                         with_m, cfg.dropout);
    std::vector<int64_t> seg;
    const RcarTile<T> t = layout.tile(task, seg, out_ptr);
    if (avx2) rcar_tile_avx2(t, *scratch[thread], hw, cfg);
    else rcar_tile_base(t, *scratch[thread], hw, cfg);
  });
}

// =============================================================================================
// Backward (flash style): each tile recomputes its forward, keeping the tile's intermediates
// (O(tile) per thread, never all pairs), then runs the chain rule back through it. Gradients
// of the query and context rows and of every weight go to per-part buffers: the tasks are cut
// into a fixed number of contiguous parts (one per thread of the team), each part summing its
// tasks in order, and the parts are added in part order, so the result does not depend on
// which thread ran what: two runs with the same thread count are bit-identical.
// =============================================================================================

// Per-thread tensors reused from tile to tile: take() hands out slot after slot, each grown to
// the largest size asked of it (views of one allocation, no allocation per tile).
// Tests set this (set_poison_buffers): every buffer handed out (per-tile scratch, the forward's
// output) is NaN-filled first, so an entry read before it was written shows up as NaN.
std::atomic<bool>& poison_buffers() {
  static std::atomic<bool> on{false};
  return on;
}

struct TilePool {
  std::vector<at::Tensor> slots;
  size_t next = 0;
  at::TensorOptions opts;
  explicit TilePool(at::TensorOptions o) : opts(o) {}
  void reset() { next = 0; }
  at::Tensor take(int64_t rows, int64_t cols) {
    if (next == slots.size()) slots.push_back(at::empty({0}, opts));
    at::Tensor& slot = slots[next++];
    if (slot.numel() < rows * cols) slot = at::empty({rows * cols}, opts);
    at::Tensor view = slot.narrow(0, 0, rows * cols).view({rows, cols});
    if (poison_buffers().load()) view.fill_(std::numeric_limits<double>::quiet_NaN());
    return view;
  }
  at::Tensor zeros(int64_t rows, int64_t cols) { return take(rows, cols).zero_(); }
};

// Temporaries: the slots taken while a PoolScope lives are handed out again once it ends
// (a stack), so a tile's pool holds what is live at once, not every buffer it ever used.
// No view taken inside the scope may be used after it.
struct PoolScope {
  TilePool& pool;
  const size_t mark;
  explicit PoolScope(TilePool& p) : pool(p), mark(p.next) {}
  ~PoolScope() { pool.next = mark; }
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;
};

// One cross attention of the tile, as the backward needs it.
struct SavedAttention {
  at::Tensor M;      // rows x d modulation, undefined: all ones
  at::Tensor lam;    // rows, the temperatures
  at::Tensor L;      // rows x C, leaky(raw scores)
  at::Tensor inv;    // pairs x C, 1 / (norm + eps) of L over each pair's rows
  at::Tensor norm;   // pairs x C
  at::Tensor alpha;  // rows x C, the attention weights
  at::Tensor D;      // rows x d, the attended context
  at::Tensor dnorm;  // rows, |D|
  at::Tensor V, znorm;  // rows x s alignment vectors and the norms of their pre-images
};
struct SavedRcr {
  at::Tensor H1, G1, Tm;  // tanh outputs: rows x 2s, rows x s/2, rows x d
};
struct SavedRar {
  at::Tensor Kt, Qt, key_scale, question_scale, weight, gnorm;  // tanh outputs, dropout, softmax, |g|
};

// Buffers for the gradients of the head's weights, same structure as HeadWeights: make(tensor)
// gives each one (at::zeros_like, at::empty_like).
template <typename Make>
HeadWeights weights_like(const HeadWeights& hw, Make make) {
  HeadWeights g = hw;
  auto like = [&](Linear& l) { l = Linear{make(l.w), make(l.b)}; };
  for (auto& a : g.alv) like(a);
  for (auto& r : g.rcr) { like(r.matrix1); like(r.matrix2); like(r.smooth1); like(r.smooth2); }
  for (auto& r : g.rar) { like(r.q); like(r.k); like(r.v); }
  like(g.eval);
  return g;
}

inline HeadWeights zeros_like_weights(const HeadWeights& hw) {
  return weights_like(hw, [](const at::Tensor& t) { return at::zeros_like(t); });
}

// The flat list in unpack_weights' order.
inline std::vector<at::Tensor> flatten_weights(const HeadWeights& hw) {
  std::vector<at::Tensor> flat;
  auto add = [&](const Linear& l) { flat.push_back(l.w); flat.push_back(l.b); };
  for (const auto& a : hw.alv) add(a);
  for (const auto& r : hw.rcr) { add(r.matrix1); add(r.matrix2); add(r.smooth1); add(r.smooth2); }
  for (const auto& r : hw.rar) { add(r.q); add(r.k); add(r.v); }
  add(hw.eval);
  return flat;
}

// The backward's result when no pair has a gradient: zeros for img, cap and every weight.
inline std::vector<at::Tensor> zero_gradients(const at::Tensor& img, const at::Tensor& cap, const HeadWeights& hw) {
  std::vector<at::Tensor> result{at::zeros_like(img), at::zeros_like(cap)};
  for (const at::Tensor& w : flatten_weights(zeros_like_weights(hw))) result.push_back(w);
  return result;
}

// Linear backward: dW += dY^T X, db += colsum dY; returns nothing (dX is the caller's GEMM).
inline void linear_weight_grads(Linear& g, const at::Tensor& dY, const at::Tensor& X) {
  g.w.addmm_(dY.t(), X);
  g.b.add_(dY.sum(0));
}

// ---------------------------------------------------------------------------------------------
// The recording forward's and the backward's element loops. Each is always_inline and runs
// inside BackwardTile::vectorised, which pastes it into an AVX2+FMA and a baseline copy (one
// small pair of copies per loop, not one per whole function: compile time stays minutes).
// Written with simd::Vec where a loop holds selects (clamps, leaky, relu masks), which GCC
// would not auto-vectorise; n need not be a multiple of the vector width (scalar tails).
// ---------------------------------------------------------------------------------------------

// Backward of y = z / (|z| + eps) per row, given y, |z| and dy: dz in place of dy.
template <typename T>
RCAR_INLINE void unit_rows_backward(T* dy, const T* y, const T* znorm, int64_t rows, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  for (int64_t r = 0; r < rows; ++r) {
    T* g = dy + r * n;
    const T* v = y + r * n;
    const T zn = znorm[r], den = zn + T(kEps);
    // d/dz of z * f(|z|): dy f + z (dy . z) f'(|z|) / |z|, written with y = z f
    const T proj = zn > 0 ? dot(g, v, n) * den / zn : T(0);
    const T inv = T(1) / den;
    int64_t e = 0;
    for (; e + W <= n; e += W) simd::store(g + e, (simd::load(g + e) - simd::load(v + e) * proj) * inv);
    for (; e < n; ++e) g[e] = (g[e] - v[e] * proj) * inv;
  }
}

// unit_rows_backward given z (rows x n) instead of y = z / (|z| + eps), which need not be kept.
template <typename T>
RCAR_INLINE void unit_rows_backward_from_z(T* dy, const T* z, const T* znorm, int64_t rows, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  for (int64_t r = 0; r < rows; ++r) {
    T* g = dy + r * n;
    const T* zr = z + r * n;
    const T zn = znorm[r], inv = T(1) / (zn + T(kEps));
    // (dy . y) (|z| + eps) / |z| = (dy . z) / |z|; y proj = z (proj inv)
    const T coef = zn > 0 ? dot(g, zr, n) / zn * inv : T(0);
    int64_t e = 0;
    for (; e + W <= n; e += W) simd::store(g + e, (simd::load(g + e) - simd::load(zr + e) * coef) * inv);
    for (; e < n; ++e) g[e] = (g[e] - zr[e] * coef) * inv;
  }
}

// x <- leaky(x) for n values.
template <typename T>
RCAR_INLINE void leaky_in_place(T* x, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  const T slope = T(kLeakySlope);
  int64_t i = 0;
  for (; i + W <= n; i += W) simd::store(x + i, simd::leak<T>(simd::load(x + i), slope));
  for (; i < n; ++i) x[i] = x[i] > 0 ? x[i] : x[i] * slope;
}

// al = softmax over c < n of lam * L[c] inv[c] (shifted by the max before scaling, as the
// forward kernel: a huge lambda cannot overflow).
template <typename T>
RCAR_INLINE void scaled_softmax_row(const T* L, const T* inv, T lam, int64_t n, T* al) {
  constexpr int64_t W = simd::kWidth<T>;
  T top = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  if (n >= W) {
    V<T> best = simd::splat<T>(top);
    for (; c + W <= n; c += W) best = simd::vmax<T>(best, simd::load(L + c) * simd::load(inv + c));
    top = simd::hmax<T>(best);
  }
  for (; c < n; ++c) top = std::max(top, L[c] * inv[c]);
  V<T> total = simd::splat<T>(T(0));
  for (c = 0; c + W <= n; c += W) {
    const V<T> e = simd::vexp((simd::load(L + c) * simd::load(inv + c) - top) * lam);
    simd::store(al + c, e);
    total += e;
  }
  T sum = simd::hsum<T>(total);
  for (; c < n; ++c) sum += (al[c] = std::exp((L[c] * inv[c] - top) * lam));
  scale(al, T(1) / sum, n);
}

// out = x * factor (n values).
template <typename T>
RCAR_INLINE void scaled_copy(const T* x, T factor, T* out, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) simd::store(out + i, simd::load(x + i) * factor);
  for (; i < n; ++i) out[i] = x[i] * factor;
}

// out = q - D * factor, squared when `square` (n values).
template <typename T>
RCAR_INLINE void query_difference(const T* q, const T* D, T factor, bool square, T* out, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> diff = simd::load(q + i) - simd::load(D + i) * factor;
    simd::store(out + i, square ? diff * diff : diff);
  }
  for (; i < n; ++i) {
    const T diff = q[i] - D[i] * factor;
    out[i] = square ? diff * diff : diff;
  }
}

// m = clamp(tm + prev, -1, 1), prev all ones when null.
template <typename T>
RCAR_INLINE void clamped_modulation(const T* tm, const T* prev, T* m, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  const V<T> lo = simd::splat<T>(T(-1)), hi = simd::splat<T>(T(1));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> p = prev ? simd::load(prev + i) : hi;
    simd::store(m + i, simd::vmin<T>(simd::vmax<T>(simd::load(tm + i) + p, lo), hi));
  }
  for (; i < n; ++i) m[i] = std::min(std::max(tm[i] + (prev ? prev[i] : T(1)), T(-1)), T(1));
}

// Backward of M' = clamp(Tm + M, -1, 1), Tm = tanh(pre): dm <- dm where |Tm + M| <= 1, else 0
// (the gradient of both Tm and M); dpre = (1 - Tm^2) dm. prev (M) all ones when null.
template <typename T>
RCAR_INLINE void clamp_tanh_backward(const T* tm, const T* prev, T* dm, T* dpre, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  const V<T> one = simd::splat<T>(T(1)), zero = simd::splat<T>(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> t = simd::load(tm + i);
    const V<T> sum = t + (prev ? simd::load(prev + i) : one);
    const V<T> g = simd::vmax<T>(sum, -sum) <= one ? simd::load(dm + i) : zero;
    simd::store(dm + i, g);
    simd::store(dpre + i, (one - t * t) * g);
  }
  for (; i < n; ++i) {
    if (!(std::abs(tm[i] + (prev ? prev[i] : T(1))) <= T(1))) dm[i] = T(0);
    dpre[i] = (T(1) - tm[i] * tm[i]) * dm[i];
  }
}

// dy <- dy (1 - y^2): through y = tanh(x), n values.
template <typename T>
RCAR_INLINE void tanh_backward(T* dy, const T* y, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  const V<T> one = simd::splat<T>(T(1));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> t = simd::load(y + i);
    simd::store(dy + i, simd::load(dy + i) * (one - t * t));
  }
  for (; i < n; ++i) dy[i] *= T(1) - y[i] * y[i];
}

// Through X = (Q - u)^2 given dX: dQ += 2 (Q - u) dX, dX <- -2 (Q - u) dX (du).
template <typename T>
RCAR_INLINE void square_backward(const T* diff, T* dx, T* dq, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> v = simd::load(diff + i) * simd::load(dx + i) * T(2);
    simd::store(dq + i, simd::load(dq + i) + v);
    simd::store(dx + i, -v);
  }
  for (; i < n; ++i) {
    const T v = T(2) * diff[i] * dx[i];
    dq[i] += v;
    dx[i] = -v;
  }
}

// Through Qm = Q o M given dQm: dQ += dQm M and, dM non-null, dM += dQm Q.
template <typename T>
RCAR_INLINE void modulation_backward(const T* dqm, const T* m, const T* q, T* dq, T* dm, int64_t n) {
  constexpr int64_t W = simd::kWidth<T>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> g = simd::load(dqm + i);
    simd::store(dq + i, simd::load(dq + i) + g * simd::load(m + i));
    if (dm) simd::store(dm + i, simd::load(dm + i) + g * simd::load(q + i));
  }
  for (; i < n; ++i) {
    dq[i] += dqm[i] * m[i];
    if (dm) dm[i] += dqm[i] * q[i];
  }
}

// One query row of the attention softmax backward: row holds dalpha (n values) and becomes
// dA = lam * dE, dE = alpha (dalpha - alpha . dalpha); adds dA L to dinv; returns
// sum_c dE L inv (the gradient of lambda).
template <typename T>
RCAR_INLINE T softmax_row_backward(const T* al, const T* L, const T* inv, T lam, int64_t n, T* row, T* dinv) {
  constexpr int64_t W = simd::kWidth<T>;
  const T sdot = dot(al, row, n);
  V<T> acc = simd::splat<T>(T(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V<T> l = simd::load(L + c);
    const V<T> dE = simd::load(al + c) * (simd::load(row + c) - sdot);
    acc += dE * l * simd::load(inv + c);
    const V<T> dA = dE * lam;
    simd::store(row + c, dA);
    simd::store(dinv + c, simd::load(dinv + c) + dA * l);
  }
  T dlam = simd::hsum<T>(acc);
  for (; c < n; ++c) {
    const T dE = al[c] * (row[c] - sdot);
    dlam += dE * L[c] * inv[c];
    row[c] = dE * lam;
    dinv[c] += row[c] * L[c];
  }
  return dlam;
}

// One query row through the column normalisation and leaky: row holds dA and becomes dS =
// leaky'(S) (dA inv + coef L); L > 0 iff the raw score is.
template <typename T>
RCAR_INLINE void normalisation_row_backward(const T* L, const T* inv, const T* coef, int64_t n, T* row) {
  constexpr int64_t W = simd::kWidth<T>;
  const T slope = T(kLeakySlope);
  const V<T> zero = simd::splat<T>(T(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V<T> l = simd::load(L + c);
    const V<T> x = simd::load(row + c) * simd::load(inv + c) + simd::load(coef + c) * l;
    simd::store(row + c, l > zero ? x : x * slope);
  }
  for (; c < n; ++c) {
    const T x = row[c] * inv[c] + coef[c] * L[c];
    row[c] = L[c] > 0 ? x : x * slope;
  }
}

template <typename T>
struct TileGrads {
  T* dquery;  // rows x d, accumulated (the contexts' gradients: ContextGroup::dcontext)
  HeadWeights* dw;
};

// The pairs [p0, p1) of a tile that attend to one context (C x d). An all-pairs tile is one
// group; a pair list's tile spans several context owners, one group each: the cross
// attentions run per group, every per-row stage (the MLPs) over the whole tile.
template <typename T>
struct ContextGroup {
  const T* context;
  int64_t C, p0, p1;
  T* dcontext;  // C x d, accumulated (unused by a forward-only pass)
};

template <typename T>
std::vector<ContextGroup<T>> single_group(const RcarTile<T>& t, T* dcontext) {
  return {ContextGroup<T>{t.context, t.C, 0, t.pairs, dcontext}};
}

// Everything the recording forward of a tile keeps for its backward.
struct TileRecord {
  std::vector<SavedAttention> att;  // one per alignment step (only_rcr: then the final attention)
  std::vector<SavedRcr> rcrs;
  std::vector<SavedRar> rars;
  std::vector<at::Tensor> hs;  // the pair vector h before each RAR module, then after the last
};

template <typename T>
struct BackwardTile {
  const RcarTile<T>& t;
  const HeadWeights& hw;
  const HeadConfig& cfg;
  TilePool& pool;
  std::vector<ContextGroup<T>> groups;
  at::Tensor Q;  // rows x d view
  int64_t N, Cs, P, d, s;  // Cs: the row stride of the rows x C buffers, the widest context
  bool avx2;               // the element loops' copy (vectorised)

  BackwardTile(const RcarTile<T>& tile, const HeadWeights& w, const HeadConfig& c, TilePool& p,
               std::vector<ContextGroup<T>> context_groups)
      : t(tile), hw(w), cfg(c), pool(p), groups(std::move(context_groups)),
        Q(view2d(tile.query, tile.rows, w.d, w.d)), N(tile.rows), Cs(0), P(tile.pairs), d(w.d), s(w.s),
        avx2(use_avx2_path()) {
    for (const auto& G : groups) Cs = std::max(Cs, G.C);
  }

  // Runs loop() (a RCAR_INLINE_LAMBDA over the element loops above) in its AVX2 or baseline copy.
  template <typename F>
  void vectorised(F&& loop) const {
    in_simd_copy(avx2, loop);
  }

  int64_t pair_rows(int64_t p) const { return t.seg[p + 1] - t.seg[p]; }
  at::Tensor context(const ContextGroup<T>& G) const { return view2d(G.context, G.C, d, d); }
  // The group's rows of a rows x (Cs or d) buffer, its first `cols` columns.
  at::Tensor group_rows(const at::Tensor& x, const ContextGroup<T>& G, int64_t cols) const {
    return x.narrow(0, t.seg[G.p0], t.seg[G.p1] - t.seg[G.p0]).narrow(1, 0, cols);
  }

  // ---- recording forward ------------------------------------------------------------------

  // Q o M into a pool tensor.
  at::Tensor modulated_queries(const at::Tensor& M) {
    at::Tensor out = pool.take(N, d);
    at::mul_out(out, Q, M);
    return out;
  }

  SavedAttention attention(const at::Tensor& M, const at::Tensor& lam) {
    SavedAttention a;
    a.M = M;
    a.lam = lam;
    a.L = pool.take(N, Cs);
    a.inv = pool.take(P, Cs);
    a.norm = pool.take(P, Cs);
    a.alpha = pool.take(N, Cs);
    a.D = pool.take(N, d);
    a.dnorm = pool.take(N, 1);
    PoolScope temporaries(pool);
    at::Tensor Qm = Q;
    if (M.defined()) Qm = modulated_queries(M);
    T* L = a.L.data_ptr<T>();
    T* inv = a.inv.data_ptr<T>();
    T* nrm = a.norm.data_ptr<T>();
    T* al = a.alpha.data_ptr<T>();
    const T* lm = lam.data_ptr<T>();
    for (const auto& G : groups) {
      const int64_t C = G.C;
      at::Tensor Lg = group_rows(a.L, G, C);
      at::mm_out(Lg, group_rows(Qm, G, d), context(G).t());
      vectorised([&]() RCAR_INLINE_LAMBDA {
        for (int64_t r = t.seg[G.p0]; r < t.seg[G.p1]; ++r) leaky_in_place(L + r * Cs, C);
        for (int64_t p = G.p0; p < G.p1; ++p) {
          // L is leaky already: slope 1 (the identity) in the shared norm primitive
          query_axis_norms<T, true>(L, t.seg[p], t.seg[p + 1], Cs, T(1), nrm + p * Cs, C);
          inverse_norms(nrm + p * Cs, C, inv + p * Cs);
          for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r)
            scaled_softmax_row(L + r * Cs, inv + p * Cs, lm[r], C, al + r * Cs);
        }
      });
      at::Tensor Dg = group_rows(a.D, G, d);
      at::mm_out(Dg, group_rows(a.alpha, G, C), context(G));
    }
    at::Tensor dn = a.dnorm;
    at::linalg_vector_norm_out(dn, a.D, 2, {1}, true);
    return a;
  }

  // u = D / (|D| + eps) per row into a pool tensor; from_query: Q - u instead, squared when
  // `square` (one pass each, no temporaries).
  at::Tensor unit_context(const SavedAttention& a, bool from_query = false, bool square = false) {
    at::Tensor out = pool.take(N, d);
    unit_context_into(a, out, from_query, square);
    return out;
  }

  // unit_context into out (rows x d, contiguous).
  void unit_context_into(const SavedAttention& a, const at::Tensor& out, bool from_query, bool square) {
    const T* D = a.D.data_ptr<T>();
    const T* dn = a.dnorm.data_ptr<T>();
    T* o = out.data_ptr<T>();
    vectorised([&]() RCAR_INLINE_LAMBDA {
      for (int64_t r = 0; r < N; ++r) {
        const T inv = T(1) / (dn[r] + T(kEps));
        if (from_query) query_difference(t.query + r * d, D + r * d, inv, square, o + r * d, d);
        else scaled_copy(D + r * d, inv, o + r * d, d);
      }
    });
  }

  // X = (Q - D / (|D| + eps))^2, the alignment's input.
  at::Tensor squared_difference(const SavedAttention& a) { return unit_context(a, true, true); }

  void alignment(SavedAttention& a, const Linear& alv) {
    a.V = pool.take(N, s);
    a.znorm = pool.take(N, 1);
    {
      PoolScope temporaries(pool);
      linear_into(a.V, squared_difference(a), alv.w, alv.b);
    }
    at::Tensor zn = a.znorm;
    at::linalg_vector_norm_out(zn, a.V, 2, {1}, true);
    a.V.div_(a.znorm + T(kEps));
  }

  // RCR: returns (M', lambda'); saves the tanh outputs.
  std::pair<at::Tensor, at::Tensor> correspondence(const SavedAttention& a, const RcrWeights& rcr, SavedRcr& out) {
    out.H1 = pool.take(N, rcr.matrix1.out());
    linear_into(out.H1, a.V, rcr.matrix1.w, rcr.matrix1.b);
    out.H1.tanh_();
    out.Tm = pool.take(N, d);
    linear_into(out.Tm, out.H1, rcr.matrix2.w, rcr.matrix2.b);
    out.Tm.tanh_();
    at::Tensor M = pool.take(N, d);  // clamp(Tm + M_prev, -1, 1), M_prev all ones at first
    const T* tm = out.Tm.data_ptr<T>();
    const T* prev_m = a.M.defined() ? a.M.data_ptr<T>() : nullptr;
    T* m = M.data_ptr<T>();
    vectorised([&]() RCAR_INLINE_LAMBDA { clamped_modulation(tm, prev_m, m, N * d); });
    out.G1 = pool.take(N, rcr.smooth1.out());
    linear_into(out.G1, a.V, rcr.smooth1.w, rcr.smooth1.b);
    out.G1.tanh_();
    at::Tensor lam = pool.take(N, 1).view({N});
    const T* g1 = out.G1.data_ptr<T>();
    const T* ws2 = rcr.smooth2.w.data_ptr<T>();
    const T bs2 = rcr.smooth2.b.data_ptr<T>()[0];
    const T* prev = a.lam.data_ptr<T>();
    T* nl = lam.data_ptr<T>();
    const int64_t h2 = rcr.smooth1.out();
    for (int64_t r = 0; r < N; ++r)
      nl[r] = std::min(std::max(dot(g1 + r * h2, ws2, h2) + bs2 + prev[r], T(0)), std::numeric_limits<T>::max());
    return {M, lam};
  }

  at::Tensor mean_rows(const at::Tensor& V) {
    at::Tensor h = pool.take(P, s);
    for (int64_t p = 0; p < P; ++p) h[p].copy_(V.narrow(0, t.seg[p], pair_rows(p)).mean(0));
    return h;
  }

  // RAR module `module` on (V, h): returns the new h; saves what its backward needs.
  at::Tensor aggregation(const at::Tensor& V, const at::Tensor& h, const RarWeights& rar, int64_t module,
                         SavedRar& out) {
    out.Kt = pool.take(N, s);
    linear_into(out.Kt, V, rar.k.w, rar.k.b);
    out.Kt.tanh_();
    out.Qt = pool.take(P, s);
    linear_into(out.Qt, h, rar.q.w, rar.q.b);
    out.Qt.tanh_();
    if (cfg.dropout) {
      out.key_scale = pool.take(N, s);
      out.question_scale = pool.take(P, s);
      rar_dropout_tile(t, cfg.seed, module, s, out.key_scale.data_ptr<T>(), out.question_scale.data_ptr<T>());
    }
    out.weight = pool.take(N, 1).view({N});
    out.gnorm = pool.take(P, 1).view({P});
    at::Tensor hn = pool.take(P, s);
    PoolScope temporaries(pool);
    at::Tensor Kk = out.Kt, Qh = out.Qt;
    if (cfg.dropout) {
      Kk = pool.take(N, s).copy_(out.Kt).mul_(out.key_scale);
      Qh = pool.take(P, s).copy_(out.Qt).mul_(out.question_scale);
    }
    const T* wv = rar.v.w.data_ptr<T>();
    const T bv = rar.v.b.data_ptr<T>()[0];
    const T* kk = Kk.data_ptr<T>();
    const T* qh = Qh.data_ptr<T>();
    const T* v = V.data_ptr<T>();
    T* w = out.weight.data_ptr<T>();
    T* hp = hn.data_ptr<T>();
    std::vector<T> qv(s);
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t e = 0; e < s; ++e) qv[e] = qh[p * s + e] * wv[e];
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
        w[r] = dot(kk + r * s, qv.data(), s) + bv;
        top = std::max(top, w[r]);
      }
      T total = 0;
      for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) total += (w[r] = std::exp(w[r] - top));
      T* g = hp + p * s;
      std::fill(g, g + s, T(0));
      for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
        w[r] /= total;
        for (int64_t e = 0; e < s; ++e) g[e] += w[r] * v[r * s + e];
      }
      const T gn = std::sqrt(dot(g, g, s));
      out.gnorm.data_ptr<T>()[p] = gn;
      scale(g, T(1) / (gn + T(kEps)), s);
    }
    return hn;
  }

  // ---- backward pieces --------------------------------------------------------------------

  // dy <- dy (1 - y^2) for y = tanh(x), both contiguous pool tensors of one shape.
  void tanh_backward_of(at::Tensor& dy, const at::Tensor& y) const {
    T* g = dy.data_ptr<T>();
    const T* v = y.data_ptr<T>();
    const int64_t n = dy.numel();
    vectorised([&]() RCAR_INLINE_LAMBDA { tanh_backward(g, v, n); });
  }

  // Through one cross attention, given dD (rows x d, consumed): accumulates dQ, dC; adds to
  // dM (rows x d) and dlam (rows) when the attention's M / lambda are variables (defined).
  void attention_backward(const SavedAttention& a, at::Tensor dD, const TileGrads<T>& g, at::Tensor dM,
                          at::Tensor dlam) {
    PoolScope temporaries(pool);
    at::Tensor Qm = Q;
    if (a.M.defined()) Qm = modulated_queries(a.M);
    at::Tensor dalpha = pool.take(N, Cs);
    at::Tensor dQm = pool.take(N, d);
    for (const auto& G : groups) group_attention_backward(a, G, dD, Qm, dalpha, dQm, dlam);
    if (a.M.defined()) {
      const T* dqm = dQm.data_ptr<T>();
      const T* m = a.M.data_ptr<T>();
      T* dm = dM.defined() ? dM.data_ptr<T>() : nullptr;
      vectorised([&]() RCAR_INLINE_LAMBDA { modulation_backward(dqm, m, t.query, g.dquery, dm, N * d); });
    } else {
      view2d(g.dquery, N, d, d).add_(dQm);
    }
  }

  // attention_backward for the pairs of one context group: adds to its context's gradient and
  // to dlam, writes the group's rows of dQm (the gradient of the modulated queries).
  void group_attention_backward(const SavedAttention& a, const ContextGroup<T>& G, const at::Tensor& dD,
                                const at::Tensor& Qm, const at::Tensor& dalpha_all, const at::Tensor& dQm,
                                const at::Tensor& dlam) {
    const int64_t C = G.C;
    const at::Tensor Cx = context(G);
    at::Tensor dC = view2d(G.dcontext, C, d, d);
    at::Tensor dalpha = group_rows(dalpha_all, G, C);
    const at::Tensor dDg = group_rows(dD, G, d);
    at::mm_out(dalpha, dDg, Cx.t());
    dC.addmm_(group_rows(a.alpha, G, C).t(), dDg);
    const T* L = a.L.data_ptr<T>();
    const T* inv = a.inv.data_ptr<T>();
    const T* nrm = a.norm.data_ptr<T>();
    const T* al = a.alpha.data_ptr<T>();
    const T* lm = a.lam.data_ptr<T>();
    T* da = dalpha_all.data_ptr<T>();  // becomes dA, then dS
    T* dl = dlam.defined() ? dlam.data_ptr<T>() : nullptr;
    std::vector<T> dinv(C), coef(C);
    vectorised([&]() RCAR_INLINE_LAMBDA {
      for (int64_t p = G.p0; p < G.p1; ++p) {
        std::fill(dinv.begin(), dinv.end(), T(0));
        for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
          const T dlr = softmax_row_backward(al + r * Cs, L + r * Cs, inv + p * Cs, lm[r], C, da + r * Cs, dinv.data());
          if (dl) dl[r] += dlr;
        }
        // inv = 1 / (|L_c| + eps): d|L_c| = -dinv inv^2, dL += d|L_c| L / |L_c|
        for (int64_t c = 0; c < C; ++c) {
          const T n = nrm[p * Cs + c], i = inv[p * Cs + c];
          coef[c] = n > 0 ? -dinv[c] * i * i / n : T(0);
        }
        for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r)
          normalisation_row_backward(L + r * Cs, inv + p * Cs, coef.data(), C, da + r * Cs);
      }
    });
    // dS -> dQm = dS C, dC += dS^T Qm
    const at::Tensor Qmg = group_rows(Qm, G, d);
    dC.addmm_(dalpha.t(), Qmg);
    at::Tensor dQmg = group_rows(dQm, G, d);
    at::mm_out(dQmg, dalpha, Cx);
  }

  // From the gradient with respect to u = D / (|D| + eps) (consumed) to the attention's inputs.
  void unit_context_backward(const SavedAttention& a, at::Tensor du, const TileGrads<T>& g, at::Tensor dM,
                             at::Tensor dlam) {
    T* gu = du.data_ptr<T>();
    const T* D = a.D.data_ptr<T>();
    const T* dn = a.dnorm.data_ptr<T>();
    vectorised([&]() RCAR_INLINE_LAMBDA { unit_rows_backward_from_z(gu, D, dn, N, d); });
    attention_backward(a, du, g, dM, dlam);
  }

  // Through alv(step) given dV (rows x s, consumed).
  void alignment_backward(const SavedAttention& a, at::Tensor dV, const Linear& alv, Linear& dalv,
                          const TileGrads<T>& g, at::Tensor dM, at::Tensor dlam) {
    vectorised([&]() RCAR_INLINE_LAMBDA {
      unit_rows_backward(dV.data_ptr<T>(), a.V.data_ptr<T>(), a.znorm.data_ptr<T>(), N, s);  // dZ
    });
    PoolScope temporaries(pool);
    at::Tensor dX = pool.take(N, d);
    at::mm_out(dX, dV, alv.w);
    {
      PoolScope differences(pool);
      // one buffer: X = (Q - u)^2 for the weight gradient, then Q - u in its place
      const at::Tensor diff = squared_difference(a);
      linear_weight_grads(dalv, dV, diff);
      unit_context_into(a, diff, true, false);
      // X = (Q - u)^2: dQ += 2 (Q - u) dX, du = -2 (Q - u) dX (in place of dX)
      const T* df = diff.data_ptr<T>();
      T* dx = dX.data_ptr<T>();
      vectorised([&]() RCAR_INLINE_LAMBDA { square_backward(df, dx, g.dquery, N * d); });
    }
    unit_context_backward(a, dX, g, dM, dlam);
  }

  // RCR backward: given dM' (rows x d) and dlam' (rows) of its outputs, adds to dV; returns
  // the gradients of its inputs M, lambda in place of dM', dlam' (the clamp's and relu's pass).
  void correspondence_backward(const SavedAttention& a, const SavedRcr& sv, const SavedAttention& next,
                               const RcrWeights& rcr, RcrWeights& drcr, at::Tensor dM, at::Tensor dlam,
                               at::Tensor dV) {
    // M' = clamp(T + M, -1, 1): the gradient passes where T + M lies in [-1, 1] (dM becomes
    // the gradient of both T and M); T = tanh(pre2): dpre2 = (1 - T^2) dM
    PoolScope temporaries(pool);
    at::Tensor dpre2 = pool.take(N, d);
    const T* tm = sv.Tm.data_ptr<T>();
    const T* m = a.M.defined() ? a.M.data_ptr<T>() : nullptr;
    T* dm = dM.data_ptr<T>();
    T* dp = dpre2.data_ptr<T>();
    vectorised([&]() RCAR_INLINE_LAMBDA { clamp_tanh_backward(tm, m, dm, dp, N * d); });
    linear_weight_grads(drcr.matrix2, dpre2, sv.H1);
    at::Tensor dpre1 = pool.take(N, rcr.matrix1.out());
    at::mm_out(dpre1, dpre2, rcr.matrix2.w);
    tanh_backward_of(dpre1, sv.H1);
    linear_weight_grads(drcr.matrix1, dpre1, a.V);
    dV.addmm_(dpre1, rcr.matrix1.w);
    // lambda' = relu(G1 . ws2 + bs2 + lambda): passes where lambda' > 0
    at::Tensor pass = next.lam.gt(0).to(dlam.scalar_type());
    dlam.mul_(pass);
    drcr.smooth2.w.addmm_(dlam.view({1, N}), sv.G1);
    drcr.smooth2.b.add_(dlam.sum());
    at::Tensor dG1 = pool.take(N, rcr.smooth1.out());
    at::mm_out(dG1, dlam.view({N, 1}), rcr.smooth2.w);
    tanh_backward_of(dG1, sv.G1);
    linear_weight_grads(drcr.smooth1, dG1, a.V);
    dV.addmm_(dG1, rcr.smooth1.w);
  }

  // RAR backward: given dh' (pairs x s, consumed), adds to dV; writes dh (of its input h).
  void aggregation_backward(const at::Tensor& V, const at::Tensor& h, const at::Tensor& hn, const SavedRar& sv,
                            const RarWeights& rar, RarWeights& drar, at::Tensor dhn, at::Tensor dV, at::Tensor dh) {
    PoolScope temporaries(pool);
    vectorised([&]() RCAR_INLINE_LAMBDA {
      unit_rows_backward(dhn.data_ptr<T>(), hn.data_ptr<T>(), sv.gnorm.data_ptr<T>(), P, s);  // dg
    });
    at::Tensor Kk = sv.Kt, Qh = sv.Qt;
    if (cfg.dropout) {
      Kk = pool.take(N, s).copy_(sv.Kt).mul_(sv.key_scale);
      Qh = pool.take(P, s).copy_(sv.Qt).mul_(sv.question_scale);
    }
    const T* kk = Kk.data_ptr<T>();
    const T* qh = Qh.data_ptr<T>();
    const T* v = V.data_ptr<T>();
    const T* w = sv.weight.data_ptr<T>();
    const T* dg = dhn.data_ptr<T>();
    const T* wv = rar.v.w.data_ptr<T>();
    T* dv = dV.data_ptr<T>();
    at::Tensor dlogit = pool.take(N, 1).view({N});
    T* dlo = dlogit.data_ptr<T>();
    at::Tensor dKk = pool.take(N, s);
    at::Tensor dQh = pool.zeros(P, s);
    T* dk = dKk.data_ptr<T>();
    T* dq = dQh.data_ptr<T>();
    T* dwv = drar.v.w.data_ptr<T>();
    T dbv = 0;
    // plain loops over s: vectorised by the compiler inside each copy
    vectorised([&]() RCAR_INLINE_LAMBDA {
      for (int64_t p = 0; p < P; ++p) {
        const T* gp = dg + p * s;
        T wsum = 0;
        for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
          for (int64_t e = 0; e < s; ++e) dv[r * s + e] += w[r] * gp[e];
          dlo[r] = dot(gp, v + r * s, s);  // d weight
          wsum += w[r] * dlo[r];
        }
        for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
          const T dl = w[r] * (dlo[r] - wsum);
          dlo[r] = dl;
          dbv += dl;
          for (int64_t e = 0; e < s; ++e) {
            dwv[e] += dl * kk[r * s + e] * qh[p * s + e];
            dk[r * s + e] = dl * wv[e] * qh[p * s + e];
            dq[p * s + e] += dl * wv[e] * kk[r * s + e];
          }
        }
      }
    });
    drar.v.b.data_ptr<T>()[0] += dbv;
    if (cfg.dropout) {
      dKk.mul_(sv.key_scale);
      dQh.mul_(sv.question_scale);
    }
    tanh_backward_of(dKk, sv.Kt);
    linear_weight_grads(drar.k, dKk, V);
    dV.addmm_(dKk, rar.k.w);
    tanh_backward_of(dQh, sv.Qt);
    linear_weight_grads(drar.q, dQh, h);
    at::mm_out(dh, dQh, rar.q.w);
  }

  // sigmoid(we . h + be) backward: dh (pairs x s) for the tile's output gradients go.
  at::Tensor final_backward(const at::Tensor& h, const T* go, Linear& deval) {
    at::Tensor dh = pool.take(P, s);
    const T* we = hw.eval.w.data_ptr<T>();
    const T be = hw.eval.b.data_ptr<T>()[0];
    const T* hp = h.data_ptr<T>();
    T* dwe = deval.w.data_ptr<T>();
    T dbe = 0;
    T* dhp = dh.data_ptr<T>();
    for (int64_t p = 0; p < P; ++p) {
      const T score = T(1) / (T(1) + std::exp(-(dot(hp + p * s, we, s) + be)));
      const T dl = go[p] * score * (T(1) - score);
      dbe += dl;
      for (int64_t e = 0; e < s; ++e) {
        dwe[e] += dl * hp[p * s + e];
        dhp[p * s + e] = dl * we[e];
      }
    }
    deval.b.data_ptr<T>()[0] += dbe;
    return dh;
  }

  // only_rcr's mean of cos(q, u) backward: the gradient of u (rows x d); adds dQ.
  at::Tensor cosine_backward(const SavedAttention& a, const T* go, const TileGrads<T>& g) {
    const at::Tensor u = unit_context(a);
    at::Tensor du = pool.take(N, d);
    const T* up = u.data_ptr<T>();
    const T* q = t.query;
    T* dup = du.data_ptr<T>();
    T* dq = g.dquery;
    for (int64_t p = 0; p < P; ++p) {
      const T dr = go[p] / T(pair_rows(p));
      for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
        const T* qr = q + r * d;
        const T* ur = up + r * d;
        const T qn = std::sqrt(dot(qr, qr, d)), un = std::sqrt(dot(ur, ur, d)), qu = dot(qr, ur, d);
        const T den = qn * un;
        T cq_u, cq_q, cu_q, cu_u;  // dr/dq = cq_u u + cq_q q, dr/du = cu_q q + cu_u u
        if (den >= T(kEps)) {
          cq_u = T(1) / den;
          cq_q = qn > 0 ? -qu / (den * qn * qn) : T(0);
          cu_q = T(1) / den;
          cu_u = un > 0 ? -qu / (den * un * un) : T(0);
        } else {
          cq_u = cu_q = T(1) / T(kEps);
          cq_q = cu_u = 0;
        }
        for (int64_t e = 0; e < d; ++e) {
          dq[r * d + e] += dr * (cq_u * ur[e] + cq_q * qr[e]);
          dup[r * d + e] = dr * (cu_q * qr[e] + cu_u * ur[e]);
        }
      }
    }
    return du;
  }

  // ---- the whole tile ---------------------------------------------------------------------

  // The recording forward: every step's intermediates, in the pool (reset here).
  TileRecord record() {
    pool.reset();
    TileRecord rec;
    at::Tensor lam0 = pool.take(N, 1).view({N}).fill_(temperature_in<T>(cfg.smooth));
    const at::Tensor none;
    rec.rcrs.resize(hw.rcr.size());
    rec.rars.resize(hw.rar.size());
    if (cfg.reg == kOnlyRar) {
      rec.att.push_back(attention(none, lam0));
      alignment(rec.att[0], hw.alv[0]);
      rec.hs.push_back(mean_rows(rec.att[0].V));
      for (size_t m = 0; m < hw.rar.size(); ++m)
        rec.hs.push_back(aggregation(rec.att[0].V, rec.hs[m], hw.rar[m], static_cast<int64_t>(m), rec.rars[m]));
      return rec;
    }
    const bool coop = cfg.reg == kCoopRcar;
    const int64_t n_rcr = static_cast<int64_t>(hw.rcr.size());
    at::Tensor M = none, lam = lam0;
    for (int64_t step = 0; step < cfg.steps; ++step) {
      rec.att.push_back(attention(M, lam));
      alignment(rec.att.back(), hw.alv[step]);
      if (coop && step == 0) rec.hs.push_back(mean_rows(rec.att.back().V));
      if (step < n_rcr) std::tie(M, lam) = correspondence(rec.att.back(), hw.rcr[step], rec.rcrs[step]);
      if (coop) rec.hs.push_back(aggregation(rec.att.back().V, rec.hs[step], hw.rar[step], step, rec.rars[step]));
    }
    if (!coop) rec.att.push_back(attention(M, lam));  // only_rcr's final attention
    return rec;
  }

  // The tile's pair scores from its record: out[p] for p < pairs.
  void scores(const TileRecord& rec, T* out) const {
    if (cfg.reg == kOnlyRcr) {
      // mean over the pair's queries of cos(q, u), u = D / (|D| + eps)
      const SavedAttention& a = rec.att.back();
      const T* D = a.D.data_ptr<T>();
      const T* dn = a.dnorm.data_ptr<T>();
      for (int64_t p = 0; p < P; ++p) {
        T total = 0;
        for (int64_t r = t.seg[p]; r < t.seg[p + 1]; ++r) {
          const T* q = t.query + r * d;
          const T inv = T(1) / (dn[r] + T(kEps));
          const T qn = std::sqrt(dot(q, q, d));
          total += dot(q, D + r * d, d) * inv / std::max(qn * (dn[r] * inv), T(kEps));
        }
        out[p] = total / T(pair_rows(p));
      }
      return;
    }
    const T* we = hw.eval.w.data_ptr<T>();
    const T be = hw.eval.b.data_ptr<T>()[0];
    const T* h = rec.hs.back().data_ptr<T>();
    for (int64_t p = 0; p < P; ++p) out[p] = T(1) / (T(1) + std::exp(-(dot(h + p * s, we, s) + be)));
  }

  void run(const T* go, const TileGrads<T>& g) { backward(record(), go, g); }

  // The chain rule back through a recorded tile, for the pairs' output gradients go. The
  // gradients that cross steps (dh, dM, dlambda) live in two buffers each, taken before the
  // steps; everything else a step takes is a temporary of that step.
  void backward(TileRecord rec, const T* go, const TileGrads<T>& g) {
    HeadWeights& dw = *g.dw;
    const at::Tensor none;
    auto& att = rec.att;
    auto& hs = rec.hs;
    if (cfg.reg == kOnlyRar) {
      const int64_t n = static_cast<int64_t>(hw.rar.size());
      at::Tensor dh = final_backward(hs[n], go, dw.eval), dh_spare = pool.take(P, s);
      at::Tensor dV = pool.zeros(N, s);
      for (int64_t m = n - 1; m >= 0; --m) {
        aggregation_backward(att[0].V, hs[m], hs[m + 1], rec.rars[m], hw.rar[m], dw.rar[m], dh, dV, dh_spare);
        std::swap(dh, dh_spare);
      }
      add_mean_backward(dh, dV);
      alignment_backward(att[0], dV, hw.alv[0], dw.alv[0], g, none, none);
      return;
    }
    const int64_t n = cfg.steps;
    const bool coop = cfg.reg == kCoopRcar;
    const int64_t n_rcr = static_cast<int64_t>(hw.rcr.size());
    // gradients of the current step's M and lambda (defined once M / lambda are variables),
    // alternating between two buffers: the current step's and the later step's
    at::Tensor dM, dlam, dh, dh_spare;
    at::Tensor dM_buffers[2], dlam_buffers[2];
    if (n_rcr > 0)
      for (int k = 0; k < 2; ++k) {
        dM_buffers[k] = pool.take(N, d);
        dlam_buffers[k] = pool.take(N, 1).view({N});
      }
    int current = 0;
    auto variable_grads = [&](int64_t step) {
      if (step == 0) { dM = at::Tensor(); dlam = at::Tensor(); return; }
      current ^= 1;
      dM = dM_buffers[current].zero_();
      dlam = dlam_buffers[current].zero_();
    };
    if (coop) {
      dh = final_backward(hs[n], go, dw.eval);
      dh_spare = pool.take(P, s);
    } else {
      variable_grads(n);
      PoolScope temporaries(pool);
      at::Tensor du = cosine_backward(att.back(), go, g);
      unit_context_backward(att.back(), du, g, dM, dlam);
    }
    for (int64_t step = n - 1; step >= 0; --step) {
      PoolScope temporaries(pool);
      const SavedAttention& a = att[step];
      at::Tensor dV = pool.zeros(N, s);
      if (coop) {
        aggregation_backward(a.V, hs[step], hs[step + 1], rec.rars[step], hw.rar[step], dw.rar[step], dh, dV,
                             dh_spare);
        std::swap(dh, dh_spare);
      }
      at::Tensor dM_next = dM, dlam_next = dlam;
      variable_grads(step);
      if (step < n_rcr) {
        correspondence_backward(a, rec.rcrs[step], att[step + 1], hw.rcr[step], dw.rcr[step], dM_next, dlam_next,
                                dV);
        if (dM.defined()) {
          dM.add_(dM_next);
          dlam.add_(dlam_next);
        }
      }
      if (coop && step == 0) add_mean_backward(dh, dV);
      alignment_backward(a, dV, hw.alv[step], dw.alv[step], g, dM, dlam);
    }
  }

  // h = mean of the pair's rows of V: dV += dh / rows.
  void add_mean_backward(const at::Tensor& dh, at::Tensor& dV) {
    for (int64_t p = 0; p < P; ++p)
      dV.narrow(0, t.seg[p], pair_rows(p)).add_(dh[p].unsqueeze(0), T(1) / T(pair_rows(p)));
  }
};

constexpr int64_t kBackwardTileRows = 512;  // query rows per backward tile

// One tile on the recording machinery: its backward for the output gradients go (g: where the
// gradients go), or, go null, its forward scores into out.
template <typename T>
void recorded_tile_body(const RcarTile<T>& t, const HeadWeights& hw, const HeadConfig& cfg, TilePool& pool,
                        std::vector<ContextGroup<T>> groups, const T* go, const TileGrads<T>* g, T* out) {
  BackwardTile<T> bt(t, hw, cfg, pool, std::move(groups));
  if (go) bt.run(go, *g);
  else bt.scores(bt.record(), out);
}

template <typename T>
RCAR_TARGET_AVX2 void recorded_tile_avx2(const RcarTile<T>& t, const HeadWeights& hw, const HeadConfig& cfg,
                                         TilePool& pool, std::vector<ContextGroup<T>> groups, const T* go,
                                         const TileGrads<T>* g, T* out) {
  recorded_tile_body(t, hw, cfg, pool, std::move(groups), go, g, out);
}

template <typename T>
void recorded_tile(bool avx2, const RcarTile<T>& t, const HeadWeights& hw, const HeadConfig& cfg, TilePool& pool,
                   std::vector<ContextGroup<T>> groups, const T* go, const TileGrads<T>* g, T* out) {
  if (avx2) recorded_tile_avx2(t, hw, cfg, pool, std::move(groups), go, g, out);
  else recorded_tile_body(t, hw, cfg, pool, std::move(groups), go, g, out);
}

// Runs body(task, part) for the tasks of each of n_parts contiguous parts, one part per thread
// of the team: part k always gets the same tasks, in order. The cuts balance the parts' total
// work (task weights, e.g. query rows), fixed by the weights alone.
template <typename Body>
void run_parts(const std::vector<int64_t>& task_weight, int n_parts, Body&& body) {
  const int64_t n_tasks = static_cast<int64_t>(task_weight.size());
  std::vector<int64_t> prefix(n_tasks + 1, 0), cut(n_parts + 1, n_tasks);
  for (int64_t i = 0; i < n_tasks; ++i) prefix[i + 1] = prefix[i] + task_weight[i];
  cut[0] = 0;
  for (int k = 1; k < n_parts; ++k) {
    // the first task whose work starts at or after k/n_parts of the total
    const int64_t target = prefix[n_tasks] * k / n_parts;
    cut[k] = std::max(cut[k - 1], static_cast<int64_t>(std::lower_bound(prefix.begin(), prefix.end(), target) -
                                                       prefix.begin()));
    cut[k] = std::min(cut[k], n_tasks);
  }
  std::exception_ptr failure;
  std::mutex failure_mutex;
#pragma omp parallel for schedule(static, 1) num_threads(n_parts)
  for (int part = 0; part < n_parts; ++part) {
    c10::InferenceMode inference_guard;
    const int64_t first = cut[part], last = cut[part + 1];
    try {
      for (int64_t task = first; task < last; ++task) body(task, part);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
}

// dst[i] = srcs[0][i] + srcs[1][i] + ... (in that order; 0 without sources), i < n.
template <typename T>
void sum_in_order(T* dst, const std::vector<const T*>& srcs, int64_t offset, int64_t n) {
  if (srcs.empty()) {
    std::fill(dst, dst + n, T(0));
    return;
  }
  std::memcpy(dst, srcs[0] + offset, sizeof(T) * n);
  for (size_t k = 1; k < srcs.size(); ++k) {
    const T* src = srcs[k] + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  }
}

// dst[i] += srcs[0][i], then srcs[1][i], ... (in that order), i < n.
template <typename T>
void add_in_order(T* dst, const std::vector<const T*>& srcs, int64_t offset, int64_t n) {
  for (const T* part : srcs) {
    const T* src = part + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  }
}

// The backward's gradients per part (one part per thread of the team, see run_parts): image
// rows, packed caption words and every weight. A part's buffers are zeroed by its own thread at
// its first task (begin), and the parts are summed in part order by a team again, each thread
// a slice of every output: the bits do not depend on the schedule, and no parallel ATen op runs
// outside a team (on a shared machine each such op waits for a second, descheduled thread).
template <typename T>
struct PartGrads {
  std::vector<at::Tensor> img, words;
  std::vector<HeadWeights> weights;
  std::vector<char> started;

  PartGrads(int n_parts, int64_t img_rows, int64_t n_words, const HeadWeights& hw, const at::TensorOptions& opts)
      : started(n_parts, 0) {
    for (int k = 0; k < n_parts; ++k) {
      img.push_back(at::empty({img_rows, hw.d}, opts));
      words.push_back(at::empty({n_words, hw.d}, opts));
      weights.push_back(weights_like(hw, [](const at::Tensor& t) { return at::empty_like(t); }));
    }
  }

  // By part k's thread before each of its tasks: zeroes its buffers the first time.
  void begin(int k) {
    if (started[k]) return;
    started[k] = 1;
    img[k].zero_();
    words[k].zero_();
    for (const at::Tensor& t : flatten_weights(weights[k])) t.zero_();
  }

  // {d img (img_shape), d cap (n_cap, max_len, d), the weights' gradients (flat order)}: the
  // started parts summed in part order, into the first started part's buffers (d img and the
  // weights; no second copy); the caption padding's gradient is 0.
  std::vector<at::Tensor> sum(at::IntArrayRef img_shape, const std::vector<int64_t>& off, int64_t max_len) const {
    const int64_t d = img[0].size(1), n_cap = static_cast<int64_t>(off.size()) - 1;
    std::vector<size_t> parts;
    for (size_t k = 0; k < started.size(); ++k)
      if (started[k]) parts.push_back(k);
    std::vector<at::Tensor> result{img[parts.empty() ? 0 : parts[0]].view(img_shape),
                                   at::empty({n_cap, max_len, d}, img[0].options())};
    for (const at::Tensor& t : flatten_weights(weights[parts.empty() ? 0 : parts[0]])) result.push_back(t);
    if (parts.empty()) {
      for (const at::Tensor& t : result) t.zero_();
      return result;
    }
    // result[i] = part_0[i] + part_1[i] + ... in place: the first part is the destination
    std::vector<std::vector<const T*>> rest(result.size());
    std::vector<const T*> word_parts;
    for (size_t k : parts) {
      word_parts.push_back(words[k].template data_ptr<T>());
      if (k == parts[0]) continue;
      rest[0].push_back(img[k].template data_ptr<T>());
      const std::vector<at::Tensor> flat = flatten_weights(weights[k]);
      for (size_t i = 2; i < result.size(); ++i) rest[i].push_back(flat[i - 2].template data_ptr<T>());
    }
    const int n_slices = static_cast<int>(started.size());
    run_parts(std::vector<int64_t>(n_slices, 1), n_slices, [&](int64_t slice, int) {
      auto first = [&](int64_t n) { return n * slice / n_slices; };
      auto count = [&](int64_t n) { return n * (slice + 1) / n_slices - n * slice / n_slices; };
      T* cap_out = result[1].data_ptr<T>();
      for (int64_t j = first(n_cap), j1 = j + count(n_cap); j < j1; ++j) {
        const int64_t values = (off[j + 1] - off[j]) * d;
        T* dst = cap_out + j * max_len * d;
        sum_in_order(dst, word_parts, off[j] * d, values);
        std::fill(dst + values, dst + max_len * d, T(0));
      }
      for (size_t i = 0; i < result.size(); ++i) {
        if (i == 1) continue;
        const int64_t n = result[i].numel();
        add_in_order(result[i].data_ptr<T>() + first(n), rest[i], first(n), count(n));
      }
    });
    return result;
  }
};

template <typename T>
std::vector<at::Tensor> rcar_backward_impl(const at::Tensor& grad_in, const at::Tensor& img_in,
                                           const at::Tensor& cap, const at::Tensor& lens, bool t2i,
                                           const HeadWeights& hw, const HeadConfig& cfg) {
  const at::Tensor img = img_in.contiguous();
  const at::Tensor grad = grad_in.to(img.scalar_type()).contiguous();
  const PackedWords<T> words = pack_words<T>(cap.stride(2) == 1 ? cap : cap.contiguous(), lens);
  const TileLayout<T> layout(t2i, img, words, cap.size(0), kBackwardTileRows);
  const int64_t n_tasks = layout.tasks();
  const int64_t n_words = words.words.size(0), d = hw.d;
  const int n_parts = team_size(n_tasks);
  PartGrads<T> parts(n_parts, img.size(0) * img.size(1), n_words, hw, img.options());
  const bool avx2 = use_avx2_path();
  const T* grad_ptr = grad.data_ptr<T>();
  std::vector<std::unique_ptr<TilePool>> pools(n_parts);
  std::vector<int64_t> work(n_tasks);
  std::vector<int64_t> seg_scratch;
  for (int64_t task = 0; task < n_tasks; ++task) {
    const RcarTile<T> t = layout.tile(task, seg_scratch, nullptr);
    work[task] = t.rows * (t.C + 1);
  }
  run_parts(work, n_parts, [&](int64_t task, int part) {
    parts.begin(part);
    if (!pools[part]) pools[part] = std::make_unique<TilePool>(img.options());
    std::vector<int64_t> seg;
    const RcarTile<T> t = layout.tile(task, seg, nullptr);
    // the tile's output gradients, pair by pair
    std::vector<T> go(t.pairs);
    for (int64_t p = 0; p < t.pairs; ++p) {
      const int64_t pair = t.pair_base + p * t.pair_step;
      go[p] = grad_ptr[pair];  // grad is (n_img, n_cap): flat index i * n_cap + j
    }
    // A tile whose pairs all have a zero output gradient contributes exactly nothing (a
    // sparse loss's gradient): skipped.
    if (std::all_of(go.begin(), go.end(), [](T v) { return v == T(0); })) return;
    T* query_grads = (t2i ? parts.words[part] : parts.img[part]).template data_ptr<T>();
    T* context_grads = (t2i ? parts.img[part] : parts.words[part]).template data_ptr<T>();
    const TileGrads<T> g{query_grads + layout.query_row(task) * d, &parts.weights[part]};
    recorded_tile(avx2, t, hw, cfg, *pools[part], single_group(t, context_grads + layout.context_row(task) * d),
                  go.data(), &g, static_cast<T*>(nullptr));
  });
  return parts.sum(img.sizes(), words.offsets, cap.size(1));
}

// =============================================================================================
// A pair list: (img_idx[k], cap_idx[k]) for k < n_pairs, repeats allowed, forward and backward
// on the recording machinery above. The pairs, sorted by their context owner (t2i the image,
// i2t the caption; stably, so the list order breaks ties), are cut into tiles of at most
// kPairTileRows query rows. A tile's query rows are gathered into one buffer, so its per-row
// stages (alignment, RCR and RAR MLPs, forward and backward) run as GEMMs over all its pairs,
// while each cross attention runs per context owner (one ContextGroup each). RAR's dropout
// masks are keyed by the pair's global id i * n_cap + j: the bits of the all-pairs kernel.
// =============================================================================================

constexpr int64_t kPairTileRows = 512;  // query rows per pair-list tile, at most

template <typename T>
struct PairTiles {
  bool t2i;
  int64_t R, d, n_cap;
  const T* img;
  const T* words;
  const std::vector<int64_t>& off;
  const int64_t* ii;
  const int64_t* jj;
  std::vector<int64_t> order, bounds;  // tile task holds the pairs order[bounds[task] .. bounds[task + 1])
  int64_t max_rows = 0;

  PairTiles(bool t2i_, const at::Tensor& img_c, const PackedWords<T>& w, int64_t n_cap_, const int64_t* ii_,
            const int64_t* jj_, int64_t n_pairs, int n_threads)
      : t2i(t2i_), R(img_c.size(1)), d(img_c.size(2)), n_cap(n_cap_), img(img_c.data_ptr<T>()),
        words(w.words.template data_ptr<T>()), off(w.offsets), ii(ii_), jj(jj_), order(n_pairs) {
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return context_owner(a) < context_owner(b); });
    int64_t total = 0;
    for (int64_t k = 0; k < n_pairs; ++k) total += query_rows(k);
    // Tiles of about equal rows, at least one per thread and a multiple of the thread count.
    const int64_t threads = std::max(1, n_threads);
    int64_t n_tiles = std::max<int64_t>(threads, (total + kPairTileRows - 1) / kPairTileRows);
    n_tiles = (n_tiles + threads - 1) / threads * threads;
    const int64_t target = std::max<int64_t>(1, (total + n_tiles - 1) / n_tiles);
    bounds.push_back(0);
    int64_t rows = 0;
    for (int64_t k = 0; k < n_pairs; ++k) {
      const int64_t r = query_rows(order[k]);
      if (rows > 0 && rows + r > target) {
        bounds.push_back(k);
        rows = 0;
      }
      rows += r;
      max_rows = std::max(max_rows, rows);
    }
    bounds.push_back(n_pairs);
  }

  int64_t tasks() const { return static_cast<int64_t>(bounds.size()) - 1; }
  int64_t context_owner(int64_t k) const { return t2i ? ii[k] : jj[k]; }
  int64_t query_rows(int64_t k) const { return t2i ? off[jj[k] + 1] - off[jj[k]] : R; }
  // Listed pair k's first query row in the packed query side (t2i: words, i2t: img rows).
  int64_t query_row(int64_t k) const { return t2i ? off[jj[k]] : ii[k] * R; }
  int64_t context_row(int64_t owner) const { return t2i ? owner * R : off[owner]; }
  int64_t context_len(int64_t owner) const { return t2i ? R : off[owner + 1] - off[owner]; }

  // The tile of a task: its query rows gathered into `query` (max_rows x d), its segments, pair
  // ids and context groups (their gradients in dcontext, the context side's rows; null: none).
  RcarTile<T> tile(int64_t task, T* query, std::vector<int64_t>& seg, std::vector<int64_t>& ids,
                   std::vector<ContextGroup<T>>& groups, T* dcontext) const {
    const int64_t k0 = bounds[task], k1 = bounds[task + 1];
    const T* query_side = t2i ? words : img;
    const T* context_side = t2i ? img : words;
    seg.assign(1, 0);
    ids.clear();
    groups.clear();
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t q = order[k], rows = query_rows(q), p = k - k0, owner = context_owner(q);
      std::memcpy(query + seg.back() * d, query_side + query_row(q) * d, sizeof(T) * rows * d);
      seg.push_back(seg.back() + rows);
      ids.push_back(ii[q] * n_cap + jj[q]);
      if (p > 0 && owner == context_owner(order[k - 1])) {
        groups.back().p1 = p + 1;
        continue;
      }
      const int64_t row = context_row(owner);
      groups.push_back(ContextGroup<T>{context_side + row * d, context_len(owner), p, p + 1,
                                       dcontext ? dcontext + row * d : nullptr});
    }
    RcarTile<T> t{query, seg.back(), groups[0].context, groups[0].C, seg.data(), k1 - k0, nullptr, 1, 0, 0};
    t.pair_ids = ids.data();
    return t;
  }
};

// Per-thread buffers of the pair-list passes.
template <typename T>
struct PairScratch {
  std::unique_ptr<TilePool> pool;
  std::vector<T> query, dquery, values;
  std::vector<int64_t> seg, ids;
  std::vector<ContextGroup<T>> groups;

  void ensure(const at::TensorOptions& opts, int64_t max_rows, int64_t d) {
    if (pool) return;
    pool = std::make_unique<TilePool>(opts);
    query.resize(max_rows * d);
    dquery.resize(max_rows * d);
  }
};

template <typename T>
void rcar_pairs_forward_impl(const at::Tensor& img_in, const at::Tensor& cap, const at::Tensor& lens,
                             const int64_t* ii, const int64_t* jj, int64_t n_pairs, bool t2i, const HeadWeights& hw,
                             const HeadConfig& cfg, at::Tensor& out) {
  const at::Tensor img = img_in.contiguous();
  const PackedWords<T> words = pack_words<T>(cap.stride(2) == 1 ? cap : cap.contiguous(), lens);
  const PairTiles<T> tiles(t2i, img, words, cap.size(0), ii, jj, n_pairs, at::get_num_threads());
  const int64_t n_tasks = tiles.tasks();
  std::vector<PairScratch<T>> scratch(team_size(n_tasks));
  const bool avx2 = use_avx2_path();
  T* out_ptr = out.data_ptr<T>();
  run_tasks(n_tasks, [&](int64_t task, int thread) {
    PairScratch<T>& w = scratch[thread];
    w.ensure(img.options(), tiles.max_rows, hw.d);
    const RcarTile<T> t = tiles.tile(task, w.query.data(), w.seg, w.ids, w.groups, nullptr);
    w.values.resize(t.pairs);
    recorded_tile(avx2, t, hw, cfg, *w.pool, w.groups, static_cast<const T*>(nullptr),
                  static_cast<const TileGrads<T>*>(nullptr), w.values.data());
    for (int64_t p = 0; p < t.pairs; ++p) out_ptr[tiles.order[tiles.bounds[task] + p]] = w.values[p];
  });
}

template <typename T>
std::vector<at::Tensor> rcar_pairs_backward_impl(const at::Tensor& grad_in, const at::Tensor& img_in,
                                                 const at::Tensor& cap, const at::Tensor& lens, const int64_t* ii,
                                                 const int64_t* jj, int64_t n_pairs, bool t2i, const HeadWeights& hw,
                                                 const HeadConfig& cfg) {
  const at::Tensor img = img_in.contiguous();
  const at::Tensor grad = grad_in.to(img.scalar_type()).contiguous();
  const PackedWords<T> words = pack_words<T>(cap.stride(2) == 1 ? cap : cap.contiguous(), lens);
  const PairTiles<T> tiles(t2i, img, words, cap.size(0), ii, jj, n_pairs, at::get_num_threads());
  const int64_t n_tasks = tiles.tasks(), d = hw.d;
  const int n_parts = team_size(n_tasks);
  PartGrads<T> parts(n_parts, img.size(0) * img.size(1), words.words.size(0), hw, img.options());
  std::vector<int64_t> work(n_tasks, 0);
  for (int64_t task = 0; task < n_tasks; ++task)
    for (int64_t k = tiles.bounds[task]; k < tiles.bounds[task + 1]; ++k) work[task] += tiles.query_rows(tiles.order[k]);
  std::vector<PairScratch<T>> scratch(n_parts);
  const bool avx2 = use_avx2_path();
  const T* grad_ptr = grad.data_ptr<T>();
  run_parts(work, n_parts, [&](int64_t task, int part) {
    parts.begin(part);
    PairScratch<T>& w = scratch[part];
    w.ensure(img.options(), tiles.max_rows, d);
    const int64_t k0 = tiles.bounds[task];
    T* query_grads = (t2i ? parts.words[part] : parts.img[part]).template data_ptr<T>();
    T* context_grads = (t2i ? parts.img[part] : parts.words[part]).template data_ptr<T>();
    const RcarTile<T> t = tiles.tile(task, w.query.data(), w.seg, w.ids, w.groups, context_grads);
    w.values.resize(t.pairs);
    for (int64_t p = 0; p < t.pairs; ++p) w.values[p] = grad_ptr[tiles.order[k0 + p]];
    // pairs with a zero output gradient contribute nothing: a tile of only those is skipped
    if (std::all_of(w.values.begin(), w.values.end(), [](T v) { return v == T(0); })) return;
    std::fill(w.dquery.begin(), w.dquery.begin() + t.rows * d, T(0));
    const TileGrads<T> g{w.dquery.data(), &parts.weights[part]};
    recorded_tile(avx2, t, hw, cfg, *w.pool, w.groups, w.values.data(), &g, static_cast<T*>(nullptr));
    // each pair's query-row gradients back to its query owner's rows, in tile order
    for (int64_t p = 0; p < t.pairs; ++p) {
      T* dst = query_grads + tiles.query_row(tiles.order[k0 + p]) * d;
      const T* src = w.dquery.data() + t.seg[p] * d;
      const int64_t n = (t.seg[p + 1] - t.seg[p]) * d;
      for (int64_t e = 0; e < n; ++e) dst[e] += src[e];
    }
  });
  return parts.sum(img.sizes(), words.offsets, cap.size(1));
}

// The all-pairs backward. Pairs whose output gradient is zero contribute exactly nothing; when
// they are most of the pairs (a hardest-negative loss' gradient: <= 3B nonzero of B^2), the
// others are listed and run through the pair-list backward, whose tiles pack the rows of many
// context owners (an all-pairs tile would hold a few of them, its MLP GEMMs a few rows deep).
template <typename T>
std::vector<at::Tensor> rcar_backward_of_nonzero(const at::Tensor& grad_in, const at::Tensor& img,
                                                 const at::Tensor& cap, const at::Tensor& lens, bool t2i,
                                                 const HeadWeights& hw, const HeadConfig& cfg) {
  const at::Tensor grad = grad_in.to(img.scalar_type()).contiguous();
  const int64_t n_cap = cap.size(0), total = grad.numel();
  const T* gp = grad.data_ptr<T>();
  std::vector<int64_t> ii, jj;
  std::vector<T> values;
  for (int64_t k = 0; k < total && 2 * static_cast<int64_t>(values.size()) <= total; ++k) {
    if (gp[k] == T(0)) continue;  // a NaN gradient is listed (and propagates)
    ii.push_back(k / n_cap);
    jj.push_back(k % n_cap);
    values.push_back(gp[k]);
  }
  const int64_t listed = static_cast<int64_t>(values.size());
  if (2 * listed > total) return rcar_backward_impl<T>(grad, img, cap, lens, t2i, hw, cfg);
  if (listed == 0) {
    return zero_gradients(img, cap, hw);
  }
  const at::Tensor listed_grad = at::from_blob(values.data(), {listed}, grad.options()).clone();
  return rcar_pairs_backward_impl<T>(listed_grad, img, cap, lens, ii.data(), jj.data(), listed, t2i, hw, cfg);
}

struct Prepared {
  HeadWeights hw;
  HeadConfig cfg;
  bool t2i;
};

Prepared prepare(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens, const RcarSettings& settings,
                 const std::vector<at::Tensor>& weights) {
  check_pair_inputs("rcar (cpu)", img, cap, lens);
  TORCH_CHECK(settings.direction == rcar_contract::kT2I || settings.direction == rcar_contract::kI2T,
              "rcar (cpu): direction must be a Direction code in [0, ", rcar_contract::kDirectionCount, "), got ",
              settings.direction);
  TORCH_CHECK(settings.regulator >= 0 && settings.regulator < rcar_contract::kRegulatorCount,
              "rcar (cpu): regulator must be a Regulator code in [0, ", rcar_contract::kRegulatorCount, "), got ",
              settings.regulator);
  TORCH_CHECK(settings.smooth > 0, "rcar (cpu): smooth must be positive, got ", settings.smooth);
  TORCH_CHECK(settings.seed >= 0, "rcar (cpu): the dropout seed must be >= 0, got ", settings.seed);
  const auto reg = static_cast<Regulator>(settings.regulator);
  const ModuleCounts counts = module_counts(reg, settings.steps);
  Prepared pr{unpack_weights(weights, counts, img.scalar_type(), img.size(2)),
              HeadConfig{reg, settings.steps, settings.smooth, settings.training && counts.rar > 0,
                         static_cast<uint64_t>(settings.seed)},
              settings.direction == rcar_contract::kT2I};
  return pr;
}

}  // namespace

at::Tensor rcar_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const RcarSettings& settings, const std::vector<at::Tensor>& weights) {
  const Prepared pr = prepare(img, cap, lens, settings, weights);
  at::Tensor out = at::empty({img.size(0), cap.size(0)}, img.options());
  if (out.numel() == 0) return out;
  if (poison_buffers().load()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::rcar_forward",
                             [&] { rcar_forward_impl<scalar_t>(img, cap, lens, pr.t2i, pr.hw, pr.cfg, out); });
  return out;
}

std::vector<at::Tensor> rcar_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                      const at::Tensor& lens, const RcarSettings& settings,
                                      const std::vector<at::Tensor>& weights) {
  const Prepared pr = prepare(img, cap, lens, settings, weights);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == img.size(0) && grad.size(1) == cap.size(0),
              "rcar (cpu): grad must be (n_img, n_cap) = (", img.size(0), ", ", cap.size(0), "), got ", grad.sizes());
  if (img.size(0) == 0 || cap.size(0) == 0) {
    return zero_gradients(img, cap, pr.hw);
  }
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::rcar_backward", [&] {
    result = rcar_backward_of_nonzero<scalar_t>(grad, img, cap, lens, pr.t2i, pr.hw, pr.cfg);
  });
  return result;
}

at::Tensor rcar_pairs_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                              const at::Tensor& img_idx, const at::Tensor& cap_idx, const RcarSettings& settings,
                              const std::vector<at::Tensor>& weights) {
  const Prepared pr = prepare(img, cap, lens, settings, weights);
  const int64_t n_pairs = img_idx.numel();
  check_pair_index("rcar pairs (cpu)", img_idx, "img_idx", n_pairs, img.size(0));
  check_pair_index("rcar pairs (cpu)", cap_idx, "cap_idx", n_pairs, cap.size(0));
  at::Tensor out = at::empty({n_pairs}, img.options());
  if (n_pairs == 0) return out;
  if (poison_buffers().load()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  const at::Tensor ii = img_idx.contiguous(), jj = cap_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::rcar_pairs_forward", [&] {
    rcar_pairs_forward_impl<scalar_t>(img, cap, lens, ii.data_ptr<int64_t>(), jj.data_ptr<int64_t>(), n_pairs, pr.t2i,
                                      pr.hw, pr.cfg, out);
  });
  return out;
}

std::vector<at::Tensor> rcar_pairs_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                            const at::Tensor& lens, const at::Tensor& img_idx,
                                            const at::Tensor& cap_idx, const RcarSettings& settings,
                                            const std::vector<at::Tensor>& weights) {
  const Prepared pr = prepare(img, cap, lens, settings, weights);
  const int64_t n_pairs = img_idx.numel();
  check_pair_index("rcar pairs (cpu)", img_idx, "img_idx", n_pairs, img.size(0));
  check_pair_index("rcar pairs (cpu)", cap_idx, "cap_idx", n_pairs, cap.size(0));
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n_pairs, "rcar pairs (cpu): grad must be (", n_pairs, ",), got ",
              grad.sizes());
  if (n_pairs == 0) {
    return zero_gradients(img, cap, pr.hw);
  }
  const at::Tensor ii = img_idx.contiguous(), jj = cap_idx.contiguous();
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::rcar_pairs_backward", [&] {
    result = rcar_pairs_backward_impl<scalar_t>(grad, img, cap, lens, ii.data_ptr<int64_t>(), jj.data_ptr<int64_t>(),
                                                n_pairs, pr.t2i, pr.hw, pr.cfg);
  });
  return result;
}

at::Tensor rcar_dropout_scales(int64_t seed, int64_t module, int64_t which, const at::Tensor& pairs,
                               int64_t rows, int64_t channels) {
  TORCH_CHECK(seed >= 0 && module >= 0 && (which == 0 || which == 1) && rows >= 0 && channels >= 0,
              "rcar_dropout_scales: seed, module, rows, channels must be >= 0 and which 0 or 1");
  const at::Tensor ids = pairs.to(at::kLong).contiguous();
  at::Tensor out = at::empty({ids.numel(), rows, channels}, at::TensorOptions().dtype(at::kDouble));
  const int64_t* ip = ids.data_ptr<int64_t>();
  double* op = out.data_ptr<double>();
  for (int64_t p = 0; p < ids.numel(); ++p)
    for (int64_t r = 0; r < rows; ++r)
      rar_dropout_scales(rar_dropout_row_key(static_cast<uint64_t>(seed), module, static_cast<int>(which), ip[p], r),
                         op + (p * rows + r) * channels, channels);
  return out;
}

}  // namespace rcar_cpu

namespace rcar_cpu {

bool set_poison_buffers(bool on) {
  return poison_buffers().exchange(on);
}

std::string set_simd_path(const std::string& path) {
  TORCH_CHECK(path == "auto" || path == "baseline" || path == "avx2",
              "set_simd_path: path must be 'auto', 'baseline' or 'avx2', got '", path, "'");
  detail::simd_path_override().store(path == "auto" ? -1 : (path == "avx2" ? 1 : 0));
  return detail::use_avx2_path() ? "avx2" : "baseline";
}

}  // namespace rcar_cpu

// ---------------------------------------------------------------------------------------------
// Python bindings (rcar_fast._C), registered through csrc/bindings.h.
//   rcar_forward_cpu: the RCAR head (official EncoderSimilarity; in training mode with RAR's
//     counter-based dropout masks) over all pairs. weights: the head's Linear weights and
//     biases as a flat list, in module order: alv modules (W, b); RCR modules (rcr_matrix_w.0,
//     .2, rcr_smooth_w.0, .2, each W, b); RAR modules (rar_q_w.0, rar_k_w.0, rar_v_w.0, each
//     W, b); sim_eval_w (W, b): the walk rcar_fast.contract.rcar_linears.
//   rcar_backward_cpu: gradients of sum(grad * rcar_forward(...)) (grad (n_img, n_cap)):
//     [d img, d cap, then one gradient per weight tensor in the same flat order]; d cap is zero
//     at the padding. Recomputes the forward per tile (nothing kept between the calls);
//     deterministic for a thread count. Pairs with a zero output gradient add nothing: when
//     they are the majority (a hardest-negative loss), the rest run as a pair list.
//   rcar_pairs_forward_cpu / rcar_pairs_backward_cpu: the same head for the pairs (img_idx[p],
//     cap_idx[p]) (int64, in range, repeats allowed): (P,), and the gradients of
//     sum(grad * scores) (grad (P,)) as rcar_backward_cpu's; dropout masks as the all-pairs
//     kernel's for each (image, caption).
//   rcar_dropout_scales_cpu: RAR's dropout scales (0 or 1/(1-p)), float64 (len(pairs), rows,
//     channels), of module `module`, which 0 (rar_k_w, row = query row) or 1 (rar_q_w, row 0):
//     the C++ side of rcar_fast.dropout.rar_scales, for the tests.
//   set_cpu_poison_buffers: tests; NaN-fill the RCAR kernels' per-tile buffers and forward
//     output before use (so a read before a write shows as NaN).
//   set_cpu_simd_path: the compiled copy of every CPU kernel's vector loops: "auto" (AVX2+FMA
//     when the CPU has it), "baseline" or "avx2" (baseline on a CPU without AVX2).
RCAR_FAST_BINDINGS(cpu_rcar, m) {
  namespace py = pybind11;
  using rcar_cpu::RcarSettings;
  rcar_cpu::bind::settings_class<RcarSettings, &RcarSettings::direction, &RcarSettings::regulator, &RcarSettings::steps,
                                 &RcarSettings::smooth, &RcarSettings::training, &RcarSettings::seed>(
      m, "RcarSettings", "an RCAR head's configuration as contract codes", py::arg("direction"), py::arg("regulator"),
      py::arg("steps"), py::arg("smooth"), py::arg("training") = false, py::arg("seed") = 0);
  m.def("rcar_forward_cpu", &rcar_cpu::rcar_forward,
        "RCAR head over all pairs (n_img, n_cap); weights: flat list, see csrc/cpu/rcar.cpp",
        py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("settings"), py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_backward_cpu", &rcar_cpu::rcar_backward,
        "gradients [d img, d cap, d weights...] of sum(grad * RCAR head), weights as rcar_forward_cpu",
        py::arg("grad"), py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("settings"), py::arg("weights"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rcar_pairs_forward_cpu", &rcar_cpu::rcar_pairs_forward, "RCAR head of the pairs (img_idx[p], cap_idx[p]): (P,)",
        py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("img_idx"), py::arg("cap_idx"), py::arg("settings"),
        py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_pairs_backward_cpu", &rcar_cpu::rcar_pairs_backward,
        "gradients [d img, d cap, d weights...] of sum(grad * RCAR pair scores)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("img_idx"), py::arg("cap_idx"), py::arg("settings"),
        py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_dropout_scales_cpu", &rcar_cpu::rcar_dropout_scales,
        "RAR dropout scales (len(pairs), rows, channels) float64 (rcar_fast.dropout.rar_scales)", py::arg("seed"),
        py::arg("module"), py::arg("which"), py::arg("pairs"), py::arg("rows"), py::arg("channels"));
  m.def("set_cpu_poison_buffers", &rcar_cpu::set_poison_buffers,
        "tests: NaN-fill the RCAR kernels' tile buffers and outputs before use; returns the previous setting",
        py::arg("on"));
  m.def("set_cpu_simd_path", &rcar_cpu::set_simd_path,
        "select the compiled copy of the CPU kernels' vector loops: 'auto' | 'baseline' | 'avx2'; "
        "returns the copy that will run",
        py::arg("path"));
}
