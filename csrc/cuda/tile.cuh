// The region-word score tile shared by the CUDA heads (scan.cu, maxsim.cu): which images and
// captions a block scores, the masks that keep padding unread, and S = regions . words for the
// whole block in shared memory (fp32 accumulation). A head is an epilogue that reads this tile.
//
// Work split. Captions are packed (word w of caption j has packed index word_off[j] + w) and cut
// into groups of consecutive captions whose words fit the tile's columns; images are taken
// imgs_per_block at a time so that their regions fill the tile's rows. One thread block scores
// one (image block, caption group) tile.
//
// GEMM: fp16 / bf16 inputs on tensor cores (16x16x16 WMMA, fp32 accumulation); fp32 inputs with
// fp32 FMAs (exact fp32 products, unlike TF32). Padding (words >= lens[j], regions >=
// region_lens[i] when given) gets no source offset, is staged as zeros and never read from
// global memory, so NaN there cannot reach the tile.
//
// Problem type P (ScanProblem of scan.cu, MaxSimProblem of maxsim.cu): the tile reads the fields
//   img, cap (device pointers), d, n_img, R, img_stride_n, img_stride_r, cap_stride_n,
//   cap_stride_w, lens, word_off, group_first.
// Layout of the stored tile: "region-major" puts S[m, n] (m: tile row = region, n: tile column
// = word) at scores[m * score_ld + n]; "word-major" at scores[n * score_ld + m].
//
// A head's .cu file includes this header alone: it brings the contract's codes (contract.h), the
// element loads and warp reductions, and the tile names the epilogues use unqualified.
#pragma once
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "contract.h"
#include "cuda/load.cuh"
#include "cuda/warp.cuh"

namespace rcar_cuda {
namespace tile {

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

// ----------------------------------------------------------------------------------------------
// Geometry and shared memory (computed identically on host and device)
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

__host__ __device__ inline bool valid_col_frags(int col_frags) {
  return col_frags == 8 || col_frags == 4 || col_frags == 2;
}

__host__ __device__ inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Leading dimension (floats) of the stored score tile.
__host__ __device__ inline int score_ld(const Tile& t, bool region_major) {
  return region_major ? t.cols_cap + 4 : t.rows_cap + 4;
}

// Bytes of the "main" area: it first stages the GEMM operands, then (aliased) holds the fp32
// score tile.
__host__ __device__ inline size_t main_bytes(const Tile& t, bool inputs16, bool region_major) {
  const size_t staging = inputs16
      ? size_t(t.rows_cap + t.cols_cap) * kLd16 * 2
      : sizeof(float) * kTileK32 * (size_t(t.rows_cap + 1) + size_t(t.cols_cap + 4));
  const size_t scores =
      sizeof(float) * size_t(region_major ? t.rows_cap : t.cols_cap) * score_ld(t, region_major);
  return staging > scores ? staging : scores;
}

// Offsets (bytes) of the row / column source tables and of the main area in shared memory.
struct Regions {
  size_t row_off, col_off, main, end;
};

__host__ __device__ inline Regions make_regions(const Tile& t, bool inputs16, bool region_major) {
  Regions r;
  r.row_off = 0;
  r.col_off = align_up(r.row_off + sizeof(int64_t) * t.rows_cap, 16);
  r.main = align_up(r.col_off + sizeof(int64_t) * t.cols_cap, 128);
  r.end = r.main + main_bytes(t, inputs16, region_major);
  return r;
}

// Shared memory of a head's kernel: the tile's regions, then scratch_bytes of scratch (the
// head's per-warp buffers) from `scratch` on, `total` bytes in all.
struct Layout {
  size_t row_off, col_off, main, scratch, total;
  int score_ld;  // leading dimension of the score tile (floats)
};

__host__ __device__ inline Layout make_layout(const Tile& t, bool inputs16, bool region_major,
                                              size_t scratch_bytes) {
  const Regions regions = make_regions(t, inputs16, region_major);
  Layout l;
  l.row_off = regions.row_off;
  l.col_off = regions.col_off;
  l.main = regions.main;
  l.score_ld = score_ld(t, region_major);
  l.scratch = align_up(regions.end, 16);
  l.total = l.scratch + scratch_bytes;
  return l;
}

template <class P>
__host__ __device__ inline int imgs_per_block(const P& p, const Tile& t) {
  const int64_t fit = t.rows_cap / p.R;
  return static_cast<int>(fit < p.n_img ? fit : p.n_img);
}

template <class P>
__host__ __device__ inline int64_t block_count(const P& p, const Tile& t, int64_t n_groups) {
  const int per_block = imgs_per_block(p, t);
  return (p.n_img + per_block - 1) / per_block * n_groups;
}

// 16-byte vector loads need d and every row stride to be multiples of 8 elements and 16-byte
// aligned bases.
template <class P>
inline bool vector_loads_ok(const P& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return p.d % 8 == 0 && p.img_stride_n % 8 == 0 && p.img_stride_r % 8 == 0 &&
         p.cap_stride_n % 8 == 0 && p.cap_stride_w % 8 == 0 && aligned(p.img) && aligned(p.cap);
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

template <class P>
__device__ BlockWork block_work(const P& p, const Tile& t) {
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

// The masks. row_off[m]: element offset of tile row m (region) in img, -1 past the block's rows
// and, when region_lens is given, for regions r >= region_lens[i]. col_off[n]: element offset of
// tile column n (word) in cap, -1 past the group's words; only real words get an offset.
template <class P>
__device__ void fill_offset_tables(const P& p, const Tile& t, const BlockWork& w,
                                   const int64_t* region_lens, int64_t* row_off,
                                   int64_t* col_off) {
  for (int m = threadIdx.x; m < t.rows_cap; m += kThreads) {
    const int64_t i = w.img0 + m / p.R, r = m % p.R;
    const bool real = m < w.rows_used && (region_lens == nullptr || r < region_lens[i]);
    row_off[m] = real ? i * p.img_stride_n + r * p.img_stride_r : -1;
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
// The raw-score tile
// ----------------------------------------------------------------------------------------------

// Staged row `row` of one K slice: the first rows16 are tile rows (regions, staged into As),
// the rest tile columns (words, into Bs); off: its source offset, -1 for none.
struct StagedRow {
  bool is_a;
  int r;        // its row in As or Bs
  int64_t off;
};

__device__ inline StagedRow staged_row(int row, int rows16, const int64_t* row_off,
                                       const int64_t* col_off) {
  const bool is_a = row < rows16;
  const int r = is_a ? row : row - rows16;
  return {is_a, r, is_a ? row_off[r] : col_off[r]};
}

// Stage a kTileK16-wide K slice of the tile's rows (As) and columns (Bs) as raw 16-bit values.
// Rows/columns without a source and K past d are zero-filled. `vec` (host-checked: d and every
// stride a multiple of 8, 16-byte aligned bases) moves 16 bytes per load.
__device__ inline void stage16(const uint16_t* img, const uint16_t* cap, const int64_t* row_off,
                               const int64_t* col_off, int rows16, int cols16, int64_t k0,
                               int64_t d, bool vec, uint16_t* As, uint16_t* Bs) {
  if (vec) {
    constexpr int kChunks = kTileK16 / 8;
    const int total = (rows16 + cols16) * kChunks;
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int chunk = idx % kChunks;
      const StagedRow s = staged_row(idx / kChunks, rows16, row_off, col_off);
      const int64_t k = k0 + chunk * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (s.off >= 0 && k < d) v = __ldg(reinterpret_cast<const uint4*>((s.is_a ? img : cap) + s.off + k));
      *reinterpret_cast<uint4*>((s.is_a ? As : Bs) + s.r * kLd16 + chunk * 8) = v;
    }
  } else {
    const int total = (rows16 + cols16) * kTileK16;
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int kk = idx % kTileK16;
      const StagedRow s = staged_row(idx / kTileK16, rows16, row_off, col_off);
      const int64_t k = k0 + kk;
      const uint16_t v = (s.off >= 0 && k < d) ? (s.is_a ? img : cap)[s.off + k] : uint16_t(0);
      (s.is_a ? As : Bs)[s.r * kLd16 + kk] = v;
    }
  }
}

// fp16 / bf16 inputs: S tile on tensor cores. Each warp keeps up to 10 accumulator tiles of its
// column tile; the B fragment is loaded once per K step.
template <typename T, class P>
__device__ void score_tile_wmma(const P& p, const Tile& t, int ld, bool region_major,
                                const BlockWork& w, const int64_t* row_off,
                                const int64_t* col_off, unsigned char* main, bool vec) {
  using namespace nvcuda;
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
        if (region_major) {
          wmma::store_matrix_sync(scores + m * ld + n, acc[i], ld, wmma::mem_row_major);
        } else {
          wmma::store_matrix_sync(scores + n * ld + m, acc[i], ld, wmma::mem_col_major);
        }
      }
    }
  }
  __syncthreads();
}

// fp32 inputs: the same tile with fp32 FMAs. Lane layout in a warp's 16-column x 160-row strip:
// 4 column quads x 8 row phases, 20 rows apart by 8.
template <class P>
__device__ void score_tile_fma(const P& p, const Tile& t, int ld, bool region_major,
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
          if (region_major) {
            scores[m * ld + n] = acc[s][q];
          } else {
            scores[n * ld + m] = acc[s][q];
          }
        }
      }
    }
  }
  __syncthreads();
}

// S for the block's (image, caption group) tile into `main`, laid out as `region_major` says
// with leading dimension `ld` (score_ld). T: the element type of img and cap.
template <typename T, class P>
__device__ void score_tile(const P& p, const Tile& t, int ld, bool region_major,
                           const BlockWork& w, const int64_t* row_off, const int64_t* col_off,
                           unsigned char* main, bool vec) {
  if constexpr (std::is_same_v<T, float>) {
    score_tile_fma(p, t, ld, region_major, w, row_off, col_off, main);
  } else {
    score_tile_wmma<T>(p, t, ld, region_major, w, row_off, col_off, main, vec);
  }
}

// f(li, jj, lane) for every (image li, caption jj) pair of the block, one warp per pair.
template <class F>
__device__ inline void for_each_pair(const BlockWork& w, F&& f) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pairs = w.n_img * w.n_caps;
  for (int pair = warp; pair < pairs; pair += kWarps) f(pair % w.n_img, pair / w.n_img, lane);
}

}  // namespace tile

// The codes of rcar_fast.contract (DType, RawNorm, Pool, ...), generated into csrc/contract.h.
using namespace rcar_contract;
using tile::BlockWork;
using tile::Tile;
using tile::kThreads;
using tile::kWarps;

}  // namespace rcar_cuda
