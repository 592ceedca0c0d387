#include "loss_inputs.h"

#include <cmath>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "cpu_buffer_pool.h"

namespace koemorph_fused {

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType gradient_storage_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf ? at::kFloat : dtype;
}

bool cuda_reads_mask_dtype(at::ScalarType dtype) {
  switch (dtype) {
#define KF_CASE(ctype, name) case at::ScalarType::name:
    KF_FOR_EACH_DIRECT_MASK_DTYPE(KF_CASE)
#undef KF_CASE
    return true;
    default:
      return false;
  }
}

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A (rows, cols) view of x whose last dimension has stride 1; one contiguous
// copy when the layout does not allow such a view.
at::Tensor as_rows(const at::Tensor& x, int64_t rows, int64_t cols) {
  if (x.dim() == 2 && (cols == 1 || x.stride(1) == 1)) return x;  // the common case: no new tensor
  at::Tensor m = x.reshape({rows, cols});
  if (cols > 1 && m.stride(1) != 1) m = m.contiguous();
  return m;
}

void check_companion(const at::Tensor& x, const char* name, const at::Tensor& pred) {
  TORCH_CHECK_TYPE(x.scalar_type() == pred.scalar_type(), name, " must have the dtype of pred (",
                   pred.scalar_type(), "), got ", x.scalar_type(),
                   "; koemorph_fused.temporal_loss promotes mixed dtypes before calling the operator");
  TORCH_CHECK_VALUE(x.device() == pred.device(), name, " must be on the device of pred (",
                    pred.device(), "), got ", x.device());
  TORCH_CHECK_VALUE(x.sizes() == pred.sizes(), name, " must have the shape of pred ", pred.sizes(),
                    ", got ", x.sizes());
}

}  // namespace

LossInputs prepare_inputs(const at::Tensor& pred, const at::Tensor& target,
                          const std::optional<at::Tensor>& prev,
                          const std::optional<at::Tensor>& raw,
                          const std::optional<at::Tensor>& continuity,
                          const at::Tensor& column_weights, const at::Tensor& weights,
                          bool grad_pred, bool grad_target, bool grad_raw) {
  TORCH_CHECK_TYPE(is_supported_dtype(pred.scalar_type()),
                   "pred must be float16, bfloat16, float32 or float64, got ", pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() >= 2, "pred must have at least 2 dimensions (..., C), got shape ",
                    pred.sizes());
  TORCH_CHECK_VALUE(pred.numel() > 0, "pred must not be empty, got shape ", pred.sizes());
  check_companion(target, "target", pred);
  if (prev) check_companion(*prev, "prev", pred);
  if (raw) check_companion(*raw, "raw", pred);

  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == kNumTerms, "weights must have shape (",
                    kNumTerms, ",) (mse, l1, perceptual, temporal, smoothing), got ", weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "weights must be floating, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.is_cpu() || weights.device() == pred.device(),
                    "weights must be on the CPU or on the device of pred (", pred.device(), "), got ",
                    weights.device());

  LossInputs in;
  in.cols = pred.size(-1);
  in.rows = pred.numel() / in.cols;
  const at::ScalarType acc = accumulation_dtype(pred.scalar_type());

  TORCH_CHECK_VALUE(column_weights.dim() == 1 && column_weights.size(0) == in.cols,
                    "column_weights must have shape (", in.cols, ",), got ", column_weights.sizes());
  TORCH_CHECK_TYPE(column_weights.scalar_type() == acc, "column_weights must be ", acc, ", got ",
                   column_weights.scalar_type());
  TORCH_CHECK_VALUE(column_weights.device() == pred.device(),
                    "column_weights must be on the device of pred (", pred.device(), "), got ",
                    column_weights.device());

  in.pred = as_rows(pred, in.rows, in.cols);
  in.target = as_rows(target, in.rows, in.cols);
  if (prev) in.prev = as_rows(*prev, in.rows, in.cols);
  if (raw) in.raw = as_rows(*raw, in.rows, in.cols);
  in.column_weights = column_weights.contiguous();

  if (continuity) {
    const at::Tensor& m = *continuity;
    const auto leading = pred.sizes().slice(0, pred.dim() - 1);
    TORCH_CHECK_VALUE(m.sizes() == leading, "continuity must have the leading shape of pred ",
                      leading, ", got ", m.sizes());
    TORCH_CHECK_TYPE(!at::isComplexType(m.scalar_type()),
                     "continuity must be a bool, integer or floating tensor, got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.device() == pred.device(), "continuity must be on the device of pred (",
                      pred.device(), "), got ", m.device());
    // Only the temporal term reads the mask. The CUDA kernel converts the
    // usual dtypes itself (no cast kernel, no allocation per call); the CPU
    // kernel reads the accumulation dtype.
    if (prev) {
      const bool direct = m.is_cuda() && cuda_reads_mask_dtype(m.scalar_type());
      const bool ready = m.dim() == 1 && (m.scalar_type() == acc || direct) && m.is_contiguous();
      in.mask = ready ? m : direct ? m.reshape({in.rows}).contiguous()
                                   : m.reshape({in.rows}).to(acc).contiguous();
    }
  }

  const bool ready = weights.scalar_type() == at::kDouble && weights.is_contiguous();
  in.weight_tensor = ready ? weights : weights.to(at::kDouble).contiguous();
  in.weights_on_host = in.weight_tensor.is_cpu();
  if (in.weights_on_host) {
    const double* w = in.weight_tensor.const_data_ptr<double>();
    for (int i = 0; i < kNumTerms; ++i) {
      // Device-resident weights cannot be checked without a sync; the Python
      // API validates every weight when it is set.
      TORCH_CHECK_VALUE(std::isfinite(w[i]) && w[i] >= 0.0,
                        "weights must be finite and >= 0, got weights[", i, "] = ", w[i]);
      in.weights[i] = w[i];
    }
  }
  in.grad_pred = grad_pred;
  in.grad_target = grad_target;
  in.grad_raw = grad_raw && raw.has_value();
  return in;
}

ForwardOutputs allocate_outputs(const LossInputs& in, const at::Tensor& pred) {
  // On the CPU straight to the allocator (large buffers from the pool):
  // at::empty's trip through the dispatcher costs more than the whole kernel
  // at small B, five times per call.
  auto empty = [&](at::IntArrayRef sizes, at::ScalarType dtype) {
    return pred.is_cpu() ? empty_cpu_output(sizes, dtype)
                         : at::empty(sizes, pred.options().dtype(dtype));
  };
  const at::ScalarType acc_dtype = accumulation_dtype(pred.scalar_type());
  const at::ScalarType grad_dtype = gradient_storage_dtype(pred.scalar_type());
  auto grad_or_empty = [&](bool wanted) {
    return empty(wanted ? pred.sizes() : at::IntArrayRef{0}, grad_dtype);
  };
  return {empty({}, acc_dtype), empty({kNumTerms}, acc_dtype), grad_or_empty(in.grad_pred),
          grad_or_empty(in.grad_target), grad_or_empty(in.grad_raw)};
}

namespace {

void check_grad_output(const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.dim() == 0, "grad_output must be a 0-dim tensor, got shape ",
                    grad_output.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_output.scalar_type()),
                   "grad_output must be a floating tensor, got ", grad_output.scalar_type());
}

}  // namespace

void check_scale_gradients(const at::Tensor& grad_output, at::TensorList grads, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_supported_dtype(dtype),
                   "dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  check_grad_output(grad_output);
  for (const auto& g : grads) {
    TORCH_CHECK_VALUE(g.numel() == 0 || g.device() == grad_output.device(),
                      "saved gradients must be on the device of grad_output (",
                      grad_output.device(), "), got ", g.device());
    TORCH_CHECK_VALUE(g.numel() == 0 || g.is_contiguous(),
                      "saved gradients must be contiguous");
    TORCH_CHECK_TYPE(g.numel() == 0 || g.scalar_type() == gradient_storage_dtype(dtype),
                     "saved gradients for dtype ", dtype, " must be ", gradient_storage_dtype(dtype),
                     ", got ", g.scalar_type());
  }
}

std::optional<at::ScalarType> check_scale_gradients_in_place(const at::Tensor& grad_output,
                                                             at::TensorList grads) {
  check_grad_output(grad_output);
  std::optional<at::ScalarType> dtype;
  for (const auto& g : grads) {
    if (g.numel() == 0) continue;
    TORCH_CHECK_TYPE(is_supported_dtype(g.scalar_type()),
                     "grads must be float16, bfloat16, float32 or float64, got ", g.scalar_type());
    TORCH_CHECK_TYPE(!dtype || *dtype == g.scalar_type(), "grads must all have one dtype, got ",
                     *dtype, " and ", g.scalar_type());
    TORCH_CHECK_VALUE(g.device() == grad_output.device(), "grads must be on the device of grad_output (",
                      grad_output.device(), "), got ", g.device());
    TORCH_CHECK_VALUE(g.is_contiguous(), "grads must be contiguous");
    dtype = g.scalar_type();
  }
  return dtype;
}

}  // namespace koemorph_fused
