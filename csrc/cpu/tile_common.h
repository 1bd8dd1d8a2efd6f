// Shared plumbing of the fused CPU kernels (scan.cpp, rcar.cpp): per-tile GEMMs through ATen
// (MKL / OpenBLAS inside torch), a thread team over tiles, packed caption words.
//
// Threading model: one OpenMP team works through independent tiles; every GEMM of a tile runs
// on the calling thread. ATen and MKL see that they are inside a parallel region and stay
// single-threaded, so there is no oversubscription, and each thread's tile buffers stay in its
// own cache.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "contract.h"

// The pair reductions are compiled twice: for the baseline ISA the extension is built with,
// and for AVX2+FMA, chosen at run time. The bodies are always_inline templates so that each
// wrapper gets its own vectorised copy.
#define RCAR_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define RCAR_HAVE_AVX2_CLONE 1
#define RCAR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define RCAR_HAVE_AVX2_CLONE 0
#define RCAR_TARGET_AVX2
#endif

namespace rcar_cpu::detail {

// A lambda whose body is pasted into its caller, for in_simd_copy.
#define RCAR_INLINE_LAMBDA __attribute__((always_inline))

template <typename F>
__attribute__((noinline)) RCAR_TARGET_AVX2 void run_avx2_copy(F& f) {
  f();
}

template <typename F>
__attribute__((noinline)) void run_baseline_copy(F& f) {
  f();
}

// Runs f() in its copy compiled for AVX2+FMA (avx2) or in its baseline copy. f is a
// RCAR_INLINE_LAMBDA over always_inline bodies: each of the two wrappers above gets its own
// vectorised copy of the whole body, one pair per lambda.
template <typename F>
void in_simd_copy(bool avx2, F&& f) {
  if (avx2) run_avx2_copy(f);
  else run_baseline_copy(f);
}

using rcar_contract::kEps;
using rcar_contract::kLeakySlope;

inline bool cpu_has_avx2_fma() {
#if RCAR_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Which compiled copy of the pair reductions runs: -1 automatic (AVX2+FMA when the CPU has
// it), 0 the baseline copy, 1 AVX2. Tests force the baseline copy to cover it on AVX2 machines.
inline std::atomic<int>& simd_path_override() {
  static std::atomic<int> path{-1};
  return path;
}

inline bool use_avx2_path() {
  const int forced = simd_path_override().load();
  return forced < 0 ? cpu_has_avx2_fma() : (forced == 1 && cpu_has_avx2_fma());
}

// A positive softmax temperature in the compute type. One above T's range would round to +inf,
// and inf * 0 (the max-shifted top logit) is NaN; the largest finite T gives the same hard
// (one-hot) softmax that the float64 reference gives for such a temperature.
template <typename T>
T temperature_in(double value) {
  return T(std::min(value, double(std::numeric_limits<T>::max())));
}

template <typename T>
at::ScalarType scalar_type_of() {
  return c10::CppTypeToScalarType<T>::value;
}

// A (rows x cols) row-major matrix with leading dimension ld, viewed as a tensor (no copy).
template <typename T>
at::Tensor view2d(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(scalar_type_of<T>()));
}

// out (m x n) = [out +] a @ b, for a (m x k) and b (k x n) views (possibly transposed). Runs
// single-threaded when called inside the tile team. Tensors are handles: `out` aliases the
// caller's buffer.
inline void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// out = bias + a @ w^T for an nn.Linear weight w (out_features x in_features).
inline void linear_into(at::Tensor out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
  at::addmm_out(out, bias, a, w.t());
}

// Runs body(task, thread) for task in [0, n) on a team of at::get_num_threads() threads,
// dynamically scheduled (tiles are ragged and the machine may be shared). The first exception
// thrown by any task is rethrown on the caller's thread once the team has finished.
template <typename Body>
void run_tasks(int64_t n, Body&& body) {
  if (n <= 0) return;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
  if (threads == 1) {
    // No team for one task: opening a parallel region costs more than a small tile.
    c10::InferenceMode inference_guard;
    for (int64_t task = 0; task < n; ++task) body(task, 0);
    return;
  }
  std::exception_ptr failure;
  std::mutex failure_mutex;
#pragma omp parallel num_threads(threads)
  {
    // No autograd bookkeeping for the tile views and GEMMs.
    c10::InferenceMode inference_guard;
    const int thread = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n; ++task) {
      bool skip;
      {
        std::lock_guard<std::mutex> lock(failure_mutex);
        skip = failure != nullptr;
      }
      if (skip) continue;
      try {
        body(task, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

inline int team_size(int64_t tasks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
}

// Caption words without their padding: row offsets[j] .. offsets[j+1] of `words` are caption
// j's lens[j] real words. Padding is never read.
template <typename T>
struct PackedWords {
  at::Tensor words;              // (total_words, d), contiguous
  std::vector<int64_t> offsets;  // n_cap + 1
  int64_t max_len = 0;
};

template <typename T>
PackedWords<T> pack_words(const at::Tensor& cap, const at::Tensor& lens) {
  const int64_t n_cap = cap.size(0), d = cap.size(2);
  const at::Tensor lens64 = lens.to(at::kLong).contiguous();
  const int64_t* lp = lens64.data_ptr<int64_t>();
  PackedWords<T> packed;
  packed.offsets.resize(n_cap + 1, 0);
  for (int64_t j = 0; j < n_cap; ++j) {
    packed.offsets[j + 1] = packed.offsets[j] + lp[j];
    packed.max_len = std::max(packed.max_len, lp[j]);
  }
  packed.words = at::empty({packed.offsets[n_cap], d}, cap.options());
  const T* src = cap.data_ptr<T>();
  T* dst = packed.words.template data_ptr<T>();
  const int64_t s0 = cap.stride(0), s1 = cap.stride(1);
  const auto& off = packed.offsets;
  at::parallel_for(0, n_cap, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t w = 0; w < lp[j]; ++w)
        std::memcpy(dst + (off[j] + w) * d, src + j * s0 + w * s1, sizeof(T) * d);
  });
  return packed;
}

// Scatters packed per-word rows back to (n_cap, Lmax, d), zeros at the padding.
template <typename T>
at::Tensor unpack_words(const at::Tensor& packed, const std::vector<int64_t>& offsets,
                        int64_t n_cap, int64_t max_len) {
  const int64_t d = packed.size(1);
  at::Tensor out = at::zeros({n_cap, max_len, d}, packed.options());
  const T* src = packed.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, n_cap, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      std::memcpy(dst + j * max_len * d, src + offsets[j] * d,
                  sizeof(T) * d * (offsets[j + 1] - offsets[j]));
  });
  return out;
}

// Contiguous block boundaries [b[t], b[t+1]) over n items, each block at most `target` in
// total weight (a single heavier item gets a block of its own).
inline std::vector<int64_t> weighted_blocks(const std::vector<int64_t>& prefix_weight, int64_t target) {
  const int64_t n = static_cast<int64_t>(prefix_weight.size()) - 1;
  std::vector<int64_t> bounds{0};
  int64_t start = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (j > start && prefix_weight[j + 1] - prefix_weight[start] > target) {
      bounds.push_back(j);
      start = j;
    }
  }
  if (n > 0) bounds.push_back(n);
  return bounds;
}

// Turns for adding into shared sums: image block ib takes the contributions of caption blocks
// 0, 1, 2, ... in that order, whichever threads compute them, so the floating-point sums (and
// the gradients) are the same bits on every run. A thread that finishes a tile early waits for
// the caption block before it; caption blocks are handed out in increasing order, so the one
// being waited for is always running. If a task fails, `abandon` wakes every waiter.
class OrderedTurns {
 public:
  explicit OrderedTurns(int64_t n_slots) : locks_(n_slots), changed_(n_slots), next_(n_slots, 0) {}

  // Blocks until it is caption block cb's turn at `slot`; false if the run was abandoned.
  bool wait(int64_t slot, int64_t cb, std::unique_lock<std::mutex>& lock) {
    lock = std::unique_lock<std::mutex>(locks_[slot]);
    changed_[slot].wait(lock, [&] { return next_[slot] == cb || abandoned_.load(); });
    return !abandoned_.load();
  }

  void pass(int64_t slot, std::unique_lock<std::mutex>& lock) {
    ++next_[slot];
    lock.unlock();
    changed_[slot].notify_all();
  }

  void abandon() {
    abandoned_.store(true);
    for (size_t slot = 0; slot < locks_.size(); ++slot) {
      { std::lock_guard<std::mutex> guard(locks_[slot]); }
      changed_[slot].notify_all();
    }
  }

 private:
  std::vector<std::mutex> locks_;
  std::vector<std::condition_variable> changed_;
  std::vector<int64_t> next_;
  std::atomic<bool> abandoned_{false};
};

// Runs body(cb, ib, scratch) for every tile (caption block cb x image block ib) on a thread team,
// image blocks varying fastest so that consecutive tasks share a caption block's words; each
// thread builds its scratch once, with make_scratch().
template <typename Scratch, typename MakeScratch, typename Body>
void for_each_tile(int64_t n_cap_blocks, int64_t n_img_blocks, MakeScratch&& make_scratch, Body&& body) {
  const int64_t n_tiles = n_cap_blocks * n_img_blocks;
  std::vector<std::unique_ptr<Scratch>> scratch(team_size(n_tiles));
  run_tasks(n_tiles, [&](int64_t task, int thread) {
    if (!scratch[thread]) scratch[thread] = make_scratch();
    body(task / n_img_blocks, task % n_img_blocks, *scratch[thread]);
  });
}

// Runs body(cb, scratch) for caption blocks cb = 0 .. n_blocks-1 on a thread team, handing the
// blocks out from one counter in increasing order (what OrderedTurns relies on); each thread
// builds its scratch once, with make_scratch(). A failing block abandons `turns`, so that no
// thread waits for a turn that will never come, and the error reaches the caller.
template <typename Scratch, typename MakeScratch, typename Body>
void for_caption_blocks_in_order(int64_t n_blocks, OrderedTurns& turns, MakeScratch&& make_scratch,
                                 Body&& body) {
  const int team = team_size(n_blocks);
  std::vector<std::unique_ptr<Scratch>> scratch(team);
  std::atomic<int64_t> next_block{0};
  run_tasks(team, [&](int64_t, int thread) {
    if (!scratch[thread]) scratch[thread] = make_scratch();
    try {
      for (int64_t cb = next_block++; cb < n_blocks; cb = next_block++) body(cb, *scratch[thread]);
    } catch (...) {
      turns.abandon();
      throw;
    }
  });
}

// True if any g[i * ld + j], i in [i0, i1), j in [j0, j1), is nonzero: a backward skips a tile
// whose pairs all have zero upstream gradient (their recompute would add exactly nothing).
template <typename T>
bool block_has_nonzero(const T* g, int64_t ld, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j)
      if (g[i * ld + j] != T(0)) return true;
  return false;
}

}  // namespace rcar_cpu::detail

namespace rcar_cpu {

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

// A pair list's index tensor `name` (img_idx / cap_idx): int64 CPU (n_pairs,) with values in
// [0, n); `op` names the kernel in the message.
inline void check_pair_index(const char* op, const at::Tensor& idx, const char* name, int64_t n_pairs, int64_t n) {
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n_pairs && idx.scalar_type() == at::kLong && idx.device().is_cpu(), op,
              ": ", name, " must be an int64 CPU tensor of shape (", n_pairs, ",), got ", idx.sizes(), " ",
              idx.scalar_type(), " on ", idx.device());
  if (n_pairs == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, op, ": ", name, " must lie in [0, ", n, "), got values in [", lo, ", ", hi, "]");
}

}  // namespace rcar_cpu
