// Each binding file registers its functions on the module; bindings.cpp defines the module.
#pragma once
#include <torch/extension.h>

void register_cpu_bindings(pybind11::module& m);
void register_cuda_bindings(pybind11::module& m);  // registers nothing without CUDA
