// Per-item Gram matrices G = X X^T and squared row norms on the GPU. SCAN's Gram identity needs
// both (|ctx|^2 = alpha^T G alpha, |q|), for region sets (all R rows) and for captions (ragged:
// rows >= lens[n] are padding and are never read).
#include <cuda_runtime.h>

#include <type_traits>

#include "contract.h"
#include "cuda/load.cuh"

namespace rcar_cuda {

// The codes of rcar_fast.contract (DType, RawNorm, ...), generated into csrc/contract.h.
using namespace rcar_contract;

}  // namespace rcar_cuda

namespace rcar_cuda {
namespace {

constexpr int kTile = 16;

// One block computes a kTile x kTile tile of item blockIdx.x's Gram matrix, staging kTile-wide
// slices of the feature dimension through shared memory. Items sit on grid.x (up to 2^31 - 1
// of them); tiles on y and z.
template <typename T>
__global__ void gram_kernel(const T* __restrict__ x, const int64_t* __restrict__ lens,
                            const int64_t* __restrict__ out_off, float* __restrict__ out,
                            int64_t R, int64_t d, int64_t stride_n, int64_t stride_r) {
  __shared__ float rows_a[kTile][kTile + 1];
  __shared__ float rows_b[kTile][kTile + 1];
  const int64_t item = blockIdx.x;
  const int64_t len = lens ? lens[item] : R;
  const int64_t r0 = int64_t(blockIdx.z) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  if (r0 >= len || c0 >= len) return;  // whole block leaves together: no barrier is skipped
  const int ty = threadIdx.y, tx = threadIdx.x;
  const T* base = x + item * stride_n;
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    const int64_t k = k0 + tx;
    rows_a[ty][tx] = (r0 + ty < len && k < d) ? to_float(base[(r0 + ty) * stride_r + k]) : 0.f;
    rows_b[ty][tx] = (c0 + ty < len && k < d) ? to_float(base[(c0 + ty) * stride_r + k]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += rows_a[ty][kk] * rows_b[tx][kk];
    __syncthreads();
  }
  if (r0 + ty < len && c0 + tx < len) {
    float* dst = out + (out_off ? out_off[item] : item * R * R);
    dst[(r0 + ty) * len + c0 + tx] = acc;
  }
}

constexpr int kNormWarps = 8;

// One warp per row: lanes stride over the feature dimension, then a butterfly sum.
template <typename T>
__global__ void row_sqnorms_kernel(const T* __restrict__ x, const int64_t* __restrict__ lens,
                                   const int64_t* __restrict__ out_off, float* __restrict__ out,
                                   int64_t n, int64_t R, int64_t d, int64_t stride_n,
                                   int64_t stride_r) {
  const int64_t row = int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n * R) return;  // warp-uniform
  const int64_t item = row / R, r = row % R;
  if (lens && r >= lens[item]) return;  // padding row: never read
  const T* src = x + item * stride_n + r * stride_r;
  float acc = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float v = to_float(src[k]);
    acc += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[(out_off ? out_off[item] : item * R) + r] = acc;
}

}  // namespace

int gram_ragged(const void* x, const int64_t* lens, const int64_t* out_off, float* out,
                int64_t n, int64_t R, int64_t d, int64_t stride_n, int64_t stride_r, int dtype,
                void* stream) {
  if (n == 0 || R == 0) return 0;
  const int64_t tiles = (R + kTile - 1) / kTile;
  if (tiles > 65535 || n > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(tiles),
                  static_cast<unsigned>(tiles));
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto typed) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    gram_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(x), lens, out_off, out, R, d,
                                          stride_n, stride_r);
    return static_cast<int>(cudaGetLastError());
  });
}

int gram(const void* x, float* out, int64_t n, int64_t R, int64_t d, int64_t stride_n,
         int64_t stride_r, int dtype, void* stream) {
  return gram_ragged(x, nullptr, nullptr, out, n, R, d, stride_n, stride_r, dtype, stream);
}

int row_sqnorms(const void* x, const int64_t* lens, const int64_t* out_off, float* out,
                int64_t n, int64_t R, int64_t d, int64_t stride_n, int64_t stride_r, int dtype,
                void* stream) {
  if (n == 0 || R == 0) return 0;
  const int64_t blocks = (n * R + kNormWarps - 1) / kNormWarps;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto typed) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    row_sqnorms_kernel<T><<<static_cast<unsigned>(blocks), kNormWarps * 32, 0, s>>>(
        static_cast<const T*>(x), lens, out_off, out, n, R, d, stride_n, stride_r);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace rcar_cuda

#ifndef __CUDA_ARCH__  // the Python bindings: host code only (csrc/cuda/bind.h)
#include "cuda/bind.h"

// Launchers, every pointer a device pointer, strides in elements, output float32:
//   gram_cuda: out[n, r, r'] = sum_k x[n, r, k] * x[n, r', k]; x is (n, R, d) with row stride
//     `stride_r` and image stride `stride_n`, out is contiguous (n, R, R).
//   gram_ragged_cuda: Gram matrices of ragged item sets: item n has rows 0..len(n)-1
//     (len(n) = lens[n], or R when lens is 0); rows >= len(n) are never read. Item n's
//     len x len matrix is written row-major at out + out_off[n] (or out + n*R*R when out_off
//     is 0).
//   row_sqnorms_cuda: out[out_off[n] + r] = sum_k x[n, r, k]^2 for r < len(n) (out_off 0:
//     out[n*R + r]; lens 0: len(n) = R). Padding rows are never read.
RCAR_FAST_BINDINGS(cuda_gram, m) {
  using rcar_cuda::bind::bind_launcher;
  bind_launcher<&rcar_cuda::gram>(m, "gram_cuda", "per-image Gram matrix on the GPU (raw pointers; float32 output)");
  bind_launcher<&rcar_cuda::gram_ragged>(
      m, "gram_ragged_cuda", "Gram matrices of ragged row sets (lens / out_off may be 0 = all R rows / n*R*R layout)");
  bind_launcher<&rcar_cuda::row_sqnorms>(m, "row_sqnorms_cuda",
                                         "squared row norms of ragged row sets, packed (lens / out_off may be 0)");
}
#endif
