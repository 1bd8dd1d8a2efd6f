// The registrar of rcar_fast._C: every kernel unit binds its own Python entries.
//
// A kernel file ends with
//     RCAR_FAST_BINDINGS(cpu_scan, m) { m.def("scan_forward_cpu", ...); }
// which defines the body as a function and adds it, under its name, to a list at load time
// (a static initialiser of that object file). PYBIND11_MODULE (bindings.cpp) then runs the
// list sorted by name, so the module's contents do not depend on link order. Nothing shared is
// edited for a new kernel: its unit registers itself.
//
// Torch-free (pybind11 only): the CUDA units include it too, from their host-only binding
// block (see csrc/cuda/bind.h).
#pragma once
#include <pybind11/pybind11.h>

namespace rcar_bindings {

using RegisterFn = void (*)(pybind11::module_& m);

// Adds fn to the list PYBIND11_MODULE runs; returns true (the value of a static initialiser).
bool add_registration(const char* name, RegisterFn fn);

// Runs every registered fn on m in name order; two units under one name are an ImportError.
void run_registrations(pybind11::module_& m);

}  // namespace rcar_bindings

// RCAR_FAST_BINDINGS(name, m) { ... }: the binding body of one unit (name: a C identifier,
// unique in the module, e.g. cpu_scan / cuda_scan), run with the module as `m`.
#define RCAR_FAST_BINDINGS(name, m)                                                              \
  static void rcar_fast_bind_##name(pybind11::module_& m);                                       \
  [[maybe_unused]] static const bool rcar_fast_bound_##name =                                    \
      rcar_bindings::add_registration(#name, &rcar_fast_bind_##name);                            \
  static void rcar_fast_bind_##name(pybind11::module_& m)
