// Per-image Gram matrix G = X X^T on the CPU, OpenMP over images. Only the upper triangle is
// computed; the lower one is mirrored.
#include "cpu/bind.h"

namespace rcar_cpu {
namespace {

template <typename T>
void gram_one_image(const T* x, T* g, int64_t R, int64_t d, int64_t stride_r) {
  for (int64_t a = 0; a < R; ++a) {
    const T* xa = x + a * stride_r;
    for (int64_t b = a; b < R; ++b) {
      const T* xb = x + b * stride_r;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < d; ++k) acc += xa[k] * xb[k];
      g[a * R + b] = acc;
      g[b * R + a] = acc;
    }
  }
}

// OpenMP pragmas cannot sit inside AT_DISPATCH's macro argument, hence this template.
template <typename T>
void gram_all_images(const at::Tensor& x, at::Tensor& out) {
  const int64_t n = x.size(0), R = x.size(1), d = x.size(2);
  const T* xp = x.data_ptr<T>();
  T* gp = out.data_ptr<T>();
  const int64_t sn = x.stride(0), sr = x.stride(1);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) gram_one_image(xp + i * sn, gp + i * R * R, R, d, sr);
}

}  // namespace

at::Tensor gram(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 3, "gram: x must be (n, R, d), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "gram (cpu): x must be float32 or float64, got ", x_in.scalar_type());
  // Rows must be unit-stride along d for the vector loop; anything else is copied once.
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t n = x.size(0), R = x.size(1);
  at::Tensor out = at::empty({n, R, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rcar_cpu::gram",
                             [&] { gram_all_images<scalar_t>(x, out); });
  return out;
}

}  // namespace rcar_cpu

// Python binding (rcar_fast._C), registered through csrc/bindings.h:
//   gram_cpu: x (n, R, d) float32/float64 -> (n, R, R) in x's dtype.
RCAR_FAST_BINDINGS(cpu_gram, m) {
  m.def("gram_cpu", &rcar_cpu::gram, "per-image Gram matrix (n, R, d) -> (n, R, R)");
}
