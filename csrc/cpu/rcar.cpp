// RCAR similarity head (official EncoderSimilarity, eval mode) over all pairs on the CPU.
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
#include "cpu/kernels.h"
#include "cpu/tile.h"

#include <limits>

// Every function passing a 32-byte vector is always_inline: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

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
};

template <typename T>
struct RcarScratch {
  std::vector<T> S, lam, D, M, Vm, H, K, h, hq, inv, rowval;
  RcarScratch(int64_t max_rows, int64_t max_ctx, int64_t max_pairs, const HeadWeights& hw, bool with_m)
      : S(max_rows * simd::padded<T>(max_ctx)), lam(max_rows), D(max_rows * hw.d),
        M(with_m ? max_rows * hw.d : 0), Vm(max_rows * hw.s), H(max_rows * std::max(hw.hidden, hw.s)),
        K(max_rows * hw.s), h(max_pairs * hw.s), hq(max_pairs * hw.s), inv(simd::padded<T>(max_ctx)),
        rowval(max_rows) {}
};

struct HeadConfig {
  Regulator reg;
  int64_t steps;
  double smooth;
};

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
                                    const RarWeights& rar) {
  const int64_t s = hw.s, rows = t.rows;
  at::Tensor keys = view2d(w.K.data(), rows, s, s);
  linear_into(keys, view2d(w.Vm.data(), rows, s, s), rar.k.w, rar.k.b);
  keys.tanh_();
  at::Tensor question = view2d(w.hq.data(), t.pairs, s, s);
  linear_into(question, view2d(w.h.data(), t.pairs, s, s), rar.q.w, rar.q.b);
  question.tanh_();
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
    for (const RarWeights& rar : hw.rar) aggregation_update(t, w, hw, rar);
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
    aggregation_update(t, w, hw, hw.rar[step]);
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

template <typename T>
void rcar_forward_impl(const at::Tensor& img_in, const at::Tensor& cap, const at::Tensor& lens, bool t2i,
                       const HeadWeights& hw, const HeadConfig& cfg, at::Tensor& out) {
  const at::Tensor img = img_in.contiguous();
  const int64_t n_img = img.size(0), R = img.size(1), d = img.size(2), n_cap = cap.size(0);
  const PackedWords<T> words = pack_words<T>(cap.stride(2) == 1 ? cap : cap.contiguous(), lens);
  const T* img_ptr = img.data_ptr<T>();
  const T* words_ptr = words.words.template data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const auto& off = words.offsets;

  // Query blocks: t2i caption blocks (segments = captions), i2t image blocks (segments of R).
  std::vector<int64_t> bounds, image_seg;
  int64_t max_rows = 0, max_pairs = 0;
  if (t2i) {
    bounds = weighted_blocks(off, kTileRows);
  } else {
    const int64_t per_block = std::max<int64_t>(1, kTileRows / R);
    for (int64_t i = 0; i < n_img; i += per_block) bounds.push_back(i);
    bounds.push_back(n_img);
    for (int64_t p = 0; p <= per_block; ++p) image_seg.push_back(p * R);
  }
  const int64_t n_blocks = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t pairs = bounds[b + 1] - bounds[b];
    max_pairs = std::max(max_pairs, pairs);
    max_rows = std::max(max_rows, t2i ? off[bounds[b + 1]] - off[bounds[b]] : pairs * R);
  }
  const int64_t n_owners = t2i ? n_img : n_cap;
  const int64_t max_ctx = t2i ? R : words.max_len;
  const int64_t n_tasks = n_owners * n_blocks;
  const bool with_m = !hw.rcr.empty();
  std::vector<std::unique_ptr<RcarScratch<T>>> scratch(team_size(n_tasks));
  const bool avx2 = use_avx2_path();
  run_tasks(n_tasks, [&](int64_t task, int thread) {
    if (!scratch[thread])
      scratch[thread] = std::make_unique<RcarScratch<T>>(max_rows, max_ctx, max_pairs, hw, with_m);
    // Owners vary fastest: consecutive tasks of a thread reuse the same query block.
    const int64_t b = task / n_owners, owner = task % n_owners;
    RcarTile<T> t;
    std::vector<int64_t> seg;
    if (t2i) {
      const int64_t j0 = bounds[b], j1 = bounds[b + 1];
      for (int64_t j = j0; j <= j1; ++j) seg.push_back(off[j] - off[j0]);
      t = RcarTile<T>{words_ptr + off[j0] * d, off[j1] - off[j0], img_ptr + owner * R * d, R,
                      seg.data(), j1 - j0, out_ptr + owner * n_cap + j0, 1};
    } else {
      const int64_t i0 = bounds[b], i1 = bounds[b + 1];
      t = RcarTile<T>{img_ptr + i0 * R * d, (i1 - i0) * R, words_ptr + off[owner] * d, off[owner + 1] - off[owner],
                      image_seg.data(), i1 - i0, out_ptr + i0 * n_cap + owner, n_cap};
    }
    if (avx2) rcar_tile_avx2(t, *scratch[thread], hw, cfg);
    else rcar_tile_base(t, *scratch[thread], hw, cfg);
  });
}

}  // namespace

at::Tensor rcar_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const RcarSettings& settings, const std::vector<at::Tensor>& weights) {
  check_pair_inputs("rcar (cpu)", img, cap, lens);
  TORCH_CHECK(settings.direction == rcar_contract::kT2I || settings.direction == rcar_contract::kI2T,
              "rcar (cpu): direction must be a Direction code in [0, ", rcar_contract::kDirectionCount, "), got ",
              settings.direction);
  TORCH_CHECK(settings.regulator >= 0 && settings.regulator < rcar_contract::kRegulatorCount,
              "rcar (cpu): regulator must be a Regulator code in [0, ", rcar_contract::kRegulatorCount, "), got ",
              settings.regulator);
  TORCH_CHECK(settings.smooth > 0, "rcar (cpu): smooth must be positive, got ", settings.smooth);
  const auto reg = static_cast<Regulator>(settings.regulator);
  const int64_t steps = settings.steps;
  const double smooth = settings.smooth;
  const bool t2i = settings.direction == rcar_contract::kT2I;
  const ModuleCounts counts = module_counts(reg, steps);
  const HeadWeights hw = unpack_weights(weights, counts, img.scalar_type(), img.size(2));
  const HeadConfig cfg{reg, steps, smooth};
  at::Tensor out = at::empty({img.size(0), cap.size(0)}, img.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(img.scalar_type(), "rcar_cpu::rcar_forward",
                             [&] { rcar_forward_impl<scalar_t>(img, cap, lens, t2i, hw, cfg, out); });
  return out;
}

}  // namespace rcar_cpu

namespace rcar_cpu {

std::string set_simd_path(const std::string& path) {
  TORCH_CHECK(path == "auto" || path == "baseline" || path == "avx2",
              "set_simd_path: path must be 'auto', 'baseline' or 'avx2', got '", path, "'");
  detail::simd_path_override().store(path == "auto" ? -1 : (path == "avx2" ? 1 : 0));
  return detail::use_avx2_path() ? "avx2" : "baseline";
}

}  // namespace rcar_cpu
