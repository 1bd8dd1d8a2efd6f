// What a CPU kernel unit (csrc/cpu/<kernel>.cpp) needs to bind itself: the registrar
// (bindings.h), torch's pybind11 casters for at::Tensor and the STL, and settings_class.
#pragma once
#include <torch/python.h>

#include <type_traits>

#include "bindings.h"

namespace rcar_cpu::bind {

namespace py = pybind11;

template <typename Member>
struct member_of;
template <typename S, typename T>
struct member_of<T S::*> {
  using type = T;
};

// Binds the aggregate S as the Python class `name`: its constructor takes the fields Members
// (every field of S, in declaration order) under the keyword names (and defaults) of `args`,
// and each field reads back as a read-only attribute of that name.
template <typename S, auto... Members, typename... Args>
void settings_class(py::module_& m, const char* name, const char* doc, const Args&... args) {
  static_assert(sizeof...(Members) == sizeof...(Args), "one py::arg per field");
  py::class_<S> cls(m, name, doc);
  cls.def(py::init([](typename member_of<decltype(Members)>::type... fields) { return S{fields...}; }), args...);
  (cls.def_readonly(args.name, Members), ...);
}

}  // namespace rcar_cpu::bind
