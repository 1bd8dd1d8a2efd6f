// CPU kernels (C++ / OpenMP). These may use ATen: the CPU torch wheel ships its headers.
#pragma once
#include <torch/extension.h>

namespace rcar_cpu {

// Per-image Gram matrix: x (n, R, d) float32/float64 -> (n, R, R) in x's dtype.
at::Tensor gram(const at::Tensor& x);

}  // namespace rcar_cpu
