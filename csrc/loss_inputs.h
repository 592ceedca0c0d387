// Argument checks and (R, C) views shared by the CPU and CUDA backends.
//
// The Python API validates first and gives the friendliest messages; these
// checks keep direct callers of torch.ops.koemorph_fused.* just as safe. Every
// message names the argument and what was expected.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "loss_math.h"

namespace koemorph_fused {

// float32 for float16/bfloat16/float32, float64 for float64: the dtype of
// the sums, of `total` and `terms`, and of the column weights and mask.
at::ScalarType accumulation_dtype(at::ScalarType dtype);

// The dtype of the gradients saved between forward and backward: float32 for
// float16 inputs (whose exponent range would flush gradients of order 1/N to
// zero before grad_output is applied), the input dtype otherwise.
at::ScalarType gradient_storage_dtype(at::ScalarType dtype);

// The continuity-mask dtypes the CUDA mask pre-kernel reads and converts
// itself (X-macro over (C++ type, ScalarType name)); a mask of any other
// dtype is converted by prepare_inputs.
#define KF_FOR_EACH_DIRECT_MASK_DTYPE(_)                                          \
  _(bool, Bool) _(uint8_t, Byte) _(int8_t, Char) _(int16_t, Short) _(int32_t, Int) \
  _(int64_t, Long) _(c10::Half, Half) _(c10::BFloat16, BFloat16) _(float, Float)  \
  _(double, Double)

bool cuda_reads_mask_dtype(at::ScalarType dtype);

// One forward call, validated. Matrices are (rows, cols) views whose last
// dimension has stride 1 (a contiguous copy is made only when it had not).
struct LossInputs {
  at::Tensor pred, target, prev, raw;  // prev / raw undefined when absent
  at::Tensor mask;                     // (rows,) contiguous (CPU: accumulation dtype); undefined = all ones
  at::Tensor column_weights;           // (cols,) contiguous, accumulation dtype
  int64_t rows = 0;
  int64_t cols = 0;
  at::Tensor weight_tensor;            // (5,) float64 contiguous, on the CPU or pred's device
  bool weights_on_host = false;        // then `weights` holds the values
  std::array<double, kNumTerms> weights{};
  bool grad_pred = false, grad_target = false, grad_raw = false;
};

LossInputs prepare_inputs(const at::Tensor& pred, const at::Tensor& target,
                          const std::optional<at::Tensor>& prev,
                          const std::optional<at::Tensor>& raw,
                          const std::optional<at::Tensor>& continuity,
                          const at::Tensor& column_weights, const at::Tensor& weights,
                          bool grad_pred, bool grad_target, bool grad_raw);

// (total, terms, grad_pred, grad_target, grad_raw); a gradient that was not
// asked for is an empty (0,) tensor, so no buffer is allocated for it.
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ForwardOutputs allocate_outputs(const LossInputs& in, const at::Tensor& pred);

// The sequence operator's (total, terms, counts, grad_pred, grad_target,
// grad_raw), on either backend.
using SequenceOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks for scale_gradients: grad_output is a 0-dim floating tensor on the
// device of the saved gradients, which are contiguous and of
// gradient_storage_dtype(dtype).
void check_scale_gradients(const at::Tensor& grad_output, at::TensorList grads, at::ScalarType dtype);

// Checks for scale_gradients_: grad_output as above; the non-empty tensors of
// `grads` (any shape) contiguous, on its device and all of one of float16,
// bfloat16, float32 or float64, which is returned (nullopt: all are empty).
std::optional<at::ScalarType> check_scale_gradients_in_place(const at::Tensor& grad_output,
                                                             at::TensorList grads);

}  // namespace koemorph_fused
