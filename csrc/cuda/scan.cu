// SCAN all-pairs similarity on the GPU: forward and backward, through the Gram identity.
//
// Work split. Captions are packed (word w of caption j has packed index word_off[j] + w) and cut
// into groups of consecutive captions whose words fit one tile's columns; images are taken
// imgs_per_block at a time so that their regions fill the tile's rows. One thread block scores
// one (image block, caption group) tile:
//   1. the raw scores S = regions . words of the whole tile, one GEMM over d (tensor cores via
//      WMMA for fp16/bf16 with fp32 accumulation, fp32 FMA for fp32 inputs), kept in shared
//      memory; padding words are never loaded;
//   2. one warp per (image, caption) pair reduces its sub-block of S: the raw-score norm over
//      the query axis, the context softmax, q.ctx = sum_c alpha S and |ctx|^2 = alpha^T G alpha
//      (G: the context's Gram matrix from gram.cu), the cosine and the aggregation.
// The backward recomputes the same tile and writes, per pair, dL/dS and the attention weights
// (see kernels.h); the contractions with the features are dense GEMMs done by the caller.
//
// Indexing convention inside a pair: "context" c and "query" k as in SIMILARITY.md (t2i:
// c = region, k = word; i2t: c = word, k = region). The score tile is laid out so that c is the
// fast axis for both directions (t2i: word-major, i2t: region-major), so lanes walking c read
// consecutive shared-memory words.
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernels.h"
#include "cuda/warp.cuh"
#include "cuda/load.cuh"

namespace rcar_cuda {
namespace {

using namespace nvcuda;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kFrag = 16;                                // WMMA tile edge
constexpr int kRowFragsPerWarp = 10;                     // each warp holds 10 accumulator tiles
constexpr int kGroupRows = kRowFragsPerWarp * kFrag;     // 160 rows per warp group
constexpr int kTileK16 = 32;                             // K slice per step, 16-bit inputs
constexpr int kLd16 = kTileK16 + 8;                      // staged row length: 80 bytes keeps
                                                         // every fragment pointer 32B-aligned
constexpr int kTileK32 = 16;                             // K slice per step, fp32 inputs
constexpr int kStripes = kGroupRows / 8;                 // fp32: 20 stripes of 8 rows per lane
constexpr float kEps = kEpsF;  // rcar_contract

// ----------------------------------------------------------------------------------------------
// Tile geometry and shared-memory layout (computed identically on host and device)
// ----------------------------------------------------------------------------------------------

// The 8 warps cover col_frags column tiles (16 words each) times row_groups groups of 160
// region rows: warp w owns column tile w % col_frags and row group w / col_frags.
struct Tile {
  int col_frags, row_groups, rows_cap, cols_cap;
};

__host__ __device__ inline Tile make_tile(int col_frags) {
  Tile t;
  t.col_frags = col_frags;
  t.row_groups = kWarps / col_frags;
  t.rows_cap = t.row_groups * kGroupRows;
  t.cols_cap = col_frags * kFrag;
  return t;
}

__host__ __device__ inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

struct Layout {
  size_t row_off, col_off, main, scratch, total;
  int score_ld;       // leading dimension of the score tile (floats)
  int scratch_warp;   // floats of scratch per warp
};

// Shared memory: the row/column source-offset tables, then the "main" area that first stages
// the GEMM operands and then (aliased) holds the fp32 score tile, then per-warp scratch.
__host__ __device__ inline Layout make_layout(const Tile& t, bool inputs16, bool i2t, int cmax,
                                              int qmax, bool backward) {
  Layout l;
  l.row_off = 0;
  l.col_off = align_up(l.row_off + sizeof(int64_t) * t.rows_cap, 16);
  l.main = align_up(l.col_off + sizeof(int64_t) * t.cols_cap, 128);
  const size_t staging = inputs16
      ? size_t(t.rows_cap + t.cols_cap) * kLd16 * 2
      : sizeof(float) * kTileK32 * (size_t(t.rows_cap + 1) + size_t(t.cols_cap + 4));
  l.score_ld = i2t ? t.cols_cap + 4 : t.rows_cap + 4;
  const size_t scores = sizeof(float) * size_t(i2t ? t.rows_cap : t.cols_cap) * l.score_ld;
  l.scratch = align_up(l.main + (staging > scores ? staging : scores), 16);
  l.scratch_warp = 3 * cmax + (backward ? 3 * qmax : 0);
  l.total = l.scratch + sizeof(float) * kWarps * size_t(l.scratch_warp);
  return l;
}

__host__ __device__ inline int imgs_per_block(const ScanProblem& p, const Tile& t) {
  const int64_t fit = t.rows_cap / p.R;
  return static_cast<int>(fit < p.n_img ? fit : p.n_img);
}

__host__ __device__ inline int context_max(const ScanProblem& p) {
  return static_cast<int>(p.i2t ? p.max_len : p.R);
}
__host__ __device__ inline int query_max(const ScanProblem& p) {
  return static_cast<int>(p.i2t ? p.R : p.max_len);
}

// ----------------------------------------------------------------------------------------------
// Which images and captions a block scores, and where their rows live in global memory
// ----------------------------------------------------------------------------------------------

struct BlockWork {
  int64_t img0;     // first image
  int n_img;        // images in this block
  int rows_used;    // n_img * R
  int64_t cap0;     // first caption of the group
  int n_caps;
  int64_t word0;    // packed index of the group's first word
  int words_used;
};

__device__ BlockWork block_work(const ScanProblem& p, const Tile& t) {
  const int per_block = imgs_per_block(p, t);
  const int64_t img_blocks = (p.n_img + per_block - 1) / per_block;
  const int64_t b = blockIdx.x;
  const int64_t group = b / img_blocks;
  BlockWork w;
  w.img0 = (b % img_blocks) * per_block;
  const int64_t imgs_left = p.n_img - w.img0;
  w.n_img = static_cast<int>(imgs_left < per_block ? imgs_left : per_block);
  w.rows_used = w.n_img * static_cast<int>(p.R);
  w.cap0 = p.group_first[group];
  w.n_caps = static_cast<int>(p.group_first[group + 1] - w.cap0);
  w.word0 = p.word_off[w.cap0];
  w.words_used = static_cast<int>(p.word_off[w.cap0 + w.n_caps] - w.word0);
  return w;
}

// row_off[m]: element offset of tile row m (region) in img, -1 past the block's rows.
// col_off[n]: element offset of tile column n (word) in cap, -1 past the group's words; only
// real words get an offset, which is how padding stays unread.
__device__ void fill_offset_tables(const ScanProblem& p, const Tile& t, const BlockWork& w,
                                   int64_t* row_off, int64_t* col_off) {
  for (int m = threadIdx.x; m < t.rows_cap; m += kThreads) {
    row_off[m] = m < w.rows_used
        ? (w.img0 + m / p.R) * p.img_stride_n + (m % p.R) * p.img_stride_r
        : -1;
  }
  for (int n = w.words_used + threadIdx.x; n < t.cols_cap; n += kThreads) col_off[n] = -1;
  for (int jj = threadIdx.x; jj < w.n_caps; jj += kThreads) {
    const int64_t j = w.cap0 + jj;
    const int64_t col = p.word_off[j] - w.word0;
    const int64_t len = p.lens[j];
    for (int64_t k = 0; k < len; ++k) col_off[col + k] = j * p.cap_stride_n + k * p.cap_stride_w;
  }
  __syncthreads();
}

__device__ inline int round_up16(int x) { return (x + 15) / 16 * 16; }
__device__ inline int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ----------------------------------------------------------------------------------------------
// Step 1: the raw-score tile
// ----------------------------------------------------------------------------------------------

// Stage a kTileK16-wide K slice of the tile's rows (As) and columns (Bs) as raw 16-bit values.
// Rows/columns without a source and K past d are zero-filled. `vec` (host-checked: d and every
// stride a multiple of 8, 16-byte aligned bases) moves 16 bytes per load.
__device__ void stage16(const uint16_t* img, const uint16_t* cap, const int64_t* row_off,
                        const int64_t* col_off, int rows16, int cols16, int64_t k0, int64_t d,
                        bool vec, uint16_t* As, uint16_t* Bs) {
  if (vec) {
    constexpr int kChunks = kTileK16 / 8;
    const int total = (rows16 + cols16) * kChunks;
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int row = idx / kChunks, chunk = idx % kChunks;
      const bool is_a = row < rows16;
      const int r = is_a ? row : row - rows16;
      const int64_t off = is_a ? row_off[r] : col_off[r];
      const int64_t k = k0 + chunk * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (off >= 0 && k < d) v = __ldg(reinterpret_cast<const uint4*>((is_a ? img : cap) + off + k));
      *reinterpret_cast<uint4*>((is_a ? As : Bs) + r * kLd16 + chunk * 8) = v;
    }
  } else {
    const int total = (rows16 + cols16) * kTileK16;
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int row = idx / kTileK16, kk = idx % kTileK16;
      const bool is_a = row < rows16;
      const int r = is_a ? row : row - rows16;
      const int64_t off = is_a ? row_off[r] : col_off[r];
      const int64_t k = k0 + kk;
      const uint16_t v = (off >= 0 && k < d) ? (is_a ? img : cap)[off + k] : uint16_t(0);
      (is_a ? As : Bs)[r * kLd16 + kk] = v;
    }
  }
}

// fp16 / bf16 inputs: S tile on tensor cores (16x16x16 WMMA, fp32 accumulation). Each warp
// keeps up to 10 accumulator tiles of its column tile; the B fragment is loaded once per K step.
template <typename T>
__device__ void score_tile_wmma(const ScanProblem& p, const Tile& t, const Layout& l,
                                const BlockWork& w, const int64_t* row_off,
                                const int64_t* col_off, unsigned char* main, bool vec) {
  uint16_t* As = reinterpret_cast<uint16_t*>(main);
  uint16_t* Bs = As + t.rows_cap * kLd16;
  const int warp = threadIdx.x / 32;
  const int nf = warp % t.col_frags, mf0 = (warp / t.col_frags) * kRowFragsPerWarp;
  const int rows16 = round_up16(w.rows_used), cols16 = round_up16(w.words_used);
  const int n_mf = clamp_int(rows16 / kFrag - mf0, 0, kRowFragsPerWarp);
  const bool active = nf * kFrag < cols16 && n_mf > 0;  // warp-uniform

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kRowFragsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowFragsPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);

  const uint16_t* img = static_cast<const uint16_t*>(p.img);
  const uint16_t* cap = static_cast<const uint16_t*>(p.cap);
  for (int64_t k0 = 0; k0 < p.d; k0 += kTileK16) {
    stage16(img, cap, row_off, col_off, rows16, cols16, k0, p.d, vec, As, Bs);
    __syncthreads();
    if (active) {
#pragma unroll
      for (int kk = 0; kk < kTileK16; kk += kFrag) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, reinterpret_cast<const T*>(Bs + nf * kFrag * kLd16 + kk), kLd16);
#pragma unroll
        for (int i = 0; i < kRowFragsPerWarp; ++i) {
          if (i < n_mf) {
            wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
            wmma::load_matrix_sync(a, reinterpret_cast<const T*>(As + (mf0 + i) * kFrag * kLd16 + kk),
                                   kLd16);
            wmma::mma_sync(acc[i], a, b, acc[i]);
          }
        }
      }
    }
    __syncthreads();  // staging is overwritten next step, and finally aliased by the scores
  }
  float* scores = reinterpret_cast<float*>(main);
  if (active) {
#pragma unroll
    for (int i = 0; i < kRowFragsPerWarp; ++i) {
      if (i < n_mf) {
        const int m = (mf0 + i) * kFrag, n = nf * kFrag;
        if (p.i2t) {
          wmma::store_matrix_sync(scores + m * l.score_ld + n, acc[i], l.score_ld, wmma::mem_row_major);
        } else {
          wmma::store_matrix_sync(scores + n * l.score_ld + m, acc[i], l.score_ld, wmma::mem_col_major);
        }
      }
    }
  }
  __syncthreads();
}

// fp32 inputs: the same tile with fp32 FMAs (exact fp32 products, unlike TF32). Lane layout in
// a warp's 16-column x 160-row strip: 4 column quads x 8 row phases, 20 rows apart by 8.
__device__ void score_tile_fma(const ScanProblem& p, const Tile& t, const Layout& l,
                               const BlockWork& w, const int64_t* row_off,
                               const int64_t* col_off, unsigned char* main) {
  float* AsT = reinterpret_cast<float*>(main);  // [kTileK32][rows_cap + 1], K-major
  const int lda = t.rows_cap + 1;
  float* BsT = AsT + kTileK32 * lda;            // [kTileK32][cols_cap + 4], 16B-aligned rows
  const int ldb = t.cols_cap + 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nf = warp % t.col_frags, row_base = (warp / t.col_frags) * kGroupRows;
  const int quad = lane % 4, phase = lane / 4;
  const int rows8 = (w.rows_used + 7) / 8 * 8, cols16 = round_up16(w.words_used);
  const int n_stripes = clamp_int((w.rows_used - row_base + 7) / 8, 0, kStripes);
  const bool active = nf * kFrag < cols16 && n_stripes > 0;  // warp-uniform

  float acc[kStripes][4];
#pragma unroll
  for (int s = 0; s < kStripes; ++s) acc[s][0] = acc[s][1] = acc[s][2] = acc[s][3] = 0.f;

  const float* img = static_cast<const float*>(p.img);
  const float* cap = static_cast<const float*>(p.cap);
  for (int64_t k0 = 0; k0 < p.d; k0 += kTileK32) {
    for (int idx = threadIdx.x; idx < rows8 * kTileK32; idx += kThreads) {
      const int m = idx / kTileK32, kk = idx % kTileK32;
      const int64_t off = row_off[m], k = k0 + kk;
      AsT[kk * lda + m] = (off >= 0 && k < p.d) ? __ldg(img + off + k) : 0.f;
    }
    for (int idx = threadIdx.x; idx < cols16 * kTileK32; idx += kThreads) {
      const int n = idx / kTileK32, kk = idx % kTileK32;
      const int64_t off = col_off[n], k = k0 + kk;
      BsT[kk * ldb + n] = (off >= 0 && k < p.d) ? __ldg(cap + off + k) : 0.f;
    }
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int kk = 0; kk < kTileK32; ++kk) {
        const float4 b = *reinterpret_cast<const float4*>(BsT + kk * ldb + nf * kFrag + quad * 4);
        const float* a_col = AsT + kk * lda + row_base + phase;
#pragma unroll
        for (int s = 0; s < kStripes; ++s) {
          if (s < n_stripes) {
            const float a = a_col[8 * s];
            acc[s][0] = fmaf(a, b.x, acc[s][0]);
            acc[s][1] = fmaf(a, b.y, acc[s][1]);
            acc[s][2] = fmaf(a, b.z, acc[s][2]);
            acc[s][3] = fmaf(a, b.w, acc[s][3]);
          }
        }
      }
    }
    __syncthreads();
  }
  float* scores = reinterpret_cast<float*>(main);
  if (active) {
#pragma unroll
    for (int s = 0; s < kStripes; ++s) {
      if (s < n_stripes) {
        const int m = row_base + phase + 8 * s;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int n = nf * kFrag + quad * 4 + q;
          if (p.i2t) {
            scores[m * l.score_ld + n] = acc[s][q];
          } else {
            scores[n * l.score_ld + m] = acc[s][q];
          }
        }
      }
    }
  }
  __syncthreads();
}

template <typename T>
__device__ void score_tile(const ScanProblem& p, const Tile& t, const Layout& l,
                           const BlockWork& w, const int64_t* row_off, const int64_t* col_off,
                           unsigned char* main, bool vec) {
  if constexpr (std::is_same_v<T, float>) {
    score_tile_fma(p, t, l, w, row_off, col_off, main);
  } else {
    score_tile_wmma<T>(p, t, l, w, row_off, col_off, main, vec);
  }
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

// The backward of one pair (see kernels.h for what is written). Passes:
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
  b.t = make_tile(p.col_frags);
  b.l = make_layout(b.t, sizeof(T) == 2, p.i2t, context_max(p), query_max(p), backward);
  b.w = block_work(p, b.t);
  b.row_off = reinterpret_cast<int64_t*>(smem + b.l.row_off);
  b.col_off = reinterpret_cast<int64_t*>(smem + b.l.col_off);
  b.main = smem + b.l.main;
  b.warp_scratch = reinterpret_cast<float*>(smem + b.l.scratch) +
                   (threadIdx.x / 32) * b.l.scratch_warp;
  fill_offset_tables(p, b.t, b.w, b.row_off, b.col_off);
  score_tile<T>(p, b.t, b.l, b.w, b.row_off, b.col_off, b.main, vec);
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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pairs = b.w.n_img * b.w.n_caps;
  for (int pair = warp; pair < pairs; pair += kWarps) {
    const Pair q = make_pair(p, b.w, scores, b.l.score_ld, pair % b.w.n_img, pair / b.w.n_img);
    const float sim = pair_forward(p, q, b.warp_scratch, context_max(p), lane);
    if (lane == 0) sims[q.i * p.n_cap + q.j] = sim;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) scan_backward_kernel(
    ScanProblem p, const float* grad_sims, float* d_scores, float* attn, float* attn_scaled,
    float* d_qnorm, bool vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  const BlockSetup b = setup_and_score<T>(p, smem, true, vec);
  const float* scores = reinterpret_cast<const float*>(b.main);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pairs = b.w.n_img * b.w.n_caps;
  for (int pair = warp; pair < pairs; pair += kWarps) {
    const Pair q = make_pair(p, b.w, scores, b.l.score_ld, pair % b.w.n_img, pair / b.w.n_img);
    const PairGrad g = make_pair_grad(p, q, d_scores, attn, attn_scaled, d_qnorm);
    pair_backward(p, q, grad_sims[q.i * p.n_cap + q.j], g, b.warp_scratch, context_max(p),
                  query_max(p), lane);
  }
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

bool valid_problem(const ScanProblem& p) {
  if (p.col_frags != 8 && p.col_frags != 4 && p.col_frags != 2) return false;
  const Tile t = make_tile(p.col_frags);
  return p.R >= 1 && p.R <= t.rows_cap && p.max_len >= 1 && p.max_len <= t.cols_cap &&
         p.d >= 1 && p.n_groups >= 1 && p.raw_norm >= kClippedL2 && p.raw_norm <= kSoftmaxNorm &&
         p.agg >= kMean && p.agg <= kSum;
}

// 16-byte vector loads need d and every row stride to be multiples of 8 elements and 16-byte
// aligned bases.
bool vector_loads_ok(const ScanProblem& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return p.d % 8 == 0 && p.img_stride_n % 8 == 0 && p.img_stride_r % 8 == 0 &&
         p.cap_stride_n % 8 == 0 && p.cap_stride_w % 8 == 0 && aligned(p.img) && aligned(p.cap);
}

template <typename Kernel, typename... Args>
int launch(Kernel kernel, const ScanProblem& p, bool backward, int elem_bytes, void* stream,
           Args... args) {
  const Tile t = make_tile(p.col_frags);
  const Layout l = make_layout(t, elem_bytes == 2, p.i2t, context_max(p), query_max(p), backward);
  const int64_t img_blocks = (p.n_img + imgs_per_block(p, t) - 1) / imgs_per_block(p, t);
  const int64_t blocks = img_blocks * p.n_groups;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(l.total));
  if (err != cudaSuccess) return static_cast<int>(err);
  kernel<<<static_cast<unsigned>(blocks), kThreads, l.total, static_cast<cudaStream_t>(stream)>>>(
      p, args...);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int scan_tile_rows(int col_frags) { return make_tile(col_frags).rows_cap; }
int scan_tile_cols(int col_frags) { return make_tile(col_frags).cols_cap; }

int scan_forward(const ScanProblem& p, float* sims, void* stream) {
  if (p.n_img == 0 || p.n_cap == 0) return 0;
  if (!valid_problem(p)) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = vector_loads_ok(p);
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
  const bool vec = vector_loads_ok(p);
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
