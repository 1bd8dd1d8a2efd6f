// pybind11 bindings of the C++ CPU kernels (csrc/cpu/).
#include "bindings.h"
#include "cpu/kernels.h"

void register_cpu_bindings(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<rcar_cpu::ScanSettings>(m, "ScanSettings", "a SCAN problem's options as contract codes")
      .def(py::init([](int direction, int raw_norm, int agg, double smooth, double lse_lambda) {
             return rcar_cpu::ScanSettings{direction, raw_norm, agg, smooth, lse_lambda};
           }),
           py::arg("direction"), py::arg("raw_norm"), py::arg("agg"), py::arg("smooth"), py::arg("lse_lambda"))
      .def_readonly("direction", &rcar_cpu::ScanSettings::direction)
      .def_readonly("raw_norm", &rcar_cpu::ScanSettings::raw_norm)
      .def_readonly("agg", &rcar_cpu::ScanSettings::agg)
      .def_readonly("smooth", &rcar_cpu::ScanSettings::smooth)
      .def_readonly("lse_lambda", &rcar_cpu::ScanSettings::lse_lambda);
  py::class_<rcar_cpu::RcarSettings>(m, "RcarSettings", "an RCAR head's configuration as contract codes")
      .def(py::init([](int direction, int regulator, int64_t steps, double smooth, bool training, int64_t seed) {
             return rcar_cpu::RcarSettings{direction, regulator, steps, smooth, training, seed};
           }),
           py::arg("direction"), py::arg("regulator"), py::arg("steps"), py::arg("smooth"),
           py::arg("training") = false, py::arg("seed") = 0)
      .def_readonly("training", &rcar_cpu::RcarSettings::training)
      .def_readonly("seed", &rcar_cpu::RcarSettings::seed)
      .def_readonly("direction", &rcar_cpu::RcarSettings::direction)
      .def_readonly("regulator", &rcar_cpu::RcarSettings::regulator)
      .def_readonly("steps", &rcar_cpu::RcarSettings::steps)
      .def_readonly("smooth", &rcar_cpu::RcarSettings::smooth);
  py::class_<rcar_cpu::MaxSimSettings>(m, "MaxSimSettings", "an S-only head's options as contract codes")
      .def(py::init([](int direction, int pool, double tau, bool leaky, double both_scale) {
             return rcar_cpu::MaxSimSettings{direction, pool, tau, leaky, both_scale};
           }),
           py::arg("direction"), py::arg("pool"), py::arg("tau"), py::arg("leaky"), py::arg("both_scale"))
      .def_readonly("direction", &rcar_cpu::MaxSimSettings::direction)
      .def_readonly("pool", &rcar_cpu::MaxSimSettings::pool)
      .def_readonly("tau", &rcar_cpu::MaxSimSettings::tau)
      .def_readonly("leaky", &rcar_cpu::MaxSimSettings::leaky)
      .def_readonly("both_scale", &rcar_cpu::MaxSimSettings::both_scale);
  m.def("maxsim_forward_cpu", &rcar_cpu::maxsim_forward,
        "S-only head of all pairs (n_img, n_cap), fused per tile; into `out` when given", py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("img_lens"), py::arg("settings"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_backward_cpu", &rcar_cpu::maxsim_backward,
        "gradients [d img, d cap] of sum(grad * S-only head)", py::arg("grad"), py::arg("img"), py::arg("cap"),
        py::arg("lens"), py::arg("img_lens"), py::arg("settings"), py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_pairs_forward_cpu", &rcar_cpu::maxsim_pairs_forward,
        "S-only head of the pairs (img_idx[p], cap_idx[p]): (P,)", py::arg("img"), py::arg("cap"), py::arg("lens"),
        py::arg("img_lens"), py::arg("img_idx"), py::arg("cap_idx"), py::arg("settings"),
        py::call_guard<py::gil_scoped_release>());
  m.def("maxsim_pairs_backward_cpu", &rcar_cpu::maxsim_pairs_backward,
        "gradients [d img, d cap] of sum(grad * S-only head of the pairs)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("img_lens"), py::arg("img_idx"), py::arg("cap_idx"),
        py::arg("settings"), py::call_guard<py::gil_scoped_release>());
  m.def("gram_cpu", &rcar_cpu::gram, "per-image Gram matrix (n, R, d) -> (n, R, R)");
  m.def("scan_forward_cpu", &rcar_cpu::scan_forward,
        "SCAN similarity of all pairs (n_img, n_cap), fused per tile", py::arg("img"), py::arg("cap"),
        py::arg("lens"), py::arg("settings"), py::call_guard<py::gil_scoped_release>());
  m.def("scan_backward_cpu", &rcar_cpu::scan_backward,
        "gradients [d img, d cap] of sum(grad * SCAN similarity)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("settings"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_forward_cpu", &rcar_cpu::rcar_forward,
        "RCAR head over all pairs (n_img, n_cap); weights: flat list, see csrc/cpu/kernels.h",
        py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("settings"), py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_backward_cpu", &rcar_cpu::rcar_backward,
        "gradients [d img, d cap, d weights...] of sum(grad * RCAR head), weights as rcar_forward_cpu",
        py::arg("grad"), py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("settings"), py::arg("weights"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rcar_pairs_forward_cpu", &rcar_cpu::rcar_pairs_forward, "RCAR head of the pairs (img_idx[p], cap_idx[p]): (P,)",
        py::arg("img"), py::arg("cap"), py::arg("lens"), py::arg("img_idx"), py::arg("cap_idx"), py::arg("settings"),
        py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_pairs_backward_cpu", &rcar_cpu::rcar_pairs_backward,
        "gradients [d img, d cap, d weights...] of sum(grad * RCAR pair scores)", py::arg("grad"), py::arg("img"),
        py::arg("cap"), py::arg("lens"), py::arg("img_idx"), py::arg("cap_idx"), py::arg("settings"),
        py::arg("weights"), py::call_guard<py::gil_scoped_release>());
  m.def("rcar_dropout_scales_cpu", &rcar_cpu::rcar_dropout_scales,
        "RAR dropout scales (len(pairs), rows, channels) float64 (rcar_fast.dropout.rar_scales)", py::arg("seed"),
        py::arg("module"), py::arg("which"), py::arg("pairs"), py::arg("rows"), py::arg("channels"));
  m.def("set_cpu_poison_buffers", &rcar_cpu::set_poison_buffers,
        "tests: NaN-fill the RCAR kernels' tile buffers and outputs before use; returns the previous setting",
        py::arg("on"));
  m.def("set_cpu_simd_path", &rcar_cpu::set_simd_path,
        "select the compiled copy of the CPU kernels' vector loops: 'auto' | 'baseline' | 'avx2'; "
        "returns the copy that will run",
        py::arg("path"));
}
