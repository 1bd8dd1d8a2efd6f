// CPU kernels (C++ / OpenMP). These may use ATen: the CPU torch wheel ships its headers.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "contract.h"

namespace rcar_cpu {

// A SCAN problem's options, as the codes of rcar_fast.contract (csrc/contract.h); built from the
// option names by rcar_fast.ops.scan_cpu.native_settings.
struct ScanSettings {
  int direction;    // rcar_contract::Direction
  int raw_norm;     // rcar_contract::RawNorm
  int agg;          // rcar_contract::Aggregation
  double smooth;    // the attention softmax temperature, > 0
  double lse_lambda;  // lse aggregation temperature, > 0
};

// An RCAR head's configuration (rcar_fast.ops.rcar_cpu.native_settings).
struct RcarSettings {
  int direction;    // rcar_contract::Direction
  int regulator;    // rcar_contract::Regulator
  int64_t steps;    // the official rar_step / rcr_step / rcar_step
  double smooth;    // the first attention's softmax temperature, > 0
};

// Per-image Gram matrix: x (n, R, d) float32/float64 -> (n, R, R) in x's dtype.
at::Tensor gram(const at::Tensor& x);

// SCAN similarity of all pairs (scan.cpp): img (n_img, R, d), cap (n_cap, Lmax, d) with
// positions >= lens[j] never read, lens (n_cap,) int64 in [1, Lmax]; float32 or float64 in,
// same dtype out, (n_img, n_cap). Options as in SIMILARITY.md.
at::Tensor scan_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const ScanSettings& settings);

// Gradients of sum(grad * scan_forward(...)) w.r.t. img and cap: {d img, d cap}; d cap is zero
// at the padding.
std::vector<at::Tensor> scan_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                      const at::Tensor& lens, const ScanSettings& settings);

// RCAR similarity head (official EncoderSimilarity, eval mode: no dropout) over all pairs
// (rcar.cpp). weights: the head's Linear weights and biases as a flat list,
// in module order: alv modules (W, b); RCR modules (rcr_matrix_w.0, .2, rcr_smooth_w.0, .2, each
// W, b); RAR modules (rar_q_w.0, rar_k_w.0, rar_v_w.0, each W, b); sim_eval_w (W, b): the walk
// rcar_fast.contract.rcar_linears.
at::Tensor rcar_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const RcarSettings& settings, const std::vector<at::Tensor>& weights);

// Selects the compiled copy of the vectorised loops: "auto" (AVX2+FMA when the CPU has it),
// "baseline" or "avx2" (falls back to baseline on a CPU without AVX2). Returns the copy that
// will run. For tests and benchmarks.
std::string set_simd_path(const std::string& path);

}  // namespace rcar_cpu
