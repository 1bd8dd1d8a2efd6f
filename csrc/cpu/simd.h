// Explicit 256-bit SIMD for the pair reductions, with GCC/Clang vector extensions.
//
// Why not plain loops: without -ffast-math / -fno-trapping-math (the extension is built with
// -O3 only) GCC refuses to vectorise loops holding float selects (leaky ReLU, max, clamps),
// so the reductions ran scalar. Vector-extension code is vectorised by construction: it
// compiles to AVX2 inside the RCAR_TARGET_AVX2 clones and to pairs of SSE2 operations in the
// baseline build.
#pragma once
#include <cstdint>
#include <cstring>

#ifndef RCAR_INLINE
#define RCAR_INLINE inline __attribute__((always_inline))
#endif

// Every function here is always_inline, so no 32-byte vector crosses a call boundary and the
// baseline build's ABI note about passing AVX vectors does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rcar_cpu::simd {

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static constexpr int W = 8;
};
template <>
struct Traits<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static constexpr int W = 4;
};

template <typename T>
using Vec = typename Traits<T>::V;
template <typename T>
using Mask = typename Traits<T>::I;
template <typename T>
constexpr int64_t kWidth = Traits<T>::W;

// n rounded up to a whole number of vectors.
template <typename T>
constexpr int64_t padded(int64_t n) {
  return (n + kWidth<T> - 1) / kWidth<T> * kWidth<T>;
}

template <typename T>
RCAR_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
RCAR_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
RCAR_INLINE Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

template <typename T>
RCAR_INLINE Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

template <typename T>
RCAR_INLINE Vec<T> vmin(Vec<T> a, Vec<T> b) {
  return a < b ? a : b;
}

// Lanes [0, valid) set.
template <typename T>
RCAR_INLINE Mask<T> lanes_below(int64_t valid) {
  Mask<T> m;
  for (int i = 0; i < kWidth<T>; ++i) m[i] = i < valid ? -1 : 0;
  return m;
}

template <typename T>
RCAR_INLINE T hsum(Vec<T> v) {
  T s = v[0];
  for (int i = 1; i < kWidth<T>; ++i) s += v[i];
  return s;
}

template <typename T>
RCAR_INLINE T hmax(Vec<T> v) {
  T s = v[0];
  for (int i = 1; i < kWidth<T>; ++i) s = s > v[i] ? s : v[i];
  return s;
}

// leaky(x) = x (x > 0) or slope * x.
template <typename T>
RCAR_INLINE Vec<T> leak(Vec<T> x, T slope) {
  return x > splat<T>(T(0)) ? x : x * slope;
}

// d leaky / dx: 1 (x > 0) or slope.
template <typename T>
RCAR_INLINE Vec<T> leak_grad(Vec<T> x, T slope) {
  return x > splat<T>(T(0)) ? splat<T>(T(1)) : splat<T>(slope);
}

template <typename T>
RCAR_INLINE Vec<T> sign(Vec<T> x) {
  const Vec<T> zero = splat<T>(T(0));
  return x > zero ? splat<T>(T(1)) : (x < zero ? splat<T>(T(-1)) : zero);
}

// exp by Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, a Taylor polynomial in r and 2^k put
// into the exponent bits (the rounding "shifter" leaves k in the low mantissa bits). About 1 ulp
// (float, degree 7) / a few ulp (double, degree 13). Inputs are clamped to where 2^k stays a
// normal number; callers use it for softmax numerators (arguments <= 0), where values below
// e^-86 (float) / e^-700 (double) are negligible against the max term, which is 1.
template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  static constexpr float lo = -86.0f, hi = 88.0f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187045e-06f;
  static constexpr int mantissa_bits = 23;
  // Horner coefficients, highest degree first: 1/7! .. 1/2!, 1, 1
  static constexpr float poly[] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                                   1.0f / 6.0f,    0.5f,           1.0f,           1.0f};
};
template <>
struct ExpConstants<double> {
  static constexpr double lo = -700.0, hi = 700.0;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double log2e = 1.4426950408889634;
  static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  static constexpr int mantissa_bits = 52;
  // 1/13! .. 1/2!, 1, 1
  static constexpr double poly[] = {1.6059043836821613e-10, 2.08767569878681e-09, 2.505210838544172e-08,
                                    2.755731922398589e-07,  2.755731922398589e-06, 2.48015873015873e-05,
                                    1.984126984126984e-04,  1.388888888888889e-03, 8.333333333333333e-03,
                                    4.166666666666666e-02,  1.666666666666667e-01, 0.5,
                                    1.0,                    1.0};
};

template <typename T>
RCAR_INLINE Vec<T> cody_waite_exp(Vec<T> x) {
  using C = ExpConstants<T>;
  x = vmax<T>(x, splat<T>(C::lo));
  x = vmin<T>(x, splat<T>(C::hi));
  const Vec<T> shifter = splat<T>(C::shifter);
  const Vec<T> shifted = x * C::log2e + shifter;
  const Vec<T> k = shifted - shifter;
  const Vec<T> r = (x - k * C::ln2_hi) - k * C::ln2_lo;
  constexpr int terms = sizeof(C::poly) / sizeof(C::poly[0]);
  Vec<T> p = splat<T>(C::poly[0]);
  for (int i = 1; i < terms; ++i) p = p * r + C::poly[i];
  const Mask<T> scaled = (Mask<T>)p + ((Mask<T>)shifted << C::mantissa_bits);
  return (Vec<T>)scaled;
}

// The overloads callers use (T is not deducible from Vec<T>).
RCAR_INLINE Vec<float> vexp(Vec<float> x) { return cody_waite_exp<float>(x); }
RCAR_INLINE Vec<double> vexp(Vec<double> x) { return cody_waite_exp<double>(x); }

// exp over a buffer whose length is a whole number of vectors.
template <typename T>
RCAR_INLINE void exp_vectors(T* x, int64_t n) {
  for (int64_t i = 0; i < n; i += kWidth<T>) store(x + i, vexp(load(x + i)));
}

}  // namespace rcar_cpu::simd

#pragma GCC diagnostic pop
