// pybind11 bindings of the CUDA launchers (csrc/cuda/). Pointers and the stream arrive as
// integers from Python (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream).
#include "bindings.h"
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

}  // namespace

void register_cuda_bindings(pybind11::module& m) {
#ifdef RCAR_FAST_WITH_CUDA
  m.def("built_with_cuda", [] { return true; }, "whether the CUDA kernels were compiled in");
  m.def("cuda_device_count", &rcar_cuda::device_count, "CUDA devices seen by the static runtime");
  m.def(
      "gram_cuda",
      [](uintptr_t x, uintptr_t out, int64_t n, int64_t R, int64_t d, int64_t stride_n,
         int64_t stride_r, int dtype, uintptr_t stream) {
        check_cuda(rcar_cuda::gram(as_ptr(x), static_cast<float*>(as_ptr(out)), n, R, d,
                                   stride_n, stride_r, dtype, as_ptr(stream)),
                   "gram_cuda");
      },
      "per-image Gram matrix on the GPU (raw pointers; float32 output)");
#else
  m.def("built_with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
  m.def("cuda_device_count", [] { return 0; }, "CUDA devices seen by the static runtime");
#endif
}
