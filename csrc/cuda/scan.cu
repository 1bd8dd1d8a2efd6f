// SCAN all-pairs similarity on the GPU: forward and backward, through the Gram identity.
//
// One thread block scores one (image block, caption group) tile of the shared region-word tile
// (csrc/cuda/tile.cuh: the work split, the padding masks and the GEMM):
//   1. the raw scores S = regions . words of the whole tile, one GEMM over d (tensor cores via
//      WMMA for fp16/bf16 with fp32 accumulation, fp32 FMA for fp32 inputs), kept in shared
//      memory; padding words are never loaded;
//   2. one warp per (image, caption) pair reduces its sub-block of S: the raw-score norm over
//      the query axis, the context softmax, q.ctx = sum_c alpha S and |ctx|^2 = alpha^T G alpha
//      (G: the context's Gram matrix from gram.cu), the cosine and the aggregation.
// The backward recomputes the same tile and writes, per pair, dL/dS and the attention weights
// (see the binding block at the end); the contractions with the features are dense GEMMs done by
// the caller.
//
// Indexing convention inside a pair: "context" c and "query" k as in SIMILARITY.md (t2i:
// c = region, k = word; i2t: c = word, k = region). The score tile is laid out so that c is the
// fast axis for both directions (t2i: word-major, i2t: region-major), so lanes walking c read
// consecutive shared-memory words.
#include "contract.h"
#include "cuda/tile.cuh"

namespace rcar_cuda {

// A SCAN all-pairs problem.
//
// Captions are addressed in a "packed" word order: word w of caption j has the packed index
// word_off[j] + w. Captions are cut into groups of consecutive captions whose words fit one
// block's score tile (col_frags * 16 words; see scan_tile_rows / scan_tile_cols); a block scores
// imgs_per_block images against one group.
struct ScanProblem {
  const void* img;               // (n_img, R, d)
  const void* cap;               // (n_cap, Lmax, d); padding words are never read
  int dtype;                     // DType of img and cap
  int64_t n_img, R, d, n_cap;
  int64_t img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
  const int64_t* lens;           // (n_cap,) caption lengths, 1 <= lens[j]
  const int64_t* word_off;       // (n_cap + 1,) exclusive prefix sum of lens
  int64_t total_words;           // word_off[n_cap]
  int64_t max_len;               // max(lens)
  const int32_t* group_first;    // (n_groups + 1,) first caption of each group, then n_cap
  int64_t n_groups;
  int col_frags;                 // 8, 4 or 2 (tile geometry, see scan_tile_*)
  const float* gram;             // t2i: (n_img, R, R) region Grams; i2t: caption Grams
  const int64_t* gram_off;       // i2t: (n_cap,) offset of caption j's len x len Gram; t2i: unused
  const float* query_sq;         // squared query norms: t2i packed words (total_words,),
                                 // i2t regions (n_img * R,)
  int i2t;                       // 0: t2i (words attend to regions), 1: i2t
  int raw_norm;                  // RawNorm
  int agg;                       // Aggregation
  float smooth, lse_lambda;
};

}  // namespace rcar_cuda

namespace rcar_cuda {
namespace {

constexpr float kEps = kEpsF;  // rcar_contract

struct Layout : tile::Layout {
  int scratch_warp;   // floats of scratch per warp
};

// Shared memory: the tile's source-offset tables and main area (tile.cuh), then per-warp
// scratch. The tile is region-major for i2t, word-major for t2i.
__host__ __device__ inline Layout make_layout(const Tile& t, bool inputs16, bool i2t, int cmax,
                                              int qmax, bool backward) {
  Layout l;
  l.scratch_warp = 3 * cmax + (backward ? 3 * qmax : 0);
  static_cast<tile::Layout&>(l) =
      tile::make_layout(t, inputs16, i2t, sizeof(float) * kWarps * size_t(l.scratch_warp));
  return l;
}

__host__ __device__ inline int context_max(const ScanProblem& p) {
  return static_cast<int>(p.i2t ? p.max_len : p.R);
}
__host__ __device__ inline int query_max(const ScanProblem& p) {
  return static_cast<int>(p.i2t ? p.R : p.max_len);
}

// ----------------------------------------------------------------------------------------------
// Step 2: per-pair reductions (one warp per pair)
// ----------------------------------------------------------------------------------------------

__device__ inline bool is_clipped(int raw_norm) {
  return raw_norm == kClippedL2 || raw_norm == kClippedL1 || raw_norm == kClipped;
}
// leaky(x) = x if x > 0 else 0.1 x, for the clipped norms; the identity otherwise.
__device__ inline float clip(float s, int raw_norm) {
  return (is_clipped(raw_norm) && !(s > 0.f)) ? kLeakySlopeF * s : s;
}
// d clip(s) / ds (LeakyReLU's backward uses the 0.1 slope at s == 0, and so does this).
__device__ inline float clip_slope(float s, int raw_norm) {
  return (is_clipped(raw_norm) && !(s > 0.f)) ? kLeakySlopeF : 1.f;
}

// One pair's view of the score tile and of its context Gram matrix.
struct Pair {
  const float* S;     // S(c, k) = S[k * ld + c]
  int ld, C, Q;
  const float* G;     // C x C row-major (symmetric)
  const float* qsq;   // Q squared query norms
  int64_t i, j;       // image and caption (indices within this launch)
  int64_t word0;      // packed index of caption j's first word
  __device__ float s(int c, int k) const { return S[k * ld + c]; }
};

__device__ Pair make_pair(const ScanProblem& p, const BlockWork& w, const float* scores,
                          int score_ld, int li, int jj) {
  Pair q;
  const int R = static_cast<int>(p.R);
  q.i = w.img0 + li;
  q.j = w.cap0 + jj;
  q.word0 = p.word_off[q.j];
  const int col0 = static_cast<int>(q.word0 - w.word0);
  const int len = static_cast<int>(p.lens[q.j]);
  q.ld = score_ld;
  if (p.i2t) {
    q.S = scores + li * R * score_ld + col0;
    q.C = len;
    q.Q = R;
    q.G = p.gram + p.gram_off[q.j];
    q.qsq = p.query_sq + q.i * p.R;
  } else {
    q.S = scores + col0 * score_ld + li * R;
    q.C = R;
    q.Q = len;
    q.G = p.gram + q.i * p.R * p.R;
    q.qsq = p.query_sq + q.word0;
  }
  return q;
}

// Per context item c: the statistics of the raw-score normalisation over the query axis.
// The normalised score is clip(s) * scale (norms) or exp(s - shift) * scale (softmax).
__device__ void context_stats(const Pair& q, int raw_norm, int c, float& scale, float& shift) {
  scale = 1.f;
  shift = 0.f;
  if (raw_norm == kClippedL2 || raw_norm == kL2) {
    float total = 0.f;
    for (int k = 0; k < q.Q; ++k) {
      const float f = clip(q.s(c, k), raw_norm);
      total += f * f;
    }
    scale = 1.f / (sqrtf(total) + kEps);
  } else if (raw_norm == kClippedL1 || raw_norm == kL1) {
    float total = 0.f;
    for (int k = 0; k < q.Q; ++k) total += fabsf(clip(q.s(c, k), raw_norm));
    scale = 1.f / (total + kEps);
  } else if (raw_norm == kSoftmaxNorm) {
    float mx = -INFINITY;
    for (int k = 0; k < q.Q; ++k) mx = fmaxf(mx, q.s(c, k));
    float total = 0.f;
    for (int k = 0; k < q.Q; ++k) total += expf(q.s(c, k) - mx);
    scale = 1.f / total;
    shift = mx;
  }
}

__device__ inline float normalized(float s, int raw_norm, float scale, float shift) {
  return raw_norm == kSoftmaxNorm ? expf(s - shift) * scale : clip(s, raw_norm) * scale;
}

__device__ void all_context_stats(const Pair& q, int raw_norm, float* scale, float* shift,
                                  int lane) {
  for (int c = lane; c < q.C; c += 32) context_stats(q, raw_norm, c, scale[c], shift[c]);
  __syncwarp();
}

// alpha[c] = softmax_c(lambda * a[c, k]) for query k, in the warp's scratch.
__device__ void attention_row(const Pair& q, int k, float lambda, int raw_norm,
                              const float* scale, const float* shift, float* alpha, int lane) {
  float mx = -INFINITY;
  for (int c = lane; c < q.C; c += 32) {
    const float z = lambda * normalized(q.s(c, k), raw_norm, scale[c], shift[c]);
    alpha[c] = z;
    mx = fmaxf(mx, z);
  }
  mx = warp_max(mx);
  float total = 0.f;
  for (int c = lane; c < q.C; c += 32) {
    const float e = expf(alpha[c] - mx);
    alpha[c] = e;
    total += e;
  }
  const float inv = 1.f / warp_sum(total);
  for (int c = lane; c < q.C; c += 32) alpha[c] *= inv;
  __syncwarp();
}

// (G alpha)[c]: G is symmetric, so column c is read as row c' -> lanes read consecutive c.
__device__ inline float gram_times_alpha(const Pair& q, const float* alpha, int c) {
  float u = 0.f;
  for (int c2 = 0; c2 < q.C; ++c2) u = fmaf(__ldg(q.G + c2 * q.C + c), alpha[c2], u);
  return u;
}

// q_k . ctx_k = sum_c alpha_c S(c, k) and |ctx_k|^2 = alpha^T G alpha (the Gram identity).
__device__ float2 dot_and_ctx_sq(const Pair& q, int k, const float* alpha, int lane) {
  float dot = 0.f, quad = 0.f;
  for (int c = lane; c < q.C; c += 32) {
    dot = fmaf(alpha[c], q.s(c, k), dot);
    quad = fmaf(alpha[c], gram_times_alpha(q, alpha, c), quad);
  }
  const float2 out = make_float2(warp_sum(dot), warp_sum(quad));
  __syncwarp();  // every lane is done with alpha before the next query overwrites it
  return out;
}

// cos(q_k, ctx_k) = dot / max(|q_k| |ctx_k|, eps)
__device__ inline float cosine_from(float dot, float ctx_sq, float q_sq) {
  return dot / fmaxf(sqrtf(q_sq) * sqrtf(fmaxf(ctx_sq, 0.f)), kEps);
}

struct Aggregate {
  float total = 0.f, mx = -INFINITY, lse_mx = -INFINITY, lse_total = 0.f;
  __device__ void add(float r, float lse_lambda) {
    total += r;
    mx = fmaxf(mx, r);
    const float t = lse_lambda * r;  // online logsumexp of lse_lambda * r
    if (t > lse_mx) {
      lse_total = lse_total * expf(lse_mx - t) + 1.f;
      lse_mx = t;
    } else {
      lse_total += expf(t - lse_mx);
    }
  }
  __device__ float result(int agg, int count, float lse_lambda) const {
    switch (agg) {
      case kMean: return total / count;
      case kLse: return (lse_mx + logf(lse_total)) / lse_lambda;
      case kMax: return mx;
      default: return total;
    }
  }
};

__device__ float pair_forward(const ScanProblem& p, const Pair& q, float* scratch, int cmax,
                              int lane) {
  float* scale = scratch;
  float* shift = scratch + cmax;
  float* alpha = scratch + 2 * cmax;
  all_context_stats(q, p.raw_norm, scale, shift, lane);
  Aggregate agg;
  for (int k = 0; k < q.Q; ++k) {
    attention_row(q, k, p.smooth, p.raw_norm, scale, shift, alpha, lane);
    const float2 dq = dot_and_ctx_sq(q, k, alpha, lane);
    agg.add(cosine_from(dq.x, dq.y, q.qsq[k]), p.lse_lambda);
  }
  return agg.result(p.agg, q.Q, p.lse_lambda);
}

// Outputs of the backward for one pair: element (c, k) of each matrix at base[k * ld + c].
struct PairGrad {
  float* d_scores;
  float* attn;
  float* attn_scaled;
  int64_t ld;
  float* d_qnorm;          // d_qnorm[k * qnorm_stride]
  int64_t qnorm_stride;
  __device__ int64_t at(int c, int k) const { return int64_t(k) * ld + c; }
};

__device__ PairGrad make_pair_grad(const ScanProblem& p, const Pair& q, float* d_scores,
                                   float* attn, float* attn_scaled, float* d_qnorm) {
  PairGrad g;
  int64_t base;
  if (p.i2t) {
    g.ld = p.total_words;
    base = q.i * p.R * g.ld + q.word0;
    g.d_qnorm = d_qnorm + q.i * p.R * p.n_cap + q.j;
    g.qnorm_stride = p.n_cap;
  } else {
    g.ld = p.n_img * p.R;
    base = q.word0 * g.ld + q.i * p.R;
    g.d_qnorm = d_qnorm + q.word0 * p.n_img + q.i;
    g.qnorm_stride = p.n_img;
  }
  g.d_scores = d_scores + base;
  g.attn = attn + base;
  g.attn_scaled = attn_scaled + base;
  return g;
}

// dL/dr_k of the aggregation, times the upstream gradient `up`.
__device__ float aggregation_weight(int agg, float r, float stat_a, float stat_b, int count,
                                    float lse_lambda) {
  switch (agg) {
    case kMean: return 1.f / count;
    case kLse: return expf(lse_lambda * r - stat_a) / stat_b;       // softmax(lse_lambda r)_k
    case kMax: return r == stat_a ? 1.f / stat_b : 0.f;            // split evenly among ties
    default: return 1.f;
  }
}

// The backward of one pair (see scan_backward_cuda at the end for what is written). Passes:
//   1. context statistics; 2. per query: alpha, r_k, and what the cosine needs;
//   3. the aggregation's and the cosine's backward -> dL/d(q.ctx), dL/d|ctx|^2, dL/d|q|;
//   4. per query: back through alpha's softmax -> dL/da (a: normalised raw scores), stored in
//      d_scores for now, with alpha and the |ctx|^2 term;
//   5. per context item: back through the normalisation over the query axis and the clip,
//      plus the direct q.ctx term -> dL/dS.
// Passes 4 and 5 walk c with the same lane mapping, so each lane re-reads only its own writes.
__device__ void pair_backward(const ScanProblem& p, const Pair& q, float up, const PairGrad& g,
                              float* scratch, int cmax, int qmax, int lane) {
  float* scale = scratch;
  float* shift = scratch + cmax;
  float* alpha = scratch + 2 * cmax;
  float* r = scratch + 3 * cmax;          // r_k
  float* d_dot = r + qmax;                // q.ctx_k, then dL/d(q.ctx_k)
  float* d_sq = d_dot + qmax;             // |ctx_k|^2, then dL/d|ctx_k|^2
  const int raw_norm = p.raw_norm;
  const float lambda = p.smooth;

  all_context_stats(q, raw_norm, scale, shift, lane);
  for (int k = 0; k < q.Q; ++k) {
    attention_row(q, k, lambda, raw_norm, scale, shift, alpha, lane);
    const float2 dq = dot_and_ctx_sq(q, k, alpha, lane);
    if (lane == 0) {
      r[k] = cosine_from(dq.x, dq.y, q.qsq[k]);
      d_dot[k] = dq.x;
      d_sq[k] = dq.y;
    }
  }
  __syncwarp();

  // Statistics of the aggregation over the queries (max: value and tie count; lse: the
  // logsumexp's max and sum).
  float stat_a = 0.f, stat_b = 1.f;
  if (p.agg == kMax || p.agg == kLse) {
    const float factor = p.agg == kLse ? p.lse_lambda : 1.f;
    float mx = -INFINITY;
    for (int k = lane; k < q.Q; k += 32) mx = fmaxf(mx, factor * r[k]);
    mx = warp_max(mx);
    float total = 0.f;
    for (int k = lane; k < q.Q; k += 32) {
      total += p.agg == kLse ? expf(factor * r[k] - mx) : (r[k] == mx ? 1.f : 0.f);
    }
    stat_a = mx;
    stat_b = warp_sum(total);
  }
  for (int k = lane; k < q.Q; k += 32) {
    const float dr = up * aggregation_weight(p.agg, r[k], stat_a, stat_b, q.Q, p.lse_lambda);
    const float dot = d_dot[k], ctx_sq = fmaxf(d_sq[k], 0.f);
    const float q_norm = sqrtf(q.qsq[k]), ctx_norm = sqrtf(ctx_sq);
    const float product = q_norm * ctx_norm;
    const float den = fmaxf(product, kEps);
    float d_qn = 0.f, d_cs = 0.f;
    if (product >= kEps) {  // the clamp passes gradient to the norms only where it is inactive
      const float d_den = -dr * dot / (den * den);
      d_qn = d_den * ctx_norm;
      d_cs = ctx_norm > 0.f ? d_den * q_norm / (2.f * ctx_norm) : 0.f;
    }
    d_dot[k] = dr / den;
    d_sq[k] = d_cs;
    g.d_qnorm[k * g.qnorm_stride] = d_qn;
  }
  __syncwarp();

  // Pass 4: dL/dalpha[c] = d_dot S(c,k) + 2 d_sq (G alpha)[c]; softmax backward; * lambda.
  for (int k = 0; k < q.Q; ++k) {
    attention_row(q, k, lambda, raw_norm, scale, shift, alpha, lane);
    const float dd = d_dot[k], ds = d_sq[k];
    float inner = 0.f;
    for (int c = lane; c < q.C; c += 32) {
      const float d_alpha = dd * q.s(c, k) + 2.f * ds * gram_times_alpha(q, alpha, c);
      g.d_scores[g.at(c, k)] = d_alpha;
      inner = fmaf(alpha[c], d_alpha, inner);
    }
    inner = warp_sum(inner);
    for (int c = lane; c < q.C; c += 32) {
      const float a = alpha[c];
      g.d_scores[g.at(c, k)] = lambda * a * (g.d_scores[g.at(c, k)] - inner);
      g.attn[g.at(c, k)] = a;
      g.attn_scaled[g.at(c, k)] = 2.f * ds * a;
    }
    __syncwarp();
  }

  // Pass 5: through the normalisation over the queries, then the clip.
  for (int c = lane; c < q.C; c += 32) {
    float norm_total = 0.f, inner = 0.f;
    for (int k = 0; k < q.Q; ++k) {
      const float s = q.s(c, k), da = g.d_scores[g.at(c, k)];
      if (raw_norm == kSoftmaxNorm) {
        inner = fmaf(expf(s - shift[c]) * scale[c], da, inner);
      } else {
        const float f = clip(s, raw_norm);
        norm_total += (raw_norm == kClippedL2 || raw_norm == kL2) ? f * f : fabsf(f);
        inner = fmaf(da, f, inner);
      }
    }
    const bool l2 = raw_norm == kClippedL2 || raw_norm == kL2;
    const bool l1 = raw_norm == kClippedL1 || raw_norm == kL1;
    const float norm = l2 ? sqrtf(norm_total) : norm_total;
    const float inv = 1.f / (norm + kEps);
    for (int k = 0; k < q.Q; ++k) {
      const float s = q.s(c, k), da = g.d_scores[g.at(c, k)];
      float d_s;
      if (raw_norm == kSoftmaxNorm) {
        d_s = expf(s - shift[c]) * scale[c] * (da - inner);
      } else {
        const float f = clip(s, raw_norm);
        float df = da;
        if (l2) {
          df = inv * da - (norm > 0.f ? inv * inv * inner * f / norm : 0.f);
        } else if (l1) {
          const float sign = f > 0.f ? 1.f : (f < 0.f ? -1.f : 0.f);
          df = inv * da - inv * inv * inner * sign;
        }
        d_s = df * clip_slope(s, raw_norm);
      }
      g.d_scores[g.at(c, k)] = d_s + d_dot[k] * g.attn[g.at(c, k)];
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

struct BlockSetup {
  Tile t;
  Layout l;
  BlockWork w;
  int64_t* row_off;
  int64_t* col_off;
  unsigned char* main;
  float* warp_scratch;
};

template <typename T>
__device__ BlockSetup setup_and_score(const ScanProblem& p, unsigned char* smem, bool backward,
                                      bool vec) {
  BlockSetup b;
  b.t = tile::make_tile(p.col_frags);
  b.l = make_layout(b.t, sizeof(T) == 2, p.i2t, context_max(p), query_max(p), backward);
  b.w = tile::block_work(p, b.t);
  b.row_off = reinterpret_cast<int64_t*>(smem + b.l.row_off);
  b.col_off = reinterpret_cast<int64_t*>(smem + b.l.col_off);
  b.main = smem + b.l.main;
  b.warp_scratch = reinterpret_cast<float*>(smem + b.l.scratch) +
                   (threadIdx.x / 32) * b.l.scratch_warp;
  tile::fill_offset_tables(p, b.t, b.w, nullptr, b.row_off, b.col_off);
  tile::score_tile<T>(p, b.t, b.l.score_ld, p.i2t, b.w, b.row_off, b.col_off, b.main, vec);
  return b;
}

// Two resident blocks per SM (about 100 KB of shared memory each at R = 36 on H100) caps the
// registers at 128 per thread; the few spills that costs are in the per-pair epilogue.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) scan_forward_kernel(ScanProblem p, float* sims,
                                                               bool vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  const BlockSetup b = setup_and_score<T>(p, smem, false, vec);
  const float* scores = reinterpret_cast<const float*>(b.main);
  tile::for_each_pair(b.w, [&](int li, int jj, int lane) {
    const Pair q = make_pair(p, b.w, scores, b.l.score_ld, li, jj);
    const float sim = pair_forward(p, q, b.warp_scratch, context_max(p), lane);
    if (lane == 0) sims[q.i * p.n_cap + q.j] = sim;
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) scan_backward_kernel(
    ScanProblem p, const float* grad_sims, float* d_scores, float* attn, float* attn_scaled,
    float* d_qnorm, bool vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  const BlockSetup b = setup_and_score<T>(p, smem, true, vec);
  const float* scores = reinterpret_cast<const float*>(b.main);
  tile::for_each_pair(b.w, [&](int li, int jj, int lane) {
    const Pair q = make_pair(p, b.w, scores, b.l.score_ld, li, jj);
    const PairGrad g = make_pair_grad(p, q, d_scores, attn, attn_scaled, d_qnorm);
    pair_backward(p, q, grad_sims[q.i * p.n_cap + q.j], g, b.warp_scratch, context_max(p),
                  query_max(p), lane);
  });
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

bool valid_problem(const ScanProblem& p) {
  if (!tile::valid_col_frags(p.col_frags)) return false;
  const Tile t = tile::make_tile(p.col_frags);
  return p.R >= 1 && p.R <= t.rows_cap && p.max_len >= 1 && p.max_len <= t.cols_cap &&
         p.d >= 1 && p.n_groups >= 1 && p.raw_norm >= kClippedL2 && p.raw_norm <= kSoftmaxNorm &&
         p.agg >= kMean && p.agg <= kSum;
}

template <typename Kernel, typename... Args>
int launch(Kernel kernel, const ScanProblem& p, bool backward, int elem_bytes, void* stream,
           Args... args) {
  const Tile t = tile::make_tile(p.col_frags);
  const Layout l = make_layout(t, elem_bytes == 2, p.i2t, context_max(p), query_max(p), backward);
  const int64_t blocks = tile::block_count(p, t, p.n_groups);
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(l.total));
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<static_cast<unsigned>(blocks), kThreads, l.total, static_cast<cudaStream_t>(stream)>>>(
      p, args...);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int scan_tile_rows(int col_frags) { return tile::make_tile(col_frags).rows_cap; }
int scan_tile_cols(int col_frags) { return tile::make_tile(col_frags).cols_cap; }

int scan_forward(const ScanProblem& p, float* sims, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  if (!valid_problem(p)) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = tile::vector_loads_ok(p);
  switch (p.dtype) {
    case kFloat32: return launch(scan_forward_kernel<float>, p, false, 4, stream, sims, vec);
    case kFloat16: return launch(scan_forward_kernel<__half>, p, false, 2, stream, sims, vec);
    case kBFloat16:
      return launch(scan_forward_kernel<__nv_bfloat16>, p, false, 2, stream, sims, vec);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int scan_backward(const ScanProblem& p, const float* grad_sims, float* d_scores, float* attn,
                  float* attn_scaled, float* d_query_norm, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  if (!valid_problem(p)) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = tile::vector_loads_ok(p);
  switch (p.dtype) {
    case kFloat32:
      return launch(scan_backward_kernel<float>, p, true, 4, stream, grad_sims, d_scores, attn,
                    attn_scaled, d_query_norm, vec);
    case kFloat16:
      return launch(scan_backward_kernel<__half>, p, true, 2, stream, grad_sims, d_scores, attn,
                    attn_scaled, d_query_norm, vec);
    case kBFloat16:
      return launch(scan_backward_kernel<__nv_bfloat16>, p, true, 2, stream, grad_sims, d_scores,
                    attn, attn_scaled, d_query_norm, vec);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace rcar_cuda

#ifndef __CUDA_ARCH__  // the Python bindings: host code only (csrc/cuda/bind.h)
#include "cuda/bind.h"

// Launchers (rcar_fast/ops/scan.py builds the ScanProblemCuda; pointers and the stream
// are integers, every output float32):
//   scan_tile_rows / scan_tile_cols: a col_frags tile's capacity, region rows and word columns.
//   scan_forward_cuda: sims[i * n_cap + j], (n_img, n_cap).
//   scan_backward_cuda: the backward of scan_forward for grad_sims (n_img, n_cap). Writes, for
//     every pair, with "query rows" and "context columns" (t2i: rows = packed words, columns =
//     image rows i*R + c; i2t: rows = image rows i*R + k, columns = packed words), each a
//     row-major matrix:
//       d_scores    dL/dS for the raw scores S[c, k] = context_c . query_k
//       attn        alpha[k, c], the attention weights
//       attn_scaled 2 * dL/d|ctx_k|^2 * alpha[k, c]   (so that dL/dG = attn_scaled^T attn)
//     and d_query_norm, dL/d|q_k|: t2i (total_words, n_img) [word, i]; i2t (n_img*R, n_cap)
//     [row, j]. Every entry of the outputs that belongs to a pair is written; the caller does
//     the big GEMMs.
RCAR_FAST_BINDINGS(cuda_scan, m) {
  namespace py = pybind11;
  using namespace rcar_cuda::bind;
  using rcar_cuda::ScanProblem;
  ProblemClass<ScanProblem> problem(m, "ScanProblemCuda", "rcar_cuda::ScanProblem (csrc/cuda/scan.cu)");
  tile_fields(problem)
      .fields("gram", &ScanProblem::gram, "gram_off", &ScanProblem::gram_off, "query_sq", &ScanProblem::query_sq,
              "i2t", &ScanProblem::i2t, "raw_norm", &ScanProblem::raw_norm, "agg", &ScanProblem::agg,
              "smooth", &ScanProblem::smooth, "lse_lambda", &ScanProblem::lse_lambda)
      .finish();
  m.def("scan_tile_rows", &rcar_cuda::scan_tile_rows, "region rows of a SCAN tile for col_frags");
  m.def("scan_tile_cols", &rcar_cuda::scan_tile_cols, "word columns of a SCAN tile for col_frags");
  bind_launcher<&rcar_cuda::scan_forward>(m, "scan_forward_cuda", py::arg("problem"), py::arg("sims"),
                                          py::arg("stream"), "SCAN all-pairs forward; problem: a ScanProblemCuda");
  bind_launcher<&rcar_cuda::scan_backward>(
      m, "scan_backward_cuda", py::arg("problem"), py::arg("grad_sims"), py::arg("d_scores"), py::arg("attn"),
      py::arg("attn_scaled"), py::arg("d_query_norm"), py::arg("stream"),
      "SCAN all-pairs backward: per-pair dL/dS, attention weights and dL/d|q| (see scan.cu)");
}
#endif
