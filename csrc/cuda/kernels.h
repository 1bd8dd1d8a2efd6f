// Launch entry points of the CUDA kernels in csrc/cuda/*.cu.
//
// This header is shared by nvcc (the .cu files) and by the host C++ binding, and it must stay
// free of torch and CUDA headers: the CPU torch wheel has no CUDA headers, so the binding only
// ever sees raw pointers, sizes, a dtype code and the stream as an opaque pointer.
// Every launcher returns 0 on success or a cudaError_t value; rcar_cuda_error_string turns it
// into a message.
#pragma once
#include <cstdint>

namespace rcar_cuda {

// Element types of input tensors (outputs are always float32).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

int device_count();                    // 0 when there is no driver or no device
const char* error_string(int code);

// out[n, r, r'] = sum_k x[n, r, k] * x[n, r', k]; x is (n, R, d) with row stride `stride_r`
// and image stride `stride_n` (elements), out is contiguous float32 (n, R, R).
int gram(const void* x, float* out, int64_t n, int64_t R, int64_t d,
         int64_t stride_n, int64_t stride_r, int dtype, void* stream);

}  // namespace rcar_cuda
