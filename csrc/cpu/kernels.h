// CPU kernels (C++ / OpenMP). These may use ATen: the CPU torch wheel ships its headers.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace rcar_cpu {

// Per-image Gram matrix: x (n, R, d) float32/float64 -> (n, R, R) in x's dtype.
at::Tensor gram(const at::Tensor& x);

// SCAN similarity of all pairs (scan.cpp): img (n_img, R, d), cap (n_cap, Lmax, d) with
// positions >= lens[j] never read, lens (n_cap,) int64 in [1, Lmax]; float32 or float64 in,
// same dtype out, (n_img, n_cap). Options as in SIMILARITY.md.
at::Tensor scan_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const std::string& direction, const std::string& raw_norm, double smooth,
                        const std::string& agg, double lse_lambda);

// Gradients of sum(grad * scan_forward(...)) w.r.t. img and cap: {d img, d cap}; d cap is zero
// at the padding.
std::vector<at::Tensor> scan_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                      const at::Tensor& lens, const std::string& direction,
                                      const std::string& raw_norm, double smooth, const std::string& agg,
                                      double lse_lambda);

// RCAR similarity head (official EncoderSimilarity, eval mode: no dropout) over all pairs
// (rcar.cpp). regulator "only_rar" | "only_rcr" | "coop_rcar", steps as the official
// rar_step / rcr_step / rcar_step. weights: the head's Linear weights and biases as a flat list,
// in module order: alv modules (W, b); RCR modules (rcr_matrix_w.0, .2, rcr_smooth_w.0, .2, each
// W, b); RAR modules (rar_q_w.0, rar_k_w.0, rar_v_w.0, each W, b); sim_eval_w (W, b).
at::Tensor rcar_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const std::string& direction, const std::string& regulator, int64_t steps, double smooth,
                        const std::vector<at::Tensor>& weights);

// Selects the compiled copy of the vectorised loops: "auto" (AVX2+FMA when the CPU has it),
// "baseline" or "avx2" (falls back to baseline on a CPU without AVX2). Returns the copy that
// will run. For tests and benchmarks.
std::string set_simd_path(const std::string& path);

}  // namespace rcar_cpu
