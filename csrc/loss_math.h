// The per-element formulas of the fused KoeMorph loss, written once.
//
// Every function here is a template over a "lane" type V:
//   * the CUDA kernel instantiates them with float / double scalars;
//   * the CPU kernel instantiates them with at::vec::Vectorized<float|double>
//     (cpu_loss_kernel.h specialises Lanes<> for vectors).
// So the CPU tests exercise the very expressions the GPU runs, except that the
// CPU sequence kernel adds a gradient's terms with fused multiply-adds and
// groups the velocity residual its own way (cpu_sequence_kernel.h,
// step_lanes): the same values to rounding (docs/design.md, "Sequences").
//
// Notation (docs/spec.md): d = pred - target, e = pred - prev,
// s = pred - raw, R rows, C columns, N = R*C, m_r the continuity mask.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "loss_terms.h"

// Always inlined: with the baseline (generic) Vectorized<>, GCC otherwise
// keeps these as calls and the kernel runs several times slower.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define KF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define KF_HD inline __attribute__((always_inline))
#else
#define KF_HD inline
#endif

namespace koemorph_fused {

// ---------------------------------------------------------------------------
// Lane operations. This primary template serves scalars (CUDA, and any
// scalar code); cpu_loss_kernel.h specialises it for at::vec::Vectorized.
template <class T>
struct Lanes {
  // sign(0) = 0 and sign(NaN) = 0, exactly like torch.sign and the l1_loss gradient.
  static KF_HD T sign(T x) { return static_cast<T>(T(0) < x) - static_cast<T>(x < T(0)); }
  // k * sign(x), for a coefficient k >= 0.
  static KF_HD T scaled_sign(T x, T k) { return k * sign(x); }
  // NaN passes through, as in torch.abs.
  static KF_HD T abs(T x) { return x < T(0) ? -x : x; }
  // v where k != 0, else exactly 0. A coefficient of 0 means "this element
  // is not part of the term": 0 * NaN must not leak a NaN into a term or a
  // gradient that the reference never computes.
  static KF_HD T keep_nonzero(T k, T v) { return k != T(0) ? v : T(0); }
};

// ---------------------------------------------------------------------------
// The weight rule, in float64 before any rounding to the accumulation type:
// a weight that is not finite and > 0 counts as 0 (host weights are checked
// earlier; device ones cannot be without a sync). The create_graph
// linearisations (csrc/loss_autograd.cpp, koemorph_fused/_ops.py) apply the
// same rule to the float64 weights with tensor ops.
KF_HD double effective_weight(double w) { return (w > 0.0 && w <= DBL_MAX) ? w : 0.0; }

// ---------------------------------------------------------------------------
// Coefficients of one call, computed once on the host in the accumulation
// type. A term whose weight is 0 has coefficient 0 and contributes nothing to
// any gradient (docs/spec.md: a weight of 0 removes the term from the total).
template <class A>
struct GradCoefficients {
  A mse;         // 2*w_mse/N
  A perceptual;  // 2*w_perceptual/R, multiplied by the column weight colw[c]
  A l1;          // w_l1/N
  A temporal;    // 2*w_temporal/C, multiplied by m_r / denom per row
  A smoothing;   // w_smoothing/N
};

template <class A>
KF_HD GradCoefficients<A> make_coefficients(const double* w, int64_t rows, int64_t cols) {
  const double n = static_cast<double>(rows) * static_cast<double>(cols);
  GradCoefficients<A> k;
  k.mse = static_cast<A>(2.0 * w[kMse] / n);
  k.perceptual = static_cast<A>(2.0 * w[kPerceptual] / static_cast<double>(rows));
  k.l1 = static_cast<A>(w[kL1] / n);
  k.temporal = static_cast<A>(2.0 * w[kTemporal] / static_cast<double>(cols));
  k.smoothing = static_cast<A>(w[kSmoothing] / n);
  return k;
}

// ---------------------------------------------------------------------------
// Per-element pieces.

// Coefficient of d in the gradient for column weight cw (per column).
template <class V>
KF_HD V difference_coefficient(V cw, V mse_coef, V perceptual_coef) {
  return mse_coef + perceptual_coef * cw;
}

// The part of d total / d pred that comes from d = pred - target:
//   kd*d + (w_l1/N)*sign(d).  d total / d target is exactly its negative.
// kd == 0 (no MSE weight, column outside the perceptual lists) contributes 0.
template <class V>
KF_HD V difference_gradient(V d, V kd, V l1_coef) {
  return Lanes<V>::keep_nonzero(kd, kd * d) + Lanes<V>::scaled_sign(d, l1_coef);
}

// The part of d total / d pred from the temporal term, row_coef = 2*w_t*m_r/(C*denom).
template <class V>
KF_HD V temporal_gradient(V e, V row_coef) {
  return row_coef * e;
}

// The part of d total / d pred from the smoothing term; d total / d raw is its negative.
template <class V>
KF_HD V smoothing_gradient(V s, V smoothing_coef) {
  return Lanes<V>::scaled_sign(s, smoothing_coef);
}

// Running sums of one block of elements (the CUDA kernel; the CPU kernel sums
// d^2 per column instead, see cpu_loss_kernel.h). `temporal` gathers sum_c e^2
// of the current row; the caller folds it into the row-weighted sum with m_r.
template <class V>
struct LaneSums {
  V sq;          // sum d^2
  V abs;         // sum |d|
  V perceptual;  // sum colw[c] * d^2 over columns with colw != 0
  V temporal;    // sum e^2 (current row)
  V smoothing;   // sum |s|
};

template <class V>
KF_HD void accumulate_difference(LaneSums<V>& acc, V d, V cw) {
  const V d2 = d * d;
  acc.sq = acc.sq + d2;
  acc.abs = acc.abs + Lanes<V>::abs(d);
  acc.perceptual = acc.perceptual + Lanes<V>::keep_nonzero(cw, cw * d2);
}

template <class V>
KF_HD void accumulate_temporal(LaneSums<V>& acc, V e) {
  acc.temporal = acc.temporal + e * e;
}

template <class V>
KF_HD void accumulate_smoothing(LaneSums<V>& acc, V s) {
  acc.smoothing = acc.smoothing + Lanes<V>::abs(s);
}

// ---------------------------------------------------------------------------
// The finish: raw sums -> the five terms and the weighted total.
//
// sums[kTemporal] already holds sum_r m_r * sum_c e^2. `mask_sum` is sum_r m_r
// (R when there is no mask). A term whose input is absent is exactly 0; a term
// whose weight is 0 is reported but left out of the total (0 * NaN stays out).
template <class A>
KF_HD A temporal_denominator(A mask_sum) {
  return mask_sum > A(0) ? mask_sum : A(1);
}

template <class A, class Out>
KF_HD void finish_terms(const A* sums, const double* w, int64_t rows, int64_t cols,
                        A mask_sum, bool has_prev, bool has_raw, Out* terms, Out* total) {
  const A n = static_cast<A>(rows) * static_cast<A>(cols);
  A t[kNumTerms];
  t[kMse] = sums[kMse] / n;
  t[kL1] = sums[kL1] / n;
  t[kPerceptual] = sums[kPerceptual] / static_cast<A>(rows);
  t[kTemporal] = has_prev
      ? sums[kTemporal] / (static_cast<A>(cols) * temporal_denominator(mask_sum))
      : A(0);
  t[kSmoothing] = has_raw ? sums[kSmoothing] / n : A(0);
  A result = A(0);
  for (int i = 0; i < kNumTerms; ++i) {
    terms[i] = static_cast<Out>(t[i]);
    if (w[i] > 0.0) result += static_cast<A>(w[i]) * t[i];
  }
  *total = static_cast<Out>(result);
}

}  // namespace koemorph_fused
