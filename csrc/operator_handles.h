// Typed dispatcher handles of the operators (csrc/ops.cpp), for C++
// callers: calls through them run every dispatch key (autograd, fake
// tensors, dispatch modes, CPU/CUDA) as torch.ops does, without boxing.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "loss_inputs.h"

namespace koemorph_fused {

using ForwardSignature = ForwardOutputs(const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&,
                                        const std::optional<at::Tensor>&, const at::Tensor&,
                                        const at::Tensor&, bool, bool, bool);
using ScaleSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType);
using ScaleInPlaceSignature = void(const at::Tensor&, at::TensorList);
using SequenceSignature = SequenceOutputs(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& raw,
    const std::optional<at::Tensor>& prev, const std::optional<at::Tensor>& prev_target,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& continuity, const at::Tensor& column_weights,
    const at::Tensor& weights, const std::optional<at::Tensor>& counts,
    const std::optional<at::Tensor>& frame_scale, int64_t reduction, bool grad_pred,
    bool grad_target, bool grad_raw);

// koemorph_fused::temporal_loss_forward, looked up once.
inline const c10::TypedOperatorHandle<ForwardSignature>& forward_operator() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("koemorph_fused::temporal_loss_forward", "")
                             .typed<ForwardSignature>();
  return op;
}

// koemorph_fused::scale_gradients, looked up once.
inline const c10::TypedOperatorHandle<ScaleSignature>& scale_operator() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("koemorph_fused::scale_gradients", "")
                             .typed<ScaleSignature>();
  return op;
}

// koemorph_fused::scale_gradients_, looked up once.
inline const c10::TypedOperatorHandle<ScaleInPlaceSignature>& scale_in_place_operator() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("koemorph_fused::scale_gradients_", "")
                             .typed<ScaleInPlaceSignature>();
  return op;
}

// koemorph_fused::sequence_loss_forward, looked up once.
inline const c10::TypedOperatorHandle<SequenceSignature>& sequence_operator() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("koemorph_fused::sequence_loss_forward", "")
                             .typed<SequenceSignature>();
  return op;
}

}  // namespace koemorph_fused
