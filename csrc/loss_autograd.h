// The eager autograd nodes of the fused row and sequence losses (see loss_autograd.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace koemorph_fused {

// (total, terms) of the fused loss for plain eager tensors, differentiable in
// pred, target and raw when grad mode is on and they require grad; the C++
// counterpart of koemorph_fused._ops.FusedTemporalLoss. Called with the GIL
// held; release_gil lets other Python threads run during the kernel.
std::tuple<at::Tensor, at::Tensor> temporal_loss_with_autograd(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& prev,
    const std::optional<at::Tensor>& raw, const std::optional<at::Tensor>& continuity,
    const at::Tensor& column_weights, const at::Tensor& weights, bool release_gil);

// (total, terms, counts) of the sequence loss for plain eager tensors,
// differentiable in pred, target and raw as above; the C++ counterpart of
// koemorph_fused._sequence_ops.FusedSequenceLoss. Arguments as the
// operator's (csrc/ops.cpp), without frame_scale; reduction is its code.
// Called with the GIL held, as temporal_loss_with_autograd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_loss_with_autograd(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& raw,
    const std::optional<at::Tensor>& prev, const std::optional<at::Tensor>& prev_target,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& continuity, const at::Tensor& column_weights,
    const at::Tensor& weights, const std::optional<at::Tensor>& counts, int64_t reduction,
    bool release_gil);

// Whether t is a plain CPU tensor (no tensor subclass, fake or functional
// wrapper) holding the single value 1, read without a dispatcher call.
bool is_unit_cpu_scalar(const at::Tensor& t);

}  // namespace koemorph_fused
