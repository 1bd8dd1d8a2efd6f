// The Python module rcar_fast._C. CPU kernels take at::Tensor (bindings_cpu.cpp); CUDA
// launchers take raw device pointers, sizes, a dtype code and the stream as integers
// (bindings_cuda.cpp), because the CUDA side is compiled without torch headers.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcar_fast native kernels (C++ CPU, CUDA)";
  register_cpu_bindings(m);
  register_cuda_bindings(m);
}
