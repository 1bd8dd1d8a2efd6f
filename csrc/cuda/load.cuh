// Element loads that widen fp16 / bf16 / fp32 to float, shared by the .cu kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rcar_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Calls f.template operator()<T>() with T the element type named by `dtype`.
template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(static_cast<const float*>(nullptr));
    case 1: return f(static_cast<const __half*>(nullptr));
    case 2: return f(static_cast<const __nv_bfloat16*>(nullptr));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace rcar_cuda
