// pybind11 bindings of the CUDA launchers (csrc/cuda/). Pointers and the stream arrive as
// integers from Python (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); 0 stands
// for a null pointer. The SCAN and RCAR launchers take their problem description as a typed
// object, ScanProblemCuda / MaxSimProblemCuda / RcarProblemCuda (the structs of
// csrc/cuda/kernels.h), built from keyword arguments by rcar_fast/ops/scan_cuda.py,
// maxsim_cuda.py and rcar_cuda.py.
#include "bindings.h"
#ifdef RCAR_FAST_WITH_CUDA
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/kernels.h"
#endif

namespace {

#ifdef RCAR_FAST_WITH_CUDA
namespace py = pybind11;

void check_cuda(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", rcar_cuda::error_string(code));
}

void* as_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A problem struct of csrc/cuda/kernels.h bound as a Python class: built from keyword
// arguments, one per field (device pointers as ints, 0 = null), every field required, each
// value converted to the field's C++ type; a missing, unknown or ill-typed field is an error
// naming it. The fields read back as attributes.
template <typename P>
class ProblemClass {
 public:
  ProblemClass(py::module& m, const char* name, const char* doc) : cls_(m, name, doc) {}

  template <typename T>
  ProblemClass& field(const char* name, T P::*member) {
    if constexpr (std::is_pointer_v<T>) {
      setters_.emplace_back(name, [member](P& p, py::handle v) { p.*member = reinterpret_cast<T>(v.cast<uintptr_t>()); });
      cls_.def_property_readonly(name, [member](const P& p) { return reinterpret_cast<uintptr_t>(p.*member); });
    } else {
      setters_.emplace_back(name, [member](P& p, py::handle v) { p.*member = v.cast<T>(); });
      cls_.def_readonly(name, member);
    }
    return *this;
  }

  // Adds the keyword constructor once every field is declared.
  void finish() {
    auto setters = setters_;
    const std::string type_name = py::str(cls_.attr("__name__"));
    cls_.def(py::init([setters, type_name](const py::kwargs& kwargs) {
      P p{};
      for (const auto& [name, set] : setters) {
        TORCH_CHECK(kwargs.contains(name.c_str()), type_name, ": the field '", name, "' is missing");
        try {
          set(p, kwargs[name.c_str()]);
        } catch (const py::cast_error&) {
          TORCH_CHECK(false, type_name, ": the field '", name, "' has the wrong type (",
                      std::string(py::str(py::type::of(kwargs[name.c_str()]).attr("__name__"))), ")");
        }
      }
      for (const auto& item : kwargs) {
        const std::string key = py::str(item.first);
        bool known = false;
        for (const auto& entry : setters) known = known || entry.first == key;
        TORCH_CHECK(known, type_name, ": unknown field '", key, "'");
      }
      return p;
    }));
  }

 private:
  py::class_<P> cls_;
  std::vector<std::pair<std::string, std::function<void(P&, py::handle)>>> setters_;
};

void register_problem_types(py::module& m) {
  using rcar_cuda::ScanProblem;
  ProblemClass<ScanProblem>(m, "ScanProblemCuda", "rcar_cuda::ScanProblem (csrc/cuda/kernels.h)")
      .field("img", &ScanProblem::img)
      .field("cap", &ScanProblem::cap)
      .field("dtype", &ScanProblem::dtype)
      .field("n_img", &ScanProblem::n_img)
      .field("R", &ScanProblem::R)
      .field("d", &ScanProblem::d)
      .field("n_cap", &ScanProblem::n_cap)
      .field("img_stride_n", &ScanProblem::img_stride_n)
      .field("img_stride_r", &ScanProblem::img_stride_r)
      .field("cap_stride_n", &ScanProblem::cap_stride_n)
      .field("cap_stride_w", &ScanProblem::cap_stride_w)
      .field("lens", &ScanProblem::lens)
      .field("word_off", &ScanProblem::word_off)
      .field("total_words", &ScanProblem::total_words)
      .field("max_len", &ScanProblem::max_len)
      .field("group_first", &ScanProblem::group_first)
      .field("n_groups", &ScanProblem::n_groups)
      .field("col_frags", &ScanProblem::col_frags)
      .field("gram", &ScanProblem::gram)
      .field("gram_off", &ScanProblem::gram_off)
      .field("query_sq", &ScanProblem::query_sq)
      .field("i2t", &ScanProblem::i2t)
      .field("raw_norm", &ScanProblem::raw_norm)
      .field("agg", &ScanProblem::agg)
      .field("smooth", &ScanProblem::smooth)
      .field("lse_lambda", &ScanProblem::lse_lambda)
      .finish();
  using rcar_cuda::MaxSimProblem;
  ProblemClass<MaxSimProblem>(m, "MaxSimProblemCuda", "rcar_cuda::MaxSimProblem (csrc/cuda/kernels.h)")
      .field("img", &MaxSimProblem::img)
      .field("cap", &MaxSimProblem::cap)
      .field("dtype", &MaxSimProblem::dtype)
      .field("n_img", &MaxSimProblem::n_img)
      .field("R", &MaxSimProblem::R)
      .field("d", &MaxSimProblem::d)
      .field("n_cap", &MaxSimProblem::n_cap)
      .field("img_stride_n", &MaxSimProblem::img_stride_n)
      .field("img_stride_r", &MaxSimProblem::img_stride_r)
      .field("cap_stride_n", &MaxSimProblem::cap_stride_n)
      .field("cap_stride_w", &MaxSimProblem::cap_stride_w)
      .field("img_lens", &MaxSimProblem::img_lens)
      .field("lens", &MaxSimProblem::lens)
      .field("word_off", &MaxSimProblem::word_off)
      .field("total_words", &MaxSimProblem::total_words)
      .field("max_len", &MaxSimProblem::max_len)
      .field("group_first", &MaxSimProblem::group_first)
      .field("n_groups", &MaxSimProblem::n_groups)
      .field("col_frags", &MaxSimProblem::col_frags)
      .field("direction", &MaxSimProblem::direction)
      .field("pool", &MaxSimProblem::pool)
      .field("leaky", &MaxSimProblem::leaky)
      .field("tau", &MaxSimProblem::tau)
      .field("both_scale", &MaxSimProblem::both_scale)
      .field("vsa", &MaxSimProblem::vsa)
      .field("vsa_tau", &MaxSimProblem::vsa_tau)
      .field("gram", &MaxSimProblem::gram)
      .field("gram_off", &MaxSimProblem::gram_off)
      .finish();
  using rcar_cuda::RcarProblem;
  ProblemClass<RcarProblem>(m, "RcarProblemCuda", "rcar_cuda::RcarProblem (csrc/cuda/kernels.h)")
      .field("img", &RcarProblem::img)
      .field("cap", &RcarProblem::cap)
      .field("n_img", &RcarProblem::n_img)
      .field("R", &RcarProblem::R)
      .field("d", &RcarProblem::d)
      .field("n_cap", &RcarProblem::n_cap)
      .field("img_stride_n", &RcarProblem::img_stride_n)
      .field("img_stride_r", &RcarProblem::img_stride_r)
      .field("cap_stride_n", &RcarProblem::cap_stride_n)
      .field("cap_stride_w", &RcarProblem::cap_stride_w)
      .field("lens", &RcarProblem::lens)
      .field("max_len", &RcarProblem::max_len)
      .field("sim_dim", &RcarProblem::sim_dim)
      .field("regulator", &RcarProblem::regulator)
      .field("steps", &RcarProblem::steps)
      .field("i2t", &RcarProblem::i2t)
      .field("smooth", &RcarProblem::smooth)
      .field("weights", &RcarProblem::weights)
      .field("workspace", &RcarProblem::workspace)
      .field("n_blocks", &RcarProblem::n_blocks)
      .finish();
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
      [](const rcar_cuda::ScanProblem& problem, uintptr_t sims, uintptr_t stream) {
        check_cuda(rcar_cuda::scan_forward(problem, static_cast<float*>(as_ptr(sims)),
                                           as_ptr(stream)),
                   "scan_forward_cuda");
      },
      py::arg("problem"), py::arg("sims"), py::arg("stream"),
      "SCAN all-pairs forward; problem: a ScanProblemCuda");
  m.def(
      "scan_backward_cuda",
      [](const rcar_cuda::ScanProblem& problem, uintptr_t grad_sims, uintptr_t d_scores, uintptr_t attn,
         uintptr_t attn_scaled, uintptr_t d_query_norm, uintptr_t stream) {
        check_cuda(rcar_cuda::scan_backward(
                       problem, static_cast<const float*>(as_ptr(grad_sims)),
                       static_cast<float*>(as_ptr(d_scores)), static_cast<float*>(as_ptr(attn)),
                       static_cast<float*>(as_ptr(attn_scaled)),
                       static_cast<float*>(as_ptr(d_query_norm)), as_ptr(stream)),
                   "scan_backward_cuda");
      },
      py::arg("problem"), py::arg("grad_sims"), py::arg("d_scores"), py::arg("attn"),
      py::arg("attn_scaled"), py::arg("d_query_norm"), py::arg("stream"),
      "SCAN all-pairs backward: per-pair dL/dS, attention weights and dL/d|q| (see kernels.h)");
}

// One clear error for a problem the maxsim kernels do not take, before anything is launched.
void check_maxsim_problem(const rcar_cuda::MaxSimProblem& p, const char* what) {
  const char* why = rcar_cuda::maxsim_problem_error(p);
  TORCH_CHECK(why == nullptr, what, ": ", why == nullptr ? "" : why, " (R=", p.R, ", longest caption ",
              p.max_len, ", d=", p.d, ", col_frags=", p.col_frags, ", tile rows ",
              rcar_cuda::scan_tile_rows(p.col_frags), ", tile columns ",
              rcar_cuda::scan_tile_cols(p.col_frags), ")");
}

void register_maxsim_ops(py::module& m) {
  m.def(
      "maxsim_problem_error",
      [](const rcar_cuda::MaxSimProblem& problem) -> py::object {
        const char* why = rcar_cuda::maxsim_problem_error(problem);
        return why == nullptr ? py::object(py::none()) : py::object(py::str(why));
      },
      py::arg("problem"), "None if the maxsim kernels take this MaxSimProblemCuda, else why not");
  m.def(
      "maxsim_forward_cuda",
      [](const rcar_cuda::MaxSimProblem& problem, uintptr_t sims, uintptr_t stream) {
        check_maxsim_problem(problem, "maxsim_forward_cuda");
        check_cuda(rcar_cuda::maxsim_forward(problem, static_cast<float*>(as_ptr(sims)),
                                             as_ptr(stream)),
                   "maxsim_forward_cuda");
      },
      py::arg("problem"), py::arg("sims"), py::arg("stream"),
      "S-only heads, all pairs, forward; problem: a MaxSimProblemCuda");
  m.def(
      "maxsim_backward_cuda",
      [](const rcar_cuda::MaxSimProblem& problem, uintptr_t grad_sims, uintptr_t t2i_coef,
         uintptr_t t2i_arg, uintptr_t i2t_coef, uintptr_t i2t_arg, uintptr_t d_img,
         uintptr_t d_cap_packed, uintptr_t stream) {
        check_maxsim_problem(problem, "maxsim_backward_cuda");
        check_cuda(rcar_cuda::maxsim_backward(
                       problem, static_cast<const float*>(as_ptr(grad_sims)),
                       static_cast<float*>(as_ptr(t2i_coef)), static_cast<int32_t*>(as_ptr(t2i_arg)),
                       static_cast<float*>(as_ptr(i2t_coef)), static_cast<int32_t*>(as_ptr(i2t_arg)),
                       static_cast<float*>(as_ptr(d_img)), static_cast<float*>(as_ptr(d_cap_packed)),
                       as_ptr(stream)),
                   "maxsim_backward_cuda");
      },
      py::arg("problem"), py::arg("grad_sims"), py::arg("t2i_coef"), py::arg("t2i_arg"),
      py::arg("i2t_coef"), py::arg("i2t_arg"), py::arg("d_img"), py::arg("d_cap_packed"),
      py::arg("stream"),
      "S-only heads backward: d img (written) and d cap packed (accumulated), see kernels.h");
  m.def(
      "maxsim_vsa_backward_cuda",
      [](const rcar_cuda::MaxSimProblem& problem, uintptr_t grad_sims, uintptr_t d_scores,
         uintptr_t attn, uintptr_t attn_scaled, uintptr_t stream) {
        check_maxsim_problem(problem, "maxsim_vsa_backward_cuda");
        check_cuda(rcar_cuda::maxsim_vsa_backward(
                       problem, static_cast<const float*>(as_ptr(grad_sims)),
                       static_cast<float*>(as_ptr(d_scores)), static_cast<float*>(as_ptr(attn)),
                       static_cast<float*>(as_ptr(attn_scaled)), as_ptr(stream)),
                   "maxsim_vsa_backward_cuda");
      },
      py::arg("problem"), py::arg("grad_sims"), py::arg("d_scores"), py::arg("attn"),
      py::arg("attn_scaled"), py::arg("stream"),
      "the VSA coding's backward: per-pair dL/dS, a and 2 dL/d|c|^2 a (see kernels.h)");
}

void register_rcar_ops(py::module& m) {
  m.def("rcar_workspace_floats", &rcar_cuda::rcar_workspace_floats, py::arg("max_queries"),
        py::arg("d"), py::arg("sim_dim"), "workspace floats per persistent block of rcar_forward_cuda");
  m.def(
      "rcar_forward_cuda",
      [](const rcar_cuda::RcarProblem& problem, uintptr_t sims, uintptr_t stream) {
        check_cuda(rcar_cuda::rcar_forward(problem, static_cast<float*>(as_ptr(sims)),
                                           as_ptr(stream)),
                   "rcar_forward_cuda");
      },
      py::arg("problem"), py::arg("sims"), py::arg("stream"),
      "RCAR head eval-mode forward; problem: an RcarProblemCuda");
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
  register_problem_types(m);
  register_ragged_ops(m);
  register_scan_ops(m);
  register_maxsim_ops(m);
  register_rcar_ops(m);
#else
  m.def("built_with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
  m.def("cuda_device_count", [] { return 0; }, "CUDA devices seen by the static runtime");
#endif
}
