// What a CUDA kernel unit (csrc/cuda/<kernel>.cu) needs to bind its launchers: the registrar
// (bindings.h), errors, ProblemClass (a problem struct as a keyword-built Python class) and
// bind_launcher (a launcher as a Python function over integer pointers).
//
// Host only, and torch-free (pybind11 and Python headers, from the torch installation's
// include folder so that every unit of the module sees the same pybind11): a .cu includes it
// inside its binding block, guarded by `#ifndef __CUDA_ARCH__`, so the device passes never
// see it and the device code is the same as without the bindings. Pointers and the stream
// arrive as integers from Python (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream);
// 0 stands for a null pointer.
#pragma once
#ifdef __CUDA_ARCH__
#error "csrc/cuda/bind.h is host code: include it under #ifndef __CUDA_ARCH__"
#endif
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bindings.h"

namespace rcar_cuda::bind {

namespace py = pybind11;

// A RuntimeError in Python whose message is the parts, streamed.
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

inline void check_cuda(int code, const char* what) {
  if (code != 0) fail(what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(code)));
}

// A problem struct bound as a Python class: built from keyword arguments, one per field
// (device pointers as ints, 0 = null), every field required, each value converted to the
// field's C++ type; a missing, unknown or ill-typed field is an error naming it. The fields
// read back as attributes.
template <typename P>
class ProblemClass {
 public:
  ProblemClass(py::module_& m, const char* name, const char* doc) : cls_(m, name, doc) {}

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

  // fields("a", &P::a, "b", &P::b, ...): field() for each (name, member) pair, in order.
  template <typename T, typename... Rest>
  ProblemClass& fields(const char* name, T P::*member, const Rest&... rest) {
    field(name, member);
    if constexpr (sizeof...(Rest) > 0) fields(rest...);
    return *this;
  }

  // Adds the keyword constructor once every field is declared.
  void finish() {
    auto setters = setters_;
    const std::string type_name = py::str(cls_.attr("__name__"));
    cls_.def(py::init([setters, type_name](const py::kwargs& kwargs) {
      P p{};
      for (const auto& [name, set] : setters) {
        if (!kwargs.contains(name.c_str())) fail(type_name, ": the field '", name, "' is missing");
        try {
          set(p, kwargs[name.c_str()]);
        } catch (const py::cast_error&) {
          fail(type_name, ": the field '", name, "' has the wrong type (",
               std::string(py::str(py::type::of(kwargs[name.c_str()]).attr("__name__"))), ")");
        }
      }
      for (const auto& item : kwargs) {
        const std::string key = py::str(item.first);
        bool known = false;
        for (const auto& entry : setters) known = known || entry.first == key;
        if (!known) fail(type_name, ": unknown field '", key, "'");
      }
      return p;
    }));
  }

 private:
  py::class_<P> cls_;
  std::vector<std::pair<std::string, std::function<void(P&, py::handle)>>> setters_;
};

// The fields every problem on the shared tile (csrc/cuda/tile.cuh) has, under the same names:
// the operands, the packed captions and their groups (ScanProblem, MaxSimProblem).
template <typename P>
ProblemClass<P>& tile_fields(ProblemClass<P>& cls) {
  return cls.fields("img", &P::img, "cap", &P::cap, "dtype", &P::dtype, "n_img", &P::n_img, "R", &P::R, "d", &P::d)
      .fields("n_cap", &P::n_cap, "img_stride_n", &P::img_stride_n, "img_stride_r", &P::img_stride_r,
              "cap_stride_n", &P::cap_stride_n, "cap_stride_w", &P::cap_stride_w, "lens", &P::lens)
      .fields("word_off", &P::word_off, "total_words", &P::total_words, "max_len", &P::max_len,
              "group_first", &P::group_first, "n_groups", &P::n_groups, "col_frags", &P::col_frags);
}

// A launcher's parameter as Python passes it: a pointer as an integer, anything else as is.
template <typename T>
using py_param_t = std::conditional_t<std::is_pointer_v<T>, uintptr_t, T>;

template <typename T>
T from_py(py_param_t<T> value) {
  if constexpr (std::is_pointer_v<T>)
    return reinterpret_cast<T>(value);
  else
    return value;
}

// (bind_launcher's body: Params deduced from the launcher's type.)
template <auto Launcher, auto Check, typename... Params, typename... Extra>
void def_launcher(py::module_& m, const char* name, int (*)(Params...), const Extra&... extra) {
  m.def(
      name,
      [name](py_param_t<Params>... args) {
        if constexpr (!std::is_same_v<decltype(Check), std::nullptr_t>)
          Check(std::get<0>(std::forward_as_tuple(args...)), name);
        check_cuda(Launcher(from_py<Params>(args)...), name);
      },
      extra...);
}

// Binds the launcher (int launcher(...): 0 or a cudaError_t) as the Python function `name`,
// its pointer parameters taken as integers; a launch error is a RuntimeError naming `name`.
// Check, when given, is called as Check(first argument, name) before the launch (to raise a
// clear error for a problem the launcher would refuse). extra: py::arg names and the
// docstring, as for pybind11's def.
template <auto Launcher, auto Check = nullptr, typename... Extra>
void bind_launcher(py::module_& m, const char* name, const Extra&... extra) {
  def_launcher<Launcher, Check>(m, name, Launcher, extra...);
}

}  // namespace rcar_cuda::bind
