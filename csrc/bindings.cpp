// The Python module rcar_fast._C: runs the registrations of the kernel units (bindings.h).
// CPU kernels (csrc/cpu/*.cpp) take at::Tensor; the CUDA launchers (csrc/cuda/*.cu, which are
// compiled without torch headers) take raw device pointers, sizes, a dtype code and the stream
// as integers.
#include "bindings.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace rcar_bindings {
namespace {

std::vector<std::pair<std::string, RegisterFn>>& registrations() {
  // A function-local static: units register from their static initialisers, in any order.
  static std::vector<std::pair<std::string, RegisterFn>> list;
  return list;
}

}  // namespace

bool add_registration(const char* name, RegisterFn fn) {
  registrations().emplace_back(name, fn);
  return true;
}

void run_registrations(pybind11::module_& m) {
  auto list = registrations();
  std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 0; i + 1 < list.size(); ++i)
    if (list[i].first == list[i + 1].first)
      throw std::runtime_error("rcar_fast._C: two native units register as '" + list[i].first + "'");
  for (const auto& [name, fn] : list) fn(m);
}

}  // namespace rcar_bindings

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcar_fast native kernels (C++ CPU, CUDA)";
  rcar_bindings::run_registrations(m);
  if (!pybind11::hasattr(m, "built_with_cuda")) {
    // Built without the CUDA kernels (RCAR_FAST_CUDA=0 or no nvcc): csrc/cuda/common.cu, whose
    // unit defines the real two, is not linked in.
    m.def("built_with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
    m.def("cuda_device_count", [] { return 0; }, "CUDA devices seen by the static runtime");
  }
}
