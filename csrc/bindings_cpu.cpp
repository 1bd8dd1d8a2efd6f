// pybind11 bindings of the C++ CPU kernels (csrc/cpu/).
#include "bindings.h"
#include "cpu/kernels.h"

void register_cpu_bindings(pybind11::module& m) {
  m.def("gram_cpu", &rcar_cpu::gram, "per-image Gram matrix (n, R, d) -> (n, R, R)");
}
