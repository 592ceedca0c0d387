// CPU implementations of the koemorph_fused operators: argument checks,
// output allocation, and the choice between the baseline and AVX2 kernels.
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "cpu_buffer_pool.h"
#include "cpu_loss_kernel_args.h"
#include "loss_inputs.h"

namespace koemorph_fused {

// Which build of the CPU kernels runs here ("AVX2" or "DEFAULT"). Follows
// torch's own choice, so ATEN_CPU_CAPABILITY=default selects the baseline.
const char* cpu_kernel_isa() {
  static const char* isa = [] {
#if KF_HAVE_AVX2_KERNELS
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX2" || cap == "AVX512") return "AVX2";
#endif
    return "DEFAULT";
  }();
  return isa;
}

namespace {

bool use_avx2() {
  static const bool avx2 = std::string(cpu_kernel_isa()) == "AVX2";
  return avx2;
}

void run_scale_kernel(const cpu::ScaleArgs& a) {
#if KF_HAVE_AVX2_KERNELS
  if (use_avx2()) cpu::AVX2::scale_kernel(a);
  else cpu::DEFAULT::scale_kernel(a);
#else
  cpu::DEFAULT::scale_kernel(a);
#endif
}

void* grad_data(const at::Tensor& g) { return g.numel() ? g.mutable_data_ptr() : nullptr; }

ForwardOutputs temporal_loss_forward_cpu(const at::Tensor& pred, const at::Tensor& target,
                                         const std::optional<at::Tensor>& prev,
                                         const std::optional<at::Tensor>& raw,
                                         const std::optional<at::Tensor>& continuity,
                                         const at::Tensor& column_weights,
                                         const at::Tensor& weights, bool grad_pred,
                                         bool grad_target, bool grad_raw) {
  const LossInputs in = prepare_inputs(pred, target, prev, raw, continuity, column_weights, weights,
                                       grad_pred, grad_target, grad_raw);
  ForwardOutputs outs = allocate_outputs(in, pred);
  auto& [total, terms, out_grad_pred, out_grad_target, out_grad_raw] = outs;

  cpu::ForwardArgs a{};
  a.dtype = in.pred.scalar_type();
  a.pred = in.pred.const_data_ptr();
  a.target = in.target.const_data_ptr();
  a.prev = in.prev.defined() ? in.prev.const_data_ptr() : nullptr;
  a.raw = in.raw.defined() ? in.raw.const_data_ptr() : nullptr;
  a.pred_stride = in.pred.stride(0);
  a.target_stride = in.target.stride(0);
  a.prev_stride = in.prev.defined() ? in.prev.stride(0) : 0;
  a.raw_stride = in.raw.defined() ? in.raw.stride(0) : 0;
  a.mask = in.mask.defined() ? in.mask.const_data_ptr() : nullptr;
  a.column_weights = in.column_weights.const_data_ptr();
  a.grad_pred = grad_data(out_grad_pred);
  a.grad_target = grad_data(out_grad_target);
  a.grad_raw = grad_data(out_grad_raw);
  a.rows = in.rows;
  a.cols = in.cols;
  std::copy(in.weights.begin(), in.weights.end(), a.weights);

#if KF_HAVE_AVX2_KERNELS
  if (use_avx2()) cpu::AVX2::forward_kernel(a);
  else cpu::DEFAULT::forward_kernel(a);
#else
  cpu::DEFAULT::forward_kernel(a);
#endif

  const bool has_prev = a.prev != nullptr, has_raw = a.raw != nullptr;
  if (total.scalar_type() == at::kDouble) {
    finish_terms<double, double>(a.sums, a.weights, a.rows, a.cols, a.mask_sum, has_prev, has_raw,
                                 terms.mutable_data_ptr<double>(), total.mutable_data_ptr<double>());
  } else {
    finish_terms<double, float>(a.sums, a.weights, a.rows, a.cols, a.mask_sum, has_prev, has_raw,
                                terms.mutable_data_ptr<float>(), total.mutable_data_ptr<float>());
  }
  return outs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_gradients_cpu(const at::Tensor& grad_output,
                                                                    const at::Tensor& grad_pred,
                                                                    const at::Tensor& grad_target,
                                                                    const at::Tensor& grad_raw,
                                                                    at::ScalarType dtype) {
  check_scale_gradients(grad_output, {grad_pred, grad_target, grad_raw}, dtype);
  const at::Tensor* saved[3] = {&grad_pred, &grad_target, &grad_raw};
  at::Tensor out[3];
  cpu::ScaleArgs a{};
  a.dtype = dtype;
  for (int i = 0; i < 3; ++i) {
    out[i] = empty_cpu_output(saved[i]->sizes(), dtype);
    if (saved[i]->numel() == 0) continue;
    a.saved[i] = saved[i]->const_data_ptr();
    a.out[i] = out[i].mutable_data_ptr();
    a.numel[i] = saved[i]->numel();
  }
  const at::Tensor go = grad_output.to(accumulation_dtype(dtype));
  a.grad_output = go.const_data_ptr();
  run_scale_kernel(a);
  return {out[0], out[1], out[2]};
}

// In place: the scaling kernel with out == saved (each element is read before
// it is written). float16 tensors go through a float32 copy, the kernel's
// saved type for them.
void scale_gradients_in_place_cpu(const at::Tensor& grad_output, at::TensorList grads) {
  const std::optional<at::ScalarType> dtype = check_scale_gradients_in_place(grad_output, grads);
  if (!dtype) return;
  const at::Tensor go = grad_output.to(accumulation_dtype(*dtype));
  if (go.item<double>() == 1.0) return;  // x * 1 == x: nothing to write
  std::vector<at::Tensor> sources;  // float32 copies of float16 tensors
  cpu::ScaleArgs a{};
  a.dtype = *dtype;
  a.grad_output = go.const_data_ptr();
  int n = 0;
  auto run = [&] {
    run_scale_kernel(a);
    a.saved[0] = a.saved[1] = a.saved[2] = nullptr;
    n = 0;
  };
  for (const at::Tensor& g : grads) {
    if (g.numel() == 0) continue;
    if (*dtype == at::kHalf) sources.push_back(g.to(at::kFloat));
    a.saved[n] = *dtype == at::kHalf ? sources.back().const_data_ptr() : g.const_data_ptr();
    a.out[n] = g.mutable_data_ptr();
    a.numel[n] = g.numel();
    if (++n == 3) run();
  }
  if (n > 0) run();
}

}  // namespace

TORCH_LIBRARY_IMPL(koemorph_fused, CPU, m) {
  m.impl("temporal_loss_forward", &temporal_loss_forward_cpu);
  m.impl("scale_gradients", &scale_gradients_cpu);
  m.impl("scale_gradients_", &scale_gradients_in_place_cpu);
}

}  // namespace koemorph_fused
