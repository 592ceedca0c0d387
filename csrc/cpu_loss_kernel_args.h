// Plain-data arguments of the CPU kernels, so that their translation units
// (cpu_loss_kernel_<isa>_<dtype>.cpp) need no at::Tensor and stay small.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "loss_terms.h"  // data only: this header is included before the AVX2 pragma

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define KF_HAVE_AVX2_KERNELS 1
#else
#define KF_HAVE_AVX2_KERNELS 0
#endif

namespace koemorph_fused::cpu {

struct ForwardArgs {
  c10::ScalarType dtype;           // of pred, target, prev, raw and the gradients
  const void* pred;                // (rows, cols), last dimension contiguous
  const void* target;
  const void* prev;                // nullptr: no temporal term
  const void* raw;                 // nullptr: no smoothing term
  int64_t pred_stride, target_stride, prev_stride, raw_stride;  // row strides, in elements
  const void* mask;                // (rows,) in the accumulation type; nullptr: all ones
  const void* column_weights;      // (cols,) in the accumulation type
  void* grad_pred;                 // contiguous (rows, cols) or nullptr when not requested;
                                   // float32 for float16 inputs (see grad_storage_t)
  void* grad_target;
  void* grad_raw;
  int64_t rows, cols;
  double weights[kNumTerms];
  // Results: sums[kMse] = sum d^2, ..., sums[kTemporal] = sum_r m_r sum_c e^2,
  // and mask_sum = sum_r m_r (rows when mask == nullptr).
  double sums[kNumTerms];
  double mask_sum;
};

struct ScaleArgs {
  c10::ScalarType dtype;           // of the outputs (the inputs' dtype); saved: grad_storage_t
  const void* grad_output;         // one value in the accumulation type
  const void* saved[3];            // contiguous; nullptr entries are skipped
  void* out[3];
  int64_t numel[3];
};

// The dtypes of the kernels: (C++ type, c10::ScalarType enumerator).
#define KF_CPU_KERNEL_DTYPES(X) \
  X(float, Float)               \
  X(double, Double)             \
  X(c10::Half, Half)            \
  X(c10::BFloat16, BFloat16)

// One build of the kernels per instruction set and dtype, each in its own
// translation unit (cpu_loss_kernel_<isa>_<dtype>.cpp, via
// KF_DEFINE_CPU_KERNELS), so that a parallel build compiles them side by side
// instead of one instantiating every dtype; cpu_loss_kernel.cpp picks one at
// run time. The AVX2 build needs GCC's per-file target pragma on x86-64.
#define KF_DECLARE_DTYPE_KERNELS(T, NAME)   \
  void forward_##NAME(ForwardArgs& args); \
  void scale_##NAME(const ScaleArgs& args);
#define KF_DECLARE_CPU_KERNELS(CAP)                        \
  namespace CAP {                                          \
  KF_CPU_KERNEL_DTYPES(KF_DECLARE_DTYPE_KERNELS)           \
  }
KF_DECLARE_CPU_KERNELS(DEFAULT)
#if KF_HAVE_AVX2_KERNELS
KF_DECLARE_CPU_KERNELS(AVX2)
#endif
#undef KF_DECLARE_CPU_KERNELS
#undef KF_DECLARE_DTYPE_KERNELS

}  // namespace koemorph_fused::cpu
