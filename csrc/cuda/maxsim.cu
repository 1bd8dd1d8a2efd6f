// The S-only heads (HEADS.md) on the GPU: forward and a deterministic backward, as epilogues of
// the shared region-word tile (csrc/cuda/tile.cuh). Torch-free: raw pointers, sizes, a stream.
//
// Forward. One thread block scores one (image block, caption group) tile, stored region-major
// in shared memory; then one warp per (image i, caption j) pair reads its real R_i x L_j block:
//   t2i: m_w = max_{r < R_i} S[r, w] (lanes over words), pooled over the L_j words;
//   i2t: n_r = max_{w < L_j} S[r, w] (lanes over regions), pooled over the R_i regions;
//   both: both_scale * (t2i + i2t). leaky is applied to the maxima (it is increasing, so this is
//   leaky elementwise before the max, with the same first argmax).
// Pools: mean, sum, max, lse(tau) = log sum exp(x / tau), softmax(tau) = sum softmax(x / tau) x.
//
// Backward (flash style: nothing saved from the forward). Kernel 1 recomputes the tile and the
// first argmax of every maximum and writes, per pooled maximum, its coefficient
// G[i, j] * (pool weight) * (leaky slope) (* both_scale) and the argmax index. Kernels 2 and 3
// contract the coefficients with the features: kernel 2 owns image i (a thread per feature
// column, captions and words in order), kernel 3 owns caption j (a thread per feature column,
// images in order). Each output element has one owner thread that adds in a fixed order: no
// atomics, bitwise deterministic. Padding is never read and gets no gradient.
//
// CHAN's VSA coding (p.vsa, direction i2t): region r's code replaces its maximum,
//   x_r = (sum_w a_rw S[r, w]) / (sqrt(a_r^T G a_r) + eps),   a_r = softmax_w(S[r, .] / vsa_tau),
// with G the caption's word Gram (csrc/cuda/gram.cu), i.e. (v_r . c_r) / (|c_r| + eps) for the
// attended word c_r = sum_w a_rw e_w; the codes are pooled over the regions. Its backward
// (maxsim_vsa_backward) recomputes the tile and writes per pair, like SCAN's i2t backward,
// dL/dS, a and 2 dL/d|c_r|^2 a into (image rows x packed words) buffers; the caller contracts
// them with the features (dense GEMMs) and the caption Grams' gradient.
#include "contract.h"
#include "cuda/tile.cuh"

namespace rcar_cuda {

// An S-only heads all-pairs problem (HEADS.md, MAXSIM_API.md). The same tile as
// SCAN (csrc/cuda/tile.cuh): captions packed and cut into groups (group_first) for a col_frags
// tile shape (scan_tile_rows / scan_tile_cols give its capacity), images imgs_per_block at a
// time. Regions r >= img_lens[i] and words w >= lens[j] are never read. Inputs fp32 / fp16 /
// bf16 (dtype), fp32 accumulation; every output float32.
struct MaxSimProblem {
  const void* img;               // (n_img, R, d)
  const void* cap;               // (n_cap, Lmax, d)
  int dtype;                     // DType of img and cap
  int64_t n_img, R, d, n_cap;
  int64_t img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
  const int64_t* img_lens;       // (n_img,) real regions, 1 <= img_lens[i] <= R
  const int64_t* lens;           // (n_cap,) real words, 1 <= lens[j]
  const int64_t* word_off;       // (n_cap + 1,) exclusive prefix sum of lens
  int64_t total_words;           // word_off[n_cap]
  int64_t max_len;               // max(lens)
  const int32_t* group_first;    // (n_groups + 1,) first caption of each group, then n_cap
  int64_t n_groups;
  int col_frags;                 // 8, 4 or 2
  int direction;                 // HeadDirection
  int pool;                      // Pool
  int leaky;                     // 1: leaky(x) = x > 0 ? x : kLeakySlope x on the maxima
  float tau;                     // lse / softmax temperature, > 0
  float both_scale;              // direction both: both_scale * (t2i + i2t)
  int vsa;                       // 1: CHAN's VSA coding (direction i2t, leaky 0) replaces the maxima
  float vsa_tau;                 // its softmax temperature over the words, > 0
  const float* gram;             // vsa: packed caption Grams, caption j's lens[j]^2 at gram_off[j]
  const int64_t* gram_off;       // vsa: (n_cap,) offsets into gram
};

}  // namespace rcar_cuda

namespace rcar_cuda {
namespace {

constexpr int kGradThreads = 128;  // feature columns per block of the contraction kernels

// ----------------------------------------------------------------------------------------------
// Shared memory: the tile (region-major), then per warp the maxima x and their argmax.
// ----------------------------------------------------------------------------------------------

struct Layout : tile::Layout {
  int pooled_max;  // the most values one direction pools: max(R, max_len)
};

__host__ __device__ inline Layout make_layout(const MaxSimProblem& p, const Tile& t,
                                              bool inputs16) {
  Layout l;
  l.pooled_max = static_cast<int>(p.R > p.max_len ? p.R : p.max_len);
  static_cast<tile::Layout&>(l) = tile::make_layout(
      t, inputs16, true, (sizeof(float) + sizeof(int)) * kWarps * size_t(l.pooled_max));
  return l;
}

__device__ inline bool has_t2i(int direction) { return direction != kHeadI2T; }
__device__ inline bool has_i2t(int direction) { return direction != kHeadT2I; }

__device__ inline float leaky(float x) { return x > 0.f ? x : kLeakySlopeF * x; }
// d leaky / dx at the selected score; leaky(x) > 0 exactly when x > 0, so the slope can be
// read from either value (0.1 at 0, as torch's LeakyReLU backward).
__device__ inline float leaky_slope(float x) { return x > 0.f ? 1.f : kLeakySlopeF; }

// One direction of one pair: K pooled maxima, each over M scores; score (k, m) at
// S[k * k_stride + m * m_stride] (t2i: k = word, m = region; i2t: k = region, m = word).
struct Direction {
  const float* S;
  int k_stride, m_stride, K, M;
};

// x[k] = (leaky of) max_m S(k, m) and arg[k] its first argmax, for k < K, in the warp's scratch.
__device__ void maxima(const Direction& dir, bool use_leaky, float* x, int* arg, int lane) {
  for (int k = lane; k < dir.K; k += 32) {
    const float* row = dir.S + k * dir.k_stride;
    float best = row[0];
    int best_m = 0;
    for (int m = 1; m < dir.M; ++m) {
      const float v = row[m * dir.m_stride];
      if (v > best) {  // strict: the first maximum keeps the argmax
        best = v;
        best_m = m;
      }
    }
    x[k] = use_leaky ? leaky(best) : best;
    arg[k] = best_m;
  }
  __syncwarp();
}

// The pooled value of x[0..K) and what its gradient needs (every lane gets them).
struct Pooled {
  float value;
  float mx;     // max_k x_k (max, lse, softmax)
  float z;      // sum_k exp((x_k - mx) / tau) (lse, softmax)
  int first;    // first k with x_k == mx (max)
};

__device__ Pooled pool_values(const float* x, int K, int pool, float tau, int lane) {
  Pooled out{0.f, 0.f, 1.f, 0};
  if (pool == kPoolMean || pool == kPoolSum) {
    float total = 0.f;
    for (int k = lane; k < K; k += 32) total += x[k];
    total = warp_sum(total);
    out.value = pool == kPoolMean ? total / K : total;
    return out;
  }
  float mx = -INFINITY;
  for (int k = lane; k < K; k += 32) mx = fmaxf(mx, x[k]);
  mx = warp_max(mx);
  out.mx = mx;
  if (pool == kPoolMax) {
    unsigned first = 0xffffffffu;
    for (int k = lane; k < K; k += 32) {
      if (x[k] == mx) {
        first = static_cast<unsigned>(k);
        break;
      }
    }
    out.first = static_cast<int>(__reduce_min_sync(kFullMask, first));
    out.value = mx;
    return out;
  }
  const float inv_tau = 1.f / tau;
  float z = 0.f, weighted = 0.f;
  for (int k = lane; k < K; k += 32) {
    const float e = expf((x[k] - mx) * inv_tau);
    z += e;
    weighted = fmaf(e, x[k] - mx, weighted);
  }
  z = warp_sum(z);
  out.z = z;
  if (pool == kPoolLse) {
    out.value = mx * inv_tau + logf(z);
  } else {  // softmax: sum_k p_k x_k = mx + sum_k p_k (x_k - mx)
    out.value = mx + warp_sum(weighted) / z;
  }
  return out;
}

// dP/dx_k of the pooling (HEADS.md's table).
__device__ inline float pool_weight(const Pooled& s, float xk, int k, int K, int pool, float tau) {
  switch (pool) {
    case kPoolMean: return 1.f / K;
    case kPoolSum: return 1.f;
    case kPoolMax: return k == s.first ? 1.f : 0.f;
    case kPoolLse: return expf((xk - s.mx) / tau) / (s.z * tau);
    default: {
      const float prob = expf((xk - s.mx) / tau) / s.z;
      return prob * (1.f + (xk - s.value) / tau);
    }
  }
}

// The pair (li, jj) of the block: its image and caption, and its block of the score tile.
struct PairRef {
  int64_t i, j, word;  // image, caption, packed index of the caption's first word
  int R_i, L;
  float* S;            // S[r * ld + w]; the pair's own block (the VSA forward reuses it)
};

__device__ PairRef pair_ref(const MaxSimProblem& p, const BlockWork& w, float* scores,
                            int ld, int li, int jj) {
  PairRef q;
  q.i = w.img0 + li;
  q.j = w.cap0 + jj;
  q.word = p.word_off[q.j];
  q.R_i = static_cast<int>(p.img_lens[q.i]);
  q.L = static_cast<int>(p.lens[q.j]);
  q.S = scores + li * static_cast<int>(p.R) * ld + static_cast<int>(q.word - w.word0);
  return q;
}

__device__ inline Direction t2i_of(const PairRef& q, int ld) { return {q.S, 1, ld, q.L, q.R_i}; }
__device__ inline Direction i2t_of(const PairRef& q, int ld) { return {q.S, ld, 1, q.R_i, q.L}; }

// Forward of one direction: maxima, then the pool.
__device__ float direction_forward(const MaxSimProblem& p, const Direction& dir, float* x,
                                   int* arg, int lane) {
  maxima(dir, p.leaky != 0, x, arg, lane);
  const float value = pool_values(x, dir.K, p.pool, p.tau, lane).value;
  __syncwarp();  // x is reused by the next direction / pair
  return value;
}

// Backward of one direction: coef[k * coef_stride], index[k * coef_stride] for k < K.
__device__ void direction_coefficients(const MaxSimProblem& p, const Direction& dir, float up,
                                       float* x, int* arg, float* coef, int32_t* index,
                                       int64_t coef_stride, int lane) {
  maxima(dir, p.leaky != 0, x, arg, lane);
  const Pooled s = pool_values(x, dir.K, p.pool, p.tau, lane);
  for (int k = lane; k < dir.K; k += 32) {
    const float slope = p.leaky ? leaky_slope(x[k]) : 1.f;
    coef[k * coef_stride] = up * pool_weight(s, x[k], k, dir.K, p.pool, p.tau) * slope;
    index[k * coef_stride] = arg[k];
  }
  __syncwarp();
}


// ----------------------------------------------------------------------------------------------
// CHAN's VSA coding
// ----------------------------------------------------------------------------------------------

struct VsaCode {
  float x;     // the region's code
  float mean;  // sum_w a_w S[w] (= v_r . c_r)
  float norm;  // |c_r| = sqrt(a^T G a)
  float z;     // sum_w exp((S[w] - max S) / vsa_tau), so that a_w = e[w] / z
};

// The code of one region from its L scores S[w] against caption words with Gram G (L x L,
// row-major). e[w] receives exp((S[w] - max S) / vsa_tau) and may alias S (each S[w] is read
// before e[w] is written); ge[w], when not null, receives (G e)[w].
__device__ VsaCode vsa_code(const float* S, int L, const float* G, float inv_tau, float* e,
                            float* ge) {
  float mx = S[0];
  for (int w = 1; w < L; ++w) mx = fmaxf(mx, S[w]);
  float z = 0.f, weighted = 0.f;
  for (int w = 0; w < L; ++w) {
    const float s = S[w];
    const float ew = expf((s - mx) * inv_tau);
    z += ew;
    weighted = fmaf(ew, s, weighted);
    e[w] = ew;
  }
  float quad = 0.f;  // e^T G e = z^2 |c_r|^2
  for (int w = 0; w < L; ++w) {
    float row = 0.f;
    for (int v = 0; v < L; ++v) row = fmaf(__ldg(G + w * L + v), e[v], row);
    if (ge != nullptr) ge[w] = row;
    quad = fmaf(e[w], row, quad);
  }
  VsaCode c;
  c.z = z;
  c.mean = weighted / z;
  c.norm = sqrtf(fmaxf(quad, 0.f)) / z;  // rounding may take e^T G e just below 0
  c.x = c.mean / (c.norm + kEpsF);
  return c;
}

__device__ inline const float* caption_gram(const MaxSimProblem& p, const PairRef& q) {
  return p.gram + p.gram_off[q.j];
}

// Forward of one pair: lanes over regions; each score row is overwritten by its exponentials.
__device__ float vsa_forward(const MaxSimProblem& p, const PairRef& q, int ld, float* x,
                             int lane) {
  const float* G = caption_gram(p, q);
  const float inv_tau = 1.f / p.vsa_tau;
  for (int r = lane; r < q.R_i; r += 32) {
    float* row = q.S + r * ld;
    x[r] = vsa_code(row, q.L, G, inv_tau, row, nullptr).x;
  }
  __syncwarp();
  const float value = pool_values(x, q.R_i, p.pool, p.tau, lane).value;
  __syncwarp();  // x is reused by the next pair
  return value;
}

// The per-pair outputs of the VSA backward, each (n_img * R, total_words) [i * R + r, packed
// word]: every entry of a pair's block is written, 0 at padded regions.
struct VsaGrads {
  float* d_scores;     // dL/dS[r, w]
  float* attn;         // a_rw
  float* attn_scaled;  // 2 dL/d|c_r|^2 a_rw: 2 dL/dG = attn_scaled^T attn on the caption's words
};

// dx_r/dS[r, w] = a_w / (n + eps) + a_w ((S[w] - m) / (n + eps) - k ((G a)_w - n^2)) / vsa_tau
// with m = sum_w a_w S[w], n = |c_r|, k = m / (n (n + eps)^2) (0 where n = 0, as torch's norm
// backward), and dx_r/d|c_r|^2 = -k / 2.
__device__ void vsa_region_grads(const float* S, int L, const VsaCode& c, float h, float inv_tau,
                                 float* a, float* ds, float* scaled) {
  const float inv_z = 1.f / c.z, inv_ne = 1.f / (c.norm + kEpsF);
  const float k = c.norm > 0.f ? c.mean / c.norm * inv_ne * inv_ne : 0.f;
  const float n2 = c.norm * c.norm;
  for (int w = 0; w < L; ++w) {
    const float aw = a[w] * inv_z, gaw = ds[w] * inv_z;  // a_w and (G a)_w
    const float slope = inv_ne + ((S[w] - c.mean) * inv_ne - k * (gaw - n2)) * inv_tau;
    ds[w] = h * aw * slope;
    a[w] = aw;
    scaled[w] = -h * k * aw;
  }
}

// Backward of one pair for upstream `up`: the codes (lanes over regions, exponentials parked in
// attn), their pool weights, then each region recomputed with (G e) parked in d_scores.
__device__ void vsa_backward(const MaxSimProblem& p, const PairRef& q, int ld, float up,
                             float* x, const VsaGrads& g, int lane) {
  const float* G = caption_gram(p, q);
  const float inv_tau = 1.f / p.vsa_tau;
  const int64_t block = q.i * p.R * p.total_words + q.word;  // (r, w) at block + r * W + w
  for (int r = lane; r < q.R_i; r += 32) {
    x[r] = vsa_code(q.S + r * ld, q.L, G, inv_tau, g.attn + block + r * p.total_words, nullptr).x;
  }
  __syncwarp();
  const Pooled pooled = pool_values(x, q.R_i, p.pool, p.tau, lane);
  for (int r = lane; r < q.R_i; r += 32) {
    const int64_t at = block + r * p.total_words;
    const float* S = q.S + r * ld;
    const VsaCode c = vsa_code(S, q.L, G, inv_tau, g.attn + at, g.d_scores + at);
    const float h = up * pool_weight(pooled, x[r], r, q.R_i, p.pool, p.tau);
    vsa_region_grads(S, q.L, c, h, inv_tau, g.attn + at, g.d_scores + at, g.attn_scaled + at);
  }
  for (int r = q.R_i + lane; r < p.R; r += 32) {  // padded regions: no gradient
    const int64_t at = block + r * p.total_words;
    for (int w = 0; w < q.L; ++w) g.d_scores[at + w] = g.attn[at + w] = g.attn_scaled[at + w] = 0.f;
  }
  __syncwarp();  // x is reused by the next pair
}

// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

struct Coefficients {
  float* t2i_coef;
  int32_t* t2i_arg;
  float* i2t_coef;
  int32_t* i2t_arg;
};

// kBackward false: sims; true: the coefficients (or, for the VSA coding, the VsaGrads) for
// grad_sims. One resident block per SM: with two (at most 128 registers a thread) the WMMA
// tile's ten accumulator fragments spill (about 150 bytes a thread on sm_80 / sm_90a); with one
// it uses 139-229 and spills nothing.
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads, 1) maxsim_tile_kernel(MaxSimProblem p, float* sims,
                                                                const float* grad_sims,
                                                                Coefficients c, VsaGrads v,
                                                                bool vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Tile t = tile::make_tile(p.col_frags);
  const Layout l = make_layout(p, t, sizeof(T) == 2);
  const BlockWork w = tile::block_work(p, t);
  int64_t* row_off = reinterpret_cast<int64_t*>(smem + l.row_off);
  int64_t* col_off = reinterpret_cast<int64_t*>(smem + l.col_off);
  unsigned char* main = smem + l.main;
  tile::fill_offset_tables(p, t, w, p.img_lens, row_off, col_off);
  tile::score_tile<T>(p, t, l.score_ld, true, w, row_off, col_off, main, vec);

  float* scores = reinterpret_cast<float*>(main);
  const int warp = threadIdx.x / 32;
  float* x = reinterpret_cast<float*>(smem + l.scratch) + warp * l.pooled_max;
  int* arg = reinterpret_cast<int*>(smem + l.scratch) + (kWarps + warp) * l.pooled_max;
  tile::for_each_pair(w, [&](int li, int jj, int lane) {
    const PairRef q = pair_ref(p, w, scores, l.score_ld, li, jj);
    const float scale = p.direction == kHeadBoth ? p.both_scale : 1.f;
    if constexpr (!kBackward) {
      float total = 0.f;
      if (p.vsa) {
        total = vsa_forward(p, q, l.score_ld, x, lane);
      } else {
        if (has_t2i(p.direction)) total += direction_forward(p, t2i_of(q, l.score_ld), x, arg, lane);
        if (has_i2t(p.direction)) total += direction_forward(p, i2t_of(q, l.score_ld), x, arg, lane);
      }
      if (lane == 0) sims[q.i * p.n_cap + q.j] = scale * total;
    } else {
      const float up = scale * grad_sims[q.i * p.n_cap + q.j];
      if (p.vsa) {
        vsa_backward(p, q, l.score_ld, up, x, v, lane);
        return;
      }
      if (has_t2i(p.direction)) {
        const int64_t at = q.i * p.total_words + q.word;
        direction_coefficients(p, t2i_of(q, l.score_ld), up, x, arg, c.t2i_coef + at,
                               c.t2i_arg + at, 1, lane);
      }
      if (has_i2t(p.direction)) {
        const int64_t at = q.i * p.R * p.n_cap + q.j;
        direction_coefficients(p, i2t_of(q, l.score_ld), up, x, arg, c.i2t_coef + at,
                               c.i2t_arg + at, p.n_cap, lane);
        for (int r = q.R_i + lane; r < p.R; r += 32) {  // padded regions: no gradient
          c.i2t_coef[at + r * p.n_cap] = 0.f;
          c.i2t_arg[at + r * p.n_cap] = 0;
        }
      }
    }
  });
}

// d_img[i, r, k] of image i for feature column k.
template <typename T>
__device__ void image_grad(const MaxSimProblem& p, const Coefficients& c, int64_t i, int64_t k,
                           float* d_img) {
  const T* cap = static_cast<const T*>(p.cap);
  float* out = d_img + i * p.R * p.d + k;
  for (int64_t r = 0; r < p.R; ++r) out[r * p.d] = 0.f;
  const int64_t R_i = p.img_lens[i];
  if (has_t2i(p.direction)) {
    // Every word's maximum sends its coefficient to the region that won it.
    const float* coef = c.t2i_coef + i * p.total_words;
    const int32_t* arg = c.t2i_arg + i * p.total_words;
    for (int64_t j = 0; j < p.n_cap; ++j) {
      const int64_t w0 = p.word_off[j], L = p.lens[j];
      for (int64_t w = 0; w < L; ++w) {
        const float a = coef[w0 + w];
        if (a != 0.f) {
          float* dst = out + int64_t(arg[w0 + w]) * p.d;
          *dst = fmaf(a, to_float(cap[j * p.cap_stride_n + w * p.cap_stride_w + k]), *dst);
        }
      }
    }
  }
  if (has_i2t(p.direction)) {
    // Every region's maximum over each caption: the winning word's features.
    for (int64_t r = 0; r < R_i; ++r) {
      const float* coef = c.i2t_coef + (i * p.R + r) * p.n_cap;
      const int32_t* arg = c.i2t_arg + (i * p.R + r) * p.n_cap;
      float acc = 0.f;
      for (int64_t j = 0; j < p.n_cap; ++j) {
        const float a = coef[j];
        if (a != 0.f) {
          acc = fmaf(a, to_float(cap[j * p.cap_stride_n + arg[j] * p.cap_stride_w + k]), acc);
        }
      }
      out[r * p.d] += acc;
    }
  }
}

// d_cap_packed[word_off[j] + w, k] += ... of caption j for feature column k.
template <typename T>
__device__ void caption_grad(const MaxSimProblem& p, const Coefficients& c, int64_t j, int64_t k,
                             float* d_cap_packed) {
  const T* img = static_cast<const T*>(p.img);
  const int64_t w0 = p.word_off[j], L = p.lens[j];
  float* out = d_cap_packed + w0 * p.d + k;
  if (has_t2i(p.direction)) {
    // Word w's maximum over each image: the winning region's features.
    for (int64_t w = 0; w < L; ++w) {
      float acc = out[w * p.d];
      for (int64_t i = 0; i < p.n_img; ++i) {
        const float a = c.t2i_coef[i * p.total_words + w0 + w];
        if (a != 0.f) {
          const int64_t r = c.t2i_arg[i * p.total_words + w0 + w];
          acc = fmaf(a, to_float(img[i * p.img_stride_n + r * p.img_stride_r + k]), acc);
        }
      }
      out[w * p.d] = acc;
    }
  }
  if (has_i2t(p.direction)) {
    // Every region's maximum over this caption sends its coefficient to the winning word.
    for (int64_t i = 0; i < p.n_img; ++i) {
      const int64_t R_i = p.img_lens[i];
      for (int64_t r = 0; r < R_i; ++r) {
        const float a = c.i2t_coef[(i * p.R + r) * p.n_cap + j];
        if (a != 0.f) {
          float* dst = out + int64_t(c.i2t_arg[(i * p.R + r) * p.n_cap + j]) * p.d;
          *dst = fmaf(a, to_float(img[i * p.img_stride_n + r * p.img_stride_r + k]), *dst);
        }
      }
    }
  }
}

// The contraction kernels (kernels 2 and 3): one block per image (kImages) or caption,
// blockIdx.x, and a thread per feature column.
template <typename T, bool kImages>
__global__ void __launch_bounds__(kGradThreads) maxsim_grad_kernel(MaxSimProblem p,
                                                                   Coefficients c, float* out) {
  const int64_t item = blockIdx.x;
  const int64_t k = int64_t(blockIdx.y) * kGradThreads + threadIdx.x;
  if (k >= p.d) return;
  if constexpr (kImages) {
    image_grad<T>(p, c, item, k, out);
  } else {
    caption_grad<T>(p, c, item, k, out);
  }
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

template <typename T>
int launch_tile(const MaxSimProblem& p, bool backward, float* sims, const float* grad_sims,
                const Coefficients& c, const VsaGrads& v, cudaStream_t stream) {
  const Tile t = tile::make_tile(p.col_frags);
  const Layout l = make_layout(p, t, sizeof(T) == 2);
  const int64_t blocks = tile::block_count(p, t, p.n_groups);
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto kernel = backward ? maxsim_tile_kernel<T, true> : maxsim_tile_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(l.total));
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<static_cast<unsigned>(blocks), kThreads, l.total, stream>>>(p, sims, grad_sims, c, v,
                                                                       tile::vector_loads_ok(p));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const MaxSimProblem& p, const float* grad_sims, const Coefficients& c,
                    float* d_img, float* d_cap_packed, cudaStream_t stream) {
  int err = launch_tile<T>(p, true, nullptr, grad_sims, c, VsaGrads{}, stream);
  if (err != 0) return err;
  const unsigned col_blocks = static_cast<unsigned>((p.d + kGradThreads - 1) / kGradThreads);
  maxsim_grad_kernel<T, true><<<dim3(static_cast<unsigned>(p.n_img), col_blocks), kGradThreads,
                                 0, stream>>>(p, c, d_img);
  err = static_cast<int>(cudaGetLastError());
  if (err != 0) return err;
  maxsim_grad_kernel<T, false><<<dim3(static_cast<unsigned>(p.n_cap), col_blocks), kGradThreads,
                                  0, stream>>>(p, c, d_cap_packed);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

const char* maxsim_problem_error(const MaxSimProblem& p) {
  if (p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16) {
    return "dtype must be float32, float16 or bfloat16";
  }
  if (!tile::valid_col_frags(p.col_frags)) return "col_frags must be 8, 4 or 2";
  const Tile t = tile::make_tile(p.col_frags);
  if (p.R < 1 || p.R > t.rows_cap) return "R (regions) is beyond the tile's rows for col_frags";
  if (p.max_len < 1 || p.max_len > t.cols_cap) {
    return "the longest caption is beyond the tile's columns for col_frags";
  }
  if (p.d < 1) return "d must be >= 1";
  if ((p.d + kGradThreads - 1) / kGradThreads > 65535) {
    return "d is beyond the backward kernels' grid (65535 x 128 columns)";
  }
  if (p.n_groups < 1) return "there must be at least one caption group";
  if (p.direction < kHeadT2I || p.direction > kHeadBoth) return "unknown direction code";
  if (p.pool < kPoolMean || p.pool > kPoolSoftmax) return "unknown pool code";
  if (!(p.tau > 0.f)) return "tau must be > 0";
  if (p.vsa) {
    if (p.direction != kHeadI2T) return "the VSA coding (vsa) runs direction i2t only";
    if (p.leaky) return "the VSA coding (vsa) takes leaky 0";
    if (!(p.vsa_tau > 0.f)) return "vsa_tau must be > 0";
  }
  if (p.n_img < 0 || p.n_cap < 0) return "negative image or caption count";
  if (p.n_img > 0x7fffffff || p.n_cap > 0x7fffffff) return "too many images or captions";
  if (p.n_img > 0 && tile::block_count(p, t, p.n_groups) > 0x7fffffff) {
    return "too many tiles for one launch";
  }
  return nullptr;
}

// The VSA coding reads the caption Grams.
static bool has_grams(const MaxSimProblem& p) {
  return !p.vsa || (p.gram != nullptr && p.gram_off != nullptr);
}

int maxsim_forward(const MaxSimProblem& p, float* sims, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  if (maxsim_problem_error(p) != nullptr || !has_grams(p)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const Coefficients none{};
  switch (p.dtype) {
    case kFloat32: return launch_tile<float>(p, false, sims, nullptr, none, VsaGrads{}, s);
    case kFloat16: return launch_tile<__half>(p, false, sims, nullptr, none, VsaGrads{}, s);
    default: return launch_tile<__nv_bfloat16>(p, false, sims, nullptr, none, VsaGrads{}, s);
  }
}

int maxsim_backward(const MaxSimProblem& p, const float* grad_sims, float* t2i_coef,
                    int32_t* t2i_arg, float* i2t_coef, int32_t* i2t_arg, float* d_img,
                    float* d_cap_packed, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  // The VSA coding has its own backward (maxsim_vsa_backward).
  if (maxsim_problem_error(p) != nullptr || p.vsa) return static_cast<int>(cudaErrorInvalidValue);
  const bool t2i = p.direction != kHeadI2T, i2t = p.direction != kHeadT2I;
  if ((t2i && (t2i_coef == nullptr || t2i_arg == nullptr)) ||
      (i2t && (i2t_coef == nullptr || i2t_arg == nullptr))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const Coefficients c{t2i_coef, t2i_arg, i2t_coef, i2t_arg};
  switch (p.dtype) {
    case kFloat32: return launch_backward<float>(p, grad_sims, c, d_img, d_cap_packed, s);
    case kFloat16: return launch_backward<__half>(p, grad_sims, c, d_img, d_cap_packed, s);
    default: return launch_backward<__nv_bfloat16>(p, grad_sims, c, d_img, d_cap_packed, s);
  }
}

int maxsim_vsa_backward(const MaxSimProblem& p, const float* grad_sims, float* d_scores,
                        float* attn, float* attn_scaled, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  if (maxsim_problem_error(p) != nullptr || !p.vsa || !has_grams(p) || d_scores == nullptr ||
      attn == nullptr || attn_scaled == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const Coefficients none{};
  const VsaGrads v{d_scores, attn, attn_scaled};
  switch (p.dtype) {
    case kFloat32: return launch_tile<float>(p, true, nullptr, grad_sims, none, v, s);
    case kFloat16: return launch_tile<__half>(p, true, nullptr, grad_sims, none, v, s);
    default: return launch_tile<__nv_bfloat16>(p, true, nullptr, grad_sims, none, v, s);
  }
}

}  // namespace rcar_cuda

#ifndef __CUDA_ARCH__  // the Python bindings: host code only (csrc/cuda/bind.h)
#include "cuda/bind.h"

// Launchers (rcar_fast/ops/maxsim.py builds the MaxSimProblemCuda; pointers and the
// stream are integers, every output float32):
//   maxsim_problem_error: None if the launchers take the problem, else why not (shapes beyond
//     the tile, bad codes); the launchers raise that reason before anything runs.
//   maxsim_forward_cuda: sims[i * n_cap + j], every pair written.
//   maxsim_backward_cuda: for grad_sims (n_img, n_cap), deterministic (no atomics; every sum
//     in a fixed order), in three kernels on `stream`:
//     1. the tile recomputed: per pair the first argmax and the pooling weight of every pooled
//        maximum, times grad_sims[i, j] (and both_scale, and the leaky slope), into
//        t2i_coef / t2i_arg (n_img, total_words) [i, packed word] = (coefficient, region r*)
//        and i2t_coef / i2t_arg (n_img * R, n_cap) [i * R + r, j] = (coefficient, word w*)
//        (each pair only needs its direction's buffers; the others may be 0);
//     2. per image (a thread per feature column, captions in order): d_img (n_img, R, d),
//        every entry written, 0 at padded regions;
//     3. per caption (a thread per feature column, images in order): d_cap_packed
//        (total_words, d) [packed word] += the caption's gradient (accumulates, so that a
//        caller may run image chunks one after another into the same buffer).
//   maxsim_vsa_backward_cuda: the VSA coding's backward (p.vsa) for grad_sims: the tile
//     recomputed, and per pair, each (n_img * R, total_words) [i * R + r, packed word] float32,
//     every entry written (0 at padded regions), as scan_backward's i2t outputs: d_scores dL/dS,
//     attn a_rw, attn_scaled 2 dL/d|c_r|^2 a_rw (2 dL/dG_j = attn_scaled^T attn over caption
//     j's words); the caller contracts them with the features.
namespace rcar_cuda::bind {
namespace {

// One clear error for a problem the maxsim kernels do not take, before anything is launched.
void require_maxsim_problem(const MaxSimProblem& p, const char* what) {
  const char* why = maxsim_problem_error(p);
  if (why == nullptr) return;
  const tile::Tile t = tile::make_tile(p.col_frags);
  fail(what, ": ", why, " (R=", p.R, ", longest caption ", p.max_len, ", d=", p.d, ", col_frags=", p.col_frags,
       ", tile rows ", t.rows_cap, ", tile columns ", t.cols_cap, ")");
}

}  // namespace
}  // namespace rcar_cuda::bind

RCAR_FAST_BINDINGS(cuda_maxsim, m) {
  namespace py = pybind11;
  using namespace rcar_cuda::bind;
  using rcar_cuda::MaxSimProblem;
  ProblemClass<MaxSimProblem> problem(m, "MaxSimProblemCuda", "rcar_cuda::MaxSimProblem (csrc/cuda/maxsim.cu)");
  tile_fields(problem)
      .fields("img_lens", &MaxSimProblem::img_lens, "direction", &MaxSimProblem::direction,
              "pool", &MaxSimProblem::pool, "leaky", &MaxSimProblem::leaky, "tau", &MaxSimProblem::tau,
              "both_scale", &MaxSimProblem::both_scale)
      .fields("vsa", &MaxSimProblem::vsa, "vsa_tau", &MaxSimProblem::vsa_tau, "gram", &MaxSimProblem::gram,
              "gram_off", &MaxSimProblem::gram_off)
      .finish();
  m.def(
      "maxsim_problem_error",
      [](const MaxSimProblem& p) -> py::object {
        const char* why = rcar_cuda::maxsim_problem_error(p);
        return why == nullptr ? py::object(py::none()) : py::object(py::str(why));
      },
      py::arg("problem"), "None if the maxsim kernels take this MaxSimProblemCuda, else why not");
  bind_launcher<&rcar_cuda::maxsim_forward, &require_maxsim_problem>(
      m, "maxsim_forward_cuda", py::arg("problem"), py::arg("sims"), py::arg("stream"),
      "S-only heads, all pairs, forward; problem: a MaxSimProblemCuda");
  bind_launcher<&rcar_cuda::maxsim_backward, &require_maxsim_problem>(
      m, "maxsim_backward_cuda", py::arg("problem"), py::arg("grad_sims"), py::arg("t2i_coef"), py::arg("t2i_arg"),
      py::arg("i2t_coef"), py::arg("i2t_arg"), py::arg("d_img"), py::arg("d_cap_packed"), py::arg("stream"),
      "S-only heads backward: d img (written) and d cap packed (accumulated), see maxsim.cu");
  bind_launcher<&rcar_cuda::maxsim_vsa_backward, &require_maxsim_problem>(
      m, "maxsim_vsa_backward_cuda", py::arg("problem"), py::arg("grad_sims"), py::arg("d_scores"),
      py::arg("attn"), py::arg("attn_scaled"), py::arg("stream"),
      "the VSA coding's backward: per-pair dL/dS, a and 2 dL/d|c|^2 a (see maxsim.cu)");
}
#endif
