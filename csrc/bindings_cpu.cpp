// pybind11 bindings of the C++ CPU kernels (csrc/cpu/).
#include "bindings.h"
#include "cpu/kernels.h"

void register_cpu_bindings(pybind11::module& m) {
  namespace py = pybind11;
  m.def("gram_cpu", &rcar_cpu::gram, "per-image Gram matrix (n, R, d) -> (n, R, R)");
  m.def("scan_forward_cpu", &rcar_cpu::scan_forward,
        "SCAN similarity of all pairs (n_img, n_cap), fused per tile", py::arg("img"), py::arg("cap"),
        py::arg("lens"), py::arg("direction"), py::arg("raw_norm"), py::arg("smooth"), py::arg("agg"),
        py::arg("lse_lambda"), py::call_guard<py::gil_scoped_release>());
  m.def("scan_backward_cpu", &rcar_cpu::scan_backward,
        "gradients [d img, d cap] of sum(grad * SCAN similarity)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("direction"), py::arg("raw_norm"), py::arg("smooth"),
        py::arg("agg"), py::arg("lse_lambda"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_forward_cpu", &rcar_cpu::rcar_forward,
        "RCAR head (eval mode) over all pairs (n_img, n_cap); weights: flat list, see csrc/cpu/kernels.h",
        py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("direction"), py::arg("regulator"),
        py::arg("steps"), py::arg("smooth"), py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("set_cpu_simd_path", &rcar_cpu::set_simd_path,
        "select the compiled copy of the CPU kernels' vector loops: 'auto' | 'baseline' | 'avx2'; "
        "returns the copy that will run",
        py::arg("path"));
}
