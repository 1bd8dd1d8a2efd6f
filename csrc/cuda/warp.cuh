// Warp-level reductions shared by the CUDA kernels (scan.cu, rcar.cu): every lane of a full
// warp gets the result. No torch headers here (the .cu files are compiled without torch).
#pragma once

namespace rcar_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ inline float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

}  // namespace rcar_cuda
