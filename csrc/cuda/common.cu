// Device queries shared by every CUDA kernel file.
#include <cuda_runtime.h>


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

}  // namespace rcar_cuda

#ifndef __CUDA_ARCH__  // the Python bindings: host code only (csrc/cuda/bind.h)
#include "cuda/bind.h"

// Without CUDA (this file not linked in) csrc/bindings.cpp defines the two as false / 0.
RCAR_FAST_BINDINGS(cuda_common, m) {
  m.def("built_with_cuda", [] { return true; }, "whether the CUDA kernels were compiled in");
  m.def("cuda_device_count", &rcar_cuda::device_count, "CUDA devices seen by the static runtime");
}
#endif
