// pybind11 bindings of the CUDA launchers (csrc/cuda/). Pointers and the stream arrive as
// integers from Python (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); 0 stands
// for a null pointer. The SCAN and RCAR launchers take their problem description as a dict
// whose keys are the field names of rcar_cuda::ScanProblem / RcarProblem (csrc/cuda/kernels.h),
// built by rcar_fast/ops/scan_cuda.py and rcar_cuda.py.
#include "bindings.h"
#ifdef RCAR_FAST_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace {

#ifdef RCAR_FAST_WITH_CUDA
namespace py = pybind11;

void check_cuda(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", rcar_cuda::error_string(code));
}

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A required entry of a problem dict, with a message naming the missing key.
template <typename T>
T field(const py::dict& d, const char* key) {
  TORCH_CHECK(d.contains(key), "CUDA problem description lacks the field '", key, "'");
  return d[key].cast<T>();
}

template <typename T>
T* pointer_field(const py::dict& d, const char* key) {
  return reinterpret_cast<T*>(field<uintptr_t>(d, key));
}

rcar_cuda::ScanProblem scan_problem(const py::dict& d) {
  rcar_cuda::ScanProblem p{};
  p.img = pointer_field<const void>(d, "img");
  p.cap = pointer_field<const void>(d, "cap");
  p.dtype = field<int>(d, "dtype");
  p.n_img = field<int64_t>(d, "n_img");
  p.R = field<int64_t>(d, "R");
  p.d = field<int64_t>(d, "d");
  p.n_cap = field<int64_t>(d, "n_cap");
  p.img_stride_n = field<int64_t>(d, "img_stride_n");
  p.img_stride_r = field<int64_t>(d, "img_stride_r");
  p.cap_stride_n = field<int64_t>(d, "cap_stride_n");
  p.cap_stride_w = field<int64_t>(d, "cap_stride_w");
  p.lens = pointer_field<const int64_t>(d, "lens");
  p.word_off = pointer_field<const int64_t>(d, "word_off");
  p.total_words = field<int64_t>(d, "total_words");
  p.max_len = field<int64_t>(d, "max_len");
  p.group_first = pointer_field<const int32_t>(d, "group_first");
  p.n_groups = field<int64_t>(d, "n_groups");
  p.col_frags = field<int>(d, "col_frags");
  p.gram = pointer_field<const float>(d, "gram");
  p.gram_off = pointer_field<const int64_t>(d, "gram_off");
  p.query_sq = pointer_field<const float>(d, "query_sq");
  p.i2t = field<int>(d, "i2t");
  p.raw_norm = field<int>(d, "raw_norm");
  p.agg = field<int>(d, "agg");
  p.smooth = field<float>(d, "smooth");
  p.lse_lambda = field<float>(d, "lse_lambda");
  return p;
}

rcar_cuda::RcarProblem rcar_problem(const py::dict& d) {
  rcar_cuda::RcarProblem p{};
  p.img = pointer_field<const float>(d, "img");
  p.cap = pointer_field<const float>(d, "cap");
  p.n_img = field<int64_t>(d, "n_img");
  p.R = field<int64_t>(d, "R");
  p.d = field<int64_t>(d, "d");
  p.n_cap = field<int64_t>(d, "n_cap");
  p.img_stride_n = field<int64_t>(d, "img_stride_n");
  p.img_stride_r = field<int64_t>(d, "img_stride_r");
  p.cap_stride_n = field<int64_t>(d, "cap_stride_n");
  p.cap_stride_w = field<int64_t>(d, "cap_stride_w");
  p.lens = pointer_field<const int64_t>(d, "lens");
  p.max_len = field<int64_t>(d, "max_len");
  p.sim_dim = field<int64_t>(d, "sim_dim");
  p.regulator = field<int>(d, "regulator");
  p.steps = field<int>(d, "steps");
  p.i2t = field<int>(d, "i2t");
  p.smooth = field<float>(d, "smooth");
  p.weights = pointer_field<const float* const>(d, "weights");
  p.workspace = pointer_field<float>(d, "workspace");
  p.n_blocks = field<int64_t>(d, "n_blocks");
  return p;
}

void register_ragged_ops(py::module& m) {
  m.def(
      "gram_ragged_cuda",
      [](uintptr_t x, uintptr_t lens, uintptr_t out_off, uintptr_t out, int64_t n, int64_t R,
         int64_t d, int64_t stride_n, int64_t stride_r, int dtype, uintptr_t stream) {
        check_cuda(rcar_cuda::gram_ragged(as_ptr(x), static_cast<const int64_t*>(as_ptr(lens)),
                                          static_cast<const int64_t*>(as_ptr(out_off)),
                                          static_cast<float*>(as_ptr(out)), n, R, d, stride_n,
                                          stride_r, dtype, as_ptr(stream)),
                   "gram_ragged_cuda");
      },
      "Gram matrices of ragged row sets (lens / out_off may be 0 = all R rows / n*R*R layout)");
  m.def(
      "row_sqnorms_cuda",
      [](uintptr_t x, uintptr_t lens, uintptr_t out_off, uintptr_t out, int64_t n, int64_t R,
         int64_t d, int64_t stride_n, int64_t stride_r, int dtype, uintptr_t stream) {
        check_cuda(rcar_cuda::row_sqnorms(as_ptr(x), static_cast<const int64_t*>(as_ptr(lens)),
                                          static_cast<const int64_t*>(as_ptr(out_off)),
                                          static_cast<float*>(as_ptr(out)), n, R, d, stride_n,
                                          stride_r, dtype, as_ptr(stream)),
                   "row_sqnorms_cuda");
      },
      "squared row norms of ragged row sets, packed (lens / out_off may be 0)");
}

void register_scan_ops(py::module& m) {
  m.def("scan_tile_rows", &rcar_cuda::scan_tile_rows, "region rows of a SCAN tile for col_frags");
  m.def("scan_tile_cols", &rcar_cuda::scan_tile_cols, "word columns of a SCAN tile for col_frags");
  m.def(
      "scan_forward_cuda",
      [](const py::dict& problem, uintptr_t sims, uintptr_t stream) {
        check_cuda(rcar_cuda::scan_forward(scan_problem(problem), static_cast<float*>(as_ptr(sims)),
                                           as_ptr(stream)),
                   "scan_forward_cuda");
      },
      py::arg("problem"), py::arg("sims"), py::arg("stream"),
      "SCAN all-pairs forward; problem: dict of ScanProblem fields (pointers as ints)");
  m.def(
      "scan_backward_cuda",
      [](const py::dict& problem, uintptr_t grad_sims, uintptr_t d_scores, uintptr_t attn,
         uintptr_t attn_scaled, uintptr_t d_query_norm, uintptr_t stream) {
        check_cuda(rcar_cuda::scan_backward(
                       scan_problem(problem), static_cast<const float*>(as_ptr(grad_sims)),
                       static_cast<float*>(as_ptr(d_scores)), static_cast<float*>(as_ptr(attn)),
                       static_cast<float*>(as_ptr(attn_scaled)),
                       static_cast<float*>(as_ptr(d_query_norm)), as_ptr(stream)),
                   "scan_backward_cuda");
      },
      py::arg("problem"), py::arg("grad_sims"), py::arg("d_scores"), py::arg("attn"),
      py::arg("attn_scaled"), py::arg("d_query_norm"), py::arg("stream"),
      "SCAN all-pairs backward: per-pair dL/dS, attention weights and dL/d|q| (see kernels.h)");
}

void register_rcar_ops(py::module& m) {
  m.def("rcar_workspace_floats", &rcar_cuda::rcar_workspace_floats, py::arg("max_queries"),
        py::arg("d"), py::arg("sim_dim"), "workspace floats per persistent block of rcar_forward_cuda");
  m.def(
      "rcar_forward_cuda",
      [](const py::dict& problem, uintptr_t sims, uintptr_t stream) {
        check_cuda(rcar_cuda::rcar_forward(rcar_problem(problem), static_cast<float*>(as_ptr(sims)),
                                           as_ptr(stream)),
                   "rcar_forward_cuda");
      },
      py::arg("problem"), py::arg("sims"), py::arg("stream"),
      "RCAR head eval-mode forward; problem: dict of RcarProblem fields (pointers as ints)");
}
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
  register_ragged_ops(m);
  register_scan_ops(m);
  register_rcar_ops(m);
#else
  m.def("built_with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
  m.def("cuda_device_count", [] { return 0; }, "CUDA devices seen by the static runtime");
#endif
}
