// CPU kernels (C++ / OpenMP). These may use ATen: the CPU torch wheel ships its headers.
#pragma once
#include <ATen/ATen.h>

#include <optional>
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
  bool training = false;  // training mode: RAR's dropout (p = 0.4) acts, masks from `seed`
  int64_t seed = 0;       // the dropout masks' seed (>= 0), see rcar_fast/dropout.py
};

// An S-only head's options (HEADS.md), as the codes of rcar_fast.contract; built from the names
// by rcar_fast.ops.maxsim_cpu.native_settings.
struct MaxSimSettings {
  int direction;      // rcar_contract::HeadDirection: t2i, i2t, both
  int pool;           // rcar_contract::Pool: mean, sum, max, lse, softmax
  double tau;         // lse / softmax pooling temperature, > 0
  bool leaky;         // leaky(x) (slope kLeakySlope) on the maxima before pooling
  double both_scale;  // "both": both_scale * (t2i + i2t)
};

// The checks every pair kernel makes on its inputs; `op` names the kernel in the message.
inline void check_pair_inputs(const char* op, const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens) {
  TORCH_CHECK(img.dim() == 3 && cap.dim() == 3, op, ": img must be (n_img, R, d) and cap (n_cap, Lmax, d), got ",
              img.sizes(), " and ", cap.sizes());
  TORCH_CHECK(img.device().is_cpu() && cap.device().is_cpu() && lens.device().is_cpu(), op,
              ": img, cap and lens must be CPU tensors");
  TORCH_CHECK(img.scalar_type() == cap.scalar_type() &&
                  (img.scalar_type() == at::kFloat || img.scalar_type() == at::kDouble),
              op, ": img and cap must both be float32 or both float64, got ", img.scalar_type(), " and ",
              cap.scalar_type());
  TORCH_CHECK(img.size(2) == cap.size(2), op, ": img and cap must share d");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == cap.size(0), op, ": lens must be (n_cap,)");
}

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

// RCAR similarity head (official EncoderSimilarity; in training mode with RAR's counter-based
// dropout masks) over all pairs
// (rcar.cpp). weights: the head's Linear weights and biases as a flat list,
// in module order: alv modules (W, b); RCR modules (rcr_matrix_w.0, .2, rcr_smooth_w.0, .2, each
// W, b); RAR modules (rar_q_w.0, rar_k_w.0, rar_v_w.0, each W, b); sim_eval_w (W, b): the walk
// rcar_fast.contract.rcar_linears.
at::Tensor rcar_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                        const RcarSettings& settings, const std::vector<at::Tensor>& weights);

// Gradients of sum(grad * rcar_forward(...)) (grad (n_img, n_cap)): {d img, d cap, then one
// gradient per weight tensor in the same flat order}; d cap is zero at the padding. Recomputes
// the forward per tile (nothing kept between the calls); deterministic for a thread count.
std::vector<at::Tensor> rcar_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                      const at::Tensor& lens, const RcarSettings& settings,
                                      const std::vector<at::Tensor>& weights);

// The same head for the pairs (img_idx[p], cap_idx[p]) (int64, in range, repeats allowed): (P,),
// and the gradients of sum(grad * scores) (grad (P,)) as rcar_backward's; dropout masks as the
// all-pairs kernel's for each (image, caption).
at::Tensor rcar_pairs_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                              const at::Tensor& img_idx, const at::Tensor& cap_idx, const RcarSettings& settings,
                              const std::vector<at::Tensor>& weights);
std::vector<at::Tensor> rcar_pairs_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                            const at::Tensor& lens, const at::Tensor& img_idx,
                                            const at::Tensor& cap_idx, const RcarSettings& settings,
                                            const std::vector<at::Tensor>& weights);

// RAR's dropout scales (0 or 1/(1-p)), float64 (len(pairs), rows, channels), of module
// `module`, which 0 (rar_k_w, row = query row) or 1 (rar_q_w, row 0): the C++ side of
// rcar_fast.dropout.rar_scales, for the tests.
at::Tensor rcar_dropout_scales(int64_t seed, int64_t module, int64_t which, const at::Tensor& pairs,
                               int64_t rows, int64_t channels);

// Tests: NaN-fill the RCAR kernels' per-tile buffers and forward output before use (so a read
// before a write shows as NaN). Returns the previous setting.
bool set_poison_buffers(bool on);

// S-only head of all pairs (maxsim.cpp): img (n_img, R, d), cap (n_cap, Lmax, d), lens (n_cap,)
// in [1, Lmax], img_lens (n_img,) in [1, R]; padding (words >= lens[j], regions >= img_lens[i])
// is never read. float32 or float64 in, same dtype out (n_img, n_cap), written into `out` when
// given (contiguous, that shape and dtype).
at::Tensor maxsim_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                          const at::Tensor& img_lens, const MaxSimSettings& settings,
                          std::optional<at::Tensor> out);

// Gradients of sum(grad * maxsim_forward(...)): {d img, d cap}, zero at the padding; the same
// bits on every run.
std::vector<at::Tensor> maxsim_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                        const at::Tensor& lens, const at::Tensor& img_lens,
                                        const MaxSimSettings& settings);

// The same head for the pairs (img_idx[p], cap_idx[p]) (int64, in range): (P,), and its backward.
at::Tensor maxsim_pairs_forward(const at::Tensor& img, const at::Tensor& cap, const at::Tensor& lens,
                                const at::Tensor& img_lens, const at::Tensor& img_idx, const at::Tensor& cap_idx,
                                const MaxSimSettings& settings);
std::vector<at::Tensor> maxsim_pairs_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& cap,
                                              const at::Tensor& lens, const at::Tensor& img_lens,
                                              const at::Tensor& img_idx, const at::Tensor& cap_idx,
                                              const MaxSimSettings& settings);

// Selects the compiled copy of the vectorised loops: "auto" (AVX2+FMA when the CPU has it),
// "baseline" or "avx2" (falls back to baseline on a CPU without AVX2). Returns the copy that
// will run. For tests and benchmarks.
std::string set_simd_path(const std::string& path);

}  // namespace rcar_cpu
