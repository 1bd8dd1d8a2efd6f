// Device queries shared by every CUDA kernel file.
#include <cuda_runtime.h>

#include "cuda/kernels.h"

namespace rcar_cuda {

int device_count() {
  int count = 0;
  // With no driver or no GPU this fails; that simply means "no device" to the caller.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later queries are not poisoned
    return 0;
  }
  return count;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace rcar_cuda
