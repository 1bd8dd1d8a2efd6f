// RCAR similarity head (official EncoderSimilarity), eval-mode forward, on the GPU.
//
// Correctness first, plain SIMT: a persistent grid of blocks, each scoring one (image, caption)
// pair at a time with all 256 threads. The pair's small state (attention weights, lambda, h)
// lives in shared memory; its (Q, d) and (Q, s) intermediates (attended context, modulation m,
// alignment vectors, MLP hidden layers) live in a per-block workspace slot that is reused for
// every pair the block scores, so memory is O(blocks x Q x d), never O(pairs x Q x d), and the
// slot stays hot in L2. Weights are fp32, transposed to (in, out) so that a thread per output
// column reads them coalesced.
//
// Order of operations follows rcar_fast/reference.py (RCARHead.pair_scores): the attended
// context is computed explicitly (no Gram shortcut) and l2-normalised with eps added to the norm.
#include <cuda_runtime.h>

#include <cstdint>

#include "contract.h"
#include "cuda/warp.cuh"

namespace rcar_cuda {

// The codes of rcar_fast.contract (DType, RawNorm, ...), generated into csrc/contract.h.
using namespace rcar_contract;

// RCAR similarity head, eval-mode forward (csrc/cuda/rcar.cu). Features are float32.
// `weights` is a device array of pointers to float32 tensors, in this order (Wt = the
// nn.Linear weight transposed to (in, out), contiguous; b = its bias):
//   per alignment step t:  alv.Wt (d, s), alv.b (s)
//   per RCR step t:        matrix1.Wt (s, 2s), matrix1.b (2s), matrix2.Wt (2s, d), matrix2.b (d),
//                          smooth1.Wt (s, s/2), smooth1.b (s/2), smooth2.w (s/2), smooth2.b (1)
//   per RAR step n:        q.Wt (s, s), q.b (s), k.Wt (s, s), k.b (s), v.w (s), v.b (1)
//   then                   eval.w (s), eval.b (1)
// with step counts alv/rcr/rar = only_rar n: 1/0/n; only_rcr n: n/n/0; coop_rcar n: n/n-1/n.
struct RcarProblem {
  const float* img;              // (n_img, R, d)
  const float* cap;              // (n_cap, Lmax, d); padding never read
  int64_t n_img, R, d, n_cap;
  int64_t img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
  const int64_t* lens;
  int64_t max_len;
  int64_t sim_dim;
  int regulator;                 // Regulator
  int steps;
  int i2t;
  float smooth;
  const float* const* weights;
  float* workspace;              // n_blocks * rcar_workspace_floats(...) floats
  int64_t n_blocks;              // persistent blocks; each loops over pairs
};

}  // namespace rcar_cuda

namespace rcar_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowBlock = 16;  // rows of A per register block in block_gemm
constexpr float kEps = kEpsF;  // rcar_contract

__host__ __device__ inline int64_t padded_rows(int64_t queries) {
  return (queries + kRowBlock - 1) / kRowBlock * kRowBlock;
}

__host__ __device__ inline int64_t query_max(const RcarProblem& p) { return p.i2t ? p.R : p.max_len; }
__host__ __device__ inline int64_t context_max(const RcarProblem& p) { return p.i2t ? p.max_len : p.R; }

__host__ __device__ inline int64_t workspace_floats(int64_t max_queries, int64_t d, int64_t s) {
  return padded_rows(max_queries) * (2 * d + 3 * s);  // X, M: (Q, d); V: (Q, s); H: (Q, 2s)
}

__host__ __device__ inline int64_t shared_floats(int64_t qcap, int64_t cmax, int64_t s) {
  return qcap * cmax + 4 * qcap + cmax + 2 * s + 32;
}


// For each of the Q rows, a warp per row: out(k, sum_{n < N} term(k, n) * weight[n]), lanes
// over n (out runs on lane 0).
template <class Term, class Out>
__device__ void warp_row_dots(int Q, int64_t N, const float* weight, Term term, Out out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int k = warp; k < Q; k += kWarps) {
    float total = 0.f;
    for (int64_t n = lane; n < N; n += 32) total = fmaf(term(k, n), __ldg(weight + n), total);
    total = warp_sum(total);
    if (lane == 0) out(k, total);
  }
}

// Sum over the block; every thread gets the total. `red` holds kWarps floats.
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  __syncthreads();  // red may be reused right after
  return total;
}

__device__ inline float leaky(float x) { return x > 0.f ? x : kLeakySlopeF * x; }

// tanh to fp32 accuracy. (Under --use_fast_math tanhf compiles to tanh.approx.f32, whose ~5e-4
// relative error would show in the scores.) tanh|x| = e / (e + 2) with e = expm1(2|x|).
__device__ inline float tanh_accurate(float x) {
  const float ax = fabsf(x);
  if (ax > 9.f) return copysignf(1.f, x);  // tanh(9) = 1 - 3e-8: 1 in fp32
  const float e = expm1f(2.f * ax);
  return copysignf(e / (e + 2.f), x);
}

// The weight pointer table (order documented at RcarProblem above).
struct Weights {
  const float* const* table;
  int n_alv, n_rcr, n_rar;
  __device__ const float* alv(int t, int idx) const { return table[2 * t + idx]; }
  __device__ const float* rcr(int t, int idx) const { return table[2 * n_alv + 8 * t + idx]; }
  __device__ const float* rar(int n, int idx) const {
    return table[2 * n_alv + 8 * n_rcr + 6 * n + idx];
  }
  __device__ const float* eval(int idx) const {
    return table[2 * n_alv + 8 * n_rcr + 6 * n_rar + idx];
  }
};

__host__ __device__ inline void module_counts(int regulator, int steps, int& alv, int& rcr,
                                              int& rar) {
  if (regulator == kOnlyRar) {
    alv = 1; rcr = 0; rar = steps;
  } else if (regulator == kOnlyRcr) {
    alv = steps; rcr = steps; rar = 0;
  } else {
    alv = steps; rcr = steps - 1; rar = steps;
  }
}

// One pair's query and context rows (t2i: queries = the caption's words, context = regions).
struct PairRefs {
  const float* q_base;
  int64_t q_stride;
  int Q;
  const float* c_base;
  int64_t c_stride;
  int C;
  __device__ const float* query(int k) const { return q_base + k * q_stride; }
  __device__ const float* context(int c) const { return c_base + c * c_stride; }
};

__device__ PairRefs pair_refs(const RcarProblem& p, int64_t i, int64_t j) {
  const float* words = p.cap + j * p.cap_stride_n;
  const float* regions = p.img + i * p.img_stride_n;
  const int len = static_cast<int>(p.lens[j]), R = static_cast<int>(p.R);
  PairRefs r;
  if (p.i2t) {
    r.q_base = regions; r.q_stride = p.img_stride_r; r.Q = R;
    r.c_base = words; r.c_stride = p.cap_stride_w; r.C = len;
  } else {
    r.q_base = words; r.q_stride = p.cap_stride_w; r.Q = len;
    r.c_base = regions; r.c_stride = p.img_stride_r; r.C = R;
  }
  return r;
}

// Per-pair scratch: shared memory (small) and the block's workspace slot (big).
struct Scratch {
  float* alpha;     // (qcap, cmax): raw scores, then attention weights
  float* lam;       // (qcap,) per-query temperature lambda_k
  float* ctx_inv;   // (qcap,) 1 / (|ctx_k| + eps)
  float* ctx_norm;  // (qcap,) |ctx_k|
  float* logits;    // (qcap,) RAR logits / weights, per-query cosines
  float* cstat;     // (cmax,) 1 / (norm over the queries + eps), per context item
  float* h;         // (s,) the pair vector
  float* qh;        // (s,) rar_q_w(h)
  float* red;       // (32,) block reductions
  float* X;         // (qcap, d): attended context, then (q - unit ctx)^2
  float* M;         // (qcap, d): modulation m
  float* V;         // (qcap, s): alignment vectors
  float* H;         // (qcap, 2s): MLP hidden layers
  int64_t cmax, d, s;
};

__device__ Scratch make_scratch(float* smem, float* slot, int64_t qcap, int64_t cmax, int64_t d,
                                int64_t s) {
  Scratch sc;
  sc.alpha = smem;
  sc.lam = sc.alpha + qcap * cmax;
  sc.ctx_inv = sc.lam + qcap;
  sc.ctx_norm = sc.ctx_inv + qcap;
  sc.logits = sc.ctx_norm + qcap;
  sc.cstat = sc.logits + qcap;
  sc.h = sc.cstat + cmax;
  sc.qh = sc.h + s;
  sc.red = sc.qh + s;
  sc.X = slot;
  sc.M = sc.X + qcap * d;
  sc.V = sc.M + qcap * d;
  sc.H = sc.V + qcap * s;
  sc.cmax = cmax;
  sc.d = d;
  sc.s = s;
  return sc;
}

// out(r, n) <- epi(r, n, bias[n] + sum_k A[r * lda + k] * Wt[k * N + n]) for r < rows, n < N.
// A thread per output column (coalesced weight reads), RB rows per register block; A is read
// with the same address by the whole warp (a broadcast). A's rows up to the next multiple of
// RB must be readable (the workspace rows are padded to kRowBlock); their results are dropped.
template <int RB, typename Epilogue>
__device__ void block_gemm(const float* A, int64_t lda, int rows, int64_t K,
                           const float* __restrict__ Wt, int64_t N,
                           const float* __restrict__ bias, Epilogue epi) {
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    const float b = bias ? __ldg(bias + n) : 0.f;
    for (int r0 = 0; r0 < rows; r0 += RB) {
      float acc[RB];
#pragma unroll
      for (int rr = 0; rr < RB; ++rr) acc[rr] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float w = __ldg(Wt + k * N + n);
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) acc[rr] = fmaf(A[(r0 + rr) * lda + k], w, acc[rr]);
      }
#pragma unroll
      for (int rr = 0; rr < RB; ++rr) {
        if (r0 + rr < rows) epi(r0 + rr, n, acc[rr] + b);
      }
    }
  }
}

// Cross attention of the pair with the current modulation (M, unless `modulated` is false:
// all ones) and temperatures (lam): leaves ctx_k in X, |ctx_k| and 1/(|ctx_k|+eps).
__device__ void attend(const PairRefs& pr, const Scratch& sc, bool modulated) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t d = sc.d, cmax = sc.cmax;
  // Raw scores s[c, k] = context_c . (query_k * m_k), stored at alpha[k * cmax + c].
  for (int idx = warp; idx < pr.Q * pr.C; idx += kWarps) {
    const int k = idx / pr.C, c = idx % pr.C;
    const float* q = pr.query(k);
    const float* x = pr.context(c);
    const float* m = sc.M + k * d;
    float s = 0.f;
    for (int64_t e = lane; e < d; e += 32) s = fmaf(x[e], modulated ? q[e] * m[e] : q[e], s);
    s = warp_sum(s);
    if (lane == 0) sc.alpha[k * cmax + c] = s;
  }
  __syncthreads();
  // clipped_l2norm across the queries, per context item.
  for (int c = threadIdx.x; c < pr.C; c += kThreads) {
    float total = 0.f;
    for (int k = 0; k < pr.Q; ++k) {
      const float f = leaky(sc.alpha[k * cmax + c]);
      total += f * f;
    }
    sc.cstat[c] = 1.f / (sqrtf(total) + kEps);
  }
  __syncthreads();
  // alpha[k, c] = softmax_c(lambda_k * a[c, k]).
  for (int k = threadIdx.x; k < pr.Q; k += kThreads) {
    float* row = sc.alpha + k * cmax;
    const float lambda = sc.lam[k];
    float mx = -INFINITY;
    for (int c = 0; c < pr.C; ++c) {
      const float z = lambda * (leaky(row[c]) * sc.cstat[c]);
      row[c] = z;
      mx = fmaxf(mx, z);
    }
    float total = 0.f;
    for (int c = 0; c < pr.C; ++c) {
      const float e = expf(row[c] - mx);
      row[c] = e;
      total += e;
    }
    const float inv = 1.f / total;
    for (int c = 0; c < pr.C; ++c) row[c] *= inv;
  }
  __syncthreads();
  // ctx_k = sum_c alpha[k, c] context_c, 8 queries per register block.
  for (int64_t e = threadIdx.x; e < d; e += kThreads) {
    for (int k0 = 0; k0 < pr.Q; k0 += 8) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int c = 0; c < pr.C; ++c) {
        const float x = pr.context(c)[e];
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) acc[kk] = fmaf(sc.alpha[(k0 + kk) * cmax + c], x, acc[kk]);
      }
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        if (k0 + kk < pr.Q) sc.X[(k0 + kk) * d + e] = acc[kk];
      }
    }
  }
  __syncthreads();
  for (int k = warp; k < pr.Q; k += kWarps) {
    float total = 0.f;
    for (int64_t e = lane; e < d; e += 32) {
      const float v = sc.X[k * d + e];
      total += v * v;
    }
    total = warp_sum(total);
    if (lane == 0) {
      const float norm = sqrtf(total);
      sc.ctx_norm[k] = norm;
      sc.ctx_inv[k] = 1.f / (norm + kEps);
    }
  }
  __syncthreads();
}

// l2-normalise rows 0..rows-1 of a (rows, n) matrix in place, one warp per row.
__device__ void l2norm_rows(float* x, int rows, int64_t n) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
    float* row = x + r * n;
    float total = 0.f;
    for (int64_t e = lane; e < n; e += 32) total += row[e] * row[e];
    const float inv = 1.f / (sqrtf(warp_sum(total)) + kEps);
    for (int64_t e = lane; e < n; e += 32) row[e] *= inv;
  }
  __syncthreads();
}

// Alignment step: V = l2norm(W (q - l2norm(ctx))^2 + b), one row per query.
__device__ void alignment(const PairRefs& pr, const Scratch& sc, bool modulated,
                          const float* wt, const float* bias) {
  attend(pr, sc, modulated);
  const int64_t d = sc.d, s = sc.s;
  for (int64_t e = threadIdx.x; e < d; e += kThreads) {
    for (int k = 0; k < pr.Q; ++k) {
      const float diff = pr.query(k)[e] - sc.X[k * d + e] * sc.ctx_inv[k];
      sc.X[k * d + e] = diff * diff;
    }
  }
  __syncthreads();
  float* V = sc.V;
  block_gemm<kRowBlock>(sc.X, d, pr.Q, d, wt, s, bias,
                        [&](int r, int64_t n, float v) { V[r * s + n] = v; });
  __syncthreads();
  l2norm_rows(sc.V, pr.Q, s);
}

// RCR step t: m <- clamp(tanh(matrix(v)) + m, -1, 1), lambda <- relu(smooth(v) + lambda).
__device__ void correspondence(const PairRefs& pr, const Scratch& sc, const Weights& w, int t,
                               bool modulated) {
  const int64_t d = sc.d, s = sc.s, s2 = 2 * s, sh = s / 2;
  float* H = sc.H;
  float* M = sc.M;
  block_gemm<kRowBlock>(sc.V, s, pr.Q, s, w.rcr(t, 0), s2, w.rcr(t, 1),
                        [&](int r, int64_t n, float v) { H[r * s2 + n] = tanh_accurate(v); });
  __syncthreads();
  block_gemm<kRowBlock>(H, s2, pr.Q, s2, w.rcr(t, 2), d, w.rcr(t, 3),
                        [&](int r, int64_t n, float v) {
                          const float prev = modulated ? M[r * d + n] : 1.f;
                          M[r * d + n] = fminf(fmaxf(tanh_accurate(v) + prev, -1.f), 1.f);
                        });
  __syncthreads();
  block_gemm<kRowBlock>(sc.V, s, pr.Q, s, w.rcr(t, 4), sh, w.rcr(t, 5),
                        [&](int r, int64_t n, float v) { H[r * sh + n] = tanh_accurate(v); });
  __syncthreads();
  const float b2 = *w.rcr(t, 7);
  warp_row_dots(pr.Q, sh, w.rcr(t, 6), [&](int k, int64_t n) { return H[k * sh + n]; },
                [&](int k, float total) { sc.lam[k] = fmaxf(total + b2 + sc.lam[k], 0.f); });
  __syncthreads();
}

__device__ void mean_of_alignments(const PairRefs& pr, const Scratch& sc) {
  for (int64_t n = threadIdx.x; n < sc.s; n += kThreads) {
    float total = 0.f;
    for (int k = 0; k < pr.Q; ++k) total += sc.V[k * sc.s + n];
    sc.h[n] = total / pr.Q;
  }
  __syncthreads();
}

// RAR step n: w = softmax_k(v_w(tanh(k_w v_k) * tanh(q_w h))), h <- l2norm(sum_k w_k v_k).
__device__ void aggregation(const PairRefs& pr, const Scratch& sc, const Weights& w, int n_step) {
  const int64_t s = sc.s;
  float* qh = sc.qh;
  float* H = sc.H;
  block_gemm<1>(sc.h, s, 1, s, w.rar(n_step, 0), s, w.rar(n_step, 1),
                [&](int, int64_t n, float v) { qh[n] = tanh_accurate(v); });
  block_gemm<kRowBlock>(sc.V, s, pr.Q, s, w.rar(n_step, 2), s, w.rar(n_step, 3),
                        [&](int r, int64_t n, float v) { H[r * s + n] = tanh_accurate(v); });
  __syncthreads();
  const float vb = *w.rar(n_step, 5);
  warp_row_dots(pr.Q, s, w.rar(n_step, 4), [&](int k, int64_t n) { return H[k * s + n] * qh[n]; },
                [&](int k, float total) { sc.logits[k] = total + vb; });
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {  // softmax over the queries
    float mx = -INFINITY;
    for (int k = lane; k < pr.Q; k += 32) mx = fmaxf(mx, sc.logits[k]);
    mx = warp_max(mx);
    float total = 0.f;
    for (int k = lane; k < pr.Q; k += 32) total += expf(sc.logits[k] - mx);
    const float inv = 1.f / warp_sum(total);
    for (int k = lane; k < pr.Q; k += 32) sc.logits[k] = expf(sc.logits[k] - mx) * inv;
  }
  __syncthreads();
  float partial = 0.f;
  for (int64_t n = threadIdx.x; n < s; n += kThreads) {
    float total = 0.f;
    for (int k = 0; k < pr.Q; ++k) total = fmaf(sc.logits[k], sc.V[k * s + n], total);
    sc.h[n] = total;
    partial += total * total;
  }
  const float inv = 1.f / (sqrtf(block_sum(partial, sc.red)) + kEps);
  for (int64_t n = threadIdx.x; n < s; n += kThreads) sc.h[n] *= inv;
  __syncthreads();
}

__device__ float sigmoid_score(const Scratch& sc, const Weights& w) {
  const float* ew = w.eval(0);
  float partial = 0.f;
  for (int64_t n = threadIdx.x; n < sc.s; n += kThreads) partial = fmaf(__ldg(ew + n), sc.h[n], partial);
  const float x = block_sum(partial, sc.red) + *w.eval(1);
  return 1.f / (1.f + expf(-x));
}

// only_rcr's score: mean_k cos(q_k, l2norm(ctx_k)) with the final (m, lambda).
__device__ float mean_cosine(const PairRefs& pr, const Scratch& sc, bool modulated) {
  attend(pr, sc, modulated);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int k = warp; k < pr.Q; k += kWarps) {
    const float* q = pr.query(k);
    float dot = 0.f, qq = 0.f;
    for (int64_t e = lane; e < sc.d; e += 32) {
      dot = fmaf(q[e], sc.X[k * sc.d + e], dot);
      qq = fmaf(q[e], q[e], qq);
    }
    dot = warp_sum(dot);
    qq = warp_sum(qq);
    if (lane == 0) {
      const float inv = sc.ctx_inv[k];
      sc.logits[k] = (dot * inv) / fmaxf(sqrtf(qq) * (sc.ctx_norm[k] * inv), kEps);
    }
  }
  __syncthreads();
  float partial = 0.f;
  for (int k = threadIdx.x; k < pr.Q; k += kThreads) partial += sc.logits[k];
  return block_sum(partial, sc.red) / pr.Q;
}

__device__ float score_pair(const RcarProblem& p, const PairRefs& pr, const Scratch& sc,
                            const Weights& w) {
  for (int k = threadIdx.x; k < pr.Q; k += kThreads) sc.lam[k] = p.smooth;
  __syncthreads();
  bool modulated = false;
  if (p.regulator == kOnlyRar) {
    alignment(pr, sc, false, w.alv(0, 0), w.alv(0, 1));
    mean_of_alignments(pr, sc);
    for (int n = 0; n < p.steps; ++n) aggregation(pr, sc, w, n);
    return sigmoid_score(sc, w);
  }
  if (p.regulator == kOnlyRcr) {
    for (int t = 0; t < p.steps; ++t) {
      alignment(pr, sc, modulated, w.alv(t, 0), w.alv(t, 1));
      correspondence(pr, sc, w, t, modulated);
      modulated = true;
    }
    return mean_cosine(pr, sc, modulated);
  }
  for (int t = 0; t < p.steps; ++t) {
    alignment(pr, sc, modulated, w.alv(t, 0), w.alv(t, 1));
    if (t == 0) mean_of_alignments(pr, sc);
    if (t < p.steps - 1) {
      correspondence(pr, sc, w, t, modulated);
      modulated = true;
    }
    aggregation(pr, sc, w, t);
  }
  return sigmoid_score(sc, w);
}

// Two resident blocks per SM: 128 registers per thread, no spills (ptxas -v, sm_90a).
__global__ void __launch_bounds__(kThreads, 2) rcar_kernel(RcarProblem p, float* sims) {
  extern __shared__ float smem[];
  const int64_t qcap = padded_rows(query_max(p)), cmax = context_max(p);
  float* slot = p.workspace + blockIdx.x * workspace_floats(query_max(p), p.d, p.sim_dim);
  const Scratch sc = make_scratch(smem, slot, qcap, cmax, p.d, p.sim_dim);
  Weights w;
  w.table = p.weights;
  module_counts(p.regulator, p.steps, w.n_alv, w.n_rcr, w.n_rar);
  const int64_t pairs = p.n_img * p.n_cap;
  for (int64_t pair = blockIdx.x; pair < pairs; pair += gridDim.x) {
    const int64_t i = pair % p.n_img, j = pair / p.n_img;  // neighbouring blocks share a caption
    const float score = score_pair(p, pair_refs(p, i, j), sc, w);
    if (threadIdx.x == 0) sims[i * p.n_cap + j] = score;
    __syncthreads();  // the next pair reuses shared memory and the workspace slot
  }
}

}  // namespace

int64_t rcar_workspace_floats(int64_t max_queries, int64_t d, int64_t sim_dim) {
  return workspace_floats(max_queries, d, sim_dim);
}

int rcar_forward(const RcarProblem& p, float* sims, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  const bool valid = p.regulator >= kOnlyRar && p.regulator <= kCoopRcar && p.steps >= 0 &&
                     (p.regulator != kCoopRcar || p.steps >= 1) && p.d >= 1 && p.sim_dim >= 1 &&
                     p.max_len >= 1 && p.R >= 1 && p.n_blocks >= 1 && p.n_blocks <= 0x7fffffff;
  if (!valid) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t qcap = padded_rows(query_max(p));
  const size_t smem = sizeof(float) * shared_floats(qcap, context_max(p), p.sim_dim);
  cudaError_t err = cudaFuncSetAttribute(rcar_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  rcar_kernel<<<static_cast<unsigned>(p.n_blocks), kThreads, smem,
                static_cast<cudaStream_t>(stream)>>>(p, sims);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace rcar_cuda

#ifndef __CUDA_ARCH__  // the Python bindings: host code only (csrc/cuda/bind.h)
#include "cuda/bind.h"

// Launchers (rcar_fast/ops/rcar.py builds the RcarProblemCuda):
//   rcar_workspace_floats: the workspace floats one persistent block needs (its per-pair
//     (Q, d) and (Q, s) scratch).
//   rcar_forward_cuda: sims[i * n_cap + j] float32 (n_img, n_cap).
RCAR_FAST_BINDINGS(cuda_rcar, m) {
  namespace py = pybind11;
  using namespace rcar_cuda::bind;
  using rcar_cuda::RcarProblem;
  ProblemClass<RcarProblem>(m, "RcarProblemCuda", "rcar_cuda::RcarProblem (csrc/cuda/rcar.cu)")
      .fields("img", &RcarProblem::img, "cap", &RcarProblem::cap, "n_img", &RcarProblem::n_img, "R", &RcarProblem::R,
              "d", &RcarProblem::d, "n_cap", &RcarProblem::n_cap, "img_stride_n", &RcarProblem::img_stride_n,
              "img_stride_r", &RcarProblem::img_stride_r, "cap_stride_n", &RcarProblem::cap_stride_n,
              "cap_stride_w", &RcarProblem::cap_stride_w, "lens", &RcarProblem::lens, "max_len", &RcarProblem::max_len)
      .fields("sim_dim", &RcarProblem::sim_dim, "regulator", &RcarProblem::regulator, "steps", &RcarProblem::steps,
              "i2t", &RcarProblem::i2t, "smooth", &RcarProblem::smooth, "weights", &RcarProblem::weights,
              "workspace", &RcarProblem::workspace, "n_blocks", &RcarProblem::n_blocks)
      .finish();
  m.def("rcar_workspace_floats", &rcar_cuda::rcar_workspace_floats, py::arg("max_queries"), py::arg("d"),
        py::arg("sim_dim"), "workspace floats per persistent block of rcar_forward_cuda");
  bind_launcher<&rcar_cuda::rcar_forward>(m, "rcar_forward_cuda", py::arg("problem"), py::arg("sims"),
                                          py::arg("stream"), "RCAR head eval-mode forward; problem: an RcarProblemCuda");
}
#endif
