// Per-image Gram matrix G = X X^T on the GPU: the smallest real kernel of the project. SCAN's
// Gram identity needs exactly this (|ctx|^2 = alpha^T G alpha), and it exercises the whole
// nvcc -> object -> extension -> dispatcher path.
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/kernels.h"
#include "cuda/load.cuh"

namespace rcar_cuda {
namespace {

constexpr int kTile = 16;

// One block computes a kTile x kTile tile of one image's Gram matrix, staging kTile-wide
// slices of the feature dimension through shared memory.
template <typename T>
__global__ void gram_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t R,
                            int64_t d, int64_t stride_n, int64_t stride_r) {
  __shared__ float rows_a[kTile][kTile + 1];
  __shared__ float rows_b[kTile][kTile + 1];
  const int64_t img = blockIdx.z;
  const int64_t r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
  const int ty = threadIdx.y, tx = threadIdx.x;
  const T* base = x + img * stride_n;
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    const int64_t k = k0 + tx;
    rows_a[ty][tx] = (r0 + ty < R && k < d) ? to_float(base[(r0 + ty) * stride_r + k]) : 0.f;
    rows_b[ty][tx] = (c0 + ty < R && k < d) ? to_float(base[(c0 + ty) * stride_r + k]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += rows_a[ty][kk] * rows_b[tx][kk];
    __syncthreads();
  }
  if (r0 + ty < R && c0 + tx < R) out[(img * R + r0 + ty) * R + c0 + tx] = acc;
}

}  // namespace

int gram(const void* x, float* out, int64_t n, int64_t R, int64_t d, int64_t stride_n,
         int64_t stride_r, int dtype, void* stream) {
  if (n == 0 || R == 0) return 0;
  const dim3 block(kTile, kTile);
  const dim3 grid((R + kTile - 1) / kTile, (R + kTile - 1) / kTile, n);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto typed) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    gram_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(x), out, R, d, stride_n, stride_r);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace rcar_cuda
