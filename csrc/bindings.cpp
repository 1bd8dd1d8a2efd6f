// The only file that sees both torch and the kernels. CPU kernels take at::Tensor; CUDA
// launchers take raw device pointers, sizes, a dtype code and the stream as integers, because
// the CUDA side is compiled without torch headers (see csrc/cuda/kernels.h).
#include <torch/extension.h>

#include "cpu/kernels.h"
#ifdef RCAR_FAST_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace {

#ifdef RCAR_FAST_WITH_CUDA
void check_cuda(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", rcar_cuda::error_string(code));
}

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
#endif

bool built_with_cuda() {
#ifdef RCAR_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef RCAR_FAST_WITH_CUDA
  return rcar_cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcar_fast native kernels (C++ CPU, CUDA)";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices seen by the static runtime");
  m.def("gram_cpu", &rcar_cpu::gram, "per-image Gram matrix (n, R, d) -> (n, R, R)");
#ifdef RCAR_FAST_WITH_CUDA
  m.def(
      "gram_cuda",
      [](uintptr_t x, uintptr_t out, int64_t n, int64_t R, int64_t d, int64_t stride_n,
         int64_t stride_r, int dtype, uintptr_t stream) {
        check_cuda(rcar_cuda::gram(as_ptr(x), static_cast<float*>(as_ptr(out)), n, R, d,
                                   stride_n, stride_r, dtype, as_ptr(stream)),
                   "gram_cuda");
      },
      "per-image Gram matrix on the GPU (raw pointers; float32 output)");
#endif
}
