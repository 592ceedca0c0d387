// The autograd nodes of the fused losses for eager calls, in C++.
//
// koemorph_fused.temporal_loss on plain tensors comes here (through
// python_entry.cpp's `loss`), and so does koemorph_fused.sequence_loss
// (`sequence_loss`); traced calls (torch.compile, torch.export), tensor
// subclasses, forward-mode AD and torch.func transforms use the Python
// autograd.Functions, koemorph_fused._ops.FusedTemporalLoss and
// koemorph_fused._sequence_ops.FusedSequenceLoss. Each pair does the same
// thing: forward runs the operator, which also computes the gradients, and
// saves them; backward scales them by grad_output, or, under create_graph,
// makes them differentiable. When the graph is being freed, both scale them in
// place (scale_gradients_) and hand them over. The sequence loss's reduction
// "none" differs: forward computes no gradient, and backward runs the
// operator again with frame_scale = grad_output. tests/test_autograd.py and
// tests/test_sequence_op.py run their checks on both.
//
// Why a second implementation: at B = 4 the Python Function's bookkeeping
// (creating its ctx, running forward and backward as Python code, output
// wrapping) cost more than the operator itself (callgrind;
// docs/performance.md). The C++ node took about 25 K of 226 K instructions
// off a training step there, and runs backward without taking the GIL. With
// the sequence loss's node a step at (B, T) = (8, 256) takes 114 instead of
// 143 us (docs/performance.md, "C++ autograd node for sequences").
#include "loss_autograd.h"

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>

#include "loss_inputs.h"
#include "operator_handles.h"

namespace koemorph_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The tensors that never get a gradient (prev is treated as detached), kept
// out of the node's inputs.
struct Constants {
  std::optional<at::Tensor> prev, continuity;
  at::Tensor column_weights, weights;
  bool release_gil;
};

// The forward operator, without the GIL when asked (only around the kernel:
// saving tensors may call Python saved-tensor hooks, which need it).
ForwardOutputs call_forward(const at::Tensor& pred, const at::Tensor& target,
                            const std::optional<at::Tensor>& raw, const Constants& c,
                            bool grad_pred, bool grad_target, bool grad_raw) {
  auto call = [&] {
    return forward_operator().call(pred, target, c.prev, raw, c.continuity, c.column_weights,
                                   c.weights, grad_pred, grad_target, grad_raw);
  };
  if (c.release_gil) {
    pybind11::gil_scoped_release no_gil;
    return call();
  }
  return call();
}

// Backward of reduction "mean" / "sum" for both nodes: the saved gradients
// times grad_output, as `dtype`. When the graph is being freed and the saved
// gradients have the input's dtype, they are scaled in place and handed over
// (no allocation, one pass that only writes when grad_output != 1, read on
// the device). Not under retain_graph=True: the caller would get the very
// buffer a second backward reads (autograd.grad returns it as it is).
// float16 saves float32 gradients, which take the scaling pass to become
// float16. A CPU grad_output of 1 (loss.backward() on the CPU) skips even the
// call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_saved_gradients(const at::Tensor& go,
                                                                     const variable_list& saved,
                                                                     at::ScalarType dtype) {
  if (saved[0].scalar_type() == dtype && !torch::autograd::get_current_graph_task_keep_graph()) {
    if (!is_unit_cpu_scalar(go)) scale_in_place_operator().call(go, saved);
    return {saved[0], saved[1], saved[2]};
  }
  return scale_operator().call(go, saved[0], saved[1], saved[2], dtype);
}

// Version counters of the tensors in a node's state at forward (-1 for
// anything else, and for inference tensors, which have no counter). The
// backward paths that read those inputs again (create_graph; the sequence
// loss's reduction "none") check them, as autograd checks saved tensors: an
// input changed in place in between raises instead of giving the gradients
// of other values. The other paths read only the saved gradients.
c10::List<int64_t> versions_of(c10::ArrayRef<c10::IValue> state) {
  c10::List<int64_t> versions;
  for (const c10::IValue& x : state) {
    const bool counted = x.isTensor() && !x.toTensor().is_inference();
    versions.push_back(counted ? x.toTensor()._version() : -1);
  }
  return versions;
}

void check_unchanged(c10::ArrayRef<c10::IValue> state, const c10::IValue& versions,
                     c10::ArrayRef<const char*> names, const char* loss) {
  const c10::List<int64_t> at_forward = versions.toIntList();
  for (size_t i = 0; i < names.size(); ++i) {
    const int64_t expected = at_forward.get(i);
    if (expected < 0) continue;
    const int64_t now = state[i].toTensor()._version();
    TORCH_CHECK(now == expected,
                "one of the variables needed for gradient computation has been modified by an "
                "inplace operation: ", loss, "'s ", names[i], " is at version ", now,
                "; expected version ", expected, " instead (this backward reads it again)");
  }
}

// Gradients of the saved gradients for backward(create_graph=True). The loss
// is piecewise quadratic, so its gradient is piecewise linear: away from the
// |x| = 0 kinks, d grad_pred / d pred = kd[c] + kt[r], d grad_pred / d target
// = -kd[c], and so on. Adding H * (x - x.detach()) (zero in value) to each
// saved gradient gives it exactly that Jacobian. The same formulas as
// _differentiable_gradients in koemorph_fused/_ops.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_gradients(
    c10::ArrayRef<c10::IValue> state, const variable_list& saved, const at::Tensor& go) {
  const at::Tensor& pred = state[0].toTensor();
  const at::Tensor& target = state[1].toTensor();
  const at::Tensor& colw = state[3].toTensor();
  const at::Tensor& weights = state[4].toTensor();
  const bool has_prev = state[5].toBool();
  const int64_t cols = pred.size(-1);
  const int64_t rows = pred.numel() / cols;
  const at::ScalarType acc = colw.scalar_type();
  // The kernels' weight rule (effective_weight in loss_math.h), in float64
  // where the weights are, then the kernels' coefficients rounded once to
  // acc. CPU weights stay on the CPU: their 0-dim slices enter the device
  // ops below as scalars (no host-to-device copy, no sync, capture-safe).
  at::Tensor w = weights.to(at::kDouble);
  w = at::where(w.gt(0).logical_and(w.isfinite()), w, at::zeros({}, w.options()));
  auto coefficient = [&](int term, double scale) { return (w[term] * scale).to(acc); };
  const at::Tensor kd = coefficient(0, 2.0 / static_cast<double>(rows * cols)) +
                        coefficient(2, 2.0 / static_cast<double>(rows)) * colw;
  const at::Tensor d_pred = (pred - pred.detach()).to(acc);
  const at::Tensor d_target = (target - target.detach()).to(acc);
  const at::Tensor lin_d = kd * (d_pred - d_target);
  at::Tensor lin_pred = lin_d;
  if (has_prev) {
    const auto rows_shape = pred.sizes().slice(0, pred.dim() - 1);
    const at::Tensor m = state[2].isNone() ? at::ones(rows_shape, pred.options().dtype(acc))
                                           : state[2].toTensor().to(acc);
    const at::Tensor m_sum = m.sum();
    const at::Tensor kt = coefficient(3, 2.0 / static_cast<double>(cols)) * m /
                          at::where(m_sum > 0, m_sum, at::ones_like(m_sum));
    lin_pred = lin_pred + kt.unsqueeze(-1) * d_pred;
  }
  auto linearized = [&](const at::Tensor& g, const at::Tensor& lin, const at::Tensor& like) {
    return g.numel() == 0 ? at::Tensor() : (go * (g.to(acc) + lin)).to(like.scalar_type());
  };
  // grad_raw has no linear part (its derivatives are zero), but is scaled in
  // the accumulation dtype and rounded once, like the others.
  return {linearized(saved[0], lin_pred, pred), linearized(saved[1], -lin_d, target),
          saved[2].numel() == 0 ? at::Tensor() : (go * saved[2].to(acc)).to(pred.scalar_type())};
}

struct TemporalLossFunction : public torch::autograd::Function<TemporalLossFunction> {
  // Inputs of the node: pred, target and raw (edges 0, 1 and 2).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred,
                               const at::Tensor& target, const std::optional<at::Tensor>& raw,
                               const Constants& c, bool grad_pred, bool grad_target,
                               bool grad_raw) {
    auto [total, terms, g_pred, g_target, g_raw] =
        call_forward(pred, target, raw, c, grad_pred, grad_target, grad_raw);
    ctx->set_materialize_grads(false);  // no zero tensor for the gradient of `terms`
    ctx->save_for_backward({g_pred, g_target, g_raw});
    ctx->mark_non_differentiable({terms});
    // What backward and a create_graph backward read. Inputs, not outputs:
    // no reference cycle.
    auto state = c10::ivalue::Tuple::create(
        {pred, target, c.continuity ? c10::IValue(*c.continuity) : c10::IValue(), c.column_weights,
         c.weights, c.prev.has_value()});
    ctx->saved_data["versions"] = versions_of(state->elements());
    ctx->saved_data["state"] = std::move(state);
    return {total, terms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(7);  // one per forward argument after ctx
    const at::Tensor& go = grad_outputs[0];
    if (!go.defined()) return out;  // total did not reach the loss being differentiated
    const variable_list saved = ctx->get_saved_variables();
    const c10::ArrayRef<c10::IValue> state =
        ctx->saved_data["state"].toTupleRef().elements().asArrayRef();
    const at::ScalarType dtype = state[0].toTensor().scalar_type();
    at::Tensor g_pred, g_target, g_raw;
    if (at::GradMode::is_enabled()) {  // backward(create_graph=True)
      check_unchanged(state, ctx->saved_data["versions"],
                      {"pred", "target", "continuity", "column_weights", "weights"}, "temporal_loss");
      std::tie(g_pred, g_target, g_raw) = differentiable_gradients(state, saved, go);
    } else {
      std::tie(g_pred, g_target, g_raw) = scale_saved_gradients(go, saved, dtype);
    }
    if (ctx->needs_input_grad(0)) out[0] = g_pred;
    if (ctx->needs_input_grad(1)) out[1] = g_target;
    if (saved[2].numel() != 0 && ctx->needs_input_grad(2)) out[2] = g_raw;
    return out;
  }
};

// Arguments of the sequence operator that never get a gradient (prev and
// prev_target are treated as detached), kept out of the node's inputs.
struct SequenceConstants {
  std::optional<at::Tensor> prev, prev_target, lengths, mask, continuity;
  at::Tensor column_weights, weights;
  std::optional<at::Tensor> counts;
  int64_t reduction;
  bool release_gil;
};

constexpr int64_t kReductionNone = 0, kReductionSum = 2;  // the operator's codes (csrc/ops.cpp)
// The tensors of the sequence node's state, in order.
constexpr const char* kSequenceInputNames[] = {"pred", "target", "raw", "prev", "prev_target", "lengths",
                                               "mask", "continuity", "column_weights", "weights",
                                               "counts"};

c10::IValue optional_value(const std::optional<at::Tensor>& t) {
  return t ? c10::IValue(*t) : c10::IValue();
}

std::optional<at::Tensor> optional_tensor(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : std::optional<at::Tensor>(v.toTensor());
}

// The sequence operator, without the GIL when asked (only around the kernel).
SequenceOutputs call_sequence(const at::Tensor& pred, const at::Tensor& target,
                              const std::optional<at::Tensor>& raw, const SequenceConstants& c,
                              const std::optional<at::Tensor>& frame_scale, int64_t reduction,
                              bool grad_pred, bool grad_target, bool grad_raw) {
  auto call = [&] {
    return sequence_operator().call(pred, target, raw, c.prev, c.prev_target, c.lengths, c.mask,
                                    c.continuity, c.column_weights, c.weights, c.counts,
                                    frame_scale, reduction, grad_pred, grad_target, grad_raw);
  };
  if (c.release_gil) {
    pybind11::gil_scoped_release no_gil;
    return call();
  }
  return call();
}

// Gradients for backward(create_graph=True) of the sequence loss: the
// Python glue's _differentiable_gradients (koemorph_fused/_sequence_ops.py;
// the package is imported by then, since only it creates this node), the one
// implementation of the loss in differentiable torch arithmetic. Double
// backward is rare; calling it keeps the formulas in one place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_differentiable_gradients(
    c10::ArrayRef<c10::IValue> state, const at::Tensor& go) {
  namespace py = pybind11;
  const py::gil_scoped_acquire gil;
  py::tuple args(state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    const c10::IValue& v = state[i];
    args[i] = v.isNone() ? py::none() : v.isTensor() ? py::cast(v.toTensor()) : py::cast(v.toInt());
  }
  const py::object grads = py::module_::import("koemorph_fused._sequence_ops")
                               .attr("_differentiable_gradients")(args, go);
  auto tensor_at = [&](size_t i) {
    const py::object g = grads[py::int_(i)];
    return g.is_none() ? at::Tensor() : g.cast<at::Tensor>();
  };
  return {tensor_at(0), tensor_at(1), tensor_at(2)};
}

// The sequence loss's node: the same design as TemporalLossFunction. For
// reduction "none" forward computes no gradient; backward runs the operator
// again with frame_scale = grad_output and reduction "sum".
struct SequenceLossFunction : public torch::autograd::Function<SequenceLossFunction> {
  // Inputs of the node: pred, target and raw (edges 0, 1 and 2).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred,
                               const at::Tensor& target, const std::optional<at::Tensor>& raw,
                               const SequenceConstants& c, bool grad_pred, bool grad_target,
                               bool grad_raw) {
    const bool none = c.reduction == kReductionNone;
    auto [total, terms, counts, g_pred, g_target, g_raw] =
        call_sequence(pred, target, raw, c, std::nullopt, c.reduction, grad_pred && !none,
                      grad_target && !none, grad_raw && !none);
    ctx->set_materialize_grads(false);  // no zero tensors for terms and counts
    ctx->save_for_backward({g_pred, g_target, g_raw});
    ctx->mark_non_differentiable({terms, counts});
    // The operator's arguments, as _differentiable_gradients takes them, then
    // the gradients to compute. Inputs, not outputs: no reference cycle.
    auto state = c10::ivalue::Tuple::create(
        {pred, target, optional_value(raw), optional_value(c.prev), optional_value(c.prev_target),
         optional_value(c.lengths), optional_value(c.mask), optional_value(c.continuity),
         c.column_weights, c.weights, optional_value(c.counts), c.reduction, grad_pred,
         grad_target, grad_raw});
    ctx->saved_data["versions"] = versions_of(state->elements());
    ctx->saved_data["state"] = std::move(state);
    return {total, terms, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(7);  // one per forward argument after ctx
    const at::Tensor& go = grad_outputs[0];
    if (!go.defined()) return out;  // total did not reach the loss being differentiated
    const c10::ArrayRef<c10::IValue> state =
        ctx->saved_data["state"].toTupleRef().elements().asArrayRef();
    const at::Tensor& pred = state[0].toTensor();
    const int64_t reduction = state[11].toInt();
    if (at::GradMode::is_enabled() || reduction == kReductionNone) {  // reads the inputs again
      check_unchanged(state, ctx->saved_data["versions"], kSequenceInputNames, "sequence_loss");
    }
    at::Tensor g_pred, g_target, g_raw;
    if (at::GradMode::is_enabled()) {  // backward(create_graph=True)
      std::tie(g_pred, g_target, g_raw) = sequence_differentiable_gradients(state.slice(0, 12), go);
    } else if (reduction == kReductionNone) {
      // Each frame's terms weighted by its own grad_output, summed.
      const SequenceConstants c{optional_tensor(state[3]), optional_tensor(state[4]),
                                optional_tensor(state[5]), optional_tensor(state[6]),
                                optional_tensor(state[7]), state[8].toTensor(),
                                state[9].toTensor(), std::nullopt, kReductionSum,
                                false};
      auto outs = call_sequence(pred, state[1].toTensor(), optional_tensor(state[2]), c, go,
                                kReductionSum, state[12].toBool(), state[13].toBool(),
                                state[14].toBool());
      const at::ScalarType dtype = pred.scalar_type();
      g_pred = std::get<3>(outs).to(dtype);
      g_target = std::get<4>(outs).to(dtype);
      g_raw = std::get<5>(outs).to(dtype);
    } else {
      std::tie(g_pred, g_target, g_raw) =
          scale_saved_gradients(go, ctx->get_saved_variables(), pred.scalar_type());
    }
    // An input whose gradient was not computed gets none: an empty (0,)
    // tensor means "not asked for", except for an empty input (B or T = 0),
    // whose gradient is empty too, of its shape (zeros upstream, as the
    // reference gives). Without raw the node has two inputs, so
    // needs_input_grad(2) is only asked when raw exists.
    const at::Tensor* grads[] = {&g_pred, &g_target, &g_raw};
    for (int i = 0; i < 3; ++i) {
      if (state[i].isNone() || !grads[i]->defined()) continue;
      const at::Tensor& input = state[i].toTensor();
      const bool computed = grads[i]->numel() != 0 || grads[i]->sizes() == input.sizes();
      if (computed && ctx->needs_input_grad(i)) out[i] = *grads[i];
    }
    return out;
  }
};

// Autograd kernel of scale_gradients_: not differentiable (it runs in
// backward, on saved gradients), but it modifies its tensors, so it bumps
// their version counters: a later unpacking of a saved tensor it changed
// raises instead of reading the scaled values.
void scale_gradients_in_place_autograd(const at::Tensor& grad_output, at::TensorList grads) {
  for (const at::Tensor& g : grads) {
    TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && g.requires_grad()),
                      "scale_gradients_: grads must not require grad");
  }
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    scale_in_place_operator().call(grad_output, grads);
  }
  for (const at::Tensor& g : grads) torch::autograd::impl::bump_version(g);
}

}  // namespace

TORCH_LIBRARY_IMPL(koemorph_fused, Autograd, m) {
  m.impl("scale_gradients_", &scale_gradients_in_place_autograd);
}

bool is_unit_cpu_scalar(const at::Tensor& t) {
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || t.numel() != 1 ||
      t._is_zerotensor() || !t.has_storage() ||
      t.key_set().has_any(c10::python_ks) || t.key_set().has(c10::DispatchKey::Functionalize)) {
    return false;
  }
  // Reading a CPU value is not a device synchronisation; read directly, not
  // through aten::item (a dispatcher call, the main cost of this check).
  const void* p = t.const_data_ptr();
  if (p == nullptr) return false;
  switch (t.scalar_type()) {
    case at::kFloat: return *static_cast<const float*>(p) == 1.0f;
    case at::kDouble: return *static_cast<const double*>(p) == 1.0;
    case at::kHalf: return static_cast<float>(*static_cast<const at::Half*>(p)) == 1.0f;
    case at::kBFloat16: return static_cast<float>(*static_cast<const at::BFloat16*>(p)) == 1.0f;
    default: return false;
  }
}

std::tuple<at::Tensor, at::Tensor> temporal_loss_with_autograd(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& prev,
    const std::optional<at::Tensor>& raw, const std::optional<at::Tensor>& continuity,
    const at::Tensor& column_weights, const at::Tensor& weights, bool release_gil) {
  const Constants c{prev, continuity, column_weights, weights, release_gil};
  const bool grad_mode = at::GradMode::is_enabled();
  const bool grad_pred = grad_mode && pred.requires_grad();
  const bool grad_target = grad_mode && target.requires_grad();
  const bool grad_raw = grad_mode && raw.has_value() && raw->requires_grad();
  if (!(grad_pred || grad_target || grad_raw)) {
    auto outs = call_forward(pred, target, raw, c, false, false, false);
    return {std::get<0>(outs), std::get<1>(outs)};
  }
  variable_list outs =
      TemporalLossFunction::apply(pred, target, raw, c, grad_pred, grad_target, grad_raw);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_loss_with_autograd(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& raw,
    const std::optional<at::Tensor>& prev, const std::optional<at::Tensor>& prev_target,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& continuity, const at::Tensor& column_weights,
    const at::Tensor& weights, const std::optional<at::Tensor>& counts, int64_t reduction,
    bool release_gil) {
  const SequenceConstants c{prev, prev_target, lengths, mask, continuity, column_weights,
                            weights, counts, reduction, release_gil};
  const bool grad_mode = at::GradMode::is_enabled();
  const bool grad_pred = grad_mode && pred.requires_grad();
  const bool grad_target = grad_mode && target.requires_grad();
  const bool grad_raw = grad_mode && raw.has_value() && raw->requires_grad();
  if (!(grad_pred || grad_target || grad_raw)) {
    auto outs = call_sequence(pred, target, raw, c, std::nullopt, reduction, false, false, false);
    return {std::get<0>(outs), std::get<1>(outs), std::get<2>(outs)};
  }
  variable_list outs =
      SequenceLossFunction::apply(pred, target, raw, c, grad_pred, grad_target, grad_raw);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace koemorph_fused
