// Plain-data arguments of the CPU sequence kernel (windows of frames
// (B, T, C)), so that its per-ISA translation units need no at::Tensor.
// Data only: included before the AVX2 target pragma.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "cpu_loss_kernel_args.h"  // KF_HAVE_AVX2_KERNELS

namespace koemorph_fused {

// The six terms of a window (docs/spec.md, "Sequences"): the row loss's five,
// then velocity.
constexpr int kVelocity = 5;
constexpr int kNumSequenceTerms = 6;

// Bits of the per-frame flags that the host's pre-pass computes from
// lengths / mask / continuity: frame (b, t) is valid (in V), it and its
// previous frame form a temporal pair (in P), a velocity pair (in P_v).
enum FrameFlag : uint8_t { kFrameValid = 1, kFramePair = 2, kFrameVelocityPair = 4 };

namespace cpu {

struct SequenceArgs {
  c10::ScalarType dtype;  // of pred, target, raw, prev, prev_target and the gradients
  // (B, T, C) in element strides (any, also 0 or negative: read in place).
  const void *pred, *target, *raw;  // raw nullptr: no smoothing term
  int64_t pred_strides[3], target_strides[3], raw_strides[3];
  // (B, C); nullptr when absent (frames t = 0 then have no pair).
  const void *prev, *prev_target;
  int64_t prev_strides[2], prev_target_strides[2];
  const uint8_t* flags;        // (B * T) FrameFlag bits, contiguous
  const void* frame_scale;     // (B * T) in the accumulation type, or nullptr (all 1)
  const void* column_weights;  // (C,) in the accumulation type
  // Gradients of the weighted total, contiguous (B, T, C), float32 for
  // float16 inputs (grad_storage_t); nullptr when not requested.
  void *grad_pred, *grad_target, *grad_raw;
  // Reduction "none": per-frame terms (B * T, 6) and totals (B * T), in the
  // accumulation type; nullptr for "mean" / "sum".
  void *frame_terms, *frame_total;
  int64_t batch, frames, cols;  // B, T, C
  double weights[kNumSequenceTerms];      // each > 0 or exactly 0
  double denominators[kNumSequenceTerms]; // the sums are divided by these (1 for "sum")
  // Result ("mean" / "sum"): sums[k] = the term's sum over its frames (each
  // frame's mean over C, or its perceptual sum), times frame_scale.
  double sums[kNumSequenceTerms];
};

#define KF_DECLARE_CPU_SEQUENCE_KERNEL(CAP) \
  namespace CAP {                           \
  void sequence_kernel(SequenceArgs& args); \
  }
KF_DECLARE_CPU_SEQUENCE_KERNEL(DEFAULT)
#if KF_HAVE_AVX2_KERNELS
KF_DECLARE_CPU_SEQUENCE_KERNEL(AVX2)
#endif
#undef KF_DECLARE_CPU_SEQUENCE_KERNEL

}  // namespace cpu
}  // namespace koemorph_fused
