// CPU implementation of sequence_loss_forward (windows of frames (B, T, C)):
// structural checks, the pre-pass over lengths / mask / continuity that gives
// every frame its flags and the call its counts, outputs, and the choice
// between the baseline and AVX2 kernels. docs/spec.md, "Sequences".
#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_buffer_pool.h"
#include "cpu_sequence_kernel_args.h"
#include "loss_inputs.h"

namespace koemorph_fused {

const char* cpu_kernel_isa();  // cpu_loss_kernel.cpp

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same(const at::Tensor& x, const char* name, const at::Tensor& pred, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(x.scalar_type() == pred.scalar_type(), name, " must have the dtype of pred (",
                   pred.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == pred.device(), name, " must be on the device of pred (", pred.device(),
                    "), got ", x.device());
  TORCH_CHECK_VALUE(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
}

void check_frame_tensor(const at::Tensor& x, const char* name, const at::Tensor& pred) {
  TORCH_CHECK_TYPE(!at::isComplexType(x.scalar_type()), name,
                   " must be a bool, integer or floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == pred.device(), name, " must be on the device of pred (", pred.device(),
                    "), got ", x.device());
}

// x != 0 for each element of a 1-D or 2-D tensor, in row-major order, read in
// place whatever its strides and dtype.
std::vector<uint8_t> nonzero_values(at::Tensor x) {
  const bool plain = at::isIntegralType(x.scalar_type(), /*includeBool=*/true) ||
                     is_supported_dtype(x.scalar_type());
  if (!plain || x.scalar_type() == at::kUInt16 || x.scalar_type() == at::kUInt32 ||
      x.scalar_type() == at::kUInt64) {
    x = x.ne(0);  // the rare dtypes (float8, wide unsigned): one conversion
  }
  std::vector<uint8_t> out(static_cast<size_t>(x.numel()));
  const int64_t rows = x.dim() == 2 ? x.size(0) : 1, cols = x.size(-1);
  const int64_t rs = x.dim() == 2 ? x.stride(0) : 0, cs = x.stride(-1);
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, x.scalar_type(), "nonzero_values", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = p[r * rs + c * cs] != scalar_t(0);
    }
  });
  return out;
}

// lengths[b] clamped into [0, T].
std::vector<int64_t> read_lengths(at::Tensor lengths, int64_t frames) {
  if (lengths.scalar_type() == at::kUInt16 || lengths.scalar_type() == at::kUInt32 ||
      lengths.scalar_type() == at::kUInt64) {
    lengths = lengths.to(at::kLong);
  }
  std::vector<int64_t> out(static_cast<size_t>(lengths.numel()));
  AT_DISPATCH_INTEGRAL_TYPES(lengths.scalar_type(), "read_lengths", [&] {
    const scalar_t* p = lengths.const_data_ptr<scalar_t>();
    for (size_t b = 0; b < out.size(); ++b) {
      out[b] = std::clamp<int64_t>(static_cast<int64_t>(p[b * lengths.stride(0)]), 0, frames);
    }
  });
  return out;
}

// The frame flags (FrameFlag bits) and this call's six counts.
struct FramePlan {
  std::vector<uint8_t> flags;  // (B * T)
  std::array<int64_t, kNumSequenceTerms> counts{};
};

// One window's flags and counts (valid frames, pairs, velocity pairs) from
// its valid frames (0 or 1 each) and, with kPerFrame, every frame's
// continuity (otherwise frames t >= 1 continue the file); same_first is frame
// 0's. Bytes in, bytes out, no branch per frame (the branches per frame this
// replaced cost about 1.5 ns a frame, 100 us at (64, 1024), on one thread
// before the kernel starts).
template <bool kPerFrame>
void plan_window(uint8_t* fl, int64_t frames, const uint8_t* valid, const uint8_t* same, uint8_t same_first,
                 uint8_t has_prev, uint8_t has_prev_target, std::array<int64_t, 3>& counts) {
  if (frames == 0) return;
  // Frame 0: its previous frame is prev; its velocity pair also needs prev_target.
  const uint8_t v0 = valid[0], p0 = v0 & same_first & has_prev, q0 = p0 & has_prev_target;
  fl[0] = static_cast<uint8_t>(v0 * kFrameValid | p0 * kFramePair | q0 * kFrameVelocityPair);
  int64_t n_valid = v0, n_pair = 0;
  for (int64_t t = 1; t < frames; ++t) {
    const uint8_t v = valid[t], p = v & valid[t - 1] & (kPerFrame ? same[t] : uint8_t(1));
    fl[t] = static_cast<uint8_t>(v * kFrameValid | p * (kFramePair | kFrameVelocityPair));
    n_valid += v;
    n_pair += p;
  }
  counts[0] += n_valid;
  counts[1] += p0 + n_pair;
  counts[2] += q0 + n_pair;
}

FramePlan plan_frames(int64_t batch, int64_t frames, const std::optional<at::Tensor>& lengths,
                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& continuity,
                      bool has_prev, bool has_prev_target, bool has_raw) {
  FramePlan plan;
  plan.flags.assign(static_cast<size_t>(batch * frames), 0);
  std::vector<int64_t> len;
  std::vector<uint8_t> valid_mask, cont;
  if (lengths) len = read_lengths(*lengths, frames);
  if (mask) valid_mask = nonzero_values(*mask);
  if (continuity) cont = nonzero_values(*continuity);
  const bool cont_per_frame = continuity && continuity->dim() == 2;

  std::array<int64_t, 3> counts{};  // valid frames, pairs, velocity pairs
  std::vector<uint8_t> window_valid(mask ? 0 : static_cast<size_t>(frames), 1);
  for (int64_t b = 0; b < batch; ++b) {
    const uint8_t* valid = window_valid.data();
    if (mask) {
      valid = valid_mask.data() + b * frames;
    } else if (lengths) {  // frames t < lengths[b]
      std::fill(window_valid.begin(), window_valid.begin() + len[b], uint8_t(1));
      std::fill(window_valid.begin() + len[b], window_valid.end(), uint8_t(0));
    }
    uint8_t* fl = plan.flags.data() + b * frames;
    if (cont_per_frame) {
      const uint8_t* same = cont.data() + b * frames;
      plan_window<true>(fl, frames, valid, same, same[0], has_prev, has_prev_target, counts);
    } else {  // none, or one value per window: every frame after the first continues the file
      const uint8_t same_first = continuity ? cont[b] : 1;
      plan_window<false>(fl, frames, valid, nullptr, same_first, has_prev, has_prev_target, counts);
    }
  }
  const auto [n_valid, n_pair, n_velocity] = counts;
  plan.counts = {n_valid, n_valid, n_valid, n_pair, has_raw ? n_valid : 0, n_velocity};
  return plan;
}

bool use_avx2() {
  static const bool avx2 = std::string(cpu_kernel_isa()) == "AVX2";
  return avx2;
}

void strides_of(const at::Tensor& x, int64_t* out, int dims) {
  for (int i = 0; i < dims; ++i) out[i] = x.stride(i);
}

SequenceOutputs sequence_loss_forward_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& raw,
    const std::optional<at::Tensor>& prev, const std::optional<at::Tensor>& prev_target,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& continuity, const at::Tensor& column_weights, const at::Tensor& weights,
    const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& frame_scale, int64_t reduction,
    bool grad_pred, bool grad_target, bool grad_raw) {
  TORCH_CHECK_TYPE(is_supported_dtype(pred.scalar_type()),
                   "pred must be float16, bfloat16, float32 or float64, got ", pred.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, "pred must have shape (B, T, C), got ", pred.sizes());
  const int64_t batch = pred.size(0), frames = pred.size(1), cols = pred.size(2);
  TORCH_CHECK_VALUE(cols > 0, "pred must have at least one column (C > 0), got shape ", pred.sizes());
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  check_same(target, "target", pred, pred.sizes());
  if (raw) check_same(*raw, "raw", pred, pred.sizes());
  TORCH_CHECK_VALUE(!prev_target || prev, "prev_target needs prev");
  if (prev) check_same(*prev, "prev", pred, {batch, cols});
  if (prev_target) check_same(*prev_target, "prev_target", pred, {batch, cols});
  TORCH_CHECK_VALUE(!(lengths && mask), "give lengths or mask, not both");
  if (lengths) {
    TORCH_CHECK_TYPE(at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false),
                     "lengths must be an integer tensor, got ", lengths->scalar_type());
    TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->size(0) == batch, "lengths must have shape (", batch,
                      ",), got ", lengths->sizes());
    check_frame_tensor(*lengths, "lengths", pred);
  }
  if (mask) {
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef({batch, frames}), "mask must have shape (", batch, ", ",
                      frames, "), got ", mask->sizes());
    check_frame_tensor(*mask, "mask", pred);
  }
  if (continuity) {
    const bool per_window = continuity->dim() == 1 && continuity->size(0) == batch;
    const bool per_frame = continuity->sizes() == at::IntArrayRef({batch, frames});
    TORCH_CHECK_VALUE(per_window || per_frame, "continuity must have shape (", batch, ",) or (", batch, ", ",
                      frames, "), got ", continuity->sizes());
    check_frame_tensor(*continuity, "continuity", pred);
  }
  const at::ScalarType acc = accumulation_dtype(pred.scalar_type());
  TORCH_CHECK_VALUE(column_weights.dim() == 1 && column_weights.size(0) == cols, "column_weights must have shape (",
                    cols, ",), got ", column_weights.sizes());
  TORCH_CHECK_TYPE(column_weights.scalar_type() == acc, "column_weights must be ", acc, ", got ",
                   column_weights.scalar_type());
  TORCH_CHECK_VALUE(column_weights.device() == pred.device(), "column_weights must be on the device of pred (",
                    pred.device(), "), got ", column_weights.device());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == kNumSequenceTerms, "weights must have shape (",
                    kNumSequenceTerms, ",) (mse, l1, perceptual, temporal, smoothing, velocity), got ",
                    weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "weights must be floating, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.is_cpu(), "weights must be on the CPU or on the device of pred (", pred.device(),
                    "), got ", weights.device());
  if (counts) {
    TORCH_CHECK_VALUE(reduction == 1, "counts is only used with reduction 1 (mean), got reduction ", reduction);
    TORCH_CHECK_VALUE(counts->dim() == 1 && counts->numel() == kNumSequenceTerms, "counts must have shape (",
                      kNumSequenceTerms, ",), got ", counts->sizes());
    TORCH_CHECK_TYPE(!at::isComplexType(counts->scalar_type()), "counts must be real, got ",
                     counts->scalar_type());
    TORCH_CHECK_VALUE(counts->is_cpu(), "counts must be on the CPU or on the device of pred (", pred.device(),
                      "), got ", counts->device());
  }
  if (frame_scale) {
    TORCH_CHECK_VALUE(frame_scale->sizes() == at::IntArrayRef({batch, frames}), "frame_scale must have shape (",
                      batch, ", ", frames, "), got ", frame_scale->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(frame_scale->scalar_type()), "frame_scale must be floating, got ",
                     frame_scale->scalar_type());
    TORCH_CHECK_VALUE(frame_scale->device() == pred.device(), "frame_scale must be on the device of pred (",
                      pred.device(), "), got ", frame_scale->device());
  }

  cpu::SequenceArgs a{};
  const at::Tensor w = weights.scalar_type() == at::kDouble ? weights.contiguous()
                                                             : weights.to(at::kDouble).contiguous();
  for (int i = 0; i < kNumSequenceTerms; ++i) {
    const double v = w.const_data_ptr<double>()[i];
    TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, "weights must be finite and >= 0, got weights[", i,
                      "] = ", v);
    a.weights[i] = v;
  }

  const FramePlan plan = plan_frames(batch, frames, lengths, mask, continuity, prev.has_value(),
                                     prev_target.has_value(), raw.has_value());

  // Denominators: max(count, 1) for "mean" (the given counts when there are
  // some), 1 for "sum" and for the per-frame terms of "none".
  std::array<double, kNumSequenceTerms> given{};
  if (counts) {
    const at::Tensor c = counts->to(at::kDouble).contiguous();
    std::copy(c.const_data_ptr<double>(), c.const_data_ptr<double>() + kNumSequenceTerms, given.begin());
  }
  for (int i = 0; i < kNumSequenceTerms; ++i) {
    const double n = counts ? given[i] : static_cast<double>(plan.counts[i]);
    a.denominators[i] = reduction == 1 ? std::max(n, 1.0) : 1.0;
  }

  const bool none = reduction == 0;
  const bool want_pred = !none && grad_pred, want_target = !none && grad_target,
             want_raw = !none && grad_raw && raw.has_value();
  const at::ScalarType grad_dtype = gradient_storage_dtype(pred.scalar_type());
  auto gradient = [&](bool wanted) {
    return empty_cpu_output(wanted ? pred.sizes() : at::IntArrayRef{0}, grad_dtype);
  };
  at::Tensor total = none ? empty_cpu_output({batch, frames}, acc) : empty_cpu_output({}, acc);
  at::Tensor terms = none ? empty_cpu_output({batch, frames, kNumSequenceTerms}, acc)
                          : empty_cpu_output({kNumSequenceTerms}, acc);
  at::Tensor out_counts = empty_cpu_output({kNumSequenceTerms}, at::kLong);
  std::copy(plan.counts.begin(), plan.counts.end(), out_counts.mutable_data_ptr<int64_t>());
  at::Tensor out_grad_pred = gradient(want_pred), out_grad_target = gradient(want_target),
             out_grad_raw = gradient(want_raw);

  at::Tensor scale;
  if (frame_scale) scale = frame_scale->to(acc).contiguous();
  const at::Tensor colw = column_weights.contiguous();

  a.dtype = pred.scalar_type();
  a.pred = pred.const_data_ptr();
  a.target = target.const_data_ptr();
  a.raw = raw ? raw->const_data_ptr() : nullptr;
  a.prev = prev ? prev->const_data_ptr() : nullptr;
  a.prev_target = prev_target ? prev_target->const_data_ptr() : nullptr;
  strides_of(pred, a.pred_strides, 3);
  strides_of(target, a.target_strides, 3);
  if (raw) strides_of(*raw, a.raw_strides, 3);
  if (prev) strides_of(*prev, a.prev_strides, 2);
  if (prev_target) strides_of(*prev_target, a.prev_target_strides, 2);
  a.flags = plan.flags.data();
  a.frame_scale = scale.defined() ? scale.const_data_ptr() : nullptr;
  a.column_weights = colw.const_data_ptr();
  a.grad_pred = want_pred ? out_grad_pred.mutable_data_ptr() : nullptr;
  a.grad_target = want_target ? out_grad_target.mutable_data_ptr() : nullptr;
  a.grad_raw = want_raw ? out_grad_raw.mutable_data_ptr() : nullptr;
  a.frame_terms = none ? terms.mutable_data_ptr() : nullptr;
  a.frame_total = none ? total.mutable_data_ptr() : nullptr;
  a.batch = batch;
  a.frames = frames;
  a.cols = cols;

#if KF_HAVE_AVX2_KERNELS
  if (use_avx2()) cpu::AVX2::sequence_kernel(a);
  else cpu::DEFAULT::sequence_kernel(a);
#else
  cpu::DEFAULT::sequence_kernel(a);
#endif

  if (!none) {  // the reduced terms and their weighted total (weights of 0 left out)
    double t[kNumSequenceTerms], sum = 0.0;
    for (int i = 0; i < kNumSequenceTerms; ++i) {
      t[i] = a.sums[i] / a.denominators[i];
      if (a.weights[i] > 0.0) sum += a.weights[i] * t[i];
    }
    if (acc == at::kDouble) {
      std::copy(t, t + kNumSequenceTerms, terms.mutable_data_ptr<double>());
      *total.mutable_data_ptr<double>() = sum;
    } else {
      std::transform(t, t + kNumSequenceTerms, terms.mutable_data_ptr<float>(),
                     [](double v) { return static_cast<float>(v); });
      *total.mutable_data_ptr<float>() = static_cast<float>(sum);
    }
  }
  return {total, terms, out_counts, out_grad_pred, out_grad_target, out_grad_raw};
}

}  // namespace

TORCH_LIBRARY_IMPL(koemorph_fused, CPU, m) {
  m.impl("sequence_loss_forward", &sequence_loss_forward_cpu);
}

}  // namespace koemorph_fused
